"""The notifier: alerts from ``tollgate.alerts`` to on-call webhooks.

Owns delivery of ``Alert`` events: which targets an alert goes to (per-target
severity and kind filters), the body each target format expects, retries,
per-target isolation, the delivery metrics, and keeping webhook secrets out of
logs. It does not decide what is an alert (the anomaly and spend agents do), nor
where targets are configured: ``AlertTarget`` and ``parse_alert_targets`` live in
``app.alerts_config`` (the settings layer), which validates ``alert_targets``.

Formats (all POST ``application/json``):

- ``json``: the alert record itself, timestamps in ISO 8601 (UTC).
- ``slack``: an incoming-webhook ``{"text": ...}`` with one readable line.
- ``pagerduty``: Events API v2 (``/v2/enqueue``): ``trigger`` with a payload,
  ``resolve`` with the same ``dedup_key`` (``lifecycle_key``: the alert's ``alert_key``,
  and for an anomaly incident's records ``@`` the time it first fired).
- ``alertmanager``: API v2 (``/api/v2/alerts``): a list of one alert, labelled
  by ``alertname``, ``kind``, ``scope``, ``severity`` and ``alert_key`` (and an anomaly
  incident's records by ``first_seen``); ``endsAt`` set when resolved.

What pages (issue 12): an alert marked ``historical`` (about the past: a replay, a
backlog) and an alert attached to an incident as ``related`` (the incident's primary
alert pages, listing it) are delivered only to targets that ask for them
(``include_historical``, ``include_related``); every such decision is logged with its
reason ("not paged: historical ...") and counted (``tollgate_alert_notifications_total``'s
``outcome`` ``skipped_historical``, ``skipped_related`` or, for the resolve below,
``skipped_unpaged``).
But a related alert that is the first of its incident a target's ``min_severity`` and
``kinds`` let through pages that target (``AlertTarget.first_for_it``: the correlator says
the kinds and severities of the incident's records before it), and so does that member's
resolve: a critical-only pager heard nothing of an incident paged as a warning that became
critical, a cost-only target nothing of a volume page with a related cost alert. A resolve
goes to no target that none of its alert's firing records paged (``skipped_unpaged``:
``AlertTarget.missed_its_firing``).
Every message states the money at stake when the alert carries it.

Flow: a plain aiokafka consumer group reads the alerts topic; every decoded
alert is offered to the bounded queue of each target whose filters accept it;
one worker task per target posts from its queue in order, retrying connection
errors, timeouts, 429 and 5xx with exponential backoff and jitter, waiting longer
when the target's ``Retry-After`` asks for it (other answers are final). A slow or dead target only fills its own queue; once full,
its oldest alert is dropped and counted, so the newest news still gets through.

A notifier that starts reads back the event ids of the last alerts before its group's
committed offsets (they were handled; ``SENT_IDS_KEPT`` a partition, at most four times that
in all) and skips their repeats: the anomaly agent publishes
again, under the same ids, what it had published since its last checkpoint, and with both
killed every incident was paged twice (a fault probe).

Delivery guarantee: at least once. A first notifier (its group has no committed offset)
starts at the end of the topic, so it does not page for history, and commits that starting
point at once: one killed before any alert came starts there again, not at the new end.
An alert's offset is committed only once every
target that pages it is done with it: delivered, rejected (a final 4xx), given up on
after the retries, or dropped from a full queue (counted and logged). A notifier that
dies with alerts queued leaves them to its successor, which sends them again (so does
a target that had answered just before the crash: PagerDuty de-duplicates on
``dedup_key`` and Alertmanager on labels, so a repeat is harmless there; JSON receivers
can de-duplicate on ``event_id``, also sent as the ``Idempotency-Key`` header; Slack shows
the line twice). Within one process a target
is never sent the same ``event_id`` twice: a notifier frozen past its consumer session (a
``SIGSTOP``, a long GC pause) gets its partitions back at the committed offset and reads
again what it had just delivered; those are skipped and counted (``skipped_duplicate``). A dead target never holds
back the consumer or the other targets, only the committed offset, for as long as its
retries last; a graceful stop drains the queues for ``drain_timeout_s`` first.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import random
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal, NamedTuple
from urllib.parse import parse_qsl, urlsplit

import aiohttp
import orjson
from aiokafka import TopicPartition
from aiokafka.errors import KafkaError
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from tenacity import retry_if_exception

from app.alerts_config import (
    DEFAULT_SEVERITY,
    SEVERITY_FIRED,
    AlertTarget,
    AlertTargetError,
    check_unique_names,
)
from app.events import clients
from app.events.codec import EventCodec, build_codec
from app.events.consumer import EventReader
from app.events.kafka_retry import retry_while_kafka_down
from app.http.agent_metrics import FamilyCollector, gauge, metrics_listener, stop_on_signals
from app.retry import (
    AsyncRetrying,
    BeforeSleep,
    RetryCallState,
    retry_attempts,
    wait_capped_exponential,
    wait_retry_after,
)
from app.settings import Settings

log = logging.getLogger(__name__)

StartFrom = Literal["earliest", "latest"]

PAGERDUTY_SEVERITIES = frozenset({"critical", "error", "warning", "info"})
PAGERDUTY_DEDUP_KEY_MAX = 255
PAGERDUTY_SUMMARY_MAX = 1024
DELIVERY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
DROP_LOG_INTERVAL_S = 10.0
# How many delivered event ids each target remembers: far more than a fetch holds (the
# alerts read again after a rebalance), a few hundred kB at most. Also how many alerts a
# partition a starting notifier reads back as handled (``_remember_handled``).
SENT_IDS_KEPT = 10_000
LOOKBACK_TIMEOUT_S = 30.0  # reading back what was handled before a start, at most
BODY_LOG_CHARS = 300
# On a ``json`` target's posts: the alert's event id, the same on a re-send.
IDEMPOTENCY_HEADER = "Idempotency-Key"

# -- secrets ----------------------------------------------------------------------------


def secret_fragments(target: AlertTarget) -> list[str]:
    """Every piece of a target's configuration that must not reach a log, longest first."""
    url = target.url.get_secret_value()
    parts = urlsplit(url)
    fragments = {url, parts.path, parts.query, parts.fragment, parts.password or ""}
    fragments.update(segment for segment in parts.path.split("/") if len(segment) >= 6)
    fragments.update(value for _, value in parse_qsl(parts.query) if len(value) >= 6)
    if target.routing_key is not None:
        fragments.add(target.routing_key.get_secret_value())
    return sorted((f for f in fragments if f and f != "/"), key=len, reverse=True)


