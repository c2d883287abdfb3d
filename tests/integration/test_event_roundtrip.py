"""Every event type, Avro-encoded, goes through the real broker and comes back equal."""

import asyncio

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from app.events.codec import EVENT_TYPES, EventCodec, EventDecodeError
from app.events.topics import TOPIC_SPECS, ensure_topics
from app.settings import Settings
from tests.samples import example_event

pytestmark = pytest.mark.integration


async def _consume(settings: Settings, topics: list[str], count: int) -> list:
    consumer = AIOKafkaConsumer(
        *topics,
        bootstrap_servers=settings.kafka_bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    records = []
    try:
        async with asyncio.timeout(30):
            while len(records) < count:
                batch = await consumer.getmany(timeout_ms=500)
                for messages in batch.values():
                    records.extend(messages)
    finally:
        await consumer.stop()
    return records


async def test_each_event_type_round_trips_through_kafka(kafka_settings: Settings) -> None:
    await ensure_topics(kafka_settings)
    codec = EventCodec()
    topic_of = {spec.value_schema: kafka_settings.topic(spec.suffix) for spec in TOPIC_SPECS}
    sent = {t: [example_event(t, i) for i in range(3)] for t in EVENT_TYPES}

    producer = AIOKafkaProducer(
        bootstrap_servers=kafka_settings.kafka_bootstrap, acks="all", enable_idempotence=True
    )
    await producer.start()
    try:
        for event_type, records in sent.items():
            for record in records:
                await producer.send_and_wait(
                    topic_of[event_type], codec.encode(event_type, record), key=b"k"
                )
    finally:
        await producer.stop()

    messages = await _consume(kafka_settings, list(topic_of.values()), 3 * len(EVENT_TYPES))
    received: dict[str, list] = {t: [] for t in EVENT_TYPES}
    for message in messages:
        decoded = codec.decode(
            message.value, topic=message.topic, partition=message.partition, offset=message.offset
        )
        assert topic_of[decoded.event_type] == message.topic
        received[decoded.event_type].append(decoded.record)
    for event_type in EVENT_TYPES:
        key = lambda r: r["event_id"]  # noqa: E731
        assert sorted(received[event_type], key=key) == sorted(sent[event_type], key=key)


async def test_garbage_on_a_topic_gives_a_typed_error_with_its_offset(
    kafka_settings: Settings,
) -> None:
    await ensure_topics(kafka_settings)
    topic = kafka_settings.topic("usage")
    codec = EventCodec()
    producer = AIOKafkaProducer(bootstrap_servers=kafka_settings.kafka_bootstrap)
    await producer.start()
    try:
        meta_bad = await producer.send_and_wait(topic, b"\x00\x00\x00\x00\x02\xff\xff", key=b"x")
        await producer.send_and_wait(topic, codec.encode("Usage", example_event("Usage")), key=b"x")
    finally:
        await producer.stop()

    messages = await _consume(kafka_settings, [topic], 2)
    good, errors = [], []
    for message in messages:  # a consumer keeps going past the bad record
        try:
            good.append(
                codec.decode(
                    message.value,
                    topic=message.topic,
                    partition=message.partition,
                    offset=message.offset,
                )
            )
        except EventDecodeError as exc:
            errors.append(exc)
    assert len(good) == 1
    assert len(errors) == 1
    assert errors[0].topic == topic
    assert (errors[0].partition, errors[0].offset) == (meta_bad.partition, meta_bad.offset)
