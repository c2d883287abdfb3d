"""The chat answer in HTTP terms: the response headers of a served call, and the SSE stream.

Owns only the mapping of :class:`app.gateway.chat.ChatAttempts` to and from aiohttp: the
``X-Tollgate-*`` headers rendered from :class:`~app.gateway.chat.Served` (the same table the
OpenAPI document lists, :data:`CHAT_RESPONSE_HEADERS`), an :class:`~app.gateway.chat.Answer` as
a response, and the client's event stream (:class:`SseClient`). Routing, the cache, the attempts
and escalation live in ``app.gateway.chat``.

Headers on every answer: ``X-Tollgate-Model-Served``, ``X-Tollgate-Tier`` (when the model has
one), ``X-Tollgate-Cache``; for routed calls also ``X-Tollgate-Router-Score`` and, after an
escalation, ``X-Tollgate-Escalated-From``; ``X-Tollgate-Max-Tokens-Capped`` when the budget gate
capped the output; ``X-Tollgate-Budget-Downgraded-From`` when an ``auto`` call was routed down
to a tier its budget could afford.
"""

from __future__ import annotations

import contextlib
from typing import Any

from aiohttp import web

from app.errors import TollgateError
from app.gateway.chat import Answer, ChatAttempts, Served
from app.gateway.pipeline import ChatRequest
from app.http.errors import sse_error_event

# name -> (description, JSON schema) of the response headers the chat routes set.
CHAT_RESPONSE_HEADERS: dict[str, tuple[str, dict[str, Any]]] = {
    "X-Request-Id": ("The gateway's id of this request", {"type": "string"}),
    "X-Client-Request-Id": (
        "The client's own X-Request-Id, echoed (when it sent one)",
        {"type": "string"},
    ),
    "X-Tollgate-Model-Served": (
        "The model that answered (the router's choice for model 'auto', the cached answer's "
        "model on a cache hit)",
        {"type": "string"},
    ),
    "X-Tollgate-Tier": (
        "The served model's tier, when a provider lists it in its tiers",
        {"type": "string", "enum": ["economy", "standard", "premium"]},
    ),
    "X-Tollgate-Cache": (
        "hit: answered by the response cache; miss: looked up, not found; bypass: not "
        "cacheable (cache off, temperature > 0, Cache-Control: no-cache/no-store, ...)",
        {"type": "string", "enum": ["hit", "miss", "bypass"]},
    ),
    "X-Tollgate-Router-Score": (
        "Routed calls: the router's estimate that the economy tier would fail, in [0, 1]",
        {"type": "string", "pattern": r"^[01]\.\d{4}$"},
    ),
    "X-Tollgate-Escalated-From": (
        "The model whose failed answer was retried one tier up (the client sees only the retry)",
        {"type": "string"},
    ),
    "X-Tollgate-Budget-Downgraded-From": (
        "model 'auto' near a budget limit: the model the router chose, whose call the budget "
        "refused (its prompt alone cost more than was left), served on a cheaper tier instead",
        {"type": "string"},
    ),
    "X-Tollgate-Max-Tokens-Capped": (
        "The budget gate capped the output at this many tokens to keep the call within a limit",
        {"type": "string", "pattern": r"^[0-9]+$"},
    ),
}


def served_headers(served: Served) -> dict[str, str]:
    """The ``X-Tollgate-*`` headers of a served call."""
    headers = {"X-Tollgate-Cache": served.cache, "X-Tollgate-Model-Served": served.model}
    if served.tier:
        headers["X-Tollgate-Tier"] = served.tier
    if served.router_score is not None:
        headers["X-Tollgate-Router-Score"] = f"{served.router_score:.4f}"
    if served.escalated_from:
        headers["X-Tollgate-Escalated-From"] = served.escalated_from
    if served.budget_downgraded_from:
        headers["X-Tollgate-Budget-Downgraded-From"] = served.budget_downgraded_from
    if served.max_tokens_cap is not None:
        headers["X-Tollgate-Max-Tokens-Capped"] = str(served.max_tokens_cap)
    return headers


class SseClient:
    """The client's ``text/event-stream`` response, prepared when the gateway opens it."""

    def __init__(self, request: web.Request, headers: dict[str, str]) -> None:
        self.request = request
        self.headers = headers  # the request's own (X-Request-Id, X-Client-Request-Id)
        self.response: web.StreamResponse | None = None

    async def open(self, served: Served) -> None:
        self.response = web.StreamResponse(
            status=200,
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                **self.headers,
                **served_headers(served),
            },
        )
        await self.response.prepare(self.request)

    async def write(self, data: bytes) -> None:
        assert self.response is not None, "open the stream first"
        await self.response.write(data)

    async def close(self) -> None:
        assert self.response is not None, "open the stream first"
        # Everything was written: a client that closed its connection once it read [DONE]
        # (the openai SDK does) was served, not a disconnect (a 499 and a traceback before).
        with contextlib.suppress(ConnectionError):
            await self.response.write_eof()

    def error_event(self, error: TollgateError) -> bytes:
        return sse_error_event(error)

    def gone(self) -> bool:
        transport = self.request.transport
        return transport is None or transport.is_closing()


async def answer_chat(
    request: web.Request,
    attempts: ChatAttempts,
    body: Any,
    chat: ChatRequest,
) -> web.StreamResponse:
    """The response to a parsed, attributed chat request."""
    headers = {"X-Request-Id": attempts.request_id}
    if attempts.client_request_id:
        headers["X-Client-Request-Id"] = attempts.client_request_id
    client = SseClient(request, headers)
    answer: Answer = await attempts.answer(body, chat, client)
    if answer.body is None:
        assert client.response is not None
        return client.response
    return web.Response(
        body=answer.body,
        status=answer.status,
        headers={"Content-Type": answer.content_type, **headers, **served_headers(answer.served)},
    )
