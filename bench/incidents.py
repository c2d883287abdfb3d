"""Labelled incidents on traffic the detectors were not tuned to: worlds, incidents, injection.

Two kinds of world give the ordinary traffic:

- :class:`SyntheticWorld`, this module's own: users whose rates span 1 per hour to tens
  per minute (log-normal), some calling in sessions (bursts of several calls seconds
  apart), some steadily (services); features of different sizes, token spreads
  (log-normal sigma 0.4 to 1.3) and economy shares; a daily rhythm whose peak hour,
  depth (peak/trough 2x to 5x) and per-user phase (time zones) are drawn per world.
- :class:`AzureWorld`: the Azure LLM inference trace (``data/``, one real hour) played
  back to back with a daily rhythm and a seeded Zipf attribution (``devtools.trace``).

:func:`plan` draws labelled incidents that are *not* one family: kinds (runaway loop,
viral ramp, prompt-injection cost shift, gradual cost drift, routing regression,
periodic bursts), shapes (step, ramp, gradual drift, periodic), magnitudes (2x to
300x; a share of the calls or all of them), scopes (quiet users at about 1 per hour,
users at about 1 per minute, busy users, small and big features) and times of day.
:func:`inject` adds or rewrites the records of a day accordingly. Each incident says
when it becomes detectable in principle (``truth``): its start, or for a gradual drift
the moment its excess crosses the stated amount (+75 %: see docs/ANOMALY.md).

Nothing here knows about the detectors: it only makes records.
"""

from __future__ import annotations

import bisect
import heapq
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from app.pricing.catalog import PriceCatalog
from devtools.trace import Attribution, TraceCall, read_azure_csv

START = datetime(2024, 3, 4, tzinfo=UTC)  # a Monday
DAY = timedelta(days=1)
DRIFT_STATED_EXCESS = 0.75  # a linear cost drift is paged once its excess is about +75 %
DRIFT_STATED_SHARE_DROP = 0.2  # a gradual routing drift once the share is 0.2 lower

MODELS = {"economy": "gpt-4o-mini", "standard": "gpt-4o", "premium": "gpt-4-turbo"}


@dataclass(frozen=True)
class FeatureSpec:
    name: str
    prompt_median: float
    completion_median: float
    sigma: float  # log-normal spread of token counts
    economy_share: float


@dataclass(frozen=True)
class UserSpec:
    user: str
    per_minute: float  # mean rate at rhythm 1
    home: str  # main feature
    other: str  # occasional feature (20 % of calls)
    session: float  # mean calls per session (1 = steady Poisson)
    phase_hours: float  # shift of this user's daily rhythm


class Pricing:
    """Costs of (model, prompt, completion), cached."""

    def __init__(self) -> None:
        self.catalog = PriceCatalog("gpt-4")
        self.cache: dict[tuple[str, int, int], tuple[int, str | None]] = {}

    def __call__(self, model: str, prompt: int, completion: int) -> tuple[int, str | None]:
        key = (model, prompt, completion)
        known = self.cache.get(key)
        if known is None:
            cost = self.catalog.cost(model, prompt, completion)
            known = self.cache[key] = (cost.cost_usd_nanos, cost.tier)
            if len(self.cache) > 400_000:
                self.cache.clear()
        return known


def usage(
    pricing: Pricing,
    ts: datetime,
    user: str,
    feature: str,
    model: str,
    prompt: int,
    completion: int,
) -> dict[str, Any]:
    cost, tier = pricing(model, prompt, completion)
    return {
        "ts": ts,
        "user_id": user,
        "feature": feature,
        "model_served": model,
        "tier": tier,
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "cost_usd_nanos": cost,
        "price_unknown": False,
        "cache_hit": False,
    }


class World:
    """Ordinary traffic, day by day, and what an incident needs to know about it."""

    name = "world"
    pricing: Pricing
    users: dict[str, UserSpec]
    features: dict[str, FeatureSpec]

    def day(self, index: int) -> Iterator[dict[str, Any]]:
        raise NotImplementedError

    def rate(self, scope: str, ts: datetime) -> float:
        """Expected calls per minute of ``user:x`` or ``feature:x`` at ``ts``."""
        raise NotImplementedError

    def call(
        self,
        rng: random.Random,
        ts: datetime,
        user: str,
        feature: str,
        token_factor: float = 1.0,
        economy_share: float | None = None,
    ) -> dict[str, Any]:
        spec = self.features[feature]
        share = spec.economy_share if economy_share is None else economy_share
        draw = rng.random()
        model = (
            MODELS["economy"]
            if draw < share
            else MODELS["premium"]
            if draw < share + 0.05
            else MODELS["standard"]
        )
        prompt = max(1, int(spec.prompt_median * rng.lognormvariate(0, spec.sigma) * token_factor))
        completion = max(
            1, int(spec.completion_median * rng.lognormvariate(0, spec.sigma) * token_factor)
        )
        return usage(self.pricing, ts, user, feature, model, min(prompt, 400_000), completion)


