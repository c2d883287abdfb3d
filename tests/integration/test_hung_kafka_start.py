"""A dispatcher (re)started while Kafka is hung: the broker accepts TCP but never answers
(its java process SIGSTOPped). Probe D1: the start-up waited for the budget views (10 s),
then for the shared router model (up to 30 s), one after the other, and listened ~43 s
later; a broker that refused connections gave a listener in 2 s."""

from __future__ import annotations

import asyncio
import json
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import httpx
import pytest

from app.budgets.policy import evaluate, parse_policy
from app.budgets.spend import decision_record
from app.events.codec import EventCodec
from app.events.topics import ensure_topics
from app.routing.config import RoutingSettings
from app.settings import Settings
from tests.integration.harness import (
    frozen_kafka,
    read_events,
    running_stack,
    same_partition_user,
    wait_until,
)

pytestmark = pytest.mark.integration
CALL = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "served while hung"}]}
USAGE = {"model": "gpt-4o", "prompt_tokens": 4000, "completion_tokens": 200}  # $0.012


def _decision(who: str, limit_usd: float, spent: int, ts: datetime) -> dict[str, Any]:
    policy = parse_policy(f"user:{who}", {"limit_usd": limit_usd})
    return decision_record(
        f"user:{who}", policy, policy.period_at(ts), spent, ts,
        evaluate(spent, policy), ts, "spend", {0: 0},
    )  # fmt: skip


async def _publish(
    settings: Settings, who: str, record: dict[str, Any], partition: int | None = None
) -> int:
    """One decision on the decisions topic, as a spend worker writes it; its partition."""
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all")
    await producer.start()
    try:
        sent = await producer.send_and_wait(
            settings.topic("budget.decisions"),
            EventCodec().encode("BudgetDecision", record),
            key=f"user:{who}".encode(),
            partition=partition,
        )
        return int(sent.partition)
    finally:
        await producer.stop()


def _wait_decided(url: str, who: str) -> None:
    status_url = f"{url}/v1/budgets/user:{who}/status"
    wait_until(
        lambda: httpx.get(status_url, timeout=30).json()["decided_by"] == "spend_worker",
        f"the dispatcher never read the decision of {who}",
        time.monotonic() + 60,
    )


def _depth(url: str) -> float:
    for line in httpx.get(f"{url}/metrics", timeout=5).text.splitlines():
        if line.startswith("tollgate_spool_depth "):
            return float(line.split()[1])
    raise AssertionError("no tollgate_spool_depth metric")


def test_a_dispatcher_started_while_kafka_is_hung_serves_from_its_saved_view(
    kafka_settings: Settings, kafka_launcher: Any
) -> None:
    asyncio.run(ensure_topics(kafka_settings))
    user = "hung-start"
    routing = RoutingSettings(shared_learning=True)  # the start also reads routing.state
    with running_stack(kafka_settings, routing=routing) as stack:
        state_dir = stack.settings.state_dir
        put = httpx.put(f"{stack.url}/v1/budgets/user:{user}", json={"limit_usd": 0.01})
        assert put.is_success, put.text
        saved = state_dir / "budget-view.json"  # saved every second once read back from Kafka
        wait_until(
            lambda: saved.exists() and f"user:{user}" in json.loads(saved.read_text())["policies"],
            "the policy never reached the saved view",
            time.monotonic() + 30,
        )

    served: list[str] = []
    with frozen_kafka(kafka_launcher) as thaw:
        # The harness waits for the listener up to 30 s: the old start needed ~40 s here.
        # The wait for Kafka's first answer is short; what the test checks is that the
        # dispatcher serves while the broker is still frozen (no SIGCONT before).
        hung = running_stack(
            kafka_settings,
            routing=routing,
            state_dir=state_dir,
            start_kafka_answer_wait_s=1.0,
        )
        with hung as stack:
            try:
                assert httpx.get(f"{stack.url}/healthz", timeout=10).status_code == 200
                for i in range(3):
                    response = httpx.post(
                        f"{stack.url}/v1/chat/completions",
                        json={**CALL, "user": f"hung-{i}"},
                        timeout=30,
                    )
                    assert response.status_code == 200, response.text
                    served.append(response.headers["X-Request-Id"])
                # the cap comes from the saved policy: spend past it is refused
                reported = httpx.post(
                    f"{stack.url}/v1/usage", json={**USAGE, "user_id": user}, timeout=30
                )
                assert reported.is_success, reported.text
                refused = httpx.post(
                    f"{stack.url}/v1/chat/completions",
                    json=CALL,
                    headers={"X-Tollgate-User": user},
                    timeout=30,
                )
                assert refused.status_code == 402, f"the saved cap was not enforced: {refused.text}"
                assert _depth(stack.url) > 0, "usage is spooled while Kafka is hung"

            finally:  # before the dispatcher stops: its teardown talks to Kafka
                thaw()
            wait_until(
                lambda: _depth(stack.url) <= 0,
                "the spool never drained after SIGCONT",
                time.monotonic() + 90,
            )

    usage = asyncio.run(read_events(kafka_settings, "usage", at_least=len(served) + 1))
    event_ids: dict[str, set[str]] = {}
    for event in usage:
        event_ids.setdefault(event["request_id"], set()).add(event["event_id"])
    missing = [r for r in served if r not in event_ids]
    assert not missing, f"{len(missing)} of {len(served)} calls served while hung lost usage"
    twice = {r: ids for r, ids in event_ids.items() if len(ids) > 1}
    assert not twice, f"requests with two different usage events: {twice}"
    reported_usage = [e for e in usage if e.get("user_id") == user]
    assert len({e["event_id"] for e in reported_usage}) == 1, reported_usage
    # Nothing was sent to the frozen broker (the producer never got its metadata), so
    # each usage is on the topic once, not merely once per event id.
    copies = [e["event_id"] for e in usage]
    assert len(copies) == len(set(copies)) == len(served) + 1, copies


