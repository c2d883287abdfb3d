"""Latest record per key of a compacted topic (budget policies, budget decisions), and the
newest value of a one-key state topic (the shared router model: :class:`LatestFollower`).

Owns reading such a topic: every partition from the beginning at start-up
(``start`` returns once caught up, or after its timeout), then tailing it. Used
by every dispatcher (decisions, policies), by the spend worker (policies,
decisions) and by the CLI. Tombstones (null values) remove a key; undecodable
records are logged with their offset and skipped, never fatal.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition

from app.events import clients
from app.events.codec import EventCodec
from app.events.consumer import EventReader
from app.retry import RetryCallState, log_before_retry, retry_until_stopped
from app.settings import Settings

log = logging.getLogger(__name__)

OnRecord = Callable[[str, dict[str, Any] | None], object]  # what it returns is ignored
CONTACT_CHECK_S = 2.0


async def assigned_partitions(
    consumer: AIOKafkaConsumer, timeout_s: float = 10.0
) -> list[TopicPartition]:
    """Every partition of a consumer without a group, once aiokafka has fetched metadata.

    Records fetched while waiting are dropped: callers seek where they want to start.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assigned = consumer.assignment()
        if assigned:
            return sorted(assigned)
        await consumer.getmany(timeout_ms=100)  # lets the consumer fetch metadata and assign
    return []


