"""Anomaly thresholds live in the one Settings object: a bad override fails at start-up."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from app.anomaly_config import DetectorSettings
from app.settings import Settings


def test_anomaly_options_are_validated_when_settings_load() -> None:
    settings = Settings(anomaly_options={"volume_p_value": "1e-6", "cost_min_ratio": "2"})
    parsed = DetectorSettings.with_options(**settings.anomaly_options)
    assert parsed.volume_p_value == 1e-6 and parsed.cost_min_ratio == 2.0
    with pytest.raises(ValidationError, match=r"unknown detector option.*volume_pvalue"):
        Settings(anomaly_options={"volume_pvalue": "1e-6"})
    with pytest.raises(ValidationError, match="cost_min_ratio"):
        Settings(anomaly_options={"cost_min_ratio": "0.5"})


def test_the_surge_scale_cannot_divide_by_zero_or_invert() -> None:
    """The rest of the traffic's level is clamped to [1 / volume_context_max,
    volume_context_max], and only counted where the rest expects volume_context_min_requests
    a minute: 0 would divide by zero on every busy user's call, under 1 invert the clamp."""
    with pytest.raises(ValueError, match="volume_context_max"):
        DetectorSettings.with_options(volume_context_max=0)
    with pytest.raises(ValueError, match="volume_context_max"):
        DetectorSettings.with_options(volume_context_max=0.5)
    with pytest.raises(ValueError, match="volume_context_min_requests"):
        DetectorSettings.with_options(volume_context_min_requests=0)
    assert DetectorSettings.with_options(volume_context_max=1).volume_context_max == 1.0


def test_every_threshold_is_documented_in_the_settings_and_in_docs() -> None:
    from dataclasses import fields
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[2] / "docs" / "ANOMALY.md").read_text()
    for spec in fields(DetectorSettings):
        assert f"`{spec.name}`" in doc, f"{spec.name} is not explained in docs/ANOMALY.md"
