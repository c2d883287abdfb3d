"""Cost shifts of a feature that mixes models 16x apart, judged through the whole engine.

A feature whose calls go to a cheap model and to one 16 times pricier has a log-cost
spread of about 1.4 (the model mix), while each model's calls spread 0.5 (their tokens).
Ranked among all the feature's calls, a 1.75x rise of the tokens is about 0.4 spreads and
takes the CUSUMs some 40 minutes at 4 calls a minute; ranked among the same model's calls
it is about 1.1 spreads. These tests feed usage records (two features, six users, a daily
rhythm) to :class:`AnomalyEngine` and look at what it pages; pure logic, no Kafka.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from agents.anomaly.engine import AnomalyEngine

T0 = datetime(2024, 5, 1, 0, tzinfo=UTC)
DAY = 86_400.0
CHEAP, PRICEY = ("gpt-4o-mini", 3e5), ("gpt-4o", 4.8e6)  # 16x apart
# name: (calls a minute at the daily peak, typical cost factor, cheap-model share)
FEATURES = {"support": (4.0, 1.0, 0.7), "chat": (16.0, 0.6, 0.6)}
USERS = [f"u{i}" for i in range(6)]
TOKEN_SPREAD = 0.5  # log-normal sigma of a call's tokens, per model


def rhythm(t: float) -> float:
    """Calls a minute relative to the peak: 1 at 15:00, 0.25 at 03:00 (a normal day)."""
    hour = (t % DAY) / 3600
    return 0.25 + 0.75 * (1 + math.cos(2 * math.pi * (hour - 15) / 24)) / 2


def calls(
    rng: random.Random,
    start: float,
    end: float,
    feature: str,
    factor: Callable[[float], float] = lambda t: 1.0,
    cheap_share: Callable[[float], float] | None = None,
) -> list[dict[str, Any]]:
    """Usage records of ``feature`` between ``start`` and ``end`` (seconds after T0): a
    Poisson stream thinned by the daily rhythm, tokens times ``factor(t)``."""
    peak, typical, share = FEATURES[feature]
    records: list[dict[str, Any]] = []
    t = start
    while True:
        t += rng.expovariate(peak / 60)
        if t >= end:
            return records
        if rng.random() > rhythm(t):
            continue
        p = share if cheap_share is None else cheap_share(t)
        model, price = CHEAP if rng.random() < p else PRICEY
        cost = price * typical * rng.lognormvariate(0, TOKEN_SPREAD) * factor(t)
        records.append(
            {
                "ts": T0 + timedelta(seconds=t),
                "user_id": rng.choice(USERS),
                "feature": feature,
                "model_served": model,
                "tier": "economy" if model == CHEAP[0] else "standard",
                "prompt_tokens": 800,
                "completion_tokens": 150,
                "cost_usd_nanos": int(cost),
                "price_unknown": False,
                "cache_hit": False,
            }
        )


def day_of_traffic(rng: random.Random, start: float, end: float, **support: Any) -> list:
    """Both features from ``start`` to ``end``; ``support``'s calls modified as given."""
    both = calls(rng, start, end, "support", **support) + calls(rng, start, end, "chat")
    return sorted(both, key=lambda r: r["ts"])


