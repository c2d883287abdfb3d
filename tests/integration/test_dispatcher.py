"""The dispatcher with real parts: the openai SDK → dispatcher → simulator, events on real Kafka."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import httpx
import openai
import pytest
from genai_prices import Usage, calc_price

from app.events.topics import ensure_topics
from app.pricing.catalog import usd_to_nanos
from app.settings import Settings
from tests.integration.harness import Stack, read_events, running_stack

pytestmark = pytest.mark.integration
MESSAGES = [{"role": "user", "content": "Summarise the quarterly spend report for finance."}]


@pytest.fixture
def stack(kafka_settings: Settings) -> Iterator[Stack]:
    asyncio.run(ensure_topics(kafka_settings))
    with running_stack(kafka_settings) as running:
        yield running


def expected_nanos(model: str, prompt: int, completion: int) -> int:
    price = calc_price(
        Usage(input_tokens=prompt, output_tokens=completion), model_ref=model, provider_id="openai"
    ).total_price
    return usd_to_nanos(Decimal(price))


def test_streams_the_sdk_read_to_the_end_are_counted_as_served(stack: Stack) -> None:
    """The openai SDK closes its connection once it has read ``[DONE]``; the dispatcher's
    end-of-stream write then meets a closed socket. A stream written to the end is a 200,
    not a 499 with an error traceback in the log (a newcomer saw 2 of 3 counted 499)."""

    def counted(status: str) -> float:
        line = f'tollgate_requests_total{{route="/v1/chat/completions",status="{status}"}} '
        for row in httpx.get(f"{stack.url}/metrics").text.splitlines():
            if row.startswith(line):
                return float(row.split()[-1])
        return 0.0

    before = counted("200"), counted("499")
    for _ in range(10):  # a client per stream, closed after it: as a short script does
        with openai.OpenAI(base_url=f"{stack.url}/v1", api_key="unused", max_retries=0) as client:
            chunks = list(
                client.chat.completions.create(
                    model="gpt-4o-mini", messages=MESSAGES, stream=True, user="sdk-streams"
                )
            )
        assert chunks
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and counted("200") - before[0] < 10:
        time.sleep(0.1)
    assert (counted("200") - before[0], counted("499") - before[1]) == (10, 0)


def test_openai_sdk_sync_async_stream_and_not(stack: Stack) -> None:
    client = openai.OpenAI(base_url=f"{stack.url}/v1", api_key="unused", max_retries=0)
    plain = client.chat.completions.with_raw_response.create(
        model="gpt-4o",
        messages=MESSAGES,
        user="alice",
        extra_headers={"X-Tollgate-Feature": "reports"},
    )
    request_id = plain.headers["X-Request-Id"]
    completion = plain.parse()
    assert completion.usage is not None and completion.usage.completion_tokens > 0

    chunks = list(
        client.chat.completions.create(
            model="gpt-4o-mini",
            messages=MESSAGES,
            stream=True,
            user="bob",
            stream_options={"include_usage": True},
        )
    )
    streamed_usage = chunks[-1].usage
    assert streamed_usage is not None

    async def async_calls() -> None:
        aclient = openai.AsyncOpenAI(base_url=f"{stack.url}/v1", api_key="unused", max_retries=0)
        result = await aclient.chat.completions.create(
            model="gpt-4", messages=MESSAGES, user="carol"
        )
        assert result.choices[0].message.content
        stream = await aclient.chat.completions.create(
            model="gpt-4o", messages=MESSAGES, user="dave", stream=True
        )
        texts = [c.choices[0].delta.content async for c in stream if c.choices]
        assert "".join(t for t in texts if t)
        await aclient.close()

    asyncio.run(async_calls())

    usage = asyncio.run(read_events(stack.settings, "usage", at_least=4))
    assert len(usage) == 4, "exactly one usage event per call"
    by_user = {u["user_id"]: u for u in usage}
    alice = by_user["alice"]
    assert alice["request_id"] == request_id
    assert alice["feature"] == "reports"
    assert alice["prompt_tokens"] == completion.usage.prompt_tokens
    assert alice["completion_tokens"] == completion.usage.completion_tokens
    assert alice["cost_usd_nanos"] == expected_nanos(
        "gpt-4o", alice["prompt_tokens"], alice["completion_tokens"]
    )
    assert alice["baseline_cost_usd_nanos"] == expected_nanos(
        "gpt-4", alice["prompt_tokens"], alice["completion_tokens"]
    )
    assert alice["tier"] == "standard" and alice["stream"] is False
    bob = by_user["bob"]
    assert bob["stream"] is True and bob["usage_estimated"] is False
    assert bob["completion_tokens"] == streamed_usage.completion_tokens
    assert bob["cost_usd_nanos"] == expected_nanos(
        "gpt-4o-mini", bob["prompt_tokens"], bob["completion_tokens"]
    )
    assert by_user["dave"]["stream"] is True and by_user["dave"]["completion_tokens"] > 0
    assert all(u["status"] == "ok" and u["provider"] == "sim" for u in usage)

    requests = asyncio.run(read_events(stack.settings, "requests", at_least=4))
    assert sorted(r["user_id"] for r in requests) == ["alice", "bob", "carol", "dave"]
    assert all(r["status"] == "accepted" for r in requests)


def test_a_client_that_asked_for_stream_usage_gets_the_estimate_when_the_provider_gives_none(
    stack: Stack,
) -> None:
    """A client that asked ``include_usage`` reads the usage it was billed for, even from a
    provider that ignores ``stream_options``: the last chunk before ``[DONE]`` carries the
    estimate of the usage event, marked ``tollgate_usage_estimated``."""
    client = openai.OpenAI(base_url=f"{stack.url}/v1", api_key="unused", max_retries=0)

    def stream(user: str, **headers: str) -> list[Any]:
        return list(
            client.chat.completions.create(
                model="gpt-4o",
                messages=MESSAGES,
                stream=True,
                stream_options={"include_usage": True},
                user=user,
                extra_headers=headers,
            )
        )

    chunks = stream("frank", **{"X-Sim-Omit-Usage": "1", "X-Sim-Completion-Tokens": "30"})
    last = chunks[-1]
    assert last.usage is not None, "no usage chunk for a client that asked include_usage"
    assert last.choices == []
    assert last.id == chunks[0].id and last.model == chunks[0].model
    assert (last.model_extra or {}).get("tollgate_usage_estimated") is True
    assert sum(1 for c in chunks if c.usage is not None) == 1
    usage = next(
        u
        for u in asyncio.run(read_events(stack.settings, "usage", at_least=1))
        if u["user_id"] == "frank"
    )
    assert usage["usage_estimated"] is True
    assert last.usage.prompt_tokens == usage["prompt_tokens"]
    assert last.usage.completion_tokens == usage["completion_tokens"] == 30
    assert last.usage.total_tokens == usage["prompt_tokens"] + 30
    # A provider that reports usage: its own chunk, once, and no mark.
    with_usage = [c for c in stream("frank-counted") if c.usage is not None]
    assert len(with_usage) == 1
    assert "tollgate_usage_estimated" not in (with_usage[0].model_extra or {})


def test_an_answer_without_provider_usage_carries_the_billed_estimate(stack: Stack) -> None:
    """A JSON answer from a provider that reports no usage gets the usage it is billed for
    (the usage event's estimate), marked ``tollgate_usage_estimated``; the SDK reads it."""
    client = openai.OpenAI(base_url=f"{stack.url}/v1", api_key="unused", max_retries=0)
    answer = client.chat.completions.create(
        model="gpt-4o",
        messages=MESSAGES,
        user="grace",
        extra_headers={"X-Sim-Omit-Usage": "1", "X-Sim-Completion-Tokens": "25"},
    )
    assert answer.usage is not None, "no usage in an answer whose usage was estimated"
    assert (answer.model_extra or {}).get("tollgate_usage_estimated") is True
    assert answer.choices[0].message.content
    usage = next(
        u
        for u in asyncio.run(read_events(stack.settings, "usage", at_least=1))
        if u["user_id"] == "grace"
    )
    assert usage["usage_estimated"] is True and usage["status"] == "ok"
    assert answer.usage.prompt_tokens == usage["prompt_tokens"] > 0
    assert answer.usage.completion_tokens == usage["completion_tokens"] == 25
    assert answer.usage.total_tokens == usage["prompt_tokens"] + 25
    counted = client.chat.completions.create(model="gpt-4o", messages=MESSAGES, user="g2")
    assert "tollgate_usage_estimated" not in (counted.model_extra or {})


def test_an_answer_without_provider_usage_is_billed_its_prompt_as_the_upstream_counts_it(
    stack: Stack,
) -> None:
    """A probe: a JSON answer without usage was billed "Hello world" as 7 prompt tokens (the
    cheap characters / 4 estimate) where the simulator counts 8: writing the estimated usage
    into the answer filled in the prompt before the exact count could (a stream was counted
    exactly). The answer and its usage event now say the upstream's own count."""
    client = openai.OpenAI(base_url=f"{stack.url}/v1", api_key="unused", max_retries=0)
    hello = [{"role": "user", "content": "Hello world"}]
    for model in ("gpt-4o-mini", "gpt-4"):
        user = f"hello-{model}"
        answer = client.chat.completions.create(
            model=model, messages=hello, user=user,
            extra_headers={"X-Sim-Omit-Usage": "1", "X-Sim-Completion-Tokens": "5"},
        )  # fmt: skip
        reference = client.chat.completions.create(model=model, messages=hello, user="ref")
        assert answer.usage is not None and reference.usage is not None
        assert (answer.model_extra or {}).get("tollgate_usage_estimated") is True
        assert answer.usage.prompt_tokens == reference.usage.prompt_tokens == 8
        usage = next(
            u
            for u in asyncio.run(read_events(stack.settings, "usage", at_least=4))
            if u["user_id"] == user
        )
        assert usage["usage_estimated"] is True and usage["prompt_tokens"] == 8


def test_stream_without_provider_usage_is_estimated_not_zero(stack: Stack) -> None:
    client = openai.OpenAI(base_url=f"{stack.url}/v1", api_key="unused", max_retries=0)
    text = "".join(
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(
            model="gpt-4o",
            messages=MESSAGES,
            stream=True,
            user="erin",
            extra_headers={"X-Sim-Omit-Usage": "1", "X-Sim-Completion-Tokens": "40"},
        )
        if c.choices
    )
    reference = client.chat.completions.create(model="gpt-4o", messages=MESSAGES, user="ref")
    assert reference.usage is not None
    usage = next(
        u
        for u in asyncio.run(read_events(stack.settings, "usage", at_least=2))
        if u["user_id"] == "erin"
    )
    assert usage["usage_estimated"] is True
    assert usage["completion_tokens"] == 40  # simulator text re-counts exactly
    # the prompt as the upstream counts it (session 17: the cheap estimate was 2 tokens short)
    assert usage["prompt_tokens"] == reference.usage.prompt_tokens
    assert usage["cost_usd_nanos"] > 0
    assert text


async def hang_up_after_first_bytes(stack: Stack, messages: list[Any], user: str) -> None:
    """A stream of 400 tokens over 3 s that the client closes once its first bytes came."""
    async with (
        httpx.AsyncClient(timeout=30) as http,
        http.stream(
            "POST",
            f"{stack.url}/v1/chat/completions",
            json={"model": "gpt-4o", "messages": messages, "stream": True, "user": user},
            headers={"X-Sim-Completion-Tokens": "400", "X-Sim-Latency-Ms": "3000"},
        ) as response,
    ):
        async for _ in response.aiter_bytes():
            break  # first bytes, then hang up


def test_client_disconnect_mid_stream_still_records_usage(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    asyncio.run(hang_up_after_first_bytes(stack, MESSAGES, "frank"))
    [usage] = asyncio.run(read_events(stack.settings, "usage", at_least=1, timeout_s=20))
    assert usage["user_id"] == "frank"
    assert usage["status"] == "client_disconnected"
    assert usage["completion_tokens"] < 400
    assert usage["prompt_tokens"] > 0
    # a client hanging up is not a server error: no traceback at ERROR (the probe saw one)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [], [r.getMessage() for r in errors]


def test_unpriced_model_is_served_and_flagged(stack: Stack) -> None:
    client = openai.OpenAI(base_url=f"{stack.url}/v1", api_key="unused", max_retries=0)
    client.chat.completions.create(model="tollgate-sim-unpriced", messages=MESSAGES, user="gina")
    [usage] = asyncio.run(read_events(stack.settings, "usage", at_least=1))
    assert usage["price_unknown"] is True
    metrics = httpx.get(f"{stack.url}/metrics").text
    assert 'tollgate_price_unknown_usage_total{model="tollgate-sim-unpriced"} 1.0' in metrics


def test_bad_inputs_get_status_and_error_type(stack: Stack) -> None:
    url = f"{stack.url}/v1/chat/completions"
    ok = {"model": "gpt-4o", "messages": MESSAGES}
    cases = [
        (b"{not json", 400, "invalid_request_error", None),
        ({"model": "gpt-4o"}, 400, "invalid_request_error", "messages"),
        ({"model": "gpt-4o", "messages": []}, 400, "invalid_request_error", "messages"),
        ({**ok, "max_tokens": -5}, 400, "invalid_request_error", "max_tokens"),
        ({**ok, "model": 12}, 400, "invalid_request_error", "model"),
        ({**ok, "model": "no-such-model"}, 404, "invalid_request_error", "model"),
    ]
    for body, status, error_type, param in cases:
        if isinstance(body, bytes):
            response = httpx.post(url, content=body, headers={"Content-Type": "application/json"})
        else:
            response = httpx.post(url, json=body)
        assert response.status_code == status, (body, response.text)
        error = response.json()["error"]
        assert error["type"] == error_type and error["param"] == param and error["message"]
        assert response.headers["X-Request-Id"]
    assert (
        httpx.post(url, json={**ok, "model": "no-such-model"}).json()["error"]["code"]
        == "model_not_found"
    )

    big = {"model": "gpt-4o", "messages": [{"role": "user", "content": "x" * (5 * 1024 * 1024)}]}
    response = httpx.post(url, json=big)
    assert response.status_code == 413 and response.json()["error"]["type"] == "request_too_large"

    rejected = asyncio.run(read_events(stack.settings, "requests", at_least=len(cases) + 2))
    assert all(r["status"] == "rejected" and r["reason"] for r in rejected)
    assert {r["reason"] for r in rejected} >= {
        "invalid_request_error",
        "model_not_found",
        "request_too_large",
    }


def test_upstream_errors_pass_through_and_unreachable_is_502(kafka_settings: Settings) -> None:
    asyncio.run(ensure_topics(kafka_settings))
    with running_stack(kafka_settings) as stack:
        response = httpx.post(
            f"{stack.url}/v1/chat/completions",
            json={"model": "gpt-4o", "messages": MESSAGES, "user": "hal"},
            headers={"X-Sim-Status": "429"},
        )
        assert response.status_code == 429
        assert response.json()["error"]["code"] == "rate_limit_exceeded"  # the provider's body
    dead = kafka_settings.model_copy()
    from app.settings import UpstreamConfig
    from tests.integration.harness import free_port

    nowhere = UpstreamConfig(
        name="down", base_url=f"http://127.0.0.1:{free_port()}/v1", models=("gpt-4o",)
    )
    with running_stack(dead, upstreams=(nowhere,)) as stack:
        response = httpx.post(
            f"{stack.url}/v1/chat/completions",
            json={"model": "gpt-4o", "messages": MESSAGES, "user": "ian"},
        )
        assert response.status_code == 502
        assert response.json()["error"]["type"] == "upstream_error"
    usage = asyncio.run(read_events(kafka_settings, "usage", at_least=2))
    statuses = sorted((u["user_id"], u["http_status"], u["status"]) for u in usage)
    assert statuses == [("hal", 429, "error"), ("ian", 502, "error")]


def test_retries_once_on_another_upstream_when_the_first_is_unreachable(
    kafka_settings: Settings,
) -> None:
    from app.settings import UpstreamConfig
    from tests.integration.harness import free_port

    asyncio.run(ensure_topics(kafka_settings))
    stack = Stack(kafka_settings)
    down = UpstreamConfig(
        name="down", base_url=f"http://127.0.0.1:{free_port()}/v1", models=("gpt-4o",)
    )
    up = UpstreamConfig(
        name="sim", base_url=f"http://127.0.0.1:{stack.sim_port}/v1", models=("gpt-4o",)
    )
    stack.settings = Settings(**{**stack.settings.model_dump(), "upstreams": (down, up)})
    stack.start()
    try:
        response = httpx.post(
            f"{stack.url}/v1/chat/completions",
            json={"model": "gpt-4o", "messages": MESSAGES, "user": "jo"},
        )
        assert response.status_code == 200
    finally:
        stack.stop()
    [usage] = asyncio.run(read_events(kafka_settings, "usage", at_least=1))
    assert usage["provider"] == "sim"


def test_usage_and_outcome_reports(stack: Stack) -> None:
    from datetime import UTC, datetime, timedelta

    yesterday = (datetime.now(UTC) - timedelta(days=1)).replace(microsecond=0)
    response = httpx.post(
        f"{stack.url}/v1/usage",
        json={
            "records": [
                {
                    "model": "gpt-4o",
                    "prompt_tokens": 1000,
                    "completion_tokens": 200,
                    "user_id": "kim",
                    "feature": "batch",
                    "ts": yesterday.isoformat(),  # late reports count, within the window
                    "request_id": "ext-1",
                },
                {"model": "gpt-4o-mini", "input_tokens": 10, "output_tokens": 5, "user_id": "kim"},
                {  # a service that routes and caches on its own reports both
                    "model": "gpt-4o-mini",
                    "model_requested": "gpt-4o",
                    "cache_hit": True,
                    "prompt_tokens": 1000,
                    "completion_tokens": 100,
                    "user_id": "kim",
                    "request_id": "ext-3",
                },
            ]
        },
    )
    assert response.status_code == 202, response.text
    assert response.json()["accepted"] == 3
    bad = httpx.post(
        f"{stack.url}/v1/usage",
        json=[{"model": "gpt-4o", "prompt_tokens": 1, "completion_tokens": 1}, {"model": "x"}],
    )
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "records[1].prompt_tokens"

    outcome = httpx.post(
        f"{stack.url}/v1/outcomes",
        json={
            "session_id": "s-9",
            "outcome": "success",
            "kind": "ticket_resolved",
            "value_usd": 3.5,
        },
    )
    assert outcome.status_code == 202
    assert outcome.json()["unmatched"] == ["outcomes[0].session_id"]  # no call in s-9 here
    # An outcome naming only the request is attributed to that request's user and feature.
    linked = httpx.post(
        f"{stack.url}/v1/outcomes", json={"request_id": "ext-1", "outcome": "failure"}
    )
    assert linked.status_code == 202 and linked.json()["unmatched"] == []
    # One naming a request nobody reported here keeps the caller's attribution, and says so.
    unknown = httpx.post(
        f"{stack.url}/v1/outcomes",
        json={"request_id": "no-such-request", "outcome": "success"},
        headers={"X-Tollgate-Feature": "typo-check"},
    )
    assert unknown.status_code == 202
    assert unknown.json()["unmatched"] == ["outcomes[0].request_id"]
    not_a_flag = httpx.post(
        f"{stack.url}/v1/usage",
        json={"model": "gpt-4o", "prompt_tokens": 1, "completion_tokens": 1, "cache_hit": "yes"},
    )
    assert not_a_flag.status_code == 400
    assert not_a_flag.json()["error"]["param"] == "records[0].cache_hit"

    usage = asyncio.run(read_events(stack.settings, "usage", at_least=3))
    assert len(usage) == 3, "the rejected batches wrote nothing"
    cached = next(u for u in usage if u["request_id"] == "ext-3")
    assert cached["cache_hit"] and cached["cost_usd_nanos"] == 0
    assert cached["cache_saved_usd_nanos"] == expected_nanos("gpt-4o-mini", 1000, 100)
    assert cached["requested_cost_usd_nanos"] == expected_nanos("gpt-4o", 1000, 100)
    ext = next(u for u in usage if u["request_id"] == "ext-1")
    assert ext["source"] == "usage_api" and ext["feature"] == "batch"
    assert ext["ts"] == yesterday
    assert ext["cost_usd_nanos"] == expected_nanos("gpt-4o", 1000, 200)
    outcomes = asyncio.run(read_events(stack.settings, "outcomes", at_least=2))
    recorded = next(o for o in outcomes if o["session_id"] == "s-9")
    by_request = next(o for o in outcomes if o["request_id"] == "ext-1")
    assert recorded["value_usd_nanos"] == 3_500_000_000 and recorded["kind"] == "ticket_resolved"
    assert (by_request["user_id"], by_request["feature"]) == ("kim", "batch")


def test_operational_endpoints(stack: Stack) -> None:
    assert httpx.get(f"{stack.url}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{stack.url}/readyz").json()
    assert ready["ready"] is True and ready["checks"]["prices_loaded"] is True
    models = openai.OpenAI(base_url=f"{stack.url}/v1", api_key="x").models.list()
    assert "gpt-4o" in {m.id for m in models.data}
    metrics = httpx.get(f"{stack.url}/metrics").text
    for name in (
        "tollgate_requests_total",
        "tollgate_request_duration_seconds_bucket",
        "tollgate_spool_depth",
    ):
        assert name in metrics
    spec = httpx.get(f"{stack.url}/openapi.json").json()
    from app.http.reports_api import REPORTS
    from app.http.server import ROUTES

    documented = {
        (m.upper(), p) for p, ops in spec["paths"].items() for m in ops if m != "parameters"
    }
    routes = {(m, p) for m, p, _ in ROUTES} - {("GET", "/v1/reports/{name}")}
    assert documented == routes | {("GET", f"/v1/reports/{name}") for name in REPORTS}


def test_usage_producer_helper_writes_the_same_priced_events(kafka_settings: Settings) -> None:
    from app.metering.usage import UsageProducer

    asyncio.run(ensure_topics(kafka_settings))

    async def report() -> dict:
        producer = UsageProducer(kafka_settings)
        await producer.start()
        try:
            return await producer.report(
                model="gpt-4o",
                prompt_tokens=812,
                completion_tokens=95,
                user_id="lee",
                feature="search",
            )
        finally:
            await producer.stop()

    sent = asyncio.run(report())
    [received] = asyncio.run(read_events(kafka_settings, "usage", at_least=1))
    assert {k: received[k] for k in sent} == sent
    assert received["source"] == "external"
    assert received["cost_usd_nanos"] == expected_nanos("gpt-4o", 812, 95)


@pytest.mark.parametrize(
    ("scope", "body", "param"),
    [
        ("user:alice", {"limit_usd": -5}, "limit_usd"),
        ("user:alice", {"limit_usd": "lots"}, "limit_usd"),
        ("user:alice", {}, "limit_usd"),
        ("user:alice", {"limit_usd": 5, "period": "fortnight"}, "period"),
        ("user:alice", {"limit_usd": 5, "timezone": "Mars/Olympus"}, "timezone"),
        ("user:alice", {"limit_usd": 5, "thresholds": [1.5]}, "thresholds"),
        ("user:alice", {"limit_usd": 5, "period": "window"}, "window"),
        ("user:alice", {"limit_usd": 5, "colour": "red"}, "colour"),
        ("nobody", {"limit_usd": 5}, "scope"),
    ],
)
def test_invalid_budget_policies_are_400_naming_the_field(
    stack: Stack, scope: str, body: dict, param: str
) -> None:
    response = httpx.put(f"{stack.url}/v1/budgets/{scope}", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param and error["message"]
    assert httpx.get(f"{stack.url}/v1/budgets").json() == {"budgets": []}, "nothing was written"


def test_budget_admin_round_trip(stack: Stack) -> None:
    put = httpx.put(
        f"{stack.url}/v1/budgets/feature:chat",
        json={"period": "day", "limit_usd": 12.5, "timezone": "Europe/Paris"},
    )
    assert put.status_code == 200
    assert httpx.get(f"{stack.url}/v1/budgets/feature:chat").json()["limit_usd"] == "12.5"
    status = httpx.get(f"{stack.url}/v1/budgets/feature:chat/status").json()
    assert status["state"] == "open" and status["spent_usd"] == "0"
    assert httpx.delete(f"{stack.url}/v1/budgets/feature:chat").status_code == 200
    assert httpx.get(f"{stack.url}/v1/budgets/feature:chat").status_code == 404
    assert httpx.get(f"{stack.url}/v1/budgets/user:nobody/status").status_code == 404


def test_api_keys_authenticate_and_cannot_be_spoofed(kafka_settings: Settings, tmp_path) -> None:
    from app.metering.attribution import hash_key

    keys = tmp_path / "keys.yaml"
    keys.write_text(
        f"keys:\n"
        f"  - {{id: alice-key, sha256: {hash_key('sk-alice')}, user_id: alice}}\n"
        f"  - {{id: ops, sha256: {hash_key('sk-admin')}, user_id: ops, admin: true}}\n"
        f"  - {{id: dave-key, sha256: {hash_key('sk-dave')}, user_id: dave, features: [chat]}}\n"
    )
    asyncio.run(ensure_topics(kafka_settings))
    with running_stack(kafka_settings, keys_file=keys) as stack:
        url = f"{stack.url}/v1/chat/completions"
        # A key limited to `chat` spends under chat's cap even when the call names no
        # feature (probe S: it got a 200 past an exhausted feature cap).
        admin = {"Authorization": "Bearer sk-admin"}
        capped = httpx.put(
            f"{stack.url}/v1/budgets/feature:chat", json={"limit_usd": 1e-9}, headers=admin
        )
        assert capped.status_code == 200
        unnamed = httpx.post(
            url,
            json={"model": "gpt-4o-mini", "messages": MESSAGES},
            headers={"Authorization": "Bearer sk-dave"},
        )
        assert unnamed.status_code == 402, unnamed.text
        assert unnamed.json()["error"]["scope"] == "feature:chat"
        # The key may read the cap that blocks it (probe S: a 403 on a team cap that did)
        dave = {"Authorization": "Bearer sk-dave"}
        mine = httpx.get(f"{stack.url}/v1/budgets/feature:chat/status", headers=dave)
        assert mine.status_code == 200 and mine.json()["scope"] == "feature:chat"
        other = httpx.get(f"{stack.url}/v1/budgets/user:alice/status", headers=dave)
        assert other.status_code == 403 and "its own user's" in other.json()["error"]["message"]
        assert (
            httpx.delete(f"{stack.url}/v1/budgets/feature:chat", headers=admin).status_code == 200
        )
        body = {"model": "gpt-4o-mini", "messages": MESSAGES}
        assert httpx.post(url, json=body).status_code == 401
        assert (
            httpx.post(url, json=body, headers={"Authorization": "Bearer sk-nope"}).status_code
            == 401
        )
        spoof = httpx.post(
            url, json={**body, "user": "bob"}, headers={"Authorization": "Bearer sk-alice"}
        )
        assert spoof.status_code == 403 and spoof.json()["error"]["param"] == "user"
        client = openai.OpenAI(base_url=f"{stack.url}/v1", api_key="sk-alice", max_retries=0)
        client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        cap = {"limit_usd": 1}
        denied = httpx.put(
            f"{stack.url}/v1/budgets/user:alice",
            json=cap,
            headers={"Authorization": "Bearer sk-alice"},
        )
        assert denied.status_code == 403
        allowed = httpx.put(
            f"{stack.url}/v1/budgets/user:alice",
            json=cap,
            headers={"Authorization": "Bearer sk-admin"},
        )
        assert allowed.status_code == 200
        # Reports show everyone's spend: with keys configured, only an admin key reads them.
        report = f"{stack.url}/v1/reports/summary"
        assert httpx.get(report, headers={"Authorization": "Bearer sk-alice"}).status_code == 403
        assert httpx.get(report).json()["error"]["type"] == "authentication_error"  # no key
        as_admin = httpx.get(report, headers={"Authorization": "Bearer sk-admin"})
        assert as_admin.status_code != 403  # 503 here: no reports server in this stack
    [usage] = asyncio.run(read_events(kafka_settings, "usage", at_least=1))
    assert usage["user_id"] == "alice" and usage["api_key_id"] == "alice-key"


def test_fail_closed_refuses_when_budget_decisions_are_unreachable(
    kafka_settings: Settings,
) -> None:
    from tests.integration.harness import free_port

    nowhere = kafka_settings.model_dump() | {"kafka_bootstrap": f"127.0.0.1:{free_port()}"}
    with running_stack(Settings(**nowhere), budget_fail_closed=True) as stack:
        response = httpx.post(
            f"{stack.url}/v1/chat/completions", json={"model": "gpt-4o", "messages": MESSAGES}
        )
        assert response.status_code == 503
        assert response.json()["error"]["type"] == "budget_unavailable"
        assert httpx.get(f"{stack.url}/readyz").status_code == 503
    with running_stack(Settings(**nowhere)) as stack:  # the default: fail-open on the spool
        response = httpx.post(
            f"{stack.url}/v1/chat/completions", json={"model": "gpt-4o", "messages": MESSAGES}
        )
        assert response.status_code == 200


def test_a_client_request_id_is_kept_beside_the_gateways_own(stack: Stack) -> None:
    """The gateway's id joins Request, Usage and outcomes, so a client must not choose it; the
    client's own X-Request-Id is recorded as client_request_id and echoed back."""
    for stream in (False, True):
        with httpx.stream(
            "POST",
            f"{stack.url}/v1/chat/completions",
            json={"model": "gpt-4o-mini", "messages": MESSAGES, "stream": stream},
            headers={"X-Request-Id": f"client-{stream}", "X-Tollgate-User": "cid"},
        ) as response:
            response.read()
            assert response.status_code == 200
            assert response.headers["X-Request-Id"].startswith("req_")
            assert response.headers["X-Client-Request-Id"] == f"client-{stream}"
    requests = asyncio.run(read_events(stack.settings, "requests", at_least=2))
    usage = asyncio.run(read_events(stack.settings, "usage", at_least=2))
    for events in (requests, usage):
        mine = {e["client_request_id"] for e in events if e["user_id"] == "cid"}
        assert mine == {"client-False", "client-True"}
    garbage = httpx.post(
        f"{stack.url}/v1/chat/completions",
        json={"model": "gpt-4o-mini", "messages": MESSAGES},
        headers={"X-Request-Id": "x" * 500},
    )
    assert garbage.status_code == 200 and "X-Client-Request-Id" not in garbage.headers


def test_upstream_duration_covers_the_whole_call_and_streams_record_ttft(stack: Stack) -> None:
    headers = {"X-Sim-Latency-Ms": "300"}
    body = {"model": "gpt-4o-mini", "messages": MESSAGES}
    assert httpx.post(f"{stack.url}/v1/chat/completions", json=body, headers=headers).is_success
    streamed = httpx.post(
        f"{stack.url}/v1/chat/completions", json={**body, "stream": True}, headers=headers
    )
    assert streamed.is_success
    metrics = httpx.get(f"{stack.url}/metrics").text

    def sample(name: str) -> float:
        line = next(m for m in metrics.splitlines() if m.startswith(name + "{"))
        return float(line.rsplit(" ", 1)[1])

    assert sample("tollgate_upstream_duration_seconds_count") == 2
    assert sample("tollgate_upstream_duration_seconds_sum") >= 0.6  # both calls, whole
    assert sample("tollgate_upstream_ttft_seconds_count") == 1  # the stream's first token


def test_a_retried_usage_report_with_its_request_id_counts_once(stack: Stack) -> None:
    """A client retrying POST /v1/usage (a timeout, a redeploy) must not double its spend:
    a report naming its request_id gets the event id of the first, and the spend worker and
    the warehouse count an event id once. Before, each POST was a new event. The response
    gives money as decimal text (it said "3.5e-05")."""
    record = {
        "model": "gpt-4o", "prompt_tokens": 10, "completion_tokens": 1,
        "request_id": "dup-1", "user_id": "retrier",
    }  # fmt: skip
    first = httpx.post(f"{stack.url}/v1/usage", json=record)
    again = httpx.post(f"{stack.url}/v1/usage", json=record)
    assert first.status_code == again.status_code == 202
    (event,) = first.json()["events"]
    assert again.json()["events"][0]["event_id"] == event["event_id"]
    # said so (probe J: a batch repeating a request_id answered "accepted": 2, no more)
    assert (first.json()["repeated"], event["repeat"]) == (0, False)
    assert (again.json()["repeated"], again.json()["events"][0]["repeat"]) == (1, True)
    assert event["cost_usd"] == "0.000035" and "e" not in event["cost_usd"]
    other = httpx.post(f"{stack.url}/v1/usage", json={**record, "request_id": "dup-2"})
    assert other.json()["events"][0]["event_id"] != event["event_id"]
    # Nor is it counted twice in this dispatcher (session 14's probe: three POSTs of one
    # $0.40 record made tollgate_spend_usd_total 1.2), nor emitted again: in one batch either.
    batch = httpx.post(f"{stack.url}/v1/usage", json=[record, {**record, "request_id": "dup-3"}])
    assert batch.status_code == 202
    assert batch.json()["events"][0]["event_id"] == event["event_id"]
    assert batch.json()["repeated"] == 1
    twice = {**record, "request_id": "dup-4"}
    both = httpx.post(f"{stack.url}/v1/usage", json={"records": [twice, twice]}).json()
    assert (both["accepted"], both["repeated"]) == (2, 1), both
    assert [e["repeat"] for e in both["events"]] == [False, True]
    assert both["events"][0]["event_id"] == both["events"][1]["event_id"]
    metrics = httpx.get(f"{stack.url}/metrics").text
    spend = [line for line in metrics.splitlines() if line.startswith("tollgate_spend_usd_total{")]
    assert len(spend) == 1 and float(spend[0].split()[1]) == pytest.approx(4 * 0.000035), spend
    usage = asyncio.run(read_events(stack.settings, "usage", at_least=4))
    assert len([u for u in usage if u["user_id"] == "retrier"]) == 4


def test_the_baseline_counter_counts_priced_calls_only_as_the_reports_do(stack: Stack) -> None:
    """A newcomer probe: ``tollgate_baseline_spend_usd_total`` counted a GPT-4 baseline for
    calls to models without a price (and for escalated-away attempts), 3 % above the
    reports' baseline: savings read from /metrics were overstated."""
    model = "house-model-probe-unpriced"
    record = {"model": model, "prompt_tokens": 1000, "completion_tokens": 500, "user_id": "u"}
    assert httpx.post(f"{stack.url}/v1/usage", json=record).status_code == 202
    metrics = httpx.get(f"{stack.url}/metrics").text
    label = f'{{model="{model}"}}'
    assert f"tollgate_price_unknown_usage_total{label} 1.0" in metrics  # its own label
    assert f"tollgate_baseline_spend_usd_total{label}" not in metrics


def test_a_usage_report_posted_again_under_the_request_id_it_was_given_counts_once(
    stack: Stack,
) -> None:
    """A record without a request_id is given one (``rep_...``) in the answer. A client that
    retries with the id it was given (the natural retry after reading the answer) made a
    second event: the same record counted twice in the spend and the warehouse (a newcomer's
    probe). The given id is the event's, as a named one is: a retry is a repeat, another
    record under it a 409."""
    record = {"model": "gpt-4o", "prompt_tokens": 10, "completion_tokens": 1,
              "user_id": "given-id"}  # fmt: skip
    first = httpx.post(f"{stack.url}/v1/usage", json=record)
    assert first.status_code == 202, first.text
    (event,) = first.json()["events"]
    assert event["request_id"].startswith("rep_")
    again = httpx.post(f"{stack.url}/v1/usage", json={**record, "request_id": event["request_id"]})
    assert again.status_code == 202, again.text
    assert again.json()["events"][0]["event_id"] == event["event_id"]
    assert (again.json()["repeated"], again.json()["events"][0]["repeat"]) == (1, True)
    other = httpx.post(
        f"{stack.url}/v1/usage",
        json={**record, "prompt_tokens": 5000, "request_id": event["request_id"]},
    )
    assert other.status_code == 409, other.text
    assert other.json()["error"]["code"] == "request_id_conflict"
    usage = asyncio.run(read_events(stack.settings, "usage", at_least=1))
    assert len([u for u in usage if u["user_id"] == "given-id"]) == 1


def test_an_openai_usage_object_posted_as_it_is_counts_its_cached_tokens(stack: Stack) -> None:
    """A service that posts OpenAI's `usage` object unchanged: its cached tokens are in
    prompt_tokens_details, and were ignored, so the cached part was priced in full. A field
    nothing reads (`feture`, a typo) is named back instead of being dropped in silence."""
    usage = {
        "prompt_tokens": 2000, "completion_tokens": 10, "total_tokens": 2010,
        "prompt_tokens_details": {"cached_tokens": 1024, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0},
    }  # fmt: skip
    plain = {"model": "gpt-4o", "user_id": "usage-object", **usage}
    plain.pop("prompt_tokens_details")
    full = httpx.post(f"{stack.url}/v1/usage", json=plain)
    cached = httpx.post(
        f"{stack.url}/v1/usage",
        json={"model": "gpt-4o", "user_id": "usage-object", "feture": "search", **usage},
    )
    assert full.status_code == cached.status_code == 202, cached.text
    full_cost = Decimal(full.json()["events"][0]["cost_usd"])
    cached_cost = Decimal(cached.json()["events"][0]["cost_usd"])
    assert cached_cost < full_cost  # 1,024 of the 2,000 prompt tokens at the cached price
    assert cached.json()["ignored_fields"] == {"records[0]": ["feture"]}
    assert full.json()["ignored_fields"] == {}
    outcome = httpx.post(
        f"{stack.url}/v1/outcomes",
        json={"outcome": "success", "request_id": "r-1", "value": 3},
    )
    assert outcome.status_code == 202 and outcome.json()["ignored_fields"] == {
        "outcomes[0]": ["value"]
    }


def test_a_nested_openai_usage_object_counts_as_its_fields_at_the_top_level(stack: Stack) -> None:
    """A service posts ``{"model": resp.model, "usage": resp.usage.model_dump()}`` (as the
    README said it may): it was a 400 "records[0].prompt_tokens is required" that said
    nothing of `usage`. Its cost and cached tokens are the top-level form's."""
    from openai.types import CompletionUsage
    from openai.types.completion_usage import CompletionTokensDetails, PromptTokensDetails
    from openai.types.responses import ResponseUsage
    from openai.types.responses.response_usage import InputTokensDetails, OutputTokensDetails

    chat = CompletionUsage(
        prompt_tokens=2000,
        completion_tokens=10,
        total_tokens=2010,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=1024, audio_tokens=0),
        completion_tokens_details=CompletionTokensDetails(reasoning_tokens=0),
    ).model_dump()
    responses = ResponseUsage(
        input_tokens=2000,
        output_tokens=10,
        total_tokens=2010,
        input_tokens_details=InputTokensDetails(cached_tokens=1024, cache_write_tokens=0),
        output_tokens_details=OutputTokensDetails(reasoning_tokens=0),
    ).model_dump()
    user = {"model": "gpt-4o", "user_id": "nested-usage"}
    flat = {**user, "request_id": "flat", "prompt_tokens": 2000, "completion_tokens": 10,
            "cached_tokens": 1024}  # fmt: skip
    answers = {
        "flat": httpx.post(f"{stack.url}/v1/usage", json=flat),
        "chat": httpx.post(
            f"{stack.url}/v1/usage", json={**user, "request_id": "chat", "usage": chat}
        ),
        "responses": httpx.post(
            f"{stack.url}/v1/usage", json={**user, "request_id": "responses", "usage": responses}
        ),
    }
    for name, answer in answers.items():
        assert answer.status_code == 202, (name, answer.text)
        assert answer.json()["ignored_fields"] == {}, name
    costs = {name: answer.json()["events"][0]["cost_usd"] for name, answer in answers.items()}
    assert costs["chat"] == costs["responses"] == costs["flat"], costs
    full = httpx.post(
        f"{stack.url}/v1/usage",
        json={**user, "request_id": "uncached", "prompt_tokens": 2000, "completion_tokens": 10},
    )
    assert Decimal(costs["flat"]) < Decimal(full.json()["events"][0]["cost_usd"])

    usage = asyncio.run(read_events(stack.settings, "usage", at_least=4))
    cached = {u["request_id"]: u["cached_tokens"] for u in usage}
    assert cached == {"flat": 1024, "chat": 1024, "responses": 1024, "uncached": 0}
    nanos = {u["request_id"]: u["cost_usd_nanos"] for u in usage}
    assert nanos["chat"] == nanos["responses"] == nanos["flat"]

    differ = httpx.post(
        f"{stack.url}/v1/usage", json={**user, "prompt_tokens": 1999, "usage": chat}
    )
    assert differ.status_code == 400
    error = differ.json()["error"]
    assert error["param"] == "records[0].usage.prompt_tokens"
    assert "prompt_tokens (1999)" in error["message"], error
    not_an_object = httpx.post(f"{stack.url}/v1/usage", json={**user, "usage": "2000 tokens"})
    assert not_an_object.status_code == 400
    assert not_an_object.json()["error"]["param"] == "records[0].usage"


def test_a_bad_count_inside_a_nested_usage_is_a_400_naming_that_count(stack: Stack) -> None:
    """A review: a bad count inside the nested ``usage`` object was named
    ``records[i].usage`` (the message then "usage prompt_tokens must be ..."), not the count
    the caller must mend, as a top-level count is named."""
    user = {"model": "gpt-4o", "user_id": "nested-usage-bad"}
    cases = {
        "records[0].usage.prompt_tokens": {"prompt_tokens": -1, "completion_tokens": 1},
        "records[0].usage.completion_tokens": {"prompt_tokens": 1, "completion_tokens": "x"},
        "records[0].usage.prompt_tokens_details.cached_tokens": {
            "prompt_tokens": 5,
            "completion_tokens": 1,
            "prompt_tokens_details": {"cached_tokens": True},
        },
        "records[0].usage.input_tokens_details": {
            "input_tokens": 5,
            "output_tokens": 1,
            "input_tokens_details": 5,
        },
    }
    for param, usage in cases.items():
        answer = httpx.post(f"{stack.url}/v1/usage", json={**user, "usage": usage})
        assert answer.status_code == 400, (param, answer.text)
        error = answer.json()["error"]
        assert error["type"] == "invalid_request_error", error
        assert error["param"] == param, error
        assert error["message"].startswith(f"{param} must be "), error
    # at the top level a nested detail is named the same way
    top = {**user, "prompt_tokens": 5, "completion_tokens": 1}
    answer = httpx.post(
        f"{stack.url}/v1/usage", json={**top, "prompt_tokens_details": {"cached_tokens": -1}}
    )
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["param"] == "records[0].prompt_tokens_details.cached_tokens"
    # the second record of a batch is named by its index
    batch = {"records": [top, {**user, "usage": {"prompt_tokens": 1, "completion_tokens": -2}}]}
    answer = httpx.post(f"{stack.url}/v1/usage", json=batch)
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["param"] == "records[1].usage.completion_tokens"


def test_an_outcome_value_below_a_nano_dollar_is_a_400_and_finer_digits_are_rounded(
    stack: Stack,
) -> None:
    """A probe: 0.0000000001 was stored as $0 - now a 400 naming the resolution. Finer digits
    of a larger value are rounded to the nano-dollar, as documented: 4.5000000001 for the
    request of an outcome of 4.5 is that outcome again (its event id), and 4.500000001 is
    another."""
    outcome = {"request_id": "res-x1", "outcome": "success", "kind": "k"}
    url = f"{stack.url}/v1/outcomes"
    first = httpx.post(url, json={**outcome, "value_usd": "4.5"})
    assert first.status_code == 202, first.text
    for value in (0.0000000001, "1e-10"):
        finer = httpx.post(url, json={**outcome, "value_usd": value})
        assert finer.status_code == 400, (value, finer.text)
        error = finer.json()["error"]
        assert error["type"] == "invalid_request_error"
        assert error["param"] == "outcomes[0].value_usd"
        assert "$0.000000001 resolution" in error["message"], error
    same = httpx.post(url, json={**outcome, "value_usd": 4.5000000001})
    assert same.status_code == 202, same.text
    other = httpx.post(url, json={**outcome, "value_usd": "4.500000001"})
    assert other.status_code == 202, other.text
    assert same.json()["event_ids"] == first.json()["event_ids"]
    assert other.json()["event_ids"] != first.json()["event_ids"]


def test_another_record_under_a_reported_request_id_is_a_409_not_a_silent_drop(
    stack: Stack,
) -> None:
    """Found by a newcomer probe: a second, different record under a request_id already
    reported (other token counts; or two in one batch) was answered 202 with its own cost,
    then dropped by every consumer as a duplicate of the first. A retry that repeats the
    record is still accepted, with the first one's event id."""
    first = {
        "model": "gpt-4o", "prompt_tokens": 1000, "completion_tokens": 0,
        "user_id": "ux1", "request_id": "shared-1",
    }  # fmt: skip
    url = f"{stack.url}/v1/usage"
    accepted = httpx.post(url, json=first)
    assert accepted.status_code == 202
    retry = httpx.post(url, json=first)
    assert retry.status_code == 202
    assert retry.json()["events"][0]["event_id"] == accepted.json()["events"][0]["event_id"]
    for change in ({"prompt_tokens": 3000}, {"model": "gpt-4o-mini"}, {"feature": "other"}):
        clash = httpx.post(url, json={**first, **change})
        assert clash.status_code == 409, (change, clash.text)
        error = clash.json()["error"]
        assert error["type"] == "conflict_error" and error["param"] == "records[0].request_id"
    batch = [
        {**first, "request_id": "batch-1"},
        {**first, "request_id": "batch-1", "prompt_tokens": 7},
    ]
    clash = httpx.post(url, json=batch)
    assert clash.status_code == 409 and clash.json()["error"]["param"] == "records[1].request_id"
    # nothing of the refused batch was taken: its second record is still free to report
    second = {**first, "request_id": "batch-1", "prompt_tokens": 7}
    assert httpx.post(url, json=second).status_code == 202


def test_two_users_records_under_one_request_id_are_two_calls(stack: Stack) -> None:
    """A fault probe: services that number their jobs alike ("job-42") reported two users'
    calls under one request id; the second got the first's event id (202, with its cost),
    and every consumer kept whichever it saw first: at two dispatchers, the second user's
    $0.50 was counted nowhere (a way past a cap), at one, charged to the budget and missing
    from the warehouse. A request id is its user's: each record is its own event."""
    url = f"{stack.url}/v1/usage"
    record = {"model": "gpt-4o", "prompt_tokens": 1000, "completion_tokens": 0}
    ya_record = {**record, "user_id": "job-ya", "feature": "fa", "request_id": "job-42"}
    ya = httpx.post(url, json=ya_record)
    yb_record = {
        **record, "prompt_tokens": 200_000, "user_id": "job-yb", "feature": "fb",
        "request_id": "job-42",
    }  # fmt: skip
    yb = httpx.post(url, json=yb_record)
    assert ya.status_code == yb.status_code == 202, yb.text
    ids = {r.json()["events"][0]["event_id"] for r in (ya, yb)}
    assert len(ids) == 2
    assert yb.json()["repeated"] == 0
    again = httpx.post(url, json=yb_record)  # each user's retry is still a repeat
    assert again.json()["repeated"] == 1 and again.json()["events"][0]["event_id"] in ids
    usage = asyncio.run(read_events(stack.settings, "usage", at_least=2))
    mine = [u for u in usage if u["event_id"] in ids]
    assert sorted(u["user_id"] for u in mine) == ["job-ya", "job-yb"], mine
    # each user's outcome goes to that user's call, not to whoever reported last (a review)
    posted = [
        httpx.post(
            f"{stack.url}/v1/outcomes",
            json={"request_id": "job-42", "outcome": "success", "user_id": user},
        )
        for user in ("job-ya", "job-yb")
    ]
    assert [p.status_code for p in posted] == [202, 202], [p.text for p in posted]
    outcome_ids = {p.json()["event_ids"][0] for p in posted}
    assert len(outcome_ids) == 2  # two users' outcomes, not one
    outcomes = asyncio.run(read_events(stack.settings, "outcomes", at_least=2))
    linked = {o["user_id"]: o["feature"] for o in outcomes if o["event_id"] in outcome_ids}
    assert linked == {"job-ya": "fa", "job-yb": "fb"}, linked


def test_a_usage_record_naming_a_dispatched_calls_request_id_is_a_409(stack: Stack) -> None:
    """Found by session 13's newcomer probe: a /v1/usage record under the X-Request-Id of a
    call the gateway had served was answered 202 with its cost ($0.35), then dropped by every
    consumer as a duplicate of the call's own usage (one event id): the spend vanished, and
    could be kept out of a cap that way. The call's own usage is counted once."""
    with httpx.Client(timeout=30) as http:
        served = http.post(
            f"{stack.url}/v1/chat/completions",
            json={
                "model": "gpt-4o-mini",
                "messages": [{"role": "user", "content": "hi"}],
                "user": "dispatched-1",
            },
        )
        assert served.status_code == 200
        request_id = served.headers["X-Request-Id"]
        record = {
            "model": "gpt-4o", "prompt_tokens": 100000, "completion_tokens": 10000,
            "user_id": "dispatched-1", "feature": "other-call", "request_id": request_id,
        }  # fmt: skip
        for body in (record, [{**record, "request_id": "own-1"}, record]):
            clash = http.post(f"{stack.url}/v1/usage", json=body)
            assert clash.status_code == 409, clash.text
            error = clash.json()["error"]
            assert error["type"] == "conflict_error"
            assert error["param"].endswith("request_id") and "gateway" in error["message"]
        # nothing of the refused batch was taken; a record with its own id is counted
        assert (
            http.post(f"{stack.url}/v1/usage", json={**record, "request_id": "own-1"}).status_code
            == 202
        )
        # the router's pseudo-model is no model: it would be stored unpriced, at cost 0
        batch = [
            {**record, "request_id": "own-2"},
            {**record, "model": "auto", "request_id": "own-3"},
        ]
        auto = http.post(f"{stack.url}/v1/usage", json=batch)
        assert auto.status_code == 400 and auto.json()["error"]["param"] == "records[1].model"


def test_usage_model_requested_auto_is_a_400_and_an_unpriced_one_is_said(stack: Stack) -> None:
    """A probe: `model_requested: "auto"` or a name without a price was accepted silently, its
    routing saving counted as model choice. "auto" names no model: a 400 saying what to send.
    A model without a price is accepted (a router's own name is the caller's word), and the
    answer says per record that its routing saving cannot be priced."""
    record = {"model": "gpt-4o-mini", "prompt_tokens": 1000, "completion_tokens": 100}
    with httpx.Client(timeout=30) as http:
        batch = [
            {**record, "model_requested": "gpt-4o", "request_id": "mr-1"},
            {**record, "model_requested": "auto", "request_id": "mr-2"},
        ]
        auto = http.post(f"{stack.url}/v1/usage", json=batch)
        assert auto.status_code == 400, auto.text
        error = auto.json()["error"]
        assert error["param"] == "records[1].model_requested"
        assert "asked for" in error["message"] and "leave it out" in error["message"]
        # spelled as `model` is (trimmed): " auto" slipped past, "gpt-4o " had no price
        spaced = http.post(
            f"{stack.url}/v1/usage",
            json={**record, "model_requested": " auto ", "request_id": "mr-2b"},
        )
        assert spaced.status_code == 400, spaced.text
        assert spaced.json()["error"]["param"] == "records[0].model_requested"
        batch = [
            {**record, "model_requested": "gpt-4o", "request_id": "mr-3"},
            {**record, "model_requested": "my-router-v2", "request_id": "mr-4"},
            {**record, "request_id": "mr-5"},
            {**record, "model_requested": " gpt-4o ", "request_id": "mr-6"},
        ]
        posted = http.post(f"{stack.url}/v1/usage", json=batch)
    assert posted.status_code == 202, posted.text
    events = posted.json()["events"]
    assert [e["model_requested_price_unknown"] for e in events] == [False, True, False, False]
    assert not any(e["price_unknown"] for e in events)  # the served model has its price


def test_without_keys_a_team_is_attributed_as_the_caller_says(stack: Stack) -> None:
    """Found by a newcomer probe: `team` on a usage record was accepted and ignored (teams
    came only from API keys), so a team:tm1 cap never saw the spend. Without a keys file a
    team is the caller's word, as a user and a feature are (header X-Tollgate-Team, or
    `team` in a usage record); with keys the key's team is the team."""
    with httpx.Client(timeout=30) as http:
        assert http.put(f"{stack.url}/v1/budgets/team:tm1", json={"limit_usd": 0.001})
        usage = {"model": "gpt-4o", "prompt_tokens": 4000, "completion_tokens": 1000}
        posted = http.post(f"{stack.url}/v1/usage", json={**usage, "user_id": "tmu", "team": "tm1"})
        assert posted.status_code == 202 and posted.json()["ignored_fields"] == {}
        refused = http.post(
            f"{stack.url}/v1/chat/completions",
            json={"model": "gpt-4o", "messages": MESSAGES},
            headers={"X-Tollgate-User": "other", "X-Tollgate-Team": "tm1"},
        )
        assert refused.status_code == 402, refused.text
        assert "team:tm1" in refused.text
        other_team = http.post(
            f"{stack.url}/v1/chat/completions",
            json={"model": "gpt-4o", "messages": MESSAGES},
            headers={"X-Tollgate-User": "other", "X-Tollgate-Team": "tm2"},
        )
        assert other_team.status_code == 200, other_team.text


def test_a_call_whose_client_left_while_it_waited_for_room_is_not_sent(stack: Stack) -> None:
    """Session 14's second probe: calls the client gave up on while they waited for room
    under a cap (a timeout, a cancelled task) ran later anyway, and were billed; with the
    SDK's retries, 4 timed-out calls became 12 served ones. A waiting call whose client has
    closed its connection is dropped before it reaches the provider."""
    user = "leaver"
    with httpx.Client(timeout=30) as http:
        # $0.17: the first call's worst case (16,384 gpt-4o tokens, $0.164) fits alone; a
        # second one's realistic output then does not fit beside it, so it waits
        assert http.put(f"{stack.url}/v1/budgets/user:{user}", json={"limit_usd": 0.17})
        body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
        slow = {"X-Tollgate-User": user, "X-Sim-Latency-Ms": "4000"}

        async def both() -> int:
            async with httpx.AsyncClient(timeout=30) as client:
                first = asyncio.create_task(
                    client.post(f"{stack.url}/v1/chat/completions", json=body, headers=slow)
                )
                await asyncio.sleep(0.5)  # admitted, in flight upstream
                with pytest.raises(httpx.TimeoutException):  # the second gives up waiting
                    await client.post(
                        f"{stack.url}/v1/chat/completions",
                        json=body,
                        headers={"X-Tollgate-User": user},
                        timeout=1.0,
                    )
                return (await first).status_code

        assert asyncio.run(both()) == 200
    time.sleep(2)  # the first has ended: a waiting call still there would be admitted now
    assert stack.counter.calls == 1
    usage = asyncio.run(read_events(stack.settings, "usage", at_least=1, settle_s=2))
    assert [u["user_id"] for u in usage] == [user]


def test_a_call_under_a_cap_is_held_to_the_output_limit_the_gate_assumed(
    kafka_settings: Settings,
) -> None:
    """Session 14's second probe: a call without max_tokens is reserved on
    TOLLGATE_MAX_OUTPUT_TOKENS (16,384), but gpt-4.1-mini writes up to 32,768, so one call
    spent $0.0524 under a $0.04 cap. Under a cap, the call is now sent with the limit its
    reservation assumed; outside any cap it runs as asked. (Here the assumed limit is 4,000
    tokens and gpt-4o writes 8,000.)"""
    asyncio.run(ensure_topics(kafka_settings))
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "write"}]}
    long = {"X-Sim-Completion-Tokens": "8000"}
    with (
        running_stack(kafka_settings, max_output_tokens=4000) as stack,
        httpx.Client(timeout=60) as http,
    ):
        # $0.05: the assumed worst case ($0.04) fits, 8,000 tokens ($0.08) would not
        assert http.put(f"{stack.url}/v1/budgets/user:capped-out", json={"limit_usd": 0.05})
        capped = http.post(
            f"{stack.url}/v1/chat/completions",
            json=body,
            headers={**long, "X-Tollgate-User": "capped-out"},
        )
        free = http.post(
            f"{stack.url}/v1/chat/completions",
            json=body,
            headers={**long, "X-Tollgate-User": "free-out"},
        )
        assert capped.status_code == free.status_code == 200, capped.text
        assert capped.json()["usage"]["completion_tokens"] == 4000
        assert capped.json()["choices"][0]["finish_reason"] == "length"
        assert free.json()["usage"]["completion_tokens"] == 8000
        usage = asyncio.run(read_events(stack.settings, "usage", at_least=2))
    (spent,) = [u["cost_usd_nanos"] for u in usage if u["user_id"] == "capped-out"]
    assert spent <= 50_000_000


