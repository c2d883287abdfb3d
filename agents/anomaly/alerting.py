"""Alert lifecycle: detector verdicts in, ``Alert`` records (``schemas/Alert.avsc``) out.

Owns de-duplication and rate limiting per alert key (``kind|scope``): one
``firing`` event when an incident starts, nothing while it lasts (but one update if it
becomes critical: below), one ``resolved``
event once no anomalous verdict has been seen for ``resolve_after_seconds``, and no
new ``firing`` of the same key for ``cooldown_seconds`` after that.

What on-call reads: the firing record states the metric (with its unit and window),
the expected and observed values, and the money at stake
(``impact_usd_per_hour``: extra spend per hour against expected). The resolved record
speaks of the *same* metric, unit and window as the firing one, says when the signal
went back to normal and how long the incident lasted, and is emitted at event time
``last anomalous + resolve_after_seconds``, so "back to normal" arrives a few minutes
after the incident ends, not ten.

A feature's (or the global) cost incident ends by the rule its detector's alarm ends by
(:func:`agents.anomaly.core.alarm_end`): a silence is no evidence of a cost, so it resolves
on calls judged normal, or after ``resolve_silent_after_seconds`` without a call, saying its
cost was not seen to return to normal. Such an incident whose alarm fires again in the
first calls back is reopened (``incident_reopen_within_seconds``), not paged anew.

An alert that fires as its cooldown ends, its key anomalous all through the cooldown (no
two anomalies, from the incident's last to this firing, more than
``incident_window_seconds`` apart), recurs: the firing record says so
(``details.recurring``, the message "recurring: ... it is not over") and correlation pages
it as the same incident (bursts every 10 minutes for an hour resolved "back to normal"
after the first and paged again, unlinked, when the cooldown was over). A recurring
incident resolves only after ``incident_window_seconds`` without an anomalous verdict (it
was seen to pause that long; quiet meanwhile, so it takes in no other alert): it resolved
after its next burst again, paging a third time when that cooldown was over.

An open incident whose verdict is more severe than it fired (``critical_ratio``,
``critical_share_drop``, ``critical_impact_usd_per_hour``) gets one update, a ``firing``
record with ``details.severity_raised_from``; severity never falls within an incident, and
its resolve carries the highest (a loop that fired at 2x and grew to 40x stayed a warning,
and a target paging only critical alerts never heard of it).

All times are event time (the verdicts' and the ``now`` handed to
:meth:`AlertManager.tick`), never the wall clock, so a replay gives the same alerts. A key
whose verdicts come behind the ticks (history replayed into a live agent: the engine judges
late records' cost at their own event time) is timed by its own clock: its latest anomalous
verdict's time plus the time ticked since it came (``now`` less its lag), when that verdict
came over ``live_lag_seconds`` behind the minute being ticked (nearer, it is on time).
Timed by the ticks, a 40-minute cost spike replayed an hour late closed at every tick, "no
call judged normal for 30 min" while its calls came, reopened at its next call and paged a
user twice.
It does not own detection, correlation into incidents (:mod:`agents.anomaly.incidents`)
or delivery (Kafka, webhooks).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

from agents.anomaly.core import (
    EVIDENCE_KINDS,
    TICK_SECONDS,
    Verdict,
    alarm_end,
    amount,
    duration_text,
    is_user_scope,
    money_per_hour,
    with_lead,
)
from app.alerts_config import SEVERITY_FIRED, SEVERITY_RAISED_FROM, severity_rank
from app.anomaly_config import DetectorSettings
from app.metering.usage import event_time, new_id

ALERT_SCHEMA_VERSION = 2
# Kinds whose measure is a scope's request count over a window: what it held when the
# incident resolved is known from the counts (``CallsBetween``), calls or none.
RATE_KINDS = frozenset({"volume_spike", "volume_drop"})
TICK = timedelta(seconds=TICK_SECONDS)  # the engine ticks each minute at its end
# The calls of a scope counted between two event times (None: the scope is not known).
CallsBetween = Callable[[str, datetime, datetime], int | None]


@dataclass
class Incident:
    """An open (firing) incident of one alert key."""

    kind: str
    scope: str
    first_seen: datetime
    last_seen: datetime
    severity: str
    peak: Verdict  # the anomalous verdict with the most money at stake so far (``_peak_key``)
    latest: Verdict  # the latest verdict of the same metric and window, anomalous or not
    anomalous_verdicts: int = 1
    normal_verdicts: int = 0  # of the same measure since the last anomalous one
    # A recurring incident (see the module docstring): when the first of its chain fired,
    # when the one before resolved, and what its firing says of that (its pages say it too);
    # it resolves after ``incident_window_seconds`` without an anomalous verdict.
    since: datetime | None = None
    closed_at: datetime | None = None
    recurring: str = ""
    # A cost incident kept open, past ``resolve_after_seconds`` without an anomalous
    # verdict, for want of calls judged normal: quiet (incidents take no alerts through it).
    held: bool = False
    fired_severity: str = ""  # what it fired as, once its severity rose

    @property
    def recurs(self) -> bool:
        """Whether it goes on from an incident that resolved (``since`` and ``closed_at``)."""
        return self.since is not None and self.closed_at is not None


@dataclass
class AlertManager:
    """Turns verdicts into firing/resolved Alert records, one incident per key at a time."""

    settings: DetectorSettings = field(default_factory=DetectorSettings)
    firing: dict[str, Incident] = field(default_factory=dict)
    quiet_until: dict[str, datetime] = field(default_factory=dict)  # cooldown per key
    # Anomalies seen during a key's cooldown: (count, latest), reported when it fires again.
    suppressed: dict[str, tuple[int, datetime]] = field(default_factory=dict)
    # Incidents closed by silence (cost not seen back to normal), by key: the closed
    # incident and when it closed; a ``resumes_unseen`` alarm of the key within
    # ``incident_reopen_within_seconds`` reopens it (issue 12).
    closed_silent: dict[str, tuple[Incident, datetime]] = field(default_factory=dict)
    # Every key's last resolve while it can still recur (see the module docstring): when its
    # incident (the first of a recurring chain) fired, when it resolved, its latest anomaly
    # since (or its last anomalous verdict) and the longest gap between its anomalies since.
    closed: dict[str, tuple[datetime, datetime, datetime, timedelta]] = field(default_factory=dict)
    # The latest tick; per key with an anomalous verdict, its newest anomalous verdict's
    # time and how far behind the next tick that came (0 within ``live_lag_seconds``: a
    # record a few minutes late, a spool flushed after an outage, is on time).
    clock: datetime | None = None
    lag: dict[str, tuple[datetime, timedelta]] = field(default_factory=dict)

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.__dict__.setdefault("closed_silent", {})  # a checkpoint from before reopening
        self.__dict__.setdefault("closed", {})  # ... from before recurring alerts
        self.__dict__.setdefault("clock", None)  # ... from before keys' own clocks
        self.__dict__.setdefault("lag", {})

    def _arrived(self, key: str, verdict: Verdict) -> None:
        """An anomalous verdict of ``key`` (quiet is measured from those): if it is the key's
        newest, how far behind the next tick it came. Only ticks move the clock, and a verdict
        is measured against the end of the minute being filled, so a key's clock runs at most
        a tick slow, never fast (measured against the newest verdict or the last tick, it ran
        up to a minute fast and resolved a late key early: a review's case)."""
        ts = verdict.ts
        if not verdict.is_anomaly or self.clock is None:
            return
        entry = self.lag.get(key)
        if entry is not None and ts < entry[0]:
            return  # older than its newest: a scope live and replayed is timed by its live ones
        behind = self.clock + TICK - ts
        late = behind.total_seconds() > self.settings.live_lag_seconds
        self.lag[key] = (ts, behind if late else timedelta(0))

    def _now(self, key: str, now: datetime) -> datetime:
        """``now`` on ``key``'s own clock: less the lag its newest anomalous verdict came with."""
        entry = self.lag.get(key)
        return now if entry is None else now - entry[1]

    def process(self, verdict: Verdict) -> list[dict[str, Any]]:
        """Alerts caused by one verdict: a ``firing`` record when a new incident opens."""
        key = f"{verdict.kind}|{verdict.scope}"
        self._arrived(key, verdict)
        incident = self.firing.get(key)
        if incident is not None:
            if _same_measure(verdict, incident.peak):
                incident.latest = verdict
                if not verdict.is_anomaly:
                    incident.normal_verdicts += 1
            if not verdict.is_anomaly:
                return []
            incident.normal_verdicts = 0
            incident.held = False
            incident.last_seen = max(incident.last_seen, verdict.ts)
            incident.anomalous_verdicts += 1
            if _same_measure(verdict, incident.peak) and _peak_key(verdict) > _peak_key(
                incident.peak
            ):
                incident.peak = verdict
            return self._raised(key, incident, verdict)
        if not verdict.is_anomaly:
            return []
        quiet_until = self.quiet_until.get(key)
        if quiet_until is not None and verdict.ts < quiet_until:
            count, _ = self.suppressed.get(key, (0, verdict.ts))
            self.suppressed[key] = (count + 1, verdict.ts)
            if key in self.closed:
                since, resolved, last, gap = self.closed[key]
                self.closed[key] = (since, resolved, verdict.ts, max(gap, verdict.ts - last))
            return []
        incident = Incident(
            kind=verdict.kind,
            scope=verdict.scope,
            first_seen=verdict.ts,
            last_seen=verdict.ts,
            severity=self.severity(verdict),
            peak=verdict,
            latest=verdict,
        )
        self.firing[key] = incident
        suppressed, _ = self.suppressed.pop(key, (0, verdict.ts))
        last_close = self.closed.pop(key, None)
        closed = self.closed_silent.pop(key, None)
        reopen = timedelta(seconds=self.settings.incident_reopen_within_seconds)
        window = timedelta(seconds=self.settings.incident_window_seconds)
        if suppressed and last_close is not None:
            since, resolved, last, gap = last_close
            gap = max(gap, verdict.ts - last)
            if gap <= window:
                # Anomalous all through its cooldown: the incident it resolved from goes on.
                incident.since, incident.closed_at = since, resolved
                incident.recurring = (
                    f"{suppressed} anomalous verdicts during the cooldown after the incident "
                    f"that first fired at {since:%H:%M:%S} UTC resolved at "
                    f"{resolved:%H:%M:%S} UTC, never more than {duration_text(gap)} apart: it is "
                    f"not over"
                )
        record = self._record(key, incident, verdict, "firing", verdict.ts, suppressed)
        if closed is not None and verdict.resumes_unseen and verdict.ts - closed[1] <= reopen:
            before, closed_at = closed
            # The same incident, still drifted after the silence: say so, with its money
            # (the rate expected right after a silence is near 0, so the verdict's own money
            # says little; the closed incident's peak is what it costs when calls run).
            was = before.peak.impact_usd_per_hour
            money = f"; at its peak before {money_per_hour(was)}" if was is not None else ""
            ratio = f" ({verdict.ratio:.1f}x)" if verdict.ratio is not None else ""
            record["message"] = (
                f"reopened: {verdict.metric} for {verdict.scope}: its calls back after a "
                f"silence are still {_value_text(verdict)}{ratio}, "
                f"{duration_text(verdict.ts - before.last_seen)} after its last anomalous call "
                f"before it; the incident that fired at "
                f"{before.first_seen:%H:%M:%S} UTC and closed at {closed_at:%H:%M:%S} UTC for "
                f"want of calls is not over{money}"
            )
            record["details"]["reopened"] = "true"
            record["details"]["closed_at"] = event_time(closed_at).isoformat()
            if was is not None:
                record["details"]["peak_impact_usd_per_hour_before"] = f"{was:.4g}"
        return [record]

    def _raised(self, key: str, incident: Incident, verdict: Verdict) -> list[dict[str, Any]]:
        """An open incident whose verdict is more severe than it fired: one update, a
        ``firing`` record that says so (``details.severity_raised_from``). Severity only
        rises, so at most one per incident. A loop that fired at 2x and grew to 40x stayed a
        warning to its end, and a target paging only critical alerts never heard of it."""
        level = self.severity(verdict)
        if severity_rank(level) <= severity_rank(incident.severity):
            return []
        before, incident.severity = incident.severity, level
        incident.fired_severity = incident.fired_severity or before
        # (a verdict out of order is not an update before the firing it updates)
        record = self._record(
            key, incident, verdict, "firing", max(verdict.ts, incident.first_seen)
        )
        record["message"] = with_lead(
            f"now {level} (fired as a {before} at {incident.first_seen:%H:%M:%S} UTC)",
            record["message"],
        )
        record["details"][SEVERITY_RAISED_FROM] = before
        return [record]

    def refreshed(self, alert: dict[str, Any]) -> dict[str, Any]:
        """A held ``firing`` record as of now: its key's latest anomalous verdict of the same
        measure (values, message, money), the same event id and time. A page goes out after
        the incident's hold; a 3,000-a-minute burst was paged with the figures of its first
        26 calls, "$2.56/hour" for about $894/hour (probe N). Others as they are."""
        incident = self.firing.get(alert["alert_key"])
        if alert["status"] != "firing" or incident is None:
            return alert
        latest = incident.latest
        now = latest if latest.is_anomaly and _same_measure(latest, incident.peak) else None
        if now is None or now.ts == alert["ts"]:  # nothing newer since it fired
            return alert
        incident.severity = max(incident.severity, self.severity(now), key=severity_rank)
        record = self._record(alert["alert_key"], incident, now, "firing", alert["ts"])
        details = {**alert["details"], **record["details"]}
        return {**alert, **record, "event_id": alert["event_id"], "details": details}

    def quiet(self, key: str) -> bool:
        """Whether ``key``'s open incident is only kept open for want of calls judged normal
        (nothing anomalous for ``resolve_after_seconds``): a silent scope's cost incident."""
        incident = self.firing.get(key)
        return incident is not None and incident.held

    def tick(
        self, now: datetime, calls_between: CallsBetween | None = None
    ) -> list[dict[str, Any]]:
        """``resolved`` records of incidents quiet for ``resolve_after_seconds`` at ``now``.

        ``calls_between`` (the engine's request counts): a request-rate incident's resolve
        quotes its rate when it resolved, over its window or, if that is longer, the quiet
        stretch before (probe W: a user's loop resolved "back to normal" quoting "latest 6.0
        vs 0.1 requests/min expected", the loop's last call judged at the alarm's end)."""
        s = self.settings
        resolve_after = timedelta(seconds=s.resolve_after_seconds)
        silent_after = timedelta(seconds=max(s.resolve_silent_after_seconds, 0))
        cooldown = timedelta(seconds=s.cooldown_seconds)
        if self.clock is None or now > self.clock:
            self.clock = now
        alerts = []
        for key, incident in list(self.firing.items()):
            # The cost detector's alarm ends by the same rule (``alarm_end``): no calls is
            # no evidence the cost is back to normal (``resolve_min_normal_calls``), so a
            # feature's cost incident resolves once calls show it, or after long silence,
            # saying so.
            quiet = (self._now(key, now) - incident.last_seen).total_seconds()
            end = alarm_end(s, incident.kind, incident.scope, quiet, incident.normal_verdicts)
            if end == "holds":
                if quiet >= s.resolve_after_seconds:  # kept open for want of normal calls
                    incident.held = True
                continue
            pause = resolve_after
            if incident.recurs:  # seen to come back after a pause: wait out a pause
                pause = max(pause, timedelta(seconds=s.incident_window_seconds))
                if end == "normal" and quiet < pause.total_seconds():
                    incident.held = True  # quiet meanwhile: it takes in no other alert
                    continue
            resolved_at = incident.last_seen + pause
            silent = end == "silence"
            if silent:
                resolved_at = incident.last_seen + silent_after
                self.closed_silent[key] = (incident, resolved_at)
            elif incident.kind in EVIDENCE_KINDS and not is_user_scope(incident.scope):
                resolved_at = max(resolved_at, incident.latest.ts)
            del self.firing[key]
            self.quiet_until[key] = resolved_at + cooldown
            since = incident.since or incident.first_seen
            self.closed[key] = (since, resolved_at, incident.last_seen, timedelta(0))
            shown, span = incident.latest, 0
            if calls_between is not None and incident.kind in RATE_KINDS:
                shown, span = self._rate_when_resolved(incident, resolved_at, calls_between)
            alerts.append(
                self._record(
                    key, incident, shown, "resolved", resolved_at, silent=silent, span=span
                )
            )
        reopen = timedelta(seconds=s.incident_reopen_within_seconds)
        for key, (_, closed_at) in list(self.closed_silent.items()):
            if self._now(key, now) - closed_at > reopen:
                del self.closed_silent[key]
        for key, until in list(self.quiet_until.items()):
            if until <= self._now(key, now):
                del self.quiet_until[key]
        for key, (_, latest) in list(self.suppressed.items()):
            if self._now(key, now) - latest >= cooldown and key not in self.quiet_until:
                del self.suppressed[key]
        window = timedelta(seconds=s.incident_window_seconds)
        for key, (_, _, last, _) in list(self.closed.items()):
            # quiet for longer than a recurrence may be: it can no longer recur
            if self._now(key, now) - last > window:
                del self.closed[key]
        kept = (self.firing, self.quiet_until, self.suppressed, self.closed, self.closed_silent)
        for key in [k for k in self.lag if not any(k in d for d in kept)]:
            del self.lag[key]  # nothing of it left to time
        return alerts

    def _rate_when_resolved(
        self, incident: Incident, at: datetime, calls_between: CallsBetween
    ) -> tuple[Verdict, int]:
        """The incident's request rate at ``at`` (a normal verdict of its measure) and the
        seconds it is counted over: its window, or the ``resolve_after_seconds`` before
        ``at`` if shorter (a longer window still holds the incident's calls). The expected
        rate and the price of a call are the latest verdict's of that measure."""
        peak = incident.peak
        base = incident.latest if _same_measure(incident.latest, peak) else peak
        window = peak.window_seconds or 0
        span = min(window, self.settings.resolve_after_seconds) or window
        calls = calls_between(incident.scope, at - timedelta(seconds=span), at) if span else None
        if calls is None:
            return incident.latest, 0
        observed = calls * 60.0 / span
        impact = None
        excess = (base.observed or 0.0) - (base.expected or 0.0)
        if base.impact_usd_per_hour is not None and excess != 0 and base.expected is not None:
            # money = excess calls a minute x 60 x the price of a call (the detector's rule)
            impact = base.impact_usd_per_hour / excess * (observed - base.expected)
        now = replace(
            base,
            ts=at,
            score=0.0,
            is_anomaly=False,
            observed=observed,
            note="",
            impact_usd_per_hour=impact,
        )
        return now, span

    def severity(self, verdict: Verdict) -> str:
        s = self.settings
        impact = verdict.impact_usd_per_hour
        if impact is not None and impact >= s.critical_impact_usd_per_hour:
            return "critical"
        if verdict.kind == "tier_mix":
            drop = (verdict.expected or 0.0) - (verdict.observed or 0.0)
            return "critical" if drop >= s.critical_share_drop else "warning"
        ratio = verdict.ratio
        if ratio is None:
            return "warning"
        if verdict.kind == "volume_drop":
            return "critical" if ratio <= 1 / s.critical_ratio else "warning"
        return "critical" if ratio >= s.critical_ratio else "warning"

    def _record(
        self,
        key: str,
        incident: Incident,
        verdict: Verdict,
        status: str,
        ts: datetime,
        suppressed: int = 0,
        silent: bool = False,
        span: int = 0,
    ) -> dict[str, Any]:
        peak = incident.peak
        shown = verdict  # firing: the verdict it fired on (or, refreshed, the latest)
        if status == "firing":
            message = shown.explanation
            if incident.recurring:
                message = with_lead("recurring", f"{message}; {incident.recurring}")
            impact = shown.impact_usd_per_hour
        else:
            # The same metric, unit and window as the firing record; the latest value of it.
            if span:  # a request rate, counted when it resolved
                latest = f"{_value_text(verdict)} in the {duration_text(span, exact=True)} before {ts:%H:%M:%S} UTC"
            elif verdict.is_anomaly or not _same_measure(verdict, peak):
                latest = "nothing anomalous since"  # no normal measurement came after it
            else:
                latest = f"latest {_value_text(verdict)}"
            lasted = incident.last_seen - (incident.since or incident.first_seen)
            chain = (  # a recurring incident: since the first of its chain
                f" on and off since it first fired at {incident.since:%H:%M:%S} UTC"
                if incident.since is not None
                else ""
            )
            # and the money it cost at its peak (probe N: resolves said no dollar figure)
            money = (
                f"; at its peak {money_per_hour(peak.impact_usd_per_hour)}"
                if peak.impact_usd_per_hour is not None
                else ""
            )
            if silent:
                message = (
                    f"resolved: {incident.kind.replace('_', ' ')} for {incident.scope}: no "
                    f"call judged normal since {incident.last_seen:%H:%M:%S} UTC "
                    f"({duration_text(ts - incident.last_seen)} with too few calls to tell; "
                    f"its cost was not seen to return to normal), "
                    f"closed after {duration_text(lasted)} anomalous{chain} ({peak.metric}: {latest}; "
                    f"peak {_value_text(peak)}{money})"
                )
            else:
                came_back = (
                    f" (nothing anomalous for {duration_text(ts - incident.last_seen)}: it had come "
                    f"back after the resolve at {incident.closed_at:%H:%M:%S} UTC)"
                    if incident.recurs
                    else ""
                )
                message = (
                    f"resolved: {incident.kind.replace('_', ' ')} for {incident.scope} is "
                    f"back to normal since {incident.last_seen:%H:%M:%S} UTC{came_back}, after "
                    f"{duration_text(lasted)} anomalous{chain} ({peak.metric}: {latest}; peak "
                    f"{_value_text(peak)}{money})"
                )
            normal = not verdict.is_anomaly and _same_measure(verdict, peak)
            impact = verdict.impact_usd_per_hour if normal else None
        details = {
            "metric": peak.metric,
            "anomalous_verdicts": str(incident.anomalous_verdicts),
            "peak_observed": _number(peak.observed),
            "peak_score": f"{peak.score:.3g}",
        }
        if peak.impact_usd_per_hour is not None:
            details["peak_impact_usd_per_hour"] = f"{peak.impact_usd_per_hour:.4g}"
        if shown.ratio is not None:
            details["ratio"] = f"{shown.ratio:.3g}"
        if shown.note:
            details["note"] = shown.note
        if suppressed:
            details["anomalies_during_cooldown"] = str(suppressed)
        if incident.recurs:
            details["recurring"] = "true"
            details["first_fired_at"] = event_time(incident.since).isoformat()
            if status == "firing":  # the resolve it recurs after
                details["closed_at"] = event_time(incident.closed_at).isoformat()
        if status == "resolved":
            details["resolved_by"] = "silence" if silent else "normal"
            if incident.fired_severity:  # it rose: what the firing said (Alertmanager's label)
                details[SEVERITY_FIRED] = incident.fired_severity
            if span:
                details["observed_window_seconds"] = str(span)
        same = _same_measure(shown, peak)
        return {
            "event_id": new_id(),
            "ts": event_time(ts),
            "schema_version": ALERT_SCHEMA_VERSION,
            "alert_key": key,
            "kind": incident.kind,
            "scope": incident.scope,
            "severity": incident.severity,
            "status": status,
            "score": float(shown.score),
            "expected": shown.expected if same else None,
            "observed": shown.observed if same else None,
            "unit": peak.unit,
            "window_seconds": peak.window_seconds,
            "first_seen": event_time(incident.first_seen),
            "last_seen": event_time(incident.last_seen),
            "message": message,
            "details": details,
            "historical": False,
            "impact_usd_per_hour": impact,
            "incident_key": "",
            "incident_role": "primary",
        }


def _peak_key(verdict: Verdict) -> tuple[float, float]:
    """What makes a verdict an incident's peak: the money at stake (extra dollars an hour,
    either way), then how anomalous it is. By score alone, a cost drift that paged at 1.5x
    ($0.21/hour) resolved 3 hours later at 5x still saying "at its peak $0.21/hour" (its
    evidence was strongest early), and a 3,000-a-minute burst paged at 1,001 a minute
    resolved with a "peak" of 346 (the scores had saturated): probe H."""
    money = verdict.impact_usd_per_hour
    return (abs(money) if money is not None else -1.0, verdict.score)


def _same_measure(a: Verdict, b: Verdict) -> bool:
    return a.unit == b.unit and a.window_seconds == b.window_seconds


def _number(value: float | None) -> str:
    return "" if value is None else f"{value:.6g}"


def _value_text(verdict: Verdict) -> str:
    if verdict.observed is None:
        return "n/a"
    if verdict.unit == "share":
        return f"{verdict.observed:.0%} vs {verdict.expected or 0:.0%} expected"
    unit = "" if verdict.unit.startswith("usd") else f" {verdict.unit}"
    return (
        f"{amount(verdict.observed, verdict.unit)} vs "
        f"{amount(verdict.expected or 0.0, verdict.unit)}{unit} expected"
    )


__all__ = ["ALERT_SCHEMA_VERSION", "AlertManager", "Incident", "money_per_hour"]
