"""The escalation policy on real provider answers: the bundled simulator, told to fail.

The dispatcher's retry loop is not here (it is wired later); this drives the same steps
with the policy: call the routed tier, classify the answer, ask the policy for the next
attempt, call it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from app.routing import EscalationPolicy, Failure, Router, RoutingSettings, Tier
from app.routing.escalation import failure_of_status
from devtools.simulator import SimulatorConfig, create_app


@pytest.fixture
async def simulator() -> AsyncIterator[str]:
    runner = web.AppRunner(create_app(SimulatorConfig(latency_scale=0, seed=3)), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    yield f"http://127.0.0.1:{runner.addresses[0][1]}/v1/chat/completions"
    await runner.cleanup()


async def _routed_call(
    url: str, body: dict[str, Any], economy_headers: dict[str, str]
) -> list[tuple[str, int, Failure | None]]:
    """(model, status, failure) of each attempt of one routed call."""
    router = Router(RoutingSettings())
    policy = EscalationPolicy(router.settings)
    decision = router.route(body)
    assert decision.tier is Tier.ECONOMY
    tier, model, attempt = decision.tier, decision.model, 1
    attempts = []
    async with aiohttp.ClientSession() as http:
        while True:
            headers = economy_headers if tier is Tier.ECONOMY else {}
            async with http.post(url, json={**body, "model": model}, headers=headers) as reply:
                answer = await reply.json()
                failure = failure_of_status(reply.status) or (
                    policy.validate(answer) if reply.status == 200 else None
                )
            attempts.append((model, reply.status, failure))
            if failure is None:
                return attempts
            escalation = policy.escalation(failure, tier=tier, feature=None, attempt=attempt)
            if escalation is None:
                return attempts
            tier, model, attempt = escalation.tier, escalation.model, escalation.attempt


BODY = {"model": "auto", "messages": [{"role": "user", "content": "What is 2 + 2?"}]}


async def test_an_economy_5xx_escalates_once_to_standard(simulator: str) -> None:
    attempts = await _routed_call(simulator, BODY, {"X-Sim-Status": "503"})
    assert attempts == [
        ("gpt-4o-mini", 503, Failure.UPSTREAM_ERROR),
        ("gpt-4o", 200, None),
    ]


async def test_a_truncated_economy_answer_escalates(simulator: str) -> None:
    body = {**BODY, "max_tokens": 5}
    attempts = await _routed_call(simulator, body, {"X-Sim-Completion-Tokens": "50"})
    assert attempts[0] == ("gpt-4o-mini", 200, Failure.TRUNCATED)
    assert attempts[1][0] == "gpt-4o"
    assert len(attempts) == 2  # never a third attempt, whatever the second one says


async def test_a_client_error_does_not_escalate(simulator: str) -> None:
    attempts = await _routed_call(simulator, BODY, {"X-Sim-Status": "400"})
    assert attempts == [("gpt-4o-mini", 400, None)]
