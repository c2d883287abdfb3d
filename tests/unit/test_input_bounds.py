"""Inputs the API fuzz run (issue 11) turned into 500s or stored as garbage: each must be a 400.

Pure validation, no services: identifiers (printable, bounded), token limits, money bounds,
report dates inside the warehouse's DateTime range, and the lateness window of reported events.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from app.budgets.policy import PolicyError, parse_policy, validate_scope
from app.errors import InvalidRequest, TollgateError
from app.gateway.pipeline import parse_chat_request
from app.http.errors import http_error
from app.ids import MAX_ID_LENGTH
from app.metering.attribution import KeyStore, hash_key, resolve_identity
from app.metering.ingest import (
    MAX_METADATA_ENTRIES,
    MAX_USD,
    TimeWindow,
    parse_outcomes,
    parse_usage_reports,
)
from app.warehouse.reports import Range, ReportError

MSG = [{"role": "user", "content": "hello"}]
GARBAGE = ["a\r\nb", "a\nb", "a\x00b", "a\tb", "a\x1bb", "caf\udce9", "a\u202eb", "a\u2028b"]
USAGE = {"model": "gpt-4o", "prompt_tokens": 1, "completion_tokens": 1}


def resolve_plain(record: Any) -> Any:
    return resolve_identity({}, record, None)


# -- identifiers --------------------------------------------------------------------------------
@pytest.mark.parametrize("value", GARBAGE)
@pytest.mark.parametrize("header", ["X-Tollgate-User", "X-Tollgate-Session", "X-Tollgate-Feature"])
def test_attribution_headers_must_be_printable(header: str, value: str) -> None:
    with pytest.raises(TollgateError) as info:
        resolve_identity({header: value}, {}, None)
    assert http_error(info.value).status == 400 and info.value.field == header
    assert header in info.value.message


def test_a_latin1_byte_in_a_header_is_named_as_not_utf8() -> None:
    # aiohttp hands a non-UTF-8 byte over as a lone surrogate ("caf\xe9" -> "caf\udce9").
    with pytest.raises(TollgateError, match="UTF-8") as info:
        resolve_identity({"X-Tollgate-User": "caf\udce9"}, {}, None)
    assert info.value.field == "X-Tollgate-User"


@pytest.mark.parametrize("value", GARBAGE)
@pytest.mark.parametrize("field", ["user", "user_id", "session_id", "feature"])
def test_attribution_body_fields_must_be_printable(field: str, value: str) -> None:
    with pytest.raises(TollgateError) as info:
        resolve_identity({}, {field: value}, None)
    assert http_error(info.value).status == 400 and info.value.field == field


def test_metadata_feature_must_be_printable() -> None:
    with pytest.raises(TollgateError) as info:
        resolve_identity({}, {"metadata": {"feature": "chat\n"}}, None)
    assert info.value.field == "metadata.feature"


def test_ids_are_bounded_and_plain_unicode_is_fine() -> None:
    assert resolve_identity({}, {"user": "Zoë-名前 (ops)"}, None).user_id == "Zoë-名前 (ops)"
    assert resolve_identity({}, {"user": "u" * MAX_ID_LENGTH}, None).user_id == "u" * MAX_ID_LENGTH
    with pytest.raises(TollgateError, match=str(MAX_ID_LENGTH)):
        resolve_identity({}, {"user": "u" * (MAX_ID_LENGTH + 1)}, None)


def test_an_undecodable_api_key_is_a_401_not_a_crash(tmp_path: Any) -> None:
    path = tmp_path / "keys.yaml"
    path.write_text(f"keys:\n  - {{id: k, sha256: {hash_key('sk-a')}, user_id: a}}\n")
    keys = KeyStore.load(path)
    for headers in ({"Authorization": "Bearer sk-\udce9"}, {"X-Api-Key": "sk-\udce9"}):
        with pytest.raises(TollgateError) as info:
            resolve_identity(headers, {}, keys)
        assert http_error(info.value).status == 401


@pytest.mark.parametrize("value", GARBAGE)
@pytest.mark.parametrize("field", ["model", "request_id", "provider", "model_requested"])
def test_usage_record_ids_must_be_printable(field: str, value: str) -> None:
    with pytest.raises(TollgateError) as info:
        parse_usage_reports({**USAGE, field: value}, resolve_plain)
    assert info.value.field == f"records[0].{field}"


def test_usage_metadata_is_printable_and_bounded() -> None:
    for metadata in (
        {"k": "v\n"},
        {"k\x00": "v"},
        {f"k{i}": "v" for i in range(MAX_METADATA_ENTRIES + 1)},
        {"k": "v" * (MAX_ID_LENGTH + 1)},
    ):
        with pytest.raises(TollgateError) as info:
            parse_usage_reports({**USAGE, "metadata": metadata}, resolve_plain)
        assert info.value.field == "records[0].metadata"
    ok = {f"k{i}": "v" for i in range(MAX_METADATA_ENTRIES)}
    assert parse_usage_reports({**USAGE, "metadata": ok}, resolve_plain)[0]["metadata"] == ok


@pytest.mark.parametrize("value", GARBAGE)
@pytest.mark.parametrize("field", ["request_id", "session_id", "kind"])
def test_outcome_ids_must_be_printable(field: str, value: str) -> None:
    record = {"request_id": "r1", "outcome": "success", field: value}
    with pytest.raises(TollgateError) as info:
        parse_outcomes(record, resolve_plain)
    assert info.value.field == f"outcomes[0].{field}"


@pytest.mark.parametrize("value", GARBAGE)
def test_budget_scopes_must_be_printable(value: str) -> None:
    with pytest.raises(PolicyError) as info:
        validate_scope(f"user:{value}")
    assert info.value.field == "scope"
    with pytest.raises(PolicyError):
        validate_scope("user:" + "u" * (MAX_ID_LENGTH + 1))
    assert validate_scope("user:" + "u" * MAX_ID_LENGTH)


def test_policy_upgrade_texts_must_be_printable() -> None:
    for name in ("upgrade_url", "upgrade_prompt"):
        with pytest.raises(PolicyError) as info:
            parse_policy("user:a", {"limit_usd": 1, name: "Upgrade\r\nSet-Cookie: x"})
        assert info.value.field == name


# -- numbers ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["max_tokens", "max_completion_tokens"])
@pytest.mark.parametrize("native", [False, True])
def test_token_limits_beyond_an_avro_int_are_400(name: str, native: bool) -> None:
    for value in (2**31, 2**63, 10**30):
        with pytest.raises(TollgateError) as info:
            parse_chat_request({"model": "gpt-4o", "messages": MSG, name: value}, native=native)
        assert http_error(info.value).status == 400 and info.value.field == name
        assert str(2**31 - 1) in info.value.message
    chat = parse_chat_request({"model": "gpt-4o", "messages": MSG, name: 2**31 - 1})
    assert chat.max_tokens == 2**31 - 1


@pytest.mark.parametrize("value", GARBAGE)
def test_chat_model_must_be_printable(value: str) -> None:
    with pytest.raises(TollgateError) as info:
        parse_chat_request({"model": value, "messages": MSG})
    assert info.value.field == "model"


def test_outcome_value_is_bounded() -> None:
    for value in (7.94789901217613e307, 1e19, float(MAX_USD) * 10):
        with pytest.raises(TollgateError) as info:
            parse_outcomes(
                {"request_id": "r", "outcome": "success", "value_usd": value}, resolve_plain
            )
        assert info.value.field == "outcomes[0].value_usd"
        assert f"{MAX_USD:,}" in info.value.message
    [ok] = parse_outcomes(
        {"request_id": "r", "outcome": "success", "value_usd": int(MAX_USD)}, resolve_plain
    )
    assert ok["value_usd_nanos"] == int(MAX_USD) * 10**9


# -- time ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("param", "value"),
    [
        ("to", "0167-04-17T12:53:17Z"),
        ("from", "0001-01-01T00:00:00+01:00"),
        ("to", "2106-02-08T00:00:00Z"),
        ("from", "9999-12-31T23:59:59-23:59"),
        ("from", "1969-12-31T23:59:59Z"),
    ],
)
def test_report_dates_outside_the_warehouse_range_are_400(param: str, value: str) -> None:
    with pytest.raises(ReportError) as info:
        Range.parse(value if param == "from" else None, value if param == "to" else None)
    assert info.value.param == param
    assert "1970-01-01" in str(info.value) and "2106-02-07" in str(info.value)


def test_report_dates_inside_the_range_still_parse() -> None:
    window = Range.parse("1970-01-01T00:00:00Z", "1970-01-20T00:00:00Z")
    assert window.start == datetime(1970, 1, 1, tzinfo=UTC)
    early = Range.parse(None, "1970-01-05T00:00:00Z")  # the default 30 days stop at 1970
    assert early.start == datetime(1970, 1, 1, tzinfo=UTC)


@pytest.mark.parametrize("limit", ["²", "٣", "1" * 40, "0", "-1"])
def test_report_limits_that_are_not_plain_numbers_are_400(limit: str) -> None:
    from app.http.reports_api import build_report

    with pytest.raises(ReportError) as info:
        build_report(None, "breakdown", {"limit": limit, "by": "user"})
    assert info.value.param == "limit"


def test_a_report_parameter_given_twice_is_a_400_not_its_first_value() -> None:
    from multidict import MultiDict

    from app.http.reports_api import build_report

    query = MultiDict([("by", "user"), ("by", "feature")])
    with pytest.raises(ReportError, match="given twice") as info:
        build_report(None, "breakdown", query)
    assert info.value.param == "by"


WINDOW = TimeWindow(
    now=datetime(2026, 12, 1, 12, tzinfo=UTC),
    max_lateness=timedelta(days=7),
    max_skew=timedelta(minutes=5),
)


@pytest.mark.parametrize(
    "ts",
    [-1, 0, "1969-12-31T23:59:59Z", "2026-11-24T11:59:59Z", "2026-12-01T12:05:01Z", 2**62],
)
def test_usage_and_outcome_timestamps_outside_the_window_are_400(ts: Any) -> None:
    with pytest.raises(TollgateError) as info:
        parse_usage_reports({**USAGE, "ts": ts}, resolve_plain, window=WINDOW)
    assert info.value.field == "records[0].ts"
    assert "2026-11-24T12:00:00" in info.value.message  # names the window
    assert "TOLLGATE_USAGE_MAX_LATENESS_S" in info.value.message
    with pytest.raises(TollgateError) as info:
        parse_outcomes(
            {"request_id": "r", "outcome": "success", "ts": ts}, resolve_plain, window=WINDOW
        )
    assert info.value.field == "outcomes[0].ts"


def test_timestamps_inside_the_window_are_kept() -> None:
    for ts in ("2026-11-24T12:00:00Z", "2026-12-01T12:05:00Z"):
        [report] = parse_usage_reports({**USAGE, "ts": ts}, resolve_plain, window=WINDOW)
        assert report["ts"] == datetime.fromisoformat(ts.replace("Z", "+00:00"))
    [report] = parse_usage_reports(dict(USAGE), resolve_plain, window=WINDOW)
    assert report["ts"] == WINDOW.now  # no ts: the dispatcher's now


def test_a_body_nested_too_deep_to_forward_is_a_400_before_any_call() -> None:
    """orjson reads 1,024 levels of nesting but writes only 254: a body between the two was
    admitted, then failed to serialise for the provider (a 500, and a Usage event saying
    "ok"). It is now refused while parsing, naming the limit."""
    deep = {"model": "gpt-4o", "messages": MSG, "x": []}
    inner = deep["x"]
    for _ in range(300):
        inner.append([])
        inner = inner[0]
    with pytest.raises(TollgateError, match="254 levels") as info:
        parse_chat_request(deep)
    assert http_error(info.value).status == 400
    fine = {"model": "gpt-4o", "messages": MSG, "x": []}
    inner = fine["x"]
    for _ in range(200):
        inner.append([])
        inner = inner[0]
    assert parse_chat_request(fine).model == "gpt-4o"


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"prompt_tokens": 10, "input_tokens": 20, "completion_tokens": 1}, "prompt_tokens"),
        ({"prompt_tokens": 1, "completion_tokens": 5, "output_tokens": 6}, "completion_tokens"),
    ],
)
def test_a_usage_report_whose_token_aliases_disagree_is_a_400(
    fields: dict[str, int], param: str
) -> None:
    """Both names of one count, with two values: one was silently used before."""
    with pytest.raises(TollgateError, match="differs") as info:
        parse_usage_reports({"model": "gpt-4o", **fields}, resolve_plain)
    assert http_error(info.value).status == 400 and info.value.field.endswith(param)
    same = parse_usage_reports(
        {"model": "gpt-4o", "prompt_tokens": 3, "input_tokens": 3, "completion_tokens": 1},
        resolve_plain,
    )
    assert same[0]["prompt_tokens"] == 3


# -- chat fields the provider would refuse (the simulator took them, and they were charged) ------
@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"temperature": "hot"}, "temperature"),
        ({"temperature": 2.5}, "temperature"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": True}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_p": "all"}, "top_p"),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"frequency_penalty": -2.5}, "frequency_penalty"),
        ({"messages": [{"role": "bogus", "content": "hi"}]}, "messages[0].role"),
        ({"messages": [{"role": 5, "content": "hi"}]}, "messages[0].role"),
        ({"messages": [{"role": "user"}]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": None}]}, "messages[0].content"),
        ({"messages": [MSG[0], {"role": "system"}]}, "messages[1].content"),
        ({"messages": [{"role": "tool", "tool_call_id": "c1"}]}, "messages[0].content"),
        ({"messages": [{"role": "assistant"}]}, "messages[0].content"),
    ],
)
@pytest.mark.parametrize("native", [False, True])
def test_chat_fields_outside_openais_rules_are_400_naming_them(
    extra: dict[str, Any], field: str, native: bool
) -> None:
    with pytest.raises(TollgateError) as info:
        parse_chat_request({"model": "gpt-4o", "messages": MSG, **extra}, native=native)
    assert http_error(info.value).status == 400
    assert info.value.field == field, info.value.message


CALL = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}


@pytest.mark.parametrize(
    ("message", "field", "said"),
    [
        ({"role": "tool", "content": "42"}, "messages[2].tool_call_id", "is required"),
        ({"role": "tool", "content": "42", "tool_call_id": ""}, "messages[2].tool_call_id",
         "non-empty string"),
        ({"role": "tool", "content": "42", "tool_call_id": 7}, "messages[2].tool_call_id",
         "got 7"),
        ({"role": "assistant", "tool_calls": [{**CALL, "id": None}]},
         "messages[2].tool_calls[0].id", "is required"),
        ({"role": "assistant", "tool_calls": [CALL, {"type": "function", "function": {
            "name": "f", "arguments": "{}"}}]}, "messages[2].tool_calls[1].id", "is required"),
        ({"role": "assistant", "tool_calls": [{**CALL, "function": {"arguments": "{}"}}]},
         "messages[2].tool_calls[0].function.name", "is required"),
        ({"role": "assistant", "tool_calls": [{"id": "c1", "type": "function"}]},
         "messages[2].tool_calls[0].function", "is required"),
        ({"role": "assistant", "tool_calls": ["c1"]}, "messages[2].tool_calls[0]",
         "must be an object"),
        ({"role": "function", "content": "42"}, "messages[2].name", "is required"),
    ],
)  # fmt: skip
@pytest.mark.parametrize("native", [False, True])
def test_tool_turns_without_the_ids_openai_requires_are_400_naming_them(
    message: dict[str, Any], field: str, said: str, native: bool
) -> None:
    """A tool message without ``tool_call_id`` was forwarded and charged; OpenAI refuses it
    with a 400 ("Missing required parameter: 'messages[2].tool_call_id'"), as it refuses a
    tool call without an id or a function name (a newcomer probe). The 400 names the
    message's index and the missing field."""
    messages = [MSG[0], {"role": "assistant", "tool_calls": [CALL]}, message]
    with pytest.raises(TollgateError) as info:
        parse_chat_request({"model": "gpt-4o", "messages": messages}, native=native)
    assert http_error(info.value).status == 400
    assert http_error(info.value).error_type == "invalid_request_error"
    assert info.value.field == field, info.value.message
    assert field in info.value.message and said in info.value.message, info.value.message


