"""One incident, one page, for cost incidents: a feature's silence amid its cost step, and
its users' own cost alarms amid its drift (probe T; docs/ANOMALY.md, "An independent world").
"""

from __future__ import annotations

import random
from datetime import timedelta

import pytest

import tests.unit.test_anomaly_drift_resolve as drift
from agents.anomaly.engine import AnomalyEngine
from tests.anomaly_traffic import T0, Caller, Feature, World, arrivals, firing, merged, pages, run


def test_a_cost_incident_pages_once_through_its_features_silence() -> None:
    """Probe P's remaining case: a feature's calls stop for 12 minutes amid a 4x cost step
    (a night, a pause between sessions); the incident resolved in the gap ("back to normal")
    and the calls after it paged again. One incident, one page; resolved once calls show the
    cost back to normal."""
    feature = Feature("quietfeat", economy_share=0.0, sigma=0.5)
    callers = [Caller(f"q{i}", feature, 2.0) for i in range(3)]  # 6 calls a minute
    world = World(seed=3, callers=callers)
    rng = random.Random(3)
    start = T0 + timedelta(hours=6)
    gap = (start + timedelta(minutes=15), start + timedelta(minutes=27))
    end = start + timedelta(minutes=60)
    calls = world.traffic(T0, start)
    for caller in callers:
        for ts in arrivals(rng, start, end + timedelta(minutes=30), caller.per_minute):
            if gap[0] <= ts < gap[1]:
                continue
            calls.append(world.call(rng, ts, caller, token_factor=4.0 if ts < end else 1.0))
    alerts = run(AnomalyEngine(), merged(calls))

    during = [p for p in pages(alerts) if start <= p["_at"] < end + timedelta(minutes=10)]
    assert len(during) == 1, [p["message"] for p in during]
    assert during[0]["scope"] == "feature:quietfeat", during[0]["message"]
    key = "cost_per_request|feature:quietfeat"
    fired = [a for a in firing(alerts) if a["alert_key"] == key]
    assert len(fired) == 1 and start <= fired[0]["_at"] < gap[0], [a["message"] for a in fired]
    resolved = [a for a in alerts if a["alert_key"] == key and a["status"] == "resolved"]
    assert resolved, "the step ended at `end`: calls then show the cost back to normal"
    assert resolved[0]["ts"] >= end, resolved[0]["message"]


@pytest.mark.parametrize("seed", [1, 4])
def test_a_features_cost_drift_is_one_page_naming_the_feature(seed: int) -> None:
    """A feature's tokens rising 1x -> 5x over 3 hours (the world of
    ``test_anomaly_drift_resolve``). Before: seed 1 paged ``user:u0`` (its heaviest user's
    alarm fired 18 s before the feature's, and the page moved to the user because the
    user's *extra calls* were most of the feature's: noise, in a cost drift); seed 4 paged
    the feature, resolved it in a 3-minute lull at 1.85x, paged users u1, u0 and u4 on their
    own (the feature's alarm was over, so their alarms were no longer taken as part of it)
    and the feature again at 2.5x (5 pages)."""
    alerts = run(AnomalyEngine(), drift._stream(seed))
    during = [p for p in pages(alerts) if p["_at"] >= drift.START]
    assert [(p["kind"], p["scope"]) for p in during] == [("cost_per_request", "feature:big")], [
        p["message"] for p in during
    ]
    users = [
        a for a in firing(alerts) if a["scope"].startswith("user:u") and a["_at"] >= drift.START
    ]
    assert users and {a["incident_key"] for a in users} == {during[0]["incident_key"]}


def test_one_users_own_cost_shift_pages_the_user_even_when_it_moves_the_feature() -> None:
    """The other side: a user who makes most of a feature's calls pays 8x from 10:00; the
    feature's cost alarm fires too, but the user's money is most of the feature's extra
    spend, so the page names the user (the feature's alert is related)."""
    feature = Feature("solo", economy_share=0.5, sigma=0.6)
    boss, others = Caller("boss", feature, 4.0), [Caller(f"s{i}", feature, 0.4) for i in range(3)]
    world = World(seed=5, callers=[boss, *others])
    rng = random.Random(5)
    start = T0 + timedelta(hours=10)
    calls = world.traffic(T0, start)
    for caller in world.callers:
        for ts in arrivals(rng, start, start + timedelta(minutes=30), caller.per_minute):
            factor = 8.0 if caller is boss else 1.0
            calls.append(world.call(rng, ts, caller, token_factor=factor))
    alerts = run(AnomalyEngine(), merged(calls))
    during = [p for p in pages(alerts) if p["_at"] >= start]
    assert [(p["kind"], p["scope"]) for p in during] == [("cost_per_request", "user:boss")], [
        p["message"] for p in during
    ]
