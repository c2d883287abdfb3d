"""A brand-new user whose first calls are a loop is paged; a new heavy user is not.

Before this test, a user seen for the first time who called 10 times a minute for half an
hour, among users at about 0.1 a minute, was never paged (3 of 3 seeds), and one at 30 a
minute on 1 of 3 seeds: after a minute of calls the user counted as "busy" and was judged
against their own last minutes, which had learned the loop. Now a user younger than the
longest window is also judged on every call of their life against the settled users of
their feature (``volume_newcomer_peers``; docs/ANOMALY.md, "A brand-new user's loop").

What is not paged: a new user at 3 a minute, twice the feature's busiest user, is a heavy
user (users' rates are log-normal: one in 400 of them is that busy), during their first
hour and after it, and a new user whose calls are spread over several features.
"""

from __future__ import annotations

import random
from datetime import datetime, timedelta
from typing import Any

import pytest

from agents.anomaly.engine import AnomalyEngine
from agents.anomaly.rates import PeerPrior
from tests.anomaly_traffic import T0, Caller, Feature, arrivals, firing, merged, pages, run
from tests.unit.test_anomaly_first_day import CHAT, day

START = T0 + timedelta(hours=3)
BATCH = Feature("batch", economy_share=0.9, sigma=0.4)


def newcomer(
    world: Any,
    seed: int,
    per_minute: float,
    minutes: float,
    session: float = 1.0,
    start: datetime | None = None,
    feature: Feature = CHAT,
) -> list[dict[str, Any]]:
    """Calls of a user never seen before, from ``start`` (``START``): Poisson at
    ``per_minute``, in sessions of about ``session`` calls 15 s apart."""
    begin = START if start is None else start
    caller = Caller("newbie", feature, per_minute)
    rng = random.Random(seed * 100 + int(per_minute * 10) + (feature is not CHAT))
    calls, ts = [], begin
    while ts < begin + timedelta(minutes=minutes):
        calls += world.session(rng, ts, caller, session)
        ts += timedelta(seconds=rng.expovariate(per_minute / session / 60))
    calls.sort(key=lambda r: r["ts"])
    return calls


def with_newcomer(
    seed: int, per_minute: float, minutes: float, session: float = 1.0
) -> list[dict[str, Any]]:
    """The first-day world's users (about 0.1 a minute, the busiest 1.5) from T0, and the
    new user from ``START``."""
    world, _, records = day(seed, T0, START + timedelta(minutes=minutes + 10))
    return merged(records, newcomer(world, seed, per_minute, minutes, session))