def run(engine: AnomalyEngine, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    alerts: list[dict[str, Any]] = []
    for record in records:
        alerts += engine.observe(record)
    return alerts


def first_cost_firing(alerts: list[dict[str, Any]], scope: str) -> float | None:
    """Seconds after T0 of the first firing cost alert of ``scope`` (None: none)."""
    for alert in alerts:
        if alert["status"] == "firing" and alert["alert_key"] == f"cost_per_request|{scope}":
            return float((alert["ts"] - T0).total_seconds())
    return None


@pytest.fixture(scope="module")
def warm() -> bytes:
    """An engine that has seen a quiet day of both features (snapshot at 09:00 of day 2:
    the incidents start at 10:00, when the support feature is at about 3 calls a minute)."""
    rng = random.Random(7)
    engine = AnomalyEngine()
    run(engine, day_of_traffic(rng, 0, DAY + 9 * 3600))  # the first day: learning
    return engine.snapshot()


START = DAY + 10 * 3600  # 10:00 on day 2


def test_a_drift_of_a_model_mixing_feature_pages_within_two_minutes_of_plus_75(
    warm: bytes,
) -> None:
    """Tokens rising linearly 1x -> 5x over 3 hours: the +75 % crossing is at 33.75 min.
    Ranked scope-wide it took about 20 minutes more at this rate (docs/ANOMALY.md)."""
    engine = AnomalyEngine.restore(warm)
    ramp = 3 * 3600.0
    rng = random.Random(21)
    before = run(engine, day_of_traffic(rng, DAY + 9 * 3600, START))
    assert [a for a in before if a["status"] == "firing"] == []
    alerts = run(
        engine,
        day_of_traffic(
            rng,
            START,
            START + ramp,
            factor=lambda t: 1 + 4 * min(1.0, max(0.0, (t - START) / ramp)),
        ),
    )
    paged = first_cost_firing(alerts, "feature:support")
    crossing = START + ramp * 0.75 / 4
    assert paged is not None
    assert paged - crossing <= 120


def test_a_step_of_the_tokens_to_175_percent_is_paged_once_it_has_lasted(warm: bytes) -> None:
    """Every call's tokens 1.75x from 10:00. A rise under ``cost_jump_ratio`` (2x) pages
    only once it has lasted ``cost_sustained_seconds`` (5 min: busy features wander by a
    third for minutes), so 2 minutes is out of reach by design; ranked among the same
    model's calls it pages soon after those 5 minutes (scope-wide: about 40 minutes)."""
    engine = AnomalyEngine.restore(warm)
    rng = random.Random(22)
    run(engine, day_of_traffic(rng, DAY + 9 * 3600, START))
    alerts = run(engine, day_of_traffic(rng, START, START + 3600, factor=lambda t: 1.75))
    paged = first_cost_firing(alerts, "feature:support")
    assert paged is not None
    assert paged - START <= 600
    # What on-call reads compares the calls with what the same calls usually cost (their
    # models' usual), not with the feature's mean over another mix of models.
    alert = next(a for a in alerts if a["alert_key"] == "cost_per_request|feature:support")
    assert 1.4 <= alert["observed"] / alert["expected"] <= 2.5


def test_half_the_calls_at_eight_times_the_tokens_pages_within_five_minutes(warm: bytes) -> None:
    """The issue's prompt injection: half the calls of a feature at ~3 calls a minute use
    8x the tokens. Ranked scope-wide (the model mix) it took about 20 minutes here.

    Not 2 minutes: they hold ~6 calls, ~3 of them at 8x. Within a model an 8x call is
    4.2 spreads out, but a rank score cannot exceed what the remembered calls allow
    (about 3.5 for a day of them), so three such calls and three ordinary ones give a
    mixture likelihood ratio of about 13.5 nats against the 16 (ln 1e7) that the false
    trigger rate asks for (docs/ANOMALY.md)."""
    engine = AnomalyEngine.restore(warm)
    rng = random.Random(23)
    run(engine, day_of_traffic(rng, DAY + 9 * 3600, START))
    inject = random.Random(5)
    alerts = run(
        engine,
        day_of_traffic(
            rng, START, START + 1800, factor=lambda t: 8.0 if inject.random() < 0.5 else 1.0
        ),
    )
    paged = first_cost_firing(alerts, "feature:support")
    assert paged is not None
    assert paged - START <= 300


def test_the_issues_prompt_injection_at_four_calls_a_minute_mostly_pages_within_two_minutes(
    warm: bytes,
) -> None:
    """The issue's numbers: half the calls of a feature at ~4 calls a minute (the support
    feature at its 15:00 peak) at 8x the tokens. Two minutes hold ~8 calls, ~4 of them at
    8x; the tail CUSUM (``cost_tail_share``) needs 3 or 4 of them among a few ordinary
    ones, the CUSUMs of the scores about 5. Over these 12 seeds (not the ones the settings
    were chosen on): 7 within 2 minutes, median 102 s; before the tail CUSUM 4, median
    127 s. The others are the arrivals' doing: a seed whose first two minutes bring two
    8x calls, or 8x calls that the tokens' own spread left under the top 0.1 %, waits for
    more (floor: three far calls)."""
    start = DAY + 15 * 3600.0
    delays = []
    for seed in range(20, 32):
        engine = AnomalyEngine.restore(warm)
        rng = random.Random(seed)
        run(engine, day_of_traffic(rng, DAY + 9 * 3600, start))
        inject = random.Random(seed + 1000)
        alerts = run(
            engine,
            day_of_traffic(
                rng,
                start,
                start + 900,
                factor=lambda t, inject=inject: 8.0 if inject.random() < 0.5 else 1.0,
            ),
        )
        paged = first_cost_firing(alerts, "feature:support")
        delays.append(math.inf if paged is None else paged - start)
    assert sum(d <= 120 for d in delays) >= 7, sorted(delays)


def test_a_switch_to_the_pricier_model_is_still_paged(warm: bytes) -> None:
    """All calls to the 16x model (tokens as usual): within the model nothing moved, so the
    scope-wide ranking (and the economy-share detector: the cheap model is the economy
    tier) must still see it. At ~3 calls a minute the share drop needs ~21 calls' evidence,
    so this is a guard that nothing is lost, not a 2-minute claim."""
    engine = AnomalyEngine.restore(warm)
    rng = random.Random(24)
    run(engine, day_of_traffic(rng, DAY + 9 * 3600, START))
    alerts = run(engine, day_of_traffic(rng, START, START + 1800, cheap_share=lambda t: 0.0))
    paged = first_cost_firing(alerts, "feature:support")
    assert paged is not None
    assert paged - START <= 600
    pages = [
        a
        for a in alerts
        if a["status"] == "firing"
        and a.get("incident_role") == "primary"
        and a["alert_key"].endswith("|feature:support")
    ]
    assert pages and (pages[0]["ts"] - T0).total_seconds() - START <= 300


def test_the_model_share_wobbling_and_the_daily_rhythm_stay_quiet(warm: bytes) -> None:
    """Two more days: the daily rhythm (4x from night to afternoon) and the support
    feature's cheap-model share wandering between 0.6 and 0.8 hour by hour. No page."""
    engine = AnomalyEngine.restore(warm)
    rng = random.Random(25)
    hourly = [random.Random(h).uniform(0.6, 0.8) for h in range(80)]
    alerts = run(
        engine,
        day_of_traffic(
            rng,
            DAY + 9 * 3600,
            3 * DAY + 9 * 3600,
            cheap_share=lambda t: hourly[int((t - DAY) // 3600)],
        ),
    )
    assert [a["alert_key"] for a in alerts if a["status"] == "firing"] == []


def test_the_per_model_view_survives_a_checkpoint(warm: bytes) -> None:
    """A snapshot taken in the middle of a drift, restored, pages exactly as the engine
    that kept running (the per-model distributions and CUSUMs are in the snapshot)."""
    engine = AnomalyEngine.restore(warm)
    feature = engine.features["feature:support"].cost
    assert feature is not None and {"gpt-4o-mini", "gpt-4o"} <= set(feature.models)
    ramp = 3 * 3600.0
    rng = random.Random(26)
    records = day_of_traffic(
        rng, START, START + ramp, factor=lambda t: 1 + 4 * min(1.0, (t - START) / ramp)
    )
    middle = next(
        i for i, r in enumerate(records) if r["ts"] >= T0 + timedelta(seconds=START + 1500)
    )
    run(engine, records[:middle])
    restored = AnomalyEngine.restore(engine.snapshot())
    kept, resumed = run(engine, records[middle:]), run(restored, records[middle:])
    assert first_cost_firing(kept, "feature:support") is not None

    def strip(alerts: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
        return [(a["ts"], a["alert_key"], a["status"], a["observed"]) for a in alerts]

    assert strip(resumed) == strip(kept)


def test_a_cost_detector_from_a_checkpoint_without_the_per_model_view_restores() -> None:
    """A checkpoint written before the per-model view: the detector comes back with an
    empty one (it learns it from the next calls) instead of failing on a missing slot."""
    from agents.anomaly.costs import CostDetector
    from app.anomaly_config import DetectorSettings

    old = CostDetector("feature:chat", DetectorSettings(), own_reference=True)
    reduced: Any = old.__reduce_ex__(4)
    slots: dict[str, Any] = reduced[2][1]
    new_slots = ("models", "model_cusums", "model_thresholds", "model_spread")
    old_slots = {k: v for k, v in slots.items() if k not in new_slots and k != "model_spread_at"}
    old_slots.pop("alarm_by_model")
    restored = CostDetector.__new__(CostDetector)
    restored.__setstate__((None, old_slots))
    assert restored.models == {} and len(restored.model_cusums) == 4
    for i in range(300):
        restored.observe(T0 + timedelta(seconds=10 * i), 3e5, model="gpt-4o-mini")
    assert restored.models["gpt-4o-mini"].added == 300


def test_a_cost_detector_from_a_checkpoint_without_the_tail_cusum_restores() -> None:
    """A checkpoint written with three CUSUMs per view comes back with the tail CUSUM too,
    and judges (a run of 8x calls of the model then pages)."""
    from agents.anomaly.core import TailCusum
    from agents.anomaly.costs import CostDetector
    from app.anomaly_config import DetectorSettings

    old = CostDetector("feature:chat", DetectorSettings(), own_reference=True)
    reduced: Any = old.__reduce_ex__(4)
    slots: dict[str, Any] = dict(reduced[2][1])
    for name in ("cusums", "model_cusums", "thresholds", "model_thresholds"):
        slots[name] = slots[name][:3]
    restored = CostDetector.__new__(CostDetector)
    restored.__setstate__((None, slots))
    assert isinstance(restored.cusums[3], TailCusum)
    assert isinstance(restored.model_cusums[3], TailCusum)
    assert len(restored.thresholds) == len(restored.model_thresholds) == 4
    rng = random.Random(3)
    for i in range(600):
        restored.observe(
            T0 + timedelta(seconds=10 * i), 3e5 * rng.lognormvariate(0, 0.5), model="m"
        )
    fired = [
        restored.observe(T0 + timedelta(seconds=6000 + 10 * i), 2.4e6, model="m") for i in range(8)
    ]
    assert any(v is not None and v.is_anomaly for v in fired)
