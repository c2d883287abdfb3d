"""Anomaly detection on labelled incidents: detection delay, false pages, cost per record.

Worlds (``bench/incidents.py``): a synthetic world of this benchmark's own (users from
1 call per hour to tens per minute, sessions and steady callers, six features with
different token spreads and economy shares, a daily rhythm with a drawn peak, depth and
per-user phase) and the Azure LLM inference trace (``data/``) played back with a daily
rhythm and a seeded Zipf attribution. Per world:

1. **Clean replay** of ``--days`` days, no incident, through ``AnomalyEngine`` in event
   time (no Kafka). Day 1 is warm-up; every page (firing alert with
   ``incident_role=primary``) on the later days is a false page, reported per simulated
   day per 100 active users. The engine's CPU time per record is measured here.
2. **Incident replays**: the engine checkpoint taken at the start of the last day is
   restored and that day is replayed with a batch of labelled incidents (``plan``: 8 a
   day, 3 hours apart, kinds and scopes mixed; each batch its own seed). Per incident:
   the first alert of the expected kind *on the incident's scope* (strict), and the first
   page about it (its scope, or an incident that names it). Delay is measured from the
   incident's ``truth``: its start, or for a gradual drift the moment its excess crosses
   the stated amount (+75 % cost per request; 0.2 share points of economy share).
3. **Detectability table**: single detectors on Poisson traffic of a known rate, a step
   of a known magnitude, median delay over seeds, next to the statistical reason when 2
   minutes are impossible (how many calls the evidence needs vs how many 2 minutes give).

The same records go through a static-threshold baseline (rules an ops team would write
after looking at day 1; unchanged from the first version of this benchmark).

Targets: every incident within 2 minutes of its truth where the statistics allow it,
< 1 false page per day per 100 active users. Run ``python -m bench.anomaly`` (``--quick``
for a smaller run; ``--world synthetic|azure``; ``--json-out FILE``). See bench/README.md.
"""

from __future__ import annotations

import argparse
import ast
import math
import os
import platform
import random
import statistics
import sys
import time
from collections import Counter, deque
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

from agents.anomaly import AlertManager, AnomalyEngine, DetectorSettings, Verdict
from agents.anomaly.costs import CostDetector
from agents.anomaly.mix import TierMixDetector, mix_threshold
from agents.anomaly.rates import RateDetector
from app.alerts_config import AlertTarget
from bench.incidents import (
    DAY,
    EXPECTED_KIND,
    START,
    AzureWorld,
    Incident,
    SyntheticWorld,
    World,
    inject,
    plan,
)

TARGET_DELAY_S = 120.0
WARM_S = 8 * 3600.0  # history a detectability probe learns before its step
TARGET_FALSE_PER_DAY_PER_100 = 1.0
# A target that pages only critical alerts (warnings to a channel, critical to the pager)
CRITICAL_ONLY = AlertTarget(name="pager", url="http://127.0.0.1:9/", min_severity="critical")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- the static baseline ------------------------------------------------------------------


@dataclass
class StaticThresholds:
    user_rpm: float
    feature_rpm: dict[str, float]
    global_rpm_floor: float
    cost_usd: float
    economy_share_floor: float = 0.5
    share_window_s: float = 300.0
    share_min_requests: int = 30
    cost_count: int = 3
    cost_window_s: float = 120.0


