"""Reports on the warehouse: Kafka → sink → chdb → reports server → dispatcher proxy."""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta
from decimal import Decimal
from typing import Any

import httpx
import pytest
from aiohttp import web

from agents.sink import ClickHouseSink
from app.events.topics import ensure_topics
from app.http.reports_api import create_reports_app
from app.settings import Settings
from app.warehouse.clickhouse import ReconnectingClient, migrate
from tests.integration.harness import free_port, private_day, running_stack
from tests.integration.test_sink import produce, usage_record

pytestmark = pytest.mark.integration


async def test_summary_breakdown_and_the_finance_sentence(
    kafka_settings: Settings, clickhouse: Any
) -> None:
    await ensure_topics(kafka_settings)
    migrate(clickhouse)
    # A day of its own in the past, so other tests' rows are outside the window.
    day = private_day()
    models = {"gpt-4o": 0, "gpt-4o-mini": 0}
    records = []
    for i in range(30):
        record = usage_record(f"rep-{uuid.uuid4().hex[:6]}", i)
        record["ts"] = day + timedelta(minutes=i)
        record["model_served"] = "gpt-4o" if i % 3 == 0 else "gpt-4o-mini"
        models[record["model_served"]] += record["cost_usd_nanos"]
        records.append(record)
    await produce(kafka_settings, records)

    client = ReconnectingClient(lambda: clickhouse)
    sink = ClickHouseSink(kafka_settings, client, batch_wait_s=0.3)
    stop = asyncio.Event()
    task = asyncio.create_task(sink.run(stop))
    port = free_port()
    runner = web.AppRunner(create_reports_app(client))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    window = {"from": day.isoformat(), "to": (day + timedelta(days=1)).isoformat()}
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
            for _ in range(100):
                summary = (await http.get("/v1/reports/summary", params=window)).json()
                if summary["requests"] == 30:
                    break
                await asyncio.sleep(0.3)
            cost = Decimal(sum(r["cost_usd_nanos"] for r in records)) / 10**9
            baseline = Decimal(sum(r["baseline_cost_usd_nanos"] for r in records)) / 10**9
            assert summary["requests"] == 30
            assert Decimal(summary["cost_usd"]) == cost
            assert Decimal(summary["baseline_cost_usd"]) == baseline
            pct = ((baseline - cost) / baseline * 100).quantize(Decimal("0.1"))
            assert summary["sentence"] == (
                f"We processed 30 requests, would have cost ${baseline:,.2f} at GPT-4 rates, "
                f"actually cost ${cost:,.2f} — {pct}% savings."
            )

            by_model = (
                await http.get("/v1/reports/breakdown", params={**window, "by": "model"})
            ).json()
            assert {r["model"]: Decimal(r["cost_usd"]) for r in by_model["rows"]} == {
                m: Decimal(n) / 10**9 for m, n in models.items()
            }
            days = (await http.get("/v1/reports/timeseries", params=window)).json()["points"]
            assert [d["day"] for d in days] == [day.date().isoformat()]

            for params, param in (
                ({**window, "by": "colour"}, "by"),
                ({"from": "yesterday-ish"}, "from"),
                ({**window, "limit": "lots"}, "limit"),
            ):
                bad = await http.get("/v1/reports/breakdown", params=params)
                assert bad.status_code == 400 and bad.json()["error"]["param"] == param
            assert (await http.get("/v1/reports/nonsense")).status_code == 404

        # The dispatcher serves the same reports by proxy, and says so when they are down.
        def through_dispatcher() -> tuple[dict, int]:
            with running_stack(kafka_settings, reports_port=port) as stack:
                proxied = httpx.get(f"{stack.url}/v1/reports/summary", params=window).json()
            with running_stack(kafka_settings, reports_port=free_port()) as stack:
                down = httpx.get(f"{stack.url}/v1/reports/summary", params=window)
            assert down.json()["error"]["type"] == "reports_unavailable"
            return proxied, down.status_code

        proxied, down_status = await asyncio.to_thread(through_dispatcher)
        assert proxied == summary
        assert down_status == 503
    finally:
        stop.set()
        await task
        await runner.cleanup()
