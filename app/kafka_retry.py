"""Waiting out a Kafka outage: the one retry loop the long-running agents share.

Owns what an agent does when Kafka is unreachable at start-up or goes away: log,
back off, try again, and give up only when asked to stop. It does not decide
what an agent does with Kafka.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from aiokafka.errors import KafkaConnectionError

log = logging.getLogger(__name__)

BACKOFF_S = (0.5, 1.0, 2.0, 5.0, 10.0)


async def retry_while_kafka_down(
    run: Callable[[], Awaitable[None]], what: str, stop: asyncio.Event | None = None
) -> None:
    """Await ``run()`` until it returns; while Kafka is unreachable, back off and call it again.

    Returns without another try once ``stop`` is set.
    """
    attempt = 0
    while stop is None or not stop.is_set():
        try:
            await run()
            return
        except KafkaConnectionError as exc:
            delay = BACKOFF_S[min(attempt, len(BACKOFF_S) - 1)]
            log.warning(
                f"Kafka unreachable; {what} retrying",
                extra={"error": str(exc), "retry_in_s": delay},
            )
            attempt += 1
            if stop is None:
                await asyncio.sleep(delay)
            else:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
