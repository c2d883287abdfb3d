"""Outcomes linked to a call that was not served, on the warehouse (chdb, or a server).

A newcomer probe posted a success for a call that failed upstream ($0): its feature showed
success_rate 1.0 and cost_per_success_usd "0". A success is something a served call
delivered; an outcome linked by its request id to a call that failed (status error or
timeout: the provider never answered it) is counted apart, in
``outcomes_on_failed_calls``, and is in neither the outcomes, the successes nor the value,
so it never lowers the cost per success. A call that failed and escalated to an answer was
served; so was a stream its client left (status client_disconnected).
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest

from app.warehouse.clickhouse import migrate
from app.warehouse.reports import (
    UNSERVED_CALL_OUTCOMES,
    Range,
    outcomes,
    unserved_call_outcomes_params,
)
from tests.integration.harness import private_day

pytestmark = pytest.mark.integration

USAGE_COLUMNS = ["event_id", "ts", "request_id", "user_id", "feature", "source", "model_served",
                 "baseline_model", "cost_usd", "baseline_cost_usd", "status", "http_status",
                 "error_type"]  # fmt: skip
# The lookup of the outcomes' calls inside UNSERVED_CALL_OUTCOMES: a view of its own
# (migration 015), read here to see its plan use the request id index
UNSERVED_CALLS = (
    "SELECT user_id, request_id FROM unserved_calls(start_ms = %(start_ms)s, end_ms = %(end_ms)s)"
)
OUTCOME_COLUMNS = ["event_id", "ts", "request_id", "session_id", "user_id", "feature", "outcome",
                   "value_usd"]  # fmt: skip


def test_an_outcome_of_a_failed_call_is_counted_apart(clickhouse: Any) -> None:
    migrate(clickhouse)
    day = private_day()
    tag = uuid.uuid4().hex[:8]
    feature, lone = f"{tag}-support", f"{tag}-lonely"
    at = day + timedelta(hours=10, seconds=20)
    minute = timedelta(minutes=1)
    ids = {name: f"{tag}-{name}" for name in ("served", "failed", "escalated", "timeout", "left",
                                              "lone")}  # fmt: skip

    def call(
        when: datetime, name: str, cost: str, status: str = "ok", error: str | None = None,
        owner: str = feature,
    ) -> list[Any]:  # fmt: skip
        return [uuid.uuid4().hex, when, ids[name], f"{tag}-u", owner, "gateway", "gpt-4o",
                "gpt-4", Decimal(cost), Decimal(cost) * 10, status,
                200 if status == "ok" else 502, error]  # fmt: skip

    clickhouse.insert(
        "usage_events",
        [
            call(at, "served", "0.30"),
            call(at + minute, "failed", "0", "error", "upstream_error"),
            # failed, then escalated to an answer (migration 011): served
            call(at + 2 * minute, "escalated", "0.01", "error", "escalated_empty_answer"),
            call(at + 2 * minute, "escalated", "0.29"),
            call(at + 3 * minute, "timeout", "0", "timeout", "upstream_timeout"),
            # the client left the stream: the provider answered (and billed) it
            call(at + 4 * minute, "left", "0.10", "client_disconnected", "client_disconnected"),
            # the probe's case: a feature whose only call failed
            call(at + 5 * minute, "lone", "0", "error", "upstream_error", owner=lone),
        ],
        column_names=USAGE_COLUMNS,
    )

    def outcome(
        when: datetime, name: str | None, said: str, value: str | None = None,
        owner: str = feature,
    ) -> list[Any]:  # fmt: skip
        session = None if name else f"{tag}-session"
        return [uuid.uuid4().hex, when, ids[name] if name else None, session, f"{tag}-u",
                owner, said, None if value is None else Decimal(value)]  # fmt: skip

    clickhouse.insert(
        "outcome_events",
        [
            outcome(at + 10 * minute, "served", "success", "3"),
            outcome(at + 11 * minute, "failed", "success", "2"),
            outcome(at + 12 * minute, "escalated", "success"),
            outcome(at + 13 * minute, "timeout", "failure"),
            outcome(at + 14 * minute, "left", "failure"),
            outcome(at + 15 * minute, None, "success"),  # linked by its session only
            outcome(at + 16 * minute, "lone", "success", owner=lone),
        ],
        column_names=OUTCOME_COLUMNS,
    )

    # the whole day (the rollups), and a range whose last minute is cut (raw rows): the same
    for end in (day + timedelta(days=1), at + 16 * minute + timedelta(seconds=30)):
        rows = {r["feature"]: r for r in outcomes(clickhouse, Range(day, end))}
        support = rows[feature]
        assert support["cost_usd"] == "0.7"
        assert (support["outcomes"], support["successes"]) == (4, 3), support
        assert support["outcomes_on_failed_calls"] == 2, support
        assert support["success_rate"] == 0.75
        assert support["cost_per_success_usd"] == "0.233333333"  # $0.70 over 3, not over 4
        assert support["value_usd"] == "3", support  # the failed call's $2 is not value
        # the probe's feature: no success, no "$0 per success"
        alone = rows[lone]
        assert (alone["outcomes"], alone["successes"], alone["outcomes_on_failed_calls"]) == (
            0,
            0,
            1,
        )
        assert alone["success_rate"] is None and alone["cost_per_success_usd"] is None


def test_a_request_id_names_a_call_of_the_outcome_s_own_user(clickhouse: Any) -> None:
    """A reported request id is per user: "job-42" of two users is two calls, so one user's
    failed call says nothing of another user's outcome. And a call the spend worker settled
    by estimate because its dispatcher died (status dispatcher_lost) may well have been
    answered: it is not a failed call."""
    migrate(clickhouse)
    day = private_day()
    tag = uuid.uuid4().hex[:8]
    feature, job, lost = f"{tag}-jobs", f"{tag}-job-42", f"{tag}-lost"
    at = day + timedelta(hours=9, seconds=5)
    minute = timedelta(minutes=1)
    alice, bob, carol = f"{tag}-alice", f"{tag}-bob", f"{tag}-carol"

    def call(when: datetime, user: str, request_id: str, status: str) -> list[Any]:
        error = None if status == "ok" else f"{status}_error"
        return [uuid.uuid4().hex, when, request_id, user, feature, "gateway", "gpt-4o",
                "gpt-4", Decimal("0.1"), Decimal("1"), status,
                200 if status == "ok" else 502, error]  # fmt: skip

    clickhouse.insert(
        "usage_events",
        [
            call(at, alice, job, "error"),  # alice's job-42 failed
            call(at + minute, bob, job, "ok"),  # bob's was answered
            call(at + 2 * minute, carol, lost, "dispatcher_lost"),  # settled by estimate
            call(at + 3 * minute, "anonymous", job, "error"),  # a call with no user: failed
        ],
        column_names=USAGE_COLUMNS,
    )

    def outcome(when: datetime, user: str | None, request_id: str) -> list[Any]:
        return [uuid.uuid4().hex, when, request_id, None, user, feature, "success",
                Decimal("5")]  # fmt: skip

    clickhouse.insert(
        "outcome_events",
        [
            outcome(at + 10 * minute, alice, job),
            outcome(at + 11 * minute, bob, job),
            outcome(at + 12 * minute, carol, lost),
            # the anonymous user's outcome has no user (ingest): its call is the anonymous one
            outcome(at + 13 * minute, None, job),
        ],
        column_names=OUTCOME_COLUMNS,
    )

    for end in (day + timedelta(days=1), at + 13 * minute + timedelta(seconds=30)):
        row = {r["feature"]: r for r in outcomes(clickhouse, Range(day, end))}[feature]
        # alice's and the anonymous user's outcomes are of failed calls; bob's and carol's
        # are of calls served (or not provably failed)
        assert row["outcomes_on_failed_calls"] == 2, row
        assert (row["outcomes"], row["successes"], row["value_usd"]) == (2, 2, "10"), row


def test_the_calls_of_the_outcomes_are_found_through_a_request_id_index(clickhouse: Any) -> None:
    """The calls an outcome may name are looked for over the range and the 31 days before it
    in the raw usage, ordered by user and time: without an index on the request id, every
    row of those days was read (0.66 s at 4 million rows). A bloom filter skips the blocks
    holding none of the outcomes' request ids (migration 014)."""
    migrate(clickhouse)
    (kind,) = clickhouse.query(
        "SELECT type FROM system.data_skipping_indices WHERE database = currentDatabase() "
        "AND table = 'usage_events' AND expr = 'request_id'"
    ).result_rows[0]
    assert kind == "bloom_filter"
    day = private_day()
    tag = uuid.uuid4().hex[:8]
    at = day + timedelta(hours=8)
    clickhouse.insert(
        "usage_events",
        [[uuid.uuid4().hex, at, f"{tag}-r", f"{tag}-u", f"{tag}-f", "gateway", "gpt-4o", "gpt-4",
          Decimal("0.1"), Decimal("1"), "error", 502, "upstream_error"]],
        column_names=USAGE_COLUMNS,
    )  # fmt: skip
    clickhouse.insert(
        "outcome_events",
        [[uuid.uuid4().hex, at + timedelta(minutes=1), f"{tag}-r", None, f"{tag}-u", f"{tag}-f",
          "success", None]],
        column_names=OUTCOME_COLUMNS,
    )  # fmt: skip
    # the lookup of the outcomes' calls, as outcomes_of_unserved_calls runs it (the view)
    parameters = unserved_call_outcomes_params(Range(day, day + timedelta(days=1)))
    plan = "\n".join(
        row[0]
        for row in clickhouse.query(
            f"EXPLAIN indexes = 1 {UNSERVED_CALLS}", parameters=parameters
        ).result_rows
    )
    assert "idx_request_id" in plan, plan
    assert [
        tuple(r) for r in clickhouse.query(UNSERVED_CALLS, parameters=parameters).result_rows
    ] == [(f"{tag}-u", f"{tag}-r")]
    assert [
        tuple(r)
        for r in clickhouse.query(UNSERVED_CALL_OUTCOMES, parameters=parameters).result_rows
    ] == [(f"{tag}-f", 1, 1, Decimal(0))]
