"""The background read-back of uncounted usage (app/http/server.py) after a start without
Kafka: a failure leaves the gate as it was and is logged, never left in the task (nothing
awaits it until the stop, whose clean-up it then broke: the emitter was not stopped and the
budget view not saved)."""

from __future__ import annotations

import asyncio
import logging
from types import SimpleNamespace
from typing import Any

import pytest

from app.events import clients
from app.events.codec import EventCodec
from app.http import server
from app.metering.ingest import ReportedRequests
from app.settings import Settings
from tests.unit.test_budget_gate import gate_with, policies


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
