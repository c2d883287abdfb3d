"""The tier router: which calls the economy tier can take, learned online from outcomes.

- :mod:`app.routing.config` -- tiers per provider, per-feature rules (``Settings.routing``).
- :mod:`app.routing.signals` -- the request's cheap explainable signals and hashed text keys.
- :mod:`app.routing.model` -- P(economy fails): prior, word evidence, River logistic
  regression; learning, explanation, checkpoints.
- :mod:`app.routing.router` -- :class:`Router`: ``route(body, feature) -> Decision`` and
  ``learn(body, tier, outcome, feature)``.
- :mod:`app.routing.escalation` -- which failures retry once on the next tier up.
- :mod:`app.routing.offline` / :mod:`app.routing.cli` -- ``tollgate route score``.
- :mod:`app.routing.evaluation` -- RouteLLM's APGR and CPT.

Imports point down only: router -> model -> signals -> (nothing of Tollgate's); config is
shared. Nothing here knows HTTP or Kafka.
"""

from app.routing.config import FeatureRule, ProviderTiers, RoutingSettings, Tier
from app.routing.escalation import EscalationPolicy, Failure
from app.routing.model import FailureModel, RouterCheckpointError
from app.routing.router import Decision, Router
from app.routing.signals import PromptError

__all__ = [
    "Decision",
    "EscalationPolicy",
    "Failure",
    "FailureModel",
    "FeatureRule",
    "PromptError",
    "ProviderTiers",
    "Router",
    "RouterCheckpointError",
    "RoutingSettings",
    "Tier",
]
