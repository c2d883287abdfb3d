"""The router and the response cache in the dispatcher's call path, with real parts: the openai
SDK → dispatcher → simulator, events on real Kafka.

What a client and the events see: ``model: "auto"`` routed (headers, Usage fields), a concrete
model unchanged, a bad prompt refused with a 400 naming the field, cache hit / miss / bypass
(streamed replay through the SDK, cost avoided on the event, a budget's 402 even for a cached
answer), escalation of a failed economy call to the next tier (two Usage events), and the
router learning from outcomes posted for its routed calls.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import httpx
import openai
import pytest

from app.cache.config import CacheSettings
from app.events.topics import ensure_topics
from app.routing.config import FeatureRule, ProviderTiers, RoutingSettings, Tier
from app.settings import Settings
from tests.integration.harness import Stack, read_events, running_stack

pytestmark = pytest.mark.integration

SHORT = [{"role": "user", "content": "What is the capital of France?"}]
HARD = [
    {
        "role": "user",
        "content": (
            "Prove step by step that the sum of two odd numbers is even, derive the general "
            "formula for the sum of the first n odd numbers, justify each step, then compare "
            "the trade-offs of an inductive and a direct proof. You must answer in exactly "
            "three sections and do not skip any equation: $\\sum_{k=1}^{n} (2k-1) = n^2$. "
        )
        * 6,
    }
]
ROUTING = RoutingSettings(
    providers=(
        ProviderTiers(provider="sim", economy="gpt-4o-mini", standard="gpt-4o", premium="gpt-4"),
    ),
    exploration_rate=0.0,  # request ids are random: exploration would pick calls at random
)
CACHE = CacheSettings(enabled=True)


@pytest.fixture
def stack(kafka_settings: Settings) -> Iterator[Stack]:
    asyncio.run(ensure_topics(kafka_settings))
    with running_stack(kafka_settings, routing=ROUTING, cache=CACHE) as running:
        yield running


def client(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.url}/v1", api_key="unused", max_retries=0)


def usage_of(stack: Stack, at_least: int) -> list[dict[str, Any]]:
    return asyncio.run(read_events(stack.settings, "usage", at_least=at_least))


def test_auto_is_routed_with_headers_and_usage_fields(stack: Stack) -> None:
    easy = client(stack).chat.completions.with_raw_response.create(
        model="auto", messages=SHORT, user="ann"
    )
    assert easy.headers["X-Tollgate-Model-Served"] == "gpt-4o-mini"
    assert easy.headers["X-Tollgate-Tier"] == "economy"
    assert easy.parse().model == "gpt-4o-mini"
    hard = client(stack).chat.completions.with_raw_response.create(
        model="auto", messages=HARD, user="ben"
    )
    assert hard.headers["X-Tollgate-Tier"] in ("standard", "premium")
    assert hard.headers["X-Tollgate-Model-Served"] in ("gpt-4o", "gpt-4")

    usage = {u["user_id"]: u for u in usage_of(stack, 2)}
    ann, ben = usage["ann"], usage["ben"]
    assert ann["request_id"] == easy.headers["X-Request-Id"]
    assert ann["model_requested"] == "auto" and ann["model_served"] == "gpt-4o-mini"
    assert ann["tier"] == "economy" and ann["attempt"] == 1 and not ann["escalated"]
    assert ann["router_score"] is not None and 0 <= ann["router_score"] <= 1
    assert "P(economy fails)" in ann["router_reason"]
    # routed to economy: the routing lever saved against the top tier's list price
    assert ann["requested_cost_usd_nanos"] > ann["cost_usd_nanos"] > 0
    assert ben["model_requested"] == "auto" and ben["tier"] in ("standard", "premium")
    assert ben["router_score"] > ann["router_score"]

    # The scores, by the tier chosen, in a histogram (what a quality_target change would move).
    metrics = httpx.get(f"{stack.url}/metrics").text
    assert 'tollgate_router_score_count{tier="economy"} 1.0' in metrics
    assert f'tollgate_router_score_count{{tier="{ben["tier"]}"}} 1.0' in metrics
    assert 'tollgate_router_score_bucket{le="0.5",tier="economy"} 1.0' in metrics


def test_concrete_model_is_not_routed(stack: Stack) -> None:
    response = client(stack).chat.completions.with_raw_response.create(
        model="gpt-4", messages=SHORT, user="cat"
    )
    assert response.headers["X-Tollgate-Model-Served"] == "gpt-4"
    assert response.headers["X-Tollgate-Tier"] == "premium"
    assert response.headers["X-Tollgate-Cache"] == "bypass"  # no temperature: default 1
    (event,) = usage_of(stack, 1)
    assert event["model_requested"] == "gpt-4" and event["model_served"] == "gpt-4"
    assert event["router_score"] is None and event["router_reason"] is None
    assert not event["escalated"] and not event["cache_hit"]


def test_unreadable_prompt_for_auto_is_a_400_naming_the_field(stack: Stack) -> None:
    response = httpx.post(
        f"{stack.url}/v1/chat/completions",
        json={"model": "auto", "messages": [{"role": "user", "content": [{"type": "text"}]}]},
        headers={"X-Tollgate-User": "dan"},
    )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] and error["param"].startswith("messages")
    assert "messages" in error["message"]
    assert stack.counter.calls == 0


def test_cache_miss_hit_bypass_and_streamed_replay(stack: Stack) -> None:
    sdk = client(stack)
    ask = {"model": "gpt-4o", "messages": SHORT, "temperature": 0, "user": "eve"}
    first = sdk.chat.completions.with_raw_response.create(**ask)
    assert first.headers["X-Tollgate-Cache"] == "miss"
    assert stack.counter.calls == 1
    second = sdk.chat.completions.with_raw_response.create(**ask)
    assert second.headers["X-Tollgate-Cache"] == "hit"
    assert stack.counter.calls == 1, "a hit must not call the provider"
    assert second.parse().choices[0].message.content == first.parse().choices[0].message.content
    assert second.parse().usage == first.parse().usage

    stream = sdk.chat.completions.with_raw_response.create(
        **ask, stream=True, stream_options={"include_usage": True}
    )
    assert stream.headers["X-Tollgate-Cache"] == "hit"
    chunks = list(stream.parse())
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == first.parse().choices[0].message.content
    assert chunks[-1].usage == first.parse().usage
    assert stack.counter.calls == 1

    fresh = sdk.chat.completions.with_raw_response.create(
        **ask, extra_headers={"Cache-Control": "no-cache"}
    )
    assert fresh.headers["X-Tollgate-Cache"] == "bypass"
    assert stack.counter.calls == 2

    metrics = httpx.get(f"{stack.url}/metrics").text
    assert 'tollgate_cache_results_total{result="hit"} 2.0' in metrics
    assert 'tollgate_cache_results_total{result="miss"} 1.0' in metrics

    usage = usage_of(stack, 4)
    miss, hit, replay, bypass = sorted(usage, key=lambda u: u["ts"])
    assert not miss["cache_hit"] and miss["cost_usd_nanos"] > 0
    for event in (hit, replay):
        assert event["cache_hit"] and event["cost_usd_nanos"] == 0
        assert event["cache_saved_usd_nanos"] == miss["cost_usd_nanos"]
        assert event["model_served"] == "gpt-4o" and event["user_id"] == "eve"
        assert event["prompt_tokens"] == miss["prompt_tokens"]
    assert replay["stream"]
    assert not bypass["cache_hit"] and bypass["cost_usd_nanos"] > 0


def test_a_cached_answer_is_only_reused_for_the_model_the_request_is_routed_to(
    kafka_settings: Settings,
) -> None:
    """Session 13's probe: the cache key was the tenant and the client's body, not the model
    routing chose. A feature pinned to premium, or one never below standard, was answered
    from the economy answer another feature's identical `auto` call had stored; a call
    naming gpt-4o got the gpt-4o-mini answer of the same body under a route_all feature."""
    routing = ROUTING.model_copy(
        update={
            "features": {
                "econ": FeatureRule(max_tier=Tier.ECONOMY),
                "pinp": FeatureRule(pin=Tier.PREMIUM),
                "minstd": FeatureRule(min_tier=Tier.STANDARD),
                "allauto": FeatureRule(route_all=True, max_tier=Tier.ECONOMY),
            }
        }
    )
    asyncio.run(ensure_topics(kafka_settings))
    with running_stack(kafka_settings, routing=routing, cache=CACHE) as stack:
        sdk = client(stack)

        def ask(model: str, feature: str | None) -> tuple[str, str]:
            answer = sdk.chat.completions.with_raw_response.create(
                model=model, messages=SHORT, temperature=0, user="cache-route",
                extra_headers={"X-Tollgate-Feature": feature} if feature else {},
            )  # fmt: skip
            return answer.headers["X-Tollgate-Cache"], answer.parse().model

        assert ask("auto", "econ") == ("miss", "gpt-4o-mini")
        assert ask("auto", "pinp") == ("miss", "gpt-4")
        assert ask("auto", "minstd") == ("miss", "gpt-4o")
        assert ask("auto", "econ") == ("hit", "gpt-4o-mini")  # the same route: reused
        assert ask("auto", "pinp") == ("hit", "gpt-4")
        # the same body sent to the same model is the same answer, whoever routed it there
        assert ask("gpt-4o", "allauto") == ("hit", "gpt-4o-mini")
        assert ask("gpt-4o", None) == ("hit", "gpt-4o")  # named, not routed: its own model's
        assert ask("gpt-4", None) == ("hit", "gpt-4")  # what the pinned feature's call stored
        assert ask("gpt-4", "allauto") == ("hit", "gpt-4o-mini")
        stored = httpx.get(f"{stack.url}/metrics").text
        assert 'tollgate_cache_results_total{result="miss"} 3.0' in stored


def test_a_named_model_routed_by_route_all_is_priced_as_the_model_it_named(
    kafka_settings: Settings,
) -> None:
    """``route_all`` routes a call that names a model, but that model is still what was asked
    for: its list price is the requested cost (routing saving = named - served), and a call
    served the model it named was not downtiered. Only ``auto`` names no model and is priced
    at the top tier (a probe: a route_all feature's routing saving was counted against gpt-4
    for calls naming gpt-4o-mini and gpt-4o, the report's routing savings overstated)."""
    from app.pricing.catalog import PriceCatalog

    routing = ROUTING.model_copy(
        update={"features": {"allauto": FeatureRule(route_all=True, max_tier=Tier.ECONOMY)}}
    )
    asyncio.run(ensure_topics(kafka_settings))
    with running_stack(kafka_settings, routing=routing, cache=CACHE) as stack:
        sdk = client(stack)

        def ask(model: str, temperature: float) -> tuple[str, str]:
            answer = sdk.chat.completions.with_raw_response.create(
                model=model, messages=SHORT, temperature=temperature, user="named",
                extra_headers={"X-Tollgate-Feature": "allauto"},
            )  # fmt: skip
            assert answer.headers["X-Tollgate-Model-Served"] == "gpt-4o-mini"
            return answer.headers["X-Request-Id"], answer.headers["X-Tollgate-Cache"]

        mini, mini_cache = ask("gpt-4o-mini", 0)
        named_hit, hit_cache = ask("gpt-4o", 0)
        named_fresh, fresh_cache = ask("gpt-4o", 1)
        auto, auto_cache = ask("auto", 1)
        assert (mini_cache, hit_cache, fresh_cache, auto_cache) == (
            "miss",
            "hit",
            "bypass",
            "bypass",
        )
        usage = {u["request_id"]: u for u in usage_of(stack, 4)}

    prices = PriceCatalog()

    def list_price(model: str, event: dict[str, Any]) -> int | None:
        return prices.list_price_nanos(model, event["prompt_tokens"], event["completion_tokens"])

    def served_price(event: dict[str, Any]) -> int:
        return int(event["cost_usd_nanos"] + event["cache_saved_usd_nanos"])

    # named the model it was served: nothing saved by routing, not downtiered
    event = usage[mini]
    assert event["model_requested"] == "gpt-4o-mini" and event["model_served"] == "gpt-4o-mini"
    assert event["requested_cost_usd_nanos"] == served_price(event) > 0
    # named gpt-4o, served gpt-4o-mini: from the cache and from the provider
    for request_id, hit in ((named_hit, True), (named_fresh, False)):
        event = usage[request_id]
        assert event["cache_hit"] is hit and event["model_requested"] == "gpt-4o"
        assert event["requested_cost_usd_nanos"] == list_price("gpt-4o", event)
        assert event["requested_cost_usd_nanos"] > served_price(event) > 0
    # auto names no model: the provider's top tier is what it asked for
    event = usage[auto]
    assert event["model_requested"] == "auto"
    assert event["requested_cost_usd_nanos"] == list_price("gpt-4", event)


def test_streamed_miss_is_stored_and_replayed(stack: Stack) -> None:
    sdk = client(stack)
    ask = {"model": "gpt-4o-mini", "messages": SHORT, "temperature": 0, "user": "fay"}
    live = sdk.chat.completions.with_raw_response.create(**ask, stream=True)
    assert live.headers["X-Tollgate-Cache"] == "miss"
    live_text = "".join(c.choices[0].delta.content or "" for c in live.parse() if c.choices)
    again = sdk.chat.completions.with_raw_response.create(**ask)
    assert again.headers["X-Tollgate-Cache"] == "hit"
    assert again.parse().choices[0].message.content == live_text
    assert stack.counter.calls == 1


def test_cached_answer_still_gets_the_budget_402(stack: Stack) -> None:
    headers = {"X-Tollgate-User": "gil", "X-Sim-Completion-Tokens": "200"}
    cached = {"model": "gpt-4o", "messages": SHORT, "temperature": 0}
    with httpx.Client(timeout=30) as http:
        assert http.post(f"{stack.url}/v1/chat/completions", json=cached, headers=headers)
        assert http.put(f"{stack.url}/v1/budgets/user:gil", json={"limit_usd": 0.01})
        hit = http.post(f"{stack.url}/v1/chat/completions", json=cached, headers=headers)
        assert hit.headers["X-Tollgate-Cache"] == "hit"
        for _ in range(100):  # spend the rest of the budget on answers that are not cached
            spent = http.post(
                f"{stack.url}/v1/chat/completions",
                json={"model": "gpt-4o", "messages": SHORT, "max_tokens": 300},
                headers=headers,
            )
            if spent.status_code == 402:
                break
        assert spent.status_code == 402
        blocked = http.post(f"{stack.url}/v1/chat/completions", json=cached, headers=headers)
    assert blocked.status_code == 402, blocked.text
    assert blocked.json()["error"]["type"] == "budget_exceeded"


def test_an_answer_cut_by_the_budget_is_not_cached(stack: Stack) -> None:
    """Near a cap the gate lowers max_tokens; that cut answer must not be stored and later
    replayed as the full answer (a newcomer got the 45-token cut answer back as a hit, with
    no sign of the cap, after raising the budget)."""
    headers = {"X-Tollgate-User": "tom", "X-Sim-Completion-Tokens": "300"}
    body = {"model": "gpt-4o", "messages": SHORT, "temperature": 0}
    with httpx.Client(timeout=30) as http:
        assert http.put(f"{stack.url}/v1/budgets/user:tom", json={"limit_usd": 0.001})
        capped = http.post(f"{stack.url}/v1/chat/completions", json=body, headers=headers)
        assert capped.status_code == 200, capped.text
        assert "X-Tollgate-Max-Tokens-Capped" in capped.headers
        assert capped.json()["choices"][0]["finish_reason"] == "length"
        assert http.put(f"{stack.url}/v1/budgets/user:tom", json={"limit_usd": 100})
        again = http.post(f"{stack.url}/v1/chat/completions", json=body, headers=headers)
    assert again.headers["X-Tollgate-Cache"] == "miss"
    assert again.json()["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize("stream", [False, True])
def test_an_answer_under_a_budget_cap_that_ended_on_its_own_is_cached(
    stack: Stack, stream: bool
) -> None:
    """Session 13's probe: a capped user (room below the worst case, so the gate lowers
    max_tokens) paid for every identical temperature-0 repeat: an answer was never stored
    when a cap was set, though it ended with finish_reason "stop", well under the cap."""
    user = f"capped-{stream}"
    headers = {"X-Tollgate-User": user, "X-Sim-Completion-Tokens": "40"}
    body = {"model": "gpt-4o", "messages": SHORT, "temperature": 0, "stream": stream}
    with httpx.Client(timeout=30) as http:
        assert http.put(f"{stack.url}/v1/budgets/user:{user}", json={"limit_usd": 0.05})
        first = http.post(f"{stack.url}/v1/chat/completions", json=body, headers=headers)
        assert first.status_code == 200, first.text
        assert "X-Tollgate-Max-Tokens-Capped" in first.headers  # 16,384 tokens do not fit
        assert first.headers["X-Tollgate-Cache"] == "miss"
        again = http.post(f"{stack.url}/v1/chat/completions", json=body, headers=headers)
    assert again.headers["X-Tollgate-Cache"] == "hit"
    # the stored answer is served as it is, no output capped (session 14's probe: a hit of
    # 254 tokens said "X-Tollgate-Max-Tokens-Capped: 141")
    assert "X-Tollgate-Max-Tokens-Capped" not in again.headers


@pytest.mark.parametrize("stream", [False, True])
def test_an_answer_cut_at_the_clients_own_max_tokens_is_not_escalated(
    stack: Stack, stream: bool
) -> None:
    """finish_reason "length" at the client's own max_tokens is what was asked for: before,
    `model: "auto"` with max_tokens 5 escalated to the standard tier and billed both."""
    response = client(stack).chat.completions.with_raw_response.create(
        model="auto", messages=SHORT, user=f"kim-{stream}", max_tokens=5, stream=stream,
        extra_headers={"X-Sim-Completion-Tokens": "50"},
    )  # fmt: skip
    assert "X-Tollgate-Escalated-From" not in response.headers
    assert response.headers["X-Tollgate-Tier"] == "economy"
    if stream:
        chunks = list(response.parse())
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    else:
        assert response.parse().choices[0].finish_reason == "length"
    assert stack.counter.calls == 1
    (usage,) = usage_of(stack, 1)
    assert usage["status"] == "ok" and not usage["escalated"]


def test_failed_economy_call_escalates_once_with_two_usage_events(stack: Stack) -> None:
    fail_economy = {"X-Sim-Status": "503", "X-Sim-Models": "gpt-4o-mini"}
    response = client(stack).chat.completions.with_raw_response.create(
        model="auto", messages=SHORT, user="hal", extra_headers=fail_economy
    )
    assert response.headers["X-Tollgate-Model-Served"] == "gpt-4o"
    assert response.headers["X-Tollgate-Tier"] == "standard"
    assert response.parse().choices[0].message.content
    assert stack.counter.calls == 2

    streamed = client(stack).chat.completions.create(
        model="auto", messages=SHORT, user="ian", stream=True, extra_headers=fail_economy
    )
    text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    assert text
    assert stack.counter.calls == 4

    usage = usage_of(stack, 4)
    for user in ("hal", "ian"):
        first, second = sorted(
            (u for u in usage if u["user_id"] == user), key=lambda u: u["attempt"]
        )
        assert first["request_id"] == second["request_id"]
        assert (first["attempt"], second["attempt"]) == (1, 2)
        assert first["model_served"] == "gpt-4o-mini" and first["status"] == "error"
        assert first["http_status"] == 503 and not first["escalated"]
        # superseded: the reports count one request and no error (probe I: an escalation
        # after a provider's error read as two requests and an error)
        assert first["error_type"] == "escalated_upstream_error"
        assert second["model_served"] == "gpt-4o" and second["status"] == "ok"
        assert second["escalated"] and second["tier"] == "standard"
        assert second["cost_usd_nanos"] > 0 and second["model_requested"] == "auto"
        assert first["event_id"] != second["event_id"]

    metrics = httpx.get(f"{stack.url}/metrics").text
    escalated = 'from_tier="economy",reason="upstream_error",result="escalated"'
    assert f"tollgate_routing_failures_total{{{escalated}}} 2.0" in metrics


def test_empty_economy_answer_escalates(stack: Stack) -> None:
    response = client(stack).chat.completions.with_raw_response.create(
        model="auto",
        messages=SHORT,
        user="jo",
        extra_headers={"X-Sim-Completion-Tokens": "0", "X-Sim-Models": "gpt-4o-mini"},
    )
    assert response.headers["X-Tollgate-Model-Served"] == "gpt-4o"
    assert response.parse().choices[0].message.content
    usage = usage_of(stack, 2)
    assert sorted((u["attempt"], u["model_served"], u["escalated"]) for u in usage) == [
        (1, "gpt-4o-mini", False),
        (2, "gpt-4o", True),
    ]
    metrics = httpx.get(f"{stack.url}/metrics").text
    assert (
        'tollgate_routing_failures_total{from_tier="economy",reason="empty",result="escalated"} 1.0'
        in metrics
    )


@pytest.mark.parametrize("stream", [False, True])
def test_a_cached_failed_economy_answer_is_not_replayed_to_auto(stack: Stack, stream: bool) -> None:
    """A probe: a call naming gpt-4o-mini got an empty answer at temperature 0, which was
    stored; the same body with `model: "auto"`, routed to economy, was answered from the
    cache with it, where a live empty answer escalates. A stored answer the validators
    would fail is no hit for a call that may escalate: it goes to the provider."""
    sdk = client(stack)
    failing = {"X-Sim-Completion-Tokens": "0", "X-Sim-Models": "gpt-4o-mini"}
    messages = [{"role": "user", "content": f"What is the capital of Chad? ({stream})"}]
    named = sdk.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=messages, temperature=0, user="cf", extra_headers=failing
    )
    assert named.headers["X-Tollgate-Cache"] == "miss"
    assert not named.parse().choices[0].message.content  # stored: what that model answered
    routed = sdk.chat.completions.with_raw_response.create(
        model="auto", messages=messages, temperature=0, user="cf", stream=stream
    )
    assert routed.headers["X-Tollgate-Cache"] == "miss"
    if stream:
        text = "".join(c.choices[0].delta.content or "" for c in routed.parse() if c.choices)
    else:
        text = routed.parse().choices[0].message.content or ""
    assert text  # the provider's answer, not the stored empty one
    again = sdk.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=messages, temperature=0, user="cf"
    )
    assert again.headers["X-Tollgate-Cache"] == "hit"  # the named call's still: its answer


