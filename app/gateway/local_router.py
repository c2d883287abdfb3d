"""A single dispatcher's learned router across restarts (``routing.shared_learning`` off).

Owns the checkpoint file ``<state_dir>/router-model.bin``: at start-up its model is handed to
the :class:`~app.gateway.savings.SavingsLevers` to restore with the first scored request (as a
shared model is: restoring imports numpy and River, which a dispatcher that routes nothing
never pays); then the model is written whenever it learned an outcome since the last write, at
most every ``routing.publish_every_s``, and once more on shutdown. A write is atomic (a temp
file renamed over the old one), so a crash leaves the previous checkpoint; a SIGKILL loses at
most the outcomes learned in the last interval. An unusable file (another Tollgate version,
damage) is logged and the dispatcher learns again from a fresh model.

It does not own learning (``SavingsLevers.learn_outcome``) or the shared mode's checkpoint
(``agents.router_learner``, on Kafka: several dispatchers share one model there).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from pathlib import Path

from app.gateway.savings import SavingsLevers
from app.routing.router import Router
from app.settings import Settings

log = logging.getLogger(__name__)

FILE_NAME = "router-model.bin"


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so a reader (or a crash) sees the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(path.name + ".tmp")
    with temp.open("wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())
    os.replace(temp, path)


class LocalRouterCheckpoint:
    """Restores the dispatcher's router model from its state directory and keeps it written."""

    def __init__(self, settings: Settings, levers: SavingsLevers) -> None:
        self.settings = settings
        self.levers = levers
        self.path = settings.state_dir / FILE_NAME
        self._saved_learned: int | None = None  # outcomes_learned at the last write
        self._task: asyncio.Task[None] | None = None

    def restore(self) -> bool:
        """Hand the checkpoint (if any) to the levers; True if there was one."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return False
        routing = self.settings.routing
        self.levers.defer_router(lambda: Router.restore(routing, data))
        log.info(f"router model checkpoint found ({len(data)} bytes): restored when first needed")
        return True

    def _learned(self) -> int | None:
        """Outcomes the current model learned, or None when no model is loaded yet (nothing new
        to write: a deferred checkpoint is still the file's)."""
        if not self.levers.model_loaded:
            return None
        return self.levers.router.model.outcomes_learned

    async def save_if_changed(self) -> bool:
        learned = self._learned()
        if learned is None or learned == 0 or learned == self._saved_learned:
            return False
        data = self.levers.router.snapshot()  # on the loop: learning happens there too
        await asyncio.to_thread(write_atomic, self.path, data)
        self._saved_learned = learned
        return True

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.settings.routing.publish_every_s)
            try:
                await self.save_if_changed()
            except Exception:  # a full disk must not stop routing; the next interval retries
                log.exception(f"router model checkpoint not written to {self.path}")

    def start(self) -> None:
        self.restore()
        self._task = asyncio.create_task(self._run(), name="router-checkpoint")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        try:
            await self.save_if_changed()
        except Exception:
            log.exception(f"router model checkpoint not written to {self.path} on shutdown")
