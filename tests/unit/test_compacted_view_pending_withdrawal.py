"""A spend worker's pending withdrawal (review 58 finding 3): it was matched by *any*
tombstone of its scope read back, so during a re-read an older tombstone (tombstones stay
24 h) counted as its read-back and the decision being withdrawn, read next, was held after
the catch-up ("blocked") until the worker's own tombstone was read back. A local write is
read back where its send says it landed (partition, offset). Pure logic: the real view and
the worker's real ``_send_decision``, with a send future resolving to aiokafka's
``RecordMetadata``."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
from aiokafka.structs import RecordMetadata, TopicPartition

from app.events.compacted import CompactedView
from tests.unit.test_compacted_view_order import apply, decision, read, send_pending, view

TOPIC = "t.budget.decisions"


def _landed(partition: int, offset: int) -> RecordMetadata:
    return RecordMetadata(TOPIC, partition, TopicPartition(TOPIC, partition), offset, 0, 0, 0)


def _resolve(outcome: asyncio.Future[Any], metadata: RecordMetadata) -> None:
    loop = outcome.get_loop()
    outcome.set_result(metadata)
    loop.run_until_complete(asyncio.sleep(0))  # the done callbacks run


def _history(v: CompactedView) -> dict[str, Any]:
    """user:a on partition 0: open, withdrawn (a tombstone, kept 24 h), then blocked."""
    open_, blocked = decision("user:a", 0), decision("user:a", 12_000_000)
    apply(v, "user:a", open_, 0)
    apply(v, "user:a", None, 1)
    apply(v, "user:a", blocked, 2)
    return blocked


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    """An event loop of the test's own, current while it runs (the sends' futures live on it)."""
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        yield loop
    finally:
        loop.close()
        asyncio.set_event_loop(None)


def _send_on(
    loop: asyncio.AbstractEventLoop, v: CompactedView, scope: str, record: dict[str, Any] | None
) -> asyncio.Future[Any]:
    return loop.run_until_complete(send_pending(v, scope, record))


def test_an_older_tombstone_read_again_is_not_the_pending_withdrawal(
    loop: asyncio.AbstractEventLoop,
) -> None:
    v = view(TOPIC)
    v.begin_catch_up()
    blocked = _history(v)
    v.caught_up({0: 3, 1: 0})
    assert v.records["user:a"] == read(blocked)
    sent = _send_on(loop, v, "user:a", None)  # the cap was removed: withdrawn
    _resolve(sent, _landed(0, 3))
    assert "user:a" not in v.records
    v.begin_catch_up()  # the broker was lost before the withdrawal was read back
    _history(v)  # read again: the older tombstone, then the blocked decision
    v.caught_up({0: 3, 1: 0})  # the end offsets taken as the re-read began
    assert "user:a" not in v.records, "the withdrawn blocked decision is held again"
    apply(v, "user:a", None, 3)  # the worker's own tombstone, read back
    assert "user:a" not in v.records
    other = decision("user:a", 5_000_000)  # the next owner's, after a rebalance
    apply(v, "user:a", other, 4)
    assert v.records["user:a"] == read(other)


def test_a_write_read_back_before_its_send_reports_where_it_landed(
    loop: asyncio.AbstractEventLoop,
) -> None:
    """The consumer may read the record before the producer's callback runs: records read
    meanwhile are held apart, and the view holds the topic's newest once the send reports."""
    v = view(TOPIC)
    v.begin_catch_up()
    _history(v)
    v.caught_up({0: 3, 1: 0})
    mine = decision("user:a", 0)
    sent = _send_on(loop, v, "user:a", mine)
    apply(v, "user:a", mine, 3)  # read back, location not known yet
    other = decision("user:a", 5_000_000)
    apply(v, "user:a", other, 4)  # then another worker's
    assert v.records["user:a"] == mine  # not known to be newer than the local write yet
    _resolve(sent, _landed(0, 3))
    assert v.records["user:a"] == read(other)


def test_a_newer_record_read_past_where_a_local_write_landed_is_held() -> None:
    """Review 62: a local write was read back only by its exact (partition, offset). Where
    that record is never read (compacted away behind a newer record of its key, or lost in
    an unclean leader election and the offset reused), the view held the local write for
    ever, ignoring the topic's newer records of the key: the worker compared its decisions
    with one the dispatchers never saw (no re-publish, not even by reconcile)."""
    v = view(TOPIC)
    v.begin_catch_up()
    v.caught_up({0: 5})
    mine, theirs = decision("user:a", 0), decision("user:a", 12_000_000)
    write = v.put_local("user:a", mine)
    v.local_written("user:a", write, 0, 5)
    apply(v, "user:a", theirs, 6)  # the topic's newest of user:a, past where mine landed
    assert v.records["user:a"] == read(theirs)
    assert v.pending_write("user:a") is None
