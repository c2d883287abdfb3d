"""Usage traces: read a trace file, give its rows users, features and models, and place it in time.

Owns the trace formats (the Azure LLM inference CSV, the BurstGPT CSV, Mooncake's JSON
Lines and Tollgate's own JSON Lines of ``/v1/usage`` records), the *seeded* attribution draw for rows that
carry none, and the placement of a trace on the clock (shift, speed-up,
repeat), so replays (``tollgate replay``), benchmarks and the anomaly
evaluation see the same realistic traffic for the same seed. It does not price
or send anything: ``devtools.replay`` does.

The Azure trace (``data/AzureLLMInferenceTrace_conv.csv``, CC-BY 4.0, Patel et
al., ISCA 2024) has arrival times and token counts only: users are drawn by a
Zipf law (a few heavy users, a long tail), features by fixed weights, and each
feature's model by a tier mix with a 70 % economy share.
"""

from __future__ import annotations

import bisect
import contextlib
import csv
import hashlib
import itertools
import json
import random
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator

from app.errors import InvalidRequest
from app.ids import MAX_ID_LENGTH
from app.metering.attribution import ANONYMOUS_USER, resolve_identity
from app.metering.ingest import MAX_COUNT, Timestamp, UsageReport, validate_record
from app.routing.config import RoutingSettings
from app.validation import ModelName

AZURE_TRACE = Path(__file__).resolve().parents[1] / "data" / "AzureLLMInferenceTrace_conv.csv"
AZURE_COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")
# BurstGPT (Wang et al., 2024: Azure OpenAI GPT usage of a campus, CC-BY 4.0): seconds from
# the trace's start, the model family and the token counts; no users or features.
BURSTGPT_COLUMNS = ("Timestamp", "Model", "Request tokens", "Response tokens")
BURSTGPT_MODELS = {"ChatGPT": "gpt-3.5-turbo", "GPT-4": "gpt-4"}
RELATIVE_EPOCH = datetime(2023, 1, 1, tzinfo=UTC)  # relative times start here; a replay places them
# Mooncake (Kimi's serving traces, 2024): JSON Lines of timestamp (milliseconds from the
# trace's start), input_length, output_length and hash_ids; no model, users or features.
MOONCAKE_FIELDS = ("timestamp", "input_length", "output_length")
TraceFormat = Literal["azure-csv", "burstgpt-csv", "mooncake-jsonl", "jsonl"]

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
ROUTED_SHARE = 0.25  # of drawn economy calls: asked for the standard model, routed down
CACHE_HIT_SHARE = 0.04  # of drawn calls: answered by a cache


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
    team: str | None = None
    provider: str | None = None
    model_requested: str | None = None
    request_id: str | None = None
    status: str = "ok"
    latency_ms: int = 0
    cache_hit: bool = False
    metadata: Mapping[str, str] = field(default_factory=dict)


class TraceFormatError(ValueError):
    """A trace file that cannot be read; the message names the file, line and field."""


# -- reading ---------------------------------------------------------------------------
def detect_format(path: Path) -> TraceFormat:
    """``azure-csv`` by its header, ``jsonl`` when the first non-blank line is a JSON object."""
    with open(path, encoding="utf-8-sig", newline="") as handle:
        try:
            first = next((line.strip() for line in handle if line.strip()), None)
        except UnicodeDecodeError:
            raise TraceFormatError(f"{path}: not a text file (not UTF-8)") from None
    if first is None:
        raise TraceFormatError(f"{path}: the file is empty; a trace needs at least one call")
    if first.startswith("{"):
        with contextlib.suppress(ValueError):
            record = json.loads(first)
            if (
                isinstance(record, dict)
                and "ts" not in record
                and set(MOONCAKE_FIELDS) <= set(record)
            ):
                return "mooncake-jsonl"
        return "jsonl"
    columns = {column.strip() for column in first.split(",")}
    if set(AZURE_COLUMNS) <= columns:
        return "azure-csv"
    if set(BURSTGPT_COLUMNS) <= columns:
        return "burstgpt-csv"
    raise TraceFormatError(
        f"{path}: unknown trace format (line 1 is {first[:60]!r}); expected an Azure LLM "
        f"inference trace CSV with the header {','.join(AZURE_COLUMNS)}, a BurstGPT CSV "
        f"({','.join(BURSTGPT_COLUMNS)},...), or JSON Lines with one /v1/usage record object "
        "(or one Mooncake call: timestamp, input_length, output_length) per line"
    )


