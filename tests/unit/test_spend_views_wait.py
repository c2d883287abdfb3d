"""The spend worker's decisions wait for its budget views without end (review, concern B):
a decisions or policies topic the worker never reads meant no decision for good, each
dispatcher holding only its own spend (a user could spend a cap through each dispatcher).
Past ``spend_views_wait_s`` a view still unread is an error in the log; one that has not
reached the broker for that long either crashes the worker, so that its supervisor
restarts it and its partitions go to a worker that can decide them. A view still reading
(in contact with the broker: a large topic) is waited for. The real worker and its views;
the worker's crash is recorded instead of stopping Faust (``exit_when_crashed`` wraps it
the same way)."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import pytest

from agents.spend import BudgetTopicsUnread, SpendWorker
from app.settings import Settings

BOUND_S = 300.0


def _worker(tmp_path: Path) -> tuple[SpendWorker, list[BaseException]]:
    worker = SpendWorker(Settings(state_dir=tmp_path, spend_views_wait_s=BOUND_S))
    crashes: list[BaseException] = []

    async def crash(reason: BaseException) -> None:
        crashes.append(reason)

    worker.app.crash = crash  # type: ignore[method-assign]
    worker.policy_view.synced.set()  # the policies were read; the decisions were not
    worker._views_started = 1000.0  # (monotonic) the views started reading then
    return worker, crashes


def test_a_budget_topic_not_reached_past_the_bound_crashes_the_worker(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    worker, crashes = _worker(tmp_path)  # the decisions view never reached the broker

    async def run() -> None:
        await worker._check_views_wait(1000.0 + BOUND_S / 2)
        assert crashes == [], "crashed before the bound"
        with caplog.at_level(logging.CRITICAL, logger="agents.spend"):
            await worker._check_views_wait(1000.0 + BOUND_S)

    asyncio.run(run())
    assert len(crashes) == 1 and isinstance(crashes[0], BudgetTopicsUnread)
    assert worker.decision_view.topic in str(crashes[0])
    assert any(r.levelno == logging.CRITICAL for r in caplog.records)


def test_a_budget_topic_still_being_read_is_an_error_not_a_crash(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    worker, crashes = _worker(tmp_path)
    worker.decision_view.last_contact = time.monotonic()  # reading: in contact with the broker

    async def run() -> None:
        with caplog.at_level(logging.ERROR, logger="agents.spend"):
            await worker._check_views_wait(1000.0 + BOUND_S)

    asyncio.run(run())
    assert crashes == []
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert errors and worker.decision_view.topic in str(errors[0].__dict__.get("topics"))


def test_views_read_in_time_change_nothing(tmp_path: Path) -> None:
    worker, crashes = _worker(tmp_path)
    worker.decision_view.synced.set()
    asyncio.run(worker._check_views_wait(1000.0 + 10 * BOUND_S))
    assert crashes == []


def test_housekeeping_applies_the_bound(tmp_path: Path) -> None:
    """The worker's housekeeping timer is what checks the wait, every second."""
    worker, crashes = _worker(tmp_path)
    worker.ready = True  # tables recovered
    worker.views_ready.set()  # the views' start returned (it gives up waiting after 30 s)
    worker._views_started = time.monotonic() - BOUND_S
    asyncio.run(worker._housekeeping())
    assert len(crashes) == 1 and isinstance(crashes[0], BudgetTopicsUnread)
