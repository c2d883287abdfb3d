"""The dispatcher's HTTP API (aiohttp). Handlers are thin: parse, call the owner module, answer.

Routes: ``POST /v1/chat/completions`` (OpenAI-compatible), ``POST /v1/dispatch``
(native), ``POST /v1/usage``, ``POST /v1/outcomes``, ``GET /v1/models``,
``GET /healthz``, ``GET /readyz``, ``GET /metrics``, ``GET /openapi.json``.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import signal
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiohttp import HttpVersion11, web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError

from app.budgets.admin import (
    apply_budgets_file,
    deletion_record,
    load_budgets_file,
    policy_record,
    with_file_digest,
)
from app.budgets.gate import BudgetGate, BudgetRefused
from app.budgets.policy import (
    Policy,
    PolicyBody,
    PolicyBook,
    PolicyError,
    default_status_problem,
    parse_policy,
    validate_scope,
)
from app.budgets.spend import event_cost
from app.clock import Clock
from app.errors import InvalidRequest, ModelNotServed, TollgateError
from app.events.codec import build_codec
from app.events.compacted import CompactedView
from app.events.producer import EventEmitter
from app.gateway.chat import ChatAttempts
from app.gateway.local_router import LocalRouterCheckpoint
from app.gateway.pipeline import (
    ChatRequest,
    Gateway,
    GatewayConfig,
    identity_scopes,
    parse_chat_request,
)
from app.gateway.requests import ChatBody, ChatCompletionBody
from app.gateway.savings import SavingsLevers
from app.gateway.shared_router import SharedRouter
from app.gateway.upstreams import UpstreamPool
from app.http import responses
from app.http.budget_snapshot import SAVE_EVERY_S, BudgetSnapshot, Uncounted, pruned
from app.http.chat import CHAT_RESPONSE_HEADERS, answer_chat
from app.http.errors import ApiError, http_error, invalid_request
from app.http.openapi import (
    ATTRIBUTION_HEADERS,
    REPORT_PARAMS,
    OutcomeBody,
    UsageBody,
    openapi_document,
    operation,
)
from app.http.reports_api import REPORTS
from app.http.runner import UnreadableBody, serve_app, undecodable, unread_body_format
from app.http.security import check_exposure, internal_token
from app.http.uncounted import UncountedUsage
from app.metering.attribution import (
    Identity,
    KeyStore,
    bearer_token,
    key_cap_warning,
    resolve_identity,
)
from app.metering.ingest import (
    ReportedRequests,
    TimeWindow,
    parse_outcomes,
    parse_usage_reports,
)
from app.metering.usage import event_time, new_id
from app.metrics import Metrics
from app.pricing.catalog import PriceCatalog, usd_text
from app.settings import Settings

log = logging.getLogger(__name__)

JSON = "application/json"


@dataclass
class Components:
    settings: Settings
    metrics: Metrics
    emitter: EventEmitter
    upstreams: UpstreamPool
    prices: PriceCatalog
    gateway: Gateway
    keys: KeyStore | None
    gate: BudgetGate
    policies: PolicyBook
    policy_view: CompactedView
    decision_view: CompactedView
    reports_session: aiohttp.ClientSession
    levers: SavingsLevers
    uncounted: UncountedUsage  # this run's uncounted usage: held at start, read back
    shared_router: SharedRouter | None = None  # routing.shared_learning: follows the learner
    local_router: LocalRouterCheckpoint | None = None  # otherwise: its model in state_dir
    reported: ReportedRequests = field(default_factory=ReportedRequests)  # /v1/usage ids
    budget_snapshot: BudgetSnapshot | None = None  # the budget view on disk
    budget_saver: BudgetViewSaver | None = None  # writes it, one save at a time
    # TOLLGATE_BUDGETS_FILE's entries, until the policies topic is read (Kafka did not answer
    # at start): applied then, against what the topic holds (``publish_budgets_file``)
    budgets_file_pending: list[Policy] | None = None


COMPONENTS = web.AppKey("components", Components)
REQUEST_ID = web.RequestKey("request_id", str)
CLIENT_REQUEST_ID = web.RequestKey("client_request_id", str)
CLIENT_REQUEST_ID_MAX = 200


def json_response(
    payload: Any, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=orjson.dumps(payload), status=status, content_type=JSON, headers=headers
    )


def error_response(error: ApiError) -> web.Response:
    return json_response(error.body(), status=error.status)


# -- middleware ----------------------------------------------------------------------
# OpenAI endpoints a client may try through the gateway that it does not proxy.
OPENAI_ENDPOINTS_NOT_SERVED = (
    "/v1/embeddings", "/v1/completions", "/v1/responses", "/v1/images", "/v1/audio",
    "/v1/moderations", "/v1/files", "/v1/batches", "/v1/fine_tuning", "/v1/assistants",
    "/v1/threads", "/v1/vector_stores", "/v1/uploads", "/v1/realtime",
)  # fmt: skip


def unknown_route_message(method: str, path: str) -> str:
    """A 404's message: what the gateway serves instead, and how to still count the spend."""
    shown = path[:200]
    for prefix in OPENAI_ENDPOINTS_NOT_SERVED:
        if path == prefix or path.startswith(prefix + "/"):
            return (
                f"Tollgate does not proxy {prefix}: it meters and caps chat completions "
                "(POST /v1/chat/completions, or POST /v1/dispatch). Call the provider "
                "directly and report the call's usage with POST /v1/usage, so that it still "
                "counts against budgets and reports"
            )
    return (
        f"No route {method} {shown}; GET /openapi.json lists every route Tollgate serves "
        "(the OpenAI API under /v1: chat/completions, models)"
    )


