"""Spend accounting for the spend agent, as plain functions (the Faust agent only calls these).

Owns which (scope, period) buckets a usage event adds to, which scopes are
partition-local (users: usage is keyed by user) and which are aggregated from
per-partition partial sums (features, teams, keys, global), and how a bucket's
total becomes a ``BudgetDecision`` and threshold ``Alert``s.

Buckets are always kept for the UTC day and the UTC month of every scope, so
a policy added mid-month immediately sees the month's spend; a policy in
another time zone or with a rolling window adds its own buckets from the
moment it exists.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from app.budgets.periods import Period, period_of
from app.budgets.policy import Evaluation, Policy, PolicyBook, scopes_of
from app.pricing import usd_text
from app.usage import new_id

ALWAYS_TRACKED = (("day", "UTC", None), ("month", "UTC", None))


def is_partition_local(scope: str) -> bool:
    """User spend lives on the partition of the user's usage events; the rest is aggregated."""
    return scope.startswith("user:")


def bucket_key(scope: str, period: Period) -> str:
    return f"{scope}|{period.id}"


def partial_key(scope: str, period: Period, partition: int) -> str:
    return f"{scope}|{period.id}|p{partition}"


def tracked_periods(scope: str, ts: datetime, policies: PolicyBook) -> list[Period]:
    kinds: set[tuple[str, str, int | None]] = set(ALWAYS_TRACKED)
    policy = policies.policy_for(scope)
    if policy is not None:
        kinds.add((policy.period, policy.timezone, policy.window_seconds))
    return [period_of(kind, ts, tz, window) for kind, tz, window in sorted(kinds, key=str)]


@dataclass(frozen=True)
class BucketUpdate:
    scope: str
    period: Period
    table_key: str
    aggregated: bool


def bucket_updates(
    record: dict[str, Any], partition: int, policies: PolicyBook
) -> list[BucketUpdate]:
    """The buckets one usage event adds its cost to."""
    ts: datetime = record["ts"]
    updates = []
    scopes = scopes_of(
        record["user_id"], record.get("feature"), record.get("team"), record.get("api_key_id")
    )
    for scope in scopes:
        aggregated = not is_partition_local(scope)
        for period in tracked_periods(scope, ts, policies):
            key = partial_key(scope, period, partition) if aggregated else bucket_key(scope, period)
            updates.append(BucketUpdate(scope, period, key, aggregated))
    return updates


def event_cost(record: dict[str, Any]) -> int:
    """What a usage event adds to spend, in nano-dollars. Unknown prices add their baseline
    cost: an unpriced model must not be a free way around a cap."""
    if record.get("price_unknown"):
        return int(record.get("baseline_cost_usd_nanos") or 0)
    return int(record.get("cost_usd_nanos") or 0)


def decision_record(
    scope: str,
    policy: Policy,
    period: Period,
    spent_nanos: int,
    counted_through: datetime,
    evaluation: Evaluation,
    now: datetime,
    reason: str,
) -> dict[str, Any]:
    return {
        "event_id": new_id(),
        "ts": now,
        "scope": scope,
        "state": evaluation.state,
        "spent_usd_nanos": spent_nanos,
        "limit_usd_nanos": policy.limit_usd_nanos,
        "period": policy.period,
        "period_start": period.start,
        "resets_at": period.end,
        "counted_through": counted_through,
        "threshold": evaluation.threshold,
        "upgrade_url": policy.upgrade_url,
        "upgrade_prompt": policy.upgrade_prompt,
        "reason": reason,
    }


def should_publish(
    previous: dict[str, Any] | None, new: dict[str, Any], spent_refresh: bool
) -> bool:
    """Publish on a change of state, period or limit; spent-only changes when refreshing."""
    if previous is None:
        return True
    if (
        previous["state"] != new["state"]
        or previous["period_start"] != new["period_start"]
        or previous["limit_usd_nanos"] != new["limit_usd_nanos"]
    ):
        return True
    return spent_refresh and previous["spent_usd_nanos"] != new["spent_usd_nanos"]


def crossed_thresholds(
    previous: dict[str, Any] | None, new: dict[str, Any], policy: Policy
) -> list[float]:
    """Soft thresholds crossed by this decision that the previous one (same period) had not."""
    before = 0.0
    if previous is not None and previous["period_start"] == new["period_start"]:
        before = previous.get("threshold") or 0.0
    after = new.get("threshold") or 0.0
    return [t for t in policy.thresholds if before < t <= after]


def threshold_alert(
    scope: str, policy: Policy, decision: dict[str, Any], threshold: float, now: datetime
) -> dict[str, Any]:
    spent = decision["spent_usd_nanos"] / 1e9
    limit = policy.limit_usd_nanos / 1e9
    limit_text = usd_text(policy.limit_usd_nanos)
    severity = "critical" if threshold >= 1.0 else "warning" if threshold >= 0.8 else "info"
    return {
        "event_id": new_id(),
        "ts": now,
        "alert_key": f"budget_threshold|{scope}|{decision['period_start'].isoformat()}|{threshold}",
        "kind": "budget_threshold",
        "scope": scope,
        "severity": severity,
        "status": "firing",
        "score": threshold,
        "expected": limit,
        "observed": spent,
        "unit": "usd",
        "window_seconds": int((decision["resets_at"] - decision["period_start"]).total_seconds()),
        "first_seen": decision["counted_through"],
        "last_seen": decision["counted_through"],
        "message": (
            f"{scope} has spent ${spent:.4f} of its ${limit_text} {policy.period} budget "
            f"({threshold:.0%} threshold); resets {decision['resets_at'].isoformat()}"
        ),
        "details": {"threshold": str(threshold), "period": policy.period},
    }


def rollover_due(decision: dict[str, Any], now: datetime) -> bool:
    """A warn/blocked decision whose period has ended: the scope must re-open now."""
    resets_at = decision.get("resets_at")
    return decision["state"] != "open" and resets_at is not None and resets_at <= now


def utc(ts_ms: int) -> datetime:
    return datetime.fromtimestamp(ts_ms / 1000, UTC)
