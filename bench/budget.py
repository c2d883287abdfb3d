"""How far past a budget cap does spend go, and how fast does the block arrive?

One run, one machine, real parts: a local Kafka broker, the Faust spend worker
(``tollgate worker``), the upstream simulator (realistic latency) and the dispatcher
(``tollgate serve``), each in its own process. Four configurations:

``on/json``, ``on/stream``
    budget reservations on (the default, ``TOLLGATE_BUDGET_RESERVATIONS=true``):
    non-streamed and streamed calls.
``off/json``, ``off/stream``
    reservations off: only spend already seen (the agent's count plus the dispatcher's
    own spend since) stops a request.

Each configuration has its own topic prefix (``TOLLGATE_TOPIC_PREFIX``), so its own
spend worker and topics, a fresh dispatcher, and a fresh user with a monthly cap C set
with ``PUT /v1/budgets/user:<id>``. 64 concurrent clients of that one user send gpt-4o
calls of varied sizes (three prompt sizes; ``X-Sim-Completion-Tokens`` forces 50..400
output tokens; ``max_tokens=400``) and each client stops at its first 402 (bounded by a
request count and a time limit).

Measured per configuration:

- **spent**: the worker's settled ``BudgetDecision.spent_usd_nanos`` for the user, read
  from the compacted ``budget.decisions`` topic once it stops changing, cross-checked
  against the sum of ``cost_usd_nanos`` of the user's ``Usage`` events on ``usage``.
- **overshoot** = spent - C, in USD and in units of the run's largest single request.
- **decision latency**: for every decision for the user, the time a tailing consumer
  (its own thread and event loop in this process) saw it minus its ``counted_through``
  (event time of the newest usage it counts); and **breach → blocked**: the ``ts`` of
  the usage event whose cost crossed C to the first ``state=blocked`` decision seen.

Targets: overshoot ≤ 1 largest request with reservations on (one dispatcher); decision
latency p99 ≤ 500 ms.

Run ``python -m bench.budget`` (``--quick`` for a smoke run, ``--json-out FILE`` to keep
the figures). See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from bench.gateway import (
    CLK_TCK,
    HOST,
    REPO,
    Child,
    _sigterm_to_exit,
    clean_env,
    cpu_seconds,
    free_port,
    host_cpu,
    log,
    percentile,
    prompts,
    spawn,
    wait_drained,
    wait_http,
    wait_quiet,
)

MODEL = "gpt-4o"
MAX_TOKENS = 400
MIN_FORCED_TOKENS = 50
CHAT_PATH = "/v1/chat/completions"
NANOS = 1_000_000_000
TARGET_OVERSHOOT_UNITS = 1.0
TARGET_DECISION_P99_MS = 500.0
PROBE_USER = "__bench_probe__"
PROMPT_NAMES = ("short", "chat", "rag")  # ~0.3, 2 and 7 KB of bench.gateway's prompts
CONFIGS: tuple[tuple[str, bool, bool], ...] = (
    # (name, reservations, stream)
    ("on/json", True, False),
    ("off/json", False, False),
    ("on/stream", True, True),
    ("off/stream", False, True),
)


# -- reading Kafka --------------------------------------------------------------------------
@dataclass
class Seen:
    seen_s: float  # wall clock (time.time()) when the tailing consumer got it
    key: str  # the record's Kafka key: the scope of a decision, the user of a usage event
    record: dict[str, Any]


class TopicTail:
    """Tails a topic from the beginning in its own thread and event loop.

    A thread of its own, so that the load generator's event loop does not delay the
    moment a record is seen (only the GIL's switch interval, 5 ms, can).
    """

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self._seen: list[Seen] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name=f"tail:{topic}", daemon=True)

    def start(self, timeout_s: float = 30.0) -> None:
        self._thread.start()
        if not self._ready.wait(timeout_s):
            raise RuntimeError(f"could not tail {self.topic}: {self._error!r}")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def seen(self, key: str) -> list[Seen]:
        with self._lock:
            return [s for s in self._seen if s.key == key]

    def _main(self) -> None:
        try:
            asyncio.run(self._run())
        except BaseException as exc:  # reported by start() or when read
            self._error = exc
            self._ready.set()

    async def _run(self) -> None:
        from aiokafka import AIOKafkaConsumer

        from app.codec import EventCodec

        codec = EventCodec()
        consumer = AIOKafkaConsumer(
            self.topic,
            group_id=None,  # every partition, no group coordination
            bootstrap_servers=self.bootstrap,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            fetch_max_wait_ms=100,
        )
        await consumer.start()
        try:
            while not self._stop.is_set():
                batch = await consumer.getmany(timeout_ms=100)
                seen_s = time.time()
                if consumer.assignment():
                    self._ready.set()  # from the beginning: nothing can be missed from here
                for messages in batch.values():
                    for m in messages:
                        if m.key is None or m.value is None:
                            continue
                        record = codec.decode(
                            m.value, topic=m.topic, partition=m.partition, offset=m.offset
                        ).record
                        with self._lock:
                            self._seen.append(Seen(seen_s, m.key.decode(), record))
        finally:
            await consumer.stop()


async def read_topic(bootstrap: str, topic: str) -> list[dict[str, Any]]:
    """Every record of ``topic`` up to its current end, decoded, in partition+offset order."""
    from aiokafka import AIOKafkaConsumer

    from app.codec import EventCodec

    codec = EventCodec()
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=None,  # every partition is assigned to this consumer
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    await consumer.start()
    try:
        deadline = time.monotonic() + 60
        by_partition: dict[int, list[dict[str, Any]]] = {}
        while not consumer.assignment():  # the first fetches get the metadata and assign
            if time.monotonic() > deadline:
                raise RuntimeError(f"topic {topic} has no partitions")
            for tp, messages in (await consumer.getmany(timeout_ms=100)).items():
                for m in messages:  # from the beginning: keep them
                    if m.value is not None:
                        record = codec.decode(
                            m.value, topic=m.topic, partition=m.partition, offset=m.offset
                        ).record
                        by_partition.setdefault(tp.partition, []).append(record)
        partitions = sorted(consumer.assignment())
        end = await consumer.end_offsets(partitions)
        while time.monotonic() < deadline:
            positions = {tp: await consumer.position(tp) for tp in partitions}
            if all(positions[tp] >= end[tp] for tp in partitions):
                break
            batch = await consumer.getmany(timeout_ms=200, max_records=10_000)
            for tp, messages in batch.items():
                for m in messages:
                    if m.offset < end[tp] and m.value is not None:
                        record = codec.decode(
                            m.value, topic=m.topic, partition=m.partition, offset=m.offset
                        ).record
                        by_partition.setdefault(tp.partition, []).append(record)
        else:
            raise RuntimeError(f"could not read {topic} to its end within 60 s")
    finally:
        await consumer.stop()
    return [r for p in sorted(by_partition) for r in by_partition[p]]


async def compacted_decision(bootstrap: str, topic: str, scope: str) -> dict[str, Any] | None:
    """The latest decision for ``scope`` on the compacted topic, read afresh (CompactedView)."""
    from app.codec import EventCodec
    from app.compacted import CompactedView

    view = CompactedView(bootstrap, topic, EventCodec())
    await view.start(15.0)
    await view.stop()
    return view.records.get(scope)


# -- load generator --------------------------------------------------------------------------
@dataclass
class Outcome:
    """One request as the client saw it."""

    status: int  # 0 = transport error
    sent_s: float  # wall clock
    done_s: float
    request_id: str | None = None
    forced_tokens: int = 0
    reason: str | None = None  # a 402's reason, or the error kind
    usage: tuple[int, int] | None = None  # (prompt, completion) tokens the client was told
    cost_nanos: int | None = None  # a 200's cost: its Usage event's cost_usd_nanos


def response_usage(data: bytes, stream: bool) -> tuple[int, int] | None:
    """(prompt_tokens, completion_tokens) of a completion or of a stream's usage chunk."""
    try:
        if not stream:
            usage = orjson.loads(data).get("usage") or {}
            return int(usage["prompt_tokens"]), int(usage["completion_tokens"])
        for line in reversed(data.split(b"\n")):
            if line.startswith(b"data: {") and b'"usage":{' in line:
                usage = orjson.loads(line[6:])["usage"]
                return int(usage["prompt_tokens"]), int(usage["completion_tokens"])
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
        pass
    return None


def request_bodies(stream: bool) -> list[bytes]:
    """The three prompts (~0.3, 2 and 7 KB), ``max_tokens=400``; streams ask for usage."""
    bodies = []
    for name, messages in prompts():
        if name not in PROMPT_NAMES:
            continue
        body: dict[str, Any] = {"model": MODEL, "messages": messages, "max_tokens": MAX_TOKENS}
        if stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        bodies.append(orjson.dumps(body))
    return bodies


def _reason_402(data: bytes) -> str:
    try:
        message = str(orjson.loads(data)["error"]["message"])
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return "unparsable"
    if "(" in message and ")" in message:
        return message[message.index("(") + 1 : message.index(")")]
    return message[:60]


async def drive_until_blocked(
    url: str,
    user: str,
    stream: bool,
    clients: int,
    max_requests: int,
    max_seconds: float,
    seed: int,
) -> tuple[list[Outcome], bool]:
    """``clients`` closed-loop clients of ``user``, each until its first 402.

    Returns the outcomes and whether every client got its 402 (False: the request
    count or the time limit stopped them first).
    """
    bodies = request_bodies(stream)
    rng = random.Random(seed)
    outcomes: list[Outcome] = []
    blocked_clients = 0
    sent = 0
    deadline = time.monotonic() + max_seconds
    headers = {
        "Content-Type": "application/json",
        "Authorization": "Bearer sk-bench-not-checked",
        "X-Tollgate-User": user,
    }
    connector = aiohttp.TCPConnector(limit=clients * 2)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def client() -> None:
            nonlocal blocked_clients, sent
            while sent < max_requests and time.monotonic() < deadline:
                sent += 1
                forced = rng.randint(MIN_FORCED_TOKENS, MAX_TOKENS)
                body = bodies[rng.randrange(len(bodies))]
                started = time.time()
                outcome = Outcome(0, started, started, forced_tokens=forced)
                try:
                    async with session.post(
                        url,
                        data=body,
                        headers={**headers, "X-Sim-Completion-Tokens": str(forced)},
                    ) as resp:
                        data = await resp.read()  # a stream: to its last byte
                        outcome.status = resp.status
                        outcome.request_id = resp.headers.get("X-Request-Id")
                        if resp.status == 402:
                            outcome.reason = _reason_402(data)
                        elif resp.status != 200:
                            outcome.reason = f"http_{resp.status}"
                        elif stream and not data.rstrip().endswith(b"data: [DONE]"):
                            outcome.reason = "stream_without_done"
                        else:
                            outcome.usage = response_usage(data, stream)
                            if outcome.usage is None:
                                outcome.reason = "no_usage_in_response"
                except (aiohttp.ClientError, TimeoutError) as exc:
                    outcome.reason = type(exc).__name__
                outcome.done_s = time.time()
                outcomes.append(outcome)
                if outcome.status == 402:
                    blocked_clients += 1
                    return

        await asyncio.gather(*(client() for _ in range(clients)))
    return outcomes, blocked_clients == clients


# -- results ----------------------------------------------------------------------------------
@dataclass
class ConfigResult:
    config: str
    reservations: bool
    stream: bool
    user: str
    topic_prefix: str
    limit_usd: float
    clients: int
    requests_sent: int = 0
    served_200: int = 0
    blocked_402: int = 0
    errors: int = 0
    error_kinds: dict[str, int] = field(default_factory=dict)
    reasons_402: dict[str, int] = field(default_factory=dict)
    every_client_got_402: bool = False
    load_s: float = 0.0
    usage_events: int = 0
    usage_sum_usd: float = 0.0
    usage_events_match_admitted: bool = False
    served_cost_usd: float = 0.0  # sum over the 200s of their Usage event's cost
    client_priced_usd: float = 0.0  # the 200s priced from the usage in their responses
    client_priced_matches_usage: bool = False
    decision_spent_usd: float | None = None
    decision_state: str | None = None
    spent_agrees_with_usage: bool = False
    settle_s: float = 0.0
    spent_usd: float | None = None  # the settled decision's spent (authoritative)
    largest_request_usd: float = 0.0
    mean_request_usd: float = 0.0
    overshoot_usd: float | None = None
    overshoot_units: float | None = None  # overshoot / largest request
    counted_after_breach: int = 0  # usage events after the one that crossed C
    counted_after_breach_sent_before: int = 0  # ... of requests sent before that event's ts
    counted_after_breach_sent_after: int = 0  # ... of requests admitted after the breach
    breach_event_index: int | None = None  # 0-based position of the crossing event
    # decisions whose spent misses usage with ts <= their counted_through (same-ms events)
    decisions_short_of_counted_through: int = 0
    max_short_usd: float = 0.0
    decisions: int = 0
    decision_latency_ms: list[float] = field(default_factory=list)
    decision_p50_ms: float | None = None
    decision_p99_ms: float | None = None
    decision_max_ms: float | None = None
    worker_ms_p50: float | None = None  # counted_through -> decision ts (worker side)
    worker_ms_p99: float | None = None
    delivery_ms_p50: float | None = None  # decision ts -> seen by the tail
    delivery_ms_p99: float | None = None
    usage_visible_ms_p50: float | None = None  # usage ts -> seen on Kafka by a tail
    usage_visible_ms_p99: float | None = None
    breach_to_blocked_ms: float | None = None
    breach_to_first_limit_402_ms: float | None = None
    other_load_cores: float = 0.0
    cpu_cores: dict[str, float] = field(default_factory=dict)  # per process, during the load
    usage_events_per_s: float = 0.0  # calls served per second of load
    problems: list[str] = field(default_factory=list)
    worker_start_notes: list[str] = field(default_factory=list)  # start-up crashes, retried
    load_started_s: float = 0.0  # wall clock; the timelines below are ms after it
    # per decision: seen, ts, counted_through (ms), spent_usd, state, reason
    decision_timeline: list[dict[str, Any]] = field(default_factory=list)
    # per usage event in topic order: [ts ms, visible on Kafka ms, cost USD]
    usage_timeline: list[list[float | None]] = field(default_factory=list)


@dataclass
class Report:
    plan: dict[str, Any]
    machine: dict[str, Any] = field(default_factory=dict)
    results: list[ConfigResult] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)


