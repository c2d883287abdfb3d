"""The budget gate: refuse before any cost, never a user under the cap, nothing counted twice."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from fastavro import parse_schema, schemaless_reader, schemaless_writer
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from app.budgets.gate import MIN_EXPECTED_OUTPUT_TOKENS, Admission, BudgetGate, BudgetRefused
from app.budgets.pending import PendingSpend
from app.budgets.policy import Policy, PolicyBook, evaluate, parse_policy
from app.budgets.reservations import CallCost, OutputEstimator, fit_output_tokens
from app.budgets.spend import decision_record
from app.clock import Clock
from app.http.errors import budget_refusal

USD = 1_000_000_000  # nanos
NOW = datetime(2026, 10, 15, 12, 0, tzinfo=UTC)  # mid-October, far from any boundary
OCTOBER = datetime(2026, 10, 1, tzinfo=UTC)
NOVEMBER = datetime(2026, 11, 1, tzinfo=UTC)
SCHEMAS = Path(__file__).resolve().parents[2] / "schemas"


def usd(amount: float) -> int:
    return round(amount * USD)


def policies(**limits: Any) -> PolicyBook:
    """``policies(**{"user:*": 5, "global": {"limit_usd": 100, "period": "day"}})``."""
    book = PolicyBook()
    for scope, body in limits.items():
        book.put(parse_policy(scope, body if isinstance(body, dict) else {"limit_usd": body}))
    return book


def gate_with(book: PolicyBook, now: datetime = NOW, **kwargs: Any) -> BudgetGate:
    return BudgetGate(book, Clock(now), **kwargs)


def call(
    worst: int, expected: int | None = None, prompt: int = 0, client_capped: bool = False
) -> CallCost:
    """A call whose output token costs one nano-dollar: output tokens == nanos."""
    maximum = max(worst - prompt, 0)
    return CallCost(
        price=lambda tokens: prompt + tokens,
        max_output_tokens=maximum,
        expected_output_tokens=min(expected if expected is not None else maximum, maximum),
        client_capped=client_capped,
    )


def decision(
    scope: str,
    *,
    state: str,
    spent: int,
    limit: int,
    counted: dict[int, int] | None = None,
    period_start: datetime = OCTOBER,
    resets_at: datetime = NOVEMBER,
) -> dict[str, Any]:
    """A BudgetDecision record as the spend worker publishes it."""
    return {
        "event_id": "evt",
        "ts": NOW,
        "schema_version": 3,
        "scope": scope,
        "state": state,
        "spent_usd_nanos": spent,
        "limit_usd_nanos": limit,
        "period": "month",
        "period_start": period_start,
        "resets_at": resets_at,
        "counted_through": NOW,
        "threshold": None,
        "upgrade_url": None,
        "upgrade_prompt": None,
        "reason": "spend",
        "counted_offsets": {str(p): o for p, o in (counted or {}).items()},
    }


def refusal(gate: BudgetGate, scopes: list[str], cost: CallCost) -> BudgetRefused:
    with pytest.raises(BudgetRefused) as err:
        gate.admit(scopes, cost)
    return err.value


def spent(gate: BudgetGate, scope: str) -> int:
    status = gate.status(scope)
    assert status is not None
    return status.spent_nanos


def settle(gate: BudgetGate, admission: Admission, actual: int, **kwargs: Any) -> None:
    gate.settle(admission.reservation, actual, **kwargs)


# -- who is capped -----------------------------------------------------------------------
def test_scope_without_any_policy_is_never_refused() -> None:
    gate = gate_with(PolicyBook())
    for _ in range(50):
        admission = gate.admit(["user:alice", "feature:chat", "global"], call(usd(1000)))
        assert admission.reservation.scopes == [] and admission.max_tokens_cap is None
        settle(gate, admission, usd(1000))
    assert gate.in_flight_nanos() == 0
    assert gate.status("user:alice") is None


def test_user_default_caps_each_user_separately() -> None:
    gate = gate_with(policies(**{"user:*": 1}))
    bob = gate.admit(["user:bob", "global"], call(usd(0.1)))
    assert bob.reservation.scopes == ["user:bob"]  # global has no policy: not capped
    settle(gate, bob, usd(1))
    assert refusal(gate, ["user:bob", "global"], call(usd(0.1))).status.scope == "user:bob"
    assert gate.admit(["user:carol"], call(usd(0.1))).reservation.scopes == ["user:carol"]


def test_own_policy_beats_the_user_default_at_the_gate() -> None:
    gate = gate_with(policies(**{"user:*": 1, "user:vip": 100}))
    for scope in ("user:vip", "user:bob"):
        settle(gate, gate.admit([scope], call(0)), usd(5))
    gate.admit(["user:vip"], call(usd(1)))
    refusal(gate, ["user:bob"], call(usd(1)))


# -- sequential traffic: never refused under the cap -------------------------------------
def test_refused_once_real_spend_reaches_the_limit_and_never_before() -> None:
    gate = gate_with(policies(**{"user:alice": 1}))
    total = 0
    while total < usd(1):
        admission = gate.admit(["user:alice"], call(usd(0.3), prompt=usd(0.01)))
        cap = admission.max_tokens_cap
        actual = usd(0.01) + min(usd(0.25), cap if cap is not None else usd(0.29))
        settle(gate, admission, actual)
        total += actual
    assert total == usd(1), "the last call was capped to what was left: no overshoot"
    assert refusal(gate, ["user:alice"], call(usd(0.01))).reason == "limit reached"
    assert gate.in_flight_nanos() == 0  # a refusal reserves nothing


def test_a_lone_call_whose_worst_case_crosses_is_capped_to_fit() -> None:
    gate = gate_with(policies(**{"user:alice": 1}))
    settle(gate, gate.admit(["user:alice"], call(0)), usd(0.9))
    lone = gate.admit(["user:alice"], call(usd(50), prompt=usd(0.02)))
    assert lone.max_tokens_cap == usd(0.08)  # prompt 0.02 + 0.08 of output = the 0.1 left
    assert lone.reservation.worst_nanos == usd(0.1)


def test_a_lone_call_whose_prompt_alone_crosses_still_gets_one_token() -> None:
    """Under the cap, a one-at-a-time user is served: the overshoot is that prompt's cost."""
    gate = gate_with(policies(**{"user:alice": 1}))
    settle(gate, gate.admit(["user:alice"], call(0)), usd(1) - 5)
    lone = gate.admit(["user:alice"], call(usd(1), prompt=100))
    assert lone.max_tokens_cap == 1


def test_a_call_whose_prompt_alone_would_overshoot_by_more_than_the_tolerance_is_refused() -> None:
    """A prompt whose own cost (known before the call) exceeds what is left by more than
    ``max_overshoot_fraction`` of the limit is refused, even under the cap: before, a 1.36M
    token prompt was served under a $0.01 cap and spent $2.72. A small prompt still crosses
    (the test above), and a fresh user is refused only a prompt that alone costs more than
    the whole cap and its tolerance."""
    gate = gate_with(policies(**{"user:alice": 1}), max_overshoot_fraction=0.1)
    settle(gate, gate.admit(["user:alice"], call(0)), usd(0.5))
    fits = gate.admit(["user:alice"], call(usd(3), prompt=usd(0.6) - 1))  # 0.5 left + 0.1
    assert fits.max_tokens_cap == 1
    gate.settle(fits.reservation, 0)
    too_big = refusal(gate, ["user:alice"], call(usd(3), prompt=usd(0.6)))
    assert not too_big.retryable and "prompt alone" in too_big.reason
    assert "$0.600000001" in too_big.reason and "$0.5 left" in too_big.reason  # exact
    assert gate.in_flight_nanos() == 0
    assert budget_refusal(too_big).status == 402
    fresh = gate_with(policies(**{"user:bob": 1}), max_overshoot_fraction=0.1)
    assert fresh.admit(["user:bob"], call(usd(3), prompt=usd(1.1) - 1)).max_tokens_cap == 1
    refusal(fresh, ["user:bob"], call(usd(3), prompt=usd(1.1)))


