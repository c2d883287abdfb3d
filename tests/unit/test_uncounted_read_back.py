"""The background read-back of uncounted usage (app/http/uncounted.py) after a start without
Kafka: a failure leaves the gate as it was and is logged, never left in the task (nothing
awaits it until the stop, whose clean-up it then broke: the emitter was not stopped and the
budget view not saved)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from app.events import clients
from app.events.codec import EventCodec
from app.events.producer import EventEmitter
from app.http import uncounted as uncounted_module
from app.http.budget_snapshot import BudgetSnapshot, Uncounted
from app.http.uncounted import UncountedUsage, usage_scopes
from app.metering.ingest import ReportedRequests
from app.settings import Settings
from tests.samples import example_event
from tests.unit.test_budget_gate import NOW, gate_with, policies, spent, usd


def test_a_read_back_that_cannot_start_its_consumer_is_logged_and_holds_nothing(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def no_consumer(*args: Any, **kwargs: Any) -> Any:
        raise ValueError("no consumer for these settings")

    monkeypatch.setattr(clients, "consumer", no_consumer)
    gate = gate_with(policies(**{"user:a": 5}))
    uncounted = UncountedUsage(Settings(), gate, EventCodec(), ReportedRequests())
    uncounted.skip.add("evt-1")
    uncounted.tracking = True

    async def read_back() -> int:
        view = SimpleNamespace(synced=asyncio.Event())
        view.synced.set()
        return await uncounted.hold_uncounted_usage_when_caught_up(
            [view],  # type: ignore[list-item]
        )

    with caplog.at_level(logging.WARNING):
        assert asyncio.run(read_back()) == 0
    assert "could not read back the usage" in caplog.text
    assert not uncounted.tracking and not uncounted.skip  # the ids are no longer kept


@pytest.mark.parametrize("behind", ["policies", "decisions", "both"])
def test_the_saved_spend_is_held_whichever_budget_view_did_not_catch_up(
    tmp_path: Path, behind: str
) -> None:
    """Review 59, finding 5: a start whose decisions caught up but whose policies did not
    held neither the saved spend nor (until the policies caught up) the read-back: a user
    near a cap could spend again what was spent before the restart. The saved spend is held
    whenever the read-back is put off, each restored id skipped by the read-back later."""
    gate = gate_with(policies(**{"user:a": 5}))
    snapshot = BudgetSnapshot(tmp_path / "budget-view.json", EventCodec())
    ts_ms = int(NOW.timestamp() * 1000)
    snapshot.held("evt-saved", Uncounted(("user:a",), usd(1), ts_ms, 0, 7))
    policy_view = SimpleNamespace(synced=asyncio.Event())
    decision_view = SimpleNamespace(synced=asyncio.Event())
    if behind == "policies":
        decision_view.synced.set()
    elif behind == "decisions":
        policy_view.synced.set()
    uncounted = UncountedUsage(Settings(), gate, EventCodec(), ReportedRequests(), snapshot)

    async def start() -> None:
        task = uncounted.defer_uncounted_read_back(
            [policy_view, decision_view],  # type: ignore[list-item]
        )
        try:
            await asyncio.sleep(0)
            assert not task.done()  # waiting for the views
            assert uncounted.read_back is task
            assert spent(gate, "user:a") == usd(1)
            assert uncounted.restored == {"evt-saved"}
            assert uncounted.tracking and "evt-saved" in uncounted.skip  # not read back again
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    asyncio.run(start())


def _emitter(tmp_path: Path) -> EventEmitter:
    return EventEmitter(Settings(state_dir=tmp_path), EventCodec())  # not started: spools only


def _uncounted(tmp_path: Path, gate: Any, emitter: EventEmitter) -> UncountedUsage:
    """This run's uncounted usage, told of the emitter's usage as the dispatcher's is."""
    snapshot = BudgetSnapshot(tmp_path / "budget-view.json", EventCodec())
    settings = Settings(state_dir=tmp_path)
    uncounted = UncountedUsage(settings, gate, EventCodec(), ReportedRequests(), snapshot)
    emitter.on_usage = uncounted.on_usage
    return uncounted


def _usage(i: int, user: str, nanos: int) -> dict[str, Any]:
    record = {**example_event("Usage", i), "user_id": user, "ts": NOW, "price_unknown": False}
    return {**record, "cost_usd_nanos": nanos}