def scrub(text: str, secrets: Sequence[str]) -> str:
    """``text`` (an error message, a response body) with every secret fragment replaced."""
    for secret in secrets:
        text = text.replace(secret, "…")
    return text


# -- payloads ---------------------------------------------------------------------------


def iso(ts: datetime) -> str:
    """ISO 8601 / RFC 3339 in UTC with milliseconds, e.g. ``2026-11-27T12:00:00.123Z``."""
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=UTC)
    return ts.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def is_resolved(alert: dict[str, Any]) -> bool:
    return alert.get("status") == "resolved"


def format_value(value: float, unit: str | None) -> str:
    """A number as a reader wants it: ``$12.50``, ``35.0%``, ``1,204 requests/min``."""
    if unit == "usd":
        return f"${value:,.2f}" if abs(value) >= 1 else f"${value:.4g}"
    if unit == "share":
        return f"{value:.1%}"
    if value == int(value) and abs(value) < 1e15:
        text = f"{int(value):,}"
    elif abs(value) >= 100:
        text = f"{value:,.1f}"
    else:
        text = f"{value:.4g}"
    return f"{text} {unit}" if unit else text


def comparison(alert: dict[str, Any]) -> str | None:
    """``expected X, observed Y`` from whichever of the two the alert carries."""
    unit = alert.get("unit")
    parts = [
        f"{label} {format_value(alert[label], unit)}"
        for label in ("expected", "observed")
        if alert.get(label) is not None
    ]
    return ", ".join(parts) or None


def at_stake(alert: dict[str, Any]) -> str | None:
    """``+$12.40/hour`` (the alert's extra spend per hour against expected), if it says."""
    impact = alert.get("impact_usd_per_hour")
    if impact is None or is_resolved(alert):
        return None
    size = abs(float(impact))
    amount = f"${size:,.2f}" if size >= 0.01 else f"${size:.4f}"
    return f"{'+' if impact >= 0 else '-'}{amount}/hour"


def headline(alert: dict[str, Any]) -> str:
    """``[CRITICAL] cost_per_request on feature:search: expected $0.01, observed $0.09,
    +$3.20/hour``."""
    severity = str(alert.get("severity") or DEFAULT_SEVERITY)
    state = f"RESOLVED (was {severity})" if is_resolved(alert) else severity.upper()
    line = f"[{state}] {alert['kind']} on {alert['scope']}"
    parts = [part for part in (comparison(alert), at_stake(alert)) if part]
    return f"{line}: {', '.join(parts)}" if parts else line


def json_payload(alert: dict[str, Any]) -> dict[str, Any]:
    """The generic format: the alert record, timestamps as ISO 8601 strings."""
    return {
        key: iso(value) if isinstance(value, datetime) else value for key, value in alert.items()
    }


SLACK_EMOJI = {
    "critical": ":rotating_light:",
    "warning": ":warning:",
    "info": ":information_source:",
}


def _slack_escape(text: str) -> str:
    # Slack's three control characters in message text.
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def slack_payload(alert: dict[str, Any]) -> dict[str, Any]:
    """A Slack incoming-webhook body: one line of mrkdwn."""
    severity = str(alert.get("severity") or DEFAULT_SEVERITY)
    if is_resolved(alert):
        lead = f":white_check_mark: *Resolved* (was {_slack_escape(severity)})"
    else:
        lead = f"{SLACK_EMOJI.get(severity, ':warning:')} *{_slack_escape(severity.upper())}*"
    text = f"{lead} {_slack_escape(alert['kind'])} on `{_slack_escape(alert['scope'])}`"
    compared = ", ".join(part for part in (comparison(alert), at_stake(alert)) if part)
    if compared:
        text += f" — {_slack_escape(compared)}"
    if alert.get("message"):
        text += f" — {_slack_escape(alert['message'])}"
    return {"text": text}