def rhythm(ts: datetime, peak_hour: float, low: float, phase: float = 0.0) -> float:
    hour = ts.hour + ts.minute / 60 + ts.second / 3600 - phase
    return low + (1 - low) * (1 + math.cos(2 * math.pi * (hour - peak_hour) / 24)) / 2


class SyntheticWorld(World):
    """Users, features, sessions and a daily rhythm drawn from ``seed``."""

    name = "synthetic"

    def __init__(self, seed: int, users: int = 300, features: int = 6) -> None:
        rng = random.Random(seed)
        self.seed = seed
        self.pricing = Pricing()
        self.peak_hour = rng.uniform(11, 18)
        self.low = rng.uniform(0.2, 0.5)
        names = ["chat", "search", "summarize", "code-assist", "support-bot", "extract", "agent"]
        self.features = {}
        weights = []
        for i in range(features):
            name = names[i]
            self.features[name] = FeatureSpec(
                name,
                prompt_median=rng.choice([300, 800, 1500, 3000]),
                completion_median=rng.choice([80, 150, 400]),
                sigma=rng.uniform(0.4, 1.3),
                economy_share=rng.uniform(0.5, 0.9),
            )
            weights.append(rng.uniform(0.3, 3.0))
        feature_names = list(self.features)
        self.users = {}
        for i in range(users):
            per_minute = math.exp(rng.gauss(math.log(0.1), 1.6))  # median 6/hour
            per_minute = min(max(per_minute, 1 / 120), 40.0)
            home = rng.choices(feature_names, weights=weights)[0]
            other = rng.choice(feature_names)
            session = 1.0 if rng.random() < 0.3 else rng.uniform(2, 8)
            self.users[f"u{i:04d}"] = UserSpec(
                f"u{i:04d}", per_minute, home, other, session, rng.gauss(0, 1.5)
            )

    def user_rate(self, spec: UserSpec, ts: datetime) -> float:
        return spec.per_minute * rhythm(ts, self.peak_hour, self.low, spec.phase_hours)

    def rate(self, scope: str, ts: datetime) -> float:
        kind, _, name = scope.partition(":")
        if kind == "user":
            return self.user_rate(self.users[name], ts)
        total = 0.0
        for spec in self.users.values():
            share = (0.8 if spec.home == name else 0.0) + (0.2 if spec.other == name else 0.0)
            total += share * self.user_rate(spec, ts)
        return total

    def day(self, index: int) -> Iterator[dict[str, Any]]:
        start = START + index * DAY
        end = start + DAY
        rng = random.Random(self.seed * 1_000_003 + index)
        streams = []
        for spec in self.users.values():
            streams.append(self._user_day(rng, spec, start, end))
        yield from heapq.merge(*streams, key=lambda r: r["ts"])

    def _user_day(
        self, rng: random.Random, spec: UserSpec, start: datetime, end: datetime
    ) -> list[dict[str, Any]]:
        out = []
        peak = spec.per_minute / spec.session / 60.0  # sessions per second at rhythm 1
        t = start
        while True:
            t += timedelta(seconds=rng.expovariate(peak))
            if t >= end:
                break
            if rng.random() >= rhythm(t, self.peak_hour, self.low, spec.phase_hours):
                continue
            calls = 1 if spec.session <= 1 else 1 + int(rng.expovariate(1 / (spec.session - 1)))
            at = t
            for _ in range(calls):
                if at >= end:
                    break
                feature = spec.home if rng.random() < 0.8 else spec.other
                out.append(self.call(rng, at, spec.user, feature))
                at += timedelta(seconds=rng.expovariate(1 / 15))
        out.sort(key=lambda r: r["ts"])
        return out


