"""The router learner: one process learns the tier router from every dispatcher's calls.

Owns the I/O of shared learning (``routing.shared_learning``): reading
``<prefix>.routing.features`` (what dispatchers publish for each economy-routed call, and
the failures they judged themselves) and ``<prefix>.outcomes`` (``Outcome`` events, from any
dispatcher's ``/v1/outcomes`` or written straight to Kafka), joining them by request id
(:class:`~app.routing.shared.OutcomeJoin`), learning each labelled call once with
:meth:`~app.routing.router.Router.learn_features`, and publishing the model. It decides
nothing about scoring (``app.routing``) or what dispatchers publish (``app.gateway.savings``).

- **One learner, every partition.** Like the anomaly agent it assigns itself all partitions
  of both topics (no consumer group): one model learns from all outcomes. Run one per
  deployment (``tollgate router-learn``; ``tollgate up`` starts it).
- **Published for dispatchers** on the compacted ``<prefix>.routing.state`` (key
  ``router-model``): ``Router.snapshot()`` bytes, at most every ``routing.publish_every_s``
  when something was learned. Dispatchers read only its newest record and follow it.
- **Checkpointed for itself** on the compacted ``<prefix>.routing.learner`` (key
  ``router-learner``), in one record: the model, the join's waiting calls and labels and the
  ids already learned, and the next offset of every partition of both topics. A restarted
  learner restores all of it and reads on from those offsets: nothing learned twice,
  nothing forgotten (records read after the last checkpoint are read again, into the
  restored state, so they count once). The checkpoint is written before the model is
  published, so dispatchers never score with a model the learner could lose.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import pickle
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaConnectionError
from prometheus_client import CollectorRegistry
from prometheus_client.core import Metric

from app.events import clients
from app.events.codec import EventCodec, EventDecodeError, build_codec
from app.events.compacted import MAX_STATE_BYTES, latest_value
from app.http.agent_metrics import (
    Following,
    counter,
    gauge,
    labelled_counter,
    labelled_gauge,
    run_following,
)
from app.routing.model import RouterCheckpointError
from app.routing.router import Router
from app.routing.shared import LabelRecord, OutcomeJoin, SharedRecordError, decode_record
from app.settings import Settings

log = logging.getLogger(__name__)

MODEL_KEY = b"router-model"  # app.gateway.shared_router reads this key
LEARNER_KEY = b"router-learner"
_SEPARATOR = b"\n"
FEATURES, OUTCOMES = "routing.features", "outcomes"


@dataclass
class LearnerCheckpoint:
    """The model, the join state and the next offset per (topic suffix, partition)."""

    model: bytes
    join: OutcomeJoin
    offsets: dict[str, dict[int, int]]
    saved_at: str

    def encode(self) -> bytes:
        header = orjson.dumps(
            {
                "offsets": {
                    t: {str(p): o for p, o in parts.items()} for t, parts in self.offsets.items()
                },
                "saved_at": self.saved_at,
            }
        )
        body = zlib.compress(pickle.dumps((self.model, self.join), pickle.HIGHEST_PROTOCOL), 1)
        return header + _SEPARATOR + body

    @classmethod
    def decode(cls, value: bytes) -> LearnerCheckpoint:
        try:
            header, _, body = value.partition(_SEPARATOR)
            meta = orjson.loads(header)
            model, join = pickle.loads(zlib.decompress(body))
            offsets = {
                t: {int(p): int(o) for p, o in parts.items()}
                for t, parts in meta["offsets"].items()
            }
        except Exception as exc:
            raise RouterCheckpointError(
                f"router learner checkpoint is not readable ({exc!r}); delete the "
                "routing.learner topic's record to learn again"
            ) from exc
        if not isinstance(model, bytes) or not isinstance(join, OutcomeJoin):
            raise RouterCheckpointError("router learner checkpoint holds the wrong objects")
        return cls(model, join, offsets, meta["saved_at"])


class RouterLearner:
    def __init__(
        self,
        settings: Settings,
        *,
        codec: EventCodec | None = None,
        publish_every_s: float | None = None,
    ) -> None:
        self.settings = settings
        self.codec = codec or build_codec(settings.schema_registry_url)
        self.publish_every_s = publish_every_s or settings.routing.publish_every_s
        self.router = Router(settings.routing)
        self.join = OutcomeJoin(settings.routing.remember_routed)
        self.offsets: dict[str, dict[int, int]] = {FEATURES: {}, OUTCOMES: {}}
        self.restored = False
        self.learned_this_run = 0  # examples learned by this process (not restored ones)
        self.skipped_records = 0
        self.records_read = {FEATURES: 0, OUTCOMES: 0}
        self.checkpoints_saved = 0
        self.models_published = 0
        self.last_checkpoint_at: float | None = None  # epoch seconds of the last save
        self._highwater: Any = None  # TopicPartition -> end offset, from the running consumer
        self.ready = asyncio.Event()  # restored and reading

    @property
    def examples_learned(self) -> int:
        """Every example the model has learned, restored ones included."""
        return self.router.model.outcomes_learned

    # -- checkpoints ----------------------------------------------------------------------
    async def restore(self) -> None:
        value, _ = await latest_value(
            self.settings, self.settings.topic("routing.learner"), LEARNER_KEY
        )
        if value is None:
            return
        try:
            checkpoint = LearnerCheckpoint.decode(value)
            router = Router.restore(self.settings.routing, checkpoint.model)
        except RouterCheckpointError as exc:
            log.error(
                "router learner checkpoint unusable; starting fresh", extra={"error": str(exc)}
            )
            return
        self.router, self.join = router, checkpoint.join
        self.join.max_waiting = self.settings.routing.remember_routed
        self.offsets = {FEATURES: {}, OUTCOMES: {}, **checkpoint.offsets}
        self.restored = True
        log.info(
            "router learner restored",
            extra={"saved_at": checkpoint.saved_at, "examples": self.examples_learned},
        )

    async def save(self, producer: AIOKafkaProducer, *, publish_model: bool) -> None:
        model = self.router.snapshot()
        checkpoint = LearnerCheckpoint(
            model, self.join, {t: dict(p) for t, p in self.offsets.items()},
            datetime.now(UTC).isoformat(),
        )  # fmt: skip
        await producer.send_and_wait(
            self.settings.topic("routing.learner"), checkpoint.encode(), key=LEARNER_KEY
        )
        self.checkpoints_saved += 1
        self.last_checkpoint_at = time.time()
        if publish_model:
            published = self.router.published_snapshot()  # scores without River (dispatchers)
            await producer.send_and_wait(
                self.settings.topic("routing.state"), published, key=MODEL_KEY
            )
            self.models_published += 1
        log.info(
            "router learner checkpoint saved",
            extra={
                "examples": self.examples_learned,
                "published": publish_model,
                **self.join.stats(),
            },
        )

    # -- the loop -------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event | None = None) -> None:
        stop = stop or asyncio.Event()
        await self.restore()
        producer = clients.producer(
            self.settings,
            purpose="router-learner",
            max_request_size=MAX_STATE_BYTES,  # a router model and a learner checkpoint
        )
        topics = {self.settings.topic(FEATURES): FEATURES, self.settings.topic(OUTCOMES): OUTCOMES}
        consumer = clients.consumer(
            self.settings,
            *topics,
            purpose="router-learner",
            group_id=None,  # every partition of both topics; offsets are checkpointed
            max_poll_records=2000,
        )
        try:
            await producer.start()
            await consumer.start()
            partitions = await _all_partitions(consumer, set(topics))
            self._highwater = lambda: {
                (topics[tp.topic], tp.partition): consumer.highwater(tp) for tp in partitions
            }
            for tp in partitions:
                offset = self.offsets[topics[tp.topic]].get(tp.partition)
                if offset is not None:
                    consumer.seek(tp, offset)
                else:
                    await consumer.seek_to_beginning(tp)
            if self.restored:  # the last model may not have been published before a crash
                await producer.send_and_wait(
                    self.settings.topic("routing.state"),
                    self.router.published_snapshot(),
                    key=MODEL_KEY,
                )
                self.models_published += 1
            self.ready.set()
            last_save = time.monotonic()
            learned_since, read_since = 0, 0
            while not stop.is_set():
                batch = await consumer.getmany(timeout_ms=500)
                for tp, records in batch.items():
                    suffix = topics[tp.topic]
                    for record in records:
                        learned_since += self._read(suffix, record.value, record)
                        self.offsets[suffix][tp.partition] = record.offset + 1
                        read_since += 1
                due = time.monotonic() - last_save >= self.publish_every_s
                if due and read_since:
                    await self.save(producer, publish_model=learned_since > 0)
                    last_save, learned_since, read_since = time.monotonic(), 0, 0
            if read_since:
                await self.save(producer, publish_model=learned_since > 0)
        finally:
            self._highwater = None
            await clients.stop_within(consumer)  # also when they never started
            with contextlib.suppress(Exception):
                await producer.stop()

    def _read(self, suffix: str, value: bytes | None, record: Any) -> int:
        """Feed one record to the join; the number of examples learned (0 or 1)."""
        self.records_read[suffix] += 1
        if value is None:
            return 0
        if suffix == FEATURES:
            try:
                item = decode_record(value)
            except SharedRecordError as exc:
                self.skipped_records += 1
                log.warning("skipping routing.features record", extra={"error": str(exc)})
                return 0
            if isinstance(item, LabelRecord):
                example = self.join.add_label(item.request_id, item.outcome)
            else:
                example = self.join.add_call(item)
        else:
            try:
                outcome = self.codec.decode(
                    value, topic=record.topic, partition=record.partition, offset=record.offset
                ).record
            except EventDecodeError as exc:
                self.skipped_records += 1
                log.warning("skipping undecodable outcome", extra={"error": str(exc)})
                return 0
            example = self.join.add_label(outcome.get("request_id"), outcome.get("outcome", ""))
        if example is None:
            return 0
        learned = self.router.learn_features(
            example.features, "economy", example.outcome, example.feature
        )
        self.learned_this_run += learned
        return int(learned)

    def lag(self) -> dict[str, float] | None:
        """Records not read yet, per topic suffix (None while not reading)."""
        highwater = self._highwater
        if highwater is None:
            return None
        lag = {FEATURES: 0.0, OUTCOMES: 0.0}
        for (suffix, partition), end in highwater().items():
            if end is not None:  # known once a fetch answered for the partition
                lag[suffix] += max(0, end - self.offsets[suffix].get(partition, 0))
        return lag


async def _all_partitions(
    consumer: AIOKafkaConsumer, topics: set[str], timeout_s: float = 15.0
) -> list[TopicPartition]:
    """Every partition of every topic, once aiokafka has assigned them all."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assigned = consumer.assignment()
        if {tp.topic for tp in assigned} >= topics:
            return sorted(assigned)
        await consumer.getmany(timeout_ms=100)  # fetches metadata; records are re-read after seek
    raise KafkaConnectionError(f"topics {sorted(topics)} not found; run `tollgate topics ensure`")


