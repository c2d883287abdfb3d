"""The order of a compacted view (closing 39 M1, L1): records are ordered by the topic,
never by a writer's clock, and a read from the topic's beginning (a start, a lost broker)
never hands an older record of a key to ``on_record``. Pure logic: the view's apply and
catch-up are driven directly with encoded records (the broker side is in
tests/integration/test_hung_kafka_start.py)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from app.budgets.admin import policy_record
from app.budgets.policy import PolicyBook, evaluate, parse_policy
from app.budgets.spend import decision_record
from app.events.codec import EventCodec
from app.events.compacted import CompactedView
from app.settings import Settings

CODEC = EventCodec()
NOW = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)


def decision(scope: str, spent: int, ts: datetime = NOW) -> dict[str, Any]:
    policy = parse_policy(scope, {"limit_usd": 0.01})
    return decision_record(
        scope, policy, policy.period_at(ts), spent, ts, evaluate(spent, policy), ts, "spend", {}
    )


def read(record: dict[str, Any]) -> dict[str, Any]:
    """A record as the view decodes it from the topic."""
    return CODEC.decode(CODEC.encode("BudgetDecision", record)).record


class Seen:
    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any] | None]] = []

    def __call__(self, key: str, record: dict[str, Any] | None) -> None:
        self.calls.append((key, record))


def view(topic: str = "t.budget.decisions", on_record: Any = None) -> CompactedView:
    return CompactedView(Settings(), topic, CODEC, on_record=on_record)


def apply(
    v: CompactedView, key: str, record: dict[str, Any] | None, offset: int = 0, partition: int = 0
) -> None:
    value = None if record is None else CODEC.encode("BudgetDecision", record)
    v._apply(key.encode(), value, partition, offset)


def synced_view(on_record: Any = None) -> CompactedView:
    """A view that has read its (empty) topic to the end."""
    v = view(on_record=on_record)
    v.begin_catch_up()
    v.caught_up()
    return v


def restored_view(records: dict[str, dict[str, Any]]) -> tuple[CompactedView, Seen]:
    """A view started from the saved view (``records``, read from the topic before), now
    reading the topic from its beginning; what it hands on is in the ``Seen``."""
    seen = Seen()
    v = view(on_record=seen)
    v.records.update({key: read(record) for key, record in records.items()})
    v.begin_catch_up()
    return v, seen


async def send_pending(
    v: CompactedView, scope: str, record: dict[str, Any] | None
) -> asyncio.Future[Any]:
    """The spend worker's real ``_send_decision`` of ``record``, put in ``v`` first as the
    worker does; the send's outcome is the future returned, for the test to settle."""
    from agents.spend import SpendWorker

    outcome: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

    async def send(**_: Any) -> asyncio.Future[Any]:
        return outcome

    worker = SimpleNamespace(
        decision_view=v, codec=CODEC, decisions_topic=SimpleNamespace(send=send)
    )
    v.put_local(scope, record)
    await SpendWorker._send_decision(worker, scope, record)  # type: ignore[arg-type]
    return outcome


def test_a_later_decision_with_an_older_ts_wins() -> None:
    seen = Seen()
    v = synced_view(on_record=seen)
    apply(v, "user:a", decision("user:a", 0, NOW), 0)
    blocked = decision("user:a", 12_000_000, NOW - timedelta(minutes=5))  # clock stepped back
    apply(v, "user:a", blocked, 1)
    assert v.records["user:a"]["state"] == "blocked"
    assert seen.calls[-1][1] is not None and seen.calls[-1][1]["state"] == "blocked"


