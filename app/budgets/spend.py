"""Budget decisions for the spend worker, as plain functions (the Faust agents only call these).

Owns what a usage event costs against a cap, which scopes are partition-local
(users: usage is keyed by user) and which are aggregated from per-partition
partial sums (features, teams, keys, global), and how a scope's spend becomes a
``BudgetDecision`` and threshold ``Alert``s. How spend is kept and counted is
``app/budgets/ledger.py`` and ``app/budgets/counter.py``.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from app.alerts_config import BUDGET_THRESHOLD
from app.budgets.periods import Period
from app.budgets.policy import Evaluation, Policy
from app.metering.usage import new_id
from app.pricing.catalog import MAX_EVENT_NANOS, usd_text


def is_partition_local(scope: str) -> bool:
    """User spend lives on the partition of the user's usage events; the rest is aggregated."""
    return scope.startswith("user:")


def event_cost(record: Mapping[str, Any]) -> int:
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
    counted_offsets: dict[int, int] | None = None,
) -> dict[str, Any]:
    """``counted_offsets``: per usage partition, the offset below which every event is in
    ``spent_nanos`` (what dispatchers match their own uncounted spend against).

    A spend past what the event's field holds (:data:`MAX_EVENT_NANOS`, $9.22 B: far past
    any cap, which is at most $1 B) is published as that most; the state is judged on the
    exact spend. Unbounded, it did not encode and crashed the worker on every restart."""
    return {
        "event_id": new_id(),
        "ts": now,
        "scope": scope,
        "state": evaluation.state,
        "spent_usd_nanos": min(spent_nanos, MAX_EVENT_NANOS),
        "limit_usd_nanos": policy.limit_usd_nanos,
        "period": policy.period,
        "period_start": period.start,
        "resets_at": period.end,
        "counted_through": counted_through,
        "threshold": evaluation.threshold,
        "upgrade_url": policy.upgrade_url,
        "upgrade_prompt": policy.upgrade_prompt,
        "reason": reason,
        "counted_offsets": {str(p): o for p, o in sorted((counted_offsets or {}).items())},
    }


def should_publish(
    previous: dict[str, Any] | None, new: dict[str, Any], spent_refresh: bool
) -> bool:
    """Publish on a change of state, period or limit; when refreshing, also on a change of
    spend or of the offsets it counts through (dispatchers drop what it now covers)."""
    if previous is None:
        return True
    if (
        previous["state"] != new["state"]
        or previous["period_start"] != new["period_start"]
        or previous["limit_usd_nanos"] != new["limit_usd_nanos"]
    ):
        return True
    return spent_refresh and (
        previous["spent_usd_nanos"] != new["spent_usd_nanos"]
        or previous.get("counted_offsets") != new.get("counted_offsets")
    )


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
        "alert_key": f"{BUDGET_THRESHOLD}|{scope}|{decision['period_start'].isoformat()}|{threshold}",
        "kind": BUDGET_THRESHOLD,
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
            # Exact, as the 402's figures are: a $0.000001 cap's alert said "spent $0.0000"
            # (probe 52)
            f"{scope} has spent ${usd_text(decision['spent_usd_nanos'])} of its ${limit_text} "
            f"{policy.period} budget "
            f"({threshold:.0%} threshold); resets {decision['resets_at'].isoformat()}"
        ),
        "details": {"threshold": str(threshold), "period": policy.period},
    }


def rollover_due(decision: dict[str, Any], now: datetime) -> bool:
    """A decision whose period has ended: the new period's decision is due now (a blocked
    scope re-opens, and every view shows the new period's spend), without waiting for traffic."""
    resets_at = decision.get("resets_at")
    return resets_at is not None and resets_at <= now


def utc(ts_ms: int) -> datetime:
    return datetime.fromtimestamp(ts_ms / 1000, UTC)