def pagerduty_severity(severity: Any) -> str:
    """Tollgate's info/warning/critical are PagerDuty's too; anything else becomes warning."""
    value = str(severity)
    return value if value in PAGERDUTY_SEVERITIES else DEFAULT_SEVERITY


def lifecycle_key(alert: dict[str, Any]) -> str:
    """What identifies ``alert``'s alert at a receiver that knows alerts by a key (PagerDuty's
    ``dedup_key``, Alertmanager's labels): its ``alert_key``, and for the records of an
    anomaly incident (they carry ``incident_key``) the time their lifecycle first fired too.
    One key can be open twice on the pager: a recurrence pages while the earlier incident's
    page waits for its other members, and that page's resolve, under the bare key, closed the
    recurrence that still went on (a property test). A budget threshold fires once per key
    and never resolves: its key alone (a resend after a crash is the same page)."""
    if not alert.get("incident_key"):
        return str(alert["alert_key"])
    return f"{alert['alert_key']}@{iso(alert['first_seen'])}"


def pagerduty_dedup_key(alert_key: str) -> str:
    """``alert_key``, or a stable shortened form of it past PagerDuty's 255 characters."""
    if len(alert_key) <= PAGERDUTY_DEDUP_KEY_MAX:
        return alert_key
    digest = hashlib.sha256(alert_key.encode()).hexdigest()[:32]
    return f"{alert_key[:190]}|sha256:{digest}"


def scope_type(scope: str) -> str:
    """``user:alice`` -> ``user``; ``global`` -> ``global``."""
    return scope.split(":", 1)[0]


def pagerduty_payload(alert: dict[str, Any], routing_key: str) -> dict[str, Any]:
    """An Events API v2 event: ``trigger`` with a payload, or ``resolve`` by ``dedup_key``.

    ``source`` is the scope the alert is about (the "affected system"),
    ``component`` its type (user, feature, team, key, global), ``class`` the
    alert kind and ``group`` is ``tollgate``.
    """
    dedup_key = pagerduty_dedup_key(lifecycle_key(alert))
    if is_resolved(alert):
        return {"routing_key": routing_key, "event_action": "resolve", "dedup_key": dedup_key}
    custom_details: dict[str, Any] = {
        "message": alert.get("message"),
        "alert_key": alert["alert_key"],
        "event_id": alert.get("event_id"),
        "score": alert.get("score"),
        "expected": alert.get("expected"),
        "observed": alert.get("observed"),
        "unit": alert.get("unit"),
        "window_seconds": alert.get("window_seconds"),
        "impact_usd_per_hour": alert.get("impact_usd_per_hour"),
        "incident_key": alert.get("incident_key") or None,
        "first_seen": iso(alert["first_seen"]) if alert.get("first_seen") else None,
        "last_seen": iso(alert["last_seen"]) if alert.get("last_seen") else None,
        **{f"details.{key}": value for key, value in (alert.get("details") or {}).items()},
    }
    summary = headline(alert)
    if alert.get("message"):
        summary += f" — {alert['message']}"
    return {
        "routing_key": routing_key,
        "event_action": "trigger",
        "dedup_key": dedup_key,
        "payload": {
            "summary": summary[:PAGERDUTY_SUMMARY_MAX],
            "source": alert["scope"],
            "severity": pagerduty_severity(alert.get("severity")),
            "timestamp": iso(alert["ts"]),
            "component": scope_type(alert["scope"]),
            "group": "tollgate",
            "class": alert["kind"],
            "custom_details": {k: v for k, v in custom_details.items() if v is not None},
        },
    }


def alertname(kind: str) -> str:
    """``budget_threshold`` -> ``TollgateBudgetThreshold`` (Prometheus naming)."""
    return "Tollgate" + "".join(part.capitalize() for part in kind.split("_") if part)


def alertmanager_payload(
    alert: dict[str, Any], generator_url: str | None = None
) -> list[dict[str, Any]]:
    """An Alertmanager API v2 ``POST /api/v2/alerts`` body: a list holding this alert.

    Labels identify an alert in Alertmanager, so they carry ``alert_key`` too, and an
    anomaly incident's records the time their lifecycle first fired (``first_seen``, as in
    ``lifecycle_key``): a resolve then ends exactly the alert it belongs to, not a
    recurrence of its key that is still going on.
    """
    severity = str(alert.get("severity") or DEFAULT_SEVERITY)
    compared = ", ".join(part for part in (comparison(alert), at_stake(alert)) if part)
    summary = f"{alert['kind']} on {alert['scope']}" + (f": {compared}" if compared else "")
    entry: dict[str, Any] = {
        "labels": {
            "alertname": alertname(alert["kind"]),
            "kind": alert["kind"],
            "scope": alert["scope"],
            "severity": severity,
            "alert_key": alert["alert_key"],
            **({"first_seen": iso(alert["first_seen"])} if alert.get("incident_key") else {}),
        },
        "annotations": {"summary": summary, "description": str(alert.get("message") or summary)},
        "startsAt": iso(alert["first_seen"]),
    }
    if is_resolved(alert):
        # endsAt before startsAt is rejected by Alertmanager.
        entry["endsAt"] = iso(max(alert["ts"], alert["first_seen"]))
    if generator_url:
        entry["generatorURL"] = generator_url
    fired = (alert.get("details") or {}).get(SEVERITY_FIRED)
    if is_resolved(alert) and fired and fired != severity:
        # It fired at one severity and rose: Alertmanager knows it by both label sets (its
        # firing and its update), and the resolve ends both.
        return [entry, {**entry, "labels": {**entry["labels"], "severity": str(fired)}}]
    return [entry]