class AzureWorld(World):
    """The Azure trace's hour back to back, thinned by a daily rhythm (``bench.anomaly``'s
    original traffic: peak 15:00 UTC, trough 25 %), 200 Zipf users, five features."""

    name = "azure"

    def __init__(self, seed: int, users: int = 200) -> None:
        self.seed = seed
        self.pricing = Pricing()
        self.calls = list(read_azure_csv())
        self.origin = self.calls[0].ts
        self.span = self.calls[-1].ts - self.origin + timedelta(seconds=1)
        self.offsets = [(c.ts - self.origin).total_seconds() for c in self.calls]
        self.rate_per_min = len(self.calls) / self.span.total_seconds() * 60
        probe = Attribution(seed=seed, users=users)
        self.user_ids = probe.user_ids
        cumulative = probe._user_cum
        previous = [0.0, *cumulative[:-1]]
        total = cumulative[-1]
        from devtools.trace import ECONOMY_SHARE, FEATURES

        self.user_share = {
            u: (c - p) / total for u, c, p in zip(self.user_ids, cumulative, previous, strict=True)
        }
        self.feature_share = dict(FEATURES)
        self.users = {
            u: UserSpec(u, self.rate_per_min * s, "", "", 1.0, 0.0)
            for u, s in self.user_share.items()
        }
        self.features = {
            name: FeatureSpec(name, 1020, 129, 0.9, ECONOMY_SHARE) for name in self.feature_share
        }
        self.n_users = users

    def rate(self, scope: str, ts: datetime) -> float:
        kind, _, name = scope.partition(":")
        share = self.user_share[name] if kind == "user" else self.feature_share[name]
        return self.rate_per_min * rhythm(ts, 15.0, 0.25) * share

    def call(
        self,
        rng: random.Random,
        ts: datetime,
        user: str,
        feature: str,
        token_factor: float = 1.0,
        economy_share: float | None = None,
    ) -> dict[str, Any]:
        source = self.calls[rng.randrange(len(self.calls))]
        draw = rng.random()
        share = 0.7 if economy_share is None else economy_share
        model = MODELS["economy"] if draw < share else MODELS["standard"]
        return usage(
            self.pricing,
            ts,
            user,
            feature,
            model,
            max(1, int(source.prompt_tokens * token_factor)),
            max(1, int(source.completion_tokens * token_factor)),
        )

    def day(self, index: int) -> Iterator[dict[str, Any]]:
        day_start = START + index * DAY
        day_end = day_start + DAY
        thin = random.Random(self.seed * 7919 + index)
        attribution = Attribution(seed=self.seed * 1000 + index, users=self.n_users)
        first_copy = int((day_start - START) / self.span)
        copy = first_copy
        while True:
            copy_start = START + copy * self.span
            if copy_start >= day_end:
                return
            for source, offset in zip(self.calls, self.offsets, strict=True):
                ts = copy_start + timedelta(seconds=offset)
                if ts < day_start:
                    continue
                if ts >= day_end:
                    break
                if thin.random() >= rhythm(ts, 15.0, 0.25):
                    continue
                call = attribution.assign(
                    TraceCall(ts, source.prompt_tokens, source.completion_tokens)
                )
                assert call.model is not None and call.user_id and call.feature
                cost, tier = self.pricing(call.model, call.prompt_tokens, call.completion_tokens)
                yield {
                    "ts": ts,
                    "user_id": call.user_id,
                    "feature": call.feature,
                    "model_served": call.model,
                    "tier": tier,
                    "prompt_tokens": call.prompt_tokens,
                    "completion_tokens": call.completion_tokens,
                    "cost_usd_nanos": cost,
                    "price_unknown": False,
                    "cache_hit": bool(call.cache_hit),
                }
            copy += 1


# -- incidents ----------------------------------------------------------------------------

KINDS = (
    "runaway_loop",
    "periodic_bursts",
    "viral_ramp",
    "cost_shift",
    "cost_drift",
    "routing_regression",
)
EXPECTED_KIND = {
    "runaway_loop": "volume_spike",
    "periodic_bursts": "volume_spike",
    "viral_ramp": "volume_spike",
    "cost_shift": "cost_per_request",
    "cost_drift": "cost_per_request",
    "routing_regression": "tier_mix",
}


