"""Budget policies: validation of what an admin asks for, and which policy applies to a scope.

A scope is ``global``, ``user:<id>``, ``feature:<name>``, ``team:<id>`` or
``key:<id>``; ``user:*`` and ``feature:*`` are defaults for every user or
feature without a policy of its own ("every user gets $5/month").
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal, InvalidOperation
from typing import Any

from app.budgets.ledger import iter_window_problems
from app.budgets.periods import PERIOD_KINDS, Period, PeriodError, period_of, zone
from app.ids import id_problem
from app.pricing.catalog import nanos_to_usd, usd_text, usd_to_nanos

SCOPE_KINDS = ("user", "feature", "team", "key")
DEFAULT_THRESHOLDS = (0.5, 0.8, 1.0)
MAX_LIMIT_USD = Decimal(1_000_000_000)


class PolicyError(ValueError):
    """An invalid policy; ``field`` names what to fix."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def validate_scope(scope: str, *, allow_default: bool = True) -> str:
    if scope == "global":
        return scope
    kind, sep, name = scope.partition(":")
    if not sep or kind not in SCOPE_KINDS or not name or len(scope) > 300:
        raise PolicyError(
            "scope",
            f"scope {scope[:300]!r} is not one of global, user:<id>, feature:<name>, team:<id>, "
            "key:<id>",
        )
    problem = id_problem(name)
    if problem is not None:  # the same rule as the ids a call is attributed with
        raise PolicyError("scope", f"the id of scope {scope[:300]!r} {problem}")
    if name == "*" and not allow_default:
        raise PolicyError("scope", f"{scope!r} is a default policy, not a scope that spends")
    return scope


@dataclass(frozen=True)
class Policy:
    scope: str
    period: str
    limit_usd_nanos: int
    thresholds: tuple[float, ...] = DEFAULT_THRESHOLDS
    timezone: str = "UTC"
    window_seconds: int | None = None
    upgrade_url: str | None = None
    upgrade_prompt: str | None = None

    def period_at(self, ts: datetime) -> Period:
        return period_of(self.period, ts, self.timezone, self.window_seconds)

    @property
    def limit_usd(self) -> Decimal:
        return nanos_to_usd(self.limit_usd_nanos)

    def to_record(
        self, event_id: str, ts: datetime, updated_by: str | None = None
    ) -> dict[str, Any]:
        return {
            "event_id": event_id,
            "ts": ts,
            "scope": self.scope,
            "period": self.period,
            "window_seconds": self.window_seconds,
            "limit_usd_nanos": self.limit_usd_nanos,
            "thresholds": list(self.thresholds),
            "timezone": self.timezone,
            "upgrade_url": self.upgrade_url,
            "upgrade_prompt": self.upgrade_prompt,
            "deleted": False,
            "updated_by": updated_by,
        }

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Policy:
        return cls(
            scope=record["scope"],
            period=record["period"],
            limit_usd_nanos=record["limit_usd_nanos"],
            thresholds=tuple(record.get("thresholds") or DEFAULT_THRESHOLDS),
            timezone=record.get("timezone") or "UTC",
            window_seconds=record.get("window_seconds"),
            upgrade_url=record.get("upgrade_url"),
            upgrade_prompt=record.get("upgrade_prompt"),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "scope": self.scope,
            "period": self.period,
            "limit_usd": usd_text(self.limit_usd),
            "thresholds": list(self.thresholds),
            "timezone": self.timezone,
            "window_seconds": self.window_seconds,
            "upgrade_url": self.upgrade_url,
            "upgrade_prompt": self.upgrade_prompt,
        }


def _window_seconds(value: Any) -> int:
    if isinstance(value, bool):
        raise PolicyError("window", "window must be seconds or a duration like '1h', '30m'")
    if isinstance(value, int):
        seconds = value
    elif isinstance(value, str) and re.fullmatch(r"[0-9]{1,9}[smhd]", value):
        seconds = int(value[:-1]) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[value[-1]]
    else:
        raise PolicyError("window", f"window {value!r} must be seconds or like '1h', '30m', '7d'")
    if seconds < 60:
        raise PolicyError("window", "window must be at least 60 seconds")
    for problem in iter_window_problems(seconds):
        raise PolicyError("window", f"window {value!r}: {problem}")
    return seconds


