"""Reports on the warehouse: Kafka → sink → chdb → reports server → dispatcher proxy."""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta
from decimal import Decimal
from typing import Any

import httpx
import pytest

from app.events.topics import ensure_topics
from app.settings import Settings
from app.warehouse.clickhouse import migrate
from tests.integration.harness import free_port, private_day, running_stack, serving_reports
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

    window = {"from": day.isoformat(), "to": (day + timedelta(days=1)).isoformat()}
    async with serving_reports(kafka_settings, clickhouse) as reports:
        http = reports.http
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
            with running_stack(kafka_settings, reports_port=reports.port) as stack:
                proxied = httpx.get(f"{stack.url}/v1/reports/summary", params=window).json()
            with running_stack(kafka_settings, reports_port=free_port()) as stack:
                down = httpx.get(f"{stack.url}/v1/reports/summary", params=window)
            assert down.json()["error"]["type"] == "reports_unavailable"
            return proxied, down.status_code

        proxied, down_status = await asyncio.to_thread(through_dispatcher)
        assert proxied == summary
        assert down_status == 503


async def test_range_edges_are_exact_to_the_millisecond_and_days_are_utc_days(
    kafka_settings: Settings, clickhouse: Any
) -> None:
    """Probe J: `from`/`to` were bound to the whole second (an event at 10:30:30.5 fell out
    of from=10:30:30.5, and one at 10:30:30.2 into from=10:30:30.501), a range given at
    -08:00 labelled each UTC day with the day before, and a lower-case z, or a '+' sent
    unencoded (a space once decoded), were refused."""
    await ensure_topics(kafka_settings)
    migrate(clickhouse)
    day = private_day()
    at = day + timedelta(hours=10, minutes=30)
    offsets = {"a": 0.0, "b": 30.5, "c": 30.2, "d": 59.999, "e": 3600.0}
    records = []
    for name, seconds in offsets.items():
        record = usage_record(f"edge-{name}-{uuid.uuid4().hex[:6]}", 0)
        record["ts"] = at + timedelta(seconds=seconds)
        records.append(record)
    await produce(kafka_settings, records)

    def iso(seconds: float) -> str:
        return (at + timedelta(seconds=seconds)).isoformat().replace("+00:00", "Z")

    async with serving_reports(kafka_settings, clickhouse) as reports:
        http = reports.http

        async def requests(start: str, end: str) -> int:
            answer = await http.get("/v1/reports/summary", params={"from": start, "to": end})
            assert answer.status_code == 200, answer.text
            return int(answer.json()["requests"])

        whole = (iso(-60), iso(7200))
        for _ in range(100):
            if await requests(*whole) == len(records):
                break
            await asyncio.sleep(0.3)
        assert await requests(*whole) == len(records)
        assert await requests(iso(30.5), iso(30.6)) == 1  # b
        assert await requests(iso(30.501), iso(31)) == 0
        assert await requests(iso(30.2), iso(30.5)) == 1  # c
        assert await requests(iso(59), iso(59.999001)) == 1  # d
        assert await requests(iso(0.001), iso(3600)) == 3  # b c d, not a, not e
        assert await requests(iso(-60).lower(), iso(7200).lower()) == len(records)
        plus = (at + timedelta(hours=5)).replace(tzinfo=None).isoformat() + " 05:00"
        assert await requests(plus, iso(7200)) == len(records)

        pacific = {  # from 08:00 UTC of the day, written in the caller's zone
            "interval": "day",
            "from": f"{day.date().isoformat()}T00:00:00-08:00",
            "to": (day + timedelta(days=1)).isoformat(),
        }
        points = (await http.get("/v1/reports/timeseries", params=pacific)).json()["points"]
        labelled = {p["day"]: p["requests"] for p in points}
        assert labelled[day.date().isoformat()] == len(records), labelled