def _tool(call_id: str) -> dict[str, Any]:
    return {"role": "tool", "tool_call_id": call_id, "content": "42"}


def _calls(*ids: str) -> dict[str, Any]:
    return {"role": "assistant", "content": None, "tool_calls": [{**CALL, "id": i} for i in ids]}


@pytest.mark.parametrize(
    ("messages", "index", "said"),
    [
        ([MSG[0], _tool("c1")], 1, "messages[0] is no assistant message with tool_calls"),
        ([_tool("c1"), MSG[0]], 0, "the first message is no assistant"),
        ([MSG[0], _calls("c1"), _tool("c2")], 2, "'c2' is not the id of a tool call"),
        # an answer to an earlier turn's call, after the conversation moved on
        ([MSG[0], _calls("c1"), _tool("c1"), {"role": "assistant", "content": "done"},
          MSG[0], _tool("c1")], 5, "messages[4] is no assistant message"),
        # parallel calls: the second answer names a call of an earlier assistant turn
        ([MSG[0], _calls("c1"), _tool("c1"), _calls("c2", "c3"), _tool("c2"), _tool("c1")],
         5, "messages[3] called 'c2', 'c3'"),
        ([MSG[0], {"role": "assistant", "content": "hi"}, _tool("c1")], 2, "answers no tool"),
        ([MSG[0], {"role": "assistant", "content": None, "function_call": {
            "name": "f", "arguments": "{}"}}, _tool("c1")], 2, "answers no tool call"),
    ],
)  # fmt: skip
@pytest.mark.parametrize("native", [False, True])
def test_a_tool_message_that_answers_no_preceding_tool_call_is_400_naming_it(
    messages: list[dict[str, Any]], index: int, said: str, native: bool
) -> None:
    """OpenAI refuses a tool message that does not answer a call of the assistant message it
    follows ("messages with role 'tool' must be a response to a preceding message with
    'tool_calls'"); it was forwarded, and the provider's 400 cost a round trip. The 400 names
    the message's tool_call_id and says what to fix."""
    with pytest.raises(TollgateError) as info:
        parse_chat_request({"model": "gpt-4o", "messages": messages}, native=native)
    error = http_error(info.value)
    assert error.status == 400 and error.error_type == "invalid_request_error"
    field = f"messages[{index}].tool_call_id"
    assert info.value.field == field, info.value.message
    assert field in info.value.message and said in info.value.message, info.value.message


