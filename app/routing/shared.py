"""Shared learning, the pure part: what dispatchers tell the learner, and joining it with outcomes.

Owns the wire format of ``<prefix>.routing.features`` records (JSON, internal, like the spend
worker's partials): a **routed** record for each economy-routed call (the router's features of
the prompt, never its text: hashed keys and the twelve signals) and a **label** record when the
dispatcher itself judged the economy answer a failure (empty, truncated or refused: exactly
the validator failures :class:`~app.gateway.savings.SavingsLevers` learns locally). It owns
:class:`OutcomeJoin`, which pairs routed calls with their first label (an ``Outcome`` event or
a label record, in either order), with bounded memory, learns each call at most once, and
pickles into the learner's checkpoint. It does not own Kafka (``agents.router_learner``) or the
dispatcher's side (``app.gateway.savings``, ``app.gateway.shared_router``).
"""

from __future__ import annotations

import base64
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import orjson

if TYPE_CHECKING:  # numpy and the model load with the router's model, not with the dispatcher
    from app.routing.scoring import Features

RECORD_VERSION = 1
Label = Literal["success", "failure"]


class SharedRecordError(ValueError):
    """A routing.features record this version cannot read (skipped by the learner)."""


@dataclass(frozen=True, slots=True)
class RoutedCall:
    request_id: str
    feature: str | None
    features: Features


@dataclass(frozen=True, slots=True)
class LabelRecord:
    request_id: str
    outcome: Label
    source: str  # "validator:empty" ... ; Outcome events are labels too, not records


def encode_routed(request_id: str, feature: str | None, features: Features) -> bytes:
    import numpy as np

    keys = np.asarray(features.keys, dtype="<u4").tobytes()
    return orjson.dumps(
        {
            "v": RECORD_VERSION,
            "kind": "routed",
            "request_id": request_id,
            "feature": feature,
            "signals": features.signals,
            "keys": base64.b64encode(keys).decode(),
        }
    )


def encode_label(request_id: str, outcome: Label, source: str) -> bytes:
    return orjson.dumps(
        {
            "v": RECORD_VERSION,
            "kind": "label",
            "request_id": request_id,
            "outcome": outcome,
            "source": source,
        }
    )


def decode_record(value: bytes) -> RoutedCall | LabelRecord:
    import numpy as np

    from app.routing.scoring import Features
    from app.routing.signals import SIGNAL_NAMES

    try:
        data = orjson.loads(value)
        if data.get("v") != RECORD_VERSION:
            raise SharedRecordError(f"record version {data.get('v')!r} is not {RECORD_VERSION}")
        if data["kind"] == "routed":
            keys = np.frombuffer(base64.b64decode(data["keys"]), dtype="<u4").astype(np.intp)
            signals = {str(k): float(v) for k, v in data["signals"].items()}
            for name in SIGNAL_NAMES:  # a record from a dispatcher that had fewer signals
                signals.setdefault(name, 0.0)
            return RoutedCall(data["request_id"], data["feature"], Features(signals, keys))
        if data["kind"] == "label" and data["outcome"] in ("success", "failure"):
            return LabelRecord(data["request_id"], data["outcome"], str(data["source"]))
        raise SharedRecordError(f"unknown record kind {data.get('kind')!r}")
    except SharedRecordError:
        raise
    except Exception as exc:  # JSON, base64, missing fields
        raise SharedRecordError(f"unreadable routing.features record: {exc!r}") from exc


@dataclass(frozen=True, slots=True)
class Example:
    """One labelled example to learn: an economy-routed call and its first outcome."""

    request_id: str
    feature: str | None
    features: Features
    outcome: Label


class OutcomeJoin:
    """Routed calls waiting for a label, labels waiting for a call; each call learned once.

    Bounded: at most ``max_waiting`` routed calls (766 bytes each pickled, GSM8K median) and as many labels
    wait; the oldest is forgotten first (an outcome reported later than that many newer
    routed calls is not learned). ``learned`` remembers the last ``max_waiting`` request ids
    learned, so a re-sent routed record (a dispatcher's spool after a crash) or a second
    outcome for the same call does not teach twice.
    """

    def __init__(self, max_waiting: int) -> None:
        self.max_waiting = max_waiting
        self.waiting_calls: OrderedDict[str, RoutedCall] = OrderedDict()
        self.waiting_labels: OrderedDict[str, Label] = OrderedDict()
        self.learned: OrderedDict[str, None] = OrderedDict()
        self.forgotten_calls = 0
        self.forgotten_labels = 0

    def add_call(self, call: RoutedCall) -> Example | None:
        if call.request_id in self.learned or self.max_waiting <= 0:
            return None
        label = self.waiting_labels.pop(call.request_id, None)
        if label is not None:
            return self._learned(call, label)
        self.waiting_calls[call.request_id] = call
        if len(self.waiting_calls) > self.max_waiting:
            self.waiting_calls.popitem(last=False)
            self.forgotten_calls += 1
        return None

    def add_label(self, request_id: str | None, outcome: str) -> Example | None:
        if not request_id or outcome not in ("success", "failure") or self.max_waiting <= 0:
            return None
        if request_id in self.learned:
            return None
        label: Label = "success" if outcome == "success" else "failure"
        call = self.waiting_calls.pop(request_id, None)
        if call is not None:
            return self._learned(call, label)
        if request_id not in self.waiting_labels:  # the first label counts, as for calls
            self.waiting_labels[request_id] = label
            if len(self.waiting_labels) > self.max_waiting:
                self.waiting_labels.popitem(last=False)
                self.forgotten_labels += 1
        return None

    def _learned(self, call: RoutedCall, label: Label) -> Example:
        self.learned[call.request_id] = None
        if len(self.learned) > self.max_waiting:
            self.learned.popitem(last=False)
        return Example(call.request_id, call.feature, call.features, label)

    def stats(self) -> dict[str, Any]:
        return {
            "waiting_calls": len(self.waiting_calls),
            "waiting_labels": len(self.waiting_labels),
            "forgotten_calls": self.forgotten_calls,
            "forgotten_labels": self.forgotten_labels,
        }
