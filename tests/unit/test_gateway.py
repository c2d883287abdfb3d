"""Pure parts of the chat pipeline: request validation and the SSE relay."""

import orjson
import pytest

from app.errors import TollgateError
from app.gateway.pipeline import Call, SseRelay, parse_chat_request
from app.http.errors import http_error
from app.metering.attribution import Identity

MSG = [{"role": "user", "content": "hello"}]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ([], None),
        ({"model": "gpt-4o"}, "messages"),
        ({"model": "gpt-4o", "messages": []}, "messages"),
        ({"model": "gpt-4o", "messages": "hi"}, "messages"),
        ({"model": "gpt-4o", "messages": [{"content": "no role"}]}, "messages[0].role"),
        ({"messages": MSG}, "model"),
        ({"model": 5, "messages": MSG}, "model"),
        ({"model": "gpt-4o", "messages": MSG, "max_tokens": -1}, "max_tokens"),
        ({"model": "gpt-4o", "messages": MSG, "max_tokens": "10"}, "max_tokens"),
        ({"model": "gpt-4o", "messages": MSG, "max_tokens": True}, "max_tokens"),
        ({"model": "gpt-4o", "messages": MSG, "stream": "yes"}, "stream"),
        ({"model": "gpt-4o", "messages": MSG, "stream_options": []}, "stream_options"),
        # OpenAI refuses a non-boolean include_usage; a string "false" read as true sent usage
        (
            {
                "model": "m",
                "messages": MSG,
                "stream": True,
                "stream_options": {"include_usage": "false"},
            },
            "stream_options.include_usage",
        ),
        (
            {"model": "m", "messages": MSG, "stream": True, "stream_options": {"include_usage": 1}},
            "stream_options.include_usage",
        ),
        # two output limits: which the provider reads is its choice (a probe: 1 asked, 198 got)
        (
            {"model": "gpt-4o", "messages": MSG, "max_tokens": 1, "max_completion_tokens": 198},
            "max_completion_tokens",
        ),
    ],
)
def test_bad_requests_name_the_field(body: object, param: str | None) -> None:
    with pytest.raises(TollgateError) as info:
        parse_chat_request(body)
    assert http_error(info.value).status == 400
    assert http_error(info.value).error_type == "invalid_request_error"
    assert info.value.field == param


def test_the_same_output_limit_under_both_names_is_that_limit() -> None:
    body = {"model": "gpt-4o", "messages": MSG, "max_tokens": 5, "max_completion_tokens": 5}
    assert parse_chat_request(body).max_tokens == 5


def test_streams_always_ask_the_upstream_for_usage() -> None:
    chat = parse_chat_request({"model": "gpt-4o", "messages": MSG, "stream": True})
    assert chat.upstream_body["stream_options"] == {"include_usage": True}
    assert chat.client_wants_usage is False
    chat = parse_chat_request(
        {"model": "m", "messages": MSG, "stream": True, "stream_options": {"include_usage": True}}
    )
    assert chat.client_wants_usage is True
    # the client's other stream options reach the provider untouched
    chat = parse_chat_request(
        {
            "model": "m",
            "messages": MSG,
            "stream": True,
            "stream_options": {"include_usage": None, "include_obfuscation": False},
        }
    )
    assert chat.client_wants_usage is False
    assert chat.upstream_body["stream_options"] == {
        "include_usage": True,
        "include_obfuscation": False,
    }


def test_native_requests_default_the_model_and_strip_tollgate_fields() -> None:
    chat = parse_chat_request(
        {"messages": MSG, "user_id": "u", "session_id": "s", "metadata": {"feature": "f"}},
        default_model="gpt-4o-mini",
        native=True,
    )
    assert chat.model == "gpt-4o-mini"
    assert set(chat.upstream_body) == {"messages", "model"}


@pytest.mark.parametrize("native", [False, True])
def test_attribution_fields_of_the_body_never_reach_the_provider(native: bool) -> None:
    """Probes I and J: top-level `feature` and `team` attributed the call and were forwarded;
    OpenAI answers an unknown parameter with a 400, so the call failed at a real provider."""
    chat = parse_chat_request(
        {
            "model": "gpt-4o",
            "messages": MSG,
            "user": "u",
            "user_id": "u",
            "session_id": "s",
            "feature": "f",
            "team": "t",
        },
        native=native,
    )
    assert set(chat.upstream_body) - {"user"} == {"messages", "model"}


@pytest.mark.parametrize(
    ("model", "field"),
    [
        ("gpt-4o", "max_tokens"),
        ("gpt-4o-mini", "max_tokens"),
        ("gpt-4.1", "max_tokens"),
        ("o1", "max_completion_tokens"),
        ("o3-mini", "max_completion_tokens"),
        ("o4-mini-2025-04-16", "max_completion_tokens"),
        ("gpt-5", "max_completion_tokens"),
        ("gpt-5-mini", "max_completion_tokens"),
        ("openai/o3", "max_completion_tokens"),
        ("omni-moderation", "max_tokens"),
    ],
)
def test_a_capped_call_gets_the_output_limit_its_model_takes(model: str, field: str) -> None:
    """Probe I: the gate capped every call in `max_tokens`, which OpenAI's reasoning models
    refuse ("use 'max_completion_tokens' instead"): every capped o3 or gpt-5 call was a 400."""
    chat = parse_chat_request({"model": model, "messages": MSG})
    chat.cap_output(300)
    assert {k: v for k, v in chat.upstream_body.items() if k.startswith("max")} == {field: 300}
    # What the client sent is what is capped, whatever the model.
    chat = parse_chat_request({"model": model, "messages": MSG, "max_tokens": 900})
    chat.cap_output(300)
    assert {k: v for k, v in chat.upstream_body.items() if k.startswith("max")} == {
        "max_tokens": 300
    }


