"""Spend by team, on the warehouse (chdb, or a server).

Every Usage event carries a team (attribution: a header, the body or the API key's), teams
have budget caps (``team:<id>``), and ``usage_events`` stores it; but a breakdown could be by
model, user, feature, tier or provider only, so a FinOps user could not see spend by team
(a newcomer probe). ``by=team`` reads its own rollups (``usage_team_minute``, summed into
``usage_team_hour``; refused calls ``refused_team_minute``: migration 013) for whole
buckets and raw events at the edges of a range, as ``by=user`` does; calls without a team
are ``(none)``.
"""

from __future__ import annotations

import asyncio
import shutil
import uuid
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web
from click.testing import CliRunner

from app.cli import main
from app.http.reports_api import build_report, create_reports_app
from app.warehouse import rollups as rollups_module
from app.warehouse.clickhouse import MIGRATIONS_DIR, migrate
from app.warehouse.reports import MEASURES, USAGE_BY_TEAM, Range, aggregate, breakdown_page, summary
from app.warehouse.rollups import after_migration
from tests.integration.harness import free_port, private_day

pytestmark = pytest.mark.integration

USAGE_COLUMNS = ["event_id", "ts", "request_id", "user_id", "feature", "team", "source",
                 "provider", "model_served", "baseline_model", "prompt_tokens", "cost_usd",
                 "baseline_cost_usd", "status", "error_type", "http_status"]  # fmt: skip
REQUEST_COLUMNS = ["event_id", "ts", "request_id", "user_id", "feature", "team", "endpoint",
                   "model_requested", "tier", "status", "reason", "blocked_scope"]  # fmt: skip
SPEND = ("requests", "errors", "cost_usd", "baseline_cost_usd", "savings_usd", "prompt_tokens",
         "completion_tokens", "unpriced_requests", "refused")  # fmt: skip


def _store(clickhouse: Any, day: datetime, tag: str) -> dict[str, str]:
    """Usage of two teams and of calls without one, in several minutes and two hours, with
    amounts exact to the nano-dollar; and calls budget caps refused, with and without a team."""
    at = day + timedelta(hours=10, seconds=20)
    minute = timedelta(minutes=1)
    teams = {"red": f"{tag}-red", "blue": f"{tag}-blue"}

    def usage(when: datetime, team: str | None, cost: str, **kw: Any) -> list[Any]:
        row = {"status": "ok", "error_type": None, "http_status": 200, "tokens": 1000,
               "request_id": uuid.uuid4().hex} | kw  # fmt: skip
        return [uuid.uuid4().hex, when, row["request_id"], f"{tag}-u", f"{tag}-chat", team,
                "gateway", "openai", "gpt-4o", "gpt-4", row["tokens"], Decimal(cost),
                Decimal(cost) * 3, row["status"], row["error_type"],
                row["http_status"]]  # fmt: skip

    escalated = uuid.uuid4().hex
    clickhouse.insert(
        "usage_events",
        [
            usage(at, teams["red"], "0.123456789"),
            usage(at + minute, teams["red"], "0.000000001", tokens=7),
            usage(at + 2 * minute, teams["red"], "1.000000007", status="error", http_status=500),
            usage(at + 3 * minute, teams["blue"], "0.333333333"),
            usage(at + 3 * minute + timedelta(seconds=5), None, "0.010000003"),
            # an escalated request: two paid attempts, one request (migration 011)
            usage(at + 4 * minute, teams["blue"], "0.200000001", status="error",
                  error_type="escalated_refused", request_id=escalated),
            usage(at + 4 * minute + timedelta(seconds=1), teams["blue"], "0.400000002",
                  request_id=escalated),
            usage(at + timedelta(hours=1), None, "0.050000005"),
            usage(at + timedelta(hours=1, minutes=1), teams["red"], "0.999999999"),
        ],
        column_names=USAGE_COLUMNS,
    )  # fmt: skip

    def refused(when: datetime, team: str | None) -> list[Any]:
        return [uuid.uuid4().hex, when, uuid.uuid4().hex, f"{tag}-u", f"{tag}-chat", team,
                "/v1/chat/completions", "gpt-4o", "standard", "blocked", "budget_exceeded",
                f"team:{team}" if team else f"user:{tag}-u"]  # fmt: skip

    clickhouse.insert(
        "request_events",
        [
            refused(at + 5 * minute, teams["red"]),
            refused(at + 6 * minute, teams["red"]),
            refused(at + 6 * minute, None),
            # a call refused for another reason (a 400) is not refused by a cap
            [uuid.uuid4().hex, at + 7 * minute, uuid.uuid4().hex, f"{tag}-u", f"{tag}-chat",
             teams["blue"], "/v1/chat/completions", "gpt-4o", "standard", "rejected",
             "invalid_request_error", None],
        ],
        column_names=REQUEST_COLUMNS,
    )  # fmt: skip
    return teams


