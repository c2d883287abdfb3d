"""TOLLGATE_BUDGETS_FILE and the admin API together, over dispatcher restarts (probe 54, F1).

Real parts: the test Kafka broker, real dispatchers (``serve``) each on a fresh state dir (a
restart elsewhere, or a new replica: only the policies topic is shared), the simulator. A
restart with the same file must not undo a cap an admin changed or removed through the API
since; an edit of the file's entry applies again.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiokafka import AIOKafkaProducer

from app.events.codec import EventCodec
from app.events.compacted import CompactedView
from app.events.producer import policy_message
from app.events.topics import ensure_topics
from app.settings import Settings
from tests.integration.harness import frozen_kafka, read_events, running_stack, wait_until

pytestmark = pytest.mark.integration
CALL = {
    "model": "gpt-4o",
    "messages": [{"role": "user", "content": "Summarise our cloud bill for the board."}],
    "max_tokens": 50,
}


def write_file(path: Path, limit_usd: str, prompt: str) -> Path:
    path.write_text(
        "budgets:\n"
        f'  "user:fileuser": {{period: day, limit_usd: {limit_usd}, upgrade_prompt: "{prompt}"}}\n'
    )
    return path


@pytest.fixture
def budgets(kafka_settings: Settings, tmp_path: Path) -> Path:
    """The topics made, and a budgets file capping user:fileuser at $5 a day."""
    asyncio.run(ensure_topics(kafka_settings))
    return write_file(tmp_path / "budgets.yaml", "5", "from file")


def write_entries(path: Path, limits_usd: dict[str, str]) -> Path:
    path.write_text(
        "budgets:\n"
        + "".join(
            f'  "{scope}": {{period: day, limit_usd: {limit}}}\n'
            for scope, limit in limits_usd.items()
        )
    )
    return path


def wait_on_topic(
    settings: Settings, check: Any, timeout_s: float = 30, scope: str = "user:fileuser"
) -> None:
    """Until the policies topic holds a record of ``scope`` that passes ``check``: the
    admin's change is in Kafka (not only in the stopped dispatcher's spool) before a restart
    on a fresh state dir."""

    async def latest() -> dict[str, Any] | None:
        view = CompactedView(settings, settings.topic("budget.policies"), EventCodec())
        await view.start(10)
        await view.stop()
        return view.records.get(scope)

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        record = asyncio.run(latest())
        if record is not None and check(record):
            return
        time.sleep(0.2)
    raise AssertionError("the admin's change never reached the policies topic")


async def send_policy_record(settings: Settings, record: dict[str, Any]) -> None:
    """``record`` on the policies topic, as another writer (a replica, an older version)."""
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all")
    await producer.start()
    try:
        message = policy_message(settings, EventCodec(), record["scope"], record)
        await producer.send_and_wait(message.topic, message.value, key=message.key)
    finally:
        await producer.stop()


def policy(url: str, scope: str = "user:fileuser") -> httpx.Response:
    return httpx.get(f"{url}/v1/budgets/{scope}", timeout=10)


def chat(url: str, user: str = "fileuser") -> httpx.Response:
    return httpx.post(
        f"{url}/v1/chat/completions",
        json=CALL,
        headers={"X-Tollgate-User": user},
        timeout=30,
    )


def test_an_api_cap_survives_a_restart_with_the_same_file_and_a_file_edit_wins_again(
    kafka_settings: Settings, budgets: Path
) -> None:
    with running_stack(kafka_settings, budgets_file=budgets) as first:
        read = policy(first.url)
        assert read.status_code == 200, read.text
        assert read.json()["limit_usd"] == "5" and read.json()["updated_by"] == "budgets_file"
        stop = httpx.put(
            f"{first.url}/v1/budgets/user:fileuser",
            json={"period": "day", "limit_usd": "0.000001", "upgrade_prompt": "stopped by admin"},
        )
        assert stop.status_code == 200, stop.text
        wait_on_topic(kafka_settings, lambda r: r["limit_usd_nanos"] == 1000)

    with running_stack(kafka_settings, budgets_file=budgets) as restarted:
        read = policy(restarted.url)
        assert read.status_code == 200, read.text
        assert read.json()["limit_usd"] == "0.000001", "the restart undid the admin's stop"
        assert read.json()["upgrade_prompt"] == "stopped by admin"
        assert read.json()["updated_by"] is None  # the admin API without keys
        refused = chat(restarted.url)
        assert refused.status_code == 402, refused.text
        assert refused.json()["error"]["scope"] == "user:fileuser"
        assert restarted.counter.calls == 0, "a stopped user reached the provider"

    # the file's entry edited after the admin's change: the file wins again
    write_file(budgets, "7", "raised in the file")
    with running_stack(kafka_settings, budgets_file=budgets) as edited:
        read = policy(edited.url)
        assert read.status_code == 200, read.text
        assert read.json()["limit_usd"] == "7" and read.json()["updated_by"] == "budgets_file"
        served = chat(edited.url)
        assert served.status_code == 200, served.text

    # and a restart with that file again changes nothing
    with running_stack(kafka_settings, budgets_file=budgets) as again:
        assert policy(again.url).json()["limit_usd"] == "7"


def test_an_api_delete_survives_a_restart_with_the_same_file(
    kafka_settings: Settings, budgets: Path
) -> None:
    with running_stack(kafka_settings, budgets_file=budgets) as first:
        assert policy(first.url).status_code == 200
        deleted = httpx.delete(f"{first.url}/v1/budgets/user:fileuser", timeout=10)
        assert deleted.status_code == 200, deleted.text
        wait_on_topic(kafka_settings, lambda r: r["deleted"])

    with running_stack(kafka_settings, budgets_file=budgets) as restarted:
        read = policy(restarted.url)
        assert read.status_code == 404, f"the restart re-created a deleted cap: {read.text}"
        listed = httpx.get(f"{restarted.url}/v1/budgets", timeout=10).json()["budgets"]
        assert "user:fileuser" not in [p["scope"] for p in listed]
        # a cap set again through the API after the delete also stays
        put = httpx.put(
            f"{restarted.url}/v1/budgets/user:fileuser", json={"period": "day", "limit_usd": 2}
        )
        assert put.status_code == 200, put.text
        wait_on_topic(kafka_settings, lambda r: r["limit_usd_nanos"] == 2_000_000_000)

    with running_stack(kafka_settings, budgets_file=budgets) as again:
        assert policy(again.url).json()["limit_usd"] == "2"

    write_file(budgets, "6", "new file entry")
    with running_stack(kafka_settings, budgets_file=budgets) as edited:
        assert policy(edited.url).json()["limit_usd"] == "6"


def test_a_start_while_kafka_is_hung_does_not_publish_the_file_over_an_api_change(
    kafka_settings: Settings, kafka_launcher: Any, budgets: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Kafka frozen at the restart: what the topic holds is unknown, so the file is not
    published blindly over the saved view (the admin's stop); once Kafka answers, the file is
    decided against the topic, which keeps the stop."""
    import json

    with running_stack(kafka_settings, budgets_file=budgets) as first:
        state_dir = first.settings.state_dir
        stop = httpx.put(
            f"{first.url}/v1/budgets/user:fileuser", json={"period": "day", "limit_usd": "0.000001"}
        )
        assert stop.status_code == 200, stop.text
        wait_on_topic(kafka_settings, lambda r: r["limit_usd_nanos"] == 1000)
        saved = state_dir / "budget-view.json"  # saved every second once read back
        wait_until(
            lambda: (
                "user:fileuser"
                in (json.loads(saved.read_text()) if saved.exists() else {}).get("policies", {})
            ),
            "the policy never reached the saved view",
            time.monotonic() + 30,
        )

    caplog.set_level("INFO", logger="app.http.server")
    with frozen_kafka(kafka_launcher) as thaw:
        hung = running_stack(
            kafka_settings, budgets_file=budgets, state_dir=state_dir, start_kafka_answer_wait_s=1.0
        )
        with hung as restarted:
            try:
                read = policy(restarted.url)
                assert read.json()["limit_usd"] == "0.000001", "the file undid the saved stop"
            finally:
                thaw()
            wait_until(
                lambda: "budgets file applied now that the policies topic was read" in caplog.text,
                "the file was never decided after SIGCONT",
                time.monotonic() + 90,
            )
            assert policy(restarted.url).json()["limit_usd"] == "0.000001"
        wait_on_topic(kafka_settings, lambda r: r["limit_usd_nanos"] == 1000)


