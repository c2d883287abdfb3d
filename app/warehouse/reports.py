"""Spend and ROI reports on the warehouse: one query module for the API, the CLI and dashboards.

Owns the SQL of every report (parameterized; no string-built filters) and the
finance sentence: "We processed N requests, would have cost $X at GPT-4 rates,
actually cost $Y — Z% savings." It does not own connections (``app.warehouse.clickhouse``).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from clickhouse_connect.driver.binding import DT64Param

# SUPERSEDED: the SQL test of a usage row of an attempt escalated to a dearer tier
from app.alerts_config import ALERT_KINDS, BUDGET_THRESHOLD
from app.ids import SUPERSEDED
from app.pricing.catalog import usd_text

MAX_RANGE = timedelta(days=400)


class ReportError(ValueError):
    """A bad report parameter; ``param`` names it."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


# What the warehouse can hold: rollup buckets are ClickHouse DateTime (1970 to 2106-02-07
# 06:28:15); the end leaves room to round a bucket up by a day.
EARLIEST = datetime(1970, 1, 1, tzinfo=UTC)
LATEST = datetime(2106, 2, 7, tzinfo=UTC)


def parse_time(value: str | None, param: str, default: datetime) -> datetime:
    """An ISO 8601 instant (UTC unless it says otherwise) inside [EARLIEST, LATEST]."""
    if value is None:
        return default
    if value == "":  # "to=" says something was meant: refuse it rather than guess the default
        raise ReportError(
            param, f"{param}= is empty: give an ISO 8601 date or time, or leave {param} out"
        )
    # RFC 3339 allows a lower-case t and z; a '+' of an offset sent unencoded in a URL
    # arrives as a space ("...T15:00:00 05:00"), and nothing else puts a space there.
    text = _DECODED_PLUS.sub(r"\1+\2", value.strip().upper())
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=UTC)
        in_range = EARLIEST <= parsed <= LATEST  # may overflow: year 1 at +01:00 is year 0 UTC
    except (ValueError, OverflowError):
        raise ReportError(param, f"{param}={value!r} is not an ISO 8601 date or time") from None
    if not in_range:
        raise ReportError(
            param,
            f"{param}={value!r} is outside the range the warehouse stores: "
            f"{EARLIEST.isoformat()} to {LATEST.isoformat()}",
        )
    return _ceil_ms(parsed)


_DECODED_PLUS = re.compile(r"^(.*\d[T ]\d{2}:\d{2}(?::\d{2}(?:[.,]\d+)?)?) (\d{2}:?\d{2})$")


def _ceil_ms(at: datetime) -> datetime:
    """``at`` on the warehouse's millisecond (``ts`` is DateTime64(3)), rounded up: for a
    millisecond ts, ``ts >= at`` and ``ts < at`` mean the same of both."""
    extra = at.microsecond % 1000
    return at if not extra else at + timedelta(microseconds=1000 - extra)


def bound(at: datetime) -> Any:
    """``at`` as a bound query parameter, its milliseconds kept: a datetime is bound to the
    whole second, so from=10:30:30.5 counted an event at 10:30:30.5 out and one at
    10:30:30.2 in (probe J)."""
    return DT64Param(at) if at.microsecond else at


def parse_since(value: str) -> timedelta:
    """'30d', '12h', '90m' → a timedelta."""
    units = {"d": "days", "h": "hours", "m": "minutes"}
    if len(value) < 2 or value[-1] not in units or not value[:-1].isdigit() or not value.isascii():
        raise ReportError("since", f"since={value!r}: use a number and d, h or m, e.g. 30d")
    amount = int(value[:-1]) if len(value) <= 12 else None
    if amount == 0:
        raise ReportError("since", f"since={value!r} is an empty range: give at least 1m")
    limit = MAX_RANGE // timedelta(**{units[value[-1]]: 1})
    if amount is None or amount > limit:
        raise ReportError(
            "since", f"since={value!r}: at most {MAX_RANGE.days} days ({limit}{value[-1]})"
        )
    return timedelta(**{units[value[-1]]: amount})


def _dollars(amount: Decimal) -> str:
    """Dollars to the cent; a non-zero amount under a cent to two significant digits."""
    if 0 < abs(amount) < Decimal("0.01"):
        return f"${amount:.{-amount.adjusted() + 1}f}"
    return f"${amount:,.2f}"


@dataclass(frozen=True)
class Range:
    start: datetime
    end: datetime

    @classmethod
    def parse(cls, start: str | None, end: str | None, now: datetime | None = None) -> Range:
        now = now or datetime.now(UTC)
        # Default end: the end of the current minute, so default ranges align with the rollups.
        end_at = parse_time(end, "to", _floor(now, MINUTE) + MINUTE)
        start_at = parse_time(start, "from", max(EARLIEST, end_at - timedelta(days=30)))
        if start_at >= end_at:
            raise ReportError("from", "from must be earlier than to")
        if end_at - start_at > MAX_RANGE:
            raise ReportError("from", f"the range is longer than {MAX_RANGE.days} days")
        return cls(start_at, end_at)

    def params(self) -> dict[str, Any]:
        return {"start": bound(self.start), "end": bound(self.end)}


MINUTE = timedelta(minutes=1)
HOUR = timedelta(hours=1)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _floor(at: datetime, step: timedelta) -> datetime:
    return at - (at - _EPOCH) % step


def _ceil(at: datetime, step: timedelta) -> datetime:
    floored = _floor(at, step)
    return floored if floored == at else floored + step


