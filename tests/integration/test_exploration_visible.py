"""Calls sent to economy by exploration are visible: a field on their Usage event (and so a
warehouse column) and a Prometheus counter, through real parts (openai SDK → dispatcher →
simulator, events on real Kafka).

Which calls explore is known in advance: the draw is a hash of ``exploration_seed`` and the
request id (``Router.explores``), so every call is checked against it, not sampled.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator

import httpx
import openai
import pytest

from app.events.topics import ensure_topics
from app.routing.config import ProviderTiers, RoutingSettings
from app.routing.router import Router
from app.settings import Settings
from tests.integration.harness import Stack, read_events, running_stack
from tests.integration.test_savings_wiring import HARD

pytestmark = pytest.mark.integration

ROUTING = RoutingSettings(
    providers=(
        ProviderTiers(provider="sim", economy="gpt-4o-mini", standard="gpt-4o", premium="gpt-4"),
    ),
    exploration_rate=0.5,
    exploration_seed=7,
)


@pytest.fixture
def stack(kafka_settings: Settings) -> Iterator[Stack]:
    asyncio.run(ensure_topics(kafka_settings))
    with running_stack(kafka_settings, routing=ROUTING) as running:
        yield running


def test_explored_calls_are_marked_on_usage_events_and_counted(stack: Stack) -> None:
    sdk = openai.OpenAI(base_url=f"{stack.url}/v1", api_key="unused", max_retries=0)
    draw = Router(ROUTING)
    expected: dict[str, bool] = {}
    for _ in range(40):  # until both kinds were seen (each call explores with probability 0.5)
        response = sdk.chat.completions.with_raw_response.create(
            model="auto", messages=HARD, user="uma"
        )
        request_id = response.headers["X-Request-Id"]
        expected[request_id] = draw.explores(request_id)
        tier = response.headers["X-Tollgate-Tier"]
        assert (tier == "economy") == expected[request_id], (request_id, tier)
        if len(set(expected.values())) == 2 and len(expected) >= 4:
            break
    explored = sum(expected.values())
    assert 0 < explored < len(expected)

    usage = asyncio.run(read_events(stack.settings, "usage", at_least=len(expected)))
    assert {u["request_id"]: u["explored"] for u in usage} == expected
    for event in usage:
        assert event["explored"] == ("exploration" in event["router_reason"])

    metrics = httpx.get(f"{stack.url}/metrics").text
    counted = re.search(r'^tollgate_routing_explored_total\{status="ok"\} (\S+)$', metrics, re.M)
    assert counted is not None, "no exploration counter on /metrics"
    assert float(counted.group(1)) == explored


def test_an_escalated_explored_call_marks_only_its_economy_attempt(stack: Stack) -> None:
    """An explored economy answer that fails escalates as any routed call; the escalated attempt
    was not exploration (it is the tier the router advised)."""
    draw = Router(ROUTING)
    with httpx.Client(timeout=30) as http:
        for _ in range(40):
            reply = http.post(
                f"{stack.url}/v1/chat/completions",
                json={"model": "auto", "messages": HARD},
                headers={
                    "X-Tollgate-User": "vic",
                    "X-Sim-Status": "503",
                    "X-Sim-Models": "gpt-4o-mini",
                },
            )
            assert reply.status_code == 200, reply.text
            if draw.explores(reply.headers["X-Request-Id"]):
                break
    request_id = reply.headers["X-Request-Id"]
    assert reply.headers["X-Tollgate-Escalated-From"] == "gpt-4o-mini"
    usage = asyncio.run(read_events(stack.settings, "usage", at_least=2))
    attempts = sorted(
        (u["attempt"], u["tier"], u["explored"]) for u in usage if u["request_id"] == request_id
    )
    assert attempts == [(1, "economy", True), (2, "standard", False)]
    metrics = httpx.get(f"{stack.url}/metrics").text
    assert 'tollgate_routing_explored_total{status="error"} 1.0' in metrics
