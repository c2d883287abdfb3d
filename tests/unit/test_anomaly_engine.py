"""The anomaly engine on synthetic Usage streams: routing, minutes, checkpoints, memory."""

from __future__ import annotations

import math
import random
import struct
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from agents.anomaly.detectors import DetectorSettings
from agents.anomaly.engine import SNAPSHOT_VERSION, AnomalyEngine, SnapshotError
from app.events.codec import EventCodec

T0 = datetime(2024, 5, 1, 8, tzinfo=UTC)
USERS = {f"u{i}": 1 / i for i in range(1, 13)}  # u1 busiest
FEATURES = {"chat": 0.6, "search": 0.4}
MODELS = {"economy": ("gpt-4o-mini", 300_000), "standard": ("gpt-4o", 4_000_000)}


def usage(
    ts: datetime, user: str, feature: str, tier: str, cost_nanos: int, **extra: Any
) -> dict[str, Any]:
    return {
        "ts": ts,
        "user_id": user,
        "feature": feature,
        "model_served": MODELS[tier][0],
        "tier": tier,
        "prompt_tokens": 800,
        "completion_tokens": 150,
        "cost_usd_nanos": cost_nanos,
        "price_unknown": False,
        "cache_hit": False,
        **extra,
    }


def traffic(
    rng: random.Random,
    start: datetime,
    minutes: int,
    per_minute: float = 90,
    economy: float = 0.7,
    users: dict[str, float] = USERS,
    features: dict[str, float] = FEATURES,
    cost_factor: float = 1.0,
) -> list[dict[str, Any]]:
    records = []
    count = math.floor(per_minute * minutes)
    span = minutes * 60.0
    for offset in sorted(rng.uniform(0, span) for _ in range(count)):
        tier = "economy" if rng.random() < economy else "standard"
        cost = int(MODELS[tier][1] * rng.lognormvariate(0, 0.6) * cost_factor)
        user = rng.choices(list(users), weights=list(users.values()))[0]
        feature = rng.choices(list(features), weights=list(features.values()))[0]
        records.append(usage(start + timedelta(seconds=offset), user, feature, tier, cost))
    return records


