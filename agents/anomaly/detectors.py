"""Anomaly detectors: River online models behind one small protocol.

Owns the statistics of "is this normal for this scope?": each detector is fed
one :class:`Point` at a time and answers with a :class:`Verdict` (score,
expected, observed, unit, and a sentence saying how far from normal). Three
detectors, one per question:

- :class:`CostDetector` -- cost per request. Per (scope, model served) a River
  ``anomaly.GaussianScorer`` on log cost; a request is an *outlier* when it is
  ``cost_outlier_z`` standard deviations and ``cost_outlier_min_ratio`` times above
  the scope's typical cost for that model. A lone outlier is not an anomaly: the
  verdict is anomalous once ``cost_min_outliers`` outliers, at least
  ``cost_min_outlier_share`` of the scope's requests, fall in
  ``cost_corroboration_seconds``. A scope without enough history of a model (a new
  user) is judged against a fallback detector (the user's feature).
- :class:`VolumeDetector` -- a per-minute series (requests/min or spend/min). A River
  ``time_series.HoltWinters`` (level + trend) forecasts the next minute, scaled by
  the *context* (how the rest of the traffic compares with its own forecast, so a
  swing common to everyone is not one scope's spike); a River ``stats.EWVar`` of the
  forecast errors gives the spread. The surprise of a value is a quasi-Poisson tail
  probability (variance = dispersion x expected, dispersion >= 1 for counts), so a
  user with 0.3 requests/min and the global stream with 300 are judged on the same
  scale, and a spike must also clear a ratio and an absolute floor. Spend is judged
  without the minute's few largest requests: a handful of big calls is a cost
  question, never a volume spike. ``peek`` judges the minute in progress.
- :class:`TierMixDetector` -- the economy-tier share. A River
  ``drift.PageHinkley(mode="down")`` fed 1/0 per request (economy or not) triggers;
  the drop is confirmed when the share of the last ``mix_confirm_requests``
  requests is ``mix_min_drop`` below the learned baseline, and lasts until it
  recovers.

Every detector is silent while warming up and does not learn from what it finds
anomalous, so an incident does not teach it that the incident is normal (outliers
and unusual-but-normal minutes are learned clipped, robust-smoothing style). A
change that lasts (``volume_adapt_after_minutes``, ``mix_adapt_after_seconds``) is
accepted as the new normal; a cost shift is absorbed slowly through the clipping.

Why not ``anomaly.PredictiveAnomalyDetection``: its threshold is the running mean
plus ``n_std`` deviations of *squared* errors over all history. Around the same
Holt-Winters forecaster on the replayed Azure trace (``n_std=3``) it flagged 0.8 to
3.7 % of ordinary minutes per series (a false alert every half hour or so), it
cannot tell a spike from a drop, and it raises if scored before the forecaster has
two points. The forecaster is used directly instead.

It does not own alert lifecycles (:mod:`agents.anomaly.alerting`), minute
bucketing and scope routing (:mod:`agents.anomaly.engine`), or Kafka.
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any, Literal, Protocol

from river import anomaly, drift, stats, time_series
from scipy.special import gammainc, gammaincc

NANOS_PER_USD = 1e9

Kind = Literal["cost_per_request", "volume_spike", "volume_drop", "tier_mix"]
VolumeMetric = Literal["requests", "spend", "value"]


@dataclass(frozen=True)
class DetectorSettings:
    """Every knob of anomaly detection, with the defaults the benchmark was tuned with.

    Times are event time. ``bench/anomaly.py`` measures what these defaults give on
    the Azure trace (detection delay, false alerts per day).
    """

    # -- cost per request ----------------------------------------------------------------
    cost_warmup_requests: int = 30
    """Requests a (scope, model) baseline needs before it judges; a user below this is
    judged against their feature's baseline."""
    cost_outlier_z: float = 3.0
    """A request is an outlier this many standard deviations of log cost above typical..."""
    cost_outlier_min_ratio: float = 3.0
    """... and at least this many times the typical cost (guards scopes with near-constant cost)."""
    cost_corroboration_seconds: int = 120
    """Window in which outliers corroborate each other."""
    cost_min_outliers: int = 3
    """Outliers needed in the window before the scope's cost is anomalous."""
    cost_min_outlier_share: float = 0.25
    """... and the share of the scope's requests in the window they must make up."""
    cost_history_window: int | None = None
    """Requests each baseline remembers (None: all, in O(1) memory; a number adapts faster
    but stores that many floats per scope and model)."""
    cost_max_models_per_scope: int = 16
    """Models remembered per scope (least recently used dropped first)."""

    # -- volume (requests/min, spend/min) --------------------------------------------------
    volume_warmup_minutes: int = 30
    """Minutes of history a series needs before it judges."""
    volume_level_smoothing: float = 0.2
    """Holt-Winters alpha: weight of the newest minute in the level."""
    volume_trend_smoothing: float = 0.02
    """Holt-Winters beta: weight of the newest change in the trend (follows the daily rhythm)."""
    volume_variance_fading: float = 0.02
    """Weight of the newest forecast error in the error variance (about 1/50 minutes)."""
    volume_robust_clip: float = 4.0
    """A minute further than this many spreads from its forecast is learned as if it were
    this far (robust exponential smoothing)."""
    volume_p_value: float = 1e-5
    """A feature's or the global minute is anomalous when a value this extreme had less than
    this probability."""
    volume_p_value_user: float = 1e-6
    """The same for a user's minute: stricter, because there are many users to test."""
    volume_long_run_fading: float = 1 / 240
    """Weight of each minute in the long-run mean (about 4 h)."""
    volume_long_run_floor: float = 0.5
    """A spike is measured against at least this share of the long-run mean, so a sparse user
    whose short-term forecast fell to 0 after a quiet hour is not a spike at 1 call."""
    volume_min_ratio: float = 1.5
    """A spike must also be at least this many times the expected value..."""
    volume_min_request_excess: float = 5.0
    """... and this many requests/min above it (requests series)..."""
    volume_min_spend_excess_usd: float = 0.05
    """... or this many USD/min above it (spend series)."""
    volume_spend_trim_requests: int = 3
    """Spend spikes are judged without the minute's this many largest requests (heavy-tailed
    costs: a few big legitimate calls must not look like a spend spike)."""
    volume_context_min_requests: float = 30.0
    """A user's or feature's forecast is scaled by how the rest of the traffic compares with
    its forecast, when the rest expects at least this many requests/min."""
    volume_drop_scope_kinds: tuple[str, ...] = ("global",)
    """Scope kinds ("global", "feature", "user") whose sudden drops are anomalies."""
    volume_drop_ratio: float = 0.5
    """A drop must be to at most this share of the expected value..."""
    volume_drop_min_expected: float = 20.0
    """... and only counts when at least this much was expected (thin traffic drops to 0 often)."""
    volume_adapt_after_minutes: int = 180
    """A level anomalous this long is learned as the new normal."""

    # -- tier mix ------------------------------------------------------------------------
    mix_warmup_requests: int = 200
    """Requests a scope needs before its economy share is judged."""
    mix_ph_delta: float = 0.15
    """Page-Hinkley delta: drops smaller than about twice this are ignored."""
    mix_ph_threshold: float = 10.0
    """Page-Hinkley lambda: evidence needed to trigger (higher: slower, fewer false triggers)."""
    mix_min_drop: float = 0.25
    """A trigger is confirmed when the recent share is this far (share points) below baseline."""
    mix_confirm_requests: int = 20
    """Requests the recent share is measured over."""
    mix_baseline_fading: float = 0.002
    """Weight of each request in the baseline share (about the last 500 requests)."""
    mix_adapt_after_seconds: int = 6 * 3600
    """A drop lasting this long is accepted as the new baseline."""

    # -- alerting ------------------------------------------------------------------------
    resolve_after_seconds: int = 600
    """An incident resolves after this long without an anomalous verdict."""
    cooldown_seconds: int = 1800
    """After a resolve, the same (kind, scope) does not fire again for this long."""
    critical_ratio: float = 10.0
    """Observed/expected (or expected/observed for drops) from which an alert is critical."""
    critical_share_drop: float = 0.4
    """Economy-share drop (share points) from which a tier-mix alert is critical."""

    # -- engine --------------------------------------------------------------------------
    allowed_lateness_seconds: float = 5.0
    """A minute closes this long after event time passes its end, so slightly late events
    still count in their own minute."""
    max_user_scopes: int = 5000
    """Users tracked at once; the least recently active is evicted beyond it."""
    idle_user_seconds: int = 24 * 3600
    """A user silent this long is evicted (their baselines start over if they return)."""
    max_gap_minutes: int = 24 * 60
    """An event-time jump longer than this skips the silent minutes instead of feeding zeros."""

    def __post_init__(self) -> None:
        for spec in fields(self):
            value = getattr(self, spec.name)
            if isinstance(value, int | float) and not isinstance(value, bool) and value < 0:
                raise ValueError(f"DetectorSettings.{spec.name}={value} must be >= 0")
        for name in (
            "volume_level_smoothing",
            "volume_trend_smoothing",
            "volume_variance_fading",
            "volume_p_value",
            "volume_p_value_user",
            "volume_long_run_fading",
            "cost_min_outlier_share",
            "mix_baseline_fading",
            "volume_drop_ratio",
        ):
            value = getattr(self, name)
            if not 0 < value <= 1:
                raise ValueError(f"DetectorSettings.{name}={value} must be in (0, 1]")
        for name in ("cost_warmup_requests", "cost_min_outliers", "mix_confirm_requests"):
            if getattr(self, name) < 1:
                raise ValueError(f"DetectorSettings.{name} must be at least 1")
        unknown = set(self.volume_drop_scope_kinds) - {"global", "feature", "user"}
        if unknown:
            raise ValueError(
                f"DetectorSettings.volume_drop_scope_kinds has {sorted(unknown)}; "
                "use global, feature or user"
            )

    @classmethod
    def with_options(cls, **options: object) -> DetectorSettings:
        """Defaults overridden by name. Text values (from a command line) are converted to
        the field's type; an unknown name or a bad value is a ValueError naming it."""
        defaults = {spec.name: getattr(cls(), spec.name) for spec in fields(cls)}
        unknown = sorted(set(options) - set(defaults))
        if unknown:
            valid = ", ".join(sorted(defaults))
            raise ValueError(f"unknown detector option(s) {', '.join(unknown)}; valid: {valid}")
        converted = {
            name: _convert(name, value, defaults[name]) if isinstance(value, str) else value
            for name, value in options.items()
        }
        return cls(**converted)  # type: ignore[arg-type]


