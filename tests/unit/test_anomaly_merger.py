"""The anomaly agent interleaves usage partitions by event time before the models see them."""

from __future__ import annotations

import time
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
    # Partition 1 is caught up and has been silent past the idle timeout: it holds nothing
    # back any more.
    later = time.monotonic() + merger.idle_timeout_s + 1
    assert [(p, o) for p, o, _ in merger.release(lagging={0}, now=later)] == [(0, 2), (0, 3)]


def test_records_of_one_partition_stay_in_offset_order() -> None:
    merger = EventTimeMerger()
    merger.add(0, 0, rec(2))
    merger.add(0, 1, rec(1))  # slightly late event
    merger.add(1, 0, rec(1.5))
    released = merger.release(lagging={0, 1})
    # partition 0's head (minute 2) is past partition 1's frontier (1.5): it waits.
    assert [(p, o) for p, o, _ in released] == [(1, 0)]
    later = time.monotonic() + merger.idle_timeout_s + 1
    assert [(p, o) for p, o, _ in merger.release(lagging=set(), now=later)] == [(0, 1), (0, 0)]


def test_checkpoint_round_trip_and_stable_alert_ids() -> None:
    checkpoint = Checkpoint(engine=b"\x00" * 1000, offsets={0: 12, 3: 7}, saved_at="now")
    again = Checkpoint.decode(checkpoint.encode())
    assert (again.engine, again.offsets) == (checkpoint.engine, checkpoint.offsets)
    alert = {"alert_key": "volume_spike|global", "status": "firing", "first_seen": T0}
    assert stable_event_id(alert) == stable_event_id(dict(alert))
    assert stable_event_id(alert) != stable_event_id({**alert, "status": "resolved"})


def test_a_caught_up_partition_holds_back_others_until_it_is_idle() -> None:
    """Issue 12: a partition with no unread data *right now* may still be about to receive
    records of the same minutes (a replay producing to every partition): it holds the
    others back until it has been silent for the idle timeout."""
    merger = EventTimeMerger(idle_timeout_s=5.0)
    merger.add(1, 0, rec(1), now=100.0)  # partition 1: read up to minute 1, caught up
    for offset, minute in enumerate([1, 2, 3, 4]):  # partition 0: one fetch spanning minutes
        merger.add(0, offset, rec(minute), now=100.5)
    released = merger.release(lagging=set(), now=101.0)
    assert sorted((p, o) for p, o, _ in released) == [(0, 0), (1, 0)]  # up to minute 1 only
    merger.add(1, 1, rec(2.5), now=102.0)  # partition 1's next records arrive
    released = merger.release(lagging=set(), now=102.0)
    assert [(p, o) for p, o, _ in released] == [(0, 1), (1, 1)]  # up to minute 2.5
    # Partition 1 then stays silent: after the idle timeout it holds nothing back.
    assert merger.release(lagging=set(), now=106.9) == []
    assert [(p, o) for p, o, _ in merger.release(lagging=set(), now=107.1)] == [(0, 2), (0, 3)]


def test_the_event_clock_follows_the_wall_clock_only_for_a_live_stream() -> None:
    """Issue 12, observation 5: after a replay of history an idle agent must not jump to the
    wall clock (closing days of silent minutes and evicting every user)."""
    from agents.anomaly.agent import EventClock

    clock = EventClock(live_lag_s=300.0)
    wall = T0 + timedelta(days=3)
    clock.observe(T0 + timedelta(minutes=30), wall)  # history: 3 days behind the wall clock
    assert clock.idle_now(wall + timedelta(minutes=10)) is None
    live = wall - timedelta(seconds=2)
    clock.observe(live, wall)  # a live record, 2 s old when read
    later = clock.idle_now(wall + timedelta(seconds=30))
    assert (
        later is not None and abs((later - (live + timedelta(seconds=30))).total_seconds()) < 1e-6
    )


def test_a_partition_written_to_lately_holds_back_however_long_the_agent_was_busy() -> None:
    """Probe 57: the agent, busy for longer than the idle timeout with other partitions'
    records, took a partition it had not fetched meanwhile for a silent one. Silence is
    the broker's: a partition whose newest record was written within the timeout (its
    Kafka timestamp) holds the others back, whenever the agent last got round to it."""
    merger = EventTimeMerger(idle_timeout_s=5.0)
    merger.add(1, 0, rec(1), now=100.0, written_s=1000.0)
    for offset, minute in enumerate([1, 2, 3]):
        merger.add(0, offset, rec(minute), now=100.0, written_s=1000.0)
    # 11 s of processing later (monotonic), the replay still writing (wall 1003 s):
    released = merger.release(lagging=set(), now=111.0, wall=1003.0)
    assert sorted((p, o) for p, o, _ in released) == [(0, 0), (1, 0)]  # up to minute 1 only
    # The broker's partition 1 has been silent for the timeout: it holds nothing back.
    released = merger.release(lagging=set(), now=111.0, wall=1005.1)
    assert [(p, o) for p, o, _ in released] == [(0, 1), (0, 2)]


def test_a_write_clock_far_ahead_does_not_hold_the_others_for_as_long() -> None:
    """A producer on a machine whose clock is an hour ahead: its partition's Kafka
    timestamps do not hold the others back for an hour once it is silent."""
    merger = EventTimeMerger(idle_timeout_s=5.0)
    merger.add(1, 0, rec(1), now=100.0, written_s=1000.0 + 3600)
    for offset, minute in enumerate([1, 2]):
        merger.add(0, offset, rec(minute), now=100.0, written_s=1000.0)
    released = merger.release(lagging=set(), now=106.0, wall=1006.0)
    assert sorted((p, o) for p, o, _ in released) == [(0, 0), (0, 1), (1, 0)]  # all of it
