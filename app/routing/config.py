"""Routing configuration: tiers per provider, per-feature rules, the learner's knobs.

Owns the typed shape of everything an operator sets about routing (it is nested in
``app.settings.Settings`` as ``routing``) and the checks that make a bad value an
error naming the field. It does not own scoring (:mod:`app.routing.model`) or the
decision (:mod:`app.routing.router`).

A YAML example (``TOLLGATE_CONFIG``; or ``TOLLGATE_ROUTING`` as JSON)::

    routing:
      quality_target: 0.75          # economy when P(economy succeeds) >= 0.75
      premium_above: 0.8            # premium when P(economy fails) >= 0.8
      providers:
        - {provider: openai, economy: gpt-4o-mini, standard: gpt-4o, premium: gpt-4.1}
      features:
        support-bot: {max_tier: economy}          # economy unless escalated
        legal-review: {pin: premium}
        chat: {route_all: true, quality_target: 0.9}
"""

from __future__ import annotations

from enum import StrEnum

from pydantic import BaseModel, Field, model_validator


class Tier(StrEnum):
    """Price tiers, cheapest first. ``Tier.rank`` orders them."""

    ECONOMY = "economy"
    STANDARD = "standard"
    PREMIUM = "premium"

    @property
    def rank(self) -> int:
        return TIER_ORDER.index(self)


TIER_ORDER: tuple[Tier, ...] = (Tier.ECONOMY, Tier.STANDARD, Tier.PREMIUM)


class ProviderTiers(BaseModel):
    """The model that serves each tier at one provider (an upstream's ``name``)."""

    model_config = {"frozen": True, "extra": "forbid"}

    provider: str = Field(min_length=1, description="Upstream name, as in TOLLGATE_UPSTREAMS.")
    economy: str | None = Field(default=None, min_length=1)
    standard: str | None = Field(default=None, min_length=1)
    premium: str | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _at_least_one(self) -> ProviderTiers:
        if not any(self.model_for(tier) for tier in TIER_ORDER):
            raise ValueError(
                f"provider {self.provider!r} names no model for any tier; "
                "set at least one of economy, standard, premium"
            )
        return self

    def model_for(self, tier: Tier) -> str | None:
        value: str | None = getattr(self, tier.value)
        return value

    def tier_of(self, model: str) -> Tier | None:
        for tier in TIER_ORDER:
            if self.model_for(tier) == model:
                return tier
        return None


class FeatureRule(BaseModel):
    """What one feature allows. Unset fields fall back to the routing defaults."""

    model_config = {"frozen": True, "extra": "forbid"}

    route_all: bool = Field(
        default=False,
        description="Route every request of this feature, not only those asking for model 'auto'.",
    )
    pin: Tier | None = Field(default=None, description="Always this tier (no scoring needed).")
    min_tier: Tier | None = Field(default=None, description="Never below this tier.")
    max_tier: Tier | None = Field(
        default=None, description="Never above this tier (escalation may still go one up)."
    )
    quality_target: float | None = Field(default=None, gt=0, lt=1)
    premium_above: float | None = Field(default=None, gt=0, le=1)
    provider: str | None = Field(default=None, description="Provider whose tiers to use.")
    learn: bool = Field(default=True, description="Learn from this feature's outcomes.")
    escalate: bool = Field(default=True, description="Retry a failed call one tier up.")

    @model_validator(mode="after")
    def _ordered(self) -> FeatureRule:
        if self.min_tier and self.max_tier and self.min_tier.rank > self.max_tier.rank:
            raise ValueError(
                f"min_tier {self.min_tier.value} is above max_tier {self.max_tier.value}; "
                "swap them or drop one"
            )
        return self


FAILURE_KINDS = ("upstream_error", "timeout", "empty", "truncated", "refused")


