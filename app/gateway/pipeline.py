"""The chat pipeline: validate → (attributed request) → upstream → priced usage event.

Owns what happens to one LLM call between the HTTP layer and the events:
request validation, upstream choice and retry, streaming pass-through with
usage capture, token estimation when a provider reports none, and building the
``Request`` and ``Usage`` events. aiohttp specifics stay in ``app.http.server``; the
only HTTP type here is the upstream client response.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import aiohttp
import orjson
from pydantic import ValidationError

from app.budgets.gate import Admission, BudgetGate, BudgetRefused
from app.budgets.policy import scopes_of
from app.budgets.reservations import CallCost, OutputEstimator
from app.budgets.spend import event_cost
from app.errors import (
    InvalidRequest,
    ModelNotServed,
    NotPermitted,
    TollgateError,
    UpstreamFailed,
    UpstreamTimedOut,
)
from app.events.producer import EventEmitter
from app.gateway.requests import (
    ChatBody,
    ChatCompletionBody,
    message_call_problem,
    message_content_problem,
    tool_answer_problem,
)
from app.gateway.upstreams import RETRYABLE_CONNECT_ERRORS, UpstreamPool
from app.metering.attribution import ANONYMOUS_USER, Identity
from app.metering.usage import (
    ESCALATED_PREFIX,
    attribution_fields,
    build_usage_record,
    event_time,
    new_id,
    usage_event_id,
)
from app.metrics import Metrics, ModelLabels
from app.pricing.catalog import PriceCatalog, nanos_to_usd
from app.pricing.tokens import (
    PROMPT_FIELDS,
    MessageProblem,
    count_prompt,
    count_tokens,
    encoding_for,
    estimate_message_token_range,
    message_texts,
)
from app.validation import first_problem

if TYPE_CHECKING:
    from app.gateway.savings import RouteInfo

log = logging.getLogger(__name__)

# Fields only Tollgate understands; never forwarded to a provider.
# Fields that attribute a call and mean nothing to a provider (OpenAI refuses a parameter
# it does not know: "Unrecognized request argument supplied: feature"). OpenAI's own
# `user` is forwarded; `metadata` too when `store` is true (OpenAI allows it then).
TOLLGATE_ONLY_FIELDS = ("user_id", "session_id", "feature", "team")
NATIVE_ONLY_FIELDS = (*TOLLGATE_ONLY_FIELDS, "metadata")


# OpenAI's reasoning models (o1, o3, o4-mini, gpt-5 and their dated or sized variants)
# take `max_completion_tokens` and refuse `max_tokens`.
_REASONING_MODEL = re.compile(r"^(?:[\w.-]+/)?(?:o\d+|gpt-5)(?:$|[-.:])", re.IGNORECASE)


def output_limit_field(model: str) -> str:
    """The output-limit parameter a call to ``model`` must use when the client set none."""
    return "max_completion_tokens" if _REASONING_MODEL.match(model) else "max_tokens"


@dataclass
class ChatRequest:
    """A validated chat completion request, and the body to forward upstream."""

    model: str
    upstream_body: dict[str, Any]
    stream: bool
    client_wants_usage: bool  # the client itself asked for stream usage
    max_tokens: int | None
    prompt_tokens_estimate: int
    choices: int = 1  # n: the provider writes (and bills) this many answers, each up to max
    prompt_tokens_floor: int | None = None  # at least this many (None: the estimate)
    prompt_tokenized: str | None = None  # "model/counter" the estimate counted for, if any

    async def tokenize_prompt(self, counter: str | None = None) -> None:
        """Count the prompt with its model's OpenAI tokenizer too (a call under a cap: its
        reservation must cover its prompt), whole, handing the event loop back between
        pieces. Tool (function) definitions and a JSON schema are prompt tokens too, billed
        with it, and they can be large (a 3.27 MB `tools` under a $0.01 cap was served when
        they were left out): :func:`count_prompt` counts them. ``counter``: how the upstream
        counts (``UpstreamConfig.prompt_counter``; None: either way)."""
        encoding = encoding_for(self.model)
        if self.prompt_tokenized == f"{self.model}/{counter}":  # its images are the model's
            return
        fields = [self.upstream_body[k] for k in PROMPT_FIELDS if self.upstream_body.get(k)]
        self.prompt_tokens_estimate, self.prompt_tokens_floor = await count_prompt(
            self.upstream_body["messages"], encoding, fields, counter, self.model
        )
        self.prompt_tokenized = f"{self.model}/{counter}"

    def cap_output(self, tokens: int) -> None:
        """Cap the output at ``tokens`` (the budget gate's decision) in every output-limit
        field the client sent, or if it sent none in the one its model takes:
        ``max_completion_tokens`` for OpenAI's reasoning models, which refuse ``max_tokens``
        ("Unsupported parameter: 'max_tokens' is not supported with this model"; every
        capped call to o3 or gpt-5 would have been a 400: probe I), else ``max_tokens``
        (what every OpenAI-compatible server reads)."""
        fields: list[str] = [
            f for f in ("max_completion_tokens", "max_tokens") if f in self.upstream_body
        ]
        for name in fields or [output_limit_field(self.model)]:
            self.upstream_body[name] = min(self.upstream_body.get(name) or tokens, tokens)

    def retarget(self, model: str) -> ChatRequest:
        """The same request for another model (the router's choice, or an escalation)."""
        return ChatRequest(
            model, {**self.upstream_body, "model": model}, self.stream, self.client_wants_usage,
            self.max_tokens, self.prompt_tokens_estimate, self.choices, self.prompt_tokens_floor,
            self.prompt_tokenized,
        )  # fmt: skip


def message_problem(messages: list[Any]) -> tuple[str, str] | None:
    """Which message is malformed and where in it (``messages[3].content[0].text``), and
    why; None if none is. Probe L: the 400 named only 'messages', among forty turns."""
    for index, message in enumerate(messages):
        try:
            message_texts(message)
        except MessageProblem as problem:
            return f"messages[{index}].{problem.path}", str(problem)
    return None


def parse_chat_request(
    body: Any, *, default_model: str | None = None, native: bool = False
) -> ChatRequest:
    """Validate an OpenAI-style chat body (``ChatBody``); raise InvalidRequest naming the bad
    field. The upstream body is the client's own JSON, minus Tollgate's fields."""
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object")
    shape = ChatBody if native else ChatCompletionBody  # the shapes /openapi.json documents
    try:
        parsed = shape.model_validate(body)
    except ValidationError as exc:
        name, problem = first_problem(exc, shape, full_path=True)
        raise InvalidRequest(f"'{name}' {problem}", field=name) from None
    for index, message in enumerate(body["messages"]):
        missing = message_content_problem(message)
        if missing is not None:
            where = f"messages[{index}].content"
            raise InvalidRequest(f"'{where}' {missing}", field=where)
        call = message_call_problem(message)
        if call is not None:
            where = f"messages[{index}].{call[0]}"
            raise InvalidRequest(f"'{where}' {call[1]}", field=where)
    unanswered = tool_answer_problem(body["messages"])
    if unanswered is not None:
        where = f"messages[{unanswered[0]}].tool_call_id"
        raise InvalidRequest(f"'{where}' {unanswered[1]}", field=where)
    try:
        prompt_tokens, prompt_floor = estimate_message_token_range(body["messages"])
    except ValueError as exc:
        where, problem = message_problem(body["messages"]) or ("messages", str(exc))
        raise InvalidRequest(f"'{where}' is malformed: {problem}", field=where) from None
    model = parsed.model or default_model
    if not model:
        raise InvalidRequest("'model' is required and must be a non-empty string", field="model")
    if None not in (parsed.max_tokens, parsed.max_completion_tokens) and (
        parsed.max_tokens != parsed.max_completion_tokens
    ):
        # which one the provider reads is its own choice: a client that asked for 1 token in
        # one was answered 198 by the other (a newcomer probe)
        raise InvalidRequest(
            f"'max_tokens' ({parsed.max_tokens}) and 'max_completion_tokens' "
            f"({parsed.max_completion_tokens}) set two different output limits; send one "
            "(max_completion_tokens is OpenAI's current name)",
            field="max_completion_tokens",
        )
    max_tokens = parsed.max_completion_tokens or parsed.max_tokens
    dropped = NATIVE_ONLY_FIELDS if native else TOLLGATE_ONLY_FIELDS
    if not native and body.get("store") is not True:
        # OpenAI refuses `metadata` unless `store` is true ("The 'metadata' parameter is only
        # allowed when 'store' is enabled"): here it attributes the call (metadata.feature).
        dropped = NATIVE_ONLY_FIELDS
    upstream_body = {k: v for k, v in body.items() if k not in dropped}
    upstream_body["model"] = model
    try:  # what will be forwarded must serialise: orjson reads 1,024 levels, writes 254
        orjson.dumps(upstream_body)
    except orjson.JSONEncodeError as exc:
        raise InvalidRequest(
            f"The request body cannot be forwarded: {exc} (arrays and objects may nest at most "
            "254 levels deep)"
        ) from None
    stream_options = parsed.stream_options
    if stream_options is not None and not parsed.stream:
        raise InvalidRequest(  # OpenAI's own rule: refused here, before any call is admitted
            "'stream_options' is only allowed when 'stream' is true", field="stream_options"
        )
    client_wants_usage = stream_options is not None and stream_options.include_usage is True
    if parsed.stream:
        # Always ask for usage so streamed calls are costed from the provider's own count.
        upstream_body["stream_options"] = {
            **(body.get("stream_options") or {}),
            "include_usage": True,
        }
    return ChatRequest(
        model, upstream_body, parsed.stream, client_wants_usage, max_tokens, prompt_tokens,
        parsed.n or 1, prompt_floor,
    )  # fmt: skip


@dataclass
class Call:
    """One LLM call in flight and everything its events will say."""

    request_id: str
    endpoint: str
    identity: Identity
    chat: ChatRequest
    deadline: float  # event-loop time by which the call ends, streams included
    admission: Admission | None = None
    client_request_id: str | None = None
    attempt: int = 1
    started: float = field(default_factory=time.monotonic)
    upstream: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int = 0
    usage_estimated: bool = False
    ttft_ms: int | None = None
    status: str = "ok"
    http_status: int = 200
    error_type: str | None = None
    generated_text: list[str] = field(default_factory=list)
    client_headers: Mapping[str, str] = field(default_factory=dict)
    finished: bool = False
    route: RouteInfo | None = None  # routing of this attempt (None: not through the levers)
    cache_hit: bool = False
    completion: Any = None  # the parsed non-streamed answer
    cost_nanos: int = 0  # what its Usage event charged, once finished
    on_chunk: Callable[[dict[str, Any]], None] | None = None  # sees every streamed chunk

    def serve_cached(self, model: str, prompt_tokens: int, completion_tokens: int) -> None:
        """Answered by the response cache: no provider call, cost 0, the cost avoided recorded."""
        self.cache_hit = True
        self.chat.model = model
        self.prompt_tokens, self.completion_tokens, self.cached_tokens = (
            prompt_tokens, completion_tokens, 0,
        )  # fmt: skip

    @property
    def max_tokens_cap(self) -> int | None:
        return self.admission.max_tokens_cap if self.admission else None

    @property
    def output_limited(self) -> bool:
        """Its output was limited on purpose (the client's max_tokens, or the budget gate's
        cap): an answer cut at that limit is what was asked for, not a failed one."""
        return self.chat.max_tokens is not None or self.max_tokens_cap is not None

    def estimate_usage(self) -> None:
        """Fill in the tokens the provider did not count (an error, a disconnect, or a
        provider that omits usage): the prompt's estimate, which is the upstream's own count
        once :meth:`Gateway.count_unreported_prompt` has run (call it first: ``finish_counted``
        does, and an answer that says its estimated usage), the output by its text; nothing
        billed when nothing was generated by a call that failed."""
        if self.prompt_tokens is not None and self.completion_tokens is not None:
            return
        self.usage_estimated = self.status == "ok" or bool(self.generated_text)
        self.prompt_tokens = self.chat.prompt_tokens_estimate if self.upstream else 0
        self.completion_tokens = count_tokens("".join(self.generated_text))
        if self.status != "ok" and not self.generated_text:
            self.prompt_tokens = 0  # the provider generated nothing; assume nothing billed

    def billed_usage(self) -> dict[str, int]:
        """The usage this call is billed for, in OpenAI's shape, estimated where the provider
        gave none (``estimate_usage``): what a client that got no usage from it is told."""
        self.estimate_usage()
        prompt, completion = self.prompt_tokens or 0, self.completion_tokens or 0
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }

    def take_usage(self, usage: Any) -> None:
        if not isinstance(usage, dict):
            return
        prompt = usage.get("prompt_tokens", usage.get("input_tokens"))
        completion = usage.get("completion_tokens", usage.get("output_tokens"))
        if isinstance(prompt, int) and isinstance(completion, int):
            self.prompt_tokens, self.completion_tokens = prompt, completion
            details = usage.get("prompt_tokens_details") or {}
            cached = details.get("cached_tokens") if isinstance(details, dict) else None
            self.cached_tokens = cached if isinstance(cached, int) else 0

    def cut(self, error_type: str) -> None:
        """The call was ended by the gateway or a failure; its usage says why."""
        self.status = (
            "timeout" if "timeout" in error_type or error_type == MAX_DURATION else "error"
        )
        self.error_type = error_type


def identity_scopes(identity: Identity) -> list[str]:
    return scopes_of(identity.user_id, identity.feature, identity.team, identity.api_key_id)


class SseRelay:
    """Splits an upstream SSE byte stream into events, captures usage and content.

    Returns the bytes to forward for each fed chunk (whole events only), dropping
    the usage-only chunk when the gateway asked for it and the client did not.
    """

    def __init__(self, call: Call) -> None:
        self.call = call
        self.buffer = b""
        self.drop_usage_chunk = not call.chat.client_wants_usage
        self.saw_content = False  # a delta with text, a tool call or a function call
        self.refused = False  # a delta with a refusal (and no content before it)
        self.finish_reason: str | None = None
        self.first: dict[str, Any] = {}  # the first chunk's id, created, model: a chunk we add

    def estimated_usage_event(self) -> bytes:
        """The usage chunk a client that asked ``include_usage`` gets when the provider sent
        none: the call's usage as billed (the estimate of its usage event), in the stream's
        own id and model, marked ``tollgate_usage_estimated``. Call after ``Gateway.finish``."""
        chunk: dict[str, Any] = {
            "id": self.first.get("id") or f"chatcmpl-{self.call.request_id}",
            "object": "chat.completion.chunk",
            "created": self.first.get("created") or int(time.time()),
            "model": self.first.get("model") or self.call.chat.model,
            "choices": [],
            "usage": self.call.billed_usage(),
            "tollgate_usage_estimated": True,
        }
        return b"data: " + orjson.dumps(chunk) + b"\n\n"

    def feed(self, data: bytes) -> bytes:
        self.buffer += data
        if b"\n\n" not in self.buffer:
            return b""
        *events, self.buffer = self.buffer.replace(b"\r\n", b"\n").split(b"\n\n")
        out = []
        for event in events:
            if self._inspect(event):
                out.append(event + b"\n\n")
        return b"".join(out)

    def flush(self) -> bytes:
        rest, self.buffer = self.buffer, b""
        return rest

    def _inspect(self, event: bytes) -> bool:
        """Record what the event says; return whether to forward it."""
        for line in event.split(b"\n"):
            if not line.startswith(b"data:"):
                continue
            payload = line[5:].strip()
            if not payload or payload == b"[DONE]":
                continue
            try:
                chunk = orjson.loads(payload)
            except orjson.JSONDecodeError:
                continue
            if not isinstance(chunk, dict):
                continue
            if self.call.on_chunk is not None:
                self.call.on_chunk(chunk)
            if not self.first:
                self.first = {k: chunk.get(k) for k in ("id", "created", "model")}
            choices = chunk.get("choices") or []
            for choice in choices:
                if not isinstance(choice, dict):
                    continue
                delta = choice.get("delta")
                if not isinstance(delta, dict):
                    delta = {}
                content = delta.get("content")
                if delta.get("tool_calls") or delta.get("function_call"):
                    self.saw_content = True
                elif delta.get("refusal") and not self.saw_content:
                    self.refused = True
                if choice.get("finish_reason"):
                    self.finish_reason = str(choice["finish_reason"])
                if content:
                    self.saw_content = True
                    if self.call.ttft_ms is None:
                        self.call.ttft_ms = int((time.monotonic() - self.call.started) * 1000)
                    self.call.generated_text.append(content)
            usage = chunk.get("usage")
            if usage:
                self.call.take_usage(usage)
                if self.drop_usage_chunk and not choices:
                    return False
        return True


StreamWriter = Callable[[bytes], Awaitable[None]]
MAX_DURATION = "max_call_duration"


@dataclass(frozen=True)
class GatewayConfig:
    """What the call lifecycle needs from the settings (see ``app/settings.py``)."""

    fallback_output_tokens: int = 512
    max_output_tokens: int = 16_384
    max_call_duration_s: float = 600.0
    budget_queue_wait_s: float = 600.0
    dispatcher_id: str | None = None
    boot_ts: datetime | None = None


class Gateway:
    """Runs calls against upstreams and turns them into priced, emitted events.

    ``call`` is the one owner of a call's lifecycle: admission (the budget
    gate), the ``Request`` event, and — whatever happens inside it (upstream
    error, client gone, cancellation, timeout, a failing encoder) — the
    ``Usage`` event and the release of the reservation.
    """

    def __init__(
        self,
        upstreams: UpstreamPool,
        prices: PriceCatalog,
        emitter: EventEmitter,
        metrics: Metrics,
        gate: BudgetGate,
        config: GatewayConfig | None = None,
    ) -> None:
        self.upstreams = upstreams
        self.prices = prices
        self.emitter = emitter
        self.metrics = metrics
        self.gate = gate
        self.config = config or GatewayConfig()
        self.outputs = OutputEstimator(self.config.fallback_output_tokens)
        self.model_label = ModelLabels(frozenset(upstreams.known_models() if upstreams else ()))
        # request_id -> who made it, and session_id -> its callers, one per user and feature
        # (most recent last), for
        # outcomes reported later with only the request or the session: to attribute them to
        # the spend they are about, and to refuse a key that reports on someone else's.
        self._recent: OrderedDict[str, Identity] = OrderedDict()
        # (user, request_id) -> who, for a request id several users reported under (a
        # request id is its user's): each user's outcome goes to that user's call, not to
        # whoever reported it last (a reviewer). Only shared ids are kept here.
        self._shared: OrderedDict[tuple[str, str], Identity] = OrderedDict()
        self._sessions: OrderedDict[str, OrderedDict[tuple[str, str | None], Identity]] = (
            OrderedDict()
        )
        # The request ids of calls dispatched here: their usage events' ids derive from them,
        # so a /v1/usage record naming one would be dropped downstream as that call's double.
        self._dispatched: OrderedDict[str, None] = OrderedDict()

    RECENT_REQUESTS = 100_000
    RECENT_SESSIONS = 100_000
    # Session ids are chosen by clients, so several users may share one; a conversation may
    # go through several features.
    CALLERS_PER_SESSION = 16

    def remember(self, request_id: str, identity: Identity) -> None:
        previous = self._recent.get(request_id)
        if previous is not None and previous.user_id != identity.user_id:
            for owner in (previous, identity):
                self._shared[(owner.user_id, request_id)] = owner
                self._shared.move_to_end((owner.user_id, request_id))
            while len(self._shared) > self.RECENT_REQUESTS:
                self._shared.popitem(last=False)
        self._recent[request_id] = identity
        self._recent.move_to_end(request_id)
        if len(self._recent) > self.RECENT_REQUESTS:
            self._recent.popitem(last=False)
        if identity.session_id:
            callers = self._sessions.pop(identity.session_id, None) or OrderedDict()
            caller = (identity.user_id, identity.feature)
            callers.pop(caller, None)
            callers[caller] = identity
            if len(callers) > self.CALLERS_PER_SESSION:
                callers.popitem(last=False)
            self._sessions[identity.session_id] = callers
            if len(self._sessions) > self.RECENT_SESSIONS:
                self._sessions.popitem(last=False)

    def dispatched(self, request_id: str) -> bool:
        """Whether this gateway dispatched a call under ``request_id`` (among its last
        ``RECENT_REQUESTS``): that call's usage is counted under it already."""
        return request_id in self._dispatched

    def attribute_outcome(
        self, outcome: dict[str, Any], may_act_for: Callable[[str], bool] | None = None
    ) -> str | None:
        """Attribute an outcome to the spend it names: the user, feature and session of its
        request, else of its session; refuse (403) a caller who may not act for that user.
        A session's outcome goes to its latest call, or to its latest call of the user and
        feature the outcome names, where it names them (probe R: a conversation through
        several features had its successes go to whichever feature it touched last).

        ``may_act_for``: None = the caller may report on anyone's spend (no keys configured,
        or an admin key); else whether its key may act for a user. A request or session this
        dispatcher has not seen (another dispatcher's, before a restart, or a typo) keeps the
        caller's own attribution, so a key can only ever skew its own figures; the field
        that named it is returned then ("request_id" or "session_id"), so the caller is told.
        """
        request_id = outcome.get("request_id") or ""
        owner = self._shared.get((outcome.get("user_id") or "", request_id))
        param, owner = "request_id", owner or self._recent.get(request_id)
        if owner is None and outcome.get("session_id"):
            param, callers = "session_id", self._sessions.get(outcome["session_id"])
            if callers:
                allowed = [
                    i for i in callers.values() if may_act_for is None or may_act_for(i.user_id)
                ]
                user, feature = outcome.get("user_id"), outcome.get("feature")
                owner = max(
                    enumerate(allowed or list(callers.values())),
                    key=lambda n_i: (
                        n_i[1].user_id == user
                        and feature is not None
                        and n_i[1].feature == feature,
                        n_i[1].user_id == user,
                        feature is not None and n_i[1].feature == feature,
                        n_i[0],  # else the latest
                    ),
                )[1]
        if owner is None:
            return "request_id" if outcome.get("request_id") else "session_id"
        if may_act_for is not None and not may_act_for(owner.user_id):
            raise NotPermitted(
                f"The {param.replace('_', ' ')} {outcome[param]!r} belongs to another user; this "
                "API key may report outcomes only for its own user's requests and sessions (or "
                "users in its may_act_for)",
                field=param,
            )
        if owner.user_id != ANONYMOUS_USER:
            outcome["user_id"] = owner.user_id  # the spend's owner, whoever reports on it
        for name, value in (("feature", owner.feature), ("session_id", owner.session_id)):
            if value is not None:  # the spend's own, as for its user (cost per outcome joins
                outcome[name] = value  # outcomes to the feature that spent)
        return None

    # -- events ---------------------------------------------------------------------
    def emit_request(
        self,
        *,
        request_id: str,
        endpoint: str,
        identity: Identity,
        chat: ChatRequest | None,
        status: str,
        reason: str | None = None,
        blocked_scope: str | None = None,
        call: Call | None = None,
        client_request_id: str | None = None,
        attempt: int | None = None,
    ) -> None:
        admission = call.admission if call else None
        route = call.route if call else None
        if call is not None:
            self._dispatched[request_id] = None
            if len(self._dispatched) > self.RECENT_REQUESTS:
                self._dispatched.popitem(last=False)
        deadline = (
            event_time() + timedelta(seconds=self.config.max_call_duration_s) if call else None
        )
        record = {
            "event_id": new_id(),
            "ts": event_time(),
            "request_id": request_id,
            **attribution_fields(identity),
            "endpoint": endpoint,
            "model_requested": route.model_requested if route else chat.model if chat else None,
            "model_served": chat.model if chat and status == "accepted" else None,
            "tier": route.tier if route else self.prices.tier(chat.model) if chat else None,
            "stream": chat.stream if chat else False,
            "prompt_tokens_estimated": chat.prompt_tokens_estimate if chat else 0,
            "max_tokens": chat.max_tokens if chat else None,
            "reserved_usd_nanos": admission.reservation.reserved_nanos if admission else 0,
            "status": status,
            "reason": reason,
            "blocked_scope": blocked_scope,
            "client_request_id": call.client_request_id if call else client_request_id,
            "dispatcher_id": self.config.dispatcher_id,
            "boot_ts": self.config.boot_ts,
            "deadline_ts": deadline,
            # every choice's: what the spend worker bills if this dispatcher dies mid-call
            "expected_output_tokens": (
                admission.expected_output_tokens * chat.choices if admission and chat else 0
            ),
            "max_tokens_capped": admission.max_tokens_cap if admission else None,
            "attempt": attempt or (call.attempt if call else 1),
        }
        self.emitter.emit("Request", "requests", identity.user_id, record)

    def usage_record(
        self, identity: Identity, *, counted: bool = True, **fields: Any
    ) -> dict[str, Any]:
        """A priced Usage record (``app.metering.usage.build_usage_record``), counted in the
        metrics unless ``counted`` is False (a retried report's, counted the first time)."""
        record = build_usage_record(self.prices, identity, **fields)
        self.remember(record["request_id"], identity)
        if counted:
            self._count(record)
        return record

    def _count(self, record: dict[str, Any]) -> None:
        model = self.model_label(record["model_served"])
        prompt_tokens, completion_tokens = record["prompt_tokens"], record["completion_tokens"]
        cached_tokens = record["cached_tokens"]
        cost_nanos, baseline_nanos = record["cost_usd_nanos"], record["baseline_cost_usd_nanos"]
        m = self.metrics
        if record["price_unknown"]:
            m.price_unknown.labels(model).inc()
        else:
            m.spend.labels(model).inc(float(nanos_to_usd(cost_nanos)))
            # as the reports count it: a call without a price saves nothing against the
            # baseline, and an escalated-away attempt is not a request (a probe: the
            # counter ran 3 % above the reports' baseline, savings overstated)
            if not str(record.get("error_type") or "").startswith(ESCALATED_PREFIX):
                m.baseline_spend.labels(model).inc(float(nanos_to_usd(baseline_nanos)))
        m.tokens.labels(model, "prompt").inc(prompt_tokens)
        m.tokens.labels(model, "completion").inc(completion_tokens)
        if cached_tokens:
            m.tokens.labels(model, "cached").inc(cached_tokens)

    def emit_usage(self, record: dict[str, Any], scopes: list[str]) -> None:
        """Spool a usage event and hold its cost at the gate until the worker counts it."""
        seq = self.emitter.emit_usage(record)
        self.gate.record_spend(scopes, event_cost(record), record["ts"], seq)

    def finish(self, call: Call) -> None:
        """Emit the call's Usage event and release its reservation, exactly once."""
        if call.finished:
            return
        call.finished = True
        if call.route is not None and call.route.explored:
            self.metrics.routing_explored.labels(call.status).inc()
        reservation = call.admission.reservation if call.admission else None
        seq, cost, ts = None, 0, None
        try:
            record = self._final_usage(call)
            cost, ts = event_cost(record), record["ts"]
            call.cost_nanos = cost
            seq = self.emitter.emit_usage(record)  # keyed by record["user_id"]: the identity's
            if call.status == "ok" and not call.usage_estimated and call.upstream:
                per_choice = record["completion_tokens"] // max(call.chat.choices, 1)
                self.outputs.observe(call.chat.model, per_choice)
        finally:  # a failed emit must not leak the reservation into false 402s
            if reservation is not None:
                self.gate.settle(reservation, cost if seq is not None else 0, ts, seq)

    def _final_usage(self, call: Call) -> dict[str, Any]:
        call.estimate_usage()
        route = call.route
        routing: dict[str, Any] = {}
        if route is not None:
            routing = {
                "model_requested": route.model_requested,
                "requested_price_model": route.reference_model,
                "router_score": route.score,
                "router_reason": route.reason,
                "escalated": route.escalated,
                "explored": route.explored,
            }
            if route.tier is not None:
                routing["tier"] = route.tier
        return self.usage_record(
            call.identity,
            request_id=call.request_id,
            event_id=usage_event_id(call.request_id, call.attempt),
            attempt=call.attempt,
            model=call.chat.model,
            prompt_tokens=call.prompt_tokens,
            completion_tokens=call.completion_tokens,
            cached_tokens=call.cached_tokens,
            provider=call.upstream,
            usage_estimated=call.usage_estimated,
            stream=call.chat.stream,
            latency_ms=int((time.monotonic() - call.started) * 1000),
            ttft_ms=call.ttft_ms,
            status=call.status,
            http_status=call.http_status,
            error_type=call.error_type,
            client_request_id=call.client_request_id,
            max_tokens_capped=call.max_tokens_cap,
            cache_hit=call.cache_hit,
            **routing,
        )

    # -- the call ---------------------------------------------------------------------
    def call_cost(self, chat: ChatRequest) -> CallCost:
        """What the call may cost, for the gate: exact prices for any output length. Output
        tokens are per choice (``max_tokens`` caps each of the ``n`` answers), all billed."""
        model, prompt, choices = chat.model, chat.prompt_tokens_estimate, chat.choices
        floor = chat.prompt_tokens_floor if chat.prompt_tokens_floor is not None else prompt
        maximum = chat.max_tokens or self.config.max_output_tokens
        return CallCost(
            price=lambda tokens: self.prices.worst_case_nanos(model, prompt, tokens * choices),
            least_nanos=self.prices.worst_case_nanos(model, min(floor, prompt), choices),
            max_output_tokens=maximum,
            expected_output_tokens=min(self.outputs.expected(model), maximum),
            client_capped=chat.max_tokens is not None,
        )

    @contextlib.asynccontextmanager
    async def call(
        self,
        request_id: str,
        endpoint: str,
        identity: Identity,
        chat: ChatRequest,
        client_headers: Mapping[str, str] | None = None,
        client_request_id: str | None = None,
        route: RouteInfo | None = None,
        attempt: int = 1,
        client_gone: Callable[[], bool] | None = None,
        free: bool = False,
    ) -> AsyncIterator[Call]:
        """Admit a call (known model, room under every cap, else ``BudgetRefused``), record it,
        and whatever happens in the block, emit its usage and release its reservation.
        ``free``: it will be answered without a provider call (a cache hit), admitted unless
        a scope's limit is reached (``BudgetGate.admit_free``).

        ``attempt`` 2 is an escalation of the same request: admitted and reserved on its own
        worst case, its own ``Request`` and ``Usage`` events (same request id, ``attempt`` 2), so
        the spend worker can settle it if this dispatcher dies during it. A refused escalation
        is announced as a blocked ``Request`` of that attempt (the first one's web layer
        already announced attempt 1)."""
        if not self.upstreams.candidates(chat.model):
            raise ModelNotServed(chat.model, self.upstreams.known_models())
        scopes = identity_scopes(identity)
        if (
            not free
            and self.gate.reservations
            and any(self.gate.policies.policy_for(s) for s in scopes)
        ):
            await chat.tokenize_prompt(self.upstreams.prompt_counter(chat.model))
        try:
            admission = (
                self.gate.admit_free(scopes)
                if free
                else await self.gate.admit_waiting(
                    scopes,
                    self.call_cost(chat),
                    self.config.budget_queue_wait_s,
                    gone=client_gone,
                )
            )
        except BudgetRefused as refusal:
            if attempt > 1:
                self.emit_request(
                    request_id=request_id, endpoint=endpoint, identity=identity, chat=chat,
                    status="blocked", reason="budget_exceeded",
                    blocked_scope=refusal.status.scope, client_request_id=client_request_id,
                    attempt=attempt,
                )  # fmt: skip
            raise
        loop = asyncio.get_running_loop()
        call = Call(
            request_id=request_id,
            endpoint=endpoint,
            identity=identity,
            chat=chat,
            deadline=loop.time() + self.config.max_call_duration_s,
            admission=admission,
            client_request_id=client_request_id,
            client_headers=client_headers or {},
            attempt=attempt,
            route=route,
        )
        try:
            if admission.max_tokens_cap is not None:
                chat.cap_output(admission.max_tokens_cap)
            elif admission.reservation.scopes and self.gate.reservations and not chat.max_tokens:
                # Reserved on the assumed output limit: hold the call to it, or a model that
                # writes more (gpt-4.1: 32,768) crosses the cap (by 31 % in session 14's probe)
                chat.cap_output(self.config.max_output_tokens)
            self.emit_request(
                request_id=request_id,
                endpoint=endpoint,
                identity=identity,
                chat=chat,
                status="accepted",
                call=call,
            )
        except BaseException:
            call.finished = True  # no Request event, so no Usage: only the release
            self.gate.settle(admission.reservation, 0)
            raise
        try:
            yield call
        except Exception:
            if call.status == "ok" and call.upstream is None:  # failed before any provider call
                call.status, call.http_status, call.error_type = "error", 500, "internal_error"
            raise
        finally:
            await self.finish_counted(call)

    async def finish_counted(self, call: Call) -> None:
        """:meth:`finish`, after counting a prompt the provider billed without reporting it
        (:meth:`count_unreported_prompt`)."""
        await self.count_unreported_prompt(call)
        self.finish(call)

    async def count_unreported_prompt(self, call: Call) -> None:
        """A call the provider billed without its count reaching us (a stream cut short, a
        provider that omits usage) is billed its prompt as the upstream counts it, not by the
        cheap estimate an uncapped call was admitted on (characters / 4: 16 % short on an
        English prompt, a quarter of a Chinese one; session 17's probe). Best effort: on any
        failure, even a second cancellation, the estimate stands and the call is finished."""
        if call.finished or call.prompt_tokens is not None or call.upstream is None:
            return
        if call.status != "ok" and not call.generated_text:
            return  # nothing generated: nothing billed (``_final_usage``)
        try:
            await call.chat.tokenize_prompt(self.upstreams.prompt_counter(call.chat.model))
        except BaseException:  # the call must still be finished
            log.warning("could not count an unreported prompt; the estimate is billed")

    async def open_upstream(self, call: Call) -> aiohttp.ClientResponse:
        """POST to the first upstream that accepts the connection (one retry elsewhere)."""
        candidates = self.upstreams.tried(call.chat.model)
        payload = orjson.dumps(call.chat.upstream_body)
        last_error: Exception | None = None
        for upstream in candidates:
            call.upstream = upstream.name
            try:
                async with asyncio.timeout_at(call.deadline):
                    return await upstream.session.post(
                        upstream.chat_url,
                        data=payload,
                        headers=upstream.request_headers(call.client_headers),
                    )
            except RETRYABLE_CONNECT_ERRORS as exc:
                self.metrics.upstream_errors.labels(upstream.name, "connect").inc()
                log.warning(
                    "upstream unreachable",
                    extra={"upstream": upstream.name, "error": repr(exc)},
                )
                last_error = exc
            except TimeoutError as exc:
                self.metrics.upstream_errors.labels(upstream.name, "timeout").inc()
                raise self.timed_out(call, "did not answer in time") from exc
            except aiohttp.ClientError as exc:
                self.metrics.upstream_errors.labels(upstream.name, "connect").inc()
                last_error = exc
                break  # the request may have reached the provider: do not retry
        call.status, call.http_status, call.error_type = "error", 502, "upstream_error"
        names = ", ".join(u.name for u in candidates)
        raise UpstreamFailed(
            f"No upstream serving {call.chat.model!r} could be reached ({names}): {last_error}"
        )

    def timed_out(self, call: Call, what: str) -> UpstreamTimedOut:
        """The call ran out of time: its own deadline (max_call_duration_s) or upstream silence."""
        call.http_status = 504
        if asyncio.get_running_loop().time() >= call.deadline:
            call.cut(MAX_DURATION)
            return UpstreamTimedOut(
                f"The call exceeded TOLLGATE_MAX_CALL_DURATION_S="
                f"{self.config.max_call_duration_s:g}s; upstream {call.upstream!r} {what}",
                code=MAX_DURATION,
            )
        call.cut("upstream_timeout")
        return UpstreamTimedOut(f"Upstream {call.upstream!r} {what}")

    def record_upstream_status(self, call: Call, response: aiohttp.ClientResponse) -> None:
        if response.status >= 400:
            kind = "http_5xx" if response.status >= 500 else "http_4xx"
            self.metrics.upstream_errors.labels(call.upstream or "?", kind).inc()
            call.status, call.http_status = "error", response.status
            call.error_type = f"upstream_http_{response.status}"
        else:
            call.http_status = response.status

    def observe_upstream(self, call: Call) -> None:
        """Upstream duration: from sending the request to its last byte, streams included."""
        self.metrics.upstream_latency.labels(call.upstream or "?").observe(
            time.monotonic() - call.started
        )
        if call.ttft_ms is not None:
            self.metrics.upstream_ttft.labels(call.upstream or "?").observe(call.ttft_ms / 1000)

    async def complete(self, call: Call) -> tuple[int, bytes, str]:
        """Non-streamed call: (status, body bytes passed through unchanged, content type)."""
        response = await self.open_upstream(call)
        try:
            async with asyncio.timeout_at(call.deadline):
                body = await response.read()
        except TimeoutError as exc:
            raise self.timed_out(call, "stopped answering") from exc
        except aiohttp.ClientError as exc:
            call.status, call.http_status, call.error_type = "error", 502, "upstream_error"
            raise UpstreamFailed(f"Upstream {call.upstream!r} broke the connection: {exc}") from exc
        finally:
            response.release()
            self.observe_upstream(call)
        self.record_upstream_status(call, response)
        if response.status < 400:
            try:
                parsed = orjson.loads(body)
            except orjson.JSONDecodeError:
                parsed = None
            if isinstance(parsed, dict):
                call.completion = parsed
                call.take_usage(parsed.get("usage"))
                for choice in parsed.get("choices") or []:
                    message = choice.get("message") if isinstance(choice, dict) else None
                    content = message.get("content") if isinstance(message, dict) else None
                    if isinstance(content, str):
                        call.generated_text.append(content)
        content_type = response.headers.get("Content-Type", "application/json")
        return response.status, body, content_type

    async def relay_stream(
        self,
        call: Call,
        response: aiohttp.ClientResponse,
        write: StreamWriter,
        error_event: Callable[[TollgateError], bytes],
        relay: SseRelay | None = None,
    ) -> None:
        """Pass an upstream SSE stream through chunk by chunk, capturing usage on the way.

        ``relay``: the :class:`SseRelay` that read the stream's start already (a stream held
        until its first content); the rest is read from where it stopped.

        A client that goes away raises from ``write``; the call is then marked
        ``client_disconnected`` and the upstream connection is closed, so the
        provider stops generating. A call that reaches its deadline is cut, and the
        client gets an SSE ``error`` event saying so (``error_event``: the web layer's rendering
        of the error). Usage is emitted by ``finish``
        either way.
        """
        relay = relay or SseRelay(call)
        try:
            async with asyncio.timeout_at(call.deadline):
                async for data in response.content.iter_any():
                    out = relay.feed(data)
                    if out:
                        await write(out)
                tail = relay.flush()
                if tail:
                    await write(tail)
        except (ConnectionError, asyncio.CancelledError):
            call.status, call.error_type = "client_disconnected", "client_disconnected"
            response.close()
            raise
        except TimeoutError:
            error = self.timed_out(call, "stopped streaming")
            response.close()
            with contextlib.suppress(ConnectionError):
                await write(error_event(error))
        except aiohttp.ClientPayloadError as exc:
            call.status, call.error_type = "error", "upstream_stream_broken"
            log.warning(
                "upstream stream broke", extra={"upstream": call.upstream, "error": str(exc)}
            )
        finally:
            response.release()
            self.observe_upstream(call)
