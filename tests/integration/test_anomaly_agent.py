"""The anomaly agent on real Kafka: alerts published, and a restart that keeps the baselines."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer

from agents.anomaly.agent import AnomalyAgent
from agents.anomaly.detectors import DetectorSettings
from agents.anomaly.engine import AnomalyEngine
from app.events.codec import EventCodec
from app.events.topics import ensure_topics
from app.metering.attribution import Identity
from app.metering.usage import build_usage_record, new_id
from app.pricing.catalog import PriceCatalog
from app.settings import Settings
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


async def run_until(agent: AnomalyAgent, records: int, stall_s: float = 60) -> asyncio.Event:
    """Run ``agent`` until it has processed ``records``; fail if it stops, or processes
    nothing for ``stall_s`` (a hang). Not a bound on how long the whole takes: 10,000
    records took over a minute on a 2-core machine at a load of 24, and the agent was
    working all along."""
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    agent._task = task  # type: ignore[attr-defined]
    loop = asyncio.get_running_loop()
    seen, progress_at = -1, loop.time()
    while agent.engine.stats.records < records:
        assert not task.done(), task.exception() if task.done() else None
        if records_read(agent) != seen:
            seen, progress_at = records_read(agent), loop.time()
        assert loop.time() - progress_at < stall_s, agent.engine.stats
        await asyncio.sleep(0.1)
    return stop


async def test_a_restarted_agent_keeps_its_baselines_and_alerts_at_once(
    kafka_settings: Settings,
) -> None:
    await ensure_topics(kafka_settings)
    rng = random.Random(5)
    start = datetime.now(UTC).replace(second=0, microsecond=0) - timedelta(minutes=48)
    # 43 minutes of ordinary summaries, about $0.0003 each: enough to know their costs.
    warmup = [
        call(start + timedelta(seconds=10 * i), rng.randint(900, 1300), rng.randint(100, 200))
        for i in range(260)
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
    spike_at = start + timedelta(minutes=44)
    spike = [call(spike_at + timedelta(seconds=8 * i), 24_000, 3_000) for i in range(6)]
    try:
        await produce(kafka_settings, spike)
        alerts: list[dict[str, Any]] = []
        for _ in range(30):
            found = await read_events(kafka_settings, "alerts", at_least=0, settle_s=0.5)
            alerts = [
                a
                for a in found
                if a["kind"] == "cost_per_request" and a["incident_role"] == "primary"
            ]
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


# -- issue 12: history, partitions that are caught up, an idle agent after a replay ----------


async def produce_to(
    settings: Settings,
    records: list[dict[str, Any]],
    partition: int | None = None,
    *,
    produced_at_event_time: bool = False,
) -> None:
    """Usage events keyed by user (or all to one partition), acknowledged before returning;
    ``produced_at_event_time``: each written with its event time as its Kafka timestamp, as
    a dispatcher writes its calls as they happen (else now: a replay of history)."""
    codec = EventCodec()
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all")
    await producer.start()
    try:
        for record in records:
            await producer.send(
                settings.topic("usage"),
                codec.encode("Usage", {**record, "event_id": new_id(), "request_id": new_id()}),
                key=str(record["user_id"]).encode(),
                partition=partition,
                timestamp_ms=int(record["ts"].timestamp() * 1000)
                if produced_at_event_time
                else None,
            )
        await producer.flush()
    finally:
        await producer.stop()


def history_with_a_loop(
    start: datetime, tail: timedelta = timedelta(minutes=6)
) -> tuple[list[dict[str, Any]], datetime]:
    """26 h of ordinary traffic of 40 users from ``start``, then a user's runaway loop of
    5 minutes; the ordinary traffic goes on for ``tail`` after the loop started."""
    from tests.anomaly_traffic import Caller, Feature, World, merged, zipf_callers

    chat = Feature("chat", sigma=0.6)
    world = World(seed=21, callers=zipf_callers([chat], users=40, total_per_minute=6))
    loop_start = start + timedelta(hours=26, minutes=1, seconds=7)
    rng = random.Random(5)
    looping = Caller("looping-user", chat, 0)
    loop = [
        world.call(rng, loop_start + timedelta(seconds=3 * i + rng.uniform(0, 1)), looping)
        for i in range(100)
    ]
    return merged(world.traffic(start, loop_start + tail), loop), loop_start


async def test_history_pages_are_published_marked_historical_and_the_idle_agent_keeps_its_users(
    kafka_settings: Settings, clickhouse: Any
) -> None:
    """Issue 12, observations 1 and 5: a replayed history produces its alerts (marked), and
    an idle agent afterwards neither jumps to the wall clock nor evicts every user."""
    await ensure_topics(kafka_settings)
    records, loop_start = history_with_a_loop(datetime.now(UTC) - timedelta(days=3))
    await produce_to(kafka_settings, records)
    agent = AnomalyAgent(kafka_settings, checkpoint_interval_s=3600, idle_advance_s=0.2)
    stop = await run_until(agent, len(records))
    try:
        alerts = await read_events(
            kafka_settings, "alerts", at_least=1, settle_s=1.0, until=loop_paged
        )
        users_after_replay = len(agent.engine.users)
        watermark = agent.engine.watermark
        idle_before = getattr(agent, "idle_ticks", 0)
        deadline = asyncio.get_running_loop().time() + 10
        while getattr(agent, "idle_ticks", 10**9) < idle_before + 5:  # old agents: no counter
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.1)
        await asyncio.sleep(1.0)  # several idle rounds of 0.2 s
        assert len(agent.engine.users) == users_after_replay > 30
        assert agent.engine.watermark == watermark
    finally:
        stop.set()
        await agent._task  # type: ignore[attr-defined]
    loop_alerts = [a for a in alerts if a["scope"] == "user:looping-user"]
    assert loop_alerts, [a["message"] for a in alerts]
    fired = loop_alerts[0]
    assert fired["status"] == "firing" and fired["historical"] is True
    assert loop_start <= fired["first_seen"] <= loop_start + timedelta(minutes=2)

    # ... and they reach the warehouse (hence the dashboards), marked historical.
    from agents.sink import ClickHouseSink
    from app.warehouse.clickhouse import migrate

    await asyncio.to_thread(migrate, clickhouse)
    sink = ClickHouseSink(kafka_settings, clickhouse, batch_size=100, batch_wait_s=0.3)
    sink_stop = asyncio.Event()
    sink_task = asyncio.create_task(sink.run(sink_stop))
    rows: list[Any] = []
    try:
        deadline = asyncio.get_running_loop().time() + 60
        while not rows and asyncio.get_running_loop().time() < deadline:
            result = await asyncio.to_thread(
                clickhouse.query,
                "SELECT historical, incident_role, impact_usd_per_hour FROM alert_events "
                "WHERE event_id = %(id)s",
                parameters={"id": fired["event_id"]},
            )
            rows = result.result_rows
            await asyncio.sleep(0.3)
    finally:
        sink_stop.set()
        await sink_task
    assert rows and rows[0][0] in (True, 1) and rows[0][1] == fired["incident_role"]
    assert rows[0][2] is not None and rows[0][2] > 0


async def test_a_backlog_of_live_calls_read_after_the_agent_was_down_still_pages(
    kafka_settings: Settings,
) -> None:
    """A fault probe: an agent down for 16 minutes came back to a backlog of calls the
    dispatcher had written as they happened; its alerts were more than
    ``historical_after_seconds`` behind the wall clock, so they were marked historical and
    paged no one: a loop that ran while it was down (or went on) never paged, and the
    resolve of a loop paged just before the crash never reached the pager. History is
    usage written long after it happened (a replay, a backfill), judged by the Kafka
    timestamps of the records read, not by how late the agent reads them.

    The backlog goes on for 25 minutes after the loop started, longer than the horizon
    (10 minutes): read in one batch, each alert is judged by the write time of the record
    that made it, not by the newest record of the batch (the first fix read the clock once
    per batch, and the probe's resolve after a 16-minute downtime was still historical)."""
    await ensure_topics(kafka_settings)
    tail = timedelta(minutes=25)
    horizon = timedelta(
        seconds=AnomalyAgent(kafka_settings).detector_settings.historical_after_seconds
    )
    assert tail > horizon + timedelta(minutes=5)  # the loop lasts 5 minutes
    start = datetime.now(UTC) - timedelta(hours=26, minutes=1, seconds=7) - tail
    records, loop_start = history_with_a_loop(start, tail)
    # ... and one late report written now about a call an hour before the loop, read (in
    # event-time order) before the loop's alerts: it must not make them history (a review)
    late = next(r for r in records if r["ts"] >= loop_start - timedelta(hours=1))
    await produce_to(kafka_settings, [{**late, "user_id": "late-reporter"}], partition=0)
    await produce_to(kafka_settings, records, produced_at_event_time=True)
    records = [*records, late]
    agent = AnomalyAgent(kafka_settings, checkpoint_interval_s=3600, idle_advance_s=0.2)
    stop = await run_until(agent, len(records))
    try:
        alerts = await read_events(
            kafka_settings, "alerts", at_least=1, settle_s=1.0, until=loop_resolved
        )
    finally:
        stop.set()
        await agent._task  # type: ignore[attr-defined]
    loop_alerts = [a for a in alerts if a["scope"] == "user:looping-user"]
    assert loop_alerts, [a["message"] for a in alerts]
    assert loop_alerts[0]["status"] == "firing"
    assert loop_start <= loop_alerts[0]["first_seen"] <= loop_start + timedelta(minutes=2)
    resolved = [a for a in loop_alerts if a["status"] == "resolved"]
    assert resolved, [(a["status"], a["ts"]) for a in loop_alerts]
    assert resolved[-1]["ts"] < loop_start + tail  # made by a record of the backlog
    assert [a["historical"] for a in loop_alerts] == [False] * len(loop_alerts), [
        (a["status"], a["ts"], a["historical"]) for a in loop_alerts
    ]
    assert agent.published_historical == 0


def loop_paged(alerts: list[dict[str, Any]]) -> bool:
    """The looping user's alert is among those read (what the test checks; the agent
    publishes it at its own pace after processing the record that made it)."""
    return any(a["scope"] == "user:looping-user" for a in alerts)


def loop_resolved(alerts: list[dict[str, Any]]) -> bool:
    return any(a["scope"] == "user:looping-user" and a["status"] == "resolved" for a in alerts)


def records_read(agent: AnomalyAgent) -> int:
    """Records fetched from Kafka (held for ordering or processed); older agents only have
    the processed count."""
    return int(getattr(agent, "records_read", agent.engine.stats.records))


async def test_a_partition_that_is_caught_up_does_not_make_the_others_late(
    kafka_settings: Settings,
) -> None:
    """Issue 12, observation 5: replaying into a running agent must not drop records as late
    because one partition was read before another one's records of the same minutes."""
    await ensure_topics(kafka_settings)
    from tests.anomaly_traffic import Feature, World, zipf_callers

    world = World(seed=8, callers=zipf_callers([Feature("chat")], users=20, total_per_minute=30))
    start = datetime.now(UTC) - timedelta(hours=2)
    agent = AnomalyAgent(kafka_settings, checkpoint_interval_s=3600, idle_advance_s=0.2)
    stop = asyncio.Event()
    agent._task = asyncio.create_task(agent.run(stop))  # type: ignore[attr-defined]
    await asyncio.wait_for(agent.ready.wait(), 30)
    sent = 0
    try:
        # Ten-minute chunks, partition 0 first and partition 1 a moment later, as a replay
        # of history that the consumer happens to read one partition ahead of the other.
        for chunk in range(6):
            begin = start + timedelta(minutes=10 * chunk)
            records = world.traffic(begin, begin + timedelta(minutes=10), salt=chunk)
            for partition in (0, 1):
                part = [r for i, r in enumerate(records) if i % 2 == partition]
                await produce_to(kafka_settings, part, partition=partition)
                sent += len(part)
                deadline = asyncio.get_running_loop().time() + 30
                while records_read(agent) < sent:
                    assert not agent._task.done(), agent._task  # type: ignore[attr-defined]
                    assert asyncio.get_running_loop().time() < deadline, agent.engine.stats
                    await asyncio.sleep(0.05)
        deadline = asyncio.get_running_loop().time() + 30
        while agent.engine.stats.records < sent:
            assert asyncio.get_running_loop().time() < deadline, agent.engine.stats
            await asyncio.sleep(0.1)
    finally:
        stop.set()
        await agent._task  # type: ignore[attr-defined]
    assert agent.engine.stats.late_records == 0


async def test_a_resent_usage_event_is_observed_once(kafka_settings: Settings) -> None:
    """A dispatcher's spool re-sends after a crash, and a settler's estimate shares its id
    with a late real usage: the detectors must see each event once, as budgets count it."""
    await ensure_topics(kafka_settings)
    start = datetime.now(UTC) - timedelta(minutes=30)
    records = [call(start + timedelta(seconds=5 * i), 400, 60) for i in range(120)]
    resent = records[40:100]
    await produce(kafka_settings, records + resent)
    agent = AnomalyAgent(kafka_settings, checkpoint_interval_s=3600, idle_advance_s=0.2)
    stop = await run_until(agent, len(records))
    deadline = asyncio.get_running_loop().time() + 30
    while agent.engine.stats.records + agent.duplicates_skipped < len(records) + len(resent):
        assert asyncio.get_running_loop().time() < deadline, agent.engine.stats
        await asyncio.sleep(0.1)
    stop.set()
    await agent._task  # type: ignore[attr-defined]
    assert agent.engine.stats.records == len(records)
    assert agent.duplicates_skipped == len(resent)


async def test_the_agent_serves_its_progress_and_pages_on_its_metrics_port(
    kafka_settings: Settings,
) -> None:
    """An operator could only read the agent's progress (records, late records, pages,
    evictions, checkpoints) in its log: `tollgate anomaly` serves it on
    `anomaly_metrics_port`, for the whole process (a Kafka retry keeps the counters)."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    from agents.anomaly.agent import run_anomaly_agent
    from tests.integration.harness import free_port

    port = free_port()
    settings = Settings(**{**kafka_settings.model_dump(), "anomaly_metrics_port": port})
    await ensure_topics(settings)
    records, _ = history_with_a_loop(datetime.now(UTC) - timedelta(days=3))
    await produce_to(settings, records)
    await produce_to(settings, records[:1])  # one more record, alone in its batch

    async def scrape() -> dict[str, float]:
        async with httpx.AsyncClient(timeout=5) as http:
            text = (await http.get(f"http://127.0.0.1:{port}/metrics")).text
        return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}

    stop = asyncio.Event()
    task = asyncio.create_task(run_anomaly_agent(settings, stop))
    try:
        deadline = asyncio.get_running_loop().time() + 120
        seen: dict[str, float] = {}
        while seen.get("tollgate_anomaly_records") != len(records) + 1 or not seen.get(
            "tollgate_anomaly_pages_total"
        ):
            assert not task.done(), task
            assert asyncio.get_running_loop().time() < deadline, seen
            await asyncio.sleep(0.3)
            with contextlib.suppress(httpx.HTTPError):
                seen = await scrape()
        assert seen["tollgate_anomaly_ready"] == 1
        assert seen["tollgate_anomaly_records_read_total"] == len(records) + 1
        assert seen["tollgate_anomaly_lag_records"] == 0
        assert seen["tollgate_anomaly_alerts_published_total"] >= 1
        assert seen["tollgate_anomaly_alerts_historical_total"] >= 1  # the loop, 3 days ago
        assert seen["tollgate_anomaly_users"] > 30
        last = max(r["ts"] for r in records)
        assert seen["tollgate_anomaly_watermark_timestamp_seconds"] >= last.timestamp() - 60
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)


async def test_tollgate_replay_into_a_running_agent_makes_no_record_late(
    kafka_settings: Settings,
) -> None:
    """Issue 12, observation 5, as probe 57 ran it: ``tollgate replay`` of a history (event
    times kept, users interleaved, written keyed by user to every partition) into a running
    agent with no other traffic. 98,294 records left 1,671 late (counted during the
    catch-up): a partition whose buffered records were all read looked caught up by the
    high-water mark of its last fetch, and silent because the agent had been busy with the
    other partitions' records for longer than ``partition_idle_seconds``; the others were
    read past it and its next records were late. Here 28,940 records (4 hours, 60 users)
    into an agent held up as a loaded machine holds it: 7,539 late before the fix (2 hours,
    14,500 records, did not reproduce it). Nothing is late now: each partition's records of
    the same minutes are read before the minutes close."""
    from devtools.replay import replay_calls
    from devtools.trace import PlacedTrace, TraceCall
    from tests.anomaly_traffic import Feature, World, zipf_callers

    await ensure_topics(kafka_settings)
    world = World(
        seed=64,
        callers=zipf_callers(
            [Feature("chat"), Feature("search"), Feature("code")], users=60, total_per_minute=120
        ),
    )
    start = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=6)
    history = world.traffic(start, start + timedelta(hours=4))
    calls = [
        TraceCall(
            ts=r["ts"],
            prompt_tokens=r["prompt_tokens"],
            completion_tokens=r["completion_tokens"],
            user_id=r["user_id"],
            feature=r["feature"],
            model=r["model_served"],
        )
        for r in history
    ]
    # A busy agent: a round of processing longer than ``partition_idle_seconds`` (the
    # probe's rounds of 2,000 records took about 11 s at a load of 20-44, its timeout 5 s);
    # here the replay, pricing its next batch in this process, holds the agent up.
    agent = AnomalyAgent(
        kafka_settings,
        detector_settings=DetectorSettings.with_options(partition_idle_seconds=0.5),
        checkpoint_interval_s=3600,
        idle_advance_s=0.2,
    )
    stop = asyncio.Event()
    agent._task = asyncio.create_task(agent.run(stop))  # type: ignore[attr-defined]
    busy = asyncio.create_task(a_busy_machine(stop))
    try:
        await asyncio.wait_for(agent.ready.wait(), 30)
        stats = await replay_calls(kafka_settings, PlacedTrace(calls, start=calls[0].ts))
        assert stats.calls == len(calls) > 20_000
        await run_until_processed(agent, len(calls))
    finally:
        stop.set()
        await agent._task  # type: ignore[attr-defined]
        await busy
    assert agent.engine.stats.late_records == 0, agent.engine.stats


async def a_busy_machine(stop: asyncio.Event) -> None:
    """The event loop held for 0.6 s at a time, as a loaded machine holds a busy agent
    (probe 57: a load of 20-44): longer than the test's ``partition_idle_seconds``."""
    while not stop.is_set():
        time.sleep(0.6)  # noqa: ASYNC251 - blocking on purpose: the loop is held
        await asyncio.sleep(0.05)


async def run_until_processed(agent: AnomalyAgent, records: int, stall_s: float = 60) -> None:
    """Wait until the running ``agent`` has processed ``records``; fail if it stops or
    reads nothing for ``stall_s``."""
    loop = asyncio.get_running_loop()
    seen, progress_at = -1, loop.time()
    task = agent._task  # type: ignore[attr-defined]
    while agent.engine.stats.records < records:
        assert not task.done(), task.exception() if task.done() else None
        if (agent.engine.stats.records, records_read(agent)) != seen:
            seen, progress_at = (agent.engine.stats.records, records_read(agent)), loop.time()
        assert loop.time() - progress_at < stall_s, agent.engine.stats
        await asyncio.sleep(0.1)
