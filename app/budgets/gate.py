"""The budget gate in the dispatcher: refuse before any upstream cost, never a user under the cap.

Owns reservation accounting. For every capped scope of a call (user, feature,
team, key, global) the gate knows:

- the latest ``BudgetDecision`` of the spend worker: the scope's spend, and per
  usage partition the offset it counts through;
- the spend this dispatcher emitted that the worker may not have counted yet:
  each usage event is held by its spool sequence until Kafka acknowledges it,
  then by its (partition, offset), and dropped as soon as a decision counts
  through that offset. Matched by identity, never by time: nothing counted
  twice, nothing counted zero times;
- its calls in flight: what each reserved, and its worst case.

Admission, per capped scope, with ``room = limit - counted - not yet counted``:

- ``room <= 0``: refused (limit reached).
- The call's full worst case fits in its share of what is left (``room`` minus
  the worst cases in flight, over the calls in flight, the calls waiting for room
  and itself; alone, all of it): admitted as is.
- Else the call gets an output cap (``max_tokens``): its share, and at least its
  realistic output (twice a high quantile of recent calls), within what is left
  (the client is told in a header). A call with nothing in flight is always
  admitted this way, so a user under the cap is never refused by a sequential client;
  with others in flight, a call whose realistic output does not fit waits for
  them to settle (``budget_queue_wait_s``, by default as long as a call may
  last, so they have ended by then), then is refused as "requests in flight
  would exceed the limit" if it still does not fit.
- Calls waiting for room are served in the order they started waiting: while
  any wait for room on a scope, a call that arrives waits behind them, even one
  that would fit (else a call needing much room is overtaken for ever by small
  ones). A call is in line only on the scopes it waited for room on: calls
  waiting on their user's cap do not hold up other users of a shared cap.

So the worst cases in flight never exceed the room: a dispatcher's own calls
overshoot a cap by at most the prompt of one lone call whose prompt alone
exceeds what is left (plus the error of the prompt estimate: a capped call's text
and tool definitions are counted the way its upstream bills, its images at the most
they may cost);
several
dispatchers add what the others spent since the last decision.
Reservations are released by the caller, and swept after
``max_call_duration_s`` if a caller ever failed to (counted in a metric).
Does not own HTTP (the refusal is ``BudgetRefused``; the web layer maps it to 402).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import itertools
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from app.budgets.pending import DEFAULT_ENTRIES_MAX, PendingSpend, counted_offsets
from app.budgets.policy import Policy, PolicyBook, evaluate
from app.budgets.reservations import CallCost, fit_output_tokens
from app.clock import Clock
from app.errors import ClientGone
from app.pricing.catalog import usd_text

SWEEP_GRACE_S = 30.0
# The realistic output of a call is at least this many tokens: the model's recent 95th
# percentile is shared by every user, and another user's tiny answers (520 three-token calls
# in session 14's probe) cut a capped user's answers to 6 tokens.
MIN_EXPECTED_OUTPUT_TOKENS = 256
GONE_CHECK_S = 0.5  # how often a call waiting for room checks that its client is still there


@dataclass(eq=False)
class Reservation:
    scopes: list[str]
    reserved_nanos: int  # what the status shows in flight
    worst_nanos: int  # the most the call can cost (with its cap, if any)
    created: float = field(default_factory=time.monotonic)
    released: bool = False


@dataclass
class Admission:
    reservation: Reservation
    max_tokens_cap: int | None  # output cap the gate set (None: the call runs as asked)
    expected_output_tokens: int


@dataclass
class ScopeStatus:
    scope: str
    policy: Policy
    state: str
    decided_by: str  # "spend_worker" | "this_gateway" | "none_yet"
    spent_nanos: int  # counted by the worker + not yet counted here (not reservations)
    counted_nanos: int
    uncounted_nanos: int
    reserved_nanos: int
    worst_in_flight_nanos: int
    period_start: datetime
    resets_at: datetime
    worker_decision: dict[str, Any] | None

    @property
    def room_nanos(self) -> int:
        return self.policy.limit_usd_nanos - self.spent_nanos

    def to_json(self) -> dict[str, Any]:
        decision = self.worker_decision
        return {
            "scope": self.scope,
            "state": self.state,
            "decided_by": self.decided_by,
            "period": self.policy.period,
            "limit_usd": usd_text(self.policy.limit_usd_nanos),
            "spent_usd": usd_text(self.spent_nanos),
            "remaining_usd": usd_text(max(self.room_nanos, 0)),
            "period_start": self.period_start.isoformat(),
            "resets_at": self.resets_at.isoformat(),
            "breakdown": {
                "counted_by_agent_usd": usd_text(self.counted_nanos),
                "seen_locally_usd": usd_text(self.uncounted_nanos),
                "in_flight_usd": usd_text(self.reserved_nanos),
            },
            "worker_decision": None
            if decision is None
            else {
                "state": decision["state"],
                "spent_usd": usd_text(decision["spent_usd_nanos"]),
                "limit_usd": usd_text(decision["limit_usd_nanos"]),
                "decided_at": decision["ts"].isoformat(),
                "reason": decision.get("reason"),
            },
        }


class BudgetRefused(Exception):
    """A call refused by a budget: which scope, why, and its numbers (for the 402)."""

    def __init__(
        self,
        status: ScopeStatus,
        reason: str,
        *,
        retryable: bool = False,
        awaiting_count_s: float = 0.0,
    ) -> None:
        super().__init__(f"{status.scope}: {reason}")
        self.status = status
        self.reason = reason
        self.retryable = retryable  # only calls in flight (or a count to come) stand in the way
        # > 0: not a refusal but a wait for the spend worker's count of the scope's new
        # period, for at most this long; past it the gate decides on its own numbers
        self.awaiting_count_s = awaiting_count_s
        # An escalation's refusal: the request's earlier attempt, answered and charged but
        # judged a failure (its model, what it cost, why it failed), for the 402 to say
        self.earlier_attempt: tuple[str, int, str] | None = None


class BudgetGate:
    def __init__(
        self,
        policies: PolicyBook,
        clock: Clock,
        reservations: bool = True,
        *,
        max_call_duration_s: float = 600.0,
        pending_entries_max: int = DEFAULT_ENTRIES_MAX,
        max_overshoot_fraction: float = 0.1,
        policy_change_wait_s: float = 0.0,
    ) -> None:
        self.policies = policies
        # After a scope's own policy appears or changes its period, the worker's count of the
        # new period takes a round trip (about a second); until then the gate knows only the
        # old period's count, or none, and would admit against the whole limit. 0: no wait
        # (the dispatcher sets budget_policy_change_wait_s).
        self.policy_change_wait_s = policy_change_wait_s
        # A lone call near the cap is served with what is left (one output token at least),
        # so it may cross the cap by its prompt's cost; by at most this share of the limit.
        self.max_overshoot_fraction = max_overshoot_fraction
        self.clock = clock
        self.reservations = reservations  # off: only what has been spent counts (benchmarks)
        self.max_call_duration_s = max_call_duration_s
        self.decisions: dict[str, dict[str, Any]] = {}
        self.pending = PendingSpend(pending_entries_max)
        self._reserved: dict[str, int] = defaultdict(int)
        self._worst: dict[str, int] = defaultdict(int)
        self._calls: dict[str, int] = defaultdict(int)  # calls in flight per scope
        # Calls waiting for room per scope, by ticket (the order they started waiting): served
        # in that order, so a call needing much room is not overtaken forever by small ones.
        self._queue: dict[str, list[int]] = {}
        self._tickets = itertools.count(1)
        self._in_flight: set[Reservation] = set()
        self.swept = 0  # reservations released by the sweep (a caller failed to)
        self._lock = threading.Lock()  # admission is check-then-reserve: keep it atomic
        self._changed: asyncio.Event | None = None

    # -- views fed from Kafka ----------------------------------------------------------
    def on_decision(self, scope: str, record: dict[str, Any] | None) -> None:
        with self._lock:
            if record is None:
                self.decisions.pop(scope, None)
            else:
                self.decisions[scope] = record
                self.pending.counted(scope, self._current_counted(scope))
        self._notify()

    def on_delivered(self, seq: int, partition: int, offset: int) -> None:
        """Kafka acknowledged the event of spool sequence ``seq`` at (partition, offset)."""
        with self._lock:
            self.pending.delivered(seq, partition, offset, self._current_counted)

    def _current_decision(self, scope: str, now: datetime | None = None) -> dict[str, Any] | None:
        """The latest decision of ``scope`` if it is about the current period."""
        decision = self.decisions.get(scope)
        policy = self.policies.policy_for(scope)
        if decision is None or policy is None:
            return None
        period = policy.period_at(now or self.clock.now())
        return decision if decision["period_start"] == period.start else None

    def _current_counted(self, scope: str) -> dict[int, int]:
        return counted_offsets(self._current_decision(scope))

    # -- accounting --------------------------------------------------------------------
    def _status(self, scope: str, policy: Policy, now: datetime) -> ScopeStatus:
        period = policy.period_at(now)
        decision = self.decisions.get(scope)
        counted, state, decided_by = 0, "open", "none_yet"
        current = decision if decision and decision["period_start"] == period.start else None
        if current is not None:
            counted = current["spent_usd_nanos"]
            decided_by = "spend_worker"
            state = current["state"]  # canonical, unless the limit changed since
        uncounted = self.pending.total(scope, int(period.start.timestamp() * 1000))
        spent = counted + uncounted
        if current is None or current["limit_usd_nanos"] != policy.limit_usd_nanos:
            state = evaluate(spent, policy).state  # no verdict on this limit yet: the numbers
        if state != "blocked" and spent >= policy.limit_usd_nanos:
            state = "blocked"
        if state == "blocked" and not (
            current is not None
            and current["state"] == "blocked"
            and current["limit_usd_nanos"] == policy.limit_usd_nanos
        ):
            decided_by = "this_gateway"  # on its own spend, not counted by the worker yet
        return ScopeStatus(
            scope,
            policy,
            state,
            decided_by,
            spent,
            counted,
            uncounted,
            self._reserved.get(scope, 0),
            self._worst.get(scope, 0),
            period.start,
            period.end,
            decision,
        )

    def admit(
        self,
        scopes: list[str],
        cost: CallCost,
        *,
        await_counts: bool = True,
        ticket: int | None = None,
    ) -> Admission:
        """Reserve on every capped scope, or raise ``BudgetRefused``. May cap the output.

        ``await_counts``: a scope whose own policy just appeared or changed its period, and
        that the spend worker has not counted under it yet, raises a retryable refusal with
        ``awaiting_count_s`` (``admit_waiting`` waits for the count); False decides at once.
        ``ticket``: the call is waiting for room with this ticket (``admit_waiting``). While
        calls wait for room on a scope, a call that came after them waits too (retryable)."""
        now = self.clock.now()
        with self._lock:
            capped: list[tuple[str, ScopeStatus]] = []
            for scope in scopes:
                policy = self.policies.policy_for(scope)
                if policy is None:
                    continue
                status = self._open_status(scope, policy, now)
                if await_counts and status.decided_by == "none_yet":
                    left = self.policies.period_changed_within(scope, self.policy_change_wait_s)
                    if left > 0:
                        raise BudgetRefused(
                            status,
                            "the cap just changed; waiting for the spend worker's count",
                            retryable=True,
                            awaiting_count_s=left,
                        )
                capped.append((scope, status))
            for scope, status in capped:
                queue = self._queue.get(scope)
                if queue and (ticket is None or queue[0] < ticket):
                    raise BudgetRefused(
                        status, "earlier requests are waiting for room under the limit",
                        retryable=True,
                    )  # fmt: skip
            cap, worst = None, cost.worst_nanos
            if capped and self.reservations:
                cap, worst = self._output_cap(capped, cost, ticket)
            expected = min(
                cost.expected_output_tokens, cost.max_output_tokens if cap is None else cap
            )
            reserved = cost.price(expected)
            if not self.reservations:
                reserved = worst = 0
            names = [scope for scope, _ in capped]
            reservation = Reservation(names, reserved, worst)
            for scope in names:
                self._reserved[scope] += reserved
                self._worst[scope] += worst
                self._calls[scope] += 1
            if names:
                self._in_flight.add(reservation)
            if ticket is not None:
                self._dequeue(scopes, ticket)
            return Admission(reservation, cap, expected)

    def _dequeue(self, scopes: list[str], ticket: int) -> None:
        for scope in scopes:
            queue = self._queue.get(scope)
            if queue is not None and ticket in queue:
                queue.remove(ticket)
                if not queue:
                    del self._queue[scope]

    def _sharers(self, scope: str, ticket: int | None) -> int:
        """The calls the room of ``scope`` is shared by: in flight, in line, and this one."""
        line = self._queue.get(scope, [])
        return 1 + self._calls.get(scope, 0) + len(line) - (ticket is not None and ticket in line)

    def _output_cap(
        self, capped: list[tuple[str, ScopeStatus]], cost: CallCost, ticket: int | None = None
    ) -> tuple[int | None, int]:
        """(output cap or None, worst case) such that every scope's worst cases in flight stay
        within its room; raises ``BudgetRefused`` when the call must wait or be refused."""
        room = {scope: s.room_nanos - s.worst_in_flight_nanos for scope, s in capped}
        budget = min(room.values())
        # Its share of what is left: the room over the calls in flight, the calls waiting for
        # room (known demand) and itself. A call whose worst case is more would hold the room
        # that the calls arriving with it need (the first three of 48 concurrent calls without
        # max_tokens held $0.49 of a $0.50 cap for answers of $0.009).
        share = min(room[scope] // self._sharers(scope, ticket) for scope, _ in capped)
        if cost.worst_nanos <= share:  # alone and nobody waiting: the whole room
            return None, cost.worst_nanos
        # The prompt, known before the call, and one output token: at least (the prompt's
        # floor, not the estimate, which may be high: a user under the cap is not refused on it)
        least = cost.least
        for _, status in capped:
            tolerance = int(status.policy.limit_usd_nanos * self.max_overshoot_fraction)
            if least > status.room_nanos + tolerance:
                raise BudgetRefused(
                    status,
                    # exact amounts: rounded to 6 places a micro cap read "$0.000001, more
                    # than the $0.000001 left" (probe I)
                    f"this request's prompt alone (and one output token per choice it asks "
                    f"for) would cost at least ${usd_text(least)}, more than the ${usd_text(max(status.room_nanos, 0))} "
                    f"left under the limit (a last call may cross it by "
                    f"{self.max_overshoot_fraction:.0%} of the limit at most)",
                )
        target = min(
            cost.max_output_tokens, 2 * max(cost.expected_output_tokens, MIN_EXPECTED_OUTPUT_TOKENS)
        )
        fits = fit_output_tokens(cost, budget)
        if fits >= target:
            tokens = min(fits, max(target, fit_output_tokens(cost, share)))
            return tokens, cost.price(tokens)
        short = [s for scope, s in capped if fit_output_tokens(cost, room[scope]) < target]
        if all(s.worst_in_flight_nanos == 0 for s in short):
            # Nothing in flight where the room is short, so nothing to wait for (calls on a
            # shared cap with room enough free none of it): serve it, with as much output as
            # is left (at least one token). A user under the cap is never refused by a
            # one-at-a-time client, nor are calls left waiting for a settlement to come.
            tokens = max(1, fits)
            return tokens, cost.price(tokens)
        tightest = min(capped, key=lambda item: room[item[0]])[1]
        raise BudgetRefused(tightest, "requests in flight would exceed the limit", retryable=True)

    def admit_free(self, scopes: list[str]) -> Admission:
        """A call that costs nothing (an answer from the response cache): refused only where a
        scope's limit is reached, reserving nothing and waiting for nothing. Admitted on the
        provider call's worst case, a hit was refused under the cap (its prompt alone "would
        cost" more than the room left) and waited behind calls in flight (probe S)."""
        now = self.clock.now()
        with self._lock:
            for scope in scopes:
                policy = self.policies.policy_for(scope)
                if policy is not None:
                    self._open_status(scope, policy, now)
        return Admission(Reservation([], 0, 0), None, 0)

    def _open_status(self, scope: str, policy: Policy, now: datetime) -> ScopeStatus:
        """The scope's status, or ``BudgetRefused`` where its limit is reached."""
        status = self._status(scope, policy, now)
        if status.state == "blocked":
            raise BudgetRefused(status, "limit reached")
        return status

    async def admit_waiting(
        self,
        scopes: list[str],
        cost: CallCost,
        wait_s: float,
        gone: Callable[[], bool] | None = None,
    ) -> Admission:
        """``admit``, waiting up to ``wait_s`` for calls in flight to settle when only they
        stand in the way (near the cap, with concurrent calls). ``gone``: whether the client
        has left, checked at least every ``GONE_CHECK_S`` while waiting (``ClientGone``)."""
        deadline = time.monotonic() + wait_s
        ticket: int | None = None
        try:
            while True:
                changed = self._changed_event()
                try:
                    return self.admit(scopes, cost, ticket=ticket)
                except BudgetRefused as refusal:
                    left = deadline - time.monotonic()
                    if refusal.awaiting_count_s and left <= 0:
                        return self.admit(scopes, cost, await_counts=False, ticket=ticket)
                    if not refusal.retryable or left <= 0:
                        raise
                    if refusal.awaiting_count_s:
                        left = min(left, refusal.awaiting_count_s)
                    else:
                        # Waiting for room on that scope: in line there, and only there (a
                        # call waiting on its user's cap holds up no other user of their
                        # feature's); the calls admitted meanwhile leave it its share.
                        with self._lock:
                            if ticket is None:
                                ticket = next(self._tickets)
                            line = self._queue.setdefault(refusal.status.scope, [])
                            if ticket not in line:
                                bisect.insort(line, ticket)
                if gone is not None:
                    left = min(left, GONE_CHECK_S)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(changed.wait(), timeout=left)
                if gone is not None and gone():
                    # A call nobody waits for any more would run (and be billed) later: the
                    # SDK's retries turned 4 timed-out calls into 12 served ones.
                    raise ClientGone(
                        "the client closed its connection while the call waited for room "
                        "under a budget; nothing was sent to the provider"
                    )
        finally:
            if ticket is not None:
                with self._lock:
                    self._dequeue(scopes, ticket)
                self._notify()  # the calls behind it in line may go now

    def _changed_event(self) -> asyncio.Event:
        if self._changed is None:
            self._changed = asyncio.Event()
        return self._changed

    def _notify(self) -> None:
        """Wake calls waiting for room (the gate lives on the dispatcher's event loop)."""
        event, self._changed = self._changed, None
        if event is not None:
            event.set()

    def settle(
        self,
        reservation: Reservation,
        actual_nanos: int,
        ts: datetime | None = None,
        seq: int | None = None,
    ) -> None:
        """Release the reservation and hold what the call really cost (spool sequence ``seq``)
        until the worker counts it. Idempotent."""
        with self._lock:
            if reservation.released:
                return
            self._release(reservation)
            ts_ms = int((ts or self.clock.now()).timestamp() * 1000)
            self.pending.hold(reservation.scopes, actual_nanos, ts_ms, seq)
        self._notify()

    def _release(self, reservation: Reservation) -> None:
        reservation.released = True
        self._in_flight.discard(reservation)
        for scope in reservation.scopes:
            for totals, amount in (
                (self._reserved, reservation.reserved_nanos),
                (self._worst, reservation.worst_nanos),
                (self._calls, 1),
            ):
                left = totals[scope] - amount
                if left > 0:
                    totals[scope] = left
                else:
                    totals.pop(scope, None)

    def record_spend(
        self, scopes: list[str], nanos: int, ts: datetime, seq: int | None = None
    ) -> None:
        """Spend reported after the fact (/v1/usage, or spooled before a restart): counted,
        never refused."""
        self._hold_capped(
            scopes, nanos, ts, lambda capped, ts_ms: self.pending.hold(capped, nanos, ts_ms, seq)
        )

    def _hold_capped(
        self, scopes: list[str], nanos: int, ts: datetime, hold: Callable[[list[str], int], None]
    ) -> None:
        """``hold(capped scopes, ts_ms)`` under the lock: spend already made is held only
        on the scopes that have a cap (nothing to hold for the others), and only if it was
        made in the scope's current period: an earlier period's (read back, or reported late,
        after this period was first asked for) never counts against this one."""
        if not nanos:
            return
        ts_ms = int(ts.astimezone(UTC).timestamp() * 1000)
        now = self.clock.now()
        with self._lock:
            capped = []
            for scope in scopes:
                policy = self.policies.policy_for(scope)
                if policy is not None and ts >= policy.period_at(now).start:
                    capped.append(scope)
            hold(capped, ts_ms)

    def counted_progress(self) -> dict[int, tuple[int, int]]:
        """Per usage partition, how far the spend worker's decisions count: the least and
        the most of every decision's ``counted_offsets`` there."""
        progress: dict[int, tuple[int, int]] = {}
        with self._lock:
            for decision in self.decisions.values():
                for partition, offset in counted_offsets(decision).items():
                    low, high = progress.get(partition, (offset, offset))
                    progress[partition] = (min(low, offset), max(high, offset))
        return progress

    def record_counted_later(
        self, scopes: list[str], nanos: int, ts: datetime, partition: int, offset: int
    ) -> None:
        """Spend already in Kafka at (partition, offset) that the spend worker may not have
        counted: held until a decision counts through that offset (none if one already has)."""
        self._hold_capped(
            scopes,
            nanos,
            ts,
            lambda capped, ts_ms: self.pending.hold_delivered(
                capped, nanos, ts_ms, partition, offset, self._current_counted
            ),
        )

    def waits_for_count(
        self,
        scopes: Sequence[str],
        partition: int,
        offset: int,
        counted_if_capped: Callable[[str], dict[int, int] | None] | None = None,
    ) -> bool:
        """Whether a capped scope among ``scopes`` has no current decision counting through
        the usage event at (partition, offset) yet. Each scope is looked up with
        ``counted_if_capped`` (this gate's by default): a caller asking for many events
        passes one that looks each scope up once."""
        lookup = counted_if_capped or self.counted_if_capped
        for scope in scopes:
            through = lookup(scope)
            if through is not None and through.get(partition, -1) <= offset:
                return True
        return False

    def counted_if_capped(self, scope: str) -> dict[int, int] | None:
        """What the current decision of ``scope`` counts through, per usage partition (None:
        no cap)."""
        with self._lock:
            if self.policies.policy_for(scope) is None:
                return None
            return self._current_counted(scope)

    def sweep(self) -> int:
        """Release reservations older than max_call_duration_s (+ grace): a second line of
        defence; every path of a call already releases its own."""
        limit = time.monotonic() - self.max_call_duration_s - SWEEP_GRACE_S
        with self._lock:
            stale = [r for r in self._in_flight if r.created < limit]
            for reservation in stale:
                self._release(reservation)
            self.swept += len(stale)
        if stale:
            self._notify()
        return len(stale)

    def uncounted_age_s(self) -> float | None:
        """How long the oldest spend this dispatcher delivered has waited for the spend
        worker's count (None: nothing waits). Grows while the worker is down."""
        with self._lock:  # a scope whose cap was removed gets no decision to count it
            oldest = self.pending.oldest_uncounted_ms(
                lambda scope: self.policies.policy_for(scope) is not None
            )
        if oldest is None:
            return None
        return max(0.0, self.clock.now().timestamp() - oldest / 1000)

    def near_limit(self, scopes: list[str], min_room: float) -> bool:
        """Whether any capped scope has less than ``min_room`` (a share of its limit) left,
        counting the worst cases of calls in flight; blocked scopes are near, uncapped ones not."""
        now = self.clock.now()
        with self._lock:
            for scope in scopes:
                policy = self.policies.policy_for(scope)
                if policy is None:
                    continue
                status = self._status(scope, policy, now)
                room = status.room_nanos - status.worst_in_flight_nanos
                if status.state == "blocked" or room < min_room * policy.limit_usd_nanos:
                    return True
        return False

    def status(self, scope: str) -> ScopeStatus | None:
        policy = self.policies.policy_for(scope)
        if policy is None:
            return None
        with self._lock:
            return self._status(scope, policy, self.clock.now())

    def in_flight_nanos(self) -> int:
        with self._lock:
            return sum(self._reserved.values())

    def in_flight_count(self) -> int:
        with self._lock:
            return len(self._in_flight)
