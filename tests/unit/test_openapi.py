"""/openapi.json must be valid OpenAPI 3.0.3 (code generators and schemathesis refuse it otherwise),
declare how to authenticate, and describe the bounds the API enforces."""

from __future__ import annotations

from openapi_spec_validator import validate

from app.gateway.requests import MAX_TOKENS_LIMIT
from app.http.openapi import openapi_document
from app.ids import MAX_ID_LENGTH
from app.metering.ingest import MAX_USD

ADMIN_ROUTES = {
    ("/v1/budgets", "get"),
    ("/v1/budgets/{scope}", "put"),
    ("/v1/budgets/{scope}", "get"),
    ("/v1/budgets/{scope}", "delete"),
    ("/v1/reports/{name}", "get"),
}
OPEN_ROUTES = {"/healthz", "/readyz", "/metrics", "/openapi.json", "/dashboard", "/v1/models"}


def test_the_document_is_valid_openapi() -> None:
    validate(openapi_document())  # raises with the path of the first problem


def test_security_schemes_are_declared_and_used() -> None:
    spec = openapi_document()
    schemes = spec["components"]["securitySchemes"]
    assert schemes["apiKey"] == {
        "type": "http",
        "scheme": "bearer",
        "description": schemes["apiKey"]["description"],
    }
    assert schemes["adminKey"]["type"] == "http" and schemes["adminKey"]["scheme"] == "bearer"
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            if method == "parameters":
                continue
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


def test_the_documented_bounds_are_the_enforced_ones() -> None:
    spec = openapi_document()
    chat = spec["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"][
        "application/json"
    ]["schema"]["properties"]
    assert chat["max_tokens"]["maximum"] == MAX_TOKENS_LIMIT
    assert chat["user"]["maxLength"] == MAX_ID_LENGTH
    outcome = spec["components"]["schemas"]["Outcome"]["properties"]
    assert outcome["value_usd"]["maximum"] == int(MAX_USD)
    headers = {p["name"]: p for p in spec["paths"]["/v1/dispatch"]["post"]["parameters"]}
    assert headers["X-Tollgate-User"]["schema"]["maxLength"] == MAX_ID_LENGTH