def test_a_refused_broker_does_not_wait_out_the_answer_wait(kafka_settings: Settings) -> None:
    """A refused connection is an answer of sorts: the shared router model's read, like the
    budget views', gives up at once rather than after ``start_kafka_answer_wait_s`` (here
    longer than the harness's 30 s wait for the listener; it used to wait 30 s in all)."""
    from tests.ports import free_port

    refused = kafka_settings.model_copy(update={"kafka_bootstrap": f"127.0.0.1:{free_port()}"})
    with running_stack(
        refused, routing=RoutingSettings(shared_learning=True), start_kafka_answer_wait_s=120.0
    ) as stack:
        response = httpx.post(f"{stack.url}/v1/chat/completions", json=CALL, timeout=30)
        assert response.status_code == 200, response.text


def test_an_older_decision_read_after_a_start_without_kafka_does_not_replace_the_saved_one(
    kafka_settings: Settings, kafka_launcher: Any
) -> None:
    """A review: a start without Kafka restores the decisions saved before; when Kafka
    answers, the decisions topic is read from its beginning (its last hour is not compacted),
    and each record replaced what the gate held, so an older "open" decision of a user the
    saved view knew blocked let the user spend until the newest record was read. The topic
    here holds the user's older "open", then the newer "blocked" the saved view holds (it
    only ever holds records read from the topic), then a marker on the same partition: once
    the marker is read, the whole topic has been, and the user must still be blocked. (The
    view now applies such a read at once when caught up: no older record reaches the gate
    in between, tests/unit/test_compacted_view_order.py.)"""
    from app.http.budget_snapshot import BudgetSnapshot

    asyncio.run(ensure_topics(kafka_settings))
    user, marker = "older-decision", "older-decision-marker"
    limits = {user: 0.01, marker: 1.0}
    now = datetime.now(UTC)

    def decision(who: str, spent: int, ts: datetime) -> dict[str, Any]:
        return _decision(who, limits[who], spent, ts)

    with running_stack(kafka_settings) as stack:
        state_dir = stack.settings.state_dir
        for who, limit in limits.items():
            put = httpx.put(f"{stack.url}/v1/budgets/user:{who}", json={"limit_usd": limit})
            assert put.is_success, put.text
        older = decision(user, 0, now - timedelta(minutes=2))
        partition = asyncio.run(_publish(kafka_settings, user, older))
        asyncio.run(_publish(kafka_settings, user, decision(user, 12_000_000, now), partition))
        saved = state_dir / "budget-view.json"

        def saved_state() -> str | None:
            if not saved.exists():
                return None
            held = BudgetSnapshot(saved, EventCodec()).load()["decisions"].get(f"user:{user}")
            return None if held is None else str(held["state"])

        wait_until(  # what the dispatcher saw last, saved
            lambda: saved_state() == "blocked",
            "the blocked decision never reached the saved view",
            time.monotonic() + 30,
        )

    call = {**CALL, "max_tokens": 20}
    with (
        frozen_kafka(kafka_launcher) as thaw,
        running_stack(kafka_settings, state_dir=state_dir, start_kafka_answer_wait_s=1.0) as stack,
    ):
        try:
            headers = {"X-Tollgate-User": user}
            url = f"{stack.url}/v1/chat/completions"
            refused = httpx.post(url, json=call, headers=headers, timeout=30)
            assert refused.status_code == 402, (
                f"the saved decision was not restored: {refused.text}"
            )
        finally:
            thaw()
        asyncio.run(_publish(kafka_settings, marker, decision(marker, 1, now), partition))
        _wait_decided(stack.url, marker)
        again = httpx.post(url, json=call, headers=headers, timeout=30)
        status = httpx.get(f"{stack.url}/v1/budgets/user:{user}/status", timeout=30).json()
        assert again.status_code == 402, f"an older decision replaced the saved one: {status}"
        assert status["state"] == "blocked", status


