"""Probe H's D10: a quiet user's loop resolved "back to normal" while it still ran.

The live loop of probe H (a user with 21 calls in the previous day, calling in sessions,
then 5 calls a minute for 10 minutes) paged on one call, had one anomalous verdict, and
resolved 3 minutes later "back to normal since 10:36:07 UTC, after 0 s anomalous
(requests/min: 5.0 vs 0.0 requests/min expected ...)" while the loop went on. The one
anomalous call was of another feature than the loop's: a user's count is judged with the
peers of the feature of the call (their burstiness), and with the loop feature's bursty
peers the loop's own calls stood at p ~ 5e-8, far beyond normal but not under the users'
paging p-value (1e-10), so no later verdict kept the incident open.

This world reproduces it offline: ``search`` users call in sessions of 5 to 12 calls,
``support`` users one call at a time; the quiet user ``q`` calls search in sessions (about
21 calls a day) and support now and then, and loops on search at 5 calls a minute for 12
minutes with one support call 3 minutes in.
"""

from __future__ import annotations

import random
from datetime import datetime, timedelta
from typing import Any

from agents.anomaly.engine import AnomalyEngine
from app.anomaly_config import DetectorSettings
from tests.anomaly_traffic import (
    T0,
    Caller,
    Feature,
    World,
    arrivals,
    merged,
    run,
    zipf_callers,
)

SEARCH = Feature("search", economy_share=0.8, sigma=0.6)
SUPPORT = Feature("support", economy_share=0.6, sigma=0.6)


def sessions(
    rng: random.Random, world: World, caller: Caller, start: datetime, end: datetime
) -> list[dict[str, Any]]:
    """Sessions of 5 to 12 calls 10 to 20 s apart, at ``caller.per_minute`` calls a minute."""
    out = []
    for begin in arrivals(rng, start, end, caller.per_minute / 8.5):
        ts = begin
        for _ in range(rng.randint(5, 12)):
            out.append(world.call(rng, ts, caller))
            ts += timedelta(seconds=rng.uniform(10, 20))
    return out


def test_a_quiet_users_loop_still_running_is_not_resolved_as_back_to_normal() -> None:
    seed = 3
    searchers = zipf_callers([SEARCH], users=30, total_per_minute=6, prefix="s")
    steady = zipf_callers([SUPPORT], users=20, total_per_minute=4, prefix="p")
    world = World(seed=seed, callers=searchers + steady)
    rng = random.Random(seed)
    start = T0 + timedelta(hours=26, seconds=7)
    end = start + timedelta(minutes=22)
    q, q_support = Caller("q", SEARCH, 21 / 1440), Caller("q", SUPPORT, 0.0)
    history = [sessions(rng, world, c, T0, end) for c in searchers]
    history.append(World(seed=seed, callers=steady).traffic(T0, end))
    history.append(sessions(rng, world, q, T0, start))
    history.append([world.call(rng, T0 + timedelta(hours=h), q_support) for h in (3, 11, 19, 25)])
    loop = [world.call(rng, start + timedelta(seconds=12 * i), q) for i in range(60)]
    aside = [world.call(rng, start + timedelta(minutes=3), q_support)]
    alerts = run(AnomalyEngine(), merged(*history, loop, aside))

    mine = [a for a in alerts if a["alert_key"] == "volume_spike|user:q"]
    fired = [a for a in mine if a["status"] == "firing"]
    assert fired and start <= fired[0]["ts"] <= loop[-1]["ts"], [a["message"] for a in mine]
    resolved = [a for a in mine if a["status"] == "resolved"]
    # Before the fix: resolved at +360 s ("after 0 s anomalous", 5.0 vs 0.0 requests/min)
    # while the loop ran to +708 s.
    assert all(a["ts"] > loop[-1]["ts"] for a in resolved), [a["message"] for a in resolved]
    # It does resolve once the loop is over: the loop's last call plus resolve_after_seconds.
    after = timedelta(seconds=DetectorSettings().resolve_after_seconds)
    assert [a["ts"] for a in resolved] == [loop[-1]["ts"] + after]
    assert "0.0 vs 0.0 requests/min" in resolved[0]["message"]
