"""The OpenAPI 3.1 document of the dispatcher, generated from the routes and the models.

Owns the assembly of ``/openapi.json``: every route of ``app.http.server.ROUTES`` becomes an
operation from what its handler declares with :func:`operation` (summary, who may call it,
the request model, the response model, the error statuses). Request schemas come from the
pydantic models that validate the bodies (``app.gateway.requests``, ``app.metering.ingest``,
``app.budgets.policy``), so the document cannot drift from what is enforced; response
schemas come from ``app.http.responses``, which exist for this document only.

Security: with a keys file every call needs ``Authorization: Bearer <key>`` (budget admin and
reports an admin key); without one the routes are open, which each operation says with an
empty requirement. Tests check the document with ``openapi-spec-validator``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, Field, TypeAdapter

from app.alerts_config import ALERT_KINDS
from app.http import responses
from app.http.reports_api import PARAMS, REPORTS
from app.ids import MAX_ID_LENGTH
from app.metering.ingest import MAX_BATCH, OutcomeReport, UsageReport
from app.validation import ID_TEXT
from app.warehouse.reports import BREAKDOWN_DIMENSIONS

ID_SCHEMA = {"type": "string", "maxLength": MAX_ID_LENGTH, "description": ID_TEXT}
REF = "#/components/schemas/{model}"
Access = Literal["user", "admin", "user_or_admin", "open"]
SECURITY: dict[Access, list[dict[str, list[str]]]] = {
    # Without a keys file every route is open: the empty requirement says keys are optional.
    "user": [{"apiKey": []}, {}],
    "admin": [{"adminKey": []}, {}],
    "user_or_admin": [{"apiKey": []}, {"adminKey": []}, {}],
    "open": [],
}


class UsageBatch(BaseModel):
    records: list[UsageReport] = Field(min_length=1, max_length=MAX_BATCH)


class OutcomeBatch(BaseModel):
    outcomes: list[OutcomeReport] = Field(min_length=1, max_length=MAX_BATCH)


# The shapes /v1/usage and /v1/outcomes accept: one record, a list, or a named list.
UsageBody = (
    UsageReport
    | Annotated[list[UsageReport], Field(min_length=1, max_length=MAX_BATCH)]
    | UsageBatch
)
OutcomeBody = (
    OutcomeReport
    | Annotated[list[OutcomeReport], Field(min_length=1, max_length=MAX_BATCH)]
    | OutcomeBatch
)
ATTRIBUTION_HEADERS = [
    {"name": h, "in": "header", "required": False, "schema": ID_SCHEMA}
    for h in ("X-Tollgate-User", "X-Tollgate-Session", "X-Tollgate-Feature", "X-Tollgate-Team")
]
SCOPE_PARAM = {
    "name": "scope",
    "in": "path",
    "required": True,
    "schema": {
        "type": "string",
        # The id part follows app.ids's rule (printable: the pattern keeps out control
        # characters; other non-printable ones are refused with a 400 naming them).
        "pattern": rf"^(global|(user|feature|team|key):[^\x00-\x1f\x7f-\x9f]{{1,{MAX_ID_LENGTH}}})$",
    },
    "description": "global, user:<id>, feature:<name>, team:<id>, key:<id>, or user:* / feature:*",
}
MODEL_PARAM = {
    "name": "model",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "minLength": 1, "maxLength": MAX_ID_LENGTH},
    "description": "A model id, as GET /v1/models lists them",
}
SSE_EVENT = {  # one event of a text/event-stream answer, as SSE parsers hand it over
    "type": "object",
    "properties": {
        "data": {
            "type": "string",
            "description": "A chat.completion.chunk as JSON (the provider's, passed through), "
            "an error object, or [DONE] at the end",
        },
        "event": {"type": "string"},
        "id": {"type": "string"},
    },
}
REPORT_PARAMS = [
    {
        "name": "from",
        "in": "query",
        "schema": {"type": "string", "format": "date-time"},
        "description": "Start of the range (default: 30 days before `to`); the range is at "
        "most 400 days, and `from` is before `to` (else 400)",
    },
    {
        "name": "to",
        "in": "query",
        "schema": {"type": "string", "format": "date-time"},
        "description": "End of the range (default: the end of the current minute)",
    },
    {
        "name": "by",
        "in": "query",
        "schema": {"type": "string", "enum": list(BREAKDOWN_DIMENSIONS)},
        "description": "breakdown: the dimension (default model); calls without a team, feature, "
        "tier or provider are in the row `(none)`",
    },
    {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 1000}},
    {
        "name": "offset",
        "in": "query",
        "schema": {"type": "integer", "minimum": 0, "maximum": 10_000_000},
        "description": "breakdown and alerts: the first row (alert) of the page (next_offset "
        "of the page before)",
    },
    {
        "name": "interval",
        "in": "query",
        "schema": {"type": "string", "enum": ["minute", "hour", "day"]},
        "description": "At most 50,000 intervals in the range (else 400: use a longer one)",
    },
    {
        "name": "kind",
        "in": "query",
        "schema": {"type": "string", "enum": [*ALERT_KINDS, "anomaly"]},
        "description": "alerts: only this kind, or `anomaly` for every kind but "
        "`budget_threshold` (another value: 400 listing the kinds)",
    },
]


@dataclass(frozen=True)
class Operation:
    """What a handler tells the document about itself."""

    summary: str
    access: Access
    ok: int = 200
    response: Any = None  # a pydantic model (or type) of the JSON answer
    response_description: str = "OK"
    media_type: str = "application/json"
    # other media types the success response may have (as text), e.g. an SSE stream
    also_media_types: tuple[str, ...] = ()
    body: Any = None  # the pydantic model (or type) of the JSON request body
    errors: tuple[int, ...] = ()
    parameters: tuple[dict[str, Any], ...] = ()
    description: str | None = None
    extra_responses: tuple[tuple[int, str], ...] = ()
    # name -> (description, JSON schema) of headers the success response may carry, beyond
    # X-Request-Id (every non-open route's)
    response_headers: tuple[tuple[str, str, dict[str, Any]], ...] = ()


H = TypeVar("H", bound=Callable[..., Any])


def operation(summary: str, access: Access, **details: Any) -> Callable[[H], H]:
    """Declare a handler's operation for ``/openapi.json`` (see :class:`Operation`)."""

    def mark(handler: H) -> H:
        handler.openapi = Operation(summary, access, **details)  # type: ignore[attr-defined]
        return handler

    return mark


