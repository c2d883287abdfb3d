"""One chat request through the savings levers: route, cache, call, escalate.

Owns the attempts of ``POST /v1/chat/completions`` and ``/v1/dispatch`` once the body is parsed
and attributed (:class:`ChatAttempts`): the routing decision (a body the router cannot read is an
``InvalidRequest`` naming the field), the response cache (a hit is replayed as a stream when the
client asked for one), the upstream call, and one escalation of a failed routed call to the next
tier up. Each attempt goes through :meth:`app.gateway.pipeline.Gateway.call`: admitted by the
budget gate on its own worst case, its own ``Request`` event and its own ``Usage`` event (same
request id, ``attempt`` 1 and 2), so a cached answer still gets its scope's 402 and both attempts
of an escalation are reserved, paid and counted.

It does not own HTTP: the web layer (``app.http.server``) renders :class:`Served` as response
headers and an :class:`Answer` as a response, and hands in a :class:`ClientStream` to write a
stream to. Nothing here knows a header name or a status table.

Escalation of a stream happens only before its first byte reached the client. For a routed call
that may still escalate, the stream is held until its first content delta (text, a tool call),
and while its text so far could still open with one of ``routing.refusal_phrases`` (leading
whitespace ignored, any case): an upstream error status, a failed connection, a stream that
breaks or times out, one that ends without content (empty, truncated, refused by
``finish_reason`` or a ``refusal`` delta), or one whose text opens with a refusal phrase is
retried one tier up, and the client only ever sees the second attempt. Once the text diverged
from every phrase (or the stream ended as a good answer) the held bytes go out unchanged and
the rest is relayed as it comes. A phrase of n characters holds a stream for at most its first
n characters of text.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Protocol

import aiohttp
import orjson

from app.budgets.gate import BudgetRefused
from app.cache.key import CacheLookup
from app.errors import InvalidRequest, TollgateError, UpstreamFailed, UpstreamTimedOut
from app.gateway.pipeline import Call, ChatRequest, Gateway, SseRelay, StreamWriter, identity_scopes
from app.gateway.savings import CacheStatus, RouteInfo, SavingsLevers
from app.metering.attribution import Identity
from app.metering.usage import ESCALATED_PREFIX
from app.routing.errors import PromptError
from app.routing.escalation import (
    Escalation,
    Failure,
    failure_of_status,
    may_open_with_refusal,
    opens_with_refusal,
)

JSON = "application/json"


@dataclass(frozen=True, slots=True)
class Served:
    """What the answer says about how it was served (the web layer's response headers)."""

    model: str
    tier: str | None
    cache: CacheStatus
    router_score: float | None = None  # routed calls only
    escalated_from: str | None = None  # the model of the failed first attempt
    max_tokens_cap: int | None = None  # the budget gate capped the output at this
    budget_downgraded_from: str | None = None  # "auto" routed down: the model the budget refused


@dataclass(frozen=True, slots=True)
class Answer:
    """A complete answer; ``body`` None means it was streamed through the :class:`ClientStream`."""

    served: Served
    status: int = 200
    body: bytes | None = None
    content_type: str = JSON


class ClientStream(Protocol):
    """The web layer's event stream to the client, opened at most once per request."""

    async def open(self, served: Served) -> None: ...

    async def write(self, data: bytes) -> None: ...

    async def close(self) -> None: ...

    def error_event(self, error: TollgateError) -> bytes:
        """An error as one SSE event (a stream cut after its first byte)."""
        ...

    def gone(self) -> bool:
        """Whether the client has closed its connection."""
        ...


def with_estimated_usage(call: Call, completion: dict[str, Any]) -> bytes:
    """A provider's answer that carried no usage, with the usage the call is billed for (its
    usage event's estimate), marked ``tollgate_usage_estimated``: SDKs read ``usage``."""
    return orjson.dumps(
        {**completion, "usage": call.billed_usage(), "tollgate_usage_estimated": True}
    )


def failure_of_error(error: TollgateError) -> Failure:
    return Failure.TIMEOUT if isinstance(error, UpstreamTimedOut) else Failure.UPSTREAM_ERROR


EscalationStep = tuple[Escalation, RouteInfo]


class ChatAttempts:
    """The attempts of one chat request: the first (or the cache), then at most one escalation.

    An ``auto`` call whose routed tier the budget refuses outright is first routed down: tried
    on the next cheaper tier that has a model, and so on (:meth:`_budget_fallback`); only the
    tier finally admitted is an attempt, and a call routed down never escalates.

    ``admitted`` turns true once an attempt was admitted (its ``Request`` event is out); a refusal
    after that (an escalation's own 402) needs no ``Request`` event from the web layer."""

    def __init__(
        self,
        gateway: Gateway,
        levers: SavingsLevers,
        *,
        request_id: str,
        endpoint: str,
        identity: Identity,
        client_headers: Mapping[str, str],
        client_request_id: str | None = None,
    ) -> None:
        self.gateway = gateway
        self.levers = levers
        self.metrics = gateway.metrics
        self.request_id = request_id
        self.endpoint = endpoint
        self.identity = identity
        self.client_headers = client_headers
        self.client_request_id = client_request_id
        self.admitted = False
        # The attempt the next one replaces (its call, finished once its block exits) and why
        self.replaced: tuple[Call, Failure] | None = None

    def route(self, body: Mapping[str, Any], chat: ChatRequest) -> tuple[ChatRequest, RouteInfo]:
        """The request as the router sends it; a prompt it cannot read is ``InvalidRequest``."""
        try:
            route = self.levers.route(
                self.request_id, body, self.identity.feature, may_explore=self._may_explore
            )
        except PromptError as exc:
            raise InvalidRequest(f"'{exc.field}' {exc.message}", field=exc.field) from None
        if route.routed:
            chat = chat.retarget(route.model)
        if route.routed and route.score is not None:
            self.metrics.router_score.labels(route.tier or "").observe(route.score)
        return chat, route

    def _may_explore(self) -> bool:
        """Exploration sends a prompt to economy against the router's advice: never for a call
        whose budget scopes are near their limit (``routing.exploration_min_room``)."""
        min_room = self.levers.routing.exploration_min_room
        return not self.gateway.gate.near_limit(identity_scopes(self.identity), min_room)

    async def answer(
        self, body: Mapping[str, Any], chat: ChatRequest, client: ClientStream
    ) -> Answer:
        """Route, then answer from the cache or the upstream, escalating once if allowed; an
        ``auto`` call refused by its budget on the routed tier is routed down first."""
        if body.get("model") != chat.model and not body.get("model"):
            body = {**body, "model": chat.model}  # /v1/dispatch's default model, as if asked
        if self.levers.model_needed(body, self.identity.feature):
            await self.levers.load_model()  # the first scored request: numpy, River (a thread)
        chat, route = self.route(body, chat)
        cache_control = self.client_headers.get("Cache-Control")
        attempt, escalated_from = 1, None
        while True:
            # Keyed by the body as this attempt sends it, with the model routing chose: a
            # feature pinned to premium is not answered from an economy answer to the same
            # prompt, nor a named model from another's (session 13's probe). The headers sent
            # on (an fnmatch over the client's) are worked out only if the plan has a key.
            plan = self.levers.cache_plan(
                {**body, "model": chat.model}, self.identity, cache_control,
                functools.partial(self.gateway.upstreams.forwarded, chat.model, self.client_headers),
            )  # fmt: skip
            try:
                outcome = await self._attempt(plan, chat, route, attempt, escalated_from, client)
            except BudgetRefused as refusal:
                if self.replaced is not None:  # the 402 says the failed attempt was charged
                    call, failure = self.replaced
                    refusal.earlier_attempt = (call.chat.model, call.cost_nanos, failure.value)
                    raise
                cheaper = self._budget_fallback(route, refusal, attempt)
                if cheaper is None:
                    raise
                chat, route = chat.retarget(cheaper.model), cheaper
                continue
            if isinstance(outcome, Answer):
                return outcome
            step, route = outcome
            escalated_from = chat.model
            chat, attempt = chat.retarget(step.model), step.attempt

    def _budget_fallback(
        self, route: RouteInfo, refusal: BudgetRefused, attempt: int
    ) -> RouteInfo | None:
        """The cheaper tier to try when the budget refused the first attempt of an ``auto``
        call outright (its prompt alone costs more than a scope has left: a cheaper tier may
        fit), or None: the refusal stands. Not when the limit is reached (no tier fits) nor when
        only calls in flight stand in the way (the gate waited for them; the call keeps its
        place in line rather than being answered by a cheaper model). Nothing was admitted,
        emitted or sent for the refused tier, so accounting is that of the call served."""
        if attempt != 1 or self.admitted or refusal.retryable:
            return None
        if refusal.status.state == "blocked":
            return None
        cheaper = self.levers.budget_fallback(
            route, self.identity.feature, f"{refusal.status.scope}: {refusal.reason}"
        )
        if cheaper is not None:
            self.metrics.budget_downgraded.labels(cheaper.tier or "").inc()
        return cheaper

    # -- one attempt ----------------------------------------------------------------------
    def _supersede(self, call: Call, failure: Failure) -> None:
        """Mark ``call`` as the attempt the next one replaces, and remember it: a 402 of the
        next attempt says this one was answered and charged (probe S).

        Its cost and tokens count (a loss of routing); it is no request or error of the
        client's (reports skip ``escalated_*``, "superseded"). Only a validator's refusal was
        marked once: an escalation after a provider's 500, 429 or timeout counted as two
        requests and an error for one answered call (probe I)."""
        if call.status == "ok":  # an answer the provider billed, judged a failure
            call.status = "error"
        call.error_type = f"{ESCALATED_PREFIX}{failure.value}"
        self.replaced = (call, failure)

    def _served(self, call: Call, cache: CacheStatus, escalated_from: str | None) -> Served:
        """What the answer says, counted in the metrics once per answer."""
        self.metrics.cache_results.labels(cache).inc()
        route = call.route
        if route is not None and route.routed:
            self.metrics.routed.labels(route.tier or "", str(route.escalated).lower()).inc()
        # A hit serves the stored answer as it is: no output was capped.
        cap = None if cache == "hit" else call.max_tokens_cap
        if cap is not None:
            self.metrics.budget_capped.inc()
        return Served(
            model=call.chat.model,
            tier=route.tier if route else None,
            cache=cache,
            router_score=route.score if route is not None else None,
            escalated_from=escalated_from,
            max_tokens_cap=cap,
            budget_downgraded_from=route.budget_downgraded_from if route else None,
        )

    def _escalation(
        self, route: RouteInfo, attempt: int
    ) -> Callable[[Failure | None], EscalationStep | None]:
        def escalation(failure: Failure | None) -> EscalationStep | None:
            step = self.levers.escalate(
                route, failure, request_id=self.request_id, feature=self.identity.feature,
                attempt=attempt,
            )  # fmt: skip
            if failure is not None and route.routed:
                result = "answered" if step is None else "escalated"
                self.metrics.routing_failures.labels(route.tier or "", failure.value, result).inc()
            return step

        return escalation

    async def _attempt(
        self,
        plan: CacheLookup,
        chat: ChatRequest,
        route: RouteInfo,
        attempt: int,
        escalated_from: str | None,
        client: ClientStream,
    ) -> Answer | EscalationStep:
        """One upstream attempt (or the cache): the answer, or the escalation to make after it."""
        levers, gateway = self.levers, self.gateway
        # Looked up before admission: a hit costs nothing, so only a reached limit refuses it
        # (an escalation too: the next tier may have answered).
        cached = await levers.lookup(plan) if plan.status == "lookup" else None
        if cached is not None and levers.would_escalate(
            route, cached.body, self.identity.feature, attempt, chat.max_tokens is not None
        ):
            cached = None  # a stored failed answer (a named call's): the provider is asked
        async with gateway.call(
            self.request_id, self.endpoint, self.identity, chat, self.client_headers,
            self.client_request_id, route=route, attempt=attempt, client_gone=client.gone,
            free=cached is not None,
        ) as call:  # fmt: skip
            self.admitted = True
            if cached is not None:
                call.serve_cached(cached.model, cached.prompt_tokens, cached.completion_tokens)
                if call.route is not None and call.route.explored:
                    call.route = replace(call.route, explored=False)  # no economy call made
                if call.route is not None and call.route.model != cached.model:
                    call.route = replace(
                        call.route, model=cached.model, tier=levers.tier_of(cached.model)
                    )
                return await self._replay(call, cached.body, client, escalated_from)
            cache_status: CacheStatus = "miss" if plan.status == "lookup" else "bypass"
            escalation = self._escalation(route, attempt)
            if chat.stream:
                may_escalate = levers.may_escalate(route, self.identity.feature, attempt)
                return await self._stream(
                    call, plan, cache_status, escalated_from, escalation, may_escalate, client
                )
            try:
                status, payload, content_type = await gateway.complete(call)
            except (UpstreamTimedOut, UpstreamFailed) as exc:
                lost = failure_of_error(exc)
                step = escalation(lost)
                if step is not None:
                    self._supersede(call, lost)
                    return step
                raise
            failure = (
                failure_of_status(status)
                if status >= 400
                else levers.validate(route, call.completion)
            )
            if failure is Failure.TRUNCATED and call.output_limited:
                failure = None  # cut where the client or the budget asked: not a failure
            if failure is not None:
                step = escalation(failure)
                if step is not None:
                    self._supersede(call, failure)
                    return step
            if (
                status == 200
                and call.completion is not None
                and call.prompt_tokens is not None
                and not cut_by_budget(call, call.completion)  # a cut answer is none to keep
            ):
                await levers.store(
                    plan, payload, chat.model, call.prompt_tokens, call.completion_tokens or 0
                )
            if status == 200 and call.prompt_tokens is None and call.completion is not None:
                # counted as the upstream counts it before the answer says it: the usage
                # written here is the event's, and filling it in first left the cheap
                # characters / 4 estimate in both (a probe: "Hello world" 7 tokens, not 8)
                await gateway.count_unreported_prompt(call)
                payload = with_estimated_usage(call, call.completion)
            if call.status == "ok" and client.gone():
                # The provider ran the call to its end (billed in full), but nobody will read
                # the answer: not a 200 in the reports (probe H), as for a stream cut short.
                call.status, call.error_type = "client_disconnected", "client_disconnected"
            served = self._served(call, cache_status, escalated_from)
            return Answer(served, status, payload, content_type)

    async def _replay(
        self, call: Call, body: bytes, client: ClientStream, escalated_from: str | None
    ) -> Answer:
        """A cached answer, as JSON or (when the client asked to stream) as the SSE stream;
        after an escalation, the answer says so (probe R: a hit hid the economy attempt that
        failed and was billed before it)."""
        served = self._served(call, "hit", escalated_from)
        if not call.chat.stream:
            return Answer(served, 200, body)
        from app.cache.replay import sse_replay

        stream = sse_replay(orjson.loads(body), include_usage=call.chat.client_wants_usage)
        await client.open(served)
        await self.gateway.finish_counted(call)  # spooled before the client has the answer
        await client.write(stream)
        await client.close()
        return Answer(served)

    async def _stream(
        self,
        call: Call,
        plan: CacheLookup,
        cache_status: CacheStatus,
        escalated_from: str | None,
        escalation: Callable[[Failure | None], EscalationStep | None],
        may_escalate: bool,
        client: ClientStream,
    ) -> Answer | EscalationStep:
        gateway = self.gateway
        try:
            upstream = await gateway.open_upstream(call)
        except (UpstreamTimedOut, UpstreamFailed) as exc:  # nothing reached the client yet
            lost = failure_of_error(exc)
            step = escalation(lost)
            if step is not None:
                self._supersede(call, lost)
                return step
            raise
        gateway.record_upstream_status(call, upstream)
        if upstream.status >= 400:  # pass the provider's error through, as JSON, or escalate
            payload = await upstream.read()
            upstream.release()
            refused = failure_of_status(upstream.status)
            step = escalation(refused)
            if step is not None and refused is not None:
                self._supersede(call, refused)
                return step
            served = self._served(call, cache_status, escalated_from)
            content_type = upstream.headers.get("Content-Type", JSON)
            return Answer(served, upstream.status, payload, content_type)
        assembler = self.levers.assembler(plan)
        if assembler is not None:
            call.on_chunk = assembler.feed
        relay = SseRelay(call)
        held = Held(b"")
        if may_escalate:
            phrases = self.levers.escalation.stream_refusal_phrases
            held = await hold_until_content(gateway, call, upstream, relay, phrases)
            if held.failure is not None:
                step = escalation(held.failure)
                if step is not None:
                    self._supersede(call, held.failure)
                    return step
        served = self._served(call, cache_status, escalated_from)
        await client.open(served)
        end = StreamEnd(client.write)
        if held.data:
            await end.write(held.data)
        if held.error is not None:
            with contextlib.suppress(ConnectionError):
                await client.write(client.error_event(held.error))
        elif not held.ended:
            await gateway.relay_stream(
                call, upstream, end.write, error_event=client.error_event, relay=relay
            )
        provider_prompt = call.prompt_tokens  # finish fills in an estimate when it is None
        await gateway.finish_counted(call)  # spooled before the client sees the stream end
        if provider_prompt is None and call.status == "ok" and call.chat.client_wants_usage:
            with contextlib.suppress(ConnectionError):  # a provider that ignores stream_options
                await client.write(relay.estimated_usage_event())
        if end.held:
            await client.write(end.held)
        await client.close()
        if assembler is not None and call.status == "ok" and provider_prompt is not None:
            completion = assembler.completion()
            if completion is not None and not cut_by_budget(call, completion):
                await self.levers.store(
                    plan, orjson.dumps(completion), call.chat.model, provider_prompt,
                    call.completion_tokens or 0,
                )  # fmt: skip
        return Answer(served)


# The SSE event that ends an OpenAI stream.
_DONE = re.compile(rb"(?m)^data: ?\[DONE\]")


class StreamEnd:
    """Writes a stream's events through, holding back its end (``data: [DONE]`` and what
    follows) so that it leaves only after the call's usage is spooled.

    A dispatcher killed after the end went out but before the Usage event was spooled had
    served a whole answer with no usage in any spool: the spend worker then billed its
    estimate (prompt + max_tokens) for a call the client saw succeed (session 17's fault
    probe). Held this way, a kill in that window leaves the client a stream without its end,
    an error to the openai SDK, which is what the estimate then bills."""

    def __init__(self, write: StreamWriter) -> None:
        self._write = write
        self.held = b""

    async def write(self, data: bytes) -> None:
        if self.held:
            self.held += data
            return
        match = _DONE.search(data)
        if match is None:
            await self._write(data)
            return
        if match.start():
            await self._write(data[: match.start()])
        self.held = data[match.start() :]


@dataclass(frozen=True, slots=True)
class Held:
    """What :func:`hold_until_content` read of a stream before letting the client see it."""

    data: bytes  # whole SSE events, in order, not yet sent
    failure: Failure | None = None  # the stream failed before any content
    ended: bool = False  # the upstream stream is over (its tail is in ``data``)
    error: TollgateError | None = None  # it was cut by a timeout: the client's SSE error event


def cut_by_budget(call: Call, completion: Any) -> bool:
    """Whether an answer may have been cut by the budget gate's cap on its output: an answer
    under a cap is the one asked for only if every choice ended on its own (``stop``,
    ``tool_calls``...), not at the cap (``length``) or unsaid (session 13's probe: a capped
    user paid for every identical repeat of answers that had ended well under the cap)."""
    if call.max_tokens_cap is None:
        return False
    choices = completion.get("choices") if isinstance(completion, dict) else None
    return not choices or any(
        not isinstance(choice, dict) or choice.get("finish_reason") in (None, "length")
        for choice in choices
    )


async def hold_until_content(
    gateway: Gateway,
    call: Call,
    upstream: aiohttp.ClientResponse,
    relay: SseRelay,
    refusal_phrases: tuple[str, ...] = (),
) -> Held:
    """Read the stream until its first content delta, holding what it said so far, and then
    on while its text could still open with one of ``refusal_phrases``.

    Returns with ``failure`` None as soon as the content is known not to be a refusal (the rest
    is for :meth:`Gateway.relay_stream` to pass on, through the same ``relay``). A stream whose
    text opens with a refusal phrase is refused; one that ends, breaks or times out first is a
    failure: empty, truncated or refused (by its ``finish_reason``), an upstream error, or a
    timeout -- or, when it ended with content that is no refusal, a good answer (``ended``).
    Its upstream is released whenever it ended here.
    """
    parts: list[bytes] = []

    def undecided() -> bool:
        """Content arrived, but its text so far may still open with a refusal phrase."""
        text = "".join(call.generated_text)
        if not text:  # a tool call (content that is not text), or no content yet
            return not relay.saw_content
        return may_open_with_refusal(text, refusal_phrases)

    def done(failure: Failure | None, error: TollgateError | None = None) -> Held:
        upstream.release()
        gateway.observe_upstream(call)
        return Held(b"".join(parts), failure, True, error)

    try:
        async with asyncio.timeout_at(call.deadline):
            async for data in upstream.content.iter_any():
                out = relay.feed(data)
                if out:
                    parts.append(out)
                if relay.refused:
                    parts.append(relay.flush())
                    upstream.close()
                    return done(Failure.REFUSED)
                if relay.saw_content:
                    text = "".join(call.generated_text)
                    if opens_with_refusal(text, refusal_phrases):
                        parts.append(relay.flush())
                        upstream.close()
                        return done(Failure.REFUSED)
                    if not refusal_phrases or not undecided():
                        return Held(b"".join(parts))
        parts.append(relay.flush())
    except asyncio.CancelledError:  # the client went away while the stream was held
        call.status, call.error_type = "client_disconnected", "client_disconnected"
        upstream.close()
        done(None)
        raise
    except TimeoutError:
        error = gateway.timed_out(call, "stopped streaming")
        upstream.close()
        return done(Failure.TIMEOUT, error)
    except aiohttp.ClientPayloadError:
        call.status, call.error_type = "error", "upstream_stream_broken"
        return done(Failure.UPSTREAM_ERROR)
    if relay.finish_reason == "content_filter":
        return done(Failure.REFUSED)
    if relay.finish_reason == "length" and not call.output_limited:
        return done(Failure.TRUNCATED)
    if relay.saw_content:  # ended while it could still have become a refusal: a short answer
        return done(None)
    return done(Failure.EMPTY)
