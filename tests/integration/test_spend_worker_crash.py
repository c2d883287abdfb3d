"""A crashed spend worker loses no spend and counts nothing twice (issue 10, observation 4).

Both tests compare the worker's published decisions with the sum of the *distinct* usage
events on the topic (read back by event id), to the nano-dollar: per user, per feature and
global. ``TOLLGATE_TEST_WORKER_KILLS`` sets how many times the second test SIGKILLs the worker
under load (2 in ``make test``, 10 or more in ``make test-faults``).
"""

from __future__ import annotations

import asyncio
import os
import random
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from app.budgets.counter import scopes_of_record
from app.budgets.spend import event_cost
from app.events.codec import EventCodec
from app.events.topics import ensure_topics
from app.metering.attribution import Identity
from app.metering.usage import build_usage_record
from app.pricing.catalog import PriceCatalog
from app.settings import Settings
from tests.integration.harness import (
    WorkerProcess,
    latest_decisions,
    publish_policy,
    read_events,
    wait_worker_ready,
)

pytestmark = pytest.mark.integration
USERS = [f"crash-{i}" for i in range(8)]
FEATURES = ["chat", "search"]
LIMITS = {"user:*": 1000, "feature:*": 1000, "global": 100_000}


def publish_policies(settings: Settings) -> None:
    for scope, limit in LIMITS.items():
        asyncio.run(publish_policy(settings, scope, {"period": "month", "limit_usd": limit}))


def expected_spend(settings: Settings, at_least: int) -> dict[str, int]:
    """Per scope, the cost of the distinct usage events on the topic."""
    events = asyncio.run(read_events(settings, "usage", at_least=at_least, timeout_s=60))
    distinct: dict[str, Any] = {}
    for e in events:  # offset order: the first of one id is the one consumers keep
        distinct.setdefault(e["event_id"], e)
    totals: dict[str, int] = defaultdict(int)
    for event in distinct.values():
        for scope in scopes_of_record(event):
            totals[scope] += event_cost(event)
    return totals


def send_markers(settings: Settings, sender: UsageSender) -> int:
    """One more event per user and feature after the last restart, so that every decision
    read afterwards comes from the restarted worker's own state (not a stale one published
    before the crash). Returns how many were sent."""
    records = []
    for i, user in enumerate(USERS):
        records.append(
            build_usage_record(
                sender.prices,
                Identity(user, feature=FEATURES[i % len(FEATURES)]),
                request_id=f"marker-{user}",
                model="gpt-4o-mini",
                prompt_tokens=1,
                completion_tokens=1,
            )
        )
    return asyncio.run(sender.send(records, rate_per_s=0, resend=0))


def wait_for_exact_spend(
    settings: Settings, expected: dict[str, int], timeout_s: float = 120
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    wrong: dict[str, Any] = {}
    while time.monotonic() < deadline:
        decisions = asyncio.run(latest_decisions(settings))
        wrong = {
            scope: (decisions.get(scope) or {}).get("spent_usd_nanos")
            for scope, total in expected.items()
            if (decisions.get(scope) or {}).get("spent_usd_nanos") != total
        }
        if not wrong:
            return decisions
        time.sleep(1)
    raise AssertionError(
        "spend after the crash differs from the distinct usage events: "
        + ", ".join(f"{s}: {wrong[s]} != {expected[s]}" for s in sorted(wrong))
    )


class UsageSender:
    """Produces priced usage events like the dispatcher (keyed by user), some of them twice."""

    def __init__(self, settings: Settings, seed: int) -> None:
        self.settings = settings
        self.random = random.Random(seed)
        self.prices = PriceCatalog()
        self.codec = EventCodec()
        self.sent = 0

    def records(self, count: int) -> list[dict[str, Any]]:
        out = []
        for i in range(count):
            user = self.random.choice(USERS)
            out.append(
                build_usage_record(
                    self.prices,
                    Identity(user, feature=self.random.choice(FEATURES)),
                    request_id=f"req-{self.sent + i}",
                    model=self.random.choice(["gpt-4o", "gpt-4o-mini", "gpt-4"]),
                    prompt_tokens=self.random.randint(10, 4000),
                    completion_tokens=self.random.randint(1, 800),
                )
            )
        self.sent += count
        return out

    async def send(self, records: list[dict[str, Any]], rate_per_s: float, resend: float) -> int:
        producer = AIOKafkaProducer(bootstrap_servers=self.settings.kafka_bootstrap, acks="all")
        await producer.start()
        sent = 0
        try:
            for record in records:
                value = self.codec.encode("Usage", record)
                copies = 2 if self.random.random() < resend else 1  # the spool's re-send
                for _ in range(copies):
                    await producer.send_and_wait(
                        self.settings.topic("usage"), value, key=record["user_id"].encode()
                    )
                    sent += 1
                if rate_per_s:
                    await asyncio.sleep(1 / rate_per_s)
        finally:
            await producer.stop()
        return sent


async def committed_offsets(settings: Settings) -> int:
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets(
            f"{settings.topic_prefix}-spend",
            partitions=[
                TopicPartition(settings.topic("usage"), p) for p in range(settings.topic_partitions)
            ],
        )
    except KafkaError:  # the group has no coordinator yet: nothing committed
        return 0
    finally:
        await admin.close()
    return sum(max(meta.offset, 0) for meta in offsets.values())


async def end_offsets(settings: Settings) -> int:
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap)
    await consumer.start()
    try:
        partitions = [
            TopicPartition(settings.topic("usage"), p) for p in range(settings.topic_partitions)
        ]
        return sum((await consumer.end_offsets(partitions)).values())
    finally:
        await consumer.stop()


