"""Spend buckets: how spend is kept so that any budget period can be summed exactly.

Owns the bucket granularities (minute, quarter-hour, UTC day), how long each is
kept, their table keys, and how a budget period — a calendar day or month in
any IANA time zone, or an epoch-aligned window — is covered exactly by kept
buckets. So a cap set mid-month counts the month's spend so far in its own time
zone, without a bucket per policy and without an unbounded table.

Why these three: every IANA zone's offset today is a multiple of 15 minutes, so
a local midnight is always a UTC quarter-hour; whole UTC days cover the middle
of any day or month; minutes cover short windows. Quarter-hours are kept for
two days (any local day started less than 38 hours ago) and, on the first and
the last UTC day of every month, for 40 days: a local month starts between 14
hours before (UTC+14) and 12 hours after (UTC-12) a UTC month start, and the
rest of that partial UTC day is covered by quarter-hours too — up to 24 hours
from the UTC month start, not only the hours between the two starts. Does not own which scopes an event spends against (``policy.scopes_of``)
or the tables themselves (the spend worker).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

MINUTE_S = 60
QUARTER_S = 900
DAY_S = 86_400
GRANULARITIES: tuple[tuple[str, int], ...] = (("d", DAY_S), ("q", QUARTER_S), ("m", MINUTE_S))
SIZE_OF = dict(GRANULARITIES)

MINUTE_KEEP_S = 3 * 3600  # windows up to 2 h, plus margin for late events
QUARTER_KEEP_S = 50 * 3600  # local days (start < 38 h ago), windows up to 2 days
QUARTER_NEAR_MONTH_KEEP_S = 40 * DAY_S
DAY_KEEP_S = 65 * DAY_S

# What a window period may be so that kept buckets always cover it (see policy parsing).
WINDOW_MAX_MINUTES_S = 2 * 3600
WINDOW_MAX_QUARTERS_S = 2 * DAY_S
WINDOW_MAX_S = 62 * DAY_S


class CoverageError(ValueError):
    """A period that kept buckets cannot cover (misaligned bounds)."""


@dataclass(frozen=True)
class BucketId:
    granularity: str  # "m" | "q" | "d"
    start_s: int  # epoch seconds, aligned to the granularity

    @property
    def end_s(self) -> int:
        return self.start_s + SIZE_OF[self.granularity]

    def key(self, scope: str, partition: int) -> str:
        return bucket_key(scope, self, partition)

    def short(self) -> str:
        return f"{self.granularity}|{self.start_s}"


def bucket_key(scope: str, bucket: BucketId, partition: int) -> str:
    """``<scope>|<g>|<start>|p<partition>``; a scope may itself contain ``|``."""
    return f"{scope}|{bucket.granularity}|{bucket.start_s}|p{partition}"


def parse_key(key: str) -> tuple[str, BucketId, int]:
    scope, granularity, start, partition = key.rsplit("|", 3)
    return scope, BucketId(granularity, int(start)), int(partition[1:])


def parse_short(text: str) -> BucketId:
    granularity, start = text.split("|")
    return BucketId(granularity, int(start))


def buckets_of(ts_ms: int) -> tuple[BucketId, ...]:
    """The buckets an event at ``ts_ms`` adds to: its minute, quarter-hour and UTC day."""
    ts_s = ts_ms // 1000
    return tuple(BucketId(g, ts_s - ts_s % size) for g, size in GRANULARITIES)


def cover(start_s: int, end_s: int) -> list[BucketId]:
    """The coarsest buckets that tile ``[start_s, end_s)`` exactly (bounds on whole minutes)."""
    if start_s % MINUTE_S or end_s % MINUTE_S:
        raise CoverageError(f"period [{start_s}, {end_s}) is not on whole minutes")
    out: list[BucketId] = []
    t = start_s
    while t < end_s:
        for granularity, size in GRANULARITIES:
            if t % size == 0 and t + size <= end_s:
                out.append(BucketId(granularity, t))
                t += size
                break
    return out


def _on_a_utc_day_around_a_month_start(ts_s: int) -> bool:
    """Whether ``ts_s`` falls on the first or the last UTC day of a month.

    Those are the UTC days a local month start can cut in two; the part of them inside
    the month is covered by quarter-hours, all the way to the UTC midnight.
    """
    day = datetime.fromtimestamp(ts_s, UTC)
    return day.day == 1 or (day + timedelta(days=1)).day == 1


def expired(bucket: BucketId, now_s: int) -> bool:
    """Whether no period that kept buckets must cover can still need ``bucket``."""
    age = now_s - bucket.end_s
    if bucket.granularity == "m":
        return age > MINUTE_KEEP_S
    if bucket.granularity == "d":
        return age > DAY_KEEP_S
    if age <= QUARTER_KEEP_S:
        return False
    return age > QUARTER_NEAR_MONTH_KEEP_S or not _on_a_utc_day_around_a_month_start(bucket.start_s)


def period_total(lookup: Callable[[BucketId], int], start: datetime, end: datetime) -> int:
    """Spend in ``[start, end)`` from the buckets ``lookup`` returns (0 for a missing one)."""
    return sum(lookup(b) for b in cover(int(start.timestamp()), int(end.timestamp())))


def iter_window_problems(window_seconds: int) -> Iterator[str]:
    """Why kept buckets could not cover an epoch-aligned window of this length (if they can't)."""
    if window_seconds % MINUTE_S:
        yield "a window must be a whole number of minutes"
    elif window_seconds > WINDOW_MAX_MINUTES_S and window_seconds % QUARTER_S:
        yield "a window longer than 2h must be a multiple of 15 minutes"
    elif window_seconds > WINDOW_MAX_QUARTERS_S and window_seconds % DAY_S:
        yield "a window longer than 2 days must be a whole number of days"
    elif window_seconds > WINDOW_MAX_S:
        yield "a window can be at most 62 days"
