"""Refusal phrases on routed streams, through real parts: the openai SDK (stream=True) →
dispatcher → a recording relay → the simulator, told what the economy model answers.

A routed stream that opens with one of ``routing.refusal_phrases`` is a refused answer, as a
non-streamed one is: it escalates before its first byte reaches the client. A stream that only
starts like a phrase and then diverges is a good answer and reaches the client unchanged: the
bytes the client reads are the bytes the provider sent.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import aiohttp
import httpx
import openai
import orjson
import pytest
from aiohttp import web

from app.events.topics import ensure_topics
from app.routing.config import ProviderTiers, RoutingSettings
from app.settings import Settings
from tests.integration.harness import Stack, free_port, read_events, start_simulator

pytestmark = pytest.mark.integration

SHORT = [{"role": "user", "content": "What is the capital of France?"}]
ROUTING = RoutingSettings(
    providers=(
        ProviderTiers(provider="sim", economy="gpt-4o-mini", standard="gpt-4o", premium="gpt-4"),
    ),
    exploration_rate=0.0,
)


class Recorder:
    """An HTTP relay in front of the simulator that keeps every response body it passed on."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.bodies: list[tuple[str, bytearray]] = []  # (model asked for, raw response body)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower().startswith("x-sim-")}
        headers["Content-Type"] = "application/json"
        async with (
            aiohttp.ClientSession() as session,
            session.post(f"{self.upstream}{request.path}", data=body, headers=headers) as reply,
        ):
            response = web.StreamResponse(
                status=reply.status,
                headers={"Content-Type": reply.headers.get("Content-Type", "")},
            )
            await response.prepare(request)
            raw = bytearray()  # complete before the dispatcher can read the end of the stream
            self.bodies.append((orjson.loads(body)["model"], raw))
            async for data in reply.content.iter_any():
                raw += data
                await response.write(data)
            await response.write_eof()
        return response


@pytest.fixture
def stack(kafka_settings: Settings) -> Iterator[tuple[Stack, Recorder]]:
    asyncio.run(ensure_topics(kafka_settings))
    running = Stack(kafka_settings, routing=ROUTING)
    sim_port = free_port()
    recorder = Recorder(f"http://127.0.0.1:{sim_port}")

    async def start_relay() -> web.AppRunner:
        await start_simulator(sim_port)  # cleaned up with the loop at the end of the test
        app = web.Application()
        app.router.add_post("/v1/chat/completions", recorder.handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", running.sim_port).start()
        return runner

    relay = running.loop.run(start_relay())
    running.start(simulator=False)
    try:
        yield running, recorder
    finally:
        running.loop.run(relay.cleanup())
        running.stop()


def client(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.url}/v1", api_key="unused", max_retries=0)


def stream_raw(stack: Stack, content: str, user: str) -> tuple[httpx.Headers, bytes]:
    """(response headers, raw body) of a streamed ``model: "auto"`` call through the SDK, the
    economy model told to answer ``content``."""
    with client(stack).chat.completions.with_streaming_response.create(
        model="auto",
        messages=SHORT,
        user=user,
        stream=True,
        stream_options={"include_usage": True},
        extra_headers={"X-Sim-Content": content, "X-Sim-Models": "gpt-4o-mini"},
    ) as response:
        return response.headers, b"".join(response.iter_bytes())


def test_a_stream_opening_with_a_refusal_phrase_escalates(stack: tuple[Stack, Recorder]) -> None:
    running, recorder = stack
    raw = client(running).chat.completions.with_raw_response.create(
        model="auto",
        messages=SHORT,
        user="rae",
        stream=True,
        extra_headers={
            # "i'm sorry, but i can't" spans the simulator's first two chunks, in mixed case
            "X-Sim-Content": "I'm Sorry, but I CAN'T share that with you today.",
            "X-Sim-Models": "gpt-4o-mini",
        },
    )
    assert raw.headers["X-Tollgate-Model-Served"] == "gpt-4o"
    assert raw.headers["X-Tollgate-Escalated-From"] == "gpt-4o-mini"
    chunks = list(raw.parse())
    assert {c.model for c in chunks} == {"gpt-4o"}, "no byte of the refused stream may leak"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text and "sorry" not in text.lower()
    assert [model for model, _ in recorder.bodies] == ["gpt-4o-mini", "gpt-4o"]
    usage = asyncio.run(read_events(running.settings, "usage", at_least=2))
    first, second = sorted(
        (u for u in usage if u["request_id"] == raw.headers["X-Request-Id"]),
        key=lambda u: u["attempt"],
    )
    assert first["model_served"] == "gpt-4o-mini" and first["status"] == "error"
    assert first["error_type"] == "escalated_refused" and first["stream"]
    assert second["model_served"] == "gpt-4o" and second["escalated"]


def test_a_stream_that_only_starts_like_a_refusal_is_relayed_byte_for_byte(
    stack: tuple[Stack, Recorder],
) -> None:
    running, recorder = stack
    # the first chunk "I'm sorry, but" is a prefix of "i'm sorry, but i can't"; the second
    # diverges ("i can help"): a good answer
    content = "I'm sorry, but I can help with that: the capital of France is Paris."
    headers, raw = stream_raw(running, content, "sam")
    assert headers["X-Tollgate-Model-Served"] == "gpt-4o-mini"
    assert "X-Tollgate-Escalated-From" not in headers
    (upstream,) = recorder.bodies
    assert upstream[0] == "gpt-4o-mini"
    assert raw == upstream[1], "the held stream must reach the client exactly as sent"
    text = "".join(
        part
        for chunk in openai_chunks(raw)
        for part in [c.get("delta", {}).get("content") or "" for c in chunk.get("choices", [])]
    )
    assert text == content


def test_an_answer_shorter_than_a_phrase_is_not_a_refusal(stack: tuple[Stack, Recorder]) -> None:
    """A stream that ends while still a prefix of a phrase ("I can't") is a (short) answer."""
    running, recorder = stack
    headers, raw = stream_raw(running, "I can't", "tom")
    assert headers["X-Tollgate-Model-Served"] == "gpt-4o-mini"
    (upstream,) = recorder.bodies
    assert raw == upstream[1]


def openai_chunks(raw: bytes) -> list[dict[str, Any]]:
    return [orjson.loads(line[6:]) for line in raw.split(b"\n\n") if line.startswith(b"data: {")]
