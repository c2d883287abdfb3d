"""Tollgate's retry policies (``app/retry.py``): the rules every retrying loop relies on.

Waits are read from what tenacity hands ``before_sleep`` (``upcoming_sleep``) or computed
from hand-built retry states, never timed.
"""

from __future__ import annotations

import asyncio
import random

import pytest
from tenacity import RetryCallState, retry_if_exception

from app.retry import (
    AsyncRetrying,
    retry_attempts,
    retry_until_stopped,
    wait_capped_exponential,
    wait_retry_after,
    wait_steps,
)


class Outage(Exception):
    pass


class Refused(Exception):
    """A failure that says how long to wait, as a webhook's Retry-After does."""

    def __init__(self, retry_after_s: float | None) -> None:
        super().__init__(f"retry after {retry_after_s}")
        self.retry_after_s = retry_after_s


def state(attempt: int, ran_until: float, idle_for: float) -> RetryCallState:
    """A retry state after failed try ``attempt``: ``ran_until`` seconds since the first
    try began, ``idle_for`` of them spent waiting between tries."""
    rs = RetryCallState(AsyncRetrying(), fn=None, args=(), kwargs={})
    rs.start_time = 1000.0
    rs.attempt_number = attempt
    rs.outcome_timestamp = 1000.0 + ran_until
    rs.idle_for = idle_for
    return rs


def test_steps_climb_and_the_last_one_repeats() -> None:
    wait = wait_steps((1.0, 2.0, 5.0))
    assert [wait(state(n, 0.0, 0.0)) for n in range(1, 6)] == [1.0, 2.0, 5.0, 5.0, 5.0]


def test_a_try_that_ran_stable_run_s_starts_the_steps_over() -> None:
    """Tries of 0.1 s, 0.1 s, then one of 60 s (up for a while, then Kafka went away),
    then short ones again: the waits climb, start over, and climb again."""
    wait = wait_steps((1.0, 2.0, 5.0), stable_run_s=60.0)
    waits = [
        wait(state(1, 0.1, 0.0)),  # failed after 0.1 s
        wait(state(2, 1.2, 1.0)),  # waited 1, ran 0.1
        wait(state(3, 63.2, 3.0)),  # waited 2, ran 60: a stable run
        wait(state(4, 64.3, 4.0)),  # waited 1, ran 0.1
        wait(state(5, 66.4, 6.0)),  # waited 2, ran 0.1
    ]
    assert waits == [1.0, 2.0, 1.0, 2.0, 5.0]
    # Just under the bar is not stable; a fresh loop (attempt 1) starts from scratch.
    assert wait(state(1, 59.9, 0.0)) == 1.0 and wait(state(2, 60.0, 1.0)) == 2.0


def test_capped_exponential_with_jitter_stays_under_its_ceiling_and_spreads() -> None:
    wait = wait_capped_exponential(base_s=1.0, max_s=8.0, jitter=0.5, rng=random.Random(3))
    ceilings = [1, 2, 4, 8, 8, 8, 8]
    waits = [wait.seconds(n) for n in range(1, 8)]
    assert all(c / 2 <= w <= c for w, c in zip(waits, ceilings, strict=True))
    assert len({round(w, 9) for w in waits[3:]}) == 4, "capped waits still differ"
    assert wait_capped_exponential(1.0, 8.0, jitter=0.0).seconds(10) == 8.0
    with pytest.raises(ValueError, match="jitter"):
        wait_capped_exponential(1.0, 8.0, jitter=1.5)