def test_headers_sent_on_to_the_provider_are_part_of_the_cache_key(stack: Stack) -> None:
    """A probe: the same body with another forwarded header (here the simulator's
    X-Sim-Content; by default OpenAI-Organization, OpenAI-Project and OpenAI-Beta go on to
    the provider) was a hit with the answer made under the first. What the provider is
    sent is what the answer depends on; attribution is not (the body's `feature`)."""
    sdk = client(stack)

    def ask(headers: dict[str, str], **extra: Any) -> tuple[str, str]:
        answer = sdk.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=SHORT, temperature=0, user="hdr",
            extra_headers=headers, **extra,
        )  # fmt: skip
        return answer.headers["X-Tollgate-Cache"], answer.parse().choices[0].message.content or ""

    assert ask({"X-Sim-Content": "ALPHA answer"}) == ("miss", "ALPHA answer")
    assert ask({"X-Sim-Content": "BRAVO answer"}) == ("miss", "BRAVO answer")
    assert ask({"X-Sim-Content": "ALPHA answer"}) == ("hit", "ALPHA answer")
    assert ask({"x-sim-content": "BRAVO answer", "X-Other": "not sent on"})[0] == "hit"
    plain = ask({})
    assert plain[0] == "miss"
    by_feature = {"extra_body": {"feature": "search"}}  # attribution, not sent on
    assert ask({}, **by_feature) == ("hit", plain[1])


