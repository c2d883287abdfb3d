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
  ``(alert_key, status, first_seen)`` (and, for a severity update, the severity it rose
  from), so the warehouse keeps it once.
- **History is published, marked.** Without a checkpoint the agent reads the
  topic from the start; a replay of old usage is read like any other. Every
  alert is published (alerts topic, hence the warehouse and the dashboards);
  one whose event time is more than ``historical_after_seconds`` behind the time the
  usage read was written to Kafka (see :class:`WrittenClock`: a replay writes old calls
  now; a backlog read after the agent was down was written as it happened, and pages) is
  marked ``historical=true``, and the notifier decides, per target, whether to page for
  it. The agent counts and logs what it published.
- **Partitions in event-time order, without losing records.** Records of all
  usage partitions are merged by event time before the engine sees them (see
  :class:`EventTimeMerger`); a partition that is caught up still holds the
  others back until it has been silent for ``partition_idle_seconds``, so a
  replay written to every partition is not read one partition ahead of another
  (which made a partition's records "late").
- **Event time drives everything.** Silent minutes are ticked from the wall
  clock only while the stream is live (see :class:`EventClock`): after a replay
  of history, an idle agent stays at the history's event time instead of
  jumping to now, closing days of empty minutes and evicting every user.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import uuid
import zlib
from collections import OrderedDict, deque
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaConnectionError
from prometheus_client import CollectorRegistry
from prometheus_client.core import Metric

from agents.anomaly.detectors import DetectorSettings
from agents.anomaly.engine import AnomalyEngine, SnapshotError
from app.alerts_config import SEVERITY_RAISED_FROM
from app.events import clients
from app.events.codec import EventCodec, build_codec
from app.events.compacted import assigned_partitions
from app.events.consumer import EventReader
from app.http.agent_metrics import Following, counter, gauge, run_following
from app.pricing.catalog import PriceCatalog
from app.settings import Settings

RECENT_IDS = 200_000  # about 50 MB at most; several minutes of a busy gateway's usage

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
    partition 1's records of those minutes arrived. A record is released once every
    partition that may still deliver older records has been read past its event
    time: a partition with unread data (``lagging``: the caller asks the broker, not
    the high-water mark of the partition's last fetch, which is old news after a long
    round of processing), and a partition that is caught up but was written to within
    the last ``idle_timeout_s`` (its newest record's Kafka timestamp: a producer is
    still writing to it, its next records are probably of the same minutes) or
    delivered within it. A partition silent for longer holds nothing back, so live
    traffic is delayed by at most the timeout. Silence is the broker's, not the time
    since the agent last got round to the partition: probe 57's agent, busy for over
    ``idle_timeout_s`` with 2,000 records of other partitions, took a partition it had
    not fetched meanwhile for a silent one and read the others past it (1,671 late
    records in a replay with no other traffic). Within a partition, records are
    released in offset order, so "next offset to read" stays exact.
    """

    MAX_PENDING = 200_000  # released regardless beyond this, to bound memory

    def __init__(self, idle_timeout_s: float = 5.0) -> None:
        self.idle_timeout_s = idle_timeout_s
        self.pending: dict[int, deque[tuple[int, datetime, dict[str, Any]]]] = {}
        self.fetched_until: dict[int, datetime] = {}  # newest event time read, per partition
        self.fetched_at: dict[int, float] = {}  # when the partition last delivered (monotonic)
        self.written_until: dict[int, float] = {}  # newest Kafka timestamp read (epoch s)
        self.pending_count = 0
        self._skipped: dict[int, int] = {}  # undecodable offsets at the head of a partition

    def watch(self, partitions: set[int], now: float | None = None) -> None:
        """The partitions read: each holds the others back for the idle timeout from now,
        until it has delivered (a start, or traffic resuming after a silence)."""
        now = time.monotonic() if now is None else now
        for partition in partitions:
            self.fetched_at[partition] = now

    def add(
        self,
        partition: int,
        offset: int,
        record: dict[str, Any],
        now: float | None = None,
        written_s: float | None = None,
    ) -> None:
        """``written_s``: the record's Kafka timestamp (epoch seconds), when it has one."""
        ts = record["ts"]
        now = time.monotonic() if now is None else now
        if self.fetched_at and now - max(self.fetched_at.values()) > self.idle_timeout_s:
            # The whole stream was silent: its other partitions are probably about to
            # deliver records of the same minutes too (a replay starting), so every
            # partition holds the others back again for the idle timeout.
            self.watch(set(self.fetched_at), now)
        self.pending.setdefault(partition, deque()).append((offset, ts, record))
        self.pending_count += 1
        self.fetched_at[partition] = now
        if partition not in self.fetched_until or ts > self.fetched_until[partition]:
            self.fetched_until[partition] = ts
        if written_s is not None and written_s > self.written_until.get(partition, -math.inf):
            self.written_until[partition] = written_s

    def skip(self, partition: int, offset: int) -> None:
        if not self.pending.get(partition):
            self._skipped[partition] = offset

    def skipped_through(self, offsets: dict[int, int]) -> dict[int, int]:
        """Next offsets past undecodable records that nothing pending precedes."""
        done = {p: o + 1 for p, o in self._skipped.items() if o + 1 > offsets.get(p, -1)}
        self._skipped.clear()
        return done

    def release(
        self, lagging: set[int], now: float | None = None, wall: float | None = None
    ) -> list[tuple[int, int, dict[str, Any]]]:
        """Records safe to process now, in event-time order: (partition, offset, record).
        ``lagging``: the partitions with unread data; ``now`` monotonic, ``wall`` epoch s."""
        now = time.monotonic() if now is None else now
        wall = time.time() if wall is None else wall
        holding = (
            set(lagging)
            | {p for p, at in self.fetched_at.items() if now - at < self.idle_timeout_s}
            # a write clock far ahead of ours (another machine's) would hold for as long
            | {p for p, at in self.written_until.items() if abs(wall - at) < self.idle_timeout_s}
        )
        frontier: datetime | None = None
        if holding and self.pending_count < self.MAX_PENDING:
            if any(p not in self.fetched_until for p in holding):
                return []  # a partition with unread data has not been read at all yet
            frontier = min(self.fetched_until[p] for p in holding)
        released = []
        for partition, queue in self.pending.items():
            while queue and (frontier is None or queue[0][1] <= frontier):
                offset, ts, record = queue.popleft()
                released.append((ts, partition, offset, record))
        self.pending_count -= len(released)
        released.sort(key=lambda item: item[0])
        return [(partition, offset, record) for _, partition, offset, record in released]


class EventClock:
    """When an idle agent may move event time forward, and to where.

    The stream is *live* when the newest record was at most ``live_lag_s`` old (wall
    clock) when it was read. Then silence is news: event time runs on from that
    record at the wall clock's pace, so minutes close and a drop of all traffic is
    seen. After records of the past (a replay of history, a backlog), silence says
    nothing about the time the records describe: event time stays where they left it.
    """

    def __init__(self, live_lag_s: float) -> None:
        self.live_lag_s = live_lag_s
        self.event: datetime | None = None  # newest event time read
        self.read_at: datetime | None = None  # wall clock when it was read

    def observe(self, event_ts: datetime, wall: datetime) -> None:
        if self.event is None or event_ts >= self.event:
            self.event, self.read_at = event_ts, wall

    def live(self) -> bool:
        if self.event is None or self.read_at is None:
            return False
        return (self.read_at - self.event).total_seconds() <= self.live_lag_s

    def idle_now(self, wall: datetime) -> datetime | None:
        """The event time to advance an idle engine to, or None (history: do not)."""
        if not self.live() or self.event is None or self.read_at is None:
            return None
        return self.event + (wall - self.read_at)


class WrittenClock:
    """When the usage records read were written to Kafka (their Kafka timestamps: a
    dispatcher writes each call as it happens; a replay writes old calls now), and so
    which alerts are about the past. An alert whose event time is more than the horizon
    behind the write time of the record that made it (:meth:`of`; an idle advance's, behind
    the newest write time read, run on at the wall clock's pace: :meth:`now`) is
    *historical*: usage written long after it happened. How late the agent reads it is not: an agent down for
    16 minutes came back to the calls written meanwhile, and every alert of that backlog
    was marked historical against the wall clock and paged no one, a live loop's page and
    a paged loop's resolve among them (a fault probe). Each alert is judged as it is
    made, by its own record: not once per read batch (a batch can hold the whole backlog),
    nor by the newest write time so far (records are read in event-time order, and a late
    report written now came before a live backlog's alerts: a review)."""

    def __init__(self) -> None:
        self.written: datetime | None = None  # the newest write time read
        self.read_at: datetime | None = None  # wall clock when it was read

    def observe(self, written_ms: int | None, wall: datetime) -> None:
        if written_ms is None or written_ms < 0:
            return
        written = datetime.fromtimestamp(written_ms / 1000, UTC)
        if self.written is None or written >= self.written:
            self.written, self.read_at = written, wall

    def of(self, written_ms: int | None, wall: datetime) -> datetime:
        """One record's write time (the clock's, for a record without one)."""
        if written_ms is None or written_ms < 0:
            return self.now(wall)
        return datetime.fromtimestamp(written_ms / 1000, UTC)

    def now(self, wall: datetime) -> datetime:
        """The write clock now: the wall clock until a record was read."""
        if self.written is None or self.read_at is None:
            return wall
        return self.written + (wall - self.read_at)


def stable_event_id(alert: dict[str, Any]) -> str:
    """The same alert regenerated after a crash gets the same id (the sink keeps it once).
    A lifecycle's severity update is a record of its own beside its firing (same key,
    status and first_seen): the warehouse kept one of the two and a notifier that had sent
    the firing skipped the update as sent (a fault probe)."""
    first_seen = alert["first_seen"]
    stamp = first_seen.isoformat() if isinstance(first_seen, datetime) else str(first_seen)
    name = f"{alert['alert_key']}|{alert['status']}|{stamp}"
    raised = (alert.get("details") or {}).get(SEVERITY_RAISED_FROM)
    if raised is not None:
        name += f"|raised from {raised}"
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
    ) -> None:
        self.settings = settings
        self.detector_settings = detector_settings or DetectorSettings.with_options(
            **settings.anomaly_options
        )
        self.codec = codec or build_codec(settings.schema_registry_url)
        self.prices = PriceCatalog(settings.baseline_model, settings.price_overrides_file)
        self.checkpoint_interval_s = checkpoint_interval_s
        self.idle_advance_s = idle_advance_s
        self.engine = AnomalyEngine(self.detector_settings, self.prices)
        self.clock = EventClock(self.detector_settings.live_lag_seconds)
        self.written = WrittenClock()
        self.offsets: dict[int, int] = {}  # next usage offset to read, per partition
        self.restored = False
        self.records_read = 0  # decoded from Kafka (held for ordering, or processed)
        # Usage event ids observed lately: a re-sent event (the dispatcher's spool after a
        # crash, a settler's estimate and the late real usage) counts once, as in budgets.
        self.recent_ids: OrderedDict[str, None] = OrderedDict()
        self.duplicates_skipped = 0
        self.published = 0
        self.published_historical = 0  # of which about the past (marked, still published)
        self.pages = 0  # firing alerts that page (incident primaries), live or historical
        self.idle_ticks = 0  # polls that found nothing new
        self.checkpoints_saved = 0
        self.checkpoint_bytes = 0  # size of the last checkpoint written
        self.last_checkpoint_at: float | None = None  # epoch seconds
        self._lag: Any = None  # records not read yet, while reading (see run)
        self.ready = asyncio.Event()  # set once restored and reading

    # -- checkpoints ----------------------------------------------------------------------
    async def load_checkpoint(self) -> Checkpoint | None:
        """The latest checkpoint on the state topic, if any."""
        topic = self.settings.topic("anomaly.state")
        consumer = clients.consumer(
            self.settings,
            topic,
            purpose="anomaly-checkpoint",
            group_id=None,  # no group: every partition is assigned to this consumer
            max_partition_fetch_bytes=MAX_STATE_BYTES,  # one record is a whole checkpoint
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
            await clients.stop_within(consumer)  # also when it never started

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
        self.checkpoints_saved += 1
        self.checkpoint_bytes = len(value)
        self.last_checkpoint_at = time.time()
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
                if self.engine.watermark is not None:
                    # Live when it was saved: silence since then is news (a drop of all
                    # traffic while the agent was down is seen); history: it is not.
                    saved = datetime.fromisoformat(checkpoint.saved_at)
                    self.clock.observe(self.engine.watermark, saved)
                log.info(
                    "anomaly models restored",
                    extra={"saved_at": checkpoint.saved_at, "records": self.engine.stats.records},
                )
            except SnapshotError as exc:
                log.error("anomaly checkpoint unusable; starting fresh", extra={"error": str(exc)})
        producer = clients.producer(
            self.settings,
            purpose="anomaly",
            max_request_size=MAX_STATE_BYTES,  # alerts, and a checkpoint of every model
        )
        usage = self.settings.topic("usage")
        consumer = clients.consumer(
            self.settings,
            usage,
            purpose="anomaly",
            group_id=None,  # no group: every partition is assigned; offsets are checkpointed
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
            merger = EventTimeMerger(self.detector_settings.partition_idle_seconds)
            written_at: dict[tuple[int, int], int] = {}  # Kafka timestamps of held records
            reader = EventReader(self.codec, "anomaly agent")
            merger.watch({tp.partition for tp in partitions})
            ends = await consumer.end_offsets(partitions)
            self._lag = lambda: sum(
                max(0, (ends[tp] if end is None else end) - self.offsets.get(tp.partition, 0))
                for tp in partitions
                for end in [consumer.highwater(tp)]
            )
            while not stop.is_set():
                batches = await consumer.getmany(timeout_ms=int(self.idle_advance_s * 1000))
                alerts: list[dict[str, Any]] = []
                for tp, records in batches.items():
                    for record in records:
                        usage_record = reader.record(record)
                        if usage_record is None:
                            merger.skip(tp.partition, record.offset)
                            continue
                        merger.add(
                            tp.partition,
                            record.offset,
                            usage_record,
                            written_s=record.timestamp / 1000 if record.timestamp >= 0 else None,
                        )
                        written_at[(tp.partition, record.offset)] = record.timestamp
                        self.records_read += 1
                lagging = await self._lagging(
                    consumer, partitions, ends, bool(merger.pending_count)
                )
                wall = datetime.now(UTC)
                for partition, offset, usage_record in merger.release(lagging):
                    # released per partition as a prefix in offset order: max + 1 is exact
                    self.offsets[partition] = max(self.offsets.get(partition, 0), offset + 1)
                    self.clock.observe(_aware(usage_record["ts"]), wall)
                    written_ms = written_at.pop((partition, offset), None)
                    self.written.observe(written_ms, wall)
                    if self._seen_before(usage_record.get("event_id")):
                        continue
                    # judged by this record's own write time: not the batch's newest (a batch
                    # can hold a whole downtime's backlog: a fault probe's resolve), nor the
                    # newest so far (records come in event-time order, and one late report
                    # written now made every alert of a live backlog after it historical)
                    alerts += self._mark_historical(
                        self.engine.observe(usage_record), self.written.of(written_ms, wall)
                    )
                self.offsets.update(merger.skipped_through(self.offsets))
                if not batches and not merger.pending_count:
                    self.idle_ticks += 1
                    # Idle: only a live stream's silence moves event time (see EventClock).
                    now = self.clock.idle_now(wall)
                    if now is not None:
                        alerts += self._mark_historical(
                            self.engine.advance(now), self.written.now(wall)
                        )
                await self._publish(producer, alerts)
                if time.monotonic() - last_checkpoint >= self.checkpoint_interval_s:
                    await self.save_checkpoint(producer)
                    last_checkpoint = time.monotonic()
            await self.save_checkpoint(producer)
        finally:
            self._lag = None
            await clients.stop_within(consumer)  # also when they never started
            with contextlib.suppress(Exception):
                await producer.stop()

    async def _lagging(
        self, consumer: Any, partitions: list[Any], ends: dict[Any, int], holding: bool
    ) -> set[int]:
        """The partitions with unread data. The high-water mark of a partition's last fetch
        says so when it is ahead of the position; when it is not, and records are held for
        ordering, the broker is asked: that mark is as old as the fetch, and a replay may
        have written much more since (probe 57: a partition taken for caught up while its
        next records were in Kafka made 1,671 records of the others' minutes late)."""
        lagging: set[int] = set()
        caught_up: dict[Any, int] = {}  # partition -> its position
        for tp in partitions:
            end = consumer.highwater(tp)
            position = await consumer.position(tp)
            if (ends[tp] if end is None else end) > position:
                lagging.add(tp.partition)
            else:
                caught_up[tp] = position
        if holding and caught_up:
            fresh = await consumer.end_offsets(list(caught_up))
            for tp, position in caught_up.items():
                ends[tp] = max(ends[tp], fresh[tp])
                if fresh[tp] > position:
                    lagging.add(tp.partition)
        return lagging

    def _seen_before(self, event_id: str | None) -> bool:
        """Whether this usage event id was observed within the last RECENT_IDS events."""
        if not event_id:
            return False
        if event_id in self.recent_ids:
            self.duplicates_skipped += 1
            return True
        self.recent_ids[event_id] = None
        if len(self.recent_ids) > RECENT_IDS:
            self.recent_ids.popitem(last=False)
        return False

    def _mark_historical(
        self, alerts: list[dict[str, Any]], written: datetime
    ) -> list[dict[str, Any]]:
        """Mark the alerts just made about the past (``historical``: the notifier decides
        whether they page), against ``written``: the write time of the usage record that
        made them (or of the newest read, run on, for an idle advance)."""
        if alerts:
            horizon = timedelta(seconds=self.detector_settings.historical_after_seconds)
            for alert in alerts:
                alert["historical"] = written - _aware(alert["ts"]) > horizon
        return alerts

    async def _publish(self, producer: AIOKafkaProducer, alerts: list[dict[str, Any]]) -> None:
        """Publish every alert, each marked historical or not when it was made."""
        if not alerts:
            return
        topic = self.settings.topic("alerts")
        for alert in alerts:
            alert["event_id"] = stable_event_id(alert)
            await producer.send(
                topic, self.codec.encode("Alert", alert), key=alert["alert_key"].encode()
            )
            self.published += 1
            self.published_historical += alert["historical"]
            page = alert["status"] == "firing" and alert["incident_role"] == "primary"
            self.pages += page
            log.info(
                "anomaly alert published"
                + (" (historical: about the past, marked so)" if alert["historical"] else ""),
                extra={
                    "kind": alert["kind"],
                    "scope": alert["scope"],
                    "status": alert["status"],
                    "incident_role": alert["incident_role"],
                    "incident_key": alert["incident_key"],
                    "historical": alert["historical"],
                    "event_ts": _aware(alert["ts"]).isoformat(),
                },
            )
        log.info(
            "anomaly alerts published so far",
            extra={
                "published": self.published,
                "historical": self.published_historical,
                "pages": self.pages,
                "late_records": self.engine.stats.late_records,
                "evicted_users": self.engine.stats.evicted_users,
            },
        )

    def lag(self) -> int | None:
        """Usage records not handled yet (read and held for ordering included); None while
        not reading."""
        lag = self._lag
        return None if lag is None else int(lag())


def _aware(ts: Any) -> datetime:
    if isinstance(ts, datetime):
        return ts if ts.tzinfo is not None else ts.replace(tzinfo=UTC)
    return datetime.fromtimestamp(ts / 1000, UTC)


def _counters(agent: AnomalyAgent) -> dict[str, float]:
    return {
        "read": agent.records_read,
        "duplicates": agent.duplicates_skipped,
        "published": agent.published,
        "historical": agent.published_historical,
        "pages": agent.pages,
        "checkpoints": agent.checkpoints_saved,
    }


def agent_metrics(following: Following[AnomalyAgent]) -> Iterator[Metric]:
    """The agent's figures for ``/metrics``: this process's counters (across Kafka retries)
    and the models' state as gauges (restored with them from the checkpoint)."""
    total = following.total
    yield counter(
        "tollgate_anomaly_records_read", "Usage records read by this process", total("read")
    )
    yield counter(
        "tollgate_anomaly_duplicates_skipped",
        "Usage events seen again by event id (a re-sent event counts once)",
        total("duplicates"),
    )
    yield counter(
        "tollgate_anomaly_alerts_published",
        "Alerts published to the alerts topic by this process (firing and resolved)",
        total("published"),
    )
    yield counter(
        "tollgate_anomaly_alerts_historical",
        "Of the alerts published, those about the past (a replay or a backlog; marked "
        "historical, the notifier decides whether they page)",
        total("historical"),
    )
    yield counter(
        "tollgate_anomaly_pages",
        "Firing alerts that are an incident's page (primary), live or historical",
        total("pages"),
    )
    yield counter(
        "tollgate_anomaly_checkpoints",
        "Model checkpoints written to the anomaly.state topic",
        total("checkpoints"),
    )
    agent = following.current
    if agent is None:
        return
    lag = agent.lag()
    stats = agent.engine.stats
    yield gauge(
        "tollgate_anomaly_ready",
        "1 once the agent restored its models and reads the usage topic",
        1.0 if agent.ready.is_set() and lag is not None else 0.0,
    )
    yield gauge(
        "tollgate_anomaly_records", "Usage records in the models, restored ones included",
        stats.records,
    )  # fmt: skip
    yield gauge(
        "tollgate_anomaly_late_records",
        "Records behind the closed minutes (not in request rates), since the models began",
        stats.late_records,
    )
    yield gauge(
        "tollgate_anomaly_evicted_users",
        "User scopes evicted (idle past the retention), since the models began",
        stats.evicted_users,
    )
    yield gauge("tollgate_anomaly_users", "User scopes held in memory", len(agent.engine.users))
    if agent.engine.watermark is not None:
        yield gauge(
            "tollgate_anomaly_watermark_timestamp_seconds",
            "Event time the models have reached (Unix time): compare with the wall clock",
            agent.engine.watermark.timestamp(),
        )
    if lag is not None:
        yield gauge("tollgate_anomaly_lag_records", "Usage records not handled yet", lag)
    if agent.last_checkpoint_at is not None:
        yield gauge(
            "tollgate_anomaly_last_checkpoint_timestamp_seconds",
            "When this process last wrote a checkpoint (Unix time)",
            agent.last_checkpoint_at,
        )
        yield gauge(
            "tollgate_anomaly_checkpoint_bytes", "Size of the last checkpoint",
            agent.checkpoint_bytes,
        )  # fmt: skip


async def run_anomaly_agent(
    settings: Settings,
    stop: asyncio.Event | None = None,
    *,
    registry: CollectorRegistry | None = None,
) -> None:
    """Run the agent until ``stop`` is set (or SIGINT/SIGTERM), retrying while Kafka is down,
    and serve its metrics on ``anomaly_metrics_port`` meanwhile."""
    await run_following(
        lambda: AnomalyAgent(settings),
        _counters,
        agent_metrics,
        host=settings.agents_metrics_host,
        port=settings.anomaly_metrics_port,
        name="anomaly agent",
        stop=stop,
        registry=registry,
    )
