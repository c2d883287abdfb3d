"""A job that runs at the same time every day is the product's rhythm, not an incident.

A nightly batch (an evaluation run, a digest, a re-index) sends hundreds of calls in a few
minutes at about the same time each night. Before, every scope it touched kept half an
hour of memory and judged the previous days only right after a silence, and a stretch
that had alarmed was never learned: the batch paged every night, forever (probed in
session 25: 4 nights, 4 pages, the `global`, `feature:chat` or the batch's own user).

Something unusual at this time of day on ``volume_recurring_days`` (2) previous days is
the rhythm: the first two nights page (a new job is news), later nights do not. The
excuse covers no more calls than those nights had: a bigger run, the same job at another
hour, or an incident at another time of day still pages.
"""

from __future__ import annotations

import random
from datetime import datetime, timedelta
from typing import Any

import pytest

from agents.anomaly.engine import AnomalyEngine
from agents.anomaly.rates import RateDetector
from app.anomaly_config import DetectorSettings
from tests.anomaly_traffic import (
    T0,
    Caller,
    Feature,
    World,
    arrivals,
    daily_rhythm,
    merged,
    pages,
    run,
    zipf_callers,
)

CHAT = Feature("chat", sigma=0.6)
SEARCH = Feature("search", sigma=0.6)
EVAL = Feature("nightly-eval", sigma=0.4)
DAYS = 4


def _world() -> World:
    return World(3, zipf_callers([CHAT, SEARCH], 30, 10.0), daily_rhythm(15, 0.25))


def _batch(
    world: World,
    caller: Caller,
    day: int,
    hour: float,
    calls: int,
    minutes: float = 5.0,
    seed: int = 5,
) -> list[dict[str, Any]]:
    """``calls`` calls of ``caller`` evenly over ``minutes``, starting near ``hour``."""
    rng = random.Random(seed * 100 + day)
    start = T0 + timedelta(days=day, hours=hour, minutes=rng.randrange(0, 10))
    step = minutes * 60 / calls
    return [
        world.call(rng, start + timedelta(seconds=i * step + rng.uniform(0, 0.5)), caller)
        for i in range(calls)
    ]


def _nightly(world: World, caller: Caller, calls: int = 300) -> list[dict[str, Any]]:
    return [r for day in range(DAYS) for r in _batch(world, caller, day, 2.0, calls)]


def _pages_by_day(alerts: list[dict[str, Any]]) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for a in pages(alerts):
        day = (a["_at"] - T0).days
        out.setdefault(day, []).append(f"{a['_at']:%d %H:%M:%S} {a['scope']} {a['kind']}")
    return out


@pytest.fixture(scope="module")
def world() -> World:
    return _world()


@pytest.fixture(scope="module")
def traffic(world: World) -> list[dict[str, Any]]:
    return world.traffic(T0, T0 + timedelta(days=DAYS))


@pytest.mark.parametrize(
    "feature", [EVAL, CHAT], ids=["batch on its own feature", "batch on a busy feature"]
)
def test_a_nightly_batch_pages_the_first_nights_then_is_the_rhythm(
    world: World, traffic: list[dict[str, Any]], feature: Feature
) -> None:
    batch = Caller("svc-batch", feature, 0.0)
    alerts = run(AnomalyEngine(DetectorSettings()), merged(traffic, _nightly(world, batch)))
    by_day = _pages_by_day(alerts)
    assert by_day.get(0), "the first night's batch is news: it pages"
    assert not any(by_day.get(day) for day in range(2, DAYS)), by_day


def test_a_recurring_batch_that_grows_still_pages(
    world: World, traffic: list[dict[str, Any]]
) -> None:
    batch = Caller("svc-batch", CHAT, 0.0)
    nights = [r for day in range(DAYS - 1) for r in _batch(world, batch, day, 2.0, 300)]
    bigger = _batch(world, batch, DAYS - 1, 2.0, 1500)
    alerts = run(AnomalyEngine(DetectorSettings()), merged(traffic, nights, bigger))
    assert _pages_by_day(alerts).get(DAYS - 1), "five times the usual run is not the rhythm"