def test_a_streams_usage_is_spooled_before_its_end_reaches_the_client(
    kafka_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Session 17's probe (F1 of the fault probe): a stream's Usage event was spooled only
    after its last bytes (`data: [DONE]`) had gone out, so a dispatcher killed in between had
    served a whole answer whose usage was in no spool, and the spend worker billed its
    estimate (prompt + max_tokens: 2.4x what the provider billed). The end of a stream, a
    cached one too, now leaves only once its usage is spooled."""
    from app.cache.config import CacheSettings
    from app.gateway.pipeline import Gateway
    from app.http.chat import SseClient

    order: list[str] = []
    finish, write = Gateway.finish, SseClient.write

    def recording_finish(self: Gateway, call: Any) -> None:
        if not call.finished:
            order.append("usage spooled")
        finish(self, call)

    async def recording_write(self: SseClient, data: bytes) -> None:
        if b"[DONE]" in data:
            order.append("end of stream sent")
        await write(self, data)

    monkeypatch.setattr(Gateway, "finish", recording_finish)
    monkeypatch.setattr(SseClient, "write", recording_write)
    asyncio.run(ensure_topics(kafka_settings))
    with running_stack(kafka_settings, cache=CacheSettings(enabled=True)) as stack:
        client = openai.OpenAI(base_url=f"{stack.url}/v1", api_key="unused", max_retries=0)
        for options in ({}, {"stream_options": {"include_usage": True}}, {}):  # last: cached
            chunks = list(
                client.chat.completions.create(
                    model="gpt-4o", messages=MESSAGES, stream=True, temperature=0, **options
                )
            )
            assert chunks
            assert order == ["usage spooled", "end of stream sent"], order
            order.clear()


def test_a_non_stream_call_whose_client_hung_up_is_recorded_as_a_disconnect(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    """Probe H (O1): a non-stream call whose client went away while it ran was recorded as
    status ok, http 200, though nobody received the answer (a stream in the same case is
    client_disconnected). The provider ran the call to its end: its tokens are billed."""
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            f"{stack.url}/v1/chat/completions",
            json={"model": "gpt-4o", "messages": MESSAGES, "user": "gone-before-answer"},
            headers={"X-Sim-Completion-Tokens": "60", "X-Sim-Latency-Ms": "1500"},
            timeout=httpx.Timeout(30, read=0.3),  # hangs up (closes) after 0.3 s
        )
    events = asyncio.run(read_events(stack.settings, "usage", at_least=1, timeout_s=20))
    [usage] = [e for e in events if e["user_id"] == "gone-before-answer"]
    assert usage["status"] == "client_disconnected", usage["status"]
    assert usage["completion_tokens"] == 60 and usage["cost_usd_nanos"] > 0
    assert usage["usage_estimated"] is False  # the provider's own count: the call ran
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [], [r.getMessage() for r in errors]


def test_a_stream_cut_short_bills_the_prompt_as_the_provider_counts_it(stack: Stack) -> None:
    """Session 17's probe (F4): a stream the client closed early was billed for its prompt
    by characters / 4 (the provider's count comes in the last chunk, never read): 16 % short
    on the probe's English prompt (README: a quarter of a Chinese one with OpenAI's
    tokenizer). It is now counted the way the upstream counts (the simulator's rule here; an
    OpenAI upstream's tokenizer)."""
    prompt = [{"role": "user", "content": "write a long essay about budgets, and why. " * 40}]
    client = openai.OpenAI(base_url=f"{stack.url}/v1", api_key="unused", max_retries=0)
    whole = client.chat.completions.create(model="gpt-4o", messages=prompt, user="ref")
    assert whole.usage is not None
    billed = whole.usage.prompt_tokens

    asyncio.run(hang_up_after_first_bytes(stack, prompt, "cut"))
    events = asyncio.run(read_events(stack.settings, "usage", at_least=2, timeout_s=20))
    [cut] = [e for e in events if e["user_id"] == "cut"]
    assert cut["status"] == "client_disconnected"
    assert cut["prompt_tokens"] == billed, (cut["prompt_tokens"], billed)


def test_tool_calls_and_structured_outputs_pass_through_and_are_billed(stack: Stack) -> None:
    """What a tool-calling or structured-output client gets through the gateway, now that
    the bundled simulator answers them (session 17's probe, F7): the call or the JSON, as
    sent, and a usage event with the provider's counts."""
    import json

    tool = {
        "type": "function",
        "function": {
            "name": "refund",
            "parameters": {
                "type": "object",
                "properties": {"order": {"type": "string"}, "amount": {"type": "number"}},
                "required": ["order", "amount"],
            },
        },
    }
    client = openai.OpenAI(base_url=f"{stack.url}/v1", api_key="unused", max_retries=0)
    messages: list[Any] = [{"role": "user", "content": "Refund order 42."}]
    called = client.chat.completions.create(
        model="gpt-4o", messages=messages, tools=[tool], user="tools"
    )
    [call] = called.choices[0].message.tool_calls or []
    assert set(json.loads(call.function.arguments)) == {"order", "amount"}
    streamed = client.chat.completions.create(
        model="gpt-4o", messages=messages, tools=[tool], user="tools", stream=True
    )
    arguments = "".join(
        d.function.arguments or ""
        for chunk in streamed
        for choice in chunk.choices
        for d in choice.delta.tool_calls or []
        if d.function
    )
    assert json.loads(arguments) == json.loads(call.function.arguments)
    structured = client.chat.completions.create(
        model="gpt-4o", messages=messages, user="tools", response_format={"type": "json_object"}
    )
    assert isinstance(json.loads(structured.choices[0].message.content or ""), dict)
    usage = asyncio.run(read_events(stack.settings, "usage", at_least=3))
    assert called.usage is not None and structured.usage is not None
    by_tokens = sorted(u["completion_tokens"] for u in usage if u["user_id"] == "tools")
    assert by_tokens == sorted(
        [called.usage.completion_tokens] * 2 + [structured.usage.completion_tokens]
    )
    assert all(u["status"] == "ok" and not u["usage_estimated"] for u in usage)


def test_logprobs_pass_through_streamed_or_not(stack: Stack) -> None:
    """Session 20's note: the simulator gave no logprobs, so nothing showed that a client
    asking for them gets them through the gateway. Asked, each token of the answer has its
    logprob and its alternatives, streamed or not; not asked, there are none."""
    client = openai.OpenAI(base_url=f"{stack.url}/v1", api_key="unused", max_retries=0)
    ask: dict[str, Any] = {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "Name three rivers."}],
        "user": "lp",
    }
    whole = client.chat.completions.create(**ask, logprobs=True, top_logprobs=2)
    content = whole.choices[0].logprobs.content if whole.choices[0].logprobs else None
    assert content, whole
    assert "".join(t.token for t in content) == whole.choices[0].message.content
    assert all(len(t.top_logprobs) == 2 and t.logprob < 0 for t in content)
    streamed = client.chat.completions.create(**ask, logprobs=True, top_logprobs=2, stream=True)
    tokens = [
        t.token
        for chunk in streamed
        for choice in chunk.choices
        for t in (choice.logprobs.content or [] if choice.logprobs else [])
    ]
    assert tokens == [t.token for t in content]
    plain = client.chat.completions.create(**ask)
    assert plain.choices[0].logprobs is None
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(**ask, top_logprobs=2)
