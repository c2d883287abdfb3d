"""A routed stream held until its first content: what ends the hold, from a real aiohttp
upstream (no Kafka). Content releases it with everything said so far; an end without content,
a refusal, or a broken connection is the failure that escalates."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from app.gateway.chat import hold_until_content
from app.gateway.pipeline import Call, ChatRequest, Gateway, SseRelay
from app.metering.attribution import Identity
from app.metrics import Metrics
from app.pricing.catalog import PriceCatalog
from app.routing.escalation import Failure


def event(delta: dict[str, Any], finish: str | None = None) -> bytes:
    chunk = {"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    return b"data: " + orjson.dumps(chunk) + b"\n\n"


ROLE = event({"role": "assistant", "content": ""})
USAGE = b'data: {"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 0}}\n\n'
DONE = b"data: [DONE]\n\n"


async def held(
    parts: list[bytes], *, break_after: bool = False, phrases: tuple[str, ...] = ()
) -> tuple[Any, Call, bytes]:
    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for part in parts:
            await response.write(part)
            await asyncio.sleep(0)
        if break_after:
            assert request.transport is not None
            request.transport.close()  # a chunked body that never ends properly
            return response
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post("/", handler)
    server = TestServer(app)
    await server.start_server()
    gateway = Gateway(None, PriceCatalog(), None, Metrics(), None)  # type: ignore[arg-type]
    chat = ChatRequest("gpt-4o-mini", {}, True, False, None, 9)
    loop = asyncio.get_running_loop()
    call = Call("r1", "chat.completions", Identity("u"), chat, deadline=loop.time() + 30)
    call.upstream = "test"
    try:
        async with aiohttp.ClientSession() as session:
            upstream = await session.post(server.make_url("/"))
            relay = SseRelay(call)
            result = await hold_until_content(gateway, call, upstream, relay, phrases)
            rest = b"" if result.ended else await upstream.read()
            upstream.release()
    finally:
        await server.close()
    return result, call, rest


async def test_content_releases_the_stream_with_what_came_before() -> None:
    text = event({"content": "Paris"})
    result, call, rest = await held([ROLE, text, event({}, "stop"), USAGE, DONE])
    assert result.failure is None and not result.ended
    assert result.data == ROLE + text  # whole events, in order, nothing lost
    assert rest.startswith(b"data: ")  # the rest is still the upstream's to relay
    assert call.status == "ok"


async def test_a_tool_call_is_content() -> None:
    tool = event({"tool_calls": [{"index": 0, "function": {"name": "f", "arguments": ""}}]})
    result, _, _ = await held([ROLE, tool, DONE])
    assert result.failure is None and result.data.endswith(tool)


@pytest.mark.parametrize(
    ("finish", "failure"),
    [("stop", Failure.EMPTY), ("length", Failure.TRUNCATED), ("content_filter", Failure.REFUSED)],
)
async def test_a_stream_that_ends_without_content_fails(finish: str, failure: Failure) -> None:
    result, call, _ = await held([ROLE, event({}, finish), USAGE, DONE])
    assert result.failure is failure and result.ended
    assert call.prompt_tokens == 9  # its usage was read: the failed attempt is paid
    assert result.data.endswith(DONE)  # what the client gets if it does not escalate


async def test_a_refusal_delta_fails_at_once() -> None:
    result, _, _ = await held([ROLE, event({"refusal": "I can't"}), event({}, "stop"), DONE])
    assert result.failure is Failure.REFUSED and result.ended


async def test_a_stream_broken_before_content_is_an_upstream_error() -> None:
    result, call, _ = await held([ROLE], break_after=True)
    assert result.failure is Failure.UPSTREAM_ERROR and result.ended
    assert call.status == "error" and call.error_type == "upstream_stream_broken"


# -- refusal phrases: held while the text could still open with one ----------------------------
PHRASES = ("i can't help with", "i'm sorry, but i can't")


def text(content: str) -> bytes:
    return event({"content": content})


async def test_a_phrase_split_over_chunks_in_any_case_is_refused() -> None:
    # leading whitespace, upper case and a typographic apostrophe: read as the validator reads
    parts = [ROLE, text("\n I"), text(" CAN\u2019T"), text(" help"), text(" with that.")]
    result, _, _ = await held([*parts, event({}, "stop"), DONE], phrases=PHRASES)
    assert result.failure is Failure.REFUSED and result.ended
    assert result.data.startswith(ROLE)


async def test_the_hold_ends_where_the_text_diverges_from_every_phrase() -> None:
    parts = [ROLE, text("I"), text(" can't"), text(" wait"), text(" to help.")]
    result, _, rest = await held([*parts, event({}, "stop"), DONE], phrases=PHRASES)
    assert result.failure is None and not result.ended
    assert result.data == b"".join(parts[:4])  # held through " can't", released at " wait"
    assert rest.startswith(text(" to help."))


async def test_a_short_answer_that_ends_as_a_prefix_is_served() -> None:
    parts = [ROLE, text("I can't"), event({}, "stop"), USAGE, DONE]
    result, _, _ = await held(parts, phrases=PHRASES)
    assert result.failure is None and result.ended
    # the whole stream, for the client (without the usage chunk it did not ask for)
    assert result.data == b"".join(p for p in parts if p is not USAGE)


async def test_a_prefix_cut_by_the_length_limit_is_truncated() -> None:
    parts = [ROLE, text("I can't"), event({}, "length"), DONE]
    result, _, _ = await held(parts, phrases=PHRASES)
    assert result.failure is Failure.TRUNCATED


async def test_without_phrases_the_first_content_releases() -> None:
    parts = [ROLE, text("I can't help with"), text(" that.")]
    result, _, _ = await held([*parts, event({}, "stop"), DONE])
    assert result.failure is None and result.data == b"".join(parts[:2])


async def test_a_tool_call_is_released_at_once_with_phrases() -> None:
    tool = event({"tool_calls": [{"index": 0, "function": {"name": "f", "arguments": ""}}]})
    result, _, _ = await held([ROLE, tool, DONE], phrases=PHRASES)
    assert result.failure is None and result.data.endswith(tool) and not result.ended


async def test_the_end_of_a_stream_is_held_only_at_its_own_event() -> None:
    """`data: [DONE]` quoted inside a chunk (a tool's argument, an answer about SSE) is not
    the stream's end: it is not held (session 17's third probe)."""
    from app.gateway.chat import StreamEnd

    sent: list[bytes] = []

    async def write(data: bytes) -> None:
        sent.append(data)

    end = StreamEnd(write)
    quoted = b'data: {"choices":[{"delta":{"content":"end with data: [DONE]"}}]}\n\n'
    await end.write(quoted)
    assert sent == [quoted] and end.held == b""
    await end.write(b'data: {"choices":[]}\n\ndata: [DONE]\n\n')
    assert sent[-1] == b'data: {"choices":[]}\n\n' and end.held == b"data: [DONE]\n\n"
