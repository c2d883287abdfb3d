"""A re-read after a lost broker (review 58): records the view had already applied are read
again from the topic's beginning and held back until caught up (older ones must not reach
the gate), but a record past what the view had applied of its partition is newer than
anything held for its key. Held back too, a "blocked" written while the broker was lost
reached the gate only once every partition was read again: seconds to minutes on a
decisions topic whose last hour is not compacted (a refresh per active scope every 0.25 s).
Pure logic: the real view, driven with encoded records and their partition and offset."""

from __future__ import annotations

from typing import Any

from app.events.compacted import CompactedView
from tests.unit.test_compacted_view_order import CODEC, Seen, decision, read, view


def put(
    v: CompactedView, key: str, record: dict[str, Any] | None, partition: int, offset: int
) -> None:
    value = None if record is None else CODEC.encode("BudgetDecision", record)
    v._apply(key.encode(), value, partition, offset)


def test_a_record_past_what_was_applied_reaches_the_gate_during_a_re_read() -> None:
    seen = Seen()
    v = view(on_record=seen)
    v.begin_catch_up()
    open_ = decision("user:a", 0)
    put(v, "user:a", decision("user:a", 0), 0, 0)
    put(v, "user:a", open_, 0, 1)
    v.caught_up({0: 2, 1: 0})
    assert v.records["user:a"] == read(open_)
    v.begin_catch_up()  # the broker was lost; partition 1 has much to read again
    put(v, "user:a", decision("user:a", 0), 0, 0)  # read again: held back
    put(v, "user:a", open_, 0, 1)
    assert seen.calls[-1] == ("user:a", read(open_))
    blocked = decision("user:a", 12_000_000)
    put(v, "user:a", blocked, 0, 2)  # written while the broker was lost
    assert v.records["user:a"] == read(blocked), "a newer blocked held back until caught up"
    assert seen.calls[-1] == ("user:a", read(blocked))
    v.caught_up({0: 3, 1: 50_000})
    assert v.records["user:a"] == read(blocked)
    assert seen.calls[-1] == ("user:a", read(blocked))


def test_a_re_read_after_a_start_from_the_saved_view_holds_everything_back() -> None:
    """Records restored from the saved view have no offsets: nothing is known newer."""
    seen = Seen()
    v = view(on_record=seen)
    blocked = decision("user:a", 12_000_000)
    v.records["user:a"] = read(blocked)
    v.begin_catch_up()
    put(v, "user:a", decision("user:a", 0), 0, 5)
    assert v.records["user:a"] == read(blocked)
    assert seen.calls == []