# -- rollups -------------------------------------------------------------------------------------
# Every usage rollup (deploy/clickhouse/002_rollups.sql) carries these measures. A report adds the
# rollup's whole buckets inside its range to the raw events of the partial buckets at its edges, so
# any range is exact and an aligned one (the default) reads rollups only.
MEASURES = (
    "requests", "errors", "unpriced", "downtiered", "prompt_tokens", "completion_tokens",
    "cached_tokens", "cost_usd", "baseline_cost_usd", "requested_cost_usd", "cache_saved_usd",
    "prompt_cache_saved_usd",
)  # fmt: skip
# The same measures over raw rows; must match the materialized views (a test compares them).
# An escalated-away attempt (``superseded``) is paid but is not a request (migration 011).
_RAW_MEASURES = """countIf(NOT superseded) AS requests,
    countIf(status != 'ok' AND NOT superseded) AS errors,
    countIf(price_unknown AND NOT superseded) AS unpriced,
    countIf(NOT superseded AND NOT price_unknown
        AND in_requested > in_cost + in_cache_saved + in_prompt_cache_saved) AS downtiered,
    sum(in_prompt) AS prompt_tokens,
    sum(in_completion) AS completion_tokens,
    sum(in_cached) AS cached_tokens,
    sum(in_cost) AS cost_usd,
    sumIf(in_baseline, NOT price_unknown AND NOT superseded) AS baseline_cost_usd,
    sumIf(in_requested, NOT price_unknown AND NOT superseded) AS requested_cost_usd,
    sum(in_cache_saved) AS cache_saved_usd,
    sum(in_prompt_cache_saved) AS prompt_cache_saved_usd"""
_RAW_ROWS = f"""SELECT ts, user_id, team, feature, tier, provider, model_served, cache_hit, status,
        price_unknown, prompt_tokens AS in_prompt, completion_tokens AS in_completion,
        cached_tokens AS in_cached, cost_usd AS in_cost, baseline_cost_usd AS in_baseline,
        cache_saved_usd AS in_cache_saved, prompt_cache_saved_usd AS in_prompt_cache_saved,
        ifNull(requested_cost_usd, cost_usd + cache_saved_usd + prompt_cache_saved_usd)
            AS in_requested,
        {SUPERSEDED} AS superseded
    FROM usage_events FINAL WHERE {{edges}}"""


@dataclass(frozen=True)
class Level:
    """One rollup table: its time bucket and how it computes each dimension it can serve."""

    table: str
    bucket: str
    step: timedelta
    dimensions: dict[str, str]
    retention: timedelta | None = None  # complete only for buckets newer than now - retention


@dataclass(frozen=True)
class Rollup:
    """A family of rollups of usage, coarsest first, and the same dimensions on raw rows."""

    levels: tuple[Level, ...]
    raw: dict[str, str]

    @property
    def dimensions(self) -> tuple[str, ...]:
        return tuple(self.raw)


def _time_dimensions(column: str, *names: str) -> dict[str, str]:
    return {name: _TIME_DIMENSIONS[name][0].format(t=column) for name in names}


_TIME_DIMENSIONS = {
    "minute": ("toStartOfMinute({t})", MINUTE),
    "hour": ("toStartOfHour({t})", HOUR),
    "day": ("toStartOfDay({t})", timedelta(days=1)),
}
_RAW_TIME = "toDateTime(ts, 'UTC')"
_USAGE_DIMENSIONS = {
    "model": "model_served",
    "feature": "feature",
    "tier": "tier",
    "provider": "provider",
    "cache_hit": "cache_hit",
}
USAGE = Rollup(
    levels=(
        Level(
            "usage_hour",
            "hour",
            HOUR,
            {**_USAGE_DIMENSIONS, **_time_dimensions("hour", "hour", "day")},
        ),
        Level(
            "usage_minute",
            "minute",
            MINUTE,
            {**_USAGE_DIMENSIONS, **_time_dimensions("minute", "minute", "hour", "day")},
        ),
    ),
    raw={
        "model": "model_served",
        "feature": "ifNull(feature, '')",
        "tier": "ifNull(tier, '')",
        "provider": "ifNull(provider, '')",
        "cache_hit": "cache_hit",
        **_time_dimensions(_RAW_TIME, "minute", "hour", "day"),
    },
)
USAGE_BY_USER = Rollup(
    levels=(
        Level(
            "usage_user_hour",
            "hour",
            HOUR,
            {"user": "user_id", **_time_dimensions("hour", "hour", "day")},
        ),
        # Kept 3 days (TTL); trusted for the last 2, so a merge's timing never matters.
        Level(
            "usage_user_minute",
            "minute",
            MINUTE,
            {"user": "user_id", **_time_dimensions("minute", "minute", "hour", "day")},
            retention=timedelta(days=2),
        ),
    ),
    raw={"user": "user_id", **_time_dimensions(_RAW_TIME, "minute", "hour", "day")},
)
# Teams are few: their minutes are kept as long as usage_minute's (no retention).
USAGE_BY_TEAM = Rollup(
    levels=(
        Level(
            "usage_team_hour",
            "hour",
            HOUR,
            {"team": "team", **_time_dimensions("hour", "hour", "day")},
        ),
        Level(
            "usage_team_minute",
            "minute",
            MINUTE,
            {"team": "team", **_time_dimensions("minute", "minute", "hour", "day")},
        ),
    ),
    raw={"team": "ifNull(team, '')", **_time_dimensions(_RAW_TIME, "minute", "hour", "day")},
)
OUTCOMES = (Level("outcome_minute", "minute", MINUTE, {"feature": "feature"}),)
# Calls a budget cap refused (402): blocked Request events, counted per minute (migration
# 012) under the model asked for and no provider. The raw edges read request_events with the
# rollup's column names, so one set of dimensions serves both.
_REFUSED_DIMENSIONS = {
    "model": "model",
    "feature": "feature",
    "tier": "tier",
    "provider": "''",
    "cache_hit": "false",
    "user": "user_id",
    **_time_dimensions("minute", "minute", "hour", "day"),
}
# By team, refused calls have a rollup of their own (migration 013); a breakdown reads the
# first of these levels that has all its dimensions.
REFUSED = (
    Level("refused_minute", "minute", MINUTE, _REFUSED_DIMENSIONS),
    Level(
        "refused_team_minute",
        "minute",
        MINUTE,
        {"team": "team", **_time_dimensions("minute", "minute", "hour", "day")},
    ),
)
_REFUSED_RAW = {**_REFUSED_DIMENSIONS, "team": "team"}
_REFUSED_ROWS = """SELECT toStartOfMinute(toDateTime(ts, 'UTC')) AS minute, user_id,
        ifNull(feature, '') AS feature, ifNull(model_requested, '') AS model,
        ifNull(tier, '') AS tier, ifNull(team, '') AS team
    FROM request_events FINAL
    WHERE status = 'blocked' AND reason = 'budget_exceeded' AND ({edges})"""
