"""One rule ends a cost alarm and its incident (issue 12, review finding): the cost
detector's alarm and the alert lifecycle's incident each kept "silence does not end a
feature's cost alarm" with their own counter and their own boundary; both now ask
``alarm_end``."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

from agents.anomaly.alerting import AlertManager
from agents.anomaly.core import alarm_end, is_user_scope
from agents.anomaly.costs import CostDetector
from app.anomaly_config import DetectorSettings

T0 = datetime(2024, 5, 6, tzinfo=UTC)
S = DetectorSettings()


def test_alarm_end_for_each_kind_of_scope() -> None:
    after, silent = S.resolve_after_seconds, S.resolve_silent_after_seconds
    feature = ("cost_per_request", "feature:f")
    assert alarm_end(S, *feature, after - 1, 10) == "holds"
    assert alarm_end(S, *feature, after, S.resolve_min_normal_calls) == "normal"
    assert alarm_end(S, *feature, after, S.resolve_min_normal_calls - 1) == "holds"
    assert alarm_end(S, *feature, silent - 1, 0) == "holds"
    assert alarm_end(S, *feature, silent, 0) == "silence"
    assert alarm_end(S, "cost_per_request", "global", silent, 0) == "silence"
    # A user's cost and any request rate: their silence is evidence, time alone ends them.
    assert alarm_end(S, "cost_per_request", "user:u1", after, 0) == "normal"
    assert alarm_end(S, "volume_spike", "feature:f", after, 0) == "normal"
    assert is_user_scope("user:u1") and not is_user_scope("feature:user:x")


def test_the_cost_alarm_and_its_incident_end_at_the_same_call() -> None:
    """A feature's 4x step, then calls back at the usual cost, 10 s apart, so one lands
    exactly ``resolve_after_seconds`` after the last anomalous one. Before, the lifecycle
    resolved the incident at that moment (``>=``) while the detector kept its alarm
    (``>``) and judged that call in it; now both end there."""
    rng = random.Random(2)
    detector = CostDetector("feature:f", S, own_reference=True)
    manager = AlertManager(S)
    t = T0

    def call(factor: float) -> None:
        nonlocal t
        t += timedelta(seconds=10)
        verdict = detector.observe(t, 1e6 * factor * rng.lognormvariate(0, 0.5), None, 360.0)
        if verdict is not None:
            manager.process(verdict)

    for _ in range(400):
        call(1.0)
    for _ in range(30):
        call(4.0)
    assert "cost_per_request|feature:f" in manager.firing
    for _ in range(200):
        boundary = datetime.fromtimestamp(detector.last_anomalous, UTC) + timedelta(
            seconds=S.resolve_after_seconds
        )
        if t + timedelta(seconds=10) == boundary and detector.normal_calls >= 3:
            break
        call(1.0)
    else:
        raise AssertionError("no call landed on the boundary")
    resolved = manager.tick(boundary)
    call(1.0)  # at the boundary
    assert [a["status"] for a in resolved] == ["resolved"]
    assert detector.alarm_since is None, "the incident resolved, the alarm must have ended"


def test_building_share_is_a_setting() -> None:
    """``incident_cost_wait_building_share`` (was a constant 0.5 in ``building``)."""
    detector = CostDetector("feature:f", S, own_reference=True)
    detector.cusums[0].stat = 0.4 * detector.thresholds[0]
    assert not detector.building()
    detector.use_settings(DetectorSettings(incident_cost_wait_building_share=0.3))
    assert detector.building()
