"""The spend worker (Faust): spend tables per scope and period, and budget decisions.

Agents:

- ``track_spend`` reads ``tollgate.usage`` (keyed by user). It adds each
  event's cost to the user's buckets (partition-local) and to this partition's
  partial sums for the event's feature, team, key and global scopes, then
  publishes the user's decision when its state changes.
- ``aggregate`` reads ``tollgate.budget.partials`` (keyed by scope): the
  cumulative partial sum of each source partition. A scope's total is the sum
  over partitions, so no single worker counts every event of a hot scope, and
  a re-delivered partial can never double count (cumulative, kept as a max).
- A timer flushes partials and spent-only decision refreshes every 250 ms, and
  the leader re-opens warn/blocked scopes whose period has ended, without
  waiting for traffic.

State: the Faust tables recover from their changelogs after a restart. Every
bucket value carries the next source offset it has to apply, in the same
changelog message as its total, so an event replayed after a crash
(at-least-once delivery) is skipped bucket by bucket: exactly-once counting.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any, NamedTuple

import faust
import orjson

from app.budgets.policy import PolicyBook, evaluate
from app.budgets.spend import (
    BucketUpdate,
    bucket_key,
    bucket_updates,
    crossed_thresholds,
    decision_record,
    event_cost,
    rollover_due,
    should_publish,
    threshold_alert,
    utc,
)
from app.clock import Clock
from app.codec import EventCodec, EventDecodeError, build_codec
from app.compacted import CompactedView
from app.settings import Settings

log = logging.getLogger(__name__)

FLUSH_INTERVAL_S = 0.25


class Bucket(NamedTuple):
    """A spend bucket's value: total, the next source offset to apply, latest event time."""

    nanos: int
    next_offset: int
    max_ts_ms: int

    def add(self, cost: int, offset: int, ts_ms: int) -> Bucket:
        return Bucket(self.nanos + cost, offset + 1, max(self.max_ts_ms, ts_ms))


