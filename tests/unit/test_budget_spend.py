"""Spend accounting of the spend agent: buckets, costs, decisions, threshold alerts, rollover."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fastavro import parse_schema
from fastavro.validation import validate

from app.budgets.periods import Period
from app.budgets.policy import Evaluation, Policy, PolicyBook, evaluate, parse_policy
from app.budgets.spend import (
    crossed_thresholds,
    decision_record,
    event_cost,
    is_partition_local,
    rollover_due,
    should_publish,
    threshold_alert,
    utc,
)
from app.pricing.catalog import usd_text

USD = 1_000_000_000  # nanos
TS = datetime(2026, 10, 31, 19, 0, tzinfo=UTC)  # 2026-11-01 00:30 in Asia/Kolkata
NOW = datetime(2026, 10, 31, 19, 0, 5, tzinfo=UTC)
SCHEMAS = Path(__file__).resolve().parents[2] / "schemas"


def schema(name: str) -> Any:
    return parse_schema(json.loads((SCHEMAS / f"{name}.avsc").read_text()))


def book(**bodies: dict[str, Any]) -> PolicyBook:
    result = PolicyBook()
    for scope, body in bodies.items():
        result.put(parse_policy(scope, body))
    return result


def usage(**overrides: Any) -> dict[str, Any]:
    record: dict[str, Any] = {
        "ts": TS,
        "user_id": "alice",
        "feature": "chat",
        "team": "data",
        "api_key_id": "key_1",
        "cost_usd_nanos": 1_500_000,
        "baseline_cost_usd_nanos": 9_000_000,
        "price_unknown": False,
    }
    record.update(overrides)
    return record


def month(start: datetime, end: datetime) -> Period:
    return Period("month", start, end)


UTC_DAY = Period("day", datetime(2026, 10, 31, tzinfo=UTC), datetime(2026, 11, 1, tzinfo=UTC))
UTC_MONTH = month(datetime(2026, 10, 1, tzinfo=UTC), datetime(2026, 11, 1, tzinfo=UTC))
KOLKATA_MONTH = month(
    datetime(2026, 10, 31, 18, 30, tzinfo=UTC), datetime(2026, 11, 30, 18, 30, tzinfo=UTC)
)


# -- scopes ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("scope", "local"),
    [
        ("user:alice", True),
        ("feature:chat", False),
        ("team:x", False),
        ("key:k", False),
        ("global", False),
    ],
)
def test_only_user_scopes_are_partition_local(scope: str, local: bool) -> None:
    assert is_partition_local(scope) is local


# -- costs -------------------------------------------------------------------------------
def test_event_cost_of_a_priced_event_is_its_cost() -> None:
    assert event_cost(usage()) == 1_500_000


def test_event_cost_of_an_unpriced_event_is_its_baseline_cost() -> None:
    record = usage(price_unknown=True, cost_usd_nanos=0, baseline_cost_usd_nanos=9_000_000)
    assert event_cost(record) == 9_000_000


@pytest.mark.parametrize(
    ("record", "cost"),
    [
        ({}, 0),
        ({"cost_usd_nanos": None}, 0),
        ({"price_unknown": True}, 0),
        ({"price_unknown": True, "baseline_cost_usd_nanos": None}, 0),
        ({"price_unknown": False, "cost_usd_nanos": 7, "baseline_cost_usd_nanos": 9}, 7),
    ],
)
def test_event_cost_with_missing_amounts(record: dict[str, Any], cost: int) -> None:
    assert event_cost(record) == cost


# -- decisions ---------------------------------------------------------------------------
def decide(
    policy: Policy, spent: int, now: datetime = NOW, reason: str = "spend"
) -> dict[str, Any]:
    period = policy.period_at(now)
    return decision_record(
        policy.scope,
        policy,
        period,
        spent,
        now - timedelta(seconds=1),
        evaluate(spent, policy),
        now,
        reason,
    )


def test_decision_record_carries_everything_the_gate_needs() -> None:
    policy = parse_policy(
        "user:alice",
        {"limit_usd": 10, "upgrade_url": "https://x.test/up", "upgrade_prompt": "Go pro"},
    )
    record = decide(policy, 8 * USD)
    assert record["scope"] == "user:alice"
    assert record["state"] == "warn"
    assert record["threshold"] == 0.8
    assert record["spent_usd_nanos"] == 8 * USD
    assert record["limit_usd_nanos"] == 10 * USD
    assert record["period"] == "month"
    assert record["period_start"] == UTC_MONTH.start
    assert record["resets_at"] == UTC_MONTH.end
    assert record["counted_through"] == NOW - timedelta(seconds=1)
    assert record["ts"] == NOW
    assert record["upgrade_url"] == "https://x.test/up"
    assert record["upgrade_prompt"] == "Go pro"
    assert record["reason"] == "spend"
    assert record["event_id"]


def test_decision_records_have_unique_event_ids() -> None:
    policy = parse_policy("global", {"limit_usd": 10})
    assert decide(policy, 1)["event_id"] != decide(policy, 1)["event_id"]


@pytest.mark.parametrize("spent", [0, 5 * USD, 10 * USD])
def test_decision_record_matches_the_avro_schema(spent: int) -> None:
    policy = parse_policy("feature:chat", {"limit_usd": 10, "timezone": "Asia/Kolkata"})
    record = decide(policy, spent)
    fields = {
        f["name"] for f in json.loads((SCHEMAS / "BudgetDecision.avsc").read_text())["fields"]
    }
    assert set(record) <= fields
    assert validate(record, schema("BudgetDecision"), raise_errors=True)


# -- when to publish ---------------------------------------------------------------------
def base_decision(**overrides: Any) -> dict[str, Any]:
    record = {
        "state": "warn",
        "period_start": UTC_MONTH.start,
        "limit_usd_nanos": 10 * USD,
        "spent_usd_nanos": 6 * USD,
        "threshold": 0.5,
        "resets_at": UTC_MONTH.end,
        "counted_through": NOW,
    }
    record.update(overrides)
    return record


def test_first_decision_is_always_published() -> None:
    assert should_publish(None, base_decision(), spent_refresh=False)


@pytest.mark.parametrize(
    "change",
    [
        {"state": "blocked"},
        {"state": "open"},
        {"period_start": UTC_MONTH.end},
        {"limit_usd_nanos": 20 * USD},
    ],
)
@pytest.mark.parametrize("refresh", [False, True])
def test_state_period_or_limit_change_is_published(change: dict[str, Any], refresh: bool) -> None:
    assert should_publish(base_decision(), base_decision(**change), spent_refresh=refresh)


def test_spent_only_change_is_published_only_when_refreshing() -> None:
    previous, new = base_decision(), base_decision(spent_usd_nanos=7 * USD)
    assert not should_publish(previous, new, spent_refresh=False)
    assert should_publish(previous, new, spent_refresh=True)


def test_counted_offsets_moving_on_is_published_when_refreshing() -> None:
    """A re-sent event skipped by the worker changes no spend, but dispatchers holding it must
    learn that the worker counted through its offset."""
    previous = base_decision(counted_offsets={"0": 10})
    new = base_decision(counted_offsets={"0": 12})
    assert not should_publish(previous, new, spent_refresh=False)
    assert should_publish(previous, new, spent_refresh=True)


def test_decision_carries_counted_offsets_by_partition() -> None:
    policy = parse_policy("user:alice", {"limit_usd": 10})
    period = policy.period_at(NOW)
    record = decision_record(
        "user:alice", policy, period, 1, NOW, evaluate(1, policy), NOW, "spend", {3: 17, 0: 4}
    )
    assert record["counted_offsets"] == {"0": 4, "3": 17}
    assert validate(record, schema("BudgetDecision"), raise_errors=True)


def test_nothing_changed_is_never_published() -> None:
    for refresh in (False, True):
        assert not should_publish(base_decision(), base_decision(), spent_refresh=refresh)


# -- thresholds --------------------------------------------------------------------------
POLICY = parse_policy("user:alice", {"limit_usd": 10})


@pytest.mark.parametrize(
    ("before", "after", "crossed"),
    [
        (None, None, []),
        (None, 0.5, [0.5]),
        (None, 1.0, [0.5, 0.8, 1.0]),  # from zero straight to blocked crosses all three
        (0.5, 0.5, []),
        (0.5, 0.8, [0.8]),
        (0.5, 1.0, [0.8, 1.0]),
        (0.8, 1.0, [1.0]),
        (1.0, 1.0, []),
        (1.0, 0.5, []),  # the limit was raised: nothing newly crossed
    ],
)
def test_crossed_thresholds_within_a_period(
    before: float | None, after: float | None, crossed: list[float]
) -> None:
    previous = base_decision(threshold=before)
    new = base_decision(threshold=after)
    assert crossed_thresholds(previous, new, POLICY) == crossed


def test_first_decision_crosses_every_threshold_up_to_its_own() -> None:
    assert crossed_thresholds(None, base_decision(threshold=1.0), POLICY) == [0.5, 0.8, 1.0]
    assert crossed_thresholds(None, base_decision(threshold=None), POLICY) == []


def test_a_new_period_starts_counting_thresholds_from_zero() -> None:
    previous = base_decision(threshold=1.0)  # blocked last month
    new = base_decision(period_start=UTC_MONTH.end, threshold=0.5)
    assert crossed_thresholds(previous, new, POLICY) == [0.5]


def test_crossed_thresholds_follow_the_policy_thresholds() -> None:
    custom = parse_policy("user:alice", {"limit_usd": 10, "thresholds": [0.25, 0.9]})
    assert crossed_thresholds(None, base_decision(threshold=1.0), custom) == [0.25, 0.9, 1.0]
    assert crossed_thresholds(
        base_decision(threshold=0.25), base_decision(threshold=0.9), custom
    ) == [0.9]


def test_decisions_from_evaluate_cross_the_thresholds_in_order() -> None:
    seen: list[float] = []
    previous = None
    for spent_usd in (1, 4, 5, 6, 8, 9, 10, 12):
        new = decide(POLICY, spent_usd * USD)
        seen += crossed_thresholds(previous, new, POLICY)
        previous = new
    assert seen == [0.5, 0.8, 1.0]


# -- alerts ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("threshold", "severity"),
    [(0.5, "info"), (0.8, "warning"), (0.95, "warning"), (1.0, "critical")],
)
def test_threshold_alert_message_and_severity(threshold: float, severity: str) -> None:
    policy = parse_policy("feature:chat", {"limit_usd": 250, "thresholds": [0.5, 0.8, 0.95]})
    decision = decide(policy, int(threshold * 250 * USD) + 1234)
    alert = threshold_alert("feature:chat", policy, decision, threshold, NOW)
    assert alert["severity"] == severity
    assert alert["kind"] == "budget_threshold"
    assert alert["status"] == "firing"
    assert alert["scope"] == "feature:chat"
    assert alert["score"] == threshold
    assert alert["expected"] == 250.0
    message = alert["message"]
    assert "feature:chat" in message
    assert f"${usd_text(decision['spent_usd_nanos'])} of its $250 " in message
    assert "$250 " in message
    assert f"{round(threshold * 100)}% threshold" in message
    assert "month" in message
    assert "2026-11-01T00:00:00+00:00" in message  # when it resets


def test_a_threshold_alert_of_a_tiny_cap_says_what_was_spent() -> None:
    """Probe 52: a $0.000001 cap's alert said "has spent $0.0000 of its $0.000001", while the
    402 of the same scope said $0.000004: the alert's figure is exact too."""
    policy = parse_policy("user:tiny", {"limit_usd": "0.000001"})
    decision = decide(policy, 4_000)  # $0.000004
    alert = threshold_alert("user:tiny", policy, decision, 1.0, NOW)
    assert "has spent $0.000004 of its $0.000001 " in alert["message"]


