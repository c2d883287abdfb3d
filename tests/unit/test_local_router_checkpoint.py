"""The single dispatcher's router checkpoint in its state directory (routing.shared_learning
off): written only when something was learned, read back on restart, and a damaged file
never stops routing (the end-to-end restart is in tests/integration/test_savings_wiring.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from app.cache.config import CacheSettings
from app.gateway.local_router import FILE_NAME, LocalRouterCheckpoint
from app.gateway.savings import SavingsLevers
from app.routing.config import RoutingSettings
from app.settings import Settings

AUTO: dict[str, Any] = {"model": "auto", "messages": [{"role": "user", "content": "Hi there"}]}


def parts(tmp_path: Path) -> tuple[LocalRouterCheckpoint, SavingsLevers]:
    settings = Settings(state_dir=tmp_path)
    levers = SavingsLevers(RoutingSettings(), CacheSettings())
    return LocalRouterCheckpoint(settings, levers), levers


async def test_written_when_learned_and_restored_by_the_next_dispatcher(tmp_path: Path) -> None:
    checkpoint, levers = parts(tmp_path)
    assert not checkpoint.restore(), "no file yet"
    assert not await checkpoint.save_if_changed(), "no model loaded: nothing to write"
    await levers.load_model()
    assert not await checkpoint.save_if_changed(), "nothing learned: nothing to write"
    route = levers.route("r1", AUTO, None)
    assert route.tier == "economy"
    assert levers.learn_outcome("r1", "failure")
    assert await checkpoint.save_if_changed()
    assert not await checkpoint.save_if_changed(), "written once per change"
    score = levers.router.score(AUTO)[0]

    again, restarted = parts(tmp_path)
    assert again.restore()
    assert not restarted.model_loaded, "the checkpoint is only restored when first needed"
    await restarted.load_model()
    assert restarted.router.model.outcomes_learned == 1
    assert restarted.router.score(AUTO)[0] == score
    assert not (tmp_path / (FILE_NAME + ".tmp")).exists()


async def test_a_damaged_checkpoint_is_replaced_by_a_fresh_model(tmp_path: Path) -> None:
    (tmp_path / FILE_NAME).write_bytes(b"\x00not a router model")
    checkpoint, levers = parts(tmp_path)
    assert checkpoint.restore()
    await levers.load_model()  # logged; routing goes on with a fresh model
    assert levers.router.model.outcomes_learned == 0
    assert levers.route("r1", AUTO, None).routed
    assert levers.learn_outcome("r1", "success")
    assert await checkpoint.save_if_changed()
    again, restarted = parts(tmp_path)
    assert again.restore()
    await restarted.load_model()
    assert restarted.router.model.outcomes_learned == 1, "the fresh model replaced the damage"
