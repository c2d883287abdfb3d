"""Every way a usage event reaches Kafka puts a user's events on the same partition, keyed alike.

The spend worker counts usage per partition and de-duplicates by ``event_id`` within a
partition (a re-sent event must land where the first copy did); its estimate for a request
whose dispatcher died goes to that request's partition, so ``requests`` and ``usage`` must
be partitioned alike. This test produces usage for the same users through each path a
deployment has — the dispatcher (a chat call, and ``POST /v1/usage``), ``UsageProducer`` and
``tollgate replay`` — and reads the raw messages back from a real broker.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import openai
import pytest
from aiokafka.partitioner import DefaultPartitioner

from app.events.codec import EventCodec
from app.events.topics import ensure_topics
from app.metering.usage import UsageProducer
from app.settings import Settings
from devtools.replay import replay_calls
from devtools.trace import TraceCall
from tests.integration.harness import raw_messages, running_stack

pytestmark = pytest.mark.integration

PER_PARTITION = 2  # users whose key hashes to each partition
REPLAY_NAME = "usage-paths"


def users_on_every_partition(partitions: int) -> list[str]:
    """Fresh user ids, ``PER_PARTITION`` of them hashing (murmur2) to each partition."""
    by_partition: dict[int, list[str]] = defaultdict(list)
    java_compatible = DefaultPartitioner()
    while min((len(by_partition[p]) for p in range(partitions)), default=0) < PER_PARTITION:
        user = f"pk-{uuid.uuid4().hex[:8]}"
        chosen = java_compatible(user.encode(), list(range(partitions)), list(range(partitions)))
        by_partition[chosen].append(user)
    return [u for p in range(partitions) for u in by_partition[p][:PER_PARTITION]]


def path_of(record: dict[str, Any]) -> str:
    if record["source"] == "external":
        return "replay" if record["metadata"].get("replay") == REPLAY_NAME else "UsageProducer"
    return record["source"]  # "dispatcher" (a chat call) or "usage_api" (POST /v1/usage)


def test_every_usage_path_partitions_a_user_alike(kafka_settings: Settings) -> None:
    asyncio.run(ensure_topics(kafka_settings))
    users = users_on_every_partition(kafka_settings.topic_partitions)

    with running_stack(kafka_settings) as stack:
        client = openai.OpenAI(base_url=f"{stack.url}/v1", api_key="unused", max_retries=0)
        for user in users:
            client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], user=user
            )
        reported = httpx.post(
            f"{stack.url}/v1/usage",
            json={
                "records": [
                    {"model": "gpt-4o", "prompt_tokens": 10, "completion_tokens": 2, "user_id": u}
                    for u in users
                ]
            },
        )
        assert reported.status_code == 202, reported.text

    async def external_paths() -> None:
        producer = UsageProducer(kafka_settings)
        await producer.start()
        try:
            for user in users:
                await producer.report(
                    model="gpt-4o", prompt_tokens=5, completion_tokens=1, user_id=user
                )
        finally:
            await producer.stop()
        ts = datetime.now(UTC) - timedelta(minutes=1)
        calls = [
            TraceCall(ts=ts, prompt_tokens=7, completion_tokens=3, user_id=u, model="gpt-4o")
            for u in users
        ]
        stats = await replay_calls(kafka_settings, calls, metadata={"replay": REPLAY_NAME})
        assert stats.calls == len(users)

    asyncio.run(external_paths())

    codec = EventCodec()
    usage = asyncio.run(raw_messages(kafka_settings, "usage", at_least=4 * len(users)))
    requests = asyncio.run(raw_messages(kafka_settings, "requests", at_least=len(users)))
    partitions = sorted({m.partition for m in usage} | {m.partition for m in requests})
    assert len(partitions) == kafka_settings.topic_partitions, "every partition holds users"
    java_compatible = DefaultPartitioner()

    landed: dict[str, dict[str, set[int]]] = defaultdict(lambda: defaultdict(set))
    for message in usage:
        record = codec.decode(message.value).record
        assert message.key == record["user_id"].encode(), (path_of(record), message.key)
        landed[record["user_id"]][path_of(record)].add(message.partition)
    request_partition = {codec.decode(m.value).record["user_id"]: m.partition for m in requests}

    for user in users:
        by_path = landed[user]
        assert set(by_path) == {"dispatcher", "usage_api", "UsageProducer", "replay"}, by_path
        assert len(set().union(*by_path.values())) == 1, f"{user} split over partitions: {by_path}"
        (partition,) = by_path["dispatcher"]
        # The same partition any Kafka client keyed by user_id would pick (murmur2), and the
        # partition of the user's requests, where the spend worker sends its estimates.
        assert partition == java_compatible(user.encode(), partitions, partitions)
        assert request_partition[user] == partition