def test_the_emitter_tells_its_usage_hook_before_it_spools_the_event(tmp_path: Path) -> None:
    """An id is known before its event can be delivered (so before a read-back can read it
    from the topic): the emitter calls its hook before the spool holds the event, and tells
    what the hook returns the event's spool sequence after."""
    emitter = _emitter(tmp_path)
    seen: list[tuple[str, int]] = []

    def on_usage(record: Any) -> Any:
        seen.append(("before", emitter.spool.depth))
        return lambda seq: seen.append(("spooled", seq))

    emitter.on_usage = on_usage
    seq = emitter.emit_usage(_usage(1, "a", 10))
    assert seen == [("before", 0), ("spooled", seq)]
    emitter.spool.close()


def _defer(uncounted: UncountedUsage, views: list[Any]) -> Any:
    return uncounted.defer_uncounted_read_back(views)


def test_a_put_off_read_back_keeps_only_the_ids_of_usage_the_gate_holds(tmp_path: Path) -> None:
    """Review 59, finding 4: while the read-back waits for the views, the id of every usage
    event was kept, without bound (a view that never catches up while Kafka takes usage:
    about 0.5 GB an hour at 1,000 events/s). Only usage with a cost on a capped scope is
    held by the gate, so only its id need be skipped by the read-back."""
    gate = gate_with(policies(**{"user:a": 5}))
    emitter = _emitter(tmp_path)
    view = SimpleNamespace(synced=asyncio.Event())
    capped, uncapped, free = _usage(1, "a", 10), _usage(2, "b", 10), _usage(3, "a", 0)

    uncounted = _uncounted(tmp_path, gate, emitter)

    async def start() -> set[str]:
        task = _defer(uncounted, [view])
        try:
            for record in (capped, uncapped, free):
                emitter.emit_usage(record)
            assert uncounted.tracking
            return set(uncounted.skip)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    assert asyncio.run(start()) == {capped["event_id"]}


