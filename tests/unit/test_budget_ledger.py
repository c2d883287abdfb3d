"""Spend buckets: any budget period, in any time zone, summed exactly from the buckets still kept."""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.budgets.ledger import (
    DAY_S,
    BucketId,
    CoverageError,
    bucket_key,
    buckets_of,
    cover,
    expired,
    parse_key,
    period_total,
)
from app.budgets.periods import period_of
from app.budgets.policy import PolicyError, parse_policy

# Zones with offsets of whole hours, half hours (India, Newfoundland), 45 minutes (Nepal,
# Chatham), DST both ways, and the date line.
ZONES = [
    "UTC",
    "Europe/Paris",
    "America/New_York",
    "America/St_Johns",
    "Asia/Kolkata",
    "Asia/Kathmandu",
    "Pacific/Chatham",
    "Pacific/Kiritimati",
    "Pacific/Pago_Pago",
    "Australia/Adelaide",
    "Australia/Lord_Howe",
]
# Windows the policy parser accepts, one of each coverage regime.
WINDOWS = [60, 300, 3600, 7140, 7200, 3 * 3600, 47 * 3600, 86_400, 2 * 86_400, 7 * 86_400]


def kept_buckets(events: list[tuple[int, int]], now_s: int) -> dict[BucketId, int]:
    """What the spend worker holds at ``now_s`` after adding ``events`` and expiring buckets."""
    totals: dict[BucketId, int] = defaultdict(int)
    for ts_ms, nanos in events:
        for bucket in buckets_of(ts_ms):
            totals[bucket] += nanos
    return {b: n for b, n in totals.items() if not expired(b, now_s)}


@settings(max_examples=400, deadline=None)
@given(
    month_start=st.integers(2025, 2030).flatmap(
        lambda y: st.integers(1, 12).map(lambda m: datetime(y, m, 1, tzinfo=UTC))
    ),
    since_month_start_s=st.one_of(
        st.integers(-2 * DAY_S, 2 * DAY_S), st.integers(-31 * DAY_S, 31 * DAY_S)
    ),
    near_start=st.lists(
        st.tuples(st.integers(-3 * 3600 * 1000, 3 * 3600 * 1000), st.integers(1, 10**9)),
        max_size=30,
    ),
    anywhere=st.lists(
        st.tuples(st.integers(-40 * DAY_S * 1000, 3_600_000), st.integers(1, 10**9)),
        max_size=30,
    ),
    zone=st.sampled_from(ZONES),
    kind=st.sampled_from(["day", "month", "window"]),
    window=st.sampled_from(WINDOWS),
)
def test_any_current_period_is_the_exact_sum_of_its_events(
    month_start: datetime,
    since_month_start_s: int,
    near_start: list[tuple[int, int]],
    anywhere: list[tuple[int, int]],
    zone: str,
    kind: str,
    window: int,
) -> None:
    now = month_start + timedelta(seconds=since_month_start_s)
    now_s = int(now.timestamp())
    period = period_of(kind, now, zone, window if kind == "window" else None)
    start_ms = int(period.start.timestamp() * 1000)
    end_ms = int(period.end.timestamp() * 1000)
    # Events just around the period's start (where coverage switches granularity) and anywhere
    # in the last 40 days; never after now + 1 h (the clock-skew bound of ingestion).
    events = [(start_ms + delta, n) for delta, n in near_start if start_ms + delta <= now_s * 1000]
    events += [(now_s * 1000 + delta, n) for delta, n in anywhere]
    expected = sum(n for ts, n in events if start_ms <= ts < end_ms)
    kept = kept_buckets(events, now_s)
    assert period_total(lambda b: kept.get(b, 0), period.start, period.end) == expected


@given(start=st.integers(0, 10**8), length=st.integers(0, 10**6))
def test_cover_tiles_the_range_without_gaps_or_overlaps(start: int, length: int) -> None:
    start_s, end_s = start * 60, (start + length) * 60
    tiles = cover(start_s, end_s)
    t = start_s
    for tile in tiles:
        assert tile.start_s == t
        t = tile.end_s
    assert t == end_s


def test_a_month_in_utc_is_whole_days_and_in_kolkata_starts_on_a_quarter_hour() -> None:
    now = datetime(2026, 12, 15, tzinfo=UTC)
    utc = period_of("month", now, "UTC")
    assert {b.granularity for b in cover(int(utc.start.timestamp()), int(utc.end.timestamp()))} == {
        "d"
    }
    india = period_of("month", now, "Asia/Kolkata")
    tiles = cover(int(india.start.timestamp()), int(india.end.timestamp()))
    assert india.start == datetime(2026, 11, 30, 18, 30, tzinfo=UTC)
    assert tiles[0] == BucketId("q", int(india.start.timestamp()))
    assert sum(1 for t in tiles if t.granularity == "d") == 30