def test_threshold_alert_key_is_stable_per_scope_period_and_threshold() -> None:
    decision = decide(POLICY, 8 * USD)
    first = threshold_alert("user:alice", POLICY, decision, 0.8, NOW)
    again = threshold_alert("user:alice", POLICY, decide(POLICY, 9 * USD), 0.8, NOW)
    assert first["alert_key"] == again["alert_key"]
    assert first["alert_key"] == "budget_threshold|user:alice|2026-10-01T00:00:00+00:00|0.8"
    assert first["event_id"] != again["event_id"]
    other = threshold_alert("user:alice", POLICY, decision, 1.0, NOW)
    assert other["alert_key"] != first["alert_key"]


def test_threshold_alert_window_and_times_come_from_the_decision() -> None:
    decision = decide(POLICY, 10 * USD)
    alert = threshold_alert("user:alice", POLICY, decision, 1.0, NOW)
    assert alert["window_seconds"] == 31 * 86400
    assert alert["first_seen"] == alert["last_seen"] == decision["counted_through"]
    assert alert["details"] == {"threshold": "1.0", "period": "month"}
    assert alert["observed"] == 10.0


def test_threshold_alert_matches_the_avro_schema() -> None:
    alert = threshold_alert("user:alice", POLICY, decide(POLICY, 10 * USD), 1.0, NOW)
    alert["schema_version"] = 1
    assert validate(alert, schema("Alert"), raise_errors=True)


