"""Exactly-once spend counting under crashes, re-deliveries and re-sent events (hypothesis)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from app.budgets.counter import PartialTotals, SpendCounter, UsageEvent
from app.budgets.ledger import DAY_S

DAY = datetime(2026, 12, 1, tzinfo=UTC)
USERS = ["ann", "bob", "cy"]
FEATURES = ["chat", None]


def record(i: int, user: str, feature: str | None, cost: int, seconds: int) -> dict[str, Any]:
    return {
        "event_id": f"e{i}",
        "ts": DAY + timedelta(seconds=seconds),
        "user_id": user,
        "feature": feature,
        "team": None,
        "api_key_id": None,
        "cost_usd_nanos": cost,
        "price_unknown": False,
        "request_id": f"r{i}",
        "source": "dispatcher",
    }


events_strategy = st.lists(
    st.tuples(
        st.sampled_from(USERS),
        st.sampled_from(FEATURES),
        st.integers(1, 10**6),
        st.integers(0, DAY_S - 1),
        st.booleans(),  # re-sent later under a new offset (the spool's at-least-once)
    ),
    min_size=1,
    max_size=40,
)

# A worker's life: batches of random sizes, each ending in one of these fates.
FATES = ["ok", "ok", "ok", "crash_before_persist", "crash_mid_persist", "crash_before_ack"]


def live_through(
    log: dict[int, list[dict[str, Any]]],
    partitions: int,
    plan: list[tuple[int, str]],
    picks: Any,
    start: Callable[[dict[str, Any], dict[str, Any], dict[int, int]], SpendCounter],
    commit_lag: int = 0,
) -> SpendCounter:
    """Run workers over ``log`` until every event is counted and committed: batches of the
    ``plan``'s sizes, each meeting its fate (a crash before anything is durable, with some
    of its changelog writes durable, or before its offsets are acked: a new worker
    ``start``s from the durable changelog, remembered reports and committed offsets). Acked
    offsets are committed once more than ``commit_lag`` batches wait (Faust commits now and
    then). Returns the last worker."""
    durable: dict[str, Any] = {}  # the changelog
    memory: dict[str, Any] = {}  # the remembered reports' changelog
    committed = dict.fromkeys(range(partitions), 0)  # consumer group offsets
    acked = dict(committed)
    commits_pending = 0

    def start_worker() -> SpendCounter:
        return start(dict(durable), dict(memory), committed)

    counter = start_worker()
    position = dict(committed)
    steps = iter(plan)
    for _ in range(500):
        if all(position[p] >= len(log[p]) for p in range(partitions)):
            if all(committed[p] >= len(log[p]) for p in range(partitions)):
                break
            committed = dict(acked)  # the periodic commit catches up
            continue
        size, fate = next(steps, (8, "ok"))
        batch_events = [
            UsageEvent(p, offset, log[p][offset])
            for p in range(partitions)
            for offset in range(position[p], min(position[p] + size, len(log[p])))
        ]
        for p in range(partitions):
            position[p] = min(position[p] + size, len(log[p]))
        batch = counter.stage(batch_events)
        writes = [(durable, batch.writes), (memory, batch.remembered)]
        if fate == "crash_before_persist":
            counter, position = start_worker(), dict(committed)
            continue
        if fate == "crash_mid_persist":  # some changelog messages made it, some did not
            for store, staged in writes:
                for key, (_p, value) in staged.items():
                    if picks.random() < 0.5:
                        store[key] = value
            counter, position = start_worker(), dict(committed)
            continue
        for store, staged in writes:
            for key, (_p, value) in staged.items():
                store[key] = value
        if fate == "crash_before_ack":
            counter, position = start_worker(), dict(committed)
            continue
        counter.commit(batch)
        acked.update(batch.processed)
        commits_pending += 1
        if commits_pending > commit_lag:
            committed, commits_pending = dict(acked), 0
    return counter


def assert_spent(counter: SpendCounter, expected: dict[str, int], partitions: int) -> None:
    for scope, total in expected.items():
        spent, _ = counter.spent(scope, DAY, DAY + timedelta(days=1), range(partitions))
        assert spent == total, scope


@settings(max_examples=300, deadline=None)
@given(
    events=events_strategy,
    partitions=st.integers(1, 3),
    plan=st.lists(st.tuples(st.integers(1, 8), st.sampled_from(FATES)), min_size=1, max_size=60),
    commit_lag=st.integers(0, 3),
    durable_picks=st.randoms(use_true_random=False),
)
def test_every_distinct_event_is_counted_exactly_once_whatever_crashes(
    events: list[tuple[str, str | None, int, int, bool]],
    partitions: int,
    plan: list[tuple[int, str]],
    commit_lag: int,
    durable_picks: Any,
) -> None:
    # The usage topic: keyed by user, so a user's events (and their re-sends) share a partition.
    log: dict[int, list[dict[str, Any]]] = defaultdict(list)
    expected: dict[str, int] = defaultdict(int)
    resends = []
    for i, (user, feature, cost, seconds, resend) in enumerate(events):
        rec = record(i, user, feature, cost, seconds)
        log[USERS.index(user) % partitions].append(rec)
        if resend:
            resends.append(rec)
        for scope in (f"user:{user}", f"feature:{feature}" if feature else None, "global"):
            if scope:
                expected[scope] += cost
    for rec in resends:
        log[USERS.index(rec["user_id"]) % partitions].append(rec)

    def start_worker(
        durable: dict[str, Any], _memory: dict[str, Any], committed: dict[int, int]
    ) -> SpendCounter:
        counter = SpendCounter(durable, dedupe_window=1000)
        for p in range(partitions):
            c = committed[p]
            counter.prepare(p, c, [r["event_id"] for r in log[p][:c]])
        return counter

    counter = live_through(log, partitions, plan, durable_picks, start_worker, commit_lag)
    assert_spent(counter, expected, partitions)


def test_a_resent_event_is_skipped_and_its_offset_still_counts_as_processed() -> None:
    counter = SpendCounter({})
    counter.prepare(0, 0, [])
    first = record(1, "ann", "chat", 100, 10)
    batch = counter.stage([UsageEvent(0, 0, first), UsageEvent(0, 1, first)])
    assert batch.duplicates == 1 and batch.counted == 1
    counter.commit(batch)
    spent, counted = counter.spent("user:ann", DAY, DAY + timedelta(days=1), [0])
    assert spent == 100 and counted == {0: 2}


def test_a_resent_event_alone_still_tells_its_scopes_that_the_count_moved_past_it() -> None:
    """Session 17's probe: a re-sent copy arriving alone (a /v1/usage retry at another
    dispatcher) changed no spend, so no scope was decided again and the dispatcher that sent
    it held its cost for good. Its user is decided again and its feature's partial sum is
    sent again, with the offsets past it."""
    counter = SpendCounter({})
    counter.prepare(0, 0, [])
    first = record(1, "ann", "chat", 100, 10)
    counter.commit(counter.stage([UsageEvent(0, 0, first)]))
    again = counter.stage([UsageEvent(0, 5, first)])
    assert again.duplicates == 1 and again.counted == 0 and not again.writes
    assert again.local_scopes == {"user:ann"}
    assert set(again.partials) == {("feature:chat", 0), ("global", 0)}
    counter.commit(again)
    assert counter.spent("user:ann", DAY, DAY + timedelta(days=1), [0]) == (100, {0: 6})


def test_nothing_is_visible_before_commit() -> None:
    counter = SpendCounter({})
    counter.prepare(0, 0, [])
    batch = counter.stage([UsageEvent(0, 0, record(1, "ann", None, 100, 10))])
    assert counter.spent("user:ann", DAY, DAY + timedelta(days=1), [0]) == (0, {0: 0})
    counter.commit(batch)
    assert counter.spent("user:ann", DAY, DAY + timedelta(days=1), [0]) == (100, {0: 1})


def test_undecodable_events_advance_the_partition_and_count_nothing() -> None:
    counter = SpendCounter({})
    counter.prepare(0, 5, [])
    batch = counter.stage([UsageEvent(0, 5, None), UsageEvent(0, 6, record(1, "ann", None, 7, 1))])
    counter.commit(batch)
    assert batch.undecodable == 1
    assert counter.spent("user:ann", DAY, DAY + timedelta(days=1), [0]) == (7, {0: 7})


def test_cross_partition_scopes_are_staged_as_partials_per_source_partition() -> None:
    counter = SpendCounter({})
    for p in (0, 1):
        counter.prepare(p, 0, [])
    batch = counter.stage(
        [
            UsageEvent(0, 0, record(1, "ann", "chat", 5, 1)),
            UsageEvent(1, 0, record(2, "bob", "chat", 6, 1)),
        ]
    )
    assert set(batch.partials) == {
        ("feature:chat", 0),
        ("feature:chat", 1),
        ("global", 0),
        ("global", 1),
    }
    assert batch.local_scopes == {"user:ann", "user:bob"}


def test_partial_totals_never_regress_on_a_redelivered_older_partial() -> None:
    totals = PartialTotals({})
    newer = {
        "scope": "global",
        "partition": 0,
        "processed": 10,
        "buckets": {f"d|{int(DAY.timestamp())}": 50},
    }
    older = {
        "scope": "global",
        "partition": 0,
        "processed": 4,
        "buckets": {f"d|{int(DAY.timestamp())}": 20},
    }
    writes, scopes = totals.stage([newer])
    totals.commit(writes)
    writes, scopes = totals.stage([older])
    assert writes == {} and scopes == set()
    assert totals.spent("global", DAY, DAY + timedelta(days=1), range(2)) == (50, {0: 10})


def test_a_partial_sum_writes_only_what_an_event_changed_to_the_totals() -> None:
    """Every partial sum is a snapshot of all of a scope's buckets from its source partition
    (so the next one repairs one that was lost or arrived late), and the totals wrote every
    bucket of it to their changelog again. After a replay of a week of history, each live
    event then cost about 1,100 changelog records, and Faust logged "producer buffer full"
    2 times an event (probe B). A snapshot writes only what differs from what the totals
    hold: a new event's minute, quarter-hour and day, and the offset counted through."""
    counter = SpendCounter({})
    totals = PartialTotals({})

    def snapshot(scope: str) -> dict[str, Any]:  # what the worker's _send_partials sends
        return {
            "scope": scope,
            "partition": 0,
            "processed": counter.processed[0],
            "full": False,
            "buckets": counter.buckets(scope, 0),
        }

    history = [UsageEvent(0, i, record(i, "ann", "chat", 100, i * 60)) for i in range(300)]
    counter.commit(counter.stage(history))  # 300 minutes of spend: 300 + 20 + 1 buckets
    writes, _ = totals.stage([snapshot("global")])
    totals.commit(writes)

    live = UsageEvent(0, 300, record(300, "bob", "chat", 7, DAY_S - 30))
    counter.commit(counter.stage([live]))
    writes, scopes = totals.stage([snapshot("global")])
    assert scopes == {"global"}
    assert len(writes) == 4, f"{len(writes)} changelog records for one event"
    totals.commit(writes)
    day = (DAY, DAY + timedelta(days=1))
    assert totals.spent("global", *day, range(1)) == counter.spent("global", *day, [0])

    writes, scopes = totals.stage([snapshot("global")])  # the same snapshot delivered again
    assert writes == {} and scopes == {"global"}