@web.middleware
async def api_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    request_id = new_id("req_")
    request[REQUEST_ID] = request_id
    # The gateway's own id joins Request, Usage and outcomes, so a client cannot choose it;
    # the client's is kept alongside (printable and bounded, else ignored) and echoed back.
    client_id = request.headers.get("X-Request-Id")
    if client_id and len(client_id) <= CLIENT_REQUEST_ID_MAX and client_id.isprintable():
        request[CLIENT_REQUEST_ID] = client_id
    metrics = request.app[COMPONENTS].metrics
    route = (
        request.match_info.route.resource.canonical
        if request.match_info.route.resource
        else "unmatched"
    )
    started = time.monotonic()
    try:
        response = await handler(request)
    except ApiError as exc:
        response = error_response(exc)
    except (TollgateError, BudgetRefused) as exc:
        response = error_response(http_error(exc))
    except web.HTTPRequestEntityTooLarge as exc:
        limit = request.app[COMPONENTS].settings.max_body_bytes
        response = error_response(
            ApiError(
                413,
                "request_too_large",
                f"The request body is larger than {limit} bytes (TOLLGATE_MAX_BODY_BYTES)",
            )
        )
        del exc
    except web.HTTPException as exc:
        error_type = "not_found" if exc.status == 404 else "invalid_request_error"
        message = exc.reason
        if isinstance(exc, web.HTTPNotFound):
            message = unknown_route_message(request.method, request.path)
        elif isinstance(exc, web.HTTPMethodNotAllowed):
            allowed = ", ".join(sorted(exc.allowed_methods))
            message = f"{request.method} is not allowed on {request.path[:200]}; use {allowed}"
        response = error_response(ApiError(exc.status, error_type, message))
        if isinstance(exc, web.HTTPMethodNotAllowed):  # RFC 9110: a 405 lists what is allowed
            response.headers["Allow"] = ", ".join(sorted(exc.allowed_methods))
    except asyncio.CancelledError:
        metrics.requests.labels(route, "499").inc()
        raise
    except ConnectionError:
        transport = request.transport
        if transport is not None and not transport.is_closing():  # not the client: a bug
            log.exception("unhandled error", extra={"request_id": request_id, "route": route})
            return error_response(
                ApiError(500, "internal_error", f"Internal error; quote request id {request_id}")
            )
        # The client hung up (mid-stream, mostly): its usage is already recorded. Nothing
        # reaches it any more; aiohttp drops this answer quietly (raising, it would log a
        # traceback at ERROR for every client that closes a stream early).
        metrics.requests.labels(route, "499").inc()
        metrics.latency.labels(route).observe(time.monotonic() - started)
        return web.Response(status=499)
    except Exception:
        log.exception("unhandled error", extra={"request_id": request_id, "route": route})
        response = error_response(
            ApiError(500, "internal_error", f"Internal error; quote request id {request_id}")
        )
    if not response.prepared:
        response.headers["X-Request-Id"] = request_id
        if CLIENT_REQUEST_ID in request:
            response.headers["X-Client-Request-Id"] = request[CLIENT_REQUEST_ID]
    metrics.requests.labels(route, str(response.status)).inc()
    metrics.latency.labels(route).observe(time.monotonic() - started)
    return response


class _RepeatedKey(Exception):
    pass


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise _RepeatedKey(key, obj[key])
        obj[key] = value
    return obj


def repeated_key(raw: bytes) -> tuple[str, Any] | None:
    """The first key that ``raw`` (valid JSON) gives twice in one object, and the value given
    first, or None. orjson keeps the last silently (as most parsers do)."""
    try:
        json.loads(raw, object_pairs_hook=_unique_pairs)
    except _RepeatedKey as exc:
        return exc.args[0], exc.args[1]
    except RecursionError:  # nesting orjson reads (1,024 levels) but the stdlib's does not
        return None
    return None


# A body past this is checked for keys given twice in a thread: the stdlib parser that can
# see them takes about 3 ms for a full batch of 1,000 usage records, 80 ms for 4 MiB.
UNIQUE_KEYS_IN_THREAD_BYTES = 256 * 1024


async def read_json(request: web.Request, *, unique_keys: bool = False) -> Any:
    """The request body as JSON. With ``unique_keys`` (bodies that are recorded: usage,
    outcomes, budget policies), a key given twice in one object is a 400: which of its values
    was meant cannot be told, and the first was dropped without a word (session 22's probe:
    ``"prompt_tokens": 10, "prompt_tokens": 99999999`` was charged as 99,999,999)."""
    body = await _read_json(request)
    if unique_keys and isinstance(body, dict | list):
        raw = await request.read()  # aiohttp keeps the body it read
        if len(raw) > UNIQUE_KEYS_IN_THREAD_BYTES:
            repeated = await asyncio.to_thread(repeated_key, raw)
        else:
            repeated = repeated_key(raw)
        if repeated is not None:
            key, first = repeated
            raise invalid_request(
                f"The request body gives {key[:100]!r} twice in one object (first "
                f"{json.dumps(first, ensure_ascii=False)[:60]}): send each field once",
                key[:100],
            )
    return body


async def _read_json(request: web.Request) -> Any:
    settings = request.app[COMPONENTS].settings
    unread = unread_body_format(request)
    if unread is not None:
        raise unread
    limit = settings.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=request.content_length)
    try:
        async with asyncio.timeout(settings.body_read_timeout_s):
            raw = await request.read()
    except UnreadableBody as exc:  # the client half-closed; its body cannot be read whole
        raise invalid_request(exc.detail) from None
    except (HttpProcessingError, RequestPayloadError) as exc:  # e.g. Content-Encoding: gzip
        encoding = request.headers.get("Content-Encoding", "")  # on a body that is not
        cause = exc.__cause__ if isinstance(exc, RequestPayloadError) else exc
        raise invalid_request(undecodable(cause or exc, encoding)) from None
    except TimeoutError:
        raise ApiError(
            408,
            "request_timeout",
            f"The request body did not arrive within {settings.body_read_timeout_s:g}s "
            "(TOLLGATE_BODY_READ_TIMEOUT_S): send the whole body, as long as Content-Length says",
        ) from None
    if not raw:
        raise invalid_request("The request body is empty; send a JSON object")
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        try:
            raw.decode()
        except UnicodeDecodeError as bad:  # orjson says "surrogates not allowed ... char 0"
            raise invalid_request(
                f"The request body is not valid UTF-8 (byte 0x{raw[bad.start]:02x} at byte "
                f"{bad.start}); JSON must be sent as UTF-8 text"
            ) from None
        raise invalid_request(f"The request body is not valid JSON: {exc}") from None


# -- chat ------------------------------------------------------------------------------
# A chat body of more messages than this is parsed in a thread: 120,000 one-character
# messages (3.6 MB) took 0.56 s to validate and estimate, all of it on the event loop
# (session 17's probe); in a thread the loop waits at most 0.17 s (pydantic's validation,
# which holds the GIL).
PARSE_IN_THREAD_MESSAGES = 2_000


async def parse_chat_body(body: Any, default_model: str | None, native: bool) -> ChatRequest:
    messages = body.get("messages") if isinstance(body, dict) else None
    parse = functools.partial(parse_chat_request, body, default_model=default_model, native=native)
    if isinstance(messages, list) and len(messages) > PARSE_IN_THREAD_MESSAGES:
        return await asyncio.to_thread(parse)
    return parse()


