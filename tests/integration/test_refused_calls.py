"""Calls budget caps refused (402) in the reports, on the warehouse (chdb, or a server).

A newcomer probe found 402-refused calls in no report: not requests (nothing was served),
not errors. Each is a blocked Request event in ``request_events``; the summary, breakdowns
and time series now count them as ``refused`` (rollup ``refused_minute``, migration 012),
under the model asked for, with no provider. A call refused for another reason (a 400) is
not one.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import httpx
import openai
import pytest

from agents.sink import ClickHouseSink
from app.events.topics import ensure_topics
from app.settings import Settings
from app.warehouse.clickhouse import ReconnectingClient, migrate
from app.warehouse.reports import Range, breakdown_page, summary, timeseries
from app.warehouse.rollups import after_migration
from tests.integration.harness import private_day, running_stack

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


def test_a_402_from_the_dispatcher_reaches_the_reports_as_refused(
    kafka_settings: Settings, clickhouse: Any
) -> None:
    """The whole way: a capped user's call answered 402 through the SDK, its blocked Request
    event through Kafka and the sink into the warehouse, and the user's row counting it."""
    asyncio.run(ensure_topics(kafka_settings))
    migrate(clickhouse)
    user = f"capped-{uuid.uuid4().hex[:8]}"
    started = datetime.now(UTC) - timedelta(minutes=1)
    with running_stack(kafka_settings) as stack:
        cap = {"period": "month", "limit_usd": "0.000001"}  # below any call's prompt
        assert httpx.put(f"{stack.url}/v1/budgets/user:{user}", json=cap).status_code == 200
        client = openai.OpenAI(base_url=f"{stack.url}/v1", api_key="unused", max_retries=0)
        refused = 0
        deadline = time.monotonic() + 30
        while refused < 2 and time.monotonic() < deadline:  # until the cap is read
            try:
                client.chat.completions.create(
                    model="gpt-4o", messages=[{"role": "user", "content": "hello"}], user=user
                )
            except openai.APIStatusError as exc:
                assert exc.status_code == 402, exc
                refused += 1
            else:
                time.sleep(0.2)
        assert refused == 2

    async def sink_until_counted() -> dict[str, Any]:
        client = ReconnectingClient(lambda: clickhouse)
        sink = ClickHouseSink(kafka_settings, client, batch_wait_s=0.3)
        stop = asyncio.Event()
        task = asyncio.create_task(sink.run(stop))
        try:
            for _ in range(100):
                window = Range(started, datetime.now(UTC) + timedelta(minutes=1))
                page = await asyncio.to_thread(breakdown_page, clickhouse, window, "user", 1000)
                rows = [r for r in page["rows"] if r["user"] == user]
                if rows and rows[0]["refused"] >= 2:
                    return rows[0]
                await asyncio.sleep(0.3)
            raise AssertionError(f"the refused calls never reached the reports: {rows}")
        finally:
            stop.set()
            await task

    row = asyncio.run(sink_until_counted())
    # refused, not errors (calls served before the dispatcher read the cap are requests)
    assert row["refused"] == 2 and row["errors"] == 0, row
