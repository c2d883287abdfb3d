"""The ClickHouse sink with real parts: Kafka, and the ClickHouse engine (chdb or a server)."""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta
from decimal import Decimal
from typing import Any

import clickhouse_connect
import pytest
from aiokafka import AIOKafkaProducer

from agents.sink import ClickHouseSink
from app.events.codec import EventCodec
from app.events.topics import ensure_topics
from app.metering.usage import event_time
from app.settings import Settings
from app.warehouse.clickhouse import ReconnectingClient, migrate
from app.warehouse.rollups import fed_by
from tests.integration.harness import consumer_from_the_start, free_port
from tests.samples import example_event

pytestmark = pytest.mark.integration


def usage_record(user: str, i: int) -> dict[str, Any]:
    record = example_event("Usage", i)
    record.update(
        event_id=uuid.uuid4().hex,
        ts=event_time(),
        user_id=user,
        cost_usd_nanos=1_234_567 + i * 7919,  # odd amounts: sums must match to the nano
        baseline_cost_usd_nanos=9_000_000 + i,
        baseline_model="gpt-4",
        price_unknown=False,
    )
    return record


async def produce(
    settings: Settings, records: list[dict[str, Any]], extra: list[bytes] = ()
) -> None:
    codec = EventCodec()
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all")
    await producer.start()
    try:
        for record in records:
            await producer.send(
                settings.topic("usage"),
                codec.encode("Usage", record),
                key=record["user_id"].encode(),
            )
        for blob in extra:
            await producer.send(settings.topic("usage"), blob, key=b"garbage")
        await producer.flush()
    finally:
        await producer.stop()


async def rows_for(client: Any, user: str) -> tuple[int, int, Decimal]:
    result = await asyncio.to_thread(
        client.query,
        "SELECT count(), uniqExact(event_id), sum(cost_usd) FROM usage_events WHERE user_id = %(u)s",
        parameters={"u": user},
    )
    count, unique, total = result.result_rows[0]
    return int(count), int(unique), Decimal(total or 0)


async def wait_rows(client: Any, user: str, expected: int, timeout_s: float = 60) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while asyncio.get_running_loop().time() < deadline:
        if (await rows_for(client, user))[0] >= expected:
            return
        await asyncio.sleep(0.3)
    raise AssertionError(f"{user}: fewer than {expected} rows after {timeout_s}s")


async def sink_until_stored(settings: Settings, client: Any, user: str, rows: int) -> None:
    """A fresh sink, run until ``user`` has ``rows`` rows, then stopped."""
    sink = ClickHouseSink(settings, client, batch_size=100, batch_wait_s=0.3)
    stop = asyncio.Event()
    task = asyncio.create_task(sink.run(stop))
    await wait_rows(client, user, rows)
    stop.set()
    await task


async def sink_until_seen(settings: Settings, client: Any, events: int) -> ClickHouseSink:
    """A fresh sink, run until it has inserted or dropped ``events`` events, then stopped."""
    sink = ClickHouseSink(settings, client, batch_size=100, batch_wait_s=0.3)
    stop = asyncio.Event()
    task = asyncio.create_task(sink.run(stop))
    for _ in range(200):
        if sink.duplicates_dropped + sink.inserted >= events:
            break
        await asyncio.sleep(0.1)
    stop.set()
    await task
    return sink


