"""Validation of usage and outcome reports from other services (`/v1/usage`, `/v1/outcomes`).

Owns the accepted shapes of those reports. A batch is validated whole before
anything is emitted, so a bad record rejects the batch (400 naming the index
and field) instead of writing part of it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any

from app.errors import InvalidRequest
from app.ids import MAX_ID_LENGTH, id_problem
from app.metering.attribution import Identity
from app.metering.usage import event_time, new_id
from app.pricing.catalog import usd_to_nanos

MAX_BATCH = 1000
MAX_CLOCK_SKEW = timedelta(minutes=5)
MAX_LATENESS = timedelta(days=7)
MAX_COUNT = 2**31 - 1  # token counts are Avro ints
MAX_USD = Decimal(1_000_000_000)  # one billion: far inside an Avro long of nano-dollars
MAX_METADATA_ENTRIES = 32
USAGE_STATUSES = ("ok", "error", "client_disconnected", "timeout")


@dataclass(frozen=True)
class TimeWindow:
    """Event times a report may carry: from ``max_lateness`` before ``now`` to ``max_skew`` after.

    A late record counts in the budget period of its own timestamp (calendar-correct caps),
    so the window is what bounds how far back a report can reach; older ones are refused
    with a 400 that names the window (``TOLLGATE_USAGE_MAX_LATENESS_S``).
    """

    now: datetime = field(default_factory=lambda: datetime.now(UTC))
    max_lateness: timedelta = MAX_LATENESS
    max_skew: timedelta = MAX_CLOCK_SKEW

    @property
    def earliest(self) -> datetime:
        return self.now - self.max_lateness

    @property
    def latest(self) -> datetime:
        return self.now + self.max_skew

    def describe(self) -> str:
        return (
            f"from {self.earliest.isoformat(timespec='seconds')} to "
            f"{self.latest.isoformat(timespec='seconds')} "
            f"(at most {_duration(self.max_lateness)} late, TOLLGATE_USAGE_MAX_LATENESS_S; at most "
            f"{_duration(self.max_skew)} ahead of the gateway's clock, "
            "TOLLGATE_USAGE_MAX_CLOCK_SKEW_S)"
        )


def _duration(delta: timedelta) -> str:
    seconds = int(delta.total_seconds())
    for unit, size in (("days", 86400), ("hours", 3600), ("minutes", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds // size} {unit}"
    return f"{seconds} seconds"


IdentityResolver = Callable[[Mapping[str, Any]], Identity]


def _records(body: Any, list_key: str, what: str) -> list[Any]:
    if isinstance(body, list):
        records = body
    elif isinstance(body, dict) and list_key in body:
        records = body[list_key]
        if not isinstance(records, list):
            raise InvalidRequest(f"'{list_key}' must be a list of {what}", field=list_key)
    elif isinstance(body, dict):
        records = [body]
    else:
        raise InvalidRequest(f"Send one {what[:-1]} object, a list, or {{'{list_key}': [...]}}")
    if not records:
        raise InvalidRequest(f"The batch has no {what}", field=list_key)
    if len(records) > MAX_BATCH:
        raise InvalidRequest(
            f"At most {MAX_BATCH} {what} per request, got {len(records)}", field=list_key
        )
    return records


class RecordFields:
    """Typed access to one usage or outcome record's fields, the same for every entry point.

    ``error(name, message)`` builds the exception to raise: the API's 400 naming
    ``records[i].field`` (``api_fields``), or a trace file's error naming its line.
    """

    def __init__(self, record: dict[str, Any], error: Callable[[str, str], Exception]) -> None:
        self.record = record
        self.error = error

    def count(self, *names: str, required: bool = True) -> int:
        """The first of ``names`` present: a token count (an Avro int, so at most 2**31 - 1)."""
        for name in names:
            value = self.record.get(name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_COUNT:
                raise self.error(name, f"must be an integer from 0 to {MAX_COUNT}, got {value!r}")
            return value
        if required:
            also = "".join(f"; or '{alias}'" for alias in names[1:])
            raise self.error(names[0], f"is required (an integer token count{also})")
        return 0

    def text(self, *names: str, required: bool = False) -> str | None:
        """The first of ``names`` present and non-empty: an id (``app.ids``: printable, at most
        256 characters)."""
        for name in names:
            value = self.record.get(name)
            if value is None or value == "":
                continue
            if not isinstance(value, str):
                raise self.error(
                    name, f"must be a string of at most {MAX_ID_LENGTH} printable characters"
                )
            problem = id_problem(value)
            if problem is not None:
                raise self.error(name, problem)
            return value
        if required:
            raise self.error(names[0], "is required (a non-empty string)")
        return None

    def choice(self, name: str, allowed: tuple[str, ...], default: str | None = None) -> str:
        value = self.record.get(name, default)
        if value not in allowed:
            raise self.error(name, f"must be one of {', '.join(allowed)}, got {value!r}")
        return str(value)

    def timestamp(
        self, name: str = "ts", *, required: bool = False, window: TimeWindow | None = None
    ) -> datetime:
        """ISO 8601 or epoch milliseconds, inside ``window`` (None: any time, e.g. a replayed
        trace); missing = the window's now (or the clock's) unless ``required``."""
        value = self.record.get(name)
        now = window.now if window is not None else datetime.now(UTC)
        if value is None:
            if required:
                raise self.error(name, "is required (ISO 8601 or epoch milliseconds)")
            return event_time(now)
        try:
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, int | float):
                parsed = datetime.fromtimestamp(value / 1000, UTC)
            elif isinstance(value, str):
                parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
                if parsed.tzinfo is None:
                    parsed = parsed.replace(tzinfo=UTC)
                parsed = parsed.astimezone(UTC)
            else:
                raise ValueError
        except (ValueError, OverflowError, OSError):
            if (
                window is not None
                and isinstance(value, int | float)
                and not isinstance(value, bool)
            ):
                raise self.error(
                    name,
                    f"is out of range ({value!r}); accepted event times are {window.describe()}",
                ) from None
            raise self.error(
                name,
                f"must be ISO 8601 (2026-01-31T12:00:00Z) or epoch milliseconds, got {value!r}",
            ) from None
        if window is not None and not window.earliest <= parsed <= window.latest:
            when = "in the future" if parsed > window.latest else "too late"
            raise self.error(
                name,
                f"is {when} ({parsed.isoformat()}); accepted event times are {window.describe()}",
            )
        return event_time(parsed)

    def flag(self, name: str) -> bool:
        value = self.record.get(name, False)
        if not isinstance(value, bool):
            raise self.error(name, f"must be true or false, got {value!r}")
        return value

    def metadata(self) -> dict[str, str]:
        """At most 32 entries; keys and values are ids (printable, at most 256 characters)."""
        value = self.record.get("metadata") or {}
        if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()
        ):
            raise self.error("metadata", "must be an object of string values")
        if len(value) > MAX_METADATA_ENTRIES:
            raise self.error(
                "metadata", f"has {len(value)} entries; at most {MAX_METADATA_ENTRIES} are kept"
            )
        for key, text in value.items():
            problem = id_problem(key)
            if problem is None and (problem := id_problem(text)) is not None:
                problem = f"value of {key!r} {problem}"
            elif problem is not None:
                problem = f"key {key[:40]!r} {problem}"
            if problem is not None:
                raise self.error("metadata", problem)
        return value

    def usd_nanos(self, name: str) -> int | None:
        value = self.record.get(name)
        if value is None:
            return None
        try:
            if isinstance(value, bool):
                raise InvalidOperation
            amount = Decimal(str(value))
        except InvalidOperation:
            raise self.error(name, f"must be a number of USD, got {value!r}") from None
        if not amount.is_finite() or not 0 <= amount <= MAX_USD:
            raise self.error(name, f"must be a number of USD from 0 to {MAX_USD:,}, got {value!r}")
        return usd_to_nanos(amount)


def api_fields(record: Any, where: str) -> RecordFields:
    """Fields of ``records[i]`` of an API body; errors are 400s naming ``records[i].field``."""
    if not isinstance(record, dict):
        raise InvalidRequest(f"{where} must be an object", field=where)
    return RecordFields(
        record,
        lambda name, message: InvalidRequest(f"{where}.{name} {message}", field=f"{where}.{name}"),
    )


def parse_usage_reports(
    body: Any, resolve: IdentityResolver, *, window: TimeWindow | None = None
) -> list[dict[str, Any]]:
    """Validated keyword arguments for ``Gateway.usage_record``, one per reported call.

    ``window``: accepted event times (default: the default window around now)."""
    window = window or TimeWindow()
    reports = []
    for index, record in enumerate(_records(body, "records", "usage records")):
        f = api_fields(record, f"records[{index}]")
        prompt = f.count("prompt_tokens", "input_tokens")
        cached = f.count("cached_tokens", required=False)
        if cached > prompt:
            raise f.error("cached_tokens", f"({cached}) cannot exceed prompt_tokens ({prompt})")
        latency = f.count("latency_ms", required=False)
        reports.append(
            {
                "identity": resolve(record),
                "model": f.text("model", required=True),
                "model_requested": f.text("model_requested"),
                "cache_hit": f.flag("cache_hit"),
                "prompt_tokens": prompt,
                "completion_tokens": f.count("completion_tokens", "output_tokens"),
                "cached_tokens": cached,
                "request_id": f.text("request_id") or new_id("rep_"),
                "provider": f.text("provider"),
                "ts": f.timestamp(window=window),
                "latency_ms": min(latency, 2**31 - 1),
                "status": f.choice("status", USAGE_STATUSES, default="ok"),
                "metadata": f.metadata(),
            }
        )
    return reports


def parse_outcomes(
    body: Any, resolve: IdentityResolver, *, window: TimeWindow | None = None
) -> list[dict[str, Any]]:
    """Validated ``Outcome`` records (``window``: as for usage reports)."""
    window = window or TimeWindow()
    outcomes = []
    for index, record in enumerate(_records(body, "outcomes", "outcomes")):
        f = api_fields(record, f"outcomes[{index}]")
        request_id, session_id = f.text("request_id"), f.text("session_id")
        if not request_id and not session_id:
            raise f.error("request_id", "or session_id is required to link the outcome to spend")
        identity = resolve(record)
        outcomes.append(
            {
                "event_id": new_id(),
                "ts": f.timestamp(window=window),
                "request_id": request_id,
                "session_id": session_id,
                "user_id": None if identity.user_id == "anonymous" else identity.user_id,
                "feature": identity.feature,
                "outcome": f.choice("outcome", ("success", "failure")),
                "kind": f.text("kind"),
                "value_usd_nanos": f.usd_nanos("value_usd"),
                "metadata": f.metadata(),
            }
        )
    return outcomes
