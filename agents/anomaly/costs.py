"""Cost-per-request anomalies: has what a scope's calls cost shifted upward, and by how much?

Owns :class:`CostReference` (a scope's distribution of log cost over the past day) and
:class:`CostDetector` (a sequential change test against it):

- **Rank, then CUSUM.** Each call's cost is turned into a standard normal score
  through the reference distribution (its rank among the scope's past costs, whatever
  their shape: several models, heavy tails), and three CUSUMs add the scores up: one
  tuned to a rise of ``cost_design_ratio``, which finds a sustained shift of the
  whole distribution or of part of it, one tuned to a rise of one standard deviation,
  and one with a large allowance that finds a jump in three or four calls. A fourth,
  the tail CUSUM, counts the calls above the top ``cost_tail_share`` (part of the calls
  shifted far: half of them at 8x the tokens). Single outliers never alert; no call is
  trimmed away.
- **A reference that does not learn a rise.** The reference remembers a day
  (``cost_reference_memory_seconds``), so the first half hour of a rise over hours
  weighs about 2 % in it, and it learns nothing while the scope is anomalous: a
  gradual upgrade is measured against the day before it started. Nor does it learn the
  calls of a volume spike (the engine says which: its caller's or the scope's rate
  alarm open): a burst's thousands of calls would outweigh the scope's day.
- **An effect size, stated.** A triggered CUSUM alerts only if the calls since the
  estimated change point typically (geometric mean: robust to a few huge calls) cost at
  least ``cost_min_ratio`` times the usual (``cost_model_min_ratio`` among the same model's
  calls, below); the money at stake uses their arithmetic mean.
- **Each call against its own model too.** A feature that mixes models whose prices
  differ 16x has a log-cost spread of about 1.5, most of it the mix; its tokens spread
  0.4 to 1.3. Features and the global scope also keep one distribution per model served
  (``cost_model_views``), and a second set of the same four CUSUMs adds up each call's
  score among the same model's calls, so a 1.75x rise of the tokens is about one spread,
  not a third of one. A scope with few calls of a model borrows the global scope's
  distribution of that model (``cost_model_prior_requests`` calls' weight: empirical
  Bayes, as the rate detectors' peer priors). The scope-wide set stays: a switch to a
  pricier model moves nothing within a model, and is seen there (and by the economy-share
  detector when the cheaper model is the economy tier).
- **Users borrow their feature's distribution.** A user's calls are ranked in their
  feature's distribution and shifted by the user's own typical rank (shrunk towards
  the feature's while they have few calls): a new user is judged from the first call,
  and a user who always sends long documents is not a permanent incident.

It does not own alert lifecycles or the choice of scopes.
"""

from __future__ import annotations

import math
from collections import deque
from datetime import datetime
from statistics import NormalDist

from agents.anomaly.core import (
    NANOS_PER_USD,
    Cusum,
    Point,
    TailCusum,
    Verdict,
    alarm_end,
    cusum_threshold,
)
from app.anomaly_config import DetectorSettings

_BIN = 0.05  # log-cost bin width: costs within 5 % of each other share a bin
_LOG_MIN = 4.0  # the first bin starts at e^4 nanos ($0.00000005); cheaper calls share it
_BINS = 440  # up to e^26 nanos (~$200,000 per call); dearer calls share the last bin
_Z_CAP = 4.0
_inverse_normal = NormalDist().inv_cdf


