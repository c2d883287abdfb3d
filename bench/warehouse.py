"""How fast does the warehouse fill, and how fast does it answer? Sink throughput, report latency.

One run, one machine, real parts: a local Kafka broker (``devtools.kafka_local``, free ports,
state in a temp directory) and embedded chdb (one directory, opened once by this process,
a database per part of the run). Two measurements:

**Sink throughput.** N ``Usage`` events (``build_usage_record`` + ``EventCodec``, realistic
mix of users, features, models, cache hits, downtiered and unpriced calls) are produced
to a 3-partition topic first. Then the real ``ClickHouseSink`` (``agents.sink``, default
batch of 5000) is started and timed until all N rows are in ``usage_events`` (counted
through the client). Its wall time is split with thin wrappers around its codec, client
and methods (the sink's code is not changed): start-up, Avro decode, row conversion,
dedupe query, insert, and the rest (Kafka fetch, commit). Baselines in the same run, over
the same events:

- a raw aiokafka consume-only loop (the ceiling of the Kafka side);
- consume + decode + row conversion, no ClickHouse (the ceiling of the Python side);
- a direct clickhouse-connect insert of the same rows, 5000 a batch, into the same schema
  with its rollup materialized views, and into a copy without them (the ceiling of the
  ClickHouse side).

**Report latency.** ``--rows`` usage rows (default 10 million) over ``--days`` days (30),
generated inside ClickHouse (``INSERT INTO usage_events SELECT ... FROM numbers(N)``; the
materialized views fill the rollups as it runs), plus outcomes (1 % of the requests),
alerts and budget decisions. Every report of ``app.warehouse.reports`` (summary, breakdowns, time
series, savings, outcomes, budgets, and ranges whose ends are not minute-aligned, which
read raw events at the edges) is timed ``--runs`` times (p50, p99) against a baseline in
the same run: the same function with every range read from raw ``usage_events FINAL``
(``reports._plan`` patched to return no rollup part), i.e. what it costs without
rollups. Both must give the same numbers. Then a few real sink batches (dedupe + insert)
are timed against the full table.

Targets: sink >= 50,000 events/s; every dashboard query <= 300 ms at 10 million rows.

Run ``python -m bench.warehouse`` (``--quick`` for a smoke run, ``--json-out FILE`` to keep
the figures). See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from unittest import mock

import orjson

from bench.gateway import (
    CLK_TCK,
    HOST,
    REPO,
    _sigterm_to_exit,
    cpu_seconds,
    free_port,
    host_cpu,
    log,
    percentile,
    publish,
    wait_quiet,
)

TARGET_SINK_EVENTS_PER_S = 50_000
TARGET_REPORT_MS = 300.0
BATCH = 5000  # the sink's default batch size; the direct-insert baselines use the same
TOPIC_PREFIX = "benchwh"
PARTITIONS = 3
OUTCOME_EVERY = 100  # one request in 100 gets a business outcome
ALERTS = 2000
BUDGET_SCOPES = 300
DECISIONS_PER_SCOPE = 10
SCALE_BATCHES = 4  # real sink batches timed against the full report table


# -- measuring --------------------------------------------------------------------------------
class Meter:
    """Wall time and CPU (in cores) of this process, of Kafka, and of everything else."""

    def __init__(self, kafka_pid: int | None = None) -> None:
        self.kafka_pid = kafka_pid
        self.t0 = time.monotonic()
        self.cpu0 = time.process_time()
        self.kafka0 = cpu_seconds(kafka_pid) if kafka_pid else 0.0
        self.host0 = host_cpu()[0]

    def stop(self) -> dict[str, float]:
        wall = max(time.monotonic() - self.t0, 1e-9)
        ours = time.process_time() - self.cpu0
        kafka = (cpu_seconds(self.kafka_pid) - self.kafka0) if self.kafka_pid else 0.0
        busy = (host_cpu()[0] - self.host0) / CLK_TCK
        return {
            "wall_s": round(wall, 3),
            "bench_cores": round(ours / wall, 2),
            "kafka_cores": round(kafka / wall, 2),
            "other_load_cores": round(max(0.0, busy - ours - kafka) / wall, 2),
            "loadavg_1m": round(os.getloadavg()[0], 2),
        }


def _stats(values_ms: Sequence[float]) -> dict[str, float | None]:
    ordered = sorted(values_ms)
    if not ordered:
        return {"p50": None, "p99": None, "min": None, "max": None}
    return {
        "p50": round(percentile(ordered, 0.5), 1),
        "p99": round(percentile(ordered, 0.99), 1),
        "min": round(ordered[0], 1),
        "max": round(ordered[-1], 1),
    }


# -- the events -------------------------------------------------------------------------------
# One mix for both parts: ~1000 users with a power-law skew (user-0000 ~6 % of the calls),
# 5 features (3 % unattributed), 3 priced models / tiers and 1 % of calls to a model without
# a price, 15 % of gpt-4o calls served by gpt-4o-mini (downtiered), 8 % cache hits, 25 % with
# provider prompt caching, 2 % errors, 30 % streamed.
FEATURES = (
    (0.38, "search"),
    (0.63, "chat"),
    (0.78, "summarize"),
    (0.90, "extract"),
    (0.97, "code"),
)
UNPRICED_MODEL = "acme-local-7b"


def _user(u: float) -> tuple[int, str]:
    index = int(1000 * u**2.5)
    return index, f"user-{index:04d}"


def _feature(u: float) -> str | None:
    return next((name for bound, name in FEATURES if u < bound), None)


def make_usage_records(n: int, seed: int, start: datetime) -> list[dict[str, Any]]:
    """``n`` Usage records priced by the real catalog, one every 3 ms from ``start``."""
    from app.metering.attribution import Identity
    from app.metering.usage import build_usage_record
    from app.pricing.catalog import PriceCatalog

    prices = PriceCatalog()
    rng = random.Random(seed)
    records = []
    for i in range(n):
        index, user = _user(rng.random())
        r = rng.random()
        requested = (
            UNPRICED_MODEL
            if r < 0.01
            else "o1"
            if r < 0.11
            else "gpt-4o"
            if r < 0.66
            else "gpt-4o-mini"
        )
        served = "gpt-4o-mini" if requested == "gpt-4o" and rng.random() < 0.15 else requested
        provider = (
            "self-hosted"
            if served == UNPRICED_MODEL
            else "azure"
            if served == "gpt-4o-mini" and rng.random() < 0.2
            else "openai"
        )
        failed = rng.random() < 0.02
        cache_hit = served != UNPRICED_MODEL and not failed and rng.random() < 0.08
        stream = rng.random() < 0.3
        prompt = 100 + int(4000 * rng.random() ** 3)
        completion = 0 if failed else 20 + int(800 * rng.random() ** 2)
        cached = (
            int(prompt * 0.6 * rng.random())
            if served != UNPRICED_MODEL and rng.random() < 0.25
            else 0
        )
        records.append(
            build_usage_record(
                prices,
                Identity(
                    user,
                    f"{user}-s{i // 37}",
                    _feature(rng.random()),
                    f"team-{index % 8}",
                    f"key-{index % 50}",
                ),
                request_id=uuid.uuid4().hex,
                model=served,
                prompt_tokens=prompt,
                completion_tokens=completion,
                cached_tokens=cached,
                provider=provider,
                model_requested=requested,
                source="api" if rng.random() < 0.05 else "dispatcher",
                ts=start + timedelta(milliseconds=3 * i),
                cache_hit=cache_hit,
                usage_estimated=rng.random() < 0.01,
                stream=stream,
                latency_ms=int(300 + completion * 12 * (0.5 + rng.random())),
                ttft_ms=int(80 + 400 * rng.random()) if stream else None,
                status="error" if failed else "ok",
                http_status=429 if failed else 200,
                error_type="rate_limited" if failed else None,
                metadata={"env": "prod", "app": "web"} if rng.random() < 0.2 else {},
            )
        )
    return records


# -- part 1: the sink ------------------------------------------------------------------------
async def produce(bootstrap: str, topic: str, messages: list[tuple[bytes, bytes]]) -> float:
    """Send every (key, value) to ``topic``, acks=all; returns seconds."""
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        acks="all",
        enable_idempotence=True,
        linger_ms=20,
        max_batch_size=256 * 1024,
    )
    await producer.start()
    started = time.perf_counter()
    try:
        pending = []
        for key, value in messages:
            pending.append(await producer.send(topic, value, key=key))
            if len(pending) >= 20_000:
                await asyncio.gather(*pending)
                pending.clear()
        await asyncio.gather(*pending)
        await producer.flush()
    finally:
        await producer.stop()
    return time.perf_counter() - started


async def end_offsets(bootstrap: str, topic: str, partitions: int) -> int:
    """Messages on ``topic`` (the sum of its partitions' end offsets)."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None)
    await consumer.start()
    try:
        offsets = await consumer.end_offsets([TopicPartition(topic, p) for p in range(partitions)])
        return sum(offsets.values())
    finally:
        await consumer.stop()


async def warm_group_coordinator(bootstrap: str, topic: str, timeout_s: float = 30) -> None:
    """Join (and leave) a throwaway consumer group: a fresh broker creates its offsets topic
    and group coordinator on the first join, which a sink restarting on a running cluster
    does not pay."""
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, group_id=f"{TOPIC_PREFIX}-warm-up"
    )
    await consumer.start()
    try:
        deadline = time.monotonic() + timeout_s
        while not consumer.assignment() and time.monotonic() < deadline:
            await consumer.getmany(timeout_ms=100, max_records=1)
    finally:
        await consumer.stop()


