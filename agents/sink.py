"""The ClickHouse sink: every event on Kafka lands in the warehouse exactly once.

Owns the path topic → table. It is a plain aiokafka consumer group rather than a
Faust agent, because its guarantee rests on one ordering that must be explicit:
**insert first, commit offsets after**. Per batch (bounded by size and time):

1. decode each record; undecodable ones go to ``<prefix>.deadletter`` with the
   reason and their origin in headers, and the sink keeps going;
2. drop events whose ``event_id`` is already in the table (a batch re-consumed
   after a crash, or a producer's at-least-once re-send), and duplicates inside
   the batch. Asking ClickHouse for every batch would slow down as the table
   grows (a 5,000-id lookup took 0.6 s at 10M rows), so the sink remembers the
   ids it inserted (``RecentIds``) and asks ClickHouse only about events that
   someone else may have inserted: the first batch of a partition after it was
   assigned to this sink, events whose time is before this sink started (plus
   the 5 minutes of clock skew the API accepts), and events older than the ids
   it has forgotten;
3. insert; if ClickHouse is down, retry with backoff, holding the batch and the
   offsets — nothing is committed, nothing is lost;
4. commit the batch's offsets. The next batch is fetched and decoded while this
   one is inserted; commits stay in order.

So at-least-once delivery from Kafka yields exactly-once rows. The tables are
also ``ReplacingMergeTree`` with ``event_id`` in the key, a second net.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaConnectionError

from app.codec import EventCodec, EventDecodeError, build_codec
from app.pricing import NANOS_PER_USD
from app.settings import Settings

log = logging.getLogger(__name__)

RETRY_BACKOFF_S = (0.5, 1.0, 2.0, 5.0, 10.0)


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


class RecentIds:
    """Event ids this process inserted, bounded; older ones are forgotten oldest first."""

    def __init__(self, capacity: int = 1_000_000) -> None:
        self.capacity = capacity
        self._ids: OrderedDict[str, datetime] = OrderedDict()
        self.forgotten_until: datetime | None = None  # newest event time evicted so far

    def __contains__(self, event_id: object) -> bool:
        return event_id in self._ids

    def add(self, event_id: str, ts: datetime) -> None:
        self._ids[event_id] = ts
        while len(self._ids) > self.capacity:
            _, evicted = self._ids.popitem(last=False)
            if self.forgotten_until is None or evicted > self.forgotten_until:
                self.forgotten_until = evicted


# Events can carry times up to this far ahead of the clock (``/v1/usage`` accepts it).
CLOCK_SKEW = timedelta(minutes=5)


@dataclass
class _Pending:
    """A decoded batch: rows by table and event id, and the offsets to commit after it."""

    rows: dict[str, dict[str, tuple[list[Any], datetime, bool]]]
    offsets: dict[TopicPartition, int]


class ClickHouseSink:
    def __init__(
        self,
        settings: Settings,
        client: Any,
        *,
        codec: EventCodec | None = None,
        batch_size: int = 5000,
        batch_wait_s: float = 1.0,
    ) -> None:
        self.settings = settings
        self.client = client
        self.codec = codec or build_codec(settings.schema_registry_url)
        self.batch_size = batch_size
        self.batch_wait_s = batch_wait_s
        self.topics = {settings.topic(suffix): suffix for suffix in TABLES}
        self.inserted = 0
        self.duplicates_dropped = 0
        self.dead_lettered = 0
        self.checked_in_clickhouse = 0  # events looked up in ClickHouse before inserting
        self.recent = RecentIds()
        self.started_at = datetime.now(UTC)
        self._first_offset: dict[TopicPartition, int] = {}  # since this sink was assigned it

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Consume until ``stop`` is set (or cancelled); commits only what is inserted."""
        stop = stop or asyncio.Event()
        sink = self

        class Assignments(ConsumerRebalanceListener):
            async def on_partitions_revoked(self, revoked: Any) -> None:
                pass

            async def on_partitions_assigned(self, assigned: Any) -> None:
                for tp in assigned:  # another sink may have inserted its uncommitted tail
                    sink._first_offset.pop(tp, None)

        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.settings.kafka_bootstrap,
            group_id=f"{self.settings.topic_prefix}-clickhouse-sink",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_records=self.batch_size,
        )
        dead_letters = AIOKafkaProducer(bootstrap_servers=self.settings.kafka_bootstrap, acks="all")
        inserting: asyncio.Task[None] | None = None
        in_flight: _Pending | None = None
        try:
            await consumer.start()
            consumer.subscribe(list(self.topics), listener=Assignments())
            await dead_letters.start()
            while not stop.is_set():
                batch = await self._fetch(consumer, stop)
                pending = await self._decode(batch, dead_letters) if batch else None
                if inserting is not None and in_flight is not None:
                    await inserting  # the previous batch: insert, then commit, in order
                    await consumer.commit(in_flight.offsets)
                    inserting = in_flight = None
                if pending is not None:
                    in_flight = pending
                    inserting = asyncio.create_task(self._insert_with_retry(pending, stop))
            if inserting is not None and in_flight is not None:
                await inserting
                await consumer.commit(in_flight.offsets)
        finally:
            if inserting is not None and not inserting.done():
                inserting.cancel()
                with contextlib.suppress(BaseException):
                    await inserting
            with contextlib.suppress(Exception):
                await dead_letters.stop()
            with contextlib.suppress(Exception):
                await consumer.stop()

    async def _fetch(self, consumer: AIOKafkaConsumer, stop: asyncio.Event) -> list[Any]:
        """Up to ``batch_size`` records, or what arrived within ``batch_wait_s``."""
        batch: list[Any] = []
        deadline = time.monotonic() + self.batch_wait_s
        while len(batch) < self.batch_size and time.monotonic() < deadline:
            if stop.is_set():
                break
            fetched = await consumer.getmany(
                timeout_ms=200, max_records=self.batch_size - len(batch)
            )
            for messages in fetched.values():
                batch.extend(messages)
        return batch

    async def _decode(self, batch: list[Any], dead_letters: AIOKafkaProducer) -> _Pending:
        rows: dict[str, dict[str, tuple[list[Any], datetime, bool]]] = {s: {} for s in TABLES}
        offsets: dict[TopicPartition, int] = {}
        trusted_from = self.started_at + CLOCK_SKEW
        for m in batch:
            tp = TopicPartition(m.topic, m.partition)
            offsets[tp] = max(offsets.get(tp, 0), m.offset + 1)
            first = self._first_offset.setdefault(tp, m.offset)
            suffix = self.topics[m.topic]
            try:
                record = self.codec.decode(
                    m.value, topic=m.topic, partition=m.partition, offset=m.offset
                ).record
                row = TABLES[suffix].row(record)
            except (EventDecodeError, KeyError) as exc:
                await self._dead_letter(dead_letters, m, str(exc))
                continue
            ts = record["ts"]
            forgotten = self.recent.forgotten_until
            # Could someone else (an earlier run, another sink) have inserted this event?
            suspect = (
                m.offset < first + self.batch_size
                or ts < trusted_from
                or (forgotten is not None and ts <= forgotten)
            )
            rows[suffix][record["event_id"]] = (row, ts, suspect)  # in-batch duplicates collapse
        return _Pending(rows, offsets)

    async def _insert_with_retry(self, pending: _Pending, stop: asyncio.Event) -> None:
        attempt = 0
        while True:
            try:
                await asyncio.to_thread(self._insert_new, pending.rows)
                return
            except Exception as exc:
                if stop.is_set():
                    raise
                delay = RETRY_BACKOFF_S[min(attempt, len(RETRY_BACKOFF_S) - 1)]
                log.warning(
                    "ClickHouse insert failed; batch held, offsets not committed; retrying",
                    extra={"error": repr(exc)[:300], "retry_in_s": delay},
                )
                attempt += 1
                await asyncio.sleep(delay)

    def _insert_new(self, rows: dict[str, dict[str, tuple[list[Any], datetime, bool]]]) -> None:
        for suffix, by_id in rows.items():
            if not by_id:
                continue
            table = TABLES[suffix]
            new = {event_id: v for event_id, v in by_id.items() if event_id not in self.recent}
            suspects = [event_id for event_id, (_, _, suspect) in new.items() if suspect]
            known: set[str] = set()
            if suspects:
                times = [new[event_id][1] for event_id in suspects]
                self.checked_in_clickhouse += len(suspects)
                known = {
                    r[0]
                    for r in self.client.query(
                        f"SELECT event_id FROM {table.table} WHERE ts >= %(lo)s AND ts <= %(hi)s "
                        "AND event_id IN %(ids)s",
                        parameters={"ids": suspects, "lo": min(times), "hi": max(times)},
                    ).result_rows
                }
            fresh = [(event_id, v) for event_id, v in new.items() if event_id not in known]
            self.duplicates_dropped += len(by_id) - len(fresh)
            if fresh:
                self.client.insert(
                    table.table, [row for _, (row, _, _) in fresh], column_names=list(table.columns)
                )
                self.inserted += len(fresh)
                for event_id, (_, ts, _) in fresh:
                    self.recent.add(event_id, ts)

    async def _dead_letter(self, producer: AIOKafkaProducer, message: Any, reason: str) -> None:
        self.dead_lettered += 1
        log.error("undecodable event sent to the dead-letter topic", extra={"reason": reason[:300]})
        await producer.send_and_wait(
            self.settings.topic("deadletter"),
            message.value,
            key=message.key,
            headers=[
                ("reason", reason.encode()[:1000]),
                ("topic", message.topic.encode()),
                ("partition", str(message.partition).encode()),
                ("offset", str(message.offset).encode()),
            ],
        )


