"""Exactly-once spend counting: the spend worker's state, without Kafka or Faust.

Owns how usage events become spend-bucket values, so that any number of
crashes, re-deliveries and re-sent events still count each event once:

- every bucket value carries the next source offset it has to apply
  (``[nanos, next_offset]``), so an event re-delivered after a crash adds
  nothing to a bucket that already holds it;
- a window of the last ``dedupe_window`` event ids per partition drops an event
  re-sent under a new offset (the dispatcher's spool is at-least-once);
- a reported call (``POST /v1/usage``; ``tollgate replay`` under a request id) is
  also remembered by id (``reported``, a changelogged table in the worker) with where it
  was first counted, until no period can count it: a client's retry, or a replay run
  again, can come after any number of other events, and across restarts. The gateway's
  own calls are left out: their re-sends come within the window, and they are most of
  the traffic. A batch's ids of one partition are one table record (one changelog write
  a batch, not one a call: one a call cost 40 % of the worker's throughput,
  ``bench/spend_reports.py``);
- ``processed[p]`` is the offset below which every event of partition ``p`` is
  counted: decisions carry it, and dispatchers match their own not-yet-counted
  spend against it by identity (partition and offset), never by timestamp.

Writes are staged: ``stage`` returns them, the caller makes them durable (the
Faust changelog) and only then calls ``commit`` and acknowledges the events.
So whatever dies, events whose effects are not durable are delivered again.

The same file holds ``PartialTotals``, the second stage for scopes that span
partitions (features, teams, keys, global): per source partition, the latest
bucket values and the offset they are counted through.

Does not own Faust, topics, policies or decisions (``agents/spend.py``,
``app/budgets/spend.py``).
"""

from __future__ import annotations

import heapq
from collections import Counter, OrderedDict, defaultdict
from collections.abc import Iterable, Mapping, MutableMapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from app.budgets.ledger import (
    DAY_S,
    BucketId,
    buckets_of,
    cover,
    expired,
    parse_key,
    parse_short,
)
from app.budgets.policy import scopes_of
from app.budgets.spend import event_cost, is_partition_local
from app.metering.usage import attempt_key, reported_event_id

DEFAULT_DEDUPE_WINDOW = 50_000
DEFAULT_REPORTED_MAX = 1_000_000
REPORTED_SOURCE = "usage_api"  # POST /v1/usage: ids that can repeat late
REPLAYED_SOURCE = "external"  # `tollgate replay` (and the SDK's UsageProducer, random ids)


def repeatable(record: Mapping[str, Any]) -> bool:
    """Whether ``record``'s event id can come again later than any window: a call reported
    to ``POST /v1/usage`` (a client's retry), or replayed from a trace under its request id
    (``tollgate replay`` run again). An id drawn at random cannot: not remembered."""
    source = record.get("source")
    if source == REPORTED_SOURCE:
        return True
    if source != REPLAYED_SOURCE or not record.get("request_id") or not record.get("user_id"):
        return False
    return bool(record["event_id"] == reported_event_id(record["user_id"], record["request_id"]))


class RecentIds:
    """The last ``limit`` event ids of one partition, oldest first."""

    def __init__(self, limit: int, ids: Iterable[str] = ()) -> None:
        self.limit = limit
        self._ids: OrderedDict[str, None] = OrderedDict()
        for event_id in ids:
            self.add(event_id)

    def __contains__(self, event_id: str) -> bool:
        return event_id in self._ids

    def __len__(self) -> int:
        return len(self._ids)

    def add(self, event_id: str) -> None:
        self._ids[event_id] = None
        if len(self._ids) > self.limit:
            self._ids.popitem(last=False)


