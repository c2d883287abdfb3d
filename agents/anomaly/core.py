"""What every detector shares: the point it is fed, the verdict it answers, and small
streaming statistics (time-decayed rates and means, count tail probabilities, CUSUMs).

Owns the :class:`Verdict` (score, expected, observed, unit, window, money at stake and
the sentence on-call reads) and the statistics that more than one detector uses. It
does not own any detector's decisions.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from statistics import NormalDist
from typing import Literal, Protocol, runtime_checkable

from scipy.special import betainc, gammainc, gammaincc

from app.anomaly_config import DetectorSettings

_inverse_normal = NormalDist().inv_cdf

NANOS_PER_USD = 1e9
# The engine closes event time a minute at a time (its tick); the alert lifecycle's clocks
# (a late key's lag) measure against the end of the minute being ticked.
TICK_SECONDS = 60

Kind = Literal["cost_per_request", "volume_spike", "volume_drop", "tier_mix"]

# Kinds whose measure is of calls (their cost): a scope's silence says nothing of it, so an
# alarm of these ends on calls judged normal (``resolve_min_normal_calls``). Not a user's:
# held open, users' cost alarms piled up (many fire when their feature's alarm ends, as its
# incident stops absorbing them) and kept incidents open (probe T).
EVIDENCE_KINDS = frozenset({"cost_per_request"})
AlarmEnd = Literal["holds", "normal", "silence"]


def is_user_scope(scope: str) -> bool:
    """Whether ``scope`` is a user's (``user:<id>``): the one test of "a user" for every
    rule that treats users apart (a user's cost detector has no reference of its own)."""
    return scope.startswith("user:")


def alarm_end(
    settings: DetectorSettings, kind: str, scope: str, quiet_seconds: float, normal_calls: int
) -> AlarmEnd:
    """Whether an alarm of ``kind`` for ``scope`` is over, ``quiet_seconds`` after its last
    anomalous call with ``normal_calls`` calls judged normal since: the one rule the cost
    detector's alarm and the alert lifecycle's incident both follow (issue 12: each kept a
    copy, with its own boundary). ``holds``: still on. ``normal``: nothing anomalous for
    ``resolve_after_seconds`` and, for a feature's or the global cost, at least
    ``resolve_min_normal_calls`` calls judged normal (a silence is no evidence of a cost; a
    request rate's or a user's silence is, see ``EVIDENCE_KINDS``). ``silence``: a feature's
    or the global cost with too few normal calls, but no anomalous call for
    ``resolve_silent_after_seconds``: over, and not seen back to normal."""
    if quiet_seconds < settings.resolve_after_seconds:
        return "holds"
    if kind not in EVIDENCE_KINDS or is_user_scope(scope):
        return "normal"
    if normal_calls >= settings.resolve_min_normal_calls:
        return "normal"
    if quiet_seconds >= max(settings.resolve_silent_after_seconds, 0):
        return "silence"
    return "holds"


@dataclass(frozen=True, slots=True)
class Point:
    """One observation for a detector: ``value`` at event time ``ts``; ``key`` is a label
    (the model served, for cost)."""

    ts: datetime
    value: float
    key: str = ""


@dataclass(frozen=True, slots=True)
class Verdict:
    """A detector's answer for one point. ``score``: higher = more anomalous.

    ``impact_usd_per_hour`` is the money at stake: extra spend per hour against what
    was expected (negative for less), when the detector can tell.
    """

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
    impact_usd_per_hour: float | None = None
    # A cost alarm raised in a scope's first calls after a silence closed its last alarm,
    # before any call showed its cost back to normal (``CostDetector``): the lifecycle
    # reopens the incident the silence closed (``incident_reopen_within_seconds``).
    resumes_unseen: bool = False

    @property
    def ratio(self) -> float | None:
        """observed / expected, when both are known and expected is positive."""
        if self.expected is None or self.observed is None or self.expected <= 0:
            return None
        return self.observed / self.expected

    @property
    def explanation(self) -> str:
        """One human sentence: what, where, expected vs observed, by how much, and the money."""
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
                # an expectation near 0 (a scope's first calls after a silence) made
                # "141544222629578.6x normal": a number nobody reads
                else f"over {RATIO_SHOWN:,.0f}x normal"
                if ratio > RATIO_SHOWN
                else f"{ratio:.1f}x normal"
                if ratio >= 1
                else f"{1 - ratio:.0%} below normal"
            )
            text = (
                f"{self.metric} for {self.scope} is {amount(obs, self.unit)}, "
                f"expected {amount(exp, self.unit)} ({how})"
            )
        if self.impact_usd_per_hour is not None:
            text += f"; {money_per_hour(self.impact_usd_per_hour)}"
        return f"{text}; {self.note}" if self.note else text