def test_an_api_change_while_kafka_is_hung_is_in_the_saved_view_when_answered(
    kafka_settings: Settings, kafka_launcher: Any
) -> None:
    """Probe 63 D1: an admin's PUT or DELETE reached the saved budget view only once the
    policies topic was read back (then at the next one-second save), so a restart while Kafka
    did not answer, or a crash within that second, enforced the previous cap (a stopped user
    was served). The change is now saved before it is answered; a restart from the saved view
    enforces what is saved (test_hung_kafka_start.py)."""
    import json

    from app.http.budget_snapshot import BudgetSnapshot

    asyncio.run(ensure_topics(kafka_settings))
    stopped, removed = "user:saved-stop", "user:saved-gone"
    with running_stack(kafka_settings) as stack:
        saved = stack.settings.state_dir / "budget-view.json"
        for scope in (stopped, removed):
            put = httpx.put(f"{stack.url}/v1/budgets/{scope}", json={"limit_usd": "5"})
            assert put.status_code == 200, put.text
        wait_until(  # read back from Kafka and saved, before the freeze
            lambda: all(
                scope
                in (json.loads(saved.read_text()) if saved.exists() else {}).get("policies", {})
                for scope in (stopped, removed)
            ),
            "the policies never reached the saved view",
            time.monotonic() + 30,
        )
        with frozen_kafka(kafka_launcher):
            stop = httpx.put(
                f"{stack.url}/v1/budgets/{stopped}", json={"limit_usd": "0.000001"}, timeout=30
            )
            assert stop.status_code == 200, stop.text
            gone = httpx.delete(f"{stack.url}/v1/budgets/{removed}", timeout=30)
            assert gone.status_code == 200, gone.text
            policies = BudgetSnapshot(saved, EventCodec()).load()["policies"]
    assert policies[stopped]["limit_usd_nanos"] == 1000, "the admin's stop was not saved"
    assert removed not in policies, "the admin's delete was not saved"


