"""Validation of usage and outcome reports from other services (`/v1/usage`, `/v1/outcomes`).

Owns the accepted shapes of those reports, as pydantic models (``UsageReport``,
``OutcomeReport``; the trace reader of ``tollgate replay`` reads the same ``UsageReport``),
from which the OpenAPI document is generated. A batch is validated whole before
anything is emitted, so a bad record rejects the batch (400 naming the index
and field) instead of writing part of it.
"""

from __future__ import annotations

import uuid
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Annotated, Any, Literal, TypeVar, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    ValidationError,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
)

from app.errors import Conflict, InvalidRequest
from app.ids import ANONYMOUS_USER, MAX_ID_LENGTH, id_problem
from app.metering.attribution import Identity
from app.metering.usage import event_time, new_id, reported_event_id, usage_event_id
from app.pricing.catalog import usd_to_nanos
from app.validation import (
    ID_TEXT,
    MAX_TOKEN_COUNT,
    Id,
    ModelName,
    NormalId,
    OptionalModelName,
    TokenCount,
    custom_error,
    first_problem,
    usd_amount,
    usd_schema,
)

MAX_BATCH = 1000
MAX_CLOCK_SKEW = timedelta(minutes=5)
MAX_LATENESS = timedelta(days=7)
MAX_COUNT = MAX_TOKEN_COUNT  # token counts are Avro ints
MAX_USD = Decimal(1_000_000_000)  # one billion: far inside an Avro long of nano-dollars
MAX_METADATA_ENTRIES = 32


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
        other = next((k for k in ("records", "outcomes") if k != list_key and k in body), None)
        if other is not None and len(body) == 1:  # the other endpoint's batch wrapper
            raise InvalidRequest(
                f"'{other}' is not the batch field here: send {{'{list_key}': [...]}}, a list, "
                f"or one {what[:-1]} object",
                field=other,
            )
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


def _from_seconds(value: float) -> datetime:
    try:
        return datetime.fromtimestamp(value, UTC)
    except (ValueError, OverflowError, OSError):
        return datetime.min.replace(tzinfo=UTC)


def _timestamp(value: Any, window: TimeWindow | None) -> datetime:
    """ISO 8601 or epoch milliseconds, inside ``window`` (None: any time, e.g. a replayed
    trace)."""
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
        if window is not None and isinstance(value, int | float) and not isinstance(value, bool):
            raise custom_error(
                f"is out of range ({value!r}); accepted event times are {window.describe()}"
            ) from None
        raise custom_error(
            f"must be ISO 8601 (2026-01-31T12:00:00Z) or epoch milliseconds, got {value!r}"
        ) from None
    if window is not None and not window.earliest <= parsed <= window.latest:
        when = "in the future" if parsed > window.latest else "too late"
        hint = ""
        if (
            isinstance(value, int | float)
            and window.earliest <= _from_seconds(value) <= window.latest
        ):
            hint = " (it reads as a time in the window in epoch *seconds*: send milliseconds)"
        raise custom_error(
            f"is {when} ({parsed.isoformat()}); accepted event times are {window.describe()}{hint}"
        )
    return event_time(parsed)


def _metadata(value: Any) -> dict[str, str]:
    """At most 32 entries; keys and values are ids (printable, at most 256 characters)."""
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise custom_error("must be an object of string values")
    if len(value) > MAX_METADATA_ENTRIES:
        raise custom_error(f"has {len(value)} entries; at most {MAX_METADATA_ENTRIES} are kept")
    for key, text in value.items():
        problem = id_problem(key)
        if problem is None and (problem := id_problem(text)) is not None:
            problem = f"value of {key!r} {problem}"
        elif problem is not None:
            problem = f"key {key[:40]!r} {problem}"
        if problem is not None:
            raise custom_error(problem)
    return value


def _usd_nanos(value: Any) -> int:
    """A USD amount read as a budget's limit is (a number or a decimal string: "1.00" was a
    400 while a limit of "19.99" was taken, a newcomer probe), from 0, in nano-dollars."""
    return usd_to_nanos(usd_amount(value, MAX_USD))