def build_payload(target: AlertTarget, alert: dict[str, Any]) -> Any:
    """The JSON body ``target`` expects for ``alert``."""
    if target.format == "slack":
        return slack_payload(alert)
    if target.format == "pagerduty":
        assert target.routing_key is not None  # the model refuses pagerduty without one
        return pagerduty_payload(alert, target.routing_key.get_secret_value())
    if target.format == "alertmanager":
        return alertmanager_payload(alert, target.generator_url)
    return json_payload(alert)


# -- delivery ---------------------------------------------------------------------------


@dataclass(frozen=True)
class RetryPolicy:
    """Attempts per alert and target, and the exponential backoff between them.

    The n-th wait is ``min(max_delay_s, base_delay_s * 2**(n-1))``, reduced by up
    to ``jitter`` of itself at random so that retries of many alerts spread out;
    a ``Retry-After`` header (seconds) lengthens it, up to ``max_delay_s``. The
    retrying is ``app.retry.retry_attempts`` (tenacity); this is its configuration.
    """

    max_attempts: int = 8
    base_delay_s: float = 0.5
    max_delay_s: float = 30.0
    jitter: float = 0.5

    def wait(self, rng: random.Random) -> wait_retry_after:
        backoff = wait_capped_exponential(self.base_delay_s, self.max_delay_s, self.jitter, rng)
        return wait_retry_after(backoff, self.max_delay_s)

    def delay(self, attempt: int, rng: random.Random, retry_after_s: float | None = None) -> float:
        return self.wait(rng).seconds(attempt, retry_after_s)

    def retrying(self, rng: random.Random, before_sleep: BeforeSleep) -> AsyncRetrying:
        """Retries a ``DeliveryFailed`` that may pass later (connection error, timeout, 429,
        5xx); raises the last one after ``max_attempts``, or a final one at once."""
        return retry_attempts(
            attempts=self.max_attempts,
            wait=self.wait(rng),
            retry=retry_if_exception(lambda exc: isinstance(exc, DeliveryFailed) and exc.retryable),
            before_sleep=before_sleep,
        )


class NotifierMetrics:
    """The notifier's Prometheus metrics, in ``registry`` (default: the process-wide one)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = registry if registry is not None else REGISTRY
        self.notifications = Counter(
            "tollgate_alert_notifications",
            "Alert notifications by target and outcome: delivered, failed (gave up or "
            "rejected), retried (one per retry), dropped (queue full, oldest dropped), "
            "skipped_duplicate (read again after a rebalance, sent already), skipped_historical, "
            "skipped_related, skipped_unpaged (the resolve of an alert the target never got)",
            ["target", "outcome"],
            registry=r,
        )
        self.duration = Histogram(
            "tollgate_alert_notification_duration_seconds",
            "First attempt to final outcome of one notification, retries included",
            ["target", "outcome"],
            buckets=DELIVERY_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "tollgate_alert_notification_queue_depth",
            "Alerts waiting to be delivered, by target",
            ["target"],
            registry=r,
        )
        self.undecodable = Counter(
            "tollgate_alert_notifier_undecodable",
            "Records on the alerts topic that are not a decodable Alert (skipped)",
            registry=r,
        )


class _Attempt(NamedTuple):
    delivered: bool
    retryable: bool
    status: int | None
    error: str
    retry_after_s: float | None = None


class DeliveryFailed(Exception):
    """One POST that did not deliver: whether it may pass later, and how long the target
    asked to wait (``retry_after_s``, read by ``app.retry.wait_retry_after``)."""

    def __init__(self, result: _Attempt, attempt: int) -> None:
        super().__init__(result.error)
        self.result = result
        self.attempt = attempt
        self.retryable = result.retryable
        self.retry_after_s = result.retry_after_s


def _retry_after_seconds(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None  # an HTTP date: rare from webhooks; the backoff applies


def is_retryable_status(status: int) -> bool:
    return status == 429 or status >= 500


class Ticket:
    """One alert record's hand-over to the targets that page it: done once all of them are."""

    __slots__ = ("_on_done", "remaining")

    def __init__(self, remaining: int, on_done: Callable[[], None]) -> None:
        self.remaining = remaining
        self._on_done = on_done

    def done(self) -> None:
        self.remaining -= 1
        if self.remaining == 0:
            self._on_done()