BREAKDOWN_DIMENSIONS = ("model", "user", "team", "feature", "tier", "provider")
# The rollups a breakdown reads: its own for a dimension of another cardinality.
_BREAKDOWN_ROLLUPS = {"user": USAGE_BY_USER, "team": USAGE_BY_TEAM}
NONE_LABEL = "(none)"

Segment = tuple[Level | None, datetime, datetime]  # None: raw events


def _plan(
    start: datetime, end: datetime, levels: tuple[Level, ...], now: datetime
) -> list[Segment]:
    """Cover [start, end) with the coarsest whole buckets, then finer ones, then raw events."""
    if start >= end:
        return []
    if not levels:
        return [(None, start, end)]
    level, finer = levels[0], levels[1:]
    if level.retention is not None:
        complete_from = _ceil(now - level.retention, level.step)
        if end <= complete_from:
            return _plan(start, end, finer, now)
        if start < complete_from:
            return _plan(start, complete_from, finer, now) + _plan(complete_from, end, levels, now)
    inner_start, inner_end = _ceil(start, level.step), _floor(end, level.step)
    if inner_start >= inner_end:
        return _plan(start, end, finer, now)
    return [
        *_plan(start, inner_start, finer, now),
        (level, inner_start, inner_end),
        *_plan(inner_end, end, finer, now),
    ]


def aggregate(
    client: Any,
    window: Range,
    rollup: Rollup,
    by: tuple[str, ...] = (),
    *,
    order_by: str | None = None,
    limit: int | None = None,
    offset: int = 0,
    now: datetime | None = None,
    refused: bool = False,
) -> list[dict[str, Any]]:
    """Usage measures over ``window`` grouped by ``by`` (names from the rollup's allow-list).
    With ``refused``, each row also counts the calls budget caps refused (``refused``), and a
    row may hold only those (a user refused every call of the range).

    Every value in the SQL text comes from fixed tables above; user input only
    reaches the query as bound parameters.
    """
    for name in by:
        if name not in rollup.raw:
            raise ReportError("by", f"by={name!r}: one of {', '.join(rollup.dimensions)}")
    now = now or datetime.now(UTC)
    levels = tuple(lv for lv in rollup.levels if all(n in lv.dimensions for n in by))
    segments = _plan(window.start, window.end, levels, now)
    params: dict[str, Any] = {}
    parts = []
    raw_conditions = []
    none_refused = ["0 AS refused"] if refused else []
    group = f" GROUP BY {', '.join(by)}" if by else ""
    for i, (level, seg_start, seg_end) in enumerate(segments):
        params[f"s{i}"], params[f"e{i}"] = bound(seg_start), bound(seg_end)
        if level is None:
            raw_conditions.append(f"(ts >= %(s{i})s AND ts < %(e{i})s)")
            continue
        columns = [f"{level.dimensions[n]} AS {n}" for n in by] + list(MEASURES) + none_refused
        parts.append(
            f"SELECT {', '.join(columns)} FROM {level.table} "
            f"WHERE {level.bucket} >= %(s{i})s AND {level.bucket} < %(e{i})s"
        )
    if raw_conditions:
        dims = [f"{rollup.raw[n]} AS {n}" for n in by]
        parts.append(
            f"SELECT {', '.join([*dims, _RAW_MEASURES, *none_refused])} "
            f"FROM ({_RAW_ROWS.format(edges=' OR '.join(raw_conditions))}){group}"
        )
    if refused:
        parts += _refused_parts(window, by, params, now)
    measures = (*MEASURES, "refused") if refused else MEASURES
    sums = ", ".join(f"sum({m}) AS {m}" for m in measures)
    sql = f"SELECT {', '.join([*by, sums])} FROM ({' UNION ALL '.join(parts)})"
    if by:
        sql += f" GROUP BY {', '.join(by)}"
    sql += f" ORDER BY {order_by or (', '.join(by) if by else 'requests')}"
    if limit is not None:
        sql += " LIMIT %(limit)s OFFSET %(offset)s"
        params["limit"], params["offset"] = limit, offset
    result = client.query(sql, parameters=params)
    names = [*by, *measures]
    rows = [dict(zip(names, row, strict=True)) for row in result.result_rows]
    if not by:  # an empty range still has one row of zeros
        rows = [r for r in rows if r["requests"] or r.get("refused")] or [
            dict.fromkeys(measures, 0)
        ]
    return rows