Metadata = Annotated[
    dict[str, str],
    PlainValidator(_metadata),
    WithJsonSchema(
        {
            "type": "object",
            "maxProperties": MAX_METADATA_ENTRIES,
            "additionalProperties": {"type": "string", "maxLength": MAX_ID_LENGTH},
            "description": f"At most {MAX_METADATA_ENTRIES} entries; keys and values are ids",
        }
    ),
]
TIMESTAMP_SCHEMA = {
    "description": "ISO 8601 or epoch milliseconds, within TOLLGATE_USAGE_MAX_LATENESS_S "
    "(default 7 days) before the gateway's clock and TOLLGATE_USAGE_MAX_CLOCK_SKEW_S "
    "(default 5 minutes) after it",
    "anyOf": [{"type": "string", "format": "date-time"}, {"type": "integer"}, {"type": "null"}],
}
Timestamp = Annotated[Any, WithJsonSchema(TIMESTAMP_SCHEMA)]
# Attribution fields are read (and checked, naming the field) by ``resolve_identity``.
AttributionId = Annotated[
    str, WithJsonSchema({"type": "string", "maxLength": MAX_ID_LENGTH, "description": ID_TEXT})
]


class TokenDetails(BaseModel):
    """A usage object's token details: only ``cached_tokens`` is read (audio and reasoning
    counts are already inside the prompt and completion counts)."""

    model_config = ConfigDict(strict=True, extra="allow")

    cached_tokens: TokenCount | None = None


class UsageObject(BaseModel):
    """OpenAI's ``usage`` object nested in a record, as a service has it at hand
    (``{"model": resp.model, "usage": resp.usage.model_dump(), ...}``): Chat Completions'
    or the Responses API's. Its counts are read as the record's own; other fields of it
    (audio, reasoning, prediction counts) are accepted and not read."""

    model_config = ConfigDict(strict=True, extra="allow")

    prompt_tokens: TokenCount | None = None
    completion_tokens: TokenCount | None = None
    total_tokens: TokenCount | None = None
    prompt_tokens_details: TokenDetails | None = None
    completion_tokens_details: TokenDetails | None = None
    input_tokens: TokenCount | None = None
    output_tokens: TokenCount | None = None
    input_tokens_details: TokenDetails | None = None
    output_tokens_details: TokenDetails | None = None


# The counts a record may give at its top level or in its ``usage`` (the same on both).
USAGE_COUNTS = (
    "prompt_tokens",
    "input_tokens",
    "completion_tokens",
    "output_tokens",
    "total_tokens",
)
USAGE_DETAILS = ("prompt_tokens_details", "input_tokens_details")  # where cached_tokens is read


UsageStatus = Literal["ok", "error", "client_disconnected", "timeout"]
USAGE_STATUSES: tuple[str, ...] = get_args(UsageStatus)