# -- reports re-sent later than the dedupe window ---------------------------------------------
# A /v1/usage report (or a `tollgate replay` line) has an id derived from its user and request
# id, so a retry is the same event. The window of the last ids per partition caught a retry
# only while fewer than ``dedupe_window`` events came in between: a fault probe re-sent one
# after 55,000 others and the budget counted it twice ($0.34125 against the warehouse's
# $0.19125). Reported ids are remembered, durably, for as long as a period can count them.


def reported(i: int, user: str, cost: int, seconds: int) -> dict[str, Any]:
    return {**record(i, user, None, cost, seconds), "source": "usage_api"}


def test_a_report_re_sent_after_the_dedupe_window_is_counted_once_across_a_restart() -> None:
    durable: dict[str, Any] = {}
    memory: dict[str, Any] = {}
    counter = SpendCounter(durable, dedupe_window=100, reported=memory)
    counter.prepare(0, 0, [])
    first = reported(0, "ann", 250, 10)
    others = [record(i, "bob", None, 1, 20) for i in range(1, 151)]
    counter.commit(counter.stage([UsageEvent(0, 0, first)]))
    counter.commit(counter.stage([UsageEvent(0, i, r) for i, r in enumerate(others, start=1)]))
    assert len(memory) == 1  # the gateway's own calls are not remembered: only reports

    restarted = SpendCounter(dict(durable), dedupe_window=100, reported=dict(memory))
    restarted.prepare(0, 151, [r["event_id"] for r in others[-100:]])
    again = restarted.stage([UsageEvent(0, 151, first)])
    assert again.duplicates == 1 and again.counted == 0
    restarted.commit(again)
    day = (DAY, DAY + timedelta(days=1))
    assert restarted.spent("user:ann", *day, [0]) == (250, {0: 152})
    assert restarted.spent("global", *day, [0])[0] == 400


