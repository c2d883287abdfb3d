"""Event emission: every event is written to the disk spool first, then shipped to Kafka.

Owns how an event becomes a Kafka message (:class:`EventMessage`: topic, partition key,
framed Avro value) and, for ``Usage``, the one way every producer of usage builds and sends
it: the dispatcher's spool (:meth:`EventEmitter.emit_usage`), ``UsageProducer`` and
``tollgate replay`` (:func:`usage_message` + :func:`send_now`), and the spend worker's
estimates (:func:`usage_message`). So usage is keyed (by ``user_id``) and partitioned alike
whoever wrote it, which the spend worker's per-partition counting and de-duplication by
``event_id`` rely on.

Owns the delivery guarantee from the dispatcher to Kafka. ``emit`` encodes the
event and appends it to the spool (a write-ahead log; see ``app/events/spool.py`` for
its fsync policy) and returns: the request path never waits on the broker. A
drain task sends spooled records to Kafka in order (aiokafka, ``acks=all``,
idempotent producer) and acknowledges them in the spool only once Kafka has
acknowledged them. So:

- a broker outage only grows the spool (``tollgate_spool_depth``); the drain
  resumes in order when the broker is back;
- a dispatcher crash loses nothing that ``emit`` returned for: un-acked records
  are re-sent at the next start (at-least-once; consumers de-duplicate by
  ``event_id``);
- a clean shutdown drains what it can within ``shutdown_timeout_s`` and keeps
  the rest on disk for the next start.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from aiokafka.structs import RecordMetadata

from app.events import clients
from app.events.codec import EventCodec
from app.events.spool import Spool, SpooledRecord
from app.retry import RetryCallState, retry_until_stopped
from app.settings import Settings

log = logging.getLogger(__name__)

DRAIN_BATCH = 500
# Spooled events with no Kafka acknowledgement for this long mean delivery is stalled.
STALL_AFTER_S = 3.0
RETRY_BACKOFF_S = (0.2, 0.5, 1.0, 2.0, 5.0)


@dataclass(frozen=True, slots=True)
class EventMessage:
    """One event as it goes to Kafka: full topic name, partition key, framed Avro value."""

    topic: str
    key: bytes | None
    value: bytes


def event_message(
    settings: Settings,
    codec: EventCodec,
    event_type: str,
    topic_suffix: str,
    key: str | None,
    record: Mapping[str, Any],
) -> EventMessage:
    """Encode ``record`` as ``event_type`` for ``settings.topic(topic_suffix)``, keyed by ``key``."""
    return EventMessage(
        settings.topic(topic_suffix),
        key.encode() if key is not None else None,
        codec.encode(event_type, record),
    )


def usage_message(settings: Settings, codec: EventCodec, record: Mapping[str, Any]) -> EventMessage:
    """The Kafka message of a priced ``Usage`` record, for every producer of usage.

    Keyed by ``user_id`` (the usage topic's key, ``topics.py``), so Kafka's default
    partitioner puts all of a user's usage, from whichever producer, on one partition: the
    partition of the user's requests, where the spend worker counts it and de-duplicates a
    re-sent event by ``event_id``.
    """
    return event_message(settings, codec, "Usage", "usage", record["user_id"], record)


def policy_message(
    settings: Settings, codec: EventCodec, scope: str, record: Mapping[str, Any]
) -> EventMessage:
    """The Kafka message of a ``BudgetPolicy`` record (a policy or its removal), for every
    writer of policies: the dispatcher's admin API and start-up file (through its spool) and
    ``tollgate budgets`` (straight to Kafka). Keyed by scope: the topic is compacted, the
    newest record of a scope is its policy."""
    return event_message(settings, codec, "BudgetPolicy", "budget.policies", scope, record)


async def send_now(
    producer: AIOKafkaProducer, message: EventMessage
) -> asyncio.Future[RecordMetadata]:
    """Hand ``message`` to ``producer`` without a spool (``UsageProducer``, ``tollgate
    replay``); the returned future resolves once Kafka acknowledged it, or raises. Retrying
    is the caller's: these producers have no spool to fall back on."""
    return await producer.send(message.topic, message.value, key=message.key)


class EventEmitter:
    def __init__(
        self,
        settings: Settings,
        codec: EventCodec,
        *,
        spool: Spool | None = None,
        on_delivered: Callable[[int], None] | None = None,
        on_acked: Callable[[int, str, int, int], None] | None = None,
    ) -> None:
        """``on_delivered(count)``: events Kafka acknowledged; ``on_acked(seq, topic,
        partition, offset)``: where each one landed (the budget gate matches by it)."""
        self.settings = settings
        self.codec = codec
        self.spool = spool or Spool(
            settings.spool_dir, max_bytes=settings.spool_max_bytes, fsync=settings.spool_fsync
        )
        self._on_delivered = on_delivered
        self._on_acked = on_acked
        self._wake = asyncio.Event()
        self._producer: AIOKafkaProducer | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._producer_up = False
        self._last_ack = 0.0
        self.last_error: str | None = None  # why delivery is failing (shown by /readyz)
        # on_usage(record): each usage event queued, told before it is spooled (so before it
        # can be delivered, and read back from the topic); what it returns, if anything, is
        # told the event's spool sequence once spooled (the dispatcher's: app/http/uncounted.py)
        self.on_usage: Callable[[Mapping[str, Any]], Callable[[int], None] | None] | None = None

    # -- request path ---------------------------------------------------------------
    def emit(
        self, event_type: str, topic_suffix: str, key: str | None, record: Mapping[str, Any]
    ) -> int:
        """Encode and durably queue one event; returns its spool sequence number."""
        return self._spool(
            event_message(self.settings, self.codec, event_type, topic_suffix, key, record)
        )

    def emit_policy(self, scope: str, record: Mapping[str, Any]) -> int:
        """Durably queue a ``BudgetPolicy`` record (see :func:`policy_message`)."""
        return self._spool(policy_message(self.settings, self.codec, scope, record))

    def emit_usage(self, record: Mapping[str, Any]) -> int:
        """Encode and durably queue a priced ``Usage`` record (see :func:`usage_message`);
        returns its spool sequence number."""
        message = usage_message(self.settings, self.codec, record)
        spooled = self.on_usage(record) if self.on_usage is not None else None
        seq = self._spool(message)
        if spooled is not None:
            spooled(seq)
        return seq

    def _spool(self, message: EventMessage) -> int:
        seq = self.spool.append(message.topic, message.key, message.value, int(time.time() * 1000))
        self._wake.set()
        return seq

    def emit_bytes(self, topic_suffix: str, key: str | None, value: bytes) -> int:
        """Durably queue one internal record that is not an Avro event (JSON bytes, as on
        ``routing.features``); same spool, same order, same delivery as :meth:`emit`."""
        topic = self.settings.topic(topic_suffix)
        return self._spool(EventMessage(topic, key.encode() if key is not None else None, value))

    @property
    def depth(self) -> int:
        """Events not yet acknowledged by Kafka."""
        return self.spool.depth

    @property
    def kafka_connected(self) -> bool:
        """Delivering: the producer is up and nothing has waited on Kafka for too long."""
        if not self._producer_up:
            return False
        return self.spool.depth == 0 or time.monotonic() - self._last_ack < STALL_AFTER_S

    @property
    def delivery_problem(self) -> str | None:
        """Why events are not being delivered, in words, or None while they are: the last
        error, else how long Kafka has left the spool unacknowledged (a send can wait on a
        broker that is down without raising for a while)."""
        if self.kafka_connected:
            return None
        if self.last_error:
            return self.last_error
        if not self._producer_up:
            return "not connected to Kafka yet"
        waited = time.monotonic() - self._last_ack
        return (
            f"Kafka has acknowledged nothing for {waited:.0f} s "
            f"({self.spool.depth} events waiting in the spool)"
        )

    # -- lifecycle --------------------------------------------------------------------
    async def start(self) -> None:
        self._task = asyncio.create_task(self._drain_forever(), name="tollgate-event-drain")
        if self.spool.depth:
            log.info("resuming delivery of spooled events", extra={"depth": self.spool.depth})
            self._wake.set()

    async def stop(self, shutdown_timeout_s: float = 10.0) -> None:
        """Drain what Kafka accepts within the timeout; the rest stays spooled on disk."""
        deadline = time.monotonic() + shutdown_timeout_s
        while self.spool.depth and self._producer_up and time.monotonic() < deadline:
            self._wake.set()
            await asyncio.sleep(0.05)
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._close_producer()
        self.spool.flush()
        if self.spool.depth:
            log.warning(
                "stopped with undelivered events kept in the spool; they are sent at next start",
                extra={"depth": self.spool.depth, "spool": str(self.spool.directory)},
            )
        self.spool.close()

    # -- drain -----------------------------------------------------------------------------
    async def _ensure_producer(self) -> AIOKafkaProducer:
        if self._producer is not None:
            return self._producer
        producer = clients.producer(
            self.settings,
            purpose="dispatcher",
            linger_ms=5,  # the spool drain sends bursts: a few ms gather them into batches
            max_batch_size=256 * 1024,
            request_timeout_ms=10_000,  # a silent broker fails a send in 10 s, then it is retried
        )
        try:
            await producer.start()
        except BaseException:
            with contextlib.suppress(Exception):
                await producer.stop()
            raise
        self._producer = producer
        return producer

    async def _close_producer(self) -> None:
        producer, self._producer = self._producer, None
        self._producer_up = False
        if producer is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(producer.stop(), 5)

    async def _send_batch(self, producer: AIOKafkaProducer, records: list[SpooledRecord]) -> None:
        """Send in order and ack in the spool the prefix Kafka acknowledged; raise on a failure.

        Records after a failed one are re-sent later (at-least-once: some of them may
        already be written; consumers de-duplicate by event_id).
        """
        futures: list[asyncio.Future[Any]] = []
        send_error: BaseException | None = None
        for record in records:
            try:
                futures.append(
                    await producer.send(
                        record.topic, record.value, key=record.key, timestamp_ms=record.timestamp_ms
                    )
                )
            except Exception as exc:
                send_error = exc
                break
        results = await asyncio.gather(*futures, return_exceptions=True)
        acked = -1
        for record, result in zip(records, results, strict=False):
            if isinstance(result, BaseException):
                send_error = result
                break
            acked = record.seq
            if self._on_acked is not None:
                self._on_acked(record.seq, record.topic, result.partition, result.offset)
        self._partial_ack(acked)
        if send_error is not None:
            raise send_error

    def _partial_ack(self, acked_seq: int) -> None:
        if acked_seq <= self.spool.last_acked_seq:
            return
        delivered = acked_seq - self.spool.last_acked_seq
        self.spool.ack(acked_seq)
        self._last_ack = time.monotonic()
        if self._on_delivered:
            self._on_delivered(delivered)

    async def _drain_forever(self) -> None:
        # Each delivered batch is one retried call, so the backoff starts over after it.
        while not self._stopping:
            retrying = retry_until_stopped(
                steps=RETRY_BACKOFF_S,
                stop=lambda: self._stopping,
                before_sleep=self._after_failed_delivery,
            )
            await retrying(self._deliver_one_batch)

    async def _deliver_one_batch(self) -> None:
        """Wait until the spool holds events (connecting to Kafka first), then send one batch."""
        if self._stopping:
            return
        producer = await self._ensure_producer()
        if not self._producer_up:
            log.info("Kafka reachable; delivering events", extra={"depth": self.spool.depth})
            self._producer_up = True
            self._last_ack = time.monotonic()
        while not self.spool.depth:
            self._wake.clear()
            if not self.spool.depth:
                await self._wake.wait()
            if self._stopping:
                return
        records = self.spool.peek(DRAIN_BATCH)
        await self._send_batch(producer, records)
        self.last_error = None

    async def _after_failed_delivery(self, retry_state: RetryCallState) -> None:
        """Say why once per outage (every time for a bug), then drop the producer: the
        next try connects afresh."""
        outcome = retry_state.outcome
        exc = outcome.exception() if outcome is not None else None
        if not isinstance(exc, KafkaError | OSError | TimeoutError):
            log.error("event delivery failed unexpectedly; retrying", exc_info=exc)
        elif self._producer_up or retry_state.attempt_number == 1:
            log.warning(
                "Kafka unavailable; events are kept in the spool and retried",
                extra={"error": repr(exc), "depth": self.spool.depth},
            )
        self.last_error = repr(exc)
        await self._close_producer()