def read_trace(path: Path) -> Iterator[TraceCall]:
    """The calls of a trace file in any format ``detect_format`` knows."""
    readers = {
        "jsonl": read_usage_jsonl,
        "azure-csv": read_azure_csv,
        "burstgpt-csv": read_burstgpt_csv,
        "mooncake-jsonl": read_mooncake_jsonl,
    }
    calls = readers[detect_format(path)](path)
    try:
        yield from calls
    except UnicodeDecodeError as exc:
        raise TraceFormatError(f"{path}: not UTF-8 text ({exc.reason})") from None


def _azure_time(text: str) -> datetime:
    # '2023-11-16 18:15:46.6805900': 7 fractional digits, which fromisoformat rejects; the
    # 2024 traces add an offset: '2024-05-10 00:00:00.009930+00:00'.
    head, _, fraction = text.strip().partition(".")
    offset = ""
    for sign in ("+", "-", "Z"):
        if sign in fraction:
            fraction, found, rest = fraction.partition(sign)
            offset = found + rest
            break
    if fraction and not fraction.isdigit():
        raise ValueError(text)
    parsed = datetime.fromisoformat(head + offset)
    parsed = parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)
    if fraction:
        parsed += timedelta(microseconds=int(fraction[:6].ljust(6, "0")))
    return parsed


def _token_count(text: str | None) -> int:
    value = int((text or "").strip())
    if not 0 <= value <= MAX_COUNT:
        raise ValueError(text)
    return value


def read_azure_csv(path: Path = AZURE_TRACE) -> Iterator[TraceCall]:
    """Rows of an Azure LLM inference trace (``TIMESTAMP,ContextTokens,GeneratedTokens``)."""
    with open(path, encoding="utf-8-sig", newline="") as handle:
        reader = csv.DictReader(handle, skipinitialspace=True)
        if not set(AZURE_COLUMNS) <= set(reader.fieldnames or ()):
            raise TraceFormatError(
                f"{path}: expected the columns {', '.join(AZURE_COLUMNS)}, "
                f"found {', '.join(reader.fieldnames or ['none'])}"
            )
        for row in reader:
            line = reader.line_num
            try:
                ts = _azure_time(row["TIMESTAMP"] or "")
            except ValueError:
                raise TraceFormatError(
                    f"{path}, line {line}: TIMESTAMP must be a time like "
                    f"2023-11-16 18:15:46.6805900, got {row['TIMESTAMP']!r}"
                ) from None
            counts = _token_columns(
                row, ("ContextTokens", "GeneratedTokens"), f"{path}, line {line}"
            )
            yield TraceCall(ts=ts, prompt_tokens=counts[0], completion_tokens=counts[1])


def _token_columns(row: Mapping[str, str | None], columns: Sequence[str], where: str) -> list[int]:
    """The token counts of a CSV row's ``columns``; a bad one is an error naming it."""
    counts = []
    for column in columns:
        try:
            counts.append(_token_count(row[column]))
        except ValueError:
            raise TraceFormatError(
                f"{where}: {column} must be a token count (an integer from 0 to {MAX_COUNT}), "
                f"got {row[column]!r}"
            ) from None
    return counts


