"""The anomaly agent on real Kafka: alerts published, and a restart that keeps the baselines."""

from __future__ import annotations

import asyncio
import random
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer

from agents.anomaly.agent import AnomalyAgent
from agents.anomaly.engine import AnomalyEngine
from app.attribution import Identity
from app.codec import EventCodec
from app.pricing import PriceCatalog
from app.settings import Settings
from app.topics import ensure_topics
from app.usage import build_usage_record, new_id
from tests.integration.harness import read_events

pytestmark = pytest.mark.integration

PRICES = PriceCatalog("gpt-4")


def call(at: datetime, prompt: int, completion: int) -> dict[str, Any]:
    return build_usage_record(
        PRICES,
        Identity("mallory", None, "summarize", None),
        request_id=new_id("req_"),
        model="gpt-4o-mini",
        prompt_tokens=prompt,
        completion_tokens=completion,
        ts=at,
    )


async def produce(settings: Settings, records: list[dict[str, Any]]) -> None:
    codec = EventCodec()
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all")
    await producer.start()
    try:
        for record in records:
            await producer.send(
                settings.topic("usage"), codec.encode("Usage", record), key=b"mallory"
            )
        await producer.flush()
    finally:
        await producer.stop()


async def run_until(agent: AnomalyAgent, records: int, timeout_s: float = 60) -> asyncio.Event:
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    agent._task = task  # type: ignore[attr-defined]
    deadline = asyncio.get_running_loop().time() + timeout_s
    while agent.engine.stats.records < records:
        assert not task.done(), task.exception() if task.done() else None
        assert asyncio.get_running_loop().time() < deadline, agent.engine.stats
        await asyncio.sleep(0.1)
    return stop


async def test_a_restarted_agent_keeps_its_baselines_and_alerts_at_once(
    kafka_settings: Settings,
) -> None:
    await ensure_topics(kafka_settings)
    rng = random.Random(5)
    start = datetime.now(UTC).replace(second=0, microsecond=0) - timedelta(minutes=45)
    # 40 minutes of ordinary summaries: about $0.0003 each.
    warmup = [
        call(start + timedelta(seconds=30 * i), rng.randint(900, 1300), rng.randint(100, 200))
        for i in range(80)
    ]
    await produce(kafka_settings, warmup)

    first = AnomalyAgent(kafka_settings, checkpoint_interval_s=3600, idle_advance_s=0.5)
    stop = await run_until(first, len(warmup))
    stop.set()
    await first._task  # type: ignore[attr-defined]  # a clean stop writes a checkpoint

    second = AnomalyAgent(kafka_settings, checkpoint_interval_s=3600, idle_advance_s=0.5)
    stop = await run_until(second, len(warmup))
    assert second.restored and second.engine.stats.records == len(warmup)  # not re-read
    # A prompt-injection burst: the same feature, 20x the tokens, six requests in a minute.
    spike_at = start + timedelta(minutes=41)
    spike = [call(spike_at + timedelta(seconds=8 * i), 24_000, 3_000) for i in range(6)]
    try:
        await produce(kafka_settings, spike)
        alerts: list[dict[str, Any]] = []
        for _ in range(30):
            found = await read_events(kafka_settings, "alerts", at_least=0, settle_s=0.5)
            alerts = [a for a in found if a["kind"] == "cost_per_request"]
            if alerts:
                break
            await asyncio.sleep(0.5)
    finally:
        stop.set()
        await second._task  # type: ignore[attr-defined]
    alert = alerts[0]
    assert alert["status"] == "firing"
    assert alert["scope"] in ("user:mallory", "feature:summarize")
    assert alert["observed"] > alert["expected"]

    # Control: without the checkpoint the same burst is still warm-up, and says nothing.
    fresh = AnomalyEngine(prices=PRICES)
    quiet = [a for r in spike for a in fresh.observe(r)] + fresh.flush()
    assert not [a for a in quiet if a["kind"] == "cost_per_request"]