class OffsetsInFlight:
    """Per partition, the offsets handed to targets and not yet done with, so the offset
    committed is never past an alert still to deliver: the lowest one in flight, else one
    past the last record handled."""

    def __init__(self) -> None:
        self.handled: dict[TopicPartition, int] = {}  # one past the last record handled
        self.in_flight: dict[TopicPartition, set[int]] = {}
        self.committed: dict[TopicPartition, int] = {}

    def handled_through(self, tp: TopicPartition, offset: int) -> None:
        self.handled[tp] = max(self.handled.get(tp, 0), offset + 1)

    def ticket(self, tp: TopicPartition, offset: int, targets: int) -> Ticket:
        self.in_flight.setdefault(tp, set()).add(offset)
        return Ticket(targets, lambda: self.in_flight[tp].discard(offset))

    def to_commit(self, assigned: set[TopicPartition]) -> dict[TopicPartition, int]:
        """Offsets that moved since the last commit, for the partitions still assigned."""
        out: dict[TopicPartition, int] = {}
        for tp, handled in self.handled.items():
            if tp not in assigned:
                continue
            pending = self.in_flight.get(tp)
            offset = min(pending) if pending else handled
            if offset > self.committed.get(tp, -1):
                out[tp] = offset
        return out

    def forget(self, keep: set[TopicPartition]) -> None:
        """After a rebalance: partitions no longer ours are re-read by their new owner."""
        for tp in [tp for tp in self.handled if tp not in keep]:
            self.handled.pop(tp, None)
            self.in_flight.pop(tp, None)
            self.committed.pop(tp, None)