async def _chat(request: web.Request, endpoint: str, native: bool) -> web.StreamResponse:
    c = request.app[COMPONENTS]
    request_id = request[REQUEST_ID]
    client_request_id = request.get(CLIENT_REQUEST_ID)
    identity: Identity | None = None
    chat: ChatRequest | None = None
    context: ChatAttempts | None = None

    def refused(status: str, reason: str, scope: str | None = None) -> None:
        c.gateway.emit_request(
            request_id=request_id,
            endpoint=endpoint,
            identity=identity or Identity(user_id="unattributed"),
            chat=chat,
            status=status,
            reason=reason,
            blocked_scope=scope,
            client_request_id=client_request_id,
        )

    try:
        body = await read_json(request)
        chat = await parse_chat_body(body, c.settings.default_model if native else None, native)
        identity = resolve_identity(
            request.headers, body, c.keys, c.settings.require_attribution, spending=True
        )
        _check_budget_view_fresh(c)
        context = ChatAttempts(
            c.gateway, c.levers, request_id=request_id, endpoint=endpoint, identity=identity,
            client_headers=request.headers, client_request_id=client_request_id,
        )  # fmt: skip
        return await answer_chat(request, context, body, chat)
    except BudgetRefused as refusal:  # only ever raised by admission
        if context is None or not context.admitted:  # (not an escalation's second attempt)
            refused("blocked", "budget_exceeded", refusal.status.scope)
        raise http_error(refusal) from None
    except TollgateError as exc:
        error = http_error(exc)
        if context is None or not context.admitted:  # refused before any upstream call
            refused("rejected", error.code or error.error_type)
        raise error from None
    except ApiError as exc:
        if context is None or not context.admitted:  # refused before any upstream call
            refused("rejected", exc.code or exc.error_type)
        raise
    except web.HTTPRequestEntityTooLarge:
        refused("rejected", "request_too_large")
        raise


def _check_budget_view_fresh(c: Components) -> None:
    """Fail-closed deployments refuse calls when budget decisions may be stale."""
    if not c.settings.budget_fail_closed:
        return
    age = c.decision_view.age_s()
    if not c.decision_view.synced.is_set() or age > c.settings.budget_max_staleness_s:
        raise ApiError(
            503,
            "budget_unavailable",
            f"Budget decisions are stale ({age:.0f}s > TOLLGATE_BUDGET_MAX_STALENESS_S="
            f"{c.settings.budget_max_staleness_s:.0f}s; Kafka unreachable?) and this gateway "
            "is configured fail-closed (TOLLGATE_BUDGET_FAIL_CLOSED=true). Retry later.",
        )


# What the two chat routes share in the API document: they take the same body and answer alike.
CHAT_OPERATION: dict[str, Any] = {
    "body": ChatBody,
    "response": responses.ChatCompletion,
    "response_description": "The provider's completion, passed through (or text/event-stream)",
    "also_media_types": ("text/event-stream",),
    "parameters": tuple(ATTRIBUTION_HEADERS),
    "errors": (400, 401, 402, 403, 404, 413, 415, 502, 503, 504),
    "response_headers": tuple((name, *spec) for name, spec in CHAT_RESPONSE_HEADERS.items()),
}


@operation(
    "OpenAI-compatible chat completion (JSON, or an SSE stream with stream: true)",
    "user",
    **{**CHAT_OPERATION, "body": ChatCompletionBody},
)
async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _chat(request, "chat.completions", native=False)


@operation(
    "Native chat API: model defaults to TOLLGATE_DEFAULT_MODEL; user_id, session_id and "
    "metadata are not forwarded",
    "user",
    **CHAT_OPERATION,
)
async def dispatch(request: web.Request) -> web.StreamResponse:
    return await _chat(request, "dispatch", native=True)


# -- usage and outcomes reported by other services ------------------------------------
def _identity_resolver(
    request: web.Request, require: str | None = None, spending: bool = True
) -> Callable[[Any], Identity]:
    """Attribution of one reported record: keys and headers first, then the record's fields."""
    c = request.app[COMPONENTS]
    requirement = require or c.settings.require_attribution

    def resolve(record: Any) -> Identity:
        return resolve_identity(
            request.headers, record, c.keys, requirement, refuse_conflicts=True, spending=spending
        )

    return resolve


def _report_window(c: Components) -> TimeWindow:
    """Event times /v1/usage and /v1/outcomes accept, around the gateway's clock."""
    return TimeWindow(
        now=c.gate.clock.now(),
        max_lateness=timedelta(seconds=c.settings.usage_max_lateness_s),
        max_skew=timedelta(seconds=c.settings.usage_max_clock_skew_s),
    )


@operation(
    "Report usage of calls made outside the gateway (one record, a list, or {records: [...]})",
    "user",
    ok=202,
    body=UsageBody,
    response=responses.UsageAccepted,
    response_description="Accepted and queued for delivery",
    parameters=tuple(ATTRIBUTION_HEADERS),
    errors=(400, 401, 403, 409, 413, 415),
)
async def report_usage(request: web.Request) -> web.Response:
    c = request.app[COMPONENTS]
    body = await read_json(request, unique_keys=True)
    ignored: dict[str, list[str]] = {}
    reports = parse_usage_reports(  # validates all first
        body, _identity_resolver(request), window=_report_window(c), ignored=ignored
    )
    auto = c.levers.routing.auto_model
    for index, report in enumerate(reports):
        if report["model"] == auto:  # would be priced as an unknown model, at cost 0
            raise InvalidRequest(
                f"records[{index}].model {auto!r} is the router's name for 'pick a tier', "
                "not a model: report the model that served the call (the response's `model`)",
                field=f"records[{index}].model",
            )
        if report["model_requested"] == auto:  # would be counted as asked for the served model
            raise InvalidRequest(
                f"records[{index}].model_requested {auto!r} names no model: name the model "
                "the client asked for (the routing saving is its list price minus the served "
                "model's), or leave it out",
                field=f"records[{index}].model_requested",
            )
    named = set(range(len(reports)))  # every report has a request_id, named or given
    # another record under a reported id, or a dispatched call's: 409, none emitted
    c.reported.check(reports, named, c.gateway.dispatched)
    # A retry (the same record under its request_id) is answered as the first was; the first
    # is in the spool already, so it is not emitted, held or put in the metrics again.
    repeats = c.reported.repeats(reports, named)
    # One held since the start from the saved view is in Kafka already (only delivered usage
    # is saved): a repeat too, though its record was not saved to compare with.
    restored = c.uncounted.restored
    repeats |= {i for i, report in enumerate(reports) if report["event_id"] in restored}
    c.reported.remember(reports, named)
    accepted = []
    for index, report in enumerate(reports):
        record = c.gateway.usage_record(  # identity is in report
            source="usage_api", counted=index not in repeats, **report
        )
        # Already spent: recorded even when a scope is blocked, and held by the gate until
        # the spend worker counts it.
        if index not in repeats:
            c.gateway.emit_usage(record, identity_scopes(report["identity"]))
        accepted.append(
            {
                "event_id": record["event_id"],
                "request_id": record["request_id"],
                "cost_usd": usd_text(record["cost_usd_nanos"]),  # decimal text, never 3.5e-05
                "price_unknown": record["price_unknown"],
                # a model_requested without a price: no routing saving for this record (its
                # requested cost is the served model's), said rather than silently counted
                "model_requested_price_unknown": report["model_requested"] is not None
                and c.gateway.prices.rate(report["model_requested"]) is None,
                # what budgets count: the cost, or for a model without a price its baseline
                # cost (an unpriced model is not a free way around a cap)
                "budget_cost_usd": usd_text(event_cost(record)),
                "repeat": index in repeats,
            }
        )
    return json_response(
        {
            "accepted": len(accepted),
            "repeated": len(repeats),
            "events": accepted,
            "ignored_fields": ignored,
        },
        status=202,
    )


