"""Budget caps on real parts: overshoot, decision latency, false refusals, exactness after crashes.

One run, one machine, real parts: a local Kafka broker, the Faust spend worker
(``tollgate worker``), the upstream simulator (realistic latency) and the dispatcher
(``tollgate serve``), each in its own process. Four measurements (issue 10):

1. **Overshoot and decision latency**, four configurations: budget reservations on (the
   default) and off (the baseline: only spend already seen stops a request), each with
   non-streamed (``json``) and streamed calls. 64 concurrent clients of one fresh user
   with a monthly cap C send gpt-4o calls of varied sizes (three prompt sizes,
   ``X-Sim-Completion-Tokens`` uniform in 50..400, ``max_tokens=400``); each client stops
   at its first 402. Overshoot = the worker's settled spend - C. Decision latency: for
   every usage event of the user, from its ``ts`` to the first decision seen by a tailing
   consumer whose ``counted_offsets[partition]`` is past the event's offset. Breach ->
   blocked: from the crossing event's ``ts`` to the first ``state=blocked`` decision seen.
2. **False refusals in a sequential run**: one client, one call at a time, gpt-4o
   without ``max_tokens``, until the first 402 at or past the cap; ``paced`` waits for
   the worker's decision between calls, ``back-to-back`` does not. Every 402 received
   while the real spend (the answered calls priced from the usage in their responses)
   is below the cap is a false refusal (must be 0), and the client goes on.
3. **Refused while under the cap**: 32 and 64 concurrent clients of one user, with and
   without ``max_tokens``, each until a 402 "limit reached" (a retryable 402 "requests
   in flight would exceed the limit" is retried). The share of calls answered 402 while
   the real spend was below the cap, the calls the gate capped
   (``X-Tollgate-Max-Tokens-Capped``) and how many of those were cut short
   (``finish_reason: "length"``), and the admission time (client send -> the
   dispatcher's Request event) of capped calls and refusals against uncapped calls.
4. **Exactness after worker kills**: load from 16 clients (8 users, 2 features) while
   ``tollgate worker`` is SIGKILLed N times at random moments and restarted; then the
   worker's decision per scope (each user, each feature, global) against the sum of the
   distinct usage events (by ``event_id``) read back from the topic, in nano-dollars.

Run ``python -m bench.budget`` (``--quick`` for a smoke run, ``--json-out FILE`` to keep
the figures). See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import functools
import json
import logging
import math
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
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
    publish,
    spawn,
    stop_kafka_and_temp,
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
CAPPED_HEADER = "X-Tollgate-Max-Tokens-Capped"
LIMIT_REACHED = "limit reached"
IN_FLIGHT = "requests in flight would exceed the limit"  # the gate's retryable refusal
CONFIGS: tuple[tuple[str, bool, bool], ...] = (
    # (name, reservations, stream)
    ("on/json", True, False),
    ("off/json", False, False),
    ("on/stream", True, True),
    ("off/stream", False, True),
)
KILL_USERS = tuple(f"kill-{i}" for i in range(8))
KILL_FEATURES = ("chat", "search")
KILL_POLICIES = {"user:*": 1000, "feature:*": 1000, "global": 100_000}  # USD: never reached


# -- reading Kafka --------------------------------------------------------------------------
@dataclass
class Message:
    """One decoded record, where it sits on its topic, and when a tail saw it."""

    partition: int
    offset: int
    timestamp_ms: int  # the Kafka timestamp (the spool's append time for dispatcher events)
    key: str
    record: dict[str, Any]
    seen_s: float | None = None  # wall clock (time.time()) a TopicTail got it


def _decoded(codec: Any, m: Any, seen_s: float | None = None) -> Message | None:
    if m.key is None or m.value is None:
        return None
    record = codec.decode(m.value, topic=m.topic, partition=m.partition, offset=m.offset).record
    return Message(m.partition, m.offset, m.timestamp, m.key.decode(), record, seen_s)


class TopicTail:
    """Tails a topic from the beginning in its own thread and event loop.

    A thread of its own, so that the load generator's event loop does not delay the
    moment a record is seen (only the GIL's switch interval, 5 ms, can).
    """

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self._seen: list[Message] = []
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

    def seen(self, key: str | None = None) -> list[Message]:
        with self._lock:
            return [s for s in self._seen if key is None or s.key == key]

    def _main(self) -> None:
        try:
            asyncio.run(self._run())
        except BaseException as exc:  # reported by start() or when read
            self._error = exc
            self._ready.set()

    async def _run(self) -> None:
        from aiokafka import AIOKafkaConsumer

        from app.events.codec import EventCodec

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
                        message = _decoded(codec, m, seen_s)
                        if message is not None:
                            with self._lock:
                                self._seen.append(message)
        finally:
            await consumer.stop()


async def read_topic(bootstrap: str, topic: str) -> list[Message]:
    """Every record of ``topic`` up to its current end, decoded, in partition+offset order."""
    from aiokafka import AIOKafkaConsumer

    from app.events.codec import EventCodec
    from app.events.compacted import assigned_partitions

    codec = EventCodec()
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    await consumer.start()
    try:
        consumer.subscribe([topic])
        partitions = await assigned_partitions(consumer, 60.0)
        if not partitions:
            raise RuntimeError(f"topic {topic} has no partitions")
        await consumer.seek_to_beginning(*partitions)
        end = await consumer.end_offsets(partitions)
        by_partition: dict[int, list[Message]] = defaultdict(list)
        deadline = time.monotonic() + 60
        while [tp for tp in partitions if await consumer.position(tp) < end[tp]]:
            if time.monotonic() > deadline:
                raise RuntimeError(f"could not read {topic} to its end within 60 s")
            batch = await consumer.getmany(timeout_ms=200, max_records=10_000)
            for tp, messages in batch.items():
                for m in messages:
                    message = _decoded(codec, m) if m.offset < end[tp] else None
                    if message is not None:
                        by_partition[tp.partition].append(message)
    finally:
        await consumer.stop()
    return [m for p in sorted(by_partition) for m in by_partition[p]]


async def compacted_decisions(bootstrap: str, topic: str) -> dict[str, dict[str, Any]]:
    """The latest decision of every scope on the compacted topic, read afresh."""
    from app.events.codec import EventCodec
    from app.events.compacted import CompactedView
    from app.settings import Settings

    view = CompactedView(Settings(kafka_bootstrap=bootstrap), topic, EventCodec())
    await view.start(15.0)
    await view.stop()
    return dict(view.records)


# -- calls ----------------------------------------------------------------------------------
@dataclass
class Outcome:
    """One request as the client saw it."""

    status: int  # 0 = transport error
    sent_s: float  # wall clock
    done_s: float
    client: int = 0
    request_id: str | None = None
    forced_tokens: int = 0
    reason: str | None = None  # a 402's reason ("limit reached", ...), or the error kind
    decided_by: str | None = None  # a 402's: "spend_worker" or "this_gateway"
    message: str | None = None  # a 402's message
    usage: tuple[int, int] | None = None  # (prompt, completion) tokens the client was told
    finish_reason: str | None = None
    capped_to: int | None = None  # X-Tollgate-Max-Tokens-Capped: the output cap the gate set
    real_cost_nanos: int | None = None  # a 200 priced here from the usage in its response


Lengths = Callable[[random.Random], int]


def uniform_lengths(rng: random.Random) -> int:
    """Completion lengths of the overshoot runs: uniform in 50..400 (``max_tokens=400``)."""
    return rng.randint(MIN_FORCED_TOKENS, MAX_TOKENS)


def natural_lengths(rng: random.Random) -> int:
    """The simulator's own natural completion length: lognormal (median 150, sigma 0.6),
    1..1024. Drawn here, as the simulator's draw depends only on the messages."""
    from devtools.simulator import SimulatorConfig

    cfg = SimulatorConfig()
    n = round(cfg.completion_tokens_median * math.exp(cfg.completion_tokens_sigma * rng.gauss()))
    return max(1, min(n, cfg.completion_tokens_max))


def natural_max_tokens() -> int:
    """``max_tokens`` of the runs "with max_tokens": the longest natural completion, so the
    client's own limit never cuts a call (only the gate's cap can)."""
    from devtools.simulator import SimulatorConfig

    return SimulatorConfig().completion_tokens_max


def request_bodies(stream: bool, max_tokens: int | None = MAX_TOKENS) -> list[bytes]:
    """The three prompts (~0.3, 2 and 7 KB); streams ask for usage."""
    bodies = []
    for name, messages in prompts():
        if name not in PROMPT_NAMES:
            continue
        body: dict[str, Any] = {"model": MODEL, "messages": messages}
        if max_tokens is not None:
            body["max_tokens"] = max_tokens
        if stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        bodies.append(orjson.dumps(body))
    return bodies


def parse_answer(data: bytes, stream: bool) -> tuple[tuple[int, int] | None, str | None]:
    """((prompt_tokens, completion_tokens), finish_reason) of a completion or a stream."""
    usage: tuple[int, int] | None = None
    finish: str | None = None
    try:
        if not stream:
            document = orjson.loads(data)
            finish = (document.get("choices") or [{}])[0].get("finish_reason")
            u = document.get("usage") or {}
            return (int(u["prompt_tokens"]), int(u["completion_tokens"])), finish
        for line in reversed(data.split(b"\n")):
            if not line.startswith(b"data: {"):
                continue
            chunk = orjson.loads(line[6:])
            if usage is None and chunk.get("usage"):
                usage = (
                    int(chunk["usage"]["prompt_tokens"]),
                    int(chunk["usage"]["completion_tokens"]),
                )
            for choice in chunk.get("choices") or []:
                finish = finish or choice.get("finish_reason")
            if usage is not None and finish is not None:
                break
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError, IndexError):
        pass
    return usage, finish


