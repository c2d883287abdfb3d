"""Small seeded usage streams for anomaly tests: users, features, a daily rhythm, incidents.

Not a benchmark (``bench/incidents.py`` is): just enough realism for a unit test to
say "this incident is caught" or "this ordinary day is quiet" in a few seconds. Costs
use fixed per-token prices (no price catalog), and every record carries its tier.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

T0 = datetime(2024, 5, 6, tzinfo=UTC)  # a Monday, 00:00 UTC

# nano-dollars per token (input, output), roughly gpt-4o-mini and gpt-4o list prices
PRICES = {"gpt-4o-mini": (150, 600), "gpt-4o": (2_500, 10_000)}
TIER = {"gpt-4o-mini": "economy", "gpt-4o": "standard"}


def flat(_: datetime) -> float:
    return 1.0


def daily_rhythm(peak_hour: float = 15.0, low: float = 0.25) -> Callable[[datetime], float]:
    """Multiplier of the mean rate by time of day: 1 at ``peak_hour``, ``low`` 12 h away."""

    def rhythm(ts: datetime) -> float:
        hour = ts.hour + ts.minute / 60 + ts.second / 3600
        return low + (1 - low) * (1 + math.cos(2 * math.pi * (hour - peak_hour) / 24)) / 2

    return rhythm


@dataclass
class Feature:
    name: str
    economy_share: float = 0.7
    prompt_median: float = 1000.0
    completion_median: float = 150.0
    sigma: float = 0.7  # log-normal spread of token counts


@dataclass
class Caller:
    user: str
    feature: Feature
    per_minute: float  # mean rate at rhythm 1


def cost(model: str, prompt: int, completion: int) -> int:
    price_in, price_out = PRICES[model]
    return prompt * price_in + completion * price_out


def record(
    ts: datetime,
    user: str,
    feature: str,
    model: str,
    prompt: int,
    completion: int,
) -> dict[str, Any]:
    return {
        "ts": ts,
        "user_id": user,
        "feature": feature,
        "model_served": model,
        "tier": TIER[model],
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "cost_usd_nanos": cost(model, prompt, completion),
        "price_unknown": False,
        "cache_hit": False,
    }


def arrivals(
    rng: random.Random,
    start: datetime,
    end: datetime,
    per_minute: float,
    rhythm: Callable[[datetime], float] = flat,
    peak: float = 1.0,
) -> Iterator[datetime]:
    """Poisson arrival times with rate ``per_minute * rhythm(t)`` (thinning; rhythm <= peak)."""
    if per_minute <= 0:
        return
    rate_s = per_minute * peak / 60.0
    ts = start
    while True:
        ts += timedelta(seconds=rng.expovariate(rate_s))
        if ts >= end:
            return
        if rng.random() * peak < rhythm(ts):
            yield ts


@dataclass
class World:
    """Callers (user, feature, rate) and how their calls look."""

    seed: int
    callers: list[Caller] = field(default_factory=list)
    rhythm: Callable[[datetime], float] = flat

    def call(
        self,
        rng: random.Random,
        ts: datetime,
        caller: Caller,
        token_factor: float = 1.0,
        economy_share: float | None = None,
    ) -> dict[str, Any]:
        f = caller.feature
        share = f.economy_share if economy_share is None else economy_share
        model = "gpt-4o-mini" if rng.random() < share else "gpt-4o"
        prompt = max(1, int(f.prompt_median * rng.lognormvariate(0, f.sigma) * token_factor))
        completion = max(
            1, int(f.completion_median * rng.lognormvariate(0, f.sigma) * token_factor)
        )
        return record(ts, caller.user, f.name, model, prompt, completion)

    def session(
        self, rng: random.Random, begin: datetime, caller: Caller, mean: float
    ) -> list[dict[str, Any]]:
        """One session of ``caller`` from ``begin``: ``1 + Exp(mean - 1)`` calls (one when
        ``mean`` is at most 1) about 15 s apart, as the synthetic users' sessions."""
        n = 1 if mean <= 1 else 1 + int(rng.expovariate(1 / (mean - 1)))
        calls, ts = [], begin
        for _ in range(n):
            calls.append(self.call(rng, ts, caller))
            ts += timedelta(seconds=rng.expovariate(1 / 15))
        return calls

    def traffic(self, start: datetime, end: datetime, salt: int = 0) -> list[dict[str, Any]]:
        """Every caller's calls between ``start`` and ``end``, in time order."""
        rng = random.Random(self.seed * 1_000_003 + salt)
        out: list[dict[str, Any]] = []
        for caller in self.callers:
            for ts in arrivals(rng, start, end, caller.per_minute, self.rhythm):
                out.append(self.call(rng, ts, caller))
        out.sort(key=lambda r: r["ts"])
        return out


def zipf_callers(
    features: list[Feature], users: int, total_per_minute: float, prefix: str = "user"
) -> list[Caller]:
    """``users`` users with Zipf(1.1) rates summing to ``total_per_minute``, each on one feature."""
    weights = [1 / (rank**1.1) for rank in range(1, users + 1)]
    scale = total_per_minute / sum(weights)
    return [
        Caller(f"{prefix}-{rank:03d}", features[(rank - 1) % len(features)], w * scale)
        for rank, w in enumerate(weights, start=1)
    ]


def merged(*streams: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted((r for s in streams for r in s), key=lambda r: r["ts"])


def firing(alerts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [a for a in alerts if a["status"] == "firing"]


def pages(alerts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Firing alerts that page someone (related alerts of an incident ride along instead)."""
    return [a for a in firing(alerts) if a.get("incident_role", "primary") == "primary"]


def run(engine: Any, records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    alerts: list[dict[str, Any]] = []
    for r in records:
        for alert in engine.observe(r):
            alert.setdefault("_at", r["ts"])  # the event time whose processing emitted it
            alerts.append(alert)
    return alerts
