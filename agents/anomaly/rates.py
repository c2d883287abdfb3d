"""Request-rate anomalies: is this scope calling far more (or, globally, far less) than usual?

Owns :class:`RateDetector`, one per scope (a user, a feature, the global stream), and
the :class:`PeerPrior` a feature lends its users. Every call of a scope is counted in
5-second slots; at each call the counts of the last 1, 2, 5, 15 and 60 minutes are
tested against what the scope's past says those windows should hold:

- **A reference that has not seen the window.** Each window has its own time-decayed
  rate, fed with the slots only once they leave that window, and never with a stretch
  that was anomalous. So the 5-minute test compares the last 5 minutes with the scope's
  history before them, and an incident does not teach the model that it is normal.
- **Empirical Bayes for quiet users.** A user's rate is a Gamma-Poisson posterior:
  a prior fitted to the rates of the other users of their feature, updated with their
  own calls over a day (``volume_user_memory_seconds``). A user seen 21 times in a day
  has a tight posterior of ~0.015 calls/min, so 5 calls a minute is a 300-fold jump
  with overwhelming evidence within a minute; a brand-new user inherits the peers'
  spread and is judged far more leniently. A user younger than the longest window is
  also judged on all the calls of their life against the feature's settled users
  (``volume_newcomer_peers``): a loop from the first call teaches the user's own
  reference that it is normal.
- **Over-dispersion, measured.** Real callers come in bursts (sessions, retries), so
  the tail test is quasi-Poisson: the variance/mean ratio of each window's count is
  learned per scope (from squared errors where counts are large, from how many other
  calls surround a call where they are small), and a user borrows the burstiness of
  their feature's users until they have their own.
- **Daily rhythm and surges of everyone.** Features and the global stream remember
  half an hour (they follow a daily rhythm); a user's day-long rate is scaled by how
  far the global rate is above its daily mean, and a surge of the rest of the traffic
  scales everyone's expectation (the surge is the global scope's alert).

The surprise of a count is its tail probability (regularised incomplete gamma), with
a Bonferroni factor for the windows tested; an effect-size floor (``volume_min_ratio``
and ``volume_min_count``) keeps large scopes from alerting on statistically certain
but small excesses. It does not own alert lifecycles or the choice of scopes.
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import accumulate

from agents.anomaly.core import (
    NANOS_PER_USD,
    DecayedMean,
    DecayedRate,
    Point,
    Verdict,
    duration_text,
    lower_tail,
    mixture_tail,
    surprise,
    upper_tail,
)
from app.anomaly_config import DetectorSettings

SLOT_SECONDS = 5
SEASON_BIN_SECONDS = 300  # the same time on previous days, in 5-minute bins
_BINS_A_DAY = 86400 // SEASON_BIN_SECONDS
_INF = math.inf
_PEARSON_MIN_EXPECTED = 5.0  # below this, burstiness is measured by neighbours, not squares
# a call's spread in each window, whether it started a user's session, and which windows'
# spreads are squared errors (the others: the excess of the calls just before it)
Spread = tuple[list[float], bool, tuple[bool, ...]]


@dataclass
class PeerPrior:
    """What a feature's users look like, for judging one of them: a Gamma(alpha, beta)
    prior on the rate (per second) and their pooled burstiness per window."""

    alpha: float = 0.0
    beta: float = 0.0
    users: int = 0
    burst: list[DecayedMean] = field(default_factory=list)  # every user's calls, pooled
    # the share of every user's calls that started a session, pooled
    sessions: DecayedMean = field(default_factory=DecayedMean)
    # per window, the burstiness of the users (each once) at ``volume_peer_burst_quantile``,
    # among those with enough calls of their own; None: too few such users
    user_burst: list[float | None] = field(default_factory=list)
    # (alpha, beta, users, the busiest one's rate per second): the Gamma of the users known
    # for the longest window and not in an alarm, which a newcomer is judged against
    # (``volume_newcomer_peers``)
    settled: tuple[float, float, int, float] = (0.0, 0.0, 0, 0.0)

    @property
    def ready(self) -> bool:
        return self.alpha > 0 and self.beta > 0

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__dict__.update(state)
        self.__dict__.setdefault("sessions", DecayedMean())  # a checkpoint from before sessions
        self.__dict__.setdefault("user_burst", [])  # ... from before users' quantile
        self.__dict__.setdefault("settled", (0.0, 0.0, 0, 0.0))  # ... from before newcomers


def fit_peer_prior(
    prior: PeerPrior,
    rates: list[tuple[float, float]],
    settled: list[tuple[float, float]] | None = None,
) -> None:
    """Fit ``prior`` to users' (count, exposure) over their memory, and its ``settled``
    Gamma to those of the users known for the longest window and not in an alarm."""
    prior.alpha, prior.beta, prior.users, _ = fit_gamma(rates)
    prior.settled = fit_gamma(settled or [])


def fit_gamma(rates: list[tuple[float, float]]) -> tuple[float, float, int, float]:
    """(alpha, beta, users, the highest rate): a Gamma fitted (method of moments) to users'
    rates; alpha and beta 0 for fewer than 3 users or none calling.

    The variance of the true rates is the variance of the estimates less their Poisson
    noise (count / exposure^2); it is kept at least (mean / 7)^2 so that a feature
    whose users look alike still leaves a new user room.
    """
    estimates = [(count / exposure, count / exposure**2) for count, exposure in rates if exposure]
    top = max((rate for rate, _ in estimates), default=0.0)
    if len(estimates) < 3:
        return 0.0, 0.0, len(estimates), top
    mean = sum(rate for rate, _ in estimates) / len(estimates)
    if mean <= 0:
        return 0.0, 0.0, len(estimates), top
    spread = sum((rate - mean) ** 2 for rate, _ in estimates) / (len(estimates) - 1)
    noise = sum(var for _, var in estimates) / len(estimates)
    variance = max(spread - noise, (mean / 7.0) ** 2)
    return mean * mean / variance, mean / variance, len(estimates), top


def peer_burst(
    bursts: list[list[DecayedMean]], windows: int, enough: float, quantile: float
) -> list[float | None]:
    """Per window, the ``quantile`` of users' own burstiness (their mean excess of calls just
    before a call), over the users with at least ``enough`` calls of it (each counted once);
    None where fewer than 3 users have."""
    out: list[float | None] = []
    for j in range(windows):
        known = sorted(b[j].get() for b in bursts if len(b) > j and b[j].weight >= enough)
        out.append(known[round(quantile * (len(known) - 1))] if len(known) >= 3 else None)
    return out


@dataclass(frozen=True, slots=True)
class _Rates:
    """``RateDetector.rates`` cached for the current slot, and what they were computed for."""

    alpha: float  # the peer prior's alpha (-1: none)
    rhythm: float
    spikes: list[tuple[float, float]]  # per window: (calls per second, Gamma shape)
    drops: list[tuple[float, float]]  # the same without the previous days' least level


class RateDetector:
    """The request count of one scope, tested over several windows as calls arrive."""

    __slots__ = (
        "_floors",
        "_rates",
        "alarm_seen",
        "alarm_since",
        "alarm_window",
        "burst",
        "counts",
        "daily",
        "detect_drops",
        "drop_alarm",
        "episode",
        "expired_slot",
        "exposures",
        "first_at",
        "frozen",
        "heads",
        "history_base",
        "is_user",
        "kind",
        "last_anomalous",
        "learned_slot",
        "mu",
        "outage_source",
        "outages",
        "p_value",
        "pearson",
        "recent",
        "refs",
        "scope",
        "season",
        "session_share",
        "session_starts",
        "sessions_span",
        "settings",
        "settled_peers",
        "slots",
        "spends",
        "steps",
        "tau",
        "unusual_at",
        "unusual_slots",
        "waiting",
        "wake_dispersion",
        "wake_high",
        "windows",
        "woke_at",
    )

    def __init__(self, scope: str, settings: DetectorSettings, kind: str) -> None:
        s = settings
        self.scope = scope
        self.settings = settings
        self.kind = kind
        self.is_user = kind == "user"
        self.windows = sorted(s.volume_windows_seconds)
        self.steps = [w // SLOT_SECONDS for w in self.windows]
        self.tau = s.volume_user_memory_seconds if self.is_user else s.volume_rate_memory_seconds
        self.p_value = s.volume_p_value_user if self.is_user else s.volume_p_value
        self.detect_drops = kind in s.volume_drop_scope_kinds
        self.slots: list[list[float]] = []  # [slot index, calls, nanos], oldest first
        self.heads = [0] * len(self.windows)  # first slot inside each window
        self.counts = [0] * len(self.windows)
        self.refs = [DecayedRate() for _ in self.windows]
        self.burst = [DecayedMean() for _ in self.windows]
        self.pearson = [DecayedMean() for _ in self.windows]
        self.daily = DecayedRate() if kind == "global" else None
        self.frozen: list[list[float]] = []  # [start, end] of anomalous stretches (not learned)
        # The global: its drop stretches not learned (an outage), entries of ``frozen``.
        # A feature or user: the global, whose outages it does not learn either (session
        # 31: the features learned a partial outage the global held back, and the calls
        # back paged each of them as a spike, "13.1x normal").
        self.outages: list[list[float]] = []
        self.outage_source: RateDetector | None = None
        self.first_at: float | None = None
        self.alarm_since: float | None = None
        self.last_anomalous = -_INF
        self.alarm_window = 0
        # per window, the latest call of the open alarm at which it alone was anomalous
        self.alarm_seen = [-_INF] * len(self.windows)
        # the open alarm's frozen stretch is a drop's (``_learn_drop`` may learn it)
        self.drop_alarm = False
        self.recent: deque[float] = deque(maxlen=3)  # times of the last calls
        self.episode: list | None = None  # an unusual stretch whose calls are held back
        # calls not yet learned: (time, Spread: the samples, whether the call started a
        # session, which samples are squared errors)
        self.waiting: deque[tuple[float, Spread]] = deque()
        self.expired_slot = -1
        self.exposures = [0.0] * len(self.windows)  # each reference's history, last computed
        self.learned_slot = -1
        self._rates: _Rates | None = None  # the rates of the current slot
        # a quiet user's most dispersion of the windows up to each, for the call being
        # judged (None outside a call's judgement: not kept)
        self._floors: list[float] | None = None
        self.mu = [0.0] * len(self.windows)  # expected calls per window, at the last call
        self.spends = [0.0] * len(self.windows)  # nano-dollars spent in each window
        # Features, global and busy users: calls learned per 5-minute bin of the last days
        # (NaN: a bin of an anomalous stretch, not learned), for the same time on previous
        # days (``volume_seasonal_days``).
        self.season: dict[int, float] | None = {} if kind != "user" else None
        self.woke_at: float | None = None  # the first call after a long silence
        # On waking at a time of day no previous day with calls has seen: (calls per
        # second, calls) of the busiest 5 minutes of the day before the silence (the
        # waking hour's reference instead of the same time on previous days) and the
        # calls per second of its busiest half hour (whether a user is busy), else None.
        self.wake_high: tuple[float, float, float] | None = None
        # In the waking hour, where a window is judged against the previous days (or the
        # day before the silence) instead of its own reference: per window, the calls per
        # second that own reference expects (it learned the silence), else None.
        self.history_base: list[float] | None = None
        # A feature's variance/mean per window at its waking call, where the waking hour is
        # judged against its history (``history_base``), else None: how bursty its runs
        # were before this one (``AnomalyEngine._woken_variance``).
        self.wake_dispersion: list[float] | None = None
        # Calls that would have paged on the scope's own reference, per 5-second slot of the
        # last days (alarmed or excused as recurring), and the excess per window they excuse
        # at this time of day (``volume_recurring_days``), cached per minute.
        self.unusual_slots: dict[int, int] = {}
        self.unusual_at: tuple[int, list[float] | None] | None = None
        # Users: times of the calls that started a session (``volume_session_gap_seconds``
        # after the previous call) within the longest window, and the share of the user's
        # calls that did.
        self.session_starts: deque[float] = deque()
        self.session_share = DecayedMean()
        # The window whose count of sessions made the last call unusual (0: none did)
        self.sessions_span = 0.0
        # Users: whether, at their first call, their feature had ``volume_newcomer_peers``
        # settled users (their young references then learn uncapped; see ``expire``)
        self.settled_peers = False

    def __setstate__(self, state: tuple[None, dict[str, object]] | dict[str, object]) -> None:
        slots = state[1] if isinstance(state, tuple) else state
        for name, value in (slots or {}).items():
            setattr(self, name, value)
        if not hasattr(self, "season"):  # a checkpoint from before the previous days
            self.season = {} if self.kind != "user" else None
            self.woke_at = None
        if not hasattr(self, "unusual_slots"):  # a checkpoint from before recurring days
            self.unusual_slots = {}
            self.unusual_at = None
        self._floors = None  # (a checkpoint from before the floors: not kept)
        cached = getattr(self, "_rates", None)
        if isinstance(cached, tuple):  # a checkpoint's bare tuple, from before _Rates:
            # (alpha, rhythm, spikes, drops), or an older 3-tuple (before drops): recomputed
            cached = _Rates(*cached) if len(cached) == 4 else None
        self._rates = cached
        if not hasattr(self, "wake_high"):  # a checkpoint from before unseen mornings
            self.wake_high = None
        if not hasattr(self, "history_base"):  # ... from before waking features' variance
            self.history_base = None
            self.wake_dispersion = None
        if not hasattr(self, "drop_alarm"):  # a checkpoint from before learned drops
            self.drop_alarm = False
        if not hasattr(self, "outages"):  # ... from before outages held from every scope
            self.outages = []
            self.outage_source = None
        if not hasattr(self, "alarm_seen"):  # ... from before stretches seen to end
            self.alarm_seen = [-_INF] * len(self.windows)
        if not hasattr(self, "settled_peers"):  # a checkpoint from before newcomers
            self.settled_peers = False
        if not hasattr(self, "session_starts"):  # a checkpoint from before sessions
            self.session_starts = deque()
            self.session_share = DecayedMean()
            self.sessions_span = 0.0
        # Calls not yet learned, from an older checkpoint: a bare spread (before sessions:
        # no session start), or without which spreads are squared errors (as then, by the
        # expected counts of now).
        squared = tuple(mu >= _PEARSON_MIN_EXPECTED for mu in self.mu)

        def upgrade(values: object) -> Spread:
            if isinstance(values, list):
                return (values, False, squared)
            assert isinstance(values, tuple)
            return values if len(values) == 3 else (values[0], values[1], squared)

        self.waiting = deque((at, upgrade(values)) for at, values in self.waiting)
        if self.episode is not None:
            self.episode[2] = [(at, upgrade(values)) for at, values in self.episode[2]]

    def use_settings(self, settings: DetectorSettings) -> None:
        """New thresholds (windows and memories stay as they were built)."""
        self.settings = settings
        self.p_value = settings.volume_p_value_user if self.is_user else settings.volume_p_value
        self.detect_drops = self.kind in settings.volume_drop_scope_kinds

    def expected_first(self) -> float:
        """Calls expected in the shortest window, as judged at the last call."""
        return self.mu[0]

    def excess_spend(self, j: int, cost_per_call_nanos: float) -> float:
        """Nano-dollars spent in window ``j`` beyond its expected calls at the usual cost."""
        return self.spends[j] - self.mu[j] * cost_per_call_nanos

    # -- counting -------------------------------------------------------------------------
    def expire(self, t: float) -> None:
        """Move the windows to end at ``t``. A slot leaving a window teaches that window's
        reference its calls, unless it was part of an anomalous stretch: each window's
        reference only learns what that window has finished judging."""
        slot = int(t // SLOT_SECONDS)
        if slot == self.expired_slot:
            return  # nothing leaves a window within a slot
        self.expired_slot = slot
        self._rates = None
        slots = self.slots
        for j, steps in enumerate(self.steps):
            cutoff = slot - steps
            h = self.heads[j]
            while h < len(slots) and slots[h][0] <= cutoff:
                index, calls, nanos = slots[h]
                learned = float(calls)
                # A window that is leaving while elevated (a ramp not yet paged) teaches its
                # reference at most the elevated level's floor: the reference follows a real
                # change slowly, and a surge in the making does not raise its own bar. Not a
                # user's reference that has not yet seen a window of history (the user is
                # younger than two windows: it learns from their first window on), where their
                # feature had settled users at their first call (a newcomer's, not one of a
                # fresh agent's first users, whose references all start together): its
                # expectation is their peers' prior, and capped at it, a new heavy user's
                # 60-minute reference learned 4 % of their calls and their 60-minute window
                # paged at 68 minutes ("88x normal" at their usual 3 a minute). (In a fresh
                # agent's first hour every user is young: capped, as before; uncapped, a
                # session caller's burstiness was learned lower and a long session paged.)
                cap = self.settings.volume_min_ratio * self.mu[j]
                young = self.settled_peers and t - (self.first_at or t) < 2 * self.windows[j]
                if self.mu[j] >= 1.0 and self.counts[j] > cap and not young:
                    learned *= cap / self.counts[j]
                self.counts[j] -= int(calls)
                self.spends[j] -= nanos
                self._learn(j, index * SLOT_SECONDS, learned, float(calls))
                h += 1
            self.heads[j] = h
        oldest = self.heads[-1]
        if oldest > 256:
            del slots[:oldest]
            self.heads = [h - oldest for h in self.heads]

    def _learn(self, j: int, at: float, calls: float, seen: float | None = None) -> None:
        """``calls``: what the reference learns of the slot (capped while elevated);
        ``seen``: the calls it held, what the days kept record (a ramp's calls as they
        came: capped, a support desk's 07:00 opening to 4 a minute was kept as 1.5, and
        the next morning was judged against that)."""
        if seen is None:
            seen = calls
        ref = self.refs[j]
        if ref.at is None:
            ref.at = at
        if at < ref.at:
            # A late call (history replayed into an agent that has seen later traffic):
            # counted with the weight it has left by now, not as a call of this moment.
            # At full weight, 1,479 calls of 4 to 1 hours ago raised the global reference
            # from 20 to 67 calls a minute and fired a live volume_drop (probe W).
            frozen = any(start <= at < end for start, end in self._stretches())
            if j == 0:
                self._season_add(at, self._season_value(at, seen, frozen))  # its own 5 min
            if not frozen:
                ref.count += calls * math.exp(-(ref.at - at) / self.tau)
                if j == 0 and self.daily is not None and self.daily.at is not None:
                    self.daily.count += calls * math.exp(-max(0.0, self.daily.at - at) / 86400.0)
            return
        stretches = self._stretches()
        for start, end in stretches:
            if end <= ref.at:
                continue
            if start >= at:
                break
            if start > ref.at:
                ref.advance(start, self.tau)
            ref.skip_to(min(end, at))
        ref.advance(at, self.tau)
        if any(start <= at < end for start, end in stretches):
            if j == 0:
                self._season_add(at, self._season_value(at, seen, True))
            return
        if j == 0:
            self._season_add(at, seen)
        ref.count += calls
        if j == 0 and self.daily is not None:
            self.daily.advance(at, 86400.0)
            self.daily.count += calls

    def _stretches(self) -> list[list[float]]:
        """The stretches not learned, by start: this scope's alarms', and the global's
        outages (``outage_source``)."""
        source = self.outage_source
        if source is None or not source.outages:
            return self.frozen
        return sorted([*self.frozen, *source.held_outages()])

    def held_outages(self) -> list[list[float]]:
        """The global: its outages, each up to ``volume_outage_hold_minutes`` from its start
        (the other scopes learn a level that lasts longer, as it is)."""
        hold = self.settings.volume_outage_hold_minutes * 60.0
        return [[start, min(end, start + hold)] for start, end in self.outages]

    def add_late(self, t: float, nanos: float) -> None:
        """Count a call that arrived after calls newer than it: in the slot it belongs to,
        in the windows that still hold that slot, in the references of those it left.
        It is not judged (its moment has passed)."""
        if not self.slots or int(t // SLOT_SECONDS) >= self.slots[-1][0]:
            self.expire(t)
            self._add(t, nanos)
            return
        index = int(t // SLOT_SECONDS)
        newest = int(self.slots[-1][0])
        self._rates = None
        position = bisect.bisect_left([entry[0] for entry in self.slots], index)
        exists = position < len(self.slots) and self.slots[position][0] == index
        if exists:
            entry = self.slots[position]
            entry[1] += 1
            entry[2] += nanos
        else:
            self.slots.insert(position, [index, 1, nanos])
        for j, steps in enumerate(self.steps):
            inside = index > newest - steps
            if not exists and (self.heads[j] > position or not inside):
                self.heads[j] += 1  # the new slot sits before this window's first slot
            if inside:
                self.counts[j] += 1
                self.spends[j] += nanos
            else:
                self._learn(j, index * SLOT_SECONDS, 1)

    def _add(self, t: float, nanos: float) -> None:
        self.recent.append(t)
        slot = int(t // SLOT_SECONDS)
        if self.slots and self.slots[-1][0] >= slot:
            entry = self.slots[-1]  # a slightly late call counts in the newest slot
            entry[1] += 1
            entry[2] += nanos
        else:
            self.slots.append([slot, 1, nanos])
        for j in range(len(self.counts)):
            self.counts[j] += 1
            self.spends[j] += nanos

    # -- the same time on previous days -----------------------------------------------------
    def _season_add(self, at: float, calls: float) -> None:
        season = self.season
        if self.settings.volume_seasonal_days <= 0:
            return
        if season is None:
            # A user's days are kept once they call like a feature (busy: few users are)
            if self.tau != self.settings.volume_rate_memory_seconds:
                return
            season = self.season = {}
        b = int(at // SEASON_BIN_SECONDS)
        season[b] = season.get(b, 0.0) + calls  # NaN stays NaN: the bin is not known
        oldest = b - (self.settings.volume_seasonal_days + 1) * _BINS_A_DAY
        while season:
            first = next(iter(season))
            if first >= oldest:
                break
            del season[first]

    def _season_value(self, at: float, calls: float, frozen: bool) -> float:
        """What the days kept hold for calls at ``at``: NaN (not known) for a stretch not
        learned, except at a time of day no previous day of this scope has seen (its first
        day there): an alarm then had nothing to be judged against, and what it held is
        all the next day knows of that time. Kept unknown, a feature's first morning ramp
        (in alarm: its half-hour reference follows a rise slowly) left the second morning
        judged against the night, "9.8/min, expected 0.4" (probe 57's D9). The next days
        judge against the least of the days kept (``seasonal_typical``): a first-day
        incident covers that time of day on the second day only."""
        if not frozen:
            return calls
        return math.nan if self._season_days(at) else calls

    def _season_days(self, t: float) -> list[int]:
        """The previous days whose same time this scope had seen, at least the stretch of it
        up to ``volume_seasonal_window_seconds`` later (1 = yesterday): before its first call
        a scope made none."""
        s = self.settings
        if self.season is None or s.volume_seasonal_days <= 0 or self.first_at is None:
            return []
        return [
            d
            for d in range(1, s.volume_seasonal_days + 1)
            if self.first_at <= t - d * 86400.0 + s.volume_seasonal_window_seconds
        ]

    def _season_bins(self, t: float, before: float, after: float) -> list[list[float]]:
        """Per previous day (``_season_days``), its calls in each 5-minute bin from ``before``
        seconds before this time of day to ``after`` seconds after (NaN: not known)."""
        season = self.season
        if season is None:
            return []
        days = []
        for d in self._season_days(t):
            centre = t - d * 86400.0
            first = int((centre - before) // SEASON_BIN_SECONDS)
            last = int((centre + after) // SEASON_BIN_SECONDS)
            days.append([season.get(b, 0.0) for b in range(first, last + 1)])
        return days

    def seasonal_high(self, t: float) -> tuple[float, float] | None:
        """(calls per second, calls) of the busiest 5 minutes of the previous days within
        ``volume_seasonal_window_seconds`` of this time of day, or None without such a day.
        The busiest stretch, not the mean: a working day that starts at 09:00 had half its
        rate over 08:45 to 09:15."""
        half = self.settings.volume_seasonal_window_seconds
        known = [c for day in self._season_bins(t, half, half) for c in day if not math.isnan(c)]
        if not known:
            return None
        calls = max(known)
        return calls / SEASON_BIN_SECONDS, calls

    def seasonal_typical(self, t: float) -> tuple[float, float] | None:
        """(calls per second, calls) over the half hour around this time of day
        (``volume_seasonal_window_seconds`` either side) on the previous day that had the
        fewest there, or None without a day that knows that half hour and held at least
        ``volume_min_count`` calls in it. The least day: one busy day does not raise the
        bar (a day with no call there, a day off, keeps it where it is)."""
        half = self.settings.volume_seasonal_window_seconds
        least: tuple[float, float] | None = None
        for day in self._season_bins(t, half, half):
            if any(math.isnan(c) for c in day):
                continue  # an alarm's stretch that day: not known
            calls = sum(day)
            if calls < self.settings.volume_min_count:
                return None
            rate = calls / (len(day) * SEASON_BIN_SECONDS)
            if least is None or rate < least[0]:
                least = (rate, calls)
        return least

    def seasonal_mean(self, t: float) -> float | None:
        """Calls per second of the previous day busiest within ``volume_seasonal_window_seconds``
        of this time of day, over that half hour (not its busiest 5 minutes: one session of
        a quiet user is no busy user), or None without such a day."""
        half = self.settings.volume_seasonal_window_seconds
        rates = [
            sum(day) / (len(day) * SEASON_BIN_SECONDS)
            for day in self._season_bins(t, half, half)
            if not any(math.isnan(c) for c in day)
        ]
        return max(rates) if rates else None

    def waking(self, t: float) -> bool:
        """Within an hour (twice the rate's memory) of the first call after a silence at
        least as long as that memory: the reference has learned the silence."""
        woke = self.woke_at
        return woke is not None and t - woke < 2 * self.settings.volume_rate_memory_seconds

    def _unseen_time_high(self, last: float, t: float) -> tuple[float, float, float] | None:
        """Waking at ``t`` from a silence since ``last``, at a time of day that no previous
        day with calls has seen (``volume_wake_history_seconds``): (calls per second,
        calls) of the busiest 5 minutes of the day before the silence, the waking hour's
        reference, and the calls per second of its busiest half hour (``seasonal_mean``'s
        counterpart: one session of a quiet user is no busy user); None where a previous
        day saw this time (``seasonal_high`` is), or without such a day's calls.

        A gateway started on a Monday afternoon in front of an office-hours product had no
        Monday morning: half an hour of memory had learned the night, and every feature
        paged at 09:00 on Tuesday, "expected 0.0"; and again on Wednesday, Tuesday's
        morning, in alarm, not kept as a morning. Started on a Friday afternoon: Saturday's
        and Sunday's mornings were seen, without a call all day (days off, not quiet
        mornings), and Monday paged the global scope and two features. A day that saw this
        time and had calls within half the history either side (a night of an active day)
        keeps the previous days' reference, as before: a burst at 03:00 is judged against
        nights, not against the day (an earlier attempt, which kept the level before every
        impossible silence, missed night bursts every night, and a product whose evening
        tailed off was judged each morning against its tail: session 28's review)."""
        s = self.settings
        season = self.season
        if season is None or s.volume_seasonal_days <= 0:
            return None
        half = s.volume_wake_history_seconds / 2
        for d in self._season_days(t):
            centre = t - d * 86400.0
            lo, hi = (
                int((centre - half) // SEASON_BIN_SECONDS),
                int((centre + half) // SEASON_BIN_SECONDS),
            )
            around = [season.get(b, 0.0) for b in range(lo, hi + 1)]
            if any(math.isnan(c) for c in around) or sum(around) >= s.volume_min_count:
                return None  # an active day saw this time (NaN: an alarm's calls, active)
        first = int((last - s.volume_wake_history_seconds) // SEASON_BIN_SECONDS)
        bins = [season.get(b, 0.0) for b in range(first, int(last // SEASON_BIN_SECONDS) + 1)]
        calls = max((c for c in bins if not math.isnan(c)), default=0.0)
        if calls <= 0:
            return None
        span = int(2 * s.volume_seasonal_window_seconds // SEASON_BIN_SECONDS) or 1
        half_hours = (sum(bins[i : i + span]) for i in range(max(1, len(bins) - span + 1)))
        busiest = max((c for c in half_hours if not math.isnan(c)), default=0.0)
        busiest /= span * SEASON_BIN_SECONDS
        if self.is_user and busiest * 60 < s.volume_busy_user_per_minute:
            return None  # a quiet user busy for a moment once (a session): judged as quiet
        return calls / SEASON_BIN_SECONDS, calls, busiest

    def seasonal_low(self, t: float) -> float | None:
        """Calls per second a typical previous day made at its lowest 5-minute stretch from
        5 minutes before this time of day to ``volume_seasonal_window_seconds`` after (the
        median over days), or None without such a day; no more than the same weekday a week
        before made (when ``volume_seasonal_days`` keeps it): a product used on weekends at
        a tenth of its weekdays was judged each Saturday and Sunday at 09:05 against the
        weekdays' median, and paged a drop on both days of every weekend (session 30)."""
        after = self.settings.volume_seasonal_window_seconds
        days = dict(
            zip(self._season_days(t), self._season_bins(t, SEASON_BIN_SECONDS, after), strict=True)
        )
        lows = sorted(
            min(known) / SEASON_BIN_SECONDS
            for day in days.values()
            if (known := [c for c in day if not math.isnan(c)])
        )
        if not lows:
            return None
        median = lows[(len(lows) - 1) // 2]
        week = days.get(7)
        # Only a week before with calls in every 5 minutes: an outage's silence is not
        # learned, but leaves no calls to mark its bins unknown (their count is 0), and an
        # outage a week after an outage was not paged.
        if week is None or not all(c > 0 for c in week):  # (NaN > 0 is False)
            return median
        return min(median, min(week) / SEASON_BIN_SECONDS)

    # -- the model ------------------------------------------------------------------------
    def rates(
        self,
        t: float,
        prior: PeerPrior | None = None,
        rhythm: float = 1.0,
        drops: bool = False,
    ) -> list[tuple[float, float]]:
        """Per window: (expected calls per second, Gamma shape of that estimate). Within a
        5-second slot the answer is reused (references change when slots leave windows).
        ``drops``: as a drop is judged, without the previous days' least level at this time
        (``seasonal_typical``), a floor for spikes only: on a light Saturday it expected a
        weekday's calls and paged the Saturday's drop twice."""
        alpha = prior.alpha if prior is not None else -1.0
        cached = self._rates
        if cached is not None and cached.alpha == alpha and abs(cached.rhythm - rhythm) < 0.01:
            return cached.drops if drops else cached.spikes
        out, base = self._compute_rates(t, prior, rhythm)
        self._rates = _Rates(alpha, rhythm, out, base)
        return base if drops else out

    def _compute_rates(
        self, t: float, prior: PeerPrior | None, rhythm: float
    ) -> tuple[list[tuple[float, float]], list[tuple[float, float]]]:
        """(rates for spikes, rates for drops): see ``rates``."""
        open_since = self.frozen[-1][0] if self.frozen and self.frozen[-1][1] == _INF else _INF
        if self.is_user:
            # A busy user follows their own rhythm, like a feature: half an hour of memory,
            # no prior; a quiet one keeps a day, their peers' prior and the global rhythm.
            s = self.settings
            count, exposure = self._read(0, t - self.windows[0], open_since)
            busy = exposure > 0 and count / exposure * 60 >= s.volume_busy_user_per_minute
            if not busy and self.season is not None and self.waking(t):
                # Busy at this time on previous days (the morning after a night off): judged
                # as then, against those days, not as a quiet user whose day is 16 h of night.
                # At a time no active previous day has seen, busy in a half hour of the day
                # before the silence: a heavy user first seen on a Monday at noon, judged on
                # Tuesday morning as a quiet user (a day of memory, the night learned), was
                # paged "15x to 27x normal" when the waking hour ended (session 28).
                wake = self.wake_high
                usual = wake[2] if wake is not None else self.seasonal_mean(t)
                busy = usual is not None and usual * 60 >= s.volume_busy_user_per_minute
            self.tau = s.volume_rate_memory_seconds if busy else s.volume_user_memory_seconds
            if busy:
                prior, rhythm = None, 1.0
        out = []
        exposures = self.exposures
        for j, w in enumerate(self.windows):
            count, exposure = self._read(j, t - w, open_since)
            exposures[j] = exposure
            if self.tau == self.settings.volume_rate_memory_seconds:
                shape = count
                rate = count / exposure if exposure > 0 else 0.0
            elif self.is_user and prior is not None and prior.ready:
                shape = prior.alpha + count
                rate = shape / (prior.beta + exposure) * max(1.0, rhythm)
            else:
                shape = count
                rate = count / exposure if exposure > 0 else 0.0
                if self.is_user:
                    rate *= max(1.0, rhythm)
            out.append((rate, shape))
        if self.season is not None:
            # The same time on previous days: the morning after a night without calls is
            # no spike when the mornings before looked the same (``volume_seasonal_days``).
            # Only in the first hour after a silence of at least the rate's memory (a night,
            # a lunch: the reference has learned the silence), and where those days' busiest
            # 5 minutes are more than the effect-size floor above it. A scope that never
            # stopped keeps its own reference with all its sensitivity: the busiest stretch
            # of a bursty scope is well above its usual rate, and delayed its ramps (a 10x
            # ramp of the Azure world's search feature, 126 -> 181 s).
            # The busiest 5 minutes must hold ``volume_min_count`` calls: one call at 17:37
            # yesterday is no evening rhythm, and as a reference of 1 call it taught a quiet
            # user's session that it was normal (a false page half an hour later, seed 11).
            # A window's reference holds the silence until the window and that reference's
            # memory have moved past the waking: the first hour for the shorter windows, 90
            # minutes for the hour's, whose first slot after a night is learned at 60
            # minutes against a reference of the night (a heavy user's hour then read "303
            # calls where 4 were expected" at 10:00, held back only where the shorter windows
            # expected enough calls to stop the test before it; session 28).
            woke, memory = self.woke_at, self.settings.volume_rate_memory_seconds
            reach = [
                woke is not None and t - woke < max(2 * memory, w + memory) for w in self.windows
            ]
            high = None
            if any(reach):
                wake = self.wake_high
                high = wake[:2] if wake is not None else self.seasonal_high(t)
            self.history_base = None
            if high is not None and high[1] >= self.settings.volume_min_count:
                floor = self.settings.volume_min_ratio
                replaced = [
                    near and high[0] > floor * rate
                    for near, (rate, _) in zip(reach, out, strict=True)
                ]
                if any(replaced):
                    self.history_base = [rate for rate, _ in out]
                out = [
                    (high[0], high[1]) if used else (rate, shape)
                    for used, (rate, shape) in zip(replaced, out, strict=True)
                ]
            base = out
            if not any(reach):
                # A scope that did not fall silent: a window is expected to hold at least
                # what this time of day held on the previous days (the least of them, over
                # the half hour around it). Its own reference follows a daily ramp only
                # slowly, and a feature with calls all night was judged each morning
                # against the night (probe 57's D9: "9.8/min, expected 0.4" at 07:01, five
                # pages on a day without incidents). A user with days kept (once busy) too:
                # a heavy user busy each afternoon learned the evening and the night with a
                # day of memory once quiet, and their ordinary morning paged ("0.7/min,
                # expected 0.1", probe 57's D3); one whose afternoon ramp had alarmed held
                # the morning in their hour's reference ("15.8/min, expected 1.5"). A quiet
                # user's days hold a few calls: a day with fewer than ``volume_min_count``
                # there leaves their reference as it is.
                typical = self.seasonal_typical(t)
                if typical is not None:
                    out = [
                        (typical[0], max(shape, typical[1])) if typical[0] > rate else (rate, shape)
                        for rate, shape in out
                    ]
            return out, base
        return out, out

    def _read(self, j: int, t: float, open_since: float) -> tuple[float, float]:
        """Window ``j``'s reference as it would be at ``t``, not faded over this scope's
        open alarm (from ``open_since``) nor over the global's outages, which ``_learn``
        skips when the next slot leaves the window. A user with no call since the first
        night of an office product (an outage to the global, no night seen before) read it
        as learned: its 15- and 60-minute references, faded over the night, expected 1e-15
        calls a second at 09:02, and it paged at 09:37 "expected 0.0 (over 10,000x
        normal)" (session 31)."""
        ref = self.refs[j]
        t = min(t, open_since)
        source = self.outage_source
        if source is not None and source.outages and ref.at is not None:
            since = ref.at
            t -= sum(
                max(0.0, min(end, t) - max(start, since)) for start, end in source.held_outages()
            )
        return ref.at_time(t, self.tau)

    def rhythm(self, t: float) -> float:
        """Global only: the current rate over the daily mean rate (0.25 to 4)."""
        if self.daily is None:
            return 1.0
        fast = self.refs[0].at_time(t - self.windows[0], self.tau)
        daily = self.daily.at_time(t - self.windows[0], 86400.0)
        if fast[1] <= 0 or daily[1] < 3600 or daily[0] <= 0:
            return 1.0
        return min(4.0, max(0.25, (fast[0] / fast[1]) / (daily[0] / daily[1])))

    def dispersion(self, j: int, expected: float, prior: PeerPrior | None) -> float:
        """Variance/mean of window ``j``'s count around ``expected`` (>= 1).

        For a quiet user's window that expects few calls (its variance/mean measured by the
        calls just before each call), at least that of every shorter window (at the same
        rate): calls that come in clusters (sessions, retries) make the variance/mean of a
        count grow with the window's length until the window holds whole clusters, never
        shrink. Those longer windows are measured on few calls, and a fresh agent's first
        day read session callers' 5- and 15-minute counts as Poisson (1.0, where their
        1-minute count already showed 2 to 3, and a day of their calls shows 6 to 10): their
        long sessions paged 14 and 20 times on the synthetic worlds' first days
        (``tests/unit/test_anomaly_first_day.py``). Windows that expect more calls are
        measured by squared errors, which also hold what the expectation misses (a busy
        user's rhythm): not floored (a busy session caller's 5.5x rise in
        ``test_anomaly_session_world`` went unpaged with them floored)."""
        raw = self._raw_dispersion(j, expected, prior)
        if j > 0 and self.is_user and not self.busy_user and expected < _PEARSON_MIN_EXPECTED:
            # The shorter windows expect fewer calls still: measured by the calls just
            # before each call, independently of the expectation. Computed once a call.
            # floors[i]: the most of windows 0..i (as far as asked in this call)
            floors = self._floors if self._floors is not None else []
            while len(floors) < j:
                i = len(floors)
                floors.append(max(floors[-1] if floors else 1.0, self._excess_dispersion(i, prior)))
            raw = max(raw, floors[j - 1])
        return raw

    def _raw_dispersion(self, j: int, expected: float, prior: PeerPrior | None) -> float:
        if expected >= _PEARSON_MIN_EXPECTED and self.pearson[j].weight > 0:
            # Few squared errors lean on what the calls just before each call say (the
            # window expected under 5 calls until lately: a user near 2.5 calls a minute
            # has both kinds of samples of their 2 minutes), not on Poisson: squared
            # errors taken only in the moments the expectation was over 5 held a session
            # caller's 2-minute window at 1, and its next session paged (session 24).
            p = self.pearson[j]
            lean = self._excess_dispersion(j, prior)
            return max(1.0, (p.total + 5.0 * lean) / (p.weight + 5.0))
        return self._excess_dispersion(j, prior)

    def _excess_dispersion(self, j: int, prior: PeerPrior | None) -> float:
        """Variance/mean of window ``j`` from the calls just before each call (their
        excess over expected): 1 + 2 x the mean excess (>= 1)."""
        own = self.burst[j]
        if self.is_user:
            # The user's own burstiness, leaning on their peers' (or on none: Poisson)
            # until they have made ``volume_peer_burst_requests`` calls. A user steadier
            # than their peers, with at least half that many calls of their own, weighs as
            # many independent events as each side holds (calls over their own dispersion,
            # as a count's tail is judged): a steady caller's 21 calls are 21 events, the
            # peers' 20 calls in sessions of 3 to 8 about 4. Otherwise by calls: a bursty
            # user is not outweighed by steady peers' many calls, and a few calls of a
            # session caller can look steady by chance (probe U: without the floor of
            # calls, quiet session callers' normal sessions paged on the bench).
            m = self.settings.volume_peer_burst_requests
            pooled = _peers_excess(j, prior)
            mine = own.get(0.0)
            own_w, peer_w = own.weight, m
            if mine < pooled and own.weight >= m / 2:
                own_w /= 1.0 + 2.0 * max(0.0, mine)
                peer_w /= 1.0 + 2.0 * max(0.0, pooled)
            excess = (own_w * mine + peer_w * pooled) / (own_w + peer_w) if own_w + peer_w else 0.0
        else:
            excess = own.get(0.0)
        return 1.0 + 2.0 * max(0.0, excess)

    def _newcomer(
        self,
        t: float,
        prior: PeerPrior | None,
        rhythm: float,
        scales: list[float],
        tested: int,
        single: bool,
    ) -> tuple[float, int, float, int, float] | None:
        """A user first seen less than the longest window ago, judged on every call they have
        made against the settled users of their feature (``PeerPrior.settled``, once there
        are ``volume_newcomer_peers`` of them): (p, the shortest window holding the user's
        life, the calls a user of the feature makes in it, the calls, the seconds of the
        life, at least the shortest window's); None when not judged.

        A new user is a random user of the feature: their count is Gamma-Poisson around the
        settled users' mean rate, with the Gamma's shape (``mixture_tail``), counted in the
        peers' clusters (sessions: the count and its mean over their variance/mean). None of
        the user's own calls shape the test: a loop from the first call taught the user's
        own reference and burstiness that it was normal, and after a minute made them a
        "busy" user judged on their own last minutes. Judged only where the calls are also
        ``volume_min_ratio`` times what the feature's busiest settled user makes (a Gamma's
        tail is thinner than users' log-normal or Zipf rates: a new heavy user at 3 a minute
        among users up to 1.5 paged on 2 of 5 seeds without it), over a life of at least
        ``volume_burst_seconds`` (a first session is no loop), with the last calls still
        at that pace; never for a user of several features (their calls are not one
        feature's) or with an alarm over in their life (its calls were paged then)."""
        s = self.settings
        if prior is None or not self._life_judged(t, prior, single):
            return None
        assert self.first_at is not None
        alpha, beta, _, top = prior.settled
        age = t - self.first_at
        j = bisect.bisect_left(self.windows, age)
        x = self.counts[j]
        scale = max(1.0, rhythm) * scales[j]
        span = max(age, s.volume_burst_seconds)
        mu = alpha / beta * scale * span
        busiest = s.volume_min_ratio * top * scale
        if x < s.volume_min_count or x < max(busiest * span, s.volume_min_ratio * mu):
            return None
        recent = self.recent
        full = len(recent) == recent.maxlen and t > recent[0]
        if full and (len(recent) - 1) / (t - recent[0]) < busiest:
            return None  # the excess is not current (a loop that stopped)
        # The peers' burstiness over the user's life: a count's variance/mean grows with the
        # span while it holds whole sessions (see ``dispersion``), so it is taken between the
        # windows on either side, by the log of the life's length (at 341 s, the 15-minute
        # window's 10.6 where 5 minutes' is 7.4).
        # As in ``dispersion``, a window is at least as over-dispersed as the shorter ones.
        life = max(age, float(self.windows[0]))
        floors = list(accumulate((max(0.0, _peers_excess(i, prior)) for i in range(j + 1)), max))
        excess = floors[j]
        if j > 0 and life < self.windows[j]:
            lo, hi = self.windows[j - 1], self.windows[j]
            share = math.log(life / lo) / math.log(hi / lo)
            excess = floors[j - 1] + share * (floors[j] - floors[j - 1])
        d = 1.0 + 2.0 * excess
        p = mixture_tail(x / d, mu / d, alpha) * (tested + 1)
        return p, j, alpha / beta * scale * life, x, life

    def _life_judged(self, t: float, prior: PeerPrior | None, single: bool) -> bool:
        """Whether this user's life is judged against the settled users of their feature
        (``_newcomer``): a user younger than the longest window, of one feature, with no
        alarm over in their life, whose feature has ``volume_newcomer_peers`` settled
        users."""
        return (
            self.is_user
            and single
            and self._peers_settled(prior)
            and self.first_at is not None
            and t - self.first_at < self.windows[-1]
            and not any(end != _INF for _, end in self.frozen)
        )

    def _peers_settled(self, prior: PeerPrior | None) -> bool:
        """Whether ``prior`` has the ``volume_newcomer_peers`` settled users a newcomer is
        judged against (not in a fresh agent's first hour)."""
        n = self.settings.volume_newcomer_peers
        return n > 0 and prior is not None and prior.settled[2] >= n and prior.settled[0] > 0

    def _forget_life(self) -> float:
        """A newcomer paged on their life: everything they taught their own references and
        burstiness is the incident (a loop from the first call), and is forgotten, so that
        once known for the longest window their own windows judge it against their peers,
        not against itself (probe R: a loop paged 5 minutes in resolved "back to normal" at
        63 minutes, its 1-minute reference at 8.7 a minute, and never paged again). Returns
        where the stretch not to learn begins: before the first call."""
        assert self.first_at is not None
        self.refs = [DecayedRate() for _ in self.windows]
        self.burst = [DecayedMean() for _ in self.windows]
        self.pearson = [DecayedMean() for _ in self.windows]
        self.session_share = DecayedMean()
        self.waiting.clear()
        self._rates = None
        return self.first_at - SLOT_SECONDS

    def _sessions(self, prior: PeerPrior | None) -> tuple[float, float] | None:
        """(share of this user's calls that start a session, calls that share is known
        from), leaning on their peers' for their first ``volume_peer_burst_requests``
        calls, with one start added (a share of 0 is not known, and would make any
        session a certainty); None before any call was learned."""
        own = self.session_share
        pooled = prior.sessions if prior is not None else None
        peers = pooled is not None and pooled.weight > 0
        peer_w = self.settings.volume_peer_burst_requests if peers else 0.0
        known = own.weight + peer_w
        if known <= 0:
            return None
        starts = own.total + (peer_w * pooled.get() if pooled is not None else 0.0)
        return (starts + 1.0) / (known + 1.0), known + 1.0

    def _current(self, t: float, expected: list[tuple[float, float]], context: float) -> bool:
        """Whether the excess is still going on: the last minute is ``volume_min_ratio``
        above normal (a busy scope), or the last three calls came that much faster than
        normal (a quiet one). A burst that ended stays in the long windows for an hour."""
        ratio = self.settings.volume_min_ratio
        rate = expected[0][0] * context
        if rate * self.windows[0] >= _PEARSON_MIN_EXPECTED:
            return self.counts[0] >= ratio * rate * self.windows[0]
        if len(self.recent) < self.recent.maxlen:  # type: ignore[operator]
            return True
        span = t - self.recent[0]
        return span <= 0 or (len(self.recent) - 1) / span >= ratio * rate

    def _knows(self, j: int, t: float, prior: PeerPrior | None) -> bool:
        """Whether window ``j``'s reference has seen at least a window's worth of history."""
        if self.is_user and prior is not None and prior.ready:
            return True
        return self.exposures[j] >= self.windows[j]  # as of the last ``rates``

    def warm(self, t: float, prior: PeerPrior | None) -> bool:
        if self.first_at is None:
            return False
        if self.is_user and prior is not None and prior.ready:
            return True
        return t - self.first_at >= self.settings.volume_warmup_seconds

    # -- the protocol ---------------------------------------------------------------------
    def observe_point(self, point: Point) -> Verdict | None:
        """The :class:`~agents.anomaly.core.Detector` protocol, for this scope alone: one
        call at ``point.ts`` costing ``point.value`` nano-dollars (no peers, no rhythm)."""
        return self.observe(point.ts, cost_nanos=point.value)

    def observe(
        self,
        ts: datetime,
        *,
        prior: PeerPrior | None = None,
        rhythm: float = 1.0,
        context: float = 1.0,
        levels: Callable[[], list[float] | None] | None = None,
        excused: Callable[[], list[float] | None] | None = None,
        cost_per_request_usd: float = 0.0,
        cost_nanos: float = 0.0,
        single_feature: bool = True,
    ) -> Verdict | None:
        """Count one call at ``ts`` (costing ``cost_nanos``) and judge the windows ending there.
        ``single_feature``: a user's calls so far were all of the feature ``prior`` is of.
        ``levels``: gives, per window, the rest of the traffic's count over its expected
        count (asked only for a busy user, whose expectation follows it instead of
        ``context``, a surge of the rest in the last minute; ``volume_busy_user_rest_level``).
        ``excused``: gives, per window, variance of the count to add to the scope's own
        (asked only when a window looks unusual: the global's, of features that woke as on
        their previous days; ``AnomalyEngine._woken_variance``).

        Returns an anomalous verdict, or (while an alarm is open) a normal one saying the
        current value, else None.
        """
        t = ts.timestamp()
        if self.first_at is None:
            self.first_at = t
            # A newcomer to a feature with settled users (not one of a fresh agent's first)
            self.settled_peers = self.is_user and self._peers_settled(prior)
        if (
            self.alarm_since is not None
            and t - self.last_anomalous > self.settings.resolve_after_seconds
        ):
            # Over since (its alert resolved at a minute tick): this call starts afresh and
            # does not extend it. Closed only now, as a scope's alarm has no clock of its own.
            self._close_alarm()
        memory = self.settings.volume_rate_memory_seconds
        woke = bool(self.recent) and t - self.recent[-1] >= memory
        if woke:
            self.woke_at = t  # the first call after a silence (a night, a lunch)
            self._rates = None
        self.expire(t)
        if woke:  # (the calls before the silence are in its days only once expired)
            self.wake_high = self._unseen_time_high(self.recent[-1], t)
        expected = self.rates(t, prior, rhythm)
        self.mu = [rate * w for (rate, _), w in zip(expected, self.windows, strict=True)]
        if woke and self.kind == "feature":
            self.wake_dispersion = (
                [self.dispersion(j, mu, None) for j, mu in enumerate(self.mu)]
                if self.history_base is not None
                else None
            )
        rest = levels() if self.busy_user and levels is not None else None
        if rest is None:
            scales = [context] * len(self.windows)
            judged = self.mu
        else:
            # A busy user's count given everyone's in the same window: users of one product
            # rise and fall together (the Azure trace's minutes: a busy user's 5 minutes vary
            # 3.8 times as much as Poisson around their own rate, 1.2 times given the rest's
            # count), and that shared variation is not the user's over-dispersion: it is
            # learned around the expectation scaled both ways. The test scales it up only
            # (a lull of everyone, or the end of everyone's working day, is no spike of the
            # one user still calling; unscaled, the test is the more lenient).
            scales = [max(1.0, level) for level in rest]
            judged = [mu * level for mu, level in zip(self.mu, rest, strict=True)]
        # How this call sits among its neighbours: squared errors where many calls are
        # expected, the calls just before it (their excess over expected) where few are.
        # Which of the two a window's sample is, is kept with it: it is learned up to
        # ``volume_burst_seconds`` later, when the expectation may have crossed 5 calls.
        squared = tuple(mu >= _PEARSON_MIN_EXPECTED for mu in judged)
        spread = [
            min((count - mu) ** 2 / mu, 25.0) if sq else min(count - mu, 10.0) if mu > 0 else 0.0
            for count, mu, sq in zip(self.counts, judged, squared, strict=True)
        ]
        started = self.is_user and (
            not self.recent or t - self.recent[-1] > self.settings.volume_session_gap_seconds
        )
        if self.is_user:
            starts = self.session_starts
            if started:
                starts.append(t)
            while starts and starts[0] <= t - self.windows[-1]:
                starts.popleft()
        self._add(t, cost_nanos)
        verdict, best_p = None, 1.0
        if self.warm(t, prior):
            self._floors = []  # computed once for this call (its peers, its burstiness)
            verdict, best_p = self._judge(
                ts,
                t,
                expected,
                prior,
                scales,
                cost_per_request_usd,
                self._recurring(t),
                rhythm,
                single_feature,
                excused,
            )
            self._floors = None
        slot = int(t // SLOT_SECONDS)
        fresh = slot != self.learned_slot
        if fresh or best_p < 1.0:
            # Burstiness is sampled once per slot (a busy scope has many calls per slot),
            # and always when the call looked unusual (it may open a stretch not learned).
            # But a squared error is a sample of the count at a moment: a second one in
            # the same slot would weigh the moments when the count is high (a session's
            # calls a second apart) several times, and inflate the variance/mean that every
            # later test divides its evidence by (the bench's synthetic summarize: 3.06
            # over a minute where its counts vary by 2.02; probe E). The calls just before
            # a call (quiet scopes' windows) are sampled as before.
            self.learned_slot = slot
            if not fresh:
                spread = [
                    math.nan if sq else value for value, sq in zip(spread, squared, strict=True)
                ]
            self._dispersion_episode(t, (spread, started, squared), best_p, prior)
        return verdict

    def _dispersion_episode(
        self,
        t: float,
        sample: Spread,
        p: float,
        prior: PeerPrior | None,
    ) -> None:
        """Learn how bursty the scope is, without learning its incidents.

        Every call waits ``volume_burst_seconds`` before it teaches the dispersion. A call
        that looks unusual opens an episode, which takes in the calls still waiting (the
        start of the burst) and the calls that follow; the episode is learned only if it
        is over within ``volume_burst_seconds`` (a session, a retry storm: the scope's
        normal bursts), never if it lasts longer (a loop, a ramp). Users lean on their
        peers meanwhile.
        """
        limit = self.settings.volume_burst_seconds
        episode = self.episode  # [start, last unusual call, held calls]
        threshold = (
            self.settings.volume_suspicion_p_user
            if self.is_user
            else self.settings.volume_suspicion_p
        )
        suspicious = self.alarm_since is not None or p < threshold
        if (
            episode is not None
            and t - episode[1] > self.settings.volume_episode_gap_seconds
            and not (suspicious and t - episode[1] < self.sessions_span)
        ):
            # Over, unless this call is unusual for the many separate sessions of a window
            # that holds the stretch's last unusual call: a slow loop's calls come minutes
            # apart, and each is unusual with the ones before it (one stretch, not bursts).
            self.episode = None
            if episode[1] - episode[0] <= limit:  # over quickly: one of the scope's bursts
                for at, values in episode[2]:
                    self._learn_dispersion(at, values, prior)
            episode = None
        waiting = self.waiting
        if suspicious and episode is None:
            episode = self.episode = [t, t, list(waiting)]
            waiting.clear()
        if episode is not None:
            if suspicious:
                episode[1] = t
            if t - episode[0] <= limit:
                episode[2].append((t, sample))
            else:
                episode[2] = []  # too long to be a burst: it will not be learned
        else:
            waiting.append((t, sample))
        while waiting and waiting[0][0] <= t - limit:
            at, values = waiting.popleft()
            self._learn_dispersion(at, values, prior)

    def _learn_dispersion(self, t: float, values: Spread, prior: PeerPrior | None) -> None:
        # A user's own calls are few: their burstiness is remembered as long as their rate.
        memory = max(self.settings.volume_dispersion_memory_seconds, self.tau)
        pooled = self.is_user and prior is not None and len(prior.burst) == len(self.windows)
        spread, started, squared = values
        if self.is_user:
            # Whether the call started a session, learned like its burstiness (never from
            # a stretch too long to be a burst): the user's, pooled with peers'.
            self.session_share.add(float(started), t, memory)
            if pooled:
                assert prior is not None
                prior.sessions.add(float(started), t, memory)
        for j, value in enumerate(spread):
            if math.isnan(value):
                continue  # a squared error from a slot already sampled
            if squared[j]:
                self.pearson[j].add(value, t, memory)
            elif self.mu[j] > 0:
                self.burst[j].add(value, t, memory)
                if pooled:
                    assert prior is not None
                    prior.burst[j].add(value, t, memory)

    def _judge(
        self,
        ts: datetime,
        t: float,
        expected: list[tuple[float, float]],
        prior: PeerPrior | None,
        scales: list[float],
        cost_per_request_usd: float,
        recurring: list[float] | None = None,
        rhythm: float = 1.0,
        single: bool = True,
        excused: Callable[[], list[float] | None] | None = None,
    ) -> tuple[Verdict | None, float]:
        """``scales``: per window, how far the expectation is scaled by the rest of the
        traffic (``context`` for every window, or a busy user's ``levels``). ``recurring``:
        per window, the unusual calls this time of day brought on previous days (added to
        the expectation). ``rhythm``: the global rate over its daily mean (a newcomer's
        peers' rate is scaled up by it, as a quiet user's is); ``single``: whether a user's
        calls are all of one feature (else no newcomer test). Returns the verdict and the
        least p-value on the scope's own reference (what makes a call unusual, excused or
        not)."""
        s = self.settings
        best_p, best_j, best_mu, best_x = 1.0, -1, 0.0, 0
        own_p, recurring_note = 1.0, ""
        tested = len(self.windows)
        sessions = self._sessions(prior) if self.is_user and not self.busy_user else None
        if sessions is not None:
            tested *= 2  # each window is tested in calls and in sessions (Bonferroni)
        session_note, self.sessions_span = "", 0.0
        settled = self._settled(t)
        excuse: list[float] | None = None  # ``excused``'s answer, asked once
        bar = self.p_value
        if self.alarm_since is not None and self.is_user:
            # An open alarm of a user goes on while the count stays unusual (under
            # ``volume_suspicion_p_user``, the bar its calls are held back from learning by),
            # not only while it stays under the paging p-value: a quiet user's evidence
            # depends on the feature of the call (its peers' burstiness), and a loop paged
            # on one call's was resolved "back to normal" at 5.0 vs 0.0 requests/min while it
            # ran on (probe H's D10: its loop calls stood at p ~ 5e-8, unusual, not 1e-10).
            bar = max(bar, s.volume_suspicion_p_user)
        seen_now: list[int] = []  # windows anomalous at this call
        for j, w in enumerate(self.windows):
            rate, shape = expected[j]
            if shape <= 0 or (not self._knows(j, t, prior) and j > 0):
                continue
            mu = rate * w * scales[j]
            if j > 0:
                wide = w > s.volume_ramp_window_seconds
                before = expected[j - 1][0] * self.windows[j - 1] * scales[j - 1]
                if wide:
                    # Enough *evidence*, not enough calls: a bursty scope's count (sessions
                    # of 3 to 8 calls) holds about mu / D independent events.
                    prev_shape = expected[j - 1][1]
                    before /= self.dispersion(j - 1, before, prior) + (
                        before / prev_shape if prev_shape > 0 else 0.0
                    )
                enough = s.volume_enough_expected if wide else s.volume_ramp_enough_expected
                if before >= enough:
                    break  # the shorter window already expects enough calls to judge
            x = self.counts[j]
            gone_calls, gone = 0, 0.0
            if settled is not None:
                # Calls of an alarm of this scope that is over were judged (and paged) then;
                # the window is judged on the rest of its span.
                gone_calls, gone = settled[j]
            if not seen_now and self.alarm_since is not None:
                # So is the open alarm's stretch that shorter windows judged and have seen end
                # (none of them is anomalous now): a user's 3-minute burst held their
                # 15-minute window, and each of their ordinary session calls after it was
                # judged anomalous on it until the burst left it, "back to normal" 15 min
                # late (probe 57's D7).
                calls, seconds = self._judged(t, j)
                gone_calls, gone = gone_calls + calls, gone + seconds
            aside = gone > 0
            if aside:
                if w - gone < self.windows[0]:
                    continue
                x -= gone_calls
                mu *= (w - gone) / w
            p, note, dispersion = 1.0, "", 0.0
            if x >= s.volume_min_count and x >= s.volume_min_ratio * mu:
                if j > 0 and not self._current(t, expected, scales[0]):
                    continue  # the excess is not current: its recent part is back to normal
                dispersion = self.dispersion(j, mu, prior) + (mu / shape if shape > 0 else 0.0)
                p = upper_tail(x, mu, dispersion) * tested
            if sessions is not None and not aside and 0 < mu < _PEARSON_MIN_EXPECTED:
                # The same window counted in sessions: a quiet user's count of calls is
                # judged with their sessions' clumping (variance/mean ~6 for sessions of 3
                # to 8), but a loop whose calls come minutes apart is many sessions.
                share, known = sessions
                starts = len(self.session_starts) - bisect.bisect_right(self.session_starts, t - w)
                mu_s = share * mu
                if (
                    starts >= s.volume_min_count
                    and starts >= s.volume_min_ratio * mu_s
                    and (j == 0 or self._current(t, expected, scales[0]))
                ):
                    # Gamma-Poisson: the rate's uncertainty (1 / shape) and the share's
                    # (binomial, over the calls it is known from) widen the tail.
                    spread = (1.0 / shape if shape > 0 else 0.0) + (1.0 - share) / (share * known)
                    p_s = upper_tail(starts, mu_s, 1.0 + mu_s * spread) * tested
                    if p_s < p:
                        p = p_s
                        note = f", {starts} separate sessions where {mu_s:.2f} were expected"
            own_p = min(own_p, p)
            usual = recurring[j] if recurring is not None else 0.0
            if usual > 0 and p < 1.0:
                # What this time of day brought on previous days rides on the expectation
                # (a nightly batch): only a count beyond it is unusual.
                mu += usual
                p, note = 1.0, ""
                if x >= s.volume_min_count and x >= s.volume_min_ratio * mu:
                    dispersion = self.dispersion(j, mu - usual, prior) + (
                        (mu - usual) / shape if shape > 0 else 0.0
                    )
                    p = upper_tail(x, mu, dispersion) * tested
            if excused is not None and p < 1.0 and dispersion > 0:
                # Variance that others' models of these calls hold (the global's: features
                # that woke as on their previous days), as for ``usual``, after ``own_p``.
                if excuse is None:
                    excuse = excused() or []
                extra = excuse[j] if j < len(excuse) else 0.0
                if extra > 0 and mu > 0:
                    p = upper_tail(x, mu, dispersion + extra / mu) * tested
            if p < bar:
                seen_now.append(j)
            if p < best_p:
                best_p, best_j, best_mu, best_x = p, j, mu, x
                session_note = note
                self.sessions_span = float(w) if note else 0.0
                recurring_note = (
                    f", {usual:.0f} of the {mu:.1f} expected usual at this time of day "
                    f"({s.volume_recurring_days} previous days)"
                    if usual > 0
                    else ""
                )
        span = float(self.windows[best_j]) if best_j >= 0 else 0.0
        life = False
        newcomer = self._newcomer(t, prior, rhythm, scales, tested, single)
        if newcomer is not None:
            # Not part of ``own_p``: a young session caller's first sessions, unusual for a
            # random user of the feature, would be held back from teaching the user their
            # own burstiness (a false page of a user 12 hours later in the first-day world).
            p, j, mu, x, span_life = newcomer
            if p < best_p:
                best_p, best_j, best_mu, best_x, span, life = p, j, mu, x, span_life, True
                session_note = f" ({x} calls where a user of their feature makes {mu:.1f})"
                self.sessions_span, recurring_note = 0.0, ""
        if own_p < self.p_value:
            self._mark_unusual(t)
        anomalous = best_j >= 0 and best_p < bar
        note = ""
        if anomalous:
            if self.alarm_since is None or not (self.frozen and self.frozen[-1][1] == _INF):
                # (a spike within a drop's alarm whose stretch is learned: frozen from here)
                if self.alarm_since is None:
                    self.alarm_since = t
                    self.alarm_window = best_j
                    self.alarm_seen = [-_INF] * len(self.windows)
                start = self._forget_life() if life else t - self.windows[best_j]
                self.frozen.append([start, _INF])
                self.drop_alarm = False
                self._rates = None
            self.last_anomalous = t
            for k in seen_now:
                self.alarm_seen[k] = t
            if t - self.alarm_since >= s.volume_adapt_after_minutes * 60:
                self._accept(t)
                note = f"anomalous for {s.volume_adapt_after_minutes} min, now learned as normal"
                anomalous = False
        elif self.alarm_since is not None:
            if t - self.last_anomalous > s.resolve_after_seconds:
                self._close_alarm()
                return None, own_p
            j = self.alarm_window
            best_j, best_mu = j, expected[j][0] * self.windows[j] * scales[j]
            best_x, span = self.counts[j], float(self.windows[j])
        else:
            return None, own_p
        x = best_x
        per_minute = 60.0 / span
        impact, paced, pace = self._excess_per_hour(
            t, best_j, x, best_mu, cost_per_request_usd, anomalous and not life, span
        )
        if anomalous and not note:
            over = (
                f"the {duration_text(span, exact=True)} since their first call"
                if life
                else f"the last {duration_text(span, exact=True)}"
            )
            note = f"p < 1e-{int(surprise(best_p))} over {over}{session_note}{recurring_note}{pace}"
            scale = scales[best_j]
            if scale > 1.05:
                note += f", expected scaled by {scale:.2f} for a surge of all traffic"
        return Verdict(
            kind="volume_spike",
            scope=self.scope,
            ts=ts,
            score=surprise(best_p) if anomalous else 0.0,
            is_anomaly=anomalous,
            expected=best_mu * per_minute,
            observed=paced if paced is not None else x * per_minute,
            unit="requests/min",
            metric="requests/min",
            window_seconds=self.windows[best_j],
            note=note,
            impact_usd_per_hour=impact,
        ), own_p

    def _excess_per_hour(
        self,
        t: float,
        j: int,
        x: float,
        mu: float,
        cost_per_request_usd: float,
        paced: bool,
        span: float | None = None,
    ) -> tuple[float, float | None, str]:
        """USD an hour above expected: the excess calls priced at what the window's calls
        cost on average (not at the scope's usual cost per call: a burst of costlier calls
        costs more), and, for an anomalous verdict (``paced``), at the pace since the unusual
        stretch began when that is clearly faster than the window's (a burst paged 20 s in
        fills a third of its 1-minute window: probe H's D3, a 3,000-a-minute burst's page
        said 1,001/min and $22/hour where it spent about $190 an hour above normal). With
        the pace: the calls a minute since it began, and a note saying so. ``span``: the
        seconds ``x`` and ``mu`` are counted over, when not window ``j``'s (a newcomer's life)."""
        w = self.windows[j] if span is None else span
        price = self._price(self.counts[j], self.spends[j], cost_per_request_usd)
        impact = (x - mu) / w * 3600.0 * price
        began = self.episode[0] if self.episode is not None else self.alarm_since
        if not paced or began is None:
            return impact, None, ""
        first = int(began // SLOT_SECONDS)
        elapsed = t - first * SLOT_SECONDS
        if not 2 * SLOT_SECONDS <= elapsed <= 0.8 * w:
            return impact, None, ""
        calls, nanos = self._in_slots(first)
        if calls < 1.25 * x * elapsed / w:
            return impact, None, ""  # not clearly faster than the window's average
        pace = calls / elapsed * 60.0
        money = (calls / elapsed - mu / w) * 3600.0 * self._price(calls, nanos, price)
        note = (
            f"; {pace:,.0f}/min and the money are the pace of the {elapsed:.0f} s since it "
            f"began ({x:,.0f} calls in the last {duration_text(w, exact=True)})"
        )
        return money, pace, note

    def _price(self, calls: float, nanos: float, usual: float) -> float:
        """USD per call of ``calls`` that cost ``nanos``. Calls at $0 are a real zero (cache
        hits) when the scope spent anything in its longest window; else the scope is taken
        to have no costs given (a bare count, or an hour of $0 calls), and ``usual`` is
        the price."""
        if calls > 0 and (nanos > 0 or self.spends[-1] > 0):
            return nanos / calls / NANOS_PER_USD
        return usual

    def _in_slots(self, first: float, last: float = _INF) -> tuple[int, float]:
        """Calls and nano-dollars in the 5-second slots of index ``first`` to ``last``."""
        slots = self.slots
        lo = bisect.bisect_left(slots, first, key=_slot_index)
        hi = bisect.bisect_right(slots, last, key=_slot_index)
        return (
            sum(int(slots[k][1]) for k in range(lo, hi)),
            sum(slots[k][2] for k in range(lo, hi)),
        )

    def _mark_unusual(self, t: float) -> None:
        slots = self.unusual_slots
        slot = int(t // SLOT_SECONDS)
        slots[slot] = slots.get(slot, 0) + 1
        oldest = slot - (self.settings.volume_seasonal_days + 1) * 86400 // SLOT_SECONDS
        while slots:
            first = next(iter(slots))
            if first >= oldest:
                break
            del slots[first]

    def _recurring(self, t: float) -> list[float] | None:
        """Per window, the unusual calls this time of day brought on previous days: on each
        of the last ``volume_seasonal_days`` days, the most such calls any stretch of the
        window's length held within ``volume_seasonal_window_seconds`` of this time; then
        the ``volume_recurring_days``-th most of those days (0 where fewer days had any).
        None when there is nothing to excuse. Computed once a minute."""
        s = self.settings
        slots = self.unusual_slots
        k = s.volume_recurring_days
        if not slots or k <= 0 or s.volume_seasonal_days <= 0:
            return None
        minute = int(t // 60)
        cached = self.unusual_at
        if cached is not None and cached[0] == minute:
            return cached[1]
        reach = s.volume_seasonal_window_seconds
        marks = sorted(slots.items())
        times = [slot * SLOT_SECONDS for slot, _ in marks]
        out: list[float] = []
        for w in self.windows:
            days = []
            for d in range(1, s.volume_seasonal_days + 1):
                centre = t - d * 86400.0
                lo = bisect.bisect_left(times, centre - reach - w)
                hi = bisect.bisect_right(times, centre + reach)
                best, total, first = 0, 0, lo
                for i in range(lo, hi):  # the most marked calls within any span of w
                    total += marks[i][1]
                    while times[i] - times[first] >= w:
                        total -= marks[first][1]
                        first += 1
                    best = max(best, total)
                if best > 0:
                    days.append(best)
            days.sort(reverse=True)
            out.append(float(days[k - 1]) if len(days) >= k else 0.0)
        excess = out if any(out) else None
        self.unusual_at = (minute, excess)
        return excess

    def _settled(self, t: float) -> list[tuple[int, float]] | None:
        """Per window: (calls, seconds) of it that lie in alarms of this scope that are
        over (None when no such alarm reaches into the longest window). A burst that was
        paged and resolved stays in the long windows for up to an hour; a normal session
        after it must not page it again (session 19's probe)."""
        oldest = t - self.windows[-1]
        closed: list[tuple[float, float]] = []
        for a, b in sorted((a, b) for a, b in self.frozen if b != _INF and b > oldest):
            if closed and a <= closed[-1][1]:  # overlapping alarms: count their calls once
                closed[-1] = (closed[-1][0], max(b, closed[-1][1]))
            else:
                closed.append((a, b))
        if not closed:
            return None
        out = []
        slots = self.slots
        for j, w in enumerate(self.windows):
            begin = t - w
            seconds = sum(max(0.0, min(b, t) - max(a, begin)) for a, b in closed)
            calls = 0
            head = self.heads[j]
            for a, b in closed:
                if b <= begin:
                    continue
                lo = bisect.bisect_left(slots, a // SLOT_SECONDS, lo=head, key=_slot_index)
                hi = bisect.bisect_right(slots, b // SLOT_SECONDS, lo=head, key=_slot_index)
                calls += sum(int(slots[k][1]) for k in range(max(lo, head), hi))
            out.append((calls, seconds))
        return out

    def _judged(self, t: float, j: int) -> tuple[int, float]:
        """(calls, seconds) of window ``j`` at ``t`` that lie in the open alarm's stretch up to
        the latest call at which a shorter window was anomalous (judged there), less what
        ``_settled`` sets aside already (alarms that are over); (0, 0) unless that stretch's
        pace is over: the calls since are far fewer than it would have brought (its lower
        tail under the scope's paging p-value). A burst of thousands a minute is over at the
        first ordinary call after it; a loop whose shorter windows are anomalous now and
        then goes on at its pace, and keeps its evidence (session 43's reverted try set the
        stretch aside without asking, and a quiet user's running loop resolved 3 min in)."""
        cut = max(self.alarm_seen[:j], default=-_INF)
        if not self.frozen or self.frozen[-1][1] != _INF:
            return 0, 0.0
        begin = max(self.frozen[-1][0], t - self.windows[j])
        for a, b in self.frozen[:-1]:  # (an alarm over, overlapping: counted there)
            if a <= begin < b:
                begin = b
        if cut <= begin:
            return 0, 0.0
        calls = self._in_slots(begin // SLOT_SECONDS + 1, cut // SLOT_SECONDS)[0]
        since = self._in_slots(cut // SLOT_SECONDS + 1, t // SLOT_SECONDS)[0]
        if lower_tail(since, calls / (cut - begin) * (t - cut)) >= self.p_value:
            return 0, 0.0  # the stretch's pace goes on (or too little time to tell)
        return calls, cut - begin

    def check_drop(self, ts: datetime, cost_per_request_usd: float = 0.0) -> Verdict | None:
        """For scopes that watch drops: is the last minute or two far below normal? Called
        at minute ends (silence produces no call to judge)."""
        if not self.detect_drops or self.first_at is None:
            return None
        t = ts.timestamp()
        self.expire(t)
        if t - self.first_at < self.settings.volume_warmup_seconds:
            return None
        s = self.settings
        horizon = t - 2 * self.windows[-1]
        if self.outages and self.outages[0][1] < horizon:
            self.outages = [f for f in self.outages if f[1] >= horizon]
        expected = self.rates(t, drops=True)
        best_p, best_j, best_mu = 1.0, -1, 0.0
        low = self.seasonal_low(t)  # the day's usual low about now (its end, a lunch)
        # Woken at a time of day no active previous day has seen: the busiest 5 minutes
        # the waking hour's spikes are judged against would read a slow start as an
        # outage, and the reference has learned the night: a drop is judged against the
        # level since waking, over at least ``volume_burst_seconds`` (a review found an
        # outage at 09:40 never paged with no drop judged in that hour: by 10:00 the
        # reference had learned 20 minutes of it).
        woke = self.woke_at if self.wake_high is not None and self.waking(t) else None
        # An open alarm is also judged over the windows up to ``volume_burst_seconds``: a
        # drop to 45 % for hours, judged over a minute or two, had three minutes in a row
        # unusual at no more than p ~ 0.02, closed, and paged again after its cooldown.
        judged = [w for w in self.windows if w <= s.volume_burst_seconds]
        for j, w in enumerate(judged if self.alarm_since is not None else self.windows[:2]):
            mu = expected[j][0] * w
            if woke is not None:
                # up to the window, or to the last call when the calls stopped before it (a
                # whole outage: its silence is not the level it is judged against)
                until = min(t - w, self.recent[-1]) if self.recent else t - w
                span = until - woke
                if span < s.volume_burst_seconds:
                    continue
                mu = self.calls_between(woke - SLOT_SECONDS, until) / span * w
            if low is not None:
                mu = min(mu, low * w)
            if mu * 60.0 / w < s.volume_drop_min_expected:
                continue
            x = self.counts[j]
            if x > (1.0 if self.alarm_since is not None else s.volume_drop_ratio) * mu:
                continue
            p = lower_tail(x, mu, self.dispersion(j, mu, None)) * 2
            if p < best_p:
                best_p, best_j, best_mu = p, j, mu
        best_w, best_x = (
            (float(self.windows[best_j]), self.counts[best_j]) if best_j >= 0 else (0.0, 0)
        )
        silence = t - self.recent[-1] if self.recent else 0.0
        if self.alarm_since is not None and woke is None and silence > judged[-1]:
            # An open alarm is also judged on the silence since the last call: a silence is
            # no evidence the calls are back. An outage inside a light Saturday's drop,
            # judged over 5 minutes against the references' 1.9 calls a minute (which had
            # learned the night), was p ~ 0.013 at 10:00 and resolved "back to normal"
            # 40 minutes into the outage (its window: the longest that fits in the silence).
            span = min(silence, float(self.windows[-1]))
            j = bisect.bisect_right(self.windows, span) - 1
            rate = expected[j][0] if low is None else min(expected[j][0], low)
            mu = rate * span
            p = lower_tail(0.0, mu, self.dispersion(j, rate * self.windows[j], None)) * 2
            if p < best_p:
                best_p, best_j, best_mu = p, j, mu
                best_w, best_x = span, 0
        # An open alarm goes on while the count stays unusual (``volume_suspicion_p``), not
        # only under the paging p-value and ``volume_drop_ratio``: a light Saturday's drop (4
        # to 9 calls in a minute or two where the previous days made 21) sat at p ~ 1e-6
        # for three minutes, its alarm closed, and the drop paged again when its cooldown
        # was over, 30 minutes later (session 29's probe, seed 9); a drop to a fifth with
        # four minutes at half paged twice the same way.
        bar = self.p_value if self.alarm_since is None else max(self.p_value, s.volume_suspicion_p)
        anomalous = best_j >= 0 and best_p < bar
        if anomalous:
            # Under ``volume_drop_ratio`` of what the references themselves expect (not the
            # previous days' level of a waking hour: a light Saturday's drop is above its
            # references, which hold the night): frozen within an open alarm. An outage,
            # held from every scope (``outages``), only if also unusual against them at the
            # paging p-value (at 2.4 calls a minute a minute at half is common, and an
            # ordinary one of a light Saturday was held from every scope for 16 minutes: a
            # user paged on Monday; session 31's review), and with calls: a silence judged
            # over its own span (above) is no partial outage, and the other scopes judge
            # their waking hour after one against the previous days, as before. An office
            # product's evening fall is listed all the same (its first window still holds
            # calls), and held for ``volume_outage_hold_minutes``: held for 6 hours, the
            # first night was learned from 23:00 on, and a user of the office world paged
            # "22.7x normal" on the Wednesday morning (seed 7; session 31's review).
            base = self.history_base
            own_rate = base[best_j] if base is not None else expected[best_j][0]
            own = own_rate * best_w
            below = best_x <= s.volume_drop_ratio * own
            spread = self.dispersion(best_j, own_rate * self.windows[best_j], None)
            outage = below and best_x > 0 and lower_tail(best_x, own, spread) * 2 < self.p_value
            opened = self.alarm_since is None
            if self.alarm_since is None:
                self.alarm_since, self.alarm_window = t, best_j
            if not (self.frozen and self.frozen[-1][1] == _INF) and (opened or below):
                # (also an outage within an alarm whose stretch was learned: one inside a
                # light Saturday's drop was learned, and resolved it, as above)
                self.drop_alarm = True
                self.frozen.append([t - best_w, _INF])
                self._rates = None
            stretch = self.frozen[-1] if self.drop_alarm and self.frozen else None
            if outage and stretch is not None and all(f is not stretch for f in self.outages):
                # no scope learns it (``outage_source``)
                self.outages.append(stretch)
            self.last_anomalous = t
            lasting = t - self.alarm_since >= s.volume_adapt_after_minutes * 60
            if lasting and best_x > s.volume_drop_ratio * best_mu:
                # As for a spike: a level this long is the new normal, if it is one an alarm
                # would not open at (``volume_drop_ratio``), kept open only by going on
                # while unusual (a drop to 55 % stayed frozen for good). Not an outage (5 %
                # of the traffic for 4 hours, accepted, resolved "back to normal" at 3
                # hours and the calls back paged "38.2x normal": session 30's review), nor a
                # silence (a night: the first night of an office product, accepted, left
                # the references at 0 where, frozen, they held the day, and the busiest
                # user's loop at 09:05 the next morning was not paged).
                self._accept(t)
                return None
        if (
            self.drop_alarm
            and self.frozen
            and self.frozen[-1][1] == _INF
            and all(f is not self.frozen[-1] for f in self.outages)
        ):
            # (not an outage: learned back to the longest window once the calls back lifted
            # its mean above references that held the night, 25 to 36 minutes of a light
            # Saturday's outage were learned by the global and every scope; the review)
            self._learn_drop(t, t)
        if (
            not anomalous
            and self.alarm_since is not None
            and t - self.last_anomalous > s.resolve_after_seconds
        ):
            self._close_alarm()
        if not anomalous:
            return None
        span, mu, x = best_w, best_mu, best_x
        return Verdict(
            kind="volume_drop",
            scope=self.scope,
            ts=ts,
            score=surprise(best_p),
            is_anomaly=True,
            expected=mu * 60.0 / span,
            observed=x * 60.0 / span,
            unit="requests/min",
            metric="requests/min",
            window_seconds=round(span),
            note=f"p < 1e-{int(surprise(best_p))} over the last {duration_text(span, exact=True)}",
            impact_usd_per_hour=(x - mu) / span * 3600.0 * cost_per_request_usd,
        )

    def _close_alarm(self) -> None:
        self._rates = None
        if self.frozen and self.frozen[-1][1] == _INF:
            self.frozen[-1][1] = self.last_anomalous
        self.alarm_since = None
        self.drop_alarm = False
        horizon = self.last_anomalous - 2 * self.windows[-1]
        self.frozen = [f for f in self.frozen if f[1] >= horizon]
        self.outages = [f for f in self.outages if f[1] >= horizon]

    def _learn_drop(self, t: float, end: float) -> None:
        """A drop's frozen stretch (up to ``end``) is learned, and no longer frozen, once it
        has lasted ``volume_burst_seconds`` with more calls a second than every window's
        reference expects: the drop was judged against a level the references do not hold
        (the previous days', in the waking hour, while they learned the night), and held
        back from them, the stretch would leave them below the level that stays. Kept from
        them, a light Saturday's references held the night (0.2 to 0.9 calls a minute
        against 2.4) once its waking hour was over, and spikes paged at 10:17, 11:09, 11:45
        and 12:21 (session 29's probe, seed 5). A stretch under a reference (an outage) stays
        frozen: learned, its silence would make the recovery a spike. Learned as far back as
        the longest window (the slots kept); before that it stays unlearned."""
        start = self.frozen[-1][0]
        known = max(start, t - self.windows[-1])
        if end - known < self.settings.volume_burst_seconds:
            return
        # the slots the stretch froze (``_learn``: start <= slot's time < end)
        first = float(math.ceil(known / SLOT_SECONDS))
        last = float(math.ceil(end / SLOT_SECONDS) - 1)
        level = self._in_slots(first, last)[0] / (end - known)
        for ref, w in zip(self.refs, self.windows, strict=True):
            # read as ``rates`` reads it: at the window's start, or the stretch's if earlier
            # (at ``t`` the longest window's read 14 % of its rate: session 30's review)
            count, exposure = ref.at_time(min(t - w, start), self.tau)
            if exposure > 0 and count / exposure >= level:
                return
        # Slots up to each reference's time were skipped: learned now, faded as they
        # would have been; the later ones are learned as they leave their window.
        slots = self.slots
        lo = bisect.bisect_left(slots, first, key=_slot_index)
        hi = bisect.bisect_right(slots, last, key=_slot_index)
        for j, ref in enumerate(self.refs):
            if ref.at is None or ref.at < known:
                continue
            until = min(end, ref.at)
            for k in range(lo, hi):
                at = slots[k][0] * SLOT_SECONDS
                if at > until:
                    break
                ref.count += slots[k][1] * math.exp(-(ref.at - at) / self.tau)
                if j == 0 and self.daily is not None and self.daily.at is not None:
                    self.daily.count += slots[k][1] * math.exp(
                        -max(0.0, self.daily.at - at) / 86400.0
                    )
            ref.exposure += self.tau * (
                math.exp(-(ref.at - until) / self.tau) - math.exp(-(ref.at - known) / self.tau)
            )
            if j == 0:
                self._relearn_season(known, until, lo, hi)
        if known > start:
            self.frozen[-1][1] = known
        else:
            self.frozen.pop()  # never an outage: ``check_drop`` does not learn those
        self.drop_alarm = False
        self._rates = None

    def _relearn_season(self, known: float, until: float, lo: int, hi: int) -> None:
        """The 5-minute bins of the previous days from ``known`` to ``until`` (a drop's
        stretch, now learned) hold its calls instead of NaN; a bin that began before
        ``known`` stays unknown."""
        season = self.season
        if season is None or self.settings.volume_seasonal_days <= 0:
            return
        first_bin = math.ceil(known / SEASON_BIN_SECONDS)
        for b in range(first_bin, int(until // SEASON_BIN_SECONDS) + 1):
            if b in season:
                season[b] = 0.0
        for k in range(lo, hi):
            at = self.slots[k][0] * SLOT_SECONDS
            if at > until:
                break
            b = int(at // SEASON_BIN_SECONDS)
            if b >= first_bin:
                season[b] = season.get(b, 0.0) + self.slots[k][1]

    def _accept(self, t: float) -> None:
        """A level anomalous for hours is the new normal: every window's reference now
        holds the current rate of its window."""
        self._rates = None
        for j, w in enumerate(self.windows):
            ref = self.refs[j]
            ref.advance(max(ref.at or t - w, t - w), self.tau)
            if ref.exposure > 0:
                ref.count = self.counts[j] / w * ref.exposure
        self.frozen = []
        self.outages = []
        self.alarm_since = None
        self.drop_alarm = False

    def calls_between(self, start: float, end: float) -> int:
        """Calls counted in the 5-second slots that start after ``start`` and by ``end``
        (event time; no change of state). What a window held at a past moment, e.g. when
        an alarm resolved, as far back as the longest window's slots are kept."""
        return self._in_slots(start // SLOT_SECONDS + 1, end // SLOT_SECONDS)[0]

    def suspicious(self, t: float) -> bool:
        """An open alarm, or a call unusual at the suspicion bar (``volume_suspicion_p_user``
        for a user) within ``volume_episode_gap_seconds`` before ``t``."""
        episode = self.episode
        return self.alarm_since is not None or (
            episode is not None and t - episode[1] <= self.settings.volume_episode_gap_seconds
        )

    @property
    def busy_user(self) -> bool:
        """A user who calls like a feature (``volume_busy_user_per_minute``): judged on
        their own rhythm and half an hour of memory, given the rest's level, and not on
        sessions; set by ``rates`` at each call."""
        return self.is_user and self.tau == self.settings.volume_rate_memory_seconds

    @property
    def idle_since(self) -> float:
        return self.slots[-1][0] * SLOT_SECONDS if self.slots else (self.first_at or 0.0)


def _peers_excess(j: int, prior: PeerPrior | None) -> float:
    """The excess of calls just before a call (window ``j``) of a user of the feature: a user
    among them (``volume_peer_burst_quantile``) once enough of them have calls enough of
    their own, else their calls pooled; 0 with no peers (Poisson)."""
    if prior is None or len(prior.burst) <= j:
        return 0.0
    users = prior.user_burst[j] if len(prior.user_burst) > j else None
    return users if users is not None else prior.burst[j].get(0.0)


def _slot_index(entry: list[float]) -> float:
    return entry[0]


def epoch_datetime(t: float) -> datetime:
    return datetime.fromtimestamp(t, UTC)


__all__ = ["SLOT_SECONDS", "PeerPrior", "RateDetector", "fit_peer_prior"]