def test_a_re_read_replaces_at_once_and_never_hands_on_an_older_record() -> None:
    open_, blocked = decision("user:a", 0), decision("user:a", 12_000_000)
    gone, kept = decision("user:gone", 1), decision("user:kept", 2)
    v, seen = restored_view({"user:a": blocked, "user:gone": gone, "user:kept": kept})
    apply(v, "user:a", open_, 0)  # the topic's last hour is not compacted: older first
    apply(v, "user:kept", kept, 1)
    assert v.records["user:a"]["state"] == "blocked", "an older record applied mid-read"
    assert seen.calls == []
    apply(v, "user:a", blocked, 2)
    new = decision("user:new", 3)
    apply(v, "user:new", new, 3)
    v.caught_up()
    assert v.synced.is_set()
    # user:gone is not on the topic (tombstoned, compacted away): removed
    assert v.records == {"user:a": read(blocked), "user:kept": read(kept), "user:new": read(new)}
    assert sorted(seen.calls, key=lambda c: c[0]) == [("user:gone", None), ("user:new", read(new))]
    later = decision("user:a", 0)
    apply(v, "user:a", later, 4)  # then records apply as they come
    assert v.records["user:a"] == read(later)
    assert seen.calls[-1] == ("user:a", read(later))


def test_a_read_cut_short_leaves_the_held_records_and_starts_again() -> None:
    blocked = decision("user:a", 12_000_000)
    v, seen = restored_view({"user:a": blocked})
    apply(v, "user:a", decision("user:a", 0), 0)
    v.begin_catch_up()  # the broker was lost mid-read: the next read starts anew
    apply(v, "user:a", decision("user:a", 0), 0)
    apply(v, "user:a", blocked, 1)
    v.caught_up()
    assert v.records == {"user:a": read(blocked)}
    assert seen.calls == []


def test_the_policy_view_re_read_never_applies_an_older_policy() -> None:
    """L1: a start without Kafka, then the policies topic read from its beginning: the older
    policy of a scope was applied while re-reading."""
    book = PolicyBook()
    v = view("t.budget.policies", on_record=lambda scope, r: book.apply_record(r, scope))
    older = policy_record(parse_policy("user:a", {"limit_usd": 100.0}))
    newer = policy_record(parse_policy("user:a", {"limit_usd": 0.01}))
    restored = CODEC.decode(CODEC.encode("BudgetPolicy", newer)).record
    v.records["user:a"] = restored
    book.apply_record(restored, "user:a")
    v.begin_catch_up()
    v._apply(b"user:a", CODEC.encode("BudgetPolicy", older), 0, 0)
    policy = book.policy_for("user:a")
    assert policy is not None and policy.limit_usd_nanos == 10_000_000, "older policy applied"
    v._apply(b"user:a", CODEC.encode("BudgetPolicy", newer), 0, 1)
    v.caught_up()
    policy = book.policy_for("user:a")
    assert policy is not None and policy.limit_usd_nanos == 10_000_000


def test_a_local_write_is_kept_until_it_is_read_back() -> None:
    v = synced_view()
    first, second = decision("user:a", 1), decision("user:a", 2)
    w1 = v.put_local("user:a", first)
    w2 = v.put_local("user:a", second)
    v.local_written("user:a", w1, 0, 0)  # where each send landed
    v.local_written("user:a", w2, 0, 1)
    apply(v, "user:a", first, 0)  # the first read back while the second is in flight
    assert v.records["user:a"] == second
    apply(v, "user:a", second, 1)
    third = decision("user:a", 3)  # another worker's, after a rebalance
    apply(v, "user:a", third, 2)
    assert v.records["user:a"] == read(third)
    w3 = v.put_local("user:a", None)  # withdrawn
    v.local_written("user:a", w3, 0, 3)
    apply(v, "user:a", third, 2)  # re-delivered: older than the withdrawal
    assert "user:a" not in v.records
    apply(v, "user:a", None, 3)
    fourth = decision("user:a", 4)
    apply(v, "user:a", fourth, 4)
    assert v.records["user:a"] == read(fourth)


def test_a_local_write_outlives_a_catch_up_that_did_not_read_it() -> None:
    v = view()
    v.begin_catch_up()
    older, mine = decision("user:a", 1), decision("user:a", 2)
    apply(v, "user:a", older, 0)
    v.put_local("user:a", mine)
    v.caught_up()
    assert v.records["user:a"] == mine
    apply(v, "user:a", older, 0)
    assert v.records["user:a"] == mine