def _ms(values: Sequence[float], q: float) -> float | None:
    return percentile(sorted(values), q) if values else None


def analyse(
    result: ConfigResult,
    outcomes: list[Outcome],
    usage: list[dict[str, Any]],
    decision: dict[str, Any] | None,
    seen: list[Seen],
) -> None:
    """Fill ``result`` from the client outcomes, the user's usage events and decisions."""
    limit = round(result.limit_usd * NANOS)
    statuses = Counter(o.status for o in outcomes)
    result.requests_sent = len(outcomes)
    result.served_200 = statuses[200]
    result.blocked_402 = statuses[402]
    failed = [o for o in outcomes if o.status not in (200, 402) or (o.status == 200 and o.reason)]
    result.errors = len(failed)
    result.error_kinds = dict(Counter(o.reason or "?" for o in failed))
    result.reasons_402 = dict(Counter(o.reason or "?" for o in outcomes if o.status == 402))

    admitted = sum(1 for o in outcomes if o.status not in (402, 0))
    costs = [int(r["cost_usd_nanos"]) for r in usage]
    total = sum(costs)
    result.usage_events = len(usage)
    result.usage_sum_usd = total / NANOS
    result.usage_events_match_admitted = len(usage) == admitted
    if not result.usage_events_match_admitted:
        result.problems.append(f"{len(usage)} usage events for {admitted} admitted requests")
    unpriced = sum(1 for r in usage if r.get("price_unknown"))
    if unpriced:
        result.problems.append(f"{unpriced} usage events without a price")
    if costs:
        result.largest_request_usd = max(costs) / NANOS
        result.mean_request_usd = total / len(costs) / NANOS

    if decision is not None:
        spent = int(decision["spent_usd_nanos"])
        result.decision_spent_usd = spent / NANOS
        result.decision_state = str(decision["state"])
        result.spent_agrees_with_usage = spent == total
        if spent != total:
            result.problems.append(
                f"decision spent {spent} nano-USD != usage sum {total} nano-USD "
                f"(difference {spent - total})"
            )
        result.spent_usd = spent / NANOS
        result.overshoot_usd = (spent - limit) / NANOS
        if costs:
            result.overshoot_units = (spent - limit) / max(costs)
    else:
        result.problems.append("no decision for the user on budget.decisions")

    # Each 200's cost (its Usage event), and the same cost priced here from the tokens
    # the client was told: a third way of counting, which must agree.
    from app.pricing import PriceCatalog

    prices = PriceCatalog()
    by_request = {o.request_id: o for o in outcomes if o.request_id}
    cost_by_request = {r["request_id"]: int(r["cost_usd_nanos"]) for r in usage}
    client_total = 0
    for o in outcomes:
        if o.status != 200:
            continue
        o.cost_nanos = cost_by_request.get(o.request_id or "")
        if o.cost_nanos is None:
            result.problems.append(f"a 200 without a Usage event (request {o.request_id})")
        if o.usage is not None:
            client_total += prices.cost(MODEL, *o.usage).cost_usd_nanos
    result.served_cost_usd = sum(o.cost_nanos or 0 for o in outcomes) / NANOS
    result.client_priced_usd = client_total / NANOS
    result.client_priced_matches_usage = client_total == total
    if client_total != total:
        result.problems.append(
            f"the 200s priced from the tokens in their responses sum to {client_total} "
            f"nano-USD, the Usage events to {total}"
        )

    # The usage event that crossed C, and what was counted after it.
    cumulative = 0
    breach: dict[str, Any] | None = None
    for index, record in enumerate(usage):
        cumulative += int(record["cost_usd_nanos"])
        if cumulative >= limit:
            breach, result.breach_event_index = record, index
            break
    if breach is not None and result.breach_event_index is not None:
        breach_s = breach["ts"].timestamp()
        after = usage[result.breach_event_index + 1 :]
        result.counted_after_breach = len(after)
        for record in after:
            outcome = by_request.get(record["request_id"])
            if outcome is not None and outcome.sent_s > breach_s:
                result.counted_after_breach_sent_after += 1
            else:
                result.counted_after_breach_sent_before += 1
        blocked = [s for s in seen if s.record["state"] == "blocked"]
        if blocked:
            result.breach_to_blocked_ms = (blocked[0].seen_s - breach_s) * 1000
        limit_402 = [o.done_s for o in outcomes if o.status == 402 and o.reason == "limit reached"]
        if limit_402:
            result.breach_to_first_limit_402_ms = (min(limit_402) - breach_s) * 1000
    elif decision is not None:
        result.problems.append("the usage events never reached C")

    # A decision says it counts every usage with ts <= counted_through; the gate drops
    # its local spend up to that instant. Check the claim against the usage events.
    ts_costs = [(int(r["ts"].timestamp() * 1000), int(r["cost_usd_nanos"])) for r in usage]
    for s in seen:
        claimed = s.record.get("counted_through")
        if claimed is None:
            continue
        through_ms = int(claimed.timestamp() * 1000)
        upto = sum(cost for ts_ms, cost in ts_costs if ts_ms <= through_ms)
        missing = upto - int(s.record["spent_usd_nanos"])
        if missing > 0:
            result.decisions_short_of_counted_through += 1
            result.max_short_usd = max(result.max_short_usd, missing / NANOS)

    latencies, worker, delivery = [], [], []
    for s in seen:
        through: datetime | None = s.record.get("counted_through")
        if through is None:
            continue
        latencies.append((s.seen_s - through.timestamp()) * 1000)
        worker.append((s.record["ts"].timestamp() - through.timestamp()) * 1000)
        delivery.append((s.seen_s - s.record["ts"].timestamp()) * 1000)
    result.decisions = len(seen)
    t0 = result.load_started_s

    def rel(wall_s: float) -> float:
        return round((wall_s - t0) * 1000, 1)

    for s in seen:
        through = s.record.get("counted_through")
        result.decision_timeline.append(
            {
                "seen_ms": rel(s.seen_s),
                "ts_ms": rel(s.record["ts"].timestamp()),
                "counted_through_ms": rel(through.timestamp()) if through else None,
                "spent_usd": s.record["spent_usd_nanos"] / NANOS,
                "state": s.record["state"],
                "reason": s.record.get("reason"),
            }
        )
    result.decision_latency_ms = [round(v, 1) for v in latencies]
    result.decision_p50_ms = _ms(latencies, 0.50)
    result.decision_p99_ms = _ms(latencies, 0.99)
    result.decision_max_ms = max(latencies) if latencies else None
    result.worker_ms_p50, result.worker_ms_p99 = _ms(worker, 0.5), _ms(worker, 0.99)
    result.delivery_ms_p50, result.delivery_ms_p99 = _ms(delivery, 0.5), _ms(delivery, 0.99)