def _spy_on_saves(monkeypatch: pytest.MonkeyPatch, delay_s: float = 0.0) -> list[Any]:
    """The threads the budget view is written in (each write, in order). ``delay_s``: each
    write waits up to that long first (random), widening the window of a race between saves."""
    import random
    import threading

    from app.http.budget_snapshot import BudgetSnapshot

    threads: list[Any] = []
    write = BudgetSnapshot.write

    def spied(self: BudgetSnapshot, document: dict[str, Any] | None) -> None:
        threads.append(threading.current_thread())
        if delay_s:
            time.sleep(random.uniform(0, delay_s))
        write(self, document)

    monkeypatch.setattr(BudgetSnapshot, "write", spied)
    return threads


def test_an_api_change_is_saved_off_the_event_loop(
    kafka_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An admin's PUT or DELETE wrote the whole saved view (JSON of up to 10,000 held usage
    events) in its handler, on the event loop every call waits on. It is still
    saved before it is answered, but written in a thread."""
    from app.http.budget_snapshot import BudgetSnapshot

    asyncio.run(ensure_topics(kafka_settings))
    threads = _spy_on_saves(monkeypatch)
    scope = "user:saved-off-loop"
    with running_stack(kafka_settings) as stack:
        saved = BudgetSnapshot(stack.settings.state_dir / "budget-view.json", EventCodec())
        put = httpx.put(f"{stack.url}/v1/budgets/{scope}", json={"limit_usd": "5"})
        assert put.status_code == 200, put.text
        assert saved.load()["policies"][scope]["limit_usd_nanos"] == 5_000_000_000
        gone = httpx.delete(f"{stack.url}/v1/budgets/{scope}")
        assert gone.status_code == 200, gone.text
        assert scope not in saved.load()["policies"]
        on_loop = [thread for thread in threads if thread is stack.loop.thread]
    assert threads, "nothing was saved"
    assert not on_loop, f"{len(on_loop)} of {len(threads)} saves ran on the event loop"


def test_concurrent_api_changes_and_the_periodic_save_never_lose_a_change(
    kafka_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Admin saves, the periodic save (every 50 ms here) and the policies read back from
    Kafka, all at once: once a PUT is answered, every later read of the saved view holds it
    (or a later change of that scope), never an older one. Each write waits up to 20 ms in
    its thread first, so saves overlap if they can: an older document written over a newer
    one, or two writes of one temporary file, would show here."""
    import threading

    from app.http import server
    from app.http.budget_snapshot import BudgetSnapshot

    asyncio.run(ensure_topics(kafka_settings))
    monkeypatch.setattr(server, "SAVE_EVERY_S", 0.05)
    _spy_on_saves(monkeypatch, delay_s=0.02)
    scopes = [f"user:concurrent-{n}" for n in range(4)]
    answered = dict.fromkeys(scopes, 0)  # the last limit (USD) answered, per scope
    errors: list[str] = []
    done = threading.Event()
    with running_stack(kafka_settings) as stack:
        path = stack.settings.state_dir / "budget-view.json"

        def admin(scope: str) -> None:
            with httpx.Client(timeout=30) as client:
                for limit in range(1, 11):
                    put = client.put(f"{stack.url}/v1/budgets/{scope}", json={"limit_usd": limit})
                    if put.status_code != 200:
                        errors.append(put.text)
                        return
                    answered[scope] = limit

        def reader() -> None:
            while not done.is_set():
                expected = dict(answered)  # before the read: the file must hold at least these
                policies = BudgetSnapshot(path, EventCodec()).load()["policies"]
                for scope, limit in expected.items():
                    if not limit:
                        continue
                    record = policies.get(scope)
                    got = None if record is None else record["limit_usd_nanos"] // 10**9
                    if got is None or got < limit:
                        errors.append(f"{scope}: {limit} was answered, the saved view has {got}")

        readers = [threading.Thread(target=reader)]
        admins = [threading.Thread(target=admin, args=(scope,)) for scope in scopes]
        for thread in readers + admins:
            thread.start()
        for thread in admins:
            thread.join(120)
        time.sleep(1)  # the echoes from Kafka and a few periodic saves more
        done.set()
        readers[0].join(30)
    assert not errors, errors[:5]
    assert answered == dict.fromkeys(scopes, 10)


