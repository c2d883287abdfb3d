"""How a report range is covered: coarsest whole buckets, finer ones at the edges, raw last."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta

from app.warehouse.reports import USAGE, USAGE_BY_USER, _plan

T = datetime(2026, 3, 10, tzinfo=UTC)
NOW = T + timedelta(days=1)


def tables(segments: list) -> list[tuple[str, datetime, datetime]]:
    return [(level.table if level else "raw", s, e) for level, s, e in segments]


def test_a_range_is_covered_exactly_once_coarse_to_fine() -> None:
    start = T + timedelta(hours=1, minutes=30, seconds=15)
    end = T + timedelta(hours=5, minutes=2, seconds=5)
    plan = tables(_plan(start, end, USAGE.levels, NOW))
    assert plan == [
        ("raw", start, T + timedelta(hours=1, minutes=31)),
        ("usage_minute", T + timedelta(hours=1, minutes=31), T + timedelta(hours=2)),
        ("usage_hour", T + timedelta(hours=2), T + timedelta(hours=5)),
        ("usage_minute", T + timedelta(hours=5), T + timedelta(hours=5, minutes=2)),
        ("raw", T + timedelta(hours=5, minutes=2), end),
    ]
    # contiguous, no gap, no overlap
    assert all(a[2] == b[1] for a, b in itertools.pairwise(plan))


def test_a_short_lived_rollup_is_used_only_where_it_is_complete() -> None:
    start, end = T - timedelta(days=3, minutes=30), T + timedelta(minutes=30)
    plan = tables(_plan(start, end, USAGE_BY_USER.levels, NOW))
    # Older than 2 days before NOW: per-user-minute rows may be gone (TTL), so raw is read.
    assert ("raw", start, T - timedelta(days=3)) == plan[0]
    assert ("usage_user_minute", T, T + timedelta(minutes=30)) == plan[-1]
    assert not any(t == "usage_user_minute" and s < NOW - timedelta(days=2) for t, s, _ in plan)


def test_aligned_ranges_read_no_raw_rows() -> None:
    plan = tables(_plan(T, T + timedelta(days=30), USAGE.levels, NOW))
    assert plan == [("usage_hour", T, T + timedelta(days=30))]