def _convert(name: str, text: str, default: object) -> object:
    try:
        if isinstance(default, tuple):
            return tuple(part.strip() for part in text.split(",") if part.strip())
        if default is None or (isinstance(default, int) and not isinstance(default, bool)):
            if default is None and text.strip().lower() in ("", "none"):
                return None
            return int(text)
        if isinstance(default, float):
            return float(text)
    except ValueError:
        kind = "an integer" if default is None or isinstance(default, int) else "a number"
        raise ValueError(f"detector option {name}={text!r} must be {kind}") from None
    return text


@dataclass(frozen=True, slots=True)
class Point:
    """One observation for a detector.

    ``value`` is the cost of one request in nano-dollars (cost), a minute's total
    (volume), or 1.0/0.0 for economy tier or not (mix). ``key`` conditions the cost
    baseline (the model served). ``requests`` and ``trimmed`` describe a spend
    minute: how many requests, and the sum of its ``volume_spend_trim_requests``
    largest costs. ``context`` is how the rest of the traffic compares with its own
    forecast (1.3 = 30 % above): a volume forecast is scaled by it.
    """

    ts: datetime
    value: float
    key: str = ""
    requests: int = 0
    trimmed: float = 0.0
    context: float = 1.0


@dataclass(frozen=True, slots=True)
class Verdict:
    """A detector's answer for one point. ``score``: higher = more anomalous."""

    kind: Kind
    scope: str
    ts: datetime
    score: float
    is_anomaly: bool
    expected: float | None
    observed: float | None
    unit: str
    metric: str
    window_seconds: int | None
    warming_up: bool = False
    note: str = ""

    @property
    def ratio(self) -> float | None:
        """observed / expected, when both are known and expected is positive."""
        if self.expected is None or self.observed is None or self.expected <= 0:
            return None
        return self.observed / self.expected

    @property
    def explanation(self) -> str:
        """One human sentence: what, where, expected vs observed and by how much."""
        if self.warming_up:
            return f"{self.metric} for {self.scope}: still learning what is normal"
        exp, obs = self.expected, self.observed
        if exp is None or obs is None:
            return f"{self.metric} for {self.scope}: {self.note or 'no baseline'}"
        if self.kind == "tier_mix":
            text = (
                f"{self.metric} for {self.scope} is {obs:.0%}, expected {exp:.0%} "
                f"({(obs - exp) * 100:+.0f} points)"
            )
        else:
            ratio = self.ratio
            how = (
                "no baseline"
                if ratio is None
                else f"{ratio:.1f}x normal"
                if ratio >= 1
                else f"{1 - ratio:.0%} below normal"
            )
            text = (
                f"{self.metric} for {self.scope} is {_amount(obs, self.unit)}, "
                f"expected {_amount(exp, self.unit)} ({how})"
            )
        return f"{text}; {self.note}" if self.note else text