async def test_exactly_once_rows_with_duplicates_garbage_and_a_sink_restart(
    kafka_settings: Settings, clickhouse: Any
) -> None:
    await ensure_topics(kafka_settings)
    migrate(clickhouse)
    user = f"sink-{uuid.uuid4().hex[:8]}"
    first = [usage_record(user, i) for i in range(400)]
    second = [usage_record(user, 400 + i) for i in range(400)]
    expected_nanos = sum(r["cost_usd_nanos"] for r in first + second)

    # Deliberate duplicates (a producer's at-least-once re-send), a record that is not an
    # event at all, and one whose id and time read fine but whose body is cut short (only
    # ClickHouse's Avro parser finds that out).
    truncated = EventCodec().encode("Usage", usage_record(user, 999))[:-7]
    await produce(
        kafka_settings,
        first + first[:100],
        extra=[b"\x00\x00\x00\x00\x02garbage", truncated],
    )
    sink = ClickHouseSink(kafka_settings, clickhouse, batch_size=150, batch_wait_s=0.3)
    task = asyncio.create_task(sink.run())
    await wait_rows(clickhouse, user, 150)
    task.cancel()  # abrupt: the batch in flight is neither inserted-and-committed nor lost
    with pytest.raises(asyncio.CancelledError):
        await task

    await produce(kafka_settings, second + second[:50])
    restarted = ClickHouseSink(kafka_settings, clickhouse, batch_size=150, batch_wait_s=0.3)
    stop = asyncio.Event()
    task = asyncio.create_task(restarted.run(stop))
    await wait_rows(clickhouse, user, 800)
    await asyncio.sleep(1.5)  # anything still in flight would land now
    stop.set()
    await task

    count, unique, total = await rows_for(clickhouse, user)
    assert (count, unique) == (800, 800), "exactly one row per event, without FINAL"
    assert total == Decimal(expected_nanos) / Decimal(10**9), "sums equal to the nano-dollar"
    assert sink.duplicates_dropped + restarted.duplicates_dropped >= 100
    dead = await read_events_raw(kafka_settings, "deadletter")
    assert sorted(m.value for m in dead) == sorted([b"\x00\x00\x00\x00\x02garbage", truncated])
    for m in dead:
        assert dict(m.headers)["topic"] == kafka_settings.topic("usage").encode()
        assert dict(m.headers)["reason"]


async def read_events_raw(settings: Settings, suffix: str) -> list[Any]:
    """Whatever a topic holds, read from the start within 5 s (an empty list for an empty topic)."""
    consumer = await consumer_from_the_start(settings, suffix)
    try:
        batch = await consumer.getmany(timeout_ms=5000)
        return [m for messages in batch.values() for m in messages]
    finally:
        await consumer.stop()


async def test_clickhouse_down_for_a_while_then_back_loses_nothing(
    kafka_settings: Settings, clickhouse: Any
) -> None:
    await ensure_topics(kafka_settings)
    migrate(clickhouse)
    user = f"outage-{uuid.uuid4().hex[:8]}"
    records = [usage_record(user, i) for i in range(300)]
    await produce(kafka_settings, records)

    closed_port = free_port()
    attempts = {"failed": 0}

    def factory() -> Any:
        if attempts["failed"] < 3:  # ClickHouse "down": a real connection to a closed port
            attempts["failed"] += 1
            return clickhouse_connect.get_client(
                host="127.0.0.1", port=closed_port, connect_timeout=1
            )
        return clickhouse  # "fixed"

    sink = ClickHouseSink(
        kafka_settings, ReconnectingClient(factory), batch_size=100, batch_wait_s=0.3
    )
    stop = asyncio.Event()
    task = asyncio.create_task(sink.run(stop))
    await wait_rows(clickhouse, user, 300, timeout_s=90)
    stop.set()
    await task
    assert attempts["failed"] == 3, "the sink really met a ClickHouse it could not reach"
    count, unique, total = await rows_for(clickhouse, user)
    assert (count, unique) == (300, 300)
    assert total == Decimal(sum(r["cost_usd_nanos"] for r in records)) / Decimal(10**9)


async def test_a_restarted_sink_drops_resent_events_to_the_millisecond(
    kafka_settings: Settings, clickhouse: Any
) -> None:
    """A new sink knows nothing in memory: it must find re-sent events in ClickHouse."""
    await ensure_topics(kafka_settings)
    migrate(clickhouse)
    user = f"resend-{uuid.uuid4().hex[:8]}"
    base = event_time()
    records = [usage_record(user, i) for i in range(300)]
    for i, record in enumerate(records):  # spread over ~40 s, at odd milliseconds
        record["ts"] = base + timedelta(milliseconds=137 * i + 999)
    await produce(kafka_settings, records)
    first = ClickHouseSink(kafka_settings, clickhouse, batch_size=100, batch_wait_s=0.3)
    stop = asyncio.Event()
    task = asyncio.create_task(first.run(stop))
    await wait_rows(clickhouse, user, 300)
    stop.set()
    await task

    await produce(kafka_settings, records)  # a producer re-sends all of them
    second = await sink_until_seen(kafka_settings, clickhouse, 300)
    count, unique, _ = await rows_for(clickhouse, user)
    assert (count, unique) == (300, 300)
    assert (second.inserted, second.duplicates_dropped) == (0, 300)


