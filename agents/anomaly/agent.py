"""The anomaly agent: usage events from Kafka through the engine, alerts back to Kafka.

Owns the I/O around :class:`~agents.anomaly.engine.AnomalyEngine`: reading the
usage topic, publishing ``Alert`` events, and checkpoints. It decides nothing
about what is anomalous (the engine and its detectors do).

- **One reader of every partition.** Global volume and the global tier mix need
  every event, so the agent assigns itself all usage partitions instead of
  joining a consumer group. Run one per deployment.
- **Checkpoints that survive restarts.** Every ``checkpoint_interval_s`` (and on
  a clean stop) the engine's snapshot and the next usage offset of every
  partition go, together in one record, to the compacted topic
  ``<prefix>.anomaly.state``. A restarted agent restores both and goes on from
  those offsets: no new warm-up, no forgotten baseline, and nothing seen twice
  by the models.
- **Repeats are harmless.** Events after the last checkpoint are replayed after
  a crash, so an alert may be produced again; its ``event_id`` is derived from
  ``(alert_key, status, first_seen)``, so the warehouse keeps it once.
- **History warms, it does not page.** Without a checkpoint the agent reads the
  topic from the start to learn baselines, but alerts whose events are older
  than ``history_alert_horizon_s`` before start are not published.
- **Silent minutes count.** When the topic is idle the engine is advanced to the
  wall clock (minus the lateness allowance), so a traffic drop is seen even
  though no event arrives to close the minute.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
import zlib
from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.errors import KafkaConnectionError

from agents.anomaly.detectors import DetectorSettings
from agents.anomaly.engine import AnomalyEngine, SnapshotError
from app.codec import EventCodec, EventDecodeError, build_codec
from app.compacted import assigned_partitions
from app.kafka_retry import retry_while_kafka_down
from app.pricing import PriceCatalog
from app.settings import Settings

log = logging.getLogger(__name__)

STATE_KEY = b"anomaly-engine"
MAX_STATE_BYTES = 64 * 1024 * 1024
_HEADER_SEPARATOR = b"\n"


@dataclass
class Checkpoint:
    """Engine bytes plus the next usage offset per partition, stored as one record."""

    engine: bytes
    offsets: dict[int, int]
    saved_at: str

    def encode(self) -> bytes:
        header = orjson.dumps(
            {"offsets": {str(p): o for p, o in self.offsets.items()}, "saved_at": self.saved_at}
        )
        return header + _HEADER_SEPARATOR + zlib.compress(self.engine, 1)

    @classmethod
    def decode(cls, value: bytes) -> Checkpoint:
        header, _, body = value.partition(_HEADER_SEPARATOR)
        meta = orjson.loads(header)
        return cls(
            engine=zlib.decompress(body),
            offsets={int(p): int(o) for p, o in meta["offsets"].items()},
            saved_at=meta["saved_at"],
        )


class EventTimeMerger:
    """Interleaves the usage partitions by event time before the engine sees them.

    One fetch returns up to thousands of records of one partition, spanning
    minutes; fed as they come, partition 0's records would close minutes before
    partition 1's records of those minutes arrived (users live on one partition
    each, so their minutes would be wrong). A record is released once every
    partition that still has unread data has been read past its event time; a
    partition that is caught up holds nothing back. Within a partition, records
    are released in offset order, so "next offset to read" stays exact.
    """

    MAX_PENDING = 200_000  # released regardless beyond this, to bound memory

    def __init__(self) -> None:
        self.pending: dict[int, deque[tuple[int, datetime, dict[str, Any]]]] = {}
        self.fetched_until: dict[int, datetime] = {}  # newest event time read, per partition
        self.pending_count = 0
        self._skipped: dict[int, int] = {}  # undecodable offsets at the head of a partition

    def add(self, partition: int, offset: int, record: dict[str, Any]) -> None:
        ts = record["ts"]
        self.pending.setdefault(partition, deque()).append((offset, ts, record))
        self.pending_count += 1
        if partition not in self.fetched_until or ts > self.fetched_until[partition]:
            self.fetched_until[partition] = ts

    def skip(self, partition: int, offset: int) -> None:
        if not self.pending.get(partition):
            self._skipped[partition] = offset

    def skipped_through(self, offsets: dict[int, int]) -> dict[int, int]:
        """Next offsets past undecodable records that nothing pending precedes."""
        done = {p: o + 1 for p, o in self._skipped.items() if o + 1 > offsets.get(p, -1)}
        self._skipped.clear()
        return done

    def release(self, lagging: set[int]) -> list[tuple[int, int, dict[str, Any]]]:
        """Records safe to process now, in event-time order: (partition, offset, record)."""
        if lagging and self.pending_count < self.MAX_PENDING:
            if any(p not in self.fetched_until for p in lagging):
                return []  # a partition with unread data has not been read at all yet
            frontier: datetime | None = min(self.fetched_until[p] for p in lagging)
        else:
            frontier = None  # everything read: release all
        released = []
        for partition, queue in self.pending.items():
            while queue and (frontier is None or queue[0][1] <= frontier):
                offset, ts, record = queue.popleft()
                released.append((ts, partition, offset, record))
        self.pending_count -= len(released)
        released.sort(key=lambda item: item[0])
        return [(partition, offset, record) for _, partition, offset, record in released]


def stable_event_id(alert: dict[str, Any]) -> str:
    """The same alert regenerated after a crash gets the same id (the sink keeps it once)."""
    first_seen = alert["first_seen"]
    stamp = first_seen.isoformat() if isinstance(first_seen, datetime) else str(first_seen)
    name = f"{alert['alert_key']}|{alert['status']}|{stamp}"
    return uuid.uuid5(uuid.NAMESPACE_URL, f"tollgate-alert:{name}").hex


class AnomalyAgent:
    def __init__(
        self,
        settings: Settings,
        *,
        detector_settings: DetectorSettings | None = None,
        codec: EventCodec | None = None,
        checkpoint_interval_s: float = 30.0,
        idle_advance_s: float = 5.0,
        history_alert_horizon_s: float = 600.0,
    ) -> None:
        self.settings = settings
        self.detector_settings = detector_settings or DetectorSettings.with_options(
            **settings.anomaly_options
        )
        self.codec = codec or build_codec(settings.schema_registry_url)
        self.prices = PriceCatalog(settings.baseline_model, settings.price_overrides_file)
        self.checkpoint_interval_s = checkpoint_interval_s
        self.idle_advance_s = idle_advance_s
        self.history_alert_horizon_s = history_alert_horizon_s
        self.engine = AnomalyEngine(self.detector_settings, self.prices)
        self.offsets: dict[int, int] = {}  # next usage offset to read, per partition
        self.restored = False
        self.published = 0
        self.suppressed = 0  # alerts about history older than the horizon
        self.ready = asyncio.Event()  # set once restored and reading
        self._started_at = datetime.now(UTC)

    # -- checkpoints ----------------------------------------------------------------------
    async def load_checkpoint(self) -> Checkpoint | None:
        """The latest checkpoint on the state topic, if any."""
        topic = self.settings.topic("anomaly.state")
        consumer = AIOKafkaConsumer(
            topic,  # no group: every partition is assigned to this consumer
            bootstrap_servers=self.settings.kafka_bootstrap,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_partition_fetch_bytes=MAX_STATE_BYTES,
            fetch_max_bytes=MAX_STATE_BYTES,
        )
        try:
            await consumer.start()
            # Let aiokafka's own start-up task run once: stopping a consumer before it has
            # (start, then stop at once on an empty topic) raises CancelledError from stop().
            await asyncio.sleep(0)
            partitions = await assigned_partitions(consumer, timeout_s=15.0)
            if not partitions:
                return None
            await consumer.seek_to_beginning(*partitions)
            end = await consumer.end_offsets(partitions)
            latest: bytes | None = None
            while [tp for tp in partitions if await consumer.position(tp) < end[tp]]:
                batches = await consumer.getmany(timeout_ms=1000)
                for records in batches.values():
                    for record in records:
                        if record.key == STATE_KEY:
                            latest = record.value  # None is a tombstone: start fresh
            return Checkpoint.decode(latest) if latest else None
        finally:
            with contextlib.suppress(Exception):  # also when it never started
                await consumer.stop()

    async def save_checkpoint(self, producer: AIOKafkaProducer) -> None:
        checkpoint = Checkpoint(
            engine=self.engine.snapshot(),
            offsets=dict(self.offsets),
            saved_at=datetime.now(UTC).isoformat(),
        )
        value = checkpoint.encode()
        # Alerts sent so far must be durable before a checkpoint says they were handled.
        await producer.flush()
        await producer.send_and_wait(self.settings.topic("anomaly.state"), value, key=STATE_KEY)
        log.info(
            "anomaly checkpoint saved",
            extra={"bytes": len(value), "records": self.engine.stats.records},
        )

    # -- the loop -------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event | None = None) -> None:
        stop = stop or asyncio.Event()
        checkpoint = await self.load_checkpoint()
        if checkpoint is not None:
            try:
                self.engine = AnomalyEngine.restore(
                    checkpoint.engine, self.prices, self.detector_settings
                )
                self.offsets = dict(checkpoint.offsets)
                self.restored = True
                log.info(
                    "anomaly models restored",
                    extra={"saved_at": checkpoint.saved_at, "records": self.engine.stats.records},
                )
            except SnapshotError as exc:
                log.error("anomaly checkpoint unusable; starting fresh", extra={"error": str(exc)})
        producer = AIOKafkaProducer(
            bootstrap_servers=self.settings.kafka_bootstrap,
            acks="all",
            enable_idempotence=True,
            max_request_size=MAX_STATE_BYTES,
            compression_type=None,
        )
        usage = self.settings.topic("usage")
        consumer = AIOKafkaConsumer(
            usage,  # no group: every partition is assigned to this consumer
            bootstrap_servers=self.settings.kafka_bootstrap,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_records=2000,
        )
        try:
            await producer.start()
            await consumer.start()
            partitions = await assigned_partitions(consumer, timeout_s=15.0)
            if not partitions:
                raise KafkaConnectionError(f"topic {usage} not found; run `tollgate topics ensure`")
            for tp in partitions:
                if tp.partition in self.offsets:
                    consumer.seek(tp, self.offsets[tp.partition])
                else:
                    await consumer.seek_to_beginning(tp)
            self.ready.set()
            last_checkpoint = time.monotonic()
            merger = EventTimeMerger()
            ends = await consumer.end_offsets(partitions)
            while not stop.is_set():
                batches = await consumer.getmany(timeout_ms=int(self.idle_advance_s * 1000))
                alerts: list[dict[str, Any]] = []
                for tp, records in batches.items():
                    for record in records:
                        try:
                            usage_record = self.codec.decode(
                                record.value,
                                topic=record.topic,
                                partition=record.partition,
                                offset=record.offset,
                            ).record
                        except EventDecodeError as exc:
                            log.warning(
                                "skipping undecodable usage event", extra={"error": str(exc)}
                            )
                            merger.skip(tp.partition, record.offset)
                            continue
                        merger.add(tp.partition, record.offset, usage_record)
                lagging = set()
                for tp in partitions:
                    end = consumer.highwater(tp)
                    if (ends[tp] if end is None else end) > await consumer.position(tp):
                        lagging.add(tp.partition)
                for partition, offset, usage_record in merger.release(lagging):
                    # released per partition as a prefix in offset order: max + 1 is exact
                    self.offsets[partition] = max(self.offsets.get(partition, 0), offset + 1)
                    alerts += self.engine.observe(usage_record)
                self.offsets.update(merger.skipped_through(self.offsets))
                if not batches and not merger.pending_count:  # idle: the clock closes minutes
                    alerts += self.engine.advance(datetime.now(UTC))
                await self._publish(producer, alerts)
                if time.monotonic() - last_checkpoint >= self.checkpoint_interval_s:
                    await self.save_checkpoint(producer)
                    last_checkpoint = time.monotonic()
            await self.save_checkpoint(producer)
        finally:
            with contextlib.suppress(Exception):  # also when they never started
                await consumer.stop()
            with contextlib.suppress(Exception):
                await producer.stop()

    async def _publish(self, producer: AIOKafkaProducer, alerts: list[dict[str, Any]]) -> None:
        horizon = self._started_at - timedelta(seconds=self.history_alert_horizon_s)
        topic = self.settings.topic("alerts")
        for alert in alerts:
            if alert["last_seen"] < horizon:
                self.suppressed += 1
                continue
            alert["event_id"] = stable_event_id(alert)
            await producer.send(
                topic, self.codec.encode("Alert", alert), key=alert["alert_key"].encode()
            )
            self.published += 1
            log.info(
                "anomaly alert",
                extra={"kind": alert["kind"], "scope": alert["scope"], "status": alert["status"]},
            )


async def run_anomaly_agent(settings: Settings, stop: asyncio.Event | None = None) -> None:
    """Run the agent until ``stop`` is set (or SIGINT/SIGTERM), retrying while Kafka is down."""
    import signal

    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    await retry_while_kafka_down(lambda: AnomalyAgent(settings).run(stop), "anomaly agent", stop)