@pytest.mark.parametrize("calls", [5, True, 1.5, "c1", {"id": "c1"}])
@pytest.mark.parametrize("native", [False, True])
def test_tool_calls_that_are_no_list_before_a_tool_message_are_a_400(
    calls: Any, native: bool
) -> None:
    """An assistant turn with text and ``tool_calls`` of another type than a list, answered
    by a tool message, was a 500 (the tool-answer check read the number as a list: a
    review); before that check it was forwarded. A 400 naming ``tool_calls``."""
    messages = [MSG[0], {"role": "assistant", "content": "x", "tool_calls": calls}, _tool("c1")]
    with pytest.raises(TollgateError) as info:
        parse_chat_request({"model": "gpt-4o", "messages": messages}, native=native)
    error = http_error(info.value)
    assert error.status == 400 and error.error_type == "invalid_request_error"
    assert info.value.field == "messages[1].tool_calls", info.value.message
    assert "must be a list" in info.value.message, info.value.message


@pytest.mark.parametrize(
    "messages",
    [
        [MSG[0], _calls("c1"), _tool("c1")],
        # parallel tool calls, answered in any order, then the conversation goes on
        [MSG[0], _calls("c1", "c2"), _tool("c2"), _tool("c1"),
         {"role": "assistant", "content": "both done"}, MSG[0], _calls("c3"), _tool("c3")],
        # a call left unanswered here is the provider's to judge
        [MSG[0], _calls("c1", "c2"), _tool("c1")],
        # legacy function calling is not checked
        [MSG[0], {"role": "assistant", "content": None, "function_call": {
            "name": "f", "arguments": "{}"}}, {"role": "function", "name": "f", "content": "4"}],
        [{"role": "function", "name": "f", "content": "42"}, MSG[0]],
    ],
)  # fmt: skip
def test_tool_messages_that_answer_the_calls_before_them_pass(
    messages: list[dict[str, Any]],
) -> None:
    chat = parse_chat_request({"model": "gpt-4o", "messages": messages})
    assert chat.upstream_body["messages"] == messages