def test_a_report_delivered_again_at_its_own_offset_is_counted() -> None:
    """Its id was made durable but its spend was not (a crash between changelog writes):
    the same offset delivered again is the same event, not a re-send, and counts."""
    memory: dict[str, Any] = {}
    counter = SpendCounter({}, dedupe_window=100, reported=memory)
    counter.prepare(0, 0, [])
    first = reported(0, "ann", 250, 10)
    lost = counter.stage([UsageEvent(0, 0, first)])
    for key, (_p, value) in lost.remembered.items():
        memory[key] = value  # only the id made it to the changelog
    restarted = SpendCounter({}, dedupe_window=100, reported=dict(memory))
    restarted.prepare(0, 0, [])
    batch = restarted.stage([UsageEvent(0, 0, first)])
    assert batch.counted == 1
    restarted.commit(batch)
    assert restarted.spent("user:ann", DAY, DAY + timedelta(days=1), [0])[0] == 250


def test_remembered_reports_are_forgotten_once_no_period_can_count_them_or_past_the_cap() -> None:
    memory: dict[str, Any] = {}
    counter = SpendCounter({}, dedupe_window=100, reported=memory, reported_max=3)
    counter.prepare(0, 0, [])
    counter.prepare(1, 0, [])
    for i in range(4):  # one batch each: one record each
        counter.commit(counter.stage([UsageEvent(0, i, reported(i, "ann", 1, i * 60))]))
    counter.commit(counter.stage([UsageEvent(1, 0, reported(9, "bob", 1, 3600))]))
    assert len(memory) == 5
    now = int((DAY + timedelta(days=1)).timestamp())
    assert counter.forgettable_reports(now, {0, 1}) == {"0|0": 0, "0|1": 0}  # the 2 oldest
    assert counter.forgettable_reports(now, {1}) == {}  # partition 0 is another worker's
    later = int((DAY + timedelta(days=90)).timestamp())
    assert counter.forgettable_reports(later, {0, 1}) == {
        "0|0": 0, "0|1": 0, "0|2": 0, "0|3": 0, "1|0": 1,
    }  # fmt: skip
    counter.forget_reports(["0|0"])
    assert "0|0" not in memory
    restarted = SpendCounter({}, dedupe_window=100, reported=memory, reported_max=3)
    restarted.prepare(0, 9, [])  # nothing in its window
    again = restarted.stage([UsageEvent(0, 9, reported(0, "ann", 1, 0))])
    assert again.counted == 1  # forgotten: counted again (the documented price of the cap)
    assert restarted.stage([UsageEvent(0, 9, reported(1, "ann", 1, 60))]).duplicates == 1


