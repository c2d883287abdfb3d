"""The anomaly detectors one by one: each flags its incident and stays quiet on ordinary input."""

from __future__ import annotations

import math
import random
import re
from collections import deque
from datetime import UTC, datetime, timedelta

import pytest

from agents.anomaly.core import Cusum, TailCusum, Verdict, cusum_threshold
from agents.anomaly.costs import CostDetector
from agents.anomaly.mix import TierMixDetector
from agents.anomaly.rates import PeerPrior, RateDetector, _Rates, fit_peer_prior
from app.anomaly_config import DetectorSettings

T0 = datetime(2024, 5, 1, tzinfo=UTC)
SETTINGS = DetectorSettings()


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def poisson_times(rng: random.Random, start: float, end: float, per_minute: float) -> list[float]:
    times, t = [], start
    while per_minute > 0:
        t += rng.expovariate(per_minute / 60)
        if t >= end:
            return times
        times.append(t)
    return times


def feed(detector: RateDetector, times: list[float], **kwargs: object) -> list:
    return [detector.observe(at(t), **kwargs) for t in times]  # type: ignore[arg-type]


# -- request rate ------------------------------------------------------------------------------


def test_rate_quiet_on_stationary_calls_then_flags_a_burst_within_seconds() -> None:
    rng = random.Random(1)
    detector = RateDetector("feature:chat", SETTINGS, "feature")
    verdicts = feed(detector, poisson_times(rng, 0, 10 * 3600, 40))
    assert not any(v is not None and v.is_anomaly for v in verdicts)
    start = 10 * 3600
    burst = poisson_times(rng, start, start + 120, 200)
    flagged = [
        (t, v) for t, v in zip(burst, feed(detector, burst), strict=True) if v and v.is_anomaly
    ]
    assert flagged and flagged[0][0] - start < 20
    first = flagged[0][1]
    assert first.kind == "volume_spike" and first.unit == "requests/min"
    assert first.expected == pytest.approx(40, rel=0.25)
    assert "x normal" in first.explanation


def test_a_ratio_over_an_expectation_near_zero_reads_as_a_bound() -> None:
    """A scope's first calls after a night it had learned read "expected 0.0
    (141544222629578.6x normal)" (session 28): past 10,000x the message says so."""
    at = datetime(2024, 5, 7, 9, tzinfo=UTC)

    def said(expected: float, observed: float) -> str:
        return Verdict(
            "volume_spike",
            "feature:chat",
            at,
            30.0,
            True,
            expected,
            observed,
            "requests/min",
            "requests/min",
            60,
        ).explanation

    assert "(over 10,000x normal)" in said(1e-13, 14.2)
    assert "(350.1x normal)" in said(0.02, 7.002)
    assert "(50% below normal)" in said(10.0, 5.0)


def test_rate_does_not_learn_an_anomalous_stretch() -> None:
    rng = random.Random(2)
    detector = RateDetector("global", SETTINGS, "global")
    feed(detector, poisson_times(rng, 0, 4 * 3600, 100))
    before = detector.rates(4 * 3600)[0][0] * 60
    feed(detector, poisson_times(rng, 4 * 3600, 4 * 3600 + 1200, 1000))
    after = detector.rates(4 * 3600 + 1200)[0][0] * 60
    assert after == pytest.approx(before, rel=0.1)


def test_rate_is_silent_while_warming_up() -> None:
    detector = RateDetector("feature:new", SETTINGS, "feature")
    verdicts = feed(detector, [i * 0.5 for i in range(600)])  # 120/min from nothing
    assert all(v is None for v in verdicts)


def _peer_prior(rng: random.Random, users: int = 40) -> PeerPrior:
    weights = [1 / (rank**1.1) for rank in range(1, users + 1)]
    total = 12 / 60 / sum(weights)  # 12 calls/min across the users
    exposure = 86400.0
    rates = [
        (rng.gauss(w * total * exposure, math.sqrt(w * total * exposure)), exposure)
        for w in weights
    ]
    prior = PeerPrior(burst=[])
    fit_peer_prior(prior, [(max(c, 0.0), e) for c, e in rates])
    return prior


def test_a_quiet_user_in_a_loop_is_flagged_within_two_minutes_and_a_new_users_burst_is_not() -> (
    None
):
    rng = random.Random(3)
    prior = _peer_prior(rng)
    assert prior.ready
    sparse = RateDetector("user:sparse", SETTINGS, "user")
    history = sorted(rng.uniform(0, 86400) for _ in range(21))
    assert not any(v is not None and v.is_anomaly for v in feed(sparse, history, prior=prior))
    start = 86400 + 600
    loop = [start + 12 * i for i in range(20)]  # 5 calls/min, steadily
    flagged = [
        t for t, v in zip(loop, feed(sparse, loop, prior=prior), strict=True) if v and v.is_anomaly
    ]
    assert flagged and flagged[0] - start <= 120  # six or seven calls (see docs/ANOMALY.md)
    # A brand-new user's first session (8 calls in 2 minutes) is within what peers do.
    newcomer = RateDetector("user:new", SETTINGS, "user")
    session = [start + 15 * i for i in range(8)]
    assert not any(v is not None and v.is_anomaly for v in feed(newcomer, session, prior=prior))