class ReportedIds:
    """The reported calls counted, by event id, until no period can count them (see the
    module docstring), over a changelogged store of records: "<partition>|<offset of its
    first>" -> [[event id, event time s, partition, offset], ...], the reported calls one
    batch counted from one partition, at most ``RECORD_MAX`` a record (a Kafka message
    has a size limit: a skipped range read back whole is one batch).

    Which records to forget comes from a heap per partition by each record's newest event
    time, so the housekeeping walks only what it forgets, of the partitions this worker
    owns (a reviewer: 4.8 s of stalled worker every 5 minutes at one id a record; then
    0.9 s for a standby partition's expired records, walked and kept every time), and the
    cap forgets the oldest calls, not the first stored (after a rebalance or a restart
    that order is Faust's). A heap entry is current while its record's sequence number
    is (a record applied again, by a batch delivered again, gets a new one)."""

    RECORD_MAX = 1000

    def __init__(self, store: MutableMapping[str, Any], limit: int) -> None:
        self.store = store
        self.limit = limit
        self.index: dict[str, list[Any]] = {}  # event id -> its entry
        # record key -> (newest event time, ids, sequence number of its heap entry)
        self.sizes: dict[str, tuple[int, int, int]] = {}
        self.heaps: dict[int, list[tuple[int, int, str]]] = defaultdict(list)
        self.per_partition: Counter[int] = Counter()  # distinct ids remembered
        self._seq = 0
        self.rebuild()

    def rebuild(self, partitions: Iterable[int] | None = None) -> None:
        """Learn the store's records of ``partitions`` (default: every record), forgetting
        whatever was learnt before. The worker passes the partitions it actively owns after
        every rebalance: the store (Faust's table data) also holds standby replicas of other
        workers' partitions, which would take memory and count in ``per_partition`` though
        only owned partitions are counted from, walked or capped. A standby promoted by a
        rebalance is active at the next rebuild (Faust ends each rebalance in a recovery)."""
        wanted = None if partitions is None else set(partitions)
        self.index.clear()
        self.sizes.clear()
        self.heaps.clear()
        self.per_partition.clear()
        for key, entries in list(self.store.items()):
            if wanted is None or _partition_of(key) in wanted:
                self._learn(key, entries)

    def _learn(self, key: str, entries: list[list[Any]]) -> None:
        partition = _partition_of(key)
        for entry in entries:
            if entry[0] not in self.index:
                self.per_partition[partition] += 1
            self.index[entry[0]] = entry
        newest = max(entry[1] for entry in entries)
        self._seq += 1
        self.sizes[key] = (newest, len(entries), self._seq)
        heapq.heappush(self.heaps[partition], (newest, self._seq, key))

    def _unlearn(self, key: str, entries: list[list[Any]]) -> None:
        partition = _partition_of(key)
        for entry in entries:
            if self.index.get(entry[0]) is entry:
                del self.index[entry[0]]
                self.per_partition[partition] -= 1
        self.sizes.pop(key, None)  # its heap entry is stale from now on

    def first_count(self, event_id: str) -> list[Any] | None:
        return self.index.get(event_id)

    def apply(self, key: str, entries: list[list[Any]]) -> None:
        """A record made durable: remember it (replacing one of the key, a batch delivered
        again and cut another way)."""
        if key in self.sizes:
            self._unlearn(key, self.store.get(key) or [])
        self.store[key] = entries
        self._learn(key, entries)

    def forget(self, keys: Iterable[str]) -> None:
        """Records whose tombstones are durable: forget them."""
        for key in keys:
            entries = self.store.pop(key, None)
            if key in self.sizes:
                self._unlearn(key, entries or [])

    def _top(self, partition: int) -> tuple[int, int, str] | None:
        heap = self.heaps.get(partition)
        while heap:
            _newest, seq, key = heap[0]
            if self.sizes.get(key, (0, 0, 0))[2] == seq:
                return heap[0]
            heapq.heappop(heap)  # forgotten, or applied again since: stale
        return None

    def forgettable(self, now_s: int, partitions: set[int]) -> dict[str, int]:
        """Records of ``partitions`` to forget (key -> partition): those whose calls no
        period can count any more (their UTC day's bucket has expired), then, past
        ``limit`` ids of those partitions, the records of the oldest calls. Changes nothing
        but dropping stale heap entries (``forget`` does, once the tombstones are durable)."""
        out: dict[str, int] = {}
        popped: list[tuple[int, tuple[int, int, str]]] = []
        excess = sum(self.per_partition[p] for p in partitions) - self.limit
        while True:
            tops = [(top, p) for p in partitions if (top := self._top(p)) is not None]
            if not tops:
                break
            (newest, _seq, key), partition = min(tops)
            if excess <= 0 and not expired(BucketId("d", newest - newest % DAY_S), now_s):
                break
            popped.append((partition, heapq.heappop(self.heaps[partition])))
            out[key] = partition
            excess -= self.sizes[key][1]
        for partition, item in popped:
            heapq.heappush(self.heaps[partition], item)
        return out


def _partition_of(key: str) -> int:
    return int(key.split("|", 1)[0])