def test_a_later_decision_with_an_older_ts_wins(kafka_settings: Settings) -> None:
    """M1 (closing 39): decisions were ordered by their ``ts``, the spend worker's wall
    clock, so a worker whose clock stepped back (or a rebalance to a worker whose clock is
    behind) had its newer decisions dropped: a newer "blocked" lost to an older "open" and
    the user was served. The topic's order is the order: a key lives in one partition."""
    asyncio.run(ensure_topics(kafka_settings))
    user, marker = "clock-stepped-back", "clock-stepped-back-marker"
    limits = {user: 0.01, marker: 1.0}
    now = datetime.now(UTC)
    with running_stack(kafka_settings) as stack:
        for who, limit in limits.items():
            put = httpx.put(f"{stack.url}/v1/budgets/user:{who}", json={"limit_usd": limit})
            assert put.is_success, put.text
        partition = asyncio.run(_publish(kafka_settings, user, _decision(user, 0.01, 0, now)))
        _wait_decided(stack.url, user)
        behind = now - timedelta(minutes=5)  # the worker's clock stepped back
        blocked = _decision(user, 0.01, 12_000_000, behind)
        asyncio.run(_publish(kafka_settings, user, blocked, partition))
        # the marker, after the blocked decision on the same partition: once it is read,
        # the blocked one has been
        asyncio.run(_publish(kafka_settings, marker, _decision(marker, 1.0, 1, behind), partition))
        _wait_decided(stack.url, marker)
        url = f"{stack.url}/v1/chat/completions"
        call = {**CALL, "max_tokens": 20}
        refused = httpx.post(url, json=call, headers={"X-Tollgate-User": user}, timeout=30)
        status = httpx.get(f"{stack.url}/v1/budgets/user:{user}/status", timeout=30).json()
        assert refused.status_code == 402, f"the later blocked decision was dropped: {status}"
        assert status["state"] == "blocked", status
    with running_stack(kafka_settings) as stack:  # a start reads the topic from its beginning
        url = f"{stack.url}/v1/chat/completions"
        refused = httpx.post(url, json=call, headers={"X-Tollgate-User": user}, timeout=30)
        status = httpx.get(f"{stack.url}/v1/budgets/user:{user}/status", timeout=30).json()
        assert refused.status_code == 402, f"the blocked decision was dropped at a start: {status}"


def _spent(url: str, user: str) -> str:
    status = httpx.get(f"{url}/v1/budgets/user:{user}/status", timeout=30).json()
    return str(status["spent_usd"])


