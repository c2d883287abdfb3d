"""The budget gate in the dispatcher: 402 before any upstream cost, with bounded overshoot.

Owns reservation accounting. For every capped scope of a request (user,
feature, team, key, global) the gate knows:

- the latest ``BudgetDecision`` from the spend agent (``spent`` counts every
  event with ``ts <= counted_through``, from every dispatcher);
- the spend this dispatcher has seen itself since then (``local``);
- the reservations of its requests still in flight (``reserved``).

A request is refused with 402 when the agent says the scope is blocked, when
``spent + local + reserved`` already reaches the limit, or when other requests
are in flight and this one's worst case (prompt + ``max_tokens``) would cross
it. So one dispatcher can overshoot by at most the request that crossed the
limit; with N dispatchers, by at most N such requests until the decision
arrives. Reservations are released in a ``finally`` by the caller, whatever
happens to the call (completion, error, disconnect, timeout).
"""

from __future__ import annotations

import threading
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from app.budgets.policy import Policy, PolicyBook
from app.clock import Clock
from app.errors import ApiError
from app.pricing import nanos_to_usd, usd_text


@dataclass
class Reservation:
    scopes: list[str]
    amount_nanos: int
    released: bool = False


@dataclass
class ScopeStatus:
    scope: str
    policy: Policy
    state: str
    spent_nanos: int  # agent's count + what this dispatcher saw since (not reservations)
    agent_spent_nanos: int
    local_nanos: int
    reserved_nanos: int
    period_start: datetime
    resets_at: datetime

    def to_json(self) -> dict[str, Any]:
        return {
            "scope": self.scope,
            "state": self.state,
            "period": self.policy.period,
            "limit_usd": usd_text(self.policy.limit_usd_nanos),
            "spent_usd": usd_text(self.spent_nanos),
            "remaining_usd": usd_text(max(self.policy.limit_usd_nanos - self.spent_nanos, 0)),
            "period_start": self.period_start.isoformat(),
            "resets_at": self.resets_at.isoformat(),
            "breakdown": {
                "counted_by_agent_usd": usd_text(self.agent_spent_nanos),
                "seen_locally_usd": usd_text(self.local_nanos),
                "in_flight_usd": usd_text(self.reserved_nanos),
            },
        }


def budget_exceeded(status: ScopeStatus, reason: str) -> ApiError:
    policy = status.policy
    spent, limit = nanos_to_usd(status.spent_nanos), policy.limit_usd
    prompt = policy.upgrade_prompt or "Raise the limit or wait for the next period."
    if policy.upgrade_url:
        prompt += f" Upgrade: {policy.upgrade_url}"
    return ApiError(
        402,
        "budget_exceeded",
        f"Budget for {status.scope} is exhausted ({reason}): ${spent:.6f} of ${limit} this "
        f"{policy.period}; resets at {status.resets_at.isoformat()}. {prompt}",
        code="budget_exceeded",
        extra={
            "scope": status.scope,
            "limit_usd": float(limit),
            "spent_usd": float(spent),
            "period": policy.period,
            "resets_at": status.resets_at.isoformat(),
            "upgrade_url": policy.upgrade_url,
            "upgrade_prompt": policy.upgrade_prompt,
        },
    )


LOCAL_ENTRIES_MAX = 2048


def _append_local(entries: list[tuple[int, int]], ts_ms: int, nanos: int) -> None:
    """Record local spend; when decisions stop arriving (agent down), merge the oldest half
    into one entry stamped with their newest time, so admission stays O(1)-ish and the
    merged spend is kept until a decision covers all of it (conservative)."""
    entries.append((ts_ms, nanos))
    if len(entries) > LOCAL_ENTRIES_MAX:
        half = LOCAL_ENTRIES_MAX // 2
        oldest = entries[:half]
        entries[:half] = [(max(t for t, _ in oldest), sum(n for _, n in oldest))]


