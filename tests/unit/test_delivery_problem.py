"""/readyz says why events are not delivered, whether or not a send has failed yet."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

from app.events.codec import EventCodec
from app.events.producer import EventEmitter
from app.settings import Settings
from tests.samples import example_event


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_an_emitter_that_cannot_reach_kafka_says_why(tmp_path: Path) -> None:
    settings = Settings(state_dir=tmp_path, kafka_bootstrap=f"127.0.0.1:{closed_port()}")

    async def scenario() -> tuple[str | None, str | None]:
        emitter = EventEmitter(settings, EventCodec())
        before = emitter.delivery_problem  # not started: not connected
        await emitter.start()
        try:
            emitter.emit("Usage", "usage", "alice", example_event("Usage", 1))
            for _ in range(200):
                if emitter.delivery_problem and emitter.depth:
                    break
                await asyncio.sleep(0.05)
            return before, emitter.delivery_problem
        finally:
            await emitter.stop(shutdown_timeout_s=0.5)

    before, after = asyncio.run(scenario())
    assert before == "not connected to Kafka yet"
    assert after, "a spool that cannot be delivered has a reason"
