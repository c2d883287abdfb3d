"""Alert lifecycle: one firing per incident, resolve after quiet, cooldown, schema shape."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

from agents.anomaly.alerting import AlertManager
from agents.anomaly.detectors import DetectorSettings, Kind, Verdict
from app.events.codec import EventCodec

T0 = datetime(2024, 5, 1, 12, tzinfo=UTC)
SETTINGS = DetectorSettings(resolve_after_seconds=300, cooldown_seconds=1800)


def verdict(
    at: datetime,
    anomalous: bool = True,
    kind: Kind = "volume_spike",
    scope: str = "user:alice",
    observed: float = 120.0,
    expected: float = 6.0,
) -> Verdict:
    return Verdict(
        kind=kind,
        scope=scope,
        ts=at,
        score=12.0 if anomalous else 0.0,
        is_anomaly=anomalous,
        expected=expected,
        observed=observed,
        unit="requests/min",
        metric="requests/min",
        window_seconds=60,
    )


def feed(manager: AlertManager, verdicts: list[Verdict]) -> list[dict[str, Any]]:
    alerts: list[dict[str, Any]] = []
    for v in verdicts:
        alerts += manager.process(v)
        alerts += manager.tick(v.ts)
    return alerts


def test_one_firing_per_incident_then_one_resolved() -> None:
    manager = AlertManager(SETTINGS)
    incident = [verdict(T0 + timedelta(seconds=10 * i)) for i in range(30)]  # 5 minutes
    alerts = feed(manager, incident)
    assert [a["status"] for a in alerts] == ["firing"]
    firing = alerts[0]
    assert firing["alert_key"] == "volume_spike|user:alice"
    assert firing["first_seen"] == T0 and firing["ts"] == T0
    assert firing["expected"] == 6.0 and firing["observed"] == 120.0
    assert "20.0x normal" in firing["message"]
    assert firing["severity"] == "critical"  # 20x >= critical_ratio

    last = incident[-1].ts
    assert manager.tick(last + timedelta(seconds=299)) == []
    normal = manager.process(verdict(last + timedelta(seconds=100), anomalous=False, observed=7.0))
    assert normal == []
    resolved = manager.tick(last + timedelta(seconds=300))
    assert [a["status"] for a in resolved] == ["resolved"]
    assert resolved[0]["event_id"] != firing["event_id"]
    assert resolved[0]["first_seen"] == T0 and resolved[0]["last_seen"] == last
    assert resolved[0]["observed"] == 7.0  # the latest, normal value
    assert "back to normal" in resolved[0]["message"]


def test_no_refire_during_cooldown_then_fire_again() -> None:
    manager = AlertManager(SETTINGS)
    feed(manager, [verdict(T0)])
    resolved_at = T0 + timedelta(seconds=300)
    assert manager.tick(resolved_at)[0]["status"] == "resolved"
    during = feed(manager, [verdict(resolved_at + timedelta(minutes=m)) for m in range(1, 5)])
    assert during == []
    later = resolved_at + timedelta(seconds=1800)
    again = manager.process(verdict(later))
    assert [a["status"] for a in again] == ["firing"]
    assert again[0]["details"]["anomalies_during_cooldown"] == "4"


def test_keys_are_independent_and_severity_follows_the_deviation() -> None:
    manager = AlertManager(SETTINGS)
    spike = manager.process(verdict(T0, observed=20.0, expected=10.0))
    other_scope = manager.process(verdict(T0, scope="user:bob"))
    other_kind = manager.process(
        verdict(T0, kind="tier_mix", scope="feature:chat", observed=0.2, expected=0.7)
    )
    drop = manager.process(verdict(T0, kind="volume_drop", scope="global", observed=5.0))
    assert len(spike) == len(other_scope) == len(other_kind) == len(drop) == 1
    assert spike[0]["severity"] == "warning"
    assert other_kind[0]["severity"] == "critical"  # -50 points
    assert drop[0]["severity"] == "warning"  # 5 vs 6: not a tenth


def test_normal_verdicts_alone_never_alert() -> None:
    manager = AlertManager(SETTINGS)
    assert feed(manager, [verdict(T0 + timedelta(minutes=m), False) for m in range(60)]) == []


def test_alert_records_match_the_avro_schema() -> None:
    manager = AlertManager(SETTINGS)
    alerts = manager.process(verdict(T0)) + manager.tick(T0 + timedelta(hours=1))
    codec = EventCodec()
    for alert in alerts:
        decoded = codec.decode(codec.encode("Alert", alert))
        assert decoded.event_type == "Alert"
        assert decoded.record["alert_key"] == alert["alert_key"]
        assert decoded.record["status"] == alert["status"]
        assert decoded.record["ts"] == alert["ts"]
        assert all(isinstance(value, str) for value in alert["details"].values())


def test_a_page_held_for_its_incident_states_the_latest_figures() -> None:
    """Probe N (H3): a burst of 3,000 calls a minute was paged after the incident's hold
    with the figures of its first verdict (26 calls: "$2.56/hour" for about $894/hour).
    The page now states the latest anomalous verdict of the same measure."""
    from dataclasses import replace

    from agents.anomaly.incidents import Correlator

    manager = AlertManager(SETTINGS)
    correlator = Correlator(SETTINGS, lambda a, b: a == b, lambda *_: False, manager.refreshed)
    first = replace(verdict(T0, observed=26.0, expected=0.2), impact_usd_per_hour=2.56)
    later = replace(
        verdict(T0 + timedelta(seconds=15), observed=750.0, expected=0.2),
        impact_usd_per_hour=890.0,
        score=11.0,  # a lower score than the first, but more money: the peak
    )
    out: list[dict[str, Any]] = []
    for v in (first, later):
        out += correlator.process(manager.process(v), v.ts)
    out += correlator.tick(T0 + timedelta(seconds=60))
    [page] = [a for a in out if a["incident_role"] == "primary"]
    assert page["impact_usd_per_hour"] == 890.0 and page["observed"] == 750.0
    assert "$890" in page["message"] and page["severity"] == "critical", page["message"]
    assert page["ts"] == T0  # when it fired
    # the page's peak is never below what the page itself says (probe H: a burst paged at
    # 1,001 a minute resolved with a "peak" of 346, the first verdict's, by score)
    assert page["details"]["peak_observed"] == "750"


def test_a_growing_incidents_resolve_states_its_largest_money() -> None:
    """Probe H (D1): a cost drift paged at 1.5x ($0.21/hour), grew to 5x (about $10/hour),
    and resolved 3 hours later saying "at its peak about $0.21/hour": the peak was the
    verdict with the highest score, the drift's early evidence."""
    manager = AlertManager(SETTINGS)
    steps = [(1.5, 0.21, 14.0), (3.0, 4.1, 9.0), (5.0, 10.25, 7.0), (4.0, 8.0, 6.0)]
    alerts: list[dict[str, Any]] = []
    for i, (ratio, money, score) in enumerate(steps):
        v = Verdict(
            kind="cost_per_request",
            scope="feature:codegen",
            ts=T0 + timedelta(minutes=30 * i),
            score=score,
            is_anomaly=True,
            expected=0.0047,
            observed=0.0047 * ratio,
            unit="usd/request",
            metric="cost per request",
            window_seconds=None,
            impact_usd_per_hour=money,
        )
        alerts += manager.process(v)
    alerts += manager.tick(T0 + timedelta(hours=3))
    [end] = [a for a in alerts if a["status"] == "resolved"]
    assert end["details"]["peak_impact_usd_per_hour"] == "10.25", end["details"]
    assert "$10.25/hour" in end["message"] or "$10.2" in end["message"], end["message"]


