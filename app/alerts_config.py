"""Alert targets: where the notifier delivers alerts, as configuration.

Owns the ``AlertTarget`` model (one webhook, its format, filters and secrets),
``parse_alert_targets`` (the settings field ``alert_targets``, validated with messages that
never hold a secret) and ``redact_url``. It sits in the settings layer so that
``app.settings`` validates targets without importing the notifier agent; delivery itself
(payloads, retries, queues) is ``agents.notifier``'s.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Sequence
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
)

Severity = Literal["info", "warning", "critical"]
TargetFormat = Literal["json", "slack", "pagerduty", "alertmanager"]

SEVERITY_RANK: dict[str, int] = {"info": 0, "warning": 1, "critical": 2}
# Every kind of alert published: the anomaly agent's (agents.anomaly.core.Kind) and the spend
# worker's crossed soft threshold of a cap (app.budgets.spend).
BUDGET_THRESHOLD = "budget_threshold"
ANOMALY_KINDS = ("cost_per_request", "volume_spike", "volume_drop", "tier_mix")
ALERT_KINDS = (*ANOMALY_KINDS, BUDGET_THRESHOLD)
DEFAULT_SEVERITY = "warning"  # the schema's default; also how an unknown severity is ranked
# How severe an incident's records were before its first one: ranked under every severity.
NO_SEVERITY = "none"

# Keys of an alert's ``details`` that the anomaly agent writes and the notifier reads.
# A member's update when its incident grows more severe (its severity before).
SEVERITY_RAISED_FROM = "severity_raised_from"
# How severe the incident's published firing records were before this one (or NO_SEVERITY).
INCIDENT_SEVERITY_BEFORE = "incident_severity_before"
# What the incident's published firing records were before this one: the highest severity
# of each kind, "kind=severity" joined by ","; "*" stands for every kind (``heard_text``).
INCIDENT_HEARD_BEFORE = "incident_heard_before"
ANY_KIND = "*"
# "true" on the resolve of a record that was its incident's page before an escalation.
RESOLVES_PAGE = "resolves_page"
# On the resolve of a member that rose: the severity it fired at (Alertmanager's label set).
SEVERITY_FIRED = "severity_fired"
# On the resolve of a member that rose: the severity its first published firing record
# had (the page states its severity as of the page: it may be the risen one), and what the
# incident's published firing records were before its update (as ``incident_heard_before``;
# "" when the update was the page). A target its firing did not reach heard of it only if
# the update paged it.
SEVERITY_PUBLISHED = "severity_published"
RAISED_HEARD_BEFORE = "raised_heard_before"


class AlertTarget(BaseModel):
    """One webhook that receives alerts. ``url`` and ``routing_key`` are secrets.

    Slack webhook URLs carry their token in the path, PagerDuty's routing key is
    a credential: both are ``SecretStr`` (masked in ``repr``) and only ever
    logged as ``redacted_url``.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)

    name: str = Field(min_length=1, max_length=100, description="Name in logs and metric labels.")
    url: SecretStr = Field(description="http(s) URL the alerts are POSTed to.")
    format: TargetFormat = Field(default="json", description="Body the target expects.")
    routing_key: SecretStr | None = Field(
        default=None,
        validate_default=True,
        description="PagerDuty Events API v2 integration key (format 'pagerduty' only).",
    )
    min_severity: Severity | None = Field(
        default=None, description="Deliver only alerts at least this severe; unset = all."
    )
    kinds: tuple[str, ...] | None = Field(
        default=None, min_length=1, description="Deliver only these alert kinds; unset = all."
    )
    timeout_s: float = Field(default=10.0, gt=0, le=300, description="Per-attempt timeout.")
    queue_size: int = Field(
        default=1000, ge=1, description="Alerts held for this target; beyond, the oldest drop."
    )
    generator_url: str | None = Field(
        default=None, description="Alertmanager 'generatorURL' back-link (optional)."
    )
    include_historical: bool = Field(
        default=False,
        description="Also deliver alerts about the past (a replay of history, a backlog).",
    )
    include_related: bool = Field(
        default=False,
        description="Also deliver alerts attached to an incident's page (they are listed in it).",
    )

    @field_validator("url")
    @classmethod
    def _http_url(cls, url: SecretStr) -> SecretStr:
        parts = urlsplit(url.get_secret_value())
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http:// or https:// URL with a host")
        return url

    @field_validator("routing_key")
    @classmethod
    def _routing_key_for_pagerduty(
        cls, routing_key: SecretStr | None, info: ValidationInfo
    ) -> SecretStr | None:
        target_format = info.data.get("format")
        if target_format == "pagerduty" and not (routing_key and routing_key.get_secret_value()):
            raise ValueError("required for format 'pagerduty': the Events API v2 integration key")
        if target_format not in (None, "pagerduty") and routing_key is not None:
            raise ValueError(f"only used by format 'pagerduty', not {target_format!r}; remove it")
        return routing_key

    @property
    def redacted_url(self) -> str:
        return redact_url(self.url.get_secret_value())

    def accepts(self, alert: dict[str, Any]) -> bool:
        """Whether this target's severity and kind filters let ``alert`` through."""
        if self.kinds is not None and alert.get("kind") not in self.kinds:
            return False
        if self.min_severity is not None:
            return severity_rank(alert.get("severity")) >= SEVERITY_RANK[self.min_severity]
        return True

    def declines(self, alert: dict[str, Any]) -> str | None:
        """Why this target does not page ``alert`` although its filters accept it: the alert
        is about the past (``historical``), is the resolve of an alert this target was never
        paged (``unpaged``), or rides along with its incident's page (``related``). None: it
        pages. The notifier counts each as ``skipped_<reason>``."""
        if alert.get("historical") and not self.include_historical:
            return "historical"
        if not self.include_related and self.missed_its_firing(alert):
            return "unpaged"
        if (
            alert.get("incident_role") == "related"
            and not self.include_related
            and not self.first_for_it(alert)
            # the resolve of an earlier page of its incident goes where that page went
            and (alert.get("details") or {}).get(RESOLVES_PAGE) != "true"
        ):
            return "related"
        return None

    def missed_its_firing(self, alert: dict[str, Any]) -> bool:
        """Whether ``alert`` is the resolve of an alert this target was never paged: its
        firing was below the target's filters (``details.severity_published``) and its update,
        when it rose, was not the target's first record of the incident either
        (``details.raised_heard_before``). A user's loop that fired as a warning and went
        critical after another member had paged a critical-only target sent that target
        its resolve, the end of an alert it never got (a stray resolve)."""
        details = alert.get("details") or {}
        fired, raised = details.get(SEVERITY_PUBLISHED), details.get(RAISED_HEARD_BEFORE)
        if alert.get("status") != "resolved" or fired is None or raised is None:
            return False
        if self._lets_through(str(alert.get("kind")), str(fired)):
            return False  # its firing reached this target (or was its incident's to say)
        return any(self._lets_through(k, v) for k, v in parse_heard(str(raised)).items())

    def first_for_it(self, alert: dict[str, Any]) -> bool:
        """Whether ``alert``, attached to an incident, is the first of it this target's
        severity and kind filters let through (``details.incident_heard_before``: the kinds
        and severities of the incident's firing records before it), and so is this target's
        page; a member's resolve carries what was there before its firing, and follows it.
        A target of ``cost_per_request`` alerts heard nothing of an incident paged as a
        volume spike with a related cost alert (issue 12). Records of an agent from before
        kinds were followed say only the severity: ``first_at_its_severity``."""
        if self.min_severity is None and self.kinds is None:
            return False  # it hears every incident's page
        heard = (alert.get("details") or {}).get(INCIDENT_HEARD_BEFORE)
        if heard is None:
            return self.first_at_its_severity(alert)
        return not any(self._lets_through(k, v) for k, v in parse_heard(str(heard)).items())

    def _lets_through(self, kind: str, severity: str) -> bool:
        if self.kinds is not None and kind != ANY_KIND and kind not in self.kinds:
            return False
        return self.min_severity is None or (
            severity_rank(severity) >= SEVERITY_RANK[self.min_severity]
        )

    def first_at_its_severity(self, alert: dict[str, Any]) -> bool:
        """Whether ``alert``, attached to an incident, is the first of it this target's
        severity filter lets through (``details.incident_severity_before``: how severe the
        incident's firing records were before it), and so is this target's page; a member's
        resolve carries what was there before its firing, and follows it. A user's 40x loop
        joining a feature's warning page, or a loop that fired as a warning and became
        critical, reached no target paging only critical alerts (issue 12)."""
        before = (alert.get("details") or {}).get(INCIDENT_SEVERITY_BEFORE)
        if self.min_severity is None or before is None:
            return False
        return severity_rank(before) < SEVERITY_RANK[self.min_severity]


