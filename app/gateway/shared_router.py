"""The dispatcher's side of shared learning: follow the learner's model and score with it.

Owns restoring the newest ``<prefix>.routing.state`` snapshot at start-up and installing each
newer one in the :class:`~app.gateway.savings.SavingsLevers` (``use_router``), with the
dispatcher's own routing settings (rules and thresholds are per deployment; the model is
shared). It does not own learning (``agents.router_learner``) or what a dispatcher publishes
for it (``SavingsLevers``, :mod:`app.routing.shared`).

Restoring is synchronous (unpickling; tens of milliseconds for a model that learned a few
thousand outcomes, measured in docs/SAVINGS.md) and happens once per published snapshot, at
most every ``routing.publish_every_s``. An unusable snapshot is logged and the current model
kept. Until the dispatcher scores its first request the snapshot is only kept as bytes
(:meth:`SavingsLevers.defer_router`): restoring it imports numpy and River, and a dispatcher
that routes nothing does not pay their memory.
"""

from __future__ import annotations

import logging

from app.events.compacted import LatestFollower
from app.gateway.savings import SavingsLevers
from app.routing.router import Router
from app.settings import Settings

log = logging.getLogger(__name__)

MODEL_KEY = b"router-model"


class SharedRouter:
    """Keeps a dispatcher's router equal to the newest published shared model."""

    def __init__(self, settings: Settings, levers: SavingsLevers) -> None:
        self.settings = settings
        self.levers = levers
        self.follower = LatestFollower(
            settings, settings.topic("routing.state"), MODEL_KEY, self._install
        )

    def _install(self, snapshot: bytes) -> None:
        if not self.levers.model_loaded:
            # nothing was scored yet: restore (and import River) with the first scored request
            self.levers.defer_router(lambda: Router.restore(self.settings.routing, snapshot))
            log.info("shared router model received", extra={"bytes": len(snapshot)})
            return
        router = Router.restore(self.settings.routing, snapshot)
        self.levers.use_router(router)
        log.info(
            "shared router model installed",
            extra={"outcomes_learned": router.model.outcomes_learned, "bytes": len(snapshot)},
        )

    async def start(self, timeout_s: float = 30.0, answer_timeout_s: float | None = None) -> bool:
        """Restore the newest published model (see ``LatestFollower.start``)."""
        return await self.follower.start(timeout_s, answer_timeout_s)

    async def stop(self) -> None:
        await self.follower.stop()
