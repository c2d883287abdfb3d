"""Run the simulator and a dispatcher in a background event loop, and read events back."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
from aiohttp import web
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from agents.sink import ClickHouseSink
from app.budgets.admin import policy_record
from app.budgets.policy import parse_policy
from app.events.codec import EventCodec
from app.events.compacted import CompactedView
from app.http.reports_api import create_reports_app
from app.http.server import serve
from app.metering.usage import new_id
from app.settings import Settings, UpstreamConfig
from app.warehouse.clickhouse import ReconnectingClient
from devtools.simulator import SimulatorConfig, create_app
from tests.ports import free_port

_EPOCH = datetime(1995, 1, 1, tzinfo=UTC)
_DAYS = 10_000  # up to 2022-05: clear of the fixed-date fixtures (2024, 2026) and of today
_taken: list[tuple[int, int]] = []


def private_day(before: int = 1, after: int = 2) -> datetime:
    """A past UTC midnight no other test of this run writes near.

    The tests share one warehouse and check totals over a window, so two tests on the same
    day would read each other's rows (a random day per test collided: 530 requests for 30).
    The days [day - before, day + after) are reserved for the caller.
    """
    while True:
        start = random.randrange(before, _DAYS - after)
        span = (start - before, start + after)
        if all(span[1] <= lo or hi <= span[0] for lo, hi in _taken):
            _taken.append(span)
            return _EPOCH + timedelta(days=start)


class BackgroundLoop:
    """An asyncio loop in a thread, so sync clients (openai.OpenAI) can call servers in it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Any, timeout: float = 60) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


class CallCounter:
    """Counts chat completions that reached the simulator (i.e. the provider was billed)."""

    def __init__(self) -> None:
        self.calls = 0

    @web.middleware
    async def middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path.endswith("/chat/completions"):
            self.calls += 1
        return await handler(request)  # type: ignore[no-any-return]


async def start_simulator(
    port: int, config: SimulatorConfig | None = None, counter: CallCounter | None = None
) -> web.AppRunner:
    app = create_app(config or SimulatorConfig(latency_scale=0))
    if counter is not None:
        app.middlewares.append(counter.middleware)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner


class Stack:
    """Simulator + dispatcher for one test, with settings pointing at the test broker."""

    def __init__(self, settings: Settings, **overrides: Any) -> None:
        self.sim_port = free_port()
        self.port = free_port()
        counter = overrides.pop("prompt_counter", "simulator")  # as the bundled default says
        upstreams = overrides.pop(
            "upstreams",
            (
                UpstreamConfig(
                    name="sim",
                    base_url=f"http://127.0.0.1:{self.sim_port}/v1",
                    models=("gpt-4", "gpt-4o", "gpt-4o-mini", "tollgate-sim-unpriced"),
                    forward_headers=("X-Sim-*",),
                    prompt_counter=counter,
                ),
            ),
        )
        self.settings = Settings(
            **{
                **settings.model_dump(),
                "dispatcher_port": self.port,
                "state_dir": settings.state_dir / f"dispatcher-{self.port}",  # its own spool
                "upstreams": upstreams,
                **overrides,
            }
        )
        self.url = f"http://127.0.0.1:{self.port}"
        self.counter = CallCounter()
        self.loop = BackgroundLoop()
        self._sim: web.AppRunner | None = None
        self._server: asyncio.Future[Any] | None = None

    def start(self, simulator: bool = True) -> None:
        if simulator:
            self._sim = self.loop.run(start_simulator(self.sim_port, counter=self.counter))
        ready = asyncio.Event()

        async def launch() -> None:
            self._server = asyncio.ensure_future(serve(self.settings, ready))
            await asyncio.wait_for(ready.wait(), 30)

        self.loop.run(launch())

    def stop(self) -> None:
        async def shutdown() -> None:
            if self._server is not None:
                self._server.cancel()
                with suppress(asyncio.CancelledError):
                    await self._server
            if self._sim is not None:
                await self._sim.cleanup()

        self.loop.run(shutdown())
        self.loop.close()


@contextmanager
def running_stack(settings: Settings, **overrides: Any) -> Iterator[Stack]:
    stack = Stack(settings, **overrides)
    stack.start()
    try:
        yield stack
    finally:
        stack.stop()


