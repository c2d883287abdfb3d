"""Spend this dispatcher emitted that the spend worker has not counted yet, matched by identity.

Owns one invariant: every usage event a dispatcher emits is counted at its gate
exactly once — by the worker's decision, or here, never both and never
neither. Each event is held from the moment it is spooled (by spool sequence)
until Kafka acknowledges where it landed (partition, offset), and dropped as
soon as a decision of the current period counts through that offset
(``counted_offsets``). Totals per scope are kept incrementally, so admission
costs O(1) however much is held.

If decisions stop arriving (the worker is down or far behind) and a scope holds
more than ``entries_max`` events, its oldest half is merged into one entry that
keeps every sequence it still waits for and the highest offset per partition,
and is dropped only when a decision counts all of it. Held spend stays bounded
and is never dropped early; the price is that, until then, the part of a merge
the worker has already counted is counted twice (conservative: a scope may be
blocked early, never overspent). ``merges`` counts how often it happened.
Does not own admission (``gate.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

DEFAULT_ENTRIES_MAX = 16_384


@dataclass(eq=False)
class Held:
    nanos: int
    ts_ms: int
    scopes: list[str]
    waiting: set[int] = field(default_factory=set)  # spool sequences Kafka has not acked yet
    offsets: dict[int, int] = field(default_factory=dict)  # partition -> highest offset

    def counted_by(self, counted: Mapping[int, int]) -> bool:
        if self.waiting or not self.offsets:
            return False
        return all(counted.get(p, -1) > o for p, o in self.offsets.items())


def counted_offsets(decision: Mapping[str, Any] | None) -> dict[int, int]:
    if not decision:
        return {}
    return {int(p): int(o) for p, o in (decision.get("counted_offsets") or {}).items()}


class PendingSpend:
    def __init__(self, entries_max: int = DEFAULT_ENTRIES_MAX) -> None:
        self.entries_max = max(entries_max, 2)
        self._held: dict[str, dict[int, Held]] = {}  # scope -> id(entry) -> entry
        self._sums: dict[str, int] = {}
        self._period_start_ms: dict[str, int] = {}
        self._by_seq: dict[int, list[Held]] = {}  # an event's entry, and merges that hold it
        self.merges = 0

    def hold(
        self,
        scopes: list[str],
        nanos: int,
        ts_ms: int,
        seq: int | None,
        offsets: dict[int, int] | None = None,
    ) -> None:
        if not scopes or not nanos:
            return
        entry = Held(nanos, ts_ms, list(scopes), offsets=dict(offsets or {}))
        if seq is not None:
            entry.waiting.add(seq)
            self._by_seq[seq] = [entry]
        for scope in scopes:
            held = self._held.setdefault(scope, {})
            held[id(entry)] = entry
            self._sums[scope] = self._sums.get(scope, 0) + nanos
            if len(held) > self.entries_max:
                self._merge_oldest(scope)

    def hold_delivered(
        self,
        scopes: list[str],
        nanos: int,
        ts_ms: int,
        partition: int,
        offset: int,
        counted_for: Callable[[str], Mapping[int, int]],
    ) -> None:
        """Spend already in Kafka at (partition, offset), held for the scopes whose current
        decisions do not count through it yet (a restart's catch-up)."""
        probe = Held(nanos, ts_ms, [], offsets={partition: offset})
        uncounted = [scope for scope in scopes if not probe.counted_by(counted_for(scope))]
        self.hold(uncounted, nanos, ts_ms, None, offsets={partition: offset})

    def delivered(
        self,
        seq: int,
        partition: int,
        offset: int,
        counted_for: Callable[[str], Mapping[int, int]],
    ) -> None:
        """Kafka acknowledged sequence ``seq`` at (partition, offset); ``counted_for(scope)``
        gives the offsets the scope's current-period decision counts through."""
        for entry in self._by_seq.pop(seq, ()):
            entry.waiting.discard(seq)
            entry.offsets[partition] = max(offset, entry.offsets.get(partition, -1))
            for scope in list(entry.scopes):
                if entry.counted_by(counted_for(scope)):
                    self._drop(scope, entry)

    def counted(self, scope: str, counted: Mapping[int, int]) -> None:
        """A decision of the current period counts through ``counted``: drop what it covers."""
        held = self._held.get(scope)
        if not held or not counted:
            return
        for entry in [e for e in held.values() if e.counted_by(counted)]:
            self._drop(scope, entry)

    def total(self, scope: str, start_ms: int) -> int:
        """What ``scope`` holds for the period starting at ``start_ms`` (entries of earlier
        periods are dropped when a new period is first asked for)."""
        if self._period_start_ms.get(scope) != start_ms:
            self._period_start_ms[scope] = start_ms
            for entry in [e for e in self._held.get(scope, {}).values() if e.ts_ms < start_ms]:
                self._drop(scope, entry)
        return self._sums.get(scope, 0)

    def oldest_uncounted_ms(self, capped: Callable[[str], bool] | None = None) -> int | None:
        """The event time of the oldest spend Kafka acknowledged that no decision has counted
        yet: while the spend worker counts, seconds old; when it is down, ever older.
        ``capped``: the scopes to look at (a scope whose cap was removed gets no decision)."""
        oldest: int | None = None
        for scope, held in self._held.items():
            if capped is not None and not capped(scope):
                continue
            for entry in held.values():  # in the order held: the first delivered is the oldest
                if not entry.waiting and entry.offsets:
                    oldest = entry.ts_ms if oldest is None else min(oldest, entry.ts_ms)
                    break
        return oldest

    def entries(self, scope: str) -> int:
        return len(self._held.get(scope, {}))

    def _drop(self, scope: str, entry: Held) -> None:
        held = self._held.get(scope)
        if held is None or held.pop(id(entry), None) is None:
            return
        entry.scopes.remove(scope)
        self._sums[scope] -= entry.nanos
        if not held:
            del self._held[scope]
            del self._sums[scope]

    def _merge_oldest(self, scope: str) -> None:
        self.merges += 1
        held = self._held[scope]
        oldest = list(held.values())[: len(held) // 2]
        merged = Held(sum(e.nanos for e in oldest), max(e.ts_ms for e in oldest), [scope])
        for entry in oldest:
            self._drop(scope, entry)
            merged.waiting |= entry.waiting
            for p, o in entry.offsets.items():
                merged.offsets[p] = max(o, merged.offsets.get(p, -1))
        for seq in merged.waiting:
            # Acks of the merged events reach the merged entry too; the originals still held by
            # other scopes keep getting them.
            waiting = [e for e in self._by_seq.get(seq, []) if e.scopes]
            self._by_seq[seq] = [*waiting, merged]
        self._held.setdefault(scope, {})[id(merged)] = merged
        self._sums[scope] = self._sums.get(scope, 0) + merged.nanos