def _refused_parts(
    window: Range, by: tuple[str, ...], params: dict[str, Any], now: datetime
) -> list[str]:
    """The parts of :func:`aggregate`'s query counting refused calls: every usage measure 0,
    ``refused`` from the rollup's whole minutes and the raw events of the edges."""
    zeros = [f"0 AS {m}" for m in MEASURES]
    levels = tuple(lv for lv in REFUSED if all(n in lv.dimensions for n in by))[:1]
    parts, raw_conditions = [], []
    for i, (level, seg_start, seg_end) in enumerate(_plan(window.start, window.end, levels, now)):
        params[f"rs{i}"], params[f"re{i}"] = bound(seg_start), bound(seg_end)
        if level is None:
            raw_conditions.append(f"(ts >= %(rs{i})s AND ts < %(re{i})s)")
            continue
        dims = [f"{level.dimensions[n]} AS {n}" for n in by]
        parts.append(
            f"SELECT {', '.join([*dims, *zeros, 'refused'])} FROM {level.table} "
            f"WHERE minute >= %(rs{i})s AND minute < %(re{i})s"
        )
    if raw_conditions:
        group = f" GROUP BY {', '.join(by)}" if by else ""
        dims = [f"{_REFUSED_RAW[n]} AS {n}" for n in by]
        parts.append(
            f"SELECT {', '.join([*dims, *zeros, 'count() AS refused'])} "
            f"FROM ({_REFUSED_ROWS.format(edges=' OR '.join(raw_conditions))}){group}"
        )
    return parts


def _money(value: Any) -> Decimal:
    return Decimal(value or 0)


def _share(part: Any, whole: Any) -> float | None:
    return round(float(part) / float(whole), 6) if whole else None


def _label(value: Any) -> Any:
    return NONE_LABEL if value == "" else value


@dataclass(frozen=True)
class Summary:
    requests: int
    cost_usd: Decimal
    baseline_cost_usd: Decimal
    baseline_model: str
    unpriced_requests: int
    range: Range
    errors: int = 0
    cache_hits: int = 0
    refused: int = 0  # calls a budget cap refused (402): in neither requests nor errors

    @property
    def savings_usd(self) -> Decimal:
        return self.baseline_cost_usd - self.cost_usd

    @property
    def savings_pct(self) -> Decimal:
        if not self.baseline_cost_usd:
            return Decimal(0)
        return (self.savings_usd / self.baseline_cost_usd * 100).quantize(Decimal("0.1"))

    def sentence(self) -> str:
        """The finance sentence, with money rounded to cents for reading (an amount under a
        cent, to its first significant digits: "$0.00" read as nothing spent)."""
        unpriced = ""
        if self.unpriced_requests:
            one = self.unpriced_requests == 1
            unpriced = (
                f" ({self.unpriced_requests:,} request{'' if one else 's'} to models without a "
                f"price {'is' if one else 'are'} in neither amount.)"
            )
        pct = self.savings_pct
        # Dearer than the baseline is not "-733.3% savings" (probe J).
        outcome = f"{pct}% savings" if pct >= 0 else f"{-pct}% more than at those rates"
        noun = "request" if self.requests == 1 else "requests"
        return (
            f"We processed {self.requests:,} {noun}, would have cost "
            f"{_dollars(self.baseline_cost_usd)} at {self.baseline_model.upper()} rates, actually "
            f"cost {_dollars(self.cost_usd)} — {outcome}.{unpriced}"
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "from": self.range.start.isoformat(),
            "to": self.range.end.isoformat(),
            "requests": self.requests,
            "errors": self.errors,
            "refused": self.refused,
            "cost_usd": usd_text(self.cost_usd),
            "baseline_cost_usd": usd_text(self.baseline_cost_usd),
            "baseline_model": self.baseline_model,
            "savings_usd": usd_text(self.savings_usd),
            "savings_pct": str(self.savings_pct),
            "cache_hits": self.cache_hits,
            "cache_hit_rate": _share(self.cache_hits, self.requests),
            "unpriced_requests": self.unpriced_requests,
            "sentence": self.sentence(),
        }


def summary(client: Any, window: Range, baseline_model: str = "gpt-4") -> Summary:
    """Totals of the range; the baseline (and savings) count priced requests only."""
    rows = aggregate(client, window, USAGE, ("cache_hit",), refused=True)
    total = {m: sum((r[m] for r in rows), start=0) for m in (*MEASURES, "refused")}
    hits = sum(r["requests"] for r in rows if r["cache_hit"])
    return Summary(
        requests=int(total["requests"]),
        cost_usd=_money(total["cost_usd"]),
        baseline_cost_usd=_money(total["baseline_cost_usd"]),
        baseline_model=baseline_model,
        unpriced_requests=int(total["unpriced"]),
        range=window,
        errors=int(total["errors"]),
        cache_hits=int(hits),
        refused=int(total["refused"]),
    )


def _spend_row(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "requests": int(row["requests"]),
        "errors": int(row["errors"]),
        "cost_usd": usd_text(_money(row["cost_usd"])),
        "baseline_cost_usd": usd_text(_money(row["baseline_cost_usd"])),
        "savings_usd": usd_text(_money(row["baseline_cost_usd"]) - _money(row["cost_usd"])),
        "prompt_tokens": int(row["prompt_tokens"]),
        "completion_tokens": int(row["completion_tokens"]),
        "unpriced_requests": int(row["unpriced"]),
        # last: a csv export's columns before it keep their places
        "refused": int(row.get("refused") or 0),
    }


