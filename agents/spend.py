"""The spend worker (Faust): exactly-once spend per scope, budget decisions, lost-usage settlement.

Agents, each a short loop over plain functions:

- ``count_usage`` reads ``tollgate.usage`` (keyed by user) in batches and counts
  each event once into spend buckets (``app/budgets/counter.py``). User spend
  is decided right here; features, teams, keys and global are sent on as
  per-partition partial sums.
- ``sum_partials`` reads ``tollgate.budget.partials`` (keyed by scope) and
  decides those scopes from the partial sums of every source partition.
- ``track_requests`` reads ``tollgate.requests`` and remembers accepted
  requests until their usage arrives; ``settle`` turns a request whose usage
  never came (its dispatcher died) into an estimated usage event.

Exactly once, whatever dies: every batch's table writes are made durable in
the changelog (each awaited) *before* its events are acknowledged, so Faust
never commits an offset whose effect could be lost; each bucket carries the
next offset it has to apply, so a re-delivered event adds nothing twice; a
window of recent event ids per partition drops re-sent events. Decisions are
computed from durable state only and carry, per usage partition, the offset
they count through: dispatchers match their own spend against it by identity.

A decision is re-published, without waiting for traffic, when a policy changes,
when a period ends, and whenever the published one differs from the state.

Nothing stalls for good: Faust's consumer can lose records it has fetched (its position
has moved past them: records fetched before a rebalance that ran ahead of a seek, a stale
read offset), and nothing fetches a partition again by itself. A lost tail of a changelog
partition leaves the table recovery waiting for ever (the worker never counts again); a lost
tail of a usage partition stays uncounted until more traffic comes. ``watch_stalls``
fetches again, from where the worker stands, any partition with records left that has not
moved for ``spend_stall_s`` with nothing of it in flight (``StallWatch``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, MutableMapping
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import faust
import orjson
from aiokafka import TopicPartition
from aiokafka.admin import NewTopic
from aiokafka.errors import KafkaError
from aiokafka.partitioner import murmur2
from faust.exceptions import ConsumerNotStarted
from faust.types import TP, StreamT, TableT
from tenacity import retry_if_exception_type

from app.budgets.counter import PartialTotals, SpendCounter, UsageEvent, skipped_ranges
from app.budgets.policy import PolicyBook, evaluate
from app.budgets.spend import (
    crossed_thresholds,
    decision_record,
    is_partition_local,
    rollover_due,
    should_publish,
    threshold_alert,
)
from app.clock import Clock
from app.events import clients
from app.events.codec import EventCodec, FrameError, build_codec, event_id_of
from app.events.compacted import CompactedView
from app.events.consumer import EventReader
from app.events.producer import usage_message
from app.metering.attribution import Identity
from app.metering.usage import attempt_key, build_usage_record, usage_event_id
from app.pricing.catalog import PriceCatalog
from app.retry import (
    RetryCallState,
    log_before_retry,
    retry_attempts,
    retry_until_stopped,
    wait_capped_exponential,
)
from app.settings import Settings

log = logging.getLogger(__name__)

BATCH_MAX = 1000
BATCH_WITHIN_S = 0.02
FLUSH_INTERVAL_S = 0.25
HOUSEKEEPING_INTERVAL_S = 1.0
RECONCILE_EVERY_S = 30.0
WAITING_LOG_EVERY_S = 30.0
EXPIRE_EVERY_S = 300.0
PERSIST_BACKOFF_S = (0.2, 0.5, 1.0, 2.0, 5.0)
SETTLED_EARLY_MAX = 100_000
ESTIMATED_STATUS = "dispatcher_lost"


class ChangelogWriteFailed(Exception):
    """Kafka did not take some of a batch's changelog writes (the cause says why)."""


class BudgetTopicsUnread(Exception):
    """A budget topic the worker must read before it decides was not reached for
    ``spend_views_wait_s``: the worker crashes so that another one decides (see
    ``SpendWorker._check_views_wait``)."""


def partition_for(key: str, partitions: int) -> int:
    """The partition Kafka's default partitioner gives ``key`` (as the dispatcher keys events)."""
    return (murmur2(key.encode()) & 0x7FFFFFFF) % partitions


def manual_batches(stream: StreamT[bytes]) -> AsyncIterator[list[Any]]:
    """Batches of events that are never acknowledged implicitly: the agent acknowledges them
    itself once their effects are durable (Faust would otherwise ack a batch when the next is
    taken, or when the agent is cancelled mid-batch, and commit offsets whose effect is lost)."""
    manual = cast(faust.Stream[bytes], cast(faust.Stream[bytes], stream).noack())
    return cast(AsyncIterator[list[Any]], manual.noack_take(BATCH_MAX, within=BATCH_WITHIN_S))


class StallWatch:
    """Which partitions have records left but do not move.

    ``check`` is called periodically per partition with where the reader stands (the next
    offset it has to handle, or the last one a recovery has seen), where the partition ends,
    and whether anything of it is in flight. It answers True once the partition has had
    records left, nothing in flight and the same position for ``stall_s``; the clock then
    starts again (one re-fetch per period while it stays stalled)."""

    def __init__(self, stall_s: float) -> None:
        self.stall_s = stall_s
        self._since: dict[Any, tuple[int, float]] = {}

    def check(self, key: Any, position: int, end: int, busy: bool, now: float) -> bool:
        if position >= end or busy:
            self._since.pop(key, None)
            return False
        seen = self._since.get(key)
        if seen is None or seen[0] != position:
            self._since[key] = (position, now)
            return False
        if now - seen[1] >= self.stall_s:
            self._since[key] = (position, now)
            return True
        return False

    def keep_only(self, keys: Iterable[Any]) -> None:
        """Forget partitions no longer watched (revoked, recovery over)."""
        wanted = set(keys)
        for key in [k for k in self._since if k not in wanted]:
            del self._since[key]


class TableData(MutableMapping[str, Any]):
    """A Faust table's local data, read and written without Faust's implicit changelog writes
    (the worker writes the changelog itself, and waits for it, before acknowledging)."""

    def __init__(self, table: TableT[str, Any]) -> None:
        self.table = table

    def __getitem__(self, key: str) -> Any:
        value = self.table.data[key]
        if value is None:  # a removal written as JSON null by an earlier version: absent
            raise KeyError(key)
        return value

    def __setitem__(self, key: str, value: Any) -> None:
        self.table.data[key] = value

    def __delitem__(self, key: str) -> None:
        del self.table.data[key]

    def __iter__(self) -> Iterator[str]:
        return iter([k for k, v in list(self.table.data.items()) if v is not None])

    def __len__(self) -> int:
        return sum(1 for v in self.table.data.values() if v is not None)


