import contextlib
import struct

import pytest

from app.events.codec import (
    EVENT_TYPES,
    EventCodec,
    EventDecodeError,
    EventEncodeError,
    FrameError,
    SchemaCatalog,
    event_id_of,
    event_key,
    split_frame,
)
from tests.samples import example_event


@pytest.fixture(scope="module")
def codec() -> EventCodec:
    return EventCodec()


@pytest.mark.parametrize("event_type", EVENT_TYPES)
def test_every_event_type_round_trips(codec: EventCodec, event_type: str) -> None:
    record = example_event(event_type)
    data = codec.encode(event_type, record)
    assert data[0] == 0, "Confluent magic byte"
    (schema_id,) = struct.unpack(">I", data[1:5])
    assert schema_id == codec.catalog.current_id[event_type]
    decoded = codec.decode(data, topic="t", partition=0, offset=1)
    assert decoded.event_type == event_type
    assert decoded.record == record


def test_defaults_fill_optional_fields(codec: EventCodec) -> None:
    minimal = {"event_id": "e", "ts": 0, "request_id": "r", "user_id": "u", "model_served": "m"}
    record = codec.decode(codec.encode("Usage", minimal)).record
    assert record["cost_usd_nanos"] == 0
    assert record["price_unknown"] is False
    assert record["session_id"] is None
    assert record["metadata"] == {}


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "shorter than the 5-byte header"),
        (b"\x00\x00", "shorter than the 5-byte header"),
        (b"\x01\x00\x00\x00\x02abc", "magic byte 1"),
        (b"\x00\x00\x00\x03\xe7abc", "unknown schema id 999"),
        (b'{"json": "not avro"}', "magic byte"),
    ],
)
def test_garbage_raises_typed_error_naming_topic_and_offset(
    codec: EventCodec, data: bytes, reason: str
) -> None:
    with pytest.raises(EventDecodeError) as info:
        codec.decode(data, topic="tollgate.usage", partition=2, offset=42)
    assert reason in str(info.value)
    assert "tollgate.usage[2]@42" in str(info.value)
    assert (info.value.topic, info.value.partition, info.value.offset) == ("tollgate.usage", 2, 42)


def test_truncated_and_padded_bodies_are_rejected(codec: EventCodec) -> None:
    data = codec.encode("Usage", example_event("Usage"))
    for bad in (data[:-5], data[:8], data + b"\x00\x00"):
        with pytest.raises(EventDecodeError):
            codec.decode(bad, topic="tollgate.usage", partition=0, offset=7)


def test_random_bytes_never_escape_as_other_errors(codec: EventCodec) -> None:
    import random

    rng = random.Random(1234)
    for _ in range(2000):
        size = rng.randint(0, 64)
        blob = bytes([0, 0, 0, 0, rng.randint(1, 6)]) + rng.randbytes(size)
        with contextlib.suppress(EventDecodeError):
            codec.decode(blob, topic="fuzz", offset=1)


def test_encode_names_the_problem(codec: EventCodec) -> None:
    with pytest.raises(EventEncodeError, match="event_id"):
        codec.encode("Usage", {"event_id": 123})
    with pytest.raises(EventEncodeError, match="unknown event type"):
        codec.encode("Nope", {})


def test_id_table_covers_every_current_schema() -> None:
    catalog = SchemaCatalog()
    assert catalog.unregistered() == [], "run `tollgate schemas register` and commit schemas/"
    assert len(set(catalog.current_id.values())) == len(EVENT_TYPES)


@pytest.mark.parametrize("event_type", EVENT_TYPES)
def test_the_frame_gives_schema_id_event_id_and_time_without_decoding(
    codec: EventCodec, event_type: str
) -> None:
    # The sink and the spend worker read only this much of a record; it must agree with a full
    # decode of the same bytes, for every event type (all schemas start with event_id, ts).
    data = codec.encode(event_type, example_event(event_type))
    schema_id, body = split_frame(data)
    decoded = codec.decode(data)
    assert schema_id == decoded.schema_id
    event_id, millis = event_key(body)
    assert event_id == decoded.record["event_id"] == event_id_of(data)
    assert millis == int(decoded.record["ts"].timestamp() * 1000)


@pytest.mark.parametrize("data", [None, b"", b"\x00\x00\x00", b"\x01\x00\x00\x00\x01abc"])
def test_unframed_bytes_raise_frame_error(data: bytes | None) -> None:
    with pytest.raises(FrameError, match="not Confluent-framed"):
        split_frame(data)