def operation_of(handler: Callable[..., Any]) -> Operation | None:
    return getattr(handler, "openapi", None)


class _Schemas:
    """JSON schemas of pydantic types, their definitions gathered under components."""

    def __init__(self) -> None:
        self.components: dict[str, Any] = {}

    def of(self, kind: Any) -> dict[str, Any]:
        schema = TypeAdapter(kind).json_schema(ref_template=REF)
        self.components.update(schema.pop("$defs", {}))
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            self.components[kind.__name__] = schema
            return {"$ref": REF.format(model=kind.__name__)}
        return schema


def _path_parameters(path: str) -> list[dict[str, Any]]:
    return [SCOPE_PARAM] if "{scope}" in path else [MODEL_PARAM] if "{model}" in path else []


def _each_report(path: str, op: Operation) -> Iterable[tuple[str, str, Operation]]:
    """``/v1/reports/{name}`` as one path per report, each with the query parameters that
    report takes (another is a 400), so a client or fuzzer sees exactly what is accepted."""
    if "{name}" not in path:
        yield path, "", op
        return
    for name in REPORTS:
        parameters = tuple(p for p in op.parameters if p["name"] in PARAMS[name])
        yield path.replace("{name}", name), f"_{name}", replace(op, parameters=parameters)


def _operation(op: Operation, path: str, schemas: _Schemas) -> dict[str, Any]:
    error = schemas.of(responses.ErrorBody)
    ok: dict[str, Any] = {"description": op.response_description}
    if op.response is not None:
        ok["content"] = {op.media_type: {"schema": schemas.of(op.response)}}
    elif op.media_type != "application/json":
        ok["content"] = {op.media_type: {"schema": {"type": "string"}}}
    for media_type in op.also_media_types:
        schema = SSE_EVENT if media_type == "text/event-stream" else {"type": "string"}
        ok.setdefault("content", {})[media_type] = {"schema": schema}
    headers: dict[str, Any] = {}
    if op.access != "open":
        headers["X-Request-Id"] = {
            "description": "The gateway's id of this request",
            "schema": {"type": "string"},
        }
    for name, description, schema in op.response_headers:
        headers[name] = {"description": description, "schema": schema}
    if headers:
        ok["headers"] = headers
    result: dict[str, Any] = {
        "summary": op.summary,
        "security": SECURITY[op.access],
        "responses": {
            str(op.ok): ok,
            **{str(s): {"description": d} for s, d in op.extra_responses},
            **{
                str(s): {"description": "Error", "content": {"application/json": {"schema": error}}}
                for s in op.errors
            },
        },
    }
    if op.description:
        result["description"] = op.description
    parameters = _path_parameters(path) + list(op.parameters)
    if parameters:
        result["parameters"] = parameters
    if op.body is not None:
        result["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": schemas.of(op.body)}},
        }
    return result


def openapi_document(routes: Iterable[tuple[str, str, Callable[..., Any]]]) -> dict[str, Any]:
    """The document of ``routes`` (``app.http.server.ROUTES``); a route whose handler
    declares no :func:`operation` is an error, so the document lists every route."""
    schemas = _Schemas()
    paths: dict[str, dict[str, Any]] = {}
    for method, path, handler in routes:
        op = operation_of(handler)
        if op is None:
            raise ValueError(f"{method} {path}: its handler declares no @operation")
        for concrete, suffix, each in _each_report(path, op):
            result = {
                "operationId": handler.__name__ + suffix,
                **_operation(each, concrete, schemas),
            }
            paths.setdefault(concrete, {})[method.lower()] = result
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Tollgate dispatcher",
            "version": "0.1.0",
            "description": "A FinOps gateway for LLM traffic: OpenAI-compatible chat, usage and "
            "outcome reports, budget caps (402 before the provider is called) and reports.",
        },
        "paths": paths,
        "components": {
            "securitySchemes": {
                "apiKey": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "An API key of TOLLGATE_KEYS_FILE (also accepted as "
                    "X-Api-Key). Required when a keys file is configured; the key's user is "
                    "authoritative for attribution.",
                },
                "adminKey": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "An API key with admin: true. Budget administration and "
                    "reports (everyone's spend) need one when a keys file is configured.",
                },
            },
            "schemas": schemas.components,
        },
    }