@operation(
    "Record business outcomes, for cost per successful outcome",
    "user",
    ok=202,
    body=OutcomeBody,
    response=responses.OutcomesAccepted,
    response_description="Accepted and queued for delivery",
    errors=(400, 401, 403, 413, 415),
)
async def report_outcomes(request: web.Request) -> web.Response:
    c = request.app[COMPONENTS]
    body = await read_json(request, unique_keys=True)
    ignored: dict[str, list[str]] = {}
    records = parse_outcomes(
        body,
        _identity_resolver(request, require="none", spending=False),
        window=_report_window(c),
        ignored=ignored,
    )
    key = c.keys.lookup(bearer_token(request.headers) or "") if c.keys is not None else None
    may_act_for = key.may_attribute_to if key is not None and not key.admin else None
    unmatched = []
    for index, record in enumerate(records):  # all attributed (ownership checked) first
        field = c.gateway.attribute_outcome(record, may_act_for)  # often only the request
        if field is not None:
            unmatched.append(f"outcomes[{index}].{field}")
    for record in records:
        c.emitter.emit("Outcome", "outcomes", record["session_id"] or record["request_id"], record)
        c.levers.learn_outcome(record["request_id"], record["outcome"])  # routed here: learn
    return json_response(
        {
            "accepted": len(records),
            "event_ids": [r["event_id"] for r in records],
            "ignored_fields": ignored,
            "unmatched": unmatched,
        },
        status=202,
    )


# -- budgets (admin) ----------------------------------------------------------------
def _admin(request: web.Request, what: str = "Budget administration") -> str | None:
    """The admin's key id; keys configured = an admin key is required."""
    c = request.app[COMPONENTS]
    if c.keys is None:
        return None
    identity = resolve_identity(request.headers, {}, c.keys, "none")
    if not identity.is_admin:
        raise ApiError(
            403,
            "permission_error",
            f"{what} needs an admin API key (Authorization: Bearer <admin key>)",
        )
    return identity.api_key_id


def _scope(request: web.Request) -> str:
    # An escape that is not UTF-8 (``user:%ff``) reaches match_info as written: it would name
    # the id ``%ff``, which ``user:%25ff`` names (session 22's probe)
    path = request.raw_path.partition("?")[0]
    try:
        urllib.parse.unquote_to_bytes(path).decode()
    except UnicodeDecodeError as bad:
        raise invalid_request(
            f"The scope in the path is not UTF-8 once its %-escapes are decoded (byte "
            f"0x{bad.object[bad.start]:02x}): percent-encode the UTF-8 bytes of the id",
            "scope",
        ) from None
    try:
        return validate_scope(request.match_info["scope"])
    except PolicyError as exc:
        raise invalid_request(str(exc), exc.field) from None


async def _save_policy_change(c: Components, scope: str, record: dict[str, Any] | None) -> None:
    """An admin's change is in the saved budget view before it is answered: a restart while
    Kafka does not answer (the change still spooled, never read back) enforces it, and so
    does a crash within the second before the next save (probe 63 D1). Written off the
    event loop, as the periodic save is (``BudgetViewSaver``)."""
    if c.budget_snapshot is not None:
        c.budget_snapshot.record("policies", scope, record)
    if c.budget_saver is not None:
        await c.budget_saver.save()


@operation(
    "Create or replace the policy of a scope",
    "admin",
    body=PolicyBody,
    response=responses.PolicyOut,
    errors=(400, 401, 403, 413, 415),
)
async def put_budget(request: web.Request) -> web.Response:
    c = request.app[COMPONENTS]
    admin = _admin(request)
    scope = _scope(request)
    try:
        policy = parse_policy(scope, await read_json(request, unique_keys=True))
    except PolicyError as exc:
        raise invalid_request(str(exc), exc.field) from None
    # carries the budgets file's last entry on: a restart with the same file keeps this
    record = policy_record(policy, admin, c.policies.file_digest(scope))
    c.emitter.emit_policy(scope, record)
    # Effective here at once (and not undone by an older record's echo); other dispatchers
    # read it from Kafka.
    c.policies.put_local(policy, record["event_id"], record, carries_file_digest=True)
    await _save_policy_change(c, scope, record)
    warning = key_cap_warning(policy.scope, c.keys)
    return json_response(
        {**policy.to_json(), "updated_by": admin, **({"warning": warning} if warning else {})}
    )


@operation(
    "The policy of a scope", "admin", response=responses.PolicyOut, errors=(400, 401, 403, 404)
)
async def get_budget(request: web.Request) -> web.Response:
    c = request.app[COMPONENTS]
    _admin(request)
    scope = _scope(request)
    policy = c.policies.policies.get(scope)
    if policy is None:
        raise ApiError(404, "not_found", f"No budget policy for {scope}", param="scope")
    return json_response({**policy.to_json(), "updated_by": c.policies.written_by.get(scope)})


@operation(
    "Remove the policy of a scope", "admin", response=responses.Deleted, errors=(400, 401, 403, 404)
)
async def delete_budget(request: web.Request) -> web.Response:
    c = request.app[COMPONENTS]
    admin = _admin(request)
    scope = _scope(request)
    if scope not in c.policies.policies:
        raise ApiError(404, "not_found", f"No budget policy for {scope}", param="scope")
    record = deletion_record(scope, admin, c.policies.file_digest(scope))
    c.emitter.emit_policy(scope, record)
    c.policies.remove_local(scope, record["event_id"], record, carries_file_digest=True)
    await _save_policy_change(c, scope, None)
    return json_response({"deleted": scope})


@operation("List budget policies", "admin", response=responses.PolicyList, errors=(401, 403))
async def list_budgets(request: web.Request) -> web.Response:
    c = request.app[COMPONENTS]
    _admin(request)
    return json_response(
        {"budgets": [p.to_json() for p in sorted(c.policies.all(), key=lambda p: p.scope)]}
    )