def test_usage_the_worker_had_not_counted_is_held_once_kafka_answers_after_a_hung_start(
    kafka_settings: Settings, kafka_launcher: Any
) -> None:
    """Probe 39 ("cap doubled") and review 39b item 1: a dispatcher whose start gave up on
    a hung Kafka skipped the read-back of the usage the spend worker had not counted, for
    good: with the worker behind, a user near a cap spent again what was spent before the
    restart (twice the cap). Once the budget views catch up, that usage is now read back and
    held, and never twice what this run already holds: its own usage (spooled while Kafka was
    frozen, delivered after) and a /v1/usage retry of a record from before the restart (the
    same event id twice on the topic) each count once. The usage before the restart is
    another dispatcher's, so only the read-back knows it (this one's own spend is in its
    saved view: the next test). No spend worker runs: nothing is counted, so the gate must
    hold exactly what was spent."""
    asyncio.run(ensure_topics(kafka_settings))  # no spend worker in this test
    user = "readback-cap"
    # on the user's partition, so read back before the user's record
    retried = same_partition_user(kafka_settings, user, "readback-retry")
    before = {"model": "gpt-4o", "prompt_tokens": 4000, "completion_tokens": 200}  # $0.012
    small = {"model": "gpt-4o", "prompt_tokens": 1000, "completion_tokens": 150}  # $0.004
    retry = {**before, "user_id": retried, "request_id": "readback-rr-1"}
    call = {**CALL, "max_tokens": 20}
    with running_stack(kafka_settings) as stack:
        state_dir = stack.settings.state_dir
        for who in (user, retried):
            put = httpx.put(f"{stack.url}/v1/budgets/user:{who}", json={"limit_usd": 0.02})
            assert put.is_success, put.text
        with running_stack(kafka_settings) as other:  # another dispatcher, its own state
            first = httpx.post(f"{other.url}/v1/usage", json=retry, timeout=30)
            assert first.status_code == 202, first.text
            posted = httpx.post(
                f"{other.url}/v1/usage", json={**before, "user_id": user}, timeout=30
            )
            assert posted.status_code == 202, posted.text
            assert len(asyncio.run(read_events(kafka_settings, "usage", at_least=2))) == 2
        saved = state_dir / "budget-view.json"
        wait_until(
            lambda: (
                saved.exists()
                and all(
                    f"user:{who}" in json.loads(saved.read_text())["policies"]
                    for who in (user, retried)
                )
            ),
            "the policies never reached the saved view",
            time.monotonic() + 30,
        )

    with (
        frozen_kafka(kafka_launcher) as thaw,
        running_stack(kafka_settings, state_dir=state_dir, start_kafka_answer_wait_s=1.0) as stack,
    ):
        try:
            url = f"{stack.url}/v1/chat/completions"
            headers = {"X-Tollgate-User": user}
            # spent while Kafka is frozen: this run's own usage, held by the gate
            during = httpx.post(
                f"{stack.url}/v1/usage", json={**small, "user_id": user}, timeout=30
            )
            assert during.status_code == 202, during.text
            again = httpx.post(f"{stack.url}/v1/usage", json=retry, timeout=30)
            assert again.status_code == 202, again.text
            assert _depth(stack.url) > 0, "usage is spooled while Kafka is hung"
            under = httpx.post(url, json=call, headers=headers, timeout=30)
            assert under.status_code == 200, f"a user under the cap was refused: {under.text}"
            own = _spent(stack.url, user)  # this run's 0.004 and its call, as held
        finally:
            thaw()
        deadline = time.monotonic() + 90
        wait_until(
            lambda: _spent(stack.url, user) != own,
            lambda: (
                "the usage the worker had not counted was never read back after Kafka "
                f"answered: {_spent(stack.url, user)} held"
            ),
            deadline,
        )
        wait_until(  # this run's usage is on the topic too now
            lambda: _depth(stack.url) <= 0, "the spool never drained after SIGCONT", deadline
        )
        held = Decimal(_spent(stack.url, user))
        assert held == Decimal(own) + Decimal("0.012"), (
            f"held {held}: the spend before the restart (0.012) and this run's ({own}) "
            "must each count once"
        )
        assert _spent(stack.url, retried) == "0.012", "a retried report was held twice"
        served = httpx.post(url, json=call, headers={"X-Tollgate-User": retried}, timeout=30)
        assert served.status_code == 200, f"held twice, refused under the cap: {served.text}"
        # past the cap now: spent before the restart, and again after it
        more = httpx.post(f"{stack.url}/v1/usage", json={**small, "user_id": user}, timeout=30)
        assert more.status_code == 202, more.text
        refused = httpx.post(url, json=call, headers=headers, timeout=30)
        assert refused.status_code == 402, (
            f"served past the cap: {_spent(stack.url, user)} spent: {refused.text}"
        )