def test_a_routed_failure_that_cannot_escalate_is_answered_and_counted(stack: Stack) -> None:
    """Every tier failing: the economy attempt escalates once, the standard one's failure is
    the answer (one escalation per request), and the metrics say both."""
    response = httpx.post(
        f"{stack.url}/v1/chat/completions",
        json={"model": "auto", "messages": SHORT, "user": "kim"},
        headers={"X-Sim-Status": "503"},
        timeout=30,
    )
    assert response.status_code >= 500 and response.json()["error"]["type"]
    assert stack.counter.calls == 2
    metrics = httpx.get(f"{stack.url}/metrics").text
    for tier, result in (("economy", "escalated"), ("standard", "answered")):
        labels = f'from_tier="{tier}",reason="upstream_error",result="{result}"'
        assert f"tollgate_routing_failures_total{{{labels}}} 1.0" in metrics


def test_concrete_model_failure_is_not_escalated(stack: Stack) -> None:
    with pytest.raises(openai.InternalServerError):
        client(stack).chat.completions.create(
            model="gpt-4o-mini", messages=SHORT, user="kim", extra_headers={"X-Sim-Status": "503"}
        )
    assert stack.counter.calls == 1


def test_outcomes_of_routed_calls_move_the_score(stack: Stack) -> None:
    """Failures reported for routed economy calls teach this dispatcher's router: the score of
    the prompt rises until the router stops sending it to economy."""
    prompt = [{"role": "user", "content": "Translate the shipping policy into formal Klingon."}]
    before, tier, _ = route_auto(stack, prompt, "lee")
    assert tier == "economy"
    score, tier = fail_until_off_economy(stack, prompt, "lee")
    assert tier == "standard", "failures of economy calls must move the prompt up a tier"
    assert score > before