async def wait_at_start(
    done: list[asyncio.Event],
    answered: asyncio.Event,
    timeout_s: float,
    answer_timeout_s: float | None,
) -> None:
    """Until one of ``done`` is set: at most ``answer_timeout_s`` while Kafka has not
    answered yet (a hung broker accepts connections and never answers: each attempt then
    waits out a 10 s request timeout), ``timeout_s`` in all."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    answer_by = deadline if answer_timeout_s is None else loop.time() + answer_timeout_s
    waiters = [asyncio.create_task(event.wait()) for event in done]
    answer = asyncio.create_task(answered.wait())
    try:
        while not any(event.is_set() for event in done):
            limit = deadline if answered.is_set() else min(deadline, answer_by)
            left = limit - loop.time()
            if left <= 0:
                return
            pending = waiters if answered.is_set() else [*waiters, answer]
            await asyncio.wait(pending, timeout=left, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in [*waiters, answer]:
            waiter.cancel()


class _LocalWrite:
    """A local write not read back yet: its number, and where it landed once known."""

    __slots__ = ("landed", "write")

    def __init__(self, write: int) -> None:
        self.write = write
        self.landed: tuple[int, int] | None = None


class CompactedView:
    """The latest record per key, in the topic's own order.

    A key lives in one partition, so offset order is write order; records are never
    compared by a field such as ``ts`` (a writer's wall clock: a worker whose clock stepped
    back had its newer decisions dropped, closing 39 M1).

    Each read starts at the topic's beginning (at a start, and after a lost broker), and the
    topic's newest hour is not compacted: a key's older records come before its newest.
    So a read collects what it reads apart, until every partition reaches the end offsets
    taken as it began (a *catch-up*), then replaces the held records at once: ``on_record``
    is called only for keys whose record changed or disappeared, never with an older record
    read again. From then on records apply as they come; in a re-read after a lost broker, a
    record past the offset its partition was applied to is newer than anything held for its
    key and applies as it comes too (a "blocked" written meanwhile is not held back until
    every partition is read again). Until the first catch-up, what
    was put in ``records`` (the dispatcher's saved view) stays as it is; a key held but not
    on the topic at a catch-up is removed (a tombstone compaction has removed since: the
    saved view only holds records read from the topic).

    A writer that holds its own records before they round-trip (the spend worker's
    decisions) puts them with :meth:`put_local`, then reports where the write landed
    (:meth:`local_written`: partition and offset, from its send) or that it failed
    (:meth:`local_lost`): records of that key before its own write are older, and skipped.
    A write is read back at its offset, never matched by its content: an older tombstone
    read again is not a pending removal's read-back (review 58 finding 3).
    """

    def __init__(
        self,
        settings: Settings,
        topic: str,
        codec: EventCodec,
        on_record: OnRecord | None = None,
    ) -> None:
        self.settings = settings
        self.topic = topic
        self.codec = codec
        self.reader = EventReader(codec, f"view of {topic}")
        self.on_record = on_record
        self.records: dict[str, dict[str, Any]] = {}
        self.synced = asyncio.Event()
        self._unreachable = asyncio.Event()  # the first connection attempt failed
        self.answered = asyncio.Event()  # the broker answered once (metadata)
        self.last_contact = 0.0  # monotonic time of the last successful broker round trip
        self._task: asyncio.Task[None] | None = None
        self._fresh: dict[str, dict[str, Any]] | None = None  # a catch-up's records so far
        # key -> the pending local write: its number, and (partition, offset) once its send
        # reported where it landed
        self._local: dict[str, _LocalWrite] = {}
        self._writes = 0
        # key -> the topic's newest record of a key in ``_local`` (None: none), held back
        # while its local write is pending: what the view holds again if that write fails
        self._topic: dict[str, dict[str, Any] | None] = {}
        # partition -> the offset up to which records were read and applied (a re-read
        # applies at once a record past it: newer than anything held for its key)
        self._applied: dict[int, int] = {}

    async def start(self, timeout_s: float = 30.0, answer_timeout_s: float | None = None) -> bool:
        """Start reading; wait until caught up (True), or the broker is unreachable, or
        ``answer_timeout_s`` without an answer from it, or ``timeout_s``. Reading goes on
        in the background either way."""
        self._task = asyncio.create_task(self._run(), name=f"view:{self.topic}")
        await wait_at_start(
            [self.synced, self._unreachable], self.answered, timeout_s, answer_timeout_s
        )
        if not self.synced.is_set():
            log.warning("not caught up with topic yet; continuing", extra={"topic": self.topic})
        return self.synced.is_set()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def age_s(self) -> float:
        """Seconds since this view last heard from the broker."""
        return time.monotonic() - self.last_contact if self.last_contact else float("inf")

    def put_local(self, key: str, record: dict[str, Any] | None) -> int:
        """The writer's own newest record of ``key`` (``None``: removed), held until it is
        read back where :meth:`local_written` says it landed; records of ``key`` read
        meanwhile are older (or not known to be newer), and held apart. Returns the
        write's number (see :meth:`pending_write`)."""
        if key not in self._local:
            self._topic[key] = self.records.get(key)
        self._writes += 1
        self._local[key] = _LocalWrite(self._writes)
        if record is None:
            self.records.pop(key, None)
        else:
            self.records[key] = record
        return self._writes

    def pending_write(self, key: str) -> int | None:
        """The number of ``key``'s pending local write, if any."""
        pending = self._local.get(key)
        return None if pending is None else pending.write

    def local_written(self, key: str, write: int, partition: int, offset: int) -> None:
        """Write ``write`` of ``key`` landed at ``offset`` of ``partition``: it is read back
        there. If the view has already applied that partition past it, it was read back
        already: the view holds the topic's newest record of ``key`` (it or a later one)."""
        pending = self._local.get(key)
        if pending is None or pending.write != write:
            return  # a newer local write is pending (or this one was resolved)
        applied = self._applied.get(partition)
        if applied is not None and applied > offset:
            self._resolve(key)
        else:
            pending.landed = (partition, offset)

    def local_lost(self, key: str, write: int) -> None:
        """Write ``write`` of ``key`` (put with :meth:`put_local`) failed: it will never be
        read back: the view holds the topic's newest record of ``key`` again (not the one
        that was never written: the writer compares its next records with it), and records
        read of ``key`` apply again."""
        pending = self._local.get(key)
        if pending is not None and pending.write == write:
            self._resolve(key)

    def _resolve(self, key: str) -> None:
        """``key``'s local write is no longer pending: hold the topic's newest record."""
        del self._local[key]
        topic = self._topic.pop(key, None)
        if self.records.get(key) == topic:
            return
        if topic is None:
            self.records.pop(key, None)
        else:
            self.records[key] = topic
        if self.on_record is not None:
            self.on_record(key, topic)

    @property
    def catching_up(self) -> bool:
        return self._fresh is not None

    def begin_catch_up(self) -> None:
        """A read from the topic's beginning starts: collect apart until :meth:`caught_up`."""
        self._fresh = {}

    def caught_up(self, positions: dict[int, int] | None = None) -> None:
        """Every partition reached the end offsets taken as the read began: replace the held
        records at once with what it read (keys written locally, not read back yet, keep
        their own record). ``positions``: partition -> the offset the read reached."""
        fresh, self._fresh = self._fresh, None
        if fresh is None:
            return
        self._applied.update(positions or {})
        for key, pending in list(self._local.items()):
            if pending.landed is not None and pending.landed[1] < self._applied.get(
                pending.landed[0], 0
            ):  # read back by this read: the topic's newest, as read, is held
                del self._local[key]
                self._topic.pop(key, None)
                continue
            self._topic[key] = fresh.get(key)
            held = self.records.get(key)
            if held is None:
                fresh.pop(key, None)
            else:
                fresh[key] = held
        changed = [k for k, record in fresh.items() if self.records.get(k) != record]
        removed = [k for k in self.records if k not in fresh]
        added = sum(1 for k in changed if k not in self.records)
        for key in removed:
            del self.records[key]
        for key in changed:
            self.records[key] = fresh[key]
        if self.on_record is not None:
            for key in [*changed, *removed]:
                self.on_record(key, self.records.get(key))
        replaced_or_removed = len(changed) - added + len(removed)
        log.log(
            logging.INFO if replaced_or_removed else logging.DEBUG,  # the CLI: not at each call
            "caught up with topic",
            extra={
                "topic": self.topic,
                "records": len(fresh),
                "added": added,
                "replaced": len(changed) - added,
                "removed": len(removed),
            },
        )
        self.synced.set()

    def _apply(self, key: bytes | None, value: bytes | None, partition: int, offset: int) -> None:
        if key is None:
            return
        name = key.decode(errors="replace")
        record: dict[str, Any] | None = None
        if value is not None:
            event = self.reader.decode(value, self.topic, partition, offset)
            if event is None:
                return
            record = event.record
        pending = self._local.get(name)
        landed = None if pending is None else pending.landed
        if landed is not None and landed[0] == partition and offset >= landed[1]:
            # the local write read back, or a record of its key past it (it was compacted
            # away, or lost): the topic is as new (review 62)
            del self._local[name]
            self._topic.pop(name, None)
        if self._fresh is not None:
            if record is None:
                self._fresh.pop(name, None)
            else:
                self._fresh[name] = record
            applied = self._applied.get(partition)
            if applied is None or offset < applied:
                return  # read again: held back until caught up
            # past what was applied of its partition: newer than anything held, apply now
        self._applied[partition] = offset + 1
        if name in self._local:
            self._topic[name] = record  # the topic's newest, held back
            return  # written before the local one
        if record is None:
            self.records.pop(name, None)
        else:
            self.records[name] = record
        if self.on_record is not None:
            self.on_record(name, record)

    async def _run(self) -> None:
        """Follow the topic for ever; a lost broker or topic is retried every second
        (``app.retry``), reading the topic again from its beginning."""
        retrying = retry_until_stopped(steps=(1.0,), before_sleep=self._lost)
        async for attempt in retrying:
            with attempt:
                await self._follow()

    def _lost(self, retry_state: RetryCallState) -> None:
        self._unreachable.set()
        outcome = retry_state.outcome
        exc = outcome.exception() if outcome is not None else None
        log.warning("lost the topic; retrying", extra={"topic": self.topic, "error": repr(exc)})

    async def _follow(self) -> None:
        consumer = clients.consumer(
            self.settings,
            self.topic,
            purpose="compacted-view",
            group_id=None,  # no group: aiokafka assigns every partition to this consumer
            request_timeout_ms=10_000,  # a lost broker is retried after 10 s, not 40
        )
        try:
            await consumer.start()
            self.answered.set()
            partitions = await self._partitions(consumer)
            await consumer.seek_to_beginning(*partitions)
            end = await consumer.end_offsets(partitions)
            self.begin_catch_up()
            self.last_contact = time.monotonic()
            next_check = time.monotonic() + CONTACT_CHECK_S
            while True:
                batch = await consumer.getmany(timeout_ms=200, max_records=5000)
                for messages in batch.values():
                    for m in messages:
                        self._apply(m.key, m.value, m.partition, m.offset)
                if self.catching_up:
                    positions = {tp: await consumer.position(tp) for tp in partitions}
                    if all(positions[tp] >= end[tp] for tp in partitions):
                        self.caught_up({tp.partition: positions[tp] for tp in partitions})
                if time.monotonic() >= next_check:
                    await consumer.end_offsets(partitions)  # raises if the broker is gone
                    self.last_contact = time.monotonic()
                    next_check = self.last_contact + CONTACT_CHECK_S
        finally:
            self._fresh = None  # an unfinished catch-up: the next read starts again
            await clients.stop_within(consumer)

    async def _partitions(self, consumer: AIOKafkaConsumer) -> list[TopicPartition]:
        partitions = await assigned_partitions(consumer)
        if not partitions:
            raise RuntimeError(
                f"topic {self.topic} has no partitions; run `tollgate topics ensure`"
            )
        return partitions


MAX_STATE_BYTES = 64 * 1024 * 1024  # as the state topics' max.message.bytes


async def latest_value(
    settings: Settings, topic: str, key: bytes, *, timeout_s: float = 15.0
) -> tuple[bytes | None, bool]:
    """The newest value of ``key`` on a compacted state topic with one writer and one key
    (a checkpoint), reading only the last record of each partition; (None, True) if there is
    none (or a tombstone), (None, False) if the topic could not be read."""
    follower = LatestFollower(settings, topic, key)
    consumer = follower.consumer()
    try:
        await consumer.start()
        await asyncio.sleep(0)  # let aiokafka's start-up task run (see the anomaly agent)
        partitions = await assigned_partitions(consumer, timeout_s=timeout_s)
        if not partitions:
            return None, False
        return await follower.read_latest(consumer, partitions), True
    finally:
        with contextlib.suppress(Exception):
            await consumer.stop()


class LatestFollower:
    """Follows the newest value of one key on a compacted state topic (the shared router
    model): at start-up only the last record of each partition is read (not the history of
    checkpoints compaction has not removed yet), then new records as they are written.
    ``on_value(bytes)`` is called for each newer value of ``key``; a tombstone is ignored."""

    def __init__(
        self,
        settings: Settings,
        topic: str,
        key: bytes,
        on_value: Callable[[bytes], None] | None = None,
    ) -> None:
        self.settings, self.topic, self.key = settings, topic, key
        self.on_value = on_value
        self.synced = asyncio.Event()
        self.answered = asyncio.Event()  # the broker answered once (metadata)
        self._unreachable = asyncio.Event()  # the first attempt failed (e.g. refused)
        self.values_seen = 0
        self._task: asyncio.Task[None] | None = None

    def consumer(self) -> AIOKafkaConsumer:
        return clients.consumer(
            self.settings,
            self.topic,
            purpose="state-follower",
            group_id=None,  # no group: aiokafka assigns every partition to this consumer
            request_timeout_ms=10_000,  # a lost broker is retried after 10 s, not 40
            max_partition_fetch_bytes=MAX_STATE_BYTES,  # one record is a whole model
            fetch_max_bytes=MAX_STATE_BYTES,
        )

    async def read_latest(
        self, consumer: AIOKafkaConsumer, partitions: list[TopicPartition]
    ) -> bytes | None:
        """Seek each partition to its last record and read up to the end; the newest value."""
        begin = await consumer.beginning_offsets(partitions)
        end = await consumer.end_offsets(partitions)
        for tp in partitions:
            consumer.seek(tp, max(begin[tp], end[tp] - 1))
        latest: tuple[int, bytes] | None = None  # (timestamp, value)
        while any([await consumer.position(tp) < end[tp] for tp in partitions]):
            batch = await consumer.getmany(timeout_ms=500)
            for messages in batch.values():
                for m in messages:
                    newer = latest is None or m.timestamp >= latest[0]
                    if m.key == self.key and m.value is not None and newer:
                        latest = (m.timestamp, m.value)
        return latest[1] if latest else None

    async def start(self, timeout_s: float = 30.0, answer_timeout_s: float | None = None) -> bool:
        """Start following; return once the newest value was applied (True), or the
        broker is unreachable, or after ``answer_timeout_s`` without an answer from it, or
        at ``timeout_s``. Following goes on in the background either way."""
        self._task = asyncio.create_task(self._run(), name=f"latest:{self.topic}")
        await wait_at_start(
            [self.synced, self._unreachable], self.answered, timeout_s, answer_timeout_s
        )
        if not self.synced.is_set():
            log.warning("state topic not read yet; continuing", extra={"topic": self.topic})
        return self.synced.is_set()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def _apply(self, value: bytes) -> None:
        self.values_seen += 1
        if self.on_value is not None:
            try:
                self.on_value(value)
            except Exception as exc:  # a bad checkpoint must not stop the follower
                log.error(
                    "skipping unusable state record",
                    extra={"topic": self.topic, "error": repr(exc)},
                )

    async def _run(self) -> None:
        """Follow the key for ever; a lost broker or topic is retried every second
        (``app.retry``)."""
        log_lost = log_before_retry(log, "lost the state topic; retrying")

        def lost(retry_state: RetryCallState) -> None:
            self._unreachable.set()
            log_lost(retry_state)

        retrying = retry_until_stopped(steps=(1.0,), before_sleep=lost)
        async for attempt in retrying:
            with attempt:
                await self._follow()

    async def _follow(self) -> None:
        consumer = self.consumer()
        try:
            await consumer.start()
            self.answered.set()
            partitions = await assigned_partitions(consumer)
            if not partitions:
                raise RuntimeError(
                    f"topic {self.topic} has no partitions; run `tollgate topics ensure`"
                )
            latest = await self.read_latest(consumer, partitions)
            if latest is not None:
                self._apply(latest)
            self.synced.set()
            while True:
                batch = await consumer.getmany(timeout_ms=1000)
                newest: bytes | None = None
                for messages in batch.values():
                    for m in messages:
                        if m.key == self.key and m.value is not None:
                            newest = m.value
                if newest is not None:  # several at once: only the newest matters
                    self._apply(newest)
        finally:
            await clients.stop_within(consumer)