RATIO_SHOWN = 10_000.0  # beyond this, an alert says "over 10,000x normal"


def amount(value: float, unit: str) -> str:
    if unit.startswith("usd"):
        return f"${value:.4f}" if value < 1 else f"${value:,.2f}"
    return f"{value:,.1f}" if value < 100 else f"{value:,.0f}"


def money_per_hour(usd_per_hour: float) -> str:
    """``about $12.40/hour above expected`` (or below)."""
    size = abs(usd_per_hour)
    text = f"${size:,.2f}" if size >= 0.01 else f"${size:.4f}"
    return f"about {text}/hour {'above' if usd_per_hour >= 0 else 'below'} expected"


# The leads an alert's message may open with, one after the other in one lead: a recurrence
# ("recurring"), a severity update ("now critical (fired as a warning at ...)"), an
# escalation ("escalated").
_LEAD_PART = re.compile(r"escalated|recurring|now (?:info|warning|critical) \(fired as [^)]*\)")


def with_lead(lead: str, message: str) -> str:
    """``lead: message``; a message that opens with a lead already gets one lead naming
    both (``escalated, now critical (...): ...``), never two stacked ("now critical (...):
    recurring: ..." read as two prefixes), and a lead it has already is not added again."""
    head, sep, rest = message.partition(": ")
    parts = head.split(", ")
    if not sep or not all(_LEAD_PART.fullmatch(part) for part in parts):
        return f"{lead}: {message}"
    if lead in parts:
        return message
    return f"{lead}, {head}: {rest}"


@runtime_checkable
class Detector(Protocol):
    """The one protocol every detector speaks (River's ``learn_one``/``score_one`` in one
    verb): fed the points of its scope in event-time order, it learns each and answers a
    :class:`Verdict` (the score and the sentence on-call reads), or None when it has
    nothing to say. What a point's ``value`` measures is the detector's to say.

    The engine holds extra detectors through this protocol alone (``AnomalyEngine(
    detectors=[factory, ...])``, a :data:`DetectorFactory` per kind of detector), so a new
    one plugs in without touching the engine. Its three built-in detectors speak it too
    (their ``observe_point`` is their stand-alone use), but the engine calls their richer
    ``observe`` instead, because it ties scopes together through them (peer priors, the
    global rhythm, a feature's cost distribution, the money at stake).
    """

    scope: str

    def observe_point(self, point: Point) -> Verdict | None: ...


# Makes the detector of one scope (``user:<id>``, ``feature:<name>`` or ``global``), or
# None for a scope it does not watch. A plugged detector is stored in the engine's
# checkpoints, so it must pickle.
DetectorFactory = Callable[[str, DetectorSettings], Detector | None]


# -- statistics ---------------------------------------------------------------------------


def upper_tail(observed: float, expected: float, dispersion: float = 1.0) -> float:
    """P(X >= observed) for a quasi-Poisson X with this mean and variance/mean ratio."""
    if observed <= 0:
        return 1.0
    if expected <= 0:
        return 0.0
    return float(gammainc(observed / dispersion, expected / dispersion))


def mixture_tail(observed: float, expected: float, shape: float) -> float:
    """P(X >= observed) for a Gamma-Poisson (negative binomial) X with this mean and a Gamma
    of this shape on its rate: the count of a scope drawn at random from a population whose
    rates spread like that Gamma. Its tail falls like the Gamma's, exponentially, not like
    a quasi-Poisson's of the same variance (at a mean of 3.2 and shape 0.82, 90 calls are
    8e-10 here and 2e-20 there)."""
    if observed <= 0:
        return 1.0
    if expected <= 0:
        return 0.0
    return float(betainc(observed, shape, expected / (shape + expected)))


def lower_tail(observed: float, expected: float, dispersion: float = 1.0) -> float:
    """P(X <= observed) for a quasi-Poisson X with this mean and variance/mean ratio."""
    return float(gammaincc(observed / dispersion + 1.0, expected / dispersion))


def surprise(p_value: float) -> float:
    """-log10 of a probability, capped at 300."""
    return min(300.0, -math.log10(max(p_value, 1e-300)))