def parse_policy(scope: str, body: Any) -> Policy:
    """Validate an admin's JSON body for ``PUT /v1/budgets/{scope}``; errors name the field."""
    validate_scope(scope)
    if not isinstance(body, dict):
        raise PolicyError("body", "the policy must be a JSON object")
    unknown = set(body) - {
        "period", "limit_usd", "thresholds", "timezone", "window", "window_seconds",
        "upgrade_url", "upgrade_prompt", "scope",
    }  # fmt: skip
    if unknown:
        raise PolicyError(sorted(unknown)[0], f"unknown field(s): {', '.join(sorted(unknown))}")
    if "scope" in body and body["scope"] != scope:
        raise PolicyError("scope", f"body scope {body['scope']!r} differs from the URL's {scope!r}")
    period = body.get("period", "month")
    if period not in PERIOD_KINDS:
        raise PolicyError("period", f"period {period!r} must be one of day, month, window")
    raw_limit = body.get("limit_usd")
    try:
        if isinstance(raw_limit, bool) or raw_limit is None:
            raise InvalidOperation
        limit = Decimal(str(raw_limit))
    except InvalidOperation:
        raise PolicyError("limit_usd", "limit_usd is required: a positive number of USD") from None
    if not limit.is_finite() or limit <= 0 or limit > MAX_LIMIT_USD:
        raise PolicyError(
            "limit_usd", f"limit_usd must be > 0 and <= {MAX_LIMIT_USD}, got {raw_limit}"
        )
    thresholds = body.get("thresholds", list(DEFAULT_THRESHOLDS))
    if (
        not isinstance(thresholds, list)
        or not thresholds
        or not all(isinstance(t, int | float) and not isinstance(t, bool) for t in thresholds)
        or not all(0 < t <= 1 for t in thresholds)
    ):
        raise PolicyError("thresholds", "thresholds must be a list of fractions in (0, 1]")
    thresholds = sorted({float(t) for t in thresholds} | {1.0})
    timezone = body.get("timezone", "UTC")
    try:
        zone(timezone) if isinstance(timezone, str) else zone("")
    except PeriodError as exc:
        raise PolicyError("timezone", str(exc)) from None
    window = body.get("window", body.get("window_seconds"))
    window_seconds = None
    if period == "window":
        if window is None:
            raise PolicyError("window", "period 'window' needs window, e.g. '1h'")
        window_seconds = _window_seconds(window)
    elif window is not None:
        raise PolicyError("window", "window is only valid with period 'window'")
    for name in ("upgrade_url", "upgrade_prompt"):
        value = body.get(name)
        if value is not None and (
            not isinstance(value, str) or id_problem(value, max_length=2000) is not None
        ):
            raise PolicyError(
                name, f"{name} must be a string of at most 2000 printable characters (one line)"
            )
    limit_nanos = usd_to_nanos(limit)
    if limit_nanos < 1:
        raise PolicyError(
            "limit_usd", f"limit_usd {raw_limit} is below the $0.000000001 resolution"
        )
    return Policy(
        scope=scope,
        period=period,
        limit_usd_nanos=limit_nanos,
        thresholds=tuple(thresholds),
        timezone=timezone,
        window_seconds=window_seconds,
        upgrade_url=body.get("upgrade_url"),
        upgrade_prompt=body.get("upgrade_prompt"),
    )


def scopes_of(
    user_id: str | None, feature: str | None, team: str | None = None, key_id: str | None = None
) -> list[str]:
    """The scopes one call spends against, most specific first."""
    scopes = []
    if user_id:
        scopes.append(f"user:{user_id}")
    if feature:
        scopes.append(f"feature:{feature}")
    if team:
        scopes.append(f"team:{team}")
    if key_id:
        scopes.append(f"key:{key_id}")
    scopes.append("global")
    return scopes


@dataclass
class PolicyBook:
    """Policies by scope, with per-kind defaults (``user:*``, ``feature:*``)."""

    policies: dict[str, Policy] = field(default_factory=dict)

    def put(self, policy: Policy) -> None:
        self.policies[policy.scope] = policy

    def remove(self, scope: str) -> None:
        self.policies.pop(scope, None)

    def apply_record(self, record: dict[str, Any] | None, scope: str) -> None:
        """Apply a record from the compacted policies topic (None or deleted = removal)."""
        if record is None or record.get("deleted"):
            self.remove(scope)
        else:
            self.put(Policy.from_record(record))

    def policy_for(self, scope: str) -> Policy | None:
        own = self.policies.get(scope)
        if own is not None or scope == "global":
            return own
        default = self.policies.get(scope.split(":", 1)[0] + ":*")
        if default is None:
            return None
        return Policy(**{**default.__dict__, "scope": scope})

    def all(self) -> Iterable[Policy]:
        return self.policies.values()


@dataclass(frozen=True)
class Evaluation:
    state: str  # open | warn | blocked
    threshold: float | None  # highest threshold reached


def evaluate(spent_nanos: int, policy: Policy) -> Evaluation:
    """State of a scope that has spent ``spent_nanos`` in the policy's current period."""
    # Exact integer arithmetic: floats lose nanos above 2**53 (limits of ~$9M and more).
    reached = [
        t for t in policy.thresholds if spent_nanos >= Decimal(str(t)) * policy.limit_usd_nanos
    ]
    highest = max(reached) if reached else None
    if spent_nanos >= policy.limit_usd_nanos:
        return Evaluation("blocked", highest)
    return Evaluation("warn" if highest is not None else "open", highest)
