"""Anomaly detection on a replay of a real trace: detection delay and false alerts.

Baseline traffic is the Azure LLM inference trace (``data/AzureLLMInferenceTrace_conv.csv``,
one hour, 19,366 calls) played back to back (``app.trace.repeated``) over several
simulated days, thinned by time of day to give it a daily rhythm (keep probability
``0.25 + 0.75 * (1 + cos(2 pi (hour - 15) / 24)) / 2``: 100 % at 15:00 UTC, 25 % at
03:00). Each day is attributed with its own seed (``app.trace.Attribution``: 200 Zipf
users, five features, 70 % economy tier) and priced with
``app.pricing.PriceCatalog("gpt-4")``. The records are fed to
``agents.anomaly.AnomalyEngine`` in event time; no Kafka.

Two replays, one run:

1. **Clean**: every day, no incident. Every ``firing`` alert is a false alert.
2. **Incidents**: the engine checkpoint taken at the start of the last day
   (``AnomalyEngine.snapshot``/``restore``, so no second warm-up) replays the same last
   day with incidents injected at known times: runaway loops (one user's request rate
   x50), prompt-injection cost spikes (tokens, hence cost per request, x20 on one
   feature), viral features (a feature's volume ramping to x10 over 10 minutes) and
   routing regressions (a feature's economy share 70 % -> 20 %). Each lasts 30 min.

Detection delay = event time from the incident's start to the first ``firing`` alert
of the right kind and scope, measured at the record whose processing emitted it.

The same records go through a static-threshold baseline, the rules an ops team would
write after looking at a day of traffic: per-user and per-feature requests/min above
1.25 x the highest minute seen on day 1; global requests/min below half the lowest;
three requests within 2 min above 1.25 x day 1's 99.9th-percentile cost per request
in a feature; economy share of a feature's last 5 min below 50 % (at least 30
requests). Same alert de-duplication as the engine.

Targets: every incident detected within 2 min; < 1 false alert per simulated day per
100 active users; better than the static baseline on both.

Run ``python -m bench.anomaly`` (``--quick`` for 2 days, ``--days N``, ``--json-out
FILE``). See bench/README.md.
"""

from __future__ import annotations

import argparse
import ast
import heapq
import itertools
import math
import os
import pickle
import platform
import random
import sys
import time
from collections import Counter, deque
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

from agents.anomaly import AlertManager, AnomalyEngine, DetectorSettings, Verdict
from app.pricing import PriceCatalog
from app.trace import FEATURES, Attribution, TraceCall, read_azure_csv

START = datetime(2024, 3, 4, tzinfo=UTC)  # a Monday, 00:00 UTC
DAY = timedelta(days=1)
RHYTHM_LOW = 0.25
RHYTHM_PEAK_HOUR = 15.0
INCIDENT_MINUTES = 30
TARGET_DELAY_S = 120.0
TARGET_FALSE_PER_DAY_PER_100 = 1.0

EXPECTED_KIND = {
    "runaway_loop": "volume_spike",
    "cost_spike": "cost_per_request",
    "viral_feature": "volume_spike",
    "routing_regression": "tier_mix",
}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def rhythm(ts: datetime) -> float:
    """Share of the trace's traffic kept at this time of day."""
    hour = ts.hour + ts.minute / 60 + ts.second / 3600
    return (
        RHYTHM_LOW
        + (1 - RHYTHM_LOW) * (1 + math.cos(2 * math.pi * (hour - RHYTHM_PEAK_HOUR) / 24)) / 2
    )


# -- traffic --------------------------------------------------------------------------------