def route_auto(stack: Stack, prompt: list[dict[str, str]], user: str) -> tuple[float, str, str]:
    """Router score, tier and request id of one ``model: "auto"`` call."""
    response = client(stack).chat.completions.with_raw_response.create(
        model="auto", messages=prompt, user=user
    )
    headers = response.headers
    return (
        float(headers["X-Tollgate-Router-Score"]),
        headers["X-Tollgate-Tier"],
        headers["X-Request-Id"],
    )


def fail_until_off_economy(
    stack: Stack, prompt: list[dict[str, str]], user: str
) -> tuple[float, str]:
    """Report each economy-routed call of ``prompt`` as a failure until the router sends it to
    another tier (at most 60 calls): the last score and tier."""
    with httpx.Client(timeout=30) as http:
        for _ in range(60):
            score, tier, request_id = route_auto(stack, prompt, user)
            if tier != "economy":
                break
            reply = http.post(
                f"{stack.url}/v1/outcomes",
                json={"request_id": request_id, "outcome": "failure"},
                headers={"X-Tollgate-User": user},
            )
            assert reply.status_code == 202, reply.text
    return score, tier


def requests_of(stack: Stack, at_least: int) -> list[dict[str, Any]]:
    return asyncio.run(read_events(stack.settings, "requests", at_least=at_least))


