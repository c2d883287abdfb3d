"""The one mapping from domain errors to HTTP (app.http.errors): complete, and the shapes clients see."""

import orjson
import pytest

import app.errors as domain
from app.errors import (
    InvalidRequest,
    ModelNotServed,
    NotAuthenticated,
    NotPermitted,
    TollgateError,
    UpstreamFailed,
    UpstreamTimedOut,
)
from app.http.errors import STATUS_OF, http_error, sse_error_event


def test_every_domain_error_has_an_http_mapping() -> None:
    # A new domain error without a row in STATUS_OF would reach clients as a 500.
    kinds = [
        obj
        for obj in vars(domain).values()
        if isinstance(obj, type) and issubclass(obj, TollgateError) and obj is not TollgateError
    ]
    assert kinds and all(kind in STATUS_OF for kind in kinds)


@pytest.mark.parametrize(
    ("error", "status", "error_type", "code"),
    [
        (
            InvalidRequest("'n' must be a positive integer", field="n"),
            400,
            "invalid_request_error",
            "invalid_request_error",
        ),
        (
            NotAuthenticated("The API key is not known"),
            401,
            "authentication_error",
            "invalid_api_key",
        ),
        (NotPermitted("not yours", field="user"), 403, "permission_error", "permission_error"),
        (ModelNotServed("nope", ["gpt-4o"]), 404, "invalid_request_error", "model_not_found"),
        (UpstreamFailed("broke the connection"), 502, "upstream_error", "upstream_error"),
        (
            UpstreamTimedOut("silent", code="max_call_duration"),
            504,
            "upstream_timeout",
            "max_call_duration",
        ),
    ],
)
def test_openai_shaped_body_names_the_field(
    error: TollgateError, status: int, error_type: str, code: str
) -> None:
    api = http_error(error)
    assert api.status == status
    body = api.body()["error"]
    assert (body["type"], body["code"], body["message"]) == (error_type, code, error.message)
    assert body["param"] == error.field


def test_a_failure_mid_stream_is_one_sse_error_event() -> None:
    event = sse_error_event(UpstreamTimedOut("Upstream 'a' stopped streaming"))
    assert event.startswith(b"data: ") and event.endswith(b"\n\n")
    assert orjson.loads(event[6:])["error"]["type"] == "upstream_timeout"
