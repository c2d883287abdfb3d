"""The shared retry loop: which Kafka failures an agent waits out, and which end it."""

from __future__ import annotations

import asyncio

import pytest
from aiokafka.errors import (
    CommitFailedError,
    IllegalGenerationError,
    KafkaConnectionError,
    KafkaTimeoutError,
    NodeNotReadyError,
    RebalanceInProgressError,
    RequestTimedOutError,
    UnknownMemberIdError,
)

from app.events import kafka_retry
from app.events.kafka_retry import is_transient, retry_while_kafka_down

# What a stall longer than the session timeout, a lost group or a broker restart raise.
TRANSIENT = [
    KafkaConnectionError("no broker"),
    CommitFailedError("rebalanced while stalled"),
    UnknownMemberIdError(),
    IllegalGenerationError(),
    RebalanceInProgressError(),
    NodeNotReadyError(),
    RequestTimedOutError(),
    KafkaTimeoutError(),
]


@pytest.fixture(autouse=True)
def no_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kafka_retry, "BACKOFF_S", (0.0,))


@pytest.mark.parametrize("error", TRANSIENT, ids=lambda e: type(e).__name__)
async def test_a_lost_session_or_broker_is_waited_out_and_the_run_starts_again(
    error: Exception,
) -> None:
    calls = 0

    async def run() -> None:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise error

    await retry_while_kafka_down(run, "test agent")
    assert calls == 3
    assert is_transient(error)


async def test_a_bug_is_not_retried() -> None:
    calls = 0

    async def run() -> None:
        nonlocal calls
        calls += 1
        raise ValueError("a bug, not an outage")

    with pytest.raises(ValueError):
        await retry_while_kafka_down(run, "test agent")
    assert calls == 1


async def test_stop_ends_the_retries() -> None:
    stop = asyncio.Event()
    calls = 0

    async def run() -> None:
        nonlocal calls
        calls += 1
        stop.set()
        raise CommitFailedError("rebalanced")

    await retry_while_kafka_down(run, "test agent", stop)
    assert calls == 1