async def consume(
    bootstrap: str, topic: str, n: int, *, decode: bool, timeout_s: float
) -> dict[str, Any]:
    """Read ``n`` messages from the beginning (no group), optionally decoding them into rows.

    Returns seconds from ``start()`` to the n-th message, and the rows when decoding.
    """
    from aiokafka import AIOKafkaConsumer

    from app.events.codec import EventCodec

    codec = EventCodec()
    table = TABLES["usage"]
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_poll_records=BATCH,
    )
    rows: list[list[Any]] = []
    got = 0
    decode_s = convert_s = 0.0
    started = time.perf_counter()
    await consumer.start()
    try:
        while got < n:
            if time.perf_counter() - started > timeout_s:
                raise RuntimeError(f"consumed {got} of {n} messages in {timeout_s:.0f} s")
            batch = await consumer.getmany(timeout_ms=200, max_records=BATCH)
            for messages in batch.values():
                got += len(messages)
                if not decode:
                    continue
                for m in messages:
                    t0 = time.perf_counter()
                    record = codec.decode(
                        m.value, topic=m.topic, partition=m.partition, offset=m.offset
                    ).record
                    t1 = time.perf_counter()
                    rows.append(table.row(record))
                    convert_s += time.perf_counter() - t1
                    decode_s += t1 - t0
        elapsed = time.perf_counter() - started
    finally:
        await consumer.stop()
    return {
        "seconds": elapsed,
        "messages": got,
        "decode_s": decode_s,
        "convert_s": convert_s,
        "rows": rows,
    }


