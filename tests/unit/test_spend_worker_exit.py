"""A crashed spend worker ends its process, so that its supervisor restarts it.

Session 17's probe (F3): after a crash the worker process stayed alive, idle and deaf to
SIGTERM (``make up`` never saw it exit), and no scope was counted any more.
"""

from __future__ import annotations

import threading
from typing import Any

import faust
import pytest

import agents.spend as spend


class _Exit:
    def __init__(self) -> None:
        self.codes: list[int] = []
        self.called = threading.Event()

    def __call__(self, code: int) -> None:
        self.codes.append(code)
        self.called.set()


async def test_a_crash_that_never_stops_still_ends_the_process() -> None:
    app = faust.App("test-exit-when-crashed", broker="kafka://127.0.0.1:1")
    exit = _Exit()
    spend.exit_when_crashed(app, after_s=0.2, exit=exit)
    await app.crash(RuntimeError("BudgetDecision record does not match its schema"))
    assert exit.called.wait(10), "a crashed worker that does not stop must still exit"
    assert exit.codes == [1]


class _FakeWorker:
    outcome: BaseException

    def __init__(self, app: Any, **kwargs: Any) -> None:
        pass

    def execute_from_commandline(self) -> None:
        raise self.outcome


@pytest.mark.parametrize(
    ("outcome", "code"),
    [(RuntimeError("crashed"), 1), (SystemExit(0), 0), (SystemExit(None), 0), (SystemExit(2), 2)],
)
def test_run_worker_ends_the_process_with_the_workers_outcome(
    monkeypatch: pytest.MonkeyPatch, outcome: BaseException, code: int
) -> None:
    class Worker(_FakeWorker):
        pass

    Worker.outcome = outcome

    class Spend:
        def __init__(self, settings: Any) -> None:
            self.app = faust.App("test-run-worker", broker="kafka://127.0.0.1:1")

    async def no_topics(worker: Any) -> None:
        return None

    monkeypatch.setattr(spend, "SpendWorker", Spend)
    monkeypatch.setattr(spend, "ensure_changelog_topics", no_topics)
    monkeypatch.setattr(spend.faust, "Worker", Worker)
    exit = _Exit()
    spend.run_worker(object(), exit=exit)  # type: ignore[arg-type]
    assert exit.codes == [code]


async def test_a_worker_started_while_kafka_is_away_waits_for_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Probe K (K4): a worker started while the broker was away exited with a traceback at
    once; `make up` leaves a service down after five exits in two minutes. It waits now,
    and goes on as soon as the broker answers."""
    from aiokafka.errors import KafkaConnectionError

    answers: list[BaseException | None] = [
        KafkaConnectionError("Unable to bootstrap from [('127.0.0.1', 1)]"),
        OSError("connection refused"),
        None,
    ]

    async def ensure(worker: Any) -> None:
        answer = answers.pop(0)
        if answer is not None:
            raise answer

    async def instant(_: float) -> None:
        return None

    monkeypatch.setattr(spend, "ensure_changelog_topics", ensure)
    monkeypatch.setattr(spend.asyncio, "sleep", instant)
    from types import SimpleNamespace

    worker = SimpleNamespace(settings=SimpleNamespace(kafka_bootstrap="127.0.0.1:1"))
    await spend.wait_for_kafka(worker)  # type: ignore[arg-type]
    assert answers == []