class Traffic:
    """Deterministic per-day baseline traffic and the means to inject incidents into it."""

    def __init__(self, seed: int, users: int = 200) -> None:
        self.seed = seed
        self.calls = list(read_azure_csv())
        self.origin = self.calls[0].ts
        self.span = self.calls[-1].ts - self.origin + timedelta(seconds=1)
        self.offsets = [(call.ts - self.origin).total_seconds() for call in self.calls]
        self.rate_per_s = len(self.calls) / self.span.total_seconds()
        self.prices = PriceCatalog("gpt-4")
        self._cost_cache: dict[tuple[str, int, int], tuple[int, str | None]] = {}
        self.users = users
        zipf = [1 / (rank**1.1) for rank in range(1, users + 1)]
        self.user_share = {f"user-{rank:04d}": w / sum(zipf) for rank, w in enumerate(zipf, 1)}
        self.feature_share = dict(FEATURES)

    def price(self, model: str, prompt: int, completion: int) -> tuple[int, str | None]:
        key = (model, prompt, completion)
        known = self._cost_cache.get(key)
        if known is None:
            cost = self.prices.cost(model, prompt, completion)
            known = self._cost_cache[key] = (cost.cost_usd_nanos, cost.tier)
            if len(self._cost_cache) > 500_000:
                self._cost_cache.clear()
        return known

    def record(self, call: TraceCall) -> dict[str, Any]:
        assert call.model is not None
        cost, tier = self.price(call.model, call.prompt_tokens, call.completion_tokens)
        return {
            "ts": call.ts,
            "user_id": call.user_id,
            "session_id": call.session_id,
            "feature": call.feature,
            "model_served": call.model,
            "tier": tier,
            "prompt_tokens": call.prompt_tokens,
            "completion_tokens": call.completion_tokens,
            "cost_usd_nanos": cost,
            "price_unknown": False,
            "cache_hit": False,
        }

    def day(self, index: int) -> Iterator[dict[str, Any]]:
        """Day ``index`` of the replay: the trace back to back, thinned by time of day."""
        day_start = START + index * DAY
        day_end = day_start + DAY
        thin = random.Random(self.seed * 7919 + index)
        attribution = Attribution(seed=self.seed * 1000 + index, users=self.users)
        first_copy = int((day_start - START) / self.span)
        for copy in itertools.count(first_copy):
            copy_start = START + copy * self.span
            if copy_start >= day_end:
                return
            for call, offset in zip(self.calls, self.offsets, strict=True):
                ts = copy_start + timedelta(seconds=offset)
                if ts < day_start:
                    continue
                if ts >= day_end:
                    break
                if thin.random() >= rhythm(ts):
                    continue
                yield self.record(attribution.assign(TraceCall(ts, *_tokens(call))))

    def random_call(self, rng: random.Random, ts: datetime) -> TraceCall:
        return TraceCall(ts, *_tokens(self.calls[rng.randrange(len(self.calls))]))

    def expected_rate_per_s(self, ts: datetime, share: float) -> float:
        return self.rate_per_s * rhythm(ts) * share


def _tokens(call: TraceCall) -> tuple[int, int]:
    return call.prompt_tokens, call.completion_tokens


@dataclass(frozen=True)
class Incident:
    kind: str  # runaway_loop | cost_spike | viral_feature | routing_regression
    target: str  # user id or feature name
    start: datetime
    minutes: int = INCIDENT_MINUTES

    @property
    def end(self) -> datetime:
        return self.start + timedelta(minutes=self.minutes)

    @property
    def scope(self) -> str:
        return f"user:{self.target}" if self.kind == "runaway_loop" else f"feature:{self.target}"

    @property
    def name(self) -> str:
        return f"{self.kind} {self.scope} @ {self.start:%H:%M:%S}"


def incident_plan(day_index: int) -> list[Incident]:
    """Eight incidents spread over the day (trough and peak), 3 h apart, odd seconds."""
    day = START + day_index * DAY

    def at(hh: int, mm: int, ss: int) -> datetime:
        return day + timedelta(hours=hh, minutes=mm, seconds=ss)

    return [
        Incident("runaway_loop", "user-0005", at(1, 10, 17)),
        Incident("cost_spike", "support-bot", at(4, 10, 31)),
        Incident("viral_feature", "summarize", at(7, 10, 43)),
        Incident("routing_regression", "search", at(10, 10, 7)),
        Incident("runaway_loop", "user-0060", at(13, 10, 52)),
        Incident("cost_spike", "chat", at(16, 10, 29)),
        Incident("viral_feature", "code-assist", at(19, 10, 13)),
        Incident("routing_regression", "support-bot", at(22, 10, 37)),
    ]


def _poisson_times(
    rng: random.Random, start: datetime, end: datetime, rate_at: Any
) -> Iterator[datetime]:
    """Arrival times of an inhomogeneous Poisson process (thinning; rate_at in 1/s)."""
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


