"""Budget policies: validation of what an admin asks for, and which policy applies to a scope.

A scope is ``global``, ``user:<id>``, ``feature:<name>``, ``team:<id>`` or
``key:<id>``; ``user:*``, ``feature:*``, ``team:*`` and ``key:*`` are defaults for every
user, feature, team or key without a policy of its own ("every user gets $5/month").
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    ValidationError,
    WithJsonSchema,
)

from app.budgets.ledger import iter_window_problems
from app.budgets.periods import Period, PeriodError, period_of, zone
from app.ids import id_problem, normal_id, scope_id_problem
from app.pricing.catalog import nanos_to_usd, usd_text, usd_to_nanos
from app.validation import custom_error, first_problem, usd_amount, usd_schema

SCOPE_KINDS = ("user", "feature", "team", "key")
DEFAULT_THRESHOLDS = (0.5, 0.8, 1.0)
MAX_LIMIT_USD = Decimal(1_000_000_000)
FILE_WRITER = "budgets_file"  # the updated_by of the records TOLLGATE_BUDGETS_FILE publishes
# file_digest of a record when the budgets file has no entry of the scope on record: it never
# published one, or it removed the scope (a null file_digest: written before records said)
NO_FILE_ENTRY = ""


class PolicyError(ValueError):
    """An invalid policy; ``field`` names what to fix."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def validate_scope(scope: str, *, allow_default: bool = True) -> str:
    if scope == "global":
        return scope
    kind, sep, name = scope.partition(":")
    if not sep or kind not in SCOPE_KINDS or not name or len(scope) > 300:
        raise PolicyError(
            "scope",
            f"scope {scope[:300]!r} is not one of global, user:<id>, feature:<name>, team:<id>, "
            "key:<id>",
        )
    # The id as calls are attributed with it (trimmed, NFC): stored as typed, a cap on
    # 'user: alice ' matched no call and capped nobody, though listed as open (probe L).
    name = normal_id(name)
    if not name:
        raise PolicyError("scope", f"the id of scope {scope[:300]!r} is blank")
    scope = f"{kind}:{name}"
    problem = scope_id_problem(name)  # probe S: '(none)' read "open, $0" of calls it never held
    if problem is not None:  # the same rule as the ids a call is attributed with
        raise PolicyError("scope", f"the id of scope {scope[:300]!r} {problem}")
    if name == "*" and not allow_default:
        raise PolicyError("scope", f"{scope!r} is a default policy, not a scope that spends")
    return scope


def default_status_problem(scope: str) -> str | None:
    """Why ``scope`` has no status of its own (a default such as ``user:*`` spends nothing
    itself), as the API and `tollgate budgets status` both say it; None for a scope."""
    if not scope.endswith(":*"):
        return None
    return (
        f"{scope} is a default policy, not a scope that spends: ask for the status of one "
        f"of its scopes (e.g. {scope[:-1]}<id>); GET /v1/budgets/{scope} shows the policy"
    )


@dataclass(frozen=True)
class Policy:
    scope: str
    period: str
    limit_usd_nanos: int
    thresholds: tuple[float, ...] = DEFAULT_THRESHOLDS
    timezone: str = "UTC"
    window_seconds: int | None = None
    upgrade_url: str | None = None
    upgrade_prompt: str | None = None

    def period_at(self, ts: datetime) -> Period:
        return period_of(self.period, ts, self.timezone, self.window_seconds)

    @property
    def limit_usd(self) -> Decimal:
        return nanos_to_usd(self.limit_usd_nanos)

    def digest(self) -> str:
        """What this policy says (not who wrote it when), hashed: a budgets file's entry is
        compared with the one it last published through this."""
        body = {
            "scope": self.scope,
            "period": self.period,
            "limit_usd_nanos": self.limit_usd_nanos,
            "thresholds": list(self.thresholds),
            "timezone": self.timezone,
            "window_seconds": self.window_seconds,
            "upgrade_url": self.upgrade_url,
            "upgrade_prompt": self.upgrade_prompt,
        }
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:32]

    def to_record(
        self,
        event_id: str,
        ts: datetime,
        updated_by: str | None = None,
        file_digest: str | None = None,
    ) -> dict[str, Any]:
        return {
            "event_id": event_id,
            "ts": ts,
            "scope": self.scope,
            "period": self.period,
            "window_seconds": self.window_seconds,
            "limit_usd_nanos": self.limit_usd_nanos,
            "thresholds": list(self.thresholds),
            "timezone": self.timezone,
            "upgrade_url": self.upgrade_url,
            "upgrade_prompt": self.upgrade_prompt,
            "deleted": False,
            "updated_by": updated_by,
            "file_digest": file_digest,
        }

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Policy:
        return cls(
            scope=record["scope"],
            period=record["period"],
            limit_usd_nanos=record["limit_usd_nanos"],
            thresholds=tuple(record.get("thresholds") or DEFAULT_THRESHOLDS),
            timezone=record.get("timezone") or "UTC",
            window_seconds=record.get("window_seconds"),
            upgrade_url=record.get("upgrade_url"),
            upgrade_prompt=record.get("upgrade_prompt"),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "scope": self.scope,
            "period": self.period,
            "limit_usd": usd_text(self.limit_usd),
            "thresholds": list(self.thresholds),
            "timezone": self.timezone,
            "window_seconds": self.window_seconds,
            "upgrade_url": self.upgrade_url,
            "upgrade_prompt": self.upgrade_prompt,
        }