def _sums(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The spend fields of the rows added up (money as exact decimals)."""
    return {
        k: sum((Decimal(r[k]) if k.endswith("_usd") else r[k] for r in rows), start=Decimal(0))
        for k in SPEND
    }


def _spend(fields: dict[str, Any]) -> dict[str, Any]:
    return {k: Decimal(fields[k]) if k.endswith("_usd") else fields[k] for k in SPEND}


def test_team_rows_sum_to_the_summary_to_the_nano_dollar(clickhouse: Any) -> None:
    migrate(clickhouse)
    day = private_day()
    tag = uuid.uuid4().hex[:8]
    teams = _store(clickhouse, day, tag)
    at = day + timedelta(hours=10, seconds=20)
    whole = Range(day, day + timedelta(days=1))  # aligned: rollups only
    # the first and last minutes cut (raw events there): 10:01:25 (red's 10:01:20 out) to
    # 11:01:25 (red's 11:01:20 in)
    cut = Range(at + timedelta(minutes=1, seconds=5), at + timedelta(hours=1, minutes=1, seconds=5))

    for window in (whole, cut):
        page = breakdown_page(clickhouse, window, "team", limit=1000)
        assert not page["more"] and page["next_offset"] is None
        total = summary(clickhouse, window).to_json()
        expected = {
            "requests": total["requests"], "errors": total["errors"],
            "cost_usd": Decimal(total["cost_usd"]),
            "baseline_cost_usd": Decimal(total["baseline_cost_usd"]),
            "savings_usd": Decimal(total["savings_usd"]),
            "unpriced_requests": total["unpriced_requests"], "refused": total["refused"],
        }  # fmt: skip
        rows = _sums(page["rows"])
        assert {k: rows[k] for k in expected} == expected, window
        assert _spend(page["total"]) == rows
        assert _spend(page["others"]) == dict.fromkeys(SPEND, 0)

    mine = {r["team"]: r for r in breakdown_page(clickhouse, whole, "team", limit=1000)["rows"]}
    red, blue, none = mine[teams["red"]], mine[teams["blue"]], mine["(none)"]
    assert (red["requests"], red["errors"], red["refused"]) == (4, 1, 2)
    assert red["cost_usd"] == "2.123456796"
    assert (blue["requests"], blue["errors"], blue["refused"]) == (2, 0, 0)  # a 400 is not one
    assert blue["cost_usd"] == "0.933333336"  # both attempts paid
    assert (none["requests"], none["cost_usd"], none["refused"]) == (2, "0.060000008", 1)
    assert red["prompt_tokens"] == 3007

    in_cut = {r["team"]: r for r in breakdown_page(clickhouse, cut, "team", limit=1000)["rows"]}
    red = in_cut[teams["red"]]
    assert (red["requests"], red["cost_usd"], red["refused"]) == (2, "2.000000006", 2)
    assert (in_cut["(none)"]["requests"], in_cut["(none)"]["refused"]) == (2, 1)

    # Rollups only, or raw rows only (a range one millisecond off the minute): the same.
    skewed = Range(day + timedelta(milliseconds=1), day + timedelta(days=1, milliseconds=-1))
    from_rollups = aggregate(clickhouse, whole, USAGE_BY_TEAM, ("team",), refused=True)
    assert from_rollups == aggregate(clickhouse, skewed, USAGE_BY_TEAM, ("team",), refused=True)
    assert set(from_rollups[0]) == {"team", *MEASURES, "refused"}
    (held,) = clickhouse.query(
        "SELECT sum(requests), sum(cost_usd) FROM usage_team_hour WHERE team = %(t)s",
        parameters={"t": teams["red"]},
    ).result_rows
    assert (held[0], held[1]) == (4, Decimal("2.123456796"))


def test_team_pages_say_what_they_leave_out(clickhouse: Any) -> None:
    migrate(clickhouse)
    day = private_day()
    tag = uuid.uuid4().hex[:8]
    teams = _store(clickhouse, day, tag)
    query = {"from": day.isoformat(), "to": (day + timedelta(days=1)).isoformat(), "by": "team"}
    first = build_report(clickhouse, "breakdown", {**query, "limit": "1"})
    assert first["by"] == "team" and first["more"] and first["next_offset"] == 1
    assert [r["team"] for r in first["rows"]] == [teams["red"]]  # the biggest spender
    assert first["others"]["cost_usd"] == "0.993333344" and first["others"]["refused"] == 1
    assert first["total"]["requests"] == 8 and first["total"]["refused"] == 3
    rest = build_report(clickhouse, "breakdown", {**query, "limit": "2", "offset": "1"})
    assert [r["team"] for r in rest["rows"]] == [teams["blue"], "(none)"]
    assert not rest["more"] and rest["next_offset"] is None
    assert rest["others"]["cost_usd"] == "2.123456796"


def test_team_rollups_of_events_stored_before_migration_013(clickhouse: Any) -> None:
    """The rows stored before the team rollups existed are counted when 013 is applied."""
    migrate(clickhouse)
    day = private_day()
    tag = uuid.uuid4().hex[:8]
    teams = _store(clickhouse, day, tag)
    whole = Range(day, day + timedelta(days=1))
    before = breakdown_page(clickhouse, whole, "team", limit=1000)
    bounds = {"lo": day, "hi": day + timedelta(days=1)}
    for table, column in (("usage_team_minute", "minute"), ("usage_team_hour", "hour"),
                          ("refused_team_minute", "minute")):  # fmt: skip
        clickhouse.command(
            f"DELETE FROM {table} WHERE {column} >= %(lo)s AND {column} < %(hi)s",
            parameters=bounds,
        )
    emptied = breakdown_page(clickhouse, whole, "team", limit=1000)
    assert teams["red"] not in {r["team"] for r in emptied["rows"]}
    assert after_migration(clickhouse, "013_team_rollups") >= 2  # 10:00 and 11:00
    assert breakdown_page(clickhouse, whole, "team", limit=1000) == before
    # Again: nothing changes (complete hours are left alone).
    after_migration(clickhouse, "013_team_rollups")
    assert breakdown_page(clickhouse, whole, "team", limit=1000) == before


def test_a_rebuild_leaves_out_rollups_of_migrations_not_applied_yet(
    clickhouse: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The views are read from every migration file, but an install upgraded from before 011
    rebuilds 011's hours before 013 has created the team rollups: a view whose table does not
    exist yet (here one of a migration 999 never applied) is left out, not a failed upgrade."""
    migrate(clickhouse)
    for path in MIGRATIONS_DIR.glob("[0-9][0-9][0-9]_*.sql"):
        shutil.copy(path, tmp_path)
    (tmp_path / "999_ghost.sql").write_text(
        "CREATE TABLE IF NOT EXISTS ghost_minute (minute DateTime('UTC'), requests UInt64)\n"
        "ENGINE = SummingMergeTree ORDER BY minute;\n\n"
        "CREATE MATERIALIZED VIEW IF NOT EXISTS ghost_minute_mv TO ghost_minute AS\n"
        "SELECT toStartOfMinute(ts) AS minute, count() AS requests FROM usage_events\n"
        "GROUP BY minute;\n"
    )
    every = rollups_module.rollups
    monkeypatch.setattr(rollups_module, "rollups", lambda directory=None: every(tmp_path))
    assert "ghost_minute_mv" in {r.view for r in rollups_module.fed_by("usage_events")}
    day = private_day()
    teams = _store(clickhouse, day, uuid.uuid4().hex[:8])
    hour = day + timedelta(hours=10)
    clickhouse.command(
        "DELETE FROM usage_team_minute WHERE minute >= %(lo)s AND minute < %(hi)s",
        parameters={"lo": hour, "hi": hour + timedelta(hours=1)},
    )
    assert rollups_module.rebuild(clickhouse, "usage_events", [hour]) == 1
    (held,) = clickhouse.query(
        "SELECT sum(requests), sum(cost_usd) FROM usage_team_minute WHERE team = %(t)s",
        parameters={"t": teams["red"]},
    ).result_rows
    assert (held[0], held[1]) == (4, Decimal("2.123456796"))


async def test_spend_by_team_over_http_and_the_cli(clickhouse: Any) -> None:
    migrate(clickhouse)
    day = private_day()
    teams = await asyncio.to_thread(_store, clickhouse, day, uuid.uuid4().hex[:8])
    window = {"from": day.isoformat(), "to": (day + timedelta(days=1)).isoformat()}
    port = free_port()
    runner = web.AppRunner(create_reports_app(clickhouse))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
            answer = await http.get("/v1/reports/breakdown", params={**window, "by": "team"})
            assert answer.status_code == 200, answer.text
            page = answer.json()
            assert [r["team"] for r in page["rows"]] == [teams["red"], teams["blue"], "(none)"]
            assert page["total"]["cost_usd"] == "3.11679014"

        def cli(*args: str) -> str:
            result = CliRunner().invoke(
                main,
                ["report", "--from", window["from"], "--to", window["to"], *args],
                env={"TOLLGATE_REPORTS_PORT": str(port)},
            )
            assert result.exit_code == 0, result.output
            return str(result.stdout)

        rows = (await asyncio.to_thread(cli, "--by", "team", "--format", "csv")).splitlines()
        assert rows[0].startswith("team,requests,errors,cost_usd,") and len(rows) == 4
        assert rows[1].startswith(f"{teams['red']},4,1,2.123456796,") and rows[1].endswith(",2")
        assert rows[3].startswith("(none),2,0,0.060000008,")
        table = await asyncio.to_thread(cli, "--by", "team", "--limit", "1")
        spend = table.split("Spend by team", 1)[1].split("Cost per successful outcome", 1)[0]
        assert teams["red"] in spend and "(all others)" in spend and teams["blue"] not in spend
    finally:
        await runner.cleanup()
