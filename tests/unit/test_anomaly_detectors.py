"""The anomaly detectors: each flags its injected anomaly and stays quiet on stationary input."""

from __future__ import annotations

import math
import random
from datetime import UTC, datetime, timedelta

import pytest

from agents.anomaly.detectors import (
    CostDetector,
    DetectorSettings,
    Point,
    TierMixDetector,
    VolumeDetector,
)

T0 = datetime(2024, 5, 1, tzinfo=UTC)
SETTINGS = DetectorSettings()


def minute(n: int) -> datetime:
    return T0 + timedelta(minutes=n)


def poisson(rng: random.Random, mean: float) -> int:
    # Knuth's method is fine for the small means used here; a normal approximation above.
    if mean > 50:
        return max(0, round(rng.gauss(mean, math.sqrt(mean))))
    limit, count, product = math.exp(-mean), 0, rng.random()
    while product > limit:
        count += 1
        product *= rng.random()
    return count


# -- volume -----------------------------------------------------------------------------------


def test_volume_quiet_on_stationary_counts_then_flags_a_spike() -> None:
    rng = random.Random(1)
    detector = VolumeDetector("feature:chat", SETTINGS, "requests")
    verdicts = [detector.observe(Point(minute(m), poisson(rng, 40))) for m in range(600)]
    assert not any(v.is_anomaly for v in verdicts)
    assert all(v.warming_up for v in verdicts[: SETTINGS.volume_warmup_minutes])

    spike = detector.observe(Point(minute(600), 200.0))
    assert spike.is_anomaly and spike.kind == "volume_spike"
    assert spike.expected == pytest.approx(40, rel=0.25)
    assert spike.observed == 200
    assert spike.unit == "requests/min"
    assert "x normal" in spike.explanation and "feature:chat" in spike.explanation


def test_volume_does_not_learn_an_anomalous_minute() -> None:
    rng = random.Random(2)
    detector = VolumeDetector("global", SETTINGS, "requests")
    for m in range(120):
        detector.observe(Point(minute(m), poisson(rng, 100)))
    before = detector.expected()
    for m in range(120, 125):
        assert detector.observe(Point(minute(m), 1000.0)).is_anomaly
    assert detector.expected() == pytest.approx(before)


def test_volume_is_silent_while_warming_up() -> None:
    detector = VolumeDetector("user:new", SETTINGS, "requests")
    for m in range(5):
        detector.observe(Point(minute(m), 1.0))
    verdict = detector.observe(Point(minute(5), 500.0))
    assert verdict.warming_up and not verdict.is_anomaly
    assert "still learning" in verdict.explanation


def test_sparse_user_is_quiet_for_a_day_and_flagged_in_a_runaway_loop() -> None:
    rng = random.Random(3)
    detector = VolumeDetector("user:alice", SETTINGS, "requests", p_value=1e-6)
    quiet = [detector.observe(Point(minute(m), poisson(rng, 0.3))) for m in range(1440)]
    assert sum(v.is_anomaly for v in quiet) == 0
    loop = detector.observe(Point(minute(1440), 15.0))
    assert loop.is_anomaly and loop.ratio is not None and loop.ratio > 10


def test_volume_drop_only_where_drops_are_watched() -> None:
    rng = random.Random(4)
    watched = VolumeDetector("global", SETTINGS, "requests", detect_drops=True)
    unwatched = VolumeDetector("feature:chat", SETTINGS, "requests")
    for m in range(120):
        count = poisson(rng, 300)
        watched.observe(Point(minute(m), count))
        unwatched.observe(Point(minute(m), count))
    drop = watched.observe(Point(minute(120), 20.0))
    assert drop.is_anomaly and drop.kind == "volume_drop"
    assert "below normal" in drop.explanation
    assert not unwatched.observe(Point(minute(120), 20.0)).is_anomaly


def test_a_few_big_calls_are_not_a_spend_spike_but_many_are() -> None:
    rng = random.Random(5)
    detector = VolumeDetector("user:bob", SETTINGS, "spend")
    for m in range(120):
        calls = [0.002 * rng.lognormvariate(0, 0.5) for _ in range(poisson(rng, 10))]
        spend = Point(minute(m), sum(calls), requests=len(calls), trimmed=sum(sorted(calls)[-3:]))
        detector.observe(spend)
    big = [0.002] * 9 + [5.0]  # one $5 call among normal ones: a cost question
    one_big = Point(minute(120), sum(big), requests=10, trimmed=5.004)
    assert not detector.observe(one_big).is_anomaly
    many = [0.05] * 200  # a loop of expensive calls
    loop = Point(minute(121), sum(many), requests=200, trimmed=0.15)
    verdict = detector.observe(loop)
    assert verdict.is_anomaly and verdict.unit == "usd/min"