def test_a_batch_remembers_its_reports_of_a_partition_in_one_record() -> None:
    """One changelog write a batch and partition, not one a call (bench/spend_reports.py)."""
    counter = SpendCounter({}, dedupe_window=100, reported={})
    counter.prepare(0, 0, [])
    counter.prepare(1, 0, [])
    events = [UsageEvent(0, i, reported(i, "ann", 1, i)) for i in range(50)]
    events += [UsageEvent(1, 7 + i, reported(100 + i, "bob", 1, i)) for i in range(30)]
    events.append(UsageEvent(0, 50, record(200, "ann", None, 1, 1)))  # the gateway's own
    batch = counter.stage(events)
    assert {k: len(v[1] or []) for k, v in batch.remembered.items()} == {"0|0": 50, "1|7": 30}
    counter.commit(batch)
    restarted = SpendCounter({}, dedupe_window=1, reported=dict(counter.reported.store))
    restarted.prepare(0, 51, [])
    assert restarted.stage([UsageEvent(0, 51, reported(17, "ann", 1, 17))]).duplicates == 1


@settings(max_examples=300, deadline=None)
@given(
    events=st.lists(
        st.tuples(
            st.sampled_from(USERS),
            st.integers(1, 10**6),
            st.integers(0, DAY_S - 1),
            st.integers(0, 3),  # times the report is re-sent later, anywhere in the log
        ),
        min_size=1,
        max_size=30,
    ),
    window=st.integers(1, 3),
    plan=st.lists(st.tuples(st.integers(1, 8), st.sampled_from(FATES)), min_size=1, max_size=60),
    picks=st.randoms(use_true_random=False),
)
def test_every_report_is_counted_once_however_late_it_is_re_sent_and_whatever_crashes(
    events: list[tuple[str, int, int, int]],
    window: int,
    plan: list[tuple[int, str]],
    picks: Any,
) -> None:
    partitions = 2
    log: dict[int, list[dict[str, Any]]] = defaultdict(list)
    expected: dict[str, int] = defaultdict(int)
    resent = []
    for i, (user, cost, seconds, resends) in enumerate(events):
        rec = reported(i, user, cost, seconds)
        log[USERS.index(user) % partitions].append(rec)
        resent += [rec] * resends
        expected[f"user:{user}"] += cost
        expected["global"] += cost
    for rec in resent:  # anywhere after the first, however many events lie between
        p = USERS.index(rec["user_id"]) % partitions
        first = next(i for i, r in enumerate(log[p]) if r["event_id"] == rec["event_id"])
        log[p].insert(picks.randint(first + 1, len(log[p])), rec)

    def start_worker(
        durable: dict[str, Any], memory: dict[str, Any], committed: dict[int, int]
    ) -> SpendCounter:
        counter = SpendCounter(durable, dedupe_window=window, reported=memory)
        for p in range(partitions):
            c = committed[p]
            counter.prepare(p, c, [r["event_id"] for r in log[p][max(0, c - window) : c]])
        return counter

    counter = live_through(log, partitions, plan, picks, start_worker)
    assert_spent(counter, expected, partitions)


