"""The one decode-or-skip of every consumer (app/events/consumer.py): a poison record is
logged with where it is, counted, and skipped; it never raises into the consumer's loop."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest

from app.events.codec import EventCodec
from app.events.consumer import EventReader
from tests.samples import example_event


def message(value: bytes | None, offset: int = 7) -> SimpleNamespace:
    return SimpleNamespace(value=value, topic="tollgate.usage", partition=2, offset=offset)


def test_a_good_record_is_decoded() -> None:
    codec = EventCodec()
    reader = EventReader(codec, "test")
    record = example_event("Usage")
    assert reader.record(message(codec.encode("Usage", record))) == record
    assert reader.skipped == 0


@pytest.mark.parametrize("value", [None, b"", b"\x00\x00\x00", b"\x00\x00\x00\x00\x01garbage"])
def test_an_undecodable_record_is_logged_counted_and_skipped(
    value: bytes | None, caplog: pytest.LogCaptureFixture
) -> None:
    counted = []
    reader = EventReader(EventCodec(), "test consumer", on_skip=lambda: counted.append(1))
    with caplog.at_level(logging.ERROR, logger="app.events.consumer"):
        assert reader.record(message(value, offset=41)) is None
    assert reader.skipped == 1 and counted == [1]
    [entry] = caplog.records
    assert "test consumer" in entry.getMessage()
    assert (entry.topic, entry.partition, entry.offset) == ("tollgate.usage", 2, 41)  # type: ignore[attr-defined]


def test_an_event_of_another_type_is_skipped_when_one_is_expected() -> None:
    codec = EventCodec()
    reader = EventReader(codec, "notifier", expect="Alert")
    assert reader.record(message(codec.encode("Usage", example_event("Usage")))) is None
    assert reader.skipped == 1
    alert = example_event("Alert")
    assert reader.record(message(codec.encode("Alert", alert))) == alert