def summarise(report: Report) -> None:
    on = [r for r in report.results if r.reservations]
    every = [v for r in report.results for v in r.decision_latency_ms]
    pooled_p99 = _ms(every, 0.99)
    report.summary = {
        "target_overshoot_units_reservations_on": TARGET_OVERSHOOT_UNITS,
        "overshoot_target_met": {
            r.config: r.overshoot_units is not None and r.overshoot_units <= TARGET_OVERSHOOT_UNITS
            for r in on
        },
        "target_decision_p99_ms": TARGET_DECISION_P99_MS,
        "decision_p99_target_met": {
            r.config: r.decision_p99_ms is not None and r.decision_p99_ms <= TARGET_DECISION_P99_MS
            for r in report.results
        },
        "decision_latency_pooled": {
            "n": len(every),
            "p50_ms": _ms(every, 0.5),
            "p99_ms": pooled_p99,
            "max_ms": max(every) if every else None,
        },
        "on_vs_off": [
            {
                "kind": "stream" if stream else "json",
                "overshoot_usd_on": _get(report, True, stream, "overshoot_usd"),
                "overshoot_usd_off": _get(report, False, stream, "overshoot_usd"),
                "overshoot_units_on": _get(report, True, stream, "overshoot_units"),
                "overshoot_units_off": _get(report, False, stream, "overshoot_units"),
            }
            for stream in (False, True)
        ],
        "problems": {r.config: r.problems for r in report.results if r.problems},
    }