def test_a_call_whose_worst_case_fits_is_not_capped() -> None:
    gate = gate_with(policies(**{"user:alice": 10}))
    admission = gate.admit(["user:alice"], call(usd(1), expected=usd(0.1)))
    assert admission.max_tokens_cap is None
    assert admission.reservation.reserved_nanos == usd(0.1)  # shown in flight: the estimate
    assert admission.reservation.worst_nanos == usd(1)


# -- concurrency near the cap ------------------------------------------------------------
def test_concurrent_calls_near_the_cap_are_capped_so_their_worst_cases_fit() -> None:
    gate = gate_with(policies(**{"user:alice": 1}))
    admitted = []
    refused = 0
    for _ in range(20):  # 20 concurrent calls of worst case $0.30, expected $0.05
        try:
            admitted.append(gate.admit(["user:alice"], call(usd(0.3), expected=usd(0.05))))
        except BudgetRefused as exc:
            assert exc.retryable and exc.reason == "requests in flight would exceed the limit"
            refused += 1
    worst = sum(a.reservation.worst_nanos for a in admitted)
    assert worst <= usd(1), "the worst cases in flight never exceed the room"
    assert len(admitted) >= 4 and refused > 0
    # as asked while a worst case fits its share ($1 alone, then $0.70 over two)
    assert all(a.max_tokens_cap is None for a in admitted[:2])
    assert all(a.max_tokens_cap is not None for a in admitted[2:])
    for admission in admitted:
        settle(gate, admission, admission.reservation.worst_nanos)
    assert spent(gate, "user:alice") <= usd(1)


def gpt_4o_call(expected: int = 150) -> CallCost:
    """A gpt-4o call without max_tokens: a 100-token prompt at $2.50/M, output at $10/M up to
    the assumed 16,384 tokens (worst case $0.164), ``expected`` the model's recent p95."""
    return CallCost(
        price=lambda tokens: 250_000 + 10_000 * tokens,
        max_output_tokens=16_384,
        expected_output_tokens=expected,
        client_capped=False,
    )


def test_concurrent_calls_far_from_the_cap_share_the_room_instead_of_the_first_taking_it() -> None:
    """Session 14's probe: 48 concurrent gpt-4o calls without max_tokens under a $0.50 cap.
    The first three ran as asked, holding $0.49 of worst cases for answers of about $0.009, so
    the fourth had $0.008 left, and the rest waited or were cut short at 9 % of the cap spent.
    Each call now runs as asked only if its worst case fits its share of the room (the room
    left over the calls in flight and itself); else it gets that share, at least twice the
    model's recent 95th percentile, so many calls run at once, each with a realistic output."""
    gate = gate_with(policies(**{"user:alice": 0.5}))
    cost = gpt_4o_call(expected=440)  # the probe's answers: 880 tokens is 2x the p95
    admitted = []
    for _ in range(48):
        try:
            admitted.append(gate.admit(["user:alice"], cost))
        except BudgetRefused as refusal:
            assert refusal.retryable
    target = 880
    caps = [a.max_tokens_cap for a in admitted]
    assert caps[0] is None  # alone: as asked
    assert all(cap is None or cap >= target for cap in caps)
    assert len(admitted) >= 12, caps  # before: 3, all uncapped
    status = gate.status("user:alice")
    assert status is not None and status.worst_in_flight_nanos <= usd(0.5)


async def test_a_call_waiting_behind_long_calls_is_not_refused_while_they_run() -> None:
    """Session 14's probe: 64 concurrent 35-second calls under a $0.30 cap, 2.9 % of it spent
    in the end: 58 got a 402 after waiting 30 s (TOLLGATE_BUDGET_QUEUE_WAIT_S) for calls that
    took 35. Calls in flight end by max_call_duration_s (they are cut then), so a call that
    waits as long as that is answered when they end, never refused for them."""
    from app.settings import Settings

    defaults = Settings()
    assert defaults.budget_queue_wait_s >= defaults.max_call_duration_s
    gate = gate_with(policies(**{"user:bob": 0.3}))
    cost = gpt_4o_call()
    in_flight = []
    waiting = []
    for _ in range(64):
        try:
            in_flight.append(gate.admit(["user:bob"], cost))
        except BudgetRefused:
            waiting.append(asyncio.create_task(gate.admit_waiting(["user:bob"], cost, 600)))
    assert len(in_flight) == 10 and len(waiting) == 54  # more calls than the room holds at once
    await asyncio.sleep(0)  # they wait
    # The first call ran as asked (alone: $0.164 of worst case). When it ends, the calls
    # waiting are known demand: each gets its share of the room among all of them (their
    # realistic output), so most start at once instead of a few with large shares.
    settle(gate, in_flight.pop(0), cost.price(150))
    for _ in range(3):
        await asyncio.sleep(0)
    started = [t for t in waiting if t.done()]
    # the $0.164 it held is room for 30 calls at their realistic output (512 tokens: the
    # floor, MIN_EXPECTED_OUTPUT_TOKENS); before the waiting calls counted, 36 of 52 (12
    # tokens of realistic output then) started in ever smaller shares
    assert len(started) >= 29, len(started)
    served = 1
    while in_flight:  # the long calls end, one by one, each at its realistic cost
        settle(gate, in_flight.pop(0), cost.price(150))
        served += 1
        await asyncio.sleep(0)
        for task in [t for t in waiting if t.done()]:
            waiting.remove(task)
            in_flight.append(task.result())  # raises if it was refused
    assert served == 64 and not waiting, (served, len(waiting))
    assert spent(gate, "user:bob") == 64 * cost.price(150)  # $0.11: under the cap


async def test_when_every_call_in_flight_ends_at_once_the_waiting_calls_share_the_room() -> None:
    """Calls of one latency end together: the first waiting call to wake finds nothing in
    flight, but 51 others waiting; it takes its share, not the whole room as a lone call."""
    gate = gate_with(policies(**{"user:bob": 0.3}))
    cost = gpt_4o_call()
    in_flight, waiting = [], []
    for _ in range(64):
        try:
            in_flight.append(gate.admit(["user:bob"], cost))
        except BudgetRefused:
            waiting.append(asyncio.create_task(gate.admit_waiting(["user:bob"], cost, 600)))
    await asyncio.sleep(0)
    for admission in in_flight:
        settle(gate, admission, cost.price(150))
    for _ in range(3):
        await asyncio.sleep(0)
    started = [t.result() for t in waiting if t.done()]
    assert len(started) >= 50  # $0.28 left: 52 calls of 512 tokens
    assert all(a.max_tokens_cap is not None and a.max_tokens_cap >= 512 for a in started)
    # and once all have ended, a lone call with nobody waiting is served as asked again
    while waiting:
        for task in [t for t in waiting if t.done()]:
            waiting.remove(task)
            settle(gate, task.result(), cost.price(150))
        await asyncio.sleep(0)
    assert gate.admit(["user:bob"], cost).max_tokens_cap is None


