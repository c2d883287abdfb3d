"""Every report on a hand-computed fixture: Kafka → sink → chdb rollups → reports, API and CLI.

The fixture (one day of its own, so other tests' rows stay outside the range):

| call | model served (asked)      | tokens in/out | cached | cache hit | cost   | asked  | GPT-4 |
|------|---------------------------|---------------|--------|-----------|--------|--------|-------|
| A    | gpt-4o-mini (gpt-4o)      | 1M / 0        | 0      | no        | $0.15  | $2.50  | $30   |
| B    | gpt-4o                    | 1M / 0        | 0      | yes       | $0     | $2.50  | $30   |
| C    | gpt-4o                    | 1M / 0        | 500k   | no        | $1.875 | $2.50  | $30   |
| D    | mystery-model (no price)  | 1M / 0        | 0      | no        | $0 (?) | -      | -     |

Savings vs GPT-4 (priced calls A-C): $90 - $2.025 = $87.975 = model choice $82.50
(90 - 3 x 2.50) + routing $2.35 (A: 2.50 - 0.15) + prompt caching $0.625 (C: 500k at
$1.25 off) + cache hits $2.50 (B).
"""

from __future__ import annotations

import asyncio
import json
import random
import shutil
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer
from click.testing import CliRunner

from app.cli import main
from app.events.codec import EventCodec
from app.events.topics import ensure_topics
from app.metering.attribution import Identity
from app.metering.usage import build_usage_record, new_id
from app.pricing.catalog import PriceCatalog
from app.settings import Settings
from app.warehouse.clickhouse import MIGRATIONS_DIR, migrate
from app.warehouse.reports import MEASURES, USAGE, USAGE_BY_USER, Range, aggregate
from app.warehouse.rollups import after_migration, fed_by, rollups
from tests.integration.harness import private_day, serving_reports, sink_running

pytestmark = pytest.mark.integration

M = 1_000_000