def cost_verdict(at: datetime, anomalous: bool = True) -> Verdict:
    return Verdict(
        kind="cost_per_request",
        scope="feature:search",
        ts=at,
        score=8.0 if anomalous else 0.5,
        is_anomaly=anomalous,
        expected=0.002,
        observed=0.008 if anomalous else 0.0021,
        unit="usd",
        metric="cost per request",
        window_seconds=None,
        impact_usd_per_hour=1.2 if anomalous else 0.01,
    )


def test_a_cost_incident_resolves_on_calls_judged_normal_not_on_silence() -> None:
    """Probe P: a feature whose calls stopped for more than ``resolve_after_seconds`` amid a
    drift resolved in the gap ("back to normal") and paged again when calls resumed."""
    settings = DetectorSettings(resolve_after_seconds=300, resolve_silent_after_seconds=1800)
    manager = AlertManager(settings)
    incident = [cost_verdict(T0 + timedelta(seconds=20 * i)) for i in range(10)]
    assert [a["status"] for a in feed(manager, incident)] == ["firing"]
    last = incident[-1].ts
    assert manager.tick(last + timedelta(seconds=900)) == []  # silent: no evidence either way
    # Two calls judged normal are not yet enough; the third is.
    normals = [cost_verdict(last + timedelta(seconds=900 + 10 * i), False) for i in range(3)]
    assert feed(manager, normals[:2]) == []
    [resolved] = feed(manager, normals[2:])
    assert resolved["status"] == "resolved" and "back to normal" in resolved["message"]
    assert resolved["ts"] == normals[2].ts  # when calls showed it, not in the silence

    # Silence alone resolves after resolve_silent_after_seconds, saying so.
    manager = AlertManager(settings)
    later = T0 + timedelta(hours=3)
    feed(manager, [cost_verdict(later)])
    assert manager.tick(later + timedelta(seconds=1799)) == []
    [closed] = manager.tick(later + timedelta(seconds=1800))
    assert closed["ts"] == later + timedelta(seconds=1800)
    assert "no call judged normal since" in closed["message"]
    assert "back to normal" not in closed["message"]


def test_a_rate_incident_still_resolves_on_silence() -> None:
    """A silence is evidence for a request rate: unchanged for volume spikes."""
    manager = AlertManager(DetectorSettings(resolve_after_seconds=300))
    feed(manager, [verdict(T0)])
    [resolved] = manager.tick(T0 + timedelta(seconds=300))
    assert resolved["status"] == "resolved" and resolved["ts"] == T0 + timedelta(seconds=300)


def test_a_users_cost_incident_still_resolves_on_silence() -> None:
    """Probe T: held open, users' cost alarms piled up and kept other features' incidents
    open (the Azure trace: 82 firing alerts in an incident batch instead of 32). A user's
    cost incident resolves on time alone, as before."""
    manager = AlertManager(DetectorSettings(resolve_after_seconds=300))
    user = replace(cost_verdict(T0), scope="user:bob")
    feed(manager, [user])
    [resolved] = manager.tick(T0 + timedelta(seconds=300))
    assert resolved["status"] == "resolved" and "back to normal" in resolved["message"]
