"""The budget gate: 402 before any upstream cost, bounded overshoot, no leaked reservations."""

from __future__ import annotations

import io
import json
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from fastavro import parse_schema, schemaless_reader, schemaless_writer

from app.budgets.gate import BudgetGate, Reservation
from app.budgets.policy import Policy, PolicyBook, evaluate, parse_policy
from app.budgets.spend import decision_record
from app.clock import Clock
from app.errors import ApiError

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


def decision(
    scope: str,
    *,
    state: str,
    spent: int,
    limit: int,
    period_start: datetime = OCTOBER,
    resets_at: datetime = NOVEMBER,
    counted_through: datetime | None = None,
    threshold: float | None = None,
) -> dict[str, Any]:
    """A BudgetDecision record as the spend agent publishes it."""
    return {
        "event_id": "evt",
        "ts": NOW,
        "schema_version": 1,
        "scope": scope,
        "state": state,
        "spent_usd_nanos": spent,
        "limit_usd_nanos": limit,
        "period": "month",
        "period_start": period_start,
        "resets_at": resets_at,
        "counted_through": counted_through or NOW - timedelta(seconds=1),
        "threshold": threshold,
        "upgrade_url": None,
        "upgrade_prompt": None,
        "reason": "spend",
    }


def refusal(gate: BudgetGate, scopes: list[str], estimate: int) -> ApiError:
    with pytest.raises(ApiError) as err:
        gate.admit(scopes, estimate)
    assert err.value.status == 402
    return err.value


def spent(gate: BudgetGate, scope: str) -> int:
    status = gate.status(scope)
    assert status is not None
    return status.spent_nanos


# -- who is capped -----------------------------------------------------------------------
def test_scope_without_any_policy_is_never_refused() -> None:
    gate = gate_with(PolicyBook())
    for _ in range(50):
        reservation = gate.admit(["user:alice", "feature:chat", "global"], usd(1000))
        assert reservation.scopes == []
        gate.settle(reservation, usd(1000))
    assert gate.in_flight_nanos() == 0
    assert gate.status("user:alice") is None
    assert gate.status("global") is None


def test_user_default_caps_each_user_separately() -> None:
    gate = gate_with(policies(**{"user:*": 1}))
    bob = gate.admit(["user:bob", "global"], usd(0.1))
    assert bob.scopes == ["user:bob"]  # global has no policy: not capped
    gate.settle(bob, usd(1))
    err = refusal(gate, ["user:bob", "global"], usd(0.1))
    assert err.extra["scope"] == "user:bob"
    assert gate.admit(["user:carol", "global"], usd(0.1)).scopes == ["user:carol"]


def test_own_policy_beats_the_user_default_at_the_gate() -> None:
    gate = gate_with(policies(**{"user:*": 1, "user:vip": 100}))
    for scope in ("user:vip", "user:bob"):
        gate.settle(gate.admit([scope], 0), usd(5))
    assert gate.admit(["user:vip"], usd(1)).scopes == ["user:vip"]
    refusal(gate, ["user:bob"], usd(1))


# -- sequential traffic ------------------------------------------------------------------
def test_refused_with_402_once_settled_spend_reaches_the_limit() -> None:
    gate = gate_with(policies(**{"user:alice": 1}))
    for _ in range(4):
        reservation = gate.admit(["user:alice"], usd(0.25))
        gate.settle(reservation, usd(0.25))
    assert spent(gate, "user:alice") == usd(1)
    err = refusal(gate, ["user:alice"], usd(0.01))
    assert err.code == err.error_type == "budget_exceeded"
    assert gate.in_flight_nanos() == 0  # a refusal reserves nothing


def test_just_below_the_limit_is_still_admitted() -> None:
    gate = gate_with(policies(**{"user:alice": 1}))
    gate.settle(gate.admit(["user:alice"], 0), usd(1) - 1)
    assert gate.admit(["user:alice"], usd(0.5)).scopes == ["user:alice"]


