"""A feature's expectation follows a surge of everyone, not the rest's own count noise.

A user's or feature's expected count is scaled by how far the rest of the traffic (global
minus that scope) is above its expectation over the last minute: when everyone surges
together, no feature is a spike. But the rest's count is above its expectation half the
time with no surge at all, so its point ratio (floored at 1) lifted a ramping feature's
expectation by 10-30 % and delayed its page (probe E: a 10x ramp of the Azure world's
code-assist, 192 s with the scale held at 1, 204 s with it). Only a surge of the rest
that is real given its own count noise may lift a feature's expectation
(``volume_context_noise_sigmas``; probe G)."""

from __future__ import annotations

import random
from datetime import datetime, timedelta
from typing import Any

import pytest

from agents.anomaly.engine import AnomalyEngine
from agents.anomaly.rates import RateDetector
from app.anomaly_config import DetectorSettings
from tests.anomaly_traffic import T0, Caller, Feature, World, arrivals, merged, pages, run

APPS = [Feature(f"app{i}", economy_share=0.7, sigma=0.6) for i in range(4)]
RAMPING = Feature("ramping", economy_share=0.7, sigma=0.6)
WARM = T0 + timedelta(hours=4)


def steady(seed: int) -> tuple[World, list[Caller]]:
    """40 users of four features (120 calls a minute between them, Poisson) and 10 of
    ``ramping`` (20 a minute)."""
    rest = [Caller(f"u{i:02d}", APPS[i % 4], 3.0) for i in range(40)]
    ramping = [Caller(f"r{i:02d}", RAMPING, 2.0) for i in range(10)]
    return World(seed=seed, callers=[*rest, *ramping]), ramping


def scaled(
    world: World, callers: list[Caller], start: datetime, end: datetime, factor: float, salt: int
) -> list[dict[str, Any]]:
    """``factor - 1`` times the callers' usual calls again, between ``start`` and ``end``."""
    rng = random.Random(world.seed * 7919 + salt)
    return [
        world.call(rng, ts, c)
        for c in callers
        for ts in arrivals(rng, start, end, c.per_minute * (factor - 1))
    ]


def contexts_seen(monkeypatch: pytest.MonkeyPatch, scope: str) -> list[tuple[datetime, float]]:
    """Every (call time, context) the engine hands ``scope``'s rate detector."""
    seen: list[tuple[datetime, float]] = []
    original = RateDetector.observe

    def spy(self: RateDetector, ts: datetime, **kwargs: Any) -> Any:
        if self.scope == scope:
            seen.append((ts, kwargs.get("context", 1.0)))
        return original(self, ts, **kwargs)

    monkeypatch.setattr(RateDetector, "observe", spy)
    return seen


@pytest.mark.parametrize("seed", [1, 2])
def test_a_ramping_feature_is_not_lifted_by_the_rests_own_noise(
    monkeypatch: pytest.MonkeyPatch, seed: int
) -> None:
    """The rest of the traffic stays at its usual Poisson 120 calls a minute (a count that
    varies by +-11) while one feature ramps from 20 to 200 calls a minute over 10 minutes.
    Nothing about everyone surged: the feature's expectation must not be scaled up."""
    world, ramping = steady(seed)
    end = WARM + timedelta(minutes=10)
    ramp: list[dict[str, Any]] = []
    for minute in range(10):
        start = WARM + timedelta(minutes=minute)
        factor = 1 + 9 * (minute + 0.5) / 10  # 1.45x to 9.55x, a minute at a time
        ramp += scaled(world, ramping, start, start + timedelta(minutes=1), factor, minute)
    seen = contexts_seen(monkeypatch, "feature:ramping")
    alerts = run(AnomalyEngine(), merged(world.traffic(T0, end), ramp))

    during = [context for ts, context in seen if ts >= WARM]
    lifted = [round(c, 3) for c in during if c > 1.0]
    assert len(during) > 800
    assert len(lifted) <= 0.02 * len(during), (
        f"{len(lifted)} of {len(during)} calls of the ramp had their expectation scaled "
        f"by the rest's noise, up to {max(lifted):.2f}"
    )
    assert [a["message"] for a in pages(alerts) if a["_at"] < WARM] == []
    assert any(a["scope"] == "feature:ramping" for a in pages(alerts)), "the ramp never paged"


@pytest.mark.parametrize("seed", [3, 4])
def test_a_surge_of_everyone_keeps_features_and_users_quiet(
    monkeypatch: pytest.MonkeyPatch, seed: int
) -> None:
    """Everyone doubles for 10 minutes: that is the global scope's page, not every feature's
    or user's. The rest's excess (120 calls a minute over its 120, for the feature of 20)
    is real, far beyond its own noise, and scales the feature's expectation up by most of
    it."""
    world, _ = steady(seed)
    end = WARM + timedelta(minutes=20)
    surge_end = WARM + timedelta(minutes=10)
    surge = scaled(world, world.callers, WARM, surge_end, 2.0, 99)
    seen = contexts_seen(monkeypatch, "feature:ramping")
    alerts = run(AnomalyEngine(), merged(world.traffic(T0, end), surge))

    late = [c for ts, c in seen if WARM + timedelta(minutes=2) <= ts < surge_end]
    assert sum(late) / len(late) > 1.6, f"mean context {sum(late) / len(late):.2f} in the surge"
    found = pages(alerts)
    assert [a["message"] for a in found if a["scope"] != "global"] == []
    assert any(a["scope"] == "global" and a["_at"] >= WARM for a in found)


def test_the_noise_discount_is_validated() -> None:
    with pytest.raises(ValueError, match="volume_context_noise_sigmas"):
        DetectorSettings.with_options(volume_context_noise_sigmas=-1)
    with pytest.raises(ValueError, match="volume_context_noise_sigmas"):
        DetectorSettings.with_options(volume_context_noise_sigmas=float("nan"))
    assert (
        DetectorSettings.with_options(volume_context_noise_sigmas=0).volume_context_noise_sigmas
        == 0
    )