async def test_retry_after_lengthens_the_wait_and_is_capped() -> None:
    """Asked for 3 s: waits 3 s (more than the backoff's 0.1); asked for an hour: waits
    the cap; asked for nothing, or less than the backoff: the backoff applies."""
    asked = [3.0, 3600.0, None, 0.0]
    waits: list[float] = []
    tries = 0

    async def post() -> str:
        nonlocal tries
        tries += 1
        if asked:
            raise Refused(asked.pop(0))
        return "delivered"

    retrying = retry_attempts(
        attempts=10,
        wait=wait_retry_after(wait_capped_exponential(0.1, 10.0, jitter=0.0), max_s=10.0),
        retry=retry_if_exception(lambda exc: isinstance(exc, Refused)),
        before_sleep=lambda rs: waits.append(rs.upcoming_sleep),
    )
    retrying = retrying.copy(sleep=_no_sleep)  # the waits handed over are what we check
    assert await retrying(post) == "delivered"
    assert tries == 5
    assert waits == [3.0, 10.0, 0.4, 0.8]


async def test_the_last_attempt_raises_its_own_failure() -> None:
    tries = 0

    async def post() -> None:
        nonlocal tries
        tries += 1
        raise Refused(None)

    retrying = retry_attempts(
        attempts=3,
        wait=wait_capped_exponential(0.0, 0.0),
        retry=retry_if_exception(lambda exc: isinstance(exc, Refused)),
    )
    with pytest.raises(Refused):
        await retrying(post)
    assert tries == 3


async def test_a_failure_the_caller_does_not_retry_propagates_at_once() -> None:
    slept: list[float] = []
    tries = 0

    async def run() -> None:
        nonlocal tries
        tries += 1
        raise ValueError("a bug, not an outage")

    retrying = retry_until_stopped(
        steps=(0.0,),
        retry=retry_if_exception(lambda exc: isinstance(exc, Outage)),
        before_sleep=lambda rs: slept.append(rs.upcoming_sleep),
    )
    with pytest.raises(ValueError, match="a bug"):
        await retrying(run)
    assert tries == 1 and slept == []


async def test_cancellation_is_never_retried() -> None:
    tries = 0

    async def run() -> None:
        nonlocal tries
        tries += 1
        raise asyncio.CancelledError

    with pytest.raises(asyncio.CancelledError):
        await retry_until_stopped(steps=(0.0,))(run)
    assert tries == 1


async def test_an_outage_is_retried_until_it_passes() -> None:
    tries = 0

    async def run() -> str:
        nonlocal tries
        tries += 1
        if tries < 20:
            raise Outage
        return "up"

    assert await retry_until_stopped(steps=(0.0,))(run) == "up"
    assert tries == 20


@pytest.mark.parametrize("when_stopped", ["return", "raise"])
async def test_setting_the_stop_event_ends_a_long_wait_and_the_retries(
    when_stopped: str,
) -> None:
    """The step is an hour: only the event can end the wait. Stopped, the loop returns
    None, or raises the last failure (the sink must not commit a batch it did not insert)."""
    stop = asyncio.Event()
    failed = asyncio.Event()
    tries = 0

    async def run() -> None:
        nonlocal tries
        tries += 1
        failed.set()
        raise Outage("still down")

    retrying = retry_until_stopped(
        steps=(3600.0,),
        stop=stop,
        when_stopped=when_stopped,  # type: ignore[arg-type]
    )
    task = asyncio.create_task(retrying(run))
    await failed.wait()
    stop.set()
    if when_stopped == "raise":
        with pytest.raises(Outage):
            await asyncio.wait_for(task, 30)
    else:
        assert await asyncio.wait_for(task, 30) is None
    # The wait ended, one more try ran (skipping it is the caller's: kafka_retry's run
    # and the spool drain check the stop first), failed, and the stop ended the loop.
    assert tries == 2


async def test_a_stop_callable_is_checked_after_each_failure() -> None:
    stopping = False
    tries = 0

    async def run() -> None:
        nonlocal tries, stopping
        tries += 1
        stopping = tries == 3
        raise Outage

    assert await retry_until_stopped(steps=(0.0,), stop=lambda: stopping)(run) is None
    assert tries == 3


async def _no_sleep(seconds: float) -> None:
    return None