def _window_seconds(value: Any) -> int:
    if isinstance(value, bool):
        raise PolicyError("window", "window must be seconds or a duration like '1h', '30m'")
    if isinstance(value, int):
        seconds = value
    elif isinstance(value, str) and re.fullmatch(r"[0-9]{1,9}[smhd]", value):
        seconds = int(value[:-1]) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[value[-1]]
    else:
        raise PolicyError("window", f"window {value!r} must be seconds or like '1h', '30m', '7d'")
    if seconds < 60:
        raise PolicyError("window", "window must be at least 60 seconds")
    for problem in iter_window_problems(seconds):
        raise PolicyError("window", f"window {value!r}: {problem}")
    return seconds


def _limit_usd(value: Any) -> Decimal:
    return usd_amount(value, MAX_LIMIT_USD, positive=True)  # held as at least one nano-dollar


def _thresholds(value: Any) -> tuple[float, ...]:
    if (
        not isinstance(value, list)
        or not value
        or not all(isinstance(t, int | float) and not isinstance(t, bool) for t in value)
        or not all(0 < t <= 1 for t in value)
    ):
        raise custom_error(
            "must be a non-empty list of fractions in (0, 1] (the limit, 1.0, is always "
            "alerted; [1.0] for no warning before it)"
        )
    return tuple(sorted({float(t) for t in value} | {1.0}))


# Names in a zoneinfo directory that are not a place: the machine's own zone (the
# dispatcher's and the spend worker's may differ, and change with the host) and tz's
# placeholders. A cap's day must be the same day everywhere it is counted.
MACHINE_ZONES = frozenset({"localtime", "posixrules", "Factory"})


def _timezone(value: Any) -> str:
    if isinstance(value, str) and value in MACHINE_ZONES:
        raise custom_error(
            f"{value!r} depends on the machine that reads it; use an IANA name such as "
            "'Europe/Paris' or 'UTC'"
        )
    try:
        zone(value) if isinstance(value, str) else zone("")
    except PeriodError as exc:
        raise custom_error(str(exc)) from None
    return str(value)


def _window(value: Any) -> int | str | None:
    if value is None or (isinstance(value, int | str) and not isinstance(value, bool)):
        return value
    raise custom_error(f"{value!r} must be seconds or a duration like '1h', '30m', '7d'")


def _upgrade_text(value: Any) -> str | None:
    if isinstance(value, str) and not value.strip():
        return None  # blank is absent: a 402 then gets the default prompt, not a blank one
    if value is not None and (
        not isinstance(value, str) or id_problem(value, max_length=2000) is not None
    ):
        raise custom_error("must be a string of at most 2000 printable characters (one line)")
    return value


UpgradeText = Annotated[
    str | None,
    PlainValidator(_upgrade_text),
    WithJsonSchema({"type": ["string", "null"], "maxLength": 2000}),
]


def _upgrade_url(value: Any) -> str | None:
    """An http(s) URL: it goes into every 402 a client may show or open (no javascript:)."""
    text = _upgrade_text(value)
    if text is not None:
        parts = urlsplit(text)
        if parts.scheme.lower() not in ("http", "https") or not parts.netloc:
            raise custom_error("must be an http:// or https:// URL, e.g. https://example.com/pro")
    return text


