"""The saved budget view keeps the usage the gate holds as delivered and not counted, by
event id (app/http/budget_snapshot.py): a start without Kafka holds it again (probe 39, "cap
doubled": with the spend worker behind, a restart while Kafka was frozen let a user spend
twice a cap)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from pathlib import Path
from typing import Any

import pytest

from app.events.codec import EventCodec
from app.http import budget_snapshot
from app.http.budget_snapshot import BudgetSnapshot, Uncounted


def _snapshot(path: Path) -> BudgetSnapshot:
    return BudgetSnapshot(path / "budget-view.json", EventCodec())


def test_usage_is_kept_once_kafka_has_it_and_survives_a_restart(tmp_path: Path) -> None:
    snapshot = _snapshot(tmp_path)
    snapshot.queued(7, "evt-1", ["user:a", "global"], 12_000_000, 1_000)
    assert snapshot.uncounted == {}  # still in the spool: the spool holds it
    snapshot.delivered(7, 2, 41)
    snapshot.delivered(7, 2, 41)  # a second ack of the sequence adds nothing
    assert snapshot.uncounted == {
        "evt-1": Uncounted(("user:a", "global"), 12_000_000, 1_000, 2, 41)
    }
    snapshot.save()
    again = _snapshot(tmp_path)
    again.load()
    assert again.uncounted == snapshot.uncounted
    assert not again.dirty


def test_usage_a_decision_counts_is_dropped(tmp_path: Path) -> None:
    snapshot = _snapshot(tmp_path)
    for offset in range(3):
        snapshot.held(f"evt-{offset}", Uncounted(("user:a",), 1, 0, 0, offset))
    snapshot.save()
    snapshot.prune(lambda entry: entry.offset >= 2)  # a decision counts through offset 1
    assert list(snapshot.uncounted) == ["evt-2"]
    assert snapshot.dirty
    snapshot.save()
    assert list(json.loads(snapshot.path.read_text())["uncounted"]) == ["evt-2"]


def test_free_usage_is_not_kept_and_an_event_id_is_kept_once(tmp_path: Path) -> None:
    snapshot = _snapshot(tmp_path)
    snapshot.queued(1, "free", ["user:a"], 0, 0)
    snapshot.delivered(1, 0, 0)
    snapshot.held("evt", Uncounted(("user:a",), 5, 0, 0, 1))
    snapshot.held("evt", Uncounted(("user:a",), 5, 0, 1, 9))  # the same event again (a resend)
    assert snapshot.uncounted == {"evt": Uncounted(("user:a",), 5, 0, 0, 1)}


def test_at_most_the_newest_events_are_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(budget_snapshot, "UNCOUNTED_MAX", 3)
    snapshot = _snapshot(tmp_path)
    for offset in range(5):
        snapshot.held(f"evt-{offset}", Uncounted(("user:a",), 1, 0, 0, offset))
    assert list(snapshot.uncounted) == ["evt-2", "evt-3", "evt-4"]


def test_a_view_saved_before_uncounted_usage_was_kept_loads(tmp_path: Path) -> None:
    path = tmp_path / "budget-view.json"
    path.write_text(json.dumps({"policies": {}, "decisions": {}}))
    snapshot = BudgetSnapshot(path, EventCodec())
    assert snapshot.load() == {"policies": {}, "decisions": {}}
    assert snapshot.uncounted == {}
    path.write_text(
        json.dumps(
            {"policies": {}, "decisions": {}, "uncounted": {"bad": [1], "ok": [["u"], 1, 2, 3, 4]}}
        )
    )
    snapshot.load()
    assert snapshot.uncounted == {"ok": Uncounted(("u",), 1, 2, 3, 4)}


def test_the_saved_view_keeps_exactly_the_usage_a_capped_scope_still_waits_for(
    tmp_path: Path,
) -> None:
    """The prune before each save (each scope's decision looked up once) keeps what
    ``BudgetGate.waits_for_count`` says waits: per scope, per partition, capped scopes only."""
    from app.http.server import prune_held
    from tests.unit.test_budget_gate import decision, gate_with, policies, usd

    gate = gate_with(policies(**{"user:a": 5, "team:t": 50}))
    gate.on_decision(
        "user:a", decision("user:a", state="open", spent=1, limit=usd(5), counted={0: 10, 1: 3})
    )
    snapshot = _snapshot(tmp_path)
    cases = [
        (("user:a",), 0, 9),  # counted through offset 9 of partition 0
        (("user:a",), 0, 10),  # not yet
        (("user:a",), 1, 2),
        (("user:a",), 2, 0),  # a partition the decision does not count
        (("user:a", "team:t"), 0, 1),  # the team's decision has not come
        (("user:b",), 0, 99),  # no cap
        (("user:b", "global"), 0, 99),
    ]
    for i, (scopes, partition, offset) in enumerate(cases):
        snapshot.held(f"evt-{i}", Uncounted(scopes, 1, 0, partition, offset))
    expected = [
        f"evt-{i}"
        for i, (scopes, partition, offset) in enumerate(cases)
        if gate.waits_for_count(scopes, partition, offset)
    ]
    assert expected == ["evt-1", "evt-3", "evt-4"]
    document = snapshot.document()
    assert document is not None
    assert [event_id for event_id, _ in prune_held(document, gate)] == [
        f"evt-{i}" for i in range(len(cases)) if f"evt-{i}" not in expected
    ]
    assert list(document["uncounted"]) == expected


def test_past_the_bound_the_oldest_spend_goes_first_not_the_newest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review 59, finding 8: past ``UNCOUNTED_MAX`` events were dropped in the order they
    were added; a read-back adds older events after this run's live ones, so it dropped the
    newest live spend first. The oldest (by event time) go first now."""
    monkeypatch.setattr(budget_snapshot, "UNCOUNTED_MAX", 3)
    snapshot = _snapshot(tmp_path)
    for i, ts_ms in enumerate((10_000, 11_000, 12_000)):  # this run's, delivered
        snapshot.held(f"live-{i}", Uncounted(("user:a",), 1, ts_ms, 0, 100 + i))
    snapshot.prune(lambda entry: entry.ts_ms != 11_000)  # counted: a heap entry left behind
    for i, ts_ms in enumerate((1_000, 2_000)):  # read back later: older usage
        snapshot.held(f"old-{i}", Uncounted(("user:a",), 1, ts_ms, 1, i))
    assert set(snapshot.uncounted) == {"live-0", "live-2", "old-1"}


def test_usage_the_spool_never_delivers_is_not_kept_for_ever(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review 59, finding 8: an entry was kept for each spooled event until Kafka
    acknowledged it; one the spool dropped never is. At most ``QUEUED_MAX``, the newest."""
    monkeypatch.setattr(budget_snapshot, "QUEUED_MAX", 2)
    snapshot = _snapshot(tmp_path)
    for seq in range(1, 5):
        snapshot.queued(seq, f"evt-{seq}", ["user:a"], 5, seq)
    for seq in range(1, 5):
        snapshot.delivered(seq, 0, seq)
    assert set(snapshot.uncounted) == {"evt-3", "evt-4"}


def test_a_saved_entry_whose_scopes_are_a_string_is_dropped(tmp_path: Path) -> None:
    """Review 59, finding 8: a corrupt file's ``"user:a"`` as scopes gave one scope per
    character."""
    path = tmp_path / "budget-view.json"
    uncounted = {"bad": ["user:a", 1, 2, 3, 4], "ok": [["user:a"], 1, 2, 3, 4]}
    path.write_text(json.dumps({"policies": {}, "decisions": {}, "uncounted": uncounted}))
    snapshot = BudgetSnapshot(path, EventCodec())
    snapshot.load()
    assert snapshot.uncounted == {"ok": Uncounted(("user:a",), 1, 2, 3, 4)}


def test_saves_never_land_an_older_view_over_a_newer_one_and_prune(tmp_path: Path) -> None:
    """An admin's save and the periodic one, writing in threads (the JSON of 10,000 held
    events: an admin's save wrote it on the event loop): a save asked for
    while another writes waits for it, then writes a document taken after it; a caller
    cancelled meanwhile does not stop its save. Each save prunes the usage decisions count
    (the admin's skipped that)."""
    from app.budgets.admin import policy_record
    from app.budgets.policy import parse_policy
    from app.http.server import BudgetViewSaver
    from tests.unit.test_budget_gate import decision, gate_with, policies, usd

    gate = gate_with(policies(**{"user:a": 5}))
    snapshot = _snapshot(tmp_path)
    snapshot.held("counted", Uncounted(("user:a",), 1, 0, 0, 3))
    snapshot.held("waiting", Uncounted(("user:a",), 1, 0, 0, 10))
    gate.on_decision(
        "user:a", decision("user:a", state="open", spent=1, limit=usd(5), counted={0: 4})
    )
    started, release = threading.Event(), threading.Event()
    write = snapshot.write
    writes: list[list[str]] = []

    def held_write(document: dict[str, Any] | None) -> None:
        if not started.is_set():  # the first write waits until the test lets it go
            started.set()
            release.wait(10)
        writes.append(sorted((document or {}).get("policies", {})))
        write(document)

    snapshot.write = held_write  # type: ignore[method-assign]

    async def run() -> None:
        saver = BudgetViewSaver(snapshot, gate)
        first = asyncio.create_task(saver.save())  # the periodic save: its write is held
        await asyncio.to_thread(started.wait, 10)
        change = policy_record(parse_policy("user:new", {"limit_usd": 1}), "admin")
        snapshot.record("policies", "user:new", change)  # an admin's change, then its save
        cancelled = asyncio.create_task(saver.save())
        second = asyncio.create_task(saver.save())  # joins the save asked for just before
        await asyncio.sleep(0.2)  # a save that did not wait would have written by now
        cancelled.cancel()
        release.set()
        await asyncio.gather(first, second)
        with contextlib.suppress(asyncio.CancelledError):
            await cancelled
        await saver.save()  # nothing changed since: nothing written

    asyncio.run(run())
    assert writes == [[], ["user:new"]], "an older view was written after the newer one"
    saved = json.loads(snapshot.path.read_text())
    assert list(saved["policies"]) == ["user:new"]
    assert list(saved["uncounted"]) == ["waiting"], "a save did not prune the counted usage"


@pytest.mark.parametrize("events", [0, 1, 1201])
def test_the_saved_file_is_the_views_json_and_loads_back(tmp_path: Path, events: int) -> None:
    """The file is one ``orjson.dumps`` (UTF-8, not ASCII-escaped as ``json.dumps`` wrote
    it): the view's JSON, held usage in the order it was held, read back as it was, a scope
    not in ASCII included; the file written before stays readable."""
    import base64

    from app.budgets.admin import policy_record
    from app.budgets.policy import parse_policy

    snapshot = _snapshot(tmp_path)
    record = policy_record(parse_policy("user:a", {"limit_usd": 1}), "admin")
    snapshot.record("policies", "user:a", record)
    for n in range(events):
        snapshot.held(f"evt-{n}", Uncounted(("user:名前", "global"), n + 1, n, n % 3, n))
    expected = {
        "policies": {"user:a": base64.b64encode(snapshot.values["policies"]["user:a"]).decode()},
        "decisions": {},
        "uncounted": {key: entry.to_json() for key, entry in snapshot.uncounted.items()},
    }
    snapshot.save()
    saved = json.loads(snapshot.path.read_bytes())
    assert saved == expected
    assert list(saved["uncounted"]) == [f"evt-{n}" for n in range(events)]
    assert not snapshot.path.with_suffix(".tmp").exists()
    for text in (snapshot.path.read_text(encoding="utf-8"), json.dumps(expected)):  # now, before
        snapshot.path.write_text(text, encoding="utf-8")
        again = _snapshot(tmp_path)
        [(scope, loaded)] = again.load()["policies"].items()
        assert (scope, loaded["event_id"], loaded["limit_usd_nanos"]) == (
            "user:a",
            record["event_id"],
            record["limit_usd_nanos"],
        )
        assert again.uncounted == snapshot.uncounted


def test_a_saved_entry_orjson_could_not_write_back_is_dropped(tmp_path: Path) -> None:
    """The file read back is ``json.loads``'s: it takes integers of any size and lone
    surrogates (``"\\ud800"``), which ``orjson.dumps`` refuses (a ``TypeError``: the save
    failing for ever, an admin's change answered 500). Such an entry is dropped at load, as
    other bad ones are; the save after it writes the rest."""
    path = tmp_path / "budget-view.json"
    ok = [["user:a"], 1, 2, 3, 4]
    uncounted = {
        "huge": [["user:a"], 2**64, 2, 3, 4],
        "surrogate-scope": [["user:\ud800"], 1, 2, 3, 4],
        "\udc00": ok,
        "ok": ok,
    }
    path.write_text(json.dumps({"policies": {}, "decisions": {}, "uncounted": uncounted}))
    snapshot = BudgetSnapshot(path, EventCodec())
    snapshot.load()
    assert snapshot.uncounted == {"ok": Uncounted(("user:a",), 1, 2, 3, 4)}
    snapshot.held("new", Uncounted(("user:a",), 5, 6, 0, 7))
    snapshot.save()
    assert list(json.loads(path.read_bytes())["uncounted"]) == ["ok", "new"]


def test_a_save_prunes_in_a_thread_while_the_loop_holds_more_usage(tmp_path: Path) -> None:
    """The prune before a save looked each held event's scopes up on the event loop (10,000
    events: an admin's answer waited for it, and so did every call). It runs in the save's
    thread now, on a copy taken on the loop: the loop holds more usage and takes an admin's
    change meanwhile (iterating the held dict itself would break on its change of size),
    those stay for the next save, and what the copy's prune dropped leaves the held view."""
    from app.budgets.admin import policy_record
    from app.budgets.policy import parse_policy
    from app.http.server import BudgetViewSaver
    from tests.unit.test_budget_gate import decision, gate_with, policies, usd

    gate = gate_with(policies(**{"user:a": 5}))
    gate.on_decision(
        "user:a", decision("user:a", state="open", spent=1, limit=usd(5), counted={0: 4})
    )
    snapshot = _snapshot(tmp_path)
    for offset in range(8):  # offsets 0-3 counted, 4-7 waiting
        snapshot.held(f"evt-{offset}", Uncounted(("user:a",), 1, offset, 0, offset))
    started, release = threading.Event(), threading.Event()
    lookup = gate.counted_if_capped
    released_while_pruning: list[bool] = []

    def held_lookup(scope: str) -> dict[int, int] | None:
        if not started.is_set():  # the first lookup waits until the loop has gone on
            started.set()
            released_while_pruning.append(release.wait(20))
        return lookup(scope)

    gate.counted_if_capped = held_lookup  # type: ignore[method-assign]

    async def run() -> None:
        saver = BudgetViewSaver(snapshot, gate)
        save = asyncio.create_task(saver.save())
        await asyncio.to_thread(started.wait, 10)
        for offset in range(8, 11):  # the loop goes on while the save prunes
            snapshot.held(f"evt-{offset}", Uncounted(("user:b",), 1, offset, 0, offset))
        change = policy_record(parse_policy("user:new", {"limit_usd": 1}), "admin")
        snapshot.record("policies", "user:new", change)
        release.set()
        await save
        saved = json.loads(snapshot.path.read_text())
        assert list(saved["uncounted"]) == [f"evt-{n}" for n in range(4, 8)]
        assert list(saved["policies"]) == [], "the save's document was taken before the change"
        assert list(snapshot.uncounted) == [f"evt-{n}" for n in range(4, 11)]
        assert snapshot.dirty
        gate.counted_if_capped = lookup  # type: ignore[method-assign]
        await saver.save()  # the next one: what the loop did meanwhile, user:b's usage pruned

    asyncio.run(run())
    assert released_while_pruning == [True], "the prune held the event loop"
    saved = json.loads(snapshot.path.read_text())
    assert list(saved["policies"]) == ["user:new"]
    assert list(saved["uncounted"]) == [f"evt-{n}" for n in range(4, 8)]
    assert list(snapshot.uncounted) == [f"evt-{n}" for n in range(4, 8)]
    assert not snapshot.dirty, "what the save pruned and wrote is written again"
