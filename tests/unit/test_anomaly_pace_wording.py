"""Probe 57's live loop: its page said "4.1/min and the money are the pace of the 436 s
since it began" while the loop had begun 687 s before. The pace is counted from the first
call that looked unusual (the start of the unusual stretch, ``RateDetector.episode``), and a
quiet user's loop looks unusual only after minutes of calls; the message now says what the
figure is counted from. (What the pace and money are is unchanged.)"""

from __future__ import annotations

import random
from datetime import timedelta

from agents.anomaly.rates import RateDetector
from app.anomaly_config import DetectorSettings
from tests.anomaly_traffic import T0


def test_a_loops_pace_is_not_said_to_be_since_it_began_when_it_began_before() -> None:
    rng = random.Random(1)
    detector = RateDetector("user:q", DetectorSettings(), "user")
    t = T0
    for _ in range(60):  # a quiet user: sessions of 3 calls every 20 to 60 minutes
        t += timedelta(minutes=rng.uniform(20, 60))
        for k in range(3):
            detector.observe(t + timedelta(seconds=20 * k), cost_nanos=1e6)
    start = t + timedelta(hours=1)
    for i in range(60):  # then a loop: a call every 12 s
        verdict = detector.observe(start + timedelta(seconds=12 * i), cost_nanos=1e6)
        if verdict is not None and verdict.is_anomaly:
            break
    else:
        raise AssertionError("the loop was not found")
    # Before: "5/min and the money are the pace of the 135 s since it began", 228 s into it.
    assert 12 * i > 150 and "since it began" not in verdict.note, verdict.note
    assert "the pace of the 135 s since its calls looked unusual" in verdict.note, verdict.note
