"""``tollgate route score``: the live router's code over JSON Lines, for offline evaluation.

Owns reading prompt and feedback files (every bad line is an error naming the file, the
line and the field), learning the feedback in order exactly as the live router learns
outcomes (:meth:`app.routing.router.Router.learn`), then writing one
``{"score", "tier", "reason"}`` line per prompt, scored as if it asked for model "auto".
It does not own any routing logic.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import orjson

from app.routing.config import RoutingSettings, Tier
from app.routing.model import RouterCheckpointError
from app.routing.router import Router
from app.routing.signals import PromptError


class InputError(ValueError):
    """A bad input line; the message names the file, the line number and the field."""


@dataclass
class ScoreSummary:
    feedback_lines: int = 0
    learned: int = 0
    prompts: int = 0


def _lines(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    try:
        handle = path.open("rb")
    except OSError as exc:
        raise InputError(f"{path}: cannot read it ({exc.strerror})") from None
    with handle:
        for number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            try:
                record = orjson.loads(raw)
            except orjson.JSONDecodeError as exc:
                raise InputError(f"{path} line {number}: not valid JSON ({exc})") from None
            if not isinstance(record, dict):
                raise InputError(
                    f"{path} line {number}: must be a JSON object like "
                    '{"messages": [{"role": "user", "content": "..."}]}'
                )
            yield number, record


def _feature(record: dict[str, Any], where: str, default: str | None) -> str | None:
    feature = record.get("feature", default)
    if feature is not None and (not isinstance(feature, str) or not feature):
        raise InputError(f"{where}: feature: must be a non-empty string")
    return feature


def score_files(
    prompts: Path,
    out: IO[bytes],
    settings: RoutingSettings,
    *,
    feedback: Path | None = None,
    feature: str | None = None,
    load: Path | None = None,
    save: Path | None = None,
) -> ScoreSummary:
    """Learn ``feedback`` (if any), then score every line of ``prompts`` into ``out``."""
    summary = ScoreSummary()
    router = _router(settings, load)
    if feedback is not None:
        for number, record in _lines(feedback):
            where = f"{feedback} line {number}"
            summary.feedback_lines += 1
            tier = record.get("tier")
            if tier not in {t.value for t in Tier}:
                raise InputError(
                    f"{where}: tier: must be one of economy, standard, premium, not {tier!r}"
                )
            outcome = record.get("outcome")
            if outcome not in ("success", "failure"):
                raise InputError(
                    f"{where}: outcome: must be 'success' or 'failure', not {outcome!r}"
                )
            try:
                learned = router.learn(record, tier, outcome, _feature(record, where, feature))
            except PromptError as exc:
                raise InputError(f"{where}: {exc}") from None
            summary.learned += learned
    auto = settings.auto_model
    for number, record in _lines(prompts):
        where = f"{prompts} line {number}"
        try:
            decision = router.route({**record, "model": auto}, _feature(record, where, feature))
        except PromptError as exc:
            raise InputError(f"{where}: {exc}") from None
        score = decision.score
        line = {
            "score": None if score is None else round(score, 6),
            "tier": decision.tier.value if decision.tier else None,
            "reason": decision.reason,
        }
        out.write(orjson.dumps(line) + b"\n")
        summary.prompts += 1
    if save is not None:
        save.write_bytes(router.snapshot())
    return summary


def _router(settings: RoutingSettings, load: Path | None) -> Router:
    if load is None:
        return Router(settings)
    try:
        return Router.restore(settings, load.read_bytes())
    except OSError as exc:
        raise InputError(f"{load}: cannot read it ({exc.strerror})") from None
    except RouterCheckpointError as exc:
        raise InputError(f"{load}: {exc}") from None
