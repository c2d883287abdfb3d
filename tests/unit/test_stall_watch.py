"""StallWatch: which partitions the spend worker fetches again (issue 10).

A partition is fetched again only when it has had records left, nothing in flight and the
same position for ``stall_s``; a partition that moves, is busy or has nothing left never is.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from agents.spend import StallWatch


def test_a_partition_that_does_not_move_is_reported_once_per_period() -> None:
    watch = StallWatch(10.0)
    assert not watch.check("p", 5, 9, False, now=0.0)
    assert not watch.check("p", 5, 9, False, now=9.9)
    assert watch.check("p", 5, 9, False, now=10.0)
    assert not watch.check("p", 5, 9, False, now=15.0)  # the clock started again
    assert watch.check("p", 5, 9, False, now=20.0)


def test_moving_busy_or_caught_up_partitions_are_never_reported() -> None:
    watch = StallWatch(1.0)
    for t in range(100):
        assert not watch.check("moving", t, 1000, False, now=float(t))
        assert not watch.check("busy", 3, 1000, True, now=float(t))
        assert not watch.check("caught-up", 7, 7, False, now=float(t))


def test_busy_restarts_the_clock() -> None:
    watch = StallWatch(10.0)
    assert not watch.check("p", 5, 9, False, now=0.0)
    assert not watch.check("p", 5, 9, True, now=8.0)  # a batch in flight: progress expected
    assert not watch.check("p", 5, 9, False, now=12.0)
    assert watch.check("p", 5, 9, False, now=22.0)


def test_forgotten_partitions_start_over() -> None:
    watch = StallWatch(10.0)
    watch.check("p", 5, 9, False, now=0.0)
    watch.keep_only(["q"])
    assert not watch.check("p", 5, 9, False, now=11.0)


steps = st.lists(
    st.tuples(
        st.integers(0, 3),  # position
        st.integers(0, 4),  # end
        st.booleans(),  # busy
        st.floats(0, 6, allow_nan=False),  # time since the previous check
    ),
    max_size=60,
)


@given(steps)
def test_reported_only_after_a_full_period_without_progress(checks: list) -> None:
    """Model: a report needs, since the last report or change (position moved, busy, nothing
    left), at least ``stall_s`` of checks all at the same position with records left."""
    stall_s = 5.0
    watch = StallWatch(stall_s)
    now = 0.0
    quiet_since: float | None = None
    quiet_at: int | None = None
    for position, end, busy, dt in checks:
        now += dt
        reported = watch.check("p", position, end, busy, now)
        if position >= end or busy:
            assert not reported
            quiet_since = quiet_at = None
            continue
        if quiet_since is None or quiet_at != position:
            assert not reported
            quiet_since, quiet_at = now, position
            continue
        assert reported == (now - quiet_since >= stall_s)
        if reported:
            quiet_since = now