def test_a_tool_call_of_another_type_needs_no_function() -> None:
    """OpenAI's custom tools call with ``{"type": "custom", "custom": {...}}``: no function."""
    custom = {"id": "c2", "type": "custom", "custom": {"name": "grep", "input": "x"}}
    messages = [MSG[0], {"role": "assistant", "tool_calls": [custom]},
                {"role": "tool", "tool_call_id": "c2", "content": "found"}]  # fmt: skip
    assert (
        parse_chat_request({"model": "gpt-4o", "messages": messages}).upstream_body["messages"]
        == messages
    )


def test_tool_calls_of_the_wrong_shape_are_named_as_such() -> None:
    """``"tool_calls": "x"`` read "content is required ... unless the turn has tool_calls":
    the turn has them, as a string (a newcomer's probe). The message says what is wrong."""
    for calls, said in (("x", "tool_calls is a string, not a list"),
                        ({"id": "c1"}, "tool_calls is an object, not a list")):  # fmt: skip
        with pytest.raises(TollgateError) as info:
            parse_chat_request(
                {
                    "model": "gpt-4o",
                    "messages": [MSG[0], {"role": "assistant", "tool_calls": calls}],
                }
            )
        assert http_error(info.value).status == 400
        assert said in info.value.message, info.value.message


