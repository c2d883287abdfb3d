"""A cached answer replayed as SSE is, for the official ``openai`` SDK, the same answer.

A tiny aiohttp server answers ``/v1/chat/completions`` with :func:`sse_replay` bytes; the
real SDK streams them, and ``ChatCompletionStreamState`` (the SDK's own accumulator)
rebuilds the completion, which must equal the cached one.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import openai
import pytest
from aiohttp import web
from openai.lib.streaming.chat import ChatCompletionStreamState

from app.cache import sse_replay

TEXT = (
    "Paris is the capital of France.\n\nIt has  two spaces, a tab\tand ünïcödé — "
    "and a trailing space "
)
COMPLETION: dict[str, Any] = {
    "id": "chatcmpl-abc123",
    "object": "chat.completion",
    "created": 1764600000,
    "model": "gpt-4o-mini-2024-07-18",
    "system_fingerprint": "fp_123",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": TEXT, "refusal": None},
            "logprobs": None,
            "finish_reason": "stop",
        }
    ],
    "usage": {
        "prompt_tokens": 21,
        "completion_tokens": 30,
        "total_tokens": 51,
        "prompt_tokens_details": {"cached_tokens": 0},
    },
}
TOOL_COMPLETION: dict[str, Any] = {
    **COMPLETION,
    "choices": [
        {
            "index": 0,
            "message": {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                    },
                    {
                        "id": "call_2",
                        "type": "function",
                        "function": {"name": "get_time", "arguments": '{"tz": "CET"}'},
                    },
                ],
            },
            "logprobs": None,
            "finish_reason": "tool_calls",
        }
    ],
}
TWO_CHOICES: dict[str, Any] = {
    **COMPLETION,
    "choices": [
        COMPLETION["choices"][0],
        {
            "index": 1,
            "message": {"role": "assistant", "content": "Paris.", "refusal": None},
            "logprobs": None,
            "finish_reason": "length",
        },
    ],
}


@asynccontextmanager
async def replaying(completion: dict[str, Any]) -> AsyncIterator[str]:
    async def handler(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        wants_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(sse_replay(completion, include_usage=wants_usage))
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}/v1"
    finally:
        await runner.cleanup()


async def _stream(completion: dict[str, Any], include_usage: bool) -> tuple[list[Any], Any]:
    async with replaying(completion) as base_url:
        client = openai.AsyncOpenAI(base_url=base_url, api_key="x", max_retries=0)
        extra: dict[str, Any] = {"stream_options": {"include_usage": True}} if include_usage else {}
        stream = await client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], stream=True, **extra
        )
        chunks = [chunk async for chunk in stream]
        await client.close()
    state: ChatCompletionStreamState[Any] = ChatCompletionStreamState()
    for chunk in chunks:
        state.handle_chunk(chunk)
    return chunks, state.current_completion_snapshot


@pytest.mark.parametrize("completion", [COMPLETION, TOOL_COMPLETION, TWO_CHOICES])
async def test_the_sdk_rebuilds_the_cached_completion(completion: dict[str, Any]) -> None:
    chunks, rebuilt = await _stream(completion, include_usage=True)
    assert len(chunks) > 3  # really streamed in pieces
    assert rebuilt.id == completion["id"]
    assert rebuilt.model == completion["model"]
    assert rebuilt.created == completion["created"]
    assert rebuilt.system_fingerprint == completion["system_fingerprint"]
    assert rebuilt.usage is not None
    assert rebuilt.usage.model_dump(exclude_none=True) == completion["usage"]
    assert len(rebuilt.choices) == len(completion["choices"])
    for got, want in zip(rebuilt.choices, completion["choices"], strict=True):
        assert got.index == want["index"]
        assert got.finish_reason == want["finish_reason"]
        assert got.message.content == want["message"]["content"]
        calls = [
            {"id": c.id, "type": c.type, "function": {"name": c.function.name, "arguments": c.function.arguments}}
            for c in got.message.tool_calls or []
        ]  # fmt: skip
        assert calls == (want["message"].get("tool_calls") or [])
    # usage only on the last chunk, with no choices, as OpenAI sends it
    assert [c.usage is not None for c in chunks] == [False] * (len(chunks) - 1) + [True]
    assert chunks[-1].choices == []


async def test_without_include_usage_there_is_no_usage_chunk() -> None:
    chunks, rebuilt = await _stream(COMPLETION, include_usage=False)
    assert all(chunk.usage is None for chunk in chunks)
    assert all(chunk.choices for chunk in chunks)
    assert rebuilt.choices[0].message.content == TEXT


def test_the_stream_ends_with_done() -> None:
    data = sse_replay(COMPLETION, include_usage=False)
    assert data.endswith(b"data: [DONE]\n\n")
    assert all(event.startswith(b"data: ") for event in data.split(b"\n\n") if event)


async def test_a_cached_answer_with_logprobs_is_replayed_with_them() -> None:
    """A repeat asking for logprobs, streamed, got the cached text with no logprobs: the
    replay sent its pieces with ``logprobs: null``. The text now goes with them."""
    logprobs = {
        "content": [
            {"token": token, "logprob": -0.5, "bytes": list(token.encode()), "top_logprobs": []}
            for token in ("Paris", ".")
        ],
        "refusal": None,
    }
    completion = {
        **COMPLETION,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Paris.", "refusal": None},
                "logprobs": logprobs,
                "finish_reason": "stop",
            }
        ],
    }
    chunks, rebuilt = await _stream(completion, include_usage=False)
    assert rebuilt.choices[0].message.content == "Paris."
    tokens = [
        t.model_dump()
        for chunk in chunks
        for choice in chunk.choices
        for t in (choice.logprobs.content or [] if choice.logprobs else [])
    ]
    assert tokens == logprobs["content"]
