"""The upstream simulator over real HTTP, checked with the official ``openai`` SDK."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web

from devtools.simulator import (
    DEFAULT_MODELS,
    MESSAGE_OVERHEAD_TOKENS,
    SimModel,
    SimulatorConfig,
    _chunk_pieces,
    _Filler,
    count_field_tokens,
    count_message_tokens,
    count_tokens,
    create_app,
    serve,
)

INSTANT = SimulatorConfig(latency_scale=0, seed=7)
MESSAGES: list[Any] = [
    {"role": "system", "content": "You are a terse assistant for a FinOps team."},
    {"role": "user", "content": "Summarise last month's LLM spend by team, please."},
]


@asynccontextmanager
async def running(config: SimulatorConfig) -> AsyncIterator[str]:
    """Start the simulator on an ephemeral port; yield its OpenAI base URL."""
    runner = web.AppRunner(create_app(config), access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        await runner.cleanup()


@pytest.fixture
async def base_url() -> AsyncIterator[str]:
    async with running(INSTANT) as url:
        yield url


@pytest.fixture
async def client(base_url: str) -> AsyncIterator[openai.AsyncOpenAI]:
    sdk = openai.AsyncOpenAI(base_url=base_url, api_key="x", max_retries=0)
    yield sdk
    await sdk.close()


def _sync_client(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url, api_key="x", max_retries=0)


async def _collect_stream(
    sdk: openai.AsyncOpenAI, **kwargs: Any
) -> tuple[list[Any], str, str | None, Any]:
    """(chunks, concatenated content, finish_reason, usage chunk's usage or None)."""
    chunks = [c async for c in await sdk.chat.completions.create(stream=True, **kwargs)]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    usages = [c.usage for c in chunks if c.usage is not None]
    assert len(usages) <= 1
    return chunks, text, finishes[-1], usages[0] if usages else None


# -- pure functions ---------------------------------------------------------------------


def test_count_tokens_approximation() -> None:
    assert count_tokens("") == 0
    assert count_tokens("   \n") == 0
    assert count_tokens("a") == 1
    assert count_tokens("abcd") == 1
    assert count_tokens("abcde") == 2
    assert count_tokens("hello world") == 4
    assert count_tokens("  a \n b\tc ") == 3
    assert count_tokens("x" * 400) == 100
    assert count_tokens("a b") == count_tokens("a") + count_tokens("b")


def test_count_message_tokens() -> None:
    messages = [
        {"role": "user", "content": "hello world"},
        {"role": "user", "content": [{"type": "text", "text": "abcde"}, {"type": "image_url"}]},
        {"role": "assistant", "content": None},
    ]
    assert count_message_tokens(messages) == 4 + 2 + 3 * MESSAGE_OVERHEAD_TOKENS
    with pytest.raises(ValueError):
        count_message_tokens([{"content": "no role"}])
    with pytest.raises(ValueError):
        count_message_tokens([{"role": "user", "content": 42}])


def test_filler_has_exact_token_counts() -> None:
    filler = _Filler(64)
    for start in (0, 1, 5, 17, filler.base_len - 1, 10**9):
        for n in range(300):
            words = filler.words(n, start)
            text = " ".join(words)
            assert count_tokens(text) == n
            pieces = _chunk_pieces(words)
            assert "".join(p for p, _ in pieces) == text
            assert sum(t for _, t in pieces) == n


def test_config_validation() -> None:
    with pytest.raises(ValueError):
        SimModel("m", "luxury", 10)
    with pytest.raises(ValueError):
        SimulatorConfig(error_rate=1.5)
    with pytest.raises(ValueError):
        SimulatorConfig(models=(SimModel("m", "economy", 1), SimModel("m", "premium", 2)))
    names = {m.name for m in DEFAULT_MODELS}
    assert {"gpt-4", "gpt-4o", "gpt-4o-mini", "gpt-3.5-turbo", "tollgate-sim-unpriced"} <= names


# -- over HTTP with the SDK ---------------------------------------------------------------


async def test_models_list_and_retrieve(client: openai.AsyncOpenAI) -> None:
    page = await client.models.list()
    assert [m.id for m in page.data] == [m.name for m in DEFAULT_MODELS]
    assert all(m.owned_by == "tollgate-sim" and m.object == "model" for m in page.data)
    assert (await client.models.retrieve("gpt-4o")).id == "gpt-4o"
    with pytest.raises(openai.NotFoundError):
        await client.models.retrieve("nope")


async def test_non_streaming_usage_matches_count_tokens(client: openai.AsyncOpenAI) -> None:
    resp = await client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert resp.id.startswith("chatcmpl-")
    assert resp.object == "chat.completion"
    assert resp.model == "gpt-4o"
    choice = resp.choices[0]
    assert choice.message.role == "assistant"
    assert choice.finish_reason == "stop"
    content = choice.message.content or ""
    usage = resp.usage
    assert usage is not None
    expected_prompt = sum(count_tokens(m["content"]) for m in MESSAGES) + 4 * len(MESSAGES)
    assert usage.prompt_tokens == expected_prompt
    assert usage.completion_tokens == count_tokens(content) > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert usage.prompt_tokens_details is not None
    assert usage.prompt_tokens_details.cached_tokens == 0


async def test_content_parts_count_toward_prompt(client: openai.AsyncOpenAI) -> None:
    resp = await client.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": [{"type": "text", "text": "abcde fghij"}]}],
    )
    assert resp.usage is not None
    assert resp.usage.prompt_tokens == 4 + MESSAGE_OVERHEAD_TOKENS


