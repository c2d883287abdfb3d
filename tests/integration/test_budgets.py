"""Budget caps with real parts: Kafka, the Faust spend worker process, dispatchers, simulator."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import bpe_openai
import httpx
import pytest

from app.events.topics import ensure_topics
from app.metering.usage import UsageProducer
from app.pricing.tokens import count_tokens
from app.settings import Settings
from tests.integration.harness import (
    Stack,
    WorkerProcess,
    publish_policy,
    read_events,
    wait_for_decision,
    wait_worker_ready,
)

pytestmark = pytest.mark.integration
CALL = {
    "model": "gpt-4o",
    "messages": [{"role": "user", "content": "Draft the renewal email for our largest client."}],
    "max_tokens": 300,
}
FIXED_OUTPUT = {"X-Sim-Completion-Tokens": "200"}  # 200 gpt-4o output tokens = $0.002 a call


@pytest.fixture
def worker(kafka_settings: Settings, tmp_path: Path) -> Iterator[WorkerProcess]:
    asyncio.run(ensure_topics(kafka_settings))
    process = WorkerProcess(kafka_settings, tmp_path / "worker.log")
    process.start()
    try:
        wait_worker_ready(kafka_settings)
        yield process
    finally:
        process.stop()


@pytest.fixture
def stack(kafka_settings: Settings, worker: WorkerProcess) -> Iterator[Stack]:
    running = Stack(kafka_settings)
    running.start()
    try:
        yield running
    finally:
        running.stop()


def spend_until_402(
    url: str, headers: dict[str, str], limit: int = 200
) -> tuple[int, httpx.Response]:
    with httpx.Client(timeout=30) as http:
        for served in range(limit):
            response = http.post(f"{url}/v1/chat/completions", json=CALL, headers=headers)
            if response.status_code == 402:
                return served, response
            assert response.status_code == 200, response.text
    raise AssertionError(f"no 402 after {limit} calls")


def test_user_cap_answers_402_with_upgrade_prompt_and_no_upstream_call(stack: Stack) -> None:
    put = httpx.put(
        f"{stack.url}/v1/budgets/user:alice",
        json={
            "period": "month",
            "limit_usd": 0.05,
            "upgrade_url": "https://example.com/upgrade",
            "upgrade_prompt": "Upgrade to Pro for a $50 monthly budget.",
        },
    )
    assert put.status_code == 200, put.text
    headers = {"X-Tollgate-User": "alice", **FIXED_OUTPUT}
    served, blocked = spend_until_402(stack.url, headers)
    assert 20 <= served <= 26  # $0.05 / ~$0.002 a call

    error = blocked.json()["error"]
    assert error["type"] == "budget_exceeded"
    assert error["scope"] == "user:alice"
    assert error["limit_usd"] == 0.05
    assert error["spent_usd"] >= 0.05
    assert error["period"] == "month"
    now = datetime.now(UTC)
    next_month = datetime(now.year + (now.month == 12), now.month % 12 + 1, 1, tzinfo=UTC)
    assert error["resets_at"] == next_month.isoformat()
    assert error["upgrade_url"] == "https://example.com/upgrade"
    assert "Upgrade to Pro" in error["upgrade_prompt"] and "Upgrade to Pro" in error["message"]

    calls_at_provider = stack.counter.calls
    with httpx.Client() as http:
        for _ in range(5):
            again = http.post(f"{stack.url}/v1/chat/completions", json=CALL, headers=headers)
            assert again.status_code == 402
    assert stack.counter.calls == calls_at_provider, "a blocked request reached the provider"
    other = httpx.post(
        f"{stack.url}/v1/chat/completions", json=CALL, headers={"X-Tollgate-User": "bob"}
    )
    assert other.status_code == 200, "other users are not affected"

    decision = wait_for_decision(stack.settings, "user:alice", lambda d: d["state"] == "blocked")
    assert decision["spent_usd_nanos"] >= 50_000_000
    status = httpx.get(f"{stack.url}/v1/budgets/user:alice/status").json()
    assert status["state"] == "blocked" and status["resets_at"] == next_month.isoformat()

    requests = asyncio.run(read_events(stack.settings, "requests", at_least=served + 7))
    blocked_events = [r for r in requests if r["status"] == "blocked"]
    assert len(blocked_events) == 6
    assert all(
        r["blocked_scope"] == "user:alice" and r["reason"] == "budget_exceeded"
        for r in blocked_events
    )

    alerts = asyncio.run(read_events(stack.settings, "alerts", at_least=3))
    crossed = sorted(float(a["details"]["threshold"]) for a in alerts if a["scope"] == "user:alice")
    assert crossed == [0.5, 0.8, 1.0], "one alert per soft threshold per period"


def test_usage_reports_are_recorded_even_when_blocked(stack: Stack) -> None:
    httpx.put(f"{stack.url}/v1/budgets/user:carol", json={"limit_usd": 0.01})
    spend_until_402(stack.url, {"X-Tollgate-User": "carol", **FIXED_OUTPUT})
    report = httpx.post(
        f"{stack.url}/v1/usage",
        json={"model": "gpt-4o", "prompt_tokens": 100, "completion_tokens": 10, "user_id": "carol"},
    )
    assert report.status_code == 202


def test_two_dispatchers_share_one_cap(stack: Stack, kafka_settings: Settings) -> None:
    second = Stack(kafka_settings)
    second.start()
    try:
        httpx.put(f"{stack.url}/v1/budgets/user:dana", json={"limit_usd": 0.03})
        wait_for_policy(second.url, "user:dana")
        headers = {"X-Tollgate-User": "dana", **FIXED_OUTPUT}
        spend_until_402(stack.url, headers)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            response = httpx.post(f"{second.url}/v1/chat/completions", json=CALL, headers=headers)
            if response.status_code == 402:
                break
            time.sleep(0.2)
        assert response.status_code == 402, "the other dispatcher must block after the breach"
        assert response.json()["error"]["scope"] == "user:dana"
    finally:
        second.stop()


def wait_for_policy(url: str, scope: str, timeout_s: float = 15) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if httpx.get(f"{url}/v1/budgets/{scope}").status_code == 200:
            return
        time.sleep(0.2)
    raise AssertionError(f"{scope} policy never reached {url}")


@pytest.mark.parametrize(
    ("scope", "headers"),
    [
        ("feature:search", {"X-Tollgate-User": "erin", "X-Tollgate-Feature": "search"}),
        ("global", {"X-Tollgate-User": "frank"}),
    ],
)
def test_feature_and_global_caps_block_like_user_caps(
    stack: Stack, scope: str, headers: dict[str, str]
) -> None:
    httpx.put(f"{stack.url}/v1/budgets/{scope}", json={"period": "day", "limit_usd": 0.02})
    served, blocked = spend_until_402(stack.url, {**headers, **FIXED_OUTPUT})
    assert blocked.json()["error"]["scope"] == scope
    assert 8 <= served <= 12
    decision = wait_for_decision(stack.settings, scope, lambda d: d["state"] == "blocked")
    assert decision["spent_usd_nanos"] >= 20_000_000
    if scope == "global":
        other = httpx.post(
            f"{stack.url}/v1/chat/completions", json=CALL, headers={"X-Tollgate-User": "zed"}
        )
        assert other.status_code == 402


def test_late_event_counts_in_the_month_of_its_timestamp(
    kafka_settings: Settings, worker: WorkerProcess
) -> None:
    # Last month may be up to 33 days back: wider than the default lateness window (7 days).
    stack = Stack(kafka_settings, usage_max_lateness_s=40 * 86400)
    stack.start()
    try:
        _late_event_counts_in_the_month_of_its_timestamp(stack)
    finally:
        stack.stop()


def _late_event_counts_in_the_month_of_its_timestamp(stack: Stack) -> None:
    httpx.put(f"{stack.url}/v1/budgets/user:gus", json={"limit_usd": 1})
    now = datetime.now(UTC)
    last_month = now.replace(day=1) - timedelta(days=2)
    response = httpx.post(
        f"{stack.url}/v1/usage",
        json=[
            {
                "model": "gpt-4",
                "prompt_tokens": 10000,
                "completion_tokens": 5000,
                "user_id": "gus",
                "ts": last_month.isoformat(),
            },  # $0.60, last month
            {
                "model": "gpt-4o-mini",
                "prompt_tokens": 1000,
                "completion_tokens": 100,
                "user_id": "gus",
            },
        ],
    )
    assert response.status_code == 202
    this_month_cost = 1000 * 150 + 100 * 600  # gpt-4o-mini nanos per token: 150 in, 600 out
    decision = wait_for_decision(stack.settings, "user:gus", lambda d: d["spent_usd_nanos"] > 0)
    time.sleep(1.0)  # let a late refresh land if there were one
    decision = wait_for_decision(stack.settings, "user:gus")
    assert decision["spent_usd_nanos"] == this_month_cost
    assert decision["period_start"] == datetime(now.year, now.month, 1, tzinfo=UTC)


def test_period_rollover_reopens_without_new_traffic(
    kafka_settings: Settings, tmp_path: Path
) -> None:
    """Blocked just before midnight on the last day of October; open right after, no traffic."""
    asyncio.run(ensure_topics(kafka_settings))
    clock_start = datetime(2026, 10, 31, 23, 59, 0, tzinfo=UTC)
    midnight = datetime(2026, 11, 1, tzinfo=UTC)
    started = time.time()
    worker = WorkerProcess(
        kafka_settings, tmp_path / "worker.log", TOLLGATE_CLOCK_START=clock_start.isoformat()
    )
    worker.start()

    def fake_now() -> datetime:
        return clock_start + timedelta(seconds=time.time() - started)

    try:
        wait_worker_ready(kafka_settings, now=fake_now)
        stack = Stack(kafka_settings, clock_start=fake_now())  # same fake time as the worker
        stack.start()
        try:
            if midnight - fake_now() < timedelta(seconds=10):
                pytest.skip("the machine was too slow to start the worker before fake midnight")
            httpx.put(
                f"{stack.url}/v1/budgets/user:hana", json={"period": "month", "limit_usd": 0.01}
            )
            report = httpx.post(
                f"{stack.url}/v1/usage",
                json={
                    "model": "gpt-4",
                    "prompt_tokens": 1000,
                    "completion_tokens": 500,
                    "user_id": "hana",
                    "ts": fake_now().isoformat(),
                },  # $0.06 > $0.01
            )
            assert report.status_code == 202
            blocked = wait_for_decision(
                kafka_settings, "user:hana", lambda d: d["state"] == "blocked"
            )
            assert blocked["resets_at"] == midnight
            assert (
                httpx.get(f"{stack.url}/v1/budgets/user:hana/status").json()["state"] == "blocked"
            )
            assert fake_now() < midnight, "blocked before midnight"

            reopened = wait_for_decision(
                kafka_settings,
                "user:hana",
                lambda d: d["reason"] == "period_rollover",
                timeout_s=90,
            )
            assert reopened["state"] == "open"
            assert reopened["period_start"] == midnight
            assert reopened["spent_usd_nanos"] == 0
            # Decided at the worker's clock past midnight, not before (how soon after it is a
            # timing of this machine's load, not asserted here: it failed at load 15-20)
            assert reopened["ts"] >= midnight, "re-opened before the period ended"
            after = httpx.get(f"{stack.url}/v1/budgets/user:hana/status").json()
            assert after["state"] == "open" and after["period_start"] == midnight.isoformat()
            call = httpx.post(
                f"{stack.url}/v1/chat/completions", json=CALL, headers={"X-Tollgate-User": "hana"}
            )
            assert call.status_code == 200
        finally:
            stack.stop()
    finally:
        worker.stop()


def test_worker_killed_mid_stream_recovers_its_totals(
    kafka_settings: Settings, tmp_path: Path
) -> None:
    asyncio.run(ensure_topics(kafka_settings))
    asyncio.run(publish_policy(kafka_settings, "user:*", {"period": "month", "limit_usd": 1000}))
    worker = WorkerProcess(kafka_settings, tmp_path / "worker.log")
    worker.start()
    wait_worker_ready(kafka_settings)
    users = [f"kill-{i}" for i in range(4)]
    expected: dict[str, int] = dict.fromkeys(users, 0)

    async def produce(count: int) -> None:
        producer = UsageProducer(kafka_settings)
        await producer.start()
        try:
            for i in range(count):
                user = users[i % len(users)]
                record = await producer.report(
                    model="gpt-4o",
                    prompt_tokens=500 + i,
                    completion_tokens=50 + i % 7,
                    user_id=user,
                )
                expected[user] += record["cost_usd_nanos"]
                if i % 50 == 0:
                    await asyncio.sleep(0.05)
        finally:
            await producer.stop()

    try:
        asyncio.run(produce(300))
        worker.kill()  # SIGKILL, whatever it was doing
        asyncio.run(produce(300))
        worker.start()
        for user in users:
            decision = wait_for_decision(
                kafka_settings,
                f"user:{user}",
                lambda d, u=user: d["spent_usd_nanos"] >= expected[u],
                90,
            )
            over = decision["spent_usd_nanos"] - expected[user]
            # At-least-once may only over-count; the offset marks in the changelog make it exact.
            assert over == 0, f"{user}: over-counted by {over} nano-USD after the crash"
    finally:
        worker.stop()


def test_every_choice_of_n_is_priced_so_n_cannot_overshoot_a_cap(stack: Stack) -> None:
    """``n`` answers are each up to ``max_tokens`` long and all billed: the gate must price
    every choice. Before, it priced one: ``n: 20`` under a $0.02 cap was served 20 answers
    and spent $0.40 (a newcomer's probe, with a provider that honours ``n``)."""
    httpx.put(f"{stack.url}/v1/budgets/user:nina", json={"period": "month", "limit_usd": 0.02})
    headers = {"X-Tollgate-User": "nina", **FIXED_OUTPUT}  # 200 output tokens per choice
    body = {**CALL, "n": 20}
    del body["max_tokens"]
    response = httpx.post(
        f"{stack.url}/v1/chat/completions", json=body, headers=headers, timeout=30
    )
    assert response.status_code == 200, response.text
    answer = response.json()
    assert len(answer["choices"]) == 20
    capped = int(response.headers["X-Tollgate-Max-Tokens-Capped"])
    assert capped * 20 * 10 <= 20_000  # gpt-4o output: $10 per million tokens, $0.02 in all
    assert answer["usage"]["completion_tokens"] <= capped * 20
    usage = asyncio.run(read_events(stack.settings, "usage", at_least=1))
    (mine,) = [u for u in usage if u["user_id"] == "nina"]
    assert mine["cost_usd_nanos"] <= 20_000_000, mine  # the cap, whatever n asked for


@pytest.mark.parametrize("counter", ["openai", None, "simulator"])
def test_a_capped_calls_prompt_is_counted_the_way_its_upstream_counts(
    kafka_settings: Settings, worker: WorkerProcess, counter: str | None
) -> None:
    """Characters / 4 is a quarter of the tokens of Chinese: a capped call's reservation
    fell short of its prompt's cost. A call under a cap is counted with OpenAI's tokenizer
    (the Request event's estimate is what the gate reserved on); an uncapped one is not
    (the tokenizer costs latency and memory, and nothing is reserved for it). An upstream
    that says how it counts (``prompt_counter``) is counted that way: the bundled
    simulator bills a token per started four characters of each word."""
    stack = Stack(kafka_settings, prompt_counter=counter)
    stack.start()
    try:
        check_counted(stack, counter)
    finally:
        stack.stop()


def check_counted(stack: Stack, counter: str | None) -> None:
    prompt = "请为我们最大的客户起草续约邮件。说明新的价格和服务条款。" * 40  # 1,160 characters
    o200k = len(bpe_openai.get_encoding("o200k_base").encode_ordinary(prompt))  # gpt-4o's
    assert o200k > 1.5 * (len(prompt) // 4)
    billed = count_tokens(prompt)  # the simulator's bill (no spaces: characters / 4)
    expected = {"openai": o200k, "simulator": billed, None: max(o200k, billed)}[counter]
    put = httpx.put(
        f"{stack.url}/v1/budgets/user:mei-{counter}", json={"period": "month", "limit_usd": 5}
    )
    assert put.status_code == 200, put.text
    wait_for_policy(stack.url, f"user:mei-{counter}")
    body = {**CALL, "messages": [{"role": "user", "content": prompt}]}
    for user in (f"mei-{counter}", "uncapped-lin"):
        response = httpx.post(
            f"{stack.url}/v1/chat/completions",
            json=body,
            headers={"X-Tollgate-User": user, **FIXED_OUTPUT},
            timeout=30,
        )
        assert response.status_code == 200, response.text
    requests = asyncio.run(read_events(stack.settings, "requests", at_least=2))
    estimates = {r["user_id"]: r["prompt_tokens_estimated"] for r in requests}
    assert estimates[f"mei-{counter}"] == expected + 4  # and the message's overhead
    assert estimates["uncapped-lin"] == (len(prompt) + 3) // 4 + 4


def test_a_usage_report_retried_at_another_dispatcher_is_counted_once_at_the_gate(
    stack: Stack, kafka_settings: Settings
) -> None:
    """Session 17's fault probe (F2): a /v1/usage record retried (same request_id) at a
    dispatcher that does not remember the first post (a restart, another replica, 10,000
    ids later) gets the same event id and the worker counts it once, but that dispatcher
    held the copy's cost as 'not yet counted here' for good: the worker dropped the copy
    without a new decision, so nothing ever said it was counted. The user, at $0.0035 of
    $0.006, was refused with '$0.007 of $0.006', and /readyz said the worker had stopped
    counting. User and feature scopes alike must settle at the once-counted spend."""
    second = Stack(kafka_settings)
    second.start()
    try:
        for scope in ("user:retry-u", "feature:retry-f"):
            put = httpx.put(f"{stack.url}/v1/budgets/{scope}", json={"limit_usd": 0.006})
            assert put.status_code == 200, put.text
            wait_for_policy(second.url, scope)
        record = {
            "model": "gpt-4o", "prompt_tokens": 1000, "completion_tokens": 100,  # $0.0035
            "user_id": "retry-u", "feature": "retry-f", "request_id": "retry-r1",
        }  # fmt: skip
        first = httpx.post(f"{stack.url}/v1/usage", json=record)
        for scope in ("user:retry-u", "feature:retry-f"):  # counted and decided: then the retry
            wait_for_status(stack.url, scope, spent="0.0035", local="0")
        again = httpx.post(f"{second.url}/v1/usage", json=record)
        assert first.status_code == again.status_code == 202, (first.text, again.text)
        assert first.json()["events"][0]["event_id"] == again.json()["events"][0]["event_id"]
        for url in (stack.url, second.url):
            for scope in ("user:retry-u", "feature:retry-f"):
                status = wait_for_status(url, scope, spent="0.0035", local="0")
                assert status["state"] != "blocked", status
        response = httpx.post(
            f"{second.url}/v1/chat/completions",
            json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]},
            headers={"X-Tollgate-User": "retry-u", "X-Tollgate-Feature": "retry-f"},
        )
        assert response.status_code == 200, response.text
        ready = httpx.get(f"{second.url}/readyz").json()
        assert ready["checks"]["spend_worker_counting"] is True, ready
    finally:
        second.stop()


def wait_for_status(
    url: str, scope: str, *, spent: str, local: str, timeout_s: float = 60
) -> dict[str, object]:
    """The scope's status once it says ``spent`` in all, ``local`` of it not yet counted by the
    worker (the worker publishes a refreshed decision every few seconds)."""
    status: dict[str, object] = {}
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = httpx.get(f"{url}/v1/budgets/{scope}/status").json()
        breakdown = status["breakdown"]
        assert isinstance(breakdown, dict)
        if status["spent_usd"] == spent and breakdown["seen_locally_usd"] == local:
            return status
        time.sleep(0.5)
    raise AssertionError(f"{scope} at {url} never settled at {spent} ({local} local): {status}")
