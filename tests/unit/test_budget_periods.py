"""Where a budget period starts and ends: UTC months, local days across DST, odd offsets, windows."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from app.budgets.periods import Period, PeriodError, period_of


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)  # type: ignore[misc]


@pytest.mark.parametrize(
    ("ts", "start", "end"),
    [
        (utc(2026, 1, 15, 12), utc(2026, 1, 1), utc(2026, 2, 1)),
        (utc(2026, 2, 28, 23, 59, 59), utc(2026, 2, 1), utc(2026, 3, 1)),
        (utc(2028, 2, 29, 8), utc(2028, 2, 1), utc(2028, 3, 1)),  # leap year
        (utc(2026, 12, 31, 23, 59, 59), utc(2026, 12, 1), utc(2027, 1, 1)),
        (utc(2027, 1, 1), utc(2027, 1, 1), utc(2027, 2, 1)),
    ],
)
def test_utc_month_boundaries_including_december_to_january(
    ts: datetime, start: datetime, end: datetime
) -> None:
    period = period_of("month", ts)
    assert (period.start, period.end) == (start, end)
    assert period.contains(ts)
    assert period.start.tzinfo is not None and period.start.utcoffset() == timedelta(0)


def test_the_last_instant_of_december_and_the_first_of_january_are_in_different_months() -> None:
    december = period_of("month", utc(2026, 12, 31, 23, 59, 59, 999999))
    january = period_of("month", utc(2027, 1, 1))
    assert december.end == january.start == utc(2027, 1, 1)
    assert december.id == "month:2026-12-01T00:00:00+00:00"
    assert january.id == "month:2027-01-01T00:00:00+00:00"
    assert not december.contains(january.start)  # the end is exclusive


def test_utc_day_boundaries() -> None:
    period = period_of("day", utc(2026, 12, 31, 23, 30))
    assert (period.start, period.end) == (utc(2026, 12, 31), utc(2027, 1, 1))


def test_new_york_spring_forward_day_lasts_23_hours() -> None:
    # 2026-03-08: clocks jump from 02:00 EST to 03:00 EDT.
    period = period_of("day", utc(2026, 3, 8, 12), "America/New_York")
    assert period.start == utc(2026, 3, 8, 5)  # midnight EST (-05:00)
    assert period.end == utc(2026, 3, 9, 4)  # midnight EDT (-04:00)
    assert period.end - period.start == timedelta(hours=23)


def test_new_york_fall_back_day_lasts_25_hours() -> None:
    # 2026-11-01: clocks fall back from 02:00 EDT to 01:00 EST.
    period = period_of("day", utc(2026, 11, 1, 12), "America/New_York")
    assert period.start == utc(2026, 11, 1, 4)  # midnight EDT
    assert period.end == utc(2026, 11, 2, 5)  # midnight EST
    assert period.end - period.start == timedelta(hours=25)


@pytest.mark.parametrize(
    "ts",
    [
        utc(2026, 11, 1, 5, 30),  # 01:30 EDT, the first time 01:30 happens
        utc(2026, 11, 1, 6, 30),  # 01:30 EST, the second time
        utc(2026, 11, 2, 4, 59, 59),  # 23:59:59 EST
    ],
)
def test_every_instant_of_the_25_hour_day_belongs_to_it(ts: datetime) -> None:
    assert period_of("day", ts, "America/New_York").start == utc(2026, 11, 1, 4)


def test_new_york_day_before_midnight_local_is_the_previous_day() -> None:
    # 04:59Z on March 8 is 23:59 EST on March 7.
    period = period_of("day", utc(2026, 3, 8, 4, 59), "America/New_York")
    assert (period.start, period.end) == (utc(2026, 3, 7, 5), utc(2026, 3, 8, 5))
    assert period_of("day", utc(2026, 3, 8, 5), "America/New_York").start == utc(2026, 3, 8, 5)


def test_new_york_month_spanning_dst_change_starts_and_ends_at_local_midnight() -> None:
    period = period_of("month", utc(2026, 3, 20), "America/New_York")
    assert period.start == utc(2026, 3, 1, 5)
    assert period.end == utc(2026, 4, 1, 4)


def test_kolkata_month_an_evening_utc_event_belongs_to_the_next_local_month() -> None:
    # 2026-10-31T19:00Z is 2026-11-01T00:30 in Asia/Kolkata (+05:30).
    period = period_of("month", utc(2026, 10, 31, 19), "Asia/Kolkata")
    assert period.start == utc(2026, 10, 31, 18, 30)
    assert period.end == utc(2026, 11, 30, 18, 30)
    assert period.id == "month:2026-10-31T18:30:00+00:00"
    # ...while in UTC the same event is still in October.
    assert period_of("month", utc(2026, 10, 31, 19)).start == utc(2026, 10, 1)


def test_kolkata_month_just_before_local_midnight_is_still_october() -> None:
    period = period_of("month", utc(2026, 10, 31, 18, 29, 59), "Asia/Kolkata")
    assert (period.start, period.end) == (utc(2026, 9, 30, 18, 30), utc(2026, 10, 31, 18, 30))


def test_non_utc_input_timestamps_are_handled_as_instants() -> None:
    ist = timezone(timedelta(hours=5, minutes=30))
    same_instant = datetime(2026, 11, 1, 0, 30, tzinfo=ist)
    assert period_of("month", same_instant, "Asia/Kolkata") == period_of(
        "month", utc(2026, 10, 31, 19), "Asia/Kolkata"
    )
    assert period_of("month", same_instant).start == utc(2026, 10, 1)


@pytest.mark.parametrize(
    ("ts", "window", "start"),
    [
        (utc(2026, 5, 4, 10, 17, 33), 3600, utc(2026, 5, 4, 10)),
        (utc(2026, 5, 4, 10, 0), 3600, utc(2026, 5, 4, 10)),
        (utc(2026, 5, 4, 10, 59, 59, 999000), 3600, utc(2026, 5, 4, 10)),
        (utc(2026, 5, 4, 10, 17, 33), 900, utc(2026, 5, 4, 10, 15)),
        (utc(2026, 5, 4, 10, 17, 33), 86400, utc(2026, 5, 4)),
        (utc(2026, 5, 4, 10, 17, 33), 60, utc(2026, 5, 4, 10, 17)),
    ],
)
def test_windows_are_aligned_to_the_epoch(ts: datetime, window: int, start: datetime) -> None:
    period = period_of("window", ts, window_seconds=window)
    assert period.start == start
    assert period.end == start + timedelta(seconds=window)
    assert int(period.start.timestamp()) % window == 0
    assert period.contains(ts)


def test_window_alignment_ignores_the_time_zone() -> None:
    ts = utc(2026, 5, 4, 10, 17, 33)
    assert period_of("window", ts, "Asia/Kolkata", 3600) == period_of("window", ts, "UTC", 3600)


def test_odd_window_length_is_still_epoch_aligned() -> None:
    ts = utc(2026, 5, 4, 10, 17, 33)
    period = period_of("window", ts, window_seconds=7 * 60)
    epoch = int(ts.timestamp())
    assert int(period.start.timestamp()) == epoch - epoch % 420
    assert period.start <= ts < period.end


def test_a_late_event_lands_in_the_period_of_its_own_timestamp() -> None:
    # An event from 23:59:58 on Oct 31 processed in November still belongs to October.
    late = utc(2026, 10, 31, 23, 59, 58)
    assert period_of("month", late) == Period("month", utc(2026, 10, 1), utc(2026, 11, 1))
    assert period_of("day", late).start == utc(2026, 10, 31)
    assert period_of("window", late, window_seconds=3600).start == utc(2026, 10, 31, 23)


def test_consecutive_periods_tile_without_gaps() -> None:
    period = period_of("day", utc(2026, 10, 25, 12), "Europe/Paris")  # 25-hour day in Paris
    for _ in range(20):
        following = period_of("day", period.end, "Europe/Paris")
        assert following.start == period.end
        period = following


@pytest.mark.parametrize("tz", ["Mars/Olympus_Mons", "", "../etc/passwd", "Not A Zone"])
def test_unknown_time_zone_is_a_period_error(tz: str) -> None:
    with pytest.raises(PeriodError, match="time zone"):
        period_of("day", utc(2026, 1, 1), tz)


@pytest.mark.parametrize("kind", ["year", "week", "", "Month"])
def test_unknown_period_kind_is_a_period_error(kind: str) -> None:
    with pytest.raises(PeriodError, match="unknown period"):
        period_of(kind, utc(2026, 1, 1))


@pytest.mark.parametrize("window", [None, 0, 30, 59])
def test_missing_or_too_short_window_is_a_period_error(window: int | None) -> None:
    with pytest.raises(PeriodError, match="window_seconds"):
        period_of("window", utc(2026, 1, 1), window_seconds=window)


def test_naive_timestamp_is_a_period_error() -> None:
    with pytest.raises(PeriodError, match="timezone-aware"):
        period_of("month", datetime(2026, 1, 1))


def test_period_error_is_a_value_error() -> None:
    assert issubclass(PeriodError, ValueError)