@dataclass(frozen=True)
class Incident:
    kind: str
    shape: str  # step | ramp | drift | periodic
    scope: str
    start: datetime
    minutes: int
    magnitude: float  # rate factor, token factor, or economy share after
    share: float = 1.0  # of the scope's calls affected (cost shift)
    normal_per_minute: float = 0.0
    bucket: str = ""  # the scope's rate class
    detectable_after_minutes: float = 0.0  # a drift: when its excess crosses the stated amount

    @property
    def end(self) -> datetime:
        return self.start + timedelta(minutes=self.minutes)

    @property
    def truth(self) -> datetime:
        """When the incident is detectable in principle: its start, or for a drift the
        moment its excess crosses the stated amount (+75 % cost, 0.2 share points)."""
        return self.start + timedelta(minutes=self.detectable_after_minutes)

    @property
    def label(self) -> str:
        how = (
            f"share {self.magnitude:.0%}"
            if self.kind == "routing_regression"
            else f"{self.magnitude:g}x" + (f" on {self.share:.0%}" if self.share < 1 else "")
        )
        return f"{self.kind} ({self.shape}, {how}) {self.scope}"


def rate_bucket(per_minute: float) -> str:
    if per_minute < 1 / 20:
        return "~1/hour"
    if per_minute < 0.5:
        return "~1/10min"
    if per_minute < 5:
        return "~1/min"
    if per_minute < 50:
        return "~10/min"
    return "~100+/min"


@dataclass
class Batch:
    """Incidents replayed together on one day (far enough apart not to overlap)."""

    day: int
    incidents: list[Incident] = field(default_factory=list)


