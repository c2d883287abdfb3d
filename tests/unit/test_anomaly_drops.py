"""A drop of the global request rate: one page per drop, its stretch learned only when it
is not an outage, and a drop that lasts for hours learned as the new normal.

The global's drop alarm freezes its references (an outage is not learned, so the recovery
is no spike). Session 30 found three ways that went wrong: a drop easing for a few minutes
closed its alarm and paged again when the alarm's cooldown was over; a drop judged in the
waking hour against the previous days, while the references held the night, kept them at
the night (the light Saturday of ``test_anomaly_office_hours.py``); and, once an open alarm
goes on while its count stays unusual, a lasting lower level would have stayed frozen.
"""

from __future__ import annotations

import math
import random
from datetime import datetime, timedelta
from typing import Any

from agents.anomaly.engine import AnomalyEngine
from agents.anomaly.rates import RateDetector
from app.anomaly_config import DetectorSettings
from tests.anomaly_traffic import T0, World, firing, pages, run, zipf_callers
from tests.unit.test_anomaly_detectors import at, poisson_times
from tests.unit.test_anomaly_recurring import _restored_without
from tests.unit.test_anomaly_scenarios import CHAT, SEARCH, SUPPORT

START = T0 + timedelta(days=1, hours=10)


def _shaped(
    seed: int, *segments: tuple[float, float], then: float = 1.0
) -> tuple[AnomalyEngine, list[dict[str, Any]]]:
    """120 users at 40 calls a minute in all; from day 1 at 10:00, ``segments`` of (minutes,
    level), then an hour at level ``then``. The engine after the traffic, and its alerts
    from 08:00 of day 1."""

    def rhythm(ts: datetime) -> float:
        minutes = (ts - START).total_seconds() / 60
        if minutes < 0:
            return 1.0
        for length, level in segments:
            if minutes < length:
                return level
            minutes -= length
        return then

    callers = zipf_callers([CHAT, SEARCH, SUPPORT], users=120, total_per_minute=40)
    world = World(seed=seed, callers=callers, rhythm=rhythm)
    end = START + timedelta(minutes=sum(length for length, _ in segments) + 60)
    engine = AnomalyEngine()
    alerts = run(engine, world.traffic(T0, end))
    return engine, [a for a in alerts if a["ts"] >= START - timedelta(hours=2)]


def _said(alerts: list[dict[str, Any]]) -> list[str]:
    return [f"{a['ts']:%H:%M} {a['scope']} {a['message'][:100]}" for a in alerts]


def test_a_drop_that_eases_for_minutes_pages_once() -> None:
    """A fifth of the traffic for an hour, with four minutes at half from 10:15: the count
    at half is no page (``volume_drop_ratio``) and was no longer the drop either, the alarm
    closed after ``resolve_after_seconds``, and the drop went on to page a second time when
    its cooldown ended, at 10:48 (seeds 5 and 7 before session 30). An open alarm now goes
    on while a window up to ``volume_burst_seconds`` stays unusual (``volume_suspicion_p``)."""
    for seed in (5, 7):
        _, alerts = _shaped(seed, (15, 0.2), (4, 0.5), (41, 0.2))
        during = [a for a in pages(alerts) if a["ts"] < START + timedelta(minutes=60)]
        assert [(a["kind"], a["scope"]) for a in during] == [("volume_drop", "global")], _said(
            during
        )
        assert during[0]["ts"] <= START + timedelta(minutes=3)


def test_an_outage_is_not_learned_and_its_recovery_is_quiet() -> None:
    """Guard: an outage's stretch is below the references, so it stays frozen and the calls
    back are no spike, not even one attached to the drop's page (learned, the silence would
    make them one)."""
    for seed in (5, 6):
        _, alerts = _shaped(seed, (30, 0.0))
        volume = [a for a in firing(alerts) if a["kind"].startswith("volume")]
        assert [(a["kind"], a["scope"]) for a in volume] == [("volume_drop", "global")], _said(
            volume
        )
        assert [a["kind"] for a in pages(alerts) if a["kind"].startswith("volume")] == [
            "volume_drop"
        ]


def test_a_drop_that_lasts_for_hours_is_learned_as_the_new_normal() -> None:
    """A drop to 30 % for 20 minutes, then 55 % from 10:20 on: the open alarm goes on while
    the count stays unusual, and without ``volume_adapt_after_minutes`` for drops (the rule
    spikes had) the references stayed frozen at the old level for good, the alarm open.
    After three hours the level, one no alarm would open at, is learned: the alarm is
    over, the references hold it, and it paged once."""
    engine, alerts = _shaped(5, (20, 0.3), (200, 0.55), then=0.55)
    rate = engine.global_scope.rate
    assert [a["kind"] for a in pages(alerts)] == ["volume_drop"], _said(pages(alerts))
    assert rate.alarm_since is None
    count, exposure = rate.refs[0].count, rate.refs[0].exposure
    assert 15 < count / exposure * 60 < 30, count / exposure * 60  # 22 a minute


def test_an_outage_of_hours_is_no_new_normal() -> None:
    """5 % of the traffic for 4 hours: an outage, however long, is not learned as the new
    normal by the global. Accepted at 3 hours, it resolved "back to normal" while 95 % of
    the calls were still missing, and the calls back paged "38.2x normal" (session 30's
    review). (The features and users, which do not watch drops, learn it and page the
    calls back: docs/ANOMALY.md.)"""
    back = START + timedelta(hours=4)
    _, alerts = _shaped(5, (240, 0.05))
    volume = [
        a for a in firing(alerts) if a["kind"].startswith("volume") and a["scope"] == "global"
    ]
    assert [a["kind"] for a in volume] == ["volume_drop"], _said(volume)
    resolved = [a for a in alerts if a["kind"] == "volume_drop" and a["status"] == "resolved"]
    assert resolved and all(a["ts"] >= back for a in resolved), _said(resolved)


