"""Upstream simulator: an OpenAI-compatible chat-completions server for tests, demos and benchmarks.

This module owns the fake LLM provider Tollgate talks to when no real provider is
reachable: the simulated model catalogue (:data:`DEFAULT_MODELS`), the token-count
approximation shared by the simulator and its clients (:func:`count_tokens`,
:func:`count_message_tokens`), the aiohttp application (:func:`create_app`) and the
long-running server (:func:`serve`, wired to ``tollgate simulate`` by the CLI).

Endpoints (OpenAI wire format; the official ``openai`` SDK parses every response):

* ``GET  /v1/models`` and ``GET /v1/models/{model}`` -- the simulated catalogue.
* ``POST /v1/chat/completions`` -- non-streaming and streaming (SSE) completions.
* ``GET  /healthz`` -- ``{"status": "ok"}`` for readiness probes.

Behaviour of ``/v1/chat/completions``:

* ``usage.prompt_tokens`` is :func:`count_message_tokens` of the request messages:
  :func:`count_tokens` of every text content (a string or ``{"type": "text"}`` parts)
  plus :data:`MESSAGE_OVERHEAD_TOKENS` per message, plus :func:`count_field_tokens` of
  its ``tools``, ``functions`` and ``response_format`` (billed as prompt, as OpenAI does).
* The natural completion length is a deterministic, hash-seeded lognormal draw from
  the messages (the same messages always give the same length, on every model and
  every run). It is capped by ``max_completion_tokens`` (or ``max_tokens``) and by
  the model's ``max_output_tokens``; ``finish_reason`` is ``"length"`` when capped,
  else ``"stop"``.
* The content is filler words whose :func:`count_tokens` equals
  ``usage.completion_tokens`` exactly, so a client that re-counts the text (e.g. a
  stream without usage) gets the reported number.
* Streaming sends a role chunk, content chunks of about four tokens, a chunk with
  ``finish_reason``, then -- only when ``stream_options.include_usage`` is true -- a
  ``"choices": []`` chunk carrying ``usage``, then ``data: [DONE]``.
* Latency: a lognormal time to first token around ``ttft_ms_median`` and
  ``inter_token_ms`` per generated token, all multiplied by ``latency_scale``
  (``0`` = instant). A non-streaming answer waits ``ttft + n * inter_token``, capped
  at ``max_latency_ms``.
* Tools: with ``tools`` and a ``tool_choice`` that is not ``"none"``, the answer is a call
  of the function ``tool_choice`` names (else the first) when it is ``"required"`` or
  named, or when the last message is the user's (``"auto"``): after a tool's answer it
  answers in text, so an agent loop ends. Its arguments are a value the function's
  ``parameters`` schema accepts; ``finish_reason`` is ``"tool_calls"``; the completion
  tokens are :func:`count_tokens` of its name and arguments.
* ``response_format``: ``json_schema`` (what the SDK's ``parse()`` sends) answers a JSON
  value its schema accepts, ``json_object`` a JSON object; the content is that JSON.
* ``logprobs: true`` adds each choice's ``logprobs.content``: one entry per word of the text
  (its ``token``, a deterministic ``logprob`` in [-4, 0), its UTF-8 ``bytes``) with
  ``top_logprobs`` (0 to 20) alternatives each; a stream carries each delta's own. A tool-call
  answer has ``content: null``. ``top_logprobs`` without ``logprobs: true`` is a 400.
* ``error_rate`` answers that fraction of valid requests with a random 500 or 429.
* ``n`` from 1 to 128 (each choice its own filler); ``Authorization`` is accepted and never
  checked.
* An endpoint it does not serve (embeddings, ...) or a wrong method: OpenAI's JSON error
  (``Invalid URL (POST /v1/embeddings)``), 404 or 405.

Test hooks (request headers on ``POST /v1/chat/completions``):

* ``X-Sim-Status: N`` (400..599) -- answer status N at once with an OpenAI-shaped
  error body, before any validation.
* ``X-Sim-Completion-Tokens: N`` (>= 0) -- force the natural completion length; the
  ``max_tokens`` and model caps still apply.
* ``X-Sim-Latency-Ms: N`` -- fixed total delay of N ms, not scaled by
  ``latency_scale``; a stream spreads it over the first token and the later chunks.
* ``X-Sim-Omit-Usage: 1`` -- answer without any usage: a stream even when
  ``stream_options.include_usage`` asks for it, a JSON answer without its ``usage`` field
  (emulates providers that do not report).
* ``X-Sim-Content: text`` -- answer exactly this text (its words, whitespace-separated, make
  the completion tokens; a stream sends them in the usual chunks of about four tokens), instead
  of filler: a test can make a model open its answer with a refusal.
* ``X-Sim-Models: a,b`` -- the hooks above apply only to requests for these models (so a
  test can fail the economy model and let the next tier answer).
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import logging
import math
import os
import random
import re
import time
from bisect import bisect_left
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final

import orjson
from aiohttp import web

from app.pricing.tokens import (
    MESSAGE_OVERHEAD_TOKENS,
    PROMPT_FIELDS,
    count_field_tokens,
    count_message_tokens,
    count_tokens,
)

__all__ = [
    "DEFAULT_MODELS",
    "MESSAGE_OVERHEAD_TOKENS",
    "SimModel",
    "SimulatorConfig",
    "count_field_tokens",
    "count_message_tokens",
    "count_tokens",
    "create_app",
    "serve",
]

log = logging.getLogger(__name__)

OWNED_BY: Final = "tollgate-sim"
TIERS: Final = frozenset({"premium", "standard", "economy"})

HEADER_STATUS: Final = "X-Sim-Status"
HEADER_COMPLETION_TOKENS: Final = "X-Sim-Completion-Tokens"
HEADER_LATENCY_MS: Final = "X-Sim-Latency-Ms"
HEADER_OMIT_USAGE: Final = "X-Sim-Omit-Usage"
HEADER_MODELS: Final = "X-Sim-Models"
HEADER_CONTENT: Final = "X-Sim-Content"

_TOKENS_PER_CHUNK: Final = 4
_SYSTEM_FINGERPRINT: Final = "fp_tollgate_sim"
_JSON: Final = "application/json"
_SSE_DONE: Final = b"data: [DONE]\n\n"
_MODELS_CREATED: Final = 1_700_000_000


# -- models and configuration -----------------------------------------------------------


@dataclass(frozen=True)
class SimModel:
    """One simulated model: its name, price tier and output limit."""

    name: str
    tier: str  # "premium" | "standard" | "economy"
    max_output_tokens: int

    def __post_init__(self) -> None:
        if self.tier not in TIERS:
            raise ValueError(f"SimModel {self.name!r}: tier must be one of {sorted(TIERS)}")
        if self.max_output_tokens < 1:
            raise ValueError(f"SimModel {self.name!r}: max_output_tokens must be >= 1")


DEFAULT_MODELS: tuple[SimModel, ...] = (
    SimModel("gpt-4", "premium", 8192),
    SimModel("gpt-4-turbo", "premium", 4096),
    SimModel("gpt-4o", "standard", 16384),
    SimModel("gpt-4.1", "standard", 32768),
    SimModel("gpt-4o-mini", "economy", 16384),
    SimModel("gpt-4.1-mini", "economy", 32768),
    SimModel("gpt-3.5-turbo", "economy", 4096),
    # No public price anywhere: exercises Tollgate's "unpriced model" path.
    SimModel("tollgate-sim-unpriced", "standard", 4096),
)


@dataclass(frozen=True)
class SimulatorConfig:
    """How the simulator behaves. Delays are in milliseconds."""

    models: tuple[SimModel, ...] = DEFAULT_MODELS
    ttft_ms_median: float = 200.0
    """Median time to first token; the draw is lognormal around it."""
    ttft_sigma: float = 0.5
    """Sigma of the lognormal time to first token (0 = always the median)."""
    inter_token_ms: float = 5.0
    """Delay per generated token."""
    error_rate: float = 0.0
    """Fraction of valid requests answered 500 or 429 at random."""
    seed: int | None = None
    """Seed of the latency and error draws (completion lengths never depend on it)."""
    latency_scale: float = 1.0
    """Multiplies every configured delay; 0 = instant (tests)."""
    max_latency_ms: float = 60_000.0
    """Cap on the total delay of a non-streaming answer (before the hook header)."""
    completion_tokens_median: float = 150.0
    """Median of the natural (uncapped) completion length."""
    completion_tokens_sigma: float = 0.6
    """Sigma of the lognormal natural completion length."""
    completion_tokens_max: int = 1024
    """Upper bound of the natural completion length (the hook header may exceed it)."""

    def __post_init__(self) -> None:
        if not self.models:
            raise ValueError("SimulatorConfig.models must not be empty")
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            raise ValueError(f"SimulatorConfig.models has duplicate names: {names}")
        if not 0.0 <= self.error_rate <= 1.0:
            raise ValueError("SimulatorConfig.error_rate must be within [0, 1]")
        if self.latency_scale < 0 or self.ttft_ms_median < 0 or self.inter_token_ms < 0:
            raise ValueError("SimulatorConfig delays and latency_scale must be >= 0")
        if self.ttft_sigma < 0 or self.completion_tokens_sigma < 0:
            raise ValueError("SimulatorConfig sigmas must be >= 0")
        if self.completion_tokens_median < 1 or self.completion_tokens_max < 1:
            raise ValueError("SimulatorConfig completion_tokens_median/max must be >= 1")


# -- filler text ------------------------------------------------------------------------

_BASE_TEXT: Final = (
    "Tollgate simulated this reply so that budgets, caps and alerts can be tested "
    "without a real provider. Every word here is filler, chosen so that counting "
    "the text again gives exactly the usage that was reported. The cheapest token "
    "is the one never sent; the next cheapest is the one sent to a smaller model. "
    "Spend is attributed to teams, features and users as each request completes."
)
# One word per token cost, to top up a text that would otherwise overshoot.
_TOP_UP_WORDS: Final = {1: "ok.", 2: "done.", 3: "complete."}


def _word_cost(word: str) -> int:
    return (len(word) + 3) >> 2


class _Filler:
    """Filler text of an exact token count, from a precomputed cyclic word table."""

    __slots__ = ("_base", "_cum", "_words", "base_len")

    def __init__(self, capacity: int) -> None:
        self._base = _BASE_TEXT.split()
        self.base_len = len(self._base)
        for word in self._base:
            if _word_cost(word) - 1 > max(_TOP_UP_WORDS):  # pragma: no cover - static data
                raise AssertionError(f"filler word {word!r} too long to top up")
        self._words: list[str] = []
        self._cum: list[int] = [0]
        self._grow(capacity)

    def _grow(self, capacity: int) -> None:
        base_tokens = sum(_word_cost(w) for w in self._base)
        while self._cum[-1] < capacity + base_tokens:
            for word in self._base:
                self._words.append(word)
                self._cum.append(self._cum[-1] + _word_cost(word))

    def words(self, n: int, start: int) -> list[str]:
        """Words whose costs sum to exactly ``n``, from base offset ``start``."""
        start %= self.base_len
        cum = self._cum
        target = cum[start] + n
        if target > cum[-1]:
            self._grow(n)
        j = bisect_left(cum, target, lo=start)
        if cum[j] == target:
            return self._words[start:j]
        out = self._words[start : j - 1]
        out.append(_TOP_UP_WORDS[target - cum[j - 1]])
        return out


def _chunk_pieces(words: list[str]) -> list[tuple[str, int]]:
    """Group ``words`` into stream deltas of about four tokens: (text, tokens)."""
    pieces: list[tuple[str, int]] = []
    group: list[str] = []
    tokens = 0
    for word in words:
        group.append(word)
        tokens += _word_cost(word)
        if tokens >= _TOKENS_PER_CHUNK:
            text = " ".join(group)
            pieces.append((" " + text if pieces else text, tokens))
            group = []
            tokens = 0
    if group:
        text = " ".join(group)
        pieces.append((" " + text if pieces else text, tokens))
    return pieces


# -- errors -------------------------------------------------------------------------------


class _RequestError(Exception):
    """An OpenAI-shaped error answer."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code

    def response(self) -> web.Response:
        body = {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }
        return web.Response(status=self.status, body=orjson.dumps(body), content_type=_JSON)