def test_peek_reports_a_spike_in_progress_without_learning_it() -> None:
    rng = random.Random(6)
    detector = VolumeDetector("feature:search", SETTINGS, "requests")
    for m in range(60):
        detector.observe(Point(minute(m), poisson(rng, 30)))
    points = detector.points
    assert detector.peek(Point(minute(60), 25.0)) is None
    early = detector.peek(Point(minute(60) + timedelta(seconds=20), 150.0))
    assert early is not None and early.is_anomaly
    assert detector.points == points


def test_volume_context_scales_the_forecast() -> None:
    rng = random.Random(7)
    detector = VolumeDetector("feature:chat", SETTINGS, "requests")
    for m in range(120):
        detector.observe(Point(minute(m), poisson(rng, 100)))
    everyone_doubled = Point(minute(120), 200.0, context=2.0)
    assert detector.peek(everyone_doubled) is None
    assert detector.peek(Point(minute(120), 200.0)) is not None


def test_a_lasting_level_is_learned_as_the_new_normal() -> None:
    settings = DetectorSettings(volume_adapt_after_minutes=10)
    detector = VolumeDetector("global", settings, "requests")
    for m in range(60):
        detector.observe(Point(minute(m), 100.0 + m % 3))
    flags = [detector.observe(Point(minute(60 + m), 400.0)).is_anomaly for m in range(40)]
    assert flags[0] and flags[9]
    assert not flags[-1]  # adapted: the verdict is normal again


# -- cost per request --------------------------------------------------------------------------


def _cost(rng: random.Random, typical_nanos: float) -> float:
    return typical_nanos * rng.lognormvariate(0, 0.7)


def test_cost_quiet_on_stationary_costs_then_flags_a_spike() -> None:
    rng = random.Random(10)
    detector = CostDetector("feature:chat", SETTINGS)
    start = T0
    normal = [
        detector.observe(Point(start + timedelta(seconds=i), _cost(rng, 300_000), "gpt-4o-mini"))
        for i in range(3000)
    ]
    assert not any(v.is_anomaly for v in normal)
    later = start + timedelta(seconds=3000)
    spiked = [
        detector.observe(
            Point(later + timedelta(seconds=i), 20 * _cost(rng, 300_000), "gpt-4o-mini")
        )
        for i in range(60)
    ]
    # One outlier is not an incident; a quarter of the last 2 minutes' requests is.
    first = next(i for i, v in enumerate(spiked) if v.is_anomaly)
    assert 20 <= first <= 45
    assert spiked[-1].is_anomaly and spiked[-1].kind == "cost_per_request"
    assert spiked[-1].expected == pytest.approx(300_000 / 1e9, rel=0.2)
    assert spiked[-1].unit == "usd"
    assert "outliers" in spiked[-1].explanation


def test_cost_single_outlier_is_not_an_anomaly() -> None:
    rng = random.Random(11)
    detector = CostDetector("user:carol", SETTINGS)
    for i in range(500):
        detector.observe(Point(T0 + timedelta(seconds=i), _cost(rng, 1e6), "gpt-4o"))
    lone = detector.observe(Point(T0 + timedelta(seconds=500), 1e8, "gpt-4o"))
    assert lone.score > SETTINGS.cost_outlier_z and not lone.is_anomaly
    after = [
        detector.observe(Point(T0 + timedelta(seconds=501 + i), _cost(rng, 1e6), "gpt-4o"))
        for i in range(20)
    ]
    assert not any(v.is_anomaly for v in after)


def test_cost_is_judged_per_model() -> None:
    rng = random.Random(12)
    detector = CostDetector("feature:code", SETTINGS)
    verdicts = []
    for i in range(2000):
        model, typical = ("gpt-4-turbo", 2e7) if i % 10 == 0 else ("gpt-4o-mini", 3e5)
        verdicts.append(
            detector.observe(Point(T0 + timedelta(seconds=i), _cost(rng, typical), model))
        )
    assert not any(v.is_anomaly for v in verdicts)