def test_past_its_bound_a_put_off_read_back_is_given_up_and_its_ids_dropped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Past ``USAGE_IDS_MAX`` kept ids, the read-back is given up (logged): it could no
    longer tell this run's usage, held already, from usage to read back."""

    def no_read(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a read-back given up reads nothing")

    monkeypatch.setattr(uncounted_module, "USAGE_IDS_MAX", 3)
    monkeypatch.setattr(clients, "consumer", no_read)
    gate = gate_with(policies(**{"user:a": 5}))
    emitter = _emitter(tmp_path)
    uncounted = _uncounted(tmp_path, gate, emitter)
    view = SimpleNamespace(synced=asyncio.Event())

    async def start() -> int:
        task = _defer(uncounted, [view])
        for i in range(3):
            emitter.emit_usage(_usage(i, "a", 10))
        assert uncounted.tracking and len(uncounted.skip) == 3
        emitter.emit_usage(_usage(3, "a", 10))
        assert not uncounted.tracking and not uncounted.skip  # no longer kept
        view.synced.set()
        return await task

    with caplog.at_level(logging.WARNING):
        assert asyncio.run(start()) == 0
    assert "gave up reading back" in caplog.text


class _TopicReadBack:
    """The usage topic as the read-back's consumer sees it: ``messages`` ``per_fetch`` at a
    time (one by default), ``between(i)`` run before the fetch beginning at the i-th is
    handed over (live usage queued meanwhile). Its calls never give the loop a turn."""

    def __init__(self, messages: list[Any], between: Any, per_fetch: int = 1) -> None:
        from aiokafka import TopicPartition

        self.tp = TopicPartition("usage", 0)
        self.messages, self.between, self.read = messages, between, 0
        self.per_fetch = per_fetch

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    def assignment(self) -> set[Any]:
        return {self.tp}

    async def end_offsets(self, tps: Any) -> dict[Any, int]:
        return {self.tp: len(self.messages)}

    async def beginning_offsets(self, tps: Any) -> dict[Any, int]:
        return {self.tp: 0}

    def seek(self, tp: Any, offset: int) -> None:
        self.read = offset

    def pause(self, tp: Any) -> None:
        return None

    async def position(self, tp: Any) -> int:
        return self.read

    async def getmany(self, *tps: Any, **kwargs: Any) -> dict[Any, list[Any]]:
        if self.read >= len(self.messages):
            return {}
        self.between(self.read)
        fetched = self.messages[self.read : self.read + self.per_fetch]
        self.read += len(fetched)
        return {self.tp: fetched}


def test_a_give_up_while_the_read_back_reads_does_not_hold_this_runs_usage_twice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review 62: the give-up emptied the very set the running read-back skips by: usage
    this run held already (live, or restored), read after the give-up, was held a second
    time (a user refused under the cap until the worker's next decision)."""
    from app.events.producer import usage_message

    monkeypatch.setattr(uncounted_module, "USAGE_IDS_MAX", 3)
    gate = gate_with(policies(**{"user:a": 5}))
    emitter = _emitter(tmp_path)
    uncounted = _uncounted(tmp_path, gate, emitter)
    view = SimpleNamespace(synced=asyncio.Event())
    settings = Settings(state_dir=tmp_path)

    def live(record: dict[str, Any]) -> None:  # as the gateway's emit_usage
        seq = emitter.emit_usage(record)
        gate.record_spend(usage_scopes(record), record["cost_usd_nanos"], NOW, seq)

    early = [_usage(i, "a", usd(1)) for i in range(2)]  # on the topic when the read begins
    late = [_usage(i, "a", usd(1)) for i in range(2, 4)]  # queued while it reads

    def between(i: int) -> None:
        if i == 1:
            for record in late:
                live(record)

    messages = [
        SimpleNamespace(value=usage_message(settings, EventCodec(), r).value, partition=0, offset=i)
        for i, r in enumerate(early)
    ]
    monkeypatch.setattr(clients, "consumer", lambda *a, **k: _TopicReadBack(messages, between))

    async def start() -> None:
        task = _defer(uncounted, [view])
        for record in early:
            live(record)
        view.synced.set()
        await task

    asyncio.run(start())
    assert spent(gate, "user:a") == usd(4)  # each of the four once


def test_a_read_back_lets_the_loop_run_while_it_holds_a_fetch_of_5000_events(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review 49, I1: a fetch of up to 5,000 usage events was held without a turn of the
    event loop (about 175 us an event on a loaded machine: the loop held about 1 s a fetch),
    so health checks and calls waited through a start's read-back. Another task now runs
    every ``READ_BACK_YIELD_EVERY`` events at most, and the read-back holds the same."""
    from app.events.producer import usage_message

    gate = gate_with(policies(**{"user:*": 1000}))
    uncounted = _uncounted(tmp_path, gate, _emitter(tmp_path))
    settings = Settings(state_dir=tmp_path)
    events = uncounted_module.UNCOUNTED_READ_FETCH_MAX  # 5,000: a whole fetch
    value = usage_message(settings, EventCodec(), _usage(1, "a", 10)).value
    messages = [SimpleNamespace(value=value, partition=0, offset=i) for i in range(events)]
    topic = _TopicReadBack(messages, lambda i: None, per_fetch=events)
    monkeypatch.setattr(clients, "consumer", lambda *a, **k: topic)
    decoded = 0
    decode = uncounted.codec.decode

    def counting_decode(payload: bytes) -> Any:
        nonlocal decoded
        decoded += 1
        return decode(payload)

    monkeypatch.setattr(uncounted.codec, "decode", counting_decode)

    async def read_back() -> tuple[int, list[int]]:
        seen: list[int] = []  # events decoded so far, at each turn of another task
        reading = True

        async def ticker() -> None:
            while reading:
                seen.append(decoded)
                await asyncio.sleep(0)

        ticks = asyncio.create_task(ticker())
        await asyncio.sleep(0)
        try:
            return await uncounted.hold_uncounted_usage(), seen
        finally:
            reading = False
            await ticks

    held, seen = asyncio.run(read_back())
    assert held == events and spent(gate, "user:a") == events * 10  # the same result
    during = [n for n in seen if 0 < n < events]
    assert during, f"no other task ran while the fetch was held (turns at {sorted(set(seen))})"
    steps = [b - a for a, b in itertools.pairwise(seen)]
    assert max(steps) <= uncounted_module.READ_BACK_YIELD_EVERY
