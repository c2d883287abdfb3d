"""What may be cached, for whom, and under which key.

Owns the canonical key of a request (a SHA-256 of the body minus
``cache.ignored_fields``, serialised with sorted keys, so key order and ignored fields do
not matter and every other byte does), the cacheability rule (temperature 0 only, unless
the feature opts in), tenant isolation (team, else API key, else user; ``shareable``
features share per feature), and ``Cache-Control`` request directives. It does not own
storage (:mod:`app.cache.store`) or HTTP (the dispatcher reads the header and sets
``X-Tollgate-Cache``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import orjson

from app.cache.config import CacheSettings

OPENAI_DEFAULT_TEMPERATURE = 1.0
KEY_VERSION = b"v2"  # v2: integral top-level numbers written as integers. Bump when the canonical form changes: old entries then never match


@dataclass(frozen=True, slots=True)
class CacheControl:
    """Request ``Cache-Control`` directives the cache honours."""

    no_cache: bool = False  # do not answer from the cache (a fresh answer may be stored)
    no_store: bool = False  # do not answer from the cache and do not store this answer
    max_age_s: float | None = None  # answer only from entries at most this old


def parse_cache_control(header: str | None) -> CacheControl:
    """Parse a request's Cache-Control header; unknown directives are ignored (RFC 9111)."""
    if not header:
        return CacheControl()
    no_cache = no_store = False
    max_age: float | None = None
    for part in header.split(","):
        name, _, value = part.strip().partition("=")
        name = name.strip().lower()
        value = value.strip().strip('"')
        if name == "no-cache":
            no_cache = True
        elif name == "no-store":
            no_store = True
        elif name == "max-age":
            try:
                seconds = int(value)
            except ValueError:
                continue  # an invalid max-age is ignored, as caches do
            if seconds >= 0:
                max_age = float(seconds) if max_age is None else min(max_age, float(seconds))
    if max_age == 0:
        no_cache = True
    return CacheControl(no_cache=no_cache, no_store=no_store, max_age_s=max_age)


def tenant_of(
    *,
    team: str | None,
    api_key_id: str | None,
    user_id: str | None,
    feature: str | None,
    shareable: bool,
) -> str:
    """The isolation domain of a cached answer: nobody reads another tenant's answers."""
    if shareable:
        return f"shared-feature:{feature or ''}"
    if team:
        return f"team:{team}"
    if api_key_id:
        return f"key:{api_key_id}"
    return f"user:{user_id or ''}"


def canonical_body(body: Mapping[str, Any], ignored_fields: tuple[str, ...]) -> bytes:
    """The body as canonical JSON: ignored fields dropped, object keys sorted at all depths,
    and a top-level number written one way (``temperature: 0.0`` is ``0``: the same request)."""
    kept = {
        name: int(value) if isinstance(value, float) and value.is_integer() else value
        for name, value in body.items()
        if name not in ignored_fields
    }
    try:
        return orjson.dumps(kept, option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS)
    except orjson.JSONEncodeError:
        # A number past 64 bits (JSON sets no limit; `seed: 2**70` was a 500 here, a probe)
        # or a lone surrogate (JSON's "\ud800" escape; orjson writes UTF-8 only): the
        # standard library writes both (as ASCII). Such a body always takes this path, so
        # its key is still one.
        return json.dumps(kept, sort_keys=True, separators=(",", ":"), default=str).encode()


def cache_key(
    tenant: str,
    body: Mapping[str, Any],
    ignored_fields: tuple[str, ...],
    headers: Sequence[tuple[str, str]] = (),
) -> str:
    """``headers``: the client's headers sent on to the provider (lowercase name, value),
    which can change the answer (OpenAI-Project, OpenAI-Beta); none leaves the key as it
    was before they counted."""
    digest = hashlib.sha256(KEY_VERSION)
    digest.update(b"\0" + tenant.encode() + b"\0")
    digest.update(canonical_body(body, ignored_fields))
    if headers:
        digest.update(b"\0headers\0" + json.dumps(sorted(headers)).encode())
    return digest.hexdigest()


def effective_temperature(body: Mapping[str, Any]) -> float:
    value = body.get("temperature")
    if value is None:
        return OPENAI_DEFAULT_TEMPERATURE
    if isinstance(value, bool) or not isinstance(value, int | float):
        return OPENAI_DEFAULT_TEMPERATURE  # not a number: the provider will reject it anyway
    return float(value)


@dataclass(frozen=True, slots=True)
class CacheLookup:
    """What the cache may do with one request. ``status`` is the X-Tollgate-Cache value
    when the answer is not found (``miss``) or the cache is not consulted (``bypass``)."""

    status: Literal["lookup", "bypass"]
    reason: str
    key: str | None = None
    store: bool = False  # store the fresh answer under ``key``
    max_age_s: float | None = None
    ttl_s: float = 0.0


def plan_lookup(
    settings: CacheSettings,
    body: Mapping[str, Any],
    *,
    feature: str | None,
    team: str | None,
    api_key_id: str | None,
    user_id: str | None,
    cache_control: CacheControl = CacheControl(),
    headers: Sequence[tuple[str, str]] | Callable[[], Sequence[tuple[str, str]]] = (),
) -> CacheLookup:
    """Decide whether a request is looked up, stored, or bypasses the cache, and its key.

    ``headers`` (see :func:`cache_key`) may be a function that works them out: it is called
    only when the plan has a key, not for a request that bypasses the cache."""
    rule = settings.rule_for(feature)
    if not settings.enabled or not rule.enabled:
        return CacheLookup("bypass", "cache disabled for this feature")
    if cache_control.no_store:
        return CacheLookup("bypass", "Cache-Control: no-store")
    if effective_temperature(body) > 0 and not rule.cache_sampled:
        return CacheLookup(
            "bypass",
            "temperature > 0 (no temperature means the default 1): a sampled answer is not "
            "reused unless the feature sets cache_sampled",
        )
    tenant = tenant_of(
        team=team, api_key_id=api_key_id, user_id=user_id, feature=feature,
        shareable=rule.shareable,
    )  # fmt: skip
    key = cache_key(
        tenant, body, settings.ignored_fields, headers() if callable(headers) else headers
    )
    ttl = rule.ttl_s or settings.ttl_s
    if cache_control.no_cache:
        return CacheLookup(
            "bypass", "Cache-Control: no-cache (the fresh answer is stored)", key, True, None, ttl
        )
    return CacheLookup("lookup", "cacheable", key, True, cache_control.max_age_s, ttl)