class SpendWorker:
    """Builds the Faust app for these settings; holds the worker's state between batches."""

    def __init__(self, settings: Settings, clock: Clock | None = None) -> None:
        self.settings = settings
        self.clock = clock or Clock(settings.clock_start)
        self.codec: EventCodec = build_codec(settings.schema_registry_url)
        self.usage_reader = EventReader(self.codec, "spend worker (usage)")
        self.request_reader = EventReader(self.codec, "spend worker (requests)")
        self.prices = PriceCatalog(settings.baseline_model, settings.price_overrides_file)
        self.policies = PolicyBook()
        self.policy_changes: set[str] = set()
        self.policy_view = CompactedView(
            settings,
            settings.topic("budget.policies"),
            self.codec,
            on_record=self._on_policy,
        )
        # Holds the decisions this worker publishes before they round-trip through Kafka
        # (put_local, read back where the send reports they landed), so a read-back of an
        # older one does not replace them (it would re-fire alerts).
        self.decision_view = CompactedView(settings, settings.topic("budget.decisions"), self.codec)
        self.views_ready = asyncio.Event()
        self.ready = False  # tables recovered and owned partitions prepared
        self.pending_refresh: set[str] = set()
        # scope -> (reason, refresh) of decisions waiting for the budget views' first
        # catch-up (decided from ``_flush`` then)
        self.waiting: dict[str, tuple[str, bool]] = {}
        self._waiting_logged = 0.0
        self._views_started: float | None = None  # monotonic time the budget views started
        self._views_error_logged = 0.0
        self.dirty_partials: dict[tuple[str, int], bool] = {}  # (scope, partition) -> full?
        self.latest_boot: dict[str, int] = {}  # dispatcher id -> newest boot seen (ms)
        self.preparing = asyncio.Lock()
        self.settled_early: OrderedDict[str, None] = OrderedDict()
        # open requests found already counted when due (re-read Request events): not estimated
        self.settled_already_counted = 0
        self._last_reconcile = self._last_expire = 0.0
        self.stalls = StallWatch(settings.spend_stall_s)
        self.handled: dict[TP, int] = {}  # partials/requests: next offset to handle
        self.refetches = 0  # partitions fetched again after a stall (logged)
        self._stall_watch: asyncio.Task[None] | None = None
        (settings.state_dir / "faust").mkdir(parents=True, exist_ok=True)
        self.app = self._make_app()
        self._declare_topics()
        self._declare_tables()
        self.counter = SpendCounter(
            TableData(self.spend_table),
            settings.spend_dedupe_window,
            reported=TableData(self.reported_table),
            reported_max=settings.spend_reported_ids_max,
        )
        self.totals = PartialTotals(TableData(self.totals_table))
        self._register_agents()

    # -- construction, in named pieces -------------------------------------------------
    def _make_app(self) -> faust.App:
        s = self.settings
        return faust.App(
            f"{s.topic_prefix}-spend",
            broker=f"kafka://{s.kafka_bootstrap}",
            store="memory://",
            datadir=str(s.state_dir / "faust"),  # not the working directory
            topic_partitions=s.topic_partitions,
            topic_replication_factor=s.topic_replication,
            web_enabled=False,
            consumer_auto_offset_reset="earliest",
            # A crashed worker's partitions move to a live one within ~10 s (default: 60 s).
            broker_session_timeout=10.0,
            broker_heartbeat_interval=3.0,
            broker_commit_every=100,
            broker_commit_interval=0.5,
            producer_acks=-1,
            # A rebalance waits until every batch in flight is durable and acknowledged
            # (Faust's default). Without it, a batch could cross a revocation: its changelog
            # write landed after the table recovery read the partition's end, the recovery
            # then wrote the older value back over the batch's, and the batch's ack committed
            # its offsets, so the spend of its events was lost (a SIGSTOP of the worker longer
            # than its session, under load: one user short by one event).
            stream_wait_empty=True,
        )

    def _raw_topic(self, suffix: str, partitions: int | None = None) -> faust.TopicT:
        return self.app.topic(
            self.settings.topic(suffix),
            partitions=partitions,
            key_serializer="raw",
            value_serializer="raw",
        )

    def _declare_topics(self) -> None:
        n = self.settings.topic_partitions
        self.usage_topic = self._raw_topic("usage", n)
        self.requests_topic = self._raw_topic("requests", n)
        self.partials_topic = self._raw_topic("budget.partials", n)
        self.decisions_topic = self._raw_topic("budget.decisions")
        self.alerts_topic = self._raw_topic("alerts")

    def _declare_tables(self) -> None:
        n = self.settings.topic_partitions
        # "<scope>|<g>|<start>|p<partition>" -> [nanos, next source offset]: see app/budgets/
        self.spend_table = self.app.Table("spend", default=None, partitions=n)
        # partial sums of cross-partition scopes, per source partition: see PartialTotals
        self.totals_table = self.app.Table("totals", default=None, partitions=n)
        # "<partition>|<offset>" -> the reported calls a batch counted from that partition
        # ([event id, event time s, partition, offset] each), so a report re-sent later
        # than the dedupe window still counts once (SpendCounter)
        self.reported_table = self.app.Table("reported_ids", default=None, partitions=n)
        # request id -> what an estimate of its usage needs, until its usage arrives
        self.open_table = self.app.Table("open_requests", default=None, partitions=n)
        self.spend_table.on_recover(self._on_recovered)
        self.app.on_partitions_revoked.connect(self._on_revoked)  # type: ignore[arg-type]
        # Faust starts app tasks only after a table recovery completes: the stall watch,
        # which must see a recovery that never completes, starts at the first assignment.
        self.app.on_partitions_assigned.connect(self._on_assigned)  # type: ignore[arg-type]

    def _register_agents(self) -> None:
        app = self.app
        app.agent(self.usage_topic, name="spend.count_usage")(self._count_usage)
        app.agent(self.partials_topic, name="spend.sum_partials")(self._sum_partials)
        app.agent(self.requests_topic, name="spend.track_requests")(self._track_requests)
        app.timer(FLUSH_INTERVAL_S, name="spend.flush")(self._flush)
        app.timer(HOUSEKEEPING_INTERVAL_S, name="spend.housekeeping")(self._housekeeping)
        app.task(self._start_views)

    # -- views and ownership -----------------------------------------------------------
    async def _start_views(self) -> None:
        self._views_started = time.monotonic()
        await asyncio.gather(self.policy_view.start(), self.decision_view.start())
        self.views_ready.set()

    def _on_policy(self, scope: str, record: dict[str, Any] | None) -> None:
        self.policies.apply_record(record, scope)
        self.policy_changes.add(scope)

    def owned(self, suffix: str) -> set[int]:
        topic = self.settings.topic(suffix)
        return {tp.partition for tp in self.app.assignor.assigned_actives() if tp.topic == topic}

    def owns(self, scope: str) -> bool:
        n = self.settings.topic_partitions
        if is_partition_local(scope):
            owned = self.owned("usage")
            partitions = self.counter.partitions_of(scope)
            if partitions:
                return bool(partitions & owned)
            return partition_for(scope.split(":", 1)[1], n) in owned
        return partition_for(scope, n) in self.owned("budget.partials")

    async def _on_assigned(self, sender: Any, *args: Any, signal: Any = None, **kw: Any) -> None:
        if self._stall_watch is None:
            self._stall_watch = asyncio.create_task(self._watch_stalls(), name="spend.stalls")

    async def _on_revoked(self, sender: Any, *args: Any, signal: Any = None, **kwargs: Any) -> None:
        revoked = args[0] if args else kwargs.get("revoked", ())
        self.ready = False
        topic = self.settings.topic("usage")
        self.counter.forget(tp.partition for tp in revoked if tp.topic == topic)
        for tp in revoked:
            self.handled.pop(tp, None)

    async def _on_recovered(self) -> None:
        """Tables hold their changelog again: index them, and re-send every partial sum once.
        Where each usage partition stands is learnt when it is first counted (``_prepared``)."""
        self.counter.rebuild_index()
        owned = self.owned("usage")
        # Only the active partitions' remembered reports: not the standby replicas Faust keeps
        # in the same table data (a partition promoted by this rebalance is active here).
        self.counter.reported.rebuild(owned)
        self.counter.forget(set(self.counter.processed) | set(self.counter.recent))
        for scope, keys in self.counter.index.items():
            if not is_partition_local(scope):
                for partition in {int(k.rsplit("|p", 1)[1]) for k in keys} & owned:
                    self.dirty_partials[(scope, partition)] = True  # full snapshot once
        self.ready = True
        log.info("spend worker ready", extra={"partitions": sorted(owned)})

    async def _committed_offsets(self, partitions: Iterable[int]) -> dict[int, int]:
        """The group's committed offsets of usage ``partitions`` (absent: none committed yet)."""
        topic = self.settings.topic("usage")
        found = await self._group_offsets([TP(topic, p) for p in partitions])
        return {tp.partition: offset for tp, offset in found.items()}

    async def _group_offsets(self, tps: list[TP]) -> dict[TP, int]:
        """The group's committed offsets of ``tps`` (absent: none committed yet). Retried
        (``app.retry``): right after a rebalance the coordinator may not answer at once."""
        retrying = retry_attempts(
            attempts=10,
            wait=wait_capped_exponential(0.2, 3.0, jitter=0.0),
            retry=retry_if_exception_type(KafkaError),
            before_sleep=log_before_retry(log, "reading committed offsets failed"),
        )
        async for attempt in retrying:
            with attempt:
                admin = clients.admin(self.settings, purpose="spend-worker")
                try:
                    await admin.start()
                    found = await admin.list_consumer_group_offsets(
                        self.app.conf.id,
                        partitions=[TopicPartition(tp.topic, tp.partition) for tp in tps],
                    )
                finally:
                    await admin.close()
        return {TP(tp.topic, tp.partition): m.offset for tp, m in found.items() if m.offset >= 0}

    async def _prepared(self, partitions: Iterable[int]) -> None:
        """Learn where not-yet-prepared usage ``partitions`` stand: their committed offset
        (the beginning of the partition if none is committed, as auto_offset_reset=earliest
        means), and the ids just before it."""
        async with self.preparing:  # the agent and housekeeping both prepare
            todo = sorted(p for p in partitions if not self.counter.is_prepared(p))
            if not todo:
                return
            committed = await self._committed_offsets(todo)
            for partition in todo:
                start = committed.get(partition)
                if start is None:
                    start = await self._beginning(partition)
                await self._prepare(partition, start)
            # This worker decides these partitions' users from now on; their decisions may
            # have been left unmade by the previous owner (noted while its budget views were
            # unread, then revoked): a user past the cap, never decided before, was otherwise
            # decided only at their next usage. Published only where they differ (``decide``).
            self.pending_refresh.update(self.counter.local_scopes_of(todo))

    async def _prepare(self, partition: int, next_offset: int) -> None:
        """Count ``partition`` from ``next_offset``, after reading back the ids of the events
        just before it, so an event re-sent across a crash is still recognised."""
        start = max(0, next_offset - self.settings.spend_dedupe_window)
        ids = []
        for message in await self._read_range(partition, start, next_offset):
            with contextlib.suppress(FrameError):
                ids.append(event_id_of(message.value))
        self.counter.prepare(partition, next_offset, ids)

    async def _read_range(
        self, partition: int, start: int, end: int, topic: str = "usage"
    ) -> list[Any]:
        """The records of ``topic``'s ``partition`` in ``[start, end)`` (from its beginning if
        ``start`` was deleted by retention), read by a consumer of its own; ``topic``: the
        suffix of the topic (the usage's, or the requests')."""
        if end <= start:
            return []
        tp = TopicPartition(self.settings.topic(topic), partition)
        consumer = clients.consumer(
            self.settings,  # assigned one partition below
            purpose="spend-worker-reread",
            group_id=None,  # reads beside Faust's group, never commits for it
        )
        await consumer.start()
        records: list[Any] = []
        try:
            consumer.assign([tp])
            beginning = (await consumer.beginning_offsets([tp]))[tp]
            consumer.seek(tp, max(start, beginning))
            while await consumer.position(tp) < end:
                batch = await consumer.getmany(tp, timeout_ms=1000, max_records=5000)
                records.extend(m for m in batch.get(tp, []) if m.offset < end)
                if not batch:
                    last = (await consumer.end_offsets([tp]))[tp]
                    if await consumer.position(tp) >= min(last, end):
                        break
        finally:
            await consumer.stop()
        return records

    async def _beginning(self, partition: int) -> int:
        tp = TopicPartition(self.settings.topic("usage"), partition)
        consumer = clients.consumer(self.settings, purpose="spend-worker-reread", group_id=None)
        await consumer.start()
        try:
            return int((await consumer.beginning_offsets([tp]))[tp])
        finally:
            await consumer.stop()

    async def _missed(self, events: list[Any]) -> list[UsageEvent]:
        """Events Faust's consumer skipped, to count before the batch. Faust does not always
        resume a partition at its committed offset: one with no commit yet starts where it
        stood, not at its beginning, and records fetched before a rebalance can run ahead of
        its seek (Faust then drops the earlier ones). Usage offsets have no holes (no
        transactions, no compaction), so whenever a batch's first event of a partition lies
        past the offset below which everything is counted, the range in between is read here
        and counted (re-counting is a no-op: bucket offsets and event ids), and Faust is told
        that range is done: it never commits past a range it did not deliver, so that
        partition's offsets would stay behind until the next restart. Checked on every batch
        (a dictionary lookup), not only the first after a partition is prepared."""
        gaps = skipped_ranges(
            ((e.message.partition, e.message.offset) for e in events), self.counter.processed
        )
        missed: list[UsageEvent] = []
        for partition, since, offset in gaps:
            records = await self._read_range(partition, since, offset)
            log.warning(
                "counting usage events the consumer skipped",
                extra={"partition": partition, "from": since, "to": offset, "read": len(records)},
            )
            missed.extend(UsageEvent(m.partition, m.offset, self._decode_usage(m)) for m in records)
            await self._skipped_range_done(partition, since, offset)
        return missed

    async def _skipped_range_done(
        self, partition: int, since: int, until: int, topic: str = "usage"
    ) -> None:
        """Let Faust commit past ``[since, until)``, counted here, not by its stream. Faust has
        no public call for this; its gap bookkeeping (kept for offsets a transactional
        producer leaves out) is exactly it. test_spend_worker_crash.py checks that offsets
        are committed to the end after kills, so a Faust release that changes this fails
        there."""
        tp = TP(self.settings.topic(topic), partition)
        await self.app.consumer._add_gap(tp, since, until)  # type: ignore[attr-defined]

    # -- persistence -----------------------------------------------------------------------
    async def _persist(self, table: TableT[str, Any], writes: dict[str, tuple[int, Any]]) -> None:
        """Write each key's final value to ``table``'s changelog and wait until Kafka has it;
        retry what fails. Only then may the batch be committed and acknowledged."""
        pending = dict(writes)

        async def write_pending() -> None:
            nonlocal pending
            futures = {
                # A removal must be a tombstone (a null Kafka value), not JSON null: the
                # recovered table would otherwise hold the key with the value None.
                key: table.send_changelog(partition, key, value)
                if value is not None
                else table.send_changelog(partition, key, None, value_serializer="raw")
                for key, (partition, value) in pending.items()
            }
            await asyncio.wait(futures.values())
            failed = {k: pending[k] for k, f in futures.items() if f.exception() is not None}
            if failed:
                pending = failed  # the next try writes only these
                error = next(e for f in futures.values() if (e := f.exception()) is not None)
                raise ChangelogWriteFailed(error) from error

        def before_retry(retry_state: RetryCallState) -> None:
            outcome = retry_state.outcome
            failed = outcome.exception() if outcome is not None else None
            log.warning(
                "changelog write failed; retrying before acknowledging the batch",
                extra={
                    "table": table.name,
                    "keys": len(pending),
                    "error": repr(failed.__cause__ if failed is not None else None),
                },
            )

        if pending:
            retrying = retry_until_stopped(
                steps=PERSIST_BACKOFF_S,
                retry=retry_if_exception_type(ChangelogWriteFailed),  # not a bug of ours
                before_sleep=before_retry,
            )
            await retrying(write_pending)

    @staticmethod
    async def _ack(stream: StreamT[Any], events: Iterable[Any]) -> None:
        for event in events:
            await stream.ack(event)

    def _note_handled(self, events: Iterable[Any]) -> None:
        for event in events:
            tp = event.message.tp
            self.handled[tp] = max(self.handled.get(tp, 0), event.message.offset + 1)

    # -- partitions that stop moving ------------------------------------------------------
    async def _watch_stalls(self) -> None:
        """Fetch again any partition with records left that does not move (``StallWatch``)."""
        while not self.app.should_stop:
            await asyncio.sleep(min(1.0, self.settings.spend_stall_s / 2))
            if self.app.should_stop:
                return
            try:
                await self._check_stalls(time.monotonic())
            except (KafkaError, ConsumerNotStarted, OSError, TimeoutError) as exc:
                log.warning("stall check failed", extra={"error": repr(exc)})
            except Exception:
                log.exception("stall check crashed; checking again")

    async def _check_stalls(self, now: float) -> None:
        consumer = self.app.consumer
        recovery = self.app.tables.recovery  # type: ignore[attr-defined]
        watched: list[Any] = []
        if recovery.in_recovery:
            # The last offset each active changelog partition has delivered, against its
            # last offset when the recovery began (Faust's own bookkeeping).
            for tp, last in list(recovery.active_highwaters.items()):
                seen = recovery.active_offsets.get(tp)
                if seen is None:
                    continue
                watched.append(("changelog", tp))
                if self.stalls.check(("changelog", tp), seen, last, False, now):
                    await self._refetch(tp, max(seen, 0), "table recovery")
        elif self.ready:
            topics = {self.settings.topic(t) for t in ("usage", "budget.partials", "requests")}
            tps = [tp for tp in consumer.assignment() if tp.topic in topics]
            if tps:
                ends = await consumer.highwaters(*tps)
                positions = await self._positions(tps)
                in_flight = {message.tp for message in consumer.unacked}
                for tp in tps:
                    position, end = positions.get(tp), ends.get(tp)
                    if position is None or end is None:
                        continue
                    watched.append(("stream", tp))
                    if self.stalls.check(("stream", tp), position, end, tp in in_flight, now):
                        await self._refetch(tp, position, "stream")
        self.stalls.keep_only(watched)

    async def _positions(self, tps: list[TP]) -> dict[TP, int]:
        """The next offset this worker has to handle, per stream partition: for usage, where
        the counter stands (none until housekeeping has prepared the partition); for the
        others, past the last event handled, else the group's committed offset, else the
        partition's beginning."""
        usage = self.settings.topic("usage")
        positions: dict[TP, int] = {}
        unknown = []
        for tp in tps:
            if tp.topic == usage:
                if tp.partition in self.counter.processed:
                    positions[tp] = self.counter.processed[tp.partition]
            elif tp in self.handled:
                positions[tp] = self.handled[tp]
            else:
                unknown.append(tp)
        if unknown:
            committed = await self._group_offsets(unknown)
            missing = [tp for tp in unknown if tp not in committed]
            earliest = await self.app.consumer.earliest_offsets(*missing) if missing else {}
            for tp in unknown:
                start = committed.get(tp, earliest.get(tp))
                if start is not None:
                    self.handled[tp] = positions[tp] = start
        return positions

    async def _refetch(self, tp: TP, offset: int, what: str) -> None:
        self.refetches += 1
        log.warning(
            "%s: partition %s/%s not moving with records left; fetching it again from %s",
            what,
            tp.topic,
            tp.partition,
            offset,
            extra={
                "what": what,
                "topic": tp.topic,
                "partition": tp.partition,
                "from": offset,
                "refetches": self.refetches,
            },
        )
        await self.app.consumer.seek(tp, offset)

    # -- usage -------------------------------------------------------------------------------
    def _decode_usage(self, message: Any) -> dict[str, Any] | None:
        return self.usage_reader.record(message)

    async def _count_usage(self, stream: StreamT[bytes]) -> AsyncIterator[None]:
        await self.views_ready.wait()
        async for events in manual_batches(stream):
            await self._prepared({event.message.partition for event in events})
            usage = await self._missed(events)
            usage.extend(
                UsageEvent(e.message.partition, e.message.offset, self._decode_usage(e.message))
                for e in events
            )
            usage.sort(key=lambda u: (u.partition, u.offset))  # skipped ranges in their place
            batch = self.counter.stage(usage)
            settle_writes = self._settle_writes(batch.settled_requests)
            # the tables' writes in one round trip (each waited for before the batch counts)
            await asyncio.gather(
                self._persist(self.spend_table, batch.writes),
                self._persist(self.open_table, settle_writes),
                self._persist(self.reported_table, batch.remembered),
            )
            self.counter.commit(batch)
            for key in settle_writes:
                self.open_table.data.pop(key, None)
            await self._ack(stream, events)
            for scope, partition in batch.partials:
                self.dirty_partials.setdefault((scope, partition), False)
            for scope in batch.local_scopes:
                await self.decide(scope, reason="spend")
            yield None

    def _settle_writes(self, settled: list[tuple[str, int]]) -> dict[str, tuple[int, Any]]:
        writes: dict[str, tuple[int, Any]] = {}
        for request_id, partition in settled:
            if request_id in self.open_table.data:
                writes[request_id] = (partition, None)
            else:
                self.settled_early[request_id] = None
                if len(self.settled_early) > SETTLED_EARLY_MAX:
                    self.settled_early.popitem(last=False)
        return writes

    # -- cross-partition scopes --------------------------------------------------------------
    async def _sum_partials(self, stream: StreamT[bytes]) -> AsyncIterator[None]:
        await self.views_ready.wait()
        async for events in manual_batches(stream):
            partials = []
            for event in events:
                try:
                    partials.append(orjson.loads(event.message.value))
                except orjson.JSONDecodeError:
                    log.error("skipping a malformed partial sum")
            writes, scopes = self.totals.stage(partials)
            n = self.settings.topic_partitions
            # A scope's partials all arrive on its partition: its totals live there too.
            durable = {k: (partition_for(k.rsplit("|", 3)[0], n), v) for k, v in writes.items()}
            await self._persist(self.totals_table, durable)
            self.totals.commit(writes)
            await self._ack(stream, events)
            self._note_handled(events)
            for scope in scopes:
                await self.decide(scope, reason="spend", refresh=True)
            yield None

    async def _send_partials(self) -> None:
        dirty, self.dirty_partials = self.dirty_partials, {}
        n = self.settings.topic_partitions
        for (scope, partition), full in dirty.items():
            if partition not in self.counter.processed:
                continue
            payload = {
                "scope": scope,
                "partition": partition,
                "processed": self.counter.processed[partition],
                "full": full,
                "buckets": self.counter.buckets(scope, partition),
            }
            try:
                await self.partials_topic.send(
                    key=scope.encode(),
                    value=orjson.dumps(payload),
                    partition=partition_for(scope, n),
                )
            except Exception as exc:
                log.warning("could not send a partial sum; retrying", extra={"error": repr(exc)})
                self.dirty_partials[(scope, partition)] = True

    # -- decisions ---------------------------------------------------------------------------
    def spent(self, scope: str, start: datetime, end: datetime) -> tuple[int, dict[int, int]]:
        if is_partition_local(scope):
            partitions = (self.counter.partitions_of(scope) & self.owned("usage")) or (
                self.owned("usage")
                & {partition_for(scope.split(":", 1)[1], self.settings.topic_partitions)}
            )
            return self.counter.spent(scope, start, end, partitions)
        return self.totals.spent(scope, start, end, range(self.settings.topic_partitions))

    def views_synced(self) -> bool:
        """Both budget views have read their topics once: a decision compares with the
        previous one published (else it would be published again, its threshold alerts
        fired again) and follows the policies (else a cap would be withdrawn)."""
        return self.decision_view.synced.is_set() and self.policy_view.synced.is_set()

    async def decide(self, scope: str, *, reason: str, refresh: bool = False) -> None:
        """Publish ``scope``'s decision if it differs from the last one published; until the
        budget views have read their topics, note it for then (``_decide_waiting``)."""
        if not self.views_synced():
            first_reason, was_refresh = self.waiting.get(scope, (reason, False))
            self.waiting[scope] = (first_reason, refresh or was_refresh)
            return
        policy = self.policies.policy_for(scope)
        if policy is None:
            if scope in self.decision_view.records:  # the cap was removed: withdraw it
                self.decision_view.put_local(scope, None)
                await self._send_decision(scope, None)
            return
        now = self.clock.now()
        period = policy.period_at(now)
        spent, counted = self.spent(scope, period.start, period.end)
        decision = decision_record(
            scope, policy, period, spent, now, evaluate(spent, policy), now, reason, counted
        )
        previous = self.decision_view.records.get(scope)
        if should_publish(previous, decision, refresh):
            await self._publish(scope, decision, previous)
        elif previous is not None and (
            previous["spent_usd_nanos"] != decision["spent_usd_nanos"]
            or previous.get("counted_offsets") != decision["counted_offsets"]
        ):  # a re-sent event moves only the offsets: dispatchers wait for them all the same
            self.pending_refresh.add(scope)

    async def _publish(
        self, scope: str, decision: dict[str, Any], previous: dict[str, Any] | None
    ) -> None:
        # Everything up to the first await is atomic in the event loop: the agents and the
        # timers all decide, so the view must hold this decision, and the alerts be chosen,
        # before anything yields (else two of them fire the same threshold alert).
        self.decision_view.put_local(scope, decision)
        policy = self.policies.policy_for(scope)
        crossed = crossed_thresholds(previous, decision, policy) if policy else []
        now = self.clock.now()
        fired = [threshold_alert(scope, policy, decision, t, now) for t in crossed if policy]
        await self._send_decision(scope, decision)
        for alert in fired:
            await self.alerts_topic.send(
                key=alert["alert_key"].encode(), value=self.codec.encode("Alert", alert)
            )

    async def _send_decision(self, scope: str, decision: dict[str, Any] | None) -> None:
        """Send a decision just put in the view (nothing yields in between): the view reads
        it back where the send reports it landed; if its write fails, the view follows the
        topic again for that scope (it will never read this one back)."""
        view = self.decision_view
        write = view.pending_write(scope)
        value = None if decision is None else self.codec.encode("BudgetDecision", decision)
        try:
            sent = await self.decisions_topic.send(key=scope.encode(), value=value)
        except BaseException:
            if write is not None:
                view.local_lost(scope, write)
            raise

        def landed(result: Any) -> None:  # aiokafka's RecordMetadata
            if write is None:
                return
            partition, offset = getattr(result, "partition", None), getattr(result, "offset", None)
            if isinstance(partition, int) and isinstance(offset, int) and offset >= 0:
                view.local_written(scope, write, partition, offset)
            else:  # not known where it landed: never read back; follow the topic again
                log.error(
                    "a decision's send did not report where it landed",
                    extra={"scope": scope, "result": repr(result)},
                )
                view.local_lost(scope, write)

        def written(future: asyncio.Future[Any]) -> None:
            if future.cancelled() or future.exception() is not None:
                if write is not None:
                    view.local_lost(scope, write)
            else:
                landed(future.result())

        if isinstance(sent, asyncio.Future):
            sent.add_done_callback(written)
        else:
            landed(sent)

    def _scopes_for_policy_change(self, scope: str) -> set[str]:
        """The scopes a changed policy applies to: itself, or every scope its default covers."""
        if not scope.endswith(":*"):
            return {scope}
        kind = scope[:-1]
        known = set(self.counter.index) | self.totals.scopes() | set(self.decision_view.records)
        return {s for s in known if s.startswith(kind) and s not in self.policies.policies}

    # -- timers ------------------------------------------------------------------------------
    async def _flush(self) -> None:
        if not self.ready:
            return
        await self._send_partials()
        await self._decide_waiting()
        refresh, self.pending_refresh = list(self.pending_refresh), set()
        for done, scope in enumerate(refresh):
            try:
                if self.owns(scope):
                    await self.decide(scope, reason="spend", refresh=True)
            except BaseException:  # a failed send: this one and the rest wait for the next
                self.pending_refresh.update(refresh[done:])  # flush (as ``_decide_waiting``)
                raise

    async def _decide_waiting(self) -> None:
        """Once the budget views have read their topics, make the decisions that waited;
        until then, say so every ``WAITING_LOG_EVERY_S`` (usage is counted meanwhile)."""
        if not self.waiting:
            return
        if not self.views_synced():
            moment = time.monotonic()
            if moment - self._waiting_logged >= WAITING_LOG_EVERY_S:
                self._waiting_logged = moment
                log.warning(
                    "budget decisions wait until the budget topics are read; usage is counted",
                    extra={
                        "scopes": len(self.waiting),
                        "decisions_read": self.decision_view.synced.is_set(),
                        "policies_read": self.policy_view.synced.is_set(),
                    },
                )
            return
        waiting, self.waiting = self.waiting, {}
        log.info(
            "budget topics read: deciding the scopes that waited", extra={"scopes": len(waiting)}
        )
        todo = list(waiting.items())
        for done, (scope, (reason, refresh)) in enumerate(todo):
            try:
                if self.owns(scope):
                    await self.decide(scope, reason=reason, refresh=refresh)
            except BaseException:  # a failed send: this one and the rest wait for the next
                for later, noted in todo[done:]:  # flush (not dropped: review 62 finding 5)
                    self.waiting.setdefault(later, noted)
                raise

    async def _housekeeping(self) -> None:
        if not self.ready or not self.views_ready.is_set():
            return
        await self._prepared(self.owned("usage"))  # idle partitions: decisions need offsets
        if not self.views_synced():  # decisions wait (``decide``); so do policy changes
            await self._check_views_wait(time.monotonic())
            await self._settle_lost_requests()
            return
        changed, self.policy_changes = self.policy_changes, set()
        for scope in changed:
            for target in self._scopes_for_policy_change(scope):
                if self.owns(target):
                    await self.decide(target, reason="policy_change", refresh=True)
        now = self.clock.now()
        for scope, decision in list(self.decision_view.records.items()):
            if rollover_due(decision, now) and self.owns(scope):
                await self.decide(scope, reason="period_rollover", refresh=True)
        await self._settle_lost_requests()
        moment = time.monotonic()
        if moment - self._last_reconcile >= RECONCILE_EVERY_S:
            self._last_reconcile = moment
            await self._reconcile()
        if moment - self._last_expire >= EXPIRE_EVERY_S:
            self._last_expire = moment
            await self._expire()

    async def _check_views_wait(self, moment: float) -> None:
        """Decisions wait for the budget views (``decide``), normally seconds. Past
        ``spend_views_wait_s`` since they started, a view still unread is logged as an error
        (every ``WAITING_LOG_EVERY_S``); one that has not reached the broker for that long
        either crashes the worker (exit 1): its supervisor restarts it, and its partitions
        go meanwhile to a worker that can decide them. Else each dispatcher would hold only
        its own spend for good, so a user could spend a cap through each dispatcher. A view
        that reaches the broker is reading (a large topic): it is waited for."""
        bound = self.settings.spend_views_wait_s
        if self._views_started is None or moment - self._views_started < bound:
            return
        unread = [v for v in (self.policy_view, self.decision_view) if not v.synced.is_set()]
        lost = [view.topic for view in unread if view.age_s() >= bound]
        if lost:
            log.critical(
                "budget topics unreachable: no decision can be made; crashing so that "
                "another worker decides",
                extra={"topics": lost, "waited_s": round(moment - self._views_started)},
            )
            await self.app.crash(BudgetTopicsUnread(f"not reached for {bound:g} s: {lost}"))
            return
        if unread and moment - self._views_error_logged >= WAITING_LOG_EVERY_S:
            self._views_error_logged = moment
            log.error(
                "budget topics still being read: no decision is made meanwhile",
                extra={
                    "topics": [view.topic for view in unread],
                    "waited_s": round(moment - self._views_started),
                },
            )

    async def _reconcile(self) -> None:
        """Re-publish any owned decision that differs from the state (e.g. lost in a crash)."""
        scopes = set(self.decision_view.records) | {
            s for s in self.policies.policies if not s.endswith(":*")
        }
        for scope in scopes:
            if self.owns(scope):
                await self.decide(scope, reason="reconcile")

    async def _expire(self) -> None:
        now_s = int(self.clock.now().timestamp())
        spend = self.counter.expired_keys(now_s, self.owned("usage"))
        if spend:
            await self._persist(self.spend_table, {k: (p, None) for k, p in spend.items()})
            for key in spend:
                self.spend_table.data.pop(key, None)
            self.counter.rebuild_index()
        owned = self.owned("budget.partials")
        n = self.settings.topic_partitions
        totals = {
            key: (partition_for(key.rsplit("|", 3)[0], n), None)
            for key in self.totals.expired_keys(now_s)
        }
        totals = {k: v for k, v in totals.items() if v[0] in owned}
        if totals:
            await self._persist(self.totals_table, totals)
            for key in totals:
                self.totals_table.data.pop(key, None)
        reports = self.counter.forgettable_reports(now_s, self.owned("usage"))
        if reports:
            await self._persist(self.reported_table, {k: (p, None) for k, p in reports.items()})
            self.counter.forget_reports(reports)
        if spend or totals or reports:
            log.info(
                "expired old spend buckets",
                extra={"spend": len(spend), "totals": len(totals), "reports": len(reports)},
            )

    # -- requests whose usage never came -------------------------------------------------------
    async def _track_requests(self, stream: StreamT[bytes]) -> AsyncIterator[None]:
        await self.views_ready.wait()
        async for events in manual_batches(stream):
            messages = [*await self._missed_requests(events), *(e.message for e in events)]
            writes: dict[str, tuple[int, Any]] = {}
            for message in messages:
                opened = self._open_request(message)
                if opened is not None:
                    writes[opened[0]] = (message.partition, opened[1])
            await self._persist(self.open_table, writes)
            for key, (_p, value) in writes.items():
                self.open_table.data[key] = value
            await self._ack(stream, events)
            self._note_handled(events)
            yield None

    def _open_request(self, message: Any) -> tuple[str, dict[str, Any]] | None:
        """The open-requests entry (key, value) a Request record opens, if any; notes the
        newest boot of its dispatcher."""
        request = self.request_reader.record(message)
        if request is None:
            return None
        entry = open_request_entry(request, message.partition, self.settings)
        if request.get("dispatcher_id") and request.get("boot_ts"):
            boot_ms = int(request["boot_ts"].timestamp() * 1000)
            previous = self.latest_boot.get(request["dispatcher_id"], 0)
            self.latest_boot[request["dispatcher_id"]] = max(previous, boot_ms)
        if entry is None:
            return None
        key = attempt_key(request["request_id"], request.get("attempt") or 1)
        if key in self.settled_early:
            self.settled_early.pop(key, None)
            return None
        if self._usage_counted(entry):  # read again after its usage (a re-send,
            return None  # a restart before the requests offset was committed)
        return key, entry

    async def _missed_requests(self, events: list[Any]) -> list[Any]:
        """Request records Faust's consumer skipped (as :meth:`_missed` for usage): read
        here, opened before the batch, and marked done for Faust's commits. Without it, a
        worker restarted while requests arrived lost a range of them (probe M: Faust
        committed 451 -> 486 and 1117 -> 1150 in one step, 11 requests never opened): a
        request in it whose dispatcher died got no usage and no estimate, ever."""
        topic = self.settings.topic("requests")
        tps = sorted({TP(topic, e.message.partition) for e in events})
        positions = await self._positions([tp for tp in tps if tp not in self.handled])
        handled = {tp.partition: self.handled[tp] for tp in tps if tp in self.handled}
        handled.update({tp.partition: offset for tp, offset in positions.items()})
        missed: list[Any] = []
        for partition, since, until in skipped_ranges(
            ((e.message.partition, e.message.offset) for e in events), handled
        ):
            records = await self._read_range(partition, since, until, topic="requests")
            log.warning(
                "opening requests the consumer skipped",
                extra={"partition": partition, "from": since, "to": until, "read": len(records)},
            )
            missed.extend(records)
            await self._skipped_range_done(partition, since, until, topic="requests")
        return missed

    async def _settle_lost_requests(self) -> None:
        """Estimate the usage of requests whose dispatcher died (a later boot of it was seen)
        or whose deadline passed long ago without any usage."""
        now_ms = int(self.clock.now().timestamp() * 1000)
        grace_ms = int(self.settings.settle_grace_s * 1000)
        owned = self.owned("requests")
        due = []
        for request_id, entry in list(self.open_table.data.items()):
            if not entry or entry["partition"] not in owned:
                continue
            superseded = self.latest_boot.get(entry.get("dispatcher_id") or "", 0) > (
                entry.get("boot_ms") or 0
            )
            if superseded or now_ms > entry["deadline_ms"] + grace_ms:
                due.append(
                    (request_id, entry, "dispatcher restarted" if superseded else "deadline")
                )
        for key, entry, why in due:
            request_id = entry.get("request_id") or key  # entries older than attempts: the key
            counted = self._usage_counted({**entry, "request_id": request_id})
            if counted is None:
                continue  # its usage partition is not prepared yet: the next round decides
            if counted:
                # Its usage was counted after all (the request was opened again by a
                # Request event read after it): the call was answered, nothing to estimate.
                await self._persist(self.open_table, {key: (entry["partition"], None)})
                self.open_table.data.pop(key, None)
                self.settled_already_counted += 1
                continue
            record = estimated_usage(self.prices, request_id, entry)
            message = usage_message(self.settings, self.codec, record)
            await self.usage_topic.send(  # the request's partition: the user's usage partition
                key=message.key, value=message.value, partition=entry["partition"]
            )
            await self._persist(self.open_table, {key: (entry["partition"], None)})
            self.open_table.data.pop(key, None)
            log.warning(
                # Not "counted": after a clean restart the real usage may only be further
                # down the usage topic than this worker has read. It has the same event id
                # and comes first there, so every consumer keeps it and drops the estimate.
                "no usage seen for a request of a dispatcher that restarted or ran past its "
                "deadline; sent an estimate (dropped wherever its real usage came first)",
                extra={
                    "request_id": request_id,
                    "why": why,
                    "cost_usd_nanos": record["cost_usd_nanos"],
                },
            )

    def _usage_counted(self, entry: dict[str, Any]) -> bool | None:
        """Whether the usage of an open request's attempt is among the usage events counted
        on its partition (the last ``spend_dedupe_window`` of them); None if that partition
        is not being counted here yet."""
        recent = self.counter.recent.get(entry["partition"])
        if recent is None:
            return None
        return usage_event_id(entry["request_id"], entry.get("attempt") or 1) in recent