def test_unaligned_bounds_are_refused() -> None:
    with pytest.raises(CoverageError):
        cover(30, 120)


def test_keys_round_trip_even_when_the_scope_holds_the_separator() -> None:
    bucket = BucketId("q", 1_764_547_200)
    key = bucket_key("user:a|b", bucket, 4)
    assert parse_key(key) == ("user:a|b", bucket, 4)


def test_buckets_of_an_event_are_its_minute_quarter_and_day() -> None:
    ts = datetime(2026, 12, 1, 20, 44, 59, 999_000, tzinfo=UTC)
    minute, quarter, day = sorted(buckets_of(int(ts.timestamp() * 1000)), key=lambda b: -b.end_s)
    assert {b.granularity: b.start_s for b in (minute, quarter, day)} == {
        "m": int(datetime(2026, 12, 1, 20, 44, tzinfo=UTC).timestamp()),
        "q": int(datetime(2026, 12, 1, 20, 30, tzinfo=UTC).timestamp()),
        "d": int(datetime(2026, 12, 1, tzinfo=UTC).timestamp()),
    }


def test_old_buckets_expire_but_quarter_hours_near_a_month_start_are_kept_longer() -> None:
    now = int(datetime(2026, 12, 20, tzinfo=UTC).timestamp())
    ordinary = int(datetime(2026, 12, 10, 12, tzinfo=UTC).timestamp())
    near_start = int(datetime(2026, 11, 30, 20, tzinfo=UTC).timestamp())
    assert expired(BucketId("q", ordinary), now)
    assert not expired(BucketId("q", near_start), now)
    assert not expired(BucketId("d", ordinary), now)
    assert expired(BucketId("m", now - 4 * 3600), now)
    assert expired(BucketId("d", now - 70 * DAY_S), now)
    assert expired(BucketId("q", near_start), now + 45 * DAY_S)


@pytest.mark.parametrize(
    ("window", "ok"),
    [("90s", False), ("5m", True), ("2h", True), ("125m", False), ("3h", True), ("49h", False),
     ("2d", True), ("7d", True), ("62d", True), ("63d", False)],
)  # fmt: skip
def test_window_policies_are_limited_to_what_the_buckets_can_cover(window: str, ok: bool) -> None:
    body = {"period": "window", "window": window, "limit_usd": 1}
    if ok:
        assert parse_policy("user:a", body).window_seconds
    else:
        with pytest.raises(PolicyError) as excinfo:
            parse_policy("user:a", body)
        assert excinfo.value.field == "window"


def test_a_period_ending_in_the_future_counts_future_stamped_events_inside_it() -> None:
    now = datetime(2026, 12, 1, 12, tzinfo=UTC)
    soon = int((now + timedelta(minutes=5)).timestamp() * 1000)
    kept = kept_buckets([(soon, 7)], int(now.timestamp()))
    day = period_of("day", now)
    assert period_total(lambda b: kept.get(b, 0), day.start, day.end) == 7


@pytest.mark.parametrize(
    ("zone", "spent_at"),
    [
        # Pago Pago (UTC-11): December starts at 11:00 UTC on the 1st, so the rest of that UTC day
        # is covered by quarter-hours, the last of them 24 h after the UTC month start.
        ("Pacific/Pago_Pago", datetime(2024, 12, 1, 23, 50, tzinfo=UTC)),
        # Kiritimati (UTC+14): December starts at 10:00 UTC on 30 November, so the rest of that
        # UTC day is covered by quarter-hours, the first of them 14 h before the UTC month start.
        ("Pacific/Kiritimati", datetime(2024, 11, 30, 10, 5, tzinfo=UTC)),
    ],
)
def test_a_month_in_a_far_zone_keeps_every_quarter_of_its_partial_utc_days(
    zone: str, spent_at: datetime
) -> None:
    # Found by the property above (a CI run): quarters more than 15 h from a UTC month start were
    # expired after 50 h, and a month in UTC-11 lost the spend of its first UTC evening.
    now = datetime(2024, 12, 29, 9, 0, tzinfo=UTC)
    period = period_of("month", now, zone)
    assert period.start <= spent_at < period.end
    kept = kept_buckets([(int(spent_at.timestamp() * 1000), 7)], int(now.timestamp()))
    assert period_total(lambda b: kept.get(b, 0), period.start, period.end) == 7