def test_an_entry_dropped_from_the_file_is_removed_unless_the_api_changed_it_since(
    kafka_settings: Settings, tmp_path: Path
) -> None:
    """An operator deletes a cap from the file and restarts: the cap the file published is
    removed (it was still enforced: a stopped user stayed stopped), once, however many
    replicas start with that file; a dropped scope an admin changed through the API after
    the file published it keeps the admin's cap. Named again, the entry is published again."""
    asyncio.run(ensure_topics(kafka_settings))
    stopped, changed, staying = "user:dropped", "user:admin-kept", "user:fileuser"
    budgets = write_entries(
        tmp_path / "budgets.yaml", {stopped: "0.000001", changed: "4", staying: "5"}
    )
    with running_stack(kafka_settings, budgets_file=budgets) as first:
        for scope in (stopped, changed, staying):
            assert policy(first.url, scope).status_code == 200, scope
        assert chat(first.url, "dropped").status_code == 402
        put = httpx.put(f"{first.url}/v1/budgets/{changed}", json={"limit_usd": "3"}, timeout=10)
        assert put.status_code == 200, put.text
        wait_on_topic(kafka_settings, lambda r: r["limit_usd_nanos"] == 3 * 10**9, scope=changed)

    write_entries(budgets, {staying: "5"})
    with running_stack(kafka_settings, budgets_file=budgets) as restarted:
        gone = policy(restarted.url, stopped)
        assert gone.status_code == 404, (
            f"a cap dropped from the file is still enforced: {gone.text}"
        )
        listed = httpx.get(f"{restarted.url}/v1/budgets", timeout=10).json()["budgets"]
        assert stopped not in [p["scope"] for p in listed]
        served = chat(restarted.url, "dropped")
        assert served.status_code == 200, served.text
        kept = policy(restarted.url, changed)
        assert kept.status_code == 200, "the admin's change was removed with the file's entry"
        assert kept.json()["limit_usd"] == "3" and kept.json()["updated_by"] is None
        assert policy(restarted.url, staying).json()["limit_usd"] == "5"
    wait_on_topic(kafka_settings, lambda r: r["deleted"], scope=stopped)

    with running_stack(kafka_settings, budgets_file=budgets) as replica:  # another replica
        assert policy(replica.url, stopped).status_code == 404
        assert policy(replica.url, changed).json()["limit_usd"] == "3"
    records = asyncio.run(read_events(kafka_settings, "budget.policies", at_least=5))
    removals = [r for r in records if r["scope"] == stopped and r["deleted"]]
    assert len(removals) == 1, f"a start with the same file removed the scope again: {removals}"
    assert removals[0]["updated_by"] == "budgets_file"

    write_entries(budgets, {stopped: "2", staying: "5"})  # named again: published again
    with running_stack(kafka_settings, budgets_file=budgets) as again:
        read = policy(again.url, stopped)
        assert read.status_code == 200, read.text
        assert read.json()["limit_usd"] == "2" and read.json()["updated_by"] == "budgets_file"