NO_SPEND = {
    "requests": 0, "errors": 0, "cost_usd": "0", "baseline_cost_usd": "0", "savings_usd": "0",
    "prompt_tokens": 0, "completion_tokens": 0, "unpriced_requests": 0, "refused": 0,
}  # fmt: skip


MAX_OFFSET = 10_000_000


def _breakdown_rows(
    client: Any, window: Range, by: str, limit: int, offset: int
) -> list[dict[str, Any]]:
    if by not in BREAKDOWN_DIMENSIONS:
        raise ReportError("by", f"by={by!r}: one of {', '.join(BREAKDOWN_DIMENSIONS)}")
    if not 1 <= limit <= 1001:  # one more than the page: whether there is more
        raise ReportError("limit", "limit must be between 1 and 1000")
    if not 0 <= offset <= MAX_OFFSET:
        raise ReportError("offset", f"offset must be between 0 and {MAX_OFFSET}")
    rollup = _BREAKDOWN_ROLLUPS.get(by, USAGE)
    # ties broken by the name: pages of a range no usage is still arriving in never repeat
    # or skip a row
    return aggregate(
        client, window, rollup, (by,), order_by=f"cost_usd DESC, {by}", limit=limit,
        offset=offset, refused=True,
    )  # fmt: skip


def breakdown(
    client: Any, window: Range, by: str, limit: int = 20, offset: int = 0
) -> list[dict[str, Any]]:
    """Spend by one dimension (model, user, team, feature, tier, provider), biggest first, from
    row ``offset``. ``by=user`` with a small ``limit`` is the top-N spenders."""
    if limit > 1000:
        raise ReportError("limit", "limit must be between 1 and 1000")
    rows = _breakdown_rows(client, window, by, limit, offset)
    return [{by: _label(row[by]), **_spend_row(row)} for row in rows]


def breakdown_page(
    client: Any, window: Range, by: str, limit: int = 20, offset: int = 0
) -> dict[str, Any]:
    """One page of :func:`breakdown`, saying what it leaves out: ``more`` and
    ``next_offset`` (the next page), ``total`` (every row's sum) and ``others`` (the rows
    not on this page). A finance user who asked for spend by user got the top 20 of 55,
    or 1,000 of 1,100, with nothing saying rows were missing (a newcomer probe)."""
    if not 1 <= limit <= 1000:
        raise ReportError("limit", "limit must be between 1 and 1000")
    rows = _breakdown_rows(client, window, by, limit + 1, offset)
    more = len(rows) > limit
    rows = rows[:limit]
    rollup = _BREAKDOWN_ROLLUPS.get(by, USAGE)
    (total,) = aggregate(client, window, rollup, refused=True)
    others = {
        m: (total[m] or 0) - sum((row[m] or 0) for row in rows) for m in (*MEASURES, "refused")
    }
    return {
        "rows": [{by: _label(row[by]), **_spend_row(row)} for row in rows],
        "offset": offset,
        "more": more,
        "next_offset": offset + limit if more else None,
        "total": _spend_row(total),
        "others": _spend_row(others),
    }


INTERVALS = ("minute", "hour", "day")
ALERT_KIND_ANOMALY = "anomaly"  # the alerts report's ``kind`` for every other kind
_ANOMALY = f"kind != '{BUDGET_THRESHOLD}'"  # SQL, on alert_events


def timeseries(client: Any, window: Range, interval: str = "day") -> list[dict[str, Any]]:
    """Cost and baseline cost per interval (UTC), with the anomaly alerts that fired in each
    and the budget thresholds crossed in each (``budget_thresholds``: not anomalies, so not
    in ``alerts``, ``alert_kinds`` or the ``anomaly`` flag)."""
    if interval not in INTERVALS:
        raise ReportError("interval", f"interval={interval!r}: one of {', '.join(INTERVALS)}")
    step = _TIME_DIMENSIONS[interval][1]
    if (window.end - window.start) / step > 50_000:
        raise ReportError("interval", f"too many {interval}s in the range; use a longer interval")
    costs = aggregate(client, window, USAGE, (interval,), refused=True)
    bucket_sql = _TIME_DIMENSIONS[interval][0].format(t="toDateTime(ts, 'UTC')")
    alerts: dict[datetime, list[str]] = {}
    fired: dict[datetime, int] = {}
    thresholds: dict[datetime, int] = {}
    for bucket, kinds, count, crossed in client.query(
        f"SELECT {bucket_sql} AS bucket, groupUniqArrayIf(kind, {_ANOMALY}), "
        f"countIf({_ANOMALY}), countIf(NOT {_ANOMALY}) FROM alert_events FINAL "
        "WHERE ts >= %(start)s AND ts < %(end)s AND status = 'firing' "
        # an alert's update (it became critical) is not another alert
        "AND NOT mapContains(details, 'severity_raised_from') GROUP BY bucket",
        parameters=window.params(),
    ).result_rows:
        if count:
            alerts[_utc(bucket)] = sorted(kinds)
            fired[_utc(bucket)] = int(count)
        thresholds[_utc(bucket)] = int(crossed)
    spent = {_utc(row[interval]): _spend_row(row) for row in costs}
    series = []
    # Every interval of the range, a quiet one at zero: a trend with gaps reads as flat.
    bucket = _floor(window.start, step)
    while bucket < window.end:
        series.append(
            {
                "start": bucket.isoformat(),
                # The UTC day of the bucket (a range given at -08:00 labelled each UTC day
                # with the day before: probe J).
                "day": _utc(bucket).date().isoformat(),
                **spent.get(bucket, NO_SPEND),
                "alerts": fired.get(bucket, 0),  # alerts, not kinds (4 fired read as 2)
                "alert_kinds": alerts.get(bucket, []),
                "anomaly": bucket in alerts,
                "budget_thresholds": thresholds.get(bucket, 0),
            }
        )
        bucket += step
    return series


