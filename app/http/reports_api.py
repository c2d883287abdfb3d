"""HTTP mapping of the reports (``/v1/reports/*``): parse the query string, call ``app.warehouse.reports``.

Served by the process that owns the warehouse connection (the sink, since
embedded chdb has a single owner); the dispatcher proxies ``/v1/reports/*`` here.
Reports show everyone's spend, so this internal listener answers only the internal
token or an admin key (``app.http.security``); the sink always gives it a token.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import orjson
from aiohttp import web

from app.errors import InvalidRequest
from app.http.security import internal_caller
from app.metering.attribution import KeyStore
from app.warehouse import reports
from app.warehouse.reports import Range, ReportError

WAREHOUSE = web.AppKey("warehouse", object)
OPTIONS = web.AppKey("report_options", dict)
AUTH = web.AppKey("report_auth", tuple)
REPORTS = ("summary", "breakdown", "timeseries", "savings", "outcomes", "budgets", "alerts")
PARAMS = {
    "summary": {"from", "to"},
    "breakdown": {"from", "to", "by", "limit", "offset"},
    "timeseries": {"from", "to", "interval"},
    "savings": {"from", "to"},
    "outcomes": {"from", "to"},
    "budgets": set(),
    "alerts": {"from", "to", "limit", "offset", "kind"},
}


def _error(status: int, error_type: str, message: str, param: str | None = None) -> web.Response:
    body = {"error": {"type": error_type, "message": message, "param": param, "code": error_type}}
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")


def _limit(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or len(text) > 6:  # "²".isdigit() is True
        raise ReportError("limit", f"limit={text!r} must be a whole number between 1 and 1000")
    return int(text)


def _offset(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or len(text) > 8:
        raise ReportError(
            "offset", f"offset={text!r} must be a whole number from 0 to {reports.MAX_OFFSET}"
        )
    return int(text)


def _getall(query: Any, name: str) -> list[str]:
    """Every value of ``name`` in a query (a multidict, or a plain dict in tests)."""
    return list(query.getall(name)) if hasattr(query, "getall") else [query[name]]


def build_report(
    client: Any,
    name: str,
    query: Any,
    *,
    baseline_model: str = "gpt-4",
    active_scope: Callable[[str], bool] | None = None,
) -> Any:
    """One report as JSON-ready data (blocking: call it in a thread). Raises ReportError."""
    unknown = sorted(set(query) - PARAMS[name])
    if unknown:
        allowed = ", ".join(sorted(PARAMS[name])) or "none"
        raise ReportError(unknown[0], f"unknown parameter {unknown[0]!r}; {name} takes: {allowed}")
    repeated = sorted(p for p in set(query) if len(_getall(query, p)) > 1)
    if repeated:
        raise ReportError(
            repeated[0], f"{repeated[0]} given twice; give each parameter at most once"
        )
    window = Range.parse(query.get("from"), query.get("to"))
    if name == "summary":
        return reports.summary(client, window, baseline_model).to_json()
    if name == "breakdown":
        by = query.get("by", "model")
        return {
            "from": window.start.isoformat(),
            "to": window.end.isoformat(),
            "by": by,
            **reports.breakdown_page(
                client,
                window,
                by,
                _limit(query.get("limit", "20")),
                _offset(query.get("offset", "0")),
            ),
        }
    if name == "timeseries":
        interval = query.get("interval", "day")
        return {
            "from": window.start.isoformat(),
            "to": window.end.isoformat(),
            "interval": interval,
            "points": reports.timeseries(client, window, interval),
        }
    if name == "savings":
        return reports.savings(client, window, baseline_model)
    if name == "outcomes":
        return {
            "from": window.start.isoformat(),
            "to": window.end.isoformat(),
            "features": reports.outcomes(client, window),
        }
    if name == "alerts":
        return {
            "from": window.start.isoformat(),
            "to": window.end.isoformat(),
            **reports.alerts_page(
                client,
                window,
                _limit(query.get("limit", "20")),
                query.get("kind"),
                _offset(query.get("offset", "0")),
            ),
        }
    return {"scopes": reports.budgets(client, active=active_scope)}


async def report(request: web.Request) -> web.Response:
    token, keys = request.app[AUTH]
    try:
        caller = internal_caller(request.headers, token, keys) if token is not None else ""
    except InvalidRequest as exc:  # two different keys in one request
        return _error(400, "invalid_request_error", exc.message, exc.field)
    if caller is None:
        return _error(
            401,
            "authentication_error",
            "The reports server needs 'Authorization: Bearer <token>' with the internal token "
            "(TOLLGATE_INTERNAL_TOKEN, as the dispatcher sends it) or an admin API key; or ask "
            "the dispatcher: /v1/reports/* there",
        )
    name = request.match_info["name"]
    if name not in REPORTS:
        return _error(404, "not_found", f"No report {name!r}; use one of {', '.join(REPORTS)}")
    options = request.app[OPTIONS]
    try:
        payload = await asyncio.to_thread(
            build_report, request.app[WAREHOUSE], name, request.query, **options
        )
    except ReportError as exc:
        return _error(400, "invalid_request_error", str(exc), exc.param)
    return web.Response(body=orjson.dumps(payload), content_type="application/json")


async def healthz(_request: web.Request) -> web.Response:
    """Liveness, open (it says nothing of the warehouse): `tollgate status` asks it, as it asks
    the dispatcher's and the agents' /healthz, to tell a hung sink from a serving one."""
    return web.Response(body=b'{"status":"ok"}', content_type="application/json")


def create_reports_app(
    client: Any,
    *,
    baseline_model: str = "gpt-4",
    active_scope: Callable[[str], bool] | None = None,
    token: str | None = None,
    keys: KeyStore | None = None,
) -> web.Application:
    """``active_scope``: whether a scope still has a budget (removed caps leave the report).

    ``token``: the internal token every request must carry (or an admin key of ``keys``);
    None serves anyone, for tests that embed the app in their own process only.
    """
    app = web.Application()
    app[WAREHOUSE] = client
    app[AUTH] = (token, keys)
    app[OPTIONS] = {"baseline_model": baseline_model, "active_scope": active_scope}
    app.router.add_get("/v1/reports/{name}", report)
    app.router.add_get("/healthz", healthz)
    return app