async def test_tools_and_a_response_schema_are_billed_as_prompt(
    client: openai.AsyncOpenAI,
) -> None:
    """OpenAI bills tool definitions and a JSON schema as prompt tokens; the simulator did
    not (5 prompt tokens for 1.8 million tokens of tools), so the sandbox could not show a
    cap crossed by them."""
    tools = [
        {
            "type": "function",
            "function": {"name": f"f{i}", "description": "Look up an invoice. " * 20},
        }
        for i in range(10)
    ]
    schema = {
        "type": "json_schema",
        "json_schema": {"name": "answer", "schema": {"type": "object", "properties": {}}},
    }
    messages = [{"role": "user", "content": "Hi"}]
    resp = await client.chat.completions.create(
        model="gpt-4o", messages=messages, tools=tools, response_format=schema
    )
    assert resp.usage is not None
    expected = count_field_tokens([tools, schema])
    assert expected > 400
    assert resp.usage.prompt_tokens == 1 + MESSAGE_OVERHEAD_TOKENS + expected


async def test_streaming_usage_matches_recounted_content(client: openai.AsyncOpenAI) -> None:
    chunks, text, finish, usage = await _collect_stream(
        client, model="gpt-4o", messages=MESSAGES, stream_options={"include_usage": True}
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    assert finish == "stop"
    assert chunks[-1].choices == []
    assert usage is not None
    assert usage.completion_tokens == count_tokens(text) > 0
    assert usage.prompt_tokens == count_message_tokens(MESSAGES)
    # Same text as the non-streaming answer to the same prompt.
    resp = await client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert resp.choices[0].message.content == text


async def test_streaming_without_include_usage_has_no_usage(client: openai.AsyncOpenAI) -> None:
    chunks, text, finish, usage = await _collect_stream(client, model="gpt-4o", messages=MESSAGES)
    assert usage is None
    assert finish == "stop"
    assert text
    assert all(c.choices for c in chunks)


async def test_max_tokens_caps_with_length(client: openai.AsyncOpenAI) -> None:
    force = {"X-Sim-Completion-Tokens": "50"}
    resp = await client.chat.completions.create(
        model="gpt-4o", messages=MESSAGES, max_tokens=10, extra_headers=force
    )
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage is not None and resp.usage.completion_tokens == 10
    assert count_tokens(resp.choices[0].message.content or "") == 10

    resp = await client.chat.completions.create(
        model="gpt-4o", messages=MESSAGES, max_completion_tokens=50, extra_headers=force
    )
    assert resp.choices[0].finish_reason == "stop"
    assert resp.usage is not None and resp.usage.completion_tokens == 50

    _, text, finish, usage = await _collect_stream(
        client,
        model="gpt-4o",
        messages=MESSAGES,
        max_tokens=7,
        stream_options={"include_usage": True},
        extra_headers=force,
    )
    assert finish == "length"
    assert usage is not None and usage.completion_tokens == count_tokens(text) == 7


async def test_model_output_limit_caps(client: openai.AsyncOpenAI) -> None:
    resp = await client.chat.completions.create(
        model="gpt-3.5-turbo",
        messages=MESSAGES,
        extra_headers={"X-Sim-Completion-Tokens": "5000"},
    )
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage is not None and resp.usage.completion_tokens == 4096
    assert count_tokens(resp.choices[0].message.content or "") == 4096


async def test_unknown_model_is_not_found(client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        await client.chat.completions.create(model="gpt-9", messages=MESSAGES)
    assert info.value.code == "model_not_found"
    assert info.value.type == "invalid_request_error"


async def test_forced_status(base_url: str, client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.InternalServerError) as info:
        await client.chat.completions.create(
            model="gpt-4o", messages=MESSAGES, extra_headers={"X-Sim-Status": "500"}
        )
    assert info.value.status_code == 500
    assert info.value.type == "server_error"

    def sync_call() -> None:
        with _sync_client(base_url) as sync:
            sync.chat.completions.create(
                model="gpt-4o", messages=MESSAGES, extra_headers={"X-Sim-Status": "429"}
            )

    with pytest.raises(openai.RateLimitError):
        await asyncio.to_thread(sync_call)


async def test_omit_usage_hook(client: openai.AsyncOpenAI) -> None:
    chunks, text, finish, usage = await _collect_stream(
        client,
        model="gpt-4o",
        messages=MESSAGES,
        stream_options={"include_usage": True},
        extra_headers={"X-Sim-Omit-Usage": "1", "X-Sim-Completion-Tokens": "33"},
    )
    assert usage is None
    assert all(c.choices for c in chunks)
    assert finish == "stop"
    assert count_tokens(text) == 33


async def test_same_prompt_same_length(base_url: str, client: openai.AsyncOpenAI) -> None:
    lengths = []
    for _ in range(2):
        resp = await client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
        assert resp.usage is not None
        lengths.append(resp.usage.completion_tokens)

    def sync_call() -> int:
        with _sync_client(base_url) as sync:
            resp = sync.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
            assert resp.usage is not None
            return resp.usage.completion_tokens

    lengths.append(await asyncio.to_thread(sync_call))
    assert len(set(lengths)) == 1
    # A fresh simulator with another seed gives the same lengths too.
    async with running(SimulatorConfig(latency_scale=0, seed=99)) as other_url:
        other = openai.AsyncOpenAI(base_url=other_url, api_key="x", max_retries=0)
        resp = await other.chat.completions.create(model="gpt-4o", messages=MESSAGES)
        await other.close()
    assert resp.usage is not None and resp.usage.completion_tokens == lengths[0]
    # ... while different prompts spread over different lengths.
    spread = set()
    for i in range(8):
        prompt: list[Any] = [{"role": "user", "content": f"question number {i}"}]
        resp = await client.chat.completions.create(model="gpt-4o", messages=prompt)
        assert resp.usage is not None
        spread.add(resp.usage.completion_tokens)
    assert len(spread) > 1


async def test_bad_requests(base_url: str, client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError):
        await client.chat.completions.create(
            model="gpt-4o", messages=MESSAGES, n=129
        )  # n up to 128, as OpenAI
    with pytest.raises(openai.BadRequestError):
        await client.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=0)
    url = f"{base_url}/chat/completions"
    async with aiohttp.ClientSession() as session:
        for body in (
            b"{not json",
            b"[]",
            b'{"model": "gpt-4o"}',
            b'{"model":"gpt-4o","messages":[]}',
        ):
            async with session.post(url, data=body) as resp:
                assert resp.status == 400
                error = (await resp.json())["error"]
                assert error["type"] == "invalid_request_error"
                assert set(error) == {"message", "type", "param", "code"}
        headers = {"X-Sim-Completion-Tokens": "lots"}
        async with session.post(
            url, json={"model": "gpt-4o", "messages": MESSAGES}, headers=headers
        ) as resp:
            assert resp.status == 400


async def test_unknown_routes_and_methods_answer_openai_errors(
    base_url: str, client: openai.AsyncOpenAI
) -> None:
    """The simulator on 8701 is the stack's OpenAI-compatible upstream: an endpoint it does not
    serve (embeddings) or a wrong method was a plain-text "404: Not Found" that the SDK could
    not parse; OpenAI answers such calls with its JSON error (a newcomer probe)."""
    with pytest.raises(openai.NotFoundError) as info:
        await client.embeddings.create(model="text-embedding-3-small", input="x")
    assert info.value.type == "invalid_request_error"
    assert "/v1/embeddings" in info.value.message
    async with aiohttp.ClientSession() as session:
        for method, path, status in (
            ("GET", "/nope", 404),
            ("PUT", "/v1/chat/completions", 405),
            ("DELETE", "/v1/models", 405),
        ):
            url = base_url.removesuffix("/v1") + path
            async with session.request(method, url) as resp:
                assert resp.status == status
                assert resp.content_type == "application/json"
                error = (await resp.json())["error"]
                assert set(error) == {"message", "type", "param", "code"}
                assert error["type"] == "invalid_request_error"
                assert f"{method} {path}" in error["message"]


async def test_random_errors() -> None:
    async with running(SimulatorConfig(latency_scale=0, error_rate=1.0, seed=3)) as url:
        sdk = openai.AsyncOpenAI(base_url=url, api_key="x", max_retries=0)
        statuses = set()
        for _ in range(12):
            with pytest.raises(openai.APIStatusError) as info:
                await sdk.chat.completions.create(model="gpt-4o", messages=MESSAGES)
            statuses.add(info.value.status_code)
        await sdk.close()
    assert statuses == {429, 500}


async def test_latency_hook_and_configured_delays() -> None:
    config = SimulatorConfig(
        latency_scale=1.0, ttft_ms_median=60, ttft_sigma=0, inter_token_ms=1.0, seed=1
    )
    async with running(config) as url:
        sdk = openai.AsyncOpenAI(base_url=url, api_key="x", max_retries=0)
        headers = {"X-Sim-Completion-Tokens": "80"}
        start = time.perf_counter()
        stream = await sdk.chat.completions.create(
            model="gpt-4o", messages=MESSAGES, stream=True, extra_headers=headers
        )
        first_content = None
        async for c in stream:
            if first_content is None and c.choices and c.choices[0].delta.content:
                first_content = time.perf_counter() - start
        total = time.perf_counter() - start
        assert first_content is not None and first_content >= 0.055
        assert total >= 0.055 + 0.070  # ttft + (80 - first chunk) tokens at 1 ms

        await sdk.close()

    # The hook replaces the configured delays: against a configured 20 s first token, a call
    # with X-Sim-Latency-Ms 30 takes its 30 ms and far less than 20 s (the bound is loose on
    # purpose: a loaded machine must not make it fail).
    slow = SimulatorConfig(latency_scale=1.0, ttft_ms_median=20_000, ttft_sigma=0, seed=1)
    async with running(slow) as url:
        sdk = openai.AsyncOpenAI(base_url=url, api_key="x", max_retries=0)
        start = time.perf_counter()
        await sdk.chat.completions.create(
            model="gpt-4o", messages=MESSAGES, extra_headers={**headers, "X-Sim-Latency-Ms": "30"}
        )
        assert 0.028 <= time.perf_counter() - start < 10.0
        await sdk.close()

    async with running(INSTANT) as url:  # the hook is not scaled by latency_scale=0
        sdk = openai.AsyncOpenAI(base_url=url, api_key="x", max_retries=0)
        start = time.perf_counter()
        _, text, _, _ = await _collect_stream(
            sdk, model="gpt-4o", messages=MESSAGES, extra_headers={"X-Sim-Latency-Ms": "100"}
        )
        assert time.perf_counter() - start >= 0.095
        assert text
        await sdk.close()


async def test_client_disconnect_mid_stream_is_quiet(caplog: pytest.LogCaptureFixture) -> None:
    config = SimulatorConfig(latency_scale=1.0, ttft_ms_median=0, inter_token_ms=5.0)
    body = {"model": "gpt-4o", "messages": MESSAGES, "stream": True}
    headers = {"X-Sim-Completion-Tokens": "2000"}  # ~10 s if it ran to completion
    with caplog.at_level(logging.DEBUG):
        async with running(config) as url, aiohttp.ClientSession() as session:
            for _ in range(3):
                async with session.post(
                    f"{url}/chat/completions", json=body, headers=headers
                ) as resp:
                    assert resp.status == 200
                    assert resp.headers["Content-Type"].startswith("text/event-stream")
                    assert (await resp.content.readline()).startswith(b"data: ")
                    resp.close()
            await asyncio.sleep(0.1)
            async with session.get(f"{url}/models") as resp:  # still healthy
                assert resp.status == 200
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    disconnects = [r for r in caplog.records if r.getMessage().startswith("client disconnected")]
    assert len(disconnects) == 3


async def test_serve_until_cancelled() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    task = asyncio.create_task(serve("127.0.0.1", port, INSTANT))
    url = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession() as session:
        for _ in range(100):
            try:
                async with session.get(f"{url}/healthz") as resp:
                    if resp.status == 200:
                        break
            except aiohttp.ClientConnectionError:
                await asyncio.sleep(0.01)
        sdk = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        assert (await sdk.models.list()).data
        await sdk.close()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", port)


async def test_forced_content_is_answered_as_given(client: openai.AsyncOpenAI) -> None:
    said = "I can't help with that, sorry."
    hook = {"X-Sim-Content": said}
    resp = await client.chat.completions.create(
        model="gpt-4o", messages=MESSAGES, extra_headers=hook
    )
    assert resp.choices[0].message.content == said and resp.choices[0].finish_reason == "stop"
    assert resp.usage is not None and resp.usage.completion_tokens == count_tokens(said)
    chunks, text, finish, _ = await _collect_stream(
        client, model="gpt-4o", messages=MESSAGES, extra_headers=hook
    )
    assert text == said and finish == "stop" and len(chunks) > 3  # several content chunks
    cut = await client.chat.completions.create(
        model="gpt-4o", messages=MESSAGES, max_tokens=3, extra_headers=hook
    )
    assert cut.choices[0].finish_reason == "length"
    assert cut.choices[0].message.content == "I can't"


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "days": {"type": "integer"},
                "unit": {"type": "string", "enum": ["c", "f"]},
                "detailed": {"type": "boolean"},
            },
            "required": ["city", "days", "unit"],
            "additionalProperties": False,
        },
    },
}


