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


def test_a_checkpoint_from_before_recurring_days_restores() -> None:
    detector = RateDetector("user:a", DetectorSettings(), kind="user")
    state = detector.__getstate__()
    slots = state[1] if isinstance(state, tuple) else state
    assert isinstance(slots, dict)
    slots.pop("unusual_slots", None)
    restored = RateDetector.__new__(RateDetector)
    restored.__setstate__(state)
    assert restored.unusual_slots == {}
    restored.observe(datetime(2024, 5, 6, 12, tzinfo=T0.tzinfo))