def test_escalated_attempt_has_its_own_request_event(stack: Stack) -> None:
    """The spend worker settles a lost attempt from its Request event, and the warehouse counts
    what was reserved: the escalated attempt is announced like the first one."""
    fail_economy = {"X-Sim-Status": "503", "X-Sim-Models": "gpt-4o-mini"}
    response = client(stack).chat.completions.with_raw_response.create(
        model="auto", messages=SHORT, user="max", extra_headers=fail_economy
    )
    request_id = response.headers["X-Request-Id"]
    requests = [r for r in requests_of(stack, 2) if r["request_id"] == request_id]
    assert sorted((r["attempt"], r["model_served"], r["status"]) for r in requests) == [
        (1, "gpt-4o-mini", "accepted"),
        (2, "gpt-4o", "accepted"),
    ]
    first, second = sorted(requests, key=lambda r: r["attempt"])
    assert first["tier"] == "economy" and second["tier"] == "standard"
    assert second["reserved_usd_nanos"] > 0 and second["deadline_ts"] is not None
    assert first["event_id"] != second["event_id"]


def test_escalations_of_a_capped_user_stay_within_the_cap(stack: Stack) -> None:
    """Every escalated attempt is admitted and reserved on its own dearer worst case: a capped
    user whose economy calls all fail is stopped by a 402, not carried over the cap by retries
    on the standard tier."""
    limit_nanos = 10_000_000  # $0.01: a few gpt-4o answers of 400 tokens
    headers = {
        "X-Tollgate-User": "ned",
        "X-Sim-Status": "503",
        "X-Sim-Models": "gpt-4o-mini",
    }
    body = {"model": "auto", "messages": SHORT}
    statuses = []
    with httpx.Client(timeout=30) as http:
        assert http.put(f"{stack.url}/v1/budgets/user:ned", json={"limit_usd": 0.01})
        for _ in range(60):
            reply = http.post(
                f"{stack.url}/v1/chat/completions",
                json=body,
                headers={**headers, "X-Sim-Completion-Tokens": "400"},
            )
            statuses.append(reply.status_code)
            if reply.status_code == 402:
                break
    assert statuses[-1] == 402, statuses
    assert statuses.count(200) >= 2, statuses  # some escalations were served first
    usage = [u for u in usage_of(stack, 2 * statuses.count(200)) if u["user_id"] == "ned"]
    assert {u["attempt"] for u in usage} == {1, 2}
    spent = sum(u["cost_usd_nanos"] for u in usage)
    assert spent <= limit_nanos, f"spent {spent} nano-dollars over a cap of {limit_nanos}"


