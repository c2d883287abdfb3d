"""The spend worker before its decisions view has caught up (review 58 finding 4): the
views' start gives up waiting after 30 s, and the worker went on deciding with an empty
view: every decision compared with no previous one, so it was published again and its
threshold alerts fired again. Decisions (and alerts) now wait until the view has read the
topic; counting goes on, and the wait is logged. The real worker, its real decision view
(driven with encoded records, as Kafka would deliver them) and its real decide/flush; only
the sends are recorded instead of going to Kafka, and the spend is given."""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from aiokafka.structs import RecordMetadata, TopicPartition

from agents.spend import SpendWorker
from app.budgets.policy import evaluate, parse_policy
from app.budgets.spend import decision_record
from app.settings import Settings
from tests.unit.test_compacted_view_order import CODEC

SCOPE = "team:x"
LIMIT_USD = 0.01
OVER = 12_000_000  # nanos: past the 0.01 USD cap, every threshold crossed


class Sent:
    """A topic's sends, each answered as Kafka would: where it landed."""

    def __init__(self, topic: str) -> None:
        self.topic, self.values = topic, []  # type: ignore[var-annotated]
        self.failing = 0  # the next sends that fail (the broker went away)

    async def send(self, *, key: bytes, value: bytes | None, **_: Any) -> asyncio.Future[Any]:
        if self.failing:
            self.failing -= 1
            raise RuntimeError("the broker went away")
        self.values.append(value)
        landed: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        tp = TopicPartition(self.topic, 0)
        landed.set_result(RecordMetadata(self.topic, 0, tp, 100 + len(self.values), 0, 0, 0))
        return landed


def _worker(tmp_path: Path, spent: int) -> tuple[SpendWorker, Sent, Sent]:
    worker = SpendWorker(Settings(state_dir=tmp_path))
    worker.policies.put(parse_policy(SCOPE, {"limit_usd": LIMIT_USD}))
    decisions, alerts = Sent("t.budget.decisions"), Sent("t.alerts")
    worker.decisions_topic = decisions  # type: ignore[assignment]
    worker.alerts_topic = alerts  # type: ignore[assignment]
    worker.spent = lambda scope, start, end: (spent, {})  # type: ignore[method-assign]
    n = worker.settings.topic_partitions
    worker.owned = lambda suffix: set(range(n))  # type: ignore[method-assign]
    worker.ready = True  # tables recovered
    return worker, decisions, alerts


def _published(worker: SpendWorker, spent: int) -> bytes:
    """A decision of SCOPE at ``spent`` as published before this worker started."""
    policy = parse_policy(SCOPE, {"limit_usd": LIMIT_USD})
    now: datetime = worker.clock.now()
    record = decision_record(
        SCOPE, policy, policy.period_at(now), spent, now, evaluate(spent, policy), now, "spend", {}
    )
    return CODEC.encode("BudgetDecision", record)


def _catch_up(worker: SpendWorker, value: bytes) -> None:
    """Both views read their topics to the end: the decision view finds ``value``."""
    for view in (worker.policy_view, worker.decision_view):
        view.begin_catch_up()
    worker.decision_view._apply(SCOPE.encode(), value, 0, 0)
    worker.policy_view.caught_up({0: 0})
    worker.decision_view.caught_up({0: 1})


def test_a_decision_already_published_is_not_published_again_before_the_view_is_read(
    tmp_path: Path,
) -> None:
    worker, decisions, alerts = _worker(tmp_path, OVER)

    async def run() -> None:
        # the views' start timed out (Kafka slow): counting goes on and decides the scope
        await worker.decide(SCOPE, reason="spend", refresh=True)
        await worker._flush()
        _catch_up(worker, _published(worker, OVER))  # the topic had it already
        await worker._flush()
        await worker.decide(SCOPE, reason="spend", refresh=True)

    asyncio.run(run())
    assert alerts.values == [], "threshold alerts fired again"
    assert decisions.values == [], "the decision on the topic was published again"


def test_decisions_wait_for_the_view_then_are_made_and_the_wait_is_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    worker, decisions, alerts = _worker(tmp_path, OVER)

    async def run() -> None:
        with caplog.at_level(logging.WARNING, logger="agents.spend"):
            await worker.decide(SCOPE, reason="spend", refresh=True)
            await worker._flush()
        assert decisions.values == [] and alerts.values == []
        waits = [r for r in caplog.records if "wait" in r.getMessage()]
        assert waits, "the worker decides nothing and says nothing"
        _catch_up(worker, _published(worker, 0))  # the topic's decision: open, nothing spent
        await worker._flush()  # the decision that waited is made now

    asyncio.run(run())
    assert len(decisions.values) == 1
    decided = CODEC.decode(decisions.values[0]).record
    assert decided["state"] == "blocked" and decided["spent_usd_nanos"] == OVER
    assert len(alerts.values) == len(parse_policy(SCOPE, {"limit_usd": LIMIT_USD}).thresholds)


def test_a_failed_send_does_not_drop_the_other_decisions_that_waited(tmp_path: Path) -> None:
    """Review 62 finding 5: the decisions that waited were taken out all at once; a send
    that failed for one dropped the others (and itself) for good: a scope under a default
    policy, never decided before, was decided again only at its next usage."""
    worker, decisions, _alerts = _worker(tmp_path, OVER)
    worker.policies.put(parse_policy("team:y", {"limit_usd": LIMIT_USD}))
    decisions.failing = 1

    async def run() -> None:
        await worker.decide(SCOPE, reason="spend")
        await worker.decide("team:y", reason="spend")
        _catch_up(worker, _published(worker, 0))
        with pytest.raises(RuntimeError):
            await worker._flush()
        await worker._flush()

    asyncio.run(run())
    published = {CODEC.decode(v).record["scope"] for v in decisions.values[-2:]}
    assert published == {SCOPE, "team:y"}
