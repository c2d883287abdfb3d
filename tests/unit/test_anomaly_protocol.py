"""The one detector protocol: a detector the engine has never heard of plugs in through
``Detector`` (``observe_point``) and its verdicts come out as alerts, per scope, through the
same alert lifecycle; and every built-in detector speaks the same protocol."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from agents.anomaly.core import Detector, Point, Verdict
from agents.anomaly.costs import CostDetector
from agents.anomaly.detectors import DetectorSettings
from agents.anomaly.engine import AnomalyEngine
from agents.anomaly.mix import TierMixDetector
from agents.anomaly.rates import RateDetector
from agents.anomaly.series import SeriesDetector

T0 = datetime(2024, 5, 1, 8, tzinfo=UTC)


class OverBudgetCall:
    """A trivial detector: any single call costing over a fixed amount is anomalous."""

    def __init__(self, scope: str, limit_nanos: float) -> None:
        self.scope = scope
        self.limit_nanos = limit_nanos
        self.points: list[Point] = []

    def observe_point(self, point: Point) -> Verdict | None:
        self.points.append(point)
        if point.value <= self.limit_nanos:
            return None
        return Verdict(
            kind="cost_per_request",
            scope=self.scope,
            ts=point.ts,
            score=point.value / self.limit_nanos,
            is_anomaly=True,
            expected=self.limit_nanos / 1e9,
            observed=point.value / 1e9,
            unit="usd",
            metric="single call cost (test detector)",
            window_seconds=None,
        )


def only_users(scope: str, settings: DetectorSettings) -> OverBudgetCall | None:
    return OverBudgetCall(scope, limit_nanos=50_000_000) if scope.startswith("user:") else None


def call(ts: datetime, user: str, cost_nanos: int) -> dict[str, Any]:
    return {
        "ts": ts,
        "user_id": user,
        "feature": "chat",
        "model_served": "gpt-4o-mini",
        "tier": "economy",
        "prompt_tokens": 10,
        "completion_tokens": 10,
        "cost_usd_nanos": cost_nanos,
        "price_unknown": False,
        "cache_hit": False,
    }


def test_a_detector_the_engine_does_not_know_plugs_in_and_its_alert_comes_out() -> None:
    engine = AnomalyEngine(DetectorSettings(), detectors=[only_users])
    records = [call(T0 + timedelta(seconds=i), "cheap", 1_000) for i in range(5)]
    records.append(call(T0 + timedelta(seconds=10), "spender", 90_000_000))
    alerts: list[dict[str, Any]] = []
    for record in records:
        alerts += engine.observe(record)
    alerts += engine.flush()

    fired = [a for a in alerts if a["status"] == "firing"]
    assert [a["alert_key"] for a in fired] == ["cost_per_request|user:spender"]
    assert "single call cost (test detector)" in fired[0]["message"]
    assert fired[0]["observed"] == 0.09
    plugged = engine.users["user:cheap"].detectors
    assert len(plugged) == 1 and isinstance(plugged[0], Detector)
    assert [p.value for p in plugged[0].points] == [1_000.0] * 5  # type: ignore[attr-defined]
    assert engine.global_scope.detectors == (), "the factory said no to the global scope"


def test_plugged_detectors_survive_a_checkpoint() -> None:
    engine = AnomalyEngine(DetectorSettings(), detectors=[only_users])
    engine.observe(call(T0, "u", 1_000))
    restored = AnomalyEngine.restore(engine.snapshot(), detectors=[only_users])
    assert len(restored.users["user:u"].detectors[0].points) == 1  # type: ignore[attr-defined]
    restored.observe(call(T0 + timedelta(seconds=1), "new", 1_000))
    assert len(restored.users["user:new"].detectors) == 1, "new scopes get the plug-ins too"


def test_every_built_in_detector_speaks_the_protocol() -> None:
    settings = DetectorSettings()
    built_in: list[Detector] = [
        RateDetector("global", settings, "global"),
        CostDetector("global", settings, own_reference=True),
        TierMixDetector("global", settings),
        SeriesDetector("series", settings, 60),
    ]
    for detector in built_in:
        assert isinstance(detector, Detector)
        for i in range(3):  # fed through the protocol alone; warming up, so no alarm
            verdict = detector.observe_point(Point(T0 + timedelta(minutes=i), 1.0))
            assert verdict is None or not verdict.is_anomaly