def test_a_refused_escalation_says_the_failed_attempt_was_charged(stack: Stack) -> None:
    """Session 20's note: an economy answer judged a failure was billed, then its escalation
    got a 402 that said only "budget exceeded", as if nothing had been spent. The 402 names
    the attempt and what it was charged. $0.00002 holds the economy attempt (gpt-4o-mini,
    the budget capping its output) but not even the prompt and one output token of gpt-4o
    ($0.00005), so the budget cannot cap the retry's output instead of refusing it."""
    httpx.put(f"{stack.url}/v1/budgets/user:esme", json={"limit_usd": 0.00002}).raise_for_status()
    empty_economy = {"X-Sim-Completion-Tokens": "0", "X-Sim-Models": "gpt-4o-mini"}
    with pytest.raises(openai.APIStatusError) as refused:
        client(stack).chat.completions.create(
            model="auto", messages=SHORT, user="esme", extra_headers=empty_economy
        )
    assert refused.value.status_code == 402
    error = refused.value.response.json()["error"]
    (usage,) = usage_of(stack, 1)
    assert usage["model_served"] == "gpt-4o-mini" and usage["cost_usd_nanos"] > 0, error
    assert error["escalated_from"] == "gpt-4o-mini"
    assert error["charged_usd"] == pytest.approx(usage["cost_usd_nanos"] / 1e9)
    assert (
        "first attempt, on gpt-4o-mini, failed (empty) and was charged $0.0000"
        in (error["message"])
    )
    assert stack.counter.calls == 1  # the escalation never reached the provider


def test_empty_economy_stream_escalates_before_its_first_byte(stack: Stack) -> None:
    """An economy stream that ends without content is retried one tier up; the client (the real
    openai SDK, stream=True) sees only the second attempt's stream."""
    empty_economy = {"X-Sim-Completion-Tokens": "0", "X-Sim-Models": "gpt-4o-mini"}
    response = client(stack).chat.completions.with_raw_response.create(
        model="auto", messages=SHORT, user="ola", stream=True, extra_headers=empty_economy
    )
    assert response.headers["X-Tollgate-Model-Served"] == "gpt-4o"
    assert response.headers["X-Tollgate-Escalated-From"] == "gpt-4o-mini"
    chunks = list(response.parse())
    assert {c.model for c in chunks} == {"gpt-4o"}, "no byte of the failed stream may leak"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert stack.counter.calls == 2
    usage = usage_of(stack, 2)
    first, second = sorted(usage, key=lambda u: u["attempt"])
    assert first["model_served"] == "gpt-4o-mini" and first["status"] == "error"
    assert first["error_type"] == "escalated_empty" and first["stream"]
    assert second["model_served"] == "gpt-4o" and second["escalated"]
    assert second["status"] == "ok" and second["completion_tokens"] > 0