class SpendWorker:
    """Builds the Faust app for these settings and holds the worker's in-memory views."""

    def __init__(self, settings: Settings, clock: Clock | None = None) -> None:
        self.settings = settings
        self.clock = clock or Clock(settings.clock_start)
        self.codec: EventCodec = build_codec(settings.schema_registry_url)
        self.policies = PolicyBook()
        self.policy_view = CompactedView(
            settings.kafka_bootstrap,
            settings.topic("budget.policies"),
            self.codec,
            on_record=lambda scope, record: self._on_policy(scope, record),
        )
        # Holds the decisions this worker publishes before they round-trip through Kafka,
        # so a read-back of an older one must not replace them (it would re-fire alerts).
        self.decision_view = CompactedView(
            settings.kafka_bootstrap, settings.topic("budget.decisions"), self.codec, newest_by="ts"
        )
        self.views_ready = asyncio.Event()
        (settings.state_dir / "faust").mkdir(parents=True, exist_ok=True)
        self.dirty_partials: dict[str, tuple[BucketUpdate, int]] = {}  # key -> (update, partition)
        self.pending_refresh: set[tuple[str, str]] = set()  # (scope, table key)
        self.app = self._build()

    # -- views ------------------------------------------------------------------------
    def _on_policy(self, scope: str, record: dict[str, Any] | None) -> None:
        self.policies.apply_record(record, scope)

    # -- the Faust app ---------------------------------------------------------------------
    def _build(self) -> faust.App:
        s = self.settings
        app = faust.App(
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
            stream_wait_empty=False,
        )

        def raw_topic(name: str, partitions: int | None = None) -> faust.TopicT:
            return app.topic(
                name, partitions=partitions, key_serializer="raw", value_serializer="raw"
            )

        usage = raw_topic(s.topic("usage"), s.topic_partitions)
        partials = raw_topic(s.topic("budget.partials"), s.topic_partitions)
        decisions = raw_topic(s.topic("budget.decisions"))
        alerts = raw_topic(s.topic("alerts"))
        # key -> [nanos, next source offset, latest event ts ms]; see Bucket
        spend = app.Table("spend", default=None, partitions=s.topic_partitions)
        totals = app.Table("totals", default=dict, partitions=s.topic_partitions)
        self.spend_table, self.totals_table = spend, totals

        async def publish(
            scope: str, decision: dict[str, Any], previous: dict[str, Any] | None
        ) -> None:
            # Everything up to the first await is atomic in the event loop: the agent and the
            # flush timer both decide, so the view must hold this decision, and the alerts be
            # chosen, before anything yields (else both fire the same threshold alert).
            self.decision_view.records[scope] = decision  # our latest, before it round-trips
            policy = self.policies.policy_for(scope)
            crossed = crossed_thresholds(previous, decision, policy) if policy else []
            now = self.clock.now()
            fired = [threshold_alert(scope, policy, decision, t, now) for t in crossed if policy]
            await decisions.send(
                key=scope.encode(), value=self.codec.encode("BudgetDecision", decision)
            )
            for alert in fired:
                await alerts.send(
                    key=alert["alert_key"].encode(), value=self.codec.encode("Alert", alert)
                )

        async def decide(
            scope: str, spent: int, counted_through: datetime, *, refresh: bool, reason: str
        ) -> None:
            policy = self.policies.policy_for(scope)
            if policy is None:
                return
            now = self.clock.now()
            period = policy.period_at(now)
            decision = decision_record(
                scope, policy, period, spent, counted_through, evaluate(spent, policy), now, reason
            )
            previous = self.decision_view.records.get(scope)
            if should_publish(previous, decision, refresh):
                await publish(scope, decision, previous)

        def current_bucket(scope: str) -> str | None:
            policy = self.policies.policy_for(scope)
            if policy is None:
                return None
            return bucket_key(scope, policy.period_at(self.clock.now()))

        def bucket(key: str) -> Bucket:
            value = spend.get(key)
            return Bucket(*value) if value else Bucket(0, 0, 0)

        @app.agent(usage)
        async def track_spend(stream: faust.StreamT[bytes]) -> AsyncIterator[None]:
            await self.views_ready.wait()
            async for event in stream.events():
                message = event.message
                try:
                    record = self.codec.decode(
                        message.value,
                        topic=message.topic,
                        partition=message.partition,
                        offset=message.offset,
                    ).record
                except EventDecodeError as exc:
                    log.error("skipping undecodable usage event", extra={"error": str(exc)})
                    continue
                cost = event_cost(record)
                ts_ms = int(record["ts"].timestamp() * 1000)
                local_scopes: set[str] = set()
                for update in bucket_updates(record, message.partition, self.policies):
                    current = bucket(update.table_key)
                    if message.offset < current.next_offset:
                        continue  # replayed after a crash: this bucket already counted it
                    # One changelog message per bucket carries the total and the offset: atomic.
                    spend[update.table_key] = list(current.add(cost, message.offset, ts_ms))
                    if update.aggregated:
                        self.dirty_partials[update.table_key] = (update, message.partition)
                    else:
                        local_scopes.add(update.scope)
                for scope in local_scopes:
                    key = current_bucket(scope)
                    if key is not None and key in spend:
                        counted = bucket(key)
                        await decide(
                            scope,
                            counted.nanos,
                            utc(counted.max_ts_ms),
                            refresh=False,
                            reason="spend",
                        )
                        self.pending_refresh.add((scope, key))
                yield None

        @app.agent(partials)
        async def aggregate(stream: faust.StreamT[bytes]) -> AsyncIterator[None]:
            await self.views_ready.wait()
            async for value in stream:
                partial = orjson.loads(value)
                bucket = f"{partial['scope']}|{partial['period_id']}"
                by_partition = dict(totals[bucket])
                source = str(partial["partition"])
                old = by_partition.get(source, (0, 0))
                if partial["cumulative"] >= old[0]:
                    by_partition[source] = (partial["cumulative"], max(partial["ts_ms"], old[1]))
                    totals[bucket] = by_partition
                if current_bucket(partial["scope"]) == bucket:
                    total = sum(v[0] for v in by_partition.values())
                    through = utc(min(v[1] for v in by_partition.values()))
                    await decide(partial["scope"], total, through, refresh=True, reason="spend")
                yield None

        @app.timer(FLUSH_INTERVAL_S)
        async def flush() -> None:
            dirty, self.dirty_partials = self.dirty_partials, {}
            for key, (update, partition) in dirty.items():
                counted = bucket(key)
                payload = {
                    "scope": update.scope,
                    "period_id": update.period.id,
                    "partition": partition,
                    "cumulative": counted.nanos,
                    "ts_ms": counted.max_ts_ms,
                }
                await partials.send(key=update.scope.encode(), value=orjson.dumps(payload))
            refresh, self.pending_refresh = self.pending_refresh, set()
            for scope, key in refresh:
                if current_bucket(scope) == key:
                    counted = bucket(key)
                    through = utc(counted.max_ts_ms)
                    await decide(scope, counted.nanos, through, refresh=True, reason="spend")

        @app.timer(1.0, on_leader=True)
        async def rollover() -> None:
            now = self.clock.now()
            for scope, decision in list(self.decision_view.records.items()):
                if rollover_due(decision, now):
                    policy = self.policies.policy_for(scope)
                    if policy is None:
                        continue
                    period = policy.period_at(now)
                    fresh = decision_record(
                        scope,
                        policy,
                        period,
                        0,
                        period.start,
                        evaluate(0, policy),
                        now,
                        "period_rollover",
                    )
                    await publish(scope, fresh, decision)
                    log.info(
                        "budget period rolled over", extra={"scope": scope, "period": period.id}
                    )

        @app.task
        async def start_views() -> None:
            await asyncio.gather(self.policy_view.start(), self.decision_view.start())
            self.views_ready.set()

        return app


FETCH_MAX_WAIT_MS = 100


def shorten_faust_fetch_wait() -> None:
    """Faust builds its consumer with a hard-coded ``fetch_max_wait_ms=1500``. aiokafka
    sends one fetch per broker at a time and leaves a partition out while its records are
    being processed, so a fetch of idle partitions can park at the broker for 1.5 s while
    the busy partition waits: decisions then lag by >1 s (measured by bench/budget.py).
    This worker process lowers the wait on the consumer Faust creates."""
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


async def ensure_changelog_topics(worker: SpendWorker) -> None:
    """Create the tables' changelog topics before Faust starts. Left to Faust, a fresh
    topic is sometimes seen with 0 partitions and an agent dies of PartitionsMismatch."""
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    s = worker.settings
    admin = AIOKafkaAdminClient(bootstrap_servers=s.kafka_bootstrap)
    await admin.start()
    try:
        names = [
            t.changelog_topic.get_topic_name() for t in (worker.spend_table, worker.totals_table)
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
        await admin.close()


def run_worker(settings: Settings) -> None:
    """Run the spend worker in the foreground (``tollgate worker``)."""
    shorten_faust_fetch_wait()
    worker = SpendWorker(settings)
    asyncio.run(ensure_changelog_topics(worker))
    faust_worker = faust.Worker(worker.app, loglevel="WARN", quiet=True)
    faust_worker.execute_from_commandline()