def read_burstgpt_csv(path: Path) -> Iterator[TraceCall]:
    """Rows of a BurstGPT trace (``Timestamp,Model,Request tokens,Response tokens,...``): the
    time is seconds from the trace's start (placed from ``RELATIVE_EPOCH``), ``ChatGPT`` and
    ``GPT-4`` are priced as gpt-3.5-turbo and gpt-4, a call with no response tokens failed
    (BurstGPT lists failed requests that way: ``status="error"``, no tokens billed, its request
    tokens kept as ``metadata.request_tokens``), and ``Log Type`` is kept as
    ``metadata.log_type``."""
    with open(path, encoding="utf-8-sig", newline="") as handle:
        reader = csv.DictReader(handle, skipinitialspace=True)
        for row in reader:
            where = f"{path}, line {reader.line_num}"
            try:
                seconds = float(row["Timestamp"] or "")
                if not 0 <= seconds < 1e10:
                    raise ValueError
            except ValueError:
                raise TraceFormatError(
                    f"{where}: Timestamp must be seconds from the trace's start (a number "
                    f"from 0), got {row['Timestamp']!r}"
                ) from None
            model = BURSTGPT_MODELS.get((row["Model"] or "").strip())
            if model is None:
                raise TraceFormatError(
                    f"{where}: Model must be one of {', '.join(BURSTGPT_MODELS)}, "
                    f"got {row['Model']!r}"
                )
            counts = _token_columns(row, ("Request tokens", "Response tokens"), where)
            log_type = (row.get("Log Type") or "").strip()
            metadata = {"log_type": log_type} if log_type else {}
            failed = counts[1] == 0
            if failed:  # not billed: no tokens counted, the prompt's size kept for reading
                metadata["request_tokens"] = str(counts[0])
            yield TraceCall(
                ts=RELATIVE_EPOCH + timedelta(seconds=seconds),
                prompt_tokens=0 if failed else counts[0],
                completion_tokens=counts[1],
                model=model,
                status="error" if failed else "ok",
                metadata=metadata,
            )


def read_mooncake_jsonl(path: Path) -> Iterator[TraceCall]:
    """Calls of a Mooncake trace: ``timestamp`` in milliseconds from the trace's start (placed
    from ``RELATIVE_EPOCH``), ``input_length`` and ``output_length``
    as the token counts."""
    for where, record in _json_objects(path, "one call"):
        millis = record.get("timestamp")
        if (
            isinstance(millis, bool)
            or not isinstance(millis, int | float)
            or not (0 <= millis < 1e13)
        ):
            raise TraceFormatError(
                f"{where}: field 'timestamp' must be milliseconds from the trace's start "
                f"(a number from 0), got {millis!r}"
            )
        counts = []
        for name in ("input_length", "output_length"):
            value = record.get(name)
            if (
                isinstance(value, bool)
                or not isinstance(value, int)
                or not (0 <= value <= MAX_COUNT)
            ):
                raise TraceFormatError(
                    f"{where}: field '{name}' must be a token count (an integer from 0 to "
                    f"{MAX_COUNT}), got {value!r}"
                )
            counts.append(value)
        yield TraceCall(
            ts=RELATIVE_EPOCH + timedelta(milliseconds=millis),
            prompt_tokens=counts[0],
            completion_tokens=counts[1],
        )


# The model name that asks the router to pick (not a model that served a call).
AUTO_MODEL: str = RoutingSettings.model_fields["auto_model"].default


class _TraceRecord(UsageReport):
    """A ``/v1/usage`` record as a trace line: ``ts`` is required, ``model`` optional."""

    # trimmed as /v1/usage trims it (" gpt-4o" is gpt-4o); a blank one is absent here
    model: Annotated[
        ModelName | None,
        BeforeValidator(lambda v: None if isinstance(v, str) and not v.strip(" \t") else v),
    ] = None  # type: ignore[assignment]
    ts: Timestamp


