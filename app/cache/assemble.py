"""Rebuild a ``chat.completion`` from the chunks of a streamed answer, so it can be cached.

Owns folding ``chat.completion.chunk`` objects (as the provider sent them) into the
non-streamed body a cache stores and :func:`app.cache.replay.sse_replay` replays. Only
plain answers are rebuilt: one choice, text content (and a refusal), a finish reason.
An answer with tool calls, several choices or log-probabilities is not rebuilt
(``completion()`` is None, so it is not cached): rebuilding those exactly is the SDK's
accumulator's job, and a cache must never store an answer that differs from what was sent.
It does not own HTTP, storage or the decision to cache.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class CompletionAssembler:
    """Feed it every chunk of one stream; ``completion()`` is the equivalent non-streamed body."""

    def __init__(self) -> None:
        self.head: dict[str, Any] = {}
        self.content: list[str] = []
        self.refusal: list[str] = []
        self.role = "assistant"
        self.finish_reason: str | None = None
        self.usage: Any = None
        self.unsupported = False

    def feed(self, chunk: Mapping[str, Any]) -> None:
        if not self.head:
            self.head = {
                name: chunk[name]
                for name in ("id", "created", "model", "system_fingerprint", "service_tier")
                if name in chunk
            }
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        for choice in chunk.get("choices") or []:
            if not isinstance(choice, Mapping) or choice.get("index", 0) != 0:
                self.unsupported = True
                continue
            if choice.get("logprobs"):
                self.unsupported = True
            delta = choice.get("delta")
            if isinstance(delta, Mapping):
                if delta.get("tool_calls") or delta.get("function_call"):
                    self.unsupported = True
                if isinstance(delta.get("role"), str):
                    self.role = delta["role"]
                if isinstance(delta.get("content"), str):
                    self.content.append(delta["content"])
                if isinstance(delta.get("refusal"), str):
                    self.refusal.append(delta["refusal"])
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]

    def completion(self) -> dict[str, Any] | None:
        """The non-streamed body, or None when the stream was not a plain, finished answer."""
        if self.unsupported or self.finish_reason is None or not self.head:
            return None
        message: dict[str, Any] = {
            "role": self.role,
            "content": "".join(self.content),
            "refusal": "".join(self.refusal) or None,
        }
        body: dict[str, Any] = {
            "id": self.head.get("id", ""),
            "object": "chat.completion",
            "created": self.head.get("created", 0),
            "model": self.head.get("model", ""),
            "choices": [
                {
                    "index": 0,
                    "message": message,
                    "logprobs": None,
                    "finish_reason": self.finish_reason,
                }
            ],
        }
        for optional in ("system_fingerprint", "service_tier"):
            if optional in self.head:
                body[optional] = self.head[optional]
        if self.usage is not None:
            body["usage"] = self.usage
        return body
