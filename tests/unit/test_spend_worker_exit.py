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