@pytest.mark.parametrize(("limit", "shown"), [("2500000", "$2500000"), ("12.345678", "$12.345678")])
def test_threshold_alert_message_states_the_exact_limit(limit: str, shown: str) -> None:
    policy = parse_policy("global", {"limit_usd": limit})
    decision = decide(policy, policy.limit_usd_nanos)
    message = threshold_alert("global", policy, decision, 1.0, NOW)["message"]
    assert f"of its {shown} month budget" in message


# -- rollover ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("state", "resets_at", "due"),
    [
        ("blocked", NOW - timedelta(seconds=1), True),
        ("blocked", NOW, True),
        ("warn", NOW - timedelta(days=3), True),
        ("blocked", NOW + timedelta(seconds=1), False),
        ("warn", NOW + timedelta(days=3), False),
        ("open", NOW - timedelta(days=3), True),  # every view shows the new period's spend
        ("open", NOW, True),
        ("open", NOW + timedelta(seconds=1), False),
        ("blocked", None, False),
    ],
)
def test_rollover_due_once_the_period_of_the_decision_has_ended(
    state: str, resets_at: datetime | None, due: bool
) -> None:
    assert rollover_due({"state": state, "resets_at": resets_at}, NOW) is due


def test_rollover_due_without_resets_at_field() -> None:
    assert not rollover_due({"state": "blocked"}, NOW)


