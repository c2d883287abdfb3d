"""What /openapi.json says is valid and what the API accepts must agree, case by case.

A fuzzer run with every check (``schemathesis run --checks all``) found the document looser
than the API in places: a scope with no ``kind:``, ``/v1/chat/completions`` without
``model``, ``n: 200``, a usage record with no token count, an outcome linked to nothing,
``by`` on the summary report, an empty ``to=``, and SSE answers it could not read. Each case
here is judged twice, by the document's JSON Schema and by the code that validates the
request, and the verdicts must be the same. What no static schema can say (event times
within the lateness window, cached_tokens <= prompt_tokens, a report range of at most 400
days) is left to the 400's message.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
from jsonschema import Draft202012Validator

from app.budgets.policy import PolicyError, validate_scope
from app.errors import TollgateError
from app.gateway.pipeline import parse_chat_request
from app.http.openapi import openapi_document
from app.http.reports_api import PARAMS, REPORTS, build_report
from app.http.server import ROUTES
from app.metering.attribution import resolve_identity
from app.metering.ingest import parse_outcomes, parse_usage_reports
from app.warehouse.reports import BREAKDOWN_DIMENSIONS, Range, ReportError

SPEC = openapi_document(ROUTES)
MSG = [{"role": "user", "content": "hello"}]


def _schema_accepts(path: str, body: Any) -> bool:
    schema = SPEC["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
    validator = Draft202012Validator({**schema, "components": SPEC["components"]})
    return validator.is_valid(body)


def _api_accepts(parse: Any, *args: Any, **kwargs: Any) -> bool:
    try:
        parse(*args, **kwargs)
    except (TollgateError, PolicyError, ReportError):
        return False
    return True


def _resolve(record: Any) -> Any:
    return resolve_identity({}, record, None)


@pytest.mark.parametrize(
    "body",
    [
        {"messages": MSG},
        {"model": "", "messages": MSG},
        {"model": None, "messages": MSG},
        {"model": "gpt-4o-mini", "messages": MSG},
        {"model": "auto", "messages": MSG, "n": 128},
        {"model": "gpt-4o-mini", "messages": MSG, "n": 129},
        {"model": "gpt-4o-mini", "messages": MSG, "n": 0},
        {"model": "gpt-4o-mini", "messages": MSG, "stream_options": {}},
        {"model": "gpt-4o-mini", "messages": MSG, "stream": False, "stream_options": {}},
        {"model": "gpt-4o-mini", "messages": MSG, "stream": True, "stream_options": {}},
        {"model": "gpt-4o-mini", "messages": MSG, "stream_options": None},
        {"model": "m", "messages": MSG, "stream": True, "stream_options": {"include_usage": "no"}},
        {"model": "m", "messages": MSG, "stream": True, "stream_options": {"other": 1}},
        {"model": "m", "messages": MSG, "temperature": 2},
        {"model": "m", "messages": MSG, "temperature": 2.01},
        {"model": "m", "messages": MSG, "temperature": "hot"},
        {"model": "m", "messages": MSG, "temperature": None},
        {"model": "m", "messages": MSG, "top_p": 1.5},
        {"model": "m", "messages": MSG, "presence_penalty": -2},
        {"model": "m", "messages": MSG, "frequency_penalty": 2.5},
        {"model": "m", "messages": [{"role": "bogus", "content": "hi"}]},
        {"model": "m", "messages": [{"role": "user"}]},
        {"model": "m", "messages": [{"role": "user", "content": None}]},
        {"model": "m", "messages": [{"role": "assistant"}]},
        {"model": "m", "messages": [{"role": "assistant", "tool_calls": []}]},
        {"model": "m", "messages": [{"role": "assistant", "function_call": {"name": "f"}}]},
        {
            "model": "m",
            "messages": [
                {"role": "assistant", "tool_calls": [{"id": "c", "function": {"name": "f"}}]},
                {"role": "tool", "content": "42", "tool_call_id": "c"},
            ],
        },
        {"model": "m", "messages": [{"role": "developer", "content": "x"}]},
        {"model": "m", "messages": [{"role": "tool", "content": "42"}]},
        {"model": "m", "messages": [{"role": "tool", "content": "42", "tool_call_id": ""}]},
        {"model": "m", "messages": [{"role": "tool", "content": "42", "tool_call_id": 1}]},
        {"model": "m", "messages": [{"role": "function", "content": "42"}]},
        {"model": "m", "messages": [{"role": "function", "content": "42", "name": "f"}]},
        {"model": "m", "messages": [{"role": "assistant", "tool_calls": [{"id": "c"}]}]},
        {
            "model": "m",
            "messages": [
                {"role": "assistant", "tool_calls": [{"id": "c", "function": {"name": "f"}}]}
            ],
        },
        {
            "model": "m",
            "messages": [
                {
                    "role": "assistant",
                    "tool_calls": [
                        {"id": "c", "type": "function", "function": {"arguments": "{}"}}
                    ],
                }
            ],
        },
        {
            "model": "m",
            "messages": [
                {
                    "role": "assistant",
                    "tool_calls": [{"type": "function", "function": {"name": "f"}}],
                }
            ],
        },
        {
            "model": "m",
            "messages": [
                {
                    "role": "assistant",
                    "tool_calls": [
                        {"id": "c", "type": "custom", "custom": {"name": "g", "input": ""}}
                    ],
                }
            ],
        },
        {"model": "m", "messages": [{"role": "assistant", "tool_calls": ["c"]}]},
    ],
)
def test_chat_completions_document_what_it_accepts(body: dict[str, Any]) -> None:
    documented = _schema_accepts("/v1/chat/completions", body)
    assert documented == _api_accepts(parse_chat_request, body), body


@pytest.mark.parametrize(
    "body",
    [
        {"messages": MSG},  # the default model
        {"model": "", "messages": MSG},
        {"model": "gpt-4o-mini", "messages": MSG, "n": 129},
    ],
)
def test_dispatch_documents_what_it_accepts(body: dict[str, Any]) -> None:
    documented = _schema_accepts("/v1/dispatch", body)
    accepted = _api_accepts(parse_chat_request, body, default_model="gpt-4o-mini", native=True)
    assert documented == accepted, body


USAGE = {"model": "gpt-4o"}


@pytest.mark.parametrize(
    "record",
    [
        {**USAGE, "prompt_tokens": 1, "completion_tokens": 1},
        {**USAGE, "input_tokens": 1, "output_tokens": 1},
        {**USAGE, "prompt_tokens": 1, "output_tokens": 1},
        {**USAGE, "completion_tokens": 1},
        {**USAGE, "prompt_tokens": None, "completion_tokens": 1},
        {**USAGE, "prompt_tokens": 1, "input_tokens": None, "completion_tokens": 1},
        {**USAGE, "prompt_tokens": 1},
        {**USAGE, "prompt_tokens": 1, "input_tokens": 2, "completion_tokens": 1},
        {**USAGE, "prompt_tokens": 1, "completion_tokens": 1, "output_tokens": 3},
        {"model": "", "prompt_tokens": 1, "completion_tokens": 1},
        {"model": "   ", "prompt_tokens": 1, "completion_tokens": 1},
        {"model": "\t", "prompt_tokens": 1, "completion_tokens": 1},
        {"model": " gpt-4o ", "prompt_tokens": 1, "completion_tokens": 1},
        {"prompt_tokens": 1, "completion_tokens": 1},
        # OpenAI's usage object nested as it is (resp.usage.model_dump())
        {**USAGE, "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}},
        {**USAGE, "usage": {"input_tokens": 1, "output_tokens": 1}},
        {**USAGE, "usage": {"prompt_tokens": 1, "output_tokens": 1}},
        {**USAGE, "prompt_tokens": 1, "usage": {"completion_tokens": 1}},
        {**USAGE, "prompt_tokens": 1, "usage": {"prompt_tokens": 1, "completion_tokens": 1}},
        {**USAGE, "input_tokens": 1, "usage": {"prompt_tokens": 1, "completion_tokens": 1}},
        {**USAGE, "usage": {"prompt_tokens": 1}},
        {**USAGE, "usage": {}},
        {**USAGE, "usage": None},
        {**USAGE, "usage": None, "prompt_tokens": 1, "completion_tokens": 1},
        {**USAGE, "usage": 5, "prompt_tokens": 1, "completion_tokens": 1},
        {**USAGE, "usage": [], "prompt_tokens": 1, "completion_tokens": 1},
        {**USAGE, "usage": {"prompt_tokens": "1", "completion_tokens": 1}},
        {**USAGE, "usage": {"prompt_tokens": 1, "completion_tokens": 1, "x": {"y": 1}}},
    ],
)
def test_usage_documents_what_it_accepts(record: dict[str, Any]) -> None:
    documented = _schema_accepts("/v1/usage", record)
    assert documented == _api_accepts(parse_usage_reports, record, _resolve), record


@pytest.mark.parametrize(
    "record",
    [
        {"outcome": "success", "request_id": "r1"},
        {"outcome": "success", "session_id": "s1"},
        {"outcome": "success"},
        {"outcome": "success", "request_id": None},
        {"outcome": "success", "request_id": ""},
        {"outcome": "success", "request_id": "", "session_id": "s1"},
    ],
)
def test_outcomes_document_what_they_accept(record: dict[str, Any]) -> None:
    documented = _schema_accepts("/v1/outcomes", record)
    assert documented == _api_accepts(parse_outcomes, record, _resolve), record


@pytest.mark.parametrize(
    "scope",
    [
        "global",
        "user:alice",
        "user:*",
        "feature:Zoë",
        "team:名前",
        "key:" + "k" * 256,
        "key:" + "k" * 257,
        "0000",
        "user:",
        "org:acme",
        "user:a\nb",
        "user:a\x85b",
        "global:x",
    ],
)
def test_the_scope_pattern_is_the_scope_rule(scope: str) -> None:
    parameter = SPEC["paths"]["/v1/budgets/{scope}"]["get"]["parameters"][0]
    documented = re.search(parameter["schema"]["pattern"], scope) is not None
    assert documented == _api_accepts(validate_scope, scope), scope


@pytest.mark.parametrize("name", REPORTS)
def test_each_report_documents_the_parameters_it_takes(name: str) -> None:
    operation = SPEC["paths"][f"/v1/reports/{name}"]["get"]
    documented = {p["name"] for p in operation.get("parameters", [])}
    assert documented == PARAMS[name]


def test_summary_does_not_document_by() -> None:
    """The summary refuses `by` (a 400 naming it); the document listed it for every report."""
    operation = SPEC["paths"]["/v1/reports/summary"]["get"]
    assert "by" not in {p["name"] for p in operation["parameters"]}


@pytest.mark.parametrize("param", ["from", "to"])
def test_an_empty_date_is_refused_as_the_document_says(param: str) -> None:
    """`to=` does not match the documented date-time format; it was read as 'no value'."""
    with pytest.raises(ReportError, match=f"{param}= is empty"):
        Range.parse("" if param == "from" else None, "" if param == "to" else None)


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/dispatch"])
def test_streamed_answers_are_documented_as_events(path: str) -> None:
    content = SPEC["paths"][path]["post"]["responses"]["200"]["content"]
    event = content["text/event-stream"]["schema"]
    assert event["type"] == "object" and event["properties"]["data"]["type"] == "string"
    assert "application/json" in content


@pytest.mark.parametrize(
    "limit",
    [
        1e-9,
        5e-324,
        0,
        0.01,
        "5",
        "19.99",
        " 5 ",
        "5.",
        ".5",
        "1e3",
        "+5",
        "-5",
        "NaN",
        "",
        "x",
        "1" * 61,
    ],
)
def test_a_budget_limit_is_documented_as_it_is_checked(limit: float | str) -> None:
    """A decimal string is a limit (session 19's note: the document said only a number);
    a sign, NaN or a 61st character in a string are neither documented nor accepted."""
    from app.budgets.policy import parse_policy

    schema = SPEC["paths"]["/v1/budgets/{scope}"]["put"]["requestBody"]["content"]
    body_schema = schema["application/json"]["schema"]
    validator = Draft202012Validator({**body_schema, "components": SPEC["components"]})
    documented = validator.is_valid({"limit_usd": limit})
    assert documented == _api_accepts(parse_policy, "user:x", {"limit_usd": limit}), limit


@pytest.mark.parametrize(
    "value",
    [0, 0.0, 4.5, 10**9, 10**9 + 1, -1, "0", "0.00", "1.00", " 5 ", ".5", "1e3", "+5", "-5",
     "NaN", "Infinity", "", "x", "1" * 61, True, None],
)  # fmt: skip
def test_an_outcome_value_is_documented_as_it_is_checked(value: Any) -> None:
    """``value_usd`` is read as ``limit_usd`` is (a number or a decimal string), from 0. (A
    string's maximum is left to the 400's message: no pattern says "at most 1e9".)"""
    record = {"outcome": "success", "request_id": "r1", "value_usd": value}
    documented = _schema_accepts("/v1/outcomes", record)
    assert documented == _api_accepts(parse_outcomes, record, _resolve), value


class _NoRows:
    """A warehouse that holds nothing: a valid report answers from it, an invalid one is a
    400 before any query."""

    def query(self, *args: Any, **kwargs: Any) -> Any:
        return type("Result", (), {"result_rows": []})()


@pytest.mark.parametrize(
    "by", ["model", "user", "team", "feature", "tier", "provider", "cache_hit", "teams", ""]
)
def test_the_documented_breakdown_dimensions_are_the_accepted_ones(by: str) -> None:
    """`by=team` (spend by team, whose caps are `team:<id>` scopes) is documented and taken."""
    operation = SPEC["paths"]["/v1/reports/breakdown"]["get"]
    (parameter,) = [p for p in operation["parameters"] if p["name"] == "by"]
    documented = Draft202012Validator(parameter["schema"]).is_valid(by)
    assert documented == _api_accepts(build_report, _NoRows(), "breakdown", {"by": by}), by


def test_spend_by_team_is_documented() -> None:
    operation = SPEC["paths"]["/v1/reports/breakdown"]["get"]
    (parameter,) = [p for p in operation["parameters"] if p["name"] == "by"]
    assert parameter["schema"]["enum"] == list(BREAKDOWN_DIMENSIONS)
    assert "team" in parameter["schema"]["enum"]


def test_a_usd_amount_allows_the_same_spaces_in_the_code_and_the_document() -> None:
    """A reviewer: Python's \\s takes U+001C, JSON Schema's does not: "1\\x1c" was a limit here
    and not in the document."""
    import re
    from decimal import Decimal

    from app.validation import USD_TEXT, usd_amount

    for text, taken in ((" 19.99\t", True), ("1\x1c", False), ("1\u00a0", False)):
        assert bool(re.fullmatch(USD_TEXT, text)) is taken, text
        try:
            usd_amount(text, Decimal(10**9))
            accepted = True
        except ValueError:
            accepted = False
        assert accepted is taken, text