def open_request_entry(
    request: dict[str, Any], partition: int, settings: Settings
) -> dict[str, Any] | None:
    """What estimating an accepted request's usage needs; None for requests with no call."""
    if request.get("status") != "accepted" or request.get("endpoint") not in (
        "chat.completions",
        "dispatch",
    ):
        return None
    ts: datetime = request["ts"]
    deadline = request.get("deadline_ts") or ts + timedelta(seconds=settings.max_call_duration_s)
    boot = request.get("boot_ts")
    return {
        "partition": partition,
        "request_id": request["request_id"],
        "attempt": request.get("attempt") or 1,
        "ts_ms": int(ts.timestamp() * 1000),
        "deadline_ms": int(deadline.timestamp() * 1000),
        "dispatcher_id": request.get("dispatcher_id"),
        "boot_ms": int(boot.timestamp() * 1000) if boot else None,
        "user_id": request["user_id"],
        "session_id": request.get("session_id"),
        "feature": request.get("feature"),
        "team": request.get("team"),
        "api_key_id": request.get("api_key_id"),
        "model": request.get("model_served") or request.get("model_requested"),
        "model_requested": request.get("model_requested"),
        "prompt_tokens": request.get("prompt_tokens_estimated") or 0,
        "expected_output_tokens": request.get("expected_output_tokens") or 0,
        "stream": bool(request.get("stream")),
        "client_request_id": request.get("client_request_id"),
    }


