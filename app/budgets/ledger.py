"""Spend buckets: how spend is kept so that any budget period can be summed exactly.

Owns the bucket granularities (minute, quarter-hour, UTC day), how long each is
kept, their table keys, and how a budget period — a calendar day or month in
any IANA time zone, or an epoch-aligned window — is covered exactly by kept
buckets. So a cap set mid-month counts the month's spend so far in its own time
zone, without a bucket per policy and without an unbounded table.

Why these three: every IANA zone's offset today is a multiple of 15 minutes, so
a local midnight is always a UTC quarter-hour; whole UTC days cover the middle
of any day or month; minutes cover short windows. Quarter-hours are kept for
two days (any local day started less than 38 hours ago) and, around the start
of every UTC month (where local month starts fall, within 15 hours), for 40
days. Does not own which scopes an event spends against (``policy.scopes_of``)
or the tables themselves (the spend worker).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

MINUTE_S = 60
QUARTER_S = 900
DAY_S = 86_400
GRANULARITIES: tuple[tuple[str, int], ...] = (("d", DAY_S), ("q", QUARTER_S), ("m", MINUTE_S))
SIZE_OF = dict(GRANULARITIES)

MINUTE_KEEP_S = 3 * 3600  # windows up to 2 h, plus margin for late events
QUARTER_KEEP_S = 50 * 3600  # local days (start < 38 h ago), windows up to 2 days
QUARTER_NEAR_MONTH_START_S = 15 * 3600  # local month starts lie within 14 h of a UTC one
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


def _near_utc_month_start(ts_s: int) -> bool:
    moment = datetime.fromtimestamp(ts_s, UTC)
    this_month = datetime(moment.year, moment.month, 1, tzinfo=UTC)
    year, month = (moment.year + 1, 1) if moment.month == 12 else (moment.year, moment.month + 1)
    next_month = datetime(year, month, 1, tzinfo=UTC)
    distance = min(
        (moment - this_month).total_seconds(), (next_month - moment).total_seconds() - QUARTER_S
    )
    return distance <= QUARTER_NEAR_MONTH_START_S


def expired(bucket: BucketId, now_s: int) -> bool:
    """Whether no period that kept buckets must cover can still need ``bucket``."""
    age = now_s - bucket.end_s
    if bucket.granularity == "m":
        return age > MINUTE_KEEP_S
    if bucket.granularity == "d":
        return age > DAY_KEEP_S
    if age <= QUARTER_KEEP_S:
        return False
    return age > QUARTER_NEAR_MONTH_KEEP_S or not _near_utc_month_start(bucket.start_s)


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
