"""Exploration: a seeded share of prompts scored above the economy threshold go to economy so
the router gets economy labels for them; never against a feature's rule or near a budget."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from app.budgets.gate import BudgetGate
from app.budgets.policy import PolicyBook, parse_policy
from app.budgets.reservations import CallCost
from app.cache.config import CacheSettings
from app.clock import Clock
from app.gateway.savings import SavingsLevers
from app.routing import FeatureRule, ProviderTiers, Router, RoutingSettings, Tier

HARD = {
    "model": "auto",
    "messages": [
        {
            "role": "user",
            "content": (
                "Prove step by step that the sum of two odd numbers is even, derive the general "
                "formula for the sum of the first n odd numbers, justify each step, then compare "
                "the trade-offs of an inductive and a direct proof: $\\sum_{k=1}^{n} (2k-1) = n^2$. "
            )
            * 6,
        }
    ],
}
EASY = {"model": "auto", "messages": [{"role": "user", "content": "What is 2 + 2?"}]}
PROVIDERS = (
    ProviderTiers(provider="sim", economy="gpt-4o-mini", standard="gpt-4o", premium="gpt-4"),
)
KEYS = [f"req-{i}" for i in range(4000)]


def settings(**overrides: Any) -> RoutingSettings:
    return RoutingSettings(providers=PROVIDERS, **overrides)


def explored(router: Router, body: dict[str, Any], feature: str | None = None) -> list[str]:
    return [
        key for key in KEYS if router.route(body, feature, explore_key=key).tier is Tier.ECONOMY
    ]


def test_the_hard_prompt_is_above_the_threshold_without_exploration() -> None:
    router = Router(settings(exploration_rate=0.0))
    assert router.route(HARD).tier is not Tier.ECONOMY
    assert explored(router, HARD) == []


def test_a_seeded_share_of_above_threshold_prompts_goes_to_economy() -> None:
    router = Router(settings(exploration_rate=0.05))
    keys = explored(router, HARD)
    # binomial(4000, 0.05): mean 200, sd 13.8; the seed makes it the same number every run
    assert 140 <= len(keys) <= 260
    decision = router.route(HARD, explore_key=keys[0])
    assert decision.model == "gpt-4o-mini" and decision.explored and decision.routed
    assert "exploration" in decision.reason
    assert decision.score is not None and decision.score > 0.25  # the score is unchanged
    assert not router.route(HARD, explore_key=next(k for k in KEYS if k not in keys)).explored
    assert explored(Router(settings(exploration_rate=0.05)), HARD) == keys  # reproducible
    other_seed = explored(Router(settings(exploration_rate=0.05, exploration_seed=7)), HARD)
    assert other_seed != keys and 140 <= len(other_seed) <= 260


def test_prompts_already_sent_to_economy_are_not_marked() -> None:
    router = Router(settings(exploration_rate=0.5))
    decisions = [router.route(EASY, explore_key=key) for key in KEYS[:200]]
    assert all(d.tier is Tier.ECONOMY and not d.explored for d in decisions)
    assert not any("exploration" in d.reason for d in decisions)


def test_no_exploration_without_a_key() -> None:
    """Offline scoring (`tollgate route score`, the benchmark's baselines) never explores."""
    router = Router(settings(exploration_rate=0.5))
    assert all(router.route(HARD).tier is not Tier.ECONOMY for _ in range(20))


@pytest.mark.parametrize(
    "rule",
    [
        FeatureRule(min_tier=Tier.STANDARD),
        FeatureRule(pin=Tier.STANDARD),
        FeatureRule(learn=False),
        FeatureRule(provider="top-only"),
    ],
    ids=["min_tier", "pin", "learn-off", "no-economy-model"],
)
def test_a_feature_whose_rule_forbids_economy_never_explores(rule: FeatureRule) -> None:
    router = Router(
        RoutingSettings(
            providers=(*PROVIDERS, ProviderTiers(provider="top-only", premium="gpt-4")),
            features={"strict": rule},
            exploration_rate=0.5,
        )
    )
    assert not router.may_explore("strict")
    assert explored(router, HARD, "strict") == []
    assert router.may_explore(None) and explored(router, HARD)  # the default rule does


def test_a_feature_capped_at_economy_may_explore() -> None:
    router = Router(
        settings(exploration_rate=0.5, features={"f": FeatureRule(max_tier=Tier.STANDARD)})
    )
    assert router.may_explore("f")


# -- in the dispatcher's levers: near a budget, and learning from the explored call ------------
def levers(rate: float) -> SavingsLevers:
    return SavingsLevers(settings(exploration_rate=rate), CacheSettings())


def test_the_levers_do_not_explore_when_the_call_may_not() -> None:
    lever = levers(0.5)
    asked = []

    def never() -> bool:
        asked.append(True)
        return False

    routes = [lever.route(key, HARD, None, may_explore=never) for key in KEYS[:200]]
    assert all(r.tier != "economy" and not r.explored for r in routes)
    assert asked, "the budget check must be asked for calls the draw picked"


def test_an_explored_call_teaches_the_router_from_its_outcome() -> None:
    lever = levers(0.5)
    routes = {key: lever.route(key, HARD, None) for key in KEYS[:100]}
    explored_keys = [k for k, r in routes.items() if r.explored]
    assert explored_keys
    route = routes[explored_keys[0]]
    assert (
        route.tier == "economy"
        and route.model == "gpt-4o-mini"
        and "exploration" in (route.reason or "")
    )
    before = lever.router.score(HARD)[0]
    for key in explored_keys:
        assert lever.learn_outcome(key, "failure")
    assert lever.router.score(HARD)[0] > before
    not_explored = next(k for k, r in routes.items() if not r.explored)
    assert not lever.learn_outcome(not_explored, "failure")  # standard: says nothing of economy


def _gate(limit_usd: float, now: datetime) -> BudgetGate:
    book = PolicyBook()
    book.put(parse_policy("user:u", {"limit_usd": limit_usd}))
    return BudgetGate(book, Clock(now))


def test_the_gate_says_when_a_scope_is_near_its_limit() -> None:
    now = datetime(2025, 1, 15, 12, tzinfo=UTC)
    gate = _gate(1.0, now)
    assert not gate.near_limit(["user:u", "user:other"], 0.2)
    assert not gate.near_limit(["user:other"], 0.2)  # uncapped
    cost = CallCost(
        price=lambda tokens: 850_000_000, max_output_tokens=10, expected_output_tokens=10,
        client_capped=True,
    )  # fmt: skip
    admission = gate.admit(["user:u"], cost)  # $0.85 worst case in flight: 15 % room left
    assert gate.near_limit(["user:u"], 0.2)
    assert not gate.near_limit(["user:u"], 0.1)
    gate.settle(admission.reservation, 0)
    assert not gate.near_limit(["user:u"], 0.2)