async def consumer_from_the_start(settings: Settings, suffix: str) -> AIOKafkaConsumer:
    """A started consumer of one topic that reads it from the start and commits nothing."""
    consumer = AIOKafkaConsumer(
        settings.topic(suffix),
        bootstrap_servers=settings.kafka_bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    return consumer


async def read_events(
    settings: Settings,
    suffix: str,
    *,
    at_least: int,
    timeout_s: float = 30,
    settle_s: float = 1.0,
    until: Callable[[list[dict[str, Any]]], bool] | None = None,
) -> list[dict[str, Any]]:
    """Decode every event on a topic from the start: wait for ``at_least`` (and for ``until``
    of the records read to hold, when given: what the test needs, not a guess of how long it
    takes to arrive), then ``settle_s`` more."""
    codec = EventCodec()
    consumer = await consumer_from_the_start(settings, suffix)
    records: list[dict[str, Any]] = []
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        settle_until: float | None = None
        while loop.time() < deadline:
            enough = len(records) >= at_least and (until is None or until(records))
            if enough and settle_until is None:
                settle_until = loop.time() + settle_s
            if settle_until is not None and loop.time() >= settle_until:
                break
            batch = await consumer.getmany(timeout_ms=200)
            for messages in batch.values():
                for m in messages:
                    records.append(
                        codec.decode(
                            m.value, topic=m.topic, partition=m.partition, offset=m.offset
                        ).record
                    )
    finally:
        await consumer.stop()
    return records


async def raw_messages(settings: Settings, suffix: str, at_least: int) -> list[Any]:
    """Every message of a topic from the start, undecoded (key and partition included)."""
    consumer = await consumer_from_the_start(settings, suffix)
    messages: list[Any] = []
    try:
        async with asyncio.timeout(60):
            while len(messages) < at_least:
                for batch in (await consumer.getmany(timeout_ms=200)).values():
                    messages.extend(batch)
    finally:
        await consumer.stop()
    return messages


async def send_request_copies(
    settings: Settings,
    template: Any,
    count: int,
    *,
    boot_shift_s: float = 0.0,
    resend: Sequence[Any] = (),
) -> list[str]:
    """Send ``resend`` (messages) again as they are, then ``count`` copies of the accepted
    Request ``template`` under new request ids, never answered, with its dispatcher and its
    boot moved by ``boot_shift_s``; returns the copies' request ids."""
    codec = EventCodec()
    ids = []
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all")
    await producer.start()
    try:
        for m in resend:
            await producer.send(m.topic, m.value, key=m.key, partition=m.partition)
        for _ in range(count):
            record = dict(codec.decode(template.value).record)
            record.update(event_id=new_id(), request_id=new_id("req_"))
            record["boot_ts"] = record["boot_ts"] + timedelta(seconds=boot_shift_s)
            ids.append(record["request_id"])
            await producer.send(
                template.topic,
                codec.encode("Request", record),
                key=template.key,
                partition=template.partition,
            )
        await producer.flush()
    finally:
        await producer.stop()
    return ids


class WorkerProcess:
    """``tollgate worker`` as a real process (so it can be SIGKILLed), on the test's topics."""

    def __init__(
        self,
        settings: Settings,
        log_path: Path,
        argv: tuple[str, ...] = ("-m", "app", "worker"),
        **env: str,
    ) -> None:
        self.settings = settings
        self.log_path = log_path
        self.argv = argv
        self.env = {
            **os.environ,
            "TOLLGATE_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
            "TOLLGATE_TOPIC_PREFIX": settings.topic_prefix,
            "TOLLGATE_TOPIC_PARTITIONS": str(settings.topic_partitions),
            "TOLLGATE_STATE_DIR": str(settings.state_dir),
            **env,
        }
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, *self.argv],
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=self.log_path.open("ab"),
            start_new_session=True,
        )

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()


async def latest_decisions(settings: Settings, timeout_s: float = 10) -> dict[str, dict[str, Any]]:
    """The compacted view of budget decisions right now."""
    view = CompactedView(settings, settings.topic("budget.decisions"), EventCodec())
    await view.start(timeout_s)
    await view.stop()
    return dict(view.records)


async def publish_policy(settings: Settings, scope: str, body: dict[str, Any]) -> None:
    policy = parse_policy(scope, body)
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all")
    await producer.start()
    try:
        await producer.send_and_wait(
            settings.topic("budget.policies"),
            EventCodec().encode("BudgetPolicy", policy_record(policy, "test")),
            key=scope.encode(),
        )
    finally:
        await producer.stop()