@operation(
    "Spent, limit, state, period and resets_at of a scope",
    "user_or_admin",
    description="A key may read the status of the caps its calls spend under (its user's, key's, "
    "team's and allowed features'); an admin key any scope's.",
    response=responses.BudgetStatusOut,
    errors=(400, 401, 403, 404),
)
async def budget_status(request: web.Request) -> web.Response:
    c = request.app[COMPONENTS]
    scope = _scope(request)
    problem = default_status_problem(scope)  # a default spends nothing itself
    if problem is not None:
        raise invalid_request(problem, "scope")
    if c.keys is not None:  # a key may read the caps its calls spend under; admins any
        identity = resolve_identity(request.headers, {}, c.keys, "none")
        key = c.keys.lookup(bearer_token(request.headers) or "")
        own = {f"user:{identity.user_id}", f"key:{identity.api_key_id}"}
        if identity.team:
            own.add(f"team:{identity.team}")
        if key is not None and key.features:
            own.update(f"feature:{f}" for f in key.features)
        if not identity.is_admin and scope not in own:
            raise ApiError(
                403,
                "permission_error",
                f"Your key may not read the status of {scope}: a key reads its own user's, "
                "key's, team's and allowed features' caps (an admin key any)",
            )
    status = c.gate.status(scope)
    if status is None:
        raise ApiError(
            404, "not_found", f"{scope} has no budget policy (nor a default)", param="scope"
        )
    return json_response(status.to_json())


# -- reports (served by the sink, which owns the warehouse) ----------------------------
DASHBOARD_HTML = Path(__file__).with_name("dashboard.html")


@operation(
    "Built-in spend dashboard (HTML reading /v1/reports/*)",
    "open",
    media_type="text/html",
    response_description="HTML page",
)
async def dashboard(request: web.Request) -> web.Response:
    """The built-in spend dashboard: one page that reads /v1/reports/*."""
    return web.Response(
        body=DASHBOARD_HTML.read_bytes(),
        content_type="text/html",
        charset="utf-8",
        headers={"Cache-Control": "no-cache"},
    )


@operation(
    "ROI and spend reports from the warehouse",
    "admin",
    description="summary: totals and the finance sentence; breakdown: spend by model, user, "
    "feature, tier or provider (by=user&limit=10: top spenders; `offset` pages on, and the "
    "answer's more, next_offset, total and others say what a page leaves out); timeseries: cost per minute, "
    "hour or day with anomaly flags; savings: savings vs the baseline model, decomposed into "
    "model choice, routing, prompt caching and cache hits, with cache hit rate and routing "
    "efficiency; outcomes: cost per successful outcome by feature; budgets: status of every "
    "capped scope; alerts: anomaly and budget_threshold alerts, latest first (`kind` keeps "
    "one kind; a page says more, next_offset and total, and `offset` pages on, as for "
    "breakdown). Ranges default to the last 30 days; `to` is exclusive.",
    response=responses.Report,
    parameters=tuple(REPORT_PARAMS),
    errors=(400, 401, 403, 404, 503),
)
async def reports(request: web.Request) -> web.Response:
    c = request.app[COMPONENTS]
    _admin(request, "Reports (everyone's spend)")
    name = request.match_info["name"]  # decoded: "summary%3Fby%3Duser" is "summary?by=user"
    if name not in REPORTS:  # so only a known name reaches the URL, never a smuggled query
        raise ApiError(
            404, "not_found", f"No report {name[:100]!r}; use one of {', '.join(REPORTS)}",
            param="name",
        )  # fmt: skip
    url = f"{c.settings.reports_url}/v1/reports/{name}"
    where = (
        f"The reports server at {c.settings.reports_url} (the `tollgate sink` process, which "
        "owns the warehouse)"
    )
    try:  # the session sends the internal token and gives up after TOLLGATE_REPORTS_TIMEOUT_S
        async with c.reports_session.get(url, params=request.query) as upstream:
            body = await upstream.read()
    except TimeoutError as exc:
        raise ApiError(
            503,
            "reports_unavailable",
            f"{where} did not answer within {c.settings.reports_timeout_s:g}s "
            "(TOLLGATE_REPORTS_TIMEOUT_S); it may be stalled or busy. Retry later.",
        ) from exc
    except aiohttp.ClientError as exc:
        raise ApiError(
            503,
            "reports_unavailable",
            f"{where} is not reachable: {exc}. Start it, or check TOLLGATE_REPORTS_PORT.",
        ) from exc
    if upstream.status == 401:
        raise ApiError(
            503,
            "reports_unavailable",
            f"{where} refused this dispatcher's internal token: give both processes the same "
            "TOLLGATE_INTERNAL_TOKEN (or TOLLGATE_INTERNAL_TOKEN_FILE, or the same state dir).",
        )
    return web.Response(body=body, status=upstream.status, content_type=JSON)


# -- discovery and operations ------------------------------------------------------------
def _known_key(request: web.Request) -> None:
    """With keys configured, any known key (a 401 without one): the models an upstream
    serves are the gateway's to tell its callers, as OpenAI's API and other gateways do.
    Only the key counts: the identity headers a client sends with every call are not
    checked here."""
    c = request.app[COMPONENTS]
    if c.keys is not None:
        secret = {"Authorization": f"Bearer {bearer_token(request.headers) or ''}"}
        resolve_identity(secret, {}, c.keys, "none")


@operation("Models served", "user_or_admin", response=responses.ModelList, errors=(400, 401))
async def list_models(request: web.Request) -> web.Response:
    _known_key(request)
    c = request.app[COMPONENTS]
    data = [model_json(model) for model in c.upstreams.known_models()]
    alias = _routing_alias(c)
    if alias is not None and all(model["id"] != alias for model in data):
        # a client that picks from this list can pick "route me" too (a newcomer probe:
        # model="auto" worked, but the list and models.retrieve("auto") did not know it)
        data.append(model_json(alias))
    return json_response({"object": "list", "data": data})


def _routing_alias(c: Components) -> str | None:
    """The model name that routes (``routing.auto_model``), when routing is on."""
    routing = c.levers.routing
    return routing.auto_model if routing.enabled else None


def model_json(model: str) -> dict[str, Any]:
    """A model as OpenAI's API shows one."""
    return {"id": model, "object": "model", "created": 0, "owned_by": "tollgate"}


@operation(
    "A model served (OpenAI's models.retrieve)",
    "user_or_admin",
    errors=(400, 401),
    response=responses.Model,
    extra_responses=((404, "No configured upstream serves this model"),),
)
async def retrieve_model(request: web.Request) -> web.Response:
    _known_key(request)
    c = request.app[COMPONENTS]
    model = request.match_info["model"]
    if model != _routing_alias(c) and not c.upstreams.candidates(model):
        raise ModelNotServed(model, c.upstreams.known_models())
    return json_response(model_json(model))


@operation("Liveness", "open", response=responses.Health)
async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