@pytest.mark.parametrize(
    "extra",
    [
        {"temperature": 0}, {"temperature": 2}, {"temperature": 0.7}, {"temperature": None},
        {"top_p": 0}, {"top_p": 1}, {"presence_penalty": -2}, {"frequency_penalty": 2.0},
        # an assistant turn that only calls a tool has no content (OpenAI's rule)
        {"messages": [MSG[0], {"role": "assistant", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "42"}]},
        {"messages": [MSG[0], {"role": "assistant", "content": None, "function_call": {
            "name": "f", "arguments": "{}"}}]},
        {"messages": [{"role": "developer", "content": "Be brief."}, MSG[0]]},
        {"messages": [{"role": "function", "name": "f", "content": "42"}, MSG[0]]},
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]},
    ],
)  # fmt: skip
def test_chat_fields_inside_openais_rules_pass(extra: dict[str, Any]) -> None:
    chat = parse_chat_request({"model": "gpt-4o", "messages": MSG, **extra})
    assert chat.upstream_body["messages"] == extra.get("messages", MSG)


# -- usage counts that contradict each other -----------------------------------------------------
def test_a_usage_total_that_is_not_prompt_plus_completion_is_400() -> None:
    for total in (0, 1, 3, 10**6):
        with pytest.raises(TollgateError) as info:
            parse_usage_reports({**USAGE, "total_tokens": total}, resolve_plain)
        assert info.value.field == "records[0].total_tokens"
        assert "prompt_tokens + completion_tokens" in info.value.message
    (kept,) = parse_usage_reports({**USAGE, "total_tokens": 2}, resolve_plain)
    assert (kept["prompt_tokens"], kept["completion_tokens"]) == (1, 1)
    responses_api = {"model": "gpt-4o", "input_tokens": 5, "output_tokens": 7, "total_tokens": 12}
    assert parse_usage_reports(responses_api, resolve_plain)[0]["completion_tokens"] == 7