def wait_for_decision(
    settings: Settings, scope: str, check: Any = lambda d: True, timeout_s: float = 60
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        decision = asyncio.run(latest_decisions(settings)).get(scope)
        if decision is not None and check(decision):
            return decision
        time.sleep(0.5)
    raise AssertionError(f"no matching decision for {scope} within {timeout_s}s")


def wait_worker_ready(settings: Settings, timeout_s: float = 90, now: Any = None) -> None:
    """Prove the worker consumes: a probe user with a policy must get a decision.

    ``now``: a function giving the worker's (fake) time when it runs with TOLLGATE_CLOCK_START.
    """
    from app.metering.usage import UsageProducer

    async def probe() -> None:
        await publish_policy(settings, "user:__probe__", {"period": "day", "limit_usd": 1})
        producer = UsageProducer(settings)
        await producer.start()
        try:
            await producer.report(
                model="gpt-4o-mini",
                prompt_tokens=1,
                completion_tokens=1,
                user_id="__probe__",
                ts=now() if callable(now) else now,
            )
        finally:
            await producer.stop()

    asyncio.run(probe())
    wait_for_decision(settings, "user:__probe__", timeout_s=timeout_s)


@asynccontextmanager
async def sink_running(settings: Settings, clickhouse: Any) -> AsyncIterator[ReconnectingClient]:
    """A ClickHouse sink storing the topics of ``settings`` in ``clickhouse`` for the block;
    yields the warehouse client it writes through."""
    client = ReconnectingClient(lambda: clickhouse)
    sink = ClickHouseSink(settings, client, batch_wait_s=0.3)
    stop = asyncio.Event()
    task = asyncio.create_task(sink.run(stop))
    try:
        yield client
    finally:
        stop.set()
        await task


@dataclass
class ReportsServer:
    """The reports server of ``serving_reports``: its port and an HTTP client of it."""

    port: int
    http: httpx.AsyncClient
    window: dict[str, str]

    async def get(self, name: str, **params: Any) -> Any:
        """``/v1/reports/<name>`` over the window (and ``params``): its JSON, answered 200."""
        response = await self.http.get(f"/v1/reports/{name}", params={**self.window, **params})
        assert response.status_code == 200, response.text
        return response.json()


@asynccontextmanager
async def serving_reports(
    settings: Settings,
    clickhouse: Any,
    window: dict[str, str] | None = None,
    **app_options: Any,
) -> AsyncIterator[ReportsServer]:
    """Kafka -> sink -> chdb -> reports server, for the block: the sink running (as
    ``sink_running``) and the reports app (``create_reports_app(client, **app_options)``)
    listening on a free port."""
    async with sink_running(settings, clickhouse) as client:
        port = free_port()
        runner = web.AppRunner(create_reports_app(client, **app_options))
        await runner.setup()
        try:
            await web.TCPSite(runner, "127.0.0.1", port).start()
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
                yield ReportsServer(port, http, window or {})
        finally:
            await runner.cleanup()


def same_partition_user(settings: Settings, user: str, prefix: str) -> str:
    """The first ``<prefix>-<i>`` whose usage goes to the partition of ``user``'s (as the
    dispatcher keys events): once a record of it is read, every earlier one of ``user``'s is."""
    from agents.spend import partition_for  # faust, only for the tests that need it

    n = settings.topic_partitions
    return next(
        f"{prefix}-{i}"
        for i in range(1000)
        if partition_for(f"{prefix}-{i}", n) == partition_for(user, n)
    )


@contextmanager
def frozen_kafka(kafka_launcher: Any) -> Iterator[Callable[[], None]]:
    """The session broker stopped (SIGSTOP) for the block: it accepts TCP and never answers.
    Yields ``thaw`` (SIGCONT), for a test to let Kafka answer before its stack stops; the
    broker is thawed at the end in any case."""
    pid = kafka_launcher.status().pid
    assert pid is not None, "the session broker is not running"

    def thaw() -> None:
        os.kill(pid, signal.SIGCONT)

    os.kill(pid, signal.SIGSTOP)
    try:
        yield thaw
    finally:
        thaw()


def wait_until(
    check: Callable[[], bool], failure: str | Callable[[], str], deadline: float
) -> None:
    """Poll ``check`` every 0.2 s until it holds; past ``deadline`` (``time.monotonic()``)
    fail with ``failure`` (a callable: the message made at the failure)."""
    while not check():
        assert time.monotonic() < deadline, failure() if callable(failure) else failure
        time.sleep(0.2)