async def test_a_call_waiting_for_room_is_not_overtaken_by_the_calls_that_arrive_after_it() -> None:
    """Session 14's probe: a call with a large prompt waited behind small calls, and each
    small call that arrived after it took the room the last one freed; after 600 s it got a
    402 while the user was far under the cap. Calls waiting for room are served in the order
    they came: a later call waits behind them, even one that would fit."""
    gate = gate_with(policies(**{"user:carol": 1}))
    small = call(usd(0.1), expected=1_000)
    big = call(usd(0.7), expected=1_000, prompt=usd(0.6))  # its prompt alone: $0.60
    in_flight = [gate.admit(["user:carol"], small) for _ in range(8)]
    waiting_big = asyncio.create_task(gate.admit_waiting(["user:carol"], big, 600))
    await asyncio.sleep(0)
    assert not waiting_big.done()  # the small calls' worst cases leave no room for it
    later: list[asyncio.Task[Admission]] = []
    for _ in range(40):  # a small call ends, another arrives, again and again
        if in_flight:
            settle(gate, in_flight.pop(0), 1_000)
        later.append(asyncio.create_task(gate.admit_waiting(["user:carol"], small, 600)))
        for _ in range(3):
            await asyncio.sleep(0)
        for task in [t for t in later if t.done()]:
            later.remove(task)
            assert waiting_big.done(), "a small call that came later was served first"
            in_flight.append(task.result())
        if waiting_big.done():
            break
    assert waiting_big.done(), "the big call was still waiting after 40 small calls ended"
    in_flight.append(waiting_big.result())
    while later or in_flight:  # and the calls behind it are served once it runs
        if in_flight:
            settle(gate, in_flight.pop(0), 1_000)
        for _ in range(3):
            await asyncio.sleep(0)
        for task in [t for t in later if t.done()]:
            later.remove(task)
            in_flight.append(task.result())  # raises if one was refused
    assert spent(gate, "user:carol") < usd(0.01)


async def test_calls_waiting_on_their_own_users_cap_do_not_hold_up_others_on_a_shared_cap() -> None:
    """Session 15's probe: user A, near their own cap, had calls waiting for room; user B,
    with no cap of their own, waited behind them on the feature cap they share (140 s, and
    590 s behind streams), though the feature's cap was almost unspent. A call waits in
    line only on the scopes where it waits for room."""
    gate = gate_with(policies(**{"user:a": 0.2, "feature:f": 5}))
    a_scopes, b_scopes = ["user:a", "feature:f"], ["user:b", "feature:f"]
    cost = call(usd(0.1), expected=usd(0.05))  # its realistic output: all of its worst case
    a_running = [gate.admit(a_scopes, cost) for _ in range(2)]
    a_waiting = [asyncio.create_task(gate.admit_waiting(a_scopes, cost, 600)) for _ in range(5)]
    await asyncio.sleep(0)
    assert not any(t.done() for t in a_waiting)  # user:a's room is held by its calls
    b = asyncio.create_task(gate.admit_waiting(b_scopes, cost, 600))
    for _ in range(3):
        await asyncio.sleep(0)
    assert b.done(), "B waited behind A's calls on the feature's cap"
    assert b.result().max_tokens_cap is None  # far under the feature's cap: as asked
    for admission in a_running:  # and A's calls still go in their order as A's room frees
        settle(gate, admission, 1_000)
    for _ in range(3):
        await asyncio.sleep(0)
    assert sum(t.done() for t in a_waiting) >= 1
    for task in a_waiting:
        task.cancel()


def test_a_user_near_their_cap_does_not_wait_for_other_users_calls_on_a_shared_cap() -> None:
    """Session 15's second probe: a user near their own cap, with no call of their own in
    flight, waited for other users' calls on the feature cap they share (44-365 s, then a
    402): the lone-call rule asked every capped scope to be empty. Only the scopes whose
    room is too small matter: waiting for calls elsewhere frees none of it."""
    gate = gate_with(policies(**{"user:a": 0.001, "feature:f": 100}))
    others = gate.admit(["user:b", "feature:f"], call(usd(1), expected=1_000))
    admission = gate.admit(["user:a", "feature:f"], call(usd(0.01), expected=usd(0.005)))
    assert admission.max_tokens_cap is not None
    assert admission.max_tokens_cap <= usd(0.001)  # within user:a's room
    settle(gate, others, 1_000)


def test_a_model_whose_recent_answers_were_tiny_does_not_cut_a_capped_users_answers_to_nothing() -> (
    None
):
    """Session 14's second probe: the realistic output is the model's recent 95th percentile,
    shared by every user; after another user's 520 three-token calls, 37 of 48 calls of a
    capped user were cut short, some at 6 tokens, at 9 % of the cap. The realistic output
    has a floor (MIN_EXPECTED_OUTPUT_TOKENS): a call is capped no lower, or waits."""
    gate = gate_with(policies(**{"user:victim": 0.3}))
    cost = gpt_4o_call(expected=3)
    caps = []
    for _ in range(48):
        try:
            caps.append(gate.admit(["user:victim"], cost).max_tokens_cap)
        except BudgetRefused as refusal:
            assert refusal.retryable
    assert all(cap is None or cap >= 2 * MIN_EXPECTED_OUTPUT_TOKENS for cap in caps), caps


def test_in_flight_calls_of_other_users_count_on_a_shared_scope() -> None:
    gate = gate_with(policies(**{"user:*": 100, "global": 1}))
    gate.admit(["user:a", "global"], call(usd(0.9), expected=usd(0.5)))
    err = refusal(gate, ["user:b", "global"], call(usd(0.7), expected=usd(0.4)))
    assert err.status.scope == "global" and err.retryable


async def test_a_call_near_the_cap_waits_for_calls_in_flight_to_settle() -> None:
    gate = gate_with(policies(**{"user:alice": 1}))
    first = gate.admit(["user:alice"], call(usd(0.9), expected=usd(0.3)))

    async def settle_soon() -> None:
        await asyncio.sleep(0.05)
        settle(gate, first, usd(0.2))

    settler = asyncio.create_task(settle_soon())
    admission = await gate.admit_waiting(["user:alice"], call(usd(0.5), expected=usd(0.3)), 30)
    await settler
    assert admission.max_tokens_cap is None  # 0.2 spent, nothing in flight: 0.5 fits in 0.8


async def test_a_waiting_call_is_refused_when_nothing_settles_in_time() -> None:
    gate = gate_with(policies(**{"user:alice": 1}))
    gate.admit(["user:alice"], call(usd(0.9), expected=usd(0.3)))
    with pytest.raises(BudgetRefused) as err:
        await gate.admit_waiting(["user:alice"], call(usd(0.5), expected=usd(0.3)), 0.05)
    assert err.value.retryable


def test_a_blocked_scope_is_refused_at_once_not_after_a_wait() -> None:
    gate = gate_with(policies(**{"user:alice": 1}))
    settle(gate, gate.admit(["user:alice"], call(0)), usd(1))
    with pytest.raises(BudgetRefused) as err:
        asyncio.run(gate.admit_waiting(["user:alice"], call(usd(0.1)), 3600))
    assert not err.value.retryable and err.value.reason == "limit reached"


