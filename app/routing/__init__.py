"""The tier router: which calls the economy tier can take, learned online from outcomes.

- :mod:`app.routing.config` -- tiers per provider, per-feature rules (``Settings.routing``).
- :mod:`app.routing.signals` -- the request's cheap explainable signals and hashed text keys.
- :mod:`app.routing.model` -- P(economy fails): prior, word evidence, River logistic
  regression; learning, explanation, checkpoints.
- :mod:`app.routing.scoring` -- the scores alone (numpy, no River): what a dispatcher that
  shares a learner installs and scores with.
- :mod:`app.routing.router` -- :class:`Router`: ``route(body, feature) -> Decision`` and
  ``learn(body, tier, outcome, feature)``.
- :mod:`app.routing.escalation` -- which failures retry once on the next tier up.
- :mod:`app.routing.offline` / :mod:`app.routing.cli` -- ``tollgate route score``.
- :mod:`app.routing.evaluation` -- RouteLLM's APGR and CPT.

Imports point down only: router -> model -> signals -> (nothing of Tollgate's); config is
shared. Nothing here knows HTTP or Kafka.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from app.routing.config import FeatureRule, ProviderTiers, RoutingSettings, Tier
    from app.routing.escalation import EscalationPolicy, Failure
    from app.routing.model import FailureModel
    from app.routing.router import Decision, Router
    from app.routing.scoring import RouterCheckpointError
    from app.routing.signals import PromptError

# Names re-exported lazily: app.settings imports app.routing.config, and every process
# reads settings; importing the model (River, numpy) here would add ~1.3 s to each start.
_EXPORTS = {
    "Decision": "router",
    "EscalationPolicy": "escalation",
    "Failure": "escalation",
    "FailureModel": "model",
    "FeatureRule": "config",
    "PromptError": "signals",
    "ProviderTiers": "config",
    "Router": "router",
    "RouterCheckpointError": "scoring",
    "RoutingSettings": "config",
    "Tier": "config",
}
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


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'app.routing' has no attribute {name!r}")
    return getattr(importlib.import_module(f"app.routing.{module}"), name)
