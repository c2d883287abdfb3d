"""A fresh agent's first day: users who call in sessions are not paged for a long session.

A newcomer starts Tollgate and its traffic begins: no history, every user new. Users of
a product come in sessions (a conversation of a few turns, 15 s apart), and now and then
one session runs long (sessions' lengths are roughly exponential: one in a hundred of a
user with sessions of 6 calls holds 25). With a day of a user's calls the agent knows
their clumping (a variance/mean of 6 to 10 over 5 and 15 minutes); in the first hours it
has a few dozen calls. Before this test, the longer windows of those users were read as
Poisson (1.0) while their 1-minute window already showed 2 to 3, and the bench's synthetic
worlds' first days paged 14 and 20 times, all users' long sessions (docs/ANOMALY.md, "The
first day").

A runaway loop of one of those users on the same first day still pages.
"""

from __future__ import annotations

import math
import random
from datetime import datetime, timedelta
from typing import Any

import pytest

from agents.anomaly.core import DecayedMean
from agents.anomaly.engine import AnomalyEngine
from agents.anomaly.rates import PeerPrior, RateDetector, peer_burst
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
)

CHAT = Feature("chat", economy_share=0.7, sigma=0.6)
RHYTHM = daily_rhythm(peak_hour=13, low=0.3)
HOURS = 14


def population(seed: int, users: int = 100) -> list[tuple[Caller, float]]:
    """Users with log-normal rates (median 6 an hour) and a mean session length each: 30 %
    call one at a time, the rest in sessions of 2 to 8 calls on average."""
    rng = random.Random(seed)
    out = []
    for i in range(users):
        per_minute = min(max(math.exp(rng.gauss(math.log(0.1), 1.2)), 1 / 120), 1.5)
        session = 1.0 if rng.random() < 0.3 else rng.uniform(2, 8)
        out.append((Caller(f"u{i:03d}", CHAT, per_minute), session))
    return out


def day(
    seed: int, start: datetime, end: datetime
) -> tuple[World, list[tuple[Caller, float]], list[dict[str, Any]]]:
    """Each user's sessions: starts at ``per_minute / session`` a minute (times the daily
    rhythm), each of ``1 + Exp(session - 1)`` calls about 15 s apart."""
    users = population(seed)
    world = World(seed=seed, callers=[c for c, _ in users], rhythm=RHYTHM)
    rng = random.Random(seed * 31 + 1)
    streams = []
    for caller, session in users:
        calls = []
        for begin in arrivals(rng, start, end, caller.per_minute / session, RHYTHM):
            calls += world.session(rng, begin, caller, session)
        calls.sort(key=lambda r: r["ts"])
        streams.append(calls)
    return world, users, merged(*streams)


def user_pages(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [a for a in pages(run(AnomalyEngine(), records)) if a["scope"].startswith("user:")]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_fresh_agents_first_day_does_not_page_session_callers(seed: int) -> None:
    _, _, records = day(seed, T0, T0 + timedelta(hours=HOURS))
    paged = user_pages(records)
    # 100 users, 14 hours: the goal is under 1 false page a day per 100 users.
    assert len(paged) <= 0, [(a["scope"], a["message"][:120]) for a in paged]


def test_a_loop_on_the_first_day_still_pages() -> None:
    """Five hours in, a session caller (sessions of about 6 calls) starts calling every
    10 s for 30 minutes: paged within 15 minutes (its sessions make its counts vary about
    7 times as much as Poisson over 5 minutes: a loop like a session that does not end)."""
    world, users, records = day(4, T0, T0 + timedelta(hours=7))
    start = T0 + timedelta(hours=5)
    caller = next(
        c
        for c, s in users
        if s >= 5
        and 0.05 <= c.per_minute <= 0.3
        and sum(r["user_id"] == c.user and r["ts"] < start for r in records) >= 10
    )
    rng = random.Random(9)
    loop = [world.call(rng, start + timedelta(seconds=10 * k), caller) for k in range(180)]
    paged = [a for a in user_pages(merged(records, loop)) if a["scope"] == f"user:{caller.user}"]
    assert paged, "the loop was not paged"
    assert paged[0]["_at"] - start <= timedelta(minutes=15), paged[0]["message"]


def test_a_users_longer_window_is_at_least_as_bursty_as_a_shorter_one() -> None:
    """Calls in clusters make a count's variance/mean grow with the window's length: a
    user's 5 minutes measured as Poisson on few calls (the first day's long windows) are
    judged with their 1 minute's clumping; a feature keeps each window's own."""
    settings = DetectorSettings()
    t = T0.timestamp()
    user = RateDetector("user:u1", settings, "user")
    feature = RateDetector("feature:chat", settings, "feature")
    for d in (user, feature):
        for _ in range(40):
            d.burst[0].add(3.0, t, 86400)  # 1 minute: 3 calls just before each: D = 7
            d.burst[2].add(0.0, t, 86400)  # 5 minutes: none more than expected
    assert feature.dispersion(0, 0.1, None) == pytest.approx(7.0)
    assert feature.dispersion(2, 0.5, None) == pytest.approx(1.0)
    # a user's leans on no peers' (Poisson) for their first calls: 1 + 2 x 2 = 5
    assert user.dispersion(0, 0.1, None) == pytest.approx(5.0)
    assert user.dispersion(2, 0.5, None) == pytest.approx(5.0)


def test_a_new_user_is_as_bursty_as_the_burstier_of_their_peers() -> None:
    """The peers' burstiness a user with few calls leans on is a user's, at
    ``volume_peer_burst_quantile`` (each user counted once), not their calls' pooled; fewer
    than 3 users with enough calls: none."""
    t = T0.timestamp()

    def user(excess: float, calls: int) -> list[DecayedMean]:
        out = [DecayedMean() for _ in range(2)]
        for _ in range(calls):
            out[0].add(excess, t, 86400)
        return out

    # 3 steady users, 7 in sessions; one very busy steady user outweighs them all in calls
    peers = [user(0.0, 30)] * 3 + [user(x, 30) for x in (2, 3, 3, 4, 5, 5, 6)]
    peers.append(user(0.0, 5000))
    peers.append(user(9.0, 5))  # too few calls to say
    quantiles = peer_burst(peers, 2, enough=20, quantile=0.8)
    assert quantiles[0] == 5.0
    assert quantiles[1] is None  # nobody's 2 minutes known
    assert peer_burst(peers[:2], 2, enough=20, quantile=0.8) == [None, None]


def test_a_checkpoint_from_before_the_users_quantile_restores() -> None:
    prior = PeerPrior(alpha=1.0, beta=2.0)
    state = dict(prior.__dict__)
    del state["user_burst"]
    restored = PeerPrior.__new__(PeerPrior)
    restored.__setstate__(state)
    assert restored.user_burst == []