# -- reservations are released -----------------------------------------------------------
def test_settle_releases_the_reservation_and_counts_the_actual_cost() -> None:
    gate = gate_with(policies(**{"user:alice": 10, "global": 100}))
    admission = gate.admit(["user:alice", "global"], call(usd(2)))
    assert gate.in_flight_nanos() == usd(4)  # reserved on both capped scopes
    settle(gate, admission, usd(0.5))
    assert gate.in_flight_nanos() == 0
    assert spent(gate, "user:alice") == spent(gate, "global") == usd(0.5)


def test_double_settle_does_not_free_twice_or_count_twice() -> None:
    gate = gate_with(policies(**{"user:alice": 10}))
    first = gate.admit(["user:alice"], call(usd(3)))
    second = gate.admit(["user:alice"], call(usd(2)))
    settle(gate, first, usd(1))
    settle(gate, first, usd(1))
    settle(gate, first, 0)
    assert gate.in_flight_nanos() == usd(2)
    assert spent(gate, "user:alice") == usd(1)
    settle(gate, second, usd(1))
    assert gate.in_flight_nanos() == 0


def test_the_sweep_releases_a_reservation_a_caller_forgot() -> None:
    gate = gate_with(policies(**{"feature:x": 1}), max_call_duration_s=0.0)
    leaked = gate.admit(["feature:x"], call(usd(0.9)))
    leaked.reservation.created -= 60  # older than max_call_duration_s + grace
    assert gate.sweep() == 1 and gate.swept == 1
    assert gate.in_flight_nanos() == 0 and leaked.reservation.released
    gate.admit(["feature:x"], call(usd(0.9)))  # nothing left behind to refuse it


def test_without_reservations_everything_below_the_limit_is_admitted_as_asked() -> None:
    gate = gate_with(policies(**{"user:alice": 1}), reservations=False)
    in_flight = [gate.admit(["user:alice"], call(usd(0.9))) for _ in range(25)]
    assert all(a.max_tokens_cap is None for a in in_flight)
    assert gate.in_flight_nanos() == 0
    for admission in in_flight[:4]:
        settle(gate, admission, usd(0.25))
    refusal(gate, ["user:alice"], call(usd(0.9)))  # only spent money counts: $1 reached


# -- matching local spend with the worker's count, by identity ----------------------------
def test_spend_the_worker_counted_is_not_counted_again_here() -> None:
    """Observation 1: the worker counted the last call; the gate must not add it again."""
    gate = gate_with(policies(**{"user:alice": usd(0.02) / USD}))
    for seq, offset in ((1, 40), (2, 41)):
        settle(gate, gate.admit(["user:alice"], call(usd(0.00219))), usd(0.00219), seq=seq)
        gate.on_delivered(seq, 0, offset)
    assert spent(gate, "user:alice") == usd(0.00438)
    gate.on_decision(
        "user:alice",
        decision("user:alice", state="open", spent=usd(0.00438), limit=usd(0.02), counted={0: 42}),
    )
    status = gate.status("user:alice")
    assert status is not None
    assert (status.counted_nanos, status.uncounted_nanos) == (usd(0.00438), 0)


def test_spend_not_yet_acknowledged_by_kafka_is_never_taken_as_counted() -> None:
    gate = gate_with(policies(**{"user:alice": 10}))
    settle(gate, gate.admit(["user:alice"], call(0)), usd(2), seq=7)
    gate.on_decision(
        "user:alice",
        decision("user:alice", state="open", spent=usd(1), limit=usd(10), counted={0: 10**9}),
    )
    assert spent(gate, "user:alice") == usd(3)  # its offset is unknown: still not counted
    gate.on_delivered(7, 0, 12)
    assert spent(gate, "user:alice") == usd(1)  # the decision already counts offset 12


def test_a_decision_counting_another_partition_does_not_drop_this_one() -> None:
    gate = gate_with(policies(**{"global": 10}))
    settle(gate, gate.admit(["global"], call(0)), usd(2), seq=1)
    gate.on_delivered(1, 3, 5)
    gate.on_decision(
        "global", decision("global", state="open", spent=usd(4), limit=usd(10), counted={0: 99})
    )
    assert spent(gate, "global") == usd(6)
    gate.on_decision(
        "global",
        decision("global", state="open", spent=usd(6), limit=usd(10), counted={0: 99, 3: 6}),
    )
    assert spent(gate, "global") == usd(6)


def test_a_decision_of_an_old_period_counts_nothing_now() -> None:
    gate = gate_with(policies(**{"user:alice": 10}), now=datetime(2026, 11, 1, 0, 0, 5, tzinfo=UTC))
    gate.on_decision(
        "user:alice", decision("user:alice", state="blocked", spent=usd(10), limit=usd(10))
    )
    admission = gate.admit(["user:alice"], call(usd(1)))
    assert admission.max_tokens_cap is None
    status = gate.status("user:alice")
    assert status is not None and status.period_start == NOVEMBER and status.spent_nanos == 0


def test_blocked_decision_for_the_current_period_blocks_despite_low_local_numbers() -> None:
    gate = gate_with(policies(**{"user:alice": 10}))
    gate.on_decision(
        "user:alice", decision("user:alice", state="blocked", spent=usd(1), limit=usd(10))
    )
    err = refusal(gate, ["user:alice"], call(0))
    assert err.status.decided_by == "spend_worker"


def test_the_gateway_says_when_it_blocks_on_its_own_accounting() -> None:
    gate = gate_with(policies(**{"user:alice": 10}))
    gate.on_decision(
        "user:alice", decision("user:alice", state="open", spent=usd(9), limit=usd(10))
    )
    settle(gate, gate.admit(["user:alice"], call(0)), usd(1), seq=1)
    err = refusal(gate, ["user:alice"], call(0))
    assert err.status.decided_by == "this_gateway"
    shown = err.status.to_json()
    assert shown["state"] == "blocked" and shown["worker_decision"]["state"] == "open"


def test_decision_with_an_old_limit_is_judged_on_the_numbers_after_a_raise() -> None:
    book = policies(**{"user:alice": 10})
    gate = gate_with(book)
    gate.on_decision(
        "user:alice", decision("user:alice", state="blocked", spent=usd(10), limit=usd(10))
    )
    refusal(gate, ["user:alice"], call(0))
    book.put(parse_policy("user:alice", {"limit_usd": 20}))  # the admin raises the limit
    gate.admit(["user:alice"], call(usd(1)))
    status = gate.status("user:alice")
    assert status is not None and status.state != "blocked" and status.spent_nanos == usd(10)


def test_removing_the_decision_unblocks_the_scope() -> None:
    gate = gate_with(policies(**{"user:alice": 10}))
    gate.on_decision(
        "user:alice", decision("user:alice", state="blocked", spent=usd(10), limit=usd(10))
    )
    refusal(gate, ["user:alice"], call(0))
    gate.on_decision("user:alice", None)
    gate.admit(["user:alice"], call(0))


