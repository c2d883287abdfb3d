"""Spend and ROI reports on the warehouse: one query module for the API, the CLI and dashboards.

Owns the SQL of every report (parameterized; no string-built filters) and the
finance sentence: "We processed N requests, would have cost $X at GPT-4 rates,
actually cost $Y — Z% savings." It does not own connections (``app.warehouse``).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from app.pricing import usd_text

BREAKDOWN_DIMENSIONS = {
    "model": "model_served",
    "user": "user_id",
    "feature": "ifNull(feature, '(none)')",
    "tier": "ifNull(tier, '(unknown)')",
    "provider": "ifNull(provider, '(none)')",
}
MAX_RANGE = timedelta(days=400)


class ReportError(ValueError):
    """A bad report parameter; ``param`` names it."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


def parse_time(value: str | None, param: str, default: datetime) -> datetime:
    if value is None or value == "":
        return default
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise ReportError(param, f"{param}={value!r} is not an ISO 8601 date or time") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def parse_since(value: str) -> timedelta:
    """'30d', '12h', '90m' → a timedelta."""
    units = {"d": "days", "h": "hours", "m": "minutes"}
    if len(value) < 2 or value[-1] not in units or not value[:-1].isdigit() or not value.isascii():
        raise ReportError("since", f"since={value!r}: use a number and d, h or m, e.g. 30d")
    return timedelta(**{units[value[-1]]: int(value[:-1])})


@dataclass(frozen=True)
class Range:
    start: datetime
    end: datetime

    @classmethod
    def parse(cls, start: str | None, end: str | None, now: datetime | None = None) -> Range:
        now = now or datetime.now(UTC)
        end_at = parse_time(end, "to", now)
        start_at = parse_time(start, "from", end_at - timedelta(days=30))
        if start_at >= end_at:
            raise ReportError("from", "from must be earlier than to")
        if end_at - start_at > MAX_RANGE:
            raise ReportError("from", f"the range is longer than {MAX_RANGE.days} days")
        return cls(start_at, end_at)

    def params(self) -> dict[str, Any]:
        return {"start": self.start, "end": self.end}


def _money(value: Any) -> Decimal:
    return Decimal(value or 0)


@dataclass(frozen=True)
class Summary:
    requests: int
    cost_usd: Decimal
    baseline_cost_usd: Decimal
    baseline_model: str
    unpriced_requests: int
    range: Range

    @property
    def savings_usd(self) -> Decimal:
        return self.baseline_cost_usd - self.cost_usd

    @property
    def savings_pct(self) -> Decimal:
        if not self.baseline_cost_usd:
            return Decimal(0)
        return (self.savings_usd / self.baseline_cost_usd * 100).quantize(Decimal("0.1"))

    def sentence(self) -> str:
        """The finance sentence, with money rounded to cents for reading."""
        unpriced = (
            f" ({self.unpriced_requests} requests of models without a price are not in the cost.)"
            if self.unpriced_requests
            else ""
        )
        return (
            f"We processed {self.requests:,} requests, would have cost "
            f"${self.baseline_cost_usd:,.2f} at {self.baseline_model.upper()} rates, actually cost "
            f"${self.cost_usd:,.2f} — {self.savings_pct}% savings.{unpriced}"
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "from": self.range.start.isoformat(),
            "to": self.range.end.isoformat(),
            "requests": self.requests,
            "cost_usd": usd_text(self.cost_usd),
            "baseline_cost_usd": usd_text(self.baseline_cost_usd),
            "baseline_model": self.baseline_model,
            "savings_usd": usd_text(self.savings_usd),
            "savings_pct": str(self.savings_pct),
            "unpriced_requests": self.unpriced_requests,
            "sentence": self.sentence(),
        }


def summary(client: Any, window: Range) -> Summary:
    row = client.query(
        "SELECT count(), sum(cost_usd), sum(baseline_cost_usd), any(baseline_model), "
        "countIf(price_unknown) FROM usage_events FINAL "
        "WHERE ts >= %(start)s AND ts < %(end)s",
        parameters=window.params(),
    ).result_rows[0]
    return Summary(
        int(row[0]), _money(row[1]), _money(row[2]), row[3] or "gpt-4", int(row[4]), window
    )


def breakdown(client: Any, window: Range, by: str, limit: int = 20) -> list[dict[str, Any]]:
    """Spend by one dimension (model, user, feature, tier, provider), biggest first."""
    if by not in BREAKDOWN_DIMENSIONS:
        raise ReportError("by", f"by={by!r}: one of {', '.join(BREAKDOWN_DIMENSIONS)}")
    if not 1 <= limit <= 1000:
        raise ReportError("limit", "limit must be between 1 and 1000")
    # The dimension is chosen from a fixed allow-list, never from user text.
    rows = client.query(
        f"SELECT {BREAKDOWN_DIMENSIONS[by]} AS key, count(), sum(cost_usd), sum(baseline_cost_usd), "
        "sum(prompt_tokens), sum(completion_tokens) FROM usage_events FINAL "
        "WHERE ts >= %(start)s AND ts < %(end)s GROUP BY key ORDER BY sum(cost_usd) DESC "
        "LIMIT %(limit)s",
        parameters={**window.params(), "limit": limit},
    ).result_rows
    return [
        {
            by: key,
            "requests": int(n),
            "cost_usd": usd_text(_money(cost)),
            "baseline_cost_usd": usd_text(_money(base)),
            "prompt_tokens": int(prompt),
            "completion_tokens": int(completion),
        }
        for key, n, cost, base, prompt, completion in rows
    ]


def timeseries(client: Any, window: Range) -> list[dict[str, Any]]:
    """Daily cost and baseline cost, with the anomaly alerts of each day."""
    costs = client.query(
        "SELECT toDate(ts) AS day, count(), sum(cost_usd), sum(baseline_cost_usd) "
        "FROM usage_events FINAL WHERE ts >= %(start)s AND ts < %(end)s GROUP BY day ORDER BY day",
        parameters=window.params(),
    ).result_rows
    alerts = dict(
        client.query(
            "SELECT toDate(ts) AS day, count() FROM alert_events FINAL "
            "WHERE ts >= %(start)s AND ts < %(end)s AND status = 'firing' GROUP BY day",
            parameters=window.params(),
        ).result_rows
    )
    return [
        {
            "day": day.isoformat(),
            "requests": int(n),
            "cost_usd": usd_text(_money(cost)),
            "baseline_cost_usd": usd_text(_money(base)),
            "alerts": int(alerts.get(day, 0)),
            "anomaly": bool(alerts.get(day, 0)),
        }
        for day, n, cost, base in costs
    ]
