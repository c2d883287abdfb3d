"""Where cached answers live: the :class:`CacheBackend` protocol and the in-process LRU.

Owns storage only: expiry (TTL, by an injectable clock), the memory bound in bytes with
least-recently-used eviction, and hit/miss/eviction counts. It does not own what is
cacheable or the key (:mod:`app.cache.key`), nor replay (:mod:`app.cache.replay`).

The protocol is async so that a shared backend (Redis, memcached, a ClickHouse table)
can implement it without blocking the event loop; :class:`MemoryCache` is the single
-process implementation. With several dispatchers, each holds its own MemoryCache: the
same prompt is then answered upstream once per replica, and memory is spent once per
replica. A shared backend removes both (see docs/SAVINGS.md).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

ENTRY_OVERHEAD_BYTES = 256  # dict slot, entry object, timestamps: counted against max_bytes


@dataclass(frozen=True, slots=True)
class CachedAnswer:
    """One stored answer: the upstream's non-streamed ``chat.completion`` body and facts."""

    body: bytes
    model: str  # the model that served it (its price is the cost a hit avoids)
    prompt_tokens: int
    completion_tokens: int
    stored_at: float = 0.0  # clock seconds; set by the backend
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def size_bytes(self) -> int:
        return len(self.body) + len(self.model) + ENTRY_OVERHEAD_BYTES


class CacheBackend(Protocol):
    async def get(self, key: str, *, max_age_s: float | None = None) -> CachedAnswer | None:
        """The fresh answer under ``key`` (at most ``max_age_s`` old, if given), or None."""
        ...

    async def put(self, key: str, answer: CachedAnswer, *, ttl_s: float) -> bool:
        """Store ``answer`` for ``ttl_s`` seconds; False when it is not stored (too big)."""
        ...

    async def delete(self, key: str) -> None: ...


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    stores: int = 0
    evictions: int = 0
    expirations: int = 0
    rejected_too_big: int = 0


class MemoryCache:
    """An in-process cache bounded in bytes, LRU-evicted, with a TTL per entry."""

    def __init__(
        self,
        max_bytes: int,
        *,
        max_entry_bytes: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_bytes = max_bytes
        self.max_entry_bytes = min(max_entry_bytes or max_bytes, max_bytes)
        self.clock = clock
        self.stats = CacheStats()
        self._entries: OrderedDict[str, tuple[CachedAnswer, float, int]] = OrderedDict()
        self._bytes = 0

    @property
    def bytes_used(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    async def get(self, key: str, *, max_age_s: float | None = None) -> CachedAnswer | None:
        entry = self._entries.get(key)
        if entry is None:
            self.stats.misses += 1
            return None
        answer, expires_at, _ = entry
        now = self.clock()
        if now >= expires_at:
            self._remove(key)
            self.stats.expirations += 1
            self.stats.misses += 1
            return None
        if max_age_s is not None and now - answer.stored_at > max_age_s:
            self.stats.misses += 1  # too old for this client; others may still use it
            return None
        self._entries.move_to_end(key)
        self.stats.hits += 1
        return answer

    async def put(self, key: str, answer: CachedAnswer, *, ttl_s: float) -> bool:
        size = answer.size_bytes + len(key)
        if size > self.max_entry_bytes:
            self.stats.rejected_too_big += 1
            return False
        if key in self._entries:
            self._remove(key)
        now = self.clock()
        stored = CachedAnswer(
            answer.body, answer.model, answer.prompt_tokens, answer.completion_tokens,
            now, answer.meta,
        )  # fmt: skip
        while self._bytes + size > self.max_bytes and self._entries:
            oldest = next(iter(self._entries))
            self._remove(oldest)
            self.stats.evictions += 1
        self._entries[key] = (stored, now + ttl_s, size)
        self._bytes += size
        self.stats.stores += 1
        return True

    async def delete(self, key: str) -> None:
        if key in self._entries:
            self._remove(key)

    def _remove(self, key: str) -> None:
        _, _, size = self._entries.pop(key)
        self._bytes -= size