def test_decision_that_went_through_avro_is_understood() -> None:
    policy = parse_policy("user:alice", {"limit_usd": 10})
    period = policy.period_at(NOW)
    record = decision_record(
        "user:alice", policy, period, usd(10), NOW, evaluate(usd(10), policy), NOW, "spend", {0: 3}
    )
    schema = parse_schema(json.loads((SCHEMAS / "BudgetDecision.avsc").read_text()))
    buf = io.BytesIO()
    schemaless_writer(buf, schema, record)
    buf.seek(0)
    decoded = schemaless_reader(buf, schema, schema)
    assert isinstance(decoded, dict)
    gate = gate_with(policies(**{"user:alice": 10}))
    gate.on_decision("user:alice", decoded)
    gate.record_spend(["user:alice"], 5, NOW, seq=1)  # already counted (offset 2 < 3)
    gate.on_delivered(1, 0, 2)
    assert spent(gate, "user:alice") == usd(10)
    refusal(gate, ["user:alice"], call(0))


def test_record_spend_counts_reported_usage_and_only_for_capped_scopes() -> None:
    gate = gate_with(policies(**{"user:*": 5}))
    gate.record_spend(["user:alice", "global"], usd(5), NOW - timedelta(seconds=1))
    assert gate.status("global") is None
    assert refusal(gate, ["user:alice", "global"], call(0)).status.scope == "user:alice"


def test_record_spend_of_a_past_period_or_in_another_zone_lands_in_its_own_period() -> None:
    gate = gate_with(policies(**{"user:alice": 5}))
    gate.record_spend(["user:alice"], usd(100), datetime(2026, 9, 30, 23, tzinfo=UTC))
    assert spent(gate, "user:alice") == 0
    ts = (NOW - timedelta(seconds=1)).astimezone(timezone(timedelta(hours=-7)))
    gate.record_spend(["user:alice"], usd(5), ts)
    refusal(gate, ["user:alice"], call(0))


@pytest.mark.parametrize(
    ("body", "now", "resets_at"),
    [
        ({"period": "month"}, NOW, "2026-11-01T00:00:00+00:00"),
        ({"period": "day"}, NOW, "2026-10-16T00:00:00+00:00"),
        (
            {"period": "day", "timezone": "America/New_York"},
            datetime(2026, 11, 1, 15, tzinfo=UTC),
            "2026-11-02T05:00:00+00:00",
        ),
        (
            {"period": "month", "timezone": "Asia/Kolkata"},
            datetime(2026, 10, 31, 19, tzinfo=UTC),
            "2026-11-30T18:30:00+00:00",
        ),
        (
            {"period": "window", "window": "1h"},
            NOW + timedelta(minutes=17),
            "2026-10-15T13:00:00+00:00",
        ),
    ],
)
def test_the_402_says_when_the_scope_resets(
    body: dict[str, Any], now: datetime, resets_at: str
) -> None:
    book = policies(**{"user:alice": {"limit_usd": 1, "upgrade_url": "https://x.test/pro", **body}})
    gate = gate_with(book, now)
    settle(gate, gate.admit(["user:alice"], call(0)), usd(1.5), ts=now)
    error = budget_refusal(refusal(gate, ["user:alice"], call(0)))
    assert error.status == 402
    body_out = error.body()["error"]
    assert body_out["type"] == body_out["code"] == "budget_exceeded"
    assert body_out["resets_at"] == resets_at and body_out["period"] == body["period"]
    assert body_out["scope"] == "user:alice" and body_out["limit_usd"] == 1.0
    assert body_out["spent_usd"] == 1.5 and body_out["upgrade_url"] == "https://x.test/pro"
    assert body_out["decided_by"] == "this_gateway"
    assert "https://x.test/pro" in body_out["message"] and resets_at in body_out["message"]


def test_status_breakdown_shows_worker_count_uncounted_and_in_flight() -> None:
    gate = gate_with(policies(**{"user:alice": 9}))
    for seq, offset, amount in ((1, 10, usd(1)), (2, 11, usd(2))):
        settle(gate, gate.admit(["user:alice"], call(0)), amount, seq=seq)
        gate.on_delivered(seq, 0, offset)
    gate.on_decision(
        "user:alice",
        decision("user:alice", state="open", spent=usd(3), limit=usd(9), counted={0: 11}),
    )
    gate.admit(["user:alice"], call(usd(2), expected=usd(1.5)))
    status = gate.status("user:alice")
    assert status is not None
    shown = status.to_json()
    assert (shown["state"], shown["limit_usd"], shown["spent_usd"]) == ("open", "9", "5")
    assert shown["remaining_usd"] == "4" and shown["decided_by"] == "spend_worker"
    assert shown["breakdown"] == {
        "counted_by_agent_usd": "3",
        "seen_locally_usd": "2",
        "in_flight_usd": "1.5",
    }


def test_status_of_a_defaulted_scope_carries_the_scope_name() -> None:
    gate = gate_with(policies(**{"user:*": 5}))
    status = gate.status("user:dora")
    assert status is not None and status.scope == "user:dora"
    assert isinstance(status.policy, Policy) and status.policy.scope == "user:dora"
    assert status.to_json()["decided_by"] == "none_yet"


def test_held_spend_stays_bounded_when_no_decision_comes_and_is_dropped_exactly_once() -> None:
    pending = PendingSpend(entries_max=4)
    scopes = ["user:a", "global"]
    for seq in range(1, 21):
        pending.hold(scopes, 10, 1_000, seq)
    assert pending.entries("user:a") <= 4 and pending.total("user:a", 0) == 200
    for seq in range(1, 21):  # Kafka acks everything, then a decision counts through it
        pending.delivered(seq, 0, 100 + seq, lambda scope: {})
    assert pending.total("global", 0) == 200
    pending.counted("user:a", {0: 110})  # counts seqs 1..9 only: merged entries stay whole
    assert 0 < pending.total("user:a", 0) <= 200
    pending.counted("user:a", {0: 121})
    assert pending.total("user:a", 0) == 0 and pending.entries("user:a") == 0
    assert pending.total("global", 0) == 200  # another scope's decision is its own


def test_held_spend_of_an_earlier_period_is_dropped_when_a_new_period_starts() -> None:
    pending = PendingSpend()
    pending.hold(["user:a"], 5, 1_000, 1)
    pending.hold(["user:a"], 7, 5_000, 2)
    assert pending.total("user:a", 0) == 12
    assert pending.total("user:a", 2_000) == 7


def test_the_oldest_uncounted_spend_is_the_oldest_delivered_and_goes_once_counted() -> None:
    """What /readyz reads to say the spend worker is not counting: only spend Kafka took
    (not spend still in the spool), the oldest first, gone once a decision counts it."""
    pending = PendingSpend()
    assert pending.oldest_uncounted_ms() is None
    pending.hold(["user:a"], 5, 1_000, 1)
    pending.hold(["user:b", "global"], 7, 2_000, 2)
    assert pending.oldest_uncounted_ms() is None  # nothing acknowledged by Kafka yet
    pending.delivered(2, 0, 11, lambda scope: {})
    assert pending.oldest_uncounted_ms() == 2_000
    pending.delivered(1, 0, 10, lambda scope: {})
    assert pending.oldest_uncounted_ms() == 1_000
    pending.counted("user:a", {0: 11})
    assert pending.oldest_uncounted_ms() == 2_000
    pending.counted("user:b", {0: 12})
    pending.counted("global", {0: 12})
    assert pending.oldest_uncounted_ms() is None


