"""The background read-back of uncounted usage (app/http/server.py) after a start without
Kafka: a failure leaves the gate as it was and is logged, never left in the task (nothing
awaits it until the stop, whose clean-up it then broke: the emitter was not stopped and the
budget view not saved)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from app.events import clients
from app.events.codec import EventCodec
from app.http import server
from app.http.budget_snapshot import BudgetSnapshot, Uncounted
from app.metering.ingest import ReportedRequests
from app.settings import Settings
from tests.unit.test_budget_gate import NOW, gate_with, policies, spent, usd


def test_a_read_back_that_cannot_start_its_consumer_is_logged_and_holds_nothing(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def no_consumer(*args: Any, **kwargs: Any) -> Any:
        raise ValueError("no consumer for these settings")

    monkeypatch.setattr(clients, "consumer", no_consumer)
    gate = gate_with(policies(**{"user:a": 5}))
    emitter = SimpleNamespace(usage_ids={"evt-1"})
    skip = emitter.usage_ids

    async def read_back() -> int:
        view = SimpleNamespace(synced=asyncio.Event())
        view.synced.set()
        return await server.hold_uncounted_usage_when_caught_up(
            Settings(),
            gate,
            EventCodec(),
            skip,
            ReportedRequests(),
            emitter,
            [view],  # type: ignore[arg-type,list-item]
        )

    with caplog.at_level(logging.WARNING):
        assert asyncio.run(read_back()) == 0
    assert "could not read back the usage" in caplog.text
    assert emitter.usage_ids is None and not skip  # the ids are no longer kept


@pytest.mark.parametrize("behind", ["policies", "decisions", "both"])
def test_the_saved_spend_is_held_whichever_budget_view_did_not_catch_up(
    tmp_path: Path, behind: str
) -> None:
    """Review 59, finding 5: a start whose decisions caught up but whose policies did not
    held neither the saved spend nor (until the policies caught up) the read-back: a user
    near a cap could spend again what was spent before the restart. The saved spend is held
    whenever the read-back is put off, each restored id skipped by the read-back later."""
    gate = gate_with(policies(**{"user:a": 5}))
    snapshot = BudgetSnapshot(tmp_path / "budget-view.json", EventCodec())
    ts_ms = int(NOW.timestamp() * 1000)
    snapshot.held("evt-saved", Uncounted(("user:a",), usd(1), ts_ms, 0, 7))
    policy_view = SimpleNamespace(synced=asyncio.Event())
    decision_view = SimpleNamespace(synced=asyncio.Event())
    if behind == "policies":
        decision_view.synced.set()
    elif behind == "decisions":
        policy_view.synced.set()
    emitter = SimpleNamespace(usage_ids=None)
    spooled: set[str] = set()
    restored: set[str] = set()

    async def start() -> None:
        task = server.defer_uncounted_read_back(
            Settings(),
            gate,
            EventCodec(),
            snapshot,
            emitter,  # type: ignore[arg-type]
            spooled,
            ReportedRequests(),
            restored,
            [policy_view, decision_view],  # type: ignore[list-item]
        )
        try:
            await asyncio.sleep(0)
            assert not task.done()  # waiting for the views
            assert spent(gate, "user:a") == usd(1)
            assert restored == {"evt-saved"}
            assert emitter.usage_ids is spooled and "evt-saved" in spooled  # not read back again
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    asyncio.run(start())
