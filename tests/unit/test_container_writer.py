"""ContainerWriter: the sink's Avro container files are valid Avro, read back by fastavro as
the events that were encoded (the block header's varints included)."""

from __future__ import annotations

import io

import fastavro
from hypothesis import given, settings
from hypothesis import strategies as st

from app.events.codec import ContainerWriter, EventCodec, split_frame
from app.metering.attribution import Identity
from app.metering.usage import build_usage_record
from app.pricing.catalog import PriceCatalog

CODEC = EventCodec()
PRICES = PriceCatalog()


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 200_000), min_size=1, max_size=80))
def test_a_container_reads_back_as_the_encoded_events(token_counts: list[int]) -> None:
    records = [
        build_usage_record(
            PRICES,
            Identity(f"user-{i}", feature="chat"),
            request_id=f"req-{i}",
            model="gpt-4o",
            prompt_tokens=n,
            completion_tokens=n // 3,
        )
        for i, n in enumerate(token_counts)
    ]
    frames = [split_frame(CODEC.encode("Usage", r)) for r in records]
    schema_id = frames[0][0]
    data = ContainerWriter(CODEC).container(schema_id, [body for _, body in frames])
    read = list(fastavro.reader(io.BytesIO(data)))
    assert [r["event_id"] for r in read] == [r["event_id"] for r in records]
    assert [r["cost_usd_nanos"] for r in read] == [r["cost_usd_nanos"] for r in records]