def test_no_report_is_remembered_when_the_memory_is_off() -> None:
    counter = SpendCounter({}, dedupe_window=100, reported={}, reported_max=0)
    counter.prepare(0, 0, [])
    batch = counter.stage([UsageEvent(0, 0, reported(0, "ann", 1, 10))])
    assert batch.counted == 1 and not batch.remembered


def test_a_replayed_call_is_remembered_by_its_request_id_and_a_random_id_is_not() -> None:
    """`tollgate replay` writes "external" usage: under a request id its event id is the
    report's (``reported_event_id``), and a replay run again is the same calls; the SDK's
    UsageProducer draws ids at random, which can never come again."""
    from app.metering.usage import reported_event_id

    replayed = {**record(0, "ann", None, 5, 1), "source": "external", "request_id": "trace-7"}
    replayed["event_id"] = reported_event_id("ann", "trace-7")
    drawn = {**record(1, "ann", None, 5, 2), "source": "external"}
    counter = SpendCounter({}, dedupe_window=100, reported={})
    counter.prepare(0, 0, [])
    batch = counter.stage([UsageEvent(0, 0, replayed), UsageEvent(0, 1, drawn)])
    assert list(batch.remembered_ids) == [replayed["event_id"]]
    counter.commit(batch)
    restarted = SpendCounter({}, dedupe_window=1, reported=dict(counter.reported.store))
    restarted.prepare(0, 2, [])
    assert restarted.stage([UsageEvent(0, 2, replayed)]).duplicates == 1


def test_the_cap_forgets_the_records_of_the_oldest_calls_whatever_order_they_came_in() -> None:
    """A reviewer: the cap forgot in the store's order, which after a rebalance or a restart
    is Faust's: today's reports went while 50-day-old ones stayed."""
    counter = SpendCounter({}, dedupe_window=100, reported={}, reported_max=3)
    counter.prepare(0, 0, [])
    counter.prepare(1, 0, [])
    today = DAY + timedelta(days=55)
    for i in range(3):  # today's first
        call = {**reported(i, "ann", 1, 0), "ts": today + timedelta(minutes=i)}
        counter.commit(counter.stage([UsageEvent(0, i, call)]))
    for i in range(3):  # then three from 50 days before
        counter.commit(counter.stage([UsageEvent(1, i, reported(10 + i, "bob", 1, i))]))
    now = int((today + timedelta(hours=1)).timestamp())
    assert counter.forgettable_reports(now, {0, 1}) == {"1|0": 1, "1|1": 1, "1|2": 1}
    counter.forget_reports(["1|0", "1|1", "1|2"])
    assert counter.forgettable_reports(now, {0, 1}) == {}
    assert sorted(counter.reported.store) == ["0|0", "0|1", "0|2"]