class CostReference:
    """A time-decayed histogram of log(cost in nano-dollars): the scope's cost distribution
    over the last ``tau`` seconds, and its mean."""

    __slots__ = (
        "_last_z",
        "added",
        "origin",
        "recent",
        "spread",
        "sum_cost",
        "sum_log",
        "tau",
        "total",
        "weights",
    )

    def __init__(self, tau: float) -> None:
        self.tau = tau
        self.weights = [0.0] * _BINS
        self.total = 0.0
        self.sum_cost = 0.0
        self.sum_log = 0.0
        self.origin: float | None = None  # weights are relative to exp(origin / tau)
        self.recent: deque[tuple[float, float]] = deque(maxlen=256)  # (t, cost) to re-learn
        self.added = 0
        self.spread = 1.0  # standard deviation of log cost, refreshed every 256 calls
        self._last_z: tuple[float, float, int, float] | None = None  # (cost, t, added, z)

    def _weight(self, t: float) -> float:
        if self.origin is None:
            self.origin = t
        exponent = (t - self.origin) / self.tau
        if exponent > 200:  # rescale everything to a new origin before floats overflow
            scale = math.exp(-exponent)
            self.weights = [w * scale for w in self.weights]
            self.total *= scale
            self.sum_cost *= scale
            self.sum_log *= scale
            self.origin, exponent = t, 0.0
        return math.exp(exponent)

    def add(self, cost_nanos: float, t: float) -> None:
        weight = self._weight(t)
        self.weights[_bin(cost_nanos)] += weight
        self.total += weight
        self.sum_cost += weight * cost_nanos
        self.sum_log += weight * math.log(max(cost_nanos, 1.0))
        self.recent.append((t, cost_nanos))
        self.added += 1
        if self.added % 256 == 0 or self.added == 64:
            self.spread = log_spread(self)

    def count(self, t: float) -> float:
        """Effective number of calls remembered at ``t``."""
        if self.origin is None:
            return 0.0
        return self.total * math.exp(min(700.0, -(t - self.origin) / self.tau))

    def mean(self) -> float:
        return self.sum_cost / self.total if self.total > 0 else 0.0

    def mean_log(self) -> float:
        """Mean log cost: the log of the typical (geometric mean) cost."""
        return self.sum_log / self.total if self.total > 0 else 0.0

    def z(self, cost_nanos: float, t: float) -> float:
        """The standard normal score of this cost's rank in the distribution."""
        if self.total <= 0:
            return 0.0
        last = self._last_z
        if last is not None and last[0] == cost_nanos and last[1] == t and last[2] == self.added:
            return last[3]  # the same call, asked again (a user, then its feature)
        z = self._z(cost_nanos, t)
        self._last_z = (cost_nanos, t, self.added, z)
        return z

    def _z(self, cost_nanos: float, t: float) -> float:
        return _score(self.below(cost_nanos), self.count(t))

    def below(self, cost_nanos: float) -> float:
        """The share of the remembered calls that cost less (interpolated within a bin)."""
        if self.total <= 0:
            return 0.5
        position = min(max((math.log(max(cost_nanos, 1.0)) - _LOG_MIN) / _BIN, 0.0), _BINS - 1e-9)
        index = int(position)
        below = sum(self.weights[:index]) + (position - index) * self.weights[index]
        return below / self.total

    def relearn(self, t: float) -> None:
        """Forget everything but the latest calls (a new normal was accepted)."""
        recent = list(self.recent)
        self.weights = [0.0] * _BINS
        self.total = self.sum_cost = self.sum_log = 0.0
        self.origin = None
        for at, cost in recent:
            self.add(cost, max(at, t - self.tau))


def _score(share: float, count: float) -> float:
    """The standard normal score of a rank ``share`` among ``count`` calls (kept off the
    extremes by half a call)."""
    floor = 0.5 / max(count, 1.0)
    share = min(max(share, floor), 1.0 - floor)
    return max(-_Z_CAP, min(_Z_CAP, _inverse_normal(share)))


def _bin(cost_nanos: float) -> int:
    return min(_BINS - 1, max(0, int((math.log(max(cost_nanos, 1.0)) - _LOG_MIN) / _BIN)))