def parse_refusal(data: bytes) -> tuple[str, str | None, str]:
    """(reason, decided_by, message) of a 402's error body."""
    try:
        error = orjson.loads(data)["error"]
        message = str(error["message"])
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return "unparsable", None, data[:200].decode(errors="replace")
    reason = error.get("reason")
    if not reason and "(" in message and ")" in message:
        reason = message[message.index("(") + 1 : message.index(")")]
    return str(reason or message[:60]), error.get("decided_by"), message


async def post_call(
    session: aiohttp.ClientSession, url: str, body: bytes, headers: dict[str, str], stream: bool
) -> Outcome:
    """One call, read to its last byte, and what its answer says."""
    started = time.time()
    outcome = Outcome(0, started, started)
    try:
        async with session.post(url, data=body, headers=headers) as resp:
            data = await resp.read()  # a stream: to its last byte
            outcome.status = resp.status
            outcome.request_id = resp.headers.get("X-Request-Id")
            capped = resp.headers.get(CAPPED_HEADER)
            outcome.capped_to = int(capped) if capped else None
            if resp.status == 402:
                outcome.reason, outcome.decided_by, outcome.message = parse_refusal(data)
            elif resp.status != 200:
                outcome.reason = f"http_{resp.status}"
            elif stream and not data.rstrip().endswith(b"data: [DONE]"):
                outcome.reason = "stream_without_done"
            else:
                outcome.usage, outcome.finish_reason = parse_answer(data, stream)
                if outcome.usage is None:
                    outcome.reason = "no_usage_in_response"
    except (aiohttp.ClientError, TimeoutError) as exc:
        outcome.reason = type(exc).__name__
    outcome.done_s = time.time()
    return outcome


@functools.cache
def price_catalog() -> Any:
    from app.pricing.catalog import PriceCatalog

    return PriceCatalog()


def real_cost(outcome: Outcome) -> int:
    """What a served call really cost: its response's usage, priced (0 for the rest)."""
    if outcome.status != 200 or outcome.usage is None:
        return 0
    if outcome.real_cost_nanos is None:
        outcome.real_cost_nanos = price_catalog().cost(MODEL, *outcome.usage).cost_usd_nanos
    return outcome.real_cost_nanos


def prompt_cost(outcome: Outcome) -> int:
    """What a served call's prompt alone cost."""
    if outcome.usage is None:
        return 0
    return int(price_catalog().cost(MODEL, outcome.usage[0], 0).cost_usd_nanos)


def client_headers(user: str, feature: str | None = None) -> dict[str, str]:
    headers = {
        "Content-Type": "application/json",
        "Authorization": "Bearer sk-bench-not-checked",
        "X-Tollgate-User": user,
    }
    if feature:
        headers["X-Tollgate-Feature"] = feature
    return headers


async def drive(
    url: str,
    *,
    identities: Sequence[dict[str, str]],
    clients: int,
    bodies: Sequence[bytes],
    stream: bool,
    lengths: Lengths,
    stop_client: Callable[[Outcome], bool],
    max_requests: int,
    max_seconds: float,
    seed: int,
    pace_s: float = 0.0,
    until: asyncio.Event | None = None,
) -> tuple[list[Outcome], int]:
    """``clients`` closed-loop clients (client i sends as ``identities[i % len]``), each until
    ``stop_client`` says so for one of its outcomes, ``until`` is set, or the request count or
    time limit is hit. Each call takes at least ``pace_s``. Returns the outcomes and how many
    clients ``stop_client`` stopped."""
    rng = random.Random(seed)
    outcomes: list[Outcome] = []
    stopped = 0
    sent = 0
    deadline = time.monotonic() + max_seconds
    connector = aiohttp.TCPConnector(limit=clients * 2)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def client(index: int) -> None:
            nonlocal stopped, sent
            headers = identities[index % len(identities)]
            while sent < max_requests and time.monotonic() < deadline:
                if until is not None and until.is_set():
                    return
                sent += 1
                forced = lengths(rng)
                body = bodies[rng.randrange(len(bodies))]
                started = time.monotonic()
                outcome = await post_call(
                    session, url, body, {**headers, "X-Sim-Completion-Tokens": str(forced)}, stream
                )
                outcome.client, outcome.forced_tokens = index, forced
                outcomes.append(outcome)
                if stop_client(outcome):
                    stopped += 1
                    return
                if outcome.status == 0:
                    await asyncio.sleep(0.2)  # the dispatcher is not answering: not a busy loop
                await asyncio.sleep(max(0.0, pace_s - (time.monotonic() - started)))

        await asyncio.gather(*(client(i) for i in range(clients)))
    return outcomes, stopped


def _ms(values: Sequence[float], q: float) -> float | None:
    return percentile(sorted(values), q) if values else None


def _quantiles(values: Sequence[float]) -> dict[str, Any]:
    return {
        "n": len(values),
        "p50_ms": _ms(values, 0.5),
        "p99_ms": _ms(values, 0.99),
        "max_ms": max(values) if values else None,
    }


def _by_request(messages: Sequence[Message], status: str | None = None) -> dict[str, Message]:
    return {
        m.record["request_id"]: m
        for m in messages
        if m.record.get("request_id") and (status is None or m.record.get("status") == status)
    }


# -- 1: overshoot and decision latency --------------------------------------------------------
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
    capped_calls: int = 0  # 200s the gate gave an output cap (header)
    counted_after_breach: int = 0  # usage events after the one that crossed C
    counted_after_breach_sent_before: int = 0  # ... of requests sent before that event's ts
    counted_after_breach_sent_after: int = 0  # ... of requests admitted after the breach
    breach_event_index: int | None = None  # 0-based position of the crossing event
    decisions: int = 0
    # decisions whose spent differs from the user's distinct usage below their counted_offsets
    decisions_not_matching_their_offsets: int = 0
    max_offsets_mismatch_usd: float = 0.0
    # per usage event: its ts -> the first decision seen that counts it (counted_offsets)
    decision_latency_ms: list[float] = field(default_factory=list)
    decision_p50_ms: float | None = None
    decision_p99_ms: float | None = None
    decision_max_ms: float | None = None
    decision_from_kafka_ts_p50_ms: float | None = None  # from the Kafka timestamp instead
    decision_from_kafka_ts_p99_ms: float | None = None
    usage_never_counted_by_a_decision: int = 0
    usage_visible_ms_p50: float | None = None  # usage ts -> seen on Kafka by a tail
    usage_visible_ms_p99: float | None = None
    worker_ms_p50: float | None = None  # usage seen on Kafka -> ts of its first decision
    worker_ms_p99: float | None = None
    delivery_ms_p50: float | None = None  # decision ts -> seen by the tail
    delivery_ms_p99: float | None = None
    breach_to_blocked_ms: float | None = None
    breach_to_first_limit_402_ms: float | None = None
    other_load_cores: float = 0.0
    cpu_cores: dict[str, float] = field(default_factory=dict)  # per process, during the load
    usage_events_per_s: float = 0.0  # calls served per second of load
    problems: list[str] = field(default_factory=list)
    worker_start_notes: list[str] = field(default_factory=list)  # start-up crashes, retried
    load_started_s: float = 0.0  # wall clock; the timelines below are ms after it
    # per decision: seen, ts (ms), spent_usd, state, reason, counted_offsets
    decision_timeline: list[dict[str, Any]] = field(default_factory=list)
    # per usage event in topic order: [ts ms, visible on Kafka ms, cost USD, counted ms]
    usage_timeline: list[list[float | None]] = field(default_factory=list)


def counted_through(decision: dict[str, Any], partition: int) -> int:
    """The offset of ``partition`` below which ``decision`` counts every usage event."""
    return int((decision.get("counted_offsets") or {}).get(str(partition), 0))


def first_counting(usage: Sequence[Message], decisions: Sequence[Message]) -> list[int | None]:
    """For each usage event, the index (in the order the tail saw them) of the first decision
    whose ``counted_offsets`` is past the event's offset, or None."""
    reach: dict[int, list[int]] = {}  # partition -> running max of counted_offsets
    for p in {u.partition for u in usage}:
        running, best = [], 0
        for d in decisions:
            best = max(best, counted_through(d.record, p))
            running.append(best)
        reach[p] = running
    out: list[int | None] = []
    for u in usage:
        index = bisect.bisect_right(reach[u.partition], u.offset)
        out.append(index if index < len(decisions) else None)
    return out


def offsets_mismatches(usage: Sequence[Message], decisions: Sequence[Message]) -> list[int]:
    """Per decision whose spent differs from the cost of the distinct usage events (first
    arrival of each event id) below its ``counted_offsets`` in its period: the difference."""
    ordered = sorted(usage, key=lambda m: (m.partition, m.offset))
    out = []
    for d in decisions:
        start, end = d.record["period_start"], d.record["resets_at"]
        ids: set[str] = set()
        expected = 0
        for u in ordered:
            if u.offset >= counted_through(d.record, u.partition):
                continue
            event_id = u.record["event_id"]
            if event_id in ids:
                continue
            ids.add(event_id)
            if start <= u.record["ts"] < end:
                expected += int(u.record["cost_usd_nanos"])
        if expected != int(d.record["spent_usd_nanos"]):
            out.append(int(d.record["spent_usd_nanos"]) - expected)
    return out