class BudgetGate:
    def __init__(self, policies: PolicyBook, clock: Clock, reservations: bool = True) -> None:
        self.policies = policies
        self.clock = clock
        self.reservations = reservations  # off: only what has been spent counts (benchmarks)
        self.decisions: dict[str, dict[str, Any]] = {}
        self._local: dict[str, list[tuple[int, int]]] = defaultdict(list)  # (ts_ms, nanos)
        self._reserved: dict[str, int] = defaultdict(int)
        self._lock = threading.Lock()  # admission is check-then-reserve: keep it atomic

    # -- views fed from Kafka ----------------------------------------------------------
    def on_decision(self, scope: str, record: dict[str, Any] | None) -> None:
        with self._lock:
            if record is None:
                self.decisions.pop(scope, None)
                return
            self.decisions[scope] = record
            through = self._counted_through_ms(record)
            entries = self._local.get(scope)
            if entries:
                # >=: event times are whole milliseconds and the agent may have counted only
                # some events of its last millisecond; counting that one twice until the next
                # decision errs towards blocking early, never towards overspending.
                self._local[scope] = [e for e in entries if e[0] >= through]

    @staticmethod
    def _counted_through_ms(record: dict[str, Any]) -> int:
        through = record.get("counted_through") or record["ts"]
        return int(through.timestamp() * 1000)

    # -- accounting --------------------------------------------------------------------
    def _status(self, scope: str, policy: Policy, now: datetime) -> ScopeStatus:
        period = policy.period_at(now)
        decision = self.decisions.get(scope)
        agent_spent, through_ms, state = 0, int(period.start.timestamp() * 1000), "open"
        if decision is not None and decision["period_start"] == period.start:
            agent_spent = decision["spent_usd_nanos"]
            through_ms = self._counted_through_ms(decision)
            if decision["limit_usd_nanos"] == policy.limit_usd_nanos:
                state = decision["state"]  # a changed limit is judged on the numbers below
        start_ms, end_ms = int(period.start.timestamp() * 1000), int(period.end.timestamp() * 1000)
        local = sum(
            nanos
            for ts, nanos in self._local.get(scope, ())
            if ts >= through_ms and start_ms <= ts < end_ms
        )
        reserved = self._reserved.get(scope, 0)
        spent = agent_spent + local
        if spent >= policy.limit_usd_nanos:
            state = "blocked"
        return ScopeStatus(
            scope, policy, state, spent, agent_spent, local, reserved, period.start, period.end
        )

    def admit(self, scopes: list[str], estimate_nanos: int) -> Reservation:
        """Reserve ``estimate_nanos`` on every capped scope, or raise a 402 ApiError."""
        now = self.clock.now()
        if not self.reservations:
            estimate_nanos = 0
        with self._lock:
            capped = []
            for scope in scopes:
                policy = self.policies.policy_for(scope)
                if policy is None:
                    continue
                status = self._status(scope, policy, now)
                if status.state == "blocked":
                    reason = "limit reached"
                    raise budget_exceeded(status, reason)
                worst_case = status.spent_nanos + status.reserved_nanos + estimate_nanos
                if status.reserved_nanos and worst_case > policy.limit_usd_nanos:
                    raise budget_exceeded(status, "requests in flight would exceed the limit")
                capped.append(scope)
            for scope in capped:
                self._reserved[scope] += estimate_nanos
            return Reservation(capped, estimate_nanos)

    def settle(
        self, reservation: Reservation, actual_nanos: int, ts: datetime | None = None
    ) -> None:
        """Release the reservation and count what the call really cost. Idempotent."""
        with self._lock:
            if reservation.released:
                return
            reservation.released = True
            ts_ms = int((ts or self.clock.now()).timestamp() * 1000)
            for scope in reservation.scopes:
                left = self._reserved[scope] - reservation.amount_nanos
                if left > 0:
                    self._reserved[scope] = left
                else:
                    del self._reserved[scope]
                if actual_nanos:
                    _append_local(self._local[scope], ts_ms, actual_nanos)

    def record_spend(self, scopes: list[str], nanos: int, ts: datetime) -> None:
        """Spend reported after the fact (/v1/usage): counted, never refused."""
        if not nanos:
            return
        ts_ms = int(ts.astimezone(UTC).timestamp() * 1000)
        with self._lock:
            for scope in scopes:
                if self.policies.policy_for(scope) is not None:
                    _append_local(self._local[scope], ts_ms, nanos)

    def status(self, scope: str) -> ScopeStatus | None:
        policy = self.policies.policy_for(scope)
        if policy is None:
            return None
        with self._lock:
            return self._status(scope, policy, self.clock.now())

    def in_flight_nanos(self) -> int:
        with self._lock:
            return sum(self._reserved.values())