class CostDetector:
    """Cost per request of one scope: CUSUMs of rank scores against a day-long reference.

    Features and the global scope own a :class:`CostReference`; a user is judged in the
    reference of the call's feature, shifted by the user's own typical score.
    """

    __slots__ = (
        "alarm_by_model",
        "alarm_since",
        "cusums",
        "ew_at",
        "ew_cost",
        "ew_log",
        "ew_model_log",
        "ew_model_z",
        "ew_z",
        "last_anomalous",
        "model_cusums",
        "model_offset_n",
        "model_offset_sum",
        "model_spread",
        "model_spread_at",
        "model_thresholds",
        "models",
        "normal_calls",
        "offset_n",
        "offset_sum",
        "reference",
        "scope",
        "settings",
        "spread",
        "thresholds",
        "unseen_alarm",
        "unseen_calls",
        "unseen_since",
    )

    def __init__(self, scope: str, settings: DetectorSettings, own_reference: bool) -> None:
        s = settings
        self.scope = scope
        self.settings = settings
        self.reference = CostReference(s.cost_reference_memory_seconds) if own_reference else None
        # Tuned to the stated rise (set from the spread), to a rise of one standard
        # deviation, to a jump, and to part of the calls shifted far (the tail).
        self.cusums = _cusums(s)
        self.thresholds = _thresholds(self.cusums, s)
        self.spread = 1.0
        self.offset_sum = 0.0  # users: their typical score, learned
        self.offset_n = 0.0
        self.alarm_since: float | None = None
        self.last_anomalous = -math.inf
        self.ew_z = 0.0  # while anomalous: recent rank scores and costs, over ~a minute
        self.ew_cost = 0.0
        self.ew_log = 0.0
        self.ew_at = 0.0
        self.ew_model_z = 0.0  # while anomalous: the same among the same model's calls
        self.ew_model_log = 0.0
        self.normal_calls = 0  # in an alarm: calls judged normal since the last anomalous one
        # An alarm ended by silence: when (event time), and the calls at or below the usual
        # cost since; None once ``resolve_min_normal_calls`` of them showed it back to normal.
        self.unseen_since: float | None = None
        self.unseen_calls = 0
        self.unseen_alarm = False  # the open alarm was raised while ``unseen_since`` was set
        self._init_models()

    def _init_models(self) -> None:
        """The per-model view (features and the global scope): a distribution per model
        served and the same four CUSUMs, fed each call's score among its model's calls."""
        s = self.settings
        self.models: dict[str, CostReference] = {}
        self.model_cusums = _cusums(s)
        self.model_thresholds = _thresholds(self.model_cusums, s)
        self.model_spread = 1.0  # pooled spread of log cost within a model
        self.model_spread_at = -1  # the scope reference's ``added`` when it was computed
        self.alarm_by_model = False  # the open alarm was raised by the per-model view
        self.model_offset_sum = 0.0  # users: their typical score among the same model's calls
        self.model_offset_n = 0.0

    def __setstate__(self, state: tuple[None, dict[str, object]] | dict[str, object]) -> None:
        # Checkpoints written before the per-model view restore with an empty one.
        slots = state[1] if isinstance(state, tuple) else state
        for name, value in (slots or {}).items():
            setattr(self, name, value)
        if not hasattr(self, "models"):
            self._init_models()
        if not hasattr(self, "ew_model_z"):  # before an alarm was held within the model too
            self.ew_model_z = self.ew_model_log = 0.0
        if not hasattr(self, "normal_calls"):  # before silence stopped ending an alarm
            self.normal_calls = 0
        if not hasattr(self, "unseen_since"):  # before a silence's close could reopen
            self.unseen_since, self.unseen_calls = None, 0
            self.unseen_alarm = False
        if not hasattr(self, "model_offset_sum"):  # before users had the per-model view
            self.model_offset_sum = self.model_offset_n = 0.0
        if len(self.cusums) == 3 or len(self.model_cusums) == 3:  # before the tail CUSUM
            for cusums in (self.cusums, self.model_cusums):
                if len(cusums) == 3:
                    cusums.append(_cusums(self.settings)[3])
            self.thresholds = _thresholds(self.cusums, self.settings)
            self.model_thresholds = _thresholds(self.model_cusums, self.settings)

    def use_settings(self, settings: DetectorSettings) -> None:
        """New thresholds (the reference's memory stays as it was built)."""
        self.settings = settings
        for cusums in (self.cusums, self.model_cusums):
            cusums[2].k = settings.cost_large_k
            tail = cusums[3]
            assert isinstance(tail, TailCusum)
            tail.tune(settings.cost_tail_share, settings.cost_tail_alt_share)
        self.thresholds = _thresholds(self.cusums, settings)
        self.model_thresholds = _thresholds(self.model_cusums, settings)

    def _tune(self, spread: float) -> None:
        """Tune the first CUSUM to a rise of ``cost_design_ratio`` given the log-cost spread."""
        self.spread = spread
        k = round(min(0.5, max(0.1, math.log(self.settings.cost_design_ratio) / (2.0 * spread))), 2)
        if abs(k - self.cusums[0].k) > 0.01:
            self.cusums[0].k = k
            self.thresholds[0] = cusum_threshold(k, self.settings.cost_arl0_requests)

    def _tune_models(self, ref: CostReference, prior: CostDetector | None, t: float) -> None:
        """Tune the per-model view's first CUSUM from the spread of log cost within a model
        (pooled over this scope's models, the global scope's while it has too few calls)."""
        if ref.added - self.model_spread_at < 256 and self.model_spread_at >= 0:
            return
        self.model_spread_at = ref.added
        pooled = _pooled_spread(self.models, t)
        if pooled is None and prior is not None:
            pooled = _pooled_spread(prior.models, t)
        self._set_model_spread(pooled if pooled is not None else ref.spread)

    def _set_model_spread(self, spread: float) -> None:
        self.model_spread = spread
        k = round(min(0.5, max(0.1, math.log(self.settings.cost_design_ratio) / (2.0 * spread))), 2)
        if abs(k - self.model_cusums[0].k) > 0.01:
            self.model_cusums[0].k = k
            self.model_thresholds[0] = cusum_threshold(k, self.settings.cost_arl0_requests)

    def model_reference(self, model: str) -> CostReference | None:
        """This scope's distribution of ``model``'s costs (made on first sight, up to
        ``cost_model_max_per_scope`` models)."""
        ref = self.models.get(model)
        if ref is None and len(self.models) < self.settings.cost_model_max_per_scope:
            ref = self.models[model] = CostReference(self.settings.cost_reference_memory_seconds)
        return ref

    def learn(self, cost_nanos: float, t: float, model: str = "") -> None:
        """Remember a call without judging it (the global scope when it is not judged)."""
        if self.reference is not None:
            self.reference.add(cost_nanos, t)
        if model and self.settings.cost_model_views:
            mref = self.model_reference(model)
            if mref is not None:
                mref.add(cost_nanos, t)

    def _model_score(
        self, cost_nanos: float, t: float, model: str, prior: CostDetector | None
    ) -> tuple[float, float] | None:
        """(score, log cost less the model's typical log cost) of this call among the same
        model's calls: this scope's, with the global scope's as a prior weighing
        ``cost_model_prior_requests`` calls. None while they hold too few calls."""
        s = self.settings
        own = self.models.get(model)
        n = own.count(t) if own is not None else 0.0
        g = prior.models.get(model) if prior is not None and prior is not self else None
        a = 0.0
        if g is not None and g.count(t) >= s.cost_model_warmup_requests:
            a = s.cost_model_prior_requests
        if n + a < s.cost_model_warmup_requests:
            return None
        share = typical = 0.0
        if own is not None and n > 0:
            share += n * own.below(cost_nanos)
            typical += n * own.mean_log()
        if g is not None and a > 0:
            share += a * g.below(cost_nanos)
            typical += a * g.mean_log()
        log_cost = math.log(max(cost_nanos, 1.0))
        return _score(share / (n + a), n + a), log_cost - typical / (n + a)

    def offset(self) -> float:
        prior = self.settings.cost_user_prior_requests
        return self.offset_sum / (self.offset_n + prior)

    def model_offset(self) -> float:
        """A user's typical score among the same model's calls (shrunk as :meth:`offset`)."""
        prior = self.settings.cost_user_prior_requests
        return self.model_offset_sum / (self.model_offset_n + prior)

    def typical_log(self, ref: CostReference, owned: bool) -> float:
        """Log of this scope's usual typical cost: its reference's, shifted for a user."""
        return ref.mean_log() + (0.0 if owned else self.offset() * self.spread)

    def observe_point(self, point: Point) -> Verdict | None:
        """The :class:`~agents.anomaly.core.Detector` protocol: one call costing
        ``point.value`` nano-dollars, ranked in this scope's own reference (if it has one)."""
        return self.observe(point.ts, point.value)

    def observe(
        self,
        ts: datetime,
        cost_nanos: float,
        reference: CostReference | None = None,
        requests_per_hour: float = 0.0,
        model: str = "",
        model_prior: CostDetector | None = None,
        model_home: CostDetector | None = None,
        learn: bool = True,
    ) -> Verdict | None:
        """Judge one call. ``reference``: the distribution to rank it in (a user's feature's;
        None for a scope that owns one). ``model``: the model served (a scope that owns its
        distribution also ranks the call among that model's calls); ``model_prior``: the
        detector whose per-model distributions are the prior (the global scope's).
        ``model_home``: for a user, the detector of the call's feature, whose per-model
        distributions rank the call among the same model's calls (shifted by the user's own
        typical score there). ``learn``: False for a call judged but not remembered (the
        engine's: one made in a volume spike, its caller's or this scope's; a burst of
        thousands of calls would outweigh the scope's day). Returns an anomalous verdict,
        a normal one while an alarm is open, or None."""
        s = self.settings
        t = ts.timestamp()
        ref = self.reference if self.reference is not None else reference
        if ref is None:
            return None
        owned = ref is self.reference
        by_model = owned and bool(model) and s.cost_model_views
        if ref.count(t) < s.cost_warmup_requests:
            if owned and learn:
                self.learn(cost_nanos, t, model if by_model else "")
            return None
        self._tune(ref.spread)
        raw = ref.z(cost_nanos, t)
        z = raw if owned else raw - self.offset()
        within = self._model_score(cost_nanos, t, model, model_prior) if by_model else None
        if by_model:
            self._tune_models(ref, model_prior, t)
        within_raw = None
        if not owned and model and s.cost_model_views and model_home is not None:
            # A user: ranked among the feature's calls of the same model (a feature that
            # mixes models 16x apart hides an 8x call among the pricier model's calls).
            within_raw = model_home._model_score(cost_nanos, t, model, model_prior)
            if within_raw is not None:
                self._set_model_spread(model_home.model_spread)
                shift = self.model_offset()
                within = (within_raw[0] - shift, within_raw[1] - shift * self.model_spread)
        reference_mean = ref.mean()
        log_cost = math.log(max(cost_nanos, 1.0))
        usual = self.typical_log(ref, owned)
        note = ""
        if self.alarm_since is not None:
            # Nothing anomalous for a while, in calls judged normal (a silence says nothing
            # of the cost: the calls after a gap are judged in the alarm), or no call for
            # long: the rule the alert lifecycle resolves the incident by (``alarm_end``).
            end = alarm_end(
                s, "cost_per_request", self.scope, t - self.last_anomalous, self.normal_calls
            )
            if end != "holds":
                self._end_alarm()
                if end == "silence":
                    self.unseen_since, self.unseen_calls = t, 0
        if self.alarm_since is None:
            # Learned at once: the reference remembers a day, so the start of a rise over
            # hours weighs little in it; nothing is learned once the scope is anomalous.
            # Nor a call of a volume spike (``learn``).
            if learn and owned:
                self.learn(cost_nanos, t, model if by_model else "")
            elif learn:
                self.offset_sum = self.offset_sum * 0.995 + raw
                self.offset_n = self.offset_n * 0.995 + 1.0
                if within_raw is not None:
                    self.model_offset_sum = self.model_offset_sum * 0.995 + within_raw[0]
                    self.model_offset_n = self.model_offset_n * 0.995 + 1.0
            fired = None
            for cusum, h in zip(self.cusums, self.thresholds, strict=True):
                cusum.update(z, cost_nanos, log_cost, t)
                if fired is None and cusum.stat > h and self._large_enough(cusum, t, usual):
                    fired = cusum
            fired_usual = usual
            if within is not None:
                # Among the same model's calls: the carried log is relative to the model's
                # typical cost, so the effect size is judged against 0.
                model_z, relative = within
                for cusum, h in zip(self.model_cusums, self.model_thresholds, strict=True):
                    cusum.update(model_z, cost_nanos, relative, t)
                    if (
                        fired is None
                        and cusum.stat > h
                        and self._large_enough(cusum, t, 0.0, self.model_spread)
                    ):
                        fired, fired_usual = cusum, 0.0
                        self.alarm_by_model = True
            if self.unseen_since is not None and fired is None and z <= 0.0:
                # At or below the usual cost (half of normal calls are): enough of them and
                # the cost is back to normal; a later alarm is a new incident.
                self.unseen_calls += 1
                if self.unseen_calls >= s.resolve_min_normal_calls:
                    self.unseen_since = None
            if fired is None:
                return None
            # Raised in the calls back after a silence closed the last alarm, none of them
            # seen normal: every verdict of this alarm says so (the lifecycle's cooldown can
            # hold its firing back past the first one).
            self.unseen_alarm = self.unseen_since is not None
            self.unseen_since = None
            self.alarm_since = self.last_anomalous = t
            self.normal_calls = 0
            self.ew_z = fired.run_z / fired.run_n
            self.ew_log = fired.run_log / fired.run_n
            self.ew_cost = observed = fired.run_carried / fired.run_n
            self.ew_at = t
            # The per-model view's run of the same CUSUM, if it has one (its log is relative
            # to the model's typical cost): the alarm also holds while it stays high.
            twin = self.model_cusums[self.cusums.index(fired)] if fired in self.cusums else fired
            self.ew_model_z = twin.run_z / twin.run_n if twin.run_n else 0.0
            self.ew_model_log = twin.run_log / twin.run_n if twin.run_n else 0.0
            anomalous = True
            of_model = " of their model" if self.alarm_by_model else ""
            note = (
                f"the {fired.run_n} calls since the change averaged ${observed / NANOS_PER_USD:.4g}"
                f", typically {math.exp(self.ew_log - fired_usual):.1f}x the usual cost{of_model}"
            )
        else:
            if self.alarm_by_model:
                # Judged as it was raised: within the model (a call of a model without a
                # distribution yet leaves the recent averages as they are).
                z, log_cost = within if within is not None else (self.ew_z, self.ew_log)
                usual = 0.0
            # What the calls of the last minute or so typically cost (time-weighted, so a
            # quiet scope's first ordinary call after a while counts for most of it).
            # A call older than the last one (history reaching a scope in alarm) weighs
            # the least: the time since is never negative (12 h back overflowed exp).
            # At most 1/``cost_resolve_min_calls`` each, though: a feature of 7 to 10 calls a minute
            # mixing two models 16x apart, averaged over its last minute's calls, dipped
            # below the bar for 3 minutes at 2.9x and resolved amid a 1x -> 5x drift, then
            # paged again (probe P; session 19's probe: 3 pages for one drift). A scope whose
            # calls are more than ``resolve_after_seconds`` apart ends its alarm at the next
            # call anyway.
            weight = max(
                0.02,
                min(
                    1.0 / s.cost_resolve_min_calls, 1.0 - math.exp(-max(0.0, t - self.ew_at) / 60.0)
                ),
            )
            self.ew_at = max(self.ew_at, t)
            self.ew_z += weight * (z - self.ew_z)
            self.ew_log += weight * (log_cost - self.ew_log)
            self.ew_cost += weight * (cost_nanos - self.ew_cost)
            observed = self.ew_cost
            # Still anomalous: typically half the stated excess above usual, and more than
            # the average can wander by chance (2 of its standard deviations).
            noise = 2.0 * math.sqrt(weight / (2.0 - weight))
            anomalous = (
                math.exp(self.ew_log - usual)
                >= 1.0 + (self._min_ratio(self.alarm_by_model) - 1.0) / 2
                and self.ew_z >= noise
            )
            if not self.alarm_by_model and within is not None:
                # Or so among the same model's calls: the scope-wide average of 20 calls of a
                # feature that mixes models wanders with the mix (a drift at 1.6x dipped
                # below the bar for 3 minutes and resolved, probe P); within a model it does
                # not.
                self.ew_model_z += weight * (within[0] - self.ew_model_z)
                self.ew_model_log += weight * (within[1] - self.ew_model_log)
                anomalous = anomalous or (
                    math.exp(self.ew_model_log) >= 1.0 + (self._min_ratio(True) - 1.0) / 2
                    and self.ew_model_z >= noise
                )
            self.normal_calls = 0 if anomalous else self.normal_calls + 1
            if anomalous:
                self.last_anomalous = t
                if t - self.alarm_since >= s.cost_adapt_after_minutes * 60:
                    self._accept(ref if owned else None)
                    note = f"anomalous for {s.cost_adapt_after_minutes} min, now learned as normal"
                    anomalous = False
                else:
                    note = f"recent calls typically {math.exp(self.ew_log - usual):.1f}x the usual cost"
        expected_usd = reference_mean / NANOS_PER_USD
        observed_usd = observed / NANOS_PER_USD
        if self.alarm_by_model:
            # Raised within the model: the same calls at their models' usual cost (the
            # scope-wide mean would compare them with another mix of models).
            expected_usd = observed_usd / math.exp(self.ew_log)
        cusums = zip(
            self.cusums + self.model_cusums, self.thresholds + self.model_thresholds, strict=True
        )
        return Verdict(
            kind="cost_per_request",
            scope=self.scope,
            ts=ts,
            score=max(c.stat / h for c, h in cusums),
            is_anomaly=anomalous,
            expected=expected_usd,
            observed=observed_usd,
            unit="usd",
            metric="cost per request",
            window_seconds=None,
            note=note,
            impact_usd_per_hour=(observed_usd - expected_usd) * requests_per_hour,
            resumes_unseen=self.unseen_alarm and anomalous,
        )

    def _large_enough(
        self, cusum: Cusum, t: float, usual: float, spread: float | None = None
    ) -> bool:
        """Whether a triggered CUSUM's rise is as large as stated.

        A rise that has lasted ``cost_sustained_seconds`` must typically reach
        ``cost_min_ratio`` (``cost_model_min_ratio`` within a model), and one that has lasted
        ``cost_lasting_seconds`` ``cost_drift_min_ratio``; a younger one must be a jump
        (``cost_jump_ratio``: busy features' costs wander by a third for minutes). A
        rise still growing (a drift) is judged by the later half of the run too, once that
        half has itself lasted ``cost_sustained_seconds`` and holds
        ``cost_drift_min_requests`` calls, against ``cost_drift_min_ratio``: the run's mean
        lags the current level by half the run, its later half by a quarter.
        """
        s = self.settings
        elapsed = t - cusum.run_start
        stated = self._min_ratio(spread is not None)
        needed = stated if elapsed >= s.cost_sustained_seconds else s.cost_jump_ratio
        if elapsed >= s.cost_lasting_seconds:
            needed = min(needed, s.cost_drift_min_ratio)
        # The per-model view (``spread`` given) judges the whole run a margin below its
        # mean too: its CUSUMs gather evidence fast enough to fire on short runs, whose
        # mean is flattered by the selection (a level of 1.3x met 1.5x on 40-80 calls).
        margin = 0.0 if spread is None else s.cost_model_run_margin_se
        if cusum.run_log / cusum.run_n - usual - margin * (spread or 0.0) / math.sqrt(
            cusum.run_n
        ) >= math.log(needed):
            return True
        if elapsed < 2 * s.cost_sustained_seconds:
            return False
        since, calls, log_sum = cusum.later_half(t)
        if calls < s.cost_drift_min_requests or t - since < s.cost_sustained_seconds:
            return False
        # One standard error below its mean: the CUSUM fired on the calls just seen, so
        # the later half is the part its selection flatters most.
        spread = self.spread if spread is None else spread
        lower = log_sum / calls - usual - spread / math.sqrt(calls)
        return lower >= math.log(s.cost_drift_min_ratio)

    def building(self) -> bool:
        """Whether evidence of a rise is building: no alarm, a CUSUM past
        ``incident_cost_wait_building_share`` of its threshold."""
        share = self.settings.incident_cost_wait_building_share
        if self.alarm_since is not None:
            return False
        cusums = zip(
            self.cusums + self.model_cusums, self.thresholds + self.model_thresholds, strict=True
        )
        return any(c.stat >= share * h for c, h in cusums)

    def _min_ratio(self, by_model: bool) -> float:
        """The stated rise: ``cost_model_min_ratio`` within a model, else ``cost_min_ratio``."""
        s = self.settings
        return s.cost_model_min_ratio if by_model else s.cost_min_ratio

    def _end_alarm(self) -> None:
        self.alarm_since = None
        self.unseen_alarm = False
        self.alarm_by_model = False
        for cusum in self.cusums + self.model_cusums:
            cusum.reset()

    def _accept(self, ref: CostReference | None) -> None:
        """Hours of the same level: it is the new normal."""
        if ref is not None:
            ref.relearn(self.last_anomalous)
            for model_ref in self.models.values():
                model_ref.relearn(self.last_anomalous)
        else:
            self.offset_sum += self.ew_z * (self.offset_n + self.settings.cost_user_prior_requests)
        self._end_alarm()