def inject(
    traffic: Traffic, base: Iterator[dict[str, Any]], incidents: list[Incident], seed: int
) -> Iterator[dict[str, Any]]:
    """The base day with the incidents applied, in event-time order."""
    rng = random.Random(seed)
    chooser = Attribution(seed=seed + 1, users=traffic.users)
    extra: list[Iterator[dict[str, Any]]] = []
    for incident in incidents:
        if incident.kind == "runaway_loop":
            extra.append(_runaway(traffic, incident, rng, chooser))
        elif incident.kind == "viral_feature":
            extra.append(_viral(traffic, incident, rng, chooser))
    modifiers = [i for i in incidents if i.kind in ("cost_spike", "routing_regression")]

    def modified(records: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for record in records:
            for incident in modifiers:
                if (
                    record["feature"] == incident.target
                    and incident.start <= record["ts"] < incident.end
                ):
                    if incident.kind == "cost_spike":
                        prompt = record["prompt_tokens"] * 20
                        completion = record["completion_tokens"] * 20
                        model = record["model_served"]
                    else:
                        prompt, completion = record["prompt_tokens"], record["completion_tokens"]
                        model = chooser.model_for(economy_share=0.2)
                    cost, tier = traffic.price(model, prompt, completion)
                    record = {
                        **record,
                        "prompt_tokens": prompt,
                        "completion_tokens": completion,
                        "model_served": model,
                        "cost_usd_nanos": cost,
                        "tier": tier,
                    }
            yield record

    yield from heapq.merge(modified(base), *extra, key=lambda record: record["ts"])


def _runaway(
    traffic: Traffic, incident: Incident, rng: random.Random, chooser: Attribution
) -> Iterator[dict[str, Any]]:
    """One user's agent in a loop: 49 extra calls for each normal one, one feature, one model."""
    share = traffic.user_share[incident.target]
    feature = chooser._pick(chooser._feature_names, chooser._feature_cum)
    model = chooser.model_for()
    times = _poisson_times(
        rng, incident.start, incident.end, lambda ts: 49 * traffic.expected_rate_per_s(ts, share)
    )
    for ts in times:
        call = _assigned(traffic.random_call(rng, ts), incident.target, feature, model)
        yield traffic.record(call)


def _viral(
    traffic: Traffic, incident: Incident, rng: random.Random, chooser: Attribution
) -> Iterator[dict[str, Any]]:
    """A feature's traffic ramping to 10x over 10 minutes, from the usual users."""
    share = traffic.feature_share[incident.target]

    def rate(ts: datetime) -> float:
        minutes = (ts - incident.start).total_seconds() / 60
        multiplier = 1 + 9 * min(max(minutes, 0) / 10, 1)
        return (multiplier - 1) * traffic.expected_rate_per_s(ts, share)

    for ts in _poisson_times(rng, incident.start, incident.end, rate):
        call = traffic.random_call(rng, ts)
        yield traffic.record(chooser.assign(replace(call, feature=incident.target)))


def _assigned(call: TraceCall, user: str, feature: str, model: str) -> TraceCall:
    return TraceCall(
        call.ts,
        call.prompt_tokens,
        call.completion_tokens,
        user_id=user,
        session_id="loop",
        feature=feature,
        model=model,
    )


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
    message: str


@dataclass
class ReplayResult:
    firing: list[Emitted] = field(default_factory=list)
    records: int = 0
    active_users: int = 0
    seconds: float = 0.0


def _collect(result: ReplayResult, alerts: list[dict[str, Any]], at: datetime) -> None:
    for alert in alerts:
        if alert["status"] == "firing":
            result.firing.append(Emitted(at, alert["kind"], alert["scope"], alert["message"]))


Detector = AnomalyEngine | StaticBaseline | Calibration


def replay(
    records: Iterator[dict[str, Any]],
    consumers: list[tuple[Detector, ReplayResult | None]],
    users: set[str] | None = None,
) -> int:
    """Feed every record to every consumer in turn; returns the number of records."""
    count = 0
    last: datetime | None = None
    clock = time.process_time
    for record in records:
        last = record["ts"]
        count += 1
        if users is not None:
            users.add(record["user_id"])
        for consumer, result in consumers:
            started = clock()
            alerts = consumer.observe(record)
            if result is not None:
                result.seconds += clock() - started
                result.records += 1
                if alerts:
                    _collect(result, alerts, last)
    for consumer, result in consumers:
        if isinstance(consumer, AnomalyEngine) and last is not None and result is not None:
            _collect(result, consumer.advance(last), last)
    return count


@dataclass
class IncidentOutcome:
    incident: str
    kind: str
    scope: str
    start: str
    normal_rate_per_min: float
    engine_delay_s: float | None
    static_delay_s: float | None
    engine_message: str | None
    static_message: str | None


def outcome(
    incident: Incident, engine: ReplayResult, static: ReplayResult, traffic: Traffic
) -> IncidentOutcome:
    kind = EXPECTED_KIND[incident.kind]

    def first(result: ReplayResult) -> Emitted | None:
        horizon = incident.end + timedelta(minutes=5)
        hits = [
            e
            for e in result.firing
            if e.kind == kind and e.scope == incident.scope and incident.start <= e.at <= horizon
        ]
        return min(hits, key=lambda e: e.at) if hits else None

    share = (
        traffic.user_share[incident.target]
        if incident.kind == "runaway_loop"
        else traffic.feature_share[incident.target]
    )
    hit_engine, hit_static = first(engine), first(static)
    return IncidentOutcome(
        incident=incident.kind,
        kind=kind,
        scope=incident.scope,
        start=incident.start.isoformat(),
        normal_rate_per_min=round(60 * traffic.expected_rate_per_s(incident.start, share), 2),
        engine_delay_s=None
        if hit_engine is None
        else (hit_engine.at - incident.start).total_seconds(),
        static_delay_s=None
        if hit_static is None
        else (hit_static.at - incident.start).total_seconds(),
        engine_message=None if hit_engine is None else hit_engine.message,
        static_message=None if hit_static is None else hit_static.message,
    )


def false_alert_summary(result: ReplayResult, days: int) -> dict[str, Any]:
    per_100 = result.active_users / 100 if result.active_users else 1.0
    by_kind = Counter(e.kind for e in result.firing)
    by_day = Counter(int((e.at - START) / DAY) + 1 for e in result.firing)
    return {
        "firing_alerts": len(result.firing),
        "per_day": round(len(result.firing) / days, 3),
        "per_day_per_100_active_users": round(len(result.firing) / days / per_100, 3),
        "by_kind": dict(by_kind),
        "by_day": {str(day): by_day.get(day, 0) for day in range(1, days + 1)},
        "examples": [f"{e.at:%Y-%m-%d %H:%M:%S} {e.message}" for e in result.firing[:10]],
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    traffic = Traffic(args.seed)
    settings = DetectorSettings.with_options(**args.settings)
    days = args.days
    log(f"clean replay: {days} simulated days ({traffic.rate_per_s * 60:.0f} calls/min at peak)")
    engine = AnomalyEngine(settings, traffic.prices)
    clean_engine, clean_static = ReplayResult(), ReplayResult()
    calibration = Calibration()
    static: StaticBaseline | None = None
    users_per_day: list[int] = []
    checkpoint = static_checkpoint = b""
    for index in range(days):
        if index == days - 1:
            checkpoint, static_checkpoint = engine.snapshot(), pickle.dumps(static)
        users: set[str] = set()
        consumers: list[tuple[Detector, ReplayResult | None]] = [(engine, clean_engine)]
        consumers.append((calibration, None) if static is None else (static, clean_static))
        count = replay(traffic.day(index), consumers, users)
        if static is None:
            static = StaticBaseline(calibration.thresholds(), settings)
            log(f"static thresholds from day 1: {asdict(static.limits)}")
        users_per_day.append(len(users))
        log(
            f"day {index + 1}: {count} records, {len(users)} users; false alerts so far: "
            f"engine {len(clean_engine.firing)}, static {len(clean_static.firing)}"
        )
    assert static is not None
    active = round(sum(users_per_day) / len(users_per_day))
    clean_engine.active_users = clean_static.active_users = active

    log("incident replay of the last day, engine restored from its checkpoint")
    incidents = incident_plan(days - 1)
    restored = AnomalyEngine.restore(checkpoint, traffic.prices)
    restored_static: StaticBaseline = pickle.loads(static_checkpoint)
    incident_engine, incident_static = ReplayResult(), ReplayResult()
    incident_records = replay(
        inject(traffic, traffic.day(days - 1), incidents, args.seed + 99),
        [(restored, incident_engine), (restored_static, incident_static)],
    )
    outcomes = [outcome(i, incident_engine, incident_static, traffic) for i in incidents]
    # Static rules are judged on days 2.. only (day 1 calibrated them).
    static_days = max(days - 1, 1)
    expected_scopes = {(EXPECTED_KIND[i.kind], i.scope) for i in incidents}
    others = [e for e in incident_engine.firing if (e.kind, e.scope) not in expected_scopes]
    collateral = Counter(f"{e.kind} {e.scope}" for e in others)
    return {
        "plan": {
            "days": days,
            "seed": args.seed,
            "trace_calls_per_hour": len(traffic.calls),
            "rhythm": f"keep {RHYTHM_LOW:.0%}..100% of the trace by time of day, "
            f"peak {RHYTHM_PEAK_HOUR:.0f}:00 UTC",
            "records_clean": clean_engine.records,
            "records_incident_day": incident_records,
            "active_users_per_day": active,
            "incident_minutes": INCIDENT_MINUTES,
            "settings": asdict(settings),
            "static_thresholds": asdict(static.limits),
        },
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
        },
        "incidents": [asdict(o) for o in outcomes],
        "false_alerts": {
            "engine": false_alert_summary(clean_engine, days),
            "static": false_alert_summary(clean_static, static_days),
            "static_days_judged": static_days,
        },
        "incident_day_other_alerts_engine": dict(collateral),
        "incident_day_other_alert_messages": [f"{e.at:%H:%M:%S} {e.message}" for e in others],
        "cpu_seconds": {
            "engine_clean": round(clean_engine.seconds, 1),
            "engine_incident_day": round(incident_engine.seconds, 1),
            "static_clean": round(clean_static.seconds, 1),
            "engine_us_per_record": round(
                1e6 * clean_engine.seconds / max(clean_engine.records, 1), 1
            ),
        },
    }


def _delay(value: float | None) -> str:
    return "missed" if value is None else f"{value:.0f} s"


def markdown(report: dict[str, Any]) -> str:
    plan = report["plan"]
    engine_false = report["false_alerts"]["engine"]
    static_false = report["false_alerts"]["static"]
    lines = [
        "## Tollgate anomaly detection: detection delay and false alerts",
        "",
        f"Azure conversation trace replayed over {plan['days']} simulated days "
        f"({plan['rhythm']}), {plan['records_clean']:,} records, "
        f"{plan['active_users_per_day']} active users/day, seed {plan['seed']}. Incidents "
        f"({plan['incident_minutes']} min each) injected into the last day, engine restored "
        "from its checkpoint at the start of that day.",
        "",
        "| incident | scope | start (UTC) | typical rate /min | engine delay | static delay |",
        "|---|---|---|--:|--:|--:|",
    ]
    for o in report["incidents"]:
        lines.append(
            f"| {o['incident']} | {o['scope']} | {o['start'][11:19]} | "
            f"{o['normal_rate_per_min']} | {_delay(o['engine_delay_s'])} | "
            f"{_delay(o['static_delay_s'])} |"
        )
    incidents = report["incidents"]
    total = len(incidents)

    def within(key: str) -> int:
        return sum(1 for o in incidents if o[key] is not None and o[key] <= TARGET_DELAY_S)

    engine_within, static_within = within("engine_delay_s"), within("static_delay_s")
    engine_rate = engine_false["per_day_per_100_active_users"]
    static_rate = static_false["per_day_per_100_active_users"]
    all_fast = engine_within == total
    quiet = engine_rate < TARGET_FALSE_PER_DAY_PER_100
    better = engine_within > static_within and engine_rate < static_rate
    lines += [
        "",
        "| clean replay | engine | static baseline |",
        "|---|--:|--:|",
        f"| false alerts (firing) | {engine_false['firing_alerts']} "
        f"| {static_false['firing_alerts']} |",
        f"| days judged | {plan['days']} | {report['false_alerts']['static_days_judged']} |",
        f"| per simulated day per 100 active users | {engine_rate} | {static_rate} |",
        f"| incidents detected within {TARGET_DELAY_S:.0f} s | {engine_within}/{total} "
        f"| {static_within}/{total} |",
        "",
        f"Targets: every incident within {TARGET_DELAY_S:.0f} s: "
        f"{'met' if all_fast else 'MISSED'}; < {TARGET_FALSE_PER_DAY_PER_100} false alert "
        f"per day per 100 users: {'met' if quiet else 'MISSED'}; better than the static "
        f"baseline on both: {'yes' if better else 'NO'}.",
        f"Engine CPU: {report['cpu_seconds']['engine_us_per_record']} µs per record "
        f"(single thread); whole run {report.get('wall_seconds', '?')} s.",
        "",
        "Other firing alerts on the incident day (consequences of the incidents, e.g. the "
        "global volume during a runaway loop): "
        + (
            ", ".join(
                f"{k} ({v})" for k, v in sorted(report["incident_day_other_alerts_engine"].items())
            )
            or "none"
        )
        + ".",
        "False alerts of the engine on the clean replay: "
        + ("; ".join(engine_false["examples"]) or "none")
        + ".",
    ]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.anomaly",
        description="Anomaly detection on a replayed trace: delay per incident, false alerts.",
    )
    parser.add_argument("--days", type=int, default=3, help="simulated days (default 3)")
    parser.add_argument("--quick", action="store_true", help="2 simulated days")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--json-out", default=None, help="also write the JSON figures here")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="override a DetectorSettings field for an experiment, e.g. volume_p_value=1e-4",
    )
    args = parser.parse_args(argv)
    args.settings = {}
    for item in args.set:
        name, _, text = item.partition("=")
        try:
            args.settings[name] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            raise SystemExit(f"--set {item}: the value must be a Python literal") from None
    if args.quick:
        args.days = 2
    if args.days < 2:
        raise SystemExit(
            "--days must be at least 2 (day 1 warms up and calibrates the static rules)"
        )
    return args


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