class RoutingSettings(BaseModel):
    """The router's settings (``Settings.routing``)."""

    model_config = {"frozen": True, "extra": "forbid"}

    enabled: bool = Field(default=True, description="Route requests asking for `auto_model`.")
    auto_model: str = Field(default="auto", min_length=1, description="Model name that routes.")
    providers: tuple[ProviderTiers, ...] = Field(
        default=(
            ProviderTiers(
                provider="simulator",
                economy="gpt-4o-mini",
                standard="gpt-4o",
                premium="gpt-4-turbo",
            ),
        ),
        min_length=1,
        description="Tier models per provider; the first is the default provider.",
    )
    quality_target: float = Field(
        default=0.75,
        gt=0,
        lt=1,
        description="Economy when the estimated P(economy succeeds) is at least this.",
    )
    premium_above: float = Field(
        default=0.8,
        gt=0,
        le=1,
        description="Premium (not standard) when the estimated P(economy fails) is at least this.",
    )
    features: dict[str, FeatureRule] = Field(
        default_factory=dict, description="Per-feature rules, by feature name."
    )
    hash_bits: int = Field(
        default=18, ge=10, le=24, description="Buckets (2^bits) of the hashed text features."
    )
    max_prompt_chars: int = Field(
        default=800,
        ge=100,
        description="Characters of the last user message read for text features (head and tail).",
    )
    warmup_outcomes: int = Field(
        default=30,
        ge=1,
        description="Outcomes after which the learned model counts as much as the prior.",
    )
    max_feature_models: int = Field(
        default=100,
        ge=0,
        description="Features with their own model (512 KB each); others use the global one (4 MB).",
    )
    learning_rate: float = Field(default=0.01, gt=0, le=1, description="SGD step of the learner.")
    remember_routed: int = Field(
        default=10_000,
        ge=0,
        description="Economy-routed requests whose features a dispatcher keeps (2-4 KB each) "
        "to learn from an outcome posted for them later (/v1/outcomes); 0 = learn only from "
        "escalations. With shared_learning, the learner's bound on routed calls (and on "
        "outcomes) waiting for each other.",
    )
    shared_learning: bool = Field(
        default=False,
        description="Learn once, in `tollgate router-learn`, from every dispatcher's routed calls "
        "and the outcomes topic, and score with the model it publishes (routing.state); "
        "dispatchers then stop learning locally. `tollgate up` turns it on and starts the "
        "learner. Off: each dispatcher learns from the outcomes posted to itself.",
    )
    publish_every_s: float = Field(
        default=10.0,
        gt=0,
        description="The shared learner publishes its model (and checkpoints its offsets) at "
        "most this often, when it learned something; without shared learning, a dispatcher "
        "writes its model to <state_dir>/router-model.bin as often (and on shutdown).",
    )
    preload_model: bool = Field(
        default=False,
        description="Load the failure model (numpy, River: about 90 MB of resident memory and "
        "1-3 s of imports) when the dispatcher starts, and report not ready on /readyz until "
        "it is loaded, instead of with the first scored request (which then waits for the "
        "load; a dispatcher that routes nothing never pays it).",
    )
    exploration_rate: float = Field(
        default=0.02,
        ge=0,
        le=0.5,
        description="Share of routed prompts scored above the economy threshold that go to "
        "economy anyway, so the router gets economy outcomes for them (their reason says "
        "'exploration'); only where the feature's rule allows economy and learning, and never "
        "for a call whose budget scope is near its limit. 0 disables.",
    )
    exploration_seed: int = Field(
        default=0,
        description="Seed of the exploration draw (a hash of the seed and the request id: the "
        "same request explores on every replica).",
    )
    exploration_min_room: float = Field(
        default=0.2,
        ge=0,
        le=1,
        description="No exploration for a call when any of its capped scopes has less than this "
        "share of its limit left (counting calls in flight).",
    )
    escalate_on: tuple[str, ...] = Field(
        default=FAILURE_KINDS,
        description="Failures of a routed call retried once on the next tier up.",
    )
    refusal_phrases: tuple[str, ...] = Field(
        default=(
            "i can't help with",
            "i cannot help with",
            "i can't assist with",
            "i cannot assist with",
            "i'm sorry, but i can't",
            "i am unable to help",
            "i'm unable to help",
        ),
        description="Lower-case openings that make an answer count as refused (leading "
        "whitespace ignored, any case). A routed stream that may escalate is held while its "
        "text could still open with one: at most the longest phrase's length of text.",
    )

    @model_validator(mode="after")
    def _check(self) -> RoutingSettings:
        unknown = [kind for kind in self.escalate_on if kind not in FAILURE_KINDS]
        if unknown:
            raise ValueError(
                f"escalate_on has unknown failure kinds {unknown}; use any of {list(FAILURE_KINDS)}"
            )
        names = [p.provider for p in self.providers]
        if len(set(names)) != len(names):
            raise ValueError(f"providers lists a provider twice: {names}")
        for feature, rule in self.features.items():
            if rule.provider is not None and rule.provider not in names:
                raise ValueError(
                    f"features.{feature}.provider={rule.provider!r} is not in providers {names}"
                )
        return self

    def rule_for(self, feature: str | None) -> FeatureRule:
        if feature is not None:
            rule = self.features.get(feature)
            if rule is not None:
                return rule
        return _DEFAULT_RULE

    def provider_tiers(self, name: str | None) -> ProviderTiers:
        if name is not None:
            for provider in self.providers:
                if provider.provider == name:
                    return provider
        return self.providers[0]


_DEFAULT_RULE = FeatureRule()