def test_a_slow_loop_of_an_hourly_user_is_found_on_the_long_windows() -> None:
    rng = random.Random(4)
    user = RateDetector("user:hourly", SETTINGS, "user")
    feed(user, sorted(rng.uniform(0, 2 * 86400) for _ in range(48)))  # once an hour
    start = 2 * 86400 + 300
    loop = [start + 60 * i + rng.uniform(0, 5) for i in range(30)]  # once a minute: 60x
    flagged = [t for t, v in zip(loop, feed(user, loop), strict=True) if v and v.is_anomaly]
    assert flagged and flagged[0] - start <= 600
    assert flagged[0] - start >= 60  # two calls in a minute are no evidence yet


def test_users_who_come_in_sessions_are_not_flagged_for_their_sessions() -> None:
    rng = random.Random(5)
    user = RateDetector("user:sessions", SETTINGS, "user")
    verdicts = []
    t = 0.0
    while t < 3 * 86400:
        t += rng.expovariate(1 / 5400)  # a session every 1.5 h
        calls = max(2, round(rng.expovariate(1 / 8)))
        verdicts += feed(user, [t + 10 * i for i in range(calls)])  # a call every 10 s
        t += 10 * calls
    late = verdicts[len(verdicts) // 3 :]  # once its burstiness is learned
    assert sum(v is not None and v.is_anomaly for v in late) <= 1


def _session_caller(rng: random.Random, days: int) -> tuple[RateDetector, float]:
    """A user who calls in sessions of 3 to 8 calls 10 to 20 s apart, about 4 a day."""
    user = RateDetector("user:sessions", SETTINGS, "user")
    t = 0.0
    while True:
        t += rng.expovariate(4 / 86400)
        if t >= days * 86400:
            return user, t
        session = [t + i * rng.uniform(10, 20) for i in range(rng.randint(3, 8))]
        feed(user, session)  # (a user without peers: their first sessions may alarm)
        t = session[-1]


def test_a_session_callers_slow_loop_is_counted_in_sessions() -> None:
    """A loop of one call every 2 minutes of a user who calls in sessions of 3 to 8: in
    15 minutes about two of their sessions' worth of calls (variance/mean ~6, p ~1e-3),
    but 5 to 7 separate sessions where 0.05 are expected. Before: never flagged."""
    rng = random.Random(8)
    user, end = _session_caller(rng, 3)
    start = end + 3600
    loop = poisson_times(rng, start, start + 2400, 0.5)
    flagged = [t for t, v in zip(loop, feed(user, loop), strict=True) if v and v.is_anomaly]
    assert flagged and flagged[0] - start <= 2400, flagged[:1]  # while it goes on
    verdict = user.observe(at(start + 2400))
    assert verdict is not None and "separate sessions" in verdict.note


def test_unusual_calls_minutes_apart_counted_in_sessions_are_one_stretch() -> None:
    """A slow loop's calls come minutes apart, past ``volume_episode_gap_seconds``: when
    each is unusual for the separate sessions of a window holding the one before, they
    are one stretch, too long to be a burst, and teach nothing; unusual calls whose
    evidence is not their sessions (a session's calls, counted) stay one-call stretches
    learned as the user's bursts, as before."""
    n = len(SETTINGS.volume_windows_seconds)
    started = ([0.0] * n, True, (False,) * n)

    def learned(span: float) -> float:
        user = RateDetector("user:x", SETTINGS, "user")
        for i in range(6):  # unusual calls 150 s apart
            user.sessions_span = span  # as the judgement of each call sets it
            user._dispersion_episode(1000.0 + 150 * i, started, 1e-6, None)
        user.sessions_span = 0.0
        user._dispersion_episode(1000.0 + 4 * 3600, started, 1.0, None)  # hours later
        return user.session_share.weight

    assert learned(900.0) == 0.0  # the 15-minute window's sessions: one stretch of 750 s
    assert learned(0.0) == pytest.approx(6.0, rel=0.01)  # six one-call stretches, learned


def test_a_global_drop_is_flagged_on_the_minute_tick() -> None:
    rng = random.Random(6)
    detector = RateDetector("global", SETTINGS, "global")
    feed(detector, poisson_times(rng, 0, 3 * 3600, 120))
    drop = detector.check_drop(at(3 * 3600 + 90))  # 90 s of silence
    assert drop is not None and drop.is_anomaly and drop.kind == "volume_drop"
    assert "below normal" in drop.explanation
    feature = RateDetector("feature:chat", SETTINGS, "feature")
    feed(feature, poisson_times(rng, 0, 3 * 3600, 120))
    assert feature.check_drop(at(3 * 3600 + 90)) is None  # drops are watched globally only


def test_a_lasting_level_is_learned_as_the_new_normal() -> None:
    settings = DetectorSettings(volume_adapt_after_minutes=20)
    rng = random.Random(7)
    detector = RateDetector("global", settings, "global")
    feed(detector, poisson_times(rng, 0, 3 * 3600, 60))
    later = poisson_times(rng, 3 * 3600, 3 * 3600 + 3600, 300)
    verdicts = [(t, v) for t, v in zip(later, feed(detector, later), strict=True) if v is not None]
    assert verdicts[0][1].is_anomaly
    assert any("learned as normal" in v.note for _, v in verdicts)
    assert not any(v.is_anomaly for t, v in verdicts if t > 3 * 3600 + 30 * 60)


# -- cost per request --------------------------------------------------------------------------


def _cost(rng: random.Random, typical: float, sigma: float = 0.7) -> float:
    # Two models: a cheap one for 70 % of the calls, one 16x pricier for the rest.
    return typical * (16 if rng.random() < 0.3 else 1) * rng.lognormvariate(0, sigma)


def cost_run(detector: CostDetector, costs: list[tuple[float, float]]) -> list:
    return [detector.observe(at(t), cost) for t, cost in costs]


def test_cost_quiet_on_stationary_mixed_costs_then_flags_a_jump_in_a_few_calls() -> None:
    rng = random.Random(10)
    detector = CostDetector("feature:chat", SETTINGS, own_reference=True)
    normal = cost_run(detector, [(i * 2.0, _cost(rng, 3e5)) for i in range(20_000)])
    assert not any(v is not None and v.is_anomaly for v in normal)
    start = 40_000.0
    spiked = cost_run(detector, [(start + 2 * i, 20 * _cost(rng, 3e5)) for i in range(30)])
    first = next(i for i, v in enumerate(spiked) if v is not None and v.is_anomaly)
    # Cheap calls at 20x land among the pricier model's: about ten calls (see docs/ANOMALY.md).
    assert first <= 12
    verdict = spiked[first]
    assert verdict.kind == "cost_per_request" and verdict.unit == "usd"
    assert verdict.observed is not None and verdict.expected is not None
    assert verdict.observed > 5 * verdict.expected
    assert verdict.impact_usd_per_hour is not None


def test_cost_single_outliers_are_not_anomalies() -> None:
    rng = random.Random(11)
    detector = CostDetector("feature:search", SETTINGS, own_reference=True)
    costs = [(i * 3.0, _cost(rng, 1e6)) for i in range(5000)]
    for i in range(500, 5000, 400):
        costs[i] = (costs[i][0], 100 * costs[i][1])  # now and then one enormous call
    assert not any(v is not None and v.is_anomaly for v in cost_run(detector, costs))


def test_cost_half_the_calls_at_eight_times_is_a_shift_found_in_tens_of_calls() -> None:
    rng = random.Random(12)
    detector = CostDetector("feature:support", SETTINGS, own_reference=True)
    cost_run(detector, [(i * 15.0, _cost(rng, 5e5, sigma=0.8)) for i in range(3000)])
    start = 45_000.0
    shifted = [
        (start + 15 * i, _cost(rng, 5e5, sigma=0.8) * (8 if rng.random() < 0.5 else 1))
        for i in range(120)
    ]
    verdicts = cost_run(detector, shifted)
    first = next(i for i, v in enumerate(verdicts) if v is not None and v.is_anomaly)
    assert first <= 80  # 20 minutes at 4 calls/min; see docs/ANOMALY.md for why not sooner


def test_the_tail_cusum_triggers_falsely_no_more_often_than_its_threshold_allows() -> None:
    """Lorden's bound: a likelihood-ratio CUSUM with threshold ln(arl0) triggers falsely
    at most once in arl0 steps on average. Scores drawn from the null (standard normal
    rank scores), restarted after each trigger."""
    rng = random.Random(4)
    tail = TailCusum(SETTINGS.cost_tail_share, SETTINGS.cost_tail_alt_share)
    steps, arl0 = 400_000, 2_000.0
    h = TailCusum.threshold(arl0)
    triggers = 0
    for _ in range(steps):
        tail.update(rng.gauss(0.0, 1.0))
        if tail.stat > h:
            triggers += 1
            tail.reset()
    assert triggers <= steps / arl0  # 200; about a third of that is typical
    assert triggers > 0  # the test can see a trigger at all


def test_three_far_calls_among_three_ordinary_ones_trigger_the_tail_cusum() -> None:
    """What the tail CUSUM is for: part of the calls far out. At the default settings three
    calls above the top 0.1 % among three ordinary ones cross ln(1e7); two do not."""
    h = TailCusum.threshold(SETTINGS.cost_arl0_requests)
    for far, expected in ((3, True), (2, False)):
        tail = TailCusum(SETTINGS.cost_tail_share, SETTINGS.cost_tail_alt_share)
        for i in range(6):
            tail.update(3.5 if i % 2 == 0 and i // 2 < far else 0.0, at=float(i))
        assert (tail.stat > h) is expected, (far, tail.stat, h)
        if expected:  # the run holds the scores (for the effect size), not the increments
            assert tail.run_n == 6 and tail.run_z == pytest.approx(3 * 3.5)


def test_a_gradual_rise_is_measured_against_the_day_before_it() -> None:
    rng = random.Random(13)
    detector = CostDetector("feature:big", SETTINGS, own_reference=True)
    cost_run(detector, [(i * 1.0, _cost(rng, 3e5)) for i in range(86_400)])  # a day, 60/min
    start, ramp = 86_400.0, 3 * 3600.0
    rising = [(start + i, _cost(rng, 3e5) * (1 + 4 * i / ramp)) for i in range(int(ramp))]
    verdicts = cost_run(detector, rising)
    first = next(i for i, v in enumerate(verdicts) if v is not None and v.is_anomaly)
    crossing = ramp * 0.75 / 4  # +75 %: the run since the change then typically costs 1.5x
    assert first <= crossing + 120


def test_a_busy_feature_whose_cost_wanders_in_clusters_is_not_paged_as_a_lasting_rise() -> None:
    """The Azure trace's busy features (log-cost spread about 1): at 80 calls a minute, their
    five-minute typical cost ranges from 0.7x to 1.46x of the day's, because long
    conversations arrive in clusters, and five-minute stretches of 300-480 calls at 1.5x
    were paged as lasting rises (scope-wide gate at 1.5, the value until session 6: here 18
    alarms at 1.5x in two days, of 23). Here every 40 minutes a five-to-seven-minute
    cluster at 1.4x-1.6x, over two days: nothing is paged below the stated +60 %
    (``cost_min_ratio``; 2 alarms at 1.6x).

    Known limit, kept: a young run inside a cluster, chosen by the CUSUM for being high,
    can meet the jump gate (``cost_jump_ratio``, 2x on 19-109 calls: 5 times in these two
    days, harsher than the trace); a gate on short runs strict enough to stop them would
    also hold back real 2x steps for five minutes (docs/ANOMALY.md). A lasting step to
    2.2x is paged within two minutes."""
    rng = random.Random(17)
    detector = CostDetector("feature:busy", SETTINGS, own_reference=True)
    gap = 60 / 80
    clusters = [
        (rng.uniform(900, 1800), rng.uniform(300, 420), rng.uniform(1.4, 1.6))
        for _ in range(2 * 86_400 // 2400)
    ]

    def factor(t: float) -> float:
        begin, length, level = clusters[int(t // 2400)]
        return level if begin <= t % 2400 < begin + length else 1.0

    wandering = [
        (i * gap, 3e5 * rng.lognormvariate(0, 1.0) * factor(i * gap))
        for i in range(int(2 * 86_400 / gap))
    ]
    verdicts = cost_run(detector, wandering)
    opened = [v.note for v in verdicts if v is not None and "since the change" in v.note]
    assert opened  # the jump gate's pages (above)
    claimed = [float(re.findall(r"typically ([0-9.]+)x", note)[-1]) for note in opened]
    assert [c for c in claimed if c < 1.6] == []  # the stated +60 %
    start = 2 * 86_400.0
    step = [(start + i * gap, 3e5 * rng.lognormvariate(0, 1.0) * 2.2) for i in range(2400)]
    verdicts = cost_run(detector, step)
    first = next(t for (t, _), v in zip(step, verdicts, strict=True) if v and v.is_anomaly)
    assert first - start <= 120


def _poisson_costs(
    rng: random.Random, start: float, end: float, per_minute: float, sigma: float, factor: object
) -> list[tuple[float, float]]:
    """Calls at ``per_minute`` (Poisson), log-normal costs times ``factor(t)``."""
    return [
        (t, 3e5 * rng.lognormvariate(0, sigma) * factor(t))  # type: ignore[operator]
        for t in poisson_times(rng, start, end, per_minute)
    ]


@pytest.mark.parametrize(
    ("seed", "per_minute", "shape"),
    [(0, 10, "linear"), (3, 4, "convex")],
)
def test_a_drift_of_a_middling_feature_alerts_within_two_minutes_of_crossing_plus_75(
    seed: int, per_minute: float, shape: str
) -> None:
    """A feature of 4 to 10 calls a minute whose tokens rise 1x -> 5x over 3 hours (linearly,
    or slowly first: convex). The run since the CUSUM's change point averages the whole
    rise, so it reached 1.5x only ~15 minutes after the current level passed +75 %; the
    later half of the run does not lag that much."""
    rng = random.Random(seed)
    detector = CostDetector("feature:middling", SETTINGS, own_reference=True)
    day = cost_run(detector, _poisson_costs(rng, 0, 86_400, per_minute, 0.5, lambda t: 1.0))
    assert not any(v is not None and v.is_anomaly for v in day)
    start, ramp = 86_400.0, 3 * 3600.0

    def factor(t: float) -> float:
        progress = (t - start) / ramp
        return 1 + 4 * (progress if shape == "linear" else progress**2)

    crossing = ramp * (0.75 / 4 if shape == "linear" else (0.75 / 4) ** 0.5)
    rising = _poisson_costs(rng, start, start + ramp, per_minute, 0.5, factor)
    verdicts = cost_run(detector, rising)
    first = next(t for (t, _), v in zip(rising, verdicts, strict=True) if v and v.is_anomaly)
    assert first - start <= crossing + 120


@pytest.mark.parametrize("seed", [1, 2])
def test_a_drift_that_stops_short_of_the_stated_amount_is_not_paged(seed: int) -> None:
    """Tokens rising to 1.3x over an hour, then staying there for five hours: the later
    half of the run never typically costs 1.5x, so the drift rule stays quiet.

    Not seed 0: there the second CUSUM fires on a run of 57 calls whose geometric mean is
    1.5x (the run is selected for being high), with or without the drift rule: a known
    limit of judging the effect size on the run the CUSUM chose (docs/ANOMALY.md)."""
    rng = random.Random(seed)
    detector = CostDetector("feature:creeping", SETTINGS, own_reference=True)
    cost_run(detector, _poisson_costs(rng, 0, 86_400, 10, 0.5, lambda t: 1.0))
    start = 86_400.0
    creeping = _poisson_costs(
        rng, start, start + 6 * 3600, 10, 0.5, lambda t: 1 + 0.3 * min(1.0, (t - start) / 3600)
    )
    verdicts = cost_run(detector, creeping)
    assert not any(v is not None and v.is_anomaly for v in verdicts)


def test_a_new_user_is_judged_in_the_features_costs_and_a_pricier_user_is_learned() -> None:
    rng = random.Random(14)
    feature = CostDetector("feature:chat", SETTINGS, own_reference=True)
    cost_run(feature, [(i * 2.0, _cost(rng, 3e5)) for i in range(3000)])
    assert feature.reference is not None
    newcomer = CostDetector("user:dave", SETTINGS, own_reference=False)
    first_calls = [
        newcomer.observe(at(7000 + i), 30 * _cost(rng, 3e5), feature.reference) for i in range(6)
    ]
    assert any(v is not None and v.is_anomaly for v in first_calls)
    pricier = CostDetector("user:erin", SETTINGS, own_reference=False)
    verdicts = [
        pricier.observe(at(8000 + 20 * i), 2.5 * _cost(rng, 3e5), feature.reference)
        for i in range(2000)
    ]
    assert not any(v is not None and v.is_anomaly for v in verdicts[500:])


# -- tier mix ------------------------------------------------------------------------------------


def mix_run(
    detector: TierMixDetector, rng: random.Random, share: float, n: int, start: float
) -> list:
    return [detector.observe(at(start + 4.4 * i), rng.random() < share) for i in range(n)]


def test_mix_quiet_on_a_stable_share_then_flags_a_regression_and_its_recovery() -> None:
    rng = random.Random(20)
    detector = TierMixDetector("feature:search", SETTINGS)
    stable = mix_run(detector, rng, 0.85, 20_000, 0)
    assert not any(v is not None and v.is_anomaly for v in stable)
    dropped = mix_run(detector, rng, 0.35, 200, 90_000)
    first = next(i for i, v in enumerate(dropped) if v is not None and v.is_anomaly)
    assert first <= 27  # 120 s at 13.6 calls/min
    flagged = dropped[first]
    assert flagged.kind == "tier_mix" and flagged.unit == "share"
    assert flagged.expected == pytest.approx(0.85, abs=0.03)
    assert flagged.observed is not None and flagged.observed <= 0.6
    recovered = mix_run(detector, rng, 0.85, 400, 91_000)
    assert not any(v is not None and v.is_anomaly for v in recovered[100:])


def test_mix_judges_a_deepening_drop_by_the_later_half_of_the_run() -> None:
    """Economy share 85 % -> 45 % over 30 minutes at 43 calls a minute: the drop crosses
    0.2 points at minute 15. The run's share lags the drop by half the run; the alert
    comes within 2 minutes of the crossing."""
    rng = random.Random(3)
    detector = TierMixDetector("feature:chat", SETTINGS)
    gap, t = 60 / 43, 0.0
    while t < 86_400:
        detector.observe(at(t), rng.random() < 0.85)
        t += rng.expovariate(1 / gap)
    start, first = t, None
    while first is None and t < start + 3600:
        share = 0.85 - 0.4 * min(1.0, (t - start) / 1800)
        verdict = detector.observe(at(t), rng.random() < share)
        if verdict is not None and verdict.is_anomaly:
            first = t - start
        t += rng.expovariate(1 / gap)
    assert first is not None and first <= 15 * 60 + 120


def test_mix_ignores_a_small_drift_and_is_silent_while_warming_up() -> None:
    rng = random.Random(21)
    detector = TierMixDetector("global", SETTINGS)
    warming = mix_run(detector, rng, 0.0, SETTINGS.mix_warmup_requests - 1, 0)
    assert all(v is None for v in warming)
    detector = TierMixDetector("global", SETTINGS)
    mix_run(detector, rng, 0.7, 5000, 0)
    drifted = mix_run(detector, rng, 0.62, 5000, 30_000)
    # Eight points below the reference for six hours: at most one chance dip is paged
    # (a stretch of ~100 calls at 46 %), never a flood.
    flagged = [v.ts for v in drifted if v is not None and v.is_anomaly]
    gap = timedelta(seconds=SETTINGS.resolve_after_seconds)
    incidents = [t for i, t in enumerate(flagged) if i == 0 or t - flagged[i - 1] > gap]
    assert len(incidents) <= 1 and len(flagged) < 200


def test_mix_busy_scope_is_quiet_on_a_stable_share_for_days() -> None:
    """A global scope of 300,000 calls a day at a steady 70 % economy share: 100-call
    stretches at 49-51 % happen by chance every day (seen in the Azure trace's world), and
    a threshold fixed in nats, set for a scope of 10 calls a minute, triggered on them.
    The threshold grows with the calls a scope sees (``mix_arl0_days``); a regression is
    still found within 20 seconds at this volume."""
    rng = random.Random(5)
    detector = TierMixDetector("global", SETTINGS)
    gap = 86_400 / 300_000
    flagged = []
    for i in range(3 * 300_000):
        verdict = detector.observe(at(i * gap), rng.random() < 0.7)
        if verdict is not None and verdict.is_anomaly:
            flagged.append(verdict)
    assert flagged == []
    start = 3 * 86_400
    dropped = [detector.observe(at(start + i * gap), rng.random() < 0.35) for i in range(2000)]
    first = next(i for i, v in enumerate(dropped) if v is not None and v.is_anomaly)
    assert first * gap <= 20  # ~70 calls


# -- the statistics --------------------------------------------------------------------------------


def test_cusum_threshold_gives_about_the_asked_false_trigger_rate() -> None:
    rng = random.Random(30)
    k = 0.5
    h = cusum_threshold(k, 2000)
    lengths = []
    for _ in range(60):
        cusum, steps = Cusum(k), 0
        while cusum.stat <= h:
            cusum.update(rng.gauss(0, 1))
            steps += 1
        lengths.append(steps)
    mean = sum(lengths) / len(lengths)
    assert 1000 < mean < 4000
    assert cusum_threshold(k, 1e7) > cusum_threshold(k, 1e6) > h


# -- settings ------------------------------------------------------------------------------------


def test_settings_name_the_bad_field_and_read_text() -> None:
    with pytest.raises(ValueError, match="cost_min_ratio"):
        DetectorSettings(cost_min_ratio=0.5)
    with pytest.raises(ValueError, match="volume_p_value"):
        DetectorSettings(volume_p_value=2.0)
    with pytest.raises(ValueError, match="volume_drop_scope_kinds"):
        DetectorSettings(volume_drop_scope_kinds=("team",))
    with pytest.raises(ValueError, match="volume_windows_seconds"):
        DetectorSettings(volume_windows_seconds=(61,))
    with pytest.raises(ValueError, match=r"unknown detector option.*volume_pvalue"):
        DetectorSettings.with_options(volume_pvalue=1e-3)
    parsed = DetectorSettings.with_options(
        volume_p_value="1e-4",
        volume_min_count="4",
        volume_drop_scope_kinds="global,feature",
        volume_windows_seconds="60,300",
        volume_peer_prior="false",
    )
    assert parsed.volume_p_value == 1e-4 and parsed.volume_min_count == 4
    assert parsed.volume_drop_scope_kinds == ("global", "feature")
    assert parsed.volume_windows_seconds == (60, 300)
    assert parsed.volume_peer_prior is False
    with pytest.raises(ValueError, match=r"volume_min_count='many' must be an integer"):
        DetectorSettings.with_options(volume_min_count="many")


def test_a_late_call_counts_in_the_windows_that_still_hold_it_and_is_not_judged() -> None:
    rng = random.Random(40)
    detector = RateDetector("feature:chat", SETTINGS, "feature")
    feed(detector, poisson_times(rng, 0, 3600, 30))
    before = list(detector.counts)
    detector.add_late(at(3600 - 90).timestamp(), 1000.0)  # 90 s late: all windows but the first
    assert detector.counts[0] == before[0]
    assert all(after == b + 1 for after, b in zip(detector.counts[1:], before[1:], strict=True))
    exposure_before = detector.refs[0].count
    detector.add_late(at(3600 - 3 * 3600).timestamp(), 1000.0)  # hours late: references learn it
    assert detector.counts[1:] == [b + 1 for b in before[1:]]
    assert detector.refs[0].count >= exposure_before


def test_a_cusum_from_a_checkpoint_without_marks_restores_and_keeps_counting() -> None:
    """Checkpoints written before the run's marks existed: the CUSUM restores with none."""
    import pickle

    cusum = Cusum(0.5)
    for i in range(3):
        cusum.update(2.0, 1.0, 1.0, at=20.0 * i)
    old_state = (None, {name: getattr(cusum, name) for name in Cusum.__slots__ if name != "marks"})
    restored = Cusum.__new__(Cusum)
    restored.__setstate__(old_state)
    assert restored.marks == [] and restored.run_n == 3
    restored.update(2.0, 1.0, 1.0, at=100.0)
    assert restored.later_half(100.0) == (100.0, 1, 1.0)
    assert pickle.loads(pickle.dumps(restored)).marks == restored.marks


def test_a_scope_from_a_checkpoint_with_bare_tuple_rates_restores_its_cache() -> None:
    """Checkpoints written before ``_Rates`` pickled the slot's cached rates as a bare tuple:
    (alpha, rhythm, spikes, drops), or an older (alpha, rhythm, rates). Restored, the 4-tuple
    is the same cache (its rates are reused within the slot, as before), the 3-tuple is
    dropped and recomputed, and the scope pickles again."""
    import pickle

    rng = random.Random(42)
    feature = RateDetector("feature:old", SETTINGS, "feature")
    feed(feature, poisson_times(rng, 0, 3600, 30))
    now = at(3600).timestamp()
    spikes, drops = feature.rates(now), feature.rates(now, drops=True)
    cached = feature._rates
    assert isinstance(cached, _Rates) and cached.spikes is spikes and cached.drops is drops
    state = {name: getattr(feature, name) for name in RateDetector.__slots__}

    state["_rates"] = (cached.alpha, cached.rhythm, spikes, drops)  # as 1cde8dc pickled it
    restored = RateDetector.__new__(RateDetector)
    restored.__setstate__((None, pickle.loads(pickle.dumps(state))))
    assert restored._rates == cached
    assert restored.rates(now) == spikes and restored.rates(now, drops=True) == drops
    again = pickle.loads(pickle.dumps(restored))
    assert again._rates == cached and again.rates(now) == spikes

    state["_rates"] = (cached.alpha, cached.rhythm, spikes)  # older: no rates for drops
    older = RateDetector.__new__(RateDetector)
    older.__setstate__((None, pickle.loads(pickle.dumps(state))))
    assert older._rates is None
    state["_rates"] = None
    fresh = RateDetector.__new__(RateDetector)
    fresh.__setstate__((None, pickle.loads(pickle.dumps(state))))
    assert older.rates(now) == fresh.rates(now) and isinstance(older._rates, _Rates)
    assert older.rates(now, drops=True) == fresh.rates(now, drops=True)


def test_one_call_at_this_hour_yesterday_is_no_rhythm_for_a_user_waking_today() -> None:
    """A quiet user whose days are kept (they were busy once) woke at 17:37 after a silence,
    and their reference became yesterday's busiest 5 minutes about then: a single call, a
    rate of 0.2 a minute on a shape of 1. Their session at 17:37 was learned as normal
    against it, and a session half an hour later paged at 161x (synthetic world, seed 11,
    a clean day: session 22's new false page). A previous day's 5 minutes are a reference
    only when they hold ``volume_min_count`` calls."""
    user = RateDetector("user:sessions", SETTINGS, "user")
    feed(user, [86400 + 600 + 10 * i for i in range(12)])  # 12 calls in 2 minutes: busy once
    assert user.season is not None  # their days are kept from then on
    feed(user, [86400 + 7200 + 20 * i for i in range(4)])  # a session at 02:00
    yesterday = 86400 + 17 * 3600 + 37 * 60
    feed(user, [yesterday])  # one call at 17:37
    today = yesterday + 86400
    feed(user, [today])  # the first call after a night's silence: waking
    now = at(today).timestamp()
    assert user.waking(now)
    assert user.seasonal_high(now) == (1 / 300, 1.0)
    assert all(rate < 1 / 600 for rate, _ in user.rates(now)), user.rates(now)


def test_a_scope_from_a_checkpoint_before_unseen_mornings_restores_and_wakes() -> None:
    """A checkpoint written before ``wake_high`` (session 28): restored without it, the
    feature has none, and its first call after a night it never saw the morning of is
    judged against the busiest 5 minutes of its day before (2 calls a minute), not 0."""
    feature = RateDetector("feature:old", SETTINGS, "feature")
    feed(feature, [14 * 3600 + 30 * i for i in range(360)])  # 14:00 to 17:00, 2 a minute
    state = {name: getattr(feature, name) for name in RateDetector.__slots__}
    del state["wake_high"]
    restored = RateDetector.__new__(RateDetector)
    restored.__setstate__((None, state))
    assert restored.wake_high is None
    morning = 86400 + 9 * 3600
    feed(restored, [morning])
    assert restored.wake_high is not None and restored.wake_high[0] * 60 >= 2.0
    assert all(rate * 60 >= 2.0 for rate, _ in restored.rates(morning)), restored.rates(morning)


def test_a_user_from_a_checkpoint_before_sessions_restores_whole_and_learns_its_waiting_calls() -> (
    None
):
    """A checkpoint written before sessions were counted: the user has no session fields,
    its waiting calls hold only their spreads, and the feature's peer prior has no pooled
    session share. Restored, they are brought up to date at once (not where each is
    read): the waiting calls learn with no session start, and calls go on being judged."""
    import pickle

    rng = random.Random(41)
    user = RateDetector("user:old", SETTINGS, "user")
    feed(user, poisson_times(rng, 0, 1800, 2))
    assert user.waiting, "calls of the last volume_burst_seconds wait before they teach"
    old = {
        name: getattr(user, name)
        for name in RateDetector.__slots__
        if name not in ("session_starts", "session_share", "sessions_span")
    }
    old["waiting"] = deque((at_, values[0]) for at_, values in user.waiting)
    restored = RateDetector.__new__(RateDetector)
    restored.__setstate__((None, old))
    assert all(len(values) == 3 for _, values in restored.waiting), restored.waiting
    assert restored.session_share.weight == 0.0 and not restored.session_starts
    # A checkpoint from after sessions but before each spread kept what it measured
    session_era = dict(old, waiting=deque((a, v[:2]) for a, v in user.waiting))
    session_era.update(session_starts=deque(), session_share=user.session_share, sessions_span=0.0)
    upgraded = RateDetector.__new__(RateDetector)
    upgraded.__setstate__((None, session_era))
    assert [v for _, v in upgraded.waiting] == [v for _, v in user.waiting]

    prior = PeerPrior(alpha=2.0, beta=200.0, users=5)
    prior_state = {k: v for k, v in prior.__dict__.items() if k != "sessions"}
    old_prior = PeerPrior.__new__(PeerPrior)
    old_prior.__setstate__(prior_state)
    assert old_prior.sessions.weight == 0.0

    waited = len(restored.waiting)
    later = poisson_times(rng, 1800, 3600, 2)
    for t in later:
        restored.observe(at(t), rhythm=1.0, prior=old_prior)
    assert restored.session_share.weight >= waited  # the waiting calls learned, as no starts
    assert pickle.loads(pickle.dumps(restored)).session_share.weight == pytest.approx(
        restored.session_share.weight
    )


def test_a_window_with_few_squared_errors_leans_on_its_neighbour_excess_not_on_poisson() -> None:
    """A session caller near 2.5 calls a minute has samples of both kinds for their
    2-minute window (squared errors while it expected 5 calls or more, the calls just
    before each call otherwise). A handful of squared errors taken in quiet moments must
    not make the window Poisson while its neighbours say sessions (session 24: such a
    user's 2-minute window at variance/mean 1.0 paged their next session)."""
    settings = DetectorSettings()
    user = RateDetector("user:sessions", settings, "user")
    user.burst[1].add(2.5, 0.0, 86400.0, weight=200.0)  # variance/mean 6 from neighbours
    user.pearson[1].add(0.4, 0.0, 86400.0, weight=2.0)  # two squared errors, both small
    neighbours = user.dispersion(1, 2.0, None)  # under 5 expected: theirs, with no peers
    assert neighbours > 5.0
    assert user.dispersion(1, 5.1, None) == pytest.approx((0.8 + 5 * neighbours) / 7)
    user.pearson[1].add(6.5, 1.0, 86400.0, weight=500.0)  # many squared errors: theirs
    assert user.dispersion(1, 5.1, None) == pytest.approx(6.5, rel=0.02)