def _utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _alert_filter(kind: str | None, params: dict[str, Any]) -> str:
    """The SQL condition (after the range's) keeping the alerts of ``kind``: that kind, or
    ``anomaly`` for every kind but ``budget_threshold``; another kind is a ReportError."""
    if kind == ALERT_KIND_ANOMALY:
        return f"AND {_ANOMALY} "
    if kind is None:
        return ""
    if kind not in ALERT_KINDS:  # a typo listed nothing, as if no alert fired (probe 46)
        raise ReportError(
            "kind",
            f"kind={kind[:64]!r} is not an alert kind: one of "
            f"{', '.join(ALERT_KINDS)}, or {ALERT_KIND_ANOMALY} (every kind but "
            f"{BUDGET_THRESHOLD})",
        )
    params["kind"] = kind
    return "AND kind = %(kind)s "


def recent_alerts(
    client: Any, window: Range, limit: int = 20, kind: str | None = None, offset: int = 0
) -> list[dict[str, Any]]:
    """The alerts that fired in the range, latest first, from the ``offset``-th: the anomaly
    agent's and the spend worker's ``budget_threshold`` ones (they were left out, so without
    a webhook target a crossed threshold showed nowhere: probe 54). ``kind``: only that
    kind, or ``anomaly`` for every kind but ``budget_threshold``."""
    if not 1 <= limit <= 1001:  # one more than a page: whether there is more
        raise ReportError("limit", "limit must be between 1 and 1000")
    if not 0 <= offset <= MAX_OFFSET:
        raise ReportError("offset", f"offset must be between 0 and {MAX_OFFSET}")
    params: dict[str, Any] = window.params()
    only = _alert_filter(kind, params)
    # Alerts of one time and kind (one per scope) are ordered on, to the event id, so that
    # pages of a range no alert is still arriving in never repeat or skip one.
    rows = client.query(
        "SELECT ts, kind, scope, severity, message, incident_role, incident_key, historical, "
        "impact_usd_per_hour FROM alert_events FINAL "
        f"WHERE ts >= %(start)s AND ts < %(end)s AND status = 'firing' {only}"
        f"ORDER BY ts DESC, kind, scope, event_id LIMIT {int(limit)} OFFSET {int(offset)}",
        parameters=params,
    ).result_rows
    # Which alert was the page (the others are attached to it) and which are about the
    # past: a reader could not tell 26 pages from 19 related alerts (probe N).
    return [
        {"ts": _utc(ts).isoformat(), "kind": kind, "scope": scope, "severity": severity,
         "message": message, "incident_role": role, "incident_key": key,
         "historical": bool(historical),
         "impact_usd_per_hour": None if impact is None else float(impact)}
        for ts, kind, scope, severity, message, role, key, historical, impact in rows
    ]  # fmt: skip


def alerts_page(
    client: Any, window: Range, limit: int = 20, kind: str | None = None, offset: int = 0
) -> dict[str, Any]:
    """One page of :func:`recent_alerts`, saying what it leaves out, as a breakdown page
    does: ``more`` and ``next_offset`` (the next page), and ``total`` (the alerts of the
    range and kind). 42 alerts were listed as the latest 20 with nothing saying more had
    fired, and ``offset`` was refused, so alerts past the 1,000th could not be listed at
    all (probe 56)."""
    if not 1 <= limit <= 1000:
        raise ReportError("limit", "limit must be between 1 and 1000")
    alerts = recent_alerts(client, window, limit + 1, kind, offset)
    more = len(alerts) > limit
    params: dict[str, Any] = window.params()
    only = _alert_filter(kind, params)
    ((total,),) = client.query(
        "SELECT count() FROM alert_events FINAL "
        f"WHERE ts >= %(start)s AND ts < %(end)s AND status = 'firing' {only}",
        parameters=params,
    ).result_rows
    return {
        "alerts": alerts[:limit],
        "offset": offset,
        "more": more,
        "next_offset": offset + limit if more else None,
        "total": int(total),
    }


