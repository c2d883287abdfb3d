"""The retry rules each caller depends on, pinned through the callers themselves (written
before the loops moved onto ``app/retry.py``, and passing on both): the Kafka wait starts its
backoff over after a stable run and ends as soon as it is asked to stop; a webhook's
``Retry-After`` lengthens the notifier's wait, up to its cap.

The waits are read from the warnings each loop logs (``retry_in_s``), never timed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from aiohttp import ClientSession, web
from aiokafka.errors import KafkaConnectionError
from prometheus_client import CollectorRegistry

from agents.notifier import NotifierMetrics, RetryPolicy, TargetWorker
from app.alerts_config import AlertTarget
from app.events import kafka_retry
from app.events.kafka_retry import retry_while_kafka_down


def waits_logged(caplog: pytest.LogCaptureFixture, logger: str) -> list[float]:
    return [
        float(record.retry_in_s)  # type: ignore[attr-defined]
        for record in caplog.records
        if record.name == logger and hasattr(record, "retry_in_s")
    ]


async def test_kafka_backoff_starts_over_after_a_stable_run(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Two quick failures climb the steps; a run that lasted STABLE_RUN_S before failing
    waits the first step again, and the climb restarts from there."""
    monkeypatch.setattr(kafka_retry, "BACKOFF_S", (0.001, 0.002, 0.003))
    monkeypatch.setattr(kafka_retry, "STABLE_RUN_S", 0.5)
    runs = 0

    async def run() -> None:
        nonlocal runs
        runs += 1
        if runs == 3:
            await asyncio.sleep(1.0)  # a run that was up for longer than STABLE_RUN_S
        if runs <= 4:
            raise KafkaConnectionError("broker gone")

    with caplog.at_level(logging.WARNING, logger="app.events.kafka_retry"):
        await retry_while_kafka_down(run, "test agent")
    assert runs == 5
    assert waits_logged(caplog, "app.events.kafka_retry") == [0.001, 0.002, 0.001, 0.002]


async def test_kafka_wait_ends_when_stop_is_set_and_nothing_runs_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A stop set during the backoff ends the wait at once (a 1-hour step would hang the
    test) and there is no further run."""
    monkeypatch.setattr(kafka_retry, "BACKOFF_S", (3600.0,))
    stop = asyncio.Event()
    failed = asyncio.Event()
    runs = 0

    async def run() -> None:
        nonlocal runs
        runs += 1
        failed.set()
        raise KafkaConnectionError("broker gone")

    waiting = asyncio.create_task(retry_while_kafka_down(run, "test agent", stop))
    await failed.wait()
    stop.set()
    await asyncio.wait_for(waiting, 30)
    assert runs == 1


def test_kafka_wait_never_runs_once_stop_is_already_set() -> None:
    stop = asyncio.Event()
    stop.set()
    runs = 0

    async def run() -> None:
        nonlocal runs
        runs += 1

    asyncio.run(retry_while_kafka_down(run, "test agent", stop))
    assert runs == 0


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@pytest.fixture
async def target_url() -> AsyncIterator[Callable[[list[tuple[int, str | None]]], Awaitable[str]]]:
    """A loopback webhook that answers the given (status, Retry-After) in turn."""
    runners: list[web.AppRunner] = []

    async def start(answers: list[tuple[int, str | None]]) -> str:
        async def handler(request: web.Request) -> web.Response:
            status, retry_after = answers.pop(0)
            headers = {"Retry-After": retry_after} if retry_after is not None else {}
            return web.Response(status=status, headers=headers)

        app = web.Application()
        app.router.add_post("/{tail:.*}", handler)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        host, port = runner.addresses[0][:2]
        return f"http://{host}:{port}/hook"

    yield start
    for runner in runners:
        await runner.cleanup()


async def test_a_webhook_retry_after_lengthens_the_wait_up_to_the_cap(
    target_url: Callable[[list[tuple[int, str | None]]], Awaitable[str]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The backoff alone would wait at most 0.02 s; the target asks for 0.3 s, then for an
    hour (capped at max_delay_s), then sends an HTTP date (ignored: the backoff applies)."""
    url = await target_url([(429, "0.3"), (503, "3600"), (503, "Wed, 21 Oct 2026 07:28:00 GMT"),
                            (200, None)])  # fmt: skip
    policy = RetryPolicy(max_attempts=4, base_delay_s=0.01, max_delay_s=0.5)
    worker = TargetWorker(
        AlertTarget(name="hook", url=url), NotifierMetrics(CollectorRegistry()), policy
    )
    with caplog.at_level(logging.WARNING, logger="agents.notifier"):
        async with ClientSession() as session:
            delivered = await worker.deliver(session, {"alert_key": "k", "message": "m"})
    assert delivered
    first, second, third = waits_logged(caplog, "agents.notifier")
    assert first == 0.3
    assert second == 0.5, "an hour's Retry-After is capped at max_delay_s"
    assert third <= 0.04, "an HTTP-date Retry-After is not understood; the backoff applies"
