"""MemoryCache's accounting under any sequence of puts, gets, deletes and clock moves.

A hypothesis state machine keeps a model of what must be there (entries, expiry, recency)
and checks after every step: bytes used = the sum of the live entries' sizes, never above
the bound; a get never returns an expired entry or another key's answer; eviction only
removes least recently used entries; nothing fresh disappears while there is room.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from app.cache import CachedAnswer, MemoryCache

KEYS = st.sampled_from([f"k{i}" for i in range(8)])
MAX_BYTES = 4000


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _run(coroutine):  # type: ignore[no-untyped-def]
    return asyncio.run(coroutine)


class CacheMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.clock = Clock()
        self.cache = MemoryCache(MAX_BYTES, max_entry_bytes=2000, clock=self.clock)
        # the model: key -> (body, expires_at, size), in recency order (oldest first)
        self.model: OrderedDict[str, tuple[bytes, float, int]] = OrderedDict()

    @rule(key=KEYS, size=st.integers(0, 2500), ttl=st.floats(0.5, 100), tag=st.integers(0, 9))
    def put(self, key: str, size: int, ttl: float, tag: int) -> None:
        body = bytes([tag]) * size
        answer = CachedAnswer(body, "m", 1, 1)
        entry_size = answer.size_bytes + len(key)
        stored = _run(self.cache.put(key, answer, ttl_s=ttl))
        assert stored == (entry_size <= 2000)
        if not stored:
            return
        self.model.pop(key, None)
        while sum(s for _, _, s in self.model.values()) + entry_size > MAX_BYTES:
            self.model.popitem(last=False)  # the least recently used goes first
        self.model[key] = (body, self.clock.now + ttl, entry_size)

    @rule(key=KEYS)
    def get(self, key: str) -> None:
        got = _run(self.cache.get(key))
        expected = self.model.get(key)
        if expected is not None and self.clock.now >= expected[1]:
            del self.model[key]  # expired: the cache drops it on this read
            expected = None
        if expected is None:
            assert got is None
        else:
            assert got is not None and got.body == expected[0]
            self.model.move_to_end(key)

    @rule(key=KEYS)
    def delete(self, key: str) -> None:
        _run(self.cache.delete(key))
        self.model.pop(key, None)

    @rule(seconds=st.floats(0, 60))
    def advance(self, seconds: float) -> None:
        self.clock.now += seconds

    @invariant()
    def accounting(self) -> None:
        assert self.cache.bytes_used == sum(s for _, _, s in self.model.values())
        assert self.cache.bytes_used <= MAX_BYTES
        assert len(self.cache) == len(self.model)


CacheMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
TestMemoryCache = CacheMachine.TestCase