def _get(report: Report, reservations: bool, stream: bool, name: str) -> Any:
    for r in report.results:
        if r.reservations == reservations and r.stream == stream:
            return getattr(r, name)
    return None


def _f(value: float | None, digits: int = 1, signed: bool = False) -> str:
    if value is None or math.isnan(value):
        return "-"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def markdown(report: Report) -> str:
    plan = report.plan
    lines = [
        "## Tollgate budget caps: overshoot and decision latency",
        "",
        f"{plan['clients']} concurrent clients of one user per configuration, `{MODEL}`, "
        f"prompts of {', '.join(str(b) for b in plan['prompt_bytes'])} bytes, "
        f"`X-Sim-Completion-Tokens` uniform in {MIN_FORCED_TOKENS}..{MAX_TOKENS}, "
        f"`max_tokens={MAX_TOKENS}`; each client stops at its first 402. Monthly cap "
        f"C = ${plan['limit_usd']}. Simulator `latency_scale={plan['latency_scale']}` (TTFT "
        f"median {plan['ttft_ms_median']:.0f} ms, {plan['ms_per_chunk']:.1f} ms per 4-token "
        f"chunk). One dispatcher. {report.machine.get('cpus')} CPUs, Python "
        f"{report.machine.get('python')}. Topics: "
        f"{'one prefix per configuration' if not plan['shared_topics'] else 'one shared prefix'}."
        f" Code: commit {report.machine.get('git_head')}, uncommitted changes in "
        f"app/ and agents/: {len(report.machine.get('uncommitted_in_app_agents') or [])} "
        "file(s) (listed in the JSON).",
        "",
        "| config | requests served | 402s | spent $ | C $ | overshoot $ "
        "| overshoot / largest request | decision latency p50 ms | p99 ms | breach→blocked ms |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in report.results:
        lines.append(
            f"| {r.config} | {r.served_200} | {r.blocked_402} | {_f(r.spent_usd, 6)} "
            f"| {r.limit_usd:.2f} | {_f(r.overshoot_usd, 6, signed=True)} "
            f"| {_f(r.overshoot_units, 2, signed=True)} | {_f(r.decision_p50_ms)} "
            f"| {_f(r.decision_p99_ms)} | {_f(r.breach_to_blocked_ms)} |"
        )
    lines += [
        "",
        "| config | largest request $ | mean request $ | counted after the breach "
        "(sent before / after it) | 402 reasons | errors | usage events = admitted "
        "| decision spent = Usage sum = 200s priced from their responses "
        "| decisions short of their counted_through (max $) "
        "| breach→first 'limit reached' 402 ms | load s "
        "| other load |",
        "|---|--:|--:|---|---|--:|---|---|--:|--:|--:|--:|",
    ]
    for r in report.results:
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(r.reasons_402.items())) or "-"
        lines.append(
            f"| {r.config} | {r.largest_request_usd:.6f} | {r.mean_request_usd:.6f} "
            f"| {r.counted_after_breach} ({r.counted_after_breach_sent_before} / "
            f"{r.counted_after_breach_sent_after}) | {reasons} | {r.errors} "
            f"| {'yes' if r.usage_events_match_admitted else 'NO'} "
            f"| {'yes' if r.spent_agrees_with_usage else 'NO'} = "
            f"{'yes' if r.client_priced_matches_usage else 'NO'} "
            f"| {r.decisions_short_of_counted_through} of {r.decisions} "
            f"({r.max_short_usd:.6f}) "
            f"| {_f(r.breach_to_first_limit_402_ms)} | {r.load_s:.1f} "
            f"| {r.other_load_cores:.2f} |"
        )
    lines += [
        "",
        "Decision latency, broken down (ms, p50/p99): usage event `ts` → visible on Kafka; "
        "`counted_through` → decision `ts` (includes that delivery, the worker's consumption "
        "and its 250 ms refresh timer); decision `ts` → seen by the tail.",
        "",
        "| config | decisions | usage visible | counted_through → decision ts "
        "| decision ts → seen | total p50 / p99 / max | calls/s | CPU cores: worker / "
        "dispatcher / Kafka / simulator / bench |",
        "|---|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in report.results:
        lines.append(
            f"| {r.config} | {r.decisions} "
            f"| {_f(r.usage_visible_ms_p50)} / {_f(r.usage_visible_ms_p99)} "
            f"| {_f(r.worker_ms_p50)} / {_f(r.worker_ms_p99)} "
            f"| {_f(r.delivery_ms_p50)} / {_f(r.delivery_ms_p99)} "
            f"| {_f(r.decision_p50_ms)} / {_f(r.decision_p99_ms)} / {_f(r.decision_max_ms)} "
            f"| {r.usage_events_per_s:.0f} | "
            + " / ".join(
                _f(r.cpu_cores.get(k), 2)
                for k in ("worker", "dispatcher", "kafka", "simulator", "bench")
            )
            + " |"
        )
    s = report.summary
    pooled = s["decision_latency_pooled"]
    lines.append("")
    for config, met in s["overshoot_target_met"].items():
        r = next(x for x in report.results if x.config == config)
        verdict = "met" if met else "MISSED"
        if not met and r.overshoot_units is not None:
            verdict += f" by {r.overshoot_units - TARGET_OVERSHOOT_UNITS:.2f} largest requests"
        lines.append(
            f"- Target overshoot ≤ 1 largest request ({config}): {verdict} "
            f"({_f(r.overshoot_units, 2, signed=True)})."
        )
    for config, met in s["decision_p99_target_met"].items():
        r = next(x for x in report.results if x.config == config)
        verdict = "met" if met else "MISSED"
        if not met and r.decision_p99_ms is not None:
            verdict += f" by {r.decision_p99_ms - TARGET_DECISION_P99_MS:.0f} ms"
        lines.append(
            f"- Target decision latency p99 ≤ {TARGET_DECISION_P99_MS:.0f} ms ({config}, "
            f"n={r.decisions}): {verdict} ({_f(r.decision_p99_ms)} ms)."
        )
    lines.append(
        f"- All decisions pooled: n={pooled['n']}, p50 {_f(pooled['p50_ms'])} ms, "
        f"p99 {_f(pooled['p99_ms'])} ms, max {_f(pooled['max_ms'])} ms."
    )
    for config, problems in s["problems"].items():
        lines.append(f"- PROBLEM in {config}: {'; '.join(problems)}")
    for r in report.results:
        for note in r.worker_start_notes:
            lines.append(f"- Spend worker start-up retried before {r.config}: {note}")
    lines.append(
        "- `other load` = CPU (cores) used during the load by processes this benchmark did "
        "not start."
    )
    return "\n".join(lines)


# -- processes -----------------------------------------------------------------------------
def _tollgate_argv(command: str) -> list[str]:
    tollgate_bin = Path(sys.executable).with_name("tollgate")
    if tollgate_bin.exists():
        return [str(tollgate_bin), command]
    return [sys.executable, "-m", "app", command]


@dataclass
class Lane:
    """A topic prefix with its topics, its spend worker and a tail of its decisions."""

    prefix: str
    worker: Child
    tail: TopicTail  # budget.decisions
    usage_tail: TopicTail  # usage: when each event became visible on Kafka


def start_lane(
    tag: str, bootstrap: str, tmp: Path, children: list[Child], tails: list[TopicTail]
) -> Lane:
    from app.settings import Settings
    from app.topics import ensure_topics

    prefix = f"bb{uuid.uuid4().hex[:6]}{tag}"
    settings = Settings(kafka_bootstrap=bootstrap, topic_prefix=prefix)
    asyncio.run(ensure_topics(settings))
    state_dir = tmp / f"worker-{prefix}"
    state_dir.mkdir(parents=True)  # Faust creates its data dir in it, but not the parents
    env = clean_env(
        TOLLGATE_KAFKA_BOOTSTRAP=bootstrap,
        TOLLGATE_TOPIC_PREFIX=prefix,
        TOLLGATE_STATE_DIR=str(state_dir),
        TOLLGATE_LOG_LEVEL="WARNING",
    )
    worker = spawn(f"worker-{prefix}", _tollgate_argv("worker"), env, tmp)
    children.append(worker)
    tail = TopicTail(bootstrap, settings.topic("budget.decisions"))
    usage_tail = TopicTail(bootstrap, settings.topic("usage"))
    for each in (tail, usage_tail):
        tails.append(each)
        each.start()
    return Lane(prefix, worker, tail, usage_tail)


def start_dispatcher(
    name: str,
    lane: Lane,
    bootstrap: str,
    simulator_url: str,
    reservations: bool,
    tmp: Path,
    children: list[Child],
) -> tuple[Child, str]:
    port = free_port()
    upstreams = [
        {
            "name": "sim",
            "base_url": f"{simulator_url}/v1",
            "models": [MODEL, "gpt-4o-mini"],
            "price_provider": "openai",
            "forward_headers": ["X-Sim-*"],
        }
    ]
    env = clean_env(
        TOLLGATE_DISPATCHER_HOST=HOST,
        TOLLGATE_DISPATCHER_PORT=str(port),
        TOLLGATE_KAFKA_BOOTSTRAP=bootstrap,
        TOLLGATE_TOPIC_PREFIX=lane.prefix,
        TOLLGATE_STATE_DIR=str(tmp / f"dispatcher-{name.replace('/', '-')}"),
        TOLLGATE_UPSTREAMS=json.dumps(upstreams),
        TOLLGATE_BUDGET_RESERVATIONS="true" if reservations else "false",
        TOLLGATE_LOG_LEVEL="WARNING",
        TOLLGATE_LOG_FORMAT="json",
    )
    child = spawn(f"dispatcher-{name.replace('/', '-')}", _tollgate_argv("serve"), env, tmp)
    children.append(child)
    return child, f"http://{HOST}:{port}"


async def put_budget(base_url: str, scope: str, body: dict[str, Any]) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.put(f"{base_url}/v1/budgets/{scope}", json=body) as resp,
    ):
        if resp.status != 200:
            raise RuntimeError(f"PUT /v1/budgets/{scope}: HTTP {resp.status} {await resp.text()}")