async def test_a_tool_call_is_answered_with_a_call_of_a_listed_tool(
    client: openai.AsyncOpenAI,
) -> None:
    """Session 17's probe (F7): the simulator ignored `tools`, so a tool-calling client
    could not be tried against `make up`. With tools and a user's turn it calls one (the
    one `tool_choice` names, else the first) with arguments its schema accepts; after the
    tool's answer it answers in text, so an agent loop ends."""
    import json

    messages: list[Any] = [{"role": "user", "content": "Weather in Paris?"}]
    resp = await client.chat.completions.create(
        model="gpt-4o", messages=messages, tools=[WEATHER_TOOL]
    )
    choice = resp.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather"
    arguments = json.loads(call.function.arguments)
    assert set(arguments) >= {"city", "days", "unit"} and arguments["unit"] in ("c", "f")
    assert isinstance(arguments["city"], str) and isinstance(arguments["days"], int)
    assert resp.usage is not None and resp.usage.completion_tokens == count_tokens(
        call.function.name
    ) + count_tokens(call.function.arguments)
    messages += [
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "18 C, sunny"},
    ]
    after = await client.chat.completions.create(
        model="gpt-4o", messages=messages, tools=[WEATHER_TOOL]
    )
    assert after.choices[0].finish_reason == "stop" and after.choices[0].message.content
    none = await client.chat.completions.create(
        model="gpt-4o", messages=messages[:1], tools=[WEATHER_TOOL], tool_choice="none"
    )
    assert none.choices[0].message.tool_calls is None