def estimated_usage(prices: PriceCatalog, request_id: str, entry: dict[str, Any]) -> dict[str, Any]:
    """The usage event of a request whose dispatcher died mid-call: prompt tokens as the gate
    counted them, output as the gate expected; same event id as the real one would have had."""
    identity = Identity(
        entry["user_id"], entry.get("session_id"), entry.get("feature"), entry.get("team"),
        api_key_id=entry.get("api_key_id"),
    )  # fmt: skip
    return build_usage_record(
        prices,
        identity,
        request_id=request_id,
        model=entry["model"] or "unknown",
        model_requested=entry.get("model_requested"),
        prompt_tokens=int(entry["prompt_tokens"]),
        completion_tokens=int(entry["expected_output_tokens"]),
        source="settlement",
        ts=datetime.fromtimestamp(entry["ts_ms"] / 1000, UTC),
        event_id=usage_event_id(request_id, entry.get("attempt") or 1),
        usage_estimated=True,
        stream=entry.get("stream", False),
        latency_ms=0,
        ttft_ms=None,
        status=ESTIMATED_STATUS,
        http_status=0,
        error_type=ESTIMATED_STATUS,
        attempt=entry.get("attempt") or 1,
        client_request_id=entry.get("client_request_id"),
    )


async def ensure_changelog_topics(worker: SpendWorker) -> None:
    """Create the tables' changelog topics before Faust starts. Left to Faust, a fresh
    topic is sometimes seen with 0 partitions and an agent dies of PartitionsMismatch."""
    s = worker.settings
    admin = clients.admin(s, purpose="spend-worker")
    try:
        await admin.start()
        names = [
            t.changelog_topic.get_topic_name()
            for t in (
                worker.spend_table,
                worker.totals_table,
                worker.open_table,
                worker.reported_table,
            )
        ]
        existing = set(await admin.list_topics())
        missing = [
            NewTopic(
                name,
                s.topic_partitions,
                s.topic_replication,
                topic_configs={"cleanup.policy": "compact"},
            )
            for name in names
            if name not in existing
        ]
        if missing:
            await admin.create_topics(missing)  # "already exists" from a racing peer is fine
    finally:
        with contextlib.suppress(Exception):  # a client that never started
            await admin.close()