def savings(client: Any, window: Range, baseline_model: str = "gpt-4") -> dict[str, Any]:
    """Savings against the baseline model, decomposed, with cache and routing efficiency.

    baseline - cost = model choice (baseline - requested model's list price)
                    + routing (requested - served model's list price)
                    + provider prompt caching + cache hits; priced requests only.
    """
    rows = aggregate(client, window, USAGE, ("cache_hit",))
    total = {m: sum((r[m] for r in rows), start=0) for m in MEASURES}
    hits = [r for r in rows if r["cache_hit"]]
    cost, baseline = _money(total["cost_usd"]), _money(total["baseline_cost_usd"])
    requested = _money(total["requested_cost_usd"])
    cache_saved, prompt_saved = (
        _money(total["cache_saved_usd"]),
        _money(total["prompt_cache_saved_usd"]),
    )
    routing = requested - cost - cache_saved - prompt_saved
    priced = int(total["requests"]) - int(total["unpriced"])
    downtiered = int(total["downtiered"])
    routed_outcomes = routing_outcomes(client, window, DOWNTIERED_IDS)
    explored = explored_calls(client, window)
    escalated, escalated_cost = escalated_attempts(client, window)
    explored_outcomes = routing_outcomes(client, window, EXPLORED_IDS)
    return {
        "from": window.start.isoformat(),
        "to": window.end.isoformat(),
        "baseline_model": baseline_model,
        "requests": int(total["requests"]),
        "priced_requests": priced,
        "baseline_cost_usd": usd_text(baseline),
        "cost_usd": usd_text(cost),
        "savings_usd": usd_text(baseline - cost),
        "savings_pct": str(
            ((baseline - cost) / baseline * 100).quantize(Decimal("0.1")) if baseline else 0
        ),
        "decomposition": {
            "model_choice_usd": usd_text(baseline - requested),
            "routing_usd": usd_text(routing),
            "prompt_cache_usd": usd_text(prompt_saved),
            "cache_usd": usd_text(cache_saved),
        },
        "cache": {
            "hits": int(sum(r["requests"] for r in hits)),
            "hit_rate": _share(sum(r["requests"] for r in hits), total["requests"]),
            "savings_usd": usd_text(cache_saved),
            "cached_prompt_tokens": int(total["cached_tokens"]),
            "prompt_cache_savings_usd": usd_text(prompt_saved),
        },
        "routing": {
            "downtiered": downtiered,
            "downtiered_share": _share(downtiered, priced),
            "savings_usd": usd_text(routing),
            "downtiered_with_outcome": routed_outcomes["with_outcome"],
            "downtiered_successful": routed_outcomes["successful"],
            "downtiered_success_share": _share(
                routed_outcomes["successful"], routed_outcomes["with_outcome"]
            ),
            "escalated": escalated,
            "escalated_cost_usd": usd_text(escalated_cost),
            "explored": explored,
            "explored_with_outcome": explored_outcomes["with_outcome"],
            "explored_success_share": _share(
                explored_outcomes["successful"], explored_outcomes["with_outcome"]
            ),
        },
    }


# The request ids of calls served cheaper than asked, and of calls sent to economy by the
# router's exploration (``routing.exploration_rate``; Usage v4). ``uniqExact``/``IN`` make a
# duplicate row harmless without FINAL.
DOWNTIERED_IDS = "SELECT request_id FROM downtiered_requests WHERE ts >= %(start)s AND ts < %(end)s"
EXPLORED_IDS = (
    "SELECT request_id FROM usage_events WHERE ts >= %(start)s AND ts < %(end)s AND explored"
)


def explored_calls(client: Any, window: Range) -> int:
    """How many calls in the range the router sent to economy to learn (exploration)."""
    row = client.query(
        f"SELECT uniqExact(request_id) FROM ({EXPLORED_IDS})", parameters=window.params()
    ).result_rows[0]
    return int(row[0])


def escalated_attempts(client: Any, window: Range) -> tuple[int, Decimal]:
    """The attempts in the range whose failed answer was escalated (migration 011: paid, in
    the cost, not requests) and what they cost: what escalation spent on answers nobody saw."""
    row = client.query(
        "SELECT count(), sum(cost_usd) FROM usage_events FINAL "
        f"WHERE ts >= %(start)s AND ts < %(end)s AND {SUPERSEDED}",
        parameters=window.params(),
    ).result_rows[0]
    return int(row[0]), _money(row[1] or 0)


def routing_outcomes(client: Any, window: Range, ids_sql: str) -> dict[str, int]:
    """Of the requests ``ids_sql`` selects in the range: how many have an outcome, a good one."""
    row = client.query(
        "SELECT count(), countIf(outcome = 'success') FROM "
        "(SELECT request_id, argMax(outcome, ts) AS outcome FROM outcome_events FINAL "
        f" WHERE ts >= %(start)s AND request_id IN ({ids_sql}) "
        " GROUP BY request_id)",
        parameters=window.params(),
    ).result_rows[0]
    return {"with_outcome": int(row[0]), "successful": int(row[1])}


def _ratio(value: Decimal) -> str:
    return str(value.quantize(Decimal("0.01")))


# The outcomes of the range whose calls were never served, by feature: a parameterized view
# (deploy/clickhouse/015_unserved_call_outcomes.sql), so the Grafana dashboard reads the same
# definition. It looks the outcomes' calls up (user, request id) over the 31 days before the
# range, through the request id index (migration 014) and the users (the sorting key): that
# lookup is a view of its own, ``unserved_calls``.
UNSERVED_CALL_OUTCOMES = (
    "SELECT feature, outcomes, successes, value_usd "
    "FROM unserved_call_outcomes(start_ms = %(start_ms)s, end_ms = %(end_ms)s)"
)


def unserved_call_outcomes_params(window: Range) -> dict[str, int]:
    """The arguments of the view for ``window``: its bounds in Unix milliseconds (exact: a
    range is whole milliseconds)."""
    return {
        "start_ms": (window.start - _EPOCH) // timedelta(milliseconds=1),
        "end_ms": (window.end - _EPOCH) // timedelta(milliseconds=1),
    }