def test_spend_the_worker_had_not_counted_holds_at_a_start_while_kafka_is_still_frozen(
    kafka_settings: Settings, kafka_launcher: Any
) -> None:
    """Probe 39 ("cap doubled"): cap, spend worker stopped, calls up to the cap, Kafka frozen,
    dispatcher restarted: the user was served about twice the cap, since the restarted
    dispatcher knew only the saved policies and decisions, not the spend it had held as not
    counted. It now saves that spend with the budget view (by usage event id) and holds it
    again at such a start, while Kafka is still frozen; neither a /v1/usage retry of it nor,
    when Kafka answers, the read-back holds it a second time. A marker user's usage, on the same partition after the
    user's and sent by another dispatcher (not in this one's saved view), shows when the
    read-back has passed the user's usage. No spend worker runs: nothing is counted."""
    asyncio.run(ensure_topics(kafka_settings))  # no spend worker in this test
    user = "frozen-restart"
    marker = same_partition_user(kafka_settings, user, "frozen-marker")
    before = {"model": "gpt-4o", "prompt_tokens": 4000, "completion_tokens": 200}  # $0.012
    small = {"model": "gpt-4o", "prompt_tokens": 1000, "completion_tokens": 150}  # $0.004
    tiny = {"model": "gpt-4o-mini", "prompt_tokens": 1000, "completion_tokens": 1000}  # 0.00075
    report = {**before, "user_id": user, "request_id": "frozen-rr-1"}
    call = {**CALL, "max_tokens": 20}
    with running_stack(kafka_settings) as stack:
        state_dir = stack.settings.state_dir
        for who, limit in ((user, 0.02), (marker, 1.0)):
            put = httpx.put(f"{stack.url}/v1/budgets/user:{who}", json={"limit_usd": limit})
            assert put.is_success, put.text
        posted = httpx.post(f"{stack.url}/v1/usage", json=report, timeout=30)
        assert posted.status_code == 202, posted.text
        assert len(asyncio.run(read_events(kafka_settings, "usage", at_least=1))) == 1
        with running_stack(kafka_settings) as other:  # another dispatcher, its own state
            sent = httpx.post(f"{other.url}/v1/usage", json={**tiny, "user_id": marker}, timeout=30)
            assert sent.status_code == 202, sent.text
            assert len(asyncio.run(read_events(kafka_settings, "usage", at_least=2))) == 2
    # the view is saved at the stop: the policies, and the spend held as not counted

    with (
        frozen_kafka(kafka_launcher) as thaw,
        running_stack(kafka_settings, state_dir=state_dir, start_kafka_answer_wait_s=1.0) as stack,
    ):
        url = f"{stack.url}/v1/chat/completions"
        headers = {"X-Tollgate-User": user}
        try:
            assert _spent(stack.url, user) == "0.012", "the spend before the restart is held"
            retried = httpx.post(f"{stack.url}/v1/usage", json=report, timeout=30)
            assert retried.status_code == 202, retried.text
            # in Kafka already: answered as a repeat, not emitted (or counted) again
            assert retried.json()["events"][0]["repeat"] is True, retried.text
            assert _spent(stack.url, user) == "0.012", "a retry of it was held twice"
            under = httpx.post(url, json=call, headers=headers, timeout=30)
            assert under.status_code == 200, f"a user under the cap was refused: {under.text}"
            for _ in range(2):  # past the cap now: 0.012 before the restart, 0.008 after
                more = httpx.post(
                    f"{stack.url}/v1/usage", json={**small, "user_id": user}, timeout=30
                )
                assert more.status_code == 202, more.text
            refused = httpx.post(url, json=call, headers=headers, timeout=30)
            assert refused.status_code == 402, (
                f"served past the cap while Kafka is frozen: {_spent(stack.url, user)} "
                f"spent: {refused.text}"
            )
            held = _spent(stack.url, user)
        finally:
            thaw()
        wait_until(
            lambda: _spent(stack.url, marker) == "0.00075",
            "the read-back never reached the marker",
            time.monotonic() + 90,
        )
        assert _spent(stack.url, user) == held, "the saved spend was held twice"
        usage = asyncio.run(read_events(kafka_settings, "usage", at_least=4))
        retries = [r["request_id"] for r in usage].count(report["request_id"])
        assert retries == 1, "the retry of usage already in Kafka was emitted again"