def test_a_checkpoint_from_before_learned_drops_restores() -> None:
    restored = _restored_without("global", "global", "drop_alarm")
    assert restored.drop_alarm is False
    restored.check_drop(START)


def _dropped(seed: int) -> tuple[RateDetector, float]:
    """A global detector after three hours at 40 calls a minute and 6 minutes at 8, judged
    at each minute's end: its drop alarm open and frozen. And the time."""
    rng = random.Random(seed)
    detector = RateDetector("global", DetectorSettings(), "global")
    normal, end = 3 * 3600, 3 * 3600 + 6 * 60
    times = poisson_times(rng, 0, normal, 40) + poisson_times(rng, normal, end, 8)
    ticks = iter(range(normal + 60, end + 1, 60))
    tick = next(ticks)
    for t in times:
        while tick is not None and tick <= t:
            detector.check_drop(at(tick))
            tick = next(ticks, None)
        detector.observe(at(t))
    while tick is not None:
        detector.check_drop(at(tick))
        tick = next(ticks, None)
    return detector, float(end)


def test_a_drop_under_the_references_stays_frozen_and_one_above_them_is_learned() -> None:
    """The rule of ``RateDetector._learn_drop``, alone: a drop to a fifth stays frozen (its
    references keep 40 a minute); the same drop where the references expect 4 a minute
    (as a light Saturday's had learned the night) is learned, and its alarm goes on."""
    detector, end = _dropped(3)
    assert detector.alarm_since is not None and detector.frozen[-1][1] == math.inf
    count, exposure = detector.refs[0].at_time(end, detector.tau)
    assert count / exposure * 60 > 35
    assert detector.outages == [detector.frozen[-1]]  # an outage: held from every scope
    for ref in detector.refs:
        ref.count *= 0.1  # references that hold 4 calls a minute
    # (a drop above its references when it opened, as a light Saturday's, is no outage:
    # not listed; a listed outage is never learned)
    detector.outages.clear()
    detector.check_drop(at(end + 60))
    assert detector.alarm_since is not None
    assert not detector.frozen or detector.frozen[-1][1] != math.inf
    count, exposure = detector.refs[0].at_time(end + 60, detector.tau)
    assert 4.5 < count / exposure * 60 < 8, count / exposure * 60  # learned 8 a minute


def test_the_calls_back_after_a_partial_outage_page_nothing_more() -> None:
    """A fifth of the traffic for an hour, a tenth for 90 minutes, a twentieth for 4 hours:
    the global's drop alarm froze its references, but the features and users, which do not
    watch drops, learned the low level, and the calls back paged every feature as a spike
    ("13.1x normal", "22.9x normal"), four or five pages after the drop's one (session 31).
    They do not learn a stretch the global holds as an outage."""
    for seed, segment in ((5, (60, 0.2)), (5, (90, 0.1)), (6, (240, 0.05))):
        _, alerts = _shaped(seed, segment)
        assert [(a["kind"], a["scope"]) for a in pages(alerts)] == [("volume_drop", "global")], (
            _said(pages(alerts))
        )


def test_a_spike_inside_a_drop_alarm_whose_stretch_was_learned_is_frozen() -> None:
    """The spike path's branch for an alarm already open: a drop's stretch was learned (the
    alarm goes on, nothing frozen), then 200 calls in a minute. Not frozen, the burst would
    be learned as the level while the alarm is open; it is frozen from its window's start,
    as a spike's alarm is, and it is no drop stretch (``_learn_drop`` leaves it alone)."""
    detector, end = _dropped(3)
    for ref in detector.refs:
        ref.count *= 0.1
    detector.outages.clear()  # (as above: no outage when it opened)
    detector.check_drop(at(end + 60))
    assert detector.alarm_since is not None and not detector.drop_alarm
    assert not detector.frozen or detector.frozen[-1][1] != math.inf
    rng = random.Random(4)
    for t in poisson_times(rng, end + 60, end + 120, 200):
        detector.observe(at(t))
    assert detector.frozen and detector.frozen[-1][1] == math.inf
    assert not detector.drop_alarm and detector.outages == []


def test_an_outage_is_held_from_the_features_across_a_checkpoint() -> None:
    """An engine checkpointed in the middle of a partial outage and restored: the features
    and users still hold the global's outage (they are linked to the restored global), and
    the calls back page nothing more than the drop."""
    callers = zipf_callers([CHAT, SEARCH, SUPPORT], users=120, total_per_minute=40)

    def rhythm(ts: datetime) -> float:
        return 0.1 if START <= ts < START + timedelta(minutes=90) else 1.0

    records = World(seed=5, callers=callers, rhythm=rhythm).traffic(
        T0, START + timedelta(minutes=150)
    )
    middle = START + timedelta(minutes=45)
    engine = AnomalyEngine()
    alerts = run(engine, [r for r in records if r["ts"] < middle])
    engine = AnomalyEngine.restore(engine.snapshot())
    glob = engine.global_scope.rate
    assert glob.outages and all(f[1] == math.inf for f in glob.outages[-1:])
    assert all(state.rate.outage_source is glob for state in engine.features.values())
    alerts += run(engine, [r for r in records if r["ts"] >= middle])
    assert [(a["kind"], a["scope"]) for a in pages(alerts)] == [("volume_drop", "global")], _said(
        pages(alerts)
    )


def test_a_checkpoint_from_before_outages_held_from_every_scope_restores() -> None:
    restored = _restored_without("feature:chat", "feature", "outages", "outage_source")
    assert restored.outages == [] and restored.outage_source is None
    restored.observe(START)