@operation(
    "Readiness: prices loaded and Kafka connected or spool usable (and the router model "
    "loaded, with routing.preload_model)",
    "open",
    response=responses.Readiness,
    extra_responses=((503, "Not ready"),),
)
async def readyz(request: web.Request) -> web.Response:
    c = request.app[COMPONENTS]
    spool_room = c.emitter.spool.size_bytes < c.settings.spool_max_bytes
    checks: dict[str, Any] = {
        "prices_loaded": c.prices.rate(c.prices.baseline_model) is not None,
        "kafka_connected": c.emitter.kafka_connected,
        "spool_active": spool_room,
        "spool_depth": c.emitter.depth,
        "kafka_error": c.emitter.delivery_problem,
        "budget_decisions_synced": c.decision_view.synced.is_set(),
        "budget_policies_synced": c.policy_view.synced.is_set(),
        "router_model_loaded": c.levers.model_loaded,
    }
    # Spend of capped scopes waiting for the spend worker's count: when the worker is down
    # (a crash loop `make up` keeps restarting), decisions go stale while the rest looks ready.
    waited = c.gate.uncounted_age_s()
    checks["spend_uncounted_oldest_s"] = None if waited is None else round(waited, 1)
    checks["spend_worker_counting"] = waited is None or waited <= c.settings.budget_max_staleness_s
    ready = checks["prices_loaded"] and (checks["kafka_connected"] or spool_room)
    if c.settings.routing.preload_model:
        ready = ready and checks["router_model_loaded"]
    if c.settings.budget_fail_closed:
        ready = ready and checks["budget_decisions_synced"] and checks["spend_worker_counting"]
    return json_response({"ready": ready, "checks": checks}, status=200 if ready else 503)


@operation(
    "Prometheus metrics", "open", media_type="text/plain", response_description="Text format"
)
async def metrics(request: web.Request) -> web.Response:
    c = request.app[COMPONENTS]
    c.metrics.kafka_connected.set(1 if c.emitter.kafka_connected else 0)
    return web.Response(body=c.metrics.render(), content_type="text/plain", charset="utf-8")


@operation("This document (OpenAPI 3.1)", "open", response_description="OpenAPI 3.1")
async def openapi(request: web.Request) -> web.Response:
    return json_response(openapi_document(ROUTES))


ROUTES: list[tuple[str, str, Callable[[web.Request], Awaitable[web.StreamResponse]]]] = [
    ("POST", "/v1/chat/completions", chat_completions),
    ("POST", "/v1/dispatch", dispatch),
    ("POST", "/v1/usage", report_usage),
    ("POST", "/v1/outcomes", report_outcomes),
    ("GET", "/v1/models", list_models),
    ("GET", "/v1/models/{model}", retrieve_model),
    ("GET", "/v1/reports/{name}", reports),
    ("GET", "/dashboard", dashboard),
    ("GET", "/v1/budgets", list_budgets),
    ("PUT", "/v1/budgets/{scope}", put_budget),
    ("GET", "/v1/budgets/{scope}", get_budget),
    ("DELETE", "/v1/budgets/{scope}", delete_budget),
    ("GET", "/v1/budgets/{scope}/status", budget_status),
    ("GET", "/healthz", healthz),
    ("GET", "/readyz", readyz),
    ("GET", "/metrics", metrics),
    ("GET", "/openapi.json", openapi),
]


# -- assembly ---------------------------------------------------------------------------
async def build_components(settings: Settings) -> Components:
    metrics_ = Metrics()
    prices = PriceCatalog(settings.baseline_model, settings.price_overrides_file)
    keys = KeyStore.load(settings.keys_file) if settings.keys_file else None
    clock = Clock(settings.clock_start)
    policies = PolicyBook()
    gate = BudgetGate(
        policies,
        clock,
        settings.budget_reservations,
        max_call_duration_s=settings.max_call_duration_s,
        max_overshoot_fraction=settings.budget_max_overshoot_fraction,
        policy_change_wait_s=settings.budget_policy_change_wait_s,
    )
    usage_topic = settings.topic("usage")
    codec = build_codec(settings.schema_registry_url)
    snapshot = BudgetSnapshot(settings.state_dir / "budget-view.json", codec)
    reported = ReportedRequests()  # learns the /v1/usage ids of the usage read back here
    uncounted = UncountedUsage(settings, gate, codec, reported, snapshot)

    def on_acked(seq: int, topic: str, partition: int, offset: int) -> None:
        if topic == usage_topic:
            gate.on_delivered(seq, partition, offset)
            snapshot.delivered(seq, partition, offset)

    emitter = EventEmitter(
        settings, codec, on_delivered=metrics_.events_delivered.inc, on_acked=on_acked
    )
    emitter.on_usage = uncounted.on_usage
    metrics_.bind_spool(lambda: emitter.depth, lambda: emitter.spool.size_bytes)
    upstreams = UpstreamPool(
        settings.effective_upstreams,
        settings.upstream_connect_timeout_s,
        settings.upstream_read_timeout_s,
    )

    def on_policy(scope: str, record: dict[str, Any] | None) -> None:
        # An older record's echo, read after this process's own change, is not applied, nor
        # saved: it replaced the admin's saved change until the change's own echo came
        if policies.apply_record(record, scope):
            snapshot.record("policies", scope, record)
        newer_file_digest = policies.take_file_digest_resend(scope)
        if record is not None and newer_file_digest is not None:
            resend_with_file_digest(record, newer_file_digest, policies, emitter)

    def on_decision(scope: str, record: dict[str, Any] | None) -> None:
        gate.on_decision(scope, record)
        snapshot.record("decisions", scope, record)

    policy_view = CompactedView(
        settings, settings.topic("budget.policies"), codec, on_record=on_policy
    )
    # Both views apply a read from the topic's beginning (a start, a lost broker) only once
    # caught up, and at once: a scope's older records, re-read, never reach the gate (a
    # review: an hour-old "open" replaced a saved "blocked" and the user was served).
    decision_view = CompactedView(
        settings, settings.topic("budget.decisions"), codec, on_record=on_decision
    )
    levers = SavingsLevers(
        settings.routing,
        settings.cache,
        tier_of_price=prices.tier,
        publish=lambda request_id, value: emitter.emit_bytes("routing.features", request_id, value),
    )
    shared_router = SharedRouter(settings, levers) if settings.routing.shared_learning else None
    await upstreams.start()
    # Ready only after catching up with every decision: a blocked user must not slip through
    # a restart. If Kafka is down or does not answer, serve on the spool with the view saved
    # before (fail-open). The reads of Kafka at start wait together, not one after another
    # (probe D1: a hung broker cost 10 s for the views, then 30 s for the shared model).
    catch_up, answer = settings.start_kafka_catch_up_s, settings.start_kafka_answer_wait_s
    await asyncio.gather(
        policy_view.start(catch_up, answer),
        decision_view.start(catch_up, answer),
        # the newest shared model before the first request, if Kafka answers
        *([shared_router.start(catch_up, answer)] if shared_router is not None else []),
    )
    restore_budget_view(snapshot, policy_view, decision_view, policies, gate)
    # Policies read while catching up are not changes: their scopes' counts are in the
    # decisions just read (the gate waits only on changes made from now on).
    policies.period_changed.clear()
    # the spool's usage (before it drains) and what the worker has not counted, now or
    # once the views catch up
    await uncounted.hold_at_start(emitter, usage_topic, [policy_view, decision_view])
    await emitter.start()
    budgets_file_pending = None
    if settings.budgets_file:
        entries = load_budgets_file(settings.budgets_file)
        if policy_view.synced.is_set():
            publish_budgets_file(entries, policy_view, policies, emitter)
        else:  # what the topic holds is not known: an API change there must not be undone
            budgets_file_pending = entries
            log.warning(
                "budgets file not applied yet: the policies topic was not read; it is applied "
                "once Kafka answers",
                extra={"file": str(settings.budgets_file), "entries": len(entries)},
            )
    config = GatewayConfig(
        fallback_output_tokens=settings.reserve_output_tokens,
        max_output_tokens=settings.max_output_tokens,
        max_call_duration_s=settings.max_call_duration_s,
        budget_queue_wait_s=settings.budget_queue_wait_s,
        dispatcher_id=dispatcher_id(settings.state_dir),
        boot_ts=event_time(),
    )
    gateway = Gateway(upstreams, prices, emitter, metrics_, gate, config)
    reports_session = aiohttp.ClientSession(  # a stalled sink must not hang report requests
        timeout=aiohttp.ClientTimeout(total=settings.reports_timeout_s),
        headers={"Authorization": f"Bearer {internal_token(settings)}"},
    )
    local_router = None
    if shared_router is None:
        local_router = LocalRouterCheckpoint(settings, levers)
        local_router.start()  # what this dispatcher learned before a restart
    return Components(
        settings,
        metrics_,
        emitter,
        upstreams,
        prices,
        gateway,
        keys,
        gate,
        policies,
        policy_view,
        decision_view,
        reports_session,
        levers,
        uncounted,
        shared_router,
        local_router,
        reported=reported,
        budget_snapshot=snapshot,
        budget_saver=BudgetViewSaver(snapshot, gate),
        budgets_file_pending=budgets_file_pending,
    )