async def wait_worker_ready(lane: Lane, bootstrap: str, timeout_s: float) -> float:
    """Prove the worker consumes: a probe user with a cap must get a decision.

    As ``tests.integration.harness.wait_worker_ready`` does (policy and usage straight
    to Kafka), but the usage is resent every 2 s (the probe's policy may reach the
    worker after its first usage event). Returns the seconds it took.
    """
    from aiokafka import AIOKafkaProducer

    from app.budgets.admin import policy_record
    from app.budgets.policy import parse_policy
    from app.codec import EventCodec
    from app.settings import Settings
    from app.usage import UsageProducer

    started = time.monotonic()
    scope = f"user:{PROBE_USER}"
    settings = Settings(kafka_bootstrap=bootstrap, topic_prefix=lane.prefix)
    policy = parse_policy(scope, {"period": "day", "limit_usd": 1000})
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        await producer.send_and_wait(
            settings.topic("budget.policies"),
            EventCodec().encode("BudgetPolicy", policy_record(policy, "bench")),
            key=scope.encode(),
        )
    finally:
        await producer.stop()
    usage = UsageProducer(settings)
    await usage.start()
    try:
        while time.monotonic() - started < timeout_s:
            if not lane.worker.alive():
                raise RuntimeError(f"the spend worker died:\n{lane.worker.log_tail()}")
            await usage.report(
                model="gpt-4o-mini", prompt_tokens=1, completion_tokens=1, user_id=PROBE_USER
            )
            for _ in range(20):
                if lane.tail.seen(scope):
                    return time.monotonic() - started
                await asyncio.sleep(0.1)
    finally:
        await usage.stop()
    raise RuntimeError(f"the spend worker of {lane.prefix} made no decision in {timeout_s:.0f}s")