def test_a_record_of_remembered_reports_holds_at_most_a_thousand() -> None:
    """A reviewer: a skipped range read back whole is one batch, and its reports one
    changelog record: 20,000 of them made a 1.26 MB message, past Kafka's 1 MB default."""
    counter = SpendCounter({}, dedupe_window=100, reported={})
    counter.prepare(0, 0, [])
    batch = counter.stage([UsageEvent(0, i, reported(i, "ann", 1, 1)) for i in range(2500)])
    assert {k: len(v[1]) for k, v in batch.remembered.items()} == {
        "0|0": 1000, "0|1000": 1000, "0|2000": 500,
    }  # fmt: skip
    counter.commit(batch)
    assert len(counter.reported.index) == 2500


@settings(max_examples=200, deadline=None)
@given(
    records=st.lists(
        st.tuples(st.integers(0, 2), st.integers(0, 90), st.integers(1, 4)), max_size=25
    ),
    limit=st.integers(0, 30),
    owned=st.sets(st.integers(0, 2)),
    days_later=st.integers(0, 120),
)
def test_what_is_forgotten_is_the_expired_then_the_oldest_past_the_cap(
    records: list[tuple[int, int, int]], limit: int, owned: set[int], days_later: int
) -> None:
    """The heap gives what a walk of every record would (its rule written out here)."""
    from app.budgets.counter import ReportedIds
    from app.budgets.ledger import BucketId, expired

    memory = ReportedIds({}, limit)
    for n, (partition, day, size) in enumerate(records):
        ts = int((DAY + timedelta(days=day)).timestamp())
        entries = [[f"e{n}-{j}", ts + j, partition, n * 10 + j] for j in range(size)]
        memory.apply(f"{partition}|{n * 10}", entries)
    now = int((DAY + timedelta(days=days_later)).timestamp())
    want: dict[str, int] = {}
    kept = []
    for order, (key, entries) in enumerate(memory.store.items()):  # in the order applied
        partition = int(key.split("|")[0])
        if partition not in owned:
            continue
        newest = max(e[1] for e in entries)
        if expired(BucketId("d", newest - newest % DAY_S), now):
            want[key] = partition
        else:
            kept.append((newest, order, key, partition, len(entries)))
    excess = sum(n for *_rest, n in kept) - limit
    for _newest, _order, key, partition, n in sorted(kept):
        if excess <= 0:
            break
        want[key] = partition
        excess -= n
    assert memory.forgettable(now, owned) == want


def test_a_record_applied_again_is_one_heap_entry_and_the_cap_holds() -> None:
    """A reviewer: a batch delivered again after a crash applies its record again with the
    same newest time; both heap entries looked current, the record's ids were subtracted
    twice, and the cap forgot too little (2 remembered, cap 1)."""
    from app.budgets.counter import ReportedIds

    memory = ReportedIds({}, 1)
    for n in range(3):
        memory.apply(f"0|{n}", [[f"e{n}", 1000 + n, 0, n]])
    memory.apply("0|0", [["e0", 1000, 0, 0]])  # delivered again
    forgotten = memory.forgettable(2000, {0})
    assert forgotten == {"0|0": 0, "0|1": 0}
    memory.forget(forgotten)
    assert memory.per_partition[0] == 1 and set(memory.index) == {"e2"}