def _status_error(status: int, reason: str) -> _RequestError:
    """The error OpenAI would send with ``status``."""
    if status == 429:
        return _RequestError(
            429,
            f"Rate limit reached ({reason}). Please try again shortly.",
            "requests",
            code="rate_limit_exceeded",
        )
    if status == 401:
        return _RequestError(401, f"Incorrect API key provided ({reason}).", code="invalid_api_key")
    if status == 403:
        return _RequestError(403, f"Forbidden ({reason}).", "permission_error")
    if status >= 500:
        return _RequestError(
            status,
            f"The server had an error while processing your request ({reason}).",
            "server_error",
        )
    return _RequestError(status, f"Request rejected ({reason}).")


def _int_header(request: web.Request, name: str, low: int, high: int | None = None) -> int | None:
    raw = request.headers.get(name)
    if raw is None:
        return None
    try:
        value = int(raw.strip())
    except ValueError:
        value = low - 1
    if value < low or (high is not None and value > high):
        bound = f"{low}..{high}" if high is not None else f">= {low}"
        raise _RequestError(400, f"{name} must be an integer {bound}, got {raw!r}")
    return value


def _positive_int_param(body: dict[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _RequestError(400, f"'{name}' must be an integer >= 1", param=name)
    return value


# -- the application ---------------------------------------------------------------------


class _SimState:
    """Per-application state, built once in :func:`create_app`."""

    __slots__ = (
        "config",
        "filler",
        "ids",
        "models",
        "models_body",
        "rng",
    )

    def __init__(self, config: SimulatorConfig) -> None:
        self.config = config
        self.models = {m.name: m for m in config.models}
        self.rng = random.Random(config.seed)
        self.filler = _Filler(max(m.max_output_tokens for m in config.models))
        prefix = os.urandom(4).hex()
        self.ids = (f"chatcmpl-{prefix}{i:016x}" for i in itertools.count(1))
        self.models_body = orjson.dumps(
            {"object": "list", "data": [_model_object(m) for m in config.models]}
        )

    # -- draws ----------------------------------------------------------------------------

    def natural_length(self, digest: bytes) -> int:
        cfg = self.config
        u1 = (int.from_bytes(digest[0:4], "little") + 0.5) / 2**32
        u2 = int.from_bytes(digest[4:8], "little") / 2**32
        z = math.sqrt(-2.0 * math.log(u1)) * math.cos(2.0 * math.pi * u2)
        n = round(cfg.completion_tokens_median * math.exp(cfg.completion_tokens_sigma * z))
        return max(1, min(n, cfg.completion_tokens_max))

    def delays(self, fixed_ms: int | None, delayed_tokens: int) -> tuple[float, float]:
        """(time to first token, delay per later token), in seconds."""
        cfg = self.config
        if fixed_ms is None and cfg.latency_scale <= 0:
            return 0.0, 0.0
        ttft_ms = cfg.ttft_ms_median
        if cfg.ttft_sigma > 0 and ttft_ms > 0:
            ttft_ms *= math.exp(cfg.ttft_sigma * self.rng.gauss(0.0, 1.0))
        per_token_ms = cfg.inter_token_ms
        if fixed_ms is None:
            scale = cfg.latency_scale / 1000.0
            return ttft_ms * scale, per_token_ms * scale
        natural = ttft_ms + per_token_ms * delayed_tokens
        if natural <= 0:
            return fixed_ms / 1000.0, 0.0
        factor = fixed_ms / natural / 1000.0
        return ttft_ms * factor, per_token_ms * factor


def _model_object(model: SimModel) -> dict[str, Any]:
    return {"id": model.name, "object": "model", "created": _MODELS_CREATED, "owned_by": OWNED_BY}


_STATE: Final = web.AppKey("tollgate_simulator", _SimState)


async def _list_models(request: web.Request) -> web.Response:
    return web.Response(body=request.app[_STATE].models_body, content_type=_JSON)


async def _get_model(request: web.Request) -> web.Response:
    state = request.app[_STATE]
    name = request.match_info["model"]
    model = state.models.get(name)
    if model is None:
        return _unknown_model(name).response()
    return web.Response(body=orjson.dumps(_model_object(model)), content_type=_JSON)


async def _healthz(request: web.Request) -> web.Response:
    return web.Response(body=b'{"status":"ok"}', content_type=_JSON)


def _unknown_model(name: str) -> _RequestError:
    return _RequestError(
        404,
        f"The model `{name}` does not exist or you do not have access to it.",
        param="model",
        code="model_not_found",
    )


async def _chat_completions(request: web.Request) -> web.StreamResponse:
    try:
        return await _complete(request, request.app[_STATE])
    except _RequestError as exc:
        return exc.response()


async def _hooks_apply(request: web.Request) -> bool:
    """Whether the X-Sim-* hooks apply to this request (X-Sim-Models limits them)."""
    only = request.headers.get(HEADER_MODELS)
    if not only:
        return True
    try:
        model = orjson.loads(await request.read()).get("model")
    except (orjson.JSONDecodeError, AttributeError):
        return True
    return model in {name.strip() for name in only.split(",")}


def _tool_to_call(body: dict[str, Any], messages: list[Any]) -> dict[str, Any] | None:
    """The function definition the answer calls, or None for a text answer."""
    tools = body.get("tools")
    if not isinstance(tools, list) or not tools:
        if body.get("tool_choice") not in (None, "none", "auto"):
            raise _RequestError(
                400, "'tool_choice' is only allowed when 'tools' are specified.",
                param="tool_choice",
            )  # fmt: skip
        return None
    functions = [
        t["function"]
        for t in tools
        if isinstance(t, dict) and isinstance(t.get("function"), dict)
        and isinstance(t["function"].get("name"), str)
    ]  # fmt: skip
    choice = body.get("tool_choice", "auto")
    if not isinstance(choice, dict) and choice not in ("auto", "none", "required", None):
        raise _RequestError(
            400, "'tool_choice' must be 'none', 'auto', 'required' or a named function.",
            param="tool_choice",
        )  # fmt: skip
    if not functions or choice == "none":
        return None
    if isinstance(choice, dict):
        named = choice.get("function")
        name = named.get("name") if isinstance(named, dict) else None
        for function in functions:
            if function["name"] == name:
                return function
        raise _RequestError(
            400, f"tool_choice names {name!r}, which is not one of the tools.", param="tool_choice"
        )
    last = messages[-1] if messages else None
    if choice == "required" or (isinstance(last, dict) and last.get("role") == "user"):
        return functions[0]
    return None


# Values of the string formats JSON schemas name (pydantic: datetime, date, UUID, ...).
_FORMATS: Final = {
    "date-time": "2026-01-01T12:00:00Z",
    "date": "2026-01-01",
    "time": "12:00:00",
    "duration": "P1D",
    "uuid": "3f2b8c4e-1d2a-4b6c-9e8f-0a1b2c3d4e5f",
    "email": "user@example.com",
    "uri": "https://example.com/",
    "url": "https://example.com/",
    "hostname": "example.com",
    "ipv4": "192.0.2.1",
    "ipv6": "2001:db8::1",
}
_DEEP: Final = 5  # past this depth an example takes no optional or repeated part (recursion)


def _pattern_example(pattern: str) -> str | None:
    """A string matching the regular expression ``pattern`` (exrex draws one; checked)."""
    import re

    import exrex

    for _ in range(20):
        try:
            candidate = str(exrex.getone(pattern, limit=8))
        except Exception:  # a construct exrex cannot draw from
            return None
        if re.search(pattern, candidate):
            return candidate
    return None


def _string_example(schema: dict[str, Any], words: list[str], depth: int) -> str:
    text = _FORMATS.get(str(schema.get("format")))
    if text is None and isinstance(schema.get("pattern"), str):
        text = _pattern_example(schema["pattern"])
    if text is None:
        text = " ".join(words[: 2 + depth % 3]) or "text"
    longest, shortest = schema.get("maxLength"), schema.get("minLength")
    if isinstance(longest, int):
        text = text[:longest].rstrip() or text[:longest]
    if isinstance(shortest, int) and len(text) < shortest:
        text = text + "x" * (shortest - len(text))
    return text


def _number_example(schema: dict[str, Any], integer: bool) -> int | float:
    step = 1 if integer else 0.5
    low = schema.get("minimum")
    if low is None and schema.get("exclusiveMinimum") is not None:
        low = schema["exclusiveMinimum"] + step
    high = schema.get("maximum")
    if high is None and schema.get("exclusiveMaximum") is not None:
        high = schema["exclusiveMaximum"] - step
    if low is not None and high is not None and not integer:
        value: float = (low + high) / 2
    elif low is not None:
        value = low
    else:
        value = 1 if high is None else min(1, high)
    multiple = schema.get("multipleOf")
    if isinstance(multiple, int | float) and multiple > 0:
        value = math.ceil(value / multiple) * multiple
    return math.ceil(value) if integer else float(value)


def _json_example(schema: Any, root: Any, words: list[str], depth: int = 0) -> Any:
    """A value the JSON schema ``schema`` accepts (types, required properties, enums,
    ``$ref`` into the root's ``$defs``, string formats, patterns and lengths, number
    bounds), its strings filler ``words``; a recursive schema ends past :data:`_DEEP`."""
    if not isinstance(schema, dict) or depth > 40:
        return None
    deep = depth > _DEEP
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/"):
        target: Any = root
        for part in ref[2:].split("/"):
            target = target.get(part) if isinstance(target, dict) else None
        return _json_example(target, root, words, depth + 1)
    if "const" in schema:
        return schema["const"]
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        return schema["enum"][0]
    for key in ("anyOf", "oneOf", "allOf"):
        options = schema.get(key)
        if isinstance(options, list) and options:
            null = [o for o in options if isinstance(o, dict) and o.get("type") == "null"]
            if deep and null:
                return None
            chosen = [o for o in options if o not in null]
            return _json_example((chosen or options)[0], root, words, depth + 1)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = None if deep and "null" in kind else next((k for k in kind if k != "null"), None)
    if kind == "object" or (kind is None and "properties" in schema):
        properties = schema.get("properties")
        properties = properties if isinstance(properties, dict) else {}
        required = schema.get("required")
        required = required if isinstance(required, list) else []
        return {
            name: _json_example(sub, root, words, depth + 1)
            for name, sub in properties.items()
            if name in required or (not required and not deep)
        }
    if kind == "array":
        count = int(schema.get("minItems") or (0 if deep else 1))
        return [_json_example(schema.get("items"), root, words, depth + 1) for _ in range(count)]
    if kind == "string":
        return _string_example(schema, words, depth)
    if kind in ("integer", "number"):
        return _number_example(schema, kind == "integer")
    if kind == "boolean":
        return True
    return None


def _json_content(response_format: Any, words: list[str]) -> str | None:
    """The JSON text a ``response_format`` asks for, or None for prose."""
    if not isinstance(response_format, dict):
        return None
    if response_format.get("type") == "json_object":
        return json.dumps({"answer": " ".join(words[:8]) or "ok"})
    if response_format.get("type") == "json_schema":
        spec = response_format.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        return json.dumps(_json_example(schema or {"type": "object"}, schema, words))
    return None


async def _complete(request: web.Request, state: _SimState) -> web.StreamResponse:
    hooks = await _hooks_apply(request)
    forced_status = _int_header(request, HEADER_STATUS, 400, 599) if hooks else None
    if forced_status is not None:
        raise _status_error(forced_status, f"forced by {HEADER_STATUS}")
    forced_tokens = _int_header(request, HEADER_COMPLETION_TOKENS, 0) if hooks else None
    fixed_ms = _int_header(request, HEADER_LATENCY_MS, 0) if hooks else None
    omit_usage = hooks and request.headers.get(HEADER_OMIT_USAGE, "").strip().lower() in {
        "1", "true", "yes",
    }  # fmt: skip
    forced_content = request.headers.get(HEADER_CONTENT) if hooks else None

    raw = await request.read()
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise _RequestError(400, "The request body is not valid JSON.") from None
    if not isinstance(body, dict):
        raise _RequestError(400, "The request body must be a JSON object.")

    model_name = body.get("model")
    if not isinstance(model_name, str) or not model_name:
        raise _RequestError(400, "You must provide a model parameter.", param="model")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _RequestError(
            400, "'messages' must be a non-empty array of messages.", param="messages"
        )
    model = state.models.get(model_name)
    if model is None:
        raise _unknown_model(model_name)
    n_choices = body.get("n", 1)
    if n_choices is None:
        n_choices = 1
    if isinstance(n_choices, bool) or not isinstance(n_choices, int) or not 1 <= n_choices <= 128:
        raise _RequestError(400, "'n' must be an integer from 1 to 128.", param="n")
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise _RequestError(400, "'stream' must be a boolean.", param="stream")
    include_usage = False
    stream_options = body.get("stream_options")
    if stream_options is not None:
        if not isinstance(stream_options, dict):
            raise _RequestError(400, "'stream_options' must be an object.", param="stream_options")
        if not stream:
            raise _RequestError(
                400,
                "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
                param="stream_options",
            )
        include_usage = stream_options.get("include_usage") is True
    top_logprobs = _logprobs_param(body)
    limit = _positive_int_param(body, "max_completion_tokens")
    if limit is None:
        limit = _positive_int_param(body, "max_tokens")
    try:
        prompt_tokens = count_message_tokens(messages) + count_field_tokens(
            [body[k] for k in PROMPT_FIELDS if body.get(k)]
        )
    except ValueError as exc:
        raise _RequestError(400, str(exc), param="messages") from None

    cfg = state.config
    if cfg.error_rate > 0 and state.rng.random() < cfg.error_rate:
        raise _status_error(429 if state.rng.random() < 0.5 else 500, "simulated error")

    digest = hashlib.blake2b(orjson.dumps(messages), digest_size=16).digest()
    cap = model.max_output_tokens if limit is None else min(limit, model.max_output_tokens)
    tool = _tool_to_call(body, messages)
    tool_call: dict[str, Any] | None = None
    wants_json = isinstance(body.get("response_format"), dict)
    seed_words = (
        state.filler.words(24, int.from_bytes(digest[8:12], "little"))
        if tool is not None or wants_json
        else []
    )
    words: list[str]
    if tool is not None:
        arguments = json.dumps(
            _json_example(tool.get("parameters"), tool.get("parameters"), seed_words)
        )
        tool_call = {
            "id": "call_" + digest.hex()[:24],
            "type": "function",
            "function": {"name": tool["name"], "arguments": arguments},
        }
    elif forced_content is None:
        forced_content = _json_content(body.get("response_format"), seed_words)
    if tool is not None:
        words = []
        completion_tokens = count_tokens(tool["name"]) + count_tokens(arguments)
        finish_reason = "tool_calls"
    elif forced_content is not None:  # the words as given, cut at the cap like any answer
        words, spent = [], 0
        for word in forced_content.split():
            if spent + count_tokens(word) > cap:
                break
            words.append(word)
            spent += count_tokens(word)
        completion_tokens = spent
        finish_reason = "length" if count_tokens(forced_content) > cap else "stop"
    else:
        natural = forced_tokens if forced_tokens is not None else state.natural_length(digest)
        completion_tokens = min(natural, cap)
        finish_reason = "length" if natural > cap else "stop"
        words = state.filler.words(completion_tokens, int.from_bytes(digest[8:12], "little"))
    # n choices: each its own answer of the same length (max_tokens caps each), all billed.
    usage = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens * n_choices,
        "total_tokens": prompt_tokens + completion_tokens * n_choices,
        "prompt_tokens_details": {"cached_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0},
    }
    completion_id = next(state.ids)
    created = int(time.time())

    if stream:
        return await _stream(
            request,
            state,
            completion_id=completion_id,
            created=created,
            model=model.name,
            words=words,
            finish_reason=finish_reason,
            usage=usage if include_usage and not omit_usage else None,
            fixed_ms=fixed_ms,
            choices=n_choices,
            tool_call=tool_call,
            top_logprobs=top_logprobs,
        )

    text = " ".join(words)
    logprobs = (
        None
        if top_logprobs is None
        else {
            "content": None if tool_call is not None else _token_logprobs(text, top_logprobs),
            "refusal": None,
        }
    )
    ttft_s, per_token_s = state.delays(fixed_ms, completion_tokens)
    delay = ttft_s + per_token_s * completion_tokens
    if fixed_ms is None:
        delay = min(delay, cfg.max_latency_ms / 1000.0)
    if delay > 0:
        await asyncio.sleep(delay)
    payload = {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": model.name,
        "choices": [
            {
                "index": index,
                "message": (
                    {
                        "role": "assistant",
                        "content": None,
                        "tool_calls": [tool_call],
                        "refusal": None,
                    }
                    if tool_call is not None
                    else {"role": "assistant", "content": text, "refusal": None}
                ),
                "logprobs": logprobs,
                "finish_reason": finish_reason,
            }
            for index in range(n_choices)
        ],
        "usage": usage,
        "system_fingerprint": _SYSTEM_FINGERPRINT,
    }
    if omit_usage:
        del payload["usage"]
    return web.Response(body=orjson.dumps(payload), content_type=_JSON)


def _logprob(token: str, rank: int = 0) -> float:
    """A deterministic log-probability in [-4, 0) for ``token`` (lower for a lower ``rank``)."""
    digest = hashlib.blake2b(f"{rank}:{token}".encode(), digest_size=4).digest()
    return -round(0.001 + int.from_bytes(digest, "little") % 1000 / 250 + rank, 4)


def _token_logprobs(text: str, top: int) -> list[dict[str, Any]]:
    """OpenAI's ``logprobs.content`` entries for ``text``: one per word, with its leading
    space (so a stream's deltas give the same entries as the whole answer)."""
    entries = []
    for token in re.findall(r"\s*\S+", text):
        alternatives = [token] + [f"{token}{rank}" for rank in range(1, top)]
        entries.append(
            {
                "token": token,
                "logprob": _logprob(token),
                "bytes": list(token.encode()),
                "top_logprobs": [
                    {"token": alt, "logprob": _logprob(token, rank), "bytes": list(alt.encode())}
                    for rank, alt in enumerate(alternatives[:top])
                ],
            }
        )
    return entries


def _logprobs_param(body: dict[str, Any]) -> int | None:
    """How many alternatives each token's logprobs list (None: no logprobs asked)."""
    wanted, top = body.get("logprobs"), body.get("top_logprobs")
    if wanted is not None and not isinstance(wanted, bool):
        raise _RequestError(400, "'logprobs' must be a boolean.", param="logprobs")
    if top is not None and (
        isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= 20
    ):
        raise _RequestError(
            400, "'top_logprobs' must be an integer from 0 to 20.", param="top_logprobs"
        )
    if top is not None and not wanted:
        raise _RequestError(
            400, "'top_logprobs' is only allowed when 'logprobs' is true.", param="top_logprobs"
        )
    return (top or 0) if wanted else None


def _sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


async def _stream(
    request: web.Request,
    state: _SimState,
    *,
    completion_id: str,
    created: int,
    model: str,
    words: list[str],
    finish_reason: str,
    usage: dict[str, Any] | None,
    fixed_ms: int | None,
    choices: int = 1,
    tool_call: dict[str, Any] | None = None,
    top_logprobs: int | None = None,
) -> web.StreamResponse:
    pieces = _chunk_pieces(words)
    first_tokens = pieces[0][1] if pieces else 0
    ttft_s, per_token_s = state.delays(fixed_ms, sum(t for _, t in pieces) - first_tokens)

    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        out = b""
        text = delta.get("content")
        logprobs = (
            {"content": _token_logprobs(text, top_logprobs), "refusal": None}
            if top_logprobs is not None and text
            else None
        )
        for index in range(choices):  # one chunk per choice, as OpenAI interleaves them
            payload: dict[str, Any] = {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "system_fingerprint": _SYSTEM_FINGERPRINT,
                "choices": [
                    {
                        "index": index,
                        "delta": delta,
                        "logprobs": logprobs,
                        "finish_reason": finish,
                    }
                ],
            }
            if usage is not None:
                payload["usage"] = None  # as OpenAI does on every chunk when usage is requested
            out += _sse(payload)
        return out

    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream; charset=utf-8",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",
        }
    )
    loop = asyncio.get_running_loop()
    try:
        await response.prepare(request)
        deadline = loop.time() + ttft_s
        buffer = bytearray()
        if ttft_s > 0:
            await asyncio.sleep(ttft_s)
        if tool_call is not None:  # the call's head, then its arguments in a few pieces
            function = tool_call["function"]
            head = {
                **tool_call,
                "index": 0,
                "function": {"name": function["name"], "arguments": ""},
            }
            buffer += chunk({"role": "assistant", "content": None, "tool_calls": [head]})
            arguments = function["arguments"]
            step = max(1, len(arguments) // 4)
            for start in range(0, len(arguments), step):
                part = {"index": 0, "function": {"arguments": arguments[start : start + step]}}
                buffer += chunk({"tool_calls": [part]})
        else:
            buffer += chunk({"role": "assistant", "content": "", "refusal": None})
        for index, (text, tokens) in enumerate(pieces):
            if index and per_token_s > 0:
                deadline += tokens * per_token_s
                delay = deadline - loop.time()
                if delay > 0:
                    if buffer:
                        await response.write(bytes(buffer))
                        buffer.clear()
                    await asyncio.sleep(delay)
            buffer += chunk({"content": text})
        buffer += chunk({}, finish_reason)
        if usage is not None:
            buffer += _sse(
                {
                    "id": completion_id,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": model,
                    "system_fingerprint": _SYSTEM_FINGERPRINT,
                    "choices": [],
                    "usage": usage,
                }
            )
        buffer += _SSE_DONE
        await response.write(bytes(buffer))
        await response.write_eof()
    except ConnectionError:
        # The client went away mid-stream (aiohttp raises ClientConnectionResetError,
        # a ConnectionResetError): a normal event for a streaming server, not worth a log.
        # asyncio.CancelledError (server shutdown) is left to propagate on purpose.
        log.debug("client disconnected from stream %s", completion_id)
    return response


@web.middleware
async def _openai_route_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """An endpoint the simulator does not serve, or a wrong method, answered as OpenAI does
    (``Invalid URL (POST /v1/embeddings)`` in its JSON error shape), not aiohttp's plain text
    that the SDK cannot parse."""
    try:
        return await handler(request)
    except web.HTTPMethodNotAllowed as exc:
        allowed = ", ".join(sorted(exc.allowed_methods))
        where = f"{request.method} {request.path}"
        return _RequestError(
            405, f"Invalid method ({where}); this route takes {allowed}"
        ).response()
    except web.HTTPNotFound:
        return _RequestError(404, f"Invalid URL ({request.method} {request.path})").response()


def create_app(config: SimulatorConfig | None = None) -> web.Application:
    """The simulator's aiohttp application (not yet started)."""
    app = web.Application(client_max_size=64 * 1024 * 1024, middlewares=[_openai_route_errors])
    app[_STATE] = _SimState(config or SimulatorConfig())
    app.router.add_get("/v1/models", _list_models)
    app.router.add_get("/v1/models/{model}", _get_model)
    app.router.add_post("/v1/chat/completions", _chat_completions)
    app.router.add_get("/healthz", _healthz)
    return app


async def serve(host: str, port: int, config: SimulatorConfig | None = None) -> None:
    """Serve the simulator on ``host:port`` until cancelled, then clean up the runner."""
    runner = web.AppRunner(create_app(config), access_log=None, shutdown_timeout=2.0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, backlog=1024)
        await site.start()
        addresses = ", ".join(f"{a[0]}:{a[1]}" for a in runner.addresses)
        log.info("upstream simulator listening on %s", addresses)
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
