"""The budget policies and decisions a dispatcher last saw, kept on disk.

Owns one file (``<state dir>/budget-view.json``) and what it means: at a start whose Kafka
does not answer, the gate begins from the caps and decisions it knew, instead of none. A
restart while the broker was frozen had no policy at all and served 80 of 80 calls of a user
over its cap (probe K). Records are kept as the Avro values the topics hold (base64), so
what is restored is what the views would have decoded. Written at most every
``SAVE_EVERY_S`` when something changed, and at a clean stop; a crash loses at most that
much of what changed (the next start reads Kafka when it answers).

It also keeps the spend the dispatcher holds at its gate that Kafka has and the spend worker
has not counted (``uncounted``: by usage event id, with its scopes, cost, time and where it
landed): a start without Kafka holds it again, else a user near a cap could spend again what
was spent before the restart while the worker was behind (a probe: twice the cap). An event
still in the spool is not kept here (the spool holds it), and one is dropped once no capped
scope of it waits for a decision to count it. At most ``UNCOUNTED_MAX`` events, the newest by
event time (a read-back adds older events after live ones: those go first).
"""

from __future__ import annotations

import base64
import contextlib
import heapq
import itertools
import json
import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from app.events.codec import EventCodec, EventDecodeError, EventEncodeError

log = logging.getLogger(__name__)

SAVE_EVERY_S = 1.0
KINDS = {"policies": "BudgetPolicy", "decisions": "BudgetDecision"}
UNCOUNTED_MAX = 10_000  # usage events kept (the newest): about 1.5 MB of JSON
# Spooled usage events waiting for Kafka's acknowledgement, at most (the newest sequences): one
# the spool dropped (full) is never acknowledged, and its entry was kept for ever.
QUEUED_MAX = 1_000_000


@dataclass(frozen=True)
class Uncounted:
    """A usage event in Kafka at (partition, offset) the spend worker may not have counted."""

    scopes: tuple[str, ...]
    nanos: int
    ts_ms: int
    partition: int
    offset: int

    def to_json(self) -> list[Any]:
        return [list(self.scopes), self.nanos, self.ts_ms, self.partition, self.offset]

    @classmethod
    def from_json(cls, value: Any) -> Uncounted:
        scopes, nanos, ts_ms, partition, offset = value
        if not isinstance(scopes, list) or not all(isinstance(scope, str) for scope in scopes):
            raise TypeError("scopes are names")
        for scope in scopes:
            scope.encode()  # a lone surrogate (``\ud800``) is no name, and orjson writes none
        numbers = [int(nanos), int(ts_ms), int(partition), int(offset)]
        if not all(-(2**63) <= number < 2**63 for number in numbers):  # Avro longs
            raise ValueError("past a 64-bit integer")  # orjson writes none
        return cls(tuple(scopes), *numbers)


def pruned(
    uncounted: dict[str, Uncounted], waiting: Callable[[Uncounted], bool]
) -> list[tuple[str, Uncounted]]:
    """The (event id, entry) pairs of ``uncounted`` for which ``waiting(entry)`` is false
    (counted, or uncapped), taken out of it."""
    done = [(event_id, entry) for event_id, entry in uncounted.items() if not waiting(entry)]
    for event_id, _ in done:
        del uncounted[event_id]
    return done


