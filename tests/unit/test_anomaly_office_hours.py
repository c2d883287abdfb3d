"""Traffic that stops at night: an office-hours product must not page every morning and evening.

A feature's and the global rate remember half an hour (``volume_rate_memory_seconds``), so
after a night without calls their expected rate is about 0: the first calls of the morning
read as a spike of 10^13 x (three feature pages a morning) and the end of the working day
as a drop of the global rate (a page an evening), 11 false pages in 3 days for 120 users
(session 22). The same time on the previous days is what a morning is compared with.
"""

from __future__ import annotations

import random
from datetime import datetime, timedelta
from typing import Any

from agents.anomaly.engine import AnomalyEngine
from tests.anomaly_traffic import T0, World, arrivals, merged, pages, run, zipf_callers
from tests.unit.test_anomaly_scenarios import CHAT, SEARCH, SUPPORT


def office(ts: datetime) -> float:
    """Calls from 09:00 to 17:00 UTC, none at night."""
    return 1.0 if 9 <= ts.hour < 17 else 0.0


def office_world(seed: int) -> World:
    callers = zipf_callers([CHAT, SEARCH, SUPPORT], users=120, total_per_minute=24)
    return World(seed=seed, callers=callers, rhythm=office)


def after_first_day(alerts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [a for a in pages(alerts) if a["ts"] >= T0 + timedelta(days=1)]


def test_an_office_hours_product_is_quiet_every_morning_and_evening() -> None:
    for seed in (5, 6):
        alerts = run(AnomalyEngine(), office_world(seed).traffic(T0, T0 + timedelta(days=4)))
        later = after_first_day(alerts)
        assert later == [], [f"{a['ts']:%a %H:%M} {a['message'][:120]}" for a in later]


def test_an_outage_in_office_hours_still_pages() -> None:
    """Guard: the day's usual end does not hide an outage at 14:00 (the global rate drops)."""
    world = office_world(5)
    outage = (T0 + timedelta(days=2, hours=14), T0 + timedelta(days=2, hours=14, minutes=20))
    records = [
        r for r in world.traffic(T0, T0 + timedelta(days=3)) if not outage[0] <= r["ts"] < outage[1]
    ]
    alerts = run(AnomalyEngine(), records)
    drops = [a for a in pages(alerts) if a["kind"] == "volume_drop" and a["scope"] == "global"]
    assert any(outage[0] <= a["ts"] <= outage[0] + timedelta(minutes=3) for a in drops), [
        f"{a['ts']:%a %H:%M} {a['message'][:100]}" for a in pages(alerts)
    ]


def test_a_burst_just_after_the_morning_start_still_pages() -> None:
    """Guard: yesterday's morning is the reference, not a licence: a feature at 8x its usual
    rate from 09:02 pages within 2 minutes."""
    world = office_world(6)
    start = T0 + timedelta(days=2, hours=9, minutes=2)
    rng = random.Random(11)
    chat = [c for c in world.callers if c.feature is CHAT]
    burst = [
        world.call(rng, ts, rng.choice(chat))
        for ts in arrivals(rng, start, start + timedelta(minutes=10), per_minute=7 * 8.0)
    ]
    alerts = run(AnomalyEngine(), merged(world.traffic(T0, T0 + timedelta(days=3)), burst))
    hits = [
        a
        for a in pages(alerts)
        if a["kind"] == "volume_spike" and start <= a["ts"] <= start + timedelta(minutes=2)
    ]
    assert hits, [f"{a['ts']:%a %H:%M} {a['message'][:100]}" for a in pages(alerts)]