UpgradeUrl = Annotated[
    str | None,
    PlainValidator(_upgrade_url),
    WithJsonSchema(
        {
            "type": ["string", "null"],
            "maxLength": 2000,
            "pattern": "^[Hh][Tt][Tt][Pp][Ss]?://[^/?#]",
        }
    ),
]
Window = Annotated[
    int | str | None,
    PlainValidator(_window),
    WithJsonSchema(
        {
            "anyOf": [{"type": "integer", "minimum": 60}, {"type": "string"}, {"type": "null"}],
            "description": "period=window only: seconds (at least 60) or '1h', '30m', '7d'",
        }
    ),
]


def _no_default(schema: dict[str, Any]) -> None:
    schema.pop("default", None)


class PolicyBody(BaseModel):
    """The body of ``PUT /v1/budgets/{scope}`` (and of a budgets file's entries)."""

    model_config = ConfigDict(extra="forbid")

    period: Literal["day", "month", "window"] = "month"
    limit_usd: Annotated[
        Decimal,
        PlainValidator(_limit_usd),
        WithJsonSchema(usd_schema(MAX_LIMIT_USD, positive=True)),
    ] = Field(
        description="a positive number of USD (a number or a decimal string), held in "
        "nano-dollars (finer digits rounded; one held as $0 is a 400)"
    )
    thresholds: Annotated[
        tuple[float, ...],
        PlainValidator(_thresholds),
        WithJsonSchema(
            {
                "type": "array",
                "minItems": 1,
                "items": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
            }
        ),
    ] = Field(
        default=DEFAULT_THRESHOLDS,
        description="Fractions of the limit at which a warning is sent; 1.0 is always added",
    )
    timezone: Annotated[str, PlainValidator(_timezone, json_schema_input_type=str)] = Field(
        default="UTC",
        description="IANA time zone of day and month periods (a window is aligned on the Unix "
        "epoch, in UTC)",
    )
    window: Window = None
    window_seconds: Window = Field(default=None, description="Same as window")
    upgrade_url: UpgradeUrl = None
    upgrade_prompt: UpgradeText = None
    scope: Annotated[Any, WithJsonSchema({"type": "string"})] = Field(
        default=None,
        description="If given, the scope of the URL",
        json_schema_extra=_no_default,  # absent, not null
    )


def parse_policy(scope: str, body: Any) -> Policy:
    """Validate an admin's JSON body for ``PUT /v1/budgets/{scope}`` (``PolicyBody``); errors
    name the field."""
    scope = validate_scope(scope)
    if not isinstance(body, dict):
        raise PolicyError("body", "the policy must be a JSON object")
    try:
        parsed = PolicyBody.model_validate(body)
    except ValidationError as exc:
        unknown = sorted(str(e["loc"][0]) for e in exc.errors() if e["type"] == "extra_forbidden")
        if unknown:
            raise PolicyError(unknown[0], f"unknown field(s): {', '.join(unknown)}") from None
        name, problem = first_problem(exc, PolicyBody)
        raise PolicyError(name or "body", f"{name} {problem}") from None
    if "scope" in parsed.model_fields_set and (
        not isinstance(parsed.scope, str) or validate_scope(parsed.scope) != scope
    ):
        raise PolicyError("scope", f"body scope {parsed.scope!r} differs from the URL's {scope!r}")
    window = parsed.window if parsed.window is not None else parsed.window_seconds
    window_seconds = None
    if parsed.period == "window":
        if window is None:
            raise PolicyError("window", "period 'window' needs window, e.g. '1h'")
        window_seconds = _window_seconds(window)
        if zone(parsed.timezone).utcoffset(datetime(2000, 1, 1)) or zone(parsed.timezone).utcoffset(
            datetime(2000, 7, 1)
        ):
            raise PolicyError(
                "timezone",
                f"a window is aligned on the Unix epoch (UTC) and ignores time zones; drop "
                f"timezone {parsed.timezone!r} (or use period 'day' or 'month', which follow it)",
            )
    elif window is not None:
        raise PolicyError("window", "window is only valid with period 'window'")
    return Policy(
        scope=scope,
        period=parsed.period,
        limit_usd_nanos=usd_to_nanos(parsed.limit_usd),
        thresholds=parsed.thresholds,
        timezone=parsed.timezone,
        window_seconds=window_seconds,
        upgrade_url=parsed.upgrade_url,
        upgrade_prompt=parsed.upgrade_prompt,
    )