class _Report(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")

    @field_validator("ts", mode="after", check_fields=False)
    @classmethod
    def _in_window(cls, value: Any, info: ValidationInfo) -> datetime | None:
        if value is None:
            return None
        window = info.context.get("window") if info.context else None
        return _timestamp(value, window)


def _given(*names: str) -> dict[str, Any]:
    """JSON Schema: each of ``names`` is present and not null (null reads as absent here)."""
    return {
        "required": list(names),
        "properties": {name: {"not": {"type": "null"}} for name in names},
    }


def _one_of_aliases(name: str, alias: str) -> list[dict[str, Any]]:
    """JSON Schema: ``name`` or its ``alias`` is given, at the top level or in the nested
    ``usage`` object; not both at the top level (two counts that disagree leave unknown
    which is right)."""
    nested = {"type": "object", "anyOf": [_given(name), _given(alias)]}
    return [
        {
            "anyOf": [
                _given(name),
                _given(alias),
                {**_given("usage"), "properties": {"usage": nested}},
            ]
        },
        {"not": _given(name, alias)},
    ]


class UsageReport(_Report):
    """One call made outside the gateway, reported to ``POST /v1/usage`` (or a trace line)."""

    model_config = ConfigDict(
        json_schema_extra={
            "allOf": [
                *_one_of_aliases("prompt_tokens", "input_tokens"),
                *_one_of_aliases("completion_tokens", "output_tokens"),
            ]
        }
    )

    model: ModelName = Field(description="The model that served the call (not blank)")
    prompt_tokens: TokenCount | None = Field(default=None, description="Or input_tokens")
    input_tokens: TokenCount | None = None
    completion_tokens: TokenCount | None = Field(default=None, description="Or output_tokens")
    output_tokens: TokenCount | None = None
    cached_tokens: TokenCount | None = None  # null = absent, as for every count
    # OpenAI's usage object, posted as it is: its cached count is read from the details
    # (Chat Completions' prompt_tokens_details, the Responses API's input_tokens_details).
    prompt_tokens_details: TokenDetails | None = Field(
        default=None, description="OpenAI's; its cached_tokens is read as cached_tokens"
    )
    input_tokens_details: TokenDetails | None = Field(
        default=None, description="The Responses API's; as prompt_tokens_details"
    )
    completion_tokens_details: TokenDetails | None = Field(
        default=None,
        description="OpenAI's; accepted, not read (reasoning and audio tokens are inside "
        "completion_tokens)",
    )
    output_tokens_details: TokenDetails | None = Field(
        default=None, description="The Responses API's; as completion_tokens_details"
    )
    total_tokens: TokenCount | None = Field(
        default=None,
        description="Optional; if given it must equal prompt_tokens + completion_tokens "
        "(prompt and completion tokens are what is priced)",
    )
    usage: UsageObject | None = Field(
        default=None,
        description="OpenAI's usage object nested as it is (Chat Completions' or the Responses "
        "API's, e.g. resp.usage.model_dump()): its counts and cached_tokens details are read "
        "as if given at the top level; a count given in both must be the same",
    )
    model_requested: OptionalModelName | None = Field(
        default=None,
        description="Model the caller asked for, when a router served `model` instead "
        "(the difference is reported as routing savings); blank is not given",
    )
    cache_hit: bool = Field(
        default=False,
        description="A cache answered without a provider call: cost 0, and the model's "
        "price for these tokens is reported as cache savings",
    )
    request_id: NormalId | None = None
    provider: Id | None = None
    ts: Timestamp = None
    latency_ms: TokenCount | None = None
    status: UsageStatus = "ok"
    metadata: Metadata | None = None
    user_id: AttributionId | None = None
    user: AttributionId | None = Field(default=None, description="Same as user_id")
    safety_identifier: AttributionId | None = Field(
        default=None, description="OpenAI's; the user when neither user_id nor user is given"
    )
    session_id: AttributionId | None = None
    feature: AttributionId | None = None
    team: AttributionId | None = None

    def _count(self, name: str, error: Callable[[str, str], Exception]) -> tuple[int | None, str]:
        """The count ``name`` and where it was given (``name`` or ``usage.name``): at the
        top level, in ``usage``, or in both alike (two that differ: which is right is not
        known)."""
        given = getattr(self, name)
        nested = getattr(self.usage, name) if self.usage is not None else None
        if given is not None and nested is not None and given != nested:
            raise error(
                f"usage.{name}", f"({nested}) differs from {name} ({given}); send one of them"
            )
        if given is None and nested is not None:
            return nested, f"usage.{name}"
        return given, name

    def tokens(self, error: Callable[[str, str], Exception]) -> tuple[int, int, int]:
        """(prompt, completion, cached), each from its field or its alias, at the top level
        or in ``usage`` (both given: they must agree, else which one is right is not
        known)."""
        counts = {name: self._count(name, error) for name in USAGE_COUNTS}
        for name, alias in (
            ("prompt_tokens", "input_tokens"),
            ("completion_tokens", "output_tokens"),
        ):
            (given, where), (also, alias_where) = counts[name], counts[alias]
            if given is not None and also is not None and given != also:
                raise error(
                    where, f"({given}) differs from {alias_where} ({also}); send one of them"
                )
        prompt, prompt_where = counts["prompt_tokens"]
        if prompt is None:
            prompt, prompt_where = counts["input_tokens"]
        if prompt is None:
            raise error(
                "prompt_tokens",
                "is required (an integer token count; or 'input_tokens'; either at the top "
                "level or in 'usage', OpenAI's usage object)",
            )
        completion, completion_where = counts["completion_tokens"]
        if completion is None:
            completion, completion_where = counts["output_tokens"]
        if completion is None:
            raise error(
                "completion_tokens",
                "is required (an integer token count; or 'output_tokens'; either at the top "
                "level or in 'usage', OpenAI's usage object)",
            )
        cached, cached_where = self.cached_tokens, "cached_tokens"
        details = [(name, getattr(self, name)) for name in USAGE_DETAILS]
        if self.usage is not None:
            details += [(f"usage.{name}", getattr(self.usage, name)) for name in USAGE_DETAILS]
        for name, detail in details:
            also = detail.cached_tokens if detail is not None else None
            if also is None:
                continue
            if cached is not None and cached != also:
                raise error(
                    f"{name}.cached_tokens", f"({also}) differs from {cached_where} ({cached})"
                )
            cached, cached_where = also, f"{name}.cached_tokens"
        cached = cached or 0
        if cached > prompt:
            raise error(cached_where, f"({cached}) cannot exceed {prompt_where} ({prompt})")
        total, total_where = counts["total_tokens"]
        if total is not None and total != prompt + completion:
            raise error(
                total_where,
                f"({total}) differs from {prompt_where} + {completion_where} "
                f"({prompt} + {completion} = {prompt + completion}); reasoning and audio "
                "tokens are inside completion_tokens. Send counts that add up, or omit "
                "total_tokens",
            )
        return prompt, completion, cached


class OutcomeReport(_Report):
    """A business outcome reported to ``POST /v1/outcomes``. Needs request_id or session_id.
    With keys, a non-admin key may report only on its own user's requests and sessions (or
    users in its may_act_for): else 403."""

    model_config = ConfigDict(
        json_schema_extra={
            "anyOf": [
                {"required": [name], "properties": {name: {"type": "string", "minLength": 1}}}
                for name in ("request_id", "session_id")
            ]
        }
    )

    outcome: Literal["success", "failure"]
    request_id: NormalId | None = None
    session_id: NormalId | None = None
    kind: Id | None = None
    value_usd: Annotated[
        int | None,
        PlainValidator(lambda value: None if value is None else _usd_nanos(value)),
        WithJsonSchema({"anyOf": [*usd_schema(MAX_USD)["anyOf"], {"type": "null"}]}),
    ] = Field(
        default=None,
        description="USD: a number or a decimal string ('4.50'), held in nano-dollars (finer "
        "digits rounded; a non-zero value held as $0 is a 400)",
    )
    ts: Timestamp = None
    metadata: Metadata | None = None
    user_id: AttributionId | None = None
    user: AttributionId | None = None
    safety_identifier: AttributionId | None = None
    feature: AttributionId | None = None


M = TypeVar("M", bound=_Report)


def validate_record(
    model: type[M],
    record: Any,
    error: Callable[[str, str], Exception],
    window: TimeWindow | None = None,
) -> M:
    """``record`` as ``model``; ``error(field, message)`` builds what to raise (the API's 400
    naming ``records[i].field``, or a trace file's error naming its line). A field inside
    an object is named by its whole path (``usage.prompt_tokens``, not ``usage``: a review)."""
    try:
        return model.model_validate(record, context={"window": window})
    except ValidationError as exc:
        name, problem = first_problem(exc, model, full_path=True)
        raise error(name or "", problem) from None


def _api_error(where: str) -> Callable[[str, str], Exception]:
    def error(name: str, message: str) -> Exception:
        field = f"{where}.{name}" if name else where
        return InvalidRequest(f"{field} {message}", field=field)

    return error


def _resolved(resolve: IdentityResolver, record: Any, where: str) -> Identity:
    """The record's attribution; a bad attribution field is named with its record
    (``records[1].user_id``), as every other field is."""
    try:
        return resolve(record)
    except InvalidRequest as exc:
        if exc.field is None or exc.field.startswith("X-"):  # a header: not the record's
            raise
        field, quoted = f"{where}.{exc.field}", f"'{exc.field}'"
        if exc.message.startswith(quoted):
            message = f"{field} {exc.message[len(quoted) :].lstrip()}"
        else:
            message = f"{where}: {exc.message}"
        raise InvalidRequest(message, field=field, code=exc.code) from None


def _api_record(model: type[M], record: Any, where: str, window: TimeWindow) -> M:
    if not isinstance(record, dict):
        raise InvalidRequest(f"{where} must be an object", field=where)
    return validate_record(model, record, _api_error(where), window)


def _note_ignored(report: BaseModel, where: str, ignored: dict[str, list[str]] | None) -> None:
    """Fields no one reads (a typo such as ``feture``, another API's ``timestamp``) are
    accepted, as OpenAI's extra usage fields are, and named back to the caller; so are the
    fields of a nested ``usage`` object no one reads (``usage.prompt_token_details``, a typo,
    would drop the cached tokens unsaid: a review)."""
    names = sorted(report.model_extra or ())
    usage = getattr(report, "usage", None)
    if isinstance(usage, UsageObject) and usage.model_extra:
        names += sorted(f"usage.{name}" for name in usage.model_extra)
    if ignored is not None and names:
        ignored[where] = names


def parse_usage_reports(
    body: Any,
    resolve: IdentityResolver,
    *,
    window: TimeWindow | None = None,
    ignored: dict[str, list[str]] | None = None,
) -> list[dict[str, Any]]:
    """Validated keyword arguments for ``Gateway.usage_record``, one per reported call.

    ``window``: accepted event times (default: the default window around now). ``ignored``,
    if given, receives the fields each record had that nothing reads (``records[i]`` ->
    names)."""
    window = window or TimeWindow()
    reports = []
    for index, record in enumerate(_records(body, "records", "usage records")):
        where = f"records[{index}]"
        identity = _resolved(resolve, record, where) if isinstance(record, dict) else None
        report = _api_record(UsageReport, record, where, window)
        _note_ignored(report, where, ignored)
        prompt, completion, cached = report.tokens(_api_error(where))
        assert identity is not None  # a record that is not an object was refused above
        # A report is idempotent by its request id: a retried POST (or a report of a call
        # that went through this gateway, by its X-Request-Id) has the event id of the first,
        # and every consumer counts an event id once. A report without one is given one
        # (``rep_...``, in the answer), and its event id is that id's: a retry naming the id
        # it was given was a second event, the same call counted twice (a newcomer's probe).
        request_id = report.request_id or new_id("rep_")
        reports.append(
            {
                "event_id": reported_event_id(identity.user_id, request_id),
                "identity": identity,
                "model": report.model,
                "model_requested": report.model_requested or None,
                "cache_hit": report.cache_hit,
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "cached_tokens": cached,
                "request_id": request_id,
                "provider": report.provider or None,
                "ts": report.ts or event_time(window.now),
                "latency_ms": report.latency_ms or 0,
                "status": report.status,
                "metadata": report.metadata or {},
            }
        )
    return reports


def parse_outcomes(
    body: Any,
    resolve: IdentityResolver,
    *,
    window: TimeWindow | None = None,
    ignored: dict[str, list[str]] | None = None,
) -> list[dict[str, Any]]:
    """Validated ``Outcome`` records (``window``, ``ignored``: as for usage reports)."""
    window = window or TimeWindow()
    outcomes = []
    for index, record in enumerate(_records(body, "outcomes", "outcomes")):
        where = f"outcomes[{index}]"
        report = _api_record(OutcomeReport, record, where, window)
        _note_ignored(report, where, ignored)
        request_id, session_id = report.request_id or None, report.session_id or None
        if not request_id and not session_id:
            raise _api_error(where)(
                "request_id", "or session_id is required to link the outcome to spend"
            )
        identity = _resolved(resolve, record, where)
        event_id = new_id()
        if request_id:  # the same outcome of a call posted again (a retry) is one event
            # (and its user's: two users' outcomes of a request id they share are two)
            owner: tuple[str, ...] = (
                () if identity.user_id == ANONYMOUS_USER else (identity.user_id,)
            )
            said = (*owner, request_id, report.outcome, report.kind, report.value_usd, report.ts)
            event_id = uuid.uuid5(uuid.NAMESPACE_URL, f"tollgate:outcome:{said!r}").hex
        outcomes.append(
            {
                "event_id": event_id,
                "ts": report.ts or event_time(window.now),
                "request_id": request_id,
                "session_id": session_id,
                "user_id": None if identity.user_id == ANONYMOUS_USER else identity.user_id,
                "feature": identity.feature,
                "outcome": report.outcome,
                "kind": report.kind or None,
                "value_usd_nanos": report.value_usd,
                "metadata": report.metadata or {},
            }
        )
    return outcomes


class ReportedRequests:
    """The request ids of usage reported here lately, and what each record said.

    A report naming its ``request_id`` gets an event id derived from it and its user
    (``reported_event_id``), so a retried POST counts once. But every consumer keeps only
    the first record of an event id: a second, *different* record of the user under the
    same request id (other token counts) was answered 202 with its own cost and then
    dropped downstream without a word. Here it is a 409 naming the id, before anything is
    emitted; an identical record is a retry and is accepted again (the same event id).
    Another user's record under the id is another call. The memory is this process's last
    ``capacity`` ids reported here (about 2 MB: retries come within minutes), keyed by event
    id, each with a hash of what its record said, and apart from them the last ``capacity``
    read back from Kafka at the start: a large read-back, finishing after live reports (it
    runs in the background when Kafka answered late), pushed the live ids out of a shared
    window, and a retry of a live report was held at the gate again (review 59). Another
    dispatcher, or this one after a restart past what it read back, cannot tell and keeps
    the first.
    """

    def __init__(self, capacity: int = 10_000) -> None:
        self.capacity = capacity
        self._seen: OrderedDict[str, int] = OrderedDict()  # reported here
        self._read: OrderedDict[str, int] = OrderedDict()  # read back (remember_usage)

    def _known(self, event_id: str) -> int | None:
        """What the record of ``event_id`` said, if reported here or read back lately."""
        what = self._seen.get(event_id)
        return self._read.get(event_id) if what is None else what

    @staticmethod
    def _keep(window: OrderedDict[str, int], event_id: str, what: int, capacity: int) -> None:
        window[event_id] = what
        window.move_to_end(event_id)
        while len(window) > capacity:
            window.popitem(last=False)

    @staticmethod
    def _what(report: Mapping[str, Any]) -> int:
        identity = report["identity"]
        return hash((
            identity.user_id, identity.feature, report["model"], report["prompt_tokens"],
            report["completion_tokens"], report["cached_tokens"], report["cache_hit"],
            report["status"],
        ))  # fmt: skip

    def remember_usage(self, record: Mapping[str, Any]) -> None:
        """Learn a reported record from its Usage event (a starting dispatcher reads back
        the recent ones): a retry of it here is then a repeat, not a second hold at the
        gate, and another record under its id a 409. Calls of the gateway's own are not
        reports and are left out."""
        if record.get("source") != "usage_api" or not record.get("request_id"):
            return
        what = hash((
            record.get("user_id"), record.get("feature"), record.get("model_served"),
            record.get("prompt_tokens"), record.get("completion_tokens"),
            record.get("cached_tokens"), record.get("cache_hit"), record.get("status"),
        ))  # fmt: skip
        self._keep(self._read, record["event_id"], what, self.capacity)

    def check(
        self,
        reports: list[dict[str, Any]],
        explicit: set[int],
        dispatched: Callable[[str], bool] = lambda request_id: False,
    ) -> None:
        """Raise ``Conflict`` if a report (index in ``explicit``: it named its request_id)
        differs from an earlier one with its request id, here or earlier in the batch, or
        names a call the gateway dispatched itself (``dispatched``), whose usage it counted.
        A retry of a record reported before report ids became their user's (session 37),
        read back here, keeps that record's event id (else it is counted again)."""
        batch: dict[str, int] = {}
        for index in sorted(explicit):
            report = reports[index]
            request_id, what = report["request_id"], self._what(report)
            legacy = usage_event_id(request_id)
            if self._known(legacy) == what:
                report["event_id"] = legacy
            if dispatched(request_id):
                raise Conflict(
                    f"records[{index}].request_id {request_id[:100]!r} is a call this gateway "
                    "served: its usage is counted already, and a record under its id would "
                    "not be. Report only calls made outside the gateway, each under its own "
                    "request_id",
                    field=f"records[{index}].request_id",
                )
            key = report["event_id"]  # the user's request id
            earlier = batch[key] if key in batch else self._known(key)
            if earlier is not None and earlier != what:
                raise Conflict(
                    f"records[{index}].request_id {request_id[:100]!r} was already reported "
                    "with another record of this user (feature, model or token counts "
                    "differ); only the first is counted. A retry must repeat the record as it was; another "
                    "call needs its own request_id",
                    field=f"records[{index}].request_id",
                )
            batch[key] = what

    def repeats(self, reports: list[dict[str, Any]], explicit: set[int]) -> set[int]:
        """The reports (indexes) that repeat one already accepted here or earlier in the
        batch (``check`` passed: the same record): emitted once, counted once."""
        batch: set[str] = set()
        found = set()
        for index in sorted(explicit):
            key = reports[index]["event_id"]
            if key in batch or self._known(key) is not None:
                found.add(index)
            batch.add(key)
        return found

    def remember(self, reports: list[dict[str, Any]], explicit: set[int]) -> None:
        for index in explicit:
            report = reports[index]
            self._keep(self._seen, report["event_id"], self._what(report), self.capacity)
