"""The anomaly engine: Usage records in (event-time order), Alert records out.

Owns routing each record to its scopes (``user:<id>``, ``feature:<name>``,
``global``) and their detectors, the per-minute buckets of the volume series, the
checks of the last 60 s as records arrive (a spike is reported within seconds, not
when its minute ends), bounded memory (least recently active users evicted, idle
ones dropped), and the checkpoint (:meth:`AnomalyEngine.snapshot` /
:meth:`AnomalyEngine.restore`) that lets a restarted engine keep its baselines.

Time is event time only. A minute closes once event time is
``allowed_lateness_seconds`` past its end; every known scope then gets a point,
zero if it was silent (that is how a global drop is seen). A record later than
that still counts for cost and tier mix but not in the closed minute's volume, so
a backlog flushed after an outage is not mistaken for a spike.

Routing rules that keep one incident one alert: a user's and a feature's volume
forecast is scaled by how the rest of the traffic compares with its forecast (a
surge of everyone is the global scope's alert); while a feature has a firing cost
incident, its requests do not make its users' cost or spend incidents.

Pure logic, no I/O. The Kafka agent decodes ``Usage`` events, calls
:meth:`AnomalyEngine.observe` for each and :meth:`AnomalyEngine.advance` from a
timer, publishes what they return, and stores :meth:`AnomalyEngine.snapshot` with
the consumer offsets it covers (so a restart neither re-counts nor skips events).

============  ================  ======  ============  ========
scope         cost/request      volume  volume drops  tier mix
============  ================  ======  ============  ========
``user:``     yes (feature      yes     no (default)  no
              baseline until
              its own is warm)
``feature:``  yes               yes     no (default)  yes
``global``    no                yes     yes           yes
============  ================  ======  ============  ========
"""

from __future__ import annotations

import logging
import pickle
import struct
from collections import OrderedDict, deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from agents.anomaly.alerting import AlertManager
from agents.anomaly.detectors import (
    CostDetector,
    DetectorSettings,
    Point,
    TierMixDetector,
    Verdict,
    VolumeDetector,
)
from app.pricing import PriceCatalog

log = logging.getLogger(__name__)

SNAPSHOT_VERSION = 1
_SNAPSHOT_MAGIC = b"tollgate-anomaly-engine\n"
MAX_FEATURE_SCOPES = 1000
NANOS_PER_USD = 1e9


class SnapshotError(ValueError):
    """A checkpoint that cannot be restored; the message says why and what to do."""


@dataclass(slots=True)
class _Bucket:
    """One scope's traffic in one calendar minute (what the volume baselines learn)."""

    requests: int = 0
    spend_nanos: int = 0
    top_nanos: list[int] = field(default_factory=list)  # the largest costs, ascending

    def add(self, cost_nanos: int, keep: int) -> None:
        self.requests += 1
        self.spend_nanos += cost_nanos
        top = self.top_nanos
        if len(top) < keep:
            top.append(cost_nanos)
            top.sort()
        elif top and cost_nanos > top[0]:
            top[0] = cost_nanos
            top.sort()

    def point(self, ts: datetime, context: float) -> Point:
        """This bucket as a spend point."""
        return Point(
            ts,
            self.spend_nanos / NANOS_PER_USD,
            requests=self.requests,
            trimmed=sum(self.top_nanos) / NANOS_PER_USD,
            context=context,
        )