def test_a_repeat_answered_by_the_cache_after_an_escalation_says_it_escalated(
    stack: Stack,
) -> None:
    """Probe R: economy failed again on a repeat, the next tier's answer came from the
    cache, and the answer said a plain hit, hiding the economy attempt it was billed for."""
    empty_economy = {"X-Sim-Completion-Tokens": "0", "X-Sim-Models": "gpt-4o-mini"}
    ask = {"model": "auto", "messages": SHORT, "temperature": 0, "user": "ross"}
    answers = [
        client(stack).chat.completions.with_raw_response.create(**ask, extra_headers=empty_economy)
        for _ in range(2)
    ]
    assert [a.headers["X-Tollgate-Cache"] for a in answers] == ["miss", "hit"]
    for answer in answers:
        assert answer.headers["X-Tollgate-Model-Served"] == "gpt-4o"
        assert answer.headers["X-Tollgate-Escalated-From"] == "gpt-4o-mini"
    assert answers[1].parse().choices[0].message.content == (
        answers[0].parse().choices[0].message.content
    )


def test_a_cache_hit_is_served_to_a_user_under_the_cap_whatever_its_prompt_would_cost(
    stack: Stack,
) -> None:
    """Probe S: with $0.0044 left, a repeat of a cached 5,004-token prompt got a 402 ("the
    prompt alone would cost at least $0.0125"), though a hit costs nothing: admission came
    before the cache lookup. Only a reached limit refuses a hit."""
    long = [{"role": "user", "content": "Summarise: " + "tollgate budget cache " * 800}]
    ask = {"model": "gpt-4o", "messages": long, "temperature": 0, "user": "vera"}
    fixed = {"X-Sim-Completion-Tokens": "50"}
    with httpx.Client(timeout=30) as http:
        assert http.put(f"{stack.url}/v1/budgets/user:vera", json={"limit_usd": 0.02})
        sdk = client(stack)
        first = sdk.chat.completions.with_raw_response.create(**ask, extra_headers=fixed)
        assert first.headers["X-Tollgate-Cache"] == "miss"
        status = http.get(f"{stack.url}/v1/budgets/user:vera/status").json()
        room = Decimal(status["remaining_usd"])
        prompt_cost = Decimal(first.parse().usage.prompt_tokens) * Decimal("2.5e-6")
        assert status["state"] != "blocked" and room + Decimal("0.002") < prompt_cost
        again = sdk.chat.completions.with_raw_response.create(**ask, extra_headers=fixed)
        assert again.headers["X-Tollgate-Cache"] == "hit"
        assert again.parse().choices[0].message.content == (
            first.parse().choices[0].message.content
        )
        # A prompt as long that is not cached would cost more than the room: refused.
        other = {**ask, "messages": [{"role": "user", "content": long[0]["content"] + "!"}]}
        refused = http.post(f"{stack.url}/v1/chat/completions", json=other, headers=fixed)
        assert refused.status_code == 402, refused.text
    assert stack.counter.calls == 1