# -- '*' names every user (or feature, team) in a default budget: no one may be called it ---------
@pytest.mark.parametrize("field", ["user", "user_id", "feature", "team"])
def test_an_id_of_star_is_refused_where_it_would_name_a_default_budget(field: str) -> None:
    with pytest.raises(TollgateError) as info:
        resolve_plain({field: "*"})
    assert info.value.field == field and "default" in info.value.message
    with pytest.raises(TollgateError) as usage:
        parse_usage_reports({**USAGE, field: "*"}, resolve_plain)
    assert usage.value.field == f"records[0].{field}"
    header = {"user": "X-Tollgate-User", "user_id": "X-Tollgate-User",
              "feature": "X-Tollgate-Feature", "team": "X-Tollgate-Team"}[field]  # fmt: skip
    with pytest.raises(TollgateError) as by_header:
        resolve_identity({header: "*"}, {}, None)
    assert by_header.value.field == header
    assert resolve_plain({field: "*a"}) is not None  # only the bare star is reserved


def test_the_other_endpoints_batch_wrapper_is_named_not_read_as_one_record() -> None:
    outcome = {"request_id": "r-1", "outcome": "success"}
    with pytest.raises(TollgateError) as info:
        parse_outcomes({"records": [outcome]}, resolve_plain)
    assert info.value.field == "records" and "{'outcomes': [...]}" in info.value.message
    with pytest.raises(TollgateError) as usage:
        parse_usage_reports({"outcomes": [USAGE]}, resolve_plain)
    assert usage.value.field == "outcomes" and "{'records': [...]}" in usage.value.message
    assert len(parse_outcomes({"outcomes": [outcome, outcome]}, resolve_plain)) == 2


