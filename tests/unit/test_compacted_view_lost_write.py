"""A spend worker's decision write that fails (review 58): the view must then hold what the
topic holds for that scope, not the decision that was never written, or the worker's next
decisions compare against it and never publish the change (its reconcile neither: a
``blocked`` never reached the dispatchers; a withdrawal was never sent again). Pure logic:
the real view and the worker's real ``_send_decision``, with a send future that fails."""

from __future__ import annotations

import asyncio
from typing import Any

from app.budgets.spend import should_publish
from app.events.compacted import CompactedView
from tests.unit.test_compacted_view_order import (
    apply,
    decision,
    read,
    send_pending,
    synced_view,
    view,
)


def _send_and_fail(v: CompactedView, scope: str, record: dict[str, Any] | None) -> None:
    async def run() -> None:
        outcome = await send_pending(v, scope, record)
        outcome.set_exception(RuntimeError("not written"))
        await asyncio.sleep(0)  # the done callbacks run

    asyncio.run(run())


def test_a_failed_blocked_decision_is_not_held_as_if_written() -> None:
    v = synced_view()
    open_ = decision("user:a", 0)
    apply(v, "user:a", open_, 0)
    blocked = decision("user:a", 12_000_000)
    _send_and_fail(v, "user:a", blocked)
    assert v.records["user:a"] == read(open_), "the unwritten decision is held"
    again = decision("user:a", 12_000_000)  # the next decision, same spend (reconcile)
    assert should_publish(v.records.get("user:a"), again, False), "never published again"


def test_a_topic_record_skipped_while_the_write_was_pending_applies_once_it_fails() -> None:
    v = synced_view()
    apply(v, "user:a", decision("user:a", 0), 0)

    async def run() -> None:
        outcome = await send_pending(v, "user:a", decision("user:a", 12_000_000))
        apply(v, "user:a", other, 1)  # another worker's, read while this write is pending
        outcome.set_exception(RuntimeError("not written"))
        await asyncio.sleep(0)

    other = decision("user:a", 5_000_000)
    asyncio.run(run())
    assert v.records["user:a"] == read(other)


def test_a_failed_withdrawal_leaves_the_decision_to_withdraw_again() -> None:
    v = synced_view()
    blocked = decision("user:a", 12_000_000)
    apply(v, "user:a", blocked, 0)
    _send_and_fail(v, "user:a", None)
    # decide() withdraws only a scope its view holds: the topic still holds it
    assert v.records.get("user:a") == read(blocked), "the withdrawal would never be sent again"


def test_a_failed_write_during_a_catch_up_leaves_the_topic_record_once_caught_up() -> None:
    v = view()
    v.begin_catch_up()
    open_ = decision("user:a", 0)
    apply(v, "user:a", open_, 0)
    _send_and_fail(v, "user:a", decision("user:a", 12_000_000))
    v.caught_up()
    assert v.records["user:a"] == read(open_)
