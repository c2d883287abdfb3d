"""The response cache: exact repeats answered without calling the provider.

- :mod:`app.cache.config` -- settings and per-feature rules (``Settings.cache``).
- :mod:`app.cache.key` -- cacheability, tenant isolation, canonical keys, Cache-Control.
- :mod:`app.cache.store` -- the :class:`~app.cache.store.CacheBackend` protocol and the
  in-process :class:`~app.cache.store.MemoryCache` (TTL, byte bound, LRU).
- :mod:`app.cache.replay` -- a cached answer replayed as an SSE stream.

The dispatcher (not this package) reads headers, calls these, sets ``X-Tollgate-Cache`` and
emits the events (a hit costs $0 and records the cost avoided).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from app.cache.config import CacheFeatureRule, CacheSettings
    from app.cache.key import (
        CacheControl,
        CacheLookup,
        cache_key,
        parse_cache_control,
        plan_lookup,
    )
    from app.cache.replay import sse_replay
    from app.cache.store import CacheBackend, CachedAnswer, MemoryCache

# Re-exported lazily, like app.routing: app.settings imports app.cache.config.
_EXPORTS = {
    "CacheBackend": "store",
    "CacheControl": "key",
    "CacheFeatureRule": "config",
    "CacheLookup": "key",
    "CacheSettings": "config",
    "CachedAnswer": "store",
    "MemoryCache": "store",
    "cache_key": "key",
    "parse_cache_control": "key",
    "plan_lookup": "key",
    "sse_replay": "replay",
}
__all__ = [
    "CacheBackend",
    "CacheControl",
    "CacheFeatureRule",
    "CacheLookup",
    "CacheSettings",
    "CachedAnswer",
    "MemoryCache",
    "cache_key",
    "parse_cache_control",
    "plan_lookup",
    "sse_replay",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'app.cache' has no attribute {name!r}")
    return getattr(importlib.import_module(f"app.cache.{module}"), name)