def publish_budgets_file(
    entries: list[Policy],
    policy_view: CompactedView,
    policies: PolicyBook,
    emitter: EventEmitter,
) -> None:
    """Publish the budgets file's entries that changed since the file last published them,
    and remove the scopes it published and no longer names
    (``app.budgets.admin.apply_budgets_file``); a newer API or CLI change stays. Scopes this
    process changed since it started are left as changed."""
    records, _ = apply_budgets_file(entries, policy_view.records, skip=set(policies.awaiting))
    for record in records:
        emitter.emit_policy(record["scope"], record)
        if record.get("deleted"):
            policies.remove_local(record["scope"], record["event_id"], record)
        else:
            policies.put_local(Policy.from_record(record), record["event_id"], record)


def resend_with_file_digest(
    record: dict[str, Any], digest: str, policies: PolicyBook, emitter: EventEmitter
) -> None:
    """This dispatcher's API change of a scope, read back after another replica's newer
    budgets-file record it had not read when it was made: sent again carrying that record's
    digest, else the next start would publish the file's entry over it."""
    again = with_file_digest(record, digest)
    scope = again["scope"]
    emitter.emit_policy(scope, again)
    if again.get("deleted"):
        policies.remove_local(scope, again["event_id"], again, carries_file_digest=True)
    else:
        policy = Policy.from_record(again)
        policies.put_local(policy, again["event_id"], again, carries_file_digest=True)
    log.info(
        "admin change sent again naming the budgets file's newer entry, read after it was made",
        extra={"scope": scope, "changed_by": again.get("updated_by")},
    )


async def publish_budgets_file_when_read(components: Components) -> None:
    """The budgets file, once the policies topic is read (Kafka did not answer at start)."""
    entries = components.budgets_file_pending
    if entries is None:  # an empty file still removes what the file published
        return
    await components.policy_view.synced.wait()
    publish_budgets_file(entries, components.policy_view, components.policies, components.emitter)
    components.budgets_file_pending = None
    log.info("budgets file applied now that the policies topic was read")


def dispatcher_id(state_dir: Path) -> str:
    """A stable id for this dispatcher (its state directory); a restart keeps it, so the spend
    worker can tell that the calls of the previous boot died with it."""
    path = state_dir / "dispatcher.id"
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        state_dir.mkdir(parents=True, exist_ok=True)
        value = new_id("dsp_")
        path.write_text(value + "\n")
        return value


async def preload_router_model(components: Components) -> None:
    """``routing.preload_model``: load the router's failure model now, not with the first
    scored request (a failure is logged; the first scored request then tries again)."""
    try:
        await components.levers.load_model()
    except Exception:
        log.exception("preloading the router model failed; it loads with the first routed request")


def restore_budget_view(
    snapshot: BudgetSnapshot,
    policy_view: CompactedView,
    decision_view: CompactedView,
    policies: PolicyBook,
    gate: BudgetGate,
) -> None:
    """If Kafka did not answer, start from the policies and decisions saved before (none
    at all made every capped user uncapped until the broker came back: probe K). They are
    held in the views, which replace them with the topic's records once caught up with it
    (a scope the topic no longer holds is removed then)."""
    saved = snapshot.load()
    if not policy_view.synced.is_set():
        for scope, record in saved["policies"].items():
            if scope not in policy_view.records:
                policy_view.records[scope] = record
                policies.apply_record(record, scope)
    if not decision_view.synced.is_set():
        for scope, record in saved["decisions"].items():
            if scope not in decision_view.records:
                decision_view.records[scope] = record
                gate.on_decision(scope, record)
    if not (policy_view.synced.is_set() and decision_view.synced.is_set()):
        log.warning(
            "Kafka did not answer at start: budgets start from the view saved before",
            extra={"policies": len(saved["policies"]), "decisions": len(saved["decisions"])},
        )


def prune_held(document: dict[str, Any], gate: BudgetGate) -> list[tuple[str, Uncounted]]:
    """Takes out of a budget view ``document`` (``BudgetSnapshot.document``: copies) the usage
    decisions now count, and returns it. Each scope's decision is looked up once, not once an
    event (with the spend worker behind, 10,000 held events held the event loop about 50 ms
    every second); the gate's lookups take its lock, so this may run in a thread."""
    counted_if_capped = functools.cache(gate.counted_if_capped)

    def waiting(entry: Uncounted) -> bool:
        return gate.waits_for_count(entry.scopes, entry.partition, entry.offset, counted_if_capped)

    return pruned(document["uncounted"], waiting)