async def test_a_long_clickhouse_outage_holds_the_batch_and_dead_letters_nothing(
    kafka_settings: Settings, clickhouse: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Down for many retries (not just a few): every event must still land, none may go to
    the dead-letter topic — an unreachable ClickHouse says nothing about the data."""
    import agents.sink

    monkeypatch.setattr(agents.sink, "RETRY_BACKOFF_S", (0.05,))
    await ensure_topics(kafka_settings)
    migrate(clickhouse)
    user = f"long-outage-{uuid.uuid4().hex[:8]}"
    records = [usage_record(user, i) for i in range(300)]
    await produce(kafka_settings, records)

    closed_port = free_port()
    attempts = {"failed": 0}

    def factory() -> Any:
        if attempts["failed"] < 12:  # a real connection to a closed port, twelve times
            attempts["failed"] += 1
            return clickhouse_connect.get_client(
                host="127.0.0.1", port=closed_port, connect_timeout=1
            )
        return clickhouse

    sink = ClickHouseSink(
        kafka_settings, ReconnectingClient(factory), batch_size=100, batch_wait_s=0.3
    )
    stop = asyncio.Event()
    task = asyncio.create_task(sink.run(stop))
    await wait_rows(clickhouse, user, 300, timeout_s=120)
    stop.set()
    await task
    assert attempts["failed"] == 12
    assert sink.dead_lettered == 0, "an outage is not bad data"
    count, unique, total = await rows_for(clickhouse, user)
    assert (count, unique) == (300, 300)
    assert total == Decimal(sum(r["cost_usd_nanos"] for r in records)) / Decimal(10**9)


def test_only_errors_about_the_data_count_as_refused(clickhouse: Any) -> None:
    from clickhouse_connect.driver.exceptions import DatabaseError

    from agents.sink import refuses_data

    migrate(clickhouse)
    with pytest.raises(DatabaseError) as parse_error:  # ClickHouse refuses this value
        clickhouse.command("INSERT INTO schema_migrations (version, applied_at) VALUES ('x', 'y')")
    assert refuses_data(parse_error.value)
    with pytest.raises(DatabaseError) as down:  # nothing listens there
        clickhouse_connect.get_client(host="127.0.0.1", port=free_port(), connect_timeout=1)
    assert not refuses_data(down.value)
    assert not refuses_data(
        DatabaseError(
            "Code: 1001. DB::Exception: filesystem error: in "
            "create_directories: Operation not permitted"
        )
    )


async def test_the_first_of_two_events_with_one_id_is_stored_as_every_consumer_counts_it(
    kafka_settings: Settings, clickhouse: Any
) -> None:
    """An estimated usage (the settler's) and a late real one share an event id; the spend
    worker counts whichever reached Kafka first, so the warehouse must keep that one too,
    even when both land in the same sink batch."""
    await ensure_topics(kafka_settings)
    migrate(clickhouse)
    user = f"first-{uuid.uuid4().hex[:8]}"
    estimates = [usage_record(user, i) for i in range(50)]
    reals = [dict(r, cost_usd_nanos=r["cost_usd_nanos"] + 1_000) for r in estimates]
    await produce(kafka_settings, [x for pair in zip(estimates, reals, strict=True) for x in pair])
    sink = ClickHouseSink(kafka_settings, clickhouse, batch_size=500, batch_wait_s=1.0)
    stop = asyncio.Event()
    task = asyncio.create_task(sink.run(stop))
    await wait_rows(clickhouse, user, 50)
    for _ in range(50):
        if sink.duplicates_dropped >= 50:
            break
        await asyncio.sleep(0.1)
    stop.set()
    await task
    count, unique, total = await rows_for(clickhouse, user)
    assert (count, unique) == (50, 50)
    assert total == Decimal(sum(r["cost_usd_nanos"] for r in estimates)) / Decimal(10**9)


async def test_a_restarted_sink_drops_an_estimate_stamped_at_its_calls_start(
    kafka_settings: Settings, clickhouse: Any
) -> None:
    """The settler's estimate carries the request's time, the real usage the answer's, up to
    max_call_duration_s later. A sink restarted between the two found no row within a
    second of the estimate's time and stored both (session 12's newcomer probe)."""
    await ensure_topics(kafka_settings)
    migrate(clickhouse)
    user = f"late-estimate-{uuid.uuid4().hex[:8]}"
    reals = [usage_record(user, i) for i in range(20)]
    await produce(kafka_settings, reals)
    await sink_until_stored(kafka_settings, clickhouse, user, 20)

    call_s = kafka_settings.max_call_duration_s - 1
    estimates = [
        dict(r, ts=r["ts"] - timedelta(seconds=call_s), cost_usd_nanos=r["cost_usd_nanos"] * 3)
        for r in reals
    ]
    await produce(kafka_settings, estimates)
    await sink_until_seen(kafka_settings, clickhouse, 20)
    count, unique, total = await rows_for(clickhouse, user)
    assert (count, unique) == (20, 20)
    assert total == Decimal(sum(r["cost_usd_nanos"] for r in reals)) / Decimal(10**9)


async def test_events_stored_without_their_rollups_get_them_when_seen_again(
    kafka_settings: Settings, clickhouse: Any
) -> None:
    """A sink killed between the insert into usage_events and the inserts into its rollups
    (materialized views, filled after the raw table) left the reports short: the restarted
    sink found the events stored and dropped them (session 12's probe: 592 of 605 in the
    rollups). Here the views are detached while the first sink inserts: the raw rows land,
    the rollup rows do not, as after such a kill; then the events come again."""
    await ensure_topics(kafka_settings)
    migrate(clickhouse)
    user = f"rollups-{uuid.uuid4().hex[:8]}"
    records = [usage_record(user, i) for i in range(40)]
    for i, record in enumerate(records):  # across an hour boundary
        record["ts"] = record["ts"].replace(minute=59, second=30) + timedelta(seconds=2 * i)
    views = [r.view for r in fed_by("usage_events") if r.source == "usage_events"]

    async def rollup_of(table: str) -> tuple[int, Decimal]:
        result = await asyncio.to_thread(
            clickhouse.query,
            f"SELECT sum(requests), sum(cost_usd) FROM {table} FINAL WHERE user_id = %(u)s",
            parameters={"u": user},
        )
        requests, cost = result.result_rows[0]
        return int(requests or 0), Decimal(cost or 0)

    await produce(kafka_settings, records)
    for view in views:
        await asyncio.to_thread(clickhouse.command, f"DETACH TABLE {view}")
    try:
        await sink_until_stored(kafka_settings, clickhouse, user, 40)
    finally:
        for view in views:
            await asyncio.to_thread(clickhouse.command, f"ATTACH TABLE {view}")
    _, _, raw_cost = await rows_for(clickhouse, user)
    assert await rollup_of("usage_user_minute") == (0, Decimal(0))  # the cut-off state

    await produce(kafka_settings, records)  # seen again (here re-sent; after a kill: re-read)
    second = await sink_until_seen(kafka_settings, clickhouse, 40)
    assert (await rows_for(clickhouse, user))[:2] == (40, 40)
    assert second.rollup_hours_rebuilt >= 2
    assert second.rollup_hours_checked == second.rollup_hours_rebuilt
    for table in ("usage_user_minute", "usage_user_hour"):
        assert await rollup_of(table) == (40, raw_cost), table


@pytest.mark.parametrize("age", [timedelta(hours=2), timedelta(days=10)], ids=["recent", "old"])
async def test_events_seen_again_in_many_batches_rebuild_their_hour_once(
    kafka_settings: Settings, clickhouse: Any, age: timedelta
) -> None:
    """A restarted sink re-reads every batch it had not committed, and a dispatcher re-sends
    its outbox: many batches of one hour's duplicates. Rebuilding the hour's rollups once
    repairs them; doing it again for every batch cost 0.4 s per rollup per batch (a DELETE
    each) and held the sink at 1,800 events/s (bench.warehouse --quick, at 1M rows). So an
    hour is checked once, and rebuilt only when its rollups are short.

    ``old``: usage_user_minute keeps 3 days (its TTL), so an older hour cannot be checked
    against it; every check found it short and rebuilt the hour, writing rows the TTL
    drops. Such an hour (a replay of last month re-sent) is checked on the other rollups."""
    await ensure_topics(kafka_settings)
    migrate(clickhouse)
    user = f"once-{uuid.uuid4().hex[:8]}"
    hour = event_time().replace(minute=0, second=0, microsecond=0) - age
    records = [usage_record(user, i) for i in range(300)]
    for i, record in enumerate(records):
        record["ts"] = hour + timedelta(minutes=5, milliseconds=100 * i)
    await produce(kafka_settings, records)
    await sink_until_stored(kafka_settings, clickhouse, user, 300)

    await produce(kafka_settings, records)  # re-sent: 3 batches of 100 for the next sink
    second = await sink_until_seen(kafka_settings, clickhouse, 300)
    assert (second.inserted, second.duplicates_dropped) == (0, 300)
    assert second.rollup_hours_checked == 1
    assert second.rollup_hours_rebuilt == 0  # the first sink filled them: nothing to repair
    result = await asyncio.to_thread(
        clickhouse.query,
        "SELECT sum(requests) FROM usage_user_hour FINAL WHERE user_id = %(u)s",
        parameters={"u": user},
    )
    assert result.result_rows[0][0] == 300


async def test_a_removed_cap_tombstone_is_not_dead_lettered(
    kafka_settings: Settings, clickhouse: Any
) -> None:
    """A decision key is removed from the compacted topic with a tombstone (no value): that
    is Kafka's protocol, not a broken event."""
    await ensure_topics(kafka_settings)
    migrate(clickhouse)
    producer = AIOKafkaProducer(bootstrap_servers=kafka_settings.kafka_bootstrap, acks="all")
    await producer.start()
    try:
        await producer.send_and_wait(
            kafka_settings.topic("budget.decisions"), None, key=b"user:gone"
        )
    finally:
        await producer.stop()
    await produce(kafka_settings, [usage_record("after-tombstone", 0)])
    sink = ClickHouseSink(kafka_settings, clickhouse, batch_size=100, batch_wait_s=0.3)
    stop = asyncio.Event()
    task = asyncio.create_task(sink.run(stop))
    await wait_rows(clickhouse, "after-tombstone", 1)
    stop.set()
    await task
    assert sink.dead_lettered == 0
    assert await read_events_raw(kafka_settings, "deadletter") == []


async def test_explored_calls_reach_the_warehouse(
    kafka_settings: Settings, clickhouse: Any
) -> None:
    """Usage v4's ``explored`` (a call sent to economy by exploration) lands in its column;
    rows written before it read false."""
    await ensure_topics(kafka_settings)
    migrate(clickhouse)
    user = f"explored-{uuid.uuid4().hex[:8]}"
    records = [usage_record(user, i) for i in range(4)]
    for i, record in enumerate(records):
        record["explored"] = i % 2 == 1
    await produce(kafka_settings, records)
    sink = ClickHouseSink(kafka_settings, clickhouse, batch_size=10, batch_wait_s=0.2)
    stop = asyncio.Event()
    task = asyncio.create_task(sink.run(stop))
    await wait_rows(clickhouse, user, 4)
    stop.set()
    await task
    rows = clickhouse.query(
        "SELECT event_id, explored FROM usage_events WHERE user_id = %(u)s",
        parameters={"u": user},
    ).result_rows
    assert dict(rows) == {r["event_id"]: r["explored"] for r in records}
