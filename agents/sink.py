"""The ClickHouse sink: every event on Kafka lands in the warehouse exactly once.

Owns the path topic → table. It is a plain aiokafka consumer group rather than a
Faust agent, because its guarantee rests on one ordering that must be explicit:
**insert first, commit offsets after**. Per batch (bounded by size and time):

1. frame each record (Confluent header, schema id, ``event_id`` and ``ts``; the
   body is not decoded in Python: ClickHouse reads the Avro itself, as an object
   container file built from the bodies, and maps fields to columns by name);
   records that do not frame go to ``<prefix>.deadletter`` with the reason and
   their origin in headers, and the sink keeps going. If ClickHouse refuses a
   batch, its records are decoded one by one and those that do not decode are
   dead-lettered, so one corrupt body never blocks the rest;
2. drop events whose ``event_id`` is already in the table (a batch re-consumed
   after a crash, or a producer's at-least-once re-send), and duplicates inside
   the batch. Asking ClickHouse for every batch would slow down as the table
   grows (a 5,000-id lookup took 0.6 s at 10M rows), so the sink remembers the
   ids it inserted (``RecentIds``) and asks ClickHouse only about events that
   someone else may have inserted: the first batch of a partition after it was
   assigned to this sink (another sink's uncommitted tail), events no newer
   than the newest one the table held when this sink started (an earlier run's
   rows, and re-sends of them), and events older than the ids it has forgotten;
3. insert; if ClickHouse is down or cannot write, retry with backoff for as long as
   it takes, holding the batch and the offsets — nothing is committed, nothing is
   lost. Only an error that names the data (``refuses_data``: a parse, type or range
   error) sends events to the dead-letter topic, one by one; an outage never does.
   After a failed insert every event of the batch is looked up in ClickHouse before
   the retry, because a failure can come after part of the batch was written;
4. commit the batch's offsets. The next batch is fetched and decoded while this
   one is inserted; commits stay in order. A commit refused because this sink lost
   its group (stalled longer than the session timeout, or a rebalance) is logged and
   skipped: the rows are in, the records come back to whoever owns the partition
   now, and they are dropped there as duplicates. Other Kafka trouble ends the run,
   and ``retry_while_kafka_down`` starts a new consumer that rejoins the group.

So at-least-once delivery from Kafka yields exactly-once rows. The tables are
also ``ReplacingMergeTree`` with ``event_id`` in the key, a second net.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections import OrderedDict
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError
from clickhouse_connect.driver.exceptions import DatabaseError, OperationalError

from app.events import clients
from app.events.codec import (
    ContainerWriter,
    EventCodec,
    EventDecodeError,
    FrameError,
    build_codec,
    event_key,
    split_frame,
)
from app.events.kafka_retry import retry_while_kafka_down
from app.retry import log_before_retry, retry_until_stopped
from app.settings import Settings
from app.warehouse import rollups

log = logging.getLogger(__name__)

RETRY_BACKOFF_S = (0.5, 1.0, 2.0, 5.0, 10.0)
LOOKUP_CHUNK = 2000  # event ids per ClickHouse lookup


# topic suffix -> (table, event type on that topic)
TABLES: dict[str, tuple[str, str]] = {
    "usage": ("usage_events", "Usage"),
    "requests": ("request_events", "Request"),
    "outcomes": ("outcome_events", "Outcome"),
    "alerts": ("alert_events", "Alert"),
    "budget.decisions": ("budget_decisions", "BudgetDecision"),
}


# ClickHouse error codes that mean "this data cannot go into this table", as opposed to
# "ClickHouse cannot take writes now" (down, disk read-only, too many parts, memory...).
DATA_ERROR_CODES = frozenset(
    {
        6,  # CANNOT_PARSE_TEXT
        26,  # CANNOT_PARSE_QUOTED_STRING
        27,  # CANNOT_PARSE_INPUT_ASSERTION_FAILED
        32,  # ATTEMPT_TO_READ_AFTER_EOF
        33,  # CANNOT_READ_ALL_DATA
        38,  # CANNOT_PARSE_DATE
        41,  # CANNOT_PARSE_DATETIME
        53,  # TYPE_MISMATCH
        69,  # ARGUMENT_OUT_OF_BOUND
        70,  # CANNOT_CONVERT_TYPE
        72,  # CANNOT_PARSE_NUMBER
        117,  # INCORRECT_DATA
        321,  # VALUE_IS_OUT_OF_RANGE_OF_DATA_TYPE
        349,  # CANNOT_INSERT_NULL_IN_ORDINARY_COLUMN
        395,  # FUNCTION_THROW_IF_VALUE_IS_NON_ZERO
        407,  # DECIMAL_OVERFLOW
        469,  # VIOLATED_CONSTRAINT
    }
)
_ERROR_CODE = re.compile(r"\bCode: (\d+)\.")


def refuses_data(exc: BaseException) -> bool:
    """ClickHouse answered, and what it refuses is the data (not a failure to write)."""
    if not isinstance(exc, DatabaseError) or isinstance(exc, OperationalError):
        return False
    match = _ERROR_CODE.search(str(exc))
    return match is not None and int(match.group(1)) in DATA_ERROR_CODES


def _event_time(millis: int) -> datetime:
    """An event's ``ts`` (epoch ms, read by ``event_key``) as a time, or a FrameError."""
    try:
        return datetime.fromtimestamp(millis / 1000, UTC)
    except (OverflowError, OSError, ValueError):
        raise FrameError(f"ts {millis} is not a time") from None


