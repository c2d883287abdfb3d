"""The anomaly engine: Usage records in (event-time order), Alert records out.

Owns routing each record to its scopes (``user:<id>``, ``feature:<name>``, ``global``)
and their detectors, the things that tie scopes together (a user's peers are the
other users of their feature; a surge of everyone scales everyone's expectation;
the global rhythm scales a user's day-long rate), the clock (minute ticks in event
time: global drops, resolves, held pages, evictions, peer priors), bounded memory
(least recently active users evicted, idle ones dropped), and the checkpoint
(:meth:`AnomalyEngine.snapshot` / :meth:`AnomalyEngine.restore`).

Time is event time only. A record more than ``allowed_lateness_seconds`` behind the
newest minute ticked (a backlog flushed after an outage, a partition read behind
another) is counted in ``stats.late_records`` and still counts everywhere: for cost
and tier mix as usual, and in the request-rate windows and references it belongs to,
without being judged (so a backlog is neither dropped nor mistaken for a spike).

Pure logic, no I/O. The Kafka agent decodes ``Usage`` events, calls
:meth:`AnomalyEngine.observe` for each and :meth:`AnomalyEngine.advance` from a timer
while the stream is live, publishes what they return, and stores
:meth:`AnomalyEngine.snapshot` with the consumer offsets it covers.

============  ===================  ===========  ============  ========
scope         cost/request         request rate  rate drops   tier mix
============  ===================  ===========  ============  ========
``user:``     yes (ranked in the   yes (peer     no (default)  no
              feature's costs)     prior)
``feature:``  yes                  yes           no (default)  yes
``global``    yes                  yes           yes           yes
============  ===================  ===========  ============  ========
"""

from __future__ import annotations

import functools
import logging
import math
import pickle
import struct
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from agents.anomaly.alerting import AlertManager
from agents.anomaly.core import (
    NANOS_PER_USD,
    TICK_SECONDS,
    DecayedMean,
    Detector,
    DetectorFactory,
    Point,
    Verdict,
)
from agents.anomaly.costs import CostDetector
from agents.anomaly.incidents import Correlator, specificity
from agents.anomaly.mix import TierMixDetector
from agents.anomaly.rates import PeerPrior, RateDetector, fit_peer_prior, peer_burst
from app.anomaly_config import DetectorSettings
from app.pricing.catalog import PriceCatalog

log = logging.getLogger(__name__)

SNAPSHOT_VERSION = 2
_SNAPSHOT_MAGIC = b"tollgate-anomaly-engine\n"
MAX_FEATURE_SCOPES = 1000
_TIER_COST_MEMORY_S = 86400.0


class SnapshotError(ValueError):
    """A checkpoint that cannot be restored; the message says why and what to do."""


@dataclass
class ScopeState:
    """The detectors of one scope: the three built-in ones, which the engine ties to other
    scopes, and ``detectors``, plugged in through the :class:`Detector` protocol alone."""

    scope: str
    kind: str  # user | feature | global
    rate: RateDetector
    cost: CostDetector | None = None
    mix: TierMixDetector | None = None
    last_active: float = 0.0
    first_seen: float | None = None  # event time of its first call (None: from an older checkpoint)
    features: dict[str, float] = field(default_factory=dict)  # a user's features, last seen
    featureless: bool = False  # a user made a call without a feature
    prior: PeerPrior | None = None  # a feature's, for its users
    # economy, other: mean log(1 + cost in nano-dollars), i.e. the typical (geometric) cost
    # of a call of each tier: one absurd call does not price a routing regression absurdly
    tier_log_costs: tuple[DecayedMean, DecayedMean] | None = None
    # Plugged in (a class-level default, so checkpoints written before them restore).
    detectors: tuple[Detector, ...] = ()


@dataclass
class EngineStats:
    records: int = 0
    late_records: int = 0  # behind the closed minutes: not in request rates
    skipped_cost: int = 0  # price unknown or cache hit: no cost judgement
    evicted_users: int = 0
    skipped_minutes: int = 0  # silent minutes not ticked after an event-time jump
    alerts: int = 0
    pages: int = 0
    user_cost_in_feature_incident: int = 0  # user cost alarms left to their feature's


def _scope_kind(scope: str) -> str:
    return scope.split(":", 1)[0] if ":" in scope else scope


def _spiking(state: ScopeState) -> bool:
    """Whether the scope's request rate is in a spike's alarm (not a drop's)."""
    rate = state.rate
    return rate.alarm_since is not None and not rate.drop_alarm


