"""Usage records: the one place a call's tokens become a priced ``Usage`` event.

Used by the dispatcher, by ``POST /v1/usage`` and by :class:`UsageProducer`,
the helper for services that write to Kafka themselves, so a call costs the
same whichever way it is reported::

    producer = UsageProducer(Settings())          # TOLLGATE_* settings
    await producer.start()
    await producer.report(model="gpt-4o", prompt_tokens=812, completion_tokens=95,
                          user_id="alice", feature="search")
    await producer.stop()

The helper sends synchronously to Kafka (``acks=all``, idempotent) and raises
if Kafka does not acknowledge: unlike the dispatcher it has no spool, so the
caller decides whether to retry or fall back to ``POST /v1/usage``. The message
itself (topic, ``user_id`` key, framing) is built as the dispatcher builds it:
``app.events.producer.usage_message``.
"""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime
from typing import Any

from app.events import clients
from app.events.codec import EventCodec, build_codec
from app.events.producer import send_now, usage_message
from app.ids import ESCALATED_PREFIX as ESCALATED_PREFIX  # re-exported: the event's vocabulary
from app.metering.attribution import Identity
from app.pricing.catalog import PriceCatalog
from app.settings import Settings

GATEWAY_REQUEST_ID = re.compile(r"req_[0-9a-f]{32}")
"""The request ids the gateway gives its calls (``new_id("req_")``)."""


def new_id(prefix: str = "") -> str:
    return prefix + uuid.uuid4().hex


def usage_event_id(request_id: str, attempt: int = 1) -> str:
    """The event id of the usage of one upstream attempt of a gateway request.

    Derived, not random: the usage the dispatcher emits and the estimate the
    spend worker emits for a request whose dispatcher died carry the same id, so
    every consumer counts whichever reached Kafka first, and only that one.
    """
    return uuid.uuid5(uuid.NAMESPACE_URL, f"tollgate:usage:{request_id}:{attempt}").hex


def reported_event_id(user_id: str, request_id: str) -> str:
    """The event id of a call reported to ``POST /v1/usage`` (or replayed from a trace)
    under the client's ``request_id``: a retry of the record counts once. The id is the
    user's: two users' records under one request id (services numbering their jobs alike,
    "job-42") are two calls. It was the request id's alone, so the second record shared
    the first's event id, and every consumer kept whichever it saw first: a record
    acknowledged with its cost counted nowhere, or charged to a budget and missing from the
    warehouse (a fault probe).

    A call the gateway served (its ``X-Request-Id``, ``req_`` and 32 hex digits) keeps the
    id of that call's own usage event, whoever reports it: every consumer counts the call
    once, at a dispatcher that does not know the id (another replica, after a restart) too
    (a reviewer)."""
    if GATEWAY_REQUEST_ID.fullmatch(request_id):
        return usage_event_id(request_id)
    return uuid.uuid5(uuid.NAMESPACE_URL, f"tollgate:reported:{user_id}:{request_id}").hex


def attempt_key(request_id: str, attempt: int = 1) -> str:
    """The key of one upstream attempt of a gateway request among requests awaiting their usage
    (the spend worker's open requests): the request id for the first, ``<id>#<n>`` after it."""
    return request_id if attempt <= 1 else f"{request_id}#{attempt}"


def event_time(ts: datetime | None = None) -> datetime:
    """Event time as stored (UTC, whole milliseconds)."""
    ts = ts or datetime.now(UTC)
    return ts.replace(microsecond=ts.microsecond - ts.microsecond % 1000)


def attribution_fields(identity: Identity) -> dict[str, str | None]:
    """The attribution every event carries (Request and Usage share these fields)."""
    return {
        "user_id": identity.user_id,
        "session_id": identity.session_id,
        "feature": identity.feature,
        "team": identity.team,
        "api_key_id": identity.api_key_id,
    }


