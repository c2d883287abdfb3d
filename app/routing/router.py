"""The router: a request body and its feature in, a :class:`Decision` out; outcomes in, learning.

Owns choosing a tier (score against the feature's ``quality_target`` and ``premium_above``,
then its pin / min / max rules), mapping the tier to the provider's model, and feeding
labelled outcomes to the failure model. It does not own HTTP (the dispatcher maps a
:class:`~app.routing.signals.PromptError` to a 400), upstream calls, or escalation's
retry loop (:mod:`app.routing.escalation` says *whether*; the dispatcher retries).

Which requests are routed: those asking for ``routing.auto_model`` ("auto"), and every
request of a feature whose rule says ``route_all``. Others keep their model; their
decision says ``routed=False`` and carries the model's tier when a provider lists it.

Exploration: a router that learns only from calls it sent to economy never gets an economy
label for a prompt it scores above the threshold. ``exploration_rate`` (default 0.02) of those
prompts go to economy anyway, by a seeded hash of the request id, when the feature's rule
allows economy and learning and the caller says the call may explore (the dispatcher refuses it
near a budget limit); their reason says "exploration", and escalation still catches an answer
that fails.

Only economy-tier outcomes teach the model (P(economy fails) is what it estimates): a
success or failure reported for a call served by the standard or premium tier says
nothing about what economy would have done, so :meth:`Router.learn` ignores it and says so.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from app.routing.config import TIER_ORDER, ProviderTiers, RoutingSettings, Tier
from app.routing.errors import PromptError

if TYPE_CHECKING:  # imported on first use: numpy (and for learning River, scipy: ~100 MB)
    from app.routing.model import FailureModel
    from app.routing.scoring import Features, ScoringModel

Outcome = Literal["success", "failure"]


@dataclass(frozen=True, slots=True)
class Decision:
    """What to call: the tier and its model, and why."""

    tier: Tier | None  # None: a model no provider lists in its tiers
    model: str
    score: float | None  # P(economy fails); None when nothing was scored
    reason: str
    routed: bool  # the router chose the model (False: the client's own model)
    provider: str | None = None
    explored: bool = False  # economy despite the score, to learn (``exploration_rate``)


class Router:
    """Routes requests to tiers and learns from their outcomes. One per process."""

    def __init__(
        self,
        settings: RoutingSettings,
        model: ScoringModel | None = None,
        *,
        scoring_only: bool = False,
    ) -> None:
        """``scoring_only``: this router never learns (a dispatcher of a deployment whose
        learner is shared): until a model is given, it scores with a numpy-only model."""
        self.settings = settings
        self._model = model
        self.scoring_only = scoring_only

    @property
    def model_loaded(self) -> bool:
        """Whether the failure model (and numpy, River) is in memory yet."""
        return self._model is not None

    @property
    def model(self) -> ScoringModel:
        """The failure model, created (importing numpy, and River unless it only scores) on
        first use: a process that routes nothing never pays their memory. A server calls
        :meth:`load_model` off its event loop before the first request that needs it; the
        import takes a second or more."""
        if self._model is None:
            self._model = self.load_model()
        return self._model

    def load_model(self) -> ScoringModel:
        """The model, imported and created if it is not yet (thread-safe to call: at worst two
        threads build one each and one is kept). A ``scoring_only`` router never learns (the
        shared learner does): a scoring model, numpy only, until the learner's arrives."""
        if self._model is not None:
            return self._model
        model: ScoringModel
        if self.scoring_only:
            from app.routing.scoring import ScoringModel

            model = ScoringModel(
                hash_bits=self.settings.hash_bits,
                warmup_outcomes=self.settings.warmup_outcomes,
                max_feature_models=self.settings.max_feature_models,
            )
        else:
            from app.routing.model import FailureModel

            model = FailureModel(
                hash_bits=self.settings.hash_bits,
                learning_rate=self.settings.learning_rate,
                warmup_outcomes=self.settings.warmup_outcomes,
                max_feature_models=self.settings.max_feature_models,
            )
        if self._model is None:
            self._model = model
        return self._model

    def needs_model(self, body: Mapping[str, Any], feature: str | None) -> bool:
        """Whether routing ``body`` will score it (a routed request whose rule pins no tier)."""
        return self.wants_routing(body, feature) and self.settings.rule_for(feature).pin is None

    # -- deciding -------------------------------------------------------------------------
    def wants_routing(self, body: Mapping[str, Any], feature: str | None) -> bool:
        if not self.settings.enabled:
            return False
        return body.get("model") == self.settings.auto_model or (
            self.settings.rule_for(feature).route_all
        )

    def features(self, body: Mapping[str, Any]) -> Features:
        """The model's reading of a body; raises PromptError naming a malformed field."""
        from app.routing.signals import view_of

        return self.model.features(view_of(body, self.settings.max_prompt_chars))

    def score(self, body: Mapping[str, Any], feature: str | None = None) -> tuple[float, str]:
        """(P(economy fails), reason) for a body, whatever its model."""
        result = self.model.score(self.features(body), feature)
        return result.value, result.reason()

    def route(
        self,
        body: Mapping[str, Any],
        feature: str | None = None,
        features: Features | None = None,
        *,
        explore_key: str | None = None,
    ) -> Decision:
        """The tier and model for a request; never changes what the router has learned.

        ``features``: the body's :meth:`features` when the caller already computed them (the
        dispatcher keeps them to learn from the call's outcome later). ``explore_key``: the
        request id of a live call that may explore (:meth:`explores`); None: no exploration
        (offline scoring, or a call whose budget is near its limit)."""
        if not isinstance(body, Mapping):
            raise PromptError("body", "must be a JSON object with 'messages'")
        rule = self.settings.rule_for(feature)
        provider = self.settings.provider_tiers(rule.provider)
        if not self.wants_routing(body, feature):
            requested = body.get("model")
            if not isinstance(requested, str) or not requested:
                raise PromptError("model", "is required: a model name, or 'auto' to be routed")
            return Decision(
                tier=self.tier_of(requested),
                model=requested,
                score=None,
                reason="model chosen by the client",
                routed=False,
                provider=None,
            )
        if rule.pin is not None:
            tier = available_tier(provider, rule.pin)
            return Decision(
                tier, _model(provider, tier), None, f"pinned to {rule.pin.value}", True,
                provider.provider,
            )  # fmt: skip
        scored = self.model.score(features or self.features(body), feature)
        quality_target = rule.quality_target or self.settings.quality_target
        premium_above = rule.premium_above or self.settings.premium_above
        if 1.0 - scored.value >= quality_target:
            wanted = Tier.ECONOMY
        elif scored.value >= premium_above:
            wanted = Tier.PREMIUM
        else:
            wanted = Tier.STANDARD
        tier = wanted
        notes = []
        explored = (
            wanted is not Tier.ECONOMY
            and explore_key is not None
            and self.may_explore(feature)
            and self.explores(explore_key)
        )
        if explored:
            tier = Tier.ECONOMY
            notes.append(
                f"exploration: economy to learn from its outcome (rate "
                f"{self.settings.exploration_rate:g})"
            )
        if rule.min_tier is not None and tier.rank < rule.min_tier.rank:
            tier = rule.min_tier
            notes.append(f"raised to the feature's min_tier {tier.value}")
        if rule.max_tier is not None and tier.rank > rule.max_tier.rank:
            tier = rule.max_tier
            notes.append(f"capped at the feature's max_tier {tier.value}")
        served = available_tier(provider, tier)
        if served != tier:
            notes.append(f"{provider.provider} has no {tier.value} model")
        reason = scored.reason()
        reason += f"; {wanted.value} for quality_target {quality_target:g}" + (
            f" ({'; '.join(notes)})" if notes else ""
        )
        return Decision(served, _model(provider, served), scored.value, reason, True,
                        provider.provider, explored=explored and served is Tier.ECONOMY)  # fmt: skip

    def may_explore(self, feature: str | None) -> bool:
        """Whether the feature's rule lets a prompt scored above the threshold be sent to
        economy to learn: exploration on, no pin, no min_tier above economy, learning on, and
        an economy model at the feature's provider."""
        rule = self.settings.rule_for(feature)
        if self.settings.exploration_rate <= 0 or rule.pin is not None or not rule.learn:
            return False
        if rule.min_tier is not None and rule.min_tier is not Tier.ECONOMY:
            return False
        return self.settings.provider_tiers(rule.provider).model_for(Tier.ECONOMY) is not None

    def explores(self, key: str) -> bool:
        """The seeded draw: true for about ``exploration_rate`` of keys, the same on every
        replica and every run for one key and seed."""
        digest = hashlib.blake2b(
            f"{self.settings.exploration_seed}:{key}".encode(), digest_size=8
        ).digest()
        return int.from_bytes(digest, "big") / 2**64 < self.settings.exploration_rate

    def tier_of(self, model: str) -> Tier | None:
        for provider in self.settings.providers:
            tier = provider.tier_of(model)
            if tier is not None:
                return tier
        return None

    # -- learning -------------------------------------------------------------------------
    def learn(
        self,
        body: Mapping[str, Any],
        tier: Tier | str,
        outcome: Outcome,
        feature: str | None = None,
    ) -> bool:
        """Learn one labelled outcome of a call served by ``tier``; True when it was learned.

        An escalated call is a ``failure`` of the tier it escalated from. Outcomes of other
        tiers than economy, and of features whose rule says ``learn: false``, are ignored.
        """
        tier = Tier(tier)
        if not self.learns(tier, feature):
            Router._check_outcome(outcome)
            return False
        return self.learn_features(self.features(body), tier, outcome, feature)

    def learns(self, tier: Tier | str | None, feature: str | None) -> bool:
        """Whether an outcome of a call served by ``tier`` for ``feature`` would be learned."""
        return tier == Tier.ECONOMY and self.settings.rule_for(feature).learn

    def learn_features(
        self, features: Features, tier: Tier | str, outcome: Outcome, feature: str | None = None
    ) -> bool:
        """:meth:`learn` from the :meth:`features` of a body computed earlier (when it was routed)."""
        Router._check_outcome(outcome)
        if not self.learns(Tier(tier), feature):
            return False
        self._learning_model().learn(features, outcome == "failure", feature)
        return True

    @staticmethod
    def _check_outcome(outcome: str) -> None:
        if outcome not in ("success", "failure"):
            raise ValueError(f"outcome must be 'success' or 'failure', not {outcome!r}")

    def snapshot(self) -> bytes:
        """Everything learned (a checkpoint to learn on from); see :meth:`published_snapshot`."""
        return self._learning_model().snapshot()

    def published_snapshot(self) -> bytes:
        """What a dispatcher needs to score exactly as this router does, restored without River
        (the shared learner publishes it for dispatchers)."""
        return self.model.scoring_snapshot()

    def _learning_model(self) -> FailureModel:
        from app.routing.model import FailureModel

        model = self.model
        if not isinstance(model, FailureModel):
            raise TypeError(
                "this router only scores (the shared learner's published model): it neither "
                "learns nor writes checkpoints; `tollgate router-learn` does"
            )
        return model

    @classmethod
    def restore(cls, settings: RoutingSettings, data: bytes) -> Router:
        """A router with the model of :meth:`snapshot` (a learning model) or of
        :meth:`published_snapshot` (scoring only: River is not imported), and (new) settings.

        Rules, thresholds, ``warmup_outcomes`` and ``max_feature_models`` take effect at
        once; ``hash_bits`` and ``learning_rate`` stay those the model was learned with
        (changing them means learning again: delete the checkpoint).
        """
        from app.routing.scoring import ScoringModel, is_scoring_snapshot

        model: ScoringModel
        if is_scoring_snapshot(data):
            model = ScoringModel.restore_scoring(data)
        else:
            from app.routing.model import FailureModel

            model = FailureModel.restore(data)
        model.warmup_outcomes = settings.warmup_outcomes
        model.max_feature_models = settings.max_feature_models
        return cls(settings, model)


def available_tier(provider: ProviderTiers, tier: Tier) -> Tier:
    """``tier`` if the provider has a model for it, else the nearest one above, else below."""
    if provider.model_for(tier):
        return tier
    for candidate in TIER_ORDER[tier.rank + 1 :]:
        if provider.model_for(candidate):
            return candidate
    for candidate in reversed(TIER_ORDER[: tier.rank]):
        if provider.model_for(candidate):
            return candidate
    raise AssertionError("ProviderTiers guarantees at least one model")  # pragma: no cover


def _model(provider: ProviderTiers, tier: Tier) -> str:
    model = provider.model_for(tier)
    assert model is not None
    return model