def _usage_call(record: dict[str, Any], where: str) -> TraceCall:
    """One ``/v1/usage`` record as a call (the same model, fields and aliases as that API)."""

    def error(name: str, message: str) -> TraceFormatError:
        return TraceFormatError(f"{where}: field '{name}' {message}")

    report = validate_record(_TraceRecord, record, error, window=None)  # any time: replayed
    prompt, completion, cached = report.tokens(error)
    if report.model == AUTO_MODEL:  # would be priced as an unknown model, at cost 0
        raise error(
            "model",
            f"{AUTO_MODEL!r} is the router's name for 'pick a tier', not a model: give the "
            "model that served the call",
        )
    try:  # the attribution checks of /v1/usage: ids, '*' (a default policy), two owners
        identity = resolve_identity({}, record, None)
    except InvalidRequest as exc:
        name = exc.field or "user"
        message = exc.message.removeprefix(f"'{name}'").lstrip()
        raise error(name, message) from None
    metadata = report.metadata or {}
    feature = identity.feature
    if feature is not None and len(feature) > MAX_ID_LENGTH:
        raise error("metadata.feature", f"must be at most {MAX_ID_LENGTH} characters")
    attribution = {
        # a user named (OpenAI's safety_identifier too, as /v1/usage reads it), else none
        "user_id": identity.user_id
        if report.user_id or report.user or identity.user_id != ANONYMOUS_USER
        else None,
        "session_id": identity.session_id,
        "team": identity.team,
    }
    return TraceCall(
        ts=report.ts,
        prompt_tokens=prompt,
        completion_tokens=completion,
        cached_tokens=cached,
        user_id=attribution["user_id"],
        session_id=attribution["session_id"],
        feature=feature,
        model=report.model or None,
        team=attribution["team"],
        provider=report.provider or None,
        model_requested=report.model_requested or None,
        request_id=report.request_id or None,
        status=report.status,
        latency_ms=report.latency_ms or 0,
        cache_hit=report.cache_hit,
        metadata=metadata,
    )


def read_usage_jsonl(path: Path) -> Iterator[TraceCall]:
    """Calls from JSON Lines: one ``/v1/usage`` record a line (``ts`` required; blanks skipped).

    A ``request_id`` names one call: the same record again is that call again (counted
    once, as a retried POST), a different record under it is refused naming both lines, as
    ``/v1/usage`` answers it a 409 (every consumer would keep only the first)."""
    first_seen: dict[str, tuple[str, bytes]] = {}  # request id -> (where, digest of the call)
    for where, record in _json_objects(path, "one usage record"):
        call = _usage_call(record, where)
        if call.request_id:
            digest = hashlib.blake2b(repr(call).encode(), digest_size=16).digest()
            seen = first_seen.setdefault(call.request_id, (where, digest))
            if seen[1] != digest:
                raise TraceFormatError(
                    f"{where}: field 'request_id' {call.request_id!r} names a different call "
                    f"at {seen[0].rsplit(', ', 1)[-1]}; only the first would be counted. "
                    "Give each call its own request_id"
                )
        yield call