@functools.lru_cache(maxsize=4096)
def cusum_threshold(k: float, arl0: float) -> float:
    """CUSUM threshold h for allowance ``k`` (standard deviations) that gives an average of
    ``arl0`` steps between false triggers on N(0, 1) input (Siegmund's approximation)."""
    if k <= 0:
        raise ValueError("k must be > 0")
    # ARL0 ~ (exp(2 k h') - 2 k h' - 1) / (2 k^2) with h' = h + 1.166; solve by bisection.
    target = arl0 * 2 * k * k
    lo, hi = 0.0, 1000.0
    for _ in range(100):
        mid = (lo + hi) / 2
        a = 2 * k * (mid + 1.166)
        value = math.exp(min(a, 700.0)) - a - 1
        lo, hi = (mid, hi) if value < target else (lo, mid)
    return hi


class DecayedRate:
    """Events per second over an exponentially fading past (time constant ``tau``).

    ``count`` and ``exposure`` fade together, so the rate of a scope that was silent
    for a while falls smoothly, and one that has existed for a minute is not taken to
    know its rate as well as one that has existed for a day (``exposure`` says how much
    it knows).
    """

    __slots__ = ("at", "count", "exposure")

    def __init__(self) -> None:
        self.count = 0.0
        self.exposure = 0.0
        self.at: float | None = None

    def advance(self, t: float, tau: float) -> None:
        """Move to time ``t``: fade the past, and add the time passed to the exposure."""
        if self.at is None:
            self.at = t
            return
        dt = t - self.at
        if dt <= 0:
            return
        fade = math.exp(-dt / tau)
        self.count *= fade
        self.exposure = self.exposure * fade + tau * (1.0 - fade)
        self.at = t

    def skip_to(self, t: float) -> None:
        """Move to ``t`` without learning the time in between (an anomalous stretch)."""
        if self.at is None or t > self.at:
            self.at = t

    def at_time(self, t: float, tau: float) -> tuple[float, float]:
        """(count, exposure) as they would be at ``t`` (no change of state)."""
        if self.at is None:
            return 0.0, 0.0
        dt = t - self.at
        if dt <= 0:
            return self.count, self.exposure
        fade = math.exp(-dt / tau)
        return self.count * fade, self.exposure * fade + tau * (1.0 - fade)


class DecayedMean:
    """A mean over an exponentially fading past (time constant ``tau``), weighted by time."""

    __slots__ = ("at", "total", "weight")

    def __init__(self) -> None:
        self.total = 0.0
        self.weight = 0.0
        self.at: float | None = None

    def add(self, value: float, t: float, tau: float, weight: float = 1.0) -> None:
        """Add ``value`` (a mean over ``weight`` observations) at time ``t``."""
        if self.at is not None and t > self.at:
            fade = math.exp(-(t - self.at) / tau)
            self.total *= fade
            self.weight *= fade
        if self.at is None or t > self.at:
            self.at = t
        self.total += value * weight
        self.weight += weight

    def get(self, default: float = 0.0) -> float:
        return self.total / self.weight if self.weight > 0 else default