class BudgetSnapshot:
    def __init__(self, path: Path, codec: EventCodec) -> None:
        self.path = path
        self.codec = codec
        self.values: dict[str, dict[str, bytes]] = {kind: {} for kind in KINDS}
        self.uncounted: dict[str, Uncounted] = {}  # by usage event id, oldest first
        # spool sequence -> (event id, scopes, nanos, ts_ms) until Kafka acknowledges it
        self._queued: dict[int, tuple[str, tuple[str, ...], int, int]] = {}
        # (ts_ms, order added, event id, entry) of ``uncounted``: the oldest goes first past
        # UNCOUNTED_MAX; an entry pruned since is skipped there (and rebuilt when many are)
        self._by_time: list[tuple[int, int, str, Uncounted]] = []
        self._added = itertools.count()
        self.dirty = False

    # -- the usage held at the gate --------------------------------------------------
    def queued(self, seq: int, event_id: str, scopes: list[str], nanos: int, ts_ms: int) -> None:
        """A usage event in the spool (sequence ``seq``): kept once Kafka has it."""
        if nanos:
            self._queued[seq] = (event_id, tuple(scopes), nanos, ts_ms)
            while len(self._queued) > QUEUED_MAX:
                del self._queued[next(iter(self._queued))]  # the oldest sequence

    def delivered(self, seq: int, partition: int, offset: int) -> None:
        """Kafka acknowledged the event of spool sequence ``seq`` at (partition, offset)."""
        queued = self._queued.pop(seq, None)
        if queued is not None:
            event_id, scopes, nanos, ts_ms = queued
            self.held(event_id, Uncounted(scopes, nanos, ts_ms, partition, offset))

    def held(self, event_id: str, entry: Uncounted) -> None:
        """A usage event in Kafka the gate holds as not counted yet (read back, restored)."""
        if not entry.nanos or event_id in self.uncounted:
            return
        self.uncounted[event_id] = entry
        heapq.heappush(self._by_time, (entry.ts_ms, next(self._added), event_id, entry))
        while len(self.uncounted) > UNCOUNTED_MAX:
            _, _, oldest, kept = heapq.heappop(self._by_time)
            if self.uncounted.get(oldest) is kept:
                del self.uncounted[oldest]
        self.dirty = True

    def prune(self, waiting: Callable[[Uncounted], bool]) -> None:
        """Drop the events for which ``waiting(entry)`` is false (counted, or uncapped)."""
        done = [(key, entry) for key, entry in self.uncounted.items() if not waiting(entry)]
        self.forget(done)
        self.dirty |= bool(done)

    def forget(self, done: Iterable[tuple[str, Uncounted]]) -> None:
        """Drop these (event id, entry) pairs, which a save pruned from its copy of
        ``uncounted`` (in a thread, while the event loop went on holding events) and wrote
        without them: an id held again since, as another entry, stays; nothing to save."""
        for event_id, entry in done:
            if self.uncounted.get(event_id) is entry:
                del self.uncounted[event_id]
        if len(self._by_time) > 2 * len(self.uncounted) + 1024:  # mostly entries pruned since
            self._by_time = [
                item for item in self._by_time if self.uncounted.get(item[2]) is item[3]
            ]
            heapq.heapify(self._by_time)

    def record(self, kind: str, scope: str, record: dict[str, Any] | None) -> None:
        """A record of the policies or decisions topic, as its view applied it."""
        values = self.values[kind]
        if record is None:
            self.dirty |= values.pop(scope, None) is not None
            return
        try:
            values[scope] = self.codec.encode(KINDS[kind], record)
        except EventEncodeError:  # not ours to judge: the view took it; keep the last good
            return
        self.dirty = True

    def document(self, *, held_too: bool = False) -> dict[str, Any] | None:
        """What ``save`` writes (None: nothing changed, and with ``held_too`` no usage is held
        either: a prune of it may change the file): {"policies": {scope: Avro value},
        "decisions": {...}, "uncounted": {event id: Uncounted}}. Taken where the records change
        (the event loop), copies of the dicts only (their values never change); it may then be
        pruned, encoded and written in a thread."""
        if not self.dirty and not (held_too and self.uncounted):
            return None
        document: dict[str, Any] = {kind: dict(values) for kind, values in self.values.items()}
        document["uncounted"] = dict(self.uncounted)
        self.dirty = False
        return document

    @staticmethod
    def encode(document: dict[str, Any]) -> bytes:
        """The file's JSON of a ``document``, UTF-8: its Python lists and dicts built first
        (Python code: in the save's thread, the event loop runs every switch interval), then one
        ``orjson.dumps``, which holds the GIL (1.4 ms of 14.5 for 10,000 held events here;
        ``json.dumps`` in chunks of 500 events, as the file was written before, took 50 ms).
        orjson writes no integer past 64 bits and no lone surrogate: a held event is one Kafka
        acknowledged, Avro-encoded (UTF-8 strings, long integers), and a saved entry that is
        not so is dropped at load (``Uncounted.from_json``)."""
        plain: dict[str, Any] = {
            kind: {scope: base64.b64encode(value).decode() for scope, value in values.items()}
            for kind, values in document.items()
            if kind != "uncounted"
        }
        plain["uncounted"] = {key: entry.to_json() for key, entry in document["uncounted"].items()}
        return orjson.dumps(plain)

    def save(self) -> None:
        self.write(self.document())

    def write(self, document: dict[str, Any] | None) -> None:
        if document is None:
            return
        temporary = self.path.with_suffix(".tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            temporary.write_bytes(self.encode(document))
            os.replace(temporary, self.path)
        except OSError as exc:
            self.dirty = True  # try again at the next save
            log.warning("could not save the budget view", extra={"error": repr(exc)})

    def load(self) -> dict[str, dict[str, dict[str, Any]]]:
        """What was saved, decoded: {"policies": {scope: record}, "decisions": {...}}."""
        loaded: dict[str, dict[str, dict[str, Any]]] = {kind: {} for kind in KINDS}
        try:
            document = json.loads(self.path.read_bytes())  # UTF-8 (files before: ASCII)
        except FileNotFoundError:
            return loaded
        except (OSError, ValueError) as exc:
            log.warning("could not read the saved budget view", extra={"error": repr(exc)})
            return loaded
        for kind in KINDS:
            for scope, text in (document.get(kind) or {}).items():
                with contextlib.suppress(ValueError, EventDecodeError, TypeError):
                    value = base64.b64decode(text)
                    loaded[kind][scope] = self.codec.decode(value).record
                    self.values[kind][scope] = value
        saved = document.get("uncounted")
        for event_id, value in (saved if isinstance(saved, dict) else {}).items():
            with contextlib.suppress(ValueError, TypeError):
                event_id.encode()  # no lone surrogate: orjson could not write it back
                self.held(event_id, Uncounted.from_json(value))
        self.dirty = False
        return loaded