class Calibration:
    """Day 1 statistics an ops team would look at before writing static rules."""

    def __init__(self) -> None:
        self.minute: int | None = None
        self.user_counts: Counter[str] = Counter()
        self.feature_counts: Counter[str] = Counter()
        self.global_count = 0
        self.max_user = 0
        self.max_feature: Counter[str] = Counter()
        self.global_minutes: list[int] = []
        self.costs: list[int] = []

    def _close(self) -> None:
        if self.user_counts:
            self.max_user = max(self.max_user, max(self.user_counts.values()))
        for feature, count in self.feature_counts.items():
            self.max_feature[feature] = max(self.max_feature[feature], count)
        self.global_minutes.append(self.global_count)
        self.user_counts.clear()
        self.feature_counts.clear()
        self.global_count = 0

    def observe(self, record: dict[str, Any]) -> None:
        minute = int(record["ts"].timestamp() // 60)
        if self.minute is not None and minute != self.minute:
            self._close()
        self.minute = minute
        self.user_counts[record["user_id"]] += 1
        self.feature_counts[record["feature"]] += 1
        self.global_count += 1
        self.costs.append(record["cost_usd_nanos"])

    def thresholds(self) -> StaticThresholds:
        self._close()
        costs = sorted(self.costs)
        p999 = costs[int(0.999 * (len(costs) - 1))] / 1e9
        steady = sorted(self.global_minutes[1:-1])
        return StaticThresholds(
            user_rpm=math.ceil(1.25 * self.max_user),
            feature_rpm={f: math.ceil(1.25 * c) for f, c in self.max_feature.items()},
            global_rpm_floor=math.floor(0.5 * steady[0]),
            cost_usd=round(1.25 * p999, 4),
        )


class StaticBaseline:
    """Fixed thresholds, checked as records arrive, through the same alert lifecycle."""

    def __init__(self, limits: StaticThresholds, settings: DetectorSettings) -> None:
        self.limits = limits
        self.alerts = AlertManager(settings)
        self.minute: int | None = None
        self.counts: Counter[str] = Counter()
        self.reported: set[str] = set()
        self.global_count = 0
        self.expensive: dict[str, deque[float]] = {}
        self.shares: dict[str, deque[tuple[float, int]]] = {}
        self.share_sums: Counter[str] = Counter()

    def _verdict(
        self, kind: Any, scope: str, ts: datetime, observed: float, limit: float, unit: str
    ) -> Verdict:
        return Verdict(
            kind=kind,
            scope=scope,
            ts=ts,
            score=observed / limit if limit else 0.0,
            is_anomaly=True,
            expected=limit,
            observed=observed,
            unit=unit,
            metric="static threshold",
            window_seconds=60,
        )

    def _close_minutes(self, minute: int) -> list[dict[str, Any]]:
        alerts: list[dict[str, Any]] = []
        while self.minute is not None and self.minute < minute:
            end = datetime.fromtimestamp((self.minute + 1) * 60, UTC)
            if self.global_count < self.limits.global_rpm_floor:
                alerts += self.alerts.process(
                    self._verdict(
                        "volume_drop",
                        "global",
                        end,
                        self.global_count,
                        self.limits.global_rpm_floor,
                        "requests/min",
                    )
                )
            alerts += self.alerts.tick(end)
            self.counts.clear()
            self.reported.clear()
            self.global_count = 0
            self.minute += 1
        return alerts

    def observe(self, record: dict[str, Any]) -> list[dict[str, Any]]:
        ts: datetime = record["ts"]
        epoch = ts.timestamp()
        minute = int(epoch // 60)
        alerts = self._close_minutes(minute)
        self.minute = minute
        self.global_count += 1
        user, feature = f"user:{record['user_id']}", f"feature:{record['feature']}"
        for scope, limit in (
            (user, self.limits.user_rpm),
            (feature, self.limits.feature_rpm.get(record["feature"], math.inf)),
        ):
            self.counts[scope] += 1
            if self.counts[scope] > limit and scope not in self.reported:
                self.reported.add(scope)
                alerts += self.alerts.process(
                    self._verdict(
                        "volume_spike", scope, ts, self.counts[scope], limit, "requests/min"
                    )
                )
        cost_usd = record["cost_usd_nanos"] / 1e9
        if cost_usd > self.limits.cost_usd:
            window = self.expensive.setdefault(feature, deque())
            window.append(epoch)
            while window[0] < epoch - self.limits.cost_window_s:
                window.popleft()
            if len(window) >= self.limits.cost_count:
                alerts += self.alerts.process(
                    self._verdict(
                        "cost_per_request", feature, ts, cost_usd, self.limits.cost_usd, "usd"
                    )
                )
        economy = 1 if record["tier"] == "economy" else 0
        for scope in (feature, "global"):
            shares = self.shares.setdefault(scope, deque())
            shares.append((epoch, economy))
            self.share_sums[scope] += economy
            while shares[0][0] < epoch - self.limits.share_window_s:
                self.share_sums[scope] -= shares.popleft()[1]
            if len(shares) >= self.limits.share_min_requests:
                share = self.share_sums[scope] / len(shares)
                if share < self.limits.economy_share_floor:
                    alerts += self.alerts.process(
                        self._verdict(
                            "tier_mix", scope, ts, share, self.limits.economy_share_floor, "share"
                        )
                    )
        return alerts


# -- running --------------------------------------------------------------------------------


@dataclass
class Emitted:
    """A firing alert and the event time of the record whose processing emitted it."""

    at: datetime
    kind: str
    scope: str
    role: str
    incident_key: str
    message: str
    impact: float | None
    severity: str = "warning"
    # a target paging only critical alerts pages it (``AlertTarget.first_at_its_severity``)
    pages_critical_only: bool = False
    raised: bool = False  # an update: the incident became critical (``severity_raised_from``)


@dataclass
class ReplayResult:
    firing: list[Emitted] = field(default_factory=list)
    records: int = 0
    seconds: float = 0.0
    users_by_day: dict[int, set[str]] = field(default_factory=dict)


Consumer = AnomalyEngine | Any


def replay(
    records: Iterator[dict[str, Any]], consumers: list[tuple[Consumer, ReplayResult | None]]
) -> int:
    """Feed every record to every consumer; returns the number of records."""
    count = 0
    last: datetime | None = None
    clock = time.process_time
    for record in records:
        last = record["ts"]
        count += 1
        for consumer, result in consumers:
            started = clock()
            alerts = consumer.observe(record)
            if result is None:
                continue
            result.seconds += clock() - started
            result.records += 1
            day = int((record["ts"] - START) / DAY)
            result.users_by_day.setdefault(day, set()).add(record["user_id"])
            _collect(result, alerts, last)
    for consumer, result in consumers:
        if isinstance(consumer, AnomalyEngine) and last is not None and result is not None:
            _collect(result, consumer.flush(), last)  # held pages; no invented silence after
    return count


def _collect(result: ReplayResult, alerts: list[dict[str, Any]], at: datetime) -> None:
    for alert in alerts:
        if alert["status"] == "firing":
            result.firing.append(
                Emitted(
                    at,
                    alert["kind"],
                    alert["scope"],
                    alert.get("incident_role", "primary"),
                    alert.get("incident_key", ""),
                    alert["message"],
                    alert.get("impact_usd_per_hour"),
                    alert.get("severity", "warning"),
                    CRITICAL_ONLY.accepts(alert) and CRITICAL_ONLY.declines(alert) is None,
                    "severity_raised_from" in alert.get("details", {}),
                )
            )


def pages(result: ReplayResult) -> list[Emitted]:
    return [e for e in result.firing if e.role == "primary"]


@dataclass
class Outcome:
    incident: str
    kind: str
    shape: str
    scope: str
    bucket: str
    normal_per_minute: float
    magnitude: float
    share: float
    start: str
    detectable_after_s: float
    alert_delay_s: float | None  # first alert of the expected kind on the scope
    page_delay_s: float | None  # first page about the incident (its scope, or naming it)
    page_scope: str | None
    # Pages about the incident from its start to 10 minutes after its end: more than one is
    # on-call paged again for what is still one incident (a drift resolving mid-rise)
    pages: int
    static_delay_s: float | None
    floor_s: float | None  # the statistics' lower bound on any delay (see floor_seconds)
    message: str | None
    # every page after the first: seconds after the incident's truth, and its message
    later_pages: list[tuple[float, str]] = field(default_factory=list)
    # when a target paging only critical alerts first heard of it (None: never), and when
    # it would have by pages alone (a critical primary: all it heard before session 35)
    critical_only_delay_s: float | None = None
    critical_page_delay_s: float | None = None


def floor_seconds(incident: Incident, world: World, settings: DetectorSettings) -> float | None:
    """A lower bound on the delay any detector with these false-alarm targets can reach:
    how long the incident needs to produce the evidence its test asks for (Poisson counts,
    no burstiness; the CUSUMs' thresholds and expected increments). None: not computed
    (a gradual shape)."""
    from agents.anomaly.core import cusum_threshold

    r = incident.normal_per_minute
    m = incident.magnitude
    if incident.kind in ("runaway_loop", "periodic_bursts", "viral_ramp"):
        user = incident.scope.startswith("user:")
        best = math.inf
        for w in settings.volume_windows_seconds:
            need = calls_needed(r, w, settings, user)
            for t in range(5, 1805, 5):
                if incident.kind == "viral_ramp":
                    extra = r * (m - 1) * min(t, 600) ** 2 / 1200 / 60  # a linear ramp's excess
                    if t > 600:
                        extra += r * (m - 1) * (t - 600) / 60
                    count = r * w / 60 + extra * min(1.0, w / max(t, 1))
                else:
                    count = r * m * min(t, w) / 60 + r * max(0, w - t) / 60
                if count >= need:
                    best = min(best, t)
                    break
        return None if best == math.inf else float(best)
    if incident.kind == "cost_shift":
        spec = world.features.get(incident.scope.partition(":")[2])
        sigma = 1.2 if spec is None else max(spec.sigma, 0.3) * 1.2  # tokens and model mix
        shift = min(incident.share * math.log(m) / sigma, 4.0)
        calls = math.inf
        for k in (0.5, settings.cost_large_k):
            if shift > k:
                calls = min(calls, cusum_threshold(k, settings.cost_arl0_requests) / (shift - k))
        return None if calls == math.inf or r <= 0 else round(calls / r * 60, 1)
    if incident.kind == "routing_regression" and incident.shape == "step":
        p0 = world.features[incident.scope.partition(":")[2]].economy_share
        p1d = max(p0 - settings.mix_design_drop, p0 / 4)
        p = incident.magnitude
        gain = p * math.log(p1d / p0) + (1 - p) * math.log((1 - p1d) / (1 - p0))
        h = mix_threshold(settings, p0, p1d, r * 1440)
        return None if gain <= 0 or r <= 0 else round(h / gain / r * 60, 1)
    return None


def outcome(
    incident: Incident,
    engine: ReplayResult,
    static: ReplayResult,
    world: World,
    settings: DetectorSettings,
) -> Outcome:
    kind = EXPECTED_KIND[incident.kind]
    horizon = incident.end + timedelta(minutes=10)

    def first(hits: list[Emitted]) -> Emitted | None:
        hits = [e for e in hits if incident.start <= e.at <= horizon]
        return min(hits, key=lambda e: e.at) if hits else None

    alert = first([e for e in engine.firing if e.kind == kind and e.scope == incident.scope])
    keys = {e.incident_key for e in engine.firing if e.scope == incident.scope and e.incident_key}
    about = [
        e
        for e in pages(engine)
        if (e.scope == incident.scope or e.incident_key in keys)
        and incident.start <= e.at <= horizon
    ]
    page = first(about)
    baseline = first([e for e in static.firing if e.kind == kind and e.scope == incident.scope])

    def delay(hit: Emitted | None) -> float | None:
        return None if hit is None else round((hit.at - incident.truth).total_seconds(), 1)

    return Outcome(
        incident=incident.label,
        kind=incident.kind,
        shape=incident.shape,
        scope=incident.scope,
        bucket=incident.bucket,
        normal_per_minute=incident.normal_per_minute,
        magnitude=incident.magnitude,
        share=incident.share,
        start=incident.start.isoformat(),
        detectable_after_s=round(incident.detectable_after_minutes * 60, 1),
        alert_delay_s=delay(alert),
        page_delay_s=delay(page),
        page_scope=None if page is None else page.scope,
        pages=len(about),
        static_delay_s=delay(baseline),
        floor_s=floor_seconds(incident, world, settings),
        message=None if alert is None else alert.message,
        later_pages=[
            (delay(e) or 0.0, e.message) for e in sorted(about, key=lambda e: e.at) if e is not page
        ],
        critical_page_delay_s=delay(
            first([e for e in about if e.severity == "critical" and not e.raised])
        ),
        critical_only_delay_s=delay(
            first(
                [
                    e
                    for e in engine.firing
                    if e.pages_critical_only
                    and (e.scope == incident.scope or e.incident_key in keys)
                ]
            )
        ),
    )


def false_pages(result: ReplayResult, days: list[int]) -> dict[str, Any]:
    judged = [e for e in pages(result) if int((e.at - START) / DAY) in days]
    active = statistics.mean(len(result.users_by_day.get(d, set())) for d in days)
    per_100 = len(judged) / len(days) / (active / 100) if active else 0.0
    return {
        "pages": len(judged),
        "days": len(days),
        "active_users_per_day": round(active),
        "per_day_per_100_active_users": round(per_100, 3),
        "by_kind": dict(Counter(e.kind for e in judged)),
        "examples": [f"{e.at:%Y-%m-%d %H:%M:%S} {e.message}" for e in judged[:8]],
    }


def run_world(world: World, args: argparse.Namespace, settings: DetectorSettings) -> dict[str, Any]:
    days = args.days
    log(f"{world.name}: clean replay of {days} days")
    engine = AnomalyEngine(settings)
    clean, clean_static = ReplayResult(), ReplayResult()
    calibration = Calibration()
    static: StaticBaseline | None = None
    checkpoint = b""
    static_state: Any = None
    for index in range(days):
        if index == days - 1:
            checkpoint = engine.snapshot()
            static_state = _copy(static)
        consumers: list[tuple[Consumer, ReplayResult | None]] = [(engine, clean)]
        consumers.append((calibration, None) if static is None else (static, clean_static))
        count = replay(world.day(index), consumers)
        if static is None:
            static = StaticBaseline(calibration.thresholds(), settings)
        log(
            f"{world.name} day {index + 1}: {count} records; pages so far {len(pages(clean))}, "
            f"static {len(clean_static.firing)}"
        )
    judged_days = list(range(1, days))
    outcomes: list[Outcome] = []
    incident_seconds = incident_records = 0.0
    for b in range(args.batches):
        batch = plan(world, days - 1, seed=args.seed * 100 + b, count=args.incidents_per_day)
        log(f"{world.name} batch {b + 1}/{args.batches}: {len(batch.incidents)} incidents")
        restored = AnomalyEngine.restore(checkpoint, settings=settings)
        static_copy = _copy(static_state)
        result, static_result = ReplayResult(), ReplayResult()
        replay(
            inject(world, batch, seed=args.seed * 977 + b),
            [(restored, result), (static_copy, static_result)],
        )
        incident_seconds += result.seconds
        incident_records += result.records
        outcomes += [outcome(i, result, static_result, world, settings) for i in batch.incidents]
    return {
        "world": world.name,
        "records_clean": clean.records,
        "false_pages": false_pages(clean, judged_days),
        "false_pages_static": false_pages(clean_static, judged_days[1:] or judged_days),
        "incidents": [asdict(o) for o in outcomes],
        # updates of incidents that became critical (and those that paged again: escalated)
        "severity_updates_clean": sum(e.raised for e in clean.firing),
        "severity_updates_clean_paged": sum(e.raised and e.role == "primary" for e in clean.firing),
        "cpu": {
            "engine_us_per_record_clean": round(1e6 * clean.seconds / max(clean.records, 1), 1),
            "engine_us_per_record_incidents": round(
                1e6 * incident_seconds / max(incident_records, 1), 1
            ),
            "engine_seconds_clean": round(clean.seconds, 1),
        },
    }


def _copy(obj: Any) -> Any:
    import pickle

    return None if obj is None else pickle.loads(pickle.dumps(obj))


# -- detectability --------------------------------------------------------------------------


def _poisson(rng: random.Random, start: float, end: float, per_minute: float) -> list[float]:
    out, t = [], start
    while per_minute > 0:
        t += rng.expovariate(per_minute / 60)
        if t >= end:
            return out
        out.append(t)
    return out


def _at(seconds: float) -> datetime:
    return START + timedelta(seconds=seconds)


def rate_delay(
    per_minute: float, magnitude: float, seed: int, settings: DetectorSettings
) -> float | None:
    """Seconds until a user-scope rate detector flags a step of ``magnitude`` (None: not in
    30 minutes), after WARM_S of Poisson traffic at ``per_minute``."""
    rng = random.Random(seed)
    detector = RateDetector("user:probe", settings, "user")
    for t in _poisson(rng, 0, WARM_S, per_minute):
        detector.observe(_at(t))
    start = WARM_S + rng.uniform(0, 60)
    for t in _poisson(rng, WARM_S, start, per_minute) + _poisson(
        rng, start, start + 1800, per_minute * magnitude
    ):
        verdict = detector.observe(_at(t))
        if t >= start and verdict is not None and verdict.is_anomaly:
            return t - start
    return None


def calls_needed(
    per_minute: float, window_s: float, settings: DetectorSettings, user: bool = True
) -> int:
    """Calls a window must hold for the rate test to fire (Poisson, Bonferroni for the
    windows): the statistical floor behind the delays."""
    from agents.anomaly.core import upper_tail

    mu = per_minute * window_s / 60
    windows = len(settings.volume_windows_seconds)
    p_value = settings.volume_p_value_user if user else settings.volume_p_value
    n = max(settings.volume_min_count, math.ceil(settings.volume_min_ratio * mu))
    while upper_tail(n, mu) * windows >= p_value and n < 10**6:
        n += max(1, n // 50)
    return n


def cost_delay(
    per_minute: float,
    factor: float,
    share: float,
    sigma: float,
    seed: int,
    settings: DetectorSettings,
) -> float | None:
    rng = random.Random(seed)
    detector = CostDetector("feature:probe", settings, own_reference=True)
    gap = 60.0 / per_minute
    t = 0.0
    while t < WARM_S:
        detector.observe(_at(t), 3e5 * rng.lognormvariate(0, sigma))
        t += rng.expovariate(1 / gap)
    start = t
    while t < start + 3600:
        cost = 3e5 * rng.lognormvariate(0, sigma) * (factor if rng.random() < share else 1.0)
        verdict = detector.observe(_at(t), cost)
        if verdict is not None and verdict.is_anomaly:
            return t - start
        t += rng.expovariate(1 / gap)
    return None


def mix_delay(
    per_minute: float, before: float, after: float, seed: int, settings: DetectorSettings
) -> float | None:
    rng = random.Random(seed)
    detector = TierMixDetector("feature:probe", settings)
    gap = 60.0 / per_minute
    t = 0.0
    while t < WARM_S:
        detector.observe(_at(t), rng.random() < before)
        t += rng.expovariate(1 / gap)
    start = t
    while t < start + 3600:
        verdict = detector.observe(_at(t), rng.random() < after)
        if verdict is not None and verdict.is_anomaly:
            return t - start
        t += rng.expovariate(1 / gap)
    return None


DRIFT_SHAPES = ("linear", "convex", "concave")


def drift_progress(shape: str, progress: float) -> float:
    """How far along a drift's rise is (0..1) at ``progress`` of its duration: linear,
    slow first (convex: p^2), or fast first (concave: sqrt p)."""
    if shape == "convex":
        return progress * progress
    if shape == "concave":
        return math.sqrt(progress)
    return progress


def drift_delay(
    per_minute: float,
    sigma: float,
    shape: str,
    seed: int,
    settings: DetectorSettings,
    models: int = 1,
) -> float | None:
    """Seconds from the moment a feature's cost drift (1x -> 5x over 3 hours, ``shape``)
    crosses +75 % until the cost detector flags it (negative: before); None: not during
    the drift. A day of stationary log-normal costs comes first. ``models=2``: 30 % of
    the calls go to a model 16x pricier (the detector is told which), ``sigma`` is then the
    spread of each model's tokens (the feature's log-cost spread is about sqrt(sigma^2 +
    1.6))."""
    rng = random.Random(seed)
    detector = CostDetector("feature:probe", settings, own_reference=True)
    gap = 60.0 / per_minute

    def call(factor: float) -> tuple[float, str]:
        pricey = models == 2 and rng.random() < 0.3
        cost = 3e5 * rng.lognormvariate(0, sigma) * factor * (16.0 if pricey else 1.0)
        return cost, ("pricey" if pricey else "cheap") if models == 2 else ""

    t = 0.0
    while t < 86_400:
        cost, model = call(1.0)
        detector.observe(_at(t), cost, model=model)
        t += rng.expovariate(1 / gap)
    start, ramp = t, 3 * 3600.0
    crossing = next(
        i / 1000 * ramp for i in range(1001) if 4 * drift_progress(shape, i / 1000) >= 0.75
    )
    while t < start + ramp:
        cost, model = call(1 + 4 * drift_progress(shape, (t - start) / ramp))
        verdict = detector.observe(_at(t), cost, model=model)
        if verdict is not None and verdict.is_anomaly:
            return t - start - crossing
        t += rng.expovariate(1 / gap)
    return None


def drift_table(settings: DetectorSettings, seeds: list[int]) -> list[dict[str, Any]]:
    """Cost drifts of every shape at 4, 10 and 20 calls a minute, log spreads 0.5 and 1.26,
    one model (the 108 drifts measured since the drift rule), then the same with two
    models 16x apart (the spread is then each model's): each seed's delay after the +75 %
    crossing."""
    rows = []
    for models in (1, 2):
        for shape in DRIFT_SHAPES:
            for r in (4.0, 10.0, 20.0):
                for sigma in (0.5, 1.26):
                    delays = [
                        drift_delay(r, sigma, shape, seed, settings, models) for seed in seeds
                    ]
                    rows.append(
                        {
                            "models": models,
                            "shape": shape,
                            "per_minute": r,
                            "log_spread": sigma,
                            "delays_s": [None if d is None else round(d) for d in delays],
                            "within_2_min": sum(1 for d in delays if d is not None and d <= 120),
                        }
                    )
    return rows


def _median(values: list[float | None]) -> float | None:
    found = [v for v in values if v is not None]
    if len(found) * 2 <= len(values):
        return None  # missed in most runs
    return round(statistics.median([v if v is not None else math.inf for v in values]), 1)


def detectability(settings: DetectorSettings, seeds: int) -> dict[str, Any]:
    rates = [1 / 60, 1 / 10, 1.0, 10.0, 100.0]
    magnitudes = [2, 5, 20, 300]
    volume = []
    for r in rates:
        for m in magnitudes:
            if r * m > 3000:
                continue
            delays = [rate_delay(r, m, seed, settings) for seed in range(seeds)]
            need = calls_needed(r, 120, settings)
            volume.append(
                {
                    "per_minute": round(r, 4),
                    "magnitude": m,
                    "median_delay_s": _median(delays),
                    "calls_in_2_min_after": round(r * m * 2, 2),
                    "calls_needed_in_2_min_window": need,
                }
            )
    cost = []
    for r in (1.0, 4.0, 20.0, 100.0):
        for factor, share in ((2, 1.0), (8, 0.5), (8, 1.0), (20, 1.0)):
            for sigma in (0.5, 1.26):
                delays = [cost_delay(r, factor, share, sigma, s, settings) for s in range(seeds)]
                cost.append(
                    {
                        "per_minute": r,
                        "factor": factor,
                        "share": share,
                        "log_spread": sigma,
                        "median_delay_s": _median(delays),
                    }
                )
    mix = []
    for r in (2.0, 13.6, 60.0):
        for before, after in ((0.85, 0.6), (0.85, 0.35), (0.7, 0.2)):
            delays = [mix_delay(r, before, after, s, settings) for s in range(seeds)]
            mix.append(
                {
                    "per_minute": r,
                    "before": before,
                    "after": after,
                    "median_delay_s": _median(delays),
                }
            )
    return {"volume": volume, "cost": cost, "mix": mix, "seeds": seeds}


# -- report ---------------------------------------------------------------------------------


def _delay(value: float | None) -> str:
    return "missed" if value is None else f"{value:.0f} s"


def _floor(value: float | None) -> str:
    return "-" if value is None else f">= {value:.0f} s"


def markdown(report: dict[str, Any]) -> str:
    lines = ["## Tollgate anomaly detection: labelled incidents, false pages, cost per record", ""]
    for world in report["worlds"]:
        fp, fps = world["false_pages"], world["false_pages_static"]
        lines += [
            f"### {world['world']} world ({world['records_clean']:,} records over "
            f"{report['plan']['days']} clean days)",
            "",
            "| incident | scope rate | normal /min | alert | page (scope) | statistical floor "
            "| static |",
            "|---|---|--:|--:|--:|--:|--:|",
        ]
        for o in world["incidents"]:
            lines.append(
                f"| {o['incident']} | {o['bucket']} | {o['normal_per_minute']:.3g} | "
                f"{_delay(o['alert_delay_s'])} | {_delay(o['page_delay_s'])} "
                f"({o['page_scope'] or '-'}) | {_floor(o['floor_s'])} | "
                f"{_delay(o['static_delay_s'])} |"
            )
        total = len(world["incidents"])
        fast = sum(
            1
            for o in world["incidents"]
            if o["alert_delay_s"] is not None and o["alert_delay_s"] <= TARGET_DELAY_S
        )
        caught = sum(1 for o in world["incidents"] if o["alert_delay_s"] is not None)
        possible = [
            o
            for o in world["incidents"]
            if o["floor_s"] is not None and o["floor_s"] <= TARGET_DELAY_S
        ]
        possible_fast = sum(
            1
            for o in possible
            if o["alert_delay_s"] is not None and o["alert_delay_s"] <= TARGET_DELAY_S
        )
        static_fast = sum(
            1
            for o in world["incidents"]
            if o["static_delay_s"] is not None and o["static_delay_s"] <= TARGET_DELAY_S
        )
        again = sum(1 for o in world["incidents"] if o.get("pages", 0) > 1)
        lines += [
            "",
            f"Within {TARGET_DELAY_S:.0f} s: {fast}/{total} (caught at all: {caught}/{total}); "
            f"of the {len(possible)} whose statistical floor is under {TARGET_DELAY_S:.0f} s: "
            f"{possible_fast}; static rules: {static_fast}/{total}.",
            f"False pages: {fp['pages']} in {fp['days']} days, "
            f"{fp['per_day_per_100_active_users']} per day per 100 active users "
            f"({fp['active_users_per_day']} active/day); static rules: "
            f"{fps['per_day_per_100_active_users']}.",
            f"Paged more than once while it lasted (to 10 min after): {again}/{total} "
            f"incidents, {sum(o.get('pages', 0) for o in world['incidents'])} pages in all.",
            f"Engine CPU: {world['cpu']['engine_us_per_record_clean']} µs per record "
            f"(clean replay, one thread).",
            "",
        ]
    drift = report.get("drift")
    if drift:
        seeds = report["plan"]["drift_seeds"]
        lines += [
            f"### Cost drifts (1x -> 5x over 3 hours), delay after +75 %, seeds {seeds}",
            "",
            "| models | shape | /min | log spread (per model) | delays | within 2 min |",
            "|--:|---|--:|--:|---|--:|",
        ]
        for row in drift:
            delays = ", ".join("missed" if d is None else f"{d}" for d in row["delays_s"])
            lines.append(
                f"| {row.get('models', 1)} | {row['shape']} | {row['per_minute']:g} "
                f"| {row['log_spread']} | {delays} "
                f"| {row['within_2_min']}/{len(row['delays_s'])} |"
            )
        totals = []
        for models in (1, 2):
            part = [r for r in drift if r.get("models", 1) == models]
            if part:
                total = sum(r["within_2_min"] for r in part)
                count = sum(len(r["delays_s"]) for r in part)
                totals.append(f"{total}/{count} with {models} model{'s' if models > 1 else ''}")
        lines += ["", f"Within 2 min: {'; '.join(totals)}.", ""]
    d = report.get("detectability")
    if d:
        lines += [
            "### Detectability: request rate (a user, Poisson, a step up)",
            "",
            "| normal /min | x | median delay | calls in 2 min at the new rate | calls a 2-min window needs |",
            "|--:|--:|--:|--:|--:|",
        ]
        for row in d["volume"]:
            lines.append(
                f"| {row['per_minute']:g} | {row['magnitude']} | {_delay(row['median_delay_s'])} | "
                f"{row['calls_in_2_min_after']:g} | {row['calls_needed_in_2_min_window']} |"
            )
        lines += [
            "",
            "### Detectability: cost per request (a feature)",
            "",
            "| /min | factor | share | log spread | median delay |",
            "|--:|--:|--:|--:|--:|",
        ]
        for row in d["cost"]:
            lines.append(
                f"| {row['per_minute']:g} | {row['factor']} | {row['share']:.0%} | "
                f"{row['log_spread']} | {_delay(row['median_delay_s'])} |"
            )
        lines += [
            "",
            "### Detectability: economy share (a feature)",
            "",
            "| /min | before | after | median delay |",
            "|--:|--:|--:|--:|",
        ]
        for row in d["mix"]:
            lines.append(
                f"| {row['per_minute']:g} | {row['before']:.0%} | {row['after']:.0%} | "
                f"{_delay(row['median_delay_s'])} |"
            )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.anomaly",
        description="Labelled incidents: delay per incident, false pages, cost per record.",
    )
    parser.add_argument("--world", choices=["synthetic", "azure", "both"], default="both")
    parser.add_argument("--days", type=int, default=3, help="clean days (default 3)")
    parser.add_argument("--batches", type=int, default=3, help="incident replays per world")
    parser.add_argument("--incidents-per-day", type=int, default=8)
    parser.add_argument("--seeds", type=int, default=5, help="seeds per detectability cell")
    parser.add_argument("--no-detectability", action="store_true")
    parser.add_argument(
        "--drift-only",
        action="store_true",
        help="only the cost-drift table (shapes x rates x spreads), no worlds",
    )
    parser.add_argument(
        "--drift-seeds",
        default="10,11,12,13,14,15",
        help="seeds of the cost-drift table (default: 10-15, never tuned on)",
    )
    parser.add_argument("--quick", action="store_true", help="2 days, 1 batch, 3 seeds")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--json-out", default=None)
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE")
    args = parser.parse_args(argv)
    args.settings = {}
    for item in args.set:
        name, _, text = item.partition("=")
        try:
            args.settings[name] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            args.settings[name] = text
    if args.quick:
        args.days, args.batches, args.seeds = 2, 1, 3
    if args.days < 2:
        raise SystemExit("--days must be at least 2 (day 1 warms up)")
    return args


def run(args: argparse.Namespace) -> dict[str, Any]:
    settings = DetectorSettings.with_options(**args.settings)
    worlds: list[World] = []
    if args.world in ("synthetic", "both"):
        worlds.append(SyntheticWorld(args.seed))
    if args.world in ("azure", "both"):
        worlds.append(AzureWorld(args.seed))
    drift_seeds = [int(x) for x in args.drift_seeds.split(",") if x.strip()]
    if args.drift_only:
        log("cost-drift table")
        return {
            "plan": {"drift_seeds": drift_seeds, "days": 0},
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
            "worlds": [],
            "drift": drift_table(settings, drift_seeds),
        }
    report: dict[str, Any] = {
        "plan": {
            "drift_seeds": drift_seeds,
            "days": args.days,
            "batches": args.batches,
            "incidents_per_day": args.incidents_per_day,
            "seed": args.seed,
            "settings": {k: str(v) for k, v in asdict(settings).items()},
        },
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "worlds": [run_world(world, args, settings) for world in worlds],
    }
    if not args.no_detectability:
        log("detectability table")
        report["detectability"] = detectability(settings, args.seeds)
        log("cost-drift table")
        report["drift"] = drift_table(settings, drift_seeds)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    report = run(args)
    report["wall_seconds"] = round(time.monotonic() - started, 1)
    document = orjson.dumps(report, option=orjson.OPT_INDENT_2).decode()
    print(markdown(report))
    print()
    print(document)
    if args.json_out:
        with open(args.json_out, "w") as handle:
            handle.write(document + "\n")
        log(f"wrote {args.json_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
