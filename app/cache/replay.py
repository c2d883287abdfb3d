"""Replay a cached ``chat.completion`` as the SSE stream the provider would have sent.

Owns turning a non-streamed answer into ``chat.completion.chunk`` events in OpenAI's
order: per choice a role chunk, content in pieces of a few words (tool calls: name, then
arguments; a text with stored ``logprobs`` in one piece that carries them), a chunk with
the ``finish_reason``; then, when the client asked
``stream_options.include_usage``, a ``choices: []`` chunk with the usage (and
``"usage": null`` on every earlier chunk, as OpenAI sends); then ``data: [DONE]``. The
``openai`` SDK reassembles the same content, tool calls, finish reason and usage (a test
feeds it through the real SDK). It does not own HTTP headers or the cache itself.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import orjson

DONE = b"data: [DONE]\n\n"
WORDS_PER_CHUNK = 4


def _pieces(text: str) -> Iterator[str]:
    """Split text into chunks of a few words, keeping every character (spaces included)."""
    words = text.split(" ")
    for start in range(0, len(words), WORDS_PER_CHUNK):
        piece = " ".join(words[start : start + WORDS_PER_CHUNK])
        yield piece if start + WORDS_PER_CHUNK >= len(words) else piece + " "


def sse_replay(completion: Mapping[str, Any], *, include_usage: bool) -> bytes:
    """The SSE bytes of a streamed version of ``completion`` (a ``chat.completion`` body)."""
    head: dict[str, Any] = {
        "id": completion.get("id", ""),
        "object": "chat.completion.chunk",
        "created": completion.get("created", 0),
        "model": completion.get("model", ""),
    }
    for optional in ("system_fingerprint", "service_tier"):
        if optional in completion:
            head[optional] = completion[optional]
    out = bytearray()

    def emit(choices: list[dict[str, Any]], usage: Any = None, last: bool = False) -> None:
        payload = {**head, "choices": choices}
        if include_usage:
            payload["usage"] = usage if last else None
        out.extend(b"data: " + orjson.dumps(payload) + b"\n\n")

    for choice in completion.get("choices") or []:
        index = choice.get("index", 0)
        message = choice.get("message") or {}

        def delta_chunk(
            delta: dict[str, Any], finish: str | None = None, i: int = index, logprobs: Any = None
        ) -> None:
            emit([{"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": finish}])

        content = message.get("content")
        # OpenAI opens with content "" for a text answer and null for a tool-call answer
        opening = "" if isinstance(content, str) else None
        delta_chunk({"role": message.get("role", "assistant"), "content": opening, "refusal": None})
        logprobs = choice.get("logprobs")
        if isinstance(content, str) and content and logprobs:
            # the stored tokens' logprobs do not split at our pieces: the text in one delta
            delta_chunk({"content": content}, logprobs=logprobs)
        elif isinstance(content, str) and content:
            for piece in _pieces(content):
                delta_chunk({"content": piece})
        refusal = message.get("refusal")
        if isinstance(refusal, str) and refusal:
            delta_chunk({"refusal": refusal})
        for position, call in enumerate(message.get("tool_calls") or []):
            function = call.get("function") or {}
            delta_chunk(
                {
                    "tool_calls": [
                        {
                            "index": position,
                            "id": call.get("id"),
                            "type": call.get("type", "function"),
                            "function": {"name": function.get("name"), "arguments": ""},
                        }
                    ]
                }
            )
            arguments = function.get("arguments") or ""
            if arguments:
                delta_chunk(
                    {"tool_calls": [{"index": position, "function": {"arguments": arguments}}]}
                )
        delta_chunk({}, choice.get("finish_reason") or "stop")
    if include_usage:
        emit([], completion.get("usage"), last=True)
    out.extend(DONE)
    return bytes(out)