async def wait_for_kafka(worker: SpendWorker, log_every_s: float = 10.0) -> None:
    """:func:`ensure_changelog_topics`, retried until the broker answers. A worker started
    while Kafka was away exited with a traceback at once, and `make up` leaves a service
    down after five exits in two minutes: a broker away for two minutes left spend uncounted
    until someone restarted the worker (probe K). It now waits (a warning every
    ``log_every_s``); SIGTERM still ends it."""
    waited_since = time.monotonic()
    last_log = 0.0
    while True:
        try:
            await ensure_changelog_topics(worker)
        except (KafkaError, OSError, TimeoutError) as exc:
            now = time.monotonic()
            if now - last_log >= log_every_s:
                log.warning(
                    "Kafka does not answer; the spend worker waits for it",
                    extra={
                        "bootstrap": worker.settings.kafka_bootstrap,
                        "waited_s": round(now - waited_since),
                        "error": repr(exc),
                    },
                )
                last_log = now
            await asyncio.sleep(1.0)
        else:
            return


FETCH_MAX_WAIT_MS = 100


def shorten_faust_fetch_wait() -> None:
    """Faust builds its consumer with a hard-coded ``fetch_max_wait_ms=1500``. aiokafka
    sends one fetch per broker at a time and leaves a partition out while its records are
    being processed, so a fetch of idle partitions can park at the broker for 1.5 s while
    the busy partition waits: decisions then lag by more than a second (bench/budget.py
    measured p50 ~1.4 s on streams without this). The worker process lowers the wait on the
    consumer Faust creates; tests/unit/test_spend_fetch_wait.py fails if Faust changes the
    hook this relies on."""
    from faust.transport.drivers import aiokafka as faust_aiokafka

    thread_cls = faust_aiokafka.AIOKafkaConsumerThread
    if getattr(thread_cls, "_tollgate_fetch_wait", False):
        return
    original = thread_cls._create_worker_consumer

    def create_worker_consumer(self: Any, transport: Any) -> Any:
        consumer = original(self, transport)
        consumer._fetch_max_wait_ms = FETCH_MAX_WAIT_MS  # read by the fetcher at start()
        return consumer

    thread_cls._create_worker_consumer = create_worker_consumer  # type: ignore[method-assign]
    thread_cls._tollgate_fetch_wait = True  # type: ignore[attr-defined]


