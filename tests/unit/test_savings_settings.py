"""The routing and cache blocks of the one Settings object: env JSON, YAML, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from app.cli import main
from app.routing import Tier
from app.settings import Settings


def test_defaults() -> None:
    settings = Settings()
    assert settings.routing.auto_model == "auto"
    assert settings.routing.providers[0].model_for(Tier.ECONOMY) == "gpt-4o-mini"
    assert settings.cache.enabled is False


def test_env_json_and_yaml(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(
        "TOLLGATE_ROUTING",
        '{"quality_target": 0.9, "features": {"support-bot": {"max_tier": "economy"}}}',
    )
    settings = Settings()
    assert settings.routing.quality_target == 0.9
    assert settings.routing.rule_for("support-bot").max_tier is Tier.ECONOMY
    monkeypatch.delenv("TOLLGATE_ROUTING")
    config = tmp_path / "tollgate.yaml"
    config.write_text(
        "cache:\n  enabled: true\n  ttl_s: 60\n  features:\n    docs: {shareable: true}\n"
    )
    monkeypatch.setenv("TOLLGATE_CONFIG", str(config))
    settings = Settings()
    assert settings.cache.enabled and settings.cache.ttl_s == 60
    assert settings.cache.rule_for("docs").shareable


@pytest.mark.parametrize(
    ("variable", "value", "named"),
    [
        ("TOLLGATE_ROUTING", '{"quality_target": 2}', "TOLLGATE_ROUTING[quality_target]"),
        ("TOLLGATE_ROUTING", '{"features": {"f": {"pin": "gold"}}}', "TOLLGATE_ROUTING[features]"),
        ("TOLLGATE_CACHE", '{"max_bytes": -1}', "TOLLGATE_CACHE[max_bytes]"),
        ("TOLLGATE_CACHE", '{"ttl": 5}', "TOLLGATE_CACHE[ttl]"),
    ],
)
def test_a_bad_value_is_named(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, named: str
) -> None:
    monkeypatch.setenv(variable, value)
    result = CliRunner().invoke(main, ["route", "score", "unused.jsonl"])
    assert result.exit_code == 1
    assert named in result.stderr


def test_reading_settings_does_not_load_the_router_model() -> None:
    """Every process reads settings; the model's libraries (River) load only when routing."""
    import subprocess
    import sys

    code = "import sys, app.settings; print('river' in sys.modules, 'numpy' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