def _counters(learner: RouterLearner) -> dict[str, float]:
    return {
        "learned": learner.learned_this_run,
        "skipped": learner.skipped_records,
        "checkpoints": learner.checkpoints_saved,
        "published": learner.models_published,
        **{f"read:{suffix}": n for suffix, n in learner.records_read.items()},
    }


def learner_metrics(following: Following[RouterLearner]) -> Iterator[Metric]:
    """The learner's figures for ``/metrics``: this process's counters (across Kafka
    retries), and the model's and the join's state as gauges."""
    learner = following.current
    total = following.total
    yield counter(
        "tollgate_router_learner_learned",
        "Labelled economy calls learned by this process (not restored ones)",
        total("learned"),
    )
    yield labelled_counter(
        "tollgate_router_learner_records_read",
        "Records read by this process, by topic (routed calls and judged failures on "
        "routing.features, Outcome events on outcomes)",
        "topic",
        {suffix: total(f"read:{suffix}") for suffix in (FEATURES, OUTCOMES)},
    )
    yield counter(
        "tollgate_router_learner_skipped_records",
        "Records that could not be read (damaged or foreign), skipped and logged",
        total("skipped"),
    )
    yield counter(
        "tollgate_router_learner_checkpoints",
        "Learner checkpoints written (model, join state and offsets in one record)",
        total("checkpoints"),
    )
    yield counter(
        "tollgate_router_learner_models_published",
        "Models published to the dispatchers (routing.state)",
        total("published"),
    )
    if learner is None:
        return
    stats = learner.join.stats()
    yield gauge(
        "tollgate_router_learner_ready",
        "1 once the learner restored its checkpoint and reads both topics",
        1.0 if learner.ready.is_set() and learner.lag() is not None else 0.0,
    )
    yield gauge(
        "tollgate_router_learner_examples",
        "Examples in the model, restored ones included",
        learner.examples_learned,
    )
    yield gauge(
        "tollgate_router_learner_learned_weight",
        "Weight of the learned part against the prior (0-1): how much better it ranked the "
        "last outcomes than the prior alone (0.73 until five of each outcome were seen)",
        learner.router.model.learned_weight,
    )
    yield labelled_gauge(
        "tollgate_router_learner_waiting",
        "Routed calls waiting for an outcome, and outcomes waiting for their call",
        "kind",
        {"calls": stats["waiting_calls"], "labels": stats["waiting_labels"]},
    )
    yield labelled_gauge(
        "tollgate_router_learner_forgotten",
        "Calls and outcomes dropped unjoined since the model began (routing.remember_routed "
        "bounds the waiting ones)",
        "kind",
        {"calls": stats["forgotten_calls"], "labels": stats["forgotten_labels"]},
    )
    lag = learner.lag()
    if lag is not None:
        yield labelled_gauge(
            "tollgate_router_learner_lag_records",
            "Records on the topic not read yet",
            "topic",
            lag,
        )
    if learner.last_checkpoint_at is not None:
        yield gauge(
            "tollgate_router_learner_last_checkpoint_timestamp_seconds",
            "When this process last wrote a checkpoint (Unix time)",
            learner.last_checkpoint_at,
        )


async def run_router_learner(
    settings: Settings,
    stop: asyncio.Event | None = None,
    *,
    registry: CollectorRegistry | None = None,
) -> None:
    """Run the learner until ``stop`` is set (or SIGINT/SIGTERM), retrying while Kafka is
    down, and serve its metrics on ``router_learn_metrics_port`` meanwhile."""
    await run_following(
        lambda: RouterLearner(settings),
        _counters,
        learner_metrics,
        host=settings.agents_metrics_host,
        port=settings.router_learn_metrics_port,
        name="router learner",
        stop=stop,
        registry=registry,
    )