# Faust's livelock checks (faust.transport.drivers.aiokafka) and mode's thread keepalive,
# by the start of their texts.
FAUST_LIVELOCK_TEXTS = (
    "Stream has not started processing",
    "Stream stopped processing, or is slow",
    "Aiokafka has not sent fetch request",
    "Aiokafka stopped fetching from",
    "Aiokafka has not received fetch response",
    "Broker stopped responding to fetch requests",
    "Highwater not yet available",
    "Has not committed",
    "Thread keepalive is not responding",
)
LIVELOCK_NOTE = (
    " [a warning here: the spend worker's own stall watch fetches a partition that stops "
    "moving again and logs it]"
)


class DemoteLivelock(logging.Filter):
    """Log Faust's livelock diagnostics as WARNING. After any freeze of the worker (SIGSTOP,
    a busy machine) Faust logged them at ERROR although the worker went on counting every
    event exactly once: 50 ERROR lines in probe K's session, the only ERRORs of the stack,
    each a page for whoever alerts on ERROR. A partition that really stops moving is the
    stall watch's (``StallWatch``): it fetches it again and logs that."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno > logging.WARNING and any(
            text in str(record.msg) for text in FAUST_LIVELOCK_TEXTS
        ):
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.msg = f"{record.msg}{LIVELOCK_NOTE}"
        return True


def demote_faust_livelock_logs() -> None:
    """Install :class:`DemoteLivelock` on the loggers of Faust's consumer thread (its
    checks and its keepalive, inherited from mode's ServiceThread); once."""
    for name in ("faust.transport.drivers.aiokafka", "mode.threads"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, DemoteLivelock) for f in logger.filters):
            logger.addFilter(DemoteLivelock())