def fixture_calls(day: datetime, tag: str) -> list[dict[str, Any]]:
    prices = PriceCatalog("gpt-4")

    def call(minute: int, user: str, feature: str, model: str, **kw: Any) -> dict[str, Any]:
        return build_usage_record(
            prices,
            Identity(f"{tag}-{user}", None, f"{tag}-{feature}", None),
            request_id=new_id("req_"),
            model=model,
            prompt_tokens=M,
            completion_tokens=0,
            provider="openai",
            ts=day + timedelta(hours=10, minutes=minute, seconds=20),
            **kw,
        )

    return [
        call(0, "alice", "chat", "gpt-4o-mini", model_requested="gpt-4o", explored=True),
        call(1, "alice", "chat", "gpt-4o", cache_hit=True),
        call(2, "bob", "search", "gpt-4o", cached_tokens=M // 2),
        call(3, "bob", "search", "mystery-model"),
    ]


def escalated_request(day: datetime, tag: str, minute: int) -> list[dict[str, Any]]:
    """One client request the router sent to economy, whose refused answer escalated to
    standard: two paid attempts (1M prompt tokens each), one request, one answer."""
    prices = PriceCatalog("gpt-4")
    request_id = new_id("req_")

    def attempt(number: int, model: str, tier: str, **kw: Any) -> dict[str, Any]:
        return build_usage_record(
            prices,
            Identity(f"{tag}-carol", None, f"{tag}-chat", None),
            request_id=request_id,
            model=model,
            prompt_tokens=M,
            completion_tokens=0,
            provider="openai",
            ts=day + timedelta(hours=10, minutes=minute, seconds=20 + number),
            model_requested="auto",
            requested_price_model="gpt-4-turbo",
            attempt=number,
            tier=tier,
            **kw,
        )

    return [
        attempt(1, "gpt-4o-mini", "economy", status="error", error_type="escalated_refused"),
        attempt(2, "gpt-4o", "standard", escalated=True),
    ]


async def produce(settings: Settings, topic: str, schema: str, records: list[dict]) -> None:
    codec = EventCodec()
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all")
    await producer.start()
    try:
        for record in records:
            key = record.get("user_id") or record.get("scope") or record["event_id"]
            await producer.send(
                settings.topic(topic), codec.encode(schema, record), key=key.encode()
            )
        await producer.flush()
    finally:
        await producer.stop()


def report_cli(port: int, window: dict[str, str], *args: str) -> str:
    """`tollgate report` over ``window`` through the reports server on ``port``: its stdout."""
    result = CliRunner().invoke(
        main,
        ["report", "--from", window["from"], "--to", window["to"], *args],
        env={"TOLLGATE_REPORTS_PORT": str(port)},
    )
    assert result.exit_code == 0, result.output
    return result.stdout


def decision(scope: str, spent_usd: str, limit_usd: str, state: str, day: datetime) -> dict:
    return {
        "event_id": new_id(),
        "ts": day + timedelta(hours=11),
        "schema_version": 2,
        "scope": scope,
        "state": state,
        "spent_usd_nanos": int(Decimal(spent_usd) * 10**9),
        "limit_usd_nanos": int(Decimal(limit_usd) * 10**9),
        "period": "month",
        "period_start": day.replace(day=1),
        "resets_at": datetime(2999, 1, 1, tzinfo=UTC),
        "counted_through": day + timedelta(hours=11),
        "threshold": None,
        "upgrade_url": None,
        "upgrade_prompt": None,
        "reason": "spend",
    }


def alert(day: datetime, kind: str) -> dict:
    at = day + timedelta(hours=10, minutes=2)
    return {
        "event_id": new_id(),
        "ts": at,
        "schema_version": 1,
        "alert_key": f"{kind}|feature:x",
        "kind": kind,
        "scope": "feature:x",
        "severity": "warning",
        "status": "firing",
        "score": 9.0,
        "expected": 1.0,
        "observed": 20.0,
        "unit": "usd",
        "window_seconds": 60,
        "first_seen": at,
        "last_seen": at,
        "message": "test",
        "details": {},
    }


async def test_every_report_on_a_hand_computed_fixture(
    kafka_settings: Settings, clickhouse: Any
) -> None:
    await ensure_topics(kafka_settings)
    migrate(clickhouse)
    day = private_day()
    tag = f"roi{random.randrange(10**6)}"
    calls = fixture_calls(day, tag)
    a, _b, c, _d = calls
    outcomes = [
        {
            "event_id": new_id(),
            "ts": day + timedelta(hours=10, minutes=5),
            "schema_version": 1,
            "request_id": r["request_id"],
            "session_id": None,
            "user_id": r["user_id"],
            "feature": r["feature"],
            "outcome": result,
            "kind": None,
            "value_usd_nanos": value,
            "metadata": {},
        }
        for r, result, value in (
            (a, "success", 600_000_000),  # $0.60 of value for $0.15 of spend
            (c, "success", 3_000_000_000),
            (c, "failure", None),
        )
    ]
    # a success linked to no call (probe R: its "(none)" row read "$0 per success")
    outcomes.append({**outcomes[0], "event_id": new_id(), "request_id": "nope", "feature": None})
    await produce(kafka_settings, "usage", "Usage", calls + calls[:2])  # with duplicates
    await produce(kafka_settings, "outcomes", "Outcome", outcomes)
    await produce(
        kafka_settings,
        "budget.decisions",
        "BudgetDecision",
        [
            decision(f"user:{tag}-alice", "4", "5", "warn", day),
            decision(f"feature:{tag}-gone", "1", "10", "open", day),
        ],
    )
    fired = alert(day, "cost_per_request")
    # its update, 20 s on: it became critical (an update of the same alert, not another one)
    update = {
        **fired,
        "event_id": new_id(),
        "ts": fired["ts"] + timedelta(seconds=20),
        "severity": "critical",
        "message": "now critical (fired as a warning at 10:02:00 UTC): test",
        "details": {"severity_raised_from": "warning"},
    }
    await produce(kafka_settings, "alerts", "Alert", [fired, update])

    window = {"from": day.isoformat(), "to": (day + timedelta(days=1)).isoformat()}
    async with serving_reports(
        kafka_settings, clickhouse, window, active_scope=lambda scope: not scope.endswith("-gone")
    ) as reports:
        http, get = reports.http, reports.get
        for _ in range(100):
            if (
                (await get("summary"))["requests"] == 4
                and (await get("outcomes"))["features"]
                and (await http.get("/v1/reports/budgets")).json()["scopes"]
            ):
                break
            await asyncio.sleep(0.3)

        summary = await get("summary")
        assert summary["requests"] == 4  # the duplicates were not counted
        assert summary["cost_usd"] == "2.025"
        assert summary["baseline_cost_usd"] == "90"
        assert summary["unpriced_requests"] == 1
        assert summary["cache_hits"] == 1 and summary["cache_hit_rate"] == 0.25
        assert summary["sentence"] == (
            "We processed 4 requests, would have cost $90.00 at GPT-4 rates, actually cost "
            "$2.02 — 97.8% savings. (1 request to models without a price is in neither "
            "amount.)"
        )

        savings = await get("savings")
        assert savings["savings_usd"] == "87.975"
        assert savings["decomposition"] == {
            "model_choice_usd": "82.5",
            "routing_usd": "2.35",
            "prompt_cache_usd": "0.625",
            "cache_usd": "2.5",
        }
        assert savings["cache"]["hits"] == 1
        assert savings["cache"]["savings_usd"] == "2.5"
        assert savings["cache"]["cached_prompt_tokens"] == M // 2
        assert savings["routing"]["downtiered"] == 1
        assert savings["routing"]["downtiered_share"] == pytest.approx(1 / 3, abs=1e-6)
        assert savings["routing"]["downtiered_with_outcome"] == 1
        assert savings["routing"]["downtiered_success_share"] == 1.0
        # the downtiered call was sent by exploration (its duplicate counted once)
        assert savings["routing"]["explored"] == 1
        assert savings["routing"]["explored_with_outcome"] == 1
        assert savings["routing"]["explored_success_share"] == 1.0

        by_feature = {r["feature"]: r for r in (await get("outcomes"))["features"]}
        chat, search = by_feature[f"{tag}-chat"], by_feature[f"{tag}-search"]
        assert (chat["cost_usd"], chat["successes"], chat["cost_per_success_usd"]) == (
            "0.15",
            1,
            "0.15",
        )
        assert (search["outcomes"], search["successes"], search["success_rate"]) == (2, 1, 0.5)
        assert search["cost_per_success_usd"] == "1.875"
        unlinked = by_feature["(none)"]
        assert (unlinked["requests"], unlinked["successes"]) == (0, 1)
        assert unlinked["cost_per_success_usd"] is None  # no spend to divide, not $0
        # ROI is (value - cost) / cost: $0.60 for $0.15 returns 3.00 (300 %), $3 for
        # $1.875 returns 0.60; value per dollar is value / cost
        assert (chat["value_usd"], chat["net_value_usd"], chat["roi"]) == (
            "0.6",
            "0.45",
            "3.00",
        )
        assert chat["value_per_usd"] == "4.00"
        assert (search["value_usd"], search["net_value_usd"], search["roi"]) == (
            "3",
            "1.125",
            "0.60",
        )

        users = (await get("breakdown", by="user", limit="5"))["rows"]
        assert [(r["user"], r["cost_usd"]) for r in users] == [
            (f"{tag}-bob", "1.875"),
            (f"{tag}-alice", "0.15"),
        ]
        # a page says what it leaves out (a newcomer probe: the top 20 of 55 users, or
        # 1,000 of 1,100, with nothing saying rows were missing)
        first = await get("breakdown", by="user", limit="1")
        assert [r["user"] for r in first["rows"]] == [f"{tag}-bob"]
        assert (first["more"], first["next_offset"]) == (True, 1)
        assert (first["others"]["cost_usd"], first["others"]["requests"]) == ("0.15", 2)
        assert first["total"]["cost_usd"] == summary["cost_usd"]
        rest = await get("breakdown", by="user", limit="1", offset="1")
        assert [r["user"] for r in rest["rows"]] == [f"{tag}-alice"]
        assert (rest["more"], rest["next_offset"]) == (False, None)
        assert rest["others"]["cost_usd"] == "1.875"
        models = {r["model"]: r for r in (await get("breakdown", by="model"))["rows"]}
        assert models["mystery-model"]["unpriced_requests"] == 1
        assert models["gpt-4o"]["cost_usd"] == "1.875"

        every = (await get("timeseries", interval="minute"))["points"]
        assert len(every) == 24 * 60, "every minute of the day, a quiet one at zero"
        assert every[0]["start"] == day.isoformat() and every[0]["cost_usd"] == "0"
        points = [p for p in every if p["requests"] or p["anomaly"]]
        assert [p["requests"] for p in points] == [1, 1, 1, 1]
        assert [p["anomaly"] for p in points] == [False, False, True, False]
        assert points[2]["alert_kinds"] == ["cost_per_request"]
        assert points[2]["alerts"] == 1, "an alert's update is not another alert"
        # the dashboard's list of recent alerts: the update too, latest first
        raised, recent = (await get("alerts"))["alerts"]
        assert raised["severity"] == "critical" and raised["message"].startswith("now critical")
        assert recent["kind"] == "cost_per_request" and recent["scope"] == "feature:x"
        assert recent["severity"] == "warning" and recent["message"] == "test"
        # a v1 alert (before incidents): its own page, not historical, no impact known
        assert (recent["incident_role"], recent["historical"]) == ("primary", False)
        assert recent["impact_usd_per_hour"] is None
        assert recent["ts"].startswith((day + timedelta(hours=10, minutes=2)).isoformat()[:16])

        scopes = {s["scope"]: s for s in (await http.get("/v1/reports/budgets")).json()["scopes"]}
        mine = {k: v for k, v in scopes.items() if tag in k}
        assert list(mine) == [f"user:{tag}-alice"]  # the removed cap is not listed
        assert mine[f"user:{tag}-alice"]["state"] == "warn"
        assert mine[f"user:{tag}-alice"]["used"] == 0.8

        # Edges of a range that cuts rollup buckets come from raw rows: exact either way.
        cut = {
            "from": (day + timedelta(hours=10, minutes=1, seconds=30)).isoformat(),
            "to": (day + timedelta(hours=10, minutes=2, seconds=30)).isoformat(),
        }
        cut_summary = (await http.get("/v1/reports/summary", params=cut)).json()
        assert (cut_summary["requests"], cut_summary["cost_usd"]) == (1, "1.875")

        for name, params, param in (
            ("breakdown", {"by": "colour"}, "by"),
            ("summary", {"from": "last tuesday"}, "from"),
            ("breakdown", {"limit": "lots"}, "limit"),
            ("breakdown", {"offset": "-1"}, "offset"),
            ("breakdown", {"offset": "99999999"}, "offset"),
            ("timeseries", {"interval": "fortnight"}, "interval"),
            ("savings", {"bogus": "1"}, "bogus"),
            ("summary", {"from": window["to"], "to": window["from"]}, "from"),
        ):
            bad = await http.get(f"/v1/reports/{name}", params={**window, **params})
            assert bad.status_code == 400, (name, params)
            assert bad.json()["error"]["param"] == param
            assert bad.json()["error"]["type"] == "invalid_request_error"

        # The CLI prints the same numbers (through the reports server).
        def cli(*args: str) -> str:
            return report_cli(reports.port, window, *args)

        text = await asyncio.to_thread(cli)
        assert text.splitlines()[0] == summary["sentence"]
        assert "routing to cheaper models" in text and "$2.35" in text
        as_json = json.loads(await asyncio.to_thread(cli, "--format", "json"))
        assert as_json["savings"]["decomposition"] == savings["decomposition"]
        as_csv = await asyncio.to_thread(cli, "--format", "csv", "--by", "user")
        assert as_csv.splitlines()[0].startswith("user,requests,")
        assert f"{tag}-bob,2,0,1.875,30,28.125" in as_csv
        assert f"{tag}-alice," in as_csv  # every row: csv is a spreadsheet's input
        top = await asyncio.to_thread(cli, "--format", "csv", "--by", "user", "--limit", "1")
        assert len(top.splitlines()) == 2 and f"{tag}-bob," in top
        table = await asyncio.to_thread(cli, "--by", "user", "--limit", "1")
        spend = table.split("Spend by user", 1)[1].split("Cost per successful outcome", 1)[0]
        assert "(all others)" in spend and f"{tag}-alice" not in spend, spend


async def test_an_escalated_request_is_one_request_whose_two_attempts_are_spend(
    kafka_settings: Settings, clickhouse: Any
) -> None:
    """Session 13's probe: 24 client requests were 31 in the reports, the escalated-away
    attempts counted as requests, errors and baseline. Hand-computed, one request:

    | attempt | served      | cost  | GPT-4 | asked (gpt-4-turbo) |
    |---------|-------------|-------|-------|---------------------|
    | 1       | gpt-4o-mini | $0.15 | -     | -                   | refused, escalated
    | 2       | gpt-4o      | $2.50 | $30   | $10                 | the answer

    A client without the router makes one call: baseline $30, savings $27.35 = model
    choice $20 (30 - 10) + routing $7.35 (10 - 2.50 - 0.15, the escalation's cost a loss).
    """
    await ensure_topics(kafka_settings)
    migrate(clickhouse)
    day = private_day()
    tag = f"esc{random.randrange(10**6)}"
    await produce(kafka_settings, "usage", "Usage", escalated_request(day, tag, minute=7))
    window = {"from": day.isoformat(), "to": (day + timedelta(days=1)).isoformat()}
    async with serving_reports(kafka_settings, clickhouse, window) as reports:
        http, get = reports.http, reports.get
        for _ in range(100):
            if (await get("summary"))["cost_usd"] == "2.65":
                break
            await asyncio.sleep(0.3)
        summary = await get("summary")
        assert (summary["requests"], summary["errors"]) == (1, 0)
        assert summary["cost_usd"] == "2.65"  # both attempts were paid
        assert summary["baseline_cost_usd"] == "30"
        savings = await get("savings")
        assert savings["requests"] == 1 and savings["savings_usd"] == "27.35"
        assert savings["decomposition"]["model_choice_usd"] == "20"
        assert savings["decomposition"]["routing_usd"] == "7.35"
        # the answer came cheaper than asked; the refused economy attempt is no saving
        assert savings["routing"]["downtiered"] == 1
        # what the escalations cost: attempts paid for answers nobody saw
        assert savings["routing"]["escalated"] == 1
        assert savings["routing"]["escalated_cost_usd"] == "0.15"
        (carol,) = (await get("breakdown", by="user"))["rows"]
        assert (carol["requests"], carol["errors"], carol["cost_usd"]) == (1, 0, "2.65")
        (chat,) = (await get("breakdown", by="feature"))["rows"]
        assert (chat["requests"], chat["cost_usd"]) == (1, "2.65")
        # an edge of the range read from raw rows counts the same
        cut = {
            "from": (day + timedelta(hours=10, minutes=7, seconds=1)).isoformat(),
            "to": (day + timedelta(hours=10, minutes=7, seconds=59)).isoformat(),
        }
        edge = (await http.get("/v1/reports/summary", params=cut)).json()
        assert (edge["requests"], edge["errors"], edge["cost_usd"]) == (1, 0, "2.65")
        assert edge["baseline_cost_usd"] == "30"


async def test_a_long_name_is_shortened_in_the_report_table_and_whole_in_json(
    kafka_settings: Settings, clickhouse: Any
) -> None:
    """A newcomer's probe: a user or feature may be named with 256 characters, and the
    table's first column took them all, so every row of that table was wider than any
    terminal. The table shortens such a name in its middle (its start and end stay, and a
    line says so); ``--format json`` keeps it whole."""
    await ensure_topics(kafka_settings)
    migrate(clickhouse)
    day = private_day()
    tag = f"long{random.randrange(10**6)}"
    user = f"{tag}-user-".ljust(251, "u") + "-end1"
    feature = f"{tag}-feat-".ljust(251, "f") + "-end2"
    assert len(user) == len(feature) == 256  # the longest an id may be
    call = build_usage_record(
        PriceCatalog("gpt-4"),
        Identity(user, None, feature, None),
        request_id=new_id("req_"),
        model="gpt-4o",
        prompt_tokens=M,
        completion_tokens=0,
        provider="openai",
        ts=day + timedelta(hours=10, seconds=20),
    )
    outcome = {
        "event_id": new_id(),
        "ts": day + timedelta(hours=10, minutes=5),
        "schema_version": 1,
        "request_id": call["request_id"],
        "session_id": None,
        "user_id": user,
        "feature": feature,
        "outcome": "success",
        "kind": None,
        "value_usd_nanos": None,
        "metadata": {},
    }
    scope = f"user:{user}"
    await produce(kafka_settings, "usage", "Usage", [call])
    await produce(kafka_settings, "outcomes", "Outcome", [outcome])
    await produce(
        kafka_settings,
        "budget.decisions",
        "BudgetDecision",
        [decision(scope, "2.5", "5", "warn", day)],
    )
    window = {"from": day.isoformat(), "to": (day + timedelta(days=1)).isoformat()}
    async with serving_reports(
        kafka_settings, clickhouse, window, active_scope=lambda s: tag in s
    ) as reports:

        def cli(*args: str) -> str:
            return report_cli(reports.port, window, *args)

        for _ in range(100):  # until the sink has written all three
            got = json.loads(await asyncio.to_thread(cli, "--format", "json", "--by", "user"))
            if got["breakdown"]["rows"] and got["outcomes"] and got["budgets"]:
                break
            await asyncio.sleep(0.3)
        assert [row["user"] for row in got["breakdown"]["rows"]] == [user]  # whole in json
        assert [row["feature"] for row in got["outcomes"]] == [feature]
        assert [row["scope"] for row in got["budgets"]] == [scope]

        for by, name in (("user", user), ("feature", feature)):
            text = await asyncio.to_thread(cli, "--by", by)
            tables = text.split(f"Spend by {by}", 1)[1]
            assert name not in tables
            for line in tables.splitlines():
                assert len(line) <= 120, f"{len(line)} characters wide: {line}"
            rows = [line for line in tables.splitlines() if name[:12] in line]
            assert len(rows) == 2, tables  # its breakdown row, and its outcome or budget row
            for row in rows:
                assert "…" in row and name[-4:] in row, row  # shortened; its end stays
            assert "--format json" in tables, "the table says where the whole names are"


async def test_rollups_equal_raw_events(kafka_settings: Settings, clickhouse: Any) -> None:
    """The materialized views and the reports' raw-edge SQL give the same measures."""
    await ensure_topics(kafka_settings)
    migrate(clickhouse)
    day = private_day()
    tag = f"rr{random.randrange(10**6)}"
    calls = fixture_calls(day, tag) + escalated_request(day, tag, minute=4)
    # The same calls yesterday: the per-user-minute rollup keeps only 3 days (TTL).
    yesterday = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    yesterday -= timedelta(days=1)
    recent_calls = fixture_calls(yesterday, tag) + escalated_request(yesterday, tag, 4)
    await produce(kafka_settings, "usage", "Usage", calls + recent_calls)
    whole = Range(day, day + timedelta(days=1))  # aligned: rollups only
    async with sink_running(kafka_settings, clickhouse):
        recent_day = Range(yesterday, yesterday + timedelta(days=1))
        for _ in range(100):
            if (
                aggregate(clickhouse, whole, USAGE)[0]["requests"] >= 5
                and sum(
                    r["requests"]
                    for r in aggregate(clickhouse, recent_day, USAGE_BY_USER, ("user",))
                    if r["user"].startswith(tag)
                )
                >= 5
            ):
                break
            await asyncio.sleep(0.3)
    # A range that starts and ends one millisecond off the minute reads (almost) only raw rows.
    skewed = Range(day + timedelta(milliseconds=1), day + timedelta(days=1, milliseconds=-1))
    # Hours, minutes and raw seconds: the same numbers whichever tables serve the range.
    for rollup in (USAGE, USAGE_BY_USER):
        from_rollups = aggregate(clickhouse, whole, rollup)[0]
        from_raw = aggregate(clickhouse, skewed, rollup)[0]
        assert from_rollups == from_raw
        assert from_rollups["requests"] == 5 and set(from_rollups) == set(MEASURES)

    def mine(window: Range, now: datetime) -> dict[str, dict[str, Any]]:
        rows = aggregate(clickhouse, window, USAGE_BY_USER, ("user",), now=now)
        return {r["user"]: r for r in rows if r["user"].startswith(tag)}

    # Minutes inside an hour: the per-user-minute rollup (recent) or raw rows (`now` a month
    # later, when that rollup no longer counts as complete) must agree.
    minute_cut = Range(yesterday + timedelta(hours=10, minutes=1), yesterday + timedelta(hours=11))
    recent = mine(minute_cut, datetime.now(UTC))
    assert recent == mine(minute_cut, datetime.now(UTC) + timedelta(days=30))
    assert sum(r["requests"] for r in recent.values()) == 4


async def test_hours_stored_before_the_client_requests_migration_are_counted_again(
    kafka_settings: Settings, clickhouse: Any, tmp_path: Path
) -> None:
    """Migration 011 changes what the usage views count; the rollups of hours already stored
    with an escalation are rebuilt when it is applied, so old and new hours agree. Here the
    views run their pre-011 queries while an escalated request is stored, as on an install
    upgraded with such rows."""
    await ensure_topics(kafka_settings)
    migrate(clickhouse)
    for path in sorted(MIGRATIONS_DIR.glob("[0-9][0-9][0-9]_*.sql")):
        if path.stem < "011":
            shutil.copy(path, tmp_path)
    before = {r.view: r.query for r in rollups(tmp_path)}
    now = {r.view: r.query for r in rollups()}
    # the views 011 changed (not those of later migrations, which it predates)
    views = [r.view for r in fed_by("usage_events") if r.source == "usage_events"]
    views = [v for v in views if v in before]
    assert len(views) == 3 and all(before[v] != now[v] for v in views)
    tag = f"mig{random.randrange(10**6)}"
    hour = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(hours=3)

    def user_rollup() -> tuple[int, int, Decimal]:
        (row,) = clickhouse.query(
            "SELECT sum(requests), sum(errors), sum(cost_usd) FROM usage_user_hour "
            "WHERE user_id = %(u)s",
            parameters={"u": f"{tag}-carol"},
        ).result_rows
        return int(row[0] or 0), int(row[1] or 0), Decimal(row[2] or 0)

    for view in views:
        await asyncio.to_thread(
            clickhouse.command, f"ALTER TABLE {view} MODIFY QUERY {before[view]}"
        )
    try:
        await produce(
            kafka_settings, "usage", "Usage", escalated_request(hour - timedelta(hours=10), tag, 3)
        )
        async with sink_running(kafka_settings, clickhouse):
            for _ in range(100):
                if (await asyncio.to_thread(user_rollup))[0] == 2:
                    break
                await asyncio.sleep(0.3)
    finally:
        for view in views:
            await asyncio.to_thread(
                clickhouse.command, f"ALTER TABLE {view} MODIFY QUERY {now[view]}"
            )
    assert user_rollup() == (2, 1, Decimal("2.65"))  # the attempts counted as requests

    assert await asyncio.to_thread(after_migration, clickhouse, "011_client_requests") >= 1
    assert user_rollup() == (1, 0, Decimal("2.65"))
    # Again: the same numbers (hours older than the per-user minutes' 3-day TTL cannot be
    # checked against it, so those are rebuilt each time: the same rows again).
    await asyncio.to_thread(after_migration, clickhouse, "011_client_requests")
    assert user_rollup() == (1, 0, Decimal("2.65"))


async def test_budget_threshold_alerts_are_listed_with_their_kind(
    kafka_settings: Settings, clickhouse: Any
) -> None:
    """Probe 54 (L5): the spend worker's ``budget_threshold`` alerts were stored but left out
    of /v1/reports/alerts and the time series, so without a webhook target a newcomer saw a
    crossed threshold nowhere. They are listed, named by kind (``kind=`` filters), and
    counted per point as ``budget_thresholds`` apart from the anomaly flag."""
    from app.budgets.policy import Policy
    from app.budgets.spend import threshold_alert

    await ensure_topics(kafka_settings)
    migrate(clickhouse)
    day = private_day()
    tag = f"thr{random.randrange(10**6)}"
    scope = f"user:{tag}"
    policy = Policy(scope, "month", 5 * 10**9)
    crossed = decision(scope, "4", "5", "warn", day)  # 80 %, at 11:00
    budget = {
        **threshold_alert(scope, policy, crossed, 0.8, day + timedelta(hours=11)),
        "schema_version": 1,
    }
    anomaly = alert(day, "cost_per_request")  # at 10:02
    await produce(kafka_settings, "alerts", "Alert", [anomaly, budget])

    window = {"from": day.isoformat(), "to": (day + timedelta(days=1)).isoformat()}
    async with serving_reports(kafka_settings, clickhouse, window) as reports:
        http, get = reports.http, reports.get
        for _ in range(100):
            if len((await get("alerts", kind="cost_per_request"))["alerts"]) == 1:
                break
            await asyncio.sleep(0.3)
        listed = (await get("alerts"))["alerts"]
        assert [(a["kind"], a["scope"]) for a in listed] == [
            ("budget_threshold", scope),
            ("cost_per_request", "feature:x"),
        ]
        assert listed[0]["severity"] == "warning"
        assert "80% threshold" in listed[0]["message"]
        thresholds = (await get("alerts", kind="budget_threshold"))["alerts"]
        assert [a["scope"] for a in thresholds] == [scope]
        anomalies = (await get("alerts", kind="anomaly"))["alerts"]
        assert [a["kind"] for a in anomalies] == ["cost_per_request"]

        points = (await get("timeseries", interval="hour"))["points"]
        ten, eleven = points[10], points[11]
        assert (ten["anomaly"], ten["alerts"], ten["budget_thresholds"]) == (True, 1, 0)
        assert (eleven["anomaly"], eleven["alerts"], eleven["alert_kinds"]) == (False, 0, [])
        assert eleven["budget_thresholds"] == 1

        bad = await http.get("/v1/reports/alerts", params={**window, "kind": "a\nb"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "kind"
        # A typo listed nothing, as if no alert had fired (probe 46): a 400 listing the kinds.
        typo = await http.get("/v1/reports/alerts", params={**window, "kind": "budget_treshold"})
        assert typo.status_code == 400 and typo.json()["error"]["param"] == "kind"
        assert "budget_threshold" in typo.json()["error"]["message"]


async def test_an_alerts_page_says_what_it_leaves_out_and_pages_on(
    kafka_settings: Settings, clickhouse: Any
) -> None:
    """Probe 56 (F2): /v1/reports/alerts cut the list at `limit` (20 by default) without a
    word (42 alerts listed as 20, keys only alerts, from, to) and refused `offset`, so past
    1,000 alerts in a range the older ones could not be listed at all. A page says whether
    more exist (`more`, `next_offset`, `total`, as a breakdown page does) and `offset` pages
    on: the pages are the whole list, each alert once, also where alerts share a time and a
    kind (the order is total)."""
    await ensure_topics(kafka_settings)
    migrate(clickhouse)
    day = private_day()
    at = day + timedelta(hours=9)
    fired = [
        {**alert(day, "volume_spike"), "ts": at, "scope": f"feature:same-{i}"} for i in range(4)
    ]
    fired += [alert(day, "cost_per_request"), alert(day + timedelta(hours=1), "tier_mix")]
    await produce(kafka_settings, "alerts", "Alert", fired)

    window = {"from": day.isoformat(), "to": (day + timedelta(days=1)).isoformat()}
    async with serving_reports(kafka_settings, clickhouse, window) as reports:
        get = reports.get
        for _ in range(100):
            if len((await get("alerts"))["alerts"]) == len(fired):
                break
            await asyncio.sleep(0.3)
        whole = await get("alerts")
        assert len(whole["alerts"]) == 6
        assert (whole["more"], whole["next_offset"], whole["total"]) == (False, None, 6)
        assert whole["offset"] == 0

        first = await get("alerts", limit="4")
        assert len(first["alerts"]) == 4
        assert (first["more"], first["next_offset"], first["total"]) == (True, 4, 6)
        pages, offset = [], 0
        while offset is not None:
            page = await get("alerts", limit="3", offset=str(offset))
            assert page["offset"] == offset and page["total"] == 6
            pages += page["alerts"]
            offset = page["next_offset"]
        assert pages == whole["alerts"], "the pages are the list, each alert once, in order"
        assert sorted(a["scope"] for a in pages if a["kind"] == "volume_spike") == [
            f"feature:same-{i}" for i in range(4)
        ]
        past = await get("alerts", offset="6")
        assert (past["alerts"], past["more"], past["next_offset"]) == ([], False, None)

        spikes = await get("alerts", kind="volume_spike", limit="3")
        assert (len(spikes["alerts"]), spikes["more"], spikes["total"]) == (3, True, 4)
        anomalies = await get("alerts", kind="anomaly", offset="5")
        assert (len(anomalies["alerts"]), anomalies["more"], anomalies["total"]) == (1, False, 6)

        bad = await reports.http.get("/v1/reports/alerts", params={**window, "offset": "-1"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "offset"