def merged(*streams: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted((r for s in streams for r in s), key=lambda r: r["ts"])


def run(engine: AnomalyEngine, records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    alerts: list[dict[str, Any]] = []
    for record in records:
        alerts += engine.observe(record)
    return alerts


def firing(alerts: list[dict[str, Any]]) -> list[str]:
    return [a["alert_key"] for a in alerts if a["status"] == "firing"]


@pytest.fixture(scope="module")
def warm() -> tuple[bytes, datetime]:
    """An engine that has seen 90 quiet minutes, as a snapshot, and where it stopped."""
    rng = random.Random(1)
    engine = AnomalyEngine()
    alerts = run(engine, traffic(rng, T0, 90))
    assert firing(alerts) == []  # stationary traffic: no alert at all
    return engine.snapshot(), T0 + timedelta(minutes=90)


def resume(warm: tuple[bytes, datetime]) -> tuple[AnomalyEngine, datetime]:
    snapshot, now = warm
    return AnomalyEngine.restore(snapshot), now


def test_a_runaway_loop_fires_once_quickly_and_resolves(warm: tuple[bytes, datetime]) -> None:
    engine, now = resume(warm)
    rng = random.Random(2)
    loop = traffic(rng, now, 10, per_minute=60, users={"u9": 1.0}, features={"chat": 1.0})
    alerts = run(engine, merged(traffic(rng, now, 12), loop))
    keys = firing(alerts)
    assert keys.count("volume_spike|user:u9") == 1
    first = next(a for a in alerts if a["alert_key"] == "volume_spike|user:u9")
    assert first["ts"] - now < timedelta(seconds=60)
    assert first["observed"] > 3 * first["expected"]  # reported well before its peak
    assert "user:u9" in first["message"] and "x normal" in first["message"]
    after = run(engine, traffic(rng, now + timedelta(minutes=12), 20))
    resolved = [a for a in after if a["status"] == "resolved"]
    assert "volume_spike|user:u9" in [a["alert_key"] for a in resolved]


def test_a_feature_cost_spike_alerts_the_feature_not_each_user(
    warm: tuple[bytes, datetime],
) -> None:
    engine, now = resume(warm)
    rng = random.Random(3)
    normal = traffic(rng, now, 8, per_minute=54, features={"chat": 1.0})
    spiked = traffic(rng, now, 8, per_minute=36, features={"search": 1.0}, cost_factor=20)
    alerts = run(engine, merged(normal, spiked))
    keys = firing(alerts)
    assert "cost_per_request|feature:search" in keys
    assert not [k for k in keys if k.startswith("cost_per_request|user:")]
    assert "cost_per_request|feature:chat" not in keys
    alert = next(a for a in alerts if a["alert_key"] == "cost_per_request|feature:search")
    assert alert["unit"] == "usd" and alert["observed"] > 3 * alert["expected"]


def test_a_routing_regression_alerts_the_tier_mix(warm: tuple[bytes, datetime]) -> None:
    engine, now = resume(warm)
    rng = random.Random(4)
    normal = traffic(rng, now, 6, per_minute=54, features={"search": 1.0})
    regressed = traffic(rng, now, 6, per_minute=36, features={"chat": 1.0}, economy=0.1)
    alerts = run(engine, merged(normal, regressed))
    assert "tier_mix|feature:chat" in firing(alerts)
    assert "tier_mix|feature:search" not in firing(alerts)
    alert = next(a for a in alerts if a["alert_key"] == "tier_mix|feature:chat")
    assert alert["expected"] == pytest.approx(0.7, abs=0.1) and alert["observed"] < 0.4


def test_one_absurd_call_does_not_price_a_routing_regression_absurdly(
    warm: tuple[bytes, datetime],
) -> None:
    """The probe saw 'about $382,600.89/hour above expected' on ten cheap calls, after one
    usage record of 4e9 tokens: the price gap between tiers was a mean of their costs."""
    impacts = []
    for absurd in (False, True):
        engine, now = resume(warm)
        rng = random.Random(4)
        normal = traffic(rng, now, 6, per_minute=54, features={"search": 1.0})
        regressed = traffic(rng, now, 6, per_minute=36, features={"chat": 1.0}, economy=0.1)
        if absurd:  # $25,000 for one call of the standard tier, just before
            regressed.insert(0, usage(now, "u2", "chat", "standard", 25_000 * 10**9))
        alerts = run(engine, merged(normal, regressed))
        alert = next(a for a in alerts if a["alert_key"] == "tier_mix|feature:chat")
        impacts.append(alert["impact_usd_per_hour"])
    clean, with_absurd = impacts
    assert 0 < clean < 100
    assert with_absurd < 2 * clean, impacts


def test_silent_minutes_count_and_a_global_drop_alerts(warm: tuple[bytes, datetime]) -> None:
    engine, now = resume(warm)
    alerts = engine.advance(now + timedelta(minutes=3))
    assert "volume_drop|global" in firing(alerts)
    drop = next(a for a in alerts if a["alert_key"] == "volume_drop|global")
    assert drop["observed"] == 0 and drop["expected"] > 50


def test_restored_engine_does_not_rewarm(warm: tuple[bytes, datetime]) -> None:
    restored, now = resume(warm)
    fresh = AnomalyEngine()
    rng = random.Random(5)
    loop = traffic(rng, now, 5, per_minute=60, users={"u10": 1.0})
    records = merged(traffic(rng, now, 5), loop)
    assert "volume_spike|user:u10" in firing(run(restored, records))
    assert "volume_spike|user:u10" not in firing(run(fresh, records))  # still warming up


def test_a_restored_engine_keeps_its_open_incidents(warm: tuple[bytes, datetime]) -> None:
    engine, now = resume(warm)
    rng = random.Random(6)
    loop = traffic(rng, now, 10, per_minute=60, users={"u11": 1.0})
    records = merged(traffic(rng, now, 10), loop)
    head, tail = records[: len(records) // 2], records[len(records) // 2 :]
    assert "volume_spike|user:u11" in firing(run(engine, head))
    again = AnomalyEngine.restore(engine.snapshot())
    assert "volume_spike|user:u11" not in firing(run(again, tail))  # same incident


def test_snapshot_errors_say_what_to_do(warm: tuple[bytes, datetime]) -> None:
    snapshot, _ = warm
    with pytest.raises(SnapshotError, match="not an anomaly-engine snapshot; delete it"):
        AnomalyEngine.restore(b"not a snapshot")
    header = len(b"tollgate-anomaly-engine\n")
    newer = snapshot[:header] + struct.pack(">I", SNAPSHOT_VERSION + 1) + snapshot[header + 4 :]
    with pytest.raises(SnapshotError, match=f"version {SNAPSHOT_VERSION + 1} is not"):
        AnomalyEngine.restore(newer)
    with pytest.raises(SnapshotError, match="not readable"):
        AnomalyEngine.restore(snapshot[: header + 4] + b"garbage")


def test_restore_applies_new_thresholds(warm: tuple[bytes, datetime]) -> None:
    snapshot, now = warm
    # No volume spike is big enough any more.
    strict = DetectorSettings(volume_min_ratio=1e6)
    engine = AnomalyEngine.restore(snapshot, settings=strict)
    rng = random.Random(12)
    loop = traffic(rng, now, 5, per_minute=60, users={"u10": 1.0})
    assert "volume_spike|user:u10" not in firing(run(engine, merged(traffic(rng, now, 5), loop)))


def test_late_events_are_tolerated(warm: tuple[bytes, datetime]) -> None:
    engine, now = resume(warm)
    rng = random.Random(7)
    records = traffic(rng, now, 3)
    # A few seconds late: still counted in its own minute.
    slightly = usage(records[-1]["ts"] - timedelta(seconds=3), "u1", "chat", "economy", 300_000)
    run(engine, [*records, slightly])
    assert engine.stats.late_records == 0
    # A backlog minutes late (a spool flushed after an outage) is no volume spike.
    last = records[-1]["ts"]
    backlog = traffic(rng, last - timedelta(minutes=10), 8, per_minute=200)
    alerts = run(engine, [{**r, "ts": min(r["ts"], last - timedelta(minutes=2))} for r in backlog])
    assert engine.stats.late_records == len(backlog)
    assert not [k for k in firing(alerts) if k.startswith("volume_spike")]


def test_memory_is_bounded_by_evicting_users() -> None:
    engine = AnomalyEngine(DetectorSettings(max_user_scopes=20, idle_user_seconds=600))
    rng = random.Random(8)
    many = {f"user-{i}": 1.0 for i in range(100)}
    run(engine, traffic(rng, T0, 5, users=many))
    assert len(engine.users) == 20 and engine.stats.evicted_users >= 80
    engine.advance(T0 + timedelta(minutes=30))  # all idle for longer than 10 minutes
    assert len(engine.users) == 0


class _Prices:
    def tier(self, model: str) -> str | None:
        return {"gpt-4o-mini": "economy", "gpt-4o": "standard"}.get(model)


def test_tier_comes_from_prices_and_unpriced_calls_are_not_costed() -> None:
    engine = AnomalyEngine(prices=_Prices())  # type: ignore[arg-type]
    rng = random.Random(9)
    records = traffic(rng, T0, 2)
    for record in records:
        record["tier"] = None
    records[0]["price_unknown"] = True
    run(engine, records)
    mix = engine.features["feature:chat"].mix
    assert mix is not None and mix.total > 0
    assert engine.stats.skipped_cost == 1


def test_engine_alerts_are_valid_alert_events(warm: tuple[bytes, datetime]) -> None:
    engine, now = resume(warm)
    alerts = engine.advance(now + timedelta(minutes=3))  # an outage: the drop fires
    back = now + timedelta(minutes=3)
    alerts += run(engine, traffic(random.Random(10), back, 15))  # traffic is back
    assert {a["status"] for a in alerts} == {"firing", "resolved"}
    codec = EventCodec()
    for alert in alerts:
        assert codec.decode(codec.encode("Alert", alert)).record["kind"] == alert["kind"]


def test_history_older_than_half_a_day_reaching_a_scope_in_cost_alarm_is_judged_not_a_crash(
    warm: tuple[bytes, datetime],
) -> None:
    """Probe J: a cost alarm open on feature:search, then a backfill of the day before
    (a replay of history) reached the same scope: math.exp overflowed in the alarm's
    recent average and the agent crash-looped on the record at every restart."""
    engine, now = resume(warm)
    rng = random.Random(3)
    normal = traffic(rng, now, 8, per_minute=54, features={"chat": 1.0})
    spiked = traffic(rng, now, 8, per_minute=36, features={"search": 1.0}, cost_factor=20)
    assert "cost_per_request|feature:search" in firing(run(engine, merged(normal, spiked)))
    for hours in (12, 30, 24 * 7):
        old = traffic(rng, now - timedelta(hours=hours), 2, features={"search": 1.0})
        run(engine, old)  # raised OverflowError: math range error
    later = now + timedelta(minutes=8)
    run(engine, traffic(rng, later, 2, features={"search": 1.0}))
    AnomalyEngine.restore(engine.snapshot())


def test_history_replayed_into_a_live_engine_pages_its_cost_spike_once(
    warm: tuple[bytes, datetime],
) -> None:
    """A feature's 40-minute cost spike of an hour ago, replayed into a live engine (two
    records of it for every live one): the engine judges the late records' cost at their own
    event time, and the lifecycle timed them by the live minutes it ticked. The spike closed
    at every tick ("no call judged normal since ... 30 min with too few calls" while its calls
    came) and reopened at its next call: 7 firings of one incident, and a user paged twice.
    A key whose verdicts come late is now timed by its own clock."""
    engine, now = resume(warm)
    rng = random.Random(1)
    live = traffic(rng, now, 40)
    backlog = iter(
        traffic(rng, now - timedelta(minutes=80), 40, 30, features={"search": 1.0}, cost_factor=20)
    )
    alerts: list[dict[str, Any]] = []
    for record in live:
        alerts += engine.observe(record)
        for old in (next(backlog, None), next(backlog, None)):
            if old is not None:
                alerts += engine.observe(old)
    assert engine.stats.late_records > 0
    alerts += run(engine, traffic(rng, now + timedelta(minutes=40), 60)) + engine.flush()
    spike = [a for a in alerts if a["alert_key"] == "cost_per_request|feature:search"]
    # (and at most one update, when it grew critical: not a page of its own)
    raised = [a for a in spike if "severity_raised_from" in a["details"]]
    assert len(raised) <= 1 and all(a["incident_role"] == "related" for a in raised), raised
    spike = [a for a in spike if a not in raised]
    assert [a["status"] for a in spike] == ["firing", "resolved"], [a["message"] for a in spike]
    pages = [a["alert_key"] for a in alerts if a["incident_role"] == "primary"]
    pages = [k for k in pages if k.startswith("cost")]
    assert all(pages.count(k) <= 2 for k in pages), pages  # a page and its resolve
    assert not engine.alerts.firing