class AlertTargetError(ValueError):
    """Alert targets that cannot be used. The message names the target and field, never a secret."""


_TARGETS = TypeAdapter(list[AlertTarget])


def parse_alert_targets(data: Any) -> list[AlertTarget]:
    """Targets from plain data: a list of mappings (YAML), a JSON string (an env var), or None.

    Errors name the target's position and field and never echo a value, since
    values may be webhook URLs or keys.
    """
    if data is None or data == "":
        return []
    if isinstance(data, str | bytes):
        try:
            data = json.loads(data)
        except ValueError as exc:
            raise AlertTargetError(
                f"alert targets are not valid JSON (line {getattr(exc, 'lineno', '?')}); "
                'expected a list like [{"name": "oncall", "url": "https://...", "format": "slack"}]'
            ) from None
    try:
        targets = _TARGETS.validate_python(data)
    except ValidationError as exc:
        problems = [
            f"alert_targets[{'.'.join(str(part) for part in error['loc'])}]: {error['msg']}"
            for error in exc.errors(include_input=False, include_url=False)
        ]
        raise AlertTargetError("invalid alert targets: " + "; ".join(problems)) from None
    check_unique_names(targets)
    return targets


def check_unique_names(targets: Sequence[AlertTarget]) -> None:
    seen: set[str] = set()
    for target in targets:
        if target.name in seen:
            raise AlertTargetError(
                f"alert target name {target.name!r} is used twice; names label metrics and "
                "logs, so give each target its own"
            )
        seen.add(target.name)