def file_digest_of(record: dict[str, Any] | None) -> str | None:
    """The digest of the budgets-file entry last published for the record's scope: the
    record's own ``file_digest`` (a file's record, or an API or CLI change carrying it on;
    ``NO_FILE_ENTRY`` when the file has none on record), else, for a file's record written
    before records carried it, its policy's digest. None: not known (an API or CLI change
    written before records carried it, BudgetPolicy v1)."""
    if record is None:
        return NO_FILE_ENTRY
    digest = record.get("file_digest")
    if digest is not None:
        return str(digest)
    if record.get("updated_by") == FILE_WRITER and not record.get("deleted"):
        return Policy.from_record(record).digest()
    return None


def scopes_of(
    user_id: str | None, feature: str | None, team: str | None = None, key_id: str | None = None
) -> list[str]:
    """The scopes one call spends against, most specific first. An id ``*`` names the
    default policy of its kind (``user:*``), never a scope that spends: an event carrying one
    (every entry point refuses it; session 17's probe found a replay that did not) spends
    against the others only."""
    scopes = []
    if user_id and user_id != "*":
        scopes.append(f"user:{user_id}")
    if feature and feature != "*":
        scopes.append(f"feature:{feature}")
    if team and team != "*":
        scopes.append(f"team:{team}")
    if key_id:
        scopes.append(f"key:{key_id}")
    scopes.append("global")
    return scopes


