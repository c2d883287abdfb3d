"""A feature that never falls silent and ramps up every morning: its second morning is
judged against the first, not against the night.

Probe 57's D9 (seed 3): `feature:chat` has calls all night (about one a minute, never a
half-hour silence), ramps from 06:00 to 08:00 to ten times that, and stays there. Its
own half-hour reference follows a rise only slowly (a window leaving while elevated
teaches at most ``volume_min_ratio`` times its expectation), so the first morning alarms,
and a stretch in alarm was kept as unknown in the previous days: the second morning had
nothing to be judged against but the night ("9.8/min, expected 0.4, 25.0x", five pages
on a day without incidents). The same-time rule judged previous days only in the hour
after a silence, which this scope never had.
"""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

from agents.anomaly.rates import RateDetector
from app.anomaly_config import DetectorSettings

T0 = datetime(2026, 3, 2, tzinfo=UTC)  # a Monday


def _per_minute(hour: float) -> float:
    """Night 1 a minute, 06:00-08:00 ramp to 10, day 10, 18:00-20:00 back to 1."""
    if hour < 6:
        return 1.0
    if hour < 8:
        return 1.0 + (hour - 6) / 2 * 9.0
    if hour < 18:
        return 10.0
    if hour < 20:
        return 10.0 - (hour - 18) / 2 * 9.0
    return 1.0


def _alarms(
    days: int, seed: int, surge: tuple[float, float, float] | None = None
) -> list[tuple[datetime, float, float]]:
    """Anomalous verdicts (time, expected, observed per minute) of a feature fed Poisson
    calls of the rhythm for ``days`` days; ``surge``: (start, end) in seconds from T0 and
    the factor the rate is multiplied by in between."""
    rng = random.Random(seed)
    detector = RateDetector("feature:chat", DetectorSettings(), "feature")
    t, out = 0.0, []
    while t < days * 86400.0:
        rate = _per_minute((t % 86400.0) / 3600.0) / 60.0
        if surge is not None and surge[0] <= t < surge[1]:
            rate *= surge[2]
        t += rng.expovariate(rate)
        ts = T0 + timedelta(seconds=t)
        verdict = detector.observe(ts)
        if verdict is not None and verdict.is_anomaly:
            out.append((ts, verdict.expected, verdict.observed))
    return out


def test_the_second_morning_of_a_feature_that_never_sleeps_is_judged_against_the_first() -> None:
    second_day = T0 + timedelta(days=1)
    for seed in (1, 2):
        alarms = [a for a in _alarms(2, seed) if a[0] >= second_day]
        assert alarms == [], (
            seed,
            [(f"{ts:%H:%M:%S}", round(e, 1), round(o, 1)) for ts, e, o in alarms[:5]],
        )


def test_a_surge_on_the_second_morning_still_alarms() -> None:
    # three times the usual rate from 09:00 on the second day, for 20 minutes
    start = 86400.0 + 9 * 3600.0
    alarms = _alarms(2, 1, (start, start + 1200.0, 3.0))
    first = [ts for ts, _, _ in alarms if ts >= T0 + timedelta(seconds=start)]
    assert first, "the surge was not seen"
    assert (first[0] - (T0 + timedelta(seconds=start))).total_seconds() < 300