def test_an_api_change_written_before_records_carried_the_files_digest_is_kept(
    kafka_settings: Settings, tmp_path: Path
) -> None:
    """The first start after the upgrade to BudgetPolicy v2 met an admin's stop written by an
    older version (no file_digest) and published the file over it. It keeps the stop now,
    takes the file's entry as the one last published, and a later edit of it applies."""
    from app.budgets.admin import policy_record
    from app.budgets.policy import parse_policy

    asyncio.run(ensure_topics(kafka_settings))
    budgets = write_file(tmp_path / "budgets.yaml", "5", "from file")
    with running_stack(kafka_settings, budgets_file=budgets) as first:
        assert policy(first.url).json()["limit_usd"] == "5"

    stop = parse_policy("user:fileuser", {"period": "day", "limit_usd": "0.000001"})
    # file_digest null: as an older version's record reads
    asyncio.run(send_policy_record(kafka_settings, policy_record(stop, "admin-key")))
    wait_on_topic(kafka_settings, lambda r: r["limit_usd_nanos"] == 1000)
    for _ in range(2):  # the start that meets it, and the next
        with running_stack(kafka_settings, budgets_file=budgets) as upgraded:
            read = policy(upgraded.url)
            assert read.json()["limit_usd"] == "0.000001", "the upgrade undid the admin's stop"
            assert read.json()["updated_by"] == "admin-key"
            assert chat(upgraded.url).status_code == 402
        wait_on_topic(kafka_settings, lambda r: bool(r["file_digest"]))

    write_file(budgets, "7", "raised in the file")
    with running_stack(kafka_settings, budgets_file=budgets) as edited:
        read = policy(edited.url)
        assert read.json()["limit_usd"] == "7" and read.json()["updated_by"] == "budgets_file"


