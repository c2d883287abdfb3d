"""Calls budget caps refused (402) in the reports, on the warehouse (chdb, or a server).

A newcomer probe found 402-refused calls in no report: not requests (nothing was served),
not errors. Each is a blocked Request event in ``request_events``; the summary, breakdowns
and time series now count them as ``refused`` (rollup ``refused_minute``, migration 012),
under the model asked for, with no provider. A call refused for another reason (a 400) is
not one.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest

from app.warehouse.clickhouse import migrate
from app.warehouse.reports import Range, breakdown_page, summary, timeseries
from app.warehouse.rollups import after_migration
from tests.integration.harness import private_day

pytestmark = pytest.mark.integration

REQUEST_COLUMNS = ["event_id", "ts", "request_id", "user_id", "feature", "endpoint",
                   "model_requested", "tier", "status", "reason", "blocked_scope", "attempt"]  # fmt: skip
USAGE_COLUMNS = ["event_id", "ts", "request_id", "user_id", "feature", "source", "provider",
                 "model_served", "baseline_model", "cost_usd", "baseline_cost_usd", "status",
                 "http_status"]  # fmt: skip


def test_calls_refused_by_a_budget_cap_are_counted_as_refused(clickhouse: Any) -> None:
    migrate(clickhouse)
    day = private_day()
    tag = uuid.uuid4().hex[:8]
    alice, bob, carol, chat = f"{tag}-alice", f"{tag}-bob", f"{tag}-carol", f"{tag}-chat"
    at = day + timedelta(hours=10, seconds=20)
    minute = timedelta(minutes=1)
    served = f"{tag}-served"
    clickhouse.insert(
        "usage_events",
        [[uuid.uuid4().hex, at, served, alice, chat, "gateway", "openai", "gpt-4o", "gpt-4",
          Decimal("0.10"), Decimal("1"), "ok", 200]],
        column_names=USAGE_COLUMNS,
    )  # fmt: skip

    def request(
        when: datetime, user: str, model: str, status: str, reason: str | None = None,
        attempt: int = 1, request_id: str | None = None,
    ) -> list[Any]:  # fmt: skip
        scope = f"user:{user}" if status == "blocked" else None
        tier = None if model == "auto" else "standard"
        return [uuid.uuid4().hex, when, request_id or uuid.uuid4().hex, user, chat,
                "/v1/chat/completions", model, tier, status, reason, scope, attempt]  # fmt: skip

    clickhouse.insert(
        "request_events",
        [
            request(at, alice, "gpt-4o", "accepted", request_id=served),  # served: not refused
            request(at + minute, alice, "gpt-4o", "blocked", "budget_exceeded"),
            request(at + 2 * minute, alice, "gpt-4o", "blocked", "budget_exceeded"),
            request(at + 3 * minute, bob, "auto", "blocked", "budget_exceeded"),  # only refused
            request(at + 4 * minute, carol, "gpt-4o", "rejected", "invalid_request_error"),
            # an escalation refused: its first answer was never seen, the client got a 402
            request(at + 5 * minute, alice, "gpt-4o", "blocked", "budget_exceeded", attempt=2),
        ],
        column_names=REQUEST_COLUMNS,
    )
    whole = Range(day, day + timedelta(days=1))

    total = summary(clickhouse, whole).to_json()
    assert (total["requests"], total["errors"], total["refused"]) == (1, 0, 4), total
    # a range whose first and last minutes are cut (raw rows there): 10:02:20 and 10:03:20
    cut = Range(at + minute + timedelta(seconds=30), at + 3 * minute + timedelta(seconds=10))
    assert summary(clickhouse, cut).to_json()["refused"] == 2

    users = breakdown_page(clickhouse, whole, "user", limit=1000)
    mine = {r["user"]: r for r in users["rows"] if r["user"].startswith(tag)}
    assert (mine[alice]["requests"], mine[alice]["refused"]) == (1, 3)
    assert (mine[bob]["requests"], mine[bob]["cost_usd"], mine[bob]["refused"]) == (0, "0", 1)
    assert carol not in mine  # a 400 is not a refusal
    assert users["total"]["refused"] == 4
    first = breakdown_page(clickhouse, whole, "user", limit=1)
    assert first["rows"][0]["user"] == alice and first["others"]["refused"] == 1

    models = {r["model"]: r for r in breakdown_page(clickhouse, whole, "model")["rows"]}
    assert (models["gpt-4o"]["refused"], models["auto"]["refused"]) == (3, 1)
    providers = {r["provider"]: r for r in breakdown_page(clickhouse, whole, "provider")["rows"]}
    assert (providers["openai"]["refused"], providers["(none)"]["refused"]) == (0, 4)

    hours = {p["start"]: p for p in timeseries(clickhouse, whole, "hour")}
    assert hours[(day + timedelta(hours=10)).isoformat()]["refused"] == 4
    assert hours[(day + timedelta(hours=11)).isoformat()]["refused"] == 0

    # Blocked events stored before migration 012 are counted once it is applied.
    clickhouse.command(
        "DELETE FROM refused_minute WHERE minute >= %(lo)s AND minute < %(hi)s",
        parameters={"lo": day, "hi": day + timedelta(days=1)},
    )
    assert summary(clickhouse, whole).refused == 0
    assert after_migration(clickhouse, "012_refused_calls") >= 1
    assert summary(clickhouse, whole).refused == 4