class TimedClient:
    """A clickhouse-connect client that records how long each query and insert takes."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.queries: list[float] = []
        self.inserts: list[float] = []
        self.commands: list[tuple[str, float]] = []  # (DELETE, INSERT...; seconds)
        self.first_insert_end: float | None = None

    def query(self, *args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return self.inner.query(*args, **kwargs)
        finally:
            self.queries.append(time.perf_counter() - started)

    def insert(self, *args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return self.inner.insert(*args, **kwargs)
        finally:
            now = time.perf_counter()
            self.inserts.append(now - started)
            if self.first_insert_end is None:
                self.first_insert_end = now

    def raw_insert(self, *args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return self.inner.raw_insert(*args, **kwargs)
        finally:
            now = time.perf_counter()
            self.inserts.append(now - started)
            if self.first_insert_end is None:
                self.first_insert_end = now

    def command(self, *args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return self.inner.command(*args, **kwargs)
        finally:
            verb = str(args[0] if args else kwargs.get("cmd", "")).split(None, 1)[0].upper()
            self.commands.append((verb, time.perf_counter() - started))


class TimedCodec:
    """An EventCodec whose ``decode`` adds up its time."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.decode_s = 0.0

    def decode(self, *args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return self.inner.decode(*args, **kwargs)
        finally:
            self.decode_s += time.perf_counter() - started

    def encode(self, *args: Any, **kwargs: Any) -> bytes:
        return bytes(self.inner.encode(*args, **kwargs))

    def __getattr__(self, name: str) -> Any:  # event_type_of, writer_schema, ...
        return getattr(self.inner, name)


async def run_sink(
    settings: Any, raw_client: Any, n: int, batch_size: int, timeout_s: float, kafka_pid: int
) -> dict[str, Any]:
    """The real ClickHouseSink from start until ``n`` rows are in usage_events."""
    from agents.sink import ClickHouseSink
    from app.events.codec import EventCodec
    from app.warehouse.clickhouse import ReconnectingClient

    timed = TimedClient(raw_client)
    codec = TimedCodec(EventCodec())
    # As `tollgate sink` runs it: through a ReconnectingClient (one call at a time).
    sink = ClickHouseSink(
        settings, ReconnectingClient(lambda: timed), codec=codec, batch_size=batch_size
    )
    parts = {"write_s": 0.0, "insert_new_s": 0.0, "batches": 0, "first_write_start": None}
    batch_sizes: list[int] = []
    original_decode, original_insert_new = sink._decode, sink._insert_new

    async def timed_decode(batch: list[Any], *args: Any) -> Any:
        started = time.perf_counter()
        if parts["first_write_start"] is None:
            parts["first_write_start"] = started
        result = await original_decode(batch, *args)
        parts["write_s"] += time.perf_counter() - started
        parts["batches"] += 1
        batch_sizes.append(len(batch))
        return result

    def timed_insert_new(rows: Any) -> None:
        started = time.perf_counter()
        original_insert_new(rows)
        parts["insert_new_s"] += time.perf_counter() - started

    sink._decode = timed_decode  # type: ignore[method-assign]
    sink._insert_new = timed_insert_new  # type: ignore[method-assign]
    stop = asyncio.Event()
    meter = Meter(kafka_pid)
    started = time.perf_counter()
    task = asyncio.create_task(sink.run(stop))
    while sink.inserted + sink.duplicates_dropped + sink.dead_lettered < n:
        if task.done():
            task.result()  # raises what stopped it
            raise RuntimeError("the sink stopped before inserting every event")
        if time.perf_counter() - started > timeout_s:
            stop.set()
            raise RuntimeError(f"the sink inserted {sink.inserted} of {n} rows in {timeout_s:.0f}s")
        await asyncio.sleep(0.01)
    # Every batch is in: count the rows through the client (the sink is idle now).
    count = 0
    while count < n and time.perf_counter() - started < timeout_s:
        result = await asyncio.to_thread(raw_client.query, "SELECT count() FROM usage_events")
        count = int(result.result_rows[0][0])
        if count < n:
            await asyncio.sleep(0.05)
    ended = time.perf_counter()
    resources = meter.stop()
    stop.set()
    await asyncio.wait_for(task, 30)
    wall = ended - started
    first_write = parts["first_write_start"] or started
    startup = first_write - started
    first_batch = batch_sizes[0] if batch_sizes else 0
    after_first = (ended - timed.first_insert_end) if timed.first_insert_end else wall
    decode_s = codec.decode_s
    query_s, insert_s = sum(timed.queries), sum(timed.inserts)
    # The sink decodes batch N+1 on the event loop while batch N is inserted in a thread,
    # so these parts overlap and can add up to more than the wall time.
    convert_s = max(0.0, parts["write_s"] - decode_s)
    dedupe_py_s = max(0.0, parts["insert_new_s"] - query_s - insert_s)
    loop_s = max(0.0, wall - startup - parts["write_s"])
    breakdown = {
        "startup (consumer start, group join, first batch filled)": startup,
        "Avro decode (EventCodec.decode), event loop": decode_s,
        "row conversion, batching, event loop": convert_s,
        "dedupe (memory; ClickHouse lookups of suspects), thread": query_s + dedupe_py_s,
        "insert (client.insert, MVs included), thread": insert_s,
        "event loop not decoding: fetch, commit, waiting for inserts": loop_s,
    }
    return {
        "events": n,
        "rows_counted": count,
        "inserted": sink.inserted,
        "duplicates_dropped": sink.duplicates_dropped,
        "dead_lettered": sink.dead_lettered,
        "looked_up_in_clickhouse": sink.checked_in_clickhouse,
        "seconds": round(wall, 3),
        "events_per_s": round(n / wall),
        "after_first_batch_events_per_s": round((n - first_batch) / after_first)
        if after_first > 0
        else None,
        "insert_only_events_per_s": round(n / insert_s) if insert_s else None,
        "insert_and_dedupe_events_per_s": round(n / parts["insert_new_s"])
        if parts["insert_new_s"]
        else None,
        "batches": parts["batches"],
        "batch_rows_p50": int(percentile(sorted(batch_sizes), 0.5)) if batch_sizes else 0,
        "dedupe_query_ms": _stats([q * 1000 for q in timed.queries]),
        "insert_ms": _stats([i * 1000 for i in timed.inserts]),
        "first_vs_last_5_batches_insert_ms": [
            round(sum(timed.inserts[:5]) / max(1, len(timed.inserts[:5])) * 1000, 1),
            round(sum(timed.inserts[-5:]) / max(1, len(timed.inserts[-5:])) * 1000, 1),
        ],
        "first_vs_last_5_batches_dedupe_ms": [
            round(sum(timed.queries[:5]) / max(1, len(timed.queries[:5])) * 1000, 1),
            round(sum(timed.queries[-5:]) / max(1, len(timed.queries[-5:])) * 1000, 1),
        ],
        "breakdown_s": {k: round(v, 3) for k, v in breakdown.items()},
        "breakdown_us_per_event": {k: round(v / n * 1e6, 1) for k, v in breakdown.items()},
        "resources": resources,
    }


# -- the decoded-row path: what the sink did before it inserted Avro bodies ------------------
# Kept here as a baseline: decode each event with fastavro, convert it to a row of Python
# values, insert rows through clickhouse-connect.
from decimal import Decimal  # noqa: E402

NANOS_PER_USD = Decimal(1_000_000_000)


def _usd(nanos: int | None) -> Decimal | None:
    return None if nanos is None else Decimal(nanos) / NANOS_PER_USD


@dataclass(frozen=True)
class TableMap:
    table: str
    columns: tuple[str, ...]
    convert: Callable[[dict[str, Any]], dict[str, Any]]

    def row(self, record: dict[str, Any]) -> list[Any]:
        values = self.convert(record)
        return [values[c] for c in self.columns]


def _same(record: dict[str, Any]) -> dict[str, Any]:
    return record


def _usage(record: dict[str, Any]) -> dict[str, Any]:
    return {
        **record,
        "cost_usd": _usd(record["cost_usd_nanos"]),
        "baseline_cost_usd": _usd(record["baseline_cost_usd_nanos"]),
        "cache_saved_usd": _usd(record["cache_saved_usd_nanos"]),
        "prompt_cache_saved_usd": _usd(record["prompt_cache_saved_usd_nanos"]),
        "requested_cost_usd": _usd(record.get("requested_cost_usd_nanos")),
    }


def _request(record: dict[str, Any]) -> dict[str, Any]:
    return {**record, "reserved_usd": _usd(record["reserved_usd_nanos"])}


def _outcome(record: dict[str, Any]) -> dict[str, Any]:
    return {**record, "value_usd": _usd(record["value_usd_nanos"])}


def _decision(record: dict[str, Any]) -> dict[str, Any]:
    return {
        **record,
        "spent_usd": _usd(record["spent_usd_nanos"]),
        "limit_usd": _usd(record["limit_usd_nanos"]),
    }


TABLES: dict[str, TableMap] = {
    "usage": TableMap(
        "usage_events",
        (
            "event_id", "ts", "request_id", "user_id", "session_id", "feature", "team",
            "api_key_id", "source", "provider", "model_requested", "model_served", "tier",
            "prompt_tokens", "completion_tokens", "cached_tokens", "cost_usd",
            "baseline_cost_usd", "baseline_model", "cache_saved_usd", "prompt_cache_saved_usd",
            "requested_cost_usd", "price_unknown", "usage_estimated", "cache_hit", "stream", "latency_ms", "ttft_ms",
            "status", "http_status", "error_type", "metadata",
        ),
        _usage,
    ),
    "requests": TableMap(
        "request_events",
        (
            "event_id", "ts", "request_id", "user_id", "session_id", "feature", "team",
            "api_key_id", "endpoint", "model_requested", "model_served", "tier", "stream",
            "prompt_tokens_estimated", "max_tokens", "reserved_usd", "status", "reason",
            "blocked_scope", "metadata",
        ),
        _request,
    ),
    "outcomes": TableMap(
        "outcome_events",
        (
            "event_id", "ts", "request_id", "session_id", "user_id", "feature", "outcome",
            "kind", "value_usd", "metadata",
        ),
        _outcome,
    ),
    "alerts": TableMap(
        "alert_events",
        (
            "event_id", "ts", "alert_key", "kind", "scope", "severity", "status", "score",
            "expected", "observed", "unit", "window_seconds", "first_seen", "last_seen",
            "message", "details",
        ),
        _same,
    ),
    "budget.decisions": TableMap(
        "budget_decisions",
        (
            "event_id", "ts", "scope", "state", "spent_usd", "limit_usd", "period",
            "period_start", "resets_at", "counted_through", "threshold", "reason",
        ),
        _decision,
    ),
}  # fmt: skip


def direct_insert(client: Any, table: str, rows: list[list[Any]], columns: list[str]) -> float:
    """clickhouse-connect inserts of ``rows``, BATCH at a time; returns seconds."""
    started = time.perf_counter()
    for i in range(0, len(rows), BATCH):
        client.insert(table, rows[i : i + BATCH], column_names=columns)
    return time.perf_counter() - started


def sink_part(args: argparse.Namespace, tmp: Path, chdb_dir: Path) -> dict[str, Any]:
    from app.events.codec import EventCodec
    from app.events.topics import ensure_topics
    from app.settings import Settings
    from app.warehouse.clickhouse import connect, migrate
    from devtools.kafka_local import LocalKafka

    n = args.events
    result: dict[str, Any] = {"events": n, "partitions": PARTITIONS, "batch_size": args.batch_size}
    settings = Settings(
        kafka_bootstrap=f"{HOST}:{args.kafka_port or free_port()}",
        kafka_controller_port=args.kafka_controller_port or free_port(),
        state_dir=tmp / "state",
        topic_prefix=TOPIC_PREFIX,
        topic_partitions=PARTITIONS,
    )
    log(f"starting Kafka on {settings.kafka_bootstrap} (state in {tmp})")
    launcher = LocalKafka(settings)
    kafka = launcher.start()
    try:
        log(f"Kafka ready in {kafka.start_seconds:.1f}s (pid {kafka.pid})")
        asyncio.run(ensure_topics(settings))
        topic = settings.topic("usage")

        log(f"building and encoding {n:,} Usage events")
        started = time.perf_counter()
        records = make_usage_records(n, args.seed, datetime.now(UTC) - timedelta(hours=1))
        codec = EventCodec()
        messages = [(r["user_id"].encode(), codec.encode("Usage", r)) for r in records]
        expected_cost_nanos = sum(int(r["cost_usd_nanos"]) for r in records)
        del records
        result["build_and_encode_s"] = round(time.perf_counter() - started, 2)
        result["mean_event_bytes"] = round(sum(len(v) for _, v in messages) / n, 1)
        log(f"producing them to {topic} ({PARTITIONS} partitions)")
        result["produce_s"] = round(
            asyncio.run(produce(settings.kafka_bootstrap, topic, messages)), 2
        )
        del messages
        on_topic = asyncio.run(end_offsets(settings.kafka_bootstrap, topic, PARTITIONS))
        if on_topic != n:
            raise RuntimeError(f"{on_topic} messages on {topic}, expected {n}")
        timeout = max(120.0, n / 1000)

        log("baseline: raw aiokafka consume-only loop")
        meter = Meter(kafka.pid)
        raw = asyncio.run(
            consume(settings.kafka_bootstrap, topic, n, decode=False, timeout_s=timeout)
        )
        result["consume_only"] = {
            "seconds": round(raw["seconds"], 3),
            "events_per_s": round(n / raw["seconds"]),
            "resources": meter.stop(),
        }
        log(f"  {result['consume_only']['events_per_s']:,} events/s")

        log("baseline: consume + Avro decode + row conversion (no ClickHouse)")
        meter = Meter(kafka.pid)
        decoded = asyncio.run(
            consume(settings.kafka_bootstrap, topic, n, decode=True, timeout_s=timeout)
        )
        rows: list[list[Any]] = decoded["rows"]
        result["consume_decode"] = {
            "seconds": round(decoded["seconds"], 3),
            "events_per_s": round(n / decoded["seconds"]),
            "decode_us_per_event": round(decoded["decode_s"] / n * 1e6, 1),
            "convert_us_per_event": round(decoded["convert_s"] / n * 1e6, 1),
            "resources": meter.stop(),
        }
        log(f"  {result['consume_decode']['events_per_s']:,} events/s")

        client = connect(dsn=f"chdb://{chdb_dir}")
        migrate(client)
        asyncio.run(warm_group_coordinator(settings.kafka_bootstrap, topic))
        log(f"the real ClickHouseSink: {n:,} events into usage_events")
        result["sink"] = asyncio.run(
            run_sink(settings, client, n, args.batch_size, timeout, kafka.pid)
        )
        check = client.query(
            "SELECT count(), uniqExact(event_id), sum(cost_usd) FROM usage_events"
        ).result_rows[0]
        result["sink"]["rows_unique_cost_match"] = bool(
            int(check[0]) == n
            and int(check[1]) == n
            and check[2] * 1_000_000_000 == expected_cost_nanos
        )
        log(
            f"  {result['sink']['events_per_s']:,} events/s end to end; rows, event ids and "
            f"cost match: {result['sink']['rows_unique_cost_match']}"
        )
    finally:
        log("stopping Kafka")
        try:
            launcher.stop()
        except Exception as exc:  # report it, and go on
            log(f"could not stop Kafka: {exc}")

    log("baseline: direct clickhouse-connect insert of the same rows")
    columns = list(TABLES["usage"].columns)
    direct = _database_client(chdb_dir, client, "direct")
    migrate(direct)
    direct.command("CREATE TABLE IF NOT EXISTS usage_plain AS usage_events")  # no MVs on it
    meter = Meter()
    seconds = direct_insert(direct, "usage_events", rows, columns)
    result["direct_insert_mv"] = {
        "seconds": round(seconds, 3),
        "events_per_s": round(n / seconds),
        "resources": meter.stop(),
    }
    meter = Meter()
    seconds = direct_insert(direct, "usage_plain", rows, columns)
    result["direct_insert_no_mv"] = {
        "seconds": round(seconds, 3),
        "events_per_s": round(n / seconds),
        "resources": meter.stop(),
    }
    log(
        f"  {result['direct_insert_mv']['events_per_s']:,} events/s with MVs, "
        f"{result['direct_insert_no_mv']['events_per_s']:,} without"
    )
    return result


def _database_client(chdb_dir: Path, main_client: Any, database: str) -> Any:
    """A client on the same chdb engine (one directory per process) bound to ``database``."""
    import clickhouse_connect

    main_client.command(f"CREATE DATABASE IF NOT EXISTS {database}")
    return clickhouse_connect.get_client(dsn=f"chdb://{chdb_dir}", database=database)


# -- part 2: reports -------------------------------------------------------------------------
def _u(salt: int, of: str = "number") -> str:
    """A uniform [0, 1) draw from the row's number: deterministic, independent per salt."""
    return f"(cityHash64({of}, {salt}) / 18446744073709551616.0)"


def usage_insert_sql(rows: int, start_ms: int, span_ms: int) -> str:
    """``rows`` usage events, evenly spread over [start, start + span), the mix above.

    Costs use the catalog's rates in nano-dollars per token (o1 15000/7500 cached/60000,
    gpt-4o 2500/1250/10000, gpt-4o-mini 150/75/600; baseline gpt-4 30000/60000), with the
    same rules as ``build_usage_record``: a cache hit costs 0 and saves its full price, a
    downtiered call's requested cost is gpt-4o's list price, an unpriced call has cost 0,
    a baseline, and no requested cost.
    """
    u = _u
    return f"""
INSERT INTO usage_events (event_id, ts, request_id, user_id, session_id, feature, team,
    api_key_id, source, provider, model_requested, model_served, tier, prompt_tokens,
    completion_tokens, cached_tokens, cost_usd, baseline_cost_usd, baseline_model,
    cache_saved_usd, prompt_cache_saved_usd, requested_cost_usd, price_unknown,
    usage_estimated, cache_hit, stream, latency_ms, ttft_ms, status, http_status, error_type,
    metadata)
SELECT
    lower(hex(cityHash64(number, 101))) || lower(hex(cityHash64(number, 102))),
    fromUnixTimestamp64Milli(toInt64({start_ms} + intDiv(number * {span_ms}, {rows})), 'UTC'),
    lower(hex(cityHash64(number, 103))),
    user_id,
    user_id || '-s' || toString(intDiv(number, 37)),
    feature,
    'team-' || toString(user_idx % 8),
    'key-' || toString(user_idx % 50),
    if({u(9)} < 0.05, 'api', 'dispatcher'),
    multiIf(served = '{UNPRICED_MODEL}', 'self-hosted',
            served = 'gpt-4o-mini' AND {u(10)} < 0.2, 'azure', 'openai'),
    requested,
    served,
    multiIf(served = 'o1', 'premium', served = 'gpt-4o', 'standard',
            served = 'gpt-4o-mini', 'economy', NULL),
    prompt, completion, cached,
    CAST(if(cache_hit, 0, full_nanos - pcs_nanos) AS Decimal(18, 9)) / 1000000000,
    CAST(prompt * 30000 + completion * 60000 AS Decimal(18, 9)) / 1000000000,
    'gpt-4',
    CAST(if(cache_hit, full_nanos, 0) AS Decimal(18, 9)) / 1000000000,
    CAST(if(cache_hit, 0, pcs_nanos) AS Decimal(18, 9)) / 1000000000,
    if(unpriced, NULL, CAST(if(requested = served, full_nanos,
        prompt * req_in + completion * req_out) AS Decimal(18, 9)) / 1000000000),
    unpriced,
    {u(11)} < 0.01,
    cache_hit,
    is_stream,
    toUInt32(if(cache_hit, 5 + 20 * {u(12)}, 300 + completion * 12 * (0.5 + {u(12)}))),
    if(is_stream, toUInt32(80 + 400 * {u(13)}), NULL),
    if(failed, 'error', 'ok'),
    toUInt16(if(failed, if({u(14)} < 0.6, 429, 502), 200)),
    if(failed, if({u(14)} < 0.6, 'rate_limited', 'upstream_error'), NULL),
    if({u(15)} < 0.2, map('env', 'prod', 'app', 'web'), CAST(map(), 'Map(String, String)'))
FROM
(
    SELECT
        number,
        toUInt32(floor(1000 * pow({u(1)}, 2.5))) AS user_idx,
        'user-' || leftPad(toString(user_idx), 4, '0') AS user_id,
        multiIf({u(2)} < 0.38, 'search', {u(2)} < 0.63, 'chat', {u(2)} < 0.78, 'summarize',
                {u(2)} < 0.90, 'extract', {u(2)} < 0.97, 'code', NULL) AS feature,
        multiIf({u(3)} < 0.01, '{UNPRICED_MODEL}', {u(3)} < 0.11, 'o1',
                {u(3)} < 0.66, 'gpt-4o', 'gpt-4o-mini') AS requested,
        if(requested = 'gpt-4o' AND {u(4)} < 0.15, 'gpt-4o-mini', requested) AS served,
        served = '{UNPRICED_MODEL}' AS unpriced,
        {u(5)} < 0.02 AS failed,
        NOT unpriced AND NOT failed AND {u(6)} < 0.08 AS cache_hit,
        {u(7)} < 0.3 AS is_stream,
        toUInt32(100 + floor(4000 * pow({u(8)}, 3))) AS prompt,
        toUInt32(if(failed, 0, 20 + floor(800 * pow({u(16)}, 2)))) AS completion,
        toUInt32(if(NOT unpriced AND {u(17)} < 0.25, floor(prompt * 0.6 * {u(18)}), 0)) AS cached,
        multiIf(served = 'o1', 15000, served = 'gpt-4o', 2500, served = 'gpt-4o-mini', 150, 0)
            AS in_rate,
        multiIf(served = 'o1', 7500, served = 'gpt-4o', 1250, served = 'gpt-4o-mini', 75, 0)
            AS cached_rate,
        multiIf(served = 'o1', 60000, served = 'gpt-4o', 10000, served = 'gpt-4o-mini', 600, 0)
            AS out_rate,
        multiIf(requested = 'o1', 15000, requested = 'gpt-4o', 2500,
                requested = 'gpt-4o-mini', 150, 0) AS req_in,
        multiIf(requested = 'o1', 60000, requested = 'gpt-4o', 10000,
                requested = 'gpt-4o-mini', 600, 0) AS req_out,
        toInt64(prompt * in_rate + completion * out_rate) AS full_nanos,
        toInt64(cached * (in_rate - cached_rate)) AS pcs_nanos
    FROM numbers({rows})
)
"""


def outcome_insert_sql() -> str:
    """One outcome for one request in OUTCOME_EVERY, 30 s to 10 min after it."""
    u = _u
    return f"""
INSERT INTO outcome_events (event_id, ts, request_id, session_id, user_id, feature, outcome,
    kind, value_usd, metadata)
SELECT
    lower(hex(cityHash64(event_id, 201))) || lower(hex(cityHash64(event_id, 202))),
    ts + toIntervalSecond(30 + cityHash64(event_id, 203) % 570),
    request_id, session_id, user_id, feature,
    multiIf({u(204, "event_id")} < 0.7, 'success', {u(204, "event_id")} < 0.9, 'failure',
            'abandoned'),
    if({u(205, "event_id")} < 0.5, 'conversion', 'resolution'),
    if({u(206, "event_id")} < 0.3,
       toDecimal64(round(50 * {u(207, "event_id")}, 2), 9), NULL),
    CAST(map(), 'Map(String, String)')
FROM usage_events
WHERE cityHash64(event_id, 200) % {OUTCOME_EVERY} = 0
"""


def alert_insert_sql(start_ms: int, span_ms: int) -> str:
    u = _u
    return f"""
INSERT INTO alert_events (event_id, ts, alert_key, kind, scope, severity, status, score,
    expected, observed, unit, window_seconds, first_seen, last_seen, message, details)
SELECT
    lower(hex(cityHash64(number, 301))) || lower(hex(cityHash64(number, 302))),
    at, kind || ':' || scope, kind, scope,
    if({u(304)} < 0.2, 'critical', 'warning'),
    if({u(305)} < 0.6, 'firing', 'resolved'),
    2 + 6 * {u(306)}, 100 * {u(307)}, 300 * {u(307)}, 'usd', 3600,
    at - toIntervalMinute(5), at, kind || ' on ' || scope,
    CAST(map(), 'Map(String, String)')
FROM
(
    SELECT number,
        fromUnixTimestamp64Milli(toInt64({start_ms} + intDiv(number * {span_ms}, {ALERTS})), 'UTC')
            AS at,
        ['spend_spike', 'token_spike', 'error_rate', 'budget_threshold'][
            1 + cityHash64(number, 303) % 4] AS kind,
        if(number % 3 = 0, 'feature:search', 'user:user-' || leftPad(toString(number % 40), 4, '0'))
            AS scope
    FROM numbers({ALERTS})
)
"""


def decision_insert_sql(end_ms: int) -> str:
    """DECISIONS_PER_SCOPE decisions for each of BUDGET_SCOPES scopes over the last 30 days."""
    return f"""
INSERT INTO budget_decisions (event_id, ts, scope, state, spent_usd, limit_usd, period,
    period_start, resets_at, counted_through, threshold, reason)
SELECT
    lower(hex(cityHash64(number, 401))) || lower(hex(cityHash64(number, 402))),
    at, scope,
    multiIf(used >= 1, 'blocked', used >= 0.8, 'warning', 'open'),
    toDecimal64(limit_usd * used, 9), toDecimal64(limit_usd, 9), period,
    period_start,
    if(period = 'month', period_start + toIntervalMonth(1), period_start + toIntervalDay(1)),
    at - toIntervalMillisecond(200),
    if(used >= 0.8, 0.8, NULL),
    NULL
FROM
(
    SELECT number,
        number % {BUDGET_SCOPES} AS s,
        intDiv(number, {BUDGET_SCOPES}) AS k,
        fromUnixTimestamp64Milli(toInt64({end_ms} - ({DECISIONS_PER_SCOPE} - k) * 259200000
            + s * 1000), 'UTC') AS at,
        if(s < 280, 'user:user-' || leftPad(toString(s), 4, '0'), 'team:team-' || toString(s - 280))
            AS scope,
        100 + (s % 7) * 50 AS limit_usd,
        (k + 1) / {DECISIONS_PER_SCOPE} * (0.5 + (s % 5) / 4) AS used,
        if(s % 10 = 0, 'day', 'month') AS period,
        toDateTime64(if(period = 'month', toStartOfMonth(at), toStartOfDay(at)), 3, 'UTC')
            AS period_start
    FROM numbers({BUDGET_SCOPES * DECISIONS_PER_SCOPE})
)
"""


def wait_merges(client: Any, database: str, timeout_s: float) -> float:
    """Wait until no merge runs in ``database`` for 2 s in a row; returns seconds waited."""
    started = time.monotonic()
    quiet_since: float | None = None
    while time.monotonic() - started < timeout_s:
        running = client.query(
            "SELECT count() FROM system.merges WHERE database = %(d)s", parameters={"d": database}
        ).result_rows[0][0]
        now = time.monotonic()
        if running:
            quiet_since = None
        elif quiet_since is None:
            quiet_since = now
        elif now - quiet_since >= 2:
            break
        time.sleep(0.25)
    return time.monotonic() - started


def _all_raw(start: datetime, end: datetime, _levels: Any, _now: datetime) -> list[Any]:
    """``reports._plan`` for the baseline: no rollup part, the whole range from raw events."""
    return [(None, start, end)] if start < end else []


@dataclass
class Case:
    name: str
    range_text: str
    call: Callable[[timedelta], Any]  # the report over its range moved back by the argument
    naive: bool = True  # False: the report reads no rollup, so the baseline is itself
    dashboard: bool = True  # False: one query of a report, shown to explain its time


def report_cases(client: Any, end: datetime, days: int) -> list[Case]:
    """Every report of app.warehouse.reports, over ranges ending at ``end`` (the newest data)."""
    from app.warehouse import reports

    def back(start: datetime, stop: datetime) -> Callable[[timedelta], Any]:
        return lambda shift: reports.Range(start - shift, stop - shift)

    full = back(end - timedelta(days=days), end)
    week = back(end - timedelta(days=min(days, 7)), end)
    day = back(end - timedelta(days=1), end)
    # Ends not minute-aligned: the partial minutes (hours, for by=user) come from raw rows.
    odd = back(
        end - timedelta(days=days) + timedelta(seconds=17.345), end - timedelta(seconds=23.5)
    )
    live = back(end - timedelta(seconds=30), end)  # shorter than a minute: raw rows only
    d = f"{days}d"
    cases = [
        Case("summary", d, lambda s: reports.summary(client, full(s)).to_json()),
        Case("summary", "24h", lambda s: reports.summary(client, day(s)).to_json()),
    ]
    for by in reports.BREAKDOWN_DIMENSIONS:
        cases.append(
            Case(f"breakdown by {by}", d, lambda s, by=by: reports.breakdown(client, full(s), by))
        )
    cases += [
        Case("timeseries day", d, lambda s: reports.timeseries(client, full(s), "day")),
        Case(
            "timeseries hour",
            f"{min(days, 7)}d",
            lambda s: reports.timeseries(client, week(s), "hour"),
        ),
        Case("timeseries minute", "24h", lambda s: reports.timeseries(client, day(s), "minute")),
        Case("savings", d, lambda s: reports.savings(client, full(s))),
        Case(
            "  its routing_outcomes query",
            d,
            lambda s: reports.routing_outcomes(client, full(s), reports.DOWNTIERED_IDS),
            naive=False,
            dashboard=False,
        ),
        Case("outcomes", d, lambda s: reports.outcomes(client, full(s))),
        Case("budgets", "current", lambda s: reports.budgets(client, now=end - s), naive=False),
        Case("summary, raw edges", f"{d} ±s", lambda s: reports.summary(client, odd(s)).to_json()),
        Case(
            "breakdown by user, raw edges",
            f"{d} ±s",
            lambda s: reports.breakdown(client, odd(s), "user"),
        ),
        Case(
            "summary, raw only",
            "last 30 s",
            lambda s: reports.summary(client, live(s)).to_json(),
            naive=False,
        ),
    ]
    return cases


def time_cases(cases: list[Case], runs: int, naive_runs: int) -> list[dict[str, Any]]:
    """Each case: one warm-up, then ``runs`` timed calls, interleaved with the baseline's.

    Run r reads the range moved back by r minutes, as a dashboard refreshed every minute
    does: no cache keyed on the query's constants (ClickHouse's query condition cache is
    on by default) serves a repeat of the same query.
    """
    from app.warehouse import reports

    results = []
    for case in cases:
        fast_result = case.call(timedelta(0))  # warm-up
        naive_result = None
        if case.naive and naive_runs:
            with mock.patch.object(reports, "_plan", _all_raw):
                naive_result = case.call(timedelta(0))  # warm-up
        fast: list[float] = []
        naive: list[float] = []
        for r in range(1, runs + 1):
            shift = timedelta(minutes=r)
            started = time.perf_counter()
            case.call(shift)
            fast.append((time.perf_counter() - started) * 1000)
            if case.naive and r <= naive_runs:
                with mock.patch.object(reports, "_plan", _all_raw):
                    started = time.perf_counter()
                    case.call(shift)
                    naive.append((time.perf_counter() - started) * 1000)
        same = None
        if naive_result is not None:
            same = orjson.dumps(fast_result, default=str) == orjson.dumps(naive_result, default=str)
        fast_stats, naive_stats = _stats(fast), _stats(naive)
        row = {
            "report": case.name.strip(),
            "range": case.range_text,
            "rollups_ms": fast_stats,
            "naive_ms": naive_stats if naive else None,
            "speedup_p50": round(naive_stats["p50"] / fast_stats["p50"], 1)
            if naive and fast_stats["p50"]
            else None,
            "same_numbers": same,
            "dashboard": case.dashboard,
            "meets_target": bool(
                fast_stats["p99"] is not None and fast_stats["p99"] <= TARGET_REPORT_MS
            )
            if case.dashboard
            else None,
            "runs": len(fast),
            "naive_runs": len(naive),
        }
        results.append(row)
        log(
            f"  {case.name.strip()} [{case.range_text}]: p50 {fast_stats['p50']} ms, p99 "
            f"{fast_stats['p99']} ms; naive p50 {naive_stats['p50']} ms; same numbers: {same}"
        )
    return results


def sink_batches_at_scale(client: Any) -> dict[str, Any]:
    """The sink's own dedupe + insert of fresh 5000-row batches against the full table."""
    from agents.sink import ClickHouseSink, _Event
    from app.events.codec import EventCodec
    from app.settings import Settings

    codec = EventCodec()
    # Fresh events, encoded as the sink receives them.
    records = make_usage_records(2 * SCALE_BATCHES * BATCH, 99, datetime.now(UTC))
    events = []
    for record in records:
        value = codec.encode("Usage", record)
        events.append((record["event_id"], int.from_bytes(value[1:5], "big"), value[5:], record))

    def run(first_batch: int, early: bool) -> dict[str, Any]:
        """``early``: as right after a restart or rebalance, every id is looked up. Events
        already stored (a batch run a second time) are dropped and their hours' rollups
        rebuilt from the raw rows, as after a sink killed mid-insert."""
        timed = TimedClient(client)
        sink = ClickHouseSink(Settings(), timed, codec=codec)
        totals = []
        for i in range(first_batch, first_batch + SCALE_BATCHES):
            chunk = events[i * BATCH : (i + 1) * BATCH]
            if len(chunk) < BATCH:
                break
            batch = {
                event_id: _Event(schema_id, body, record["ts"], early, None)
                for event_id, schema_id, body, record in chunk
            }
            started = time.perf_counter()
            sink._insert_new({"usage": batch})
            totals.append(time.perf_counter() - started)
        queries = [q * 1000 for q in timed.queries]
        inserts = [i * 1000 for i in timed.inserts]
        return {
            "batches": len(totals),
            "batch_rows": BATCH,
            "dedupe_query_ms": [round(q, 1) for q in queries],
            "insert_ms": [round(i, 1) for i in inserts],
            "batch_ms": [round(t * 1000, 1) for t in totals],
            "command_ms": {
                verb: round(sum(t for v, t in timed.commands if v == verb) * 1000, 1)
                for verb in sorted({v for v, _ in timed.commands})
            },
            "events_per_s": round(BATCH * len(totals) / sum(totals)) if totals else None,
            "duplicates_dropped": sink.duplicates_dropped,
            "looked_up_in_clickhouse": sink.checked_in_clickhouse,
            "rollup_hours_rebuilt": sink.rollup_hours_rebuilt,
        }

    result = {"after_restart": run(0, True), "steady": run(SCALE_BATCHES, False)}
    # The steady batches again, to a fresh sink: every event is a duplicate, and the rollups
    # of their hours are rebuilt (the cost of the repair after a sink killed mid-insert).
    result["resent"] = run(SCALE_BATCHES, True)
    result["resent"]["rollups_match_raw"] = _rollups_match_raw(
        client, [record["ts"] for record in records]
    )
    return result


def _rollups_match_raw(client: Any, times: list[datetime]) -> bool:
    """After a rebuild: the hourly per-user rollup holds what the raw rows hold, hour by hour."""
    lo = min(times).replace(minute=0, second=0, microsecond=0)
    hi = max(times).replace(minute=0, second=0, microsecond=0) + timedelta(hours=1)
    bounds = {"lo": lo, "hi": hi}
    raw = client.query(
        "SELECT toStartOfHour(ts) AS h, count(), sum(cost_usd) FROM usage_events FINAL "
        "WHERE ts >= %(lo)s AND ts < %(hi)s GROUP BY h ORDER BY h",
        parameters=bounds,
    ).result_rows
    rolled = client.query(
        "SELECT hour, sum(requests), sum(cost_usd) FROM usage_user_hour "
        "WHERE hour >= %(lo)s AND hour < %(hi)s GROUP BY hour ORDER BY hour",
        parameters=bounds,
    ).result_rows
    return [tuple(r) for r in raw] == [tuple(r) for r in rolled]


def reports_part(args: argparse.Namespace, chdb_dir: Path) -> dict[str, Any]:
    from app.warehouse.clickhouse import connect, migrate

    main_client = connect(dsn=f"chdb://{chdb_dir}")
    client = _database_client(chdb_dir, main_client, "reports")
    migrate(client)
    end = datetime.now(UTC).replace(second=0, microsecond=0)
    start = end - timedelta(days=args.days)
    start_ms, span_ms = int(start.timestamp() * 1000), args.days * 86_400_000
    result: dict[str, Any] = {
        "rows": args.rows,
        "days": args.days,
        "from": start.isoformat(),
        "to": end.isoformat(),
    }

    log(f"generating {args.rows:,} usage rows over {args.days} days inside ClickHouse")
    meter = Meter()
    client.command(usage_insert_sql(args.rows, start_ms, span_ms))
    result["generate_usage"] = meter.stop()
    log(f"  {result['generate_usage']['wall_s']:.1f}s, rollups filled by the MVs as it ran")
    meter = Meter()
    client.command(outcome_insert_sql())
    client.command(alert_insert_sql(start_ms, span_ms))
    client.command(decision_insert_sql(int(end.timestamp() * 1000)))
    result["generate_others"] = meter.stop()
    result["merges_wait_s"] = round(wait_merges(client, "reports", 180), 1)
    tables = {}
    for table, rows, parts in client.query(
        "SELECT table, sum(rows), count() FROM system.parts WHERE database = 'reports' "
        "AND active GROUP BY table ORDER BY table"
    ).result_rows:
        tables[table] = {"rows": int(rows), "parts": int(parts)}
    result["tables"] = tables
    result["mix"] = dict(
        zip(
            ("users", "cache_hits", "downtiered", "unpriced", "errors", "no_feature"),
            (
                int(v)
                for v in client.query(
                    "SELECT uniqExact(user_id), countIf(cache_hit), "
                    "countIf(model_requested != model_served), countIf(price_unknown), "
                    "countIf(status != 'ok'), countIf(feature IS NULL) FROM usage_events"
                ).result_rows[0]
            ),
            strict=True,
        )
    )
    log(f"  tables: {tables}")

    log(f"timing every report: {args.runs} runs with rollups, {args.naive_runs} naive (raw FINAL)")
    meter = Meter()
    result["reports"] = time_cases(report_cases(client, end, args.days), args.runs, args.naive_runs)
    result["reports_resources"] = meter.stop()

    result["sink_at_scale"] = sink_batches_at_scale(client)
    return result


# -- report ------------------------------------------------------------------------------------
def machine_info() -> dict[str, Any]:
    import aiokafka
    import chdb
    import clickhouse_connect
    import fastavro

    def git(*argv: str) -> str:
        done = subprocess.run(["git", *argv], cwd=REPO, capture_output=True, text=True)
        return done.stdout.strip()

    return {
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "chdb": chdb.__version__,
        "clickhouse_connect": clickhouse_connect.__version__,
        "aiokafka": aiokafka.__version__,
        "fastavro": fastavro.__version__,
        "loadavg_at_start": [round(v, 2) for v in os.getloadavg()],
        "git_head": git("rev-parse", "--short", "HEAD"),
        "uncommitted_in_app_agents": git("status", "--porcelain", "app", "agents").splitlines(),
    }


def _n(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.1f}"
    return f"{value:,}"


def _load(resources: dict[str, float] | None) -> str:
    if not resources:
        return "-"
    return f"{resources['other_load_cores']:.2f} ({resources['loadavg_1m']:.1f})"


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [
        "## Tollgate warehouse: sink throughput and report latency",
        "",
        f"{m['cpus']} CPUs, Python {m['python']}, chdb {m['chdb']} (ClickHouse "
        f"{m.get('clickhouse', '?')}), clickhouse-connect {m['clickhouse_connect']}, aiokafka "
        f"{m['aiokafka']}, fastavro {m['fastavro']}. Load average at start "
        f"{', '.join(str(v) for v in m['loadavg_at_start'])}. Commit {m['git_head']}, "
        f"{len(m['uncommitted_in_app_agents'])} uncommitted file(s) in app/ and agents/. "
        f"Total {m.get('total_seconds', '?')} s. `other load` = cores used by processes this "
        "benchmark did not start (1-minute load average in brackets).",
    ]
    sink = report.get("sink")
    if sink:
        s = sink["sink"]
        lines += [
            "",
            f"### Sink: {sink['events']:,} Usage events, Kafka ({sink['partitions']} partitions)"
            " → ClickHouseSink → usage_events",
            "",
            f"Events of {sink['mean_event_bytes']} bytes (Avro), produced beforehand in "
            f"{sink['produce_s']} s. Sink batch {sink['batch_size']}.",
            "",
            "| path | events/s | seconds | vs the sink | CPU cores (this process) | other load |",
            "|---|--:|--:|--:|--:|--:|",
        ]

        def row(label: str, part: dict[str, Any]) -> str:
            ratio = part["events_per_s"] / s["events_per_s"] if s["events_per_s"] else 0
            return (
                f"| {label} | {_n(part['events_per_s'])} | {part['seconds']:.2f} "
                f"| {ratio:.1f}x | {part['resources']['bench_cores']:.2f} "
                f"| {_load(part['resources'])} |"
            )

        lines += [
            row("baseline: aiokafka consume only (Kafka ceiling)", sink["consume_only"]),
            row("baseline: consume + Avro decode + row conversion", sink["consume_decode"]),
            row(
                "baseline: clickhouse-connect insert, with rollup MVs (ClickHouse ceiling)",
                sink["direct_insert_mv"],
            ),
            row("baseline: clickhouse-connect insert, no MVs", sink["direct_insert_no_mv"]),
            row("**ClickHouseSink, start → N rows counted**", s),
            f"| ClickHouseSink after its first batch | "
            f"{_n(s['after_first_batch_events_per_s'])} | | | | |",
            f"| ClickHouseSink insert calls only | {_n(s['insert_only_events_per_s'])} | "
            f"{s['breakdown_s']['insert (client.insert, MVs included), thread']:.2f} | | | |",
            f"| ClickHouseSink dedupe + insert (`_insert_new`) | "
            f"{_n(s['insert_and_dedupe_events_per_s'])} | | | | |",
            "",
            "Where the sink's time goes:",
            "",
            "| part | seconds | share | µs per event |",
            "|---|--:|--:|--:|",
        ]
        for part, seconds in s["breakdown_s"].items():
            lines.append(
                f"| {part} | {seconds:.2f} | {seconds / s['seconds'] * 100:.0f} % "
                f"| {s['breakdown_us_per_event'][part]:.1f} |"
            )
        cd = sink["consume_decode"]
        lines += [
            "",
            f"Measured alone (consume + decode baseline): Avro decode "
            f"{cd['decode_us_per_event']} µs, row conversion {cd['convert_us_per_event']} µs "
            f"per event. Sink batches: {s['batches']} (median {s['batch_rows_p50']} rows); "
            f"dedupe query p50 {s['dedupe_query_ms']['p50']} ms, insert p50 "
            f"{s['insert_ms']['p50']} ms per batch (first 5 vs last 5 batches: insert "
            f"{s['first_vs_last_5_batches_insert_ms'][0]} → "
            f"{s['first_vs_last_5_batches_insert_ms'][1]} ms, dedupe "
            f"{s['first_vs_last_5_batches_dedupe_ms'][0]} → "
            f"{s['first_vs_last_5_batches_dedupe_ms'][1]} ms). Rows = events, one per event "
            f"id, cost to the nano-dollar: {'yes' if s['rows_unique_cost_match'] else 'NO'}; "
            f"duplicates dropped {s['duplicates_dropped']}, dead-lettered {s['dead_lettered']}, "
            f"looked up in ClickHouse before inserting {s['looked_up_in_clickhouse']:,} "
            "(the rest were known new from the sink's memory). Parts overlap: the next batch "
            "is decoded while this one is inserted. "
            f"Kafka broker used {s['resources']['kafka_cores']:.2f} cores during the sink run.",
            "",
            f"Target ≥ {TARGET_SINK_EVENTS_PER_S:,} events/s: "
            + (
                f"**met** ({s['events_per_s']:,} events/s)."
                if s["events_per_s"] >= TARGET_SINK_EVENTS_PER_S
                else f"**NOT met** ({s['events_per_s']:,} events/s, "
                f"{s['events_per_s'] / TARGET_SINK_EVENTS_PER_S:.0%} of it)."
            ),
        ]
    rep = report.get("reports")
    if rep:
        t = rep["tables"]

        def rows_of(name: str) -> str:
            return _n(t.get(name, {}).get("rows", 0))

        lines += [
            "",
            f"### Reports at {rep['rows']:,} usage rows over {rep['days']} days",
            "",
            f"Generated in {rep['generate_usage']['wall_s']:.0f} s inside ClickHouse (other "
            f"load {_load(rep['generate_usage'])}); {rep['mix']['users']} users, "
            f"{_n(rep['mix']['cache_hits'])} cache hits, {_n(rep['mix']['downtiered'])} "
            f"downtiered, {_n(rep['mix']['unpriced'])} unpriced, {_n(rep['mix']['errors'])} "
            f"errors. Rollups: usage_minute {rows_of('usage_minute')} rows, usage_user_hour "
            f"{rows_of('usage_user_hour')}, outcome_minute {rows_of('outcome_minute')}. "
            f"Outcomes {rows_of('outcome_events')}, alerts {rows_of('alert_events')}, budget "
            f"decisions {rows_of('budget_decisions')}. Active parts: "
            + ", ".join(f"{k} {v['parts']}" for k, v in t.items() if k != "schema_migrations")
            + f" (after waiting {rep['merges_wait_s']} s for merges). Naive = the same report "
            "with every range read from raw `usage_events FINAL` (no rollups).",
            "",
            "| report | range | p50 ms | p99 ms | naive p50 ms | naive p99 ms | speed-up p50 "
            "| same numbers | ≤ 300 ms |",
            "|---|---|--:|--:|--:|--:|--:|---|---|",
        ]
        for r in rep["reports"]:
            naive = r["naive_ms"] or {}
            same = {True: "yes", False: "NO", None: "-"}[r["same_numbers"]]
            target = {True: "yes", False: "**NO**", None: "(part of savings)"}[r["meets_target"]]
            name = r["report"] if r["dashboard"] else f"↳ {r['report']}"
            lines.append(
                f"| {name} | {r['range']} | {_n(r['rollups_ms']['p50'])} "
                f"| {_n(r['rollups_ms']['p99'])} | {_n(naive.get('p50'))} "
                f"| {_n(naive.get('p99'))} | "
                f"{_n(r['speedup_p50']) + 'x' if r['speedup_p50'] else '-'} | {same} "
                f"| {target} |"
            )
        failing = [
            f"{r['report']} [{r['range']}]" for r in rep["reports"] if r["meets_target"] is False
        ]
        first = rep["reports"][0]
        at = rep["sink_at_scale"]
        lines += [
            "",
            f"{first['runs']} runs with rollups, {first['naive_runs']} naive, after one warm-up "
            "each (the two must give the same numbers); run r reads the range moved back by r "
            f"minutes, as a dashboard refreshed every minute would. With {first['runs']} runs "
            "the p99 is close to the maximum. Other load during the timings: "
            f"{_load(rep['reports_resources'])}.",
            "",
            f"The sink against these {rep['rows']:,} rows, {at['steady']['batches']} batches "
            f"of {at['steady']['batch_rows']} fresh events each through "
            "`ClickHouseSink._insert_new`: right after a restart (every id looked up in "
            f"ClickHouse: {', '.join(str(v) for v in at['after_restart']['dedupe_query_ms'])} "
            f"ms) {_n(at['after_restart']['events_per_s'])} events/s; in steady state "
            f"({at['steady']['looked_up_in_clickhouse']:,} ids looked up) "
            f"{_n(at['steady']['events_per_s'])} events/s (insert "
            f"{', '.join(str(v) for v in at['steady']['insert_ms'])} ms). The same batches "
            f"re-sent to a fresh sink (all {at['resent']['duplicates_dropped']:,} dropped, "
            f"{at['resent']['rollup_hours_rebuilt']} rollup hours rebuilt from the raw rows): "
            f"{_n(at['resent']['events_per_s'])} events/s, batches "
            f"{', '.join(str(v) for v in at['resent']['batch_ms'])} ms; rollups equal to the "
            f"raw rows after it: {at['resent']['rollups_match_raw']}.",
            "",
            f"Target every dashboard query ≤ {TARGET_REPORT_MS:.0f} ms (p99): "
            + ("**met**." if not failing else f"**NOT met** by {', '.join(failing)}."),
        ]
    return "\n".join(lines)


def _strip_private(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip_private(v) for k, v in value.items() if not k.startswith("_")}
    if isinstance(value, list):
        return [_strip_private(v) for v in value]
    return value


# -- main --------------------------------------------------------------------------------------
def run_benchmark(args: argparse.Namespace) -> int:
    report: dict[str, Any] = {"plan": _strip_private(vars(args).copy())}
    report["machine"] = machine_info()
    if args.wait_quiet > 0:
        report["machine"]["other_load_before_start"] = wait_quiet(args.wait_quiet)
    tmp = Path(tempfile.mkdtemp(prefix="tollgate-bench-warehouse-"))
    chdb_dir = tmp / "chdb"  # the one chdb directory of this process
    started = time.monotonic()
    try:
        if not args.skip_sink:
            report["sink"] = sink_part(args, tmp, chdb_dir)
        if not args.skip_reports:
            report["reports"] = reports_part(args, chdb_dir)
        from app.warehouse.clickhouse import connect

        report["machine"]["clickhouse"] = (
            connect(dsn=f"chdb://{chdb_dir}").query("SELECT version()").result_rows[0][0]
        )
    finally:
        if args.keep_temp:
            log(f"kept the chdb directory and Kafka state in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    report["machine"]["total_seconds"] = round(time.monotonic() - started, 1)
    report["machine"]["loadavg_at_end"] = [round(v, 2) for v in os.getloadavg()]
    document = orjson.dumps(report, option=orjson.OPT_INDENT_2, default=str).decode()
    publish(markdown(report), document, args.json_out)
    return 0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.warehouse",
        description="ClickHouse sink throughput and report latency, against same-run baselines.",
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: 1M rows, 20k events")
    parser.add_argument("--events", type=int, default=None, help="sink events (200000)")
    parser.add_argument("--rows", type=int, default=None, help="usage rows (10000000)")
    parser.add_argument("--days", type=int, default=30, help="days the rows span (30)")
    parser.add_argument("--runs", type=int, default=20, help="timed runs per report (20)")
    parser.add_argument(
        "--naive-runs", type=int, default=None, help="timed naive runs per report (5; quick 3)"
    )
    parser.add_argument(
        "--batch-size", type=int, default=BATCH, help="the sink's batch size (its default 5000)"
    )
    parser.add_argument("--skip-sink", action="store_true", help="reports only (no Kafka)")
    parser.add_argument("--skip-reports", action="store_true", help="sink only")
    parser.add_argument("--seed", type=int, default=20240601)
    parser.add_argument("--kafka-port", type=int, default=0, help="default: a free port")
    parser.add_argument("--kafka-controller-port", type=int, default=0, help="default: free")
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=None,
        help="wait up to this many seconds for an idle machine first (default 30; quick 0)",
    )
    parser.add_argument("--json-out", default=None, help="also write the JSON figures here")
    parser.add_argument("--keep-temp", action="store_true", help="keep chdb and Kafka state")
    args = parser.parse_args(argv)
    if args.events is None:
        args.events = 20_000 if args.quick else 200_000
    if args.rows is None:
        args.rows = 1_000_000 if args.quick else 10_000_000
    if args.naive_runs is None:
        args.naive_runs = 3 if args.quick else 5
    if args.wait_quiet is None:
        args.wait_quiet = 0.0 if args.quick else 30.0
    if args.events < BATCH or args.rows < 1000 or args.days < 1 or args.runs < 1:
        raise SystemExit(f"--events >= {BATCH}, --rows >= 1000, --days and --runs >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # Quiet: the unpriced model's one warning, and aiokafka's noise while a fresh broker
    # elects leaders and a group coordinator.
    logging.getLogger("app.pricing.catalog").setLevel(logging.ERROR)
    logging.getLogger("aiokafka").setLevel(logging.ERROR)
    logging.getLogger("aiokafka.consumer.group_coordinator").addFilter(
        lambda record: "GroupCoordinatorNotAvailable" not in record.getMessage()
    )
    signal.signal(signal.SIGTERM, _sigterm_to_exit)  # so that `finally` cleans up
    signal.signal(signal.SIGINT, signal.default_int_handler)
    with contextlib.suppress(KeyboardInterrupt):
        return run_benchmark(args)
    return 130


if __name__ == "__main__":
    sys.exit(main())