def run_sink(settings: Settings) -> None:
    """``tollgate sink``: migrate, then consume into ClickHouse until interrupted."""
    from app.warehouse import ReconnectingClient, connect, describe, migrate

    client = connect(settings)
    applied = migrate(client)
    log.info(
        "warehouse ready",
        extra={"clickhouse": describe(client), "dsn": settings.clickhouse_dsn, "migrated": applied},
    )
    # chdb is in-process: this sink is the one process that opens it, so it also serves the
    # reports (the dispatcher proxies /v1/reports/* here).
    reconnecting = ReconnectingClient(
        lambda: client if settings.clickhouse_dsn.startswith("chdb") else connect(settings)
    )
    asyncio.run(_sink_and_reports(settings, reconnecting))


async def _sink_and_reports(settings: Settings, client: Any) -> None:
    from aiohttp import web

    from app.budgets.policy import PolicyBook
    from app.compacted import CompactedView
    from app.reports_api import create_reports_app

    # The budgets report lists scopes that still have a cap: follow the policies topic.
    policies = PolicyBook()
    policy_view = CompactedView(
        settings.kafka_bootstrap,
        settings.topic("budget.policies"),
        build_codec(settings.schema_registry_url),
        on_record=lambda scope, record: policies.apply_record(record, scope),
    )
    await policy_view.start(timeout_s=5)
    runner = web.AppRunner(
        create_reports_app(
            client,
            baseline_model=settings.baseline_model,
            active_scope=lambda scope: policies.policy_for(scope) is not None,
        ),
        access_log=None,
    )
    await runner.setup()
    await web.TCPSite(runner, settings.reports_host, settings.reports_port).start()
    log.info("reports served", extra={"url": settings.reports_url})
    sink = ClickHouseSink(settings, client)
    attempt = 0
    try:
        while True:
            try:
                await sink.run()
                return
            except KafkaConnectionError as exc:  # Kafka not up yet, or gone: wait, resume
                delay = RETRY_BACKOFF_S[min(attempt, len(RETRY_BACKOFF_S) - 1)]
                log.warning(
                    "Kafka unreachable; sink retrying",
                    extra={"error": str(exc), "retry_in_s": delay},
                )
                attempt += 1
                await asyncio.sleep(delay)
    finally:
        await policy_view.stop()
        await runner.cleanup()