async def test_a_streamed_tool_call_assembles_into_the_same_call(
    client: openai.AsyncOpenAI,
) -> None:
    import json

    kwargs: dict[str, Any] = {
        "model": "gpt-4o",
        "messages": [{"role": "user", "content": "Weather in Oslo?"}],
        "tools": [WEATHER_TOOL],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
    }
    whole = await client.chat.completions.create(**kwargs)
    stream = await client.chat.completions.create(
        **kwargs, stream=True, stream_options={"include_usage": True}
    )
    name, arguments, finish, usage = "", "", None, None
    async for chunk in stream:
        usage = chunk.usage or usage
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            for delta in choice.delta.tool_calls or []:
                name += delta.function.name or "" if delta.function else ""
                arguments += delta.function.arguments or "" if delta.function else ""
    [call] = whole.choices[0].message.tool_calls or []
    assert (name, json.loads(arguments)) == (
        call.function.name,
        json.loads(call.function.arguments),
    )
    assert finish == "tool_calls"
    assert usage is not None and whole.usage is not None
    assert usage.completion_tokens == whole.usage.completion_tokens


async def test_a_structured_output_parses_into_its_schema(client: openai.AsyncOpenAI) -> None:
    """`response_format` json_schema (what the SDK's `parse()` sends) and json_object get
    JSON back, not prose."""
    import json

    from pydantic import BaseModel

    class Invoice(BaseModel):
        customer: str
        total: float
        lines: list[str]
        paid: bool

    parsed = await client.beta.chat.completions.parse(
        model="gpt-4o",
        messages=[{"role": "user", "content": "Extract the invoice."}],
        response_format=Invoice,
    )
    invoice = parsed.choices[0].message.parsed
    assert isinstance(invoice, Invoice)
    assert parsed.usage is not None
    content = parsed.choices[0].message.content or ""
    assert parsed.usage.completion_tokens == count_tokens(content)
    plain = await client.chat.completions.create(
        model="gpt-4o",
        messages=[{"role": "user", "content": "Reply in JSON."}],
        response_format={"type": "json_object"},
    )
    assert isinstance(json.loads(plain.choices[0].message.content or ""), dict)