class TargetWorker:
    """One target's bounded queue and the task that delivers from it, in order."""

    def __init__(
        self,
        target: AlertTarget,
        metrics: NotifierMetrics,
        retry: RetryPolicy,
        rng: random.Random | None = None,
    ) -> None:
        self.target = target
        self.retry = retry
        self.rng = rng or random.Random()
        self.queue: asyncio.Queue[tuple[dict[str, Any], Ticket | None]] = asyncio.Queue(
            maxsize=target.queue_size
        )
        self._secrets = secret_fragments(target)
        self._log_extra = {"target": target.name, "url": target.redacted_url}
        name = target.name
        self._delivered = metrics.notifications.labels(name, "delivered")
        self._failed = metrics.notifications.labels(name, "failed")
        self._retried = metrics.notifications.labels(name, "retried")
        self._dropped = metrics.notifications.labels(name, "dropped")
        self._delivered_seconds = metrics.duration.labels(name, "delivered")
        self._failed_seconds = metrics.duration.labels(name, "failed")
        metrics.queue_depth.labels(name).set_function(self.queue.qsize)
        self._duplicate = metrics.notifications.labels(name, "skipped_duplicate")
        self._dropped_unlogged = 0
        self._last_drop_log = float("-inf")
        # The event ids this target was sent lately, oldest first: an alert read again by this
        # process (a rebalance after a stall puts the partition back at the committed offset)
        # is not sent twice. A new process starts empty (at-least-once across a crash).
        self._sent: OrderedDict[str, None] = OrderedDict()

    def offer(self, alert: dict[str, Any], ticket: Ticket | None = None) -> None:
        """Queue ``alert``; never waits. A full queue drops its oldest alert to make room.
        ``ticket`` is told when this target is done with the alert, whatever the end."""
        if self.queue.full():
            _, dropped = self.queue.get_nowait()
            self.queue.task_done()
            if dropped is not None:
                dropped.done()
            self._dropped.inc()
            self._dropped_unlogged += 1
            now = time.monotonic()
            if now - self._last_drop_log >= DROP_LOG_INTERVAL_S:
                log.warning(
                    "alert queue full; oldest alerts dropped. The target is slow or down: "
                    "check it, or raise its queue_size",
                    extra={**self._log_extra, "dropped": self._dropped_unlogged},
                )
                self._dropped_unlogged = 0
                self._last_drop_log = now
        self.queue.put_nowait((alert, ticket))

    async def run(self, session: aiohttp.ClientSession) -> None:
        """Deliver queued alerts until cancelled; one failing alert never stops the loop."""
        while True:
            alert, ticket = await self.queue.get()
            event_id = alert.get("event_id")
            try:
                if isinstance(event_id, str) and event_id in self._sent:
                    self.skip_repeat(event_id, "this target got it already")
                elif await self.deliver(session, alert) and isinstance(event_id, str):
                    self._sent[event_id] = None
                    if len(self._sent) > SENT_IDS_KEPT:
                        self._sent.popitem(last=False)
            except Exception as exc:  # a bug or an odd record must not kill the target
                self._failed.inc()
                log.error(
                    "alert delivery crashed; alert skipped",
                    extra={
                        **self._log_extra,
                        "alert_key": alert.get("alert_key"),
                        "error": scrub(repr(exc), self._secrets)[:BODY_LOG_CHARS],
                    },
                )
            finally:
                self.queue.task_done()
                if ticket is not None:
                    ticket.done()

    def skip_repeat(self, event_id: str, why: str) -> None:
        """Count and log an alert not sent because it is a repeat of one handled before
        (read again in this process, or handled before this notifier started)."""
        self._duplicate.inc()
        log.info(f"alert not sent again: {why}", extra={**self._log_extra, "event_id": event_id})

    async def deliver(self, session: aiohttp.ClientSession, alert: dict[str, Any]) -> bool:
        """POST ``alert`` to the target, retrying what may pass later. True once delivered."""
        if self.retry.max_attempts < 1:
            return False  # nothing to try
        body = orjson.dumps(build_payload(self.target, alert))
        headers = {"Content-Type": "application/json"}
        event_id = alert.get("event_id")
        if self.target.format == "json" and isinstance(event_id, str):
            # The same key on every attempt and on a successor's re-send after a crash (the
            # at-least-once window): a receiver that keeps keys drops the repeat.
            headers[IDEMPOTENCY_HEADER] = event_id
        extra = {**self._log_extra, "alert_key": alert.get("alert_key")}
        started = time.monotonic()

        def failure(failed: DeliveryFailed) -> dict[str, Any]:
            result = failed.result
            return {
                **extra,
                "status": result.status,
                "error": result.error,
                "attempt": failed.attempt,
            }

        def before_retry(retry_state: RetryCallState) -> None:
            outcome = retry_state.outcome
            failed = outcome.exception() if outcome is not None else None
            assert isinstance(failed, DeliveryFailed)  # the only failure the policy retries
            self._retried.inc()
            log.warning(
                "alert delivery failed; retrying",
                extra={**failure(failed), "retry_in_s": round(retry_state.upcoming_sleep, 3)},
            )

        try:
            async for attempt in self.retry.retrying(self.rng, before_retry):
                with attempt:
                    result = await self._post(session, body, headers)
                    if not result.delivered:
                        raise DeliveryFailed(result, attempt.retry_state.attempt_number)
                    attempts = attempt.retry_state.attempt_number
        except DeliveryFailed as failed:
            self._failed.inc()
            self._failed_seconds.observe(time.monotonic() - started)
            if not failed.retryable:
                log.error(
                    "alert rejected by the target; not retried. Check the target's URL, "
                    "format and key",
                    extra=failure(failed),
                )
            else:
                log.error(
                    "alert not delivered; gave up after retrying. Check that the target is up",
                    extra=failure(failed),
                )
            return False
        self._delivered.inc()
        self._delivered_seconds.observe(time.monotonic() - started)
        log.debug("alert delivered", extra={**extra, "attempts": attempts})
        return True

    async def _post(
        self, session: aiohttp.ClientSession, body: bytes, headers: dict[str, str]
    ) -> _Attempt:
        try:
            async with session.post(
                self.target.url.get_secret_value(),
                data=body,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=self.target.timeout_s),
                allow_redirects=False,
            ) as response:
                if 200 <= response.status < 300:
                    return _Attempt(True, False, response.status, "")
                text = (await response.content.read(BODY_LOG_CHARS)).decode(errors="replace")
                return _Attempt(
                    False,
                    is_retryable_status(response.status),
                    response.status,
                    scrub(text, self._secrets),
                    _retry_after_seconds(response.headers.get("Retry-After")),
                )
        except TimeoutError:
            return _Attempt(False, True, None, f"no answer within {self.target.timeout_s}s")
        except aiohttp.ClientError as exc:
            error = scrub(f"{type(exc).__name__}: {exc}", self._secrets)
            return _Attempt(False, True, None, error[:BODY_LOG_CHARS])


# -- the agent --------------------------------------------------------------------------