def skipped_ranges(
    delivered: Iterable[tuple[int, int]], processed: Mapping[int, int]
) -> list[tuple[int, int, int]]:
    """The offset ranges ``(partition, from, to)`` a consumer skipped: between the offset
    below which a partition is counted (``processed``) and its first delivered event, and
    between consecutive delivered events. ``delivered`` is (partition, offset) in delivery
    order (ascending per partition); a partition not in ``processed`` starts at its first
    delivered event. Offsets at or below what was already delivered are re-deliveries."""
    gaps: list[tuple[int, int, int]] = []
    expected: dict[int, int] = {}
    for partition, offset in delivered:
        since = expected.get(partition)
        if since is None:
            since = processed.get(partition, offset)
        if offset > since:
            gaps.append((partition, since, offset))
        expected[partition] = max(since, offset + 1)
    return gaps


@dataclass(frozen=True)
class UsageEvent:
    partition: int
    offset: int
    record: Mapping[str, Any] | None  # None: undecodable, skipped (and dead-lettered elsewhere)


@dataclass
class Batch:
    """What one batch of usage events changes, staged until it is durable."""

    writes: dict[str, tuple[int, list[int] | None]] = field(default_factory=dict)
    local_scopes: set[str] = field(default_factory=set)  # partition-local scopes to re-decide
    partials: dict[tuple[str, int], set[BucketId]] = field(default_factory=dict)
    processed: dict[int, int] = field(default_factory=dict)
    new_ids: dict[int, list[str]] = field(default_factory=dict)
    # reported-ids records to write: "<partition>|<offset>" -> (partition, entries)
    remembered: dict[str, tuple[int, list[list[Any]]]] = field(default_factory=dict)
    # the entries staged, by event id: [event id, event time s, partition, offset]
    remembered_ids: dict[str, list[Any]] = field(default_factory=dict)
    counted: int = 0
    duplicates: int = 0
    undecodable: int = 0
    # (attempt_key(request_id, attempt), partition) of usage that settles an open request
    settled_requests: list[tuple[str, int]] = field(default_factory=list)


def scopes_of_record(record: Mapping[str, Any]) -> list[str]:
    return scopes_of(
        record.get("user_id"), record.get("feature"), record.get("team"), record.get("api_key_id")
    )


def ts_ms_of(record: Mapping[str, Any]) -> int:
    return int(record["ts"].timestamp() * 1000)