class _Window:
    """One scope's traffic over the last minute, sliding in steps of ``STEP_SECONDS``.

    Spikes are checked on it as records arrive, so an incident that starts late in a
    calendar minute is seen within seconds, not at the end of the next minute.
    """

    STEP_SECONDS = 5
    STEPS = 12  # the window covers the current step and the 11 before: 55 to 60 s

    __slots__ = ("bucket", "steps")

    def __init__(self) -> None:
        self.steps: deque[tuple[int, _Bucket]] = deque()
        self.bucket = _Bucket()  # the sum of the steps

    def add(self, epoch: float, cost_nanos: int, keep: int) -> None:
        index = int(epoch // self.STEP_SECONDS)
        steps = self.steps
        if not steps or steps[-1][0] < index:
            steps.append((index, _Bucket()))
        steps[-1][1].add(cost_nanos, keep)  # a slightly late record counts in the newest step
        self.bucket.add(cost_nanos, keep)
        if steps[0][0] <= index - self.STEPS:
            while steps[0][0] <= index - self.STEPS:
                _, old = steps.popleft()
                self.bucket.requests -= old.requests
                self.bucket.spend_nanos -= old.spend_nanos
            merged = sorted(cost for _, step in steps for cost in step.top_nanos)
            self.bucket.top_nanos = merged[-keep:] if keep else []


@dataclass
class ScopeState:
    """The detectors of one scope, and its traffic over the last minute."""

    scope: str
    requests: VolumeDetector
    spend: VolumeDetector
    cost: CostDetector | None = None
    mix: TierMixDetector | None = None
    last_active: float = 0.0
    window: _Window = field(default_factory=_Window)
    spike_checked_until: float = 0.0  # a spike was reported: no new check before this
    features: dict[str, float] = field(default_factory=dict)  # a user's features, last seen


@dataclass
class EngineStats:
    records: int = 0
    late_records: int = 0  # arrived after their minute closed: not in the volume series
    skipped_cost: int = 0  # price unknown or cache hit: no cost judgement
    evicted_users: int = 0
    skipped_minutes: int = 0  # silent minutes not fed after an event-time jump
    alerts: int = 0


def _scope_kind(scope: str) -> str:
    return scope.split(":", 1)[0] if ":" in scope else scope


def _as_utc(ts: Any) -> datetime:
    if isinstance(ts, datetime):
        return ts if ts.tzinfo is not None else ts.replace(tzinfo=UTC)
    if isinstance(ts, int | float):
        return datetime.fromtimestamp(ts / 1000, UTC)  # Avro timestamp-millis
    raise TypeError(f"Usage.ts must be a datetime or epoch milliseconds, got {ts!r}")


class AnomalyEngine:
    """Anomaly detection over a stream of Usage records, fed in event-time order.

    ``prices`` is only used to find the tier of records that carry none.
    """

    def __init__(
        self, settings: DetectorSettings | None = None, prices: PriceCatalog | None = None
    ) -> None:
        self.settings = settings or DetectorSettings()
        self.prices = prices
        self.alerts = AlertManager(self.settings)
        self.users: OrderedDict[str, ScopeState] = OrderedDict()  # least recently active first
        self.features: OrderedDict[str, ScopeState] = OrderedDict()
        self.global_scope = self._new_scope("global")
        self.stats = EngineStats()
        self.watermark: datetime | None = None  # newest event time seen (or advanced to)
        self._next_minute: int | None = None  # the oldest minute still open
        self._open: dict[int, dict[str, _Bucket]] = {}

    # -- scopes ---------------------------------------------------------------------------
    def _new_scope(self, scope: str) -> ScopeState:
        s = self.settings
        kind = _scope_kind(scope)
        drops = kind in s.volume_drop_scope_kinds
        p_value = s.volume_p_value_user if kind == "user" else s.volume_p_value
        return ScopeState(
            scope=scope,
            requests=VolumeDetector(scope, s, "requests", detect_drops=drops, p_value=p_value),
            # Less spend than usual is no alarm: no drops on spend.
            spend=VolumeDetector(scope, s, "spend", p_value=p_value),
            cost=CostDetector(scope, s) if kind in ("user", "feature") else None,
            mix=TierMixDetector(scope, s) if kind in ("feature", "global") else None,
        )

    def _scope(self, table: OrderedDict[str, ScopeState], scope: str, limit: int) -> ScopeState:
        state = table.get(scope)
        if state is None:
            state = table[scope] = self._new_scope(scope)
            while len(table) > limit:
                evicted, _ = table.popitem(last=False)
                self.stats.evicted_users += evicted.startswith("user:")
        else:
            table.move_to_end(scope)
        return state

    def scopes(self) -> list[ScopeState]:
        return [*self.users.values(), *self.features.values(), self.global_scope]

    # -- the stream -----------------------------------------------------------------------
    def observe(self, record: Mapping[str, Any]) -> list[dict[str, Any]]:
        """Alerts caused by one Usage record (closing any minutes its event time ends)."""
        ts = _as_utc(record["ts"])
        alerts = self._close_until(ts)
        if self.watermark is None or ts > self.watermark:
            self.watermark = ts
        self.stats.records += 1
        epoch = ts.timestamp()
        minute = int(epoch // 60)
        if self._next_minute is None:
            self._next_minute = minute
        # Later than the allowed lateness, its minute is closed. Counting it in the current
        # one would turn a backlog (a spool flushed after an outage) into a false spike, so
        # it only counts for cost and tier mix.
        too_late = minute < self._next_minute
        self.stats.late_records += too_late
        buckets = self._open.setdefault(max(minute, self._next_minute), {})

        user = self._scope(self.users, f"user:{record['user_id']}", self.settings.max_user_scopes)
        feature_name = record.get("feature")
        feature = (
            self._scope(self.features, f"feature:{feature_name}", MAX_FEATURE_SCOPES)
            if feature_name
            else None
        )
        states = (user, feature, self.global_scope) if feature else (user, self.global_scope)
        cost_nanos = int(record.get("cost_usd_nanos") or 0)
        keep = self.settings.volume_spend_trim_requests
        if feature_name:
            user.features[feature_name] = max(epoch, user.features.get(feature_name, epoch))
        for state in states:
            state.last_active = max(state.last_active, epoch)
            if too_late:
                continue
            bucket = buckets.get(state.scope)
            if bucket is None:
                bucket = buckets[state.scope] = _Bucket()
            bucket.add(cost_nanos, keep)
            state.window.add(epoch, cost_nanos, keep)
            if epoch >= state.spike_checked_until:
                alerts += self._peek(state, ts)

        model = str(record.get("model_served") or "")
        if record.get("price_unknown") or record.get("cache_hit"):
            self.stats.skipped_cost += 1
        else:
            point = Point(ts, float(cost_nanos), key=model)
            feature_cost_incident = False
            if feature is not None and feature.cost is not None:
                alerts += self.alerts.process(feature.cost.observe(point))
                feature_cost_incident = self._cost_incident(feature.scope)
            if user.cost is not None:
                fallback = feature.cost if feature is not None else None
                # During a feature-wide cost incident its requests do not make a user's
                # own incident: the feature's alert already says it, once.
                verdict = user.cost.observe(point, fallback, corroborates=not feature_cost_incident)
                if not (verdict.is_anomaly and self._explained_by_feature_cost(user, epoch)):
                    alerts += self.alerts.process(verdict)
            tier = record.get("tier") or (self.prices.tier(model) if self.prices else None)
            if tier is not None:
                mix_point = Point(ts, 1.0 if tier == "economy" else 0.0)
                for mix_scope in (feature, self.global_scope):
                    if mix_scope is not None and mix_scope.mix is not None:
                        alerts += self.alerts.process(mix_scope.mix.observe(mix_point))
        self.stats.alerts += len(alerts)
        return alerts

    def advance(self, now: datetime) -> list[dict[str, Any]]:
        """Declare that no event older than ``now - allowed_lateness_seconds`` will come.

        Closes the minutes that ended by then (silent ones count as zero, which is how a
        global drop is seen) and resolves quiet incidents. Call it from a timer with the
        wall-clock time while the consumer is caught up (no lag); while it reads a
        backlog, do not: the records' own event times close the minutes.
        """
        now = _as_utc(now)
        alerts = self._close_until(now)
        if self.watermark is None or now > self.watermark:
            self.watermark = now
        alerts += self.alerts.tick(now)
        self.stats.alerts += len(alerts)
        return alerts

    def flush(self) -> list[dict[str, Any]]:
        """Close every open minute (end of a finite stream, e.g. a replay)."""
        if not self._open:
            return []
        last_end = (max(self._open) + 1) * 60
        end = datetime.fromtimestamp(last_end + self.settings.allowed_lateness_seconds, UTC)
        return self.advance(end)

    # -- minutes --------------------------------------------------------------------------
    def _cost_incident(self, scope: str) -> bool:
        return f"cost_per_request|{scope}" in self.alerts.firing

    def _explained_by_feature_cost(self, state: ScopeState, epoch: float) -> bool:
        """Whether the user used a feature with a firing cost incident within the
        corroboration window: then its cost or spend anomaly is that incident, already
        alerted."""
        recent = epoch - self.settings.cost_corroboration_seconds
        return any(
            seen >= recent and self._cost_incident(f"feature:{feature}")
            for feature, seen in state.features.items()
        )

    def _context(self, state: ScopeState, count: int, global_count: int) -> float:
        """How the rest of the traffic (global minus this scope) compares with its forecast."""
        if state is self.global_scope:
            return 1.0
        rest_expected = self.global_scope.requests.expected() - state.requests.expected()
        if rest_expected < self.settings.volume_context_min_requests:
            return 1.0
        return min(4.0, max(0.25, (global_count - count) / rest_expected))

    def _peek(self, state: ScopeState, ts: datetime) -> list[dict[str, Any]]:
        """Report a spike of the last minute (sliding) as soon as it is one."""
        window = state.window.bucket
        context = self._context(state, window.requests, self.global_scope.window.bucket.requests)
        candidates: list[Verdict | None] = []
        if window.requests >= state.requests.spike_floor(context):
            candidates.append(
                state.requests.peek(Point(ts, float(window.requests), context=context))
            )
        if window.requests > self.settings.volume_spend_trim_requests and (
            (window.spend_nanos - sum(window.top_nanos)) / NANOS_PER_USD
            >= state.spend.spike_floor(context)
        ):
            candidates.append(state.spend.peek(window.point(ts, context)))
        alerts: list[dict[str, Any]] = []
        for verdict in candidates:
            if verdict is None:
                continue
            state.spike_checked_until = ts.timestamp() + _Window.STEP_SECONDS
            alerts += self._process_volume(state, verdict)
        return alerts

    def _process_volume(self, state: ScopeState, verdict: Verdict) -> list[dict[str, Any]]:
        if (
            verdict.is_anomaly
            and verdict.unit == "usd/min"
            and state.features
            and self._explained_by_feature_cost(state, verdict.ts.timestamp())
        ):
            return []
        return self.alerts.process(verdict)

    def _close_until(self, now: datetime) -> list[dict[str, Any]]:
        if self._next_minute is None:
            return []
        s = self.settings
        closable = int((now.timestamp() - s.allowed_lateness_seconds) // 60)  # minutes < this
        if closable - self._next_minute > s.max_gap_minutes:
            skipped = closable - self._next_minute - 1
            log.warning(
                "event time jumped; silent minutes are not fed to the volume baselines",
                extra={"skipped_minutes": skipped, "to": now.isoformat()},
            )
            self.stats.skipped_minutes += skipped
            for minute in [m for m in self._open if m < closable - 1]:
                del self._open[minute]
            self._next_minute = closable - 1
        alerts: list[dict[str, Any]] = []
        while self._next_minute < closable:
            alerts += self._close_minute(self._next_minute)
            self._next_minute += 1
        return alerts

    def _close_minute(self, minute: int) -> list[dict[str, Any]]:
        s = self.settings
        end = datetime.fromtimestamp((minute + 1) * 60, UTC)
        buckets = self._open.pop(minute, {})
        empty = _Bucket()
        alerts: list[dict[str, Any]] = []
        global_count = buckets.get("global", empty).requests
        # Contexts first: they use the forecasts for this minute, which observing replaces.
        contexts = [
            (state, bucket, self._context(state, bucket.requests, global_count))
            for state in self.scopes()
            for bucket in (buckets.get(state.scope, empty),)
        ]
        for state, bucket, context in contexts:
            verdicts: tuple[Verdict, ...] = (
                state.requests.observe(Point(end, float(bucket.requests), context=context)),
                state.spend.observe(bucket.point(end, context)),
            )
            for verdict in verdicts:
                alerts += self._process_volume(state, verdict)
        idle_before = end.timestamp() - s.idle_user_seconds
        while self.users:
            oldest = next(iter(self.users.values()))
            if oldest.last_active >= idle_before:
                break
            self.users.popitem(last=False)
            self.stats.evicted_users += 1
        alerts += self.alerts.tick(end)
        return alerts

    # -- checkpoints ----------------------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["prices"] = None  # holds a lock and a cache; handed in again on restore
        return state

    def snapshot(self) -> bytes:
        """Everything the engine learned, as bytes to store: a versioned header, then a
        pickle (River models pickle). Store it where only Tollgate writes."""
        header = _SNAPSHOT_MAGIC + struct.pack(">I", SNAPSHOT_VERSION)
        return header + pickle.dumps(self, protocol=pickle.HIGHEST_PROTOCOL)

    @classmethod
    def restore(
        cls,
        data: bytes,
        prices: PriceCatalog | None = None,
        settings: DetectorSettings | None = None,
    ) -> AnomalyEngine:
        """An engine resumed from :meth:`snapshot`: same baselines, no new warm-up.

        ``settings`` (if given) replace the snapshot's: thresholds, windows and alert
        timings apply at once; the models' own hyper-parameters (smoothing, fading,
        Page-Hinkley delta and threshold) only for scopes created from now on. Only
        restore bytes this program wrote (unpickling runs code from its input).
        """
        header = len(_SNAPSHOT_MAGIC) + 4
        if len(data) < header or not data.startswith(_SNAPSHOT_MAGIC):
            raise SnapshotError("not an anomaly-engine snapshot; delete it to start fresh")
        (version,) = struct.unpack(">I", data[len(_SNAPSHOT_MAGIC) : header])
        if version != SNAPSHOT_VERSION:
            raise SnapshotError(
                f"anomaly snapshot version {version} is not {SNAPSHOT_VERSION} (written by "
                "another Tollgate version); delete it to start with fresh baselines"
            )
        try:
            engine = pickle.loads(data[header:])
        except Exception as exc:
            raise SnapshotError(
                f"anomaly snapshot is not readable ({type(exc).__name__}: {exc}); "
                "delete it to start with fresh baselines"
            ) from exc
        if not isinstance(engine, cls):
            raise SnapshotError("anomaly snapshot does not hold an engine; delete it")
        engine.prices = prices
        if settings is not None and settings != engine.settings:
            engine._use_settings(settings)
        return engine

    def _use_settings(self, settings: DetectorSettings) -> None:
        self.settings = settings
        self.alerts.settings = settings
        for state in self.scopes():
            p_value = (
                settings.volume_p_value_user
                if _scope_kind(state.scope) == "user"
                else settings.volume_p_value
            )
            for volume in (state.requests, state.spend):
                volume.settings, volume.p_value = settings, p_value
                volume._expected = volume._spike_floor = None
            state.requests.detect_drops = (
                _scope_kind(state.scope) in settings.volume_drop_scope_kinds
            )
            for detector in (state.cost, state.mix):
                if detector is not None:
                    detector.settings = settings


__all__ = ["AnomalyEngine", "EngineStats", "ScopeState", "SnapshotError"]
