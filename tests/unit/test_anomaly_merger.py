"""The anomaly agent interleaves usage partitions by event time before the models see them."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from agents.anomaly.agent import Checkpoint, EventTimeMerger, stable_event_id

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def rec(minute: float) -> dict:
    return {"ts": T0 + timedelta(minutes=minute)}


def test_a_partition_read_far_ahead_waits_for_the_others() -> None:
    merger = EventTimeMerger()
    for offset, minute in enumerate([0, 10, 20, 30]):  # one big fetch of partition 0
        merger.add(0, offset, rec(minute))
    assert merger.release(lagging={0, 1}) == []  # partition 1 has unread data, none read yet
    for offset, minute in enumerate([5, 15]):
        merger.add(1, offset, rec(minute))
    released = merger.release(lagging={0, 1})
    assert [(p, o) for p, o, _ in released] == [(0, 0), (1, 0), (0, 1), (1, 1)]  # up to minute 15
    assert merger.pending_count == 2
    # Partition 1 is caught up: it holds nothing back any more.
    assert [(p, o) for p, o, _ in merger.release(lagging={0})] == [(0, 2), (0, 3)]


def test_records_of_one_partition_stay_in_offset_order() -> None:
    merger = EventTimeMerger()
    merger.add(0, 0, rec(2))
    merger.add(0, 1, rec(1))  # slightly late event
    merger.add(1, 0, rec(1.5))
    released = merger.release(lagging={0, 1})
    # partition 0's head (minute 2) is past partition 1's frontier (1.5): it waits.
    assert [(p, o) for p, o, _ in released] == [(1, 0)]
    assert [(p, o) for p, o, _ in merger.release(lagging=set())] == [(0, 1), (0, 0)]


def test_checkpoint_round_trip_and_stable_alert_ids() -> None:
    checkpoint = Checkpoint(engine=b"\x00" * 1000, offsets={0: 12, 3: 7}, saved_at="now")
    again = Checkpoint.decode(checkpoint.encode())
    assert (again.engine, again.offsets) == (checkpoint.engine, checkpoint.offsets)
    alert = {"alert_key": "volume_spike|global", "status": "firing", "first_seen": T0}
    assert stable_event_id(alert) == stable_event_id(dict(alert))
    assert stable_event_id(alert) != stable_event_id({**alert, "status": "resolved"})