def severity_rank(severity: Any) -> int:
    """The one order of severities: NO_SEVERITY < info < warning < critical; anything else
    ranks as DEFAULT_SEVERITY (the alert schema's default)."""
    if severity == NO_SEVERITY:
        return -1
    return SEVERITY_RANK.get(str(severity), SEVERITY_RANK[DEFAULT_SEVERITY])


def heard_text(heard: dict[str, str]) -> str:
    """``{"volume_spike": "warning"}`` -> ``"volume_spike=warning"`` (sorted; "" for none)."""
    return ",".join(f"{kind}={severity}" for kind, severity in sorted(heard.items()))


def parse_heard(text: str) -> dict[str, str]:
    """The inverse of ``heard_text``; a malformed part is read as any kind, critical (heard:
    a record that cannot be read never pages a target twice)."""
    heard: dict[str, str] = {}
    for part in filter(None, text.split(",")):
        kind, sep, severity = part.rpartition("=")
        if not sep or not kind:
            kind, severity = ANY_KIND, "critical"
        heard[kind] = max(heard.get(kind, NO_SEVERITY), severity, key=severity_rank)
    return heard


def redact_url(url: str) -> str:
    """``scheme://host[:port]/…``: enough to tell targets apart, no path, query or user info."""
    parts = urlsplit(url)
    host = parts.hostname or "?"
    if ":" in host:
        host = f"[{host}]"
    with contextlib.suppress(ValueError):
        if parts.port is not None:
            host = f"{host}:{parts.port}"
    rest = parts.path not in ("", "/") or parts.query or parts.fragment
    return f"{parts.scheme}://{host}/" + ("…" if rest else "")