def _call(wants_usage: bool) -> Call:
    body = {"model": "m", "messages": MSG, "stream": True}
    if wants_usage:
        body["stream_options"] = {"include_usage": True}
    return Call("r", "chat.completions", Identity("u"), parse_chat_request(body), deadline=0.0)


def _sse(obj: object) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


CHUNKS = [
    _sse({"choices": [{"index": 0, "delta": {"role": "assistant", "content": "Hel"}}]}),
    _sse({"choices": [{"index": 0, "delta": {"content": "lo world"}}]}),
    _sse({"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 3}}),
    b"data: [DONE]\n\n",
]


@pytest.mark.parametrize("split", [1, 7, 1000])
def test_relay_captures_usage_whatever_the_chunking(split: int) -> None:
    call = _call(wants_usage=True)
    relay = SseRelay(call)
    stream = b"".join(CHUNKS)
    forwarded = b"".join(relay.feed(stream[i : i + split]) for i in range(0, len(stream), split))
    forwarded += relay.flush()
    assert forwarded == stream
    assert (call.prompt_tokens, call.completion_tokens) == (9, 3)
    assert "".join(call.generated_text) == "Hello world"
    assert call.ttft_ms is not None


def test_relay_hides_the_usage_chunk_the_client_did_not_ask_for() -> None:
    call = _call(wants_usage=False)
    relay = SseRelay(call)
    forwarded = b"".join(relay.feed(c) for c in CHUNKS)
    assert b'"usage"' not in forwarded
    assert forwarded.endswith(b"data: [DONE]\n\n")
    assert call.completion_tokens == 3


def test_unknown_fields_reach_the_provider_untouched() -> None:
    """OpenAI adds request fields all the time: the model must not drop or rewrite them."""
    body = {
        "model": "gpt-4o",
        "messages": [{"role": "user", "content": "hi", "name": "x", "future_field": [1, {"a": 2}]}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "s", "strict": True}},
        "reasoning_effort": "low",
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
        "some_field_openai_adds_tomorrow": {"nested": [None, 1.5, "x"]},
        "metadata": {"feature": "f", "other": "kept"},
        "store": True,
        "user_id": "u",
        "session_id": "s",
    }
    chat = parse_chat_request(orjson.loads(orjson.dumps(body)))
    expected = {k: v for k, v in body.items() if k not in ("user_id", "session_id")}
    assert chat.upstream_body == expected
    assert orjson.loads(orjson.dumps(chat.upstream_body)) == expected


@pytest.mark.parametrize("store", [None, False])
def test_metadata_is_forwarded_only_when_the_client_asks_openai_to_store(
    store: bool | None,
) -> None:
    """OpenAI refuses `metadata` unless `store` is true, and Tollgate reads it for the
    feature: forwarded as given, a newcomer's `metadata.feature` attribution would have
    turned every call into a 400 from OpenAI."""
    body: dict[str, object] = {"model": "gpt-4o", "messages": MSG, "metadata": {"feature": "f"}}
    if store is not None:
        body["store"] = store
    upstream = parse_chat_request(body).upstream_body
    assert "metadata" not in upstream
    assert upstream.get("store", None) == store


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"model": "m", "messages": MSG, "max_tokens": 2**31}, "max_tokens", "1 to 2147483647"),
        ({"model": "m", "messages": MSG, "n": 0}, "n", "integer from 1"),
        ({"model": "m", "messages": [{"content": "x"}]}, "messages[0].role", "is required"),
        (
            {"model": "m", "messages": [{"role": "user", "content": 5}]},
            "messages[0].content",
            "content",
        ),
        ({"model": "m", "messages": MSG, "stream": 1}, "stream", "true or false"),
        ({"model": "m", "messages": []}, "messages", "at least 1"),
    ],
)
def test_validation_messages_name_the_field_and_the_fix(body: dict, param: str, words: str) -> None:
    with pytest.raises(TollgateError) as info:
        parse_chat_request(body)
    assert info.value.field == param
    assert f"'{param}'" in info.value.message and words in info.value.message


def test_a_sessions_outcome_goes_to_the_feature_and_user_it_names_else_the_latest_call() -> None:
    """Probe R: a session through chat, then summary, then search had an outcome naming
    only the session go to search, whichever feature it was about."""
    from app.gateway.pipeline import Gateway
    from app.metrics import Metrics
    from app.pricing.catalog import PriceCatalog

    gateway = Gateway(None, PriceCatalog(), None, Metrics(), None)  # type: ignore[arg-type]
    for n, (user, feature) in enumerate(
        [("alice", "chat"), ("alice", "summary"), ("bob", "chat"), ("alice", "search")]
    ):
        gateway.remember(f"r{n}", Identity(user, "s1", feature))

    def attributed(**named: str | None) -> tuple[str | None, str | None]:
        outcome: dict[str, str | None] = {"session_id": "s1", "outcome": "success", **named}
        assert gateway.attribute_outcome(outcome) is None
        return outcome.get("user_id"), outcome.get("feature")

    assert attributed() == ("alice", "search")  # the latest call
    assert attributed(feature="summary") == ("alice", "summary")
    assert attributed(feature="chat") == ("bob", "chat")  # the feature's latest call
    assert attributed(user_id="alice", feature="chat") == ("alice", "chat")
    assert attributed(user_id="bob") == ("bob", "chat")
    assert attributed(user_id="carol") == ("alice", "search")  # no such caller: the latest