def test_402_extra_has_every_field() -> None:
    book = policies(
        **{
            "user:alice": {
                "limit_usd": 2,
                "upgrade_url": "https://example.com/upgrade",
                "upgrade_prompt": "Upgrade to Pro.",
            }
        }
    )
    gate = gate_with(book)
    gate.settle(gate.admit(["user:alice"], usd(1)), usd(2.5))
    err = refusal(gate, ["user:alice", "global"], usd(1))
    assert err.extra == {
        "scope": "user:alice",
        "limit_usd": 2.0,
        "spent_usd": 2.5,
        "period": "month",
        "resets_at": "2026-11-01T00:00:00+00:00",
        "upgrade_url": "https://example.com/upgrade",
        "upgrade_prompt": "Upgrade to Pro.",
    }
    body = err.body()["error"]
    assert body["type"] == body["code"] == "budget_exceeded"
    assert body["scope"] == "user:alice" and body["resets_at"] == "2026-11-01T00:00:00+00:00"
    assert "user:alice" in err.message and "Upgrade to Pro." in err.message
    assert "2026-11-01T00:00:00+00:00" in err.message


def test_402_without_upgrade_settings_still_carries_the_fields() -> None:
    gate = gate_with(policies(**{"feature:chat": 1}))
    gate.settle(gate.admit(["feature:chat"], 0), usd(1))
    err = refusal(gate, ["feature:chat"], 0)
    assert err.extra["upgrade_url"] is None
    assert err.extra["upgrade_prompt"] is None
    assert set(err.extra) == {
        "scope",
        "limit_usd",
        "spent_usd",
        "period",
        "resets_at",
        "upgrade_url",
        "upgrade_prompt",
    }
    assert "wait for the next period" in err.message


