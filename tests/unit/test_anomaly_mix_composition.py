"""The global economy share is a mixture of the features' shares.

A product whose features each keep their tier mix, but whose busy feature of the morning
is not that of the afternoon, moves the global share by tens of points every day without
any routing changing. Session 25's tester (probe H) saw `tier_mix global` page such dips
3 times in 3 days for 300 users: calls come in sessions, so the feature behind a stretch
of 30 calls is one feature. The global share is now judged call by call against the share
of the call's own feature, so only a drop *within* features adds evidence.
"""

from __future__ import annotations

import math
import random
from datetime import timedelta
from typing import Any

from agents.anomaly.engine import AnomalyEngine
from agents.anomaly.mix import TierMixDetector
from app.anomaly_config import DetectorSettings
from tests.anomaly_traffic import T0, Caller, Feature, World, merged, pages, run

CHAT = Feature("chat", economy_share=0.92, sigma=0.5)
CODE = Feature("code", economy_share=0.25, sigma=0.5)
DAYS = 3


def _morning(ts: Any) -> float:
    hour = ts.hour + ts.minute / 60
    return 0.05 + 0.95 * max(0.0, math.cos(2 * math.pi * (hour - 9) / 24)) ** 4


def _afternoon(ts: Any) -> float:
    hour = ts.hour + ts.minute / 60
    return 0.05 + 0.95 * max(0.0, math.cos(2 * math.pi * (hour - 16) / 24)) ** 4


def _sessions(world: World, caller: Caller, rhythm: Any, salt: int) -> list[dict[str, Any]]:
    """Sessions of 4 to 12 calls 10 to 20 s apart, starting at the caller's rate / 8."""
    rng = random.Random(salt)
    out = []
    ts = T0
    end = T0 + timedelta(days=DAYS)
    rate = caller.per_minute / 8 / 60
    while True:
        ts += timedelta(seconds=rng.expovariate(rate))
        if ts >= end:
            return out
        if rng.random() >= rhythm(ts):
            continue
        at = ts
        for _ in range(rng.randint(4, 12)):
            out.append(world.call(rng, at, caller))
            at += timedelta(seconds=rng.uniform(10, 20))


def _product() -> list[dict[str, Any]]:
    world = World(1)
    streams = []
    for i in range(30):
        streams.append(_sessions(world, Caller(f"chat-{i:02d}", CHAT, 1.0), _afternoon, i))
        streams.append(_sessions(world, Caller(f"code-{i:02d}", CODE, 1.0), _morning, 100 + i))
    return merged(*streams)


def test_the_global_share_follows_the_features_it_is_made_of() -> None:
    alerts = run(AnomalyEngine(DetectorSettings()), _product())
    mix = [a for a in pages(alerts) if a["kind"] == "tier_mix"]
    assert not mix, [f"{a['_at']:%d %H:%M} {a['scope']} {a['message'][:90]}" for a in mix]


def test_a_drop_within_features_still_pages_the_global_share() -> None:
    """Every call's own feature at its usual share, then all of them lower: evidence."""
    s = DetectorSettings()
    detector = TierMixDetector("global", s)
    rng = random.Random(3)
    fired = None
    for i in range(6000):
        ts = T0 + timedelta(seconds=2 * i)
        share = 0.92 if i % 2 else 0.25
        if i >= 5000:
            share -= 0.4 if i % 2 else 0.2
        verdict = detector.observe(ts, rng.random() < share, expected=0.92 if i % 2 else 0.25)
        if verdict is not None and verdict.is_anomaly and fired is None:
            fired = i
    assert fired is not None and 5000 <= fired < 5200, fired


def test_without_features_the_share_is_judged_as_before() -> None:
    s = DetectorSettings()
    a, b = TierMixDetector("global", s), TierMixDetector("global", s)
    rng = random.Random(5)
    for i in range(3000):
        ts = T0 + timedelta(seconds=3 * i)
        economy = rng.random() < (0.8 if i < 2500 else 0.3)
        va, vb = a.observe(ts, economy), b.observe(ts, economy, expected=None)
        assert (va is None) == (vb is None)
        if va is not None and vb is not None:
            assert (va.is_anomaly, va.observed) == (vb.is_anomaly, vb.observed)
