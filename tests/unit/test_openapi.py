"""/openapi.json must be valid OpenAPI 3.1 (code generators and schemathesis refuse it otherwise),
list every route, declare how to authenticate, and describe the bounds the models enforce."""

from __future__ import annotations

from typing import Any

import pytest
from openapi_spec_validator import OpenAPIV31SpecValidator, validate

from app.gateway.chat import Served
from app.gateway.requests import MAX_TOKENS_LIMIT
from app.http.chat import served_headers
from app.http.openapi import openapi_document
from app.http.reports_api import REPORTS
from app.http.server import ROUTES
from app.ids import MAX_ID_LENGTH
from app.metering.ingest import MAX_USD

ADMIN_ROUTES = {
    ("/v1/budgets", "get"),
    ("/v1/budgets/{scope}", "put"),
    ("/v1/budgets/{scope}", "get"),
    ("/v1/budgets/{scope}", "delete"),
    *((f"/v1/reports/{name}", "get") for name in REPORTS),
}
OPEN_ROUTES = {
    "/healthz",
    "/readyz",
    "/metrics",
    "/openapi.json",
    "/dashboard",
}


@pytest.fixture(scope="module")
def spec() -> dict[str, Any]:
    return openapi_document(ROUTES)


def _body_schema(spec: dict[str, Any], path: str, method: str = "post") -> dict[str, Any]:
    schema = spec["paths"][path][method]["requestBody"]["content"]["application/json"]["schema"]
    return _resolve(spec, schema)


def _resolve(spec: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    ref = schema.get("$ref")
    return spec["components"]["schemas"][ref.rsplit("/", 1)[1]] if ref else schema


def test_the_document_is_valid_openapi_3_1(spec: dict[str, Any]) -> None:
    assert spec["openapi"].startswith("3.1")
    validate(spec, cls=OpenAPIV31SpecValidator)  # raises with the path of the first problem


def test_every_route_is_documented_once(spec: dict[str, Any]) -> None:
    documented = {(path, method) for path, ops in spec["paths"].items() for method in ops}
    routes = {(path, method.lower()) for method, path, _ in ROUTES}
    reports = {(f"/v1/reports/{name}", "get") for name in REPORTS}  # one path per report
    assert documented == routes - {("/v1/reports/{name}", "get")} | reports
    ids = [op["operationId"] for ops in spec["paths"].values() for op in ops.values()]
    assert len(ids) == len(set(ids))


def test_a_route_without_an_operation_is_refused() -> None:
    async def undocumented(request: Any) -> Any:
        return None

    with pytest.raises(ValueError, match="/v1/new"):
        openapi_document([*ROUTES, ("GET", "/v1/new", undocumented)])


def test_security_schemes_are_declared_and_used(spec: dict[str, Any]) -> None:
    schemes = spec["components"]["securitySchemes"]
    assert schemes["apiKey"] == {
        "type": "http",
        "scheme": "bearer",
        "description": schemes["apiKey"]["description"],
    }
    assert schemes["adminKey"]["type"] == "http" and schemes["adminKey"]["scheme"] == "bearer"
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            names = {name for requirement in operation.get("security", []) for name in requirement}
            if path in OPEN_ROUTES:
                assert operation.get("security") == [], (path, method)
            elif (path, method) in ADMIN_ROUTES:
                assert names == {"adminKey"}, (path, method)
            else:
                assert "apiKey" in names, (path, method)
            # Keys are optional without a keys file: an empty requirement says so.
            if operation.get("security"):
                assert {} in operation["security"], (path, method)


def test_the_documented_bounds_are_the_enforced_ones(spec: dict[str, Any]) -> None:
    chat = _body_schema(spec, "/v1/chat/completions")["properties"]
    assert chat["max_tokens"]["anyOf"][0]["maximum"] == MAX_TOKENS_LIMIT
    assert chat["user"]["anyOf"][0]["maxLength"] == MAX_ID_LENGTH
    assert _body_schema(spec, "/v1/chat/completions")["additionalProperties"] is True
    outcome = spec["components"]["schemas"]["OutcomeReport"]["properties"]
    assert outcome["value_usd"]["anyOf"][0]["maximum"] == int(MAX_USD)
    headers = {p["name"]: p for p in spec["paths"]["/v1/dispatch"]["post"]["parameters"]}
    assert headers["X-Tollgate-User"]["schema"]["maxLength"] == MAX_ID_LENGTH
    policy = _body_schema(spec, "/v1/budgets/{scope}", "put")
    assert policy["required"] == ["limit_usd"] and policy["additionalProperties"] is False


def test_errors_and_answers_have_schemas(spec: dict[str, Any]) -> None:
    chat = spec["paths"]["/v1/chat/completions"]["post"]["responses"]
    error = _resolve(spec, chat["402"]["content"]["application/json"]["schema"])
    assert error["required"] == ["error"]
    usage = spec["paths"]["/v1/usage"]["post"]["responses"]["202"]
    answer = _resolve(spec, usage["content"]["application/json"]["schema"])
    assert set(answer["properties"]) == {"accepted", "repeated", "events", "ignored_fields"}


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/dispatch"])
def test_chat_response_headers_are_documented(spec: dict[str, Any], path: str) -> None:
    """Every header the chat routes render from a served call is in the document (the
    integration test checks the headers a client really receives against it)."""
    headers = spec["paths"][path]["post"]["responses"]["200"]["headers"]
    served = served_headers(
        Served("gpt-4o", "standard", "miss", router_score=0.25, escalated_from="gpt-4o-mini",
               max_tokens_cap=12)
    )  # fmt: skip
    assert set(served) <= set(headers)
    assert {"X-Request-Id", "X-Client-Request-Id"} <= set(headers)
    assert headers["X-Tollgate-Cache"]["schema"]["enum"] == ["hit", "miss", "bypass"]
    assert set(headers["X-Tollgate-Tier"]["schema"]["enum"]) == {"economy", "standard", "premium"}
    for name, header in headers.items():
        assert header["description"], name
        assert header["schema"]["type"] == "string", name
