"""A busy scope's over-dispersion is what its counts vary by, not what they vary by at the
moments its counts are high.

The squared errors that teach a busy scope's variance/mean ratio are sampled once per
5-second slot; a call that looks unusual is always passed on (it may open a stretch that
is not learned), but a second squared error from the same slot would weigh the moments
when the count is high (a session of several calls in a slot) several times over, and
inflate the ratio that every later test divides its evidence by (probe E of issue 12:
the bench's synthetic summarize feature learned a 1-minute ratio of 3.06 where its counts
vary by 2.02 against the world's true rate).
"""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest

from agents.anomaly.rates import RateDetector
from app.anomaly_config import DetectorSettings

T0 = datetime(2024, 5, 1, tzinfo=UTC)
SIZES = range(1, 8)  # calls per session, equally likely
# Sessions arrive as a Poisson process, so a window's count (every session well inside it)
# has variance/mean E[S^2] / E[S] = 5.0 for sizes 1 to 7.
TRUE_DISPERSION = sum(k * k for k in SIZES) / sum(SIZES)


def session_calls(seed: int, hours: float, sessions_per_minute: float) -> list[float]:
    rng = random.Random(seed)
    t, times = 0.0, []
    while t < hours * 3600:
        t += rng.expovariate(sessions_per_minute / 60)
        times += [t + 0.4 * k for k in range(rng.choice(SIZES))]  # a session within a slot or two
    return sorted(times)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_busy_scopes_dispersion_is_not_inflated_by_sessions_packed_in_a_slot(seed: int) -> None:
    detector = RateDetector("feature:chat", DetectorSettings(), "feature")
    for t in session_calls(seed, 8, 5.0):  # 20 calls a minute: squared errors, every window
        detector.observe(T0 + timedelta(seconds=t))
    assert detector.mu[0] >= 5.0
    measured = detector.dispersion(0, detector.mu[0], None)
    assert measured == pytest.approx(TRUE_DISPERSION, rel=0.25)