def test_the_same_job_at_another_hour_still_pages(
    world: World, traffic: list[dict[str, Any]]
) -> None:
    batch = Caller("svc-batch", CHAT, 0.0)
    nights = [r for day in range(DAYS - 1) for r in _batch(world, batch, day, 2.0, 300)]
    moved = _batch(world, batch, DAYS - 1, 11.0, 300)
    alerts = run(AnomalyEngine(DetectorSettings()), merged(traffic, nights, moved))
    late = [p for p in _pages_by_day(alerts).get(DAYS - 1, []) if " 10:" in p or " 11:" in p]
    assert late, _pages_by_day(alerts)


def test_an_incident_at_another_time_of_day_still_pages(
    world: World, traffic: list[dict[str, Any]]
) -> None:
    """Two nights of the batch excuse the nights, not the afternoon: a user's loop on the
    batch's feature at 14:00 of the last day pages as it would without the batch."""
    batch = Caller("svc-batch", CHAT, 0.0)
    quiet = Caller("q-ana", CHAT, 1 / 60)
    rng = random.Random(9)
    start = T0 + timedelta(days=DAYS - 1, hours=14)
    usual = [world.call(rng, ts, quiet) for ts in arrivals(rng, T0, start, quiet.per_minute)]
    loop = usual + [
        world.call(rng, ts, quiet) for ts in arrivals(rng, start, start + timedelta(minutes=30), 5)
    ]
    alerts = run(AnomalyEngine(DetectorSettings()), merged(traffic, _nightly(world, batch), loop))
    hits = [
        a for a in pages(alerts) if a["_at"] >= start and a["_at"] <= start + timedelta(minutes=5)
    ]
    assert hits, _pages_by_day(alerts)


def test_one_incident_is_no_rhythm(world: World, traffic: list[dict[str, Any]]) -> None:
    """A single big incident does not excuse the same time on later days: recurrence needs
    ``volume_recurring_days`` days."""
    batch = Caller("svc-batch", CHAT, 0.0)
    once = _batch(world, batch, 0, 2.0, 3000)
    later = _batch(world, batch, 2, 2.0, 300)
    alerts = run(AnomalyEngine(DetectorSettings()), merged(traffic, once, later))
    assert _pages_by_day(alerts).get(2), _pages_by_day(alerts)


def test_recurring_setting_is_validated() -> None:
    with pytest.raises(ValueError, match="volume_recurring_days"):
        DetectorSettings(volume_recurring_days=-1)
    with pytest.raises(ValueError, match="volume_woken_burstier"):
        DetectorSettings(volume_woken_burstier=-1)


def _restored_without(scope: str, kind: str, *names: str) -> RateDetector:
    """A fresh detector's checkpoint without ``names`` (as an older version wrote it),
    restored."""
    state = RateDetector(scope, DetectorSettings(), kind=kind).__getstate__()
    slots = state[1] if isinstance(state, tuple) else state
    assert isinstance(slots, dict)
    for name in names:
        slots.pop(name, None)
    restored = RateDetector.__new__(RateDetector)
    restored.__setstate__(state)
    return restored


def test_a_checkpoint_from_before_recurring_days_restores() -> None:
    restored = _restored_without("user:a", "user", "unusual_slots")
    assert restored.unusual_slots == {}
    restored.observe(datetime(2024, 5, 6, 12, tzinfo=T0.tzinfo))


def _every(world: World, caller: Caller, hours: float, calls: int) -> list[dict[str, Any]]:
    """A job every ``hours`` hours: ``calls`` calls within a minute, from 00:15 of day 0."""
    rng = random.Random(17)
    out, start = [], T0 + timedelta(minutes=15)
    while start < T0 + timedelta(days=DAYS):
        at = [start + timedelta(seconds=rng.uniform(0, 60)) for _ in range(calls)]
        out += [world.call(rng, ts, caller) for ts in sorted(at)]
        start += timedelta(hours=hours)
    return out


def _office(ts: datetime) -> float:
    return 1.0 if 9 <= ts.hour < 17 else 0.0


@pytest.fixture(scope="module")
def office() -> tuple[World, list[dict[str, Any]]]:
    """A product called 09:00-17:00 only: the global scope falls silent every night."""
    world = World(5, zipf_callers([CHAT, SEARCH], 120, 24.0), _office)
    return world, world.traffic(T0, T0 + timedelta(days=DAYS))


