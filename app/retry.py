"""Retrying: how long Tollgate waits between tries, when it stops, and what it logs.

Owns Tollgate's two retry policies, built on ``tenacity`` so that a loop that
retries is one ``AsyncRetrying`` rather than a hand-written ``while`` with a counter:

- ``retry_until_stopped``: a dependency that is down (Kafka, ClickHouse) is retried
  for as long as it takes, along fixed steps (``wait_steps``, the last one repeated),
  until the caller is stopped (an ``asyncio.Event``, which also cuts a wait short, or
  any ``() -> bool``). Optionally a try that ran ``stable_run_s`` before it failed
  starts the steps over. Used by ``app/events/kafka_retry.py`` (the agents' Kafka
  runs), ``app/events/producer.py`` (the spool drain), ``agents/sink.py`` (ClickHouse
  inserts), ``agents/spend.py`` (changelog writes) and ``app/events/compacted.py`` (the
  compacted views and the state-topic follower, one 1 s step for ever).
- ``retry_attempts``: a bounded number of attempts with capped exponential backoff and
  jitter (``wait_capped_exponential``), lengthened to what the other side asks for in
  an exception's ``retry_after_s`` (``wait_retry_after``, e.g. an HTTP ``Retry-After``)
  up to a cap. Used by the notifier's webhook delivery (``agents/notifier.py``) and the
  spend worker's reads of its group's committed offsets.

It does not own what is worth retrying (each caller passes its own predicate: Kafka's
``is_transient``, any insert failure, a webhook's 429 or 5xx), nor the clean-up a failed
try leaves (a caller's ``before_sleep`` does that, and logs; ``log_before_retry`` is the
plain warning). It imports nothing from Tollgate, so every floor may use it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Literal

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, stop_after_attempt
from tenacity.retry import retry_base
from tenacity.stop import stop_base
from tenacity.wait import wait_base

BeforeSleep = Callable[[RetryCallState], Awaitable[None] | None]
StopSignal = asyncio.Event | Callable[[], bool]

__all__ = [
    "AsyncRetrying",
    "BeforeSleep",
    "RetryCallState",
    "log_before_retry",
    "retry_attempts",
    "retry_until_stopped",
    "sleep_unless_set",
    "stop_when",
    "wait_capped_exponential",
    "wait_retry_after",
    "wait_steps",
]


# -- waits ------------------------------------------------------------------------------------


class wait_steps(wait_base):
    """The n-th wait of a streak of failures is ``steps[n-1]``; the last step repeats.

    With ``stable_run_s``, a try that ran at least that long before it failed begins a
    new streak (it waits ``steps[0]``): a dependency that was up for a while and then went
    away is tried again soon, not after the longest step. Telling that needs the tries'
    durations, which tenacity does not keep, so the object remembers them for the loop
    it serves: build one per loop (it starts over on every first attempt, so sequential
    reuse is safe; concurrent loops must not share one).
    """

    def __init__(self, steps: Sequence[float], stable_run_s: float | None = None) -> None:
        if not steps:
            raise ValueError("wait_steps needs at least one step (seconds)")
        self.steps = tuple(float(step) for step in steps)
        self.stable_run_s = stable_run_s
        self._streak_began_at = 1  # the attempt number whose failure began the streak
        self._ran_before_s = 0.0  # time spent in the tries before this one

    def __call__(self, retry_state: RetryCallState) -> float:
        attempt = retry_state.attempt_number
        if attempt == 1:
            self._streak_began_at, self._ran_before_s = 1, 0.0
        # Time since the first try, minus the waits between tries, is time spent trying.
        ran_s = (retry_state.seconds_since_start or 0.0) - retry_state.idle_for
        this_try_s, self._ran_before_s = ran_s - self._ran_before_s, ran_s
        if self.stable_run_s is not None and this_try_s >= self.stable_run_s:
            self._streak_began_at = attempt
        step = attempt - self._streak_began_at
        return self.steps[min(step, len(self.steps) - 1)]


class wait_capped_exponential(wait_base):
    """The n-th wait is ``min(max_s, base_s * 2**(n-1))``, reduced by up to ``jitter`` of
    itself at random (``rng``) so that the retries of many callers spread out."""

    def __init__(
        self, base_s: float, max_s: float, jitter: float = 0.5, rng: random.Random | None = None
    ) -> None:
        if not 0.0 <= jitter <= 1.0:
            raise ValueError(f"jitter must be between 0 and 1, got {jitter}")
        self.base_s = base_s
        self.max_s = max_s
        self.jitter = jitter
        self.rng = rng or random.Random()

    def seconds(self, attempt_number: int) -> float:
        ceiling = min(self.max_s, self.base_s * 2 ** (attempt_number - 1))
        return ceiling * (1 - self.jitter * self.rng.random())

    def __call__(self, retry_state: RetryCallState) -> float:
        return self.seconds(retry_state.attempt_number)


def retry_after_of(exc: BaseException | None) -> float | None:
    """What a failure asked for (seconds), carried as ``retry_after_s`` on the exception."""
    value = getattr(exc, "retry_after_s", None)
    return float(value) if isinstance(value, int | float) else None


class wait_retry_after(wait_base):
    """``wait``, lengthened to the ``retry_after_s`` the failed try's exception carries
    (e.g. an HTTP ``Retry-After`` in seconds), never beyond ``max_s``: the other side knows
    when it takes requests again, but a hostile or broken one cannot park the caller."""

    def __init__(self, wait: wait_capped_exponential, max_s: float) -> None:
        self.wait = wait
        self.max_s = max_s

    def seconds(self, attempt_number: int, retry_after_s: float | None = None) -> float:
        seconds = self.wait.seconds(attempt_number)
        if retry_after_s is not None:
            seconds = max(seconds, min(retry_after_s, self.max_s))
        return seconds

    def __call__(self, retry_state: RetryCallState) -> float:
        outcome = retry_state.outcome
        failure = outcome.exception() if outcome is not None and outcome.failed else None
        return self.seconds(retry_state.attempt_number, retry_after_of(failure))


# -- stop and sleep ---------------------------------------------------------------------------


class stop_when(stop_base):
    """Stop retrying once ``is_stopping()`` is true (checked after each failed try)."""

    def __init__(self, is_stopping: Callable[[], bool]) -> None:
        self.is_stopping = is_stopping

    def __call__(self, retry_state: RetryCallState) -> bool:
        return self.is_stopping()


def sleep_unless_set(event: asyncio.Event) -> Callable[[float], Awaitable[None]]:
    """A tenacity ``sleep`` that returns early when ``event`` is set."""

    async def sleep(seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), seconds)

    return sleep


def log_before_retry(
    logger: logging.Logger, message: str, level: int = logging.WARNING
) -> Callable[[RetryCallState], None]:
    """A ``before_sleep`` that logs ``message`` with the error, the wait and the attempt."""

    def log(retry_state: RetryCallState) -> None:
        outcome = retry_state.outcome
        exc = outcome.exception() if outcome is not None else None
        logger.log(
            level,
            message,
            extra={
                "error": f"{type(exc).__name__}: {exc}"[:500],
                "retry_in_s": retry_state.upcoming_sleep,
                "attempt": retry_state.attempt_number,
            },
        )

    return log


# -- the policies -----------------------------------------------------------------------------


def retry_until_stopped(
    *,
    steps: Sequence[float],
    stop: StopSignal | None = None,
    retry: retry_base | None = None,
    stable_run_s: float | None = None,
    before_sleep: BeforeSleep | None = None,
    when_stopped: Literal["return", "raise"] = "return",
) -> AsyncRetrying:
    """Retry what ``retry`` accepts (default: any ``Exception``; cancellation never) along
    ``steps``, for as long as it takes, until ``stop`` is set (an ``asyncio.Event`` also cuts
    the wait short). Once stopped after a failed try, the call returns ``None``
    (``when_stopped="return"``) or raises that try's exception (``"raise"``); anything
    ``retry`` refuses is raised at once. Build one per loop (see ``wait_steps``)."""
    if isinstance(stop, asyncio.Event):
        event = stop
        stop_rule: stop_base = stop_when(event.is_set)
        sleep: Callable[[float], Awaitable[None]] = sleep_unless_set(event)
    else:
        stop_rule = stop_when(stop if stop is not None else lambda: False)
        sleep = asyncio.sleep
    give_up: Callable[[RetryCallState], Any] | None = None
    if when_stopped == "return":
        give_up = _return_none
    return AsyncRetrying(
        sleep=sleep,
        stop=stop_rule,
        wait=wait_steps(steps, stable_run_s),
        retry=retry if retry is not None else retry_if_exception_type(Exception),
        before_sleep=before_sleep,
        reraise=True,
        retry_error_callback=give_up,
    )


def retry_attempts(
    *,
    attempts: int,
    wait: wait_base,
    retry: retry_base,
    before_sleep: BeforeSleep | None = None,
) -> AsyncRetrying:
    """At most ``attempts`` tries of what ``retry`` accepts, waiting ``wait`` between them;
    after the last, or at a failure ``retry`` refuses, that failure is raised as it was."""
    return AsyncRetrying(
        stop=stop_after_attempt(attempts),
        wait=wait,
        retry=retry,
        before_sleep=before_sleep,
        reraise=True,
    )


def _return_none(retry_state: RetryCallState) -> None:
    return None
