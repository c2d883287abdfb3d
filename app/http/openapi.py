"""The OpenAPI 3.0.3 document of the dispatcher's routes.

Tests keep it in step with the router, valid (``openapi-spec-validator``) and in step with the
bounds the validators enforce (``app.ids``, ``app.metering.ingest``, ``app.gateway.pipeline``). Security: with a
keys file every call needs ``Authorization: Bearer <key>`` (budget admin and reports an admin
key); without one the routes are open, which each operation says with an empty requirement.
"""

from __future__ import annotations

from typing import Any

from app.budgets.policy import MAX_LIMIT_USD
from app.gateway.requests import MAX_TOKENS_LIMIT
from app.ids import MAX_ID_LENGTH
from app.metering.ingest import MAX_COUNT, MAX_METADATA_ENTRIES, MAX_USD

ERROR = {"$ref": "#/components/schemas/Error"}
ID_TEXT = f"Printable text (no control characters), at most {MAX_ID_LENGTH} characters"
ID = {"type": "string", "maxLength": MAX_ID_LENGTH, "description": ID_TEXT}
TOKENS = {"type": "integer", "minimum": 0, "maximum": MAX_COUNT}
METADATA = {
    "type": "object",
    "maxProperties": MAX_METADATA_ENTRIES,
    "additionalProperties": ID,
    "description": f"At most {MAX_METADATA_ENTRIES} entries; keys and values are ids",
}
TIMESTAMP = {
    "description": "ISO 8601 or epoch milliseconds, within TOLLGATE_USAGE_MAX_LATENESS_S "
    "(default 7 days) before the gateway's clock and TOLLGATE_USAGE_MAX_CLOCK_SKEW_S "
    "(default 5 minutes) after it",
    "oneOf": [{"type": "string", "format": "date-time"}, {"type": "integer"}],
}
# Without a keys file every route is open: the empty requirement says keys are optional then.
USER_KEY: list[dict[str, list[str]]] = [{"apiKey": []}, {}]
ADMIN_KEY: list[dict[str, list[str]]] = [{"adminKey": []}, {}]
OPEN: list[dict[str, list[str]]] = []


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"content": {"application/json": {"schema": schema}}}


def _errors(*statuses: int) -> dict[str, Any]:
    return {str(s): {"description": "Error", **_json(ERROR)} for s in statuses}


MESSAGE = {
    "type": "object",
    "required": ["role"],
    "properties": {"role": {"type": "string"}, "content": {}},
}
CHAT_BODY = {
    "type": "object",
    "required": ["messages"],
    "properties": {
        "model": ID,
        "messages": {"type": "array", "minItems": 1, "items": MESSAGE},
        "max_tokens": {"type": "integer", "minimum": 1, "maximum": MAX_TOKENS_LIMIT},
        "max_completion_tokens": {"type": "integer", "minimum": 1, "maximum": MAX_TOKENS_LIMIT},
        "stream": {"type": "boolean"},
        "stream_options": {"type": "object"},
        "user": {**ID, "description": "Attributed user (OpenAI field); " + ID_TEXT},
        "user_id": ID,
        "session_id": ID,
        "metadata": {"type": "object", "properties": {"feature": ID}},
    },
}
USAGE_RECORD = {
    "type": "object",
    "required": ["model", "prompt_tokens", "completion_tokens"],
    "properties": {
        "model": ID,
        "prompt_tokens": TOKENS,
        "completion_tokens": TOKENS,
        "cached_tokens": TOKENS,
        "model_requested": {
            **ID,
            "description": "Model the caller asked for, when a router served `model` instead "
            "(the difference is reported as routing savings)",
        },
        "cache_hit": {
            "type": "boolean",
            "description": "A cache answered without a provider call: cost 0, and the "
            "model's price for these tokens is reported as cache savings",
        },
        "user_id": ID,
        "session_id": ID,
        "feature": ID,
        "request_id": ID,
        "provider": ID,
        "ts": TIMESTAMP,
        "latency_ms": TOKENS,
        "status": {"type": "string", "enum": ["ok", "error", "client_disconnected", "timeout"]},
        "metadata": METADATA,
    },
}
OUTCOME = {
    "type": "object",
    "required": ["outcome"],
    "description": "Needs request_id or session_id. With keys, a non-admin key may report only "
    "on its own user's requests and sessions (or users in its may_act_for): else 403.",
    "properties": {
        "request_id": ID,
        "session_id": ID,
        "user_id": ID,
        "outcome": {"type": "string", "enum": ["success", "failure"]},
        "kind": ID,
        "value_usd": {"type": "number", "minimum": 0, "maximum": int(MAX_USD)},
        "ts": TIMESTAMP,
        "metadata": METADATA,
    },
}
POLICY = {
    "type": "object",
    "required": ["limit_usd"],
    "properties": {
        "period": {"type": "string", "enum": ["day", "month", "window"], "default": "month"},
        "limit_usd": {
            "type": "number",
            "minimum": 0,
            "exclusiveMinimum": True,  # OpenAPI 3.0: a flag on minimum, not a number
            "maximum": int(MAX_LIMIT_USD),
        },
        "thresholds": {
            "type": "array",
            "minItems": 1,
            "items": {"type": "number", "minimum": 0, "exclusiveMinimum": True, "maximum": 1},
            "default": [0.5, 0.8, 1.0],
        },
        "timezone": {"type": "string", "default": "UTC", "description": "IANA time zone"},
        "window": {"description": "period=window only: seconds or '1h', '30m', '7d'"},
        "upgrade_url": {"type": "string", "maxLength": 2000},
        "upgrade_prompt": {"type": "string", "maxLength": 2000},
    },
}
USAGE_REF = {"$ref": "#/components/schemas/UsageRecord"}
OUTCOME_REF = {"$ref": "#/components/schemas/Outcome"}
SCOPE_PARAM = {
    "name": "scope",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "maxLength": MAX_ID_LENGTH + 8},
    "description": "global, user:<id>, feature:<name>, team:<id>, key:<id>, or user:* / feature:*",
}
ATTRIBUTION_HEADERS = [
    {"name": h, "in": "header", "required": False, "schema": ID}
    for h in ("X-Tollgate-User", "X-Tollgate-Session", "X-Tollgate-Feature")
]


