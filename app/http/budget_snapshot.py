"""The budget policies and decisions a dispatcher last saw, kept on disk.

Owns one file (``<state dir>/budget-view.json``) and what it means: at a start whose Kafka
does not answer, the gate begins from the caps and decisions it knew, instead of none. A
restart while the broker was frozen had no policy at all and served 80 of 80 calls of a user
over its cap (probe K). Records are kept as the Avro values the topics hold (base64), so
what is restored is what the views would have decoded. Written at most every
``SAVE_EVERY_S`` when something changed, and at a clean stop; a crash loses at most that
much of what changed (the next start reads Kafka when it answers).
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from app.events.codec import EventCodec, EventDecodeError, EventEncodeError

log = logging.getLogger(__name__)

SAVE_EVERY_S = 1.0
KINDS = {"policies": "BudgetPolicy", "decisions": "BudgetDecision"}


class BudgetSnapshot:
    def __init__(self, path: Path, codec: EventCodec) -> None:
        self.path = path
        self.codec = codec
        self.values: dict[str, dict[str, bytes]] = {kind: {} for kind in KINDS}
        self.dirty = False

    def record(self, kind: str, scope: str, record: dict[str, Any] | None) -> None:
        """A record of the policies or decisions topic, as its view applied it."""
        values = self.values[kind]
        if record is None:
            self.dirty |= values.pop(scope, None) is not None
            return
        try:
            values[scope] = self.codec.encode(KINDS[kind], record)
        except EventEncodeError:  # not ours to judge: the view took it; keep the last good
            return
        self.dirty = True

    def save(self) -> None:
        if not self.dirty:
            return
        document = {
            kind: {scope: base64.b64encode(value).decode() for scope, value in values.items()}
            for kind, values in self.values.items()
        }
        temporary = self.path.with_suffix(".tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            temporary.write_text(json.dumps(document))
            os.replace(temporary, self.path)
            self.dirty = False
        except OSError as exc:
            log.warning("could not save the budget view", extra={"error": repr(exc)})

    def load(self) -> dict[str, dict[str, dict[str, Any]]]:
        """What was saved, decoded: {"policies": {scope: record}, "decisions": {...}}."""
        loaded: dict[str, dict[str, dict[str, Any]]] = {kind: {} for kind in KINDS}
        try:
            document = json.loads(self.path.read_text())
        except FileNotFoundError:
            return loaded
        except (OSError, ValueError) as exc:
            log.warning("could not read the saved budget view", extra={"error": repr(exc)})
            return loaded
        for kind in KINDS:
            for scope, text in (document.get(kind) or {}).items():
                with contextlib.suppress(ValueError, EventDecodeError, TypeError):
                    value = base64.b64decode(text)
                    loaded[kind][scope] = self.codec.decode(value).record
                    self.values[kind][scope] = value
        return loaded