def _amount(value: float, unit: str) -> str:
    if unit.startswith("usd"):
        return f"${value:.4f}" if value < 1 else f"${value:,.2f}"
    return f"{value:,.1f}" if value < 100 else f"{value:,.0f}"


class Detector(Protocol):
    """What the engine needs from any detector: observe one point, get a verdict."""

    scope: str

    def observe(self, point: Point) -> Verdict: ...


def _epoch(ts: datetime) -> float:
    return ts.timestamp()


# -- cost per request -------------------------------------------------------------------


def _fit(scorer: anomaly.GaussianScorer) -> tuple[float, float, int]:
    """(mean, standard deviation, samples) of a GaussianScorer's fitted distribution."""
    gaussian: Any = scorer.gaussian  # proba.Gaussian, or utils.Rolling around one
    return float(gaussian.mu), float(gaussian.sigma), int(gaussian.n_samples)


@dataclass(slots=True)
class _Recent:
    """A request in the corroboration window: when, and whether it was an outlier."""

    at: float
    outlier: bool


class CostDetector:
    """Cost per request of one scope, against the scope's learned distribution per model."""

    kind: Kind = "cost_per_request"

    def __init__(self, scope: str, settings: DetectorSettings) -> None:
        self.scope = scope
        self.settings = settings
        self.baselines: OrderedDict[str, anomaly.GaussianScorer] = OrderedDict()
        self.recent: deque[_Recent] = deque()
        self.outliers_in_window = 0

    def baseline(self, model: str) -> anomaly.GaussianScorer | None:
        """The scope's warmed-up baseline of this model, if it has one."""
        scorer = self.baselines.get(model)
        if scorer is None:
            return None
        gaussian: Any = scorer.gaussian
        return scorer if gaussian.n_samples >= self.settings.cost_warmup_requests else None

    def _own(self, model: str) -> anomaly.GaussianScorer:
        scorer = self.baselines.get(model)
        if scorer is None:
            scorer = anomaly.GaussianScorer(
                window_size=self.settings.cost_history_window,
                grace_period=self.settings.cost_warmup_requests,
            )
            self.baselines[model] = scorer
            if len(self.baselines) > self.settings.cost_max_models_per_scope:
                self.baselines.popitem(last=False)
        else:
            self.baselines.move_to_end(model)
        return scorer

    def observe(
        self, point: Point, fallback: CostDetector | None = None, corroborates: bool = True
    ) -> Verdict:
        """Judge one request (``point.value`` = its cost in nanos, ``point.key`` = model).

        ``fallback`` judges it while this scope has no baseline of the model yet;
        ``corroborates=False`` keeps it out of this scope's outlier count (the engine's
        choice while the request's feature already has a cost incident).
        """
        s = self.settings
        cost_nanos = max(point.value, 1.0)
        log_cost = math.log(cost_nanos)
        own = self._own(point.key)
        reference = self.baseline(point.key)
        source = "own history"
        if reference is None and fallback is not None:
            reference = fallback.baseline(point.key)
            source = f"{fallback.scope} baseline"
        outlier = False
        z = 0.0
        typical_nanos: float | None = None
        if reference is not None:
            mu, sigma, _ = _fit(reference)
            sigma = max(sigma, 1e-9)
            z = (log_cost - mu) / sigma
            typical_nanos = math.exp(mu)
            outlier = z >= s.cost_outlier_z and cost_nanos >= s.cost_outlier_min_ratio * (
                typical_nanos
            )
            # Winsorised learning: an outlier teaches the baseline only up to the outlier
            # bound, so a persisting shift is learned slowly instead of never or at once.
            own.learn_one(None, min(log_cost, mu + s.cost_outlier_z * sigma))
        else:
            own.learn_one(None, log_cost)

        now = _epoch(point.ts)
        outlier = outlier and corroborates
        self.recent.append(_Recent(now, outlier))
        self.outliers_in_window += outlier
        horizon = now - s.cost_corroboration_seconds
        while self.recent and self.recent[0].at < horizon:
            self.outliers_in_window -= self.recent.popleft().outlier
        count = len(self.recent)
        corroborated = (
            self.outliers_in_window >= s.cost_min_outliers
            and self.outliers_in_window >= s.cost_min_outlier_share * count
        )
        note = (
            f"{self.outliers_in_window} of the last {count} requests in "
            f"{s.cost_corroboration_seconds} s were outliers (judged against {source})"
            if corroborated
            else ""
        )
        return Verdict(
            kind="cost_per_request",
            scope=self.scope,
            ts=point.ts,
            score=z,
            is_anomaly=corroborated,
            expected=None if typical_nanos is None else typical_nanos / NANOS_PER_USD,
            observed=cost_nanos / NANOS_PER_USD,
            unit="usd",
            metric="cost per request",
            window_seconds=s.cost_corroboration_seconds,
            warming_up=reference is None,
            note=note,
        )

    def idle(self, now: datetime) -> bool:
        """Whether the corroboration window is empty at ``now`` (nothing pending)."""
        return not self.recent or self.recent[-1].at < _epoch(now) - (
            self.settings.cost_corroboration_seconds
        )