def _json_objects(path: Path, what: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, object) of each non-blank line of a JSON Lines file; a line that is not a JSON
    object is an error naming the file and line."""
    with open(path, encoding="utf-8-sig") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}, line {line_number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise TraceFormatError(
                    f"{where}: not valid JSON ({exc.msg} at column {exc.colno})"
                ) from None
            if not isinstance(record, dict):
                raise TraceFormatError(f"{where}: must be a JSON object ({what})")
            yield where, record


# -- attribution -------------------------------------------------------------------------
class Attribution:
    """Seeded users, sessions, features and models for rows that have none.

    ``economy_share`` is the share of calls served by the economy tier; the rest
    go to the standard tier, except ``PREMIUM_SHARE`` to the premium tier.
    ``routed_share`` of the drawn economy calls were asked for the standard
    model and routed down (routing savings), and ``cache_hit_share`` of drawn
    calls were answered by a cache (cache savings). These two come from a second
    random stream, so they do not change the users, features and models drawn.
    """

    def __init__(
        self,
        *,
        seed: int = 7,
        users: int = 200,
        zipf_s: float = 1.1,
        economy_share: float = ECONOMY_SHARE,
        calls_per_session: int = 8,
        routed_share: float = ROUTED_SHARE,
        cache_hit_share: float = CACHE_HIT_SHARE,
    ) -> None:
        if not (0 <= routed_share <= 1 and 0 <= cache_hit_share <= 1):
            raise ValueError("routed_share and cache_hit_share must be between 0 and 1")
        self.routed_share, self.cache_hit_share = routed_share, cache_hit_share
        self._savings_rng = random.Random(seed + 1)
        if users < 1:
            raise ValueError("users must be at least 1")
        if not 0 <= economy_share <= 1:
            raise ValueError("economy_share must be between 0 and 1")
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
        assigned = replace(
            call,
            user_id=user,
            session_id=call.session_id or self.session_for(user),
            feature=call.feature or self._pick(self._feature_names, self._feature_cum),
            model=call.model or self.model_for(),
        )
        if call.model is None:  # only drawn models get a drawn routing and cache story
            routed, cached = self._savings_rng.random(), self._savings_rng.random()
            if assigned.model == TIER_MODELS["economy"] and routed < self.routed_share:
                assigned = replace(assigned, model_requested=TIER_MODELS["standard"])
            if cached < self.cache_hit_share:
                assigned = replace(assigned, cache_hit=True)
        return assigned

    def __call__(self, calls: Iterable[TraceCall]) -> Iterator[TraceCall]:
        for call in calls:
            yield self.assign(call)


# -- placement in time -------------------------------------------------------------------
class PlacedTrace:
    """A trace laid on the clock: in time order, gaps divided by ``speed``, played ``repeat``
    times back to back, its first call at ``start``.

    Each copy starts one average gap after the previous one ended, so the seam
    looks like ordinary traffic. Copies after the first get ``-r<copy>``
    appended to their session and request ids, so sessions do not span copies.
    Iterating yields the placed calls lazily; ``len()`` is the number of calls.

    >>> base = datetime(2024, 1, 1, tzinfo=UTC)
    >>> calls = [TraceCall(base + timedelta(seconds=s), 10, 5) for s in (0, 10, 30)]
    >>> placed = PlacedTrace(calls, start=base, speed=10, repeat=2)
    >>> [int((c.ts - base).total_seconds()) for c in placed]
    [0, 1, 3, 4, 5, 7]
    """

    def __init__(
        self, calls: Sequence[TraceCall], *, start: datetime, speed: float = 1.0, repeat: int = 1
    ) -> None:
        if not calls:
            raise ValueError("the trace has no calls")
        if speed <= 0:
            raise ValueError("speed must be positive")
        if repeat < 1:
            raise ValueError("repeat must be at least 1")
        self.calls = sorted(calls, key=lambda call: call.ts)
        self.speed = speed
        self.repeat = repeat
        self.start = start
        origin = self.calls[0].ts
        self._offsets = [(call.ts - origin) / speed for call in self.calls]
        span = self._offsets[-1]
        gap = span / (len(self.calls) - 1) if span else timedelta(seconds=1)
        self.span = span  # one copy, first call to last
        self.period = span + gap  # start of one copy to the start of the next
        self.end = start + (repeat - 1) * self.period + span

    @classmethod
    def ending_at(
        cls, calls: Sequence[TraceCall], end: datetime, *, speed: float = 1.0, repeat: int = 1
    ) -> PlacedTrace:
        """The trace placed so that its last call is at ``end``."""
        probe = cls(calls, start=end, speed=speed, repeat=repeat)
        return cls(calls, start=end - (probe.end - probe.start), speed=speed, repeat=repeat)

    def __len__(self) -> int:
        return len(self.calls) * self.repeat

    def __iter__(self) -> Iterator[TraceCall]:
        for copy in range(self.repeat):
            copy_start = self.start + copy * self.period
            suffix = f"-r{copy}" if copy else ""
            for call, offset in zip(self.calls, self._offsets, strict=True):
                yield replace(
                    call,
                    ts=copy_start + offset,
                    session_id=call.session_id and call.session_id + suffix,
                    request_id=call.request_id and call.request_id + suffix,
                )
