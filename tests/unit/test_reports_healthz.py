"""The sink's reports listener answers GET /healthz, open, as the dispatcher and the agents
do: `tollgate status` asks it to tell a hung sink from a serving one (probe 56 F3); the
reports themselves still need the internal token."""

from __future__ import annotations

from aiohttp.test_utils import TestClient, TestServer

from app.http.reports_api import create_reports_app


async def test_reports_listener_answers_healthz_without_a_token() -> None:
    app = create_reports_app(object(), token="internal-secret")
    async with TestClient(TestServer(app)) as client:
        health = await client.get("/healthz")
        assert health.status == 200 and await health.json() == {"status": "ok"}
        report = await client.get("/v1/reports/summary")
        assert report.status == 401
