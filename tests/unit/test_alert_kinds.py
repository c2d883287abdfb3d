"""The alerts report's ``kind=`` accepts the kinds the agents publish, and nothing else: a
typo (``kind=budget_treshold``) listed nothing, as if no alert had fired (probe 46)."""

from typing import get_args

import pytest

from agents.anomaly.core import Kind
from app.alerts_config import ALERT_KINDS, ANOMALY_KINDS, BUDGET_THRESHOLD
from app.warehouse.reports import Range, ReportError, recent_alerts


def test_the_known_kinds_are_the_ones_the_agents_publish() -> None:
    assert set(get_args(Kind)) == set(ANOMALY_KINDS)
    assert set(ALERT_KINDS) == {*ANOMALY_KINDS, BUDGET_THRESHOLD}


@pytest.mark.parametrize("kind", ["budget_treshold", "volume", "", "VOLUME_SPIKE"])
def test_an_unknown_kind_is_refused_naming_the_kinds(kind: str) -> None:
    with pytest.raises(ReportError) as refused:
        recent_alerts(object(), Range.parse(None, None), 20, kind)
    assert refused.value.param == "kind"
    assert "budget_threshold" in str(refused.value) and "tier_mix" in str(refused.value)