class Notifier:
    """Consumes the alerts topic and fans each alert out to its targets' workers."""

    def __init__(
        self,
        settings: Settings,
        targets: Sequence[AlertTarget],
        *,
        registry: CollectorRegistry | None = None,
        codec: EventCodec | None = None,
        retry: RetryPolicy | None = None,
        start_from: StartFrom = "latest",
        drain_timeout_s: float = 5.0,
        rng: random.Random | None = None,
    ) -> None:
        """``start_from`` applies only when the consumer group has no committed offsets:
        ``latest`` (default) so a first start does not page for the topic's history."""
        check_unique_names(targets)
        self.settings = settings
        self.targets = tuple(targets)
        self.codec = codec or build_codec(settings.schema_registry_url)
        self.metrics = NotifierMetrics(registry)
        self.reader = EventReader(
            self.codec, "notifier", expect="Alert", on_skip=self.metrics.undecodable.inc
        )
        self.retry = retry or RetryPolicy()
        self.start_from = start_from
        self.drain_timeout_s = drain_timeout_s
        self.topic = settings.topic("alerts")
        self.group_id = f"{settings.topic_prefix}-notifier"
        rng = rng or random.Random()
        self.workers = [TargetWorker(t, self.metrics, self.retry, rng) for t in self.targets]
        self.ready = asyncio.Event()  # set once partitions are assigned and positioned
        # Event ids handled before this notifier started (read back from before the
        # committed offsets): their repeats are skipped (``_remember_handled``).
        self.handled: OrderedDict[str, None] = OrderedDict()

    def dispatch(self, alert: dict[str, Any], ticket: Callable[[int], Ticket] | None = None) -> int:
        """Hand ``alert`` to every target that pages it; returns how many did. Targets whose
        filters accept it but that do not page it (``AlertTarget.declines``: historical,
        unpaged, related) are logged with the reason and counted as ``skipped_<reason>``.
        ``ticket(n)`` gives the hand-over's ticket for n targets."""
        accepted = 0
        declined: dict[str, list[str]] = {}
        paging: list[TargetWorker] = []
        for worker in self.workers:
            target = worker.target
            if not target.accepts(alert):
                continue
            reason = target.declines(alert)
            if reason is not None:
                declined.setdefault(reason, []).append(target.name)
                self.metrics.notifications.labels(target.name, f"skipped_{reason}").inc()
                continue
            paging.append(worker)
            accepted += 1
        handed = ticket(len(paging)) if ticket is not None and paging else None
        for worker in paging:
            worker.offer(alert, handed)
        for reason, names in declined.items():
            if reason == "historical":
                why = (
                    "historical: it is about the past (a replay or a backlog); set "
                    "include_historical on a target to page such alerts"
                )
            elif reason == "unpaged":
                why = (
                    "unpaged: the resolve of an alert this target was not paged (neither its "
                    "firing nor its severity update passed the target's filters as news)"
                )
            else:
                why = (
                    "related: it is attached to its incident's page "
                    f"({alert.get('incident_key') or 'no key'}); set include_related to get "
                    "it too"
                )
            log.info(
                f"alert not paged to {', '.join(names)}: {why}",
                extra={
                    "alert_key": alert.get("alert_key"),
                    "status": alert.get("status"),
                    "reason": reason,
                    "targets": names,
                },
            )
        return accepted

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Deliver until ``stop`` is set (then drain the queues) or cancelled (then not).

        Kafka being unreachable is waited out with backoff; the queues and their
        workers keep going meanwhile.
        """
        stop = stop or asyncio.Event()
        async with aiohttp.ClientSession(headers={"User-Agent": "tollgate-notifier"}) as session:
            tasks = [
                asyncio.create_task(worker.run(session), name=f"notifier:{worker.target.name}")
                for worker in self.workers
            ]
            try:
                await retry_while_kafka_down(lambda: self._consume(stop), "notifier", stop)
                await self._drain()
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

    async def _consume(self, stop: asyncio.Event) -> None:
        consumer = clients.consumer(
            self.settings,
            self.topic,
            purpose="notifier",
            group_id=self.group_id,
            auto_offset_reset=self.start_from,  # only for a group with no committed offsets yet
        )
        try:
            await consumer.start()
            offsets = OffsetsInFlight()  # a new consumer re-reads from the committed ones
            started: set[Any] = set()  # partitions whose starting point is settled
            while not stop.is_set():
                fetched = await consumer.getmany(timeout_ms=200)
                assigned = consumer.assignment()
                handled_through: dict[Any, int] = {}  # partitions with committed offsets
                for tp in assigned - started:
                    committed = await consumer.committed(tp)
                    if committed is None:
                        await self._settle_start(consumer, tp, fetched.get(tp))
                    else:
                        handled_through[tp] = committed
                    started.add(tp)
                if handled_through:
                    await self._remember_handled(handled_through)
                if not self.ready.is_set() and assigned:
                    self.ready.set()
                offsets.forget(assigned)
                for tp, messages in fetched.items():
                    for message in messages:
                        self._handle(message, functools.partial(offsets.ticket, tp, message.offset))
                        offsets.handled_through(tp, message.offset)
                commit = offsets.to_commit(assigned)
                if commit:
                    # Only what every paging target is done with (see the module docstring).
                    await consumer.commit(commit)
                    offsets.committed.update(commit)
            # A graceful stop: deliver what is queued, then commit it, so the next notifier
            # does not send it again.
            await self._drain()
            commit = offsets.to_commit(consumer.assignment())
            if commit:
                await consumer.commit(commit)
        finally:
            self.ready.clear()
            await clients.stop_within(consumer)

    @staticmethod
    async def _settle_start(consumer: Any, tp: Any, fetched: list[Any] | None) -> None:
        """Resolve where ``tp`` starts (the reset policy, for a group with no committed
        offset) and commit it: a first notifier starts at the end of the topic (no pages for
        history), and one killed before it committed anything started at the end again,
        so every alert published while it was down was never delivered (a fault probe).
        What this read already fetched is not skipped: its first offset is the start."""
        position = await consumer.position(tp)
        await consumer.commit({tp: fetched[0].offset if fetched else position})

    async def _remember_handled(self, committed: dict[Any, int]) -> None:
        """The event ids of the last ``SENT_IDS_KEPT`` alerts (at most) before each
        partition's ``committed`` offset, read by one consumer assigned all of them: they were
        handled (every paging target done with them), so a repeat of one is not sent again.
        ``handled`` keeps at most ``SENT_IDS_KEPT * 4`` ids in all, the first read dropped
        first: every partition's whole read-back while the alerts topic has at most four
        partitions (it is made with three); past that, fewer a partition. The
        anomaly agent publishes again, under the same ids, what it had published since its
        last checkpoint; with the notifier restarted too, every incident was paged twice (a
        fault probe killing both)."""
        reader = clients.consumer(
            self.settings, purpose="notifier-lookback", group_id=None, auto_offset_reset="earliest"
        )
        decoder = EventReader(self.codec, "notifier look-back", expect="Alert")
        remembered = dict.fromkeys(committed, 0)
        partitions = sorted(tp.partition for tp in committed)
        try:
            await reader.start()
            reader.assign(list(committed))
            beginnings = await reader.beginning_offsets(list(committed))
            left: set[Any] = set()  # partitions with records before their committed offset
            for tp, offset in committed.items():
                start = max(beginnings[tp], offset - SENT_IDS_KEPT)
                if start < offset:
                    reader.seek(tp, start)
                    left.add(tp)
                else:
                    reader.pause(tp)  # nothing handled there to read back
            deadline = time.monotonic() + LOOKBACK_TIMEOUT_S
            while left and time.monotonic() < deadline:
                batch = await reader.getmany(timeout_ms=500)
                for tp, messages in batch.items():
                    for message in messages:
                        if message.offset >= committed[tp]:
                            break
                        record = decoder.record(message)
                        event_id = record.get("event_id") if record is not None else None
                        if isinstance(event_id, str):
                            self.handled[event_id] = None
                            remembered[tp] += 1
                for tp in list(left):
                    if await reader.position(tp) >= committed[tp]:
                        left.discard(tp)
                        reader.pause(tp)  # read up to its committed offset: no further
        except KafkaError as exc:  # a repeat may then be sent again: at least once, as before
            log.warning(
                "notifier could not read back the alerts it had handled; a repeat of one "
                "may be sent again",
                extra={"partitions": partitions, "error": str(exc)},
            )
        finally:
            await clients.stop_within(reader)
        while len(self.handled) > SENT_IDS_KEPT * 4:
            self.handled.popitem(last=False)
        log.info(
            "notifier remembers the alerts it had handled",
            extra={
                "partitions": partitions,
                "alerts": sum(remembered.values()),
                "committed": {tp.partition: offset for tp, offset in committed.items()},
            },
        )

    def _handle(self, message: Any, ticket: Callable[[int], Ticket] | None = None) -> None:
        record = self.reader.record(message)
        if record is None:
            return
        event_id = record.get("event_id")
        if event_id in self.handled:  # a repeat of one handled before
            for worker in self.workers:
                if worker.target.accepts(record):
                    worker.skip_repeat(
                        str(event_id), "a repeat of one handled before this notifier started"
                    )
            return
        self.dispatch(record, ticket)

    async def _drain(self) -> None:
        """Give queued alerts ``drain_timeout_s`` to go out before a graceful stop."""
        waiting = sum(worker.queue.qsize() for worker in self.workers)
        try:
            await asyncio.wait_for(
                asyncio.gather(*(worker.queue.join() for worker in self.workers)),
                self.drain_timeout_s,
            )
        except TimeoutError:
            left = {w.target.name: w.queue.qsize() for w in self.workers if w.queue.qsize()}
            log.warning(
                "notifier stopped with alerts undelivered; their offsets are not committed, "
                "the next notifier sends them",
                extra={"undelivered": left, "drain_timeout_s": self.drain_timeout_s},
            )
        else:
            if waiting:
                log.info("notifier drained its queues", extra={"delivered_on_stop": waiting})


async def run_notifier(
    settings: Settings,
    targets: Sequence[AlertTarget],
    *,
    stop: asyncio.Event | None = None,
    registry: CollectorRegistry | None = None,
) -> None:
    """``tollgate notify``: deliver alerts until SIGINT/SIGTERM (or ``stop``), then drain."""
    if not targets:
        raise AlertTargetError(
            "no alert targets configured; add at least one {name, url, format} to alert_targets"
        )
    notifier = Notifier(settings, targets, registry=registry)
    stop = stop or asyncio.Event()
    handled = stop_on_signals(stop)
    log.info(
        "notifier started",
        extra={
            "topic": notifier.topic,
            "targets": [f"{t.name} ({t.format}, {t.redacted_url})" for t in notifier.targets],
        },
    )
    (registry if registry is not None else REGISTRY).register(
        FamilyCollector(
            lambda: [
                gauge(
                    "tollgate_alert_notifier_ready",
                    "1 once the notifier's partitions of the alerts topic are assigned",
                    1.0 if notifier.ready.is_set() else 0.0,
                )
            ]
        )
    )
    try:
        async with metrics_listener(
            registry if registry is not None else REGISTRY,
            settings.agents_metrics_host,
            settings.notifier_metrics_port,
            name="notifier",
        ):
            await notifier.run(stop)
    finally:
        for sig in handled:
            asyncio.get_running_loop().remove_signal_handler(sig)
