"""One chat request through the savings levers, in HTTP terms: route, cache, call, escalate.

Owns the attempt loop of ``POST /v1/chat/completions`` and ``/v1/dispatch`` once the body is
parsed and attributed: the routing decision (a body the router cannot read is a 400 naming
the field), the response cache (``X-Tollgate-Cache: hit | miss | bypass`` on every answer; a
hit is replayed as a stream when the client asked for one), the upstream call, and one
escalation of a failed routed call to the next tier up. Each attempt is admitted by the budget
gate and emits its own Usage event (``app.gateway.Gateway.call``), so a cached answer still
gets its scope's 402 and both attempts of an escalation are paid and counted.

Headers on every answer: ``X-Tollgate-Model-Served``, ``X-Tollgate-Tier`` (when the model has
one), ``X-Tollgate-Cache``; for routed calls also ``X-Tollgate-Router-Score`` and, after an
escalation, ``X-Tollgate-Escalated-From``.

A stream escalates only before its first byte reached the client: on an upstream error status
or a failed connection. Validators (empty, truncated, refused) judge non-streamed answers only;
a streamed answer is already on its way to the client when they could judge it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import orjson
from aiohttp import web

from app.errors import InvalidRequest, TollgateError, UpstreamFailed, UpstreamTimedOut
from app.gateway.pipeline import Call, ChatRequest, Gateway
from app.gateway.savings import RouteInfo, SavingsLevers
from app.http.errors import sse_error_event
from app.metering.attribution import Identity
from app.metrics import Metrics
from app.routing.escalation import Escalation, Failure, failure_of_status
from app.routing.signals import PromptError

JSON = "application/json"


@dataclass
class ChatContext:
    """What every attempt of one request shares."""

    request: web.Request
    gateway: Gateway
    levers: SavingsLevers
    metrics: Metrics
    request_id: str
    endpoint: str
    identity: Identity
    client_request_id: str | None
    admitted: bool = False  # an attempt was admitted (its Request event is out)


def route_request(
    levers: SavingsLevers, request_id: str, body: Mapping[str, Any], chat: ChatRequest,
    feature: str | None,
) -> tuple[ChatRequest, RouteInfo]:  # fmt: skip
    """The request as the router sends it; a prompt it cannot read is a 400 naming the field."""
    try:
        route = levers.route(request_id, body, feature)
    except PromptError as exc:
        raise InvalidRequest(f"'{exc.field}' {exc.message}", field=exc.field) from None
    if route.routed:
        chat = chat.retarget(route.model)
    return chat, route


def failure_of_error(error: TollgateError) -> Failure:
    return Failure.TIMEOUT if isinstance(error, UpstreamTimedOut) else Failure.UPSTREAM_ERROR


async def answer_chat(
    ctx: ChatContext, body: Mapping[str, Any], chat: ChatRequest
) -> web.StreamResponse:
    """Route, then answer from the cache or the upstream, escalating once if allowed."""
    chat, route = route_request(ctx.levers, ctx.request_id, body, chat, ctx.identity.feature)
    plan = ctx.levers.cache_plan(body, ctx.identity, ctx.request.headers.get("Cache-Control"))
    attempt, escalated_from = 1, None
    while True:
        outcome = await _attempt(ctx, plan, chat, route, attempt, escalated_from)
        if isinstance(outcome, web.StreamResponse):
            return outcome
        step, route = outcome
        escalated_from = chat.model
        chat, attempt = chat.retarget(step.model), step.attempt


def _headers(
    ctx: ChatContext, call: Call, cache: str, escalated_from: str | None
) -> dict[str, str]:
    ctx.metrics.cache_results.labels(cache).inc()
    if call.route is not None and call.route.routed:
        ctx.metrics.routed.labels(call.route.tier or "", str(call.route.escalated).lower()).inc()
    headers = {"X-Request-Id": ctx.request_id, "X-Tollgate-Cache": cache}
    if ctx.client_request_id:
        headers["X-Client-Request-Id"] = ctx.client_request_id
    if call.max_tokens_cap is not None:
        ctx.metrics.budget_capped.inc()
        headers["X-Tollgate-Max-Tokens-Capped"] = str(call.max_tokens_cap)
    headers["X-Tollgate-Model-Served"] = call.chat.model
    tier = call.route.tier if call.route else None
    if tier:
        headers["X-Tollgate-Tier"] = tier
    if call.route is not None and call.route.score is not None:
        headers["X-Tollgate-Router-Score"] = f"{call.route.score:.4f}"
    if escalated_from:
        headers["X-Tollgate-Escalated-From"] = escalated_from
    return headers


async def _attempt(
    ctx: ChatContext,
    plan: Any,
    chat: ChatRequest,
    route: RouteInfo,
    attempt: int,
    escalated_from: str | None,
) -> web.StreamResponse | tuple[Escalation, RouteInfo]:
    """One upstream attempt (or the cache); an escalation to make after it, or the answer."""
    levers, gateway = ctx.levers, ctx.gateway
    async with gateway.call(
        ctx.request_id, ctx.endpoint, ctx.identity, chat, ctx.request.headers,
        ctx.client_request_id, route=route, attempt=attempt,
    ) as call:  # fmt: skip
        ctx.admitted = True
        if attempt == 1 and plan.status == "lookup":
            cached = await levers.lookup(plan)
            if cached is not None:
                call.serve_cached(cached.model, cached.prompt_tokens, cached.completion_tokens)
                if call.route is not None and call.route.model != cached.model:
                    call.route = replace(
                        call.route, model=cached.model, tier=levers.tier_of(cached.model)
                    )
                return await _replay(ctx, call, cached.body, _headers(ctx, call, "hit", None))
        cache_status = "miss" if plan.status == "lookup" else "bypass"

        def escalation(failure: Failure | None) -> tuple[Escalation, RouteInfo] | None:
            return levers.escalate(
                route, failure, request_id=ctx.request_id, feature=ctx.identity.feature,
                attempt=attempt,
            )  # fmt: skip

        if chat.stream:
            return await _stream(ctx, call, plan, cache_status, escalated_from, escalation)
        try:
            status, payload, content_type = await gateway.complete(call)
        except (UpstreamTimedOut, UpstreamFailed) as exc:
            step = escalation(failure_of_error(exc))
            if step is not None:
                return step
            raise
        failure = (
            failure_of_status(status) if status >= 400 else levers.validate(route, call.completion)
        )
        if failure is not None:
            step = escalation(failure)
            if step is not None:
                if status < 400:  # a validator refused an answer the provider billed
                    call.status, call.error_type = "error", f"escalated_{failure.value}"
                return step
        if status == 200 and call.completion is not None and call.prompt_tokens is not None:
            await levers.store(
                plan, payload, chat.model, call.prompt_tokens, call.completion_tokens or 0
            )
        headers = _headers(ctx, call, cache_status, escalated_from)
        return web.Response(
            body=payload, status=status, headers={"Content-Type": content_type, **headers}
        )


async def _replay(
    ctx: ChatContext, call: Call, body: bytes, headers: dict[str, str]
) -> web.StreamResponse:
    """A cached answer, as JSON or (when the client asked to stream) as the SSE stream."""
    if not call.chat.stream:
        return web.Response(body=body, status=200, headers={"Content-Type": JSON, **headers})
    from app.cache.replay import sse_replay

    stream = sse_replay(orjson.loads(body), include_usage=call.chat.client_wants_usage)
    response = web.StreamResponse(
        status=200,
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", **headers},
    )
    await response.prepare(ctx.request)
    await response.write(stream)
    await response.write_eof()
    return response


async def _stream(
    ctx: ChatContext,
    call: Call,
    plan: Any,
    cache_status: str,
    escalated_from: str | None,
    escalation: Any,
) -> web.StreamResponse | tuple[Escalation, RouteInfo]:
    gateway = ctx.gateway
    try:
        upstream = await gateway.open_upstream(call)
    except (UpstreamTimedOut, UpstreamFailed) as exc:  # nothing reached the client yet
        step = escalation(failure_of_error(exc))
        if step is not None:
            return step
        raise
    gateway.record_upstream_status(call, upstream)
    if upstream.status >= 400:  # pass the provider's error through, as JSON, or escalate
        payload = await upstream.read()
        upstream.release()
        step = escalation(failure_of_status(upstream.status))
        if step is not None:
            return step
        return web.Response(
            body=payload,
            status=upstream.status,
            headers={
                "Content-Type": upstream.headers.get("Content-Type", JSON),
                **_headers(ctx, call, cache_status, escalated_from),
            },
        )
    assembler = ctx.levers.assembler(plan)
    if assembler is not None:
        call.on_chunk = assembler.feed
    response = web.StreamResponse(
        status=200,
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            **_headers(ctx, call, cache_status, escalated_from),
        },
    )
    await response.prepare(ctx.request)
    await gateway.relay_stream(call, upstream, response.write, error_event=sse_error_event)
    await response.write_eof()
    if assembler is not None and call.status == "ok" and call.prompt_tokens is not None:
        completion = assembler.completion()
        if completion is not None:
            await ctx.levers.store(
                plan, orjson.dumps(completion), call.chat.model, call.prompt_tokens,
                call.completion_tokens or 0,
            )  # fmt: skip
    return response
