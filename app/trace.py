"""Usage traces: read the Azure LLM inference trace and give its rows users, features and models.

Owns turning trace rows into attributed calls with a *seeded* draw, so replays
(``tollgate replay``), benchmarks and the anomaly evaluation see the same
realistic traffic for the same seed. It does not send anything anywhere.

The Azure trace (``data/AzureLLMInferenceTrace_conv.csv``, CC-BY 4.0, Patel et
al., ISCA 2024) has arrival times and token counts only: users are drawn by a
Zipf law (a few heavy users, a long tail), features by fixed weights, and each
feature's model by a tier mix with a 70 % economy share.
"""

from __future__ import annotations

import bisect
import csv
import itertools
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

AZURE_TRACE = Path(__file__).resolve().parents[1] / "data" / "AzureLLMInferenceTrace_conv.csv"

# Feature -> share of traffic. Names a product team would use.
FEATURES: tuple[tuple[str, float], ...] = (
    ("chat", 0.45),
    ("search", 0.2),
    ("summarize", 0.15),
    ("code-assist", 0.12),
    ("support-bot", 0.08),
)
# Tier -> model, and the default share of each tier in every feature's mix.
TIER_MODELS = {"economy": "gpt-4o-mini", "standard": "gpt-4o", "premium": "gpt-4-turbo"}
ECONOMY_SHARE = 0.70
PREMIUM_SHARE = 0.05


@dataclass(frozen=True)
class TraceCall:
    """One call of a trace; attribution is filled by ``Attribution`` when the trace has none."""

    ts: datetime
    prompt_tokens: int
    completion_tokens: int
    user_id: str | None = None
    session_id: str | None = None
    feature: str | None = None
    model: str | None = None
    cached_tokens: int = 0


class TraceFormatError(ValueError):
    """A trace file that cannot be read; the message names the file, line and field."""


def _azure_time(text: str) -> datetime:
    # '2023-11-16 18:15:46.6805900': 7 fractional digits, which fromisoformat rejects.
    head, _, fraction = text.strip().partition(".")
    parsed = datetime.fromisoformat(head).replace(tzinfo=UTC)
    if fraction:
        parsed += timedelta(microseconds=int(fraction[:6].ljust(6, "0")))
    return parsed


def read_azure_csv(path: Path = AZURE_TRACE) -> Iterator[TraceCall]:
    """Rows of an Azure LLM inference trace (``TIMESTAMP,ContextTokens,GeneratedTokens``)."""
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        expected = {"TIMESTAMP", "ContextTokens", "GeneratedTokens"}
        if not expected <= set(reader.fieldnames or ()):
            raise TraceFormatError(
                f"{path}: expected the columns {', '.join(sorted(expected))}, "
                f"found {', '.join(reader.fieldnames or ['none'])}"
            )
        for line, row in enumerate(reader, start=2):
            try:
                yield TraceCall(
                    ts=_azure_time(row["TIMESTAMP"]),
                    prompt_tokens=int(row["ContextTokens"]),
                    completion_tokens=int(row["GeneratedTokens"]),
                )
            except (ValueError, TypeError) as exc:
                raise TraceFormatError(f"{path}, line {line}: {exc}") from None


class Attribution:
    """Seeded users, sessions, features and models for rows that have none.

    ``economy_share`` is the share of calls served by the economy tier; the rest
    go to the standard tier, except ``PREMIUM_SHARE`` to the premium tier.
    """

    def __init__(
        self,
        *,
        seed: int = 7,
        users: int = 200,
        zipf_s: float = 1.1,
        economy_share: float = ECONOMY_SHARE,
        calls_per_session: int = 8,
    ) -> None:
        if users < 1:
            raise ValueError("users must be at least 1")
        self.rng = random.Random(seed)
        self.user_ids = [f"user-{i:04d}" for i in range(1, users + 1)]
        weights = [1 / (rank**zipf_s) for rank in range(1, users + 1)]
        self._user_cum = list(itertools.accumulate(weights))
        self._feature_names = [name for name, _ in FEATURES]
        self._feature_cum = list(itertools.accumulate(share for _, share in FEATURES))
        self.economy_share = economy_share
        self.calls_per_session = calls_per_session
        self._sessions: dict[str, tuple[str, int]] = {}

    def _pick(self, names: list[str], cumulative: list[float]) -> str:
        index = bisect.bisect_right(cumulative, self.rng.random() * cumulative[-1])
        return names[min(index, len(names) - 1)]

    def model_for(self, economy_share: float | None = None) -> str:
        share = self.economy_share if economy_share is None else economy_share
        draw = self.rng.random()
        if draw < share:
            return TIER_MODELS["economy"]
        if draw < share + PREMIUM_SHARE:
            return TIER_MODELS["premium"]
        return TIER_MODELS["standard"]

    def session_for(self, user_id: str) -> str:
        session, calls = self._sessions.get(user_id, ("", self.calls_per_session))
        if calls >= self.calls_per_session:
            session, calls = f"sess-{self.rng.getrandbits(48):012x}", 0
        self._sessions[user_id] = (session, calls + 1)
        return session

    def assign(self, call: TraceCall) -> TraceCall:
        user = call.user_id or self._pick(self.user_ids, self._user_cum)
        return replace(
            call,
            user_id=user,
            session_id=call.session_id or self.session_for(user),
            feature=call.feature or self._pick(self._feature_names, self._feature_cum),
            model=call.model or self.model_for(),
        )

    def __call__(self, calls: Iterable[TraceCall]) -> Iterator[TraceCall]:
        for call in calls:
            yield self.assign(call)


def shifted(calls: Iterable[TraceCall], start: datetime, speed: float = 1.0) -> Iterator[TraceCall]:
    """The calls moved to begin at ``start``, with gaps divided by ``speed`` (2.0 = twice as fast)."""
    if speed <= 0:
        raise ValueError("speed must be positive")
    origin: datetime | None = None
    for call in calls:
        origin = origin or call.ts
        yield replace(call, ts=start + (call.ts - origin) / speed)


def repeated(calls: list[TraceCall], times: int) -> Iterator[TraceCall]:
    """The trace played ``times`` times back to back (each copy starts where the last ended)."""
    if not calls:
        return
    span = calls[-1].ts - calls[0].ts + timedelta(seconds=1)
    for copy in range(times):
        for call in calls:
            yield replace(call, ts=call.ts + copy * span)
