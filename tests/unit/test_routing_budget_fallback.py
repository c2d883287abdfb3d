"""Routing down by the budget (``SavingsLevers.budget_fallback``), pure logic: which cheaper
tier an ``auto`` call refused by its budget tries next, and what is never changed. The
dispatcher's part (the gate's refusal, headers, events) is tested end to end in
``tests/integration/test_savings_wiring.py``."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from app.cache.config import CacheSettings
from app.gateway.savings import RouteInfo, SavingsLevers
from app.routing import FeatureRule, ProviderTiers, RoutingSettings, Tier
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
    # refused on premium only (premium -> economy: standard had no model then, say): an
    # escalation to standard, between, is still made, and admitted by the gate like any
    skipped = routed(
        "gpt-4o-mini", "economy", budget_downgraded_from="gpt-4", budget_refused_tier="premium"
    )
    assert lever.may_escalate(skipped, None, 1)
    step = lever.escalate(skipped, Failure.EMPTY, request_id="r", feature=None, attempt=1)
    assert step is not None and step[1].model == "gpt-4o"