def _chat_operation(summary: str) -> dict[str, Any]:
    return {
        "summary": summary,
        "security": USER_KEY,
        "parameters": ATTRIBUTION_HEADERS,
        "requestBody": {"required": True, **_json(CHAT_BODY)},
        "responses": {
            "200": {
                "description": "Completion (JSON) or stream (text/event-stream)",
                "headers": {"X-Request-Id": {"schema": {"type": "string"}}},
            },
            **_errors(400, 401, 402, 403, 404, 413, 502, 503, 504),
        },
    }


def openapi_document() -> dict[str, Any]:
    accepted = {
        "202": {"description": "Accepted and queued for delivery", **_json({"type": "object"})}
    }
    return {
        "openapi": "3.0.3",
        "info": {"title": "Tollgate dispatcher", "version": "0.1.0"},
        "paths": {
            "/v1/chat/completions": {"post": _chat_operation("OpenAI-compatible chat completion")},
            "/v1/dispatch": {"post": _chat_operation("Native chat API; model is optional")},
            "/v1/usage": {
                "post": {
                    "summary": "Report usage of calls made outside the gateway (one or a batch)",
                    "security": USER_KEY,
                    "parameters": ATTRIBUTION_HEADERS,
                    "requestBody": {
                        "required": True,
                        **_json(
                            {
                                "oneOf": [
                                    USAGE_REF,
                                    {"type": "array", "items": USAGE_REF, "maxItems": 1000},
                                    {
                                        "type": "object",
                                        "required": ["records"],
                                        "properties": {
                                            "records": {
                                                "type": "array",
                                                "items": USAGE_REF,
                                                "maxItems": 1000,
                                            }
                                        },
                                    },
                                ]
                            }
                        ),
                    },
                    "responses": {**accepted, **_errors(400, 401, 403, 413)},
                }
            },
            "/v1/outcomes": {
                "post": {
                    "summary": "Record business outcomes for cost per successful outcome",
                    "security": USER_KEY,
                    "requestBody": {
                        "required": True,
                        **_json(
                            {
                                "oneOf": [
                                    OUTCOME_REF,
                                    {"type": "array", "items": OUTCOME_REF, "maxItems": 1000},
                                ]
                            }
                        ),
                    },
                    "responses": {**accepted, **_errors(400, 401, 403, 413)},
                }
            },
            "/v1/budgets": {
                "get": {
                    "summary": "List budget policies",
                    "security": ADMIN_KEY,
                    "responses": {"200": {"description": "Policies"}, **_errors(401, 403)},
                }
            },
            "/v1/budgets/{scope}": {
                "parameters": [SCOPE_PARAM],
                "put": {
                    "summary": "Create or replace the policy of a scope",
                    "security": ADMIN_KEY,
                    "requestBody": {"required": True, **_json(POLICY)},
                    "responses": {"200": {"description": "The policy"}, **_errors(400, 401, 403)},
                },
                "get": {
                    "summary": "The policy of a scope",
                    "security": ADMIN_KEY,
                    "responses": {"200": {"description": "The policy"}, **_errors(401, 403, 404)},
                },
                "delete": {
                    "summary": "Remove the policy of a scope",
                    "security": ADMIN_KEY,
                    "responses": {"200": {"description": "Removed"}, **_errors(401, 403, 404)},
                },
            },
            "/v1/budgets/{scope}/status": {
                "parameters": [SCOPE_PARAM],
                "get": {
                    "summary": "Spent, limit, state, period and resets_at of a scope",
                    "description": "Any key may read its own user's status; an admin key any scope's.",
                    "security": [{"apiKey": []}, {"adminKey": []}, {}],
                    "responses": {"200": {"description": "Status"}, **_errors(401, 403, 404)},
                },
            },
            "/v1/reports/{name}": {
                "get": {
                    "summary": "ROI and spend reports from the warehouse",
                    "security": ADMIN_KEY,
                    "description": "summary: totals and the finance sentence; breakdown: spend "
                    "by model, user, feature, tier or provider (by=user&limit=10: top spenders); "
                    "timeseries: cost per minute, hour or day with anomaly flags; savings: "
                    "savings vs the baseline model, decomposed into model choice, routing, "
                    "prompt caching and cache hits, with cache hit rate and routing efficiency; "
                    "outcomes: cost per successful outcome by feature; budgets: status of every "
                    "capped scope. Ranges default to the last 30 days; `to` is exclusive.",
                    "parameters": [
                        {
                            "name": "name",
                            "in": "path",
                            "required": True,
                            "schema": {
                                "type": "string",
                                "enum": [
                                    "summary",
                                    "breakdown",
                                    "timeseries",
                                    "savings",
                                    "outcomes",
                                    "budgets",
                                ],
                            },
                        },
                        {
                            "name": "from",
                            "in": "query",
                            "schema": {"type": "string", "format": "date-time"},
                        },
                        {
                            "name": "to",
                            "in": "query",
                            "schema": {"type": "string", "format": "date-time"},
                        },
                        {
                            "name": "by",
                            "in": "query",
                            "schema": {
                                "type": "string",
                                "enum": ["model", "user", "feature", "tier", "provider"],
                            },
                        },
                        {
                            "name": "limit",
                            "in": "query",
                            "schema": {"type": "integer", "minimum": 1, "maximum": 1000},
                        },
                        {
                            "name": "interval",
                            "in": "query",
                            "schema": {"type": "string", "enum": ["minute", "hour", "day"]},
                        },
                    ],
                    "responses": {
                        "200": {"description": "Report"},
                        **_errors(400, 401, 403, 404, 503),
                    },
                }
            },
            "/dashboard": {
                "get": {
                    "summary": "Built-in spend dashboard (HTML reading /v1/reports/*)",
                    "security": OPEN,
                    "responses": {"200": {"description": "HTML page"}},
                }
            },
            "/v1/models": {
                "get": {
                    "summary": "Models served",
                    "security": OPEN,
                    "responses": {"200": {"description": "List"}},
                }
            },
            "/healthz": {
                "get": {
                    "summary": "Liveness",
                    "security": OPEN,
                    "responses": {"200": {"description": "Alive"}},
                }
            },
            "/readyz": {
                "get": {
                    "summary": "Readiness: prices loaded and Kafka connected or spool usable",
                    "security": OPEN,
                    "responses": {
                        "200": {"description": "Ready"},
                        "503": {"description": "Not ready"},
                    },
                }
            },
            "/metrics": {
                "get": {
                    "summary": "Prometheus metrics",
                    "security": OPEN,
                    "responses": {"200": {"description": "Text format"}},
                }
            },
            "/openapi.json": {
                "get": {
                    "summary": "This document",
                    "security": OPEN,
                    "responses": {"200": {"description": "OpenAPI 3"}},
                }
            },
        },
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
            "schemas": {
                "UsageRecord": USAGE_RECORD,
                "Outcome": OUTCOME,
                "Error": {
                    "type": "object",
                    "required": ["error"],
                    "properties": {
                        "error": {
                            "type": "object",
                            "required": ["type", "message"],
                            "properties": {
                                "type": {"type": "string"},
                                "message": {"type": "string"},
                                "param": {"type": "string", "nullable": True},
                                "code": {"type": "string", "nullable": True},
                            },
                        }
                    },
                },
            },
        },
    }