def plan(world: World, day: int, seed: int, count: int = 8) -> Batch:
    """``count`` incidents on day ``day``, 2.5 to 3 hours apart, kinds and scopes mixed."""
    rng = random.Random(seed)
    base = START + day * DAY
    batch = Batch(day)
    used: set[str] = set()
    slot_hours = 24 / count
    users = sorted(world.users, key=lambda u: world.users[u].per_minute)
    for i in range(count):
        kind = KINDS[(seed + i) % len(KINDS)]
        start = base + timedelta(hours=i * slot_hours + rng.uniform(0.2, slot_hours - 1.4))
        start = start.replace(microsecond=0) + timedelta(seconds=rng.randrange(60))
        if kind in ("runaway_loop", "periodic_bursts") or (kind == "cost_shift" and i % 2):
            # users from every rate class: quiet, ~1/min, busy
            target = rng.choice(("quiet", "middle", "busy"))
            pool = {
                "quiet": users[: len(users) // 5],
                "middle": users[len(users) // 5 : 4 * len(users) // 5],
                "busy": users[-max(3, len(users) // 30) :],
            }[target]
            choices = [u for u in pool if f"user:{u}" not in used] or pool
            scope = f"user:{rng.choice(choices)}"
        else:
            names = [f for f in world.features if f"feature:{f}" not in used] or list(
                world.features
            )
            scope = f"feature:{rng.choice(names)}"
        used.add(scope)
        normal = world.rate(scope, start)
        if kind == "runaway_loop":
            magnitude = rng.choice([2, 5, 20, 100, 300])
            incident = Incident(kind, "step", scope, start, 40, magnitude)
        elif kind == "periodic_bursts":
            magnitude = rng.choice([20, 100, 300])
            incident = Incident(kind, "periodic", scope, start, 60, magnitude)
        elif kind == "viral_ramp":
            magnitude = rng.choice([3, 5, 10])
            incident = Incident(kind, "ramp", scope, start, 30, magnitude)
        elif kind == "cost_shift":
            magnitude = rng.choice([2, 4, 8, 20])
            incident = Incident(kind, "step", scope, start, 30, magnitude, rng.choice([0.5, 1.0]))
        elif kind == "cost_drift":
            incident = Incident(kind, "drift", scope, start, 180, 5.0)
        else:
            before = world.features[scope.partition(":")[2]].economy_share
            after = round(max(0.02, before - rng.choice([0.25, 0.4, 0.6])), 2)
            shape = rng.choice(["step", "step", "drift"])
            incident = Incident(kind, shape, scope, start, 30 if shape == "step" else 60, after)
        after = 0.0
        if incident.kind == "cost_drift":
            after = incident.minutes * DRIFT_STATED_EXCESS / (incident.magnitude - 1.0)
        elif incident.kind == "routing_regression" and incident.shape == "drift":
            before = world.features[scope.partition(":")[2]].economy_share
            drop = max(before - incident.magnitude, 1e-9)
            after = incident.minutes / 2 * min(1.0, DRIFT_STATED_SHARE_DROP / drop)
        batch.incidents.append(
            replace(
                incident,
                normal_per_minute=round(normal, 4),
                bucket=rate_bucket(normal),
                detectable_after_minutes=round(after, 2),
            )
        )
    return batch


def _poisson(
    rng: random.Random, start: datetime, end: datetime, rate_at: Any
) -> Iterator[datetime]:
    peak = max(rate_at(start + (end - start) * i / 60) for i in range(61)) * 1.05
    if peak <= 0:
        return
    ts = start
    while True:
        ts += timedelta(seconds=rng.expovariate(peak))
        if ts >= end:
            return
        if rng.random() < rate_at(ts) / peak:
            yield ts


def _extra_calls(world: World, incident: Incident, rng: random.Random) -> list[dict[str, Any]]:
    """The calls a volume incident adds (a loop: one feature; a ramp: the usual users)."""
    kind, _, name = incident.scope.partition(":")
    normal_per_s = lambda ts: world.rate(incident.scope, ts) / 60  # noqa: E731
    m = incident.magnitude
    if incident.kind == "runaway_loop":
        rate_at = lambda ts: (m - 1) * normal_per_s(ts)  # noqa: E731
    elif incident.kind == "periodic_bursts":
        # m x the normal rate for 2 minutes in every 10.
        def rate_at(ts: datetime) -> float:
            minute = (ts - incident.start).total_seconds() / 60
            return (m - 1) * normal_per_s(ts) if minute % 10 < 2 else 0.0
    else:  # viral ramp: up to m x over the first 10 minutes

        def rate_at(ts: datetime) -> float:
            minutes = (ts - incident.start).total_seconds() / 60
            return (m - 1) * min(max(minutes, 0) / 10, 1) * normal_per_s(ts)

    calls = []
    if kind == "user":
        spec = world.users[name]
        feature = spec.home or rng.choice(list(world.features))
        for ts in _poisson(rng, incident.start, incident.end, rate_at):
            calls.append(world.call(rng, ts, name, feature))
    else:
        users = [u for u, s in world.users.items() if s.home == name] or list(world.users)
        weights = [world.users[u].per_minute for u in users]
        cumulative = list(_accumulate(weights))
        for ts in _poisson(rng, incident.start, incident.end, rate_at):
            user = users[bisect.bisect_right(cumulative, rng.random() * cumulative[-1])]
            calls.append(world.call(rng, ts, user, name))
    return calls


def _accumulate(values: list[float]) -> Iterator[float]:
    total = 0.0
    for value in values:
        total += value
        yield total


def inject(world: World, batch: Batch, seed: int) -> Iterator[dict[str, Any]]:
    """Day ``batch.day`` of ``world`` with the batch's incidents, in event-time order."""
    rng = random.Random(seed)
    extra = []
    modifiers = []
    for incident in batch.incidents:
        if incident.kind in ("runaway_loop", "periodic_bursts", "viral_ramp"):
            extra.append(_extra_calls(world, incident, rng))
        else:
            modifiers.append(incident)

    def matches(record: dict[str, Any], incident: Incident) -> bool:
        kind, _, name = incident.scope.partition(":")
        value = record["user_id"] if kind == "user" else record["feature"]
        return value == name and incident.start <= record["ts"] < incident.end

    def modified(records: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for record in records:
            for incident in modifiers:
                if not matches(record, incident):
                    continue
                progress = (record["ts"] - incident.start) / (incident.end - incident.start)
                if incident.kind == "cost_shift":
                    if rng.random() < incident.share:
                        record = _rescaled(world, record, incident.magnitude)
                elif incident.kind == "cost_drift":
                    record = _rescaled(world, record, 1 + (incident.magnitude - 1) * progress)
                else:  # routing regression: the economy share falls (at once, or linearly)
                    spec = world.features[record["feature"]]
                    share = incident.magnitude
                    if incident.shape == "drift":
                        share = spec.economy_share + (incident.magnitude - spec.economy_share) * (
                            min(1.0, progress * 2)
                        )
                    record = world.call(
                        rng,
                        record["ts"],
                        record["user_id"],
                        record["feature"],
                        economy_share=share,
                    )
            yield record

    yield from heapq.merge(modified(world.day(batch.day)), *extra, key=lambda r: r["ts"])


def _rescaled(world: World, record: dict[str, Any], factor: float) -> dict[str, Any]:
    prompt = max(1, int(record["prompt_tokens"] * factor))
    completion = max(1, int(record["completion_tokens"] * factor))
    cost, tier = world.pricing(record["model_served"], prompt, completion)
    return {
        **record,
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "cost_usd_nanos": cost,
        "tier": tier,
    }


__all__ = [
    "EXPECTED_KIND",
    "KINDS",
    "AzureWorld",
    "Batch",
    "Incident",
    "SyntheticWorld",
    "World",
    "inject",
    "plan",
]