def test_offsets_committed_ahead_of_the_changelog_lose_nothing(
    kafka_settings: Settings, tmp_path: Path
) -> None:
    """Reproduce the condition, then kill: a worker whose table writes never reach the
    changelog, while Faust would commit the offsets of the events it counted."""
    asyncio.run(ensure_topics(kafka_settings))
    publish_policies(kafka_settings)
    faulty = WorkerProcess(
        kafka_settings, tmp_path / "faulty.log", argv=("-m", "tests.integration.faulty_worker")
    )
    faulty.start()
    sender = UsageSender(kafka_settings, seed=7)
    try:
        sent = asyncio.run(sender.send(sender.records(200), rate_per_s=0, resend=0.1))
        total = asyncio.run(end_offsets(kafka_settings))
        # Wait for Faust to commit past what the changelog holds (old code: within a second),
        # or long enough that it evidently never will (fixed code).
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if asyncio.run(committed_offsets(kafka_settings)) >= total:
                break
            time.sleep(0.5)
    finally:
        faulty.kill()
    worker = WorkerProcess(kafka_settings, tmp_path / "worker.log")
    worker.start()
    try:
        sent += send_markers(kafka_settings, sender)
        wait_for_exact_spend(kafka_settings, expected_spend(kafka_settings, at_least=sent))
    finally:
        worker.stop()


def test_worker_killed_at_random_moments_under_load_counts_every_event_once(
    kafka_settings: Settings, tmp_path: Path
) -> None:
    """A worker restarted right after a kill used to stop counting some partitions now and
    then (about 1 run in 4 on a loaded machine): its table recovery waited for ever for the
    last records of a changelog partition, the state a consumer that has dropped fetched
    records is left in. test_spend_worker_stall.py makes that condition certain; here it is
    left to chance, as in production."""
    kills = int(os.environ.get("TOLLGATE_TEST_WORKER_KILLS", "2"))
    asyncio.run(ensure_topics(kafka_settings))
    publish_policies(kafka_settings)
    worker = WorkerProcess(kafka_settings, tmp_path / "worker.log")
    worker.start()
    wait_worker_ready(kafka_settings)
    sender = UsageSender(kafka_settings, seed=11)
    chaos = random.Random(1234)
    records = sender.records(150 * (kills + 1))
    sent: list[int] = []
    sending = threading.Thread(
        target=lambda: sent.append(asyncio.run(sender.send(records, rate_per_s=80, resend=0.05)))
    )
    try:
        sending.start()
        for _ in range(kills):
            # A random moment under load; some before the restarted worker's first commit.
            time.sleep(chaos.uniform(0.2, 3.0))
            worker.kill()
            worker.start()
        sending.join(600)
        assert sent, "the load generator failed"
        total = sent[0] + send_markers(kafka_settings, sender)
        wait_for_exact_spend(
            kafka_settings, expected_spend(kafka_settings, at_least=total), timeout_s=180
        )
        # And the worker's group commits to the end: a worker that counts right but never
        # commits a partition again would re-read ever more of it at each restart.
        end = asyncio.run(end_offsets(kafka_settings))
        deadline = time.monotonic() + 60
        while asyncio.run(committed_offsets(kafka_settings)) < end:
            assert time.monotonic() < deadline, "the worker's offsets stopped being committed"
            time.sleep(1)
    finally:
        worker.stop()