class BudgetViewSaver:
    """Saves the budget view (pruned: ``prune_held``), every second and when an admin's change
    must be on disk before it is answered, one save at a time and each from a document taken
    once the one before is written: an older document never lands over a newer one, nor two
    writes in one temporary file. Only copies of the view's dicts are taken on the event loop;
    the prune, the encoding and the writing (up to 10,000 held usage events) run in a thread,
    on those copies, while the loop goes on holding usage (an admin's save did all of it on
    the loop, then all but the write: ``bench.budget_view_save``). What the thread's prune
    dropped leaves the held view back on the loop. Who asks while a save waits for the one
    writing joins it (its document is taken later)."""

    def __init__(self, snapshot: BudgetSnapshot, gate: BudgetGate) -> None:
        self.snapshot = snapshot
        self.gate = gate
        self._lock = asyncio.Lock()
        self._next: asyncio.Task[None] | None = None  # not yet taken its document
        self._tasks: set[asyncio.Task[None]] = set()  # kept until done, callers gone or not

    async def save(self) -> None:
        """What changed until now, on disk once this returns (a failed write is logged and
        tried again at the next save). A caller cancelled does not stop the save: a write in
        a thread cannot be, and the next must wait for it."""
        if self._next is None or self._next.done():  # done: cancelled before it began
            self._next = asyncio.create_task(self._save(), name="budget-view-write")
            self._tasks.add(self._next)
            self._next.add_done_callback(self._tasks.discard)
        await asyncio.shield(self._next)

    async def _save(self) -> None:
        async with self._lock:
            self._next = None  # a change from now on is for the next save
            changed = self.snapshot.dirty
            document = self.snapshot.document(held_too=True)  # held usage: a prune may drop some
            if document is not None:
                done = await asyncio.to_thread(self._write, document, changed)
                self.snapshot.forget(done)

    def _write(self, document: dict[str, Any], changed: bool) -> list[tuple[str, Uncounted]]:
        """In a thread: ``document`` pruned, then written if that or the view changed."""
        done = prune_held(document, self.gate)
        if changed or done:
            self.snapshot.write(document)
        return done

    async def every(self, seconds: float) -> None:
        while True:
            await asyncio.sleep(seconds)
            await self.save()


async def save_budget_view(saver: BudgetViewSaver) -> None:
    """Every second: the budget view on disk, when it changed."""
    await saver.every(SAVE_EVERY_S)


async def sweep_reservations(components: Components) -> None:
    """Every few seconds: release reservations a call path failed to release (a bug)."""
    while True:
        await asyncio.sleep(5.0)
        swept = components.gate.sweep()
        if swept:
            components.metrics.budget_swept.inc(swept)
            log.error(
                "released reservations older than max_call_duration_s; a call path leaked them",
                extra={"count": swept},
            )


def expect_handler(max_body_bytes: int) -> Callable[[web.Request], Awaitable[None]]:
    """aiohttp's ``Expect: 100-continue`` handling, but a body announced past the limit is
    refused before it is sent (probe L: 100 Continue, 10 MB uploaded, then the 413)."""

    async def expect(request: web.Request) -> None:
        if request.version != HttpVersion11:
            return  # as aiohttp's: HTTP/1.0 has no 100 Continue
        if request.headers.get("Expect", "").lower() != "100-continue":
            raise web.HTTPExpectationFailed()  # answered in JSON by the runner
        if request.content_length is not None and request.content_length > max_body_bytes:
            raise web.HTTPRequestEntityTooLarge(
                max_size=max_body_bytes,
                actual_size=request.content_length,
                text=f"The request body is larger than {max_body_bytes} bytes "
                "(TOLLGATE_MAX_BODY_BYTES); nothing was read. Send a smaller body",
            )
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # the answer proper has not started

    return expect


def create_app(settings: Settings) -> web.Application:
    app = web.Application(middlewares=[api_middleware], client_max_size=settings.max_body_bytes)
    expect = expect_handler(settings.max_body_bytes)
    for method, path, handler in ROUTES:
        if method == "GET":  # HEAD too (RFC 9110), for probes that check without a body
            app.router.add_get(path, handler, expect_handler=expect)
        else:
            app.router.add_route(method, path, handler, expect_handler=expect)

    async def lifecycle(app: web.Application) -> Any:
        components = await build_components(settings)
        app[COMPONENTS] = components
        sweeper = asyncio.create_task(sweep_reservations(components), name="reservation-sweep")
        saver = None
        if components.budget_saver is not None:
            saver = asyncio.create_task(
                save_budget_view(components.budget_saver), name="budget-view-save"
            )
        pending_file = None
        if components.budgets_file_pending is not None:  # an empty file removes too
            pending_file = asyncio.create_task(
                publish_budgets_file_when_read(components), name="budgets-file"
            )
        preload = None
        if settings.routing.preload_model:  # /readyz waits for it
            preload = asyncio.create_task(preload_router_model(components), name="model-preload")
        yield
        sweeper.cancel()
        if saver is not None:
            saver.cancel()
        if preload is not None:
            preload.cancel()
        await components.uncounted.stop()
        if pending_file is not None:
            pending_file.cancel()
        await components.upstreams.close()
        await components.reports_session.close()
        await asyncio.gather(components.policy_view.stop(), components.decision_view.stop())
        if components.shared_router is not None:
            await components.shared_router.stop()
        if components.local_router is not None:
            await components.local_router.stop()
        await components.emitter.stop()
        if components.budget_saver is not None:  # after the last deliveries: theirs too
            await components.budget_saver.save()  # after a save under way, never with it

    app.cleanup_ctx.append(lifecycle)
    return app


# Routes whose calls cost money: the end of the client's stream while one is handled means
# the client gave up (a call waiting for room under a cap then leaves the line, a stream
# stops), not a half-close waiting for its answer (`app.http.runner`).
PAID_ROUTES = frozenset({"/v1/chat/completions", "/v1/dispatch"})


def client_gave_up(request: web.BaseRequest) -> bool:
    return request.method == "POST" and request.path in PAID_ROUTES


async def serve(
    settings: Settings, ready: asyncio.Event | None = None, handle_signals: bool = False
) -> None:
    """Run the dispatcher until cancelled (or, with ``handle_signals``, SIGTERM/SIGINT: the
    process's main thread only); the calls in flight finish and events are flushed on the
    way out."""
    check_exposure(settings)  # no open admin routes beyond loopback unless asked for
    app = create_app(settings)
    runner = await serve_app(
        app,
        settings.dispatcher_host,
        settings.dispatcher_port,
        shutdown_timeout=settings.max_call_duration_s,
        backlog=1024,
        reuse_address=True,
        eof_aborts=client_gave_up,
        head_timeout_s=settings.body_read_timeout_s,
    )
    log.info("dispatcher listening", extra={"url": settings.dispatcher_url})
    if ready is not None:
        ready.set()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = (signal.SIGTERM, signal.SIGINT) if handle_signals else ()
    for sig in signals:
        # A deploy's SIGTERM (or Ctrl-C) is not a crash: stop listening, let the calls in
        # flight finish (streams included, up to max_call_duration_s), flush their usage.
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
        log.info("dispatcher stopping: finishing the calls in flight, then flushing events")
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
        await runner.cleanup()