class Cusum:
    """One-sided CUSUM of standardised increments, with the run that feeds it.

    ``stat`` grows while the increments exceed ``k`` and falls back to 0 otherwise; the
    run (its length, the sum of its increments and of a value carried with each step,
    e.g. the cost) is the stretch since the statistic was last 0: the estimated change
    point and what came after it.
    """

    __slots__ = ("k", "marks", "run_carried", "run_log", "run_n", "run_start", "run_z", "stat")

    MARK_SECONDS = 15.0  # the run's running sums are noted at most this often
    MAX_MARKS = 256  # past that, every other note is dropped (their spacing doubles)

    def __init__(self, k: float) -> None:
        self.k = k
        self.stat = 0.0
        self.run_n = 0
        self.run_z = 0.0
        self.run_carried = 0.0
        self.run_log = 0.0
        self.run_start = 0.0
        # [time, calls before it, sum of carried logs before it]: where the run's later
        # part starts, for a rise that is still growing (see ``later_half``).
        self.marks: list[tuple[float, int, float]] = []

    def update(
        self, z: float, carried: float = 0.0, carried_log: float = 0.0, at: float = 0.0
    ) -> None:
        """Add one increment (and the values it carries: a value and its log) at time ``at``."""
        self._step(z - self.k, z, carried, carried_log, at)

    def _step(
        self, increment: float, z: float, carried: float, carried_log: float, at: float
    ) -> None:
        """Add ``increment`` to the statistic; the run notes the score ``z`` and the values."""
        self.stat = max(0.0, self.stat + increment)
        if self.stat == 0.0:
            self.reset()
        else:
            if self.run_n == 0:
                self.run_start = at
                self.marks = []
            marks = self.marks
            if not marks or at - marks[-1][0] >= self.MARK_SECONDS:
                marks.append((at, self.run_n, self.run_log))
                if len(marks) > self.MAX_MARKS:
                    del marks[1::2]
            self.run_n += 1
            self.run_z += z
            self.run_carried += carried
            self.run_log += carried_log

    def __setstate__(self, state: tuple[None, dict[str, object]] | dict[str, object]) -> None:
        # Checkpoints written before ``marks`` existed restore with no marks.
        self.marks = []
        slots = state[1] if isinstance(state, tuple) else state
        for name, value in (slots or {}).items():
            setattr(self, name, value)

    def reset(self) -> None:
        self.stat, self.run_n, self.run_z = 0.0, 0, 0.0
        self.run_carried = self.run_log = 0.0
        self.marks = []

    def later_half(self, now: float) -> tuple[float, int, float]:
        """The run's later half in time: (its start, its calls, the sum of their carried
        logs). Under a rise that keeps growing (a drift), the run's mean lags the current
        level by half the run; its later half lags by a quarter."""
        middle = (self.run_start + now) / 2
        for at, before, log_before in self.marks:
            if at >= middle:
                return at, self.run_n - before, self.run_log - log_before
        return now, 0, 0.0


class TailCusum(Cusum):
    """A CUSUM of how often calls land far up the tail: the log-likelihood ratio of "a share
    ``alt_share`` of the calls lands above the ``1 - tail_share`` quantile" against "the
    usual ``tail_share`` does" (a Bernoulli CUSUM).

    It finds part of the calls shifted far (half a feature's calls at 8x the tokens) in
    fewer calls than a CUSUM of the scores themselves, whose allowance every ordinary call
    pays and whose gain from a far call is capped by the rank's resolution. Its threshold is
    ``ln(arl0)`` (Lorden: a likelihood-ratio CUSUM with threshold h triggers falsely once in
    at least e^h steps). ``k`` is kept (0) so that code reading a CUSUM's allowance works.
    """

    __slots__ = ("cut", "hit", "miss")

    def __init__(self, tail_share: float, alt_share: float) -> None:
        super().__init__(0.0)
        self.tune(tail_share, alt_share)

    def tune(self, tail_share: float, alt_share: float) -> None:
        self.cut = _inverse_normal(1.0 - tail_share)  # the score above which a call counts
        self.hit = math.log(alt_share / tail_share)
        self.miss = math.log((1.0 - alt_share) / (1.0 - tail_share))

    def update(
        self, z: float, carried: float = 0.0, carried_log: float = 0.0, at: float = 0.0
    ) -> None:
        """One call: its score ``z`` counts as in the tail or not (the run's sums as
        :meth:`Cusum.update`'s)."""
        self._step(self.hit if z >= self.cut else self.miss, z, carried, carried_log, at)

    @staticmethod
    def threshold(arl0: float) -> float:
        return math.log(arl0)


__all__ = [
    "EVIDENCE_KINDS",
    "NANOS_PER_USD",
    "AlarmEnd",
    "Cusum",
    "DecayedMean",
    "DecayedRate",
    "Detector",
    "DetectorFactory",
    "Kind",
    "Point",
    "TailCusum",
    "Verdict",
    "alarm_end",
    "amount",
    "cusum_threshold",
    "duration_text",
    "is_user_scope",
    "lower_tail",
    "money_per_hour",
    "surprise",
    "upper_tail",
]


def duration_text(length: timedelta | float, *, exact: bool = False) -> str:
    """How long (a timedelta or seconds), as messages say it: seconds under 2 minutes,
    minutes under 2 hours, hours after ("90 s", "14 min", "2.5 h"; whole units, cut down).

    `exact` is a window's length, said to the second: rounded, in minutes only when they are
    whole and never in hours ("15 min", "150 s", "120 min").
    """
    total = length.total_seconds() if isinstance(length, timedelta) else length
    seconds = round(total) if exact else int(total)
    if seconds < 120 or (exact and seconds % 60):
        return f"{seconds} s"
    if exact or seconds < 7200:
        return f"{seconds // 60} min"
    return f"{seconds / 3600:.1f} h"
