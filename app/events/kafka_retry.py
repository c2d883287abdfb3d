"""Waiting out Kafka trouble: the one retry loop the long-running agents share.

Owns what an agent does when Kafka is unreachable at start-up, goes away, or when
the agent loses its consumer group (a stall longer than the session timeout, e.g.
a ``SIGSTOP``, a long GC pause or a frozen VM; a broker restart): log, back off,
run again (a new consumer that rejoins its group), and give up only when asked to
stop. It does not decide what an agent does with Kafka; an agent whose run
commits offsets only after its work is done loses nothing by being run again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

from aiokafka.errors import (
    CommitFailedError,
    IllegalGenerationError,
    KafkaError,
    KafkaTimeoutError,
    RebalanceInProgressError,
    UnknownMemberIdError,
)

log = logging.getLogger(__name__)

BACKOFF_S = (0.5, 1.0, 2.0, 5.0, 10.0)
STABLE_RUN_S = 60.0  # a run that lasted this long starts the backoff over

# Not "retriable" in aiokafka's sense (the same request would fail again), but the
# whole run is: a new consumer rejoins the group and resumes from the committed offsets.
LOST_SESSION = (
    CommitFailedError,
    UnknownMemberIdError,
    IllegalGenerationError,
    RebalanceInProgressError,
    KafkaTimeoutError,
)


def is_transient(exc: BaseException) -> bool:
    """Kafka unreachable, or this member's session lost: run again rather than exit."""
    if isinstance(exc, LOST_SESSION):
        return True
    return isinstance(exc, KafkaError) and bool(getattr(exc, "retriable", False))


async def retry_while_kafka_down(
    run: Callable[[], Awaitable[None]], what: str, stop: asyncio.Event | None = None
) -> None:
    """Await ``run()`` until it returns; after a transient Kafka failure (``is_transient``),
    back off and call it again. Any other exception propagates.

    Returns without another try once ``stop`` is set.
    """
    attempt = 0
    while stop is None or not stop.is_set():
        started = time.monotonic()
        try:
            await run()
            return
        except KafkaError as exc:
            if not is_transient(exc):
                raise
            if time.monotonic() - started >= STABLE_RUN_S:
                attempt = 0
            delay = BACKOFF_S[min(attempt, len(BACKOFF_S) - 1)]
            log.warning(
                f"Kafka unreachable or group session lost; {what} starting again",
                extra={"error": f"{type(exc).__name__}: {exc}"[:500], "retry_in_s": delay},
            )
            attempt += 1
            if stop is None:
                await asyncio.sleep(delay)
            else:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