def test_a_new_user_is_judged_against_the_feature_baseline() -> None:
    rng = random.Random(13)
    feature = CostDetector("feature:chat", SETTINGS)
    for i in range(300):
        feature.observe(Point(T0 + timedelta(seconds=i), _cost(rng, 3e5), "gpt-4o-mini"))
    newcomer, alone = CostDetector("user:dave", SETTINGS), CostDetector("user:erin", SETTINGS)
    at = T0 + timedelta(seconds=400)
    with_fallback = [
        newcomer.observe(Point(at + timedelta(seconds=i), 6e6, "gpt-4o-mini"), feature)
        for i in range(4)
    ]
    without = [
        alone.observe(Point(at + timedelta(seconds=i), 6e6, "gpt-4o-mini")) for i in range(4)
    ]
    assert with_fallback[-1].is_anomaly and not with_fallback[-1].warming_up
    assert all(v.warming_up and not v.is_anomaly for v in without)


def test_outliers_that_do_not_corroborate_are_not_counted() -> None:
    rng = random.Random(14)
    detector = CostDetector("user:frank", SETTINGS)
    for i in range(300):
        detector.observe(Point(T0 + timedelta(seconds=i), _cost(rng, 3e5), "gpt-4o-mini"))
    at = T0 + timedelta(seconds=300)
    verdicts = [
        detector.observe(Point(at + timedelta(seconds=i), 1e7, "gpt-4o-mini"), corroborates=False)
        for i in range(10)
    ]
    assert not any(v.is_anomaly for v in verdicts)


# -- tier mix ------------------------------------------------------------------------------------


def _mix(detector: TierMixDetector, rng: random.Random, share: float, n: int, start: int) -> list:
    return [
        detector.observe(
            Point(T0 + timedelta(seconds=(start + i) / 5), 1.0 if rng.random() < share else 0.0)
        )
        for i in range(n)
    ]


def test_mix_quiet_on_a_stable_share_then_flags_a_drop_and_its_recovery() -> None:
    rng = random.Random(20)
    detector = TierMixDetector("feature:search", SETTINGS)
    stable = _mix(detector, rng, 0.7, 30_000, 0)
    assert not any(v.is_anomaly for v in stable)
    dropped = _mix(detector, rng, 0.2, 200, 30_000)
    first = next(i for i, v in enumerate(dropped) if v.is_anomaly)
    assert first < 80
    flagged = dropped[first]
    assert flagged.kind == "tier_mix" and flagged.unit == "share"
    assert flagged.expected == pytest.approx(0.7, abs=0.06)
    assert flagged.observed is not None and flagged.observed <= 0.45
    recovered = _mix(detector, rng, 0.7, 300, 30_200)
    assert not any(v.is_anomaly for v in recovered[100:])


def test_mix_ignores_a_small_drift() -> None:
    rng = random.Random(21)
    detector = TierMixDetector("global", SETTINGS)
    _mix(detector, rng, 0.7, 5000, 0)
    assert not any(v.is_anomaly for v in _mix(detector, rng, 0.62, 5000, 5000))


def test_mix_is_silent_while_warming_up() -> None:
    detector = TierMixDetector("feature:new", SETTINGS)
    verdicts = [detector.observe(Point(T0, 0.0)) for _ in range(SETTINGS.mix_warmup_requests - 1)]
    assert all(v.warming_up and not v.is_anomaly for v in verdicts)


# -- settings ------------------------------------------------------------------------------------


def test_settings_name_the_bad_field() -> None:
    with pytest.raises(ValueError, match="cost_outlier_z"):
        DetectorSettings(cost_outlier_z=-1)
    with pytest.raises(ValueError, match="volume_p_value"):
        DetectorSettings(volume_p_value=2.0)
    with pytest.raises(ValueError, match="volume_drop_scope_kinds"):
        DetectorSettings(volume_drop_scope_kinds=("team",))
    with pytest.raises(ValueError, match=r"unknown detector option.*volume_pvalue"):
        DetectorSettings.with_options(volume_pvalue=1e-3)
    assert DetectorSettings.with_options(cost_min_outliers=5).cost_min_outliers == 5
    # Text from a command line is converted to the field's type.
    parsed = DetectorSettings.with_options(
        volume_p_value="1e-4",
        cost_min_outliers="4",
        volume_drop_scope_kinds="global,feature",
        cost_history_window="500",
    )
    assert parsed.volume_p_value == 1e-4 and parsed.cost_min_outliers == 4
    assert parsed.volume_drop_scope_kinds == ("global", "feature")
    assert parsed.cost_history_window == 500
    with pytest.raises(ValueError, match=r"cost_min_outliers='many' must be an integer"):
        DetectorSettings.with_options(cost_min_outliers="many")
