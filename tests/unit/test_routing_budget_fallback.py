"""Routing down by the budget (``SavingsLevers.budget_fallback``), pure logic: which cheaper
tier an ``auto`` call refused by its budget tries next, and what is never changed. The
dispatcher's part (the gate's refusal, headers, events) is tested end to end in
``tests/integration/test_savings_wiring.py``."""

from __future__ import annotations

import itertools
from dataclasses import replace
from typing import Any

import pytest

from app.cache.config import CacheSettings
from app.gateway.savings import RouteInfo, SavingsLevers
from app.routing import FeatureRule, ProviderTiers, RoutingSettings, Tier
from app.routing.config import TIER_ORDER
from app.routing.escalation import Failure

PROVIDERS = (
    ProviderTiers(provider="sim", economy="gpt-4o-mini", standard="gpt-4o", premium="gpt-4"),
)
WHY = "user:u: the prompt alone costs more than is left"


def levers(**rules: FeatureRule) -> SavingsLevers:
    routing = RoutingSettings(providers=PROVIDERS, exploration_rate=0.0, features=rules)
    return SavingsLevers(routing, CacheSettings())


def routed(model: str, tier: str, **extra: Any) -> RouteInfo:
    return RouteInfo(
        model_requested="auto", model=model, tier=tier, routed=True, score=0.9,
        reason="P(economy fails) 0.9", provider="sim", reference_model="gpt-4", **extra,
    )  # fmt: skip


def test_an_auto_call_goes_one_tier_down_at_a_time() -> None:
    lever = levers()
    standard = lever.budget_fallback(routed("gpt-4", "premium"), None, WHY)
    assert standard is not None
    assert (standard.model, standard.tier) == ("gpt-4o", "standard")
    assert standard.budget_downgraded_from == "gpt-4"
    assert standard.reason is not None and f"budget: gpt-4 refused ({WHY})" in standard.reason
    economy = lever.budget_fallback(standard, None, WHY)
    assert economy is not None and (economy.model, economy.tier) == ("gpt-4o-mini", "economy")
    assert economy.budget_downgraded_from == "gpt-4"  # the router's own choice, kept
    assert economy.budget_refused_tier == "standard"
    assert economy.model_requested == "auto" and economy.reference_model == "gpt-4"
    assert lever.budget_fallback(economy, None, WHY) is None  # nothing cheaper


def test_a_named_model_a_pin_or_a_min_tier_is_never_routed_down() -> None:
    lever = levers(
        legal=FeatureRule(pin=Tier.PREMIUM),
        review=FeatureRule(min_tier=Tier.STANDARD),
        bulk=FeatureRule(route_all=True),
    )
    named = replace(routed("gpt-4o", "standard"), model_requested="gpt-4", reference_model=None)
    assert lever.budget_fallback(named, "bulk", WHY) is None
    unrouted = RouteInfo(model_requested="gpt-4", model="gpt-4", tier="premium")
    assert lever.budget_fallback(unrouted, None, WHY) is None
    assert lever.budget_fallback(routed("gpt-4", "premium"), "legal", WHY) is None
    review = lever.budget_fallback(routed("gpt-4", "premium"), "review", WHY)
    assert review is not None and review.tier == "standard"
    assert lever.budget_fallback(review, "review", WHY) is None


def test_a_call_routed_down_never_escalates_to_the_tier_it_was_refused_on() -> None:
    lever = levers()
    economy = lever.budget_fallback(routed("gpt-4o", "standard"), None, WHY)
    assert economy is not None
    assert not lever.may_escalate(economy, None, 1)
    assert lever.escalate(economy, Failure.EMPTY, request_id="r", feature=None, attempt=1) is None
    # refused on premium, at a provider with no standard model: served on economy, and the
    # escalation from economy would be premium again
    no_standard = SavingsLevers(
        RoutingSettings(
            providers=(ProviderTiers(provider="sim", economy="gpt-4o-mini", premium="gpt-4"),),
            exploration_rate=0.0,
        ),
        CacheSettings(),
    )
    skipped = no_standard.budget_fallback(routed("gpt-4", "premium"), None, WHY)
    assert skipped is not None and (skipped.tier, skipped.budget_refused_tier) == (
        "economy",
        "premium",
    )
    assert not no_standard.may_escalate(skipped, None, 1)
    assert (
        no_standard.escalate(skipped, Failure.EMPTY, request_id="r", feature=None, attempt=1)
        is None
    )


MODELS = {Tier.ECONOMY: "gpt-4o-mini", Tier.STANDARD: "gpt-4o", Tier.PREMIUM: "gpt-4"}


@pytest.mark.parametrize(
    "tiers",
    [held for n in (2, 3) for held in itertools.combinations(TIER_ORDER, n)],
    ids=lambda held: "+".join(t.value for t in held),
)
@pytest.mark.parametrize("min_tier", [None, *TIER_ORDER], ids=lambda t: f"min_{t}")
def test_the_tier_an_escalation_would_reach_is_always_the_one_refused(
    tiers: tuple[Tier, ...], min_tier: Tier | None
) -> None:
    """Why "routed down by its budget" alone forbids escalating: routing down takes the first
    cheaper tier with a model, escalating the first dearer one, at the same provider, so the
    escalation of any call routed down would be to the tier its budget refused. Every
    provider shape, routed tier and ``min_tier``; one or more steps down."""
    provider = ProviderTiers(provider="sim", **{t.value: MODELS[t] for t in tiers})
    routing = RoutingSettings(
        providers=(provider,), exploration_rate=0.0, features={"f": FeatureRule(min_tier=min_tier)}
    )
    lever = SavingsLevers(routing, CacheSettings())
    reached = 0
    for top in tiers:
        route: RouteInfo | None = routed(MODELS[top], top.value)
        while (route := lever.budget_fallback(route, "f", WHY)) is not None:
            reached += 1
            refused = route.budget_refused_tier
            assert refused is not None and route.tier is not None
            step = lever.escalation.escalation(
                Failure.EMPTY, tier=Tier(route.tier), feature="f", provider=route.provider
            )
            assert step is not None and step.tier.value == refused
            assert not lever.may_escalate(route, "f", 1)
            assert (
                lever.escalate(route, Failure.EMPTY, request_id="r", feature="f", attempt=1) is None
            )
            assert not lever.would_escalate(route, b'{"choices": []}', "f", 1, False)
    assert reached or min_tier is not None
