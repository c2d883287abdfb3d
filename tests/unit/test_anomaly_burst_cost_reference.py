"""A burst's calls are not learned into its feature's cost and economy-share references.

Probe 57's D2 (docs/ANOMALY.md, "A burst's calls in the cost reference"): one user's
3,000-a-minute burst (9,000 calls, all on the economy model) on ``code`` was learned call
by call into the feature's day-long distribution of cost, where it outnumbered the
feature's own calls. An hour later the feature's ordinary calls (15 % on the pricier
model) ranked high in that distribution and paged ``cost_per_request feature:code``
("expected $0.0015" where its calls average $0.0029): live, to on-call, for no incident.
The economy-share reference learned the same calls: where the feature's usual share is
lower (70 % here, 85 % in the probe), its ordinary calls paged as a routing drop.
"""

from __future__ import annotations

import random
from datetime import timedelta
from typing import Any

from agents.anomaly.engine import AnomalyEngine
from tests.anomaly_traffic import T0, Caller, Feature, World, firing, merged, run, zipf_callers

CODE = Feature("code", economy_share=0.7, prompt_median=2200.0, completion_median=500.0)


def burst_world() -> tuple[list[dict[str, Any]], float, float]:
    """Six hours of 20 users on ``code`` (10 calls a minute, 30 % on the pricier model),
    then a quiet user's 9,000 economy-only calls within 3 minutes, then an hour of the
    same ordinary calls. Returns the records, the burst's start and its end (epoch s)."""
    world = World(seed=3, callers=zipf_callers([CODE], 20, 10.0))
    start = T0 + timedelta(hours=6)
    end = start + timedelta(minutes=3)
    background = world.traffic(T0, end + timedelta(hours=1))
    rng = random.Random(11)
    user = Caller("burster", CODE, 0.02)
    history = [world.call(rng, start - timedelta(minutes=110 - 10 * k), user) for k in range(10)]
    burst = [
        world.call(rng, start + timedelta(seconds=k / 50), user, economy_share=1.0)
        for k in range(9000)
    ]
    return merged(background, history, burst), start.timestamp(), end.timestamp()


def test_a_burst_of_cheap_calls_does_not_make_its_features_ordinary_calls_a_page() -> None:
    records, start, end = burst_world()
    engine = AnomalyEngine()
    alerts = run(engine, records)
    volume = [a for a in firing(alerts) if a["kind"] == "volume_spike"]
    assert any(a["scope"] == "user:burster" for a in volume), [a["message"] for a in volume]
    # Neither the cost per request nor the economy share (the burst's calls were all
    # economy: learned, the feature's usual 70 % looks like a drop) alerts on the feature.
    after = [
        a
        for a in firing(alerts)
        if a["kind"] in ("cost_per_request", "tier_mix") and a["_at"].timestamp() >= start
    ]
    assert not after, [a["message"] for a in after]
    # The feature's references still hold its ordinary mix: the pricier model's share is
    # about the 30 % its calls have, not the few percent 9,000 economy calls would leave.
    state = engine.features["feature:code"]
    assert state.cost is not None and state.mix is not None
    models = state.cost.models
    t = end + 3600
    pricier = models["gpt-4o"].count(t) / (
        models["gpt-4o"].count(t) + models["gpt-4o-mini"].count(t)
    )
    assert 0.2 <= pricier <= 0.4, pricier
    assert 0.6 <= state.mix.share() <= 0.8, state.mix.share()