def test_an_outcome_posted_again_is_the_same_event_and_a_different_one_is_not() -> None:
    outcome = {"request_id": "r-9", "outcome": "success", "kind": "ticket", "value_usd": 4.5}
    (first,) = parse_outcomes(outcome, resolve_plain)
    (again,) = parse_outcomes(dict(outcome), resolve_plain)
    assert first["event_id"] == again["event_id"]  # a client retry: one outcome
    for change in ({"outcome": "failure"}, {"value_usd": 5}, {"kind": "refund"},
                   {"request_id": "r-10"}):  # fmt: skip
        (other,) = parse_outcomes({**outcome, **change}, resolve_plain)
        assert other["event_id"] != first["event_id"], change
    by_session = {"session_id": "s-1", "outcome": "success"}  # a session has many outcomes
    assert (parse_outcomes(by_session, resolve_plain)[0]["event_id"]
            != parse_outcomes(by_session, resolve_plain)[0]["event_id"])  # fmt: skip


@pytest.mark.parametrize(
    ("message", "field", "says"),
    [
        ({"role": "user", "content": 5}, "messages[1].content", "string, a list of parts or null"),
        ({"role": "user", "content": [{"type": "text"}]}, "messages[1].content[0].text", "string"),
        ({"role": "user", "content": ["hi", None]}, "messages[1].content[0]", "objects"),
        ({"role": "user", "content": []}, "messages[1].content", "empty"),
        ({"content": "hi"}, "messages[1].role", "role"),
    ],
)
def test_a_malformed_message_is_named_down_to_its_part(
    message: dict[str, Any], field: str, says: str
) -> None:
    """Probe L (F3, F4): errors inside a message's content named only 'messages' (which of
    forty turns?), and an empty list of parts was served and billed (OpenAI refuses it)."""
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "ok"}, message]}
    with pytest.raises(InvalidRequest) as refused:
        parse_chat_request(body)
    assert refused.value.field == field, str(refused.value)
    assert says in str(refused.value) and field in str(refused.value)


@pytest.mark.parametrize(
    ("raw", "found"),
    [
        (b'{"model":"m","prompt_tokens":10,"prompt_tokens":99999999}', ("prompt_tokens", 10)),
        (b'{"records":[{"a":1},{"a":2,"b":{"c":1,"c":1}}]}', ("c", 1)),  # nested, same value
        (b'[{"x":{"y":[]}, "x":null}]', ("x", {"y": []})),
    ],
)
def test_a_key_given_twice_in_one_object_is_found(raw: bytes, found: tuple[str, Any]) -> None:
    """This probe (session 22): orjson keeps the last of a key given twice, so
    ``{"prompt_tokens": 10, "prompt_tokens": 99999999}`` posted to /v1/usage was accepted (202)
    and charged for 99,999,999 tokens, with nothing saying the 10 was dropped. The usage,
    outcome and budget routes refuse such a body (read_json(unique_keys=True)), naming it."""
    from app.http.server import repeated_key

    assert repeated_key(raw) == found


@pytest.mark.parametrize(
    "raw",
    [b'{"a":1,"b":{"a":2},"c":[{"a":3},{"a":4}]}', b"[]", b'"a"', b'{"A":1,"a":2}', b"{}"],
)
def test_the_same_key_in_different_objects_is_not_repeated(raw: bytes) -> None:
    from app.http.server import repeated_key

    assert repeated_key(raw) is None


def test_a_repeated_key_whose_first_value_orjson_cannot_write_is_still_found() -> None:
    from app.http.server import repeated_key

    assert repeated_key(b'{"a": 18446744073709551616, "a": 1}') == ("a", 2**64)


def test_a_scope_whose_percent_escapes_are_not_utf8_is_a_400_not_a_literal_id() -> None:
    """This probe (session 22): PUT /v1/budgets/user:%ff%fe was stored (200) as a cap on the
    user called ``%ff%fe``, the literal escapes (yarl leaves an escape that is not UTF-8 as
    it is), the user ``PUT /v1/budgets/user:%25ff%25fe`` names; an id is UTF-8 text, as the
    attribution headers (a 400 for a byte that is not UTF-8) and bodies have it."""
    from aiohttp.test_utils import make_mocked_request

    from app.http.errors import ApiError
    from app.http.server import _scope

    bad = make_mocked_request("PUT", "/v1/budgets/user:%ff%fe", match_info={"scope": "user:%ff%fe"})
    with pytest.raises(ApiError) as info:
        _scope(bad)
    assert info.value.status == 400 and info.value.param == "scope"
    assert "UTF-8" in str(info.value), info.value
    literal = make_mocked_request(
        "GET", "/v1/budgets/user:%25ff%E2%82%AC/status", match_info={"scope": "user:%ff€"}
    )
    assert _scope(literal) == "user:%ff€"