def outcomes_of_unserved_calls(client: Any, window: Range) -> dict[str, tuple[int, int, Decimal]]:
    """(outcomes, successes, value) by feature of the outcomes in the range whose request id
    names a call of their user the provider never answered: every one of its attempts failed
    (status error or timeout). A call that failed and escalated to an answer was served, as
    was a stream its client left; a call the spend worker settled by estimate because its
    dispatcher died (``dispatcher_lost``) may have been answered, and is not provably failed.
    A request id is per user (an outcome with no user is the anonymous user's): another
    user's call under it is another call. A request id with no call of its user in the
    warehouse (another system's, or a call over 31 days before the range) is not one."""
    rows = client.query(
        UNSERVED_CALL_OUTCOMES, parameters=unserved_call_outcomes_params(window)
    ).result_rows
    return {feature: (int(n), int(ok), _money(value)) for feature, n, ok, value in rows}


def outcomes(client: Any, window: Range) -> list[dict[str, Any]]:
    """Cost per successful outcome by feature: the feature's spend over its successes.
    Outcomes of calls that were never served are counted apart
    (:func:`outcomes_of_unserved_calls`): a success posted for a call that failed upstream
    made a feature's success rate 1.0 and its cost per success $0 (a newcomer probe)."""
    spend = {r["feature"]: r for r in aggregate(client, window, USAGE, ("feature",))}
    unserved = outcomes_of_unserved_calls(client, window)
    params: dict[str, Any] = {}
    parts = []
    for i, (level, seg_start, seg_end) in enumerate(
        _plan(window.start, window.end, OUTCOMES, datetime.now(UTC))
    ):
        params[f"e{i}s"], params[f"e{i}e"] = bound(seg_start), bound(seg_end)
        if level is not None:
            parts.append(
                "SELECT feature, outcomes, successes, value_usd FROM outcome_minute "
                f"WHERE minute >= %(e{i}s)s AND minute < %(e{i}e)s"
            )
            continue
        parts.append(
            "SELECT ifNull(feature, '') AS feature, count() AS outcomes, "
            "countIf(outcome = 'success') AS successes, "
            "sum(ifNull(value_usd, toDecimal64(0, 9))) AS value_usd FROM outcome_events FINAL "
            f"WHERE ts >= %(e{i}s)s AND ts < %(e{i}e)s GROUP BY feature"
        )
    results = {
        feature: (int(n), int(ok), _money(value))
        for feature, n, ok, value in client.query(
            "SELECT feature, sum(outcomes), sum(successes), sum(value_usd) "
            f"FROM ({' UNION ALL '.join(parts)}) GROUP BY feature",
            parameters=params,
        ).result_rows
    }
    report = []
    for feature in sorted(set(spend) | set(results), key=lambda f: (f == "", f)):
        cost = _money(spend[feature]["cost_usd"]) if feature in spend else Decimal(0)
        n, ok, value = results.get(feature, (0, 0, Decimal(0)))
        failed_n, failed_ok, failed_value = unserved.get(feature, (0, 0, Decimal(0)))
        n, ok, value = n - failed_n, ok - failed_ok, value - failed_value
        report.append(
            {
                "feature": _label(feature),
                "requests": int(spend[feature]["requests"]) if feature in spend else 0,
                "cost_usd": usd_text(cost),
                "outcomes": n,
                "successes": ok,
                "success_rate": _share(ok, n),
                # outcomes (a success or not) of calls never served: in none of the figures
                # here, so a success posted for a failed call never lowers cost per success
                "outcomes_on_failed_calls": failed_n,
                # None, not "$0 per success", where the range holds none of the feature's
                # calls (outcomes of earlier calls, or linked to no call: "(none)")
                "cost_per_success_usd": usd_text((cost / ok).quantize(Decimal("1e-9")))
                if ok and feature in spend
                else None,
                # the value reported with the feature's outcomes (as posted: a failure's
                # too, if it was given one), and what it returns on the feature's spend
                "value_usd": usd_text(value),
                "net_value_usd": usd_text(value - cost) if value else None,
                "roi": _ratio((value - cost) / cost) if cost and value else None,
                "value_per_usd": _ratio(value / cost) if cost and value else None,
            }
        )
    return report


def budgets(
    client: Any, now: datetime | None = None, active: Callable[[str], bool] | None = None
) -> list[dict[str, Any]]:
    """The latest decision of every capped scope whose period is current, most used first.

    ``active`` (optional) says whether a scope still has a policy, so that removed caps drop out.
    """
    now = now or datetime.now(UTC)
    rows = client.query(
        "SELECT scope, argMax(state, ts), argMax(spent_usd, ts), argMax(limit_usd, ts), "
        "argMax(period, ts), argMax(period_start, ts), argMax(resets_at, ts), "
        "argMax(counted_through, ts), max(ts) FROM budget_decisions FINAL "
        "WHERE resets_at IS NULL OR resets_at >= %(since)s GROUP BY scope",
        # Periods that ended more than a month ago are history, not status.
        parameters={"since": now - timedelta(days=35)},
    ).result_rows
    report = []
    for scope, state, spent, limit, period, start, resets, counted, updated in rows:
        if resets is not None and _utc(resets) <= now:
            state, spent = "open", Decimal(0)  # the period ended; a new one starts at zero
        if active is not None and not active(scope):
            continue
        spent, limit = _money(spent), _money(limit)
        report.append(
            {
                "scope": scope,
                "state": state,
                "spent_usd": usd_text(spent),
                "limit_usd": usd_text(limit),
                "used": _share(spent, limit),
                "period": period,
                "period_start": _utc(start).isoformat(),
                "resets_at": _utc(resets).isoformat() if resets is not None else None,
                "counted_through": _utc(counted).isoformat() if counted is not None else None,
                "updated_at": _utc(updated).isoformat(),
            }
        )
    report.sort(key=lambda r: (-(r["used"] or 0), r["scope"]))
    return report