def newcomer_alerts(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [a for a in run(AnomalyEngine(), records) if a["scope"] == "user:newbie"]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_brand_new_users_loop_at_ten_a_minute_pages(seed: int) -> None:
    """100 times the users' mean rate from the first call: paged within 30 minutes
    (measured 597, 1303 and 620 s; never before)."""
    alerts = firing(newcomer_alerts(with_newcomer(seed, 10.0, 30)))
    assert alerts, "the new user's loop was not paged"
    assert alerts[0]["_at"] - START <= timedelta(minutes=30), alerts[0]["message"]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_brand_new_users_loop_at_thirty_a_minute_pages_within_minutes(seed: int) -> None:
    """Measured 151, 62 and 72 s (before: missed, 62 and 72 s)."""
    alerts = firing(newcomer_alerts(with_newcomer(seed, 30.0, 20)))
    assert alerts, "the new user's loop was not paged"
    assert alerts[0]["_at"] - START <= timedelta(minutes=5), alerts[0]["message"]


@pytest.mark.parametrize("seed", [1, 2])
def test_a_new_users_loop_stays_paged_past_their_first_hour(seed: int) -> None:
    """The loop (10 a minute for 100 minutes) taught the user's own references before it
    was paged; they are forgotten with the page, so the user's own windows hold it after
    their first hour: one page, not resolved while the loop runs (before: resolved "back to
    normal" at 63 minutes and never paged again)."""
    alerts = newcomer_alerts(with_newcomer(seed, 10.0, 100))
    paged = [a for a in alerts if a["status"] == "firing" and a in pages(alerts)]
    assert len(paged) == 1, [a["message"] for a in paged]
    resolved = [a for a in alerts if a["status"] == "resolved"]
    assert all(a["_at"] - START >= timedelta(minutes=100) for a in resolved), [
        (a["_at"] - START, a["message"]) for a in resolved
    ]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_new_users_loop_that_stopped_is_not_paged_again(seed: int) -> None:
    """15 minutes at 10 a minute, then 0.3 a minute for an hour: the calls of the loop are
    not judged again with each later call (before: paged a second time at 53 minutes, "3.2
    a minute, 170 calls since their first call")."""
    world, _, records = day(seed, T0, START + timedelta(minutes=85))
    calls = newcomer(world, seed, 10.0, 15) + newcomer(
        world, seed, 0.3, 60, start=START + timedelta(minutes=15)
    )
    paged = pages(newcomer_alerts(merged(records, sorted(calls, key=lambda r: r["ts"]))))
    assert len(paged) <= 1, [(a["_at"] - START, a["message"]) for a in paged]


@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("session", [1.0, 6.0])
def test_a_new_heavy_user_is_not_paged(seed: int, session: float) -> None:
    """A new user at 3 a minute (twice the feature's busiest user; one at a time or in
    sessions of about 6) through the hour the newcomer test judges them: no page (with
    the quasi-Poisson tail of the first version, 2 and 4 of 5 seeds paged)."""
    paged = pages(newcomer_alerts(with_newcomer(seed, 3.0, 55, session)))
    assert not paged, [a["message"] for a in paged]


@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5, 6, 7, 8])
def test_a_new_heavy_user_past_their_first_hour_is_not_paged(seed: int) -> None:
    """The same user at 3 a minute in sessions of about 6, for three hours: their own long
    windows, whose references started at their peers' prior, are not read as a loop once
    the newcomer test is over (before: a reference capped at the prior's expectation
    learned 4 % of their calls, and their 60-minute window paged at 68 minutes, "88x
    normal", on 2 of 8 seeds of another draw of this world)."""
    paged = pages(newcomer_alerts(with_newcomer(seed, 3.0, 180, 6.0)))
    assert not paged, [(a["_at"] - START, a["message"]) for a in paged]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_new_user_of_two_features_is_not_judged_as_one_of_either(seed: int) -> None:
    """4 a minute in a feature whose users call 2 to 6 a minute, and 0.2 a minute in the
    chat feature: all their calls are not one chat user's (before: paged on 3 of 3 seeds,
    "135 calls since their first call")."""
    end = START + timedelta(minutes=90)
    world, _, records = day(seed, T0, end)
    rng = random.Random(seed + 555)
    batch = []
    for i in range(15):
        c = Caller(f"b{i:02d}", BATCH, 4.0 * rng.uniform(0.5, 1.5))
        batch += [world.call(rng, ts, c) for ts in arrivals(rng, T0, end, c.per_minute)]
    calls = newcomer(world, seed, 4.0, 80, feature=BATCH) + newcomer(world, seed, 0.2, 80)
    alerts = newcomer_alerts(merged(records, batch, sorted(calls, key=lambda r: r["ts"])))
    assert not pages(alerts), [a["message"] for a in pages(alerts)]


def test_a_newcomer_does_not_shape_the_prior_it_is_judged_against() -> None:
    """Once a feature has ``volume_newcomer_peers`` users known for an hour, its prior is
    fitted on them alone: the new user's loop leaves its mean rate where it was."""
    engine = AnomalyEngine()
    records = with_newcomer(1, 30.0, 15)
    before: tuple[float, float] | None = None
    for r in records:
        engine.observe(r)
        prior = engine.features["feature:chat"].prior
        assert prior is not None
        if r["ts"] < START and prior.settled[1] > 0:
            before = (prior.settled[0] / prior.settled[1], prior.settled[0])
    assert before is not None and prior.settled[2] >= engine.settings.volume_newcomer_peers
    assert prior.settled[0] / prior.settled[1] == pytest.approx(before[0], rel=0.25)
    assert prior.settled[0] == pytest.approx(before[1], rel=0.5)


def test_a_checkpoint_from_before_newcomers_restores() -> None:
    state = dict(PeerPrior(alpha=1.0, beta=2.0).__dict__)
    del state["settled"]
    restored = PeerPrior.__new__(PeerPrior)
    restored.__setstate__(state)
    assert restored.settled == (0.0, 0.0, 0, 0.0)


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_a_new_user_with_calls_without_a_feature_is_not_judged_as_a_feature_user(
    seed: int,
) -> None:
    """3 a minute in chat and 0.2 a minute without a feature (judged against the users
    without one): their calls are not all one kind of user's (a reviewer's case: paged on
    3 of 4 seeds of their draw before ``featureless``)."""
    end = START + timedelta(minutes=65)
    world, _, records = day(seed, T0, end)
    rng = random.Random(seed + 777)
    others = []  # 15 users who call without a feature, 0.05 to 0.3 a minute
    for i in range(15):
        c = Caller(f"g{i:02d}", CHAT, 0.05 * (6 ** rng.random()))
        others += [
            {**world.call(rng, ts, c), "feature": None}
            for ts in arrivals(rng, T0, end, c.per_minute)
        ]
    loose = [{**r, "feature": None} for r in newcomer(world, seed, 0.2, 55, feature=BATCH)]
    calls = sorted(newcomer(world, seed, 3.0, 55) + loose, key=lambda r: r["ts"])
    paged = pages(newcomer_alerts(merged(records, sorted(others, key=lambda r: r["ts"]), calls)))
    assert not paged, [a["message"] for a in paged]
