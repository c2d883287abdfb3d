"""Period arithmetic: the one place that knows where a budget period starts and ends.

Calendar periods (``day``, ``month``) follow the policy's IANA time zone,
including DST changes (a local day can be 23 or 25 hours). ``window`` periods
are fixed-length windows aligned to the Unix epoch (e.g. every clock hour for
3600 s). Everything is computed from an event's own timestamp, never from the
arrival time, so a late event lands in the period it belongs to.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

PeriodKind = Literal["day", "month", "window"]
PERIOD_KINDS: tuple[PeriodKind, ...] = ("day", "month", "window")


class PeriodError(ValueError):
    """An unknown period kind, time zone or window length."""


@dataclass(frozen=True)
class Period:
    kind: PeriodKind
    start: datetime  # UTC
    end: datetime  # UTC, exclusive: the moment the next period starts (resets_at)

    @property
    def id(self) -> str:
        """Stable key of this period, e.g. ``month:2026-11-01T00:00:00+00:00``."""
        return f"{self.kind}:{self.start.isoformat()}"

    def contains(self, ts: datetime) -> bool:
        return self.start <= ts < self.end


@lru_cache(maxsize=512)
def zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        # (OSError: a folder of the zone database such as 'America', a name too long for
        # the file system; a newcomer's probe got a 500 from the dispatcher)
        raise PeriodError(
            f"unknown time zone {name!r}; use an IANA name such as 'Europe/Paris'"
        ) from None


def period_of(
    kind: str, ts: datetime, timezone: str = "UTC", window_seconds: int | None = None
) -> Period:
    """The period of ``kind`` that contains ``ts`` (an aware datetime)."""
    if ts.tzinfo is None:
        raise PeriodError("timestamps must be timezone-aware")
    if kind == "window":
        if not window_seconds or window_seconds < 60:
            raise PeriodError("a window period needs window_seconds >= 60")
        epoch_s = int(ts.timestamp())
        start_s = epoch_s - epoch_s % window_seconds
        start = datetime.fromtimestamp(start_s, UTC)
        return Period("window", start, start + timedelta(seconds=window_seconds))
    tz = zone(timezone)
    local = ts.astimezone(tz)
    if kind == "day":
        start_local = datetime(local.year, local.month, local.day, tzinfo=tz)
        nxt = start_local.date() + timedelta(days=1)
        end_local = datetime(nxt.year, nxt.month, nxt.day, tzinfo=tz)
    elif kind == "month":
        start_local = datetime(local.year, local.month, 1, tzinfo=tz)
        year, month = (local.year + 1, 1) if local.month == 12 else (local.year, local.month + 1)
        end_local = datetime(year, month, 1, tzinfo=tz)
    else:
        raise PeriodError(f"unknown period {kind!r}; use day, month or window")
    return Period(kind, start_local.astimezone(UTC), end_local.astimezone(UTC))  # type: ignore[arg-type]
