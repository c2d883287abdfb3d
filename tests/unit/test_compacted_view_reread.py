"""A re-read after a lost broker (review 58): records the view had already applied are read
again from the topic's beginning and held back until caught up (older ones must not reach
the gate), but a record past what the view had applied of its partition is newer than
anything held for its key. Held back too, a "blocked" written while the broker was lost
reached the gate only once every partition was read again: seconds to minutes on a
decisions topic whose last hour is not compacted (a refresh per active scope every 0.25 s).
Pure logic: the real view, driven with encoded records and their partition and offset."""

from __future__ import annotations

from tests.unit.test_compacted_view_order import Seen, apply, decision, read, restored_view, view


def test_a_record_past_what_was_applied_reaches_the_gate_during_a_re_read() -> None:
    seen = Seen()
    v = view(on_record=seen)
    v.begin_catch_up()
    open_ = decision("user:a", 0)
    apply(v, "user:a", decision("user:a", 0), 0)
    apply(v, "user:a", open_, 1)
    v.caught_up({0: 2, 1: 0})
    assert v.records["user:a"] == read(open_)
    v.begin_catch_up()  # the broker was lost; partition 1 has much to read again
    apply(v, "user:a", decision("user:a", 0), 0)  # read again: held back
    apply(v, "user:a", open_, 1)
    assert seen.calls[-1] == ("user:a", read(open_))
    blocked = decision("user:a", 12_000_000)
    apply(v, "user:a", blocked, 2)  # written while the broker was lost
    assert v.records["user:a"] == read(blocked), "a newer blocked held back until caught up"
    assert seen.calls[-1] == ("user:a", read(blocked))
    v.caught_up({0: 3, 1: 50_000})
    assert v.records["user:a"] == read(blocked)
    assert seen.calls[-1] == ("user:a", read(blocked))


def test_a_re_read_after_a_start_from_the_saved_view_holds_everything_back() -> None:
    """Records restored from the saved view have no offsets: nothing is known newer."""
    blocked = decision("user:a", 12_000_000)
    v, seen = restored_view({"user:a": blocked})
    apply(v, "user:a", decision("user:a", 0), 5)
    assert v.records["user:a"] == read(blocked)
    assert seen.calls == []