@dataclass
class _Event:
    schema_id: int
    body: bytes  # the Avro body, without the 5-byte Confluent header
    ts: datetime
    # Maybe in ClickHouse already: among the first offsets since this sink was assigned
    # the partition (another sink's uncommitted tail), or in a batch whose insert failed.
    early: bool
    message: Any  # the Kafka record, for the dead-letter topic


def _aware(value: datetime | None) -> datetime:
    if value is None:
        return datetime.min.replace(tzinfo=UTC)
    return value if value.tzinfo else value.replace(tzinfo=UTC)


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


@dataclass
class _Pending:
    """A framed batch: events by table and event id, and the offsets to commit after it."""

    events: dict[str, dict[str, _Event]]
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
        self.tombstones = 0  # compacted-topic removals seen, nothing to store
        self.commits_lost = 0  # commits refused after this sink lost its group
        self.insert_failures = 0
        self.checked_in_clickhouse = 0  # events looked up in ClickHouse before inserting
        self.rollup_hours_checked = 0  # hours whose rollups were compared with the raw events
        self.rollup_hours_rebuilt = 0  # ... and rebuilt from them, being short
        # Hours checked (and rebuilt when short) since this sink's last assignment or failed
        # insert: their rollups hold every raw row stored before, and this sink's own inserts
        # since then filled them, so more duplicates of those hours need no second look.
        self._rebuilt: dict[str, set[datetime]] = {}
        self.recent = RecentIds()
        self._stored_until: dict[str, datetime] = {}  # newest event time per table at start
        self._column_cache: dict[tuple[str, int], list[str]] = {}
        self.containers = ContainerWriter(self.codec)
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
                sink._rebuilt.clear()  # ... and been cut off before its rollups

        consumer = clients.consumer(
            self.settings,  # topics: subscribed below, with the rebalance listener
            purpose="clickhouse-sink",
            group_id=f"{self.settings.topic_prefix}-clickhouse-sink",
            max_poll_records=self.batch_size,  # one poll is at most one ClickHouse insert
        )
        dead_letters = clients.producer(self.settings, purpose="clickhouse-sink-deadletter")
        self._dead_letters = dead_letters
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
                    await self._commit(consumer, in_flight.offsets)
                    inserting = in_flight = None
                if pending is not None:
                    in_flight = pending
                    inserting = asyncio.create_task(self._insert_with_retry(pending, stop))
            if inserting is not None and in_flight is not None:
                await inserting
                await self._commit(consumer, in_flight.offsets)
        finally:
            if inserting is not None and not inserting.done():
                inserting.cancel()
                with contextlib.suppress(BaseException):
                    await inserting
            with contextlib.suppress(Exception):
                await dead_letters.stop()
            await clients.stop_within(consumer)

    async def _commit(self, consumer: AIOKafkaConsumer, offsets: dict[TopicPartition, int]) -> None:
        """Commit a batch that is in ClickHouse; a refusal for a lost group is not fatal."""
        try:
            await consumer.commit(offsets)
        except (CommitFailedError, IllegalStateError) as exc:
            # The group moved on without this sink (a stall past the session timeout, or a
            # rebalance). aiokafka rejoins on the next fetch; the records come back to the
            # partition's new owner, which finds their rows and drops them as duplicates.
            self.commits_lost += 1
            log.warning(
                "offsets not committed: this sink lost its consumer group; the batch is in "
                "ClickHouse and its records will be re-read and dropped as duplicates",
                extra={"error": f"{type(exc).__name__}: {exc}"[:300], "records": len(offsets)},
            )

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
        """Frame each record: schema id, event id and time; nothing else is decoded here."""
        events: dict[str, dict[str, _Event]] = {suffix: {} for suffix in TABLES}
        offsets: dict[TopicPartition, int] = {}
        for m in batch:
            tp = TopicPartition(m.topic, m.partition)
            offsets[tp] = max(offsets.get(tp, 0), m.offset + 1)
            first = self._first_offset.setdefault(tp, m.offset)
            suffix = self.topics[m.topic]
            if m.value is None:  # a tombstone: a compacted key removed (a cap deleted)
                self.tombstones += 1
                continue
            try:
                schema_id, body = split_frame(m.value)
                self._check_type(schema_id, TABLES[suffix][1])
                event_id, millis = event_key(body)
                ts = _event_time(millis)
            except (FrameError, EventDecodeError) as exc:
                await self._dead_letter(dead_letters, m, str(exc))
                continue
            early = m.offset < first + self.batch_size  # maybe another sink's uncommitted tail
            # A duplicate inside the batch collapses here, to the first on the topic: the one
            # the spend worker counted (a settler's estimate and a late real usage share an id).
            if event_id in events[suffix]:
                self.duplicates_dropped += 1
                continue
            events[suffix][event_id] = _Event(schema_id, body, ts, early, m)
        return _Pending(events, offsets)

    def _check_type(self, schema_id: int, event_type: str) -> None:
        try:
            found = self.codec.event_type_of(schema_id)
        except KeyError:
            raise FrameError(f"unknown schema id {schema_id}") from None
        if found != event_type:
            raise FrameError(f"a {found} event on the {event_type} topic")

    async def _insert_with_retry(self, pending: _Pending, stop: asyncio.Event) -> None:
        """Insert ``pending`` for as long as it takes; once ``stop`` is set, a failure is
        raised instead (the batch is not committed, so the next owner inserts it)."""
        retrying = retry_until_stopped(
            steps=RETRY_BACKOFF_S,
            stop=stop,
            when_stopped="raise",
            before_sleep=log_before_retry(
                log, "ClickHouse insert failed; batch held, offsets not committed; retrying"
            ),
        )
        async for attempt in retrying:
            with attempt:
                failed_before = attempt.retry_state.attempt_number - 1
                if await self._insert_once(pending, failed_before) and failed_before:
                    log.info(
                        "ClickHouse takes inserts again", extra={"failed_attempts": failed_before}
                    )

    async def _insert_once(self, pending: _Pending, failed_before: int) -> bool:
        """One try: True once the batch is in, False once its events ClickHouse refuses are
        dead-lettered and the rest are in; raises when ClickHouse cannot take the batch."""
        while True:
            try:
                await asyncio.to_thread(self._insert_new, pending.events)
                return True
            except Exception as exc:
                self.insert_failures += 1
                self._rebuilt.clear()  # the failed insert may have left rollups short
                # Part of the batch may be in (one table of several, or a table but not
                # its materialized views): look every event up before inserting again.
                for by_id in pending.events.values():
                    for event in by_id.values():
                        event.early = True
                if await self._drop_undecodable(pending):
                    continue  # ClickHouse refused a corrupt body; the rest goes in at once
                # ClickHouse answers but keeps refusing a batch that decodes: find the events
                # it refuses (e.g. a value out of a column's range), one by one. If it fails
                # for another reason meanwhile, that is an outage after all: retry the rest.
                if (
                    refuses_data(exc)
                    and failed_before >= 2
                    and await self._isolate_refused(pending)
                ):
                    return False
                raise

    async def _isolate_refused(self, pending: _Pending) -> bool:
        """Insert event by event; dead-letter those whose data ClickHouse refuses, with its
        reason. False, with the rest still pending, if ClickHouse fails for another reason."""
        for suffix, by_id in pending.events.items():
            for event_id, event in list(by_id.items()):
                try:
                    await asyncio.to_thread(self._insert_new, {suffix: {event_id: event}})
                except Exception as exc:
                    if not refuses_data(exc):
                        return False
                    del by_id[event_id]
                    await self._dead_letter(
                        self._dead_letters, event.message, f"ClickHouse refused it: {exc}"
                    )
                else:
                    del by_id[event_id]  # inserted
        return True

    async def _drop_undecodable(self, pending: _Pending) -> bool:
        """After a failed insert: fully decode the batch, dead-letter what does not decode."""
        dropped = False
        for by_id in pending.events.values():
            for event_id, event in list(by_id.items()):
                m = event.message
                try:
                    self.codec.decode(
                        m.value, topic=m.topic, partition=m.partition, offset=m.offset
                    )
                except EventDecodeError as exc:
                    del by_id[event_id]
                    await self._dead_letter(self._dead_letters, m, str(exc))
                    dropped = True
        return dropped

    def _insert_new(self, events: dict[str, dict[str, _Event]]) -> None:
        for suffix, by_id in events.items():
            if not by_id:
                continue
            table = TABLES[suffix][0]
            new = {event_id: e for event_id, e in by_id.items() if event_id not in self.recent}
            fresh = self._not_stored(table, new)
            self.duplicates_dropped += len(by_id) - len(fresh)
            rebuilt = self._rebuilt.setdefault(table, set())
            stored_before = set(
                rollups.hours_of(e.ts for event_id, e in new.items() if event_id not in fresh)
            )
            if stored_before - rebuilt:  # an earlier insert of them may have been cut off
                # before its rollups were filled (a sink killed mid-insert): check their hours,
                # rebuild those short
                hours = sorted(stored_before - rebuilt)
                self.rollup_hours_checked += len(hours)
                self.rollup_hours_rebuilt += rollups.rebuild(self.client, table, hours)
                rebuilt.update(hours)
            by_schema: dict[int, list[tuple[str, _Event]]] = {}
            for event_id, event in fresh.items():
                by_schema.setdefault(event.schema_id, []).append((event_id, event))
            for schema_id, group in by_schema.items():
                self.client.raw_insert(
                    table,
                    self._columns(table, schema_id),
                    insert_block=self.containers.container(schema_id, [e.body for _, e in group]),
                    fmt="Avro",
                )
                # Remembered group by group: a retry after a later group failed skips these.
                self.inserted += len(group)
                for event_id, event in group:
                    self.recent.add(event_id, event.ts)

    def _not_stored(self, table: str, new: dict[str, _Event]) -> dict[str, _Event]:
        """``new`` without the events ClickHouse already holds (asked only about suspects)."""
        if table not in self._stored_until:
            newest = self.client.query(f"SELECT max(ts) FROM {table}").result_rows[0][0]
            self._stored_until[table] = _aware(newest)
        # An estimate of a call's usage (the spend worker's settlement) is stamped at the
        # call's start, its real usage at its end: one id up to a call's length apart.
        reach = timedelta(seconds=1)
        if table == TABLES["usage"][0]:
            reach += timedelta(seconds=self.settings.max_call_duration_s)
        stored_until = self._stored_until[table] + reach
        forgotten = self.recent.forgotten_until
        # Could someone else (an earlier run, another sink) have inserted this event?
        suspects = [
            event_id
            for event_id, e in new.items()
            if e.early
            or e.ts <= stored_until
            or (forgotten is not None and e.ts <= forgotten + reach)
        ]
        if not suspects:
            return new
        self.checked_in_clickhouse += len(suspects)
        known: set[str] = set()
        # In chunks: the ids are part of the query text, which ClickHouse caps (256 KiB).
        for start in range(0, len(suspects), LOOKUP_CHUNK):
            chunk = suspects[start : start + LOOKUP_CHUNK]
            times = [new[event_id].ts for event_id in chunk]
            known.update(
                r[0]
                for r in self.client.query(
                    f"SELECT event_id FROM {table} WHERE ts >= %(lo)s AND ts <= %(hi)s "
                    "AND event_id IN %(ids)s",
                    # Bound parameters are whole seconds: widen so no millisecond is cut off.
                    parameters={"ids": chunk, "lo": min(times) - reach, "hi": max(times) + reach},
                ).result_rows
            )
        return {event_id: e for event_id, e in new.items() if event_id not in known}

    def _columns(self, table: str, schema_id: int) -> list[str]:
        """The writer schema's fields that are columns of ``table`` (ClickHouse maps by name)."""
        key = (table, schema_id)
        if key not in self._column_cache:
            columns = {
                row[0]
                for row in self.client.query(
                    "SELECT name FROM system.columns WHERE database = currentDatabase() "
                    "AND table = %(table)s",
                    parameters={"table": table},
                ).result_rows
            }
            fields = [f["name"] for f in self.codec.writer_schema(schema_id)["fields"]]
            self._column_cache[key] = [name for name in fields if name in columns]
        return self._column_cache[key]

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
    from app.warehouse.clickhouse import ReconnectingClient, connect, describe, migrate

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
    from app.budgets.policy import PolicyBook
    from app.events.compacted import CompactedView
    from app.http.reports_api import create_reports_app
    from app.http.runner import serve_app
    from app.http.security import internal_token
    from app.metering.attribution import KeyStore

    # The budgets report lists scopes that still have a cap: follow the policies topic.
    policies = PolicyBook()
    policy_view = CompactedView(
        settings,
        settings.topic("budget.policies"),
        build_codec(settings.schema_registry_url),
        on_record=lambda scope, record: policies.apply_record(record, scope),
    )
    await policy_view.start(timeout_s=5)
    runner = await serve_app(
        create_reports_app(
            client,
            baseline_model=settings.baseline_model,
            active_scope=lambda scope: policies.policy_for(scope) is not None,
            token=internal_token(settings),  # everyone's spend: never an open listener
            keys=KeyStore.load(settings.keys_file) if settings.keys_file else None,
        ),
        settings.reports_host,
        settings.reports_port,
    )
    log.info("reports served", extra={"url": settings.reports_url})
    sink = ClickHouseSink(settings, client)
    try:
        await retry_while_kafka_down(sink.run, "sink")  # Kafka not up yet, or gone: wait, resume
    finally:
        await policy_view.stop()
        await runner.cleanup()