# -- volume -----------------------------------------------------------------------------


def _upper_tail(observed: float, expected: float, dispersion: float) -> float:
    """P(X >= observed) for a quasi-Poisson X with this mean and variance/mean ratio."""
    if observed <= 0:
        return 1.0
    return float(gammainc(observed / dispersion, expected / dispersion))


def _lower_tail(observed: float, expected: float, dispersion: float) -> float:
    """P(X <= observed) for a quasi-Poisson X with this mean and variance/mean ratio."""
    return float(gammaincc(observed / dispersion + 1.0, expected / dispersion))


def _surprise(p_value: float) -> float:
    return min(300.0, -math.log10(max(p_value, 1e-300)))


def _context(point: Point) -> str:
    if abs(point.context - 1.0) < 0.05:
        return ""
    return f", expected scaled by {point.context:.2f} for the rest of the traffic"


_METRIC_TEXT = {"requests": "requests/min", "spend": "spend/min", "value": "value"}
_UNIT = {"requests": "requests/min", "spend": "usd/min", "value": "value"}


class VolumeDetector:
    """One per-minute series of one scope: a forecast, an error spread, a tail test.

    ``observe`` must be called exactly once per minute (zero for a silent minute);
    ``peek`` judges a minute still in progress without learning from it, so a spike
    is reported before its minute ends.
    """

    def __init__(
        self,
        scope: str,
        settings: DetectorSettings,
        metric: VolumeMetric = "requests",
        detect_drops: bool = False,
        interval_seconds: int = 60,
        p_value: float | None = None,
    ) -> None:
        self.scope = scope
        self.settings = settings
        self.metric = metric
        self.detect_drops = detect_drops
        self.interval_seconds = interval_seconds
        self.p_value = settings.volume_p_value if p_value is None else p_value
        self.forecaster = time_series.HoltWinters(
            alpha=settings.volume_level_smoothing, beta=settings.volume_trend_smoothing
        )
        self.errors = stats.EWVar(fading_factor=settings.volume_variance_fading)
        self.long_run = stats.EWMean(fading_factor=settings.volume_long_run_fading)
        # Spend: the mean cost of a request (without the largest ones), the smallest
        # possible variance/mean of a spend series (compound Poisson, equal costs).
        self.cost_mean = stats.EWMean(fading_factor=settings.volume_variance_fading)
        self.points = 0
        self.anomalous_since: float | None = None
        self._expected: float | None = None  # cached until the next observe
        self._spike_floor: float | None = None

    # -- the model's view -----------------------------------------------------------------
    def expected(self) -> float:
        """The forecast for the next point (>= 0)."""
        if self._expected is None:
            level = self.forecaster.level
            self._expected = max(0.0, float(self.forecaster.forecast(1)[0])) if level else 0.0
        return self._expected

    def spike_expected(self) -> float:
        """What a spike is measured against: the forecast, or part of the long-run mean."""
        return max(self.expected(), self.settings.volume_long_run_floor * self.long_run.get())

    def spike_floor(self, context: float = 1.0) -> float:
        """The smallest value that could be a spike now (cheap pre-check for :meth:`peek`)."""
        if self.warming_up:
            return math.inf
        if self._spike_floor is None:
            self._spike_floor = self.spike_expected()
        expected = self._spike_floor * context
        return max(expected * self.settings.volume_min_ratio, expected + self._min_excess())

    def dispersion(self, expected: float) -> float:
        """Variance/mean of the series around its forecast (quasi-Poisson)."""
        floor = 1.0 if self.metric == "requests" else 1e-12
        if self.metric == "spend":
            floor = max(floor, self.cost_mean.get())
        spread = self.errors.get() / expected if expected > 0 else 0.0
        return max(floor, spread)

    @property
    def warming_up(self) -> bool:
        return self.points < self.settings.volume_warmup_minutes

    def _min_excess(self) -> float:
        s = self.settings
        if self.metric == "requests":
            return s.volume_min_request_excess
        if self.metric == "spend":
            return s.volume_min_spend_excess_usd
        return 0.0

    def _judge(
        self, observed: float, judged: float, context: float, complete: bool
    ) -> tuple[Kind, float, bool, float]:
        """(kind, score, anomalous, expected) of ``judged`` (the observed value, or for
        spend the observed value without its largest calls)."""
        s = self.settings
        high = self.spike_expected() * context
        if judged > high:
            if judged < s.volume_min_ratio * high or judged - high < self._min_excess():
                return "volume_spike", 0.0, False, high
            p_value = _upper_tail(judged, max(high, 1e-9), self.dispersion(max(high, 1e-9)))
            return "volume_spike", _surprise(p_value), p_value < self.p_value, high
        expected = self.expected() * context
        if not self.detect_drops or not complete or observed >= expected:
            return "volume_spike", 0.0, False, expected
        floor = s.volume_drop_min_expected if self.metric == "requests" else 0.0
        if expected < floor or observed > s.volume_drop_ratio * expected:
            return "volume_drop", 0.0, False, expected
        p_value = _lower_tail(observed, expected, self.dispersion(expected))
        return "volume_drop", _surprise(p_value), p_value < self.p_value, expected

    def _verdict(
        self,
        point: Point,
        kind: Kind,
        score: float,
        anomalous: bool,
        expected: float,
        note: str = "",
        warming: bool = False,
    ) -> Verdict:
        return Verdict(
            kind=kind,
            scope=self.scope,
            ts=point.ts,
            score=score,
            is_anomaly=anomalous,
            expected=expected,
            observed=point.value,
            unit=_UNIT[self.metric],
            metric=_METRIC_TEXT[self.metric],
            window_seconds=self.interval_seconds,
            warming_up=warming,
            note=note,
        )

    def _judged_value(self, point: Point) -> float:
        if self.metric != "spend":
            return point.value
        if point.requests <= self.settings.volume_spend_trim_requests:
            return 0.0  # a few requests are a cost question, never a volume spike
        return point.value - point.trimmed

    # -- the protocol ---------------------------------------------------------------------
    def peek(self, point: Point) -> Verdict | None:
        """An anomalous verdict if ``point`` (the last interval up to now, not learned) is
        already a spike, else None."""
        judged = self._judged_value(point)
        if judged < self.spike_floor(point.context):
            return None
        kind, score, anomalous, expected = self._judge(
            point.value, judged, point.context, complete=False
        )
        if not anomalous:
            return None
        note = f"p < 1e-{int(score)} over the last {self.interval_seconds} s{_context(point)}"
        return self._verdict(point, kind, score, True, expected, note)

    def observe(self, point: Point) -> Verdict:
        """Judge a complete minute, then learn it (unless it was anomalous)."""
        s = self.settings
        forecast = self.expected()
        warming = self.warming_up
        if warming:
            kind: Kind = "volume_spike"
            score, anomalous, expected = 0.0, False, forecast
        else:
            kind, score, anomalous, expected = self._judge(
                point.value, self._judged_value(point), point.context, complete=True
            )
        now = _epoch(point.ts)
        note = ""
        if anomalous:
            if self.anomalous_since is None:
                self.anomalous_since = now
            elif now - self.anomalous_since >= s.volume_adapt_after_minutes * 60:
                # Anomalous for hours: this is the new normal. Learn it from now on.
                note = f"anomalous for {s.volume_adapt_after_minutes} min, now learned as normal"
                anomalous = False
        else:
            self.anomalous_since = None
        if not anomalous:
            self._learn(point, forecast)
        else:
            self.points += 1  # still a minute of age, without learning its value
        self._expected = self._spike_floor = None
        if anomalous:
            p_text = f"p < 1e-{int(score)}{_context(point)}" if score >= 1 else ""
            note = ", ".join(part for part in (p_text, note) if part)
        return self._verdict(point, kind, score, anomalous, expected, note, warming)

    def _learn(self, point: Point, forecast: float) -> None:
        # The forecaster learns the series itself (its level follows the swings common to
        # everyone, with a lag); the spread is learned around the forecast scaled by the
        # context, which removes most of that lag.
        value = float(point.value)
        expected = forecast * point.context
        if not self.forecaster.level:
            # Holt-Winters takes its first trend from its first two points; for a sparse
            # series (a user's 1, 0) that is a steep false trend. Start it flat instead.
            self.forecaster.learn_one(value)
        elif not self.warming_up:
            # Robust smoothing: a minute far from the forecast (but not anomalous) is
            # learned as if it were ``volume_robust_clip`` spreads away, so one odd minute
            # neither inflates the spread for an hour nor drags the level.
            limit = self.settings.volume_robust_clip * math.sqrt(
                self.dispersion(max(expected, 1e-9)) * max(expected, 1e-9)
            )
            value = expected + max(-limit, min(limit, value - expected))
        if self.forecaster.level:
            self.errors.update(value - expected)
        self.forecaster.learn_one(value)
        self.long_run.update(value)
        if self.metric == "spend" and point.requests > self.settings.volume_spend_trim_requests:
            trimmed_requests = point.requests - self.settings.volume_spend_trim_requests
            self.cost_mean.update((point.value - point.trimmed) / trimmed_requests)
        self.points += 1