async def test_structured_outputs_fit_formats_patterns_lengths_and_recursive_models(
    client: openai.AsyncOpenAI,
) -> None:
    """Session 17's third probe: datetime, date and UUID fields got filler text, a pattern
    and a maxLength were ignored, and a recursive model ended in nulls for required fields:
    `parse()` raised after a billed 200."""
    import datetime
    import uuid
    from typing import Annotated

    from pydantic import BaseModel, Field

    class Node(BaseModel):
        name: str
        children: list[Node]
        parent: Node | None = None

    class Edge(BaseModel):
        when: datetime.datetime
        day: datetime.date
        uid: uuid.UUID
        code: Annotated[str, Field(pattern=r"^[A-Z]{3}-\d{2}$")]
        word: Annotated[str, Field(min_length=5, max_length=8)]
        count: Annotated[int, Field(ge=10, le=20, multiple_of=5)]
        ratio: Annotated[float, Field(gt=0, lt=1)]
        tree: Node

    parsed = await client.beta.chat.completions.parse(
        model="gpt-4o",
        messages=[{"role": "user", "content": "Fill it in."}],
        response_format=Edge,
    )
    assert isinstance(parsed.choices[0].message.parsed, Edge)


async def test_a_tool_choice_openai_refuses_is_refused(client: openai.AsyncOpenAI) -> None:
    messages = [{"role": "user", "content": "Hi"}]
    with pytest.raises(openai.BadRequestError):
        await client.chat.completions.create(
            model="gpt-4o", messages=messages, tools=[WEATHER_TOOL], tool_choice="bogus"
        )  # type: ignore[call-overload]
    with pytest.raises(openai.BadRequestError):
        await client.chat.completions.create(
            model="gpt-4o", messages=messages, tool_choice="required"
        )