# How long a crashed worker may take to stop before the process is ended regardless.
CRASH_EXIT_AFTER_S = 30.0


def end_process(code: int) -> None:
    """Flush the logs and end the process now, whatever threads are left."""
    logging.shutdown()
    os._exit(code)


def exit_when_crashed(
    app: faust.App, after_s: float = CRASH_EXIT_AFTER_S, exit: Callable[[int], Any] = end_process
) -> None:
    """End the process ``after_s`` seconds after ``app`` crashes if it has not ended by then.

    A crash must end the process so that a supervisor (``make up``, systemd, Kubernetes)
    restarts it. Session 17's probe saw a crashed worker stay alive, idle, deaf to SIGTERM,
    counting nothing for any scope: Faust's stop after a crash can wait forever."""
    crash = app.crash

    async def crash_then_exit(reason: BaseException) -> None:
        timer = threading.Timer(after_s, _exit_after_crash, (exit, reason))
        timer.daemon = True
        timer.start()
        await crash(reason)

    app.crash = crash_then_exit  # type: ignore[method-assign]


def _exit_after_crash(exit: Callable[[int], Any], reason: BaseException) -> None:
    log.critical(
        "the spend worker crashed and did not stop; exiting", extra={"reason": repr(reason)}
    )
    logging.shutdown()
    exit(1)


def run_worker(settings: Settings, exit: Callable[[int], Any] = end_process) -> None:
    """Run the spend worker in the foreground (``tollgate worker``); the process ends with
    it, 1 after a crash (threads Faust leaves behind kept a crashed one alive)."""
    shorten_faust_fetch_wait()
    demote_faust_livelock_logs()
    worker = SpendWorker(settings)
    asyncio.run(wait_for_kafka(worker))
    exit_when_crashed(worker.app)
    # The worker logs as every Tollgate process does (`tollgate` set it up, honouring
    # TOLLGATE_LOG_FORMAT): Faust's own setup replaced the handlers with its text format, so
    # the worker's fields (a settled request's id, why) were lost (probe M).
    faust_worker = faust.Worker(worker.app, loglevel="WARN", quiet=True, override_logging=False)
    code = 1
    try:
        faust_worker.execute_from_commandline()
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    except BaseException:
        log.critical("the spend worker crashed; exiting", exc_info=True)
    finally:
        exit(code)