def test_streamed_economy_answer_with_content_is_not_escalated(stack: Stack) -> None:
    """Holding a routed stream until its first content changes nothing for a good answer."""
    streamed = client(stack).chat.completions.create(
        model="auto", messages=SHORT, user="pat", stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(streamed)
    assert {c.model for c in chunks} == {"gpt-4o-mini"}
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(text.split()) > 1
    assert stack.counter.calls == 1


def test_empty_stream_of_a_concrete_model_is_passed_through(stack: Stack) -> None:
    streamed = client(stack).chat.completions.create(
        model="gpt-4o-mini", messages=SHORT, user="quin", stream=True,
        extra_headers={"X-Sim-Completion-Tokens": "0"},
    )  # fmt: skip
    text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    assert text == ""
    assert stack.counter.calls == 1


def test_every_chat_response_header_is_in_the_openapi_document(stack: Stack) -> None:
    """The X-Tollgate-* headers a client really gets are the ones /openapi.json documents."""
    sdk = client(stack)
    seen: set[str] = set()
    for ask in (
        {"model": "auto", "messages": SHORT, "user": "ray"},
        {"model": "auto", "messages": SHORT, "user": "ray", "temperature": 0},
        {"model": "auto", "messages": SHORT, "user": "ray", "temperature": 0},  # a hit
        {
            "model": "auto", "messages": SHORT, "user": "ray",
            "extra_headers": {"X-Sim-Status": "503", "X-Sim-Models": "gpt-4o-mini",
                              "X-Request-Id": "mine-1"},
        },
    ):  # fmt: skip
        response = sdk.chat.completions.with_raw_response.create(**ask)
        seen |= {h.lower() for h in response.headers if h.lower().startswith("x-")}
    document = httpx.get(f"{stack.url}/openapi.json").json()
    for path in ("/v1/chat/completions", "/v1/dispatch"):
        documented = document["paths"][path]["post"]["responses"]["200"]["headers"]
        assert seen <= {h.lower() for h in documented}, seen - {h.lower() for h in documented}
    assert {"x-tollgate-escalated-from", "x-tollgate-router-score", "x-client-request-id"} <= seen


def test_a_restarted_dispatcher_keeps_what_its_router_learned(
    kafka_settings: Settings, tmp_path: Any
) -> None:
    """Local learning (no shared learner) survives a restart: the model is checkpointed in the
    state directory, so a prompt the router learned to keep off economy stays off it."""
    asyncio.run(ensure_topics(kafka_settings))
    state = tmp_path / "dispatcher"
    prompt = [{"role": "user", "content": "Translate the returns policy into formal Klingon."}]
    with running_stack(kafka_settings, routing=ROUTING, cache=CACHE, state_dir=state) as first:
        fresh, tier, _ = route_auto(first, prompt, "kim")
        assert tier == "economy"
        learned, tier = fail_until_off_economy(first, prompt, "kim")
        assert tier == "standard"
    with running_stack(kafka_settings, routing=ROUTING, cache=CACHE, state_dir=state) as second:
        score, tier, _ = route_auto(second, prompt, "kim")
    assert tier == "standard", "the restarted dispatcher forgot what its router learned"
    assert score == pytest.approx(learned) and score > fresh


def test_the_router_model_loads_with_the_first_scored_request_or_at_start_when_preloaded(
    kafka_settings: Settings, stack: Stack
) -> None:
    """By default the failure model (numpy, River: ~90 MB) loads with the first scored request,
    and /readyz says whether it is loaded. ``routing.preload_model`` loads it at start-up, and
    /readyz is not ready until it is: a load balancer then sends no routed request to a
    dispatcher that would make it wait for the load."""
    checks = httpx.get(f"{stack.url}/readyz").json()["checks"]
    assert checks["router_model_loaded"] is False
    client(stack).chat.completions.create(model="auto", messages=SHORT, user="amy")
    assert httpx.get(f"{stack.url}/readyz").json()["checks"]["router_model_loaded"] is True

    preloaded = ROUTING.model_copy(update={"preload_model": True})
    with running_stack(kafka_settings, routing=preloaded, cache=CACHE) as other:
        deadline = time.monotonic() + 120
        ready: dict[str, Any] = {}
        while time.monotonic() < deadline:
            ready = httpx.get(f"{other.url}/readyz").json()
            if ready["ready"]:
                break
            assert ready["checks"]["router_model_loaded"] is False  # not ready without it
            time.sleep(0.1)
        assert ready["ready"] and ready["checks"]["router_model_loaded"] is True
        assert other.counter.calls == 0  # loaded with no request at all


def test_dispatch_without_a_model_is_routed_and_attributed_as_its_default(stack: Stack) -> None:
    """/v1/dispatch defaults the model (TOLLGATE_DEFAULT_MODEL); the request and its events
    must name it and its tier as if the client had asked for it (before: no tier header,
    model_requested "" and tier null on every such event)."""
    response = httpx.post(
        f"{stack.url}/v1/dispatch",
        json={"messages": SHORT, "user_id": "alice-dispatch"},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    default = stack.settings.default_model
    assert response.headers["X-Tollgate-Model-Served"] == default
    assert response.headers["X-Tollgate-Tier"]
    requests = asyncio.run(read_events(stack.settings, "requests", at_least=1))
    (mine,) = [r for r in requests if r["user_id"] == "alice-dispatch"]
    assert mine["model_requested"] == default and mine["tier"]


def test_auto_near_a_cap_is_routed_down_to_a_tier_that_fits(stack: Stack) -> None:
    """Defect D5: a hard prompt sent to ``auto`` near its user's cap was routed to standard or
    premium, whose prompt alone cost more than what was left, and refused with a 402, though
    the economy tier fitted. It is served on the most capable cheaper tier that fits, says so
    in a header and in the usage event's router_reason; a named model is never changed."""
    limit = 0.0005  # HARD on gpt-4o or gpt-4: its prompt alone is more; on gpt-4o-mini, $0.0001
    with httpx.Client(timeout=30) as http:
        assert http.put(f"{stack.url}/v1/budgets/user:dora", json={"limit_usd": limit})
        named = http.post(
            f"{stack.url}/v1/chat/completions",
            json={"model": "gpt-4o", "messages": HARD, "user": "dora"},
        )
        assert named.status_code == 402, named.text  # a named model is refused, not changed
    answer = client(stack).chat.completions.with_raw_response.create(
        model="auto", messages=HARD, user="dora", extra_headers={"X-Sim-Completion-Tokens": "20"}
    )
    assert answer.headers["X-Tollgate-Model-Served"] == "gpt-4o-mini"
    assert answer.headers["X-Tollgate-Tier"] == "economy"
    assert answer.headers["X-Tollgate-Budget-Downgraded-From"] in ("gpt-4o", "gpt-4")
    assert answer.parse().choices[0].message.content
    (usage,) = usage_of(stack, 1)
    assert usage["model_requested"] == "auto" and usage["model_served"] == "gpt-4o-mini"
    assert usage["tier"] == "economy" and usage["attempt"] == 1 and not usage["escalated"]
    assert "budget" in usage["router_reason"]
    assert 0 < usage["cost_usd_nanos"] <= limit * 1e9
    assert stack.counter.calls == 1  # only the economy call reached the provider


def test_a_call_routed_down_by_its_budget_does_not_escalate_to_a_tier_it_could_not_afford(
    stack: Stack,
) -> None:
    """An economy answer judged a failure after the budget routed the call down is answered
    as it is: the tier above was just refused for the same prompt, so an escalation there
    would only turn a paid answer into a 402."""
    with httpx.Client(timeout=30) as http:
        assert http.put(f"{stack.url}/v1/budgets/user:eli", json={"limit_usd": 0.0005})
    answer = client(stack).chat.completions.with_raw_response.create(
        model="auto", messages=HARD, user="eli",
        extra_headers={"X-Sim-Completion-Tokens": "0", "X-Sim-Models": "gpt-4o-mini"},
    )  # fmt: skip
    assert answer.http_response.status_code == 200
    assert answer.headers["X-Tollgate-Model-Served"] == "gpt-4o-mini"
    assert "X-Tollgate-Escalated-From" not in answer.headers
    (usage,) = usage_of(stack, 1)
    assert usage["attempt"] == 1 and usage["status"] == "ok"
    assert stack.counter.calls == 1