def test_an_emptied_file_removes_the_files_caps_once_a_hung_kafka_answers(
    kafka_settings: Settings, kafka_launcher: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """``budgets: {}`` at a start while Kafka is frozen: decided once the policies topic is
    read, as a file with entries is (an empty list of entries was taken for no file)."""
    import os
    import signal

    asyncio.run(ensure_topics(kafka_settings))
    budgets = write_file(tmp_path / "budgets.yaml", "5", "from file")
    with running_stack(kafka_settings, budgets_file=budgets) as first:
        assert policy(first.url).status_code == 200
    budgets.write_text("budgets: {}\n")
    pid = kafka_launcher.status().pid
    assert pid is not None, "the session broker is not running"
    caplog.set_level("INFO", logger="app.http.server")
    os.kill(pid, signal.SIGSTOP)
    try:
        hung = running_stack(kafka_settings, budgets_file=budgets, start_kafka_answer_wait_s=1.0)
        with hung as restarted:
            os.kill(pid, signal.SIGCONT)
            deadline = time.monotonic() + 90
            while "budgets file applied now that the policies topic was read" not in caplog.text:
                assert time.monotonic() < deadline, "the emptied file was never applied"
                time.sleep(0.2)
            assert policy(restarted.url).status_code == 404
            wait_on_topic(kafka_settings, lambda r: r["deleted"], timeout_s=60)
    finally:
        os.kill(pid, signal.SIGCONT)


def test_an_admin_change_made_before_another_replicas_file_record_was_read_is_kept(
    kafka_settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another replica's start published the edited file's entry; an admin's stop at a
    dispatcher that had not read that record yet carried the older entry's digest, so the
    next start with the edited file published it over the stop. Once the dispatcher reads
    the file's record before its own, it sends the stop again naming the newer entry.
    The dispatcher's lag is made certain: its policies view holds the scope's records until
    the stop is answered, then reads them in the topic's order."""
    import threading

    from app.budgets.admin import file_policy_record, load_budgets_file

    asyncio.run(ensure_topics(kafka_settings))
    budgets = write_file(tmp_path / "budgets.yaml", "5", "from file")
    edited = write_file(tmp_path / "edited.yaml", "7", "raised in the file")
    newer = file_policy_record(load_budgets_file(edited)[0])
    original = CompactedView._apply
    held: list[tuple[Any, ...]] = []
    holding = threading.Event()
    with running_stack(kafka_settings, budgets_file=budgets) as stack:
        assert policy(stack.url).json()["limit_usd"] == "5"

        def lagging(view: CompactedView, *args: Any) -> None:
            if (
                holding.is_set()
                and threading.current_thread() is stack.loop.thread
                and view.topic == kafka_settings.topic("budget.policies")
                and args[0] == b"user:fileuser"
            ):
                held.append((view, *args))
                return
            original(view, *args)

        monkeypatch.setattr(CompactedView, "_apply", lagging)
        holding.set()
        asyncio.run(send_policy_record(kafka_settings, newer))  # the other replica's start
        wait_on_topic(kafka_settings, lambda r: r["event_id"] == newer["event_id"])
        stop = httpx.put(
            f"{stack.url}/v1/budgets/user:fileuser",
            json={"period": "day", "limit_usd": "0.000001"},
            timeout=10,
        )
        assert stop.status_code == 200, stop.text
        wait_on_topic(kafka_settings, lambda r: r["limit_usd_nanos"] == 1000)

        async def read_on() -> None:
            holding.clear()
            for args in held:
                original(*args)

        stack.loop.run(read_on())
        assert held, "the view did not hold the file's record"  # (the stop's, if read by now)
        wait_on_topic(
            kafka_settings,
            lambda r: r["limit_usd_nanos"] == 1000 and r["file_digest"] == newer["file_digest"],
        )

    with running_stack(kafka_settings, budgets_file=edited) as restarted:
        read = policy(restarted.url)
        assert read.json()["limit_usd"] == "0.000001", "the edited file undid the admin's stop"