@dataclass
class PolicyBook:
    """Policies by scope, with per-kind defaults (``user:*``, ``feature:*``).

    Read-your-writes: a change this process made (``put_local`` / ``remove_local``, with
    the event id of the record it sent) holds until the policies topic delivers that very
    record; records of the scope delivered before it are older writes and are skipped, so
    the echo of a previous change cannot undo it for a moment (a user under a raised cap
    was refused). From its own record on, the topic's order rules again.

    An own API or CLI change carries the scope's budgets-file digest on (``file_digest``);
    records it skipped landed before it, unread when it was made: if the last of them names
    another file entry (another replica's start published an edited file), that digest is
    held for the change once read back (``take_file_digest_resend``): the writer sends the
    change again carrying it."""

    policies: dict[str, Policy] = field(default_factory=dict)
    # scope -> event id of this process's latest write, until the topic delivers it
    awaiting: dict[str, str] = field(default_factory=dict)
    # scope -> when (monotonic) its own policy appeared or changed period, time zone or window:
    # the spend worker's count of the scope's new period is not known yet (see the gate)
    period_changed: dict[str, float] = field(default_factory=dict)
    # scope -> who last set it (``updated_by``: an admin key id, "cli", FILE_WRITER)
    written_by: dict[str, str | None] = field(default_factory=dict)
    # scope -> digest of the budgets-file entry last published for it; kept through later
    # API changes and removals, which carry it on (``file_digest_of``; None: not known)
    file_digests: dict[str, str | None] = field(default_factory=dict)
    # scope -> event id of this process's pending change that carried the file's digest on
    carrying: dict[str, str] = field(default_factory=dict)
    # scope -> file digest of the last record skipped while awaiting that change
    passed_over: dict[str, str | None] = field(default_factory=dict)
    # scope -> the file digest its change, read back, should have carried (to send again)
    resend: dict[str, str] = field(default_factory=dict)

    def file_digest(self, scope: str) -> str | None:
        """What an API or CLI change of ``scope`` carries on (``file_digest_of``)."""
        return self.file_digests.get(scope, NO_FILE_ENTRY)

    def note_record(self, scope: str, record: dict[str, Any] | None) -> None:
        """Who wrote ``record`` (this process's own write, or one read from the topic)."""
        if record is None:
            self.file_digests.pop(scope, None)
        else:
            self.file_digests[scope] = file_digest_of(record)
        if record is None or record.get("deleted"):
            self.written_by.pop(scope, None)
        else:
            self.written_by[scope] = record.get("updated_by")

    def put(self, policy: Policy) -> None:
        old = self.policies.get(policy.scope)
        if old is None or (old.period, old.timezone, old.window_seconds) != (
            policy.period,
            policy.timezone,
            policy.window_seconds,
        ):
            self.period_changed[policy.scope] = time.monotonic()
        self.policies[policy.scope] = policy

    def remove(self, scope: str) -> None:
        self.policies.pop(scope, None)
        self.period_changed.pop(scope, None)

    def period_changed_within(self, scope: str, seconds: float) -> float:
        """Seconds left of ``seconds`` since the policy capping ``scope`` appeared or changed
        its period: its own, else its kind's default (``user:*``). 0 if longer ago.

        A default's members wait too: right after ``user:*`` appeared, a user already at 3x
        its limit was admitted as $0 spent, with a ``max_tokens`` worth the whole limit (10
        users, 10 calls served for $0.121 under a $0.03 default: probe I)."""
        key = scope if scope in self.policies or scope == "global" else self._default_of(scope)
        changed = self.period_changed.get(key)
        if changed is None:
            return 0.0
        left = changed + seconds - time.monotonic()
        if left <= 0:
            del self.period_changed[key]  # once is enough: keep the map small
            return 0.0
        return left

    @staticmethod
    def _default_of(scope: str) -> str:
        return scope.split(":", 1)[0] + ":*"

    def put_local(
        self,
        policy: Policy,
        event_id: str,
        record: dict[str, Any] | None = None,
        *,
        carries_file_digest: bool = False,
    ) -> None:
        """This process's own change, sent to the topic as ``record`` (id ``event_id``);
        ``carries_file_digest``: an API or CLI change, carrying ``file_digest(scope)`` on."""
        self.put(policy)
        self._local(policy.scope, event_id, record, carries_file_digest)

    def remove_local(
        self,
        scope: str,
        event_id: str,
        record: dict[str, Any] | None = None,
        *,
        carries_file_digest: bool = False,
    ) -> None:
        self.remove(scope)
        self._local(scope, event_id, record, carries_file_digest)

    def _local(
        self, scope: str, event_id: str, record: dict[str, Any] | None, carrying: bool
    ) -> None:
        if record is not None:
            self.note_record(scope, record)
        self.awaiting[scope] = event_id
        self.passed_over.pop(scope, None)
        if carrying:
            self.carrying[scope] = event_id
        else:
            self.carrying.pop(scope, None)

    def apply_record(self, record: dict[str, Any] | None, scope: str) -> bool:
        """Apply a record from the compacted policies topic (None or deleted = removal);
        False: not applied (older than this process's own write, which stands)."""
        awaited = self.awaiting.get(scope)
        if awaited is not None:
            if record is None or record.get("event_id") != awaited:
                if record is not None:
                    self.passed_over[scope] = file_digest_of(record)
                return False  # older than this process's own write, which stands
            del self.awaiting[scope]
            newer = self.passed_over.pop(scope, None)
            carried = self.carrying.pop(scope, None) == awaited
            if carried and newer is not None and newer != file_digest_of(record):
                self.resend[scope] = newer
        self.note_record(scope, record)
        if record is None or record.get("deleted"):
            self.remove(scope)
        else:
            self.put(Policy.from_record(record))
        return True

    def take_file_digest_resend(self, scope: str) -> str | None:
        """The file digest this process's change of ``scope``, just read back, should have
        carried (see the class); None if it carried the right one."""
        return self.resend.pop(scope, None)

    def policy_for(self, scope: str) -> Policy | None:
        own = self.policies.get(scope)
        if own is not None or scope == "global":
            return own
        default = self.policies.get(scope.split(":", 1)[0] + ":*")
        if default is None:
            return None
        return Policy(**{**default.__dict__, "scope": scope})

    def all(self) -> Iterable[Policy]:
        return self.policies.values()


@dataclass(frozen=True)
class Evaluation:
    state: str  # open | warn | blocked
    threshold: float | None  # highest threshold reached


def evaluate(spent_nanos: int, policy: Policy) -> Evaluation:
    """State of a scope that has spent ``spent_nanos`` in the policy's current period."""
    # Exact integer arithmetic: floats lose nanos above 2**53 (limits of ~$9M and more).
    reached = [
        t for t in policy.thresholds if spent_nanos >= Decimal(str(t)) * policy.limit_usd_nanos
    ]
    highest = max(reached) if reached else None
    if spent_nanos >= policy.limit_usd_nanos:
        return Evaluation("blocked", highest)
    return Evaluation("warn" if highest is not None else "open", highest)
