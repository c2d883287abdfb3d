"""The usage of this run the spend worker has not counted, held at the budget gate from a start.

Owns, for one dispatcher run, :class:`UncountedUsage`: what its gate holds at start (the
usage its spool still holds, the usage it saved as delivered and not counted, the usage in
Kafka the worker's decisions do not count yet: the read-back), each event once, and the
usage it queues after (the hook the emitter calls before it spools a usage event). A start
whose budget views catch up reads back at once; one whose views did not (Kafka down or hung)
holds the saved spend now and reads back in the background once they have, skipping by id
what this run holds by then, and gives the read-back up past ``USAGE_IDS_MAX`` ids.

The saved form of this usage is the budget view's (``budget_snapshot.py``: ``uncounted``);
this module feeds it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from app.budgets.gate import BudgetGate
from app.budgets.policy import scopes_of
from app.budgets.spend import event_cost
from app.events.codec import EventCodec, EventDecodeError
from app.events.compacted import CompactedView
from app.events.producer import EventEmitter
from app.http.budget_snapshot import BudgetSnapshot, Uncounted
from app.metering.ingest import ReportedRequests
from app.settings import Settings

log = logging.getLogger(__name__)

# Usage event ids kept for a read-back put off (``UncountedUsage.skip``), at most: about
# 100-150 MB. Past it the read-back is given up (a view that never catches up while Kafka
# takes usage kept every id: about 0.5 GB an hour at 1,000 events/s, a review).
USAGE_IDS_MAX = 1_000_000
UNCOUNTED_READ_MAX = 200_000  # events a restart reads back per partition, at most
# How far before the furthest decision's offsets a restart reads back (per partition) when
# some decisions count less far: the worker publishes a batch's decisions scope by scope,
# a scope whose spend alone moved at its next flush (0.25 s), features after their partials.
UNCOUNTED_READ_OVERLAP = 5_000
UNCOUNTED_READ_FETCH_MAX = 5_000  # events a fetch of the read-back hands over, at most
# The read-back gives the event loop a turn every this many events it reads: a fetch held
# whole kept health checks and calls waiting 0.6-0.9 s of CPU (140-180 us an event, review
# 49 I1); 50 events hold it about 10 ms (``bench.read_back_stall``).
READ_BACK_YIELD_EVERY = 50


def usage_scopes(record: Mapping[str, Any]) -> list[str]:
    """The budget scopes a usage event counts against."""
    return scopes_of(
        record["user_id"], record.get("feature"), record.get("team"), record.get("api_key_id")
    )


def held_at_gate(gate: BudgetGate, record: Mapping[str, Any]) -> bool:
    """Whether the gate holds a usage event this dispatcher queues: it has a cost and a
    capped scope (``BudgetGate.record_spend`` and ``settle`` hold nothing else). A read-back
    put off need skip only those: any other it reads is held there for the first time."""
    return event_cost(record) > 0 and any(
        gate.policies.policy_for(scope) is not None for scope in usage_scopes(record)
    )


class UncountedUsage:
    """The uncounted usage of this dispatcher run: what its start holds and reads back."""

    def __init__(
        self,
        settings: Settings,
        gate: BudgetGate,
        codec: EventCodec,
        reported: ReportedRequests,
        snapshot: BudgetSnapshot | None = None,
    ) -> None:
        """``reported`` learns the /v1/usage records held or read back (a retry of one is a
        repeat); ``snapshot``, the saved budget view, keeps what is held once delivered."""
        self.settings = settings
        self.gate = gate
        self.codec = codec
        self.reported = reported
        self.snapshot = snapshot
        # The ids of the usage this run holds that a read-back must not hold again: what its
        # spool held at start, what was restored from the saved view and, while a read-back
        # is put off (``tracking``), each usage event it queues that the gate holds, added
        # before it is spooled (so before it can be on the topic). Emptied once read back.
        self.skip: set[str] = set()
        # usage event ids held since the start from the saved view (a retry of one: not again)
        self.restored: set[str] = set()
        # after a start the budget views did not catch up in: the read-back put off
        self.read_back: asyncio.Task[int] | None = None
        # ``skip`` takes this run's queued usage (a read-back is put off). Past
        # ``USAGE_IDS_MAX`` ids it is emptied and this turns false: the read-back is given up.
        self.tracking = False
        # The read-back is reading (skipping by ``skip`` as it goes): no give-up then (it
        # would empty the set it skips by: this run's usage held twice, review 62); it lasts
        # at most ``start_uncounted_read_s``.
        self._reading = False

    # -- the usage this run queues -------------------------------------------------------
    def on_usage(self, record: Mapping[str, Any]) -> Callable[[int], None]:
        """The emitter's hook (``EventEmitter.on_usage``), told each usage event before it
        is spooled: its id is known before the event can be delivered, so before a read-back
        can read it. Returns what the emitter tells the event's spool sequence once spooled
        (the saved view keeps the event once Kafka has it)."""
        if self.tracking and held_at_gate(self.gate, record):
            self.skip.add(record["event_id"])
            if len(self.skip) > USAGE_IDS_MAX and not self._reading:
                log.warning(
                    "gave up reading back the usage the spend worker has not counted: the "
                    "budget views have not caught up, and this dispatcher cannot keep the ids "
                    "of more usage it holds already",
                    extra={"ids": len(self.skip)},
                )
                self.skip.clear()
                self.tracking = False
        return lambda seq: self.queued(seq, record)

    def queued(self, seq: int, record: Mapping[str, Any]) -> None:
        """A usage event in the spool at sequence ``seq``: the saved view keeps it once
        Kafka has it."""
        if self.snapshot is None:
            return
        ts_ms = int(record["ts"].timestamp() * 1000)
        self.snapshot.queued(
            seq, record["event_id"], usage_scopes(record), event_cost(record), ts_ms
        )

    # -- at start ----------------------------------------------------------------------
    def hold_spooled_usage(self, emitter: EventEmitter, usage_topic: str) -> int:
        """Usage a previous run spooled but Kafka never acknowledged: the spend worker has
        not counted it, so the gate holds it (until a decision counts it) like fresh spend.
        Its ids go to ``skip``; ``reported`` learns the /v1/usage records; the saved view
        keeps each one once delivered. Before the emitter drains its spool."""
        held = 0
        for spooled in emitter.spool.peek(emitter.spool.depth):
            if spooled.topic != usage_topic:
                continue
            try:
                record = emitter.codec.decode(spooled.value).record
            except EventDecodeError:
                continue  # the sink dead-letters it; it costs nothing against a cap
            self.gate.record_spend(
                usage_scopes(record), event_cost(record), record["ts"], spooled.seq
            )
            self.reported.remember_usage(record)
            self.skip.add(record["event_id"])
            self.queued(spooled.seq, record)
            held += 1
        if held:
            log.info(
                "holding spooled usage at the budget gate until counted", extra={"events": held}
            )
        return held

    async def hold_at_start(
        self, emitter: EventEmitter, usage_topic: str, views: list[CompactedView]
    ) -> None:
        """What a start holds before it serves: the usage its spool holds (before the
        emitter drains it), then, if the budget ``views`` caught up (Kafka answers), the
        usage the worker has not counted; else the saved spend now and the read-back once
        they catch up, skipping what this run holds by then."""
        self.hold_spooled_usage(emitter, usage_topic)
        if all(view.synced.is_set() for view in views):
            await self.hold_uncounted_usage()
            self.skip.clear()
        else:
            self.defer_uncounted_read_back(views)

    def hold_saved_uncounted(self) -> int:
        """At a start whose budget views did not catch up: the usage this dispatcher held
        before as delivered and not counted (saved with the budget view), held again until a
        decision counts it; its ids go to ``skip`` so that a read-back later does not hold it
        twice, and to ``restored`` so that a /v1/usage retry of it (not known as one: its
        record is not saved) is not held again. One still in the spool is held from there
        (and saved again once delivered)."""
        snapshot = self.snapshot
        if snapshot is None:
            return 0
        held = 0
        for event_id, entry in list(snapshot.uncounted.items()):
            if event_id in self.skip:
                del snapshot.uncounted[event_id]
                continue
            ts = datetime.fromtimestamp(entry.ts_ms / 1000, UTC)
            self.gate.record_counted_later(
                list(entry.scopes), entry.nanos, ts, entry.partition, entry.offset
            )
            self.skip.add(event_id)
            self.restored.add(event_id)
            held += 1
        if held:
            log.info("holding the uncounted usage saved before the restart", extra={"events": held})
        return held

    def defer_uncounted_read_back(self, views: list[CompactedView]) -> asyncio.Task[int]:
        """A start whose budget views did not all catch up: hold what this dispatcher saved
        as not counted now, and read the usage back in the background once the views have
        caught up (``read_back``). The saved spend is held whichever view is behind (it was
        held only if the decisions were: a start whose policies alone were behind held
        nothing meanwhile, a review); with fresh decisions, what they count is not held, and
        the read-back skips each restored id."""
        self.hold_saved_uncounted()
        self.tracking = True
        self.read_back = asyncio.create_task(
            self.hold_uncounted_usage_when_caught_up(views),
            name="uncounted-usage-read-back",
        )
        return self.read_back

    async def hold_uncounted_usage_when_caught_up(self, views: list[CompactedView]) -> int:
        """``hold_uncounted_usage`` for a start whose budget views did not catch up (Kafka
        down, hung, or answering only after ``start_kafka_answer_wait_s``): run once they
        have. It was skipped for good: with the spend worker behind, a user near a cap spent
        again what was spent before the restart (a probe: twice the cap). ``skip`` holds the
        ids of the usage this run holds already: what was in its spool at start, and, while
        ``tracking``, every usage event it queued since (an id is added before its event is
        spooled, so before it can be read here), a /v1/usage retry of an older record
        included (the same event id): each is held once, by its spool sequence."""
        try:
            for view in views:
                await view.synced.wait()
            if not self.tracking:  # past USAGE_IDS_MAX: this run's usage is not known
                log.warning(
                    "gave up reading back the usage the spend worker has not counted: too "
                    "much usage was queued before the budget views caught up"
                )
                return 0
            self._reading = True  # no give-up while it reads (review 62)
            return await self.hold_uncounted_usage()
        finally:
            self.tracking = False
            self._reading = False
            self.skip.clear()

    async def hold_uncounted_usage(self) -> int:
        """Usage already in Kafka that the spend worker has not counted: held at the gate
        until a decision counts it, as this dispatcher held its own before a restart.

        The gate held its uncounted spend in memory: with the worker stopped, every restart
        of a dispatcher forgot it and a capped user got a fresh cap (probe K: $0.06 spent
        under a $0.02 cap after two restarts). Read from where the worker's decisions say it
        had counted (``counted_offsets``; the beginning if it never decided) to the end,
        other dispatchers' spend included; an event whose scopes' decisions already count
        through its offset is not held, nor one this run holds already (``skip``: its spool's
        is held from there). The start is the least far any decision counts, but at most
        ``UNCOUNTED_READ_OVERLAP`` events before the furthest one: decisions of one batch are
        published scope by scope, so the furthest alone skipped the usage of a scope whose
        decision came later (or never, the worker dead). Bounded by ``UNCOUNTED_READ_MAX``
        events a partition and ``settings.start_uncounted_read_s``; a failure leaves the gate
        as it was (logged). ``reported`` learns the /v1/usage records read (counted or not),
        so a retry of one here is a repeat, not a second hold (probe H: a user under the cap
        was refused until the worker's next decision, however long the worker was away).
        The event loop gets a turn every ``READ_BACK_YIELD_EVERY`` events: what runs then
        (live usage, a decision) is what could run between two fetches already."""
        from app.events import clients

        settings, gate = self.settings, self.gate
        topic = settings.topic("usage")
        held = 0
        consumer = None
        try:
            progress = gate.counted_progress()
            # Subscribed (every partition, no group): a consumer started without a topic has
            # no metadata to assign from, and stopping it hung the dispatcher's start.
            consumer = clients.consumer(
                settings, topic, purpose="dispatcher-uncounted", group_id=None
            )
            async with asyncio.timeout(settings.start_uncounted_read_s):
                await consumer.start()
                while not consumer.assignment():  # noqa: ASYNC110 (aiokafka has no event for it)
                    await asyncio.sleep(0.05)
                tps = sorted(consumer.assignment())
                ends = await consumer.end_offsets(tps)
                beginnings = await consumer.beginning_offsets(tps)
                todo = {}
                for tp in tps:
                    low, high = progress.get(tp.partition, (0, 0))
                    start = max(
                        low,
                        high - UNCOUNTED_READ_OVERLAP,
                        beginnings[tp],
                        ends[tp] - UNCOUNTED_READ_MAX,
                    )
                    if start < ends[tp]:
                        consumer.seek(tp, start)
                        todo[tp] = ends[tp]
                    else:
                        consumer.pause(tp)
                read = 0
                while todo:
                    batch = await consumer.getmany(
                        *todo, timeout_ms=1000, max_records=UNCOUNTED_READ_FETCH_MAX
                    )
                    for tp, messages in batch.items():
                        for message in messages:
                            if message.offset < todo.get(tp, -1):
                                held += self._hold_read_usage(message)
                            read += 1
                            if read % READ_BACK_YIELD_EVERY == 0:
                                await asyncio.sleep(0)  # live calls go on meanwhile
                    for tp in list(todo):
                        if await consumer.position(tp) >= todo[tp]:
                            del todo[tp]
                            consumer.pause(tp)
        except Exception as exc:  # Kafka away or slow: the gate goes on with what it holds
            log.warning(
                "could not read back the usage the spend worker has not counted",
                extra={"error": repr(exc), "held": held},
            )
        finally:
            if consumer is not None:
                with contextlib.suppress(Exception):
                    await consumer.stop()
        if held:
            log.info("holding usage the spend worker has not counted yet", extra={"events": held})
        return held

    def _hold_read_usage(self, message: Any) -> int:
        try:
            record = self.codec.decode(message.value).record
        except EventDecodeError:
            return 0
        self.reported.remember_usage(record)
        if record.get("event_id") in self.skip:
            return 0
        gate, snapshot = self.gate, self.snapshot
        scopes, nanos = usage_scopes(record), event_cost(record)
        gate.record_counted_later(scopes, nanos, record["ts"], message.partition, message.offset)
        if snapshot is not None and gate.waits_for_count(scopes, message.partition, message.offset):
            ts_ms = int(record["ts"].timestamp() * 1000)
            entry = Uncounted(tuple(scopes), nanos, ts_ms, message.partition, message.offset)
            snapshot.held(record["event_id"], entry)
        return 1

    async def stop(self) -> None:
        """Cancel a read-back still put off or reading (it logs its own failures)."""
        if self.read_back is not None:
            self.read_back.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.read_back