def worker_crashes(worker: Child) -> list[str]:
    """Lines of the worker's log that report a crashed Faust service or agent."""
    return [line for line in worker.log_tail(1000).splitlines() if "Crashed reason=" in line]


def ready_lane(
    tag: str,
    bootstrap: str,
    args: argparse.Namespace,
    tmp: Path,
    children: list[Child],
    tails: list[TopicTail],
) -> tuple[Lane, list[str]]:
    """A lane whose worker is proven ready, and notes on the attempts that failed.

    A worker whose agent crashed while starting (seen: Faust's ``PartitionsMismatch``
    on a changelog topic it had just created) is replaced by a fresh lane, twice at most.
    """
    notes: list[str] = []
    for attempt in range(1, 4):
        lane = start_lane(tag, bootstrap, tmp, children, tails)
        waited = asyncio.run(wait_worker_ready(lane, bootstrap, args.worker_timeout))
        time.sleep(1.0)  # a start-up crash is logged within a second or so of joining
        crashes = worker_crashes(lane.worker)
        if not crashes and lane.worker.alive():
            log(f"  spend worker of {lane.prefix} proved ready in {waited:.1f}s")
            return lane, notes
        notes.append(
            f"attempt {attempt}: the worker of {lane.prefix} crashed at start-up: "
            f"{crashes[0].strip()[:400] if crashes else 'exited'}"
        )
        log(f"  {notes[-1]}; starting a fresh lane")
        stop_lane(lane)
    raise RuntimeError("the spend worker crashed at start-up three times: " + " | ".join(notes))


def stop_lane(lane: Lane) -> None:
    lane.tail.stop()
    lane.usage_tail.stop()
    lane.worker.stop(grace_s=10)


async def wait_policy_on_topic(bootstrap: str, prefix: str, scope: str, timeout_s: float) -> None:
    """Wait until the policy is on ``budget.policies`` (the worker tails that topic)."""
    topic = f"{prefix}.budget.policies"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        records = await read_topic(bootstrap, topic)
        if any(r.get("scope") == scope for r in records):
            return
        await asyncio.sleep(0.2)
    raise RuntimeError(f"the policy of {scope} never reached {topic}")