def test_spend_of_a_cap_removed_before_its_count_does_not_say_the_worker_stopped() -> None:
    """Session 17's probe (F14): a cap deleted right after a call gets no more decisions, so
    the call's spend stayed 'uncounted' for good and /readyz said the spend worker had
    stopped counting (a fail-closed dispatcher went not-ready) while it was counting fine.
    Only spend of scopes still capped tells whether the worker counts."""
    book = policies(**{"user:gone": 5, "user:kept": 5})
    gate = gate_with(book)
    gate.record_spend(["user:gone"], usd(0.01), NOW - timedelta(seconds=100), seq=1)
    gate.on_delivered(1, 0, 10)
    assert gate.uncounted_age_s() == pytest.approx(100, abs=5)
    book.remove("user:gone")
    assert gate.uncounted_age_s() is None
    gate.record_spend(["user:kept"], usd(0.01), NOW - timedelta(seconds=40), seq=2)
    gate.on_delivered(2, 0, 11)
    assert gate.uncounted_age_s() == pytest.approx(40, abs=5)  # a capped scope's still counts


# -- reservation numbers -----------------------------------------------------------------
def test_fit_output_tokens_is_the_largest_cap_within_the_budget() -> None:
    cost = CallCost(lambda t: 100 + 7 * t, 1000, 50, False)
    assert fit_output_tokens(cost, 99) == 0
    assert fit_output_tokens(cost, 100 + 7 * 13 + 6) == 13
    assert fit_output_tokens(cost, 10**9) == 1000


def test_the_output_estimate_is_a_high_quantile_of_recent_calls_per_model() -> None:
    estimator = OutputEstimator(fallback=512, window=100)
    assert estimator.expected("gpt-4o") == 512
    for tokens in range(1, 101):
        estimator.observe("gpt-4o", tokens)
    assert estimator.expected("gpt-4o") == 96
    for _ in range(100):
        estimator.observe("gpt-4o", 10)  # the window moves on
    assert estimator.expected("gpt-4o") == 10
    assert estimator.expected("other") == 512


# -- the accounting under any interleaving (hypothesis) ----------------------------------
class GateMachine(RuleBasedStateMachine):
    """One dispatcher, one capped scope, the spend worker counting a prefix of its events.

    Invariants: the gate's spent equals the true spend (nothing counted twice or zero times),
    reservations end with their calls, and the worst cases in flight fit under the limit
    except for the lone-call case.
    """

    ENTRIES_MAX = 16_384

    def __init__(self) -> None:
        super().__init__()
        self.limit = usd(1)
        self.gate = gate_with(policies(**{"user:u": 1}), pending_entries_max=self.ENTRIES_MAX)
        self.calls: list[Admission] = []
        self.seq = 0
        self.delivered: list[tuple[int, int]] = []  # (offset, nanos) acked by Kafka, in order
        self.unacked: dict[int, int] = {}  # seq -> nanos
        self.offset = 100
        self.true_spend = 0
        self.counted_prefix = 0  # how many delivered events the worker has counted

    @rule(worst=st.integers(0, usd(0.6)), expected=st.integers(0, usd(0.2)))
    def admit(self, worst: int, expected: int) -> None:
        before = self.gate.status("user:u")
        assert before is not None
        try:
            admission = self.gate.admit(["user:u"], call(worst, expected=expected))
        except BudgetRefused as refusal:
            if refusal.reason == "limit reached":
                assert before.spent_nanos >= self.limit
            else:  # only calls in flight stand in the way, and they do
                assert refusal.retryable and before.worst_in_flight_nanos > 0
                target = min(worst, 2 * max(min(expected, worst), MIN_EXPECTED_OUTPUT_TOKENS))
                assert before.spent_nanos + before.worst_in_flight_nanos + target > self.limit
            return
        assert before.spent_nanos < self.limit, "admitted a call at or over the limit"
        self.calls.append(admission)

    @precondition(lambda self: self.calls)
    @rule(
        data=st.data(),
        fraction=st.floats(0, 1),
        outcome=st.sampled_from(["ok", "error", "encode_failure"]),
    )
    def settle(self, data: st.DataObject, fraction: float, outcome: str) -> None:
        admission = self.calls.pop(data.draw(st.integers(0, len(self.calls) - 1)))
        actual = int(admission.reservation.worst_nanos * fraction) if outcome == "ok" else 0
        if outcome == "encode_failure":  # the usage never left: nothing to count
            self.gate.settle(admission.reservation, 0)
            return
        self.seq += 1
        self.gate.settle(admission.reservation, actual, seq=self.seq)
        self.true_spend += actual
        if actual:
            self.unacked[self.seq] = actual

    @precondition(lambda self: self.unacked)
    @rule()
    def kafka_acks(self) -> None:
        seq = min(self.unacked)
        nanos = self.unacked.pop(seq)
        self.gate.on_delivered(seq, 0, self.offset)
        self.delivered.append((self.offset, nanos))
        self.offset += 1 + (seq % 3)  # other events interleave on the partition

    @precondition(lambda self: self.counted_prefix < len(self.delivered) or self.delivered)
    @rule(data=st.data())
    def worker_decides(self, data: st.DataObject) -> None:
        prefix = data.draw(st.integers(self.counted_prefix, len(self.delivered)))
        self.counted_prefix = prefix
        counted = sum(n for _, n in self.delivered[:prefix])
        through = self.delivered[prefix - 1][0] + 1 if prefix else 100
        state = evaluate(counted, parse_policy("user:u", {"limit_usd": 1})).state
        self.gate.on_decision(
            "user:u",
            decision("user:u", state=state, spent=counted, limit=self.limit, counted={0: through}),
        )

    @invariant()
    def nothing_counted_twice_or_zero_times(self) -> None:
        if self.gate.pending.merges:  # the worker stopped deciding: conservative, never less
            assert spent(self.gate, "user:u") >= self.true_spend
        else:
            assert spent(self.gate, "user:u") == self.true_spend

    @invariant()
    def reservations_end_with_their_calls(self) -> None:
        expected = sum(a.reservation.reserved_nanos for a in self.calls)
        assert self.gate.in_flight_nanos() == expected
        assert self.gate.in_flight_count() == len(self.calls)

    @invariant()
    def worst_cases_in_flight_fit_under_the_limit(self) -> None:
        """Zero overshoot: whatever the calls in flight turn out to cost (prompts are free here,
        so even a lone call's one-token minimum fits)."""
        status = self.gate.status("user:u")
        assert status is not None
        assert self.true_spend + status.worst_in_flight_nanos <= self.limit or not self.calls


class MergingGateMachine(GateMachine):
    """The same with a worker that stops deciding for a while: held spend is merged (few
    entries allowed), so spent may only err high, never low."""

    ENTRIES_MAX = 3


for machine in (GateMachine, MergingGateMachine):
    machine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
test_gate_accounting_under_any_interleaving = GateMachine.TestCase
test_gate_accounting_when_held_spend_is_merged = MergingGateMachine.TestCase


def test_a_402_always_carries_an_upgrade_prompt_even_when_the_policy_sets_none() -> None:
    from app.http.errors import budget_refusal

    gate = gate_with(policies(**{"user:alice": 1}))
    settle(gate, gate.admit(["user:alice"], call(0)), usd(1))
    body = budget_refusal(refusal(gate, ["user:alice"], call(usd(0.1)))).body()["error"]
    assert body["type"] == "budget_exceeded"
    assert body["upgrade_prompt"] and body["upgrade_prompt"] in body["message"]
    assert body["upgrade_prompt"].startswith("You have reached this spending limit")


