"""The statistics behind issue 12's drift goal (bench/drift_floor.py): at probe 57's `chat`
(9 calls a minute, log-cost spread 0.8) no test with the detector's false-alarm budget
(1e7 calls) can page a 1x -> 5x / 3 h drift within 2 minutes of +50 % in most runs; at 20
calls a minute the best case can."""

from __future__ import annotations

import pytest

from bench.drift_floor import PLUS_50_S, cusum_floor, fixed_calls


def test_the_plus_50_crossing_of_a_linear_1x_to_5x_drift_over_3_hours() -> None:
    assert PLUS_50_S == 1350.0


def test_a_fixed_test_of_plus_50_needs_far_more_than_two_minutes_of_calls_at_9_a_minute() -> None:
    # 18 calls in 2 minutes; a z test at alpha 1e-7 and half power needs about 105
    assert fixed_calls(0.8, 1e-7, 0.5) == pytest.approx(105.0, abs=1.0)
    assert fixed_calls(0.8, 1e-7, 0.5) > 5 * 18


def test_the_best_case_cusum_misses_two_minutes_at_9_a_minute_and_meets_it_at_20() -> None:
    _, median, p90 = cusum_floor(9.0, 0.8, 1e7, seeds=20)
    assert median > 120
    assert p90 > median
    _, median, _ = cusum_floor(20.0, 0.8, 1e7, seeds=20)
    assert median < 120