async def settle(lane: Lane, scope: str, expected_nanos: int, timeout_s: float) -> float:
    """Wait until the last decision for ``scope`` counts ``expected_nanos`` and nothing
    newer comes for 1 s. Returns the seconds waited."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        seen = lane.tail.seen(scope)
        if seen and seen[-1].record["spent_usd_nanos"] == expected_nanos:
            count = len(seen)
            await asyncio.sleep(1.0)
            if len(lane.tail.seen(scope)) == count:
                return time.monotonic() - started
            continue
        await asyncio.sleep(0.1)
    return time.monotonic() - started


def run_config(
    *,
    name: str,
    reservations: bool,
    stream: bool,
    lane: Lane,
    bootstrap: str,
    simulator_url: str,
    args: argparse.Namespace,
    tmp: Path,
    children: list[Child],
    fixed_pids: dict[str, int],
    seed: int,
) -> ConfigResult:
    dispatcher, base_url = start_dispatcher(
        name, lane, bootstrap, simulator_url, reservations, tmp, children
    )
    user = f"bench-{name.replace('/', '-')}-{uuid.uuid4().hex[:6]}"
    scope = f"user:{user}"
    result = ConfigResult(
        config=name,
        reservations=reservations,
        stream=stream,
        user=user,
        topic_prefix=lane.prefix,
        limit_usd=args.limit_usd,
        clients=args.clients,
    )
    try:
        asyncio.run(wait_http(base_url + "/readyz", dispatcher, kafka=True))
        asyncio.run(put_budget(base_url, scope, {"period": "month", "limit_usd": args.limit_usd}))
        asyncio.run(wait_policy_on_topic(bootstrap, lane.prefix, scope, 15.0))
        time.sleep(1.0)  # the worker's policy view polls every 200 ms: let it apply the policy
        pids = {**fixed_pids, "worker": lane.worker.pid, "dispatcher": dispatcher.pid}
        cpu_before = {proc: cpu_seconds(pid) for proc, pid in pids.items()}
        cpu_before["bench"] = time.process_time()
        host_before = host_cpu()
        started = time.monotonic()
        result.load_started_s = time.time()
        outcomes, all_blocked = asyncio.run(
            drive_until_blocked(
                base_url + CHAT_PATH,
                user,
                stream,
                args.clients,
                args.max_requests,
                args.max_seconds,
                seed,
            )
        )
        result.load_s = time.monotonic() - started
        cpu_after = {proc: cpu_seconds(pid) for proc, pid in pids.items()}
        cpu_after["bench"] = time.process_time()
        busy = (host_cpu()[0] - host_before[0]) / CLK_TCK
        used = {proc: cpu_after[proc] - cpu_before[proc] for proc in cpu_before}
        result.cpu_cores = {proc: round(v / result.load_s, 2) for proc, v in used.items()}
        result.other_load_cores = max(0.0, (busy - sum(used.values())) / result.load_s)
        result.usage_events_per_s = sum(1 for o in outcomes if o.status == 200) / result.load_s
        result.every_client_got_402 = all_blocked
        if not all_blocked:
            result.problems.append(
                f"not every client got a 402 within {args.max_requests} requests / "
                f"{args.max_seconds:.0f} s"
            )
        if not dispatcher.alive():
            raise RuntimeError(f"the dispatcher died:\n{dispatcher.log_tail()}")
        _metrics, depth, drained_s = asyncio.run(wait_drained(base_url, 30))
        usage = [
            r
            for r in asyncio.run(read_topic(bootstrap, f"{lane.prefix}.usage"))
            if r["user_id"] == user
        ]
        expected = sum(int(r["cost_usd_nanos"]) for r in usage)
        result.settle_s = asyncio.run(settle(lane, scope, expected, 30.0))
        decision = asyncio.run(
            compacted_decision(bootstrap, f"{lane.prefix}.budget.decisions", scope)
        )
        analyse(result, outcomes, usage, decision, lane.tail.seen(scope))
        crashes = worker_crashes(lane.worker)
        if crashes or not lane.worker.alive():
            result.problems.append(f"the spend worker crashed: {crashes[:1] or 'exited'}")
        visible = {u.record["event_id"]: u.seen_s for u in lane.usage_tail.seen(user)}
        result.usage_timeline = [
            [
                round((r["ts"].timestamp() - result.load_started_s) * 1000, 1),
                round((visible[r["event_id"]] - result.load_started_s) * 1000, 1)
                if r["event_id"] in visible
                else None,
                int(r["cost_usd_nanos"]) / NANOS,
            ]
            for r in usage
        ]
        usage_lag = [
            (u.seen_s - u.record["ts"].timestamp()) * 1000 for u in lane.usage_tail.seen(user)
        ]
        result.usage_visible_ms_p50 = _ms(usage_lag, 0.5)
        result.usage_visible_ms_p99 = _ms(usage_lag, 0.99)
        log(
            f"  {result.served_200} served, {result.blocked_402} x 402 in {result.load_s:.1f}s; "
            f"spent ${_f(result.spent_usd, 6)} of ${args.limit_usd}; overshoot "
            f"{_f(result.overshoot_units, 2, signed=True)} largest requests; decisions "
            f"{result.decisions}, p99 {_f(result.decision_p99_ms)} ms; spool {depth:.0f} "
            f"drained in {drained_s:.1f}s; problems: {result.problems or 'none'}"
        )
    finally:
        dispatcher.stop()
    return result


def run_benchmark(args: argparse.Namespace) -> int:
    from app.kafka_local import LocalKafka
    from app.settings import Settings
    from app.simulator import SimulatorConfig

    sim = SimulatorConfig(latency_scale=args.latency_scale)
    plan = {
        "clients": args.clients,
        "limit_usd": args.limit_usd,
        "max_requests": args.max_requests,
        "max_seconds": args.max_seconds,
        "latency_scale": args.latency_scale,
        "ttft_ms_median": sim.ttft_ms_median * args.latency_scale,
        "ms_per_chunk": sim.inter_token_ms * args.latency_scale * 4,
        "prompt_bytes": [len(b) for b in request_bodies(False)],
        "model": MODEL,
        "max_tokens": MAX_TOKENS,
        "forced_completion_tokens": [MIN_FORCED_TOKENS, MAX_TOKENS],
        "shared_topics": args.shared_topics,
        "seed": args.seed,
        "quick": args.quick,
        "configs": [c[0] for c in selected_configs(args)],
    }
    report = Report(plan=plan)
    report.machine = {
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "other_load_before_start": wait_quiet(args.wait_quiet) if args.wait_quiet > 0 else None,
        **source_state(),
    }
    tmp = Path(tempfile.mkdtemp(prefix="tollgate-bench-budget-"))
    children: list[Child] = []
    tails: list[TopicTail] = []
    launcher: LocalKafka | None = None
    started = time.monotonic()
    try:
        kafka_settings = Settings(
            kafka_bootstrap=f"{HOST}:{args.kafka_port}",
            kafka_controller_port=args.kafka_controller_port,
            state_dir=tmp / "kafka-state",
        )
        bootstrap = kafka_settings.kafka_bootstrap
        log(f"starting Kafka on {bootstrap} (state in {tmp})")
        launcher = LocalKafka(kafka_settings)
        kafka = launcher.start()
        log(f"Kafka ready in {kafka.start_seconds:.1f}s (pid {kafka.pid})")
        sim_port = free_port()
        argv = [sys.executable, "-m", "bench.gateway", "--serve-simulator"]
        argv += ["--port", str(sim_port), "--latency-scale", str(args.latency_scale)]
        simulator = spawn("simulator", [*argv, "--seed", str(args.seed)], clean_env(), tmp)
        children.append(simulator)
        simulator_url = f"http://{HOST}:{sim_port}"
        asyncio.run(wait_http(simulator_url + "/healthz", simulator))
        fixed_pids = {"kafka": kafka.pid, "simulator": simulator.pid}
        shared: Lane | None = None
        for index, (name, reservations, stream) in enumerate(selected_configs(args)):
            log(
                f"{name}: reservations {'on' if reservations else 'off'}, "
                f"{'stream' if stream else 'json'}"
            )
            notes: list[str] = []
            if args.shared_topics:
                if shared is None:
                    shared, notes = ready_lane("all", bootstrap, args, tmp, children, tails)
                lane = shared
            else:
                tag = name.replace("/", "")
                lane, notes = ready_lane(tag, bootstrap, args, tmp, children, tails)
            try:
                result = run_config(
                    name=name,
                    reservations=reservations,
                    stream=stream,
                    lane=lane,
                    bootstrap=bootstrap,
                    simulator_url=simulator_url,
                    args=args,
                    tmp=tmp,
                    children=children,
                    fixed_pids=fixed_pids,
                    seed=args.seed + index,
                )
            finally:
                if not args.shared_topics:
                    stop_lane(lane)
            result.worker_start_notes = notes
            report.results.append(result)
    finally:
        for tail in tails:
            tail.stop()
        for child in reversed(children):
            child.stop(grace_s=10)
        if launcher is not None:
            log("stopping Kafka")
            try:
                launcher.stop()
            except Exception as exc:  # report it, and still remove the temp dir
                log(f"could not stop Kafka: {exc}")
        if args.keep_temp:
            log(f"kept logs and state in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    report.machine["total_seconds"] = round(time.monotonic() - started, 1)
    summarise(report)
    document = orjson.dumps(
        asdict(report), option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS
    ).decode()
    print(markdown(report))
    print()
    print(document)
    if args.json_out:
        Path(args.json_out).write_text(document + "\n")
        log(f"wrote {args.json_out}")
    return 0


def source_state() -> dict[str, Any]:
    """The commit measured, and uncommitted changes to the code the benchmark runs."""

    def git(*argv: str) -> str:
        done = subprocess.run(["git", *argv], cwd=REPO, capture_output=True, text=True)
        return done.stdout.strip()

    return {
        "git_head": git("rev-parse", "--short", "HEAD"),
        "uncommitted_in_app_agents": git("status", "--porcelain", "app", "agents").splitlines(),
    }


def selected_configs(args: argparse.Namespace) -> list[tuple[str, bool, bool]]:
    wanted = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = set(wanted) - {c[0] for c in CONFIGS}
    if unknown:
        raise SystemExit(
            f"unknown configuration(s) {sorted(unknown)}; from {[c[0] for c in CONFIGS]}"
        )
    return [c for c in CONFIGS if c[0] in wanted]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.budget",
        description="Budget-cap overshoot and decision latency, reservations on vs off.",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run (< 90 s): one shared topic prefix and worker, C = $0.20",
    )
    parser.add_argument(
        "--limit-usd", type=float, default=None, help="the cap C in USD (default 5; quick 0.2)"
    )
    parser.add_argument("--clients", type=int, default=64, help="concurrent clients (64)")
    parser.add_argument("--max-requests", type=int, default=20_000, help="per configuration")
    parser.add_argument("--max-seconds", type=float, default=None, help="load time limit")
    parser.add_argument(
        "--configs", default=",".join(c[0] for c in CONFIGS), help="comma list of configurations"
    )
    parser.add_argument(
        "--shared-topics",
        action="store_true",
        help="one topic prefix and one worker for every configuration (--quick sets it)",
    )
    parser.add_argument(
        "--latency-scale",
        type=float,
        default=0.1,
        help="simulator delay multiplier (0.1: TTFT median 20 ms, 0.5 ms/token)",
    )
    parser.add_argument("--seed", type=int, default=20240601)
    parser.add_argument("--kafka-port", type=int, default=39192)
    parser.add_argument("--kafka-controller-port", type=int, default=39193)
    parser.add_argument("--worker-timeout", type=float, default=90.0)
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=None,
        help="wait up to this many seconds for an idle machine first (default 60; quick 0)",
    )
    parser.add_argument("--json-out", default=None, help="also write the JSON figures here")
    parser.add_argument("--keep-temp", action="store_true", help="keep logs and state")
    args = parser.parse_args(argv)
    if args.quick:
        args.shared_topics = True
    if args.limit_usd is None:
        args.limit_usd = 0.2 if args.quick else 5.0
    if args.wait_quiet is None:
        args.wait_quiet = 0.0 if args.quick else 60.0
    if args.max_seconds is None:
        args.max_seconds = 20.0 if args.quick else 60.0
    if args.limit_usd <= 0 or args.clients < 1:
        raise SystemExit("--limit-usd and --clients must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # The tails start right after their topics are created: aiokafka logs (and retries)
    # "not leader" errors until the new partitions have leaders. Noise here.
    logging.getLogger("aiokafka.consumer.fetcher").addFilter(
        lambda record: "NotLeaderForPartitionError" not in record.getMessage()
    )
    signal.signal(signal.SIGTERM, _sigterm_to_exit)  # so that `finally` cleans up
    # Children of a background job inherit an ignored SIGINT unless we install a handler.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    with contextlib.suppress(KeyboardInterrupt):
        return run_benchmark(args)
    return 130


if __name__ == "__main__":
    sys.exit(main())
