"""A user's decision noted while the spend worker's budget views were unread is not lost
when the user's usage partition moves to another worker (review, concern A).

A worker whose views have not read their topics yet counts usage and notes the scopes
that need a decision (``waiting``). If a rebalance then moves a user's partition away, the
old owner rightly drops that user (another worker owns it). The new owner had read its
views long before: before this fix it decided the user only at their next usage. A new
user under a ``user:*`` cap has no decision on the topic (the half-hourly reconcile walks
decisions and explicit policies only), so a user past the cap got no blocked decision;
each dispatcher that served them held that spend as uncounted for good (its readiness
check ``spend_worker_counting`` turns false; fail-closed, the dispatcher is not ready),
and the others served the user up to the whole cap again.

Two real workers (their Faust apps, partition assignors, tables, counters, decide and
flush); only what Kafka would answer is given: the sends are recorded (as Kafka would
answer them), the table's changelog recovery is the old owner's table data, and reading
back the ids before a partition's committed offset finds none.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
from faust.types import TP

from agents.spend import SpendWorker, partition_for
from app.budgets.counter import UsageEvent
from app.budgets.policy import parse_policy
from app.settings import Settings
from tests.unit.test_compacted_view_order import CODEC
from tests.unit.test_compacted_view_worker_unsynced import Sent
from tests.unit.test_spend_reported_standby import _assign

PARTITIONS = 2
USER = "newbie"
SCOPE = f"user:{USER}"
OVER = 12_000_000  # nanos: past the 0.01 USD cap


def _worker(path: Path, committed: dict[int, int]) -> tuple[SpendWorker, Sent]:
    worker = SpendWorker(Settings(state_dir=path, topic_partitions=PARTITIONS))
    worker.policies.put(parse_policy("user:*", {"limit_usd": 0.01}))
    decisions = Sent("t.budget.decisions")
    worker.decisions_topic = decisions  # type: ignore[assignment]
    worker.alerts_topic = Sent("t.alerts")  # type: ignore[assignment]
    worker.partials_topic = Sent("t.budget.partials")  # type: ignore[assignment]

    async def nothing_before(partition: int, start: int, end: int) -> list[Any]:
        return []  # the ids just before the committed offset: none (the first event)

    async def committed_offsets(partitions: Iterable[int]) -> dict[int, int]:
        return {p: committed.get(p, 0) for p in partitions}  # the group's (none: 0)

    worker._read_range = nothing_before  # type: ignore[method-assign,assignment]
    worker._committed_offsets = committed_offsets  # type: ignore[method-assign]
    return worker, decisions


def _decided(sent: Sent) -> list[dict[str, Any]]:
    return [CODEC.decode(value).record for value in sent.values if value is not None]


def test_a_user_noted_while_the_views_were_unread_is_decided_by_the_partitions_next_owner(
    tmp_path: Path,
) -> None:
    committed: dict[int, int] = {}  # the group's committed offsets of the usage partitions
    old, old_sent = _worker(tmp_path / "old", committed)
    new, new_sent = _worker(tmp_path / "new", committed)
    p = partition_for(USER, PARTITIONS)
    usage = old.settings.topic("usage")

    async def run() -> None:
        # The new owner read its budget views long ago: nothing of this user there.
        new.policy_view.synced.set()
        new.decision_view.synced.set()
        _assign(new, actives=[1 - p], standbys=[p])
        await new._on_recovered()
        _assign(old, actives=[p], standbys=[1 - p])
        await old._on_recovered()

        # The old owner's views have not read their topics: it counts, the user waits.
        await old._prepared([p])
        record = {"event_id": "e1", "ts": old.clock.now(), "user_id": USER,
                  "cost_usd_nanos": OVER}  # fmt: skip
        batch = old.counter.stage([UsageEvent(p, 0, record)])
        old.counter.commit(batch)  # (made durable in the changelog first, in the worker)
        for scope in batch.local_scopes:
            await old.decide(scope, reason="spend")
        await old._flush()
        assert SCOPE in old.waiting and old_sent.values == []

        # A rebalance moves the user's partition to the new owner, which recovers its
        # table from the changelog (the old owner's table data) and learns where the
        # partition stands (its committed offset: the old owner acknowledged the event).
        await old._on_revoked(None, {TP(usage, p)})
        await new._on_revoked(None, set())
        for key, value in old.spend_table.data.items():
            new.spend_table.data[key] = value
        _assign(new, actives=[0, 1], standbys=[])
        await new._on_recovered()
        _assign(old, actives=[], standbys=[0, 1])
        await old._on_recovered()
        committed[p] = 1
        await new._prepared([0, 1])
        await new._flush()

        # The old owner's views read their topics at last: the user is no longer its own.
        old.policy_view.synced.set()
        old.decision_view.synced.set()
        await old._flush()

    asyncio.run(run())
    assert _decided(old_sent) == [], "a worker decided a scope it does not own"
    decided = [d for d in _decided(new_sent) if d["scope"] == SCOPE]
    assert decided, "the user past their cap got no decision from the partition's new owner"
    assert decided[-1]["state"] == "blocked"
    assert decided[-1]["spent_usd_nanos"] == OVER
    # counted through the event, so the dispatcher that served it stops holding its cost
    assert decided[-1]["counted_offsets"] == {str(p): 1}


def test_a_failed_send_does_not_drop_the_other_users_to_decide_again(tmp_path: Path) -> None:
    """A new owner notes every user of a partition for a decision; a send that failed for
    one of them must not drop the others (they would wait for their next usage)."""
    committed: dict[int, int] = {}
    worker, sent = _worker(tmp_path, committed)
    worker.policy_view.synced.set()
    worker.decision_view.synced.set()
    users = [u for u in (f"u{i}" for i in range(50)) if partition_for(u, PARTITIONS) == 0][:3]
    _assign(worker, actives=[0, 1], standbys=[])
    sent.failing = 1  # the first decision's send

    async def run() -> None:
        await worker._on_recovered()
        await worker._prepared([0])
        events = [
            UsageEvent(
                0,
                i,
                {
                    "event_id": f"e{i}",
                    "ts": worker.clock.now(),
                    "user_id": user,
                    "cost_usd_nanos": OVER,
                },
            )
            for i, user in enumerate(users)
        ]
        worker.counter.commit(worker.counter.stage(events))
        worker.counter.forget([0])
        committed[0] = len(users)
        await worker._prepared([0])  # the partition is this worker's again
        with pytest.raises(RuntimeError):
            await worker._flush()
        await worker._flush()

    asyncio.run(run())
    assert {d["scope"] for d in _decided(sent)} == {f"user:{u}" for u in users}
