"""Waiting out Kafka trouble: the retry rule the long-running agents share.

Owns what an agent does when Kafka is unreachable at start-up, goes away, or when
the agent loses its consumer group (a stall longer than the session timeout, e.g.
a ``SIGSTOP``, a long GC pause or a frozen VM; a broker restart): log, back off,
run again (a new consumer that rejoins its group), and give up only when asked to
stop. Here live which failures are waited out (``is_transient``) and the steps
(``BACKOFF_S``, started over after a run of ``STABLE_RUN_S``); the retrying itself is
``app.retry.retry_until_stopped`` (tenacity). It does not decide what an agent does
with Kafka; an agent whose run commits offsets only after its work is done loses
nothing by being run again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from aiokafka.errors import (
    CommitFailedError,
    IllegalGenerationError,
    KafkaError,
    KafkaTimeoutError,
    RebalanceInProgressError,
    UnknownMemberIdError,
)
from tenacity import retry_if_exception

from app.retry import log_before_retry, retry_until_stopped

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
    back off along ``BACKOFF_S`` (from the first step again after a run that lasted
    ``STABLE_RUN_S``) and call it again. Any other exception propagates.

    Returns without another try once ``stop`` is set; setting it also ends a wait.
    """

    async def run_unless_stopped() -> None:
        if stop is None or not stop.is_set():
            await run()

    retrying = retry_until_stopped(
        steps=BACKOFF_S,
        stop=stop,
        retry=retry_if_exception(is_transient),
        stable_run_s=STABLE_RUN_S,
        before_sleep=log_before_retry(
            log, f"Kafka unreachable or group session lost; {what} starting again"
        ),
    )
    await retrying(run_unless_stopped)