def test_rollover_decision_reopens_the_scope_in_the_new_period() -> None:
    blocked = decide(POLICY, 10 * USD, now=datetime(2026, 10, 31, 23, 59, tzinfo=UTC))
    after = datetime(2026, 11, 1, 0, 0, 1, tzinfo=UTC)
    assert rollover_due(blocked, after)
    period = POLICY.period_at(after)
    fresh = decision_record(
        "user:alice", POLICY, period, 0, period.start, evaluate(0, POLICY), after, "period_rollover"
    )
    assert fresh["state"] == "open"
    assert fresh["period_start"] == blocked["resets_at"]
    assert not rollover_due(fresh, after)
    assert should_publish(blocked, fresh, spent_refresh=False)
    assert crossed_thresholds(blocked, fresh, POLICY) == []


def test_evaluation_passes_through_unchanged() -> None:
    record = decision_record(
        "global", POLICY, UTC_MONTH, 3, NOW, Evaluation("warn", 0.5), NOW, "manual"
    )
    assert (record["state"], record["threshold"], record["reason"]) == ("warn", 0.5, "manual")


def test_utc_converts_milliseconds_to_an_aware_datetime() -> None:
    assert utc(int(TS.timestamp() * 1000)) == TS
    assert utc(0) == datetime(1970, 1, 1, tzinfo=UTC)


def test_a_spend_past_what_avro_long_holds_is_published_saturated_not_a_crash() -> None:
    """Session 17's probe (F3): 49,000 `/v1/usage` records of 2^31-1 tokens each at GPT-4
    prices took one capped user's spend past 2^63 nano-dollars ($9.22 B); the decision did
    not encode (`spent_usd_nanos ... expected long`), the Faust app crashed, and crashed again
    on every restart (the total lives in its changelog). The decision now says the most a
    long holds: still far over any cap ($1 B at most), still blocked."""
    policy = parse_policy("user:alice", {"limit_usd": 1_000_000_000})
    period = policy.period_at(NOW)
    for spent in (2**63 - 1, 2**63, 9_470_402_883_270_000_000, 10**30):
        record = decision_record(
            "user:alice", policy, period, spent, NOW, evaluate(spent, policy), NOW, "spend"
        )
        assert record["spent_usd_nanos"] == 2**63 - 1
        assert record["state"] == "blocked"
        assert validate(record, schema("BudgetDecision"), raise_errors=True)
