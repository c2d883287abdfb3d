"""A spend worker restarted after real dispatcher traffic keeps working (issue 10, found by
``bench/budget.py``'s worker-kill measurement).

The worker remembers each accepted request in its ``open_requests`` table until the
request's usage arrives, then removes it by writing ``None`` to the table's changelog.
If that ``None`` is not a Kafka tombstone, the table recovered by the next worker holds the
key with the value ``None``, and the first housekeeping pass (``_settle_lost_requests``)
fails on it. Checked without any timing: the worker publishes a decision for a policy
change in a housekeeping pass, so a second policy change can only be decided by a later
pass, after the first one went through the open requests.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.events.topics import ensure_topics
from app.pricing.catalog import PriceCatalog
from app.settings import Settings
from tests.integration.harness import Stack, WorkerProcess, wait_for_decision, wait_worker_ready

pytestmark = pytest.mark.integration
PROMPT = [{"role": "user", "content": "List three risks of the migration plan."}]
PRICES = PriceCatalog()


@pytest.fixture
def worker(kafka_settings: Settings, tmp_path: Path) -> Iterator[WorkerProcess]:
    asyncio.run(ensure_topics(kafka_settings))
    process = WorkerProcess(kafka_settings, tmp_path / "worker.log")
    process.start()
    try:
        wait_worker_ready(kafka_settings)
        yield process
    finally:
        process.stop()


def crash_in(log: Path) -> str:
    """The first crash the worker logged, with its traceback, or ''."""
    text = log.read_text(errors="replace")
    at = text.find("Crashed reason=")
    return "" if at < 0 else "the worker crashed: " + text[at : at + 1500]


def cost_of(response: httpx.Response) -> int:
    usage: dict[str, Any] = response.json()["usage"]
    return PRICES.cost("gpt-4o", usage["prompt_tokens"], usage["completion_tokens"]).cost_usd_nanos


@pytest.mark.parametrize("how", ["stop", "kill"])
def test_a_worker_restarted_after_dispatcher_traffic_keeps_deciding(
    kafka_settings: Settings, worker: WorkerProcess, tmp_path: Path, how: str
) -> None:
    scope = "user:rosa"
    stack = Stack(kafka_settings)
    stack.start()
    try:
        assert httpx.put(f"{stack.url}/v1/budgets/{scope}", json={"limit_usd": 10}).is_success
        spent = 0
        for _ in range(5):  # each call: a Request (remembered), then its Usage (forgotten)
            response = httpx.post(
                f"{stack.url}/v1/chat/completions",
                json={"model": "gpt-4o", "messages": PROMPT},
                headers={"X-Tollgate-User": "rosa", "X-Sim-Completion-Tokens": "50"},
                timeout=30,
            )
            assert response.status_code == 200, response.text
            spent += cost_of(response)
        wait_for_decision(kafka_settings, scope, lambda d: d["spent_usd_nanos"] == spent)

        if how == "stop":
            worker.stop()
        else:
            worker.kill()
        worker.start()
        for limit in (11, 12):  # two policy changes: two housekeeping passes
            assert httpx.put(
                f"{stack.url}/v1/budgets/{scope}", json={"limit_usd": limit}
            ).is_success
            try:
                decision = wait_for_decision(
                    kafka_settings, scope, lambda d, n=limit: d["limit_usd_nanos"] == n * 10**9
                )
            except AssertionError as exc:
                raise AssertionError(f"{exc}; {crash_in(tmp_path / 'worker.log')}") from None
            assert decision["spent_usd_nanos"] == spent
        assert not crash_in(tmp_path / "worker.log")
    finally:
        stack.stop()


def budget_nanos(response: httpx.Response) -> list[int]:
    assert response.status_code == 202, response.text
    return [int(Decimal(e["budget_cost_usd"]) * 10**9) for e in response.json()["events"]]


def report(request_id: str, completion_tokens: int) -> dict[str, Any]:
    return {
        "user_id": "lena",
        "request_id": request_id,
        "model": "gpt-4o",
        "prompt_tokens": 1000,
        "completion_tokens": completion_tokens,
    }


def test_a_report_retried_later_than_the_dedupe_window_is_charged_once(
    kafka_settings: Settings, tmp_path: Path
) -> None:
    """A fault probe re-sent a /v1/usage record after 55,000 others: the warehouse kept one
    row, the budget charged it twice ($0.34125 against $0.19125). Here the window is 100
    events, 150 of the user's reports come in between, the worker is killed and restarted
    (its window is read back from Kafka), and the retry goes to a replica that was already
    running when the first post went elsewhere, so it reaches Kafka again."""
    asyncio.run(ensure_topics(kafka_settings))
    worker = WorkerProcess(
        kafka_settings, tmp_path / "worker.log", TOLLGATE_SPEND_DEDUPE_WINDOW="100"
    )
    first, second = Stack(kafka_settings), Stack(kafka_settings)
    worker.start()
    first.start()
    second.start()
    scope = "user:lena"
    try:
        wait_worker_ready(kafka_settings)
        assert httpx.put(f"{first.url}/v1/budgets/{scope}", json={"limit_usd": 100}).is_success
        posted = [report("late-retry-1", 200)]
        spent = sum(budget_nanos(httpx.post(f"{first.url}/v1/usage", json=posted[0])))
        others = {"records": [report(f"between-{i}", 10 + i) for i in range(150)]}
        spent += sum(budget_nanos(httpx.post(f"{first.url}/v1/usage", json=others, timeout=30)))
        wait_for_decision(kafka_settings, scope, lambda d: d["spent_usd_nanos"] == spent)

        worker.kill()
        worker.start()
        retry = {"records": [posted[0], report("after-the-retry", 30)]}
        answer = httpx.post(f"{second.url}/v1/usage", json=retry)
        assert [e["repeat"] for e in answer.json()["events"]] == [False, False]  # news here
        spent += budget_nanos(answer)[1]
        try:
            decision = wait_for_decision(
                kafka_settings, scope, lambda d: d["spent_usd_nanos"] >= spent, timeout_s=90
            )
        except AssertionError as exc:
            raise AssertionError(f"{exc}; {crash_in(tmp_path / 'worker.log')}") from None
        assert decision["spent_usd_nanos"] == spent, "the late retry was charged again"
    finally:
        second.stop()
        first.stop()
        worker.stop()
