"""The OpenAPI 3 document of the dispatcher's routes (a test keeps it in step with the router)."""

from __future__ import annotations

from typing import Any

ERROR = {"$ref": "#/components/schemas/Error"}


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
        "model": {"type": "string"},
        "messages": {"type": "array", "minItems": 1, "items": MESSAGE},
        "max_tokens": {"type": "integer", "minimum": 1},
        "max_completion_tokens": {"type": "integer", "minimum": 1},
        "stream": {"type": "boolean"},
        "stream_options": {"type": "object"},
        "user": {"type": "string", "description": "Attributed user (OpenAI field)."},
        "user_id": {"type": "string"},
        "session_id": {"type": "string"},
        "metadata": {"type": "object", "properties": {"feature": {"type": "string"}}},
    },
}
USAGE_RECORD = {
    "type": "object",
    "required": ["model", "prompt_tokens", "completion_tokens"],
    "properties": {
        "model": {"type": "string"},
        "prompt_tokens": {"type": "integer", "minimum": 0},
        "completion_tokens": {"type": "integer", "minimum": 0},
        "cached_tokens": {"type": "integer", "minimum": 0},
        "model_requested": {
            "type": "string",
            "description": "Model the caller asked for, when a router served `model` instead "
            "(the difference is reported as routing savings)",
        },
        "cache_hit": {
            "type": "boolean",
            "description": "A cache answered without a provider call: cost 0, and the "
            "model's price for these tokens is reported as cache savings",
        },
        "user_id": {"type": "string"},
        "session_id": {"type": "string"},
        "feature": {"type": "string"},
        "request_id": {"type": "string"},
        "provider": {"type": "string"},
        "ts": {"description": "ISO 8601 or epoch milliseconds"},
        "latency_ms": {"type": "integer", "minimum": 0},
        "status": {"type": "string", "enum": ["ok", "error", "client_disconnected", "timeout"]},
        "metadata": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}
OUTCOME = {
    "type": "object",
    "required": ["outcome"],
    "properties": {
        "request_id": {"type": "string"},
        "session_id": {"type": "string"},
        "outcome": {"type": "string", "enum": ["success", "failure"]},
        "kind": {"type": "string"},
        "value_usd": {"type": "number", "minimum": 0},
        "ts": {"description": "ISO 8601 or epoch milliseconds"},
        "metadata": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}
POLICY = {
    "type": "object",
    "required": ["limit_usd"],
    "properties": {
        "period": {"type": "string", "enum": ["day", "month", "window"], "default": "month"},
        "limit_usd": {"type": "number", "exclusiveMinimum": 0},
        "thresholds": {"type": "array", "items": {"type": "number"}, "default": [0.5, 0.8, 1.0]},
        "timezone": {"type": "string", "default": "UTC"},
        "window": {"description": "period=window only: seconds or '1h', '30m', '7d'"},
        "upgrade_url": {"type": "string"},
        "upgrade_prompt": {"type": "string"},
    },
}
SCOPE_PARAM = {
    "name": "scope",
    "in": "path",
    "required": True,
    "schema": {"type": "string"},
    "description": "global, user:<id>, feature:<name>, team:<id>, key:<id>, or user:* / feature:*",
}
ATTRIBUTION_HEADERS = [
    {"name": h, "in": "header", "required": False, "schema": {"type": "string"}}
    for h in ("X-Tollgate-User", "X-Tollgate-Session", "X-Tollgate-Feature")
]


def _chat_operation(summary: str) -> dict[str, Any]:
    return {
        "summary": summary,
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
                    "parameters": ATTRIBUTION_HEADERS,
                    "requestBody": {
                        "required": True,
                        **_json(
                            {
                                "oneOf": [
                                    USAGE_RECORD,
                                    {"type": "array", "items": USAGE_RECORD},
                                    {
                                        "type": "object",
                                        "properties": {
                                            "records": {"type": "array", "items": USAGE_RECORD}
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
                    "requestBody": {
                        "required": True,
                        **_json({"oneOf": [OUTCOME, {"type": "array", "items": OUTCOME}]}),
                    },
                    "responses": {**accepted, **_errors(400, 401, 413)},
                }
            },
            "/v1/budgets": {
                "get": {
                    "summary": "List budget policies",
                    "responses": {"200": {"description": "Policies"}, **_errors(401, 403)},
                }
            },
            "/v1/budgets/{scope}": {
                "parameters": [SCOPE_PARAM],
                "put": {
                    "summary": "Create or replace the policy of a scope",
                    "requestBody": {"required": True, **_json(POLICY)},
                    "responses": {"200": {"description": "The policy"}, **_errors(400, 401, 403)},
                },
                "get": {
                    "summary": "The policy of a scope",
                    "responses": {"200": {"description": "The policy"}, **_errors(401, 403, 404)},
                },
                "delete": {
                    "summary": "Remove the policy of a scope",
                    "responses": {"200": {"description": "Removed"}, **_errors(401, 403, 404)},
                },
            },
            "/v1/budgets/{scope}/status": {
                "parameters": [SCOPE_PARAM],
                "get": {
                    "summary": "Spent, limit, state, period and resets_at of a scope",
                    "responses": {"200": {"description": "Status"}, **_errors(401, 403, 404)},
                },
            },
            "/v1/reports/{name}": {
                "get": {
                    "summary": "ROI and spend reports from the warehouse",
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
                    "responses": {"200": {"description": "Report"}, **_errors(400, 404, 503)},
                }
            },
            "/dashboard": {
                "get": {
                    "summary": "Built-in spend dashboard (HTML reading /v1/reports/*)",
                    "responses": {"200": {"description": "HTML page"}},
                }
            },
            "/v1/models": {
                "get": {"summary": "Models served", "responses": {"200": {"description": "List"}}}
            },
            "/healthz": {
                "get": {"summary": "Liveness", "responses": {"200": {"description": "Alive"}}}
            },
            "/readyz": {
                "get": {
                    "summary": "Readiness: prices loaded and Kafka connected or spool usable",
                    "responses": {
                        "200": {"description": "Ready"},
                        "503": {"description": "Not ready"},
                    },
                }
            },
            "/metrics": {
                "get": {
                    "summary": "Prometheus metrics",
                    "responses": {"200": {"description": "Text format"}},
                }
            },
            "/openapi.json": {
                "get": {
                    "summary": "This document",
                    "responses": {"200": {"description": "OpenAPI 3"}},
                }
            },
        },
        "components": {
            "schemas": {
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
                }
            }
        },
    }
