"""HTTP mapping of the reports (``/v1/reports/*``): parse the query string, call ``app.reports``.

Served by the process that owns the warehouse connection (the sink, since
embedded chdb has a single owner); the dispatcher proxies ``/v1/reports/*`` here.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from aiohttp import web

from app.reports import Range, ReportError, breakdown, summary, timeseries

WAREHOUSE = web.AppKey("warehouse", object)


def _error(status: int, error_type: str, message: str, param: str | None = None) -> web.Response:
    body = {"error": {"type": error_type, "message": message, "param": param, "code": error_type}}
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")


async def report(request: web.Request) -> web.Response:
    client: Any = request.app[WAREHOUSE]
    name = request.match_info["name"]
    query = request.query
    try:
        window = Range.parse(query.get("from"), query.get("to"))
        if name == "summary":
            payload: Any = (await asyncio.to_thread(summary, client, window)).to_json()
        elif name == "breakdown":
            limit_text = query.get("limit", "20")
            if not limit_text.isdigit():
                raise ReportError("limit", f"limit={limit_text!r} must be a whole number")
            payload = {
                "by": query.get("by", "model"),
                "rows": await asyncio.to_thread(
                    breakdown, client, window, query.get("by", "model"), int(limit_text)
                ),
            }
        elif name == "timeseries":
            payload = {"days": await asyncio.to_thread(timeseries, client, window)}
        else:
            return _error(
                404, "not_found", f"No report {name!r}; use summary, breakdown or timeseries"
            )
    except ReportError as exc:
        return _error(400, "invalid_request_error", str(exc), exc.param)
    return web.Response(body=orjson.dumps(payload), content_type="application/json")


def create_reports_app(client: Any) -> web.Application:
    app = web.Application()
    app[WAREHOUSE] = client
    app.router.add_get("/v1/reports/{name}", report)
    return app
