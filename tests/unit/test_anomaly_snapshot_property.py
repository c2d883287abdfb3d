"""Property: an anomaly engine restored from a snapshot taken at any moment carries on exactly
as the engine that was never stopped (the same alerts, field for field).

The agent checkpoints the engine with its offsets and, after a crash, restores it and reads on
from there: any state a snapshot drops or a restore rebuilds differently (a cache, a derived
threshold, an open incident, a CUSUM's run) would change what it pages. Random streams of
usage records (users, features, two models and their tiers, costs over three orders of
magnitude, bursts, gaps, records out of order; an incident: 8x costs, a loop or an
economy-share drop)
with warm-ups shortened so that every detector judges within the stream.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agents.anomaly.engine import AnomalyEngine
from app.anomaly_config import DetectorSettings

T0 = datetime(2024, 5, 1, 9, tzinfo=UTC)
MODELS = (("gpt-4o-mini", "economy", 300_000), ("gpt-4o", "standard", 4_800_000))
FAST = DetectorSettings.with_options(
    cost_warmup_requests=30,
    cost_model_warmup_requests=10,
    mix_warmup_requests=30,
    volume_warmup_seconds=120,
    incident_hold_seconds=10,
)


@st.composite
def streams(draw: st.DrawFn) -> tuple[list[dict[str, Any]], int]:
    """(records, where to snapshot): mostly while an incident is building (CUSUMs and
    windows part-way to a trigger, an alarm or an incident's hold open), else anywhere."""
    calls = draw(st.integers(min_value=150, max_value=700))
    users = draw(st.integers(min_value=1, max_value=6))
    incident_at = draw(st.integers(min_value=0, max_value=calls))
    incident = draw(st.sampled_from(["none", "cost", "loop", "mix"]))
    seed = draw(st.integers(min_value=0, max_value=2**32 - 1))
    import random

    rng = random.Random(seed)
    records: list[dict[str, Any]] = []
    t = 0.0
    for i in range(calls):
        late = incident != "none" and i >= incident_at
        gap = rng.expovariate(1 / 6.0)
        if late and incident == "loop":
            gap = rng.expovariate(1.0)  # one user calling every second
        if rng.random() < 0.02:
            gap += rng.uniform(60, 900)  # a quiet stretch
        t += gap
        model, tier, price = MODELS[
            0 if rng.random() < (0.2 if late and incident == "mix" else 0.7) else 1
        ]
        factor = 8.0 if late and incident == "cost" and rng.random() < 0.5 else 1.0
        at = t - (rng.uniform(0, 30) if rng.random() < 0.03 else 0.0)  # now and then late
        records.append(
            {
                "ts": T0 + timedelta(seconds=at),
                "user_id": "u0" if late and incident == "loop" else f"u{rng.randrange(users)}",
                "feature": rng.choice(["chat", "search"]),
                "model_served": model,
                "tier": tier,
                "prompt_tokens": 800,
                "completion_tokens": 150,
                "cost_usd_nanos": int(price * rng.lognormvariate(0, 0.7) * factor),
                "price_unknown": False,
                "cache_hit": rng.random() < 0.05,
            }
        )
    if draw(st.booleans()):
        return records, draw(st.integers(min_value=0, max_value=calls))
    return records, min(calls, incident_at + draw(st.integers(min_value=0, max_value=80)))


def run(engine: AnomalyEngine, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The alerts, each without its ``event_id``: a fresh id per alert object, which the agent
    replaces by one derived from the alert (``stable_event_id``) before publishing."""
    alerts: list[dict[str, Any]] = []
    for record in records:
        alerts += engine.observe(record)
    alerts += engine.flush()
    return [{k: v for k, v in alert.items() if k != "event_id"} for alert in alerts]


@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(stream=streams())
def test_a_restored_engine_pages_exactly_as_one_never_stopped(
    stream: tuple[list[dict[str, Any]], int],
) -> None:
    records, at = stream
    whole = AnomalyEngine(FAST)
    before = [a for r in records[:at] for a in whole.observe(r)]
    snapshot = whole.snapshot()
    after_whole = run(whole, records[at:])

    resumed = AnomalyEngine.restore(snapshot)
    after_resumed = run(resumed, records[at:])

    assert after_resumed == after_whole, (len(before), at)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    stream=streams(),
    backfill=st.lists(
        st.tuples(
            st.floats(min_value=0.0, max_value=1.0),  # where in the stream it arrives
            st.floats(min_value=1.0, max_value=7 * 86_400.0),  # how old it is then
            st.sampled_from(["u0", "u1", "u-old"]),
        ),
        min_size=1,
        max_size=40,
    ),
)
def test_history_of_up_to_a_week_arriving_at_any_moment_is_taken_without_an_error(
    stream: tuple[list[dict[str, Any]], int], backfill: list[tuple[float, float, str]]
) -> None:
    """A replay of last week (or a spool flushed after an outage) can reach any scope in
    any state, alarms open included: the engine takes every record and still snapshots
    (probe J: a cost alarm and a record 12 h older overflowed math.exp)."""
    records, _ = stream
    mixed = list(records)
    for where, age, user in sorted(backfill, reverse=True):
        i = int(where * len(mixed))
        anchor = mixed[min(i, len(mixed) - 1)]
        old = {**anchor, "ts": anchor["ts"] - timedelta(seconds=age), "user_id": user}
        mixed.insert(i, old)
    engine = AnomalyEngine(FAST)
    run(engine, mixed)
    AnomalyEngine.restore(engine.snapshot())