class SpendCounter:
    """Bucket values per (scope, bucket, source partition), applied exactly once."""

    def __init__(
        self,
        store: MutableMapping[str, Any],
        dedupe_window: int = DEFAULT_DEDUPE_WINDOW,
        reported: MutableMapping[str, Any] | None = None,
        reported_max: int = DEFAULT_REPORTED_MAX,
    ) -> None:
        self.store = store  # key -> [nanos, next_offset]; Faust table data in the worker
        self.dedupe_window = dedupe_window
        self.reported = ReportedIds({} if reported is None else reported, reported_max)
        self.processed: dict[int, int] = {}
        self.recent: dict[int, RecentIds] = {}
        self.index: dict[str, set[str]] = defaultdict(set)  # scope -> its keys in the store
        self.rebuild_index()

    # -- partitions --------------------------------------------------------------------
    def is_prepared(self, partition: int) -> bool:
        return partition in self.recent

    def prepare(self, partition: int, next_offset: int, recent_ids: Iterable[str]) -> None:
        """Start counting ``partition`` at ``next_offset`` (everything below it is counted and
        durable), knowing the ids of the events just before it (the dedupe window)."""
        self.recent[partition] = RecentIds(self.dedupe_window, recent_ids)
        self.processed[partition] = max(self.processed.get(partition, 0), next_offset)

    def forget(self, partitions: Iterable[int]) -> None:
        """Partitions revoked: their ids and offsets are another worker's now."""
        for partition in partitions:
            self.recent.pop(partition, None)
            self.processed.pop(partition, None)

    def rebuild_index(self) -> None:
        self.index.clear()
        for key in list(self.store.keys()):
            self.index[parse_key(key)[0]].add(key)

    # -- counting ----------------------------------------------------------------------
    def _value(self, key: str, batch: Batch) -> list[int]:
        staged = batch.writes.get(key)
        if staged is not None and staged[1] is not None:
            return staged[1]
        return self.store.get(key) or [0, 0]

    def stage(self, events: Iterable[UsageEvent]) -> Batch:
        """Stage the writes of a batch (in offset order per partition). Nothing here changes
        until ``commit``: readers only ever see durable counts."""
        batch = Batch()
        first_remembered: dict[int, int] = {}  # partition -> offset of its batch record
        for event in events:
            p, offset = event.partition, event.offset
            if offset < self.processed.get(p, 0):
                continue  # delivered again after a rebalance or crash: already counted
            batch.processed[p] = offset + 1
            record = event.record
            if record is None:
                batch.undecodable += 1
                continue
            event_id = record["event_id"]
            recent = self.recent.setdefault(p, RecentIds(self.dedupe_window))
            new_ids = batch.new_ids.setdefault(p, [])
            if event_id in recent or event_id in new_ids or self._reported_before(event, batch):
                # Counted once already; its scopes are still told that the count has moved
                # past it (a user's decision, a feature's partial sum): the dispatcher that
                # re-sent it holds its cost until a decision counts through its offset
                # (session 17's probe: a retried /v1/usage record was held for good).
                batch.duplicates += 1
                for scope in scopes_of_record(record):
                    if is_partition_local(scope):
                        batch.local_scopes.add(scope)
                    else:
                        batch.partials.setdefault((scope, p), set())
                continue
            new_ids.append(event_id)
            if self.reported.limit > 0 and repeatable(record):
                entry = [event_id, ts_ms_of(record) // 1000, p, offset]
                batch.remembered_ids[event_id] = entry
                key = f"{p}|{first_remembered.setdefault(p, offset)}"
                entries = batch.remembered.setdefault(key, (p, []))[1]
                entries.append(entry)
                if len(entries) >= ReportedIds.RECORD_MAX:
                    del first_remembered[p]  # the next one starts a record of its own
            if record.get("request_id") and record.get("source") in ("dispatcher", "settlement"):
                key = attempt_key(record["request_id"], record.get("attempt") or 1)
                batch.settled_requests.append((key, p))
            cost = event_cost(record)
            buckets = buckets_of(ts_ms_of(record))
            for scope in scopes_of_record(record):
                local = is_partition_local(scope)
                for bucket in buckets:
                    key = bucket.key(scope, p)
                    nanos, next_offset = self._value(key, batch)
                    if offset < next_offset:
                        continue  # durable before a crash; re-delivered since
                    batch.writes[key] = (p, [nanos + cost, offset + 1])
                    if not local:
                        batch.partials.setdefault((scope, p), set()).add(bucket)
                if local:
                    batch.local_scopes.add(scope)
            batch.counted += 1
        return batch

    def commit(self, batch: Batch) -> None:
        """The batch's writes are durable: apply them."""
        for key, (_partition, value) in batch.writes.items():
            if value is None:
                self.store.pop(key, None)
                self.index[parse_key(key)[0]].discard(key)
            else:
                self.store[key] = value
                self.index[parse_key(key)[0]].add(key)
        for key, (_partition, entries) in batch.remembered.items():
            self.reported.apply(key, entries)
        for p, ids in batch.new_ids.items():
            recent = self.recent.setdefault(p, RecentIds(self.dedupe_window))
            for event_id in ids:
                recent.add(event_id)
        for p, next_offset in batch.processed.items():
            self.processed[p] = max(self.processed.get(p, 0), next_offset)

    def _reported_before(self, event: UsageEvent, batch: Batch) -> bool:
        """Whether ``event`` is a report counted before, under an earlier offset (a retry or
        a replay re-run, however late). The same offset again is the same event delivered
        again (its id may be durable and its spend not: the bucket offsets settle that)."""
        record = event.record
        if record is None or record.get("source") not in (REPORTED_SOURCE, REPLAYED_SOURCE):
            return False
        first = batch.remembered_ids.get(record["event_id"])
        if first is None:
            first = self.reported.first_count(record["event_id"])
        if first is None:
            return False
        _id, _ts, partition, offset = first
        return bool(partition != event.partition or offset < event.offset)

    def forgettable_reports(self, now_s: int, partitions: set[int]) -> dict[str, int]:
        """See ``ReportedIds.forgettable``."""
        return self.reported.forgettable(now_s, partitions)

    def forget_reports(self, keys: Iterable[str]) -> None:
        """``forgettable_reports`` made durable (tombstones written): forget them here."""
        self.reported.forget(keys)

    # -- reading -------------------------------------------------------------------------
    def partitions_of(self, scope: str) -> set[int]:
        return {parse_key(key)[2] for key in self.index.get(scope, ())}

    def local_scopes_of(self, partitions: Iterable[int]) -> set[str]:
        """The partition-local scopes (users) with spend counted from any of ``partitions``."""
        wanted = set(partitions)
        return {
            scope
            for scope, keys in self.index.items()
            if is_partition_local(scope) and any(parse_key(k)[2] in wanted for k in keys)
        }

    def spent(
        self, scope: str, start: datetime, end: datetime, partitions: Iterable[int]
    ) -> tuple[int, dict[int, int]]:
        """Spend of ``scope`` in ``[start, end)`` over ``partitions``, and the offsets it counts
        through (a partition is named only once this worker knows where it stands in it)."""
        tiles = cover(int(start.timestamp()), int(end.timestamp()))
        total = 0
        counted: dict[int, int] = {}
        for p in partitions:
            for tile in tiles:
                value = self.store.get(tile.key(scope, p))
                if value:
                    total += value[0]
            if p in self.processed:
                counted[p] = self.processed[p]
        return total, counted

    def buckets(self, scope: str, partition: int) -> dict[str, int]:
        """Every bucket of ``scope`` from ``partition``, as ``{"g|start": nanos}``."""
        out = {}
        for key in self.index.get(scope, ()):
            _scope, bucket, p = parse_key(key)
            if p == partition:
                out[bucket.short()] = self.store[key][0]
        return out

    def expired_keys(self, now_s: int, partitions: set[int]) -> dict[str, int]:
        """Keys no period can need any more, of the partitions this worker owns."""
        out = {}
        for keys in self.index.values():
            for key in keys:
                _scope, bucket, p = parse_key(key)
                if p in partitions and expired(bucket, now_s):
                    out[key] = p
        return out


class PartialTotals:
    """Cross-partition scopes: each source partition's bucket values, counted through ``P``."""

    def __init__(self, store: MutableMapping[str, Any]) -> None:
        # "<scope>|<g>|<start>|p<source>" -> nanos, and "<scope>|P|0|p<source>" -> the source
        # partition's offset those values are counted through.
        self.store = store

    @staticmethod
    def offset_key(scope: str, source: int) -> str:
        return f"{scope}|P|0|p{source}"

    def stage(self, partials: Iterable[Mapping[str, Any]]) -> tuple[dict[str, Any], set[str]]:
        """Writes for a batch of partial messages; a message older (lower ``processed``) than
        what is held for its (scope, source) is ignored, so re-deliveries never regress.

        A partial is a snapshot of every bucket of its scope from its source (so the next
        one repairs a lost or late one), but only the values that differ from what is held
        are written: each write is a changelog record, and a scope with a week of history
        has hundreds of buckets, while an event changes three (probe B: ~1,100 changelog
        records an event, Faust's "producer buffer full" twice an event)."""
        writes: dict[str, Any] = {}
        scopes: set[str] = set()

        def held(key: str, default: Any = None) -> Any:
            return writes[key] if key in writes else self.store.get(key, default)

        for partial in partials:
            scope, source = partial["scope"], int(partial["partition"])
            offset_key = self.offset_key(scope, source)
            if partial["processed"] < held(offset_key, -1):
                continue
            for short, nanos in partial["buckets"].items():
                key = parse_short(short).key(scope, source)
                if held(key) != nanos:
                    writes[key] = nanos
            if held(offset_key) != partial["processed"]:
                writes[offset_key] = partial["processed"]
            scopes.add(scope)
        return writes, scopes

    def commit(self, writes: Mapping[str, Any]) -> None:
        for key, value in writes.items():
            if value is None:
                self.store.pop(key, None)
            else:
                self.store[key] = value

    def spent(
        self, scope: str, start: datetime, end: datetime, sources: Iterable[int]
    ) -> tuple[int, dict[int, int]]:
        tiles = cover(int(start.timestamp()), int(end.timestamp()))
        total = 0
        counted: dict[int, int] = {}
        for source in sources:
            through = self.store.get(self.offset_key(scope, source))
            if through is None:
                continue
            counted[source] = through
            for tile in tiles:
                total += self.store.get(tile.key(scope, source), 0)
        return total, counted

    def scopes(self) -> set[str]:
        return {parse_key(key)[0] for key in self.store if parse_key(key)[1].granularity == "P"}

    def expired_keys(self, now_s: int) -> list[str]:
        out = []
        for key in self.store:
            bucket = parse_key(key)[1]
            if bucket.granularity != "P" and expired(bucket, now_s):
                out.append(key)
        return out