# -- tier mix ---------------------------------------------------------------------------


class TierMixDetector:
    """The economy-tier share of one scope's requests; flags a drop."""

    kind: Kind = "tier_mix"

    def __init__(self, scope: str, settings: DetectorSettings) -> None:
        self.scope = scope
        self.settings = settings
        self.trigger = drift.PageHinkley(
            min_instances=settings.mix_warmup_requests // 2,
            delta=settings.mix_ph_delta,
            threshold=settings.mix_ph_threshold,
            alpha=1.0,  # no forgetting: a stationary share then never drifts into a trigger
            mode="down",
        )
        self.baseline = stats.EWMean(fading_factor=settings.mix_baseline_fading)
        self.recent: deque[float] = deque(maxlen=settings.mix_confirm_requests)
        self.requests = 0
        self.drop_baseline: float | None = None  # the share before the drop, while in one
        self.drop_since: float | None = None
        self._pending: tuple[int, float] | None = None  # (confirm by request n, baseline)
        self._recent_sum = 0.0

    def observe(self, point: Point) -> Verdict:
        """Judge one request (``point.value`` = 1.0 if served by the economy tier, else 0.0)."""
        s = self.settings
        economy = 1.0 if point.value >= 0.5 else 0.0
        if len(self.recent) == self.recent.maxlen:
            self._recent_sum -= self.recent[0]
        self.recent.append(economy)
        self._recent_sum += economy
        recent_share = self._recent_sum / len(self.recent)
        self.requests += 1
        self.trigger.update(economy)
        warming = self.requests < s.mix_warmup_requests
        now = _epoch(point.ts)
        note = ""
        if self.drop_baseline is None:
            if self.trigger.drift_detected and not warming:
                # Page-Hinkley saw a drop; confirm it on the share of the next few requests.
                self._pending = (self.requests + s.mix_confirm_requests, self.baseline.get())
            if self._pending is not None:
                confirm_by, baseline = self._pending
                if (
                    len(self.recent) == self.recent.maxlen
                    and recent_share <= baseline - s.mix_min_drop
                ):
                    self.drop_baseline, self.drop_since = baseline, now
                    self._pending = None
                elif self.requests >= confirm_by:
                    self._pending = None
            if self.drop_baseline is None and self._pending is None:
                self.baseline.update(economy)
        anomalous = False
        expected = self.baseline.get()
        if self.drop_baseline is not None:
            expected = self.drop_baseline
            assert self.drop_since is not None
            if recent_share > self.drop_baseline - s.mix_min_drop / 2:
                self.drop_baseline = self.drop_since = None  # recovered
            elif now - self.drop_since >= s.mix_adapt_after_seconds:
                note = f"low for {s.mix_adapt_after_seconds // 60} min, now learned as normal"
                self.baseline = stats.EWMean(fading_factor=s.mix_baseline_fading)
                self.baseline.update(recent_share)
                self.drop_baseline = self.drop_since = None
            else:
                anomalous = True
                note = f"share of the last {len(self.recent)} requests"
        return Verdict(
            kind="tier_mix",
            scope=self.scope,
            ts=point.ts,
            score=max(0.0, expected - recent_share),
            is_anomaly=anomalous,
            expected=expected,
            observed=recent_share,
            unit="share",
            metric="economy-tier share",
            window_seconds=None,
            warming_up=warming,
            note=note,
        )


__all__ = [
    "CostDetector",
    "Detector",
    "DetectorSettings",
    "Kind",
    "Point",
    "TierMixDetector",
    "Verdict",
    "VolumeDetector",
]