def _as_utc(ts: Any) -> datetime:
    if isinstance(ts, datetime):
        return ts if ts.tzinfo is not None else ts.replace(tzinfo=UTC)
    if isinstance(ts, int | float):
        return datetime.fromtimestamp(ts / 1000, UTC)  # Avro timestamp-millis
    raise TypeError(f"Usage.ts must be a datetime or epoch milliseconds, got {ts!r}")


class AnomalyEngine:
    """Anomaly detection over a stream of Usage records, fed in event-time order.

    ``prices`` is only used to find the tier of records that carry none. ``detectors``
    plug more detectors into every scope they watch, through the :class:`Detector`
    protocol: each priced call is one :class:`Point` (``value``: its cost in nano-dollars,
    ``key``: the model served) for the user's, the feature's and the global scope's
    plugged detectors, and their verdicts go through the same alert lifecycle and
    incidents as the built-in ones.
    """

    def __init__(
        self,
        settings: DetectorSettings | None = None,
        prices: PriceCatalog | None = None,
        detectors: Sequence[DetectorFactory] = (),
    ) -> None:
        self.settings = settings or DetectorSettings()
        self.prices = prices
        self.detector_factories = tuple(detectors)
        self.alerts = AlertManager(self.settings)
        self.correlator = Correlator(
            self.settings,
            self.nests,
            self.explains,
            self.alerts.refreshed,
            self.alerts.quiet,
            self.cost_building,
            self.spread,
            self.calls_feature,
        )
        self.users: OrderedDict[str, ScopeState] = OrderedDict()  # least recently active first
        self.features: OrderedDict[str, ScopeState] = OrderedDict()
        self.global_scope = self._new_scope("global")
        self.stats = EngineStats()
        self.watermark: datetime | None = None  # newest event time seen (or advanced to)
        self._next_minute: int | None = None  # the oldest minute not yet ticked
        self._priors_at = 0.0

    # -- scopes ---------------------------------------------------------------------------
    def _new_scope(self, scope: str) -> ScopeState:
        s = self.settings
        kind = _scope_kind(scope)
        state = ScopeState(scope=scope, kind=kind, rate=RateDetector(scope, s, kind))
        if kind != "global":  # the global's outages are not learned by any scope
            state.rate.outage_source = self.global_scope.rate
        if kind in s.cost_scope_kinds or kind == "global":
            # The global scope always keeps a cost distribution: users without a feature
            # are ranked in it; it is judged only if "global" is in cost_scope_kinds.
            state.cost = CostDetector(scope, s, own_reference=kind != "user")
        if kind != "user":
            state.mix = TierMixDetector(scope, s)
            state.tier_log_costs = (DecayedMean(), DecayedMean())
        if kind in ("feature", "global"):  # the global scope's is for users without a feature
            state.prior = PeerPrior(burst=[DecayedMean() for _ in s.volume_windows_seconds])
        state.detectors = tuple(
            detector for make in self.detector_factories if (detector := make(scope, s)) is not None
        )
        return state

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

    def nests(self, a: str, b: str) -> bool:
        """Whether two scopes can be one incident: the same, global, or a user and a feature
        they called in the last hour."""
        if a == b or a == "global" or b == "global":
            return True
        kinds = {specificity(a), specificity(b)}
        if kinds != {1, 2}:
            return False
        user, feature = (a, b) if a.startswith("user:") else (b, a)
        state = self.users.get(user)
        if state is None:
            return False
        seen = state.features.get(feature.split(":", 1)[1])
        related = self.settings.incident_related_feature_seconds
        return seen is not None and state.last_active - seen <= related

    def calls_feature(self, user_scope: str, feature_scope: str, at: datetime) -> bool:
        """Whether the user called the feature within ``incident_volume_feature_seconds``
        before ``at``: their request-rate alarm is about that feature's calls."""
        state = self.users.get(user_scope)
        seen = None if state is None else state.features.get(feature_scope.split(":", 1)[1])
        return (
            seen is not None
            and at.timestamp() - seen <= self.settings.incident_volume_feature_seconds
        )

    def explains(self, narrow: str, wide: str, at: datetime) -> bool:
        """Whether ``narrow`` accounts for at least ``incident_explain_share`` of ``wide``'s
        extra spend over the last 5 minutes (a user whose loop is their feature's surge)."""
        states = [self._state(narrow), self._state(wide)]
        if states[0] is None or states[1] is None:
            return False
        t = at.timestamp()
        j = min(2, len(self.settings.volume_windows_seconds) - 1)
        home = self._home(states[0])
        excess = []
        for state, priced_as in ((states[0], home), (states[1], states[1])):
            state.rate.expire(t)
            excess.append(state.rate.excess_spend(j, self._cpr(priced_as) * NANOS_PER_USD))
        return excess[1] > 0 and excess[0] >= self.settings.incident_explain_share * excess[1]

    def spread(self, scope: str, at: datetime) -> bool:
        """Whether feature ``scope`` has extra spend over the last 5 minutes and no user who
        called it in that time could be named for it: none is unusual on their own count
        (``RateDetector.suspicious``) while holding ``incident_spread_share`` of that extra
        spend (priced as ``explains`` prices them). A share alone is noisy: among ten users
        of a ramping feature, one held half of its excess by chance."""
        share = self.settings.incident_spread_share
        state = self.features.get(scope) if specificity(scope) == 1 else None
        if share <= 0 or state is None:
            return False
        t = at.timestamp()
        j = min(2, len(self.settings.volume_windows_seconds) - 1)
        since = t - state.rate.windows[j]
        state.rate.expire(t)
        wide = state.rate.excess_spend(j, self._cpr(state) * NANOS_PER_USD)
        if wide <= 0:
            return False
        name = scope.split(":", 1)[1]
        for user in self.users.values():  # (only as a feature's alert joins a held incident)
            seen = user.features.get(name)
            if seen is None or seen < since or not user.rate.suspicious(t):
                continue
            user.rate.expire(t)
            cpr = self._cpr(self._home(user)) * NANOS_PER_USD
            if user.rate.excess_spend(j, cpr) >= share * wide:
                return False
        return True

    def cost_building(self, user_scope: str, at: datetime) -> bool:
        """Whether a judged feature the user called in the last hour has cost evidence
        building, no alarm yet (a user's cost page then waits for it; see
        ``incident_cost_wait_seconds``)."""
        user = self.users.get(user_scope)
        return user is not None and any(
            state.kind in self.settings.cost_scope_kinds and cost.building()
            for state, cost in self._recent_costs(user, at)
        )

    def _in_feature_cost_incident(self, user: ScopeState, at: datetime) -> bool:
        """Whether a feature the user called in the last hour has a cost incident that the
        user does not explain (then the user's cost alarm is part of it); or one that a
        silence closed and its calls back reopen (``CostDetector.unseen_since``, or an
        alarm raised while it was set): that incident was paged before the silence, and its
        users' alarms among the first calls back are part of it whoever made most of them
        (one user of three alike held "the" excess of a feature judged against its busiest
        5 minutes the morning after a night it had not seen, and paged; session 28)."""
        return any(
            cost.unseen_since is not None
            or (
                cost.alarm_since is not None
                and (cost.unseen_alarm or not self.explains(user.scope, state.scope, at))
            )
            for state, cost in self._recent_costs(user, at)
        )

    def _recent_costs(
        self, user: ScopeState, at: datetime
    ) -> Iterator[tuple[ScopeState, CostDetector]]:
        """The features the user called in the last ``incident_related_feature_seconds``
        that judge costs, with their cost detector."""
        recent = at.timestamp() - self.settings.incident_related_feature_seconds
        for name, seen in user.features.items():
            state = self.features.get(f"feature:{name}")
            if seen >= recent and state is not None and state.cost is not None:
                yield state, state.cost

    def _state(self, scope: str) -> ScopeState | None:
        if scope == "global":
            return self.global_scope
        return self.users.get(scope) if scope.startswith("user:") else self.features.get(scope)

    def _calls_between(self, scope: str, start: datetime, end: datetime) -> int | None:
        """Calls of ``scope`` counted between two event times (None: a scope not known)."""
        state = self._state(scope)
        if state is None:
            return None
        return state.rate.calls_between(start.timestamp(), end.timestamp())

    def _home(self, state: ScopeState) -> ScopeState:
        """A user's most recent feature (the global scope without one); a scope itself."""
        if state.kind != "user" or not state.features:
            return state if state.kind != "user" else self.global_scope
        name = max(state.features, key=state.features.__getitem__)
        return self.features.get(f"feature:{name}", self.global_scope)

    # -- the stream -----------------------------------------------------------------------
    def observe(self, record: Mapping[str, Any]) -> list[dict[str, Any]]:
        """Alerts caused by one Usage record (and by the minutes its event time ends)."""
        ts = _as_utc(record["ts"])
        alerts = self._close_until(ts)
        if self.watermark is None or ts > self.watermark:
            self.watermark = ts
        self.stats.records += 1
        t = ts.timestamp()
        minute = int(t // TICK_SECONDS)
        if self._next_minute is None:
            self._next_minute = minute
        too_late = minute < self._next_minute

        user = self._scope(self.users, f"user:{record['user_id']}", self.settings.max_user_scopes)
        feature_name = record.get("feature")
        feature = (
            self._scope(self.features, f"feature:{feature_name}", MAX_FEATURE_SCOPES)
            if feature_name
            else None
        )
        glob = self.global_scope
        if feature_name:
            user.features[feature_name] = max(t, user.features.get(feature_name, t))
        else:
            user.featureless = True
        for state in (user, feature, glob):
            if state is not None:
                state.last_active = max(state.last_active, t)
                if state.first_seen is None or t < state.first_seen:
                    state.first_seen = t
        cost_nanos = float(record.get("cost_usd_nanos") or 0)
        priced = not (record.get("price_unknown") or record.get("cache_hit"))
        unknown = bool(record.get("price_unknown"))

        def spent(state: ScopeState) -> float:
            # What a call spent, for a rate alert's money: a call of unknown price is not a
            # real $0 (a cache hit is), and counts at the scope's usual cost.
            return self._cpr(state) * NANOS_PER_USD if unknown else cost_nanos

        verdicts: list[Verdict | None] = []

        # -- request rates: global first (its rhythm and counts scale the others) ----------
        if too_late:
            # Counted where it belongs, not judged: a backlog is neither dropped nor a spike.
            self.stats.late_records += 1
            for state in (glob, feature, user):
                if state is not None:
                    state.rate.add_late(t, spent((feature or glob) if state is user else state))
        else:
            verdicts.append(
                glob.rate.observe(
                    ts,
                    excused=functools.partial(self._woken_variance, t),
                    cost_per_request_usd=self._cpr(glob),
                    cost_nanos=spent(glob),
                )
            )
            rhythm = glob.rate.rhythm(t)
            if feature is not None:
                verdicts.append(
                    feature.rate.observe(
                        ts,
                        context=self._context(feature, t),
                        cost_per_request_usd=self._cpr(feature),
                        cost_nanos=spent(feature),
                    )
                )
            verdicts.append(
                user.rate.observe(
                    ts,
                    prior=(feature or glob).prior,
                    rhythm=rhythm,
                    context=self._context(user, t),
                    levels=functools.partial(self._rest_levels, user),
                    cost_per_request_usd=self._cpr(feature or glob),
                    cost_nanos=spent(feature or glob),
                    # all their calls of this call's feature (or all without one)
                    single_feature=len(user.features) + user.featureless == 1,
                )
            )

        # -- cost per request and tier mix ---------------------------------------------
        if not priced:
            self.stats.skipped_cost += 1
        else:
            model = str(record.get("model_served") or "")
            # A call made in a volume spike (its caller's rate alarm open, or the scope's) is
            # judged but not learned into cost or tier-mix references: a day of a feature's
            # calls is a few thousand, and one user's burst of 9,000 economy calls in 3
            # minutes made most of it, so its ordinary mix paged as a cost rise an hour later
            # (probe 57), or as an economy-share drop where its usual share is lower.
            burst = _spiking(user)
            user_verdict = None
            if user.cost is not None:
                # Ranked among the feature's costs before the feature learns this call.
                home = feature if feature is not None else glob
                reference = home.cost.reference if home.cost is not None else None
                user_verdict = user.cost.observe(
                    ts,
                    cost_nanos,
                    reference,
                    requests_per_hour=self._rph(user, t),
                    model=model,
                    model_prior=glob.cost,
                    model_home=home.cost,
                    learn=not burst,
                )
            for state in (glob, feature):
                if state is None or state.cost is None:
                    continue
                learn = not (burst or _spiking(state))
                if state.kind in self.settings.cost_scope_kinds:
                    verdicts.append(
                        state.cost.observe(
                            ts,
                            cost_nanos,
                            requests_per_hour=self._rph(state, t),
                            model=model,
                            # the global scope's per-model costs: a feature's prior
                            model_prior=glob.cost,
                            learn=learn,
                        )
                    )
                elif learn:
                    state.cost.learn(cost_nanos, t, model)  # learned, not judged
            if (
                user_verdict is not None
                and user_verdict.is_anomaly
                and self._in_feature_cost_incident(user, ts)
            ):
                # One of many users of a feature whose cost shifted: the feature's incident
                # says it, once.
                self.stats.user_cost_in_feature_incident += 1
                user_verdict = None
            verdicts.append(user_verdict)
            point = Point(ts, cost_nanos, model)
            for state in (user, feature, glob):
                if state is not None:
                    verdicts += [detector.observe_point(point) for detector in state.detectors]
            tier = record.get("tier") or (self.prices.tier(model) if self.prices else None)
            if tier is not None:
                economy = tier == "economy"
                for state in (feature, glob):
                    if state is None or state.mix is None:
                        continue
                    expected = self._expected_share(feature) if state is glob else None
                    if state.tier_log_costs is None:  # a checkpoint from before they were kept
                        state.tier_log_costs = (DecayedMean(), DecayedMean())
                    costs = state.tier_log_costs
                    costs[0 if economy else 1].add(
                        math.log1p(max(cost_nanos, 0)), t, _TIER_COST_MEMORY_S
                    )
                    delta = (
                        math.expm1(costs[1].get()) - math.expm1(costs[0].get())
                    ) / NANOS_PER_USD
                    verdicts.append(
                        state.mix.observe(
                            ts,
                            economy,
                            cost_delta_usd=max(0.0, delta),
                            requests_per_hour=self._rph(state, t),
                            expected=expected,
                            learn=not (burst or _spiking(state)),
                        )
                    )
        records: list[dict[str, Any]] = []
        for verdict in verdicts:
            if verdict is not None:
                records += self.alerts.process(verdict)
        alerts += self.correlator.process(records, ts)
        self._count(alerts)
        return alerts

    def advance(self, now: datetime) -> list[dict[str, Any]]:
        """Declare that no event older than ``now - allowed_lateness_seconds`` will come.

        Ticks the minutes that ended by then (global drops, resolves, held pages). Call
        it from a timer while the stream is live; never while reading history (the
        records' own event times drive the clock).
        """
        now = _as_utc(now)
        alerts = self._close_until(now)
        if self.watermark is None or now > self.watermark:
            self.watermark = now
        self._count(alerts)
        return alerts

    def flush(self) -> list[dict[str, Any]]:
        """Tick past the last minute and send every held page (end of a finite stream)."""
        alerts: list[dict[str, Any]] = []
        if self.watermark is not None:
            end = datetime.fromtimestamp(
                (int(self.watermark.timestamp() // TICK_SECONDS) + 1) * TICK_SECONDS
                + self.settings.allowed_lateness_seconds,
                UTC,
            )
            alerts += self._close_until(end)
        alerts += self.correlator.flush()
        self._count(alerts)
        return alerts

    def _count(self, alerts: list[dict[str, Any]]) -> None:
        self.stats.alerts += len(alerts)
        self.stats.pages += sum(
            1 for a in alerts if a["status"] == "firing" and a["incident_role"] == "primary"
        )

    # -- what ties scopes together ------------------------------------------------------
    def _context(self, state: ScopeState, t: float) -> float:
        """How far the rest of the traffic (global minus this scope) is above its expectation
        over the last minute: a surge of everyone raises everyone's expectation. For a
        feature, the rest's excess is first shrunk by its own count noise (the global
        scope's variance/mean over that window, with its estimate's uncertainty;
        ``volume_context_noise_sigmas``): the point ratio, floored at 1, is above 1 half
        the time with no surge at all, and lifted ramping features' expectations by 10-30 %
        (probe E: a 10x ramp of the Azure world's code-assist, 192 -> 204 s). Users keep
        the point ratio (probe G: discounted, a quiet user's hour of 30 calls paged on
        seed 11's clean synthetic days, saved before by a noise lift of 1.1)."""
        s = self.settings
        glob = self.global_scope.rate
        rest_expected = glob.expected_first() - state.rate.expected_first()
        if rest_expected < s.volume_context_min_requests * glob.windows[0] / 60:
            return 1.0
        excess = glob.counts[0] - state.rate.counts[0] - rest_expected
        if excess <= 0:
            return 1.0
        if s.volume_context_noise_sigmas > 0 and not state.rate.is_user:
            mu = glob.expected_first()
            shape = glob.rates(t)[0][1]  # the global's own judgement of this call (cached)
            noise = glob.dispersion(0, mu, None) + (mu / shape if shape > 0 else 0.0)
            # Shrunk towards no surge (positive-part James-Stein): an excess within z
            # standard deviations of the rest's noise is none, one of k standard deviations
            # keeps 1 - (z / k)^2 of itself (at z = 1, a doubling of a rest of 120 a minute,
            # ~8 of them, keeps 98 %). Probe G: a lower bound (excess - z sd) at z = 2 let
            # a feature page in a doubling of everyone (its 5 minutes judged against the
            # last minute's bound); at z = 2, or as a lower bound even at z = 1, a burst of
            # summarize in seed 11's synthetic morning rise paged (saved by a lift of 1.3).
            threshold = s.volume_context_noise_sigmas**2 * noise * rest_expected
            excess = max(0.0, excess - threshold / excess)
        return min(s.volume_context_max, 1.0 + excess / rest_expected)

    def _woken_variance(self, t: float) -> list[float] | None:
        """Per window of the global scope: the variance of its count that features in their
        waking hour add beyond its own model of it: for each, its variance/mean as it woke
        over the global's, times the calls it expects, or holds if fewer (none once its
        run has left the window: the global keeps its sensitivity for the rest of the
        feature's waking hour); None when there are none. Only
        features judged against their history as they woke (the previous days, or the day
        before the silence), and not in an alarm.

        A job every 2 hours on a feature of its own (50 calls within a minute): the feature
        falls silent between runs, judges each run as it wakes against the runs before, and
        knows their clumping (a variance/mean of 10 to 17 over a minute). The global scope
        judged the same calls with its own variance/mean, learned on the rest of the
        product's steady traffic (1.5 to 3): it paged every run, "3.2x normal" by day and
        "8x normal" at night (where it woke with the job), for the first two days until
        ``volume_recurring_days`` learned each time of day (session 28's probe: 22 of the
        job's 24 pages in 3 days, the job's own feature quiet). The variance, not the calls
        (excusing the calls of every feature its history judged normal also excused a
        surge of all of them at once in the morning, which the global scope is there to
        see); as each feature woke, not as now (a feature learns a surge's excess into its
        variance as it goes, 1.4 -> 4.3 over a minute in 20 minutes of a 2x surge); and only
        beyond the global's own, and only where it is ``volume_woken_burstier`` times the
        global's (an office product's features, all waking at 09:00 about as steady as the
        global, lent it enough to miss a 2x surge of all of them on 2 of 3 seeds with
        their current variance, and to delay a heavy user's loop from 78 to 158 s with
        the difference as they woke)."""
        glob = self.global_scope.rate
        burstier = self.settings.volume_woken_burstier
        if burstier <= 0:
            return None
        out: list[float] | None = None
        own: list[float] | None = None  # the global's variance/mean per window, once
        for state in self.features.values():
            rate = state.rate
            woke = rate.wake_dispersion
            if (
                woke is None
                or rate.alarm_since is not None
                or not rate.waking(t)
                or rate.windows != glob.windows
            ):
                continue
            if out is None or own is None:
                out = [0.0] * len(glob.windows)
                own = [glob.dispersion(j, mu, None) for j, mu in enumerate(glob.mu)]
            rate.expire(t)  # its windows end now (its calls may have left them)
            for j, mu in enumerate(rate.mu):
                calls = min(mu, rate.counts[j])
                if calls > 0 and woke[j] >= burstier * own[j] and woke[j] > 1.0:
                    out[j] += max(0.0, woke[j] - own[j]) * calls
        return out

    def _rest_levels(self, state: ScopeState) -> list[float] | None:
        """Per window: the rest of the traffic's count (global minus this scope) over its
        expected count, within ``volume_context_max`` both ways (1 where the rest expects
        fewer than ``volume_context_min_requests`` a minute); None when not used. Asked by
        the scope's rate detector during its ``observe`` (its windows then end at this call,
        which it has not counted yet), and only for a busy user."""
        s = self.settings
        if not s.volume_busy_user_rest_level:
            return None
        glob, own = self.global_scope.rate, state.rate
        if own.windows != glob.windows:
            # Windows stay as a scope was built: after a restore with other windows, a new
            # user's have no match in the global's (the surge rule alone applies).
            return None
        top = s.volume_context_max
        out = []
        for j, w in enumerate(glob.windows):
            rest_expected = glob.mu[j] - own.mu[j]
            if rest_expected < s.volume_context_min_requests * w / 60:
                out.append(1.0)
                continue
            rest = glob.counts[j] - own.counts[j] - 1  # the global count holds this call
            out.append(min(top, max(1.0 / top, rest / rest_expected)))
        return out

    def _expected_share(self, feature: ScopeState | None) -> float:
        """The economy share a call of ``feature`` is expected to have, for the global tier
        mix. The global share is a mixture of its features': a day whose busy feature
        changes moves it by tens of points with no routing change (probe H: 3 false pages
        in 3 days for 300 users). A feature's share leans on the global's for its first
        ``mix_feature_prior_requests`` calls (a product of 40 small features, none with a
        day's 200 calls, would otherwise judge no share at all: session 25's review); a
        call without a feature is expected to have the global share."""
        glob = self.global_scope.mix
        assert glob is not None
        mix = feature.mix if feature is not None else None
        if mix is None:
            return glob.share()
        k = self.settings.mix_feature_prior_requests
        return (mix.economy + k * glob.share()) / (mix.total + k) if mix.total + k > 0 else 0.0

    def _cpr(self, state: ScopeState) -> float:
        """Mean cost of a request of this scope, USD (for the money at stake)."""
        cost = state.cost
        if cost is not None and cost.reference is not None and cost.reference.total > 0:
            return cost.reference.mean() / NANOS_PER_USD
        glob = self.global_scope.cost
        if glob is not None and glob.reference is not None and glob.reference.total > 0:
            return glob.reference.mean() / NANOS_PER_USD
        return 0.0

    def _rph(self, state: ScopeState, t: float) -> float:
        """Expected requests per hour of this scope: the rate detector's expectation, or,
        when it has none because every call of the scope came late (history replayed into
        an agent that has seen later traffic: rates do not judge it), the calls per hour
        its tier costs remember (session 13's probe: "$0.0000/hour" on such a regression);
        a user, who keeps no tier costs, the calls of the last hour its rate detector counted
        (probe W: historical users' cost alerts said "$0.0000/hour")."""
        expected = state.rate.expected_first() * 3600.0 / state.rate.windows[0]
        if expected > 0:
            return expected
        if state.tier_log_costs is None:
            if state.first_seen is None:
                return expected
            # over its age, from its shortest rate window (one call is no rate of its
            # own first second) to its longest
            windows = state.rate.windows
            span = min(max(t - state.first_seen, float(windows[0])), float(windows[-1]))
            return state.rate.calls_between(t - span, t) * 3600.0 / span
        tau = _TIER_COST_MEMORY_S
        remembered = sum(
            mean.weight * math.exp(-max(0.0, t - mean.at) / tau)
            for mean in state.tier_log_costs
            if mean.at is not None
        )
        # A fading count holds rate * tau * (1 - exp(-age / tau)) calls after ``age`` seconds
        age = max(t - state.first_seen, 60.0) if state.first_seen is not None else 10 * tau
        return remembered * 3600.0 / (tau * -math.expm1(-age / tau))

    # -- minutes --------------------------------------------------------------------------
    def _close_until(self, now: datetime) -> list[dict[str, Any]]:
        if self._next_minute is None:
            return []
        s = self.settings
        closable = int(
            (now.timestamp() - s.allowed_lateness_seconds) // TICK_SECONDS
        )  # minutes < this
        if closable - self._next_minute > s.max_gap_minutes:
            skipped = closable - self._next_minute - 1
            log.warning(
                "event time jumped; the silent minutes are not ticked one by one",
                extra={"skipped_minutes": skipped, "to": now.isoformat()},
            )
            self.stats.skipped_minutes += skipped
            self._next_minute = closable - 1
        alerts: list[dict[str, Any]] = []
        while self._next_minute < closable:
            alerts += self._tick_minute(self._next_minute)
            self._next_minute += 1
        return alerts

    def _tick_minute(self, minute: int) -> list[dict[str, Any]]:
        s = self.settings
        end = datetime.fromtimestamp((minute + 1) * TICK_SECONDS, UTC)
        t = end.timestamp()
        glob = self.global_scope
        records: list[dict[str, Any]] = []
        drop = glob.rate.check_drop(end, cost_per_request_usd=self._cpr(glob))
        if drop is not None:
            records += self.alerts.process(drop)
        records += self.alerts.tick(end, self._calls_between)
        idle_before = t - s.idle_user_seconds
        while self.users:
            oldest = next(iter(self.users.values()))
            if oldest.last_active >= idle_before:
                break
            self.users.popitem(last=False)
            self.stats.evicted_users += 1
        if s.volume_peer_prior and t - self._priors_at >= s.volume_peer_refresh_seconds:
            self._fit_priors(t)
            self._priors_at = t
        return self.correlator.process(records, end)

    def _fit_priors(self, t: float) -> None:
        """Refit every feature's prior on its users' rates (each user counted once), and the
        global scope's on the users without a feature."""
        s = self.settings
        # The prior's ``settled`` Gamma, which a newcomer is judged against, is fitted on the
        # users known for the longest window and not in an alarm: a newcomer does not shape
        # it. One new user's loop (30 calls a minute among users at 0.1) fitted into it took
        # its shape from 0.89 to 0.16 and made the loop a plausible user. (The prior every
        # other user is judged against keeps all users, as it was tuned.)
        known_for = max(s.volume_windows_seconds)
        by_home: dict[str, list[tuple[float, float]]] = {}
        settled: dict[str, list[tuple[float, float]]] = {}
        bursts: dict[str, list[list[DecayedMean]]] = {}
        for user in self.users.values():
            home = (
                f"feature:{max(user.features, key=user.features.__getitem__)}"
                if user.features
                else "global"
            )
            rate = user.rate
            count, exposure = rate.refs[0].at_time(t, rate.tau)
            if exposure > 0:
                by_home.setdefault(home, []).append((count, exposure))
                if (
                    rate.first_at is not None
                    and t - rate.first_at >= known_for
                    and rate.alarm_since is None
                ):
                    settled.setdefault(home, []).append((count, exposure))
            bursts.setdefault(home, []).append(rate.burst)
        windows = len(s.volume_windows_seconds)
        enough, quantile = s.volume_peer_burst_requests, s.volume_peer_burst_quantile
        # A feature with fewer than 3 users of enough calls leans on every user's (a small
        # feature's users are users of the same product).
        everyone = peer_burst(
            [b for group in bursts.values() for b in group], windows, enough, quantile
        )
        for state in (*self.features.values(), self.global_scope):
            if state.prior is not None:
                fit_peer_prior(
                    state.prior, by_home.get(state.scope, []), settled.get(state.scope, [])
                )
                own = peer_burst(bursts.get(state.scope, []), windows, enough, quantile)
                state.prior.user_burst = [
                    mine if mine is not None else all_
                    for mine, all_ in zip(own, everyone, strict=True)
                ]

    # -- checkpoints ----------------------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["prices"] = None  # holds a lock and a cache; handed in again on restore
        state["detector_factories"] = ()  # code, not state (may be closures); ditto
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.__dict__.setdefault("detector_factories", ())  # a checkpoint from before them
        for scope in self.scopes():  # (a checkpoint from before outages held from all)
            if scope.kind != "global":
                scope.rate.outage_source = self.global_scope.rate
        self.correlator.nests = self.nests
        self.correlator.explains = self.explains
        self.correlator.refresh = self.alerts.refreshed
        self.correlator.quiet = self.alerts.quiet
        self.correlator.building = self.cost_building
        self.correlator.spread = self.spread
        self.correlator.calls = self.calls_feature

    def snapshot(self) -> bytes:
        """Everything the engine learned, as bytes to store: a versioned header, then a
        pickle. Store it where only Tollgate writes."""
        header = _SNAPSHOT_MAGIC + struct.pack(">I", SNAPSHOT_VERSION)
        return header + pickle.dumps(self, protocol=pickle.HIGHEST_PROTOCOL)

    @classmethod
    def restore(
        cls,
        data: bytes,
        prices: PriceCatalog | None = None,
        settings: DetectorSettings | None = None,
        detectors: Sequence[DetectorFactory] = (),
    ) -> AnomalyEngine:
        """An engine resumed from :meth:`snapshot`: same baselines, no new warm-up.

        ``detectors``: the same factories as the engine was built with; the plugged
        detectors of its scopes come back from the snapshot, new scopes get fresh ones.

        ``settings`` (if given) replace the snapshot's: thresholds and alert timings apply
        at once; memories (time constants) only as the models next update. Only restore
        bytes this program wrote (unpickling runs code from its input).
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
        engine.detector_factories = tuple(detectors)
        if settings is not None and settings != engine.settings:
            engine._use_settings(settings)
        return engine

    def _use_settings(self, settings: DetectorSettings) -> None:
        self.settings = settings
        self.alerts.settings = settings
        self.correlator.settings = settings
        for state in self.scopes():
            state.rate.use_settings(settings)
            if state.cost is not None:
                state.cost.use_settings(settings)
            if state.mix is not None:
                state.mix.settings = settings


__all__ = ["AnomalyEngine", "EngineStats", "ScopeState", "SnapshotError"]