@pytest.mark.parametrize("silent_nights", [False, True], ids=["all day", "office hours"])
def test_a_job_every_two_hours_on_its_own_feature_is_paged_once(
    world: World,
    traffic: list[dict[str, Any]],
    office: tuple[World, list[dict[str, Any]]],
    silent_nights: bool,
) -> None:
    """A job every 2 hours (50 calls within a minute) on a feature of its own: its feature
    is silent between runs, and judges each run when it wakes against the runs before. The
    global scope, judged against its own half hour (the rest of the product calls all day)
    or, in an office-hours product, against its previous nights' busiest 5 minutes (10 a
    minute for the run's 50 in a minute, on the day's dispersion), paged the job's runs
    for the first days (probed in session 28, office hours: 24 pages in 3 days, "3.2x" to
    "8x normal", 22 of them the global's, while the job's own feature was quiet)."""
    if silent_nights:
        world, traffic = office
    batch = Caller("svc-batch", EVAL, 0.0)
    alerts = run(AnomalyEngine(DetectorSettings()), merged(traffic, _every(world, batch, 2.0, 50)))
    by_day = _pages_by_day(alerts)
    if silent_nights:  # the office's first evening is a drop (nothing to tell it from one)
        by_day = {d: [p for p in ps if "volume_drop" not in p] for d, ps in by_day.items()}
    assert by_day.get(0), "the job's first runs are news: they page"
    every = [p for day in range(DAYS) for p in by_day.get(day, [])]
    # The first runs, before the feature has learned how its runs clump, still page; and
    # the feature on the second day at the time of a paged run (held as an alarm's calls).
    assert len(every) <= 3 and len([p for p in every if " global " in p]) <= 1, by_day
    assert not any(by_day.get(day) for day in range(2, DAYS)), by_day


def test_a_bigger_run_of_the_two_hourly_job_still_pages(
    world: World, traffic: list[dict[str, Any]]
) -> None:
    """The feature's history excuses runs like its runs: ten times the usual run is judged
    beyond it, and pages."""
    batch = Caller("svc-batch", EVAL, 0.0)
    runs = [r for r in _every(world, batch, 2.0, 50) if r["ts"] < T0 + timedelta(days=DAYS - 1)]
    rng = random.Random(3)
    start = T0 + timedelta(days=DAYS - 1, hours=14, minutes=15)
    big = sorted(start + timedelta(seconds=rng.uniform(0, 60)) for _ in range(500))
    alerts = run(
        AnomalyEngine(DetectorSettings()),
        merged(traffic, runs, [world.call(rng, ts, batch) for ts in big]),
    )
    hits = [a for a in pages(alerts) if start <= a["_at"] <= start + timedelta(minutes=2)]
    assert hits, _pages_by_day(alerts)


def test_a_loop_during_a_run_of_the_two_hourly_job_still_pages(
    world: World, traffic: list[dict[str, Any]]
) -> None:
    """What a waking feature's run excuses is its own calls: a quiet user's loop on another
    feature that starts with a run pages as it would without the job."""
    batch = Caller("svc-batch", EVAL, 0.0)
    quiet = Caller("q-ana", CHAT, 1 / 60)
    rng = random.Random(9)
    start = T0 + timedelta(days=DAYS - 1, hours=14, minutes=15)
    usual = [world.call(rng, ts, quiet) for ts in arrivals(rng, T0, start, quiet.per_minute)]
    loop = usual + [
        world.call(rng, ts, quiet) for ts in arrivals(rng, start, start + timedelta(minutes=30), 5)
    ]
    alerts = run(
        AnomalyEngine(DetectorSettings()), merged(traffic, _every(world, batch, 2.0, 50), loop)
    )
    hits = [a for a in pages(alerts) if start <= a["_at"] <= start + timedelta(minutes=5)]
    assert hits, _pages_by_day(alerts)


def test_with_woken_variance_off_the_global_pages_the_job_as_before(
    world: World, traffic: list[dict[str, Any]]
) -> None:
    """``volume_woken_burstier`` = 0 turns the rule off: the global pages the runs again."""
    batch = Caller("svc-batch", EVAL, 0.0)
    settings = DetectorSettings(volume_woken_burstier=0)
    alerts = run(AnomalyEngine(settings), merged(traffic, _every(world, batch, 2.0, 50)))
    assert len([a for a in pages(alerts) if a["scope"] == "global"]) >= 5, _pages_by_day(alerts)


def test_a_checkpoint_from_before_woken_variance_restores() -> None:
    restored = _restored_without("feature:a", "feature", "history_base", "wake_dispersion")
    assert restored.history_base is None and restored.wake_dispersion is None
    restored.observe(datetime(2024, 5, 6, 12, tzinfo=T0.tzinfo))