def test_only_the_owned_partitions_heaps_are_walked() -> None:
    """A reviewer: a standby partition's expired records were popped and pushed back on
    every housekeeping run (0.9 s at 300,000 of them); only owned partitions are looked at.
    Looking at a heap drops its stale entries (records applied again): the standby
    partition's stay until it is owned."""
    from app.budgets.counter import ReportedIds

    memory = ReportedIds({}, 10)
    memory.apply("0|0", [["a", 1000, 0, 0]])
    for n in range(50):
        memory.apply(f"1|{n}", [[f"b{n}", 1000, 1, n]])
        memory.apply(f"1|{n}", [[f"b{n}", 1000, 1, n]])  # delivered again: one entry stale
    standby = sorted(memory.heaps[1])
    assert len(standby) == 100
    later = int((DAY + timedelta(days=90)).timestamp())
    assert memory.forgettable(later, {0}) == {"0|0": 0}
    assert sorted(memory.heaps[1]) == standby  # not looked at
    assert memory.per_partition[1] == 50
    # Once owned, its expired records are forgettable, and the walk dropped the stale entries.
    assert memory.forgettable(later, {0, 1}) == {"0|0": 0} | {f"1|{n}": 1 for n in range(50)}
    assert len(memory.heaps[1]) == 50


# Faust keeps standby replicas of other workers' partitions in the same table data. Learning
# them took memory and counted in the per-partition counts, though only owned partitions are
# walked or capped: the worker learns the records of the partitions it actively owns, and a
# partition's when it becomes active (every rebalance ends in a recovery, then a rebuild).


@settings(max_examples=200, deadline=None)
@given(
    records=st.lists(
        st.tuples(st.integers(0, 3), st.integers(1, 4), st.booleans()), min_size=1, max_size=25
    ),
    active=st.sets(st.integers(0, 3)),
    promoted=st.sets(st.integers(0, 3)),
)
def test_standby_records_are_not_learnt_and_a_promoted_partition_knows_its_reports(
    records: list[tuple[int, int, bool]], active: set[int], promoted: set[int]
) -> None:
    from app.budgets.counter import ReportedIds

    table: dict[str, Any] = {}  # the Faust table data: active and standby partitions' records
    ids_of: dict[int, set[str]] = defaultdict(set)
    for n, (partition, size, _) in enumerate(records):
        entries = [[f"e{n}-{j}", 1000 + j, partition, n * 10 + j] for j in range(size)]
        table[f"{partition}|{n * 10}"] = entries
        ids_of[partition].update(e[0] for e in entries)

    memory = ReportedIds(table, 10**6)
    memory.rebuild(active)
    assert set(memory.index) == set().union(*(ids_of[p] for p in active))
    assert {p for p, n in memory.per_partition.items() if n} == {p for p in active if ids_of[p]}
    assert all(memory.per_partition[p] == len(ids_of[p]) for p in active)
    assert set(memory.heaps) <= active

    # A rebalance: some standbys become active, some active partitions go.
    memory.rebuild(promoted)
    assert set(memory.index) == set().union(*(ids_of[p] for p in promoted))
    for p in promoted:
        for event_id in ids_of[p]:
            entry = memory.first_count(event_id)
            assert entry is not None and entry[2] == p
    assert table == {  # nothing of the table itself is dropped: Faust's data, not ours
        f"{p}|{n * 10}": table[f"{p}|{n * 10}"] for n, (p, _s, _r) in enumerate(records)
    }


def test_a_report_retried_on_a_partition_promoted_from_standby_is_a_duplicate() -> None:
    # Worker A counted a report on partition 1; worker B held partition 1 as a standby.
    durable: dict[str, Any] = {}
    memory: dict[str, Any] = {}
    a = SpendCounter(durable, dedupe_window=10, reported=memory)
    a.prepare(0, 0, [])
    a.prepare(1, 0, [])
    first = reported(0, "ann", 250, 10)
    a.commit(a.stage([UsageEvent(1, 0, first)]))
    a.commit(a.stage([UsageEvent(0, 0, reported(1, "bob", 5, 10))]))
    others = [record(i, "cy", None, 1, 20) for i in range(2, 30)]
    a.commit(a.stage([UsageEvent(1, i, r) for i, r in enumerate(others, start=1)]))

    b = SpendCounter(dict(durable), dedupe_window=10, reported=dict(memory))
    b.reported.rebuild({0})  # partition 1 is a standby here: its reports are not in memory
    assert b.reported.first_count(first["event_id"]) is None
    assert set(b.reported.per_partition) == {0}

    b.reported.rebuild({0, 1})  # A died: partition 1 is B's now
    b.prepare(1, 29, [r["event_id"] for r in others[-10:]])
    again = b.stage([UsageEvent(1, 29, first)])  # the client's retry, past the window
    assert again.duplicates == 1 and again.counted == 0