def test_a_lost_local_write_lets_the_topic_apply_again() -> None:
    v = synced_view()
    mine = decision("user:a", 2)
    v.local_lost("user:a", v.put_local("user:a", mine))
    other = decision("user:a", 3)
    apply(v, "user:a", other, 0)
    assert v.records["user:a"] == read(other)


# -- a property: writes, deliveries and re-reads in any order ---------------------------------
KEYS = ["user:a", "user:b", "user:c"]
PARTITION = {"user:a": 0, "user:b": 1, "user:c": 0}
ops = st.lists(
    st.one_of(
        st.tuples(st.just("write"), st.sampled_from(KEYS), st.booleans()),
        st.tuples(st.just("deliver"), st.sampled_from([0, 1]), st.integers(1, 3)),
        st.tuples(st.just("re-read"), st.just(0), st.just(0)),
    ),
    max_size=40,
)


@settings(max_examples=150, deadline=None)
@given(ops=ops, clock_offsets=st.lists(st.integers(-600, 600), min_size=40, max_size=40))
def test_the_view_holds_the_last_written_record_per_key(
    ops: list[tuple[str, Any, Any]], clock_offsets: list[int]
) -> None:
    """Writers' clocks jump about; after every record up to the end has been read, the view
    holds the last record written per key, and ``on_record`` never goes back for a key."""
    logs: list[list[tuple[str, dict[str, Any] | None]]] = [[], []]
    position, end = [0, 0], [0, 0]
    seq = 0
    handed: dict[str, int] = {}  # key -> write number of the last record handed on

    def on_record(key: str, record: dict[str, Any] | None) -> None:
        if record is not None:
            number = record["spent_usd_nanos"]
            assert number >= handed.get(key, 0), f"{key}: {number} after {handed[key]}"
            handed[key] = number

    v = view(on_record=on_record)

    def restart() -> None:
        position[:] = [0, 0]
        end[:] = [len(logs[0]), len(logs[1])]
        v.begin_catch_up()
        check_caught_up()

    def check_caught_up() -> None:
        if v.catching_up and all(position[p] >= end[p] for p in (0, 1)):
            v.caught_up({0: position[0], 1: position[1]})

    restart()
    for op, arg, extra in ops:
        if op == "write":
            seq += 1
            ts = NOW + timedelta(seconds=clock_offsets[seq % len(clock_offsets)])
            record = decision(arg, seq, ts) if extra else None
            logs[PARTITION[arg]].append((arg, record))
        elif op == "deliver":
            for _ in range(extra):
                if position[arg] < len(logs[arg]):
                    key, record = logs[arg][position[arg]]
                    apply(v, key, record, position[arg], arg)
                    position[arg] += 1
            check_caught_up()
        else:
            restart()
    for p in (0, 1):  # read everything
        while position[p] < len(logs[p]):
            key, record = logs[p][position[p]]
            apply(v, key, record, position[p], p)
            position[p] += 1
    check_caught_up()
    last: dict[str, dict[str, Any]] = {}
    for log_ in logs:
        for key, record in log_:
            if record is None:
                last.pop(key, None)
            else:
                last[key] = read(record)
    assert v.synced.is_set()
    assert v.records == last


def test_the_spend_worker_follows_the_topic_again_when_its_write_fails() -> None:
    """The worker's own decision is put in its view before it is sent; if the send fails,
    it will never be read back, and the view must not skip the topic's records for ever."""

    async def run() -> CompactedView:
        v = synced_view()
        outcome = await send_pending(v, "user:a", decision("user:a", 2))
        outcome.set_exception(RuntimeError("not written"))
        await asyncio.sleep(0)  # the done callbacks run
        return v

    v = asyncio.run(run())
    other = decision("user:a", 3)
    apply(v, "user:a", other, 0)
    assert v.records["user:a"] == read(other)