def test_a_402_of_a_policy_with_a_blank_upgrade_prompt_carries_the_default_one() -> None:
    """A policy stored with a blank prompt (by a version that kept one) still gets a prompt a
    client can show: its 402 carried "   " and a message ending in ". " (a newcomer probe)."""
    from app.http.errors import budget_refusal

    book = PolicyBook()
    stored = parse_policy("user:alice", {"limit_usd": 1})
    book.put(dataclasses.replace(stored, upgrade_prompt="   "))
    gate = gate_with(book)
    settle(gate, gate.admit(["user:alice"], call(0)), usd(1))
    body = budget_refusal(refusal(gate, ["user:alice"], call(usd(0.1)))).body()["error"]
    assert body["upgrade_prompt"].startswith("You have reached this spending limit")
    assert body["message"].endswith(body["upgrade_prompt"])


@pytest.mark.parametrize(
    ("prompt", "message"),
    [
        ("Upgrade to Pro", "Upgrade to Pro. Upgrade: https://example.com/up"),
        ("Upgrade to Pro. ", "Upgrade to Pro. Upgrade: https://example.com/up"),
        ("Need more?", "Need more? Upgrade: https://example.com/up"),
    ],
)
def test_a_402s_upgrade_prompt_and_link_read_as_two_sentences(prompt: str, message: str) -> None:
    """A newcomer probe: "Upgrade to Pro" and the link read "...Upgrade to Pro Upgrade:
    https://..."; the README's example only read well as its prompt ended with a period."""
    from app.http.errors import budget_refusal

    body = {"limit_usd": 1, "upgrade_prompt": prompt, "upgrade_url": "https://example.com/up"}
    gate = gate_with(policies(**{"user:alice": body}))
    settle(gate, gate.admit(["user:alice"], call(0)), usd(1))
    error = budget_refusal(refusal(gate, ["user:alice"], call(usd(0.1)))).body()["error"]
    assert message in error["message"], error["message"]


def test_the_default_prompt_of_a_402_under_a_cap_does_not_say_it_is_reached() -> None:
    """Session 14's probe: a 402 for a prompt too big for the room left, at $0 spent, said
    "You have reached this spending limit"."""
    from app.http.errors import budget_refusal

    gate = gate_with(policies(**{"user:alice": 1}))
    big = budget_refusal(refusal(gate, ["user:alice"], call(usd(3), prompt=usd(2))))
    prompt = big.body()["error"]["upgrade_prompt"]
    assert "reached" not in prompt and "does not fit" in prompt
    gate.admit(["user:alice"], call(usd(0.9), expected=usd(0.5)))
    busy = budget_refusal(refusal(gate, ["user:alice"], call(usd(0.7), expected=usd(0.4))))
    prompt = busy.body()["error"]["upgrade_prompt"]
    assert "reached" not in prompt and "in flight" in prompt


# -- a changed policy waits for the worker's count under it ---------------------------------
def _waiting(gate: BudgetGate, scope: str, cost: CallCost) -> asyncio.Task[Admission]:
    return asyncio.ensure_future(gate.admit_waiting([scope], cost, wait_s=30))


@pytest.mark.parametrize(
    "change",
    [
        {"limit_usd": 0.01, "timezone": "Europe/Paris"},
        {"limit_usd": 0.01, "period": "day"},
        {"limit_usd": 0.01, "period": "window", "window": "1h"},
    ],
)
async def test_a_blocked_scope_whose_period_changes_stays_blocked_until_it_is_counted(
    change: dict[str, Any],
) -> None:
    """Found by a newcomer probe: a blocked user whose cap moved to another time zone or
    period read $0 spent for about a second (the decision was for the old period) and 3 of
    20 concurrent calls were served, ending 66 % over the cap. Until the worker has counted
    the new period the gate waits for it, as it waits for calls in flight."""
    book = policies(**{"user:u": 0.01})
    gate = gate_with(book, policy_change_wait_s=5)
    gate.on_decision(
        "user:u", decision("user:u", state="blocked", spent=usd(0.012), limit=usd(0.01))
    )
    assert refusal(gate, ["user:u"], call(1000)).reason == "limit reached"
    book.put(parse_policy("user:u", change))
    waiting = _waiting(gate, "user:u", call(1000))
    await asyncio.sleep(0.2)
    assert not waiting.done(), "admitted on $0 before the worker counted the new period"
    period = book.policy_for("user:u").period_at(NOW)  # type: ignore[union-attr]
    gate.on_decision(
        "user:u",
        decision(
            "user:u", state="blocked", spent=usd(0.012), limit=usd(0.01),
            period_start=period.start, resets_at=period.end,
        ),
    )  # fmt: skip
    with pytest.raises(BudgetRefused, match="limit reached"):
        await asyncio.wait_for(waiting, 5)


async def test_a_new_cap_on_a_scope_that_already_spent_waits_for_its_count() -> None:
    book = PolicyBook()
    gate = gate_with(book, policy_change_wait_s=5)
    book.put(parse_policy("user:spender", {"limit_usd": 0.002}))
    waiting = _waiting(gate, "user:spender", call(1000))
    await asyncio.sleep(0.2)
    assert not waiting.done()
    gate.on_decision(
        "user:spender",
        decision("user:spender", state="blocked", spent=usd(0.006), limit=usd(0.002)),
    )
    with pytest.raises(BudgetRefused, match="limit reached"):
        await asyncio.wait_for(waiting, 5)


async def test_without_a_count_in_time_the_gate_goes_on_with_what_it_knows() -> None:
    """The spend worker may be down: the wait is bounded, then the gate decides on its own
    numbers (as it does for any scope the worker has not counted yet)."""
    book = PolicyBook()
    gate = gate_with(book, policy_change_wait_s=0.3)
    book.put(parse_policy("user:new", {"limit_usd": 1}))
    admission = await asyncio.wait_for(_waiting(gate, "user:new", call(1000)), 5)
    assert admission.reservation.scopes == ["user:new"]


def test_a_limit_change_or_a_default_cap_set_a_while_ago_does_not_wait() -> None:
    """The decision of the same period stays valid under a new limit (spent does not
    depend on it); a user under a default cap that has been there for longer than the wait
    is decided on its own numbers at once (a user never seen before has no count to wait for)."""
    book = policies(**{"user:u": 0.01, "user:*": 0.01})
    book.period_changed.pop("user:*")  # set long ago
    gate = gate_with(book, policy_change_wait_s=5)
    gate.on_decision("user:u", decision("user:u", state="open", spent=usd(0.005), limit=usd(0.01)))
    book.put(parse_policy("user:u", {"limit_usd": 0.02}))
    assert gate.admit(["user:u"], call(1000)).reservation.scopes == ["user:u"]
    assert gate.admit(["user:someone"], call(1000)).reservation.scopes == ["user:someone"]