def analyse_config(
    result: ConfigResult,
    outcomes: list[Outcome],
    usage: list[Message],
    decision: dict[str, Any] | None,
    seen: list[Message],
    visible: dict[tuple[int, int], float],
) -> None:
    """Fill ``result`` from the client outcomes, the user's usage events and decisions.

    ``visible``: (partition, offset) of a usage event -> when the usage tail saw it."""
    limit = round(result.limit_usd * NANOS)
    statuses = Counter(o.status for o in outcomes)
    result.requests_sent = len(outcomes)
    result.served_200 = statuses[200]
    result.blocked_402 = statuses[402]
    failed = [o for o in outcomes if o.status not in (200, 402) or (o.status == 200 and o.reason)]
    result.errors = len(failed)
    result.error_kinds = dict(Counter(o.reason or "?" for o in failed))
    result.reasons_402 = dict(Counter(o.reason or "?" for o in outcomes if o.status == 402))
    result.capped_calls = sum(1 for o in outcomes if o.status == 200 and o.capped_to is not None)

    admitted = sum(1 for o in outcomes if o.status not in (402, 0))
    records = [m.record for m in usage]
    costs = [int(r["cost_usd_nanos"]) for r in records]
    total = sum(costs)
    result.usage_events = len(records)
    result.usage_sum_usd = total / NANOS
    result.usage_events_match_admitted = len(records) == admitted
    if not result.usage_events_match_admitted:
        result.problems.append(f"{len(records)} usage events for {admitted} admitted requests")
    unpriced = sum(1 for r in records if r.get("price_unknown"))
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
    by_request = {o.request_id: o for o in outcomes if o.request_id}
    cost_by_request = {r["request_id"]: int(r["cost_usd_nanos"]) for r in records}
    served = [o for o in outcomes if o.status == 200]
    missing = [o.request_id for o in served if o.request_id not in cost_by_request]
    if missing:
        result.problems.append(f"{len(missing)} 200s without a Usage event (e.g. {missing[0]})")
    result.served_cost_usd = sum(cost_by_request.get(o.request_id or "", 0) for o in served) / NANOS
    client_total = sum(real_cost(o) for o in served)
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
    for index, record in enumerate(records):
        cumulative += int(record["cost_usd_nanos"])
        if cumulative >= limit:
            breach, result.breach_event_index = record, index
            break
    if breach is not None and result.breach_event_index is not None:
        breach_s = breach["ts"].timestamp()
        after = records[result.breach_event_index + 1 :]
        result.counted_after_breach = len(after)
        for record in after:
            outcome = by_request.get(record["request_id"])
            if outcome is not None and outcome.sent_s > breach_s:
                result.counted_after_breach_sent_after += 1
            else:
                result.counted_after_breach_sent_before += 1
        blocked = [s for s in seen if s.record["state"] == "blocked"]
        if blocked and blocked[0].seen_s is not None:
            result.breach_to_blocked_ms = (blocked[0].seen_s - breach_s) * 1000
        limit_402 = [o.done_s for o in outcomes if o.status == 402 and o.reason == LIMIT_REACHED]
        if limit_402:
            result.breach_to_first_limit_402_ms = (min(limit_402) - breach_s) * 1000
    elif decision is not None:
        result.problems.append("the usage events never reached C")

    # A decision counts every usage event below its counted_offsets: check that claim (the
    # gate drops its own record of a call as soon as a decision counts its offset).
    mismatches = offsets_mismatches(usage, seen)
    result.decisions_not_matching_their_offsets = len(mismatches)
    if mismatches:
        result.max_offsets_mismatch_usd = max(abs(d) for d in mismatches) / NANOS
        result.problems.append(
            f"{len(mismatches)} decisions whose spent differs from the usage below their "
            f"counted_offsets (largest {max(mismatches, key=abs)} nano-USD)"
        )

    # Decision latency per usage event: its ts -> the first decision seen that counts it.
    firsts = first_counting(usage, seen)
    latencies, from_kafka, shipped, worker, delivery = [], [], [], [], []
    for u, first in zip(usage, firsts, strict=True):
        if first is None:
            result.usage_never_counted_by_a_decision += 1
            continue
        d = seen[first]
        assert d.seen_s is not None
        ts_s = u.record["ts"].timestamp()
        latencies.append((d.seen_s - ts_s) * 1000)
        from_kafka.append(d.seen_s * 1000 - u.timestamp_ms)
        delivery.append((d.seen_s - d.record["ts"].timestamp()) * 1000)
        on_kafka = visible.get((u.partition, u.offset))
        if on_kafka is not None:
            shipped.append((on_kafka - ts_s) * 1000)
            worker.append((d.record["ts"].timestamp() - on_kafka) * 1000)
    if result.usage_never_counted_by_a_decision:
        result.problems.append(
            f"{result.usage_never_counted_by_a_decision} usage events no decision counts"
        )
    result.decisions = len(seen)
    result.decision_latency_ms = [round(v, 1) for v in latencies]
    result.decision_p50_ms = _ms(latencies, 0.50)
    result.decision_p99_ms = _ms(latencies, 0.99)
    result.decision_max_ms = max(latencies) if latencies else None
    result.decision_from_kafka_ts_p50_ms = _ms(from_kafka, 0.5)
    result.decision_from_kafka_ts_p99_ms = _ms(from_kafka, 0.99)
    result.usage_visible_ms_p50, result.usage_visible_ms_p99 = _ms(shipped, 0.5), _ms(shipped, 0.99)
    result.worker_ms_p50, result.worker_ms_p99 = _ms(worker, 0.5), _ms(worker, 0.99)
    result.delivery_ms_p50, result.delivery_ms_p99 = _ms(delivery, 0.5), _ms(delivery, 0.99)

    t0 = result.load_started_s

    def rel(wall_s: float | None) -> float | None:
        return None if wall_s is None else round((wall_s - t0) * 1000, 1)

    result.decision_timeline = [
        {
            "seen_ms": rel(s.seen_s),
            "ts_ms": rel(s.record["ts"].timestamp()),
            "spent_usd": s.record["spent_usd_nanos"] / NANOS,
            "state": s.record["state"],
            "reason": s.record.get("reason"),
            "counted_offsets": s.record.get("counted_offsets"),
        }
        for s in seen
    ]
    result.usage_timeline = [
        [
            rel(u.record["ts"].timestamp()),
            rel(visible.get((u.partition, u.offset))),
            int(u.record["cost_usd_nanos"]) / NANOS,
            rel(seen[first].seen_s) if first is not None else None,
        ]
        for u, first in zip(usage, firsts, strict=True)
    ]


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
        asyncio.run(set_cap(base_url, bootstrap, lane.prefix, scope, args.limit_usd))
        pids = {**fixed_pids, "worker": lane.worker.pid, "dispatcher": dispatcher.pid}
        cpu_before = {proc: cpu_seconds(pid) for proc, pid in pids.items()}
        cpu_before["bench"] = time.process_time()
        host_before = host_cpu()
        started = time.monotonic()
        result.load_started_s = time.time()
        outcomes, stopped = asyncio.run(
            drive(
                base_url + CHAT_PATH,
                identities=[client_headers(user)],
                clients=args.clients,
                bodies=request_bodies(stream),
                stream=stream,
                lengths=uniform_lengths,
                stop_client=lambda o: o.status == 402,
                max_requests=args.max_requests,
                max_seconds=args.max_seconds,
                seed=seed,
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
        result.every_client_got_402 = stopped == args.clients
        if not result.every_client_got_402:
            result.problems.append(
                f"not every client got a 402 within {args.max_requests} requests / "
                f"{args.max_seconds:.0f} s"
            )
        if not dispatcher.alive():
            raise RuntimeError(f"the dispatcher died:\n{dispatcher.log_tail()}")
        usage, decision, settle_s = collect(lane, bootstrap, base_url, user)
        result.settle_s = settle_s
        visible = {(u.partition, u.offset): u.seen_s or 0.0 for u in lane.usage_tail.seen(user)}
        analyse_config(result, outcomes, usage, decision, lane.tail.seen(scope), visible)
        crashes = worker_crashes(lane.worker)
        if crashes or not lane.worker.alive():
            result.problems.append(f"the spend worker crashed: {crashes[:1] or 'exited'}")
        log(
            f"  {result.served_200} served, {result.blocked_402} x 402 in {result.load_s:.1f}s; "
            f"spent ${_f(result.spent_usd, 6)} of ${args.limit_usd}; overshoot "
            f"{_f(result.overshoot_units, 2, signed=True)} largest requests; decision latency "
            f"p50/p99 {_f(result.decision_p50_ms)}/{_f(result.decision_p99_ms)} ms over "
            f"{result.decisions} decisions; problems: {result.problems or 'none'}"
        )
    finally:
        dispatcher.stop()
    return result


# -- 2: false refusals in a sequential run ------------------------------------------------------
@dataclass
class SequentialResult:
    mode: str  # "paced" (waits for the worker's decision between calls) or "back-to-back"
    user: str
    limit_usd: float
    calls: int = 0
    served: int = 0
    refused: int = 0
    false_refusals: int = 0  # 402s received while the real spend was below the cap
    false_refusal_messages: list[str] = field(default_factory=list)  # the first few
    ended_by_402_at_the_cap: bool = False
    capped_calls: int = 0  # served with an output cap the gate set
    capped_truncated: int = 0  # ... that the cap cut short (finish_reason "length")
    errors: int = 0
    real_spent_usd: float = 0.0
    overshoot_usd: float | None = None  # real spend - cap when the 402 came
    last_call_prompt_usd: float | None = None  # the last served call's prompt: the bound
    decision_spent_usd: float | None = None
    decision_agrees_with_real_spend: bool = False
    decision_wait_ms: dict[str, Any] = field(default_factory=dict)  # paced: per call
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)


async def sequential_calls(
    base_url: str, lane: Lane, user: str, limit_nanos: int, paced: bool, seed: int, max_calls: int
) -> tuple[list[Outcome], list[float], list[str]]:
    """One call at a time until a 402 at or past the cap (a 402 below it is counted by the
    caller, and the client goes on). Returns the outcomes, the waits for the worker's decision
    (paced) and problems."""
    rng = random.Random(seed)
    bodies = request_bodies(stream=False, max_tokens=None)
    scope = f"user:{user}"
    outcomes: list[Outcome] = []
    waits: list[float] = []
    problems: list[str] = []
    spent = 0
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        while len(outcomes) < max_calls:
            forced = natural_lengths(rng)
            headers = {**client_headers(user), "X-Sim-Completion-Tokens": str(forced)}
            body = bodies[rng.randrange(len(bodies))]
            outcome = await post_call(session, base_url + CHAT_PATH, body, headers, False)
            outcome.forced_tokens = forced
            outcomes.append(outcome)
            if outcome.status == 402 and spent >= limit_nanos:
                break
            spent += real_cost(outcome)
            if paced and outcome.status == 200:
                started = time.monotonic()
                while not any(d.record["spent_usd_nanos"] >= spent for d in lane.tail.seen(scope)):
                    if time.monotonic() - started > 30:
                        problems.append(f"no decision counted ${spent / NANOS:.6f} within 30 s")
                        break
                    await asyncio.sleep(0.01)
                waits.append((time.monotonic() - started) * 1000)
            elif outcome.status == 0:
                await asyncio.sleep(0.2)
    return outcomes, waits, problems


def run_sequential(
    base_url: str, lane: Lane, bootstrap: str, mode: str, limit_usd: float, seed: int
) -> SequentialResult:
    user = f"seq-{mode}-{uuid.uuid4().hex[:6]}"
    scope = f"user:{user}"
    result = SequentialResult(mode, user, limit_usd)
    limit = round(limit_usd * NANOS)
    asyncio.run(set_cap(base_url, bootstrap, lane.prefix, scope, limit_usd))
    started = time.monotonic()
    outcomes, waits, problems = asyncio.run(
        sequential_calls(base_url, lane, user, limit, mode == "paced", seed, max_calls=2000)
    )
    result.seconds = time.monotonic() - started
    result.problems += problems
    result.decision_wait_ms = _quantiles(waits)
    spent = 0
    for o in outcomes:
        result.calls += 1
        if o.status == 402:
            result.refused += 1
            if spent < limit:
                result.false_refusals += 1
                if len(result.false_refusal_messages) < 3:
                    result.false_refusal_messages.append(
                        f"at ${spent / NANOS:.6f} of ${limit_usd}: {o.message}"
                    )
            else:
                result.ended_by_402_at_the_cap = True
        elif o.status == 200 and o.usage is not None:
            result.served += 1
            spent += real_cost(o)
            result.last_call_prompt_usd = prompt_cost(o) / NANOS
            if o.capped_to is not None:
                result.capped_calls += 1
                result.capped_truncated += o.finish_reason == "length"
        else:
            result.errors += 1
    result.real_spent_usd = spent / NANOS
    result.overshoot_usd = (spent - limit) / NANOS
    if result.overshoot_usd > (result.last_call_prompt_usd or 0.0):
        result.problems.append(
            f"overshoot ${result.overshoot_usd:.6f} exceeds the last call's prompt "
            f"${result.last_call_prompt_usd}"
        )
    if not result.ended_by_402_at_the_cap:
        result.problems.append(f"no 402 at the cap within {result.calls} calls")
    if result.errors:
        kinds = Counter(o.reason for o in outcomes if o.status not in (200, 402))
        result.problems.append(f"{result.errors} calls failed: {dict(kinds)}")
    _usage, decision, _settle_s = collect(lane, bootstrap, base_url, user)
    if decision is not None:
        result.decision_spent_usd = int(decision["spent_usd_nanos"]) / NANOS
        result.decision_agrees_with_real_spend = int(decision["spent_usd_nanos"]) == spent
    if not result.decision_agrees_with_real_spend:
        result.problems.append(
            f"the worker's decision says ${result.decision_spent_usd}, the answered calls "
            f"cost ${spent / NANOS:.9f}"
        )
    log(
        f"  sequential {mode}: {result.served} served, {result.false_refusals} false refusals, "
        f"real spend ${result.real_spent_usd:.6f} of ${limit_usd} (overshoot "
        f"${result.overshoot_usd:+.6f}) in {result.seconds:.0f}s; {result.capped_calls} capped; "
        f"problems: {result.problems or 'none'}"
    )
    return result


# -- 3: refused while under the cap, with concurrent clients ----------------------------------
@dataclass
class ShareResult:
    clients: int
    max_tokens: int | None
    limit_usd: float
    user: str
    calls: int = 0
    served: int = 0
    refused: int = 0
    reasons_402: dict[str, int] = field(default_factory=dict)
    errors: int = 0
    # 402s while the real spend was below the cap: at the moment the dispatcher refused
    # (its Request event), counting the calls whose usage it had recorded by then
    refused_under_cap: int = 0
    refused_under_cap_share: float | None = None  # of all calls
    # the same, counting the calls whose answer the client had received by its 402
    refused_under_cap_client_order: int = 0
    # ... and counting every call admitted before the refusal at its final cost (in flight
    # included): refusals nothing could justify
    refused_under_cap_with_in_flight: int = 0
    refusal_examples: list[str] = field(default_factory=list)
    capped_calls: int = 0  # 200s with X-Tollgate-Max-Tokens-Capped
    capped_truncated: int = 0  # ... cut short by that cap (finish_reason "length")
    real_spent_usd: float = 0.0
    overshoot_usd: float | None = None
    largest_prompt_usd: float = 0.0  # the gate's stated bound: one lone call's prompt
    decision_spent_usd: float | None = None
    decision_agrees_with_real_spend: bool = False
    # client send -> the dispatcher's Request event (admitted or refused), per kind of call
    admission_ms: dict[str, dict[str, Any]] = field(default_factory=dict)
    load_s: float = 0.0
    every_client_got_limit_reached: bool = False
    problems: list[str] = field(default_factory=list)


def run_share(
    base_url: str,
    lane: Lane,
    bootstrap: str,
    clients: int,
    max_tokens: int | None,
    limit_usd: float,
    args: argparse.Namespace,
    seed: int,
) -> ShareResult:
    user = f"share-{clients}-{'mt' if max_tokens else 'nomt'}-{uuid.uuid4().hex[:6]}"
    result = ShareResult(clients, max_tokens, limit_usd, user)
    asyncio.run(set_cap(base_url, bootstrap, lane.prefix, f"user:{user}", limit_usd))
    started = time.monotonic()
    outcomes, stopped = asyncio.run(
        drive(
            base_url + CHAT_PATH,
            identities=[client_headers(user)],
            clients=clients,
            bodies=request_bodies(stream=False, max_tokens=max_tokens),
            stream=False,
            lengths=natural_lengths,
            stop_client=lambda o: o.status == 402 and o.reason != IN_FLIGHT,
            max_requests=args.max_requests,
            max_seconds=args.max_seconds * 2,
            seed=seed,
        )
    )
    result.load_s = time.monotonic() - started
    result.every_client_got_limit_reached = stopped == clients
    if not result.every_client_got_limit_reached:
        result.problems.append(f"{clients - stopped} clients never got 'limit reached'")
    usage, decision, _settle_s = collect(lane, bootstrap, base_url, user)
    requests = [
        m
        for m in asyncio.run(read_topic(bootstrap, f"{lane.prefix}.requests"))
        if m.record["user_id"] == user
    ]
    analyse_share(result, outcomes, usage, requests, decision)
    log(
        f"  {clients} clients, max_tokens {max_tokens}, C=${limit_usd}: {result.served} served, "
        f"{result.refused} x 402 ({result.refused_under_cap} under the cap), "
        f"{result.capped_calls} capped ({result.capped_truncated} cut short), overshoot "
        f"${_f(result.overshoot_usd, 6, signed=True)}; problems: {result.problems or 'none'}"
    )
    return result


def analyse_share(
    result: ShareResult,
    outcomes: list[Outcome],
    usage: list[Message],
    requests: list[Message],
    decision: dict[str, Any] | None,
) -> None:
    limit = round(result.limit_usd * NANOS)
    served = [o for o in outcomes if o.status == 200 and o.usage is not None]
    refused = [o for o in outcomes if o.status == 402]
    result.calls, result.served, result.refused = len(outcomes), len(served), len(refused)
    result.errors = result.calls - result.served - result.refused
    if result.errors:
        kinds = Counter(o.reason for o in outcomes if o not in served and o.status != 402)
        result.problems.append(f"{result.errors} calls failed: {dict(kinds)}")
    result.reasons_402 = dict(Counter(o.reason or "?" for o in refused))
    spent = sum(real_cost(o) for o in served)
    result.real_spent_usd = spent / NANOS
    result.overshoot_usd = (spent - limit) / NANOS
    result.largest_prompt_usd = max((prompt_cost(o) for o in served), default=0) / NANOS
    if result.overshoot_usd > result.largest_prompt_usd:
        result.problems.append(
            f"overshoot ${result.overshoot_usd:.6f} exceeds the largest prompt "
            f"${result.largest_prompt_usd:.6f}"
        )
    if decision is not None:
        result.decision_spent_usd = int(decision["spent_usd_nanos"]) / NANOS
        result.decision_agrees_with_real_spend = int(decision["spent_usd_nanos"]) == spent
    if not result.decision_agrees_with_real_spend:
        result.problems.append(
            f"the worker's decision says ${result.decision_spent_usd}, the answered calls "
            f"cost ${spent / NANOS:.9f}"
        )
    result.capped_calls = sum(1 for o in served if o.capped_to is not None)
    result.capped_truncated = sum(
        1 for o in served if o.capped_to is not None and o.finish_reason == "length"
    )

    # The real spend at each refusal, three ways (see ShareResult).
    usage_ts = {r: m.record["ts"] for r, m in _by_request(usage).items()}
    accepted = _by_request(requests, "accepted")
    blocked = _by_request(requests, "blocked")
    done = sorted((o.done_s, real_cost(o)) for o in served)
    done_at = [d for d, _ in done]
    done_sums = [0]
    for _d, cost in done:
        done_sums.append(done_sums[-1] + cost)
    missing = [o.request_id for o in refused if o.request_id not in blocked]
    if missing:
        result.problems.append(f"{len(missing)} refusals without a 'blocked' Request event")
    for o in refused:
        by_client = done_sums[bisect.bisect_right(done_at, o.done_s)]
        if by_client < limit:
            result.refused_under_cap_client_order += 1
        event = blocked.get(o.request_id or "")
        if event is None:
            continue
        at = event.record["ts"]
        recorded = sum(
            real_cost(s)
            for s in served
            if s.request_id in usage_ts and usage_ts[s.request_id] <= at
        )
        committed = sum(
            real_cost(s)
            for s in served
            if s.request_id in accepted and accepted[s.request_id].record["ts"] <= at
        )
        if recorded < limit:
            result.refused_under_cap += 1
            if len(result.refusal_examples) < 3:
                result.refusal_examples.append(
                    f"at ${recorded / NANOS:.6f} of ${result.limit_usd} "
                    f"(${committed / NANOS:.6f} with the calls in flight): {o.message}"
                )
        if committed < limit:
            result.refused_under_cap_with_in_flight += 1
    result.refused_under_cap_share = (
        result.refused_under_cap / result.calls if result.calls else None
    )

    # Admission time: client send -> the dispatcher's Request event for the call.
    groups: dict[str, list[float]] = defaultdict(list)
    for o in outcomes:
        if o.status == 402:
            event, kind = blocked.get(o.request_id or ""), f"refused ({o.reason})"
        elif o.status == 200:
            event = accepted.get(o.request_id or "")
            kind = "served, capped" if o.capped_to is not None else "served, not capped"
        else:
            continue
        if event is not None:
            groups[kind].append((event.record["ts"].timestamp() - o.sent_s) * 1000)
    result.admission_ms = {kind: _quantiles(v) for kind, v in sorted(groups.items())}


# -- 4: exactness after worker kills --------------------------------------------------------------
@dataclass
class KillsResult:
    kills_planned: int
    topic_prefix: str
    clients: int
    users: list[str]
    features: list[str]
    kills: list[dict[str, Any]] = field(default_factory=list)  # when, and what came before
    worker_restart_to_decision_s: dict[str, Any] = field(default_factory=dict)
    load_s: float = 0.0
    calls: int = 0
    served: int = 0
    failed: int = 0
    usage_events: int = 0  # on the topic (all of it)
    distinct_usage_events: int = 0
    resent_events: int = 0  # the same event id at another offset
    worker_crashes: int = 0  # "Crashed reason=" in the worker's log (it was never told to stop)
    decides_policy_changes_after: bool = False  # the last worker still runs housekeeping
    converged: bool = False
    converge_s: float = 0.0  # after the load, until every decision equals the usage sum
    # scope -> {"usage_usd", "decision_usd", "difference_nanos"}
    scopes: dict[str, dict[str, Any]] = field(default_factory=dict)
    max_abs_difference_nanos: int | None = None
    problems: list[str] = field(default_factory=list)


def expected_by_scope(usage: Sequence[Message], scopes: Sequence[str]) -> dict[str, int]:
    """Per scope, the cost of the distinct usage events (first arrival of each event id)."""
    distinct: dict[str, dict[str, Any]] = {}
    for m in usage:
        distinct.setdefault(m.record["event_id"], m.record)
    totals = dict.fromkeys(scopes, 0)
    for r in distinct.values():
        cost = int(r["cost_usd_nanos"])
        for scope in (f"user:{r['user_id']}", f"feature:{r.get('feature')}", "global"):
            if scope in totals:
                totals[scope] += cost
    return totals


async def kill_loop(
    lane: Lane, kills: int, rng: random.Random, max_delay_s: float, result: KillsResult
) -> None:
    """SIGKILL the worker ``kills`` times: each time a random 0..``max_delay_s`` after the
    running worker published a decision (so it is counting under load), then restart it. A
    worker that exits by itself is noted (a crash) and restarted like a killed one."""
    restarted = time.time()
    for index in range(kills):
        waited_from = time.monotonic()
        first_decision: float | None = None
        while time.monotonic() - waited_from < 120 and lane.worker.alive():
            fresh = [m for m in lane.tail.seen() if m.record["ts"].timestamp() > restarted]
            if fresh:
                first_decision = min(m.seen_s or 0.0 for m in fresh) - restarted
                break
            await asyncio.sleep(0.05)
        if first_decision is not None:
            await asyncio.sleep(rng.uniform(0.0, max_delay_s))
        pid, crashed = lane.worker.pid, not lane.worker.alive()
        lane.kill_worker()
        result.kills.append(
            {
                "kill": index + 1,
                "pid": pid,
                "exited_by_itself_before": crashed,
                "restart_to_first_decision_s": _round(first_decision, 2),
                "alive_s": round(time.time() - restarted, 2),
                "killed_at_epoch_s": round(time.time(), 3),  # to match Kafka timestamps
            }
        )
        log(
            f"  kill {index + 1}/{kills}: worker pid {pid} "
            f"{'had already EXITED' if crashed else 'SIGKILLed'} {time.time() - restarted:.1f}s "
            f"after its start (first decision after {_f(first_decision, 1)}s)"
        )
        lane.restart_worker()
        restarted = time.time()


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def run_kills(
    lane: Lane,
    bootstrap: str,
    simulator_url: str,
    args: argparse.Namespace,
    tmp: Path,
    children: list[Child],
) -> KillsResult:
    result = KillsResult(
        args.kills, lane.prefix, args.kill_clients, list(KILL_USERS), list(KILL_FEATURES)
    )
    dispatcher, base_url = start_dispatcher(
        "kills", lane, bootstrap, simulator_url, True, tmp, children
    )
    try:
        asyncio.run(wait_http(base_url + "/readyz", dispatcher, kafka=True))
        for scope, limit_usd in KILL_POLICIES.items():
            asyncio.run(set_cap(base_url, bootstrap, lane.prefix, scope, limit_usd, settle_s=0))
        started = time.monotonic()
        outcomes = asyncio.run(load_under_kills(lane, base_url, args, result))
        result.load_s = time.monotonic() - started
        result.calls = len(outcomes)
        result.served = sum(1 for o in outcomes if o.status == 200)
        result.failed = result.calls - result.served
        if result.failed:
            kinds = Counter(o.reason or str(o.status) for o in outcomes if o.status != 200)
            result.problems.append(f"{result.failed} calls not served: {dict(kinds)}")
        firsts = [k["restart_to_first_decision_s"] for k in result.kills[1:]]
        firsts = [v for v in firsts if v is not None]
        result.worker_restart_to_decision_s = {
            "n": len(firsts),
            "p50": _ms(firsts, 0.5),
            "max": max(firsts, default=None),
        }
        asyncio.run(wait_drained(base_url, 60))
        compare_with_usage(lane, bootstrap, args.converge_timeout, result)
        # Proof the last worker still runs its housekeeping (a crash there stops all
        # counting): two policy changes, each decided in a later pass than the one before.
        for limit_usd in (KILL_POLICIES["global"] + 1, KILL_POLICIES["global"] + 2):
            asyncio.run(put_budget(base_url, "global", {"period": "month", "limit_usd": limit_usd}))
            result.decides_policy_changes_after = lane.worker.alive() and wait_for_limit(
                lane, "global", limit_usd, timeout_s=60
            )
        crashes = worker_crashes(lane.worker)
        result.worker_crashes = len(crashes)
        if crashes:
            result.problems.append(
                f"the spend worker crashed by itself {len(crashes)} times: {crashes[0].strip()}"
            )
        if not result.decides_policy_changes_after:
            result.problems.append("after the load, the last worker no longer decides")
        log(
            f"  {len(result.kills)} kills, {result.served} calls served, "
            f"{result.distinct_usage_events} distinct usage events; max |difference| "
            f"{result.max_abs_difference_nanos} nano-USD "
            f"{'after' if result.converged else 'still, after'} {result.converge_s:.1f}s; "
            f"problems: {result.problems or 'none'}"
        )
    finally:
        dispatcher.stop()
    return result


async def load_under_kills(
    lane: Lane, base_url: str, args: argparse.Namespace, result: KillsResult
) -> list[Outcome]:
    """Paced load from every user while the kill loop runs, and 2 s past its last restart."""
    until = asyncio.Event()

    async def chaos() -> None:
        try:
            rng = random.Random(args.seed)
            await kill_loop(lane, args.kills, rng, args.kill_max_delay_s, result)
            await asyncio.sleep(2.0)
        finally:
            until.set()

    task = asyncio.create_task(chaos())
    outcomes, _ = await drive(
        base_url + CHAT_PATH,
        identities=[
            client_headers(user, KILL_FEATURES[i % len(KILL_FEATURES)])
            for i, user in enumerate(KILL_USERS)
        ],
        clients=args.kill_clients,
        bodies=request_bodies(stream=False),
        stream=False,
        lengths=uniform_lengths,
        stop_client=lambda o: False,
        max_requests=10**9,
        max_seconds=1800,
        seed=args.seed,
        pace_s=args.kill_clients / args.kill_rate,
        until=until,
    )
    await task
    return outcomes


def compare_with_usage(lane: Lane, bootstrap: str, timeout_s: float, result: KillsResult) -> None:
    """Every usage event from the topic, and the worker's decision per scope against the sum
    of the distinct ones, until they agree or ``timeout_s`` (or the worker is gone)."""
    usage = asyncio.run(read_topic(bootstrap, f"{lane.prefix}.usage"))
    result.usage_events = len(usage)
    result.distinct_usage_events = len({m.record["event_id"] for m in usage})
    result.resent_events = result.usage_events - result.distinct_usage_events
    scopes = [f"user:{u}" for u in KILL_USERS] + [f"feature:{f}" for f in KILL_FEATURES]
    expected = expected_by_scope(usage, [*scopes, "global"])
    started = time.monotonic()
    decisions: dict[str, dict[str, Any]] = {}
    while time.monotonic() - started < timeout_s and lane.worker.alive():
        decisions = asyncio.run(compacted_decisions(bootstrap, f"{lane.prefix}.budget.decisions"))
        spent = {s: (decisions.get(s) or {}).get("spent_usd_nanos") for s in expected}
        if spent == expected:
            result.converged = True
            break
        time.sleep(2.0)
    result.converge_s = time.monotonic() - started
    for scope, total in expected.items():
        counted = (decisions.get(scope) or {}).get("spent_usd_nanos")
        result.scopes[scope] = {
            "usage_usd": total / NANOS,
            "decision_usd": None if counted is None else counted / NANOS,
            "difference_nanos": None if counted is None else counted - total,
        }
    differences = [v["difference_nanos"] for v in result.scopes.values()]
    if None in differences:
        result.problems.append("a scope has no decision")
    known = [abs(d) for d in differences if d is not None]
    result.max_abs_difference_nanos = max(known) if known else None
    if not result.converged:
        result.problems.append(
            f"decisions differ from the usage events {result.converge_s:.0f} s after the load"
            + ("" if lane.worker.alive() else " (the worker is not running)")
        )


def wait_for_limit(lane: Lane, scope: str, limit_usd: float, timeout_s: float) -> bool:
    """Whether a decision for ``scope`` with this limit is seen within ``timeout_s``."""
    nanos = round(limit_usd * NANOS)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if any(d.record["limit_usd_nanos"] == nanos for d in lane.tail.seen(scope)):
            return True
        time.sleep(0.1)
    return False


# -- report --------------------------------------------------------------------------------------
@dataclass
class Report:
    plan: dict[str, Any]
    machine: dict[str, Any] = field(default_factory=dict)
    results: list[ConfigResult] = field(default_factory=list)
    sequential: list[SequentialResult] = field(default_factory=list)
    share: list[ShareResult] = field(default_factory=list)
    kills: KillsResult | None = None
    summary: dict[str, Any] = field(default_factory=dict)


def summarise(report: Report) -> None:
    on = [r for r in report.results if r.reservations]
    every = [v for r in report.results for v in r.decision_latency_ms]
    kills = report.kills
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
        "decision_latency_pooled": _quantiles(every),
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
        "sequential_false_refusals": sum(s.false_refusals for s in report.sequential),
        "sequential_max_overshoot_usd": max(
            (s.overshoot_usd for s in report.sequential if s.overshoot_usd is not None),
            default=None,
        ),
        "refused_under_cap": {
            f"c={s.clients} max_tokens={s.max_tokens} C=${s.limit_usd}": s.refused_under_cap_share
            for s in report.share
        },
        "kills": None
        if kills is None
        else {
            "kills": len(kills.kills),
            "max_abs_difference_nanos": kills.max_abs_difference_nanos,
            "exact": kills.converged and kills.max_abs_difference_nanos == 0,
        },
        "problems": {
            **{r.config: r.problems for r in report.results if r.problems},
            **{
                f"sequential {s.mode} {s.user}": s.problems for s in report.sequential if s.problems
            },
            **{f"share {s.user}": s.problems for s in report.share if s.problems},
            **({"kills": kills.problems} if kills is not None and kills.problems else {}),
        },
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


def _q(q: dict[str, Any] | None) -> str:
    if not q or not q.get("n"):
        return "-"
    return f"{_f(q['p50_ms'])} / {_f(q['p99_ms'])} (n={q['n']})"


def markdown(report: Report) -> str:
    lines = [
        "## Tollgate budget caps",
        "",
        f"{report.machine.get('cpus')} CPUs, Python {report.machine.get('python')}; other "
        f"processes' load before the start: {_f(report.machine.get('other_load_before_start'), 2)}"
        f" cores. Code: commit {report.machine.get('git_head')}, uncommitted changes in app/ "
        f"and agents/: {len(report.machine.get('uncommitted_in_app_agents') or [])} file(s) "
        "(listed in the JSON).",
    ]
    if report.results:
        lines += ["", *markdown_overshoot(report)]
    if report.sequential:
        lines += ["", *markdown_sequential(report)]
    if report.share:
        lines += ["", *markdown_share(report)]
    if report.kills is not None:
        lines += ["", *markdown_kills(report.kills)]
    problems = report.summary["problems"]
    if problems:
        lines.append("")
        for where, found in problems.items():
            lines.append(f"- PROBLEM in {where}: {'; '.join(found)}")
    return "\n".join(lines)


def markdown_overshoot(report: Report) -> list[str]:
    plan = report.plan
    lines = [
        "### 1. Overshoot and decision latency",
        "",
        f"{plan['clients']} concurrent clients of one user per configuration, `{MODEL}`, "
        f"prompts of {', '.join(str(b) for b in plan['prompt_bytes'])} bytes, "
        f"`X-Sim-Completion-Tokens` uniform in {MIN_FORCED_TOKENS}..{MAX_TOKENS}, "
        f"`max_tokens={MAX_TOKENS}`; each client stops at its first 402. Monthly cap "
        f"C = ${plan['limit_usd']}. Simulator `latency_scale={plan['latency_scale']}` (TTFT "
        f"median {plan['ttft_ms_median']:.0f} ms, {plan['ms_per_chunk']:.1f} ms per 4-token "
        f"chunk). One dispatcher. Topics: "
        f"{'one prefix per configuration' if not plan['shared_topics'] else 'one shared prefix'}."
        " Decision latency: per usage event, its `ts` to the first decision seen whose "
        "`counted_offsets` passes its offset.",
        "",
        "| config | served | 402s | spent $ | C $ | overshoot $ "
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
        "| config | largest request $ | capped calls | counted after the breach "
        "(sent before / after it) | 402 reasons | errors | usage events = admitted "
        "| decision spent = Usage sum = 200s priced from their responses "
        "| decisions ≠ usage below their counted_offsets | breach→first 'limit reached' 402 ms "
        "| load s | other load |",
        "|---|--:|--:|---|---|--:|---|---|--:|--:|--:|--:|",
    ]
    for r in report.results:
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(r.reasons_402.items())) or "-"
        lines.append(
            f"| {r.config} | {r.largest_request_usd:.6f} | {r.capped_calls} "
            f"| {r.counted_after_breach} ({r.counted_after_breach_sent_before} / "
            f"{r.counted_after_breach_sent_after}) | {reasons} | {r.errors} "
            f"| {'yes' if r.usage_events_match_admitted else 'NO'} "
            f"| {'yes' if r.spent_agrees_with_usage else 'NO'} = "
            f"{'yes' if r.client_priced_matches_usage else 'NO'} "
            f"| {r.decisions_not_matching_their_offsets} of {r.decisions} "
            f"| {_f(r.breach_to_first_limit_402_ms)} | {r.load_s:.1f} "
            f"| {r.other_load_cores:.2f} |"
        )
    lines += [
        "",
        "Decision latency, broken down (ms, p50 / p99, per usage event): its `ts` → seen on "
        "Kafka by a tail (spool and producer); → the `ts` of the first decision that counts it "
        "(the worker: batch, changelog writes, its 250 ms refresh timer); → that decision seen "
        "by the tail. The Kafka timestamp of a usage event is the spool's append time, so "
        "latency from it is nearly the same.",
        "",
        "| config | usage events | decisions | usage visible | → decision ts "
        "| decision ts → seen | total p50 / p99 / max | from Kafka ts p50 / p99 | calls/s "
        "| CPU cores: worker / dispatcher / Kafka / simulator / bench |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in report.results:
        lines.append(
            f"| {r.config} | {r.usage_events} | {r.decisions} "
            f"| {_f(r.usage_visible_ms_p50)} / {_f(r.usage_visible_ms_p99)} "
            f"| {_f(r.worker_ms_p50)} / {_f(r.worker_ms_p99)} "
            f"| {_f(r.delivery_ms_p50)} / {_f(r.delivery_ms_p99)} "
            f"| {_f(r.decision_p50_ms)} / {_f(r.decision_p99_ms)} / {_f(r.decision_max_ms)} "
            f"| {_f(r.decision_from_kafka_ts_p50_ms)} / {_f(r.decision_from_kafka_ts_p99_ms)} "
            f"| {r.usage_events_per_s:.0f} | "
            + " / ".join(
                _f(r.cpu_cores.get(k), 2)
                for k in ("worker", "dispatcher", "kafka", "simulator", "bench")
            )
            + " |"
        )
    s = report.summary
    lines.append("")
    for config, met in s["overshoot_target_met"].items():
        r = next(x for x in report.results if x.config == config)
        verdict = "met" if met else "MISSED"
        lines.append(
            f"- Target overshoot ≤ 1 largest request ({config}): {verdict} "
            f"({_f(r.overshoot_units, 2, signed=True)})."
        )
    for config, met in s["decision_p99_target_met"].items():
        r = next(x for x in report.results if x.config == config)
        lines.append(
            f"- Target decision latency p99 ≤ {TARGET_DECISION_P99_MS:.0f} ms ({config}, "
            f"{len(r.decision_latency_ms)} usage events): {'met' if met else 'MISSED'} "
            f"({_f(r.decision_p99_ms)} ms)."
        )
    pooled = s["decision_latency_pooled"]
    lines.append(
        f"- All usage events pooled: n={pooled['n']}, p50 {_f(pooled['p50_ms'])} ms, "
        f"p99 {_f(pooled['p99_ms'])} ms, max {_f(pooled['max_ms'])} ms."
    )
    for r in report.results:
        for note in r.worker_start_notes:
            lines.append(f"- Spend worker start-up retried before {r.config}: {note}")
    lines.append(
        "- `other load` = CPU (cores) used during the load by processes this benchmark did "
        "not start."
    )
    return lines


def markdown_sequential(report: Report) -> list[str]:
    lines = [
        "### 2. False refusals in a sequential run",
        "",
        f"One client, one call at a time, `{MODEL}` without `max_tokens` (completion lengths "
        "drawn from the simulator's lognormal, median 150 tokens), until a 402 at or past the "
        "cap. `paced` waits for the worker's decision to count each call first. A false "
        "refusal is a 402 while the real spend (answered calls priced from their usage) is "
        "below the cap.",
        "",
        "| mode | C $ | served | false refusals | real spend $ | overshoot $ "
        "| last call's prompt $ | capped (cut short) | worker's spent = real | wait for "
        "decision p50 / p99 ms | s |",
        "|---|--:|--:|--:|--:|--:|--:|--:|---|--:|--:|",
    ]
    for s in report.sequential:
        lines.append(
            f"| {s.mode} | {s.limit_usd} | {s.served} | {s.false_refusals} "
            f"| {s.real_spent_usd:.6f} | {_f(s.overshoot_usd, 6, signed=True)} "
            f"| {_f(s.last_call_prompt_usd, 6)} | {s.capped_calls} ({s.capped_truncated}) "
            f"| {'yes' if s.decision_agrees_with_real_spend else 'NO'} "
            f"| {_q(s.decision_wait_ms)} | {s.seconds:.0f} |"
        )
    total = report.summary["sequential_false_refusals"]
    lines += [
        "",
        f"- False refusals, all runs: {total} (target 0: {'met' if not total else 'MISSED'}).",
    ]
    for s in report.sequential:
        for message in s.false_refusal_messages:
            lines.append(f"- False refusal ({s.mode}, {s.user}) {message}")
    return lines


def markdown_share(report: Report) -> list[str]:
    lines = [
        "### 3. Refused while under the cap, concurrent clients",
        "",
        f"Concurrent clients of one user, `{MODEL}`, the three prompts, completion lengths "
        f"from the simulator's lognormal (≤ {natural_max_tokens()}); with `max_tokens="
        f"{natural_max_tokens()}` or without (worst case: the model's output limit). Each "
        "client goes on until a 402 'limit reached' (a 402 'requests in flight would exceed "
        "the limit' is retried at once). Under the cap = the real spend when the dispatcher "
        "refused (calls whose usage it had recorded by then) was below C; 'client order' "
        "counts the answers the client had received by its 402; 'with in flight' also counts "
        "every call admitted before the refusal at its final cost. Admission = client send → "
        "the dispatcher's Request event (accepted or refused).",
        "",
        "| clients | max_tokens | C $ | calls | served | 402s | under the cap "
        "| share | client order | with in flight | capped (cut short) | overshoot $ "
        "| largest prompt $ | load s | admission ms p50 / p99: not capped | capped | refused |",
        "|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for s in report.share:
        refused = {k: v for k, v in s.admission_ms.items() if k.startswith("refused")}
        lines.append(
            f"| {s.clients} | {s.max_tokens or 'none'} | {s.limit_usd} | {s.calls} | {s.served} "
            f"| {s.refused} | {s.refused_under_cap} "
            f"| {_f(None if s.refused_under_cap_share is None else 100 * s.refused_under_cap_share, 2)} % "
            f"| {s.refused_under_cap_client_order} | {s.refused_under_cap_with_in_flight} "
            f"| {s.capped_calls} ({s.capped_truncated}) | {_f(s.overshoot_usd, 6, signed=True)} "
            f"| {s.largest_prompt_usd:.6f} | {s.load_s:.1f} "
            f"| {_q(s.admission_ms.get('served, not capped'))} "
            f"| {_q(s.admission_ms.get('served, capped'))} "
            f"| {'; '.join(f'{k[9:-1]}: {_q(v)}' for k, v in refused.items()) or '-'} |"
        )
    for s in report.share:
        for example in s.refusal_examples:
            lines.append(f"- Refused under the cap (c={s.clients}, {s.user}) {example}")
    return lines


def markdown_kills(k: KillsResult) -> list[str]:
    lines = [
        "### 4. Spend exactness after worker kills",
        "",
        f"{k.clients} clients ({len(k.users)} users, features {', '.join(k.features)}) for "
        f"{k.load_s:.0f} s; `tollgate worker` SIGKILLed {len(k.kills)} times, each a random "
        "moment after the restarted worker published its first decision, and restarted at "
        f"once. {k.served} calls served, {k.usage_events} usage events on the topic "
        f"({k.distinct_usage_events} distinct, {k.resent_events} re-sent). Restart → first "
        f"decision: median {_f(k.worker_restart_to_decision_s.get('p50'))} s, max "
        f"{_f(k.worker_restart_to_decision_s.get('max'))} s. Every decision equal to the usage "
        f"sum {'after ' + format(k.converge_s, '.1f') + ' s' if k.converged else 'NEVER'}. "
        f"Worker crashes it was not told about: {k.worker_crashes}; the last worker "
        f"{'still decides' if k.decides_policy_changes_after else 'NO LONGER decides'} policy "
        "changes after the load.",
        "",
        "| scope | distinct usage $ | worker's decision $ | difference (nano-$) |",
        "|---|--:|--:|--:|",
    ]
    for scope, v in k.scopes.items():
        lines.append(
            f"| {scope} | {v['usage_usd']:.9f} | {_f(v['decision_usd'], 9)} "
            f"| {v['difference_nanos'] if v['difference_nanos'] is not None else '-'} |"
        )
    lines += [
        "",
        f"- Largest |difference|: {k.max_abs_difference_nanos} nano-USD (target 0: "
        f"{'met' if k.max_abs_difference_nanos == 0 and k.converged else 'MISSED'}).",
    ]
    return lines


# -- processes -----------------------------------------------------------------------------
def _tollgate_argv(command: str) -> list[str]:
    tollgate_bin = Path(sys.executable).with_name("tollgate")
    if tollgate_bin.exists():
        return [str(tollgate_bin), command]
    return [sys.executable, "-m", "app", command]


@dataclass
class Lane:
    """A topic prefix with its topics, its spend worker and tails of its decisions and usage."""

    prefix: str
    worker: Child
    worker_env: dict[str, str]
    tmp: Path
    children: list[Child]
    tail: TopicTail  # budget.decisions
    usage_tail: TopicTail  # usage: when each event became visible on Kafka

    def kill_worker(self) -> None:
        """SIGKILL the worker's process group and reap it."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.worker.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.worker.proc.wait(10)

    def restart_worker(self) -> None:
        self.worker = spawn(
            f"worker-{self.prefix}", _tollgate_argv("worker"), self.worker_env, self.tmp
        )
        self.children.append(self.worker)


def start_lane(
    tag: str, bootstrap: str, tmp: Path, children: list[Child], tails: list[TopicTail]
) -> Lane:
    from app.events.topics import ensure_topics
    from app.settings import Settings

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
    return Lane(prefix, worker, env, tmp, children, tail, usage_tail)


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


async def set_cap(
    base_url: str, bootstrap: str, prefix: str, scope: str, limit_usd: float, settle_s: float = 1.0
) -> None:
    """A monthly cap through the admin API, on the policies topic before anything is sent."""
    await put_budget(base_url, scope, {"period": "month", "limit_usd": limit_usd})
    await wait_policy_on_topic(bootstrap, prefix, scope, 15.0)
    await asyncio.sleep(settle_s)  # the worker's policy view polls every 200 ms


async def wait_policy_on_topic(bootstrap: str, prefix: str, scope: str, timeout_s: float) -> None:
    """Wait until the policy is on ``budget.policies`` (the worker tails that topic)."""
    topic = f"{prefix}.budget.policies"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if any(m.record.get("scope") == scope for m in await read_topic(bootstrap, topic)):
            return
        await asyncio.sleep(0.2)
    raise RuntimeError(f"the policy of {scope} never reached {topic}")


async def wait_worker_ready(lane: Lane, bootstrap: str, timeout_s: float) -> float:
    """Prove the worker consumes: a probe user with a cap must get a decision.

    As ``tests.integration.harness.wait_worker_ready`` does (policy and usage straight
    to Kafka), but the usage is resent every 2 s (the probe's policy may reach the
    worker after its first usage event). Returns the seconds it took.
    """
    from aiokafka import AIOKafkaProducer

    from app.budgets.admin import policy_record
    from app.budgets.policy import parse_policy
    from app.events.codec import EventCodec
    from app.metering.usage import UsageProducer
    from app.settings import Settings

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
    """Per worker process that logged a crashed Faust service or agent, its first such line."""
    first: dict[str, str] = {}
    for line in worker.log_tail(5000).splitlines():
        if "Crashed reason=" in line:
            pid = re.search(r"\] \[(\d+)\] \[", line)
            first.setdefault(pid.group(1) if pid else line, line[line.find("[20") :].strip())
    return list(first.values())


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


def collect(
    lane: Lane, bootstrap: str, base_url: str, user: str
) -> tuple[list[Message], dict[str, Any] | None, float]:
    """After a user's load: the spool drained, the user's usage events, and the worker's
    decision once it counts all of them (or stopped changing). Returns also the settle time."""
    asyncio.run(wait_drained(base_url, 30))
    usage = [
        m
        for m in asyncio.run(read_topic(bootstrap, f"{lane.prefix}.usage"))
        if m.record["user_id"] == user
    ]
    expected = sum(
        int(m.record["cost_usd_nanos"]) for m in {m.record["event_id"]: m for m in usage}.values()
    )
    scope = f"user:{user}"
    settle_s = asyncio.run(settle(lane, scope, expected, 30.0))
    decisions = asyncio.run(compacted_decisions(bootstrap, f"{lane.prefix}.budget.decisions"))
    return usage, decisions.get(scope), settle_s


def warm_up(base_url: str, calls: int, seed: int) -> None:
    """Calls of an uncapped user, so the dispatcher's output estimate (a high quantile of
    recent calls) is what a running dispatcher would have."""
    outcomes, _ = asyncio.run(
        drive(
            base_url + CHAT_PATH,
            identities=[client_headers(f"warm-up-{uuid.uuid4().hex[:6]}")],
            clients=4,
            bodies=request_bodies(stream=False, max_tokens=None),
            stream=False,
            lengths=natural_lengths,
            stop_client=lambda o: False,
            max_requests=calls,
            max_seconds=120,
            seed=seed,
        )
    )
    failed = [o for o in outcomes if o.status != 200]
    if failed:
        raise RuntimeError(f"{len(failed)} warm-up calls failed: {failed[0].reason}")


# -- the run ---------------------------------------------------------------------------------------
def run_overshoot(
    report: Report,
    args: argparse.Namespace,
    bootstrap: str,
    simulator_url: str,
    tmp: Path,
    children: list[Child],
    tails: list[TopicTail],
    fixed_pids: dict[str, int],
) -> None:
    shared: Lane | None = None
    try:
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
                lane, notes = ready_lane(
                    name.replace("/", ""), bootstrap, args, tmp, children, tails
                )
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
        if shared is not None:
            stop_lane(shared)


def run_accuracy(
    report: Report,
    args: argparse.Namespace,
    bootstrap: str,
    simulator_url: str,
    tmp: Path,
    children: list[Child],
    tails: list[TopicTail],
) -> None:
    """Measurements 2 and 3: one lane, one warmed-up dispatcher (reservations on), a fresh
    user per run."""
    log("accuracy: sequential runs and concurrent clients near the cap")
    lane, _notes = ready_lane("acc", bootstrap, args, tmp, children, tails)
    dispatcher, base_url = start_dispatcher(
        "accuracy", lane, bootstrap, simulator_url, True, tmp, children
    )
    try:
        asyncio.run(wait_http(base_url + "/readyz", dispatcher, kafka=True))
        warm_up(base_url, args.warm_up, args.seed)
        seed = args.seed + 100
        if "sequential" in args.parts:
            for _ in range(args.sequential_runs):
                for mode in ("paced", "back-to-back"):
                    seed += 1
                    report.sequential.append(
                        run_sequential(
                            base_url, lane, bootstrap, mode, args.sequential_limit_usd, seed
                        )
                    )
        if "share" in args.parts:
            for limit_usd in args.share_limits:
                for clients in (32, 64):
                    for max_tokens in (None, natural_max_tokens()):
                        seed += 1
                        report.share.append(
                            run_share(
                                base_url,
                                lane,
                                bootstrap,
                                clients,
                                max_tokens,
                                limit_usd,
                                args,
                                seed,
                            )
                        )
        if not dispatcher.alive():
            raise RuntimeError(f"the dispatcher died:\n{dispatcher.log_tail()}")
    finally:
        dispatcher.stop()
        stop_lane(lane)


def run_benchmark(args: argparse.Namespace) -> int:
    from app.settings import Settings
    from devtools.kafka_local import LocalKafka
    from devtools.simulator import SimulatorConfig

    sim = SimulatorConfig(latency_scale=args.latency_scale)
    plan = {
        "parts": sorted(args.parts),
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
        "configs": [c[0] for c in selected_configs(args)],
        "sequential_runs": args.sequential_runs,
        "sequential_limit_usd": args.sequential_limit_usd,
        "share_limits_usd": args.share_limits,
        "share_max_tokens": natural_max_tokens(),
        "warm_up_calls": args.warm_up,
        "kills": args.kills,
        "kill_clients": args.kill_clients,
        "kill_rate_per_s": args.kill_rate,
        "kill_max_delay_s": args.kill_max_delay_s,
        "seed": args.seed,
        "quick": args.quick,
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
        if "overshoot" in args.parts:
            run_overshoot(report, args, bootstrap, simulator_url, tmp, children, tails, fixed_pids)
        if {"sequential", "share"} & args.parts:
            run_accuracy(report, args, bootstrap, simulator_url, tmp, children, tails)
        if "kills" in args.parts:
            log(f"kills: {args.kills} SIGKILLs of the spend worker under load")
            lane, _notes = ready_lane("kill", bootstrap, args, tmp, children, tails)
            try:
                report.kills = run_kills(lane, bootstrap, simulator_url, args, tmp, children)
            finally:
                stop_lane(lane)
    finally:
        for tail in tails:
            tail.stop()
        for child in reversed(children):
            child.stop(grace_s=10)
        stop_kafka_and_temp(launcher, tmp, args.keep_temp)
    report.machine["total_seconds"] = round(time.monotonic() - started, 1)
    summarise(report)
    document = orjson.dumps(
        asdict(report), option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS
    ).decode()
    publish(markdown(report), document, args.json_out)
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


PARTS = ("overshoot", "sequential", "share", "kills")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.budget",
        description="Budget caps on real parts: overshoot and decision latency (reservations "
        "on vs off), false refusals, refusals under the cap, exactness after worker kills.",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run (a few minutes): one shared topic prefix and worker for the overshoot "
        "configurations, smaller caps, one sequential run per mode, 2 worker kills",
    )
    parser.add_argument(
        "--parts", default=",".join(PARTS), help=f"comma list of measurements, from {PARTS}"
    )
    group = parser.add_argument_group("1: overshoot and decision latency")
    group.add_argument(
        "--limit-usd", type=float, default=None, help="the cap C in USD (default 5; quick 0.2)"
    )
    group.add_argument("--clients", type=int, default=64, help="concurrent clients (64)")
    group.add_argument("--max-requests", type=int, default=20_000, help="per run")
    group.add_argument("--max-seconds", type=float, default=None, help="load time limit")
    group.add_argument(
        "--configs", default=",".join(c[0] for c in CONFIGS), help="comma list of configurations"
    )
    group.add_argument(
        "--shared-topics",
        action="store_true",
        help="one topic prefix and one worker for every configuration (--quick sets it)",
    )
    group = parser.add_argument_group("2 and 3: sequential runs, refusals under the cap")
    group.add_argument(
        "--sequential-runs", type=int, default=None, help="runs per mode (default 5; quick 1)"
    )
    group.add_argument(
        "--sequential-limit-usd", type=float, default=None, help="cap (default 0.1; quick 0.05)"
    )
    group.add_argument(
        "--share-limits",
        default=None,
        help="comma list of caps in USD for the 32/64-client runs (default 0.05,1; quick 0.2)",
    )
    group.add_argument(
        "--warm-up", type=int, default=60, help="calls that warm the dispatcher's estimate (60)"
    )
    group = parser.add_argument_group("4: exactness after worker kills")
    group.add_argument("--kills", type=int, default=None, help="SIGKILLs (default 10; quick 2)")
    group.add_argument("--kill-clients", type=int, default=16)
    group.add_argument("--kill-rate", type=float, default=50.0, help="calls/s of the load")
    group.add_argument(
        "--kill-max-delay-s",
        type=float,
        default=3.0,
        help="a kill comes 0..this after the restarted worker's first decision",
    )
    group.add_argument("--converge-timeout", type=float, default=180.0)
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
    args.parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    if args.parts - set(PARTS) or not args.parts:
        raise SystemExit(f"--parts wants a comma list from {PARTS}")
    quick = args.quick
    if quick:
        args.shared_topics = True
    defaults = {
        "limit_usd": (5.0, 0.2),
        "wait_quiet": (60.0, 0.0),
        "max_seconds": (60.0, 20.0),
        "sequential_runs": (5, 1),
        "sequential_limit_usd": (0.1, 0.05),
        "share_limits": ("0.05,1", "0.2"),
        "kills": (10, 2),
    }
    for name, (full, smoke) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, smoke if quick else full)
    args.share_limits = [float(v) for v in str(args.share_limits).split(",") if v.strip()]
    if args.limit_usd <= 0 or args.clients < 1 or min(args.share_limits, default=0) <= 0:
        raise SystemExit("caps and --clients must be positive")
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
