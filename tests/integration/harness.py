"""Run the simulator and a dispatcher in a background event loop, and read events back."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any

from aiohttp import web
from aiokafka import AIOKafkaConsumer

from app.codec import EventCodec
from app.server import serve
from app.settings import Settings, UpstreamConfig
from app.simulator import SimulatorConfig, create_app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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


async def start_simulator(port: int, config: SimulatorConfig | None = None) -> web.AppRunner:
    runner = web.AppRunner(create_app(config or SimulatorConfig(latency_scale=0)), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner


class Stack:
    """Simulator + dispatcher for one test, with settings pointing at the test broker."""

    def __init__(self, settings: Settings, **overrides: Any) -> None:
        self.sim_port = free_port()
        self.port = free_port()
        upstreams = overrides.pop(
            "upstreams",
            (
                UpstreamConfig(
                    name="sim",
                    base_url=f"http://127.0.0.1:{self.sim_port}/v1",
                    models=("gpt-4", "gpt-4o", "gpt-4o-mini", "tollgate-sim-unpriced"),
                    forward_headers=("X-Sim-*",),
                ),
            ),
        )
        self.settings = Settings(
            **{
                **settings.model_dump(),
                "dispatcher_port": self.port,
                "upstreams": upstreams,
                **overrides,
            }
        )
        self.url = f"http://127.0.0.1:{self.port}"
        self.loop = BackgroundLoop()
        self._sim: web.AppRunner | None = None
        self._server: asyncio.Future[Any] | None = None

    def start(self, simulator: bool = True) -> None:
        if simulator:
            self._sim = self.loop.run(start_simulator(self.sim_port))
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


async def read_events(
    settings: Settings, suffix: str, *, at_least: int, timeout_s: float = 30, settle_s: float = 1.0
) -> list[dict[str, Any]]:
    """Decode every event on a topic from the start: wait for ``at_least``, then ``settle_s`` more."""
    codec = EventCodec()
    consumer = AIOKafkaConsumer(
        settings.topic(suffix),
        bootstrap_servers=settings.kafka_bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    records: list[dict[str, Any]] = []
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        settle_until: float | None = None
        while loop.time() < deadline:
            if len(records) >= at_least and settle_until is None:
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