def _cusums(s: DetectorSettings) -> list[Cusum]:
    """Tuned to the stated rise (the first's allowance is set from the spread), to a rise
    of one standard deviation, to a jump, and to part of the calls shifted far."""
    return [
        Cusum(0.5),
        Cusum(0.5),
        Cusum(s.cost_large_k),
        TailCusum(s.cost_tail_share, s.cost_tail_alt_share),
    ]


def _thresholds(cusums: list[Cusum], s: DetectorSettings) -> list[float]:
    return [
        c.threshold(s.cost_arl0_requests)
        if isinstance(c, TailCusum)
        else cusum_threshold(c.k, s.cost_arl0_requests)
        for c in cusums
    ]


def log_spread(ref: CostReference) -> float:
    """Standard deviation of log cost in a reference (for tuning the CUSUM allowance)."""
    total = ref.total
    if total <= 0:
        return 1.0
    centres = [_LOG_MIN + (i + 0.5) * _BIN for i in range(_BINS)]
    mean = sum(w * c for w, c in zip(ref.weights, centres, strict=True)) / total
    var = sum(w * (c - mean) ** 2 for w, c in zip(ref.weights, centres, strict=True)) / total
    return math.sqrt(max(var, _BIN * _BIN / 12))


def _pooled_spread(models: dict[str, CostReference], t: float) -> float | None:
    """The spread of log cost within a model, pooled over the models whose spread has been
    measured (64 calls or more), weighted by their calls; None if none has."""
    total = variance = 0.0
    for ref in models.values():
        if ref.added >= 64:
            count = ref.count(t)
            total += count
            variance += count * ref.spread * ref.spread
    return math.sqrt(variance / total) if total > 0 else None


__all__ = ["CostDetector", "CostReference", "log_spread"]
