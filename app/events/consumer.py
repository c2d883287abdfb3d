"""Reading consumed records: decode each one, or log and skip it, the same way everywhere.

Owns what a consumer does with a record it cannot decode (a truncated frame, an unknown
schema id, a body that does not match its schema, or an event of another type than the
topic carries): one ``error`` log line naming the topic, partition, offset and reason, a
count the consumer can export, and ``None`` so the caller skips it and moves on (its offset
still advances: a poison record must not stall a partition). Used by the spend worker, the
anomaly agent, the notifier and the compacted-topic views. It does not write dead letters:
the sink is the one consumer that sees every topic, and it dead-letters what it cannot
decode (``agents/sink.py``); the others skip a record the sink will have dead-lettered.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from app.events.codec import DecodedEvent, EventCodec, EventDecodeError

log = logging.getLogger(__name__)
REASON_CHARS = 500


class EventReader:
    """Decodes the records of one consumer; ``expect`` = the one event type its topic
    carries (others are skipped as undecodable); ``on_skip`` counts skipped records."""

    def __init__(
        self,
        codec: EventCodec,
        consumer: str,
        *,
        expect: str | None = None,
        on_skip: Callable[[], None] | None = None,
    ) -> None:
        self.codec = codec
        self.consumer = consumer
        self.expect = expect
        self.on_skip = on_skip
        self.skipped = 0

    def decode(
        self, value: bytes | None, topic: str, partition: int, offset: int
    ) -> DecodedEvent | None:
        """The event, or None after logging why it was skipped."""
        try:
            event = self.codec.decode(value, topic=topic, partition=partition, offset=offset)
            if self.expect is not None and event.event_type != self.expect:
                raise EventDecodeError(
                    f"a {event.event_type} event, not {self.expect}",
                    topic=topic,
                    partition=partition,
                    offset=offset,
                )
        except EventDecodeError as exc:
            self.skipped += 1
            if self.on_skip is not None:
                self.on_skip()
            log.error(
                f"{self.consumer}: skipping an undecodable record; check its producer",
                extra={
                    "topic": topic,
                    "partition": partition,
                    "offset": offset,
                    "reason": str(exc)[:REASON_CHARS],
                },
            )
            return None
        return event

    def record(self, message: Any) -> dict[str, Any] | None:
        """The record of a consumed ``message`` (aiokafka's or Faust's), or None if skipped."""
        event = self.decode(message.value, message.topic, message.partition, message.offset)
        return None if event is None else event.record
