"""``tollgate worker`` with a slow changelog: each table write waits before it is sent.

The condition behind spend lost after a worker crash (issue 10, observation 4): Faust's
producer buffer gives up flushing after 0.1 s and commits the consumer offsets anyway, so
offsets can be committed for events whose table writes are still in memory (a busy event
loop or a slow broker). Delaying every changelog message makes that condition certain
instead of occasional. Run as a process by
the crash tests (``python -m tests.integration.faulty_worker``), then SIGKILLed; never by the
product. It patches a private Faust method on purpose: if Faust changes it, the test fails
loudly here (AttributeError), which is the signal to re-check the guarantee.
"""

from __future__ import annotations

import asyncio
from typing import Any

from faust.transport.producer import ProducerBuffer

from agents.spend import run_worker
from app.settings import Settings

_send_pending = ProducerBuffer._send_pending


async def _hold_changelog(self: ProducerBuffer, fut: Any) -> None:
    if fut.message.channel.get_topic_name().endswith("-changelog"):
        await asyncio.sleep(0.2)  # a producer that lags behind the stream
    await _send_pending(self, fut)


ProducerBuffer._send_pending = _hold_changelog  # type: ignore[method-assign]

if __name__ == "__main__":
    run_worker(Settings())