def build_usage_record(
    prices: PriceCatalog,
    identity: Identity,
    *,
    request_id: str,
    model: str,
    prompt_tokens: int,
    completion_tokens: int,
    cached_tokens: int = 0,
    provider: str | None = None,
    model_requested: str | None = None,
    source: str = "dispatcher",
    ts: datetime | None = None,
    cache_hit: bool = False,
    requested_price_model: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """A ``Usage`` record with cost, baseline cost and savings in nano-dollars.

    The savings decompose exactly: baseline - cost = (baseline - requested)
    [model choice] + (requested - undiscounted served) [routing] + prompt-cache
    discount + cache saving, where "requested" is ``requested_cost_usd_nanos``.
    A cache hit (a cache answered; no provider call) costs 0 and saves what the
    served model would have charged. ``requested_price_model``: the model whose list price
    is the requested cost when ``model_requested`` is not a priced model (a routed
    ``"auto"`` call: the router's top tier).
    """
    cost = prices.cost(model, prompt_tokens, completion_tokens, cached_tokens)
    cost_nanos, prompt_cache_saved, cache_saved = (
        cost.cost_usd_nanos,
        cost.prompt_cache_saved_usd_nanos,
        0,
    )
    if cache_hit and not cost.price_unknown:
        cache_saved = cost_nanos + prompt_cache_saved
        cost_nanos = prompt_cache_saved = 0
    requested = model_requested or model
    priced_as = requested_price_model or requested
    requested_cost = (
        cost_nanos + prompt_cache_saved + cache_saved
        if priced_as == model and not cost.price_unknown
        else prices.list_price_nanos(priced_as, prompt_tokens, completion_tokens)
    )
    return {
        "event_id": new_id(),
        "ts": event_time(ts),
        "request_id": request_id,
        **attribution_fields(identity),
        "source": source,
        "provider": provider,
        "model_requested": requested,
        "model_served": model,
        "tier": cost.tier,
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "cached_tokens": cached_tokens,
        "cost_usd_nanos": cost_nanos,
        "baseline_cost_usd_nanos": cost.baseline_cost_usd_nanos,
        "baseline_model": prices.baseline_model,
        "cache_saved_usd_nanos": cache_saved,
        "prompt_cache_saved_usd_nanos": prompt_cache_saved,
        "requested_cost_usd_nanos": requested_cost,
        "price_unknown": cost.price_unknown,
        "cache_hit": cache_hit,
        **extra,
    }


class UsageProducer:
    """Produce priced ``Usage`` events straight to Kafka (same schema and prices as the gateway)."""

    def __init__(
        self,
        settings: Settings,
        *,
        prices: PriceCatalog | None = None,
        codec: EventCodec | None = None,
    ) -> None:
        self.settings = settings
        self.prices = prices or PriceCatalog(settings.baseline_model, settings.price_overrides_file)
        self.codec = codec or build_codec(settings.schema_registry_url)
        self._producer = clients.producer(settings, purpose="usage-producer")

    async def start(self) -> None:
        await self._producer.start()

    async def stop(self) -> None:
        await self._producer.stop()

    async def report(
        self,
        *,
        model: str,
        prompt_tokens: int,
        completion_tokens: int,
        user_id: str,
        cached_tokens: int = 0,
        session_id: str | None = None,
        feature: str | None = None,
        team: str | None = None,
        request_id: str | None = None,
        ts: datetime | None = None,
        provider: str | None = None,
        latency_ms: int = 0,
        metadata: dict[str, str] | None = None,
        model_requested: str | None = None,
        cache_hit: bool = False,
    ) -> dict[str, Any]:
        """Price and send one call's usage; returns the record once Kafka acknowledged it."""
        for name, value in (
            ("prompt_tokens", prompt_tokens),
            ("completion_tokens", completion_tokens),
            ("cached_tokens", cached_tokens),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        if cached_tokens > prompt_tokens:
            raise ValueError("cached_tokens cannot exceed prompt_tokens")
        if not user_id:
            raise ValueError("user_id is required: usage without a user cannot be capped")
        record = build_usage_record(
            self.prices,
            Identity(user_id, session_id, feature, team),
            request_id=request_id or new_id("ext_"),
            model=model,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            cached_tokens=cached_tokens,
            provider=provider,
            model_requested=model_requested,
            cache_hit=cache_hit,
            source="external",
            ts=ts,
            latency_ms=latency_ms,
            metadata=metadata or {},
        )
        acknowledged = await send_now(
            self._producer, usage_message(self.settings, self.codec, record)
        )
        await acknowledged
        return record