@pytest.mark.parametrize(
    ("before", "after"),
    [
        (None, {"limit_usd": 0.01}),  # the default appears
        ({"limit_usd": 1, "period": "window", "window": "1m"}, {"limit_usd": 0.01}),  # re-period
    ],
)
async def test_members_of_a_default_that_just_appeared_or_changed_period_wait_for_their_count(
    before: dict[str, Any] | None, after: dict[str, Any]
) -> None:
    """Probe I: right after `user:*` appeared (or moved from a 1-minute window to a month),
    a user already at 3x the new limit read $0 spent and was served a call with a
    `max_tokens` worth the whole limit; 10 users over it, 10 calls served. A default's
    members wait for the worker's count as a scope's own cap does."""
    book = PolicyBook()
    if before is not None:
        book.put(parse_policy("user:*", before))
        book.period_changed.pop("user:*")
    gate = gate_with(book, policy_change_wait_s=5)
    book.put(parse_policy("user:*", after))
    waiting = _waiting(gate, "user:spender", call(1000))
    await asyncio.sleep(0.2)
    assert not waiting.done(), "admitted on $0 before the worker counted the default"
    period = book.policy_for("user:spender").period_at(NOW)  # type: ignore[union-attr]
    gate.on_decision(
        "user:spender",
        decision(
            "user:spender", state="blocked", spent=usd(0.03), limit=usd(0.01),
            period_start=period.start, resets_at=period.end,
        ),
    )  # fmt: skip
    with pytest.raises(BudgetRefused, match="limit reached"):
        await asyncio.wait_for(waiting, 5)


async def test_a_member_of_a_new_default_the_worker_never_counts_goes_on_after_the_wait() -> None:
    """A user who never spent gets no count: after the bounded wait the gate decides on
    its own numbers, and once the wait has passed nobody waits for that default again."""
    book = PolicyBook()
    gate = gate_with(book, policy_change_wait_s=0.3)
    book.put(parse_policy("user:*", {"limit_usd": 1}))
    admission = await asyncio.wait_for(_waiting(gate, "user:fresh", call(1000)), 5)
    assert admission.reservation.scopes == ["user:fresh"]
    assert gate.admit(["user:other"], call(1000)).reservation.scopes == ["user:other"]


# -- the line of calls waiting for room, under random interleavings ----------------------
WAIT_SCOPES = [["user:a", "feature:f"], ["user:b", "feature:f"], ["user:a"], ["user:b"]]
WAIT_OPS = st.lists(
    st.one_of(
        st.tuples(st.just("arrive"), st.integers(0, 3), st.sampled_from(["small", "big"])),
        st.tuples(st.just("settle"), st.integers(0, 50)),
        st.tuples(st.just("leave"), st.integers(0, 50)),  # the client goes: its task cancelled
        st.tuples(st.just("step"), st.integers(1, 4)),
    ),
    max_size=60,
)


@settings(max_examples=150)
@given(WAIT_OPS)
def test_waiting_calls_go_in_order_and_never_leave_a_scope_blocked(ops: list[Any]) -> None:
    """Whatever the order of arrivals, settlements and clients leaving: a call never starts
    while one that came before it with the same scopes (waiting for the same rooms) still
    waits, and once every call has ended nothing is left in line (a ticket left behind
    would block its scopes for ever, as a leaked reservation once blocked a whole feature).
    Calls of other users may pass a call waiting on its own user's cap."""

    async def run() -> None:
        gate = gate_with(policies(**{"user:a": 1, "user:b": 1, "feature:f": 1.5}))
        costs = {"small": call(usd(0.1), expected=1_000), "big": call(usd(0.7), 1_000, usd(0.6))}
        calls: list[tuple[list[str], asyncio.Task[Admission | None]]] = []
        finished: set[int] = set()
        overtaken: list[tuple[int, int]] = []
        running: list[Admission] = []

        async def arrive(index: int, scopes: list[str], cost: CallCost) -> Admission | None:
            try:
                admission = await gate.admit_waiting(scopes, cost, 600)
                # at the moment it starts, every call before it with its scopes has ended
                overtaken.extend(
                    (earlier, index)
                    for earlier, (other, _) in enumerate(calls[:index])
                    if other == scopes and earlier not in finished
                )
                running.append(admission)
                return admission
            except BudgetRefused:
                return None
            finally:
                finished.add(index)

        for op in ops:
            if op[0] == "arrive":
                scopes = WAIT_SCOPES[op[1]]
                task = asyncio.create_task(arrive(len(calls), scopes, costs[op[2]]))
                calls.append((scopes, task))
            elif op[0] == "settle" and running:
                settle(gate, running.pop(op[1] % len(running)), 1_000)
            elif op[0] == "leave" and (waiting := [t for _, t in calls if not t.done()]):
                waiting[op[1] % len(waiting)].cancel()
            for _ in range(op[1] if op[0] == "step" else 1):
                await asyncio.sleep(0)
        for _ in range(10 * len(calls) + 10):  # everything ends
            while running:
                settle(gate, running.pop(), 1_000)
            for _ in range(3):
                await asyncio.sleep(0)
        stuck = [task for _, task in calls if not task.done()]
        assert not stuck, f"{len(stuck)} calls still wait with nothing in flight"
        for task in stuck:
            task.cancel()
        assert overtaken == [], "a call started while one before it with its scopes waited"
        assert gate._queue == {}
        assert gate.in_flight_count() == 0
        assert gate.admit(["user:a", "feature:f"], costs["big"]).max_tokens_cap is None

    asyncio.run(run())


def test_the_402_states_a_tiny_limit_in_plain_decimals() -> None:
    """Probe L (F6): a $0.000000001 cap was stated '$1E-9' in the 402 message."""
    gate = gate_with(policies(**{"user:alice": {"limit_usd": 0.000000001}}))
    settle(gate, gate.admit(["user:alice"], call(0)), usd(0.000021))
    message = budget_refusal(refusal(gate, ["user:alice"], call(0))).body()["error"]["message"]
    assert "$0.000000001 this month" in message and "E-" not in message, message


def test_a_free_call_is_refused_only_once_the_limit_is_reached() -> None:
    """A cache hit costs nothing: it is served while the scope is under its limit, whatever
    is in flight or however little room is left, and reserves nothing (probe S: a hit got a
    402 under the cap, and another waited 14 s behind a long call)."""
    gate = gate_with(policies(**{"user:alice": 1}))
    big = gate.admit(["user:alice"], call(usd(0.95), prompt=usd(0.9)))  # in flight
    assert refusal(gate, ["user:alice"], call(usd(0.5), prompt=usd(0.4))).retryable
    free = gate.admit_free(["user:alice", "feature:chat"])
    assert free.reservation.scopes == [] and free.max_tokens_cap is None
    settle(gate, free, 0)
    settle(gate, big, usd(1))
    assert spent(gate, "user:alice") == usd(1)
    with pytest.raises(BudgetRefused) as err:
        gate.admit_free(["user:alice"])
    assert err.value.reason == "limit reached"


def test_usage_of_an_earlier_period_read_back_after_this_period_began_is_not_held() -> None:
    """A start without Kafka reads the uncounted usage back only once the budget views catch
    up, after calls were served in the new period: last month's spend read then was held
    against this month (entries of an earlier period are dropped only when a period is first
    asked for), and a user at 0 this month was refused until a decision of this month."""
    gate = gate_with(policies(**{"user:alice": 5}))
    assert spent(gate, "user:alice") == 0  # a call of October was admitted: October is asked
    september = datetime(2026, 9, 30, 23, 59, tzinfo=UTC)
    gate.record_counted_later(["user:alice"], usd(5), september, 0, 7)
    gate.record_spend(["user:alice"], usd(5), september, seq=3)  # a late /v1/usage report
    assert spent(gate, "user:alice") == 0
    gate.admit(["user:alice"], call(usd(0.01)))  # not refused
