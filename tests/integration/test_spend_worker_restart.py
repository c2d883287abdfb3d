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