@pytest.mark.parametrize(
    ("body", "now", "resets_at"),
    [
        ({"period": "month"}, NOW, "2026-11-01T00:00:00+00:00"),
        ({"period": "month"}, datetime(2026, 12, 20, tzinfo=UTC), "2027-01-01T00:00:00+00:00"),
        ({"period": "day"}, NOW, "2026-10-16T00:00:00+00:00"),
        # New York midnight during EDT (-04:00), the day before the fall-back change
        (
            {"period": "day", "timezone": "America/New_York"},
            datetime(2026, 10, 31, 15, tzinfo=UTC),
            "2026-11-01T04:00:00+00:00",
        ),
        # ...and the 25-hour day itself ends at midnight EST (-05:00)
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
def test_resets_at_is_the_next_period_start(
    body: dict[str, Any], now: datetime, resets_at: str
) -> None:
    gate = gate_with(policies(**{"user:alice": {"limit_usd": 1, **body}}), now)
    gate.settle(gate.admit(["user:alice"], 0), usd(1), ts=now)
    err = refusal(gate, ["user:alice"], 0)
    assert err.extra["resets_at"] == resets_at
    assert err.extra["period"] == body["period"]


def test_refusal_on_one_scope_reserves_nothing_on_the_others() -> None:
    gate = gate_with(policies(**{"user:*": 10, "global": 1}))
    gate.settle(gate.admit(["user:bob", "global"], 0), usd(1))
    refusal(gate, ["user:alice", "global"], usd(0.5))
    assert gate.in_flight_nanos() == 0
    status = gate.status("user:alice")
    assert status is not None and status.reserved_nanos == 0


# -- concurrency bound -------------------------------------------------------------------
def test_in_flight_reservations_refuse_a_request_whose_worst_case_would_cross() -> None:
    gate = gate_with(policies(**{"user:alice": 1}))
    first = gate.admit(["user:alice"], usd(0.6))
    err = refusal(gate, ["user:alice"], usd(0.5))  # 0.6 + 0.5 > 1
    assert "in flight" in err.message
    assert err.extra["spent_usd"] == 0.0  # in-flight money is not reported as spent
    second = gate.admit(["user:alice"], usd(0.4))  # 0.6 + 0.4 == 1: does not cross
    assert gate.in_flight_nanos() == usd(1)
    refusal(gate, ["user:alice"], 1)  # even one nano more would cross
    gate.settle(first, usd(0.1))
    gate.settle(second, usd(0.1))
    assert gate.in_flight_nanos() == 0


def test_a_lone_request_below_the_limit_is_admitted_even_if_its_worst_case_crosses() -> None:
    gate = gate_with(policies(**{"user:alice": 1}))
    gate.settle(gate.admit(["user:alice"], 0), usd(0.9))
    lone = gate.admit(["user:alice"], usd(50))  # nothing in flight: admitted
    assert lone.scopes == ["user:alice"]
    refusal(gate, ["user:alice"], usd(0.01))  # while it runs, nothing else gets in
    gate.settle(lone, usd(3))
    # Overshoot is bounded by that one request: afterwards the scope is blocked.
    assert spent(gate, "user:alice") == usd(3.9)
    err = refusal(gate, ["user:alice"], 0)
    assert "limit reached" in err.message


def test_overshoot_is_bounded_by_one_request_under_a_burst() -> None:
    gate = gate_with(policies(**{"user:alice": 1}))
    admitted: list[Reservation] = []
    refused = 0
    for _ in range(20):  # 20 concurrent requests, each worst case $0.30
        try:
            admitted.append(gate.admit(["user:alice"], usd(0.3)))
        except ApiError:
            refused += 1
    assert len(admitted) == 3  # 0.9 reserved; a fourth would reach 1.2
    assert refused == 17
    for reservation in admitted:
        gate.settle(reservation, usd(0.3))
    assert spent(gate, "user:alice") <= usd(1)


def test_in_flight_requests_of_other_users_count_on_a_shared_scope() -> None:
    gate = gate_with(policies(**{"user:*": 100, "global": 1}))
    gate.admit(["user:a", "global"], usd(0.7))
    err = refusal(gate, ["user:b", "global"], usd(0.7))
    assert err.extra["scope"] == "global"


# -- reservations are released -----------------------------------------------------------
def test_settle_releases_the_reservation_and_counts_the_actual_cost() -> None:
    gate = gate_with(policies(**{"user:alice": 10, "global": 100}))
    reservation = gate.admit(["user:alice", "global"], usd(2))
    assert gate.in_flight_nanos() == usd(4)  # reserved on both capped scopes
    gate.settle(reservation, usd(0.5))
    assert gate.in_flight_nanos() == 0
    assert spent(gate, "user:alice") == spent(gate, "global") == usd(0.5)


def test_settle_with_zero_after_an_error_releases_and_counts_nothing() -> None:
    gate = gate_with(policies(**{"user:alice": 1}))
    reservation = gate.admit(["user:alice"], usd(0.9))
    gate.settle(reservation, 0)
    assert gate.in_flight_nanos() == 0
    assert spent(gate, "user:alice") == 0
    assert reservation.released
    gate.admit(["user:alice"], usd(0.9))  # nothing left behind to refuse it
    gate.admit(["user:alice"], usd(0.1))


def test_double_settle_does_not_free_twice_or_count_twice() -> None:
    gate = gate_with(policies(**{"user:alice": 10}))
    first = gate.admit(["user:alice"], usd(3))
    second = gate.admit(["user:alice"], usd(2))
    gate.settle(first, usd(1))
    gate.settle(first, usd(1))  # e.g. finally after an explicit settle
    gate.settle(first, 0)
    assert gate.in_flight_nanos() == usd(2)  # the second request's reservation is intact
    assert spent(gate, "user:alice") == usd(1)
    status = gate.status("user:alice")
    assert status is not None and status.reserved_nanos == usd(2)
    gate.settle(second, usd(1))
    assert gate.in_flight_nanos() == 0


def test_many_admit_settle_cycles_leak_nothing() -> None:
    gate = gate_with(policies(**{"user:*": 1_000_000, "feature:*": 1_000_000, "global": 10**6}))
    scopes = ["user:alice", "feature:chat", "global"]
    total = 0
    open_reservations: list[Reservation] = []
    for i in range(600):
        open_reservations.append(gate.admit(scopes, usd(0.01) + i))
        if len(open_reservations) == 4:  # settle out of order, some as errors, some twice
            for j, reservation in enumerate([*open_reservations[::-1], open_reservations[0]]):
                actual = 0 if (i + j) % 5 == 0 else 1000 + j
                if not reservation.released:
                    total += actual
                gate.settle(reservation, actual)
            open_reservations.clear()
    for reservation in open_reservations:
        gate.settle(reservation, 0)
    assert gate.in_flight_nanos() == 0
    for scope in scopes:
        status = gate.status(scope)
        assert status is not None
        assert status.reserved_nanos == 0
        assert status.spent_nanos == total
    # No leak means no false 402: a lone request of almost the whole budget still gets in.
    gate.admit(scopes, usd(999_999))


def test_a_big_reservation_released_cannot_drive_in_flight_negative() -> None:
    gate = gate_with(policies(**{"user:alice": 100}))
    small = gate.admit(["user:alice"], usd(1))
    big = gate.admit(["user:alice"], usd(50))
    gate.settle(big, 0)
    gate.settle(big, 0)
    assert gate.in_flight_nanos() == usd(1)
    gate.settle(small, 0)
    assert gate.in_flight_nanos() == 0


# -- reservations off --------------------------------------------------------------------
def test_without_reservations_everything_below_the_limit_is_admitted() -> None:
    gate = gate_with(policies(**{"user:alice": 1}), reservations=False)
    in_flight = [gate.admit(["user:alice"], usd(0.9)) for _ in range(25)]
    assert all(r.scopes == ["user:alice"] for r in in_flight)
    assert gate.in_flight_nanos() == 0
    for reservation in in_flight[:4]:
        gate.settle(reservation, usd(0.25))
    refusal(gate, ["user:alice"], usd(0.9))  # only spent money counts: $1 reached
    for reservation in in_flight[4:]:
        gate.settle(reservation, 0)
    assert gate.in_flight_nanos() == 0


# -- decisions from the spend agent ------------------------------------------------------
def test_blocked_decision_for_the_current_period_blocks_despite_low_local_numbers() -> None:
    gate = gate_with(policies(**{"user:alice": 10}))
    gate.on_decision(
        "user:alice", decision("user:alice", state="blocked", spent=usd(10), limit=usd(10))
    )
    err = refusal(gate, ["user:alice"], usd(0.01))
    assert err.extra["spent_usd"] == 10.0
    assert err.extra["resets_at"] == "2026-11-01T00:00:00+00:00"


def test_blocked_state_is_taken_from_the_agent_even_if_its_spend_looks_low() -> None:
    # Another dispatcher's spend may already be in the agent's verdict but not in its total
    # as this dispatcher sees it; the verdict stands for this period.
    gate = gate_with(policies(**{"user:alice": 10}))
    gate.on_decision(
        "user:alice", decision("user:alice", state="blocked", spent=usd(1), limit=usd(10))
    )
    refusal(gate, ["user:alice"], 0)


def test_open_decision_with_spend_at_the_limit_blocks_on_the_numbers() -> None:
    gate = gate_with(policies(**{"user:alice": 10}))
    gate.on_decision(
        "user:alice", decision("user:alice", state="open", spent=usd(9), limit=usd(10))
    )
    gate.admit(["user:alice"], 0)
    gate.settle(gate.admit(["user:alice"], 0), usd(1))
    refusal(gate, ["user:alice"], 0)


def test_blocked_decision_of_a_past_period_does_not_block_after_rollover() -> None:
    gate = gate_with(policies(**{"user:alice": 10}), now=datetime(2026, 10, 31, 23, 59, tzinfo=UTC))
    gate.on_decision(
        "user:alice",
        decision(
            "user:alice",
            state="blocked",
            spent=usd(10),
            limit=usd(10),
            counted_through=datetime(2026, 10, 31, 23, 58, tzinfo=UTC),
        ),
    )
    refusal(gate, ["user:alice"], 0)
    # The month ends; no traffic and no new decision arrived in between.
    gate.clock = Clock(datetime(2026, 11, 1, 0, 0, 5, tzinfo=UTC))
    reservation = gate.admit(["user:alice"], usd(1))
    assert reservation.scopes == ["user:alice"]
    status = gate.status("user:alice")
    assert status is not None
    assert status.state == "open"
    assert status.spent_nanos == 0
    assert status.period_start == NOVEMBER
    assert status.resets_at == datetime(2026, 12, 1, tzinfo=UTC)


def test_local_spend_of_the_previous_period_does_not_count_after_rollover() -> None:
    gate = gate_with(policies(**{"user:alice": 1}), now=datetime(2026, 10, 31, 23, 59, tzinfo=UTC))
    gate.settle(gate.admit(["user:alice"], 0), usd(1))
    refusal(gate, ["user:alice"], 0)
    gate.clock = Clock(datetime(2026, 11, 1, 0, 0, 1, tzinfo=UTC))
    gate.admit(["user:alice"], 0)
    assert spent(gate, "user:alice") == 0


def test_daily_rollover_follows_the_policy_time_zone() -> None:
    book = policies(**{"user:alice": {"limit_usd": 1, "period": "day", "timezone": "Asia/Kolkata"}})
    # 18:00Z is 23:30 in Kolkata; the local day ends at 18:30Z.
    gate = gate_with(book, now=datetime(2026, 10, 15, 18, 0, tzinfo=UTC))
    gate.settle(gate.admit(["user:alice"], 0), usd(1))
    refusal(gate, ["user:alice"], 0)
    gate.clock = Clock(datetime(2026, 10, 15, 18, 29, tzinfo=UTC))
    refusal(gate, ["user:alice"], 0)  # 23:59 in Kolkata: still the same local day
    gate.clock = Clock(datetime(2026, 10, 15, 18, 31, tzinfo=UTC))
    gate.admit(["user:alice"], 0)  # 00:01 on Oct 16 in Kolkata, though UTC is still Oct 15


def test_local_spend_counted_through_by_a_decision_is_not_double_counted() -> None:
    gate = gate_with(policies(**{"user:alice": 10}))
    t1, t2 = NOW - timedelta(seconds=30), NOW - timedelta(seconds=10)
    gate.settle(gate.admit(["user:alice"], 0), usd(3), ts=t1)
    gate.settle(gate.admit(["user:alice"], 0), usd(2), ts=t2)
    assert spent(gate, "user:alice") == usd(5)
    # The agent has counted the first call (and $1 from another dispatcher) through t1 + 5 s.
    gate.on_decision(
        "user:alice",
        decision(
            "user:alice",
            state="open",
            spent=usd(4),
            limit=usd(10),
            counted_through=t1 + timedelta(seconds=5),
        ),
    )
    status = gate.status("user:alice")
    assert status is not None
    assert status.agent_spent_nanos == usd(4)
    assert status.local_nanos == usd(2)  # only the call after counted_through
    assert status.spent_nanos == usd(6)  # not 4 + 3 + 2


def test_spend_in_the_counted_through_millisecond_is_kept_until_a_later_decision() -> None:
    """Event times are whole ms and the agent may have counted only some events of its last
    millisecond: the gate keeps that millisecond's local spend (counted twice at worst, which
    blocks early) rather than risk dropping spend the agent has not seen (overspending)."""
    gate = gate_with(policies(**{"user:alice": 10}))
    through = NOW - timedelta(seconds=10)
    gate.settle(gate.admit(["user:alice"], 0), usd(3), ts=through)
    gate.settle(gate.admit(["user:alice"], 0), usd(3), ts=through)  # same millisecond
    gate.on_decision(  # the agent counted only one of the two
        "user:alice",
        decision("user:alice", state="open", spent=usd(3), limit=usd(10), counted_through=through),
    )
    assert spent(gate, "user:alice") == usd(9), "never less than the $6 really spent"
    gate.on_decision(
        "user:alice",
        decision(
            "user:alice",
            state="open",
            spent=usd(6),
            limit=usd(10),
            counted_through=through + timedelta(milliseconds=1),
        ),
    )
    assert spent(gate, "user:alice") == usd(6)


def test_a_settle_arriving_after_the_decision_that_counted_it_is_not_double_counted() -> None:
    gate = gate_with(policies(**{"user:alice": 10}))
    reservation = gate.admit(["user:alice"], usd(1))
    call_ts = NOW - timedelta(seconds=20)
    # The agent saw the call's usage event before this dispatcher settled it.
    gate.on_decision(
        "user:alice",
        decision(
            "user:alice",
            state="open",
            spent=usd(3),
            limit=usd(10),
            counted_through=call_ts + timedelta(seconds=1),
        ),
    )
    gate.settle(reservation, usd(3), ts=call_ts)
    assert spent(gate, "user:alice") == usd(3)


def test_later_local_spend_is_kept_across_successive_decisions() -> None:
    gate = gate_with(policies(**{"user:alice": 10}))
    base = NOW - timedelta(minutes=5)
    for i in range(5):  # $1 at base, base+1 min, ..., base+4 min
        gate.settle(gate.admit(["user:alice"], 0), usd(1), ts=base + timedelta(minutes=i))
    for counted in range(1, 6):  # the agent catches up one call at a time
        # counted_through 1 ms after the newest counted call (the boundary ms is kept locally)
        through = base + timedelta(minutes=counted - 1, milliseconds=1)
        gate.on_decision(
            "user:alice",
            decision(
                "user:alice",
                state="open",
                spent=usd(counted),
                limit=usd(10),
                counted_through=through,
            ),
        )
        status = gate.status("user:alice")
        assert status is not None
        assert (status.agent_spent_nanos, status.local_nanos) == (usd(counted), usd(5 - counted))
        assert status.spent_nanos == usd(5)


def test_decision_with_an_old_limit_is_judged_on_the_numbers_after_a_raise() -> None:
    book = policies(**{"user:alice": 10})
    gate = gate_with(book)
    gate.on_decision(
        "user:alice", decision("user:alice", state="blocked", spent=usd(10), limit=usd(10))
    )
    refusal(gate, ["user:alice"], 0)
    book.put(parse_policy("user:alice", {"limit_usd": 20}))  # the admin raises the limit
    reservation = gate.admit(["user:alice"], usd(1))
    assert reservation.scopes == ["user:alice"]
    status = gate.status("user:alice")
    assert status is not None and status.state != "blocked"
    assert status.spent_nanos == usd(10)  # the agent's count still applies


def test_decision_with_an_old_limit_blocks_on_the_numbers_after_a_cut() -> None:
    book = policies(**{"user:alice": 10})
    gate = gate_with(book)
    gate.on_decision(
        "user:alice", decision("user:alice", state="warn", spent=usd(6), limit=usd(10))
    )
    gate.admit(["user:alice"], 0)
    book.put(parse_policy("user:alice", {"limit_usd": 5}))
    err = refusal(gate, ["user:alice"], 0)
    assert err.extra["limit_usd"] == 5.0
    assert err.extra["spent_usd"] == 6.0


def test_removing_the_decision_unblocks_the_scope() -> None:
    gate = gate_with(policies(**{"user:alice": 10}))
    gate.on_decision(
        "user:alice", decision("user:alice", state="blocked", spent=usd(10), limit=usd(10))
    )
    refusal(gate, ["user:alice"], 0)
    gate.on_decision("user:alice", None)
    gate.admit(["user:alice"], 0)


def test_decision_for_another_scope_does_not_affect_this_one() -> None:
    gate = gate_with(policies(**{"user:*": 10}))
    gate.on_decision(
        "user:bob", decision("user:bob", state="blocked", spent=usd(10), limit=usd(10))
    )
    gate.admit(["user:alice"], 0)
    refusal(gate, ["user:bob"], 0)


def test_decision_that_went_through_avro_blocks_the_current_period() -> None:
    policy = parse_policy("user:alice", {"limit_usd": 10})
    period = policy.period_at(NOW)
    record = decision_record(
        "user:alice",
        policy,
        period,
        usd(10),
        NOW - timedelta(seconds=2),
        evaluate(usd(10), policy),
        NOW,
        "spend",
    )
    schema = parse_schema(json.loads((SCHEMAS / "BudgetDecision.avsc").read_text()))
    buf = io.BytesIO()
    schemaless_writer(buf, schema, record)
    buf.seek(0)
    decoded = schemaless_reader(buf, schema, schema)
    assert isinstance(decoded, dict)
    gate = gate_with(policies(**{"user:alice": 10}))
    gate.on_decision("user:alice", decoded)
    status = gate.status("user:alice")
    assert status is not None and status.agent_spent_nanos == usd(10)
    refusal(gate, ["user:alice"], 0)


def test_decision_without_counted_through_uses_its_ts() -> None:
    gate = gate_with(policies(**{"user:alice": 10}))
    gate.settle(gate.admit(["user:alice"], 0), usd(2), ts=NOW - timedelta(seconds=5))
    record = decision("user:alice", state="open", spent=usd(2), limit=usd(10))
    record["counted_through"] = None
    record["ts"] = NOW - timedelta(seconds=1)
    gate.on_decision("user:alice", record)
    assert spent(gate, "user:alice") == usd(2)


# -- spend reported after the fact -------------------------------------------------------
def test_record_spend_counts_reported_usage_and_can_block() -> None:
    gate = gate_with(policies(**{"user:*": 5}))
    gate.record_spend(["user:alice", "global"], usd(3), NOW - timedelta(seconds=1))
    gate.admit(["user:alice"], 0)
    gate.record_spend(["user:alice", "global"], usd(2), NOW - timedelta(seconds=1))
    assert spent(gate, "user:alice") == usd(5)
    err = refusal(gate, ["user:alice", "global"], 0)
    assert err.extra["scope"] == "user:alice"


def test_record_spend_only_counts_for_capped_scopes() -> None:
    book = policies(**{"user:*": 5})
    gate = gate_with(book)
    gate.record_spend(["user:alice", "feature:chat", "global"], usd(4), NOW - timedelta(seconds=1))
    assert gate.status("feature:chat") is None
    assert gate.status("global") is None
    # Spend recorded while a scope was uncapped was never tracked locally.
    book.put(parse_policy("feature:chat", {"limit_usd": 5}))
    book.put(parse_policy("global", {"limit_usd": 5}))
    assert spent(gate, "feature:chat") == 0
    assert spent(gate, "global") == 0
    assert spent(gate, "user:alice") == usd(4)


def test_record_spend_of_zero_or_of_a_past_period_does_not_count_now() -> None:
    gate = gate_with(policies(**{"user:alice": 5}))
    gate.record_spend(["user:alice"], 0, NOW)
    gate.record_spend(["user:alice"], usd(100), datetime(2026, 9, 30, 23, tzinfo=UTC))
    assert spent(gate, "user:alice") == 0
    gate.admit(["user:alice"], 0)


def test_record_spend_accepts_non_utc_timestamps() -> None:
    gate = gate_with(policies(**{"user:alice": 5}))
    ts = (NOW - timedelta(seconds=1)).astimezone(timezone(timedelta(hours=-7)))
    gate.record_spend(["user:alice"], usd(5), ts)
    refusal(gate, ["user:alice"], 0)


# -- status ------------------------------------------------------------------------------
def test_status_breakdown_shows_agent_local_and_in_flight() -> None:
    gate = gate_with(policies(**{"user:alice": 9}))
    gate.settle(gate.admit(["user:alice"], 0), usd(1), ts=NOW - timedelta(minutes=2))
    gate.settle(gate.admit(["user:alice"], 0), usd(2), ts=NOW - timedelta(seconds=10))
    gate.on_decision(
        "user:alice",
        decision(
            "user:alice",
            state="open",
            spent=usd(3),
            limit=usd(9),
            counted_through=NOW - timedelta(minutes=1),
        ),
    )
    gate.admit(["user:alice"], usd(1.5))
    status = gate.status("user:alice")
    assert status is not None
    shown = status.to_json()
    assert shown["scope"] == "user:alice"
    assert shown["state"] == "open"
    assert shown["period"] == "month"
    assert shown["limit_usd"] == "9"
    assert shown["spent_usd"] == "5"
    assert shown["remaining_usd"] == "4"
    assert shown["period_start"] == "2026-10-01T00:00:00+00:00"
    assert shown["resets_at"] == "2026-11-01T00:00:00+00:00"
    assert shown["breakdown"] == {
        "counted_by_agent_usd": "3",
        "seen_locally_usd": "2",
        "in_flight_usd": "1.5",
    }


def test_status_shows_round_amounts_as_plain_numbers() -> None:
    gate = gate_with(policies(**{"user:alice": 100}))
    gate.settle(gate.admit(["user:alice"], 0), usd(10))
    status = gate.status("user:alice")
    assert status is not None
    shown = status.to_json()
    assert (shown["limit_usd"], shown["spent_usd"], shown["remaining_usd"]) == ("100", "10", "90")
    assert shown["breakdown"]["seen_locally_usd"] == "10"


def test_status_remaining_never_goes_negative() -> None:
    gate = gate_with(policies(**{"user:alice": 1}))
    gate.settle(gate.admit(["user:alice"], 0), usd(3))
    status = gate.status("user:alice")
    assert status is not None
    assert status.state == "blocked"
    assert status.to_json()["remaining_usd"] == "0"


def test_status_of_a_defaulted_scope_carries_the_scope_name() -> None:
    gate = gate_with(policies(**{"user:*": 5}))
    status = gate.status("user:dora")
    assert status is not None
    assert status.scope == "user:dora"
    assert isinstance(status.policy, Policy) and status.policy.scope == "user:dora"
