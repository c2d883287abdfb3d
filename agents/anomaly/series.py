"""Anomalies in any regular series (``tollgate detect --kind volume``): one page per event.

Owns :class:`SeriesDetector`, for a ``timestamp,value`` series that is not Tollgate's
own traffic: requests per minute exported from elsewhere, a metric, a daily demand
series. It predicts each point, measures how surprising the prediction error is
against the series' own history of errors, and pages at the start of an event:

- **Two predictions, the better one used.** A level that follows the series
  (exponential smoothing), and that level plus a time-of-day profile (weekdays and
  weekends apart) when the series' spacing divides a day. Each point is judged with
  whichever of the two has had the smaller recent error, so a daily rhythm is
  expected where there is one and noise is not mistaken for one where there is not.
  Both learn winsorised values, so an incident does not teach them that it is normal.
- **Four statistics, each against its own past.** The standardised error of the point
  (a spike, a dip), the mean error of the last five points (a level shift, an outage,
  a change of rhythm), and the value itself as a new high or a new low of the series.
  Their surprise is their rank among their own past values (so a heavy-tailed series
  pages as rarely as a calm one), and beyond the 95th percentile an exponential tail
  fitted to the top 5 % (peaks over threshold, as in SPOT: Siffer et al., KDD 2017).
- **Pages, not floods.** A point pages when its surprise reaches ``series_threshold``
  outside the warm-up and outside the refractory period after the previous page
  (``series_refractory_points``; within it, only a point 100 times rarer than the one
  that paged pages again). ``score`` is the surprise of every point.

What it cannot see: a change slower than the level's memory (about 20 points) that
never makes the error unusual, and a change that its history already holds
(a series that jumped the same way before). It does not own reading files
(:mod:`agents.anomaly.offline`).
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from datetime import datetime

from agents.anomaly.core import Point, Verdict
from app.anomaly_config import DetectorSettings


class _Tail:
    """How rare a value is among the past values of a statistic (upper tail)."""

    __slots__ = ("history", "min_history", "ordered", "values")

    def __init__(self, history: int, min_history: int) -> None:
        self.history, self.min_history = history, min_history
        self.values: deque[float] = deque()
        self.ordered: list[float] = []

    def add(self, value: float) -> None:
        self.values.append(value)
        bisect.insort(self.ordered, value)
        if len(self.values) > self.history:
            old = self.values.popleft()
            del self.ordered[bisect.bisect_left(self.ordered, old)]

    def surprise(self, value: float) -> float:
        """-log10 P(statistic >= value): empirical, then an exponential tail past the
        95th percentile of the past values."""
        n = len(self.ordered)
        if n < self.min_history:
            return 0.0
        above = n - bisect.bisect_left(self.ordered, value)
        empirical = -math.log10((above + 1) / (n + 1))
        q_index = int(0.95 * n)
        q95 = self.ordered[q_index]
        if value <= q95:
            return empirical
        top = self.ordered[q_index:]
        excess = max(sum(top) / len(top) - q95, 1e-12)
        tail = math.log10(0.05) - (value - q95) / excess / math.log(10)
        return max(empirical, -tail)


class SeriesDetector:
    """One regular series: predict, standardise, test, page once per event."""

    def __init__(
        self,
        scope: str,
        settings: DetectorSettings,
        interval_seconds: float,
        total_points: int = 0,
    ) -> None:
        s = settings
        self.scope = scope
        self.settings = settings
        self.interval = max(interval_seconds, 1.0)
        # The time-of-day profile has slots of the spacing, at least 5 minutes (so a
        # per-minute series has 288 slots, each seen five times a day).
        self.slot_seconds = max(self.interval, 300.0)
        per_day = 86400.0 / self.slot_seconds
        season = s.series_season_points
        if not season and abs(per_day - round(per_day)) < 1e-6 and 4 <= round(per_day) <= 288:
            season = round(per_day)
        self.season = season
        self.refractory = s.series_refractory_points
        self.alpha = s.series_level_weight
        self.gamma = s.series_profile_weight
        self.level: float | None = None
        self.profile: dict[tuple[bool, int], list[float]] = {}  # slot: [offset, visits]
        self.warmup = s.series_warmup_points
        self.errors = [0.0, 0.0]  # recent absolute error of (level, level + profile)
        self.spread: float | None = None
        self.short = s.series_shift_points
        self.recent: deque[float] = deque(maxlen=self.short)
        tail = (s.series_history_points, s.series_min_history_points)
        self.point_tail = _Tail(*tail)
        self.shift_tail = _Tail(*tail)
        self.high_tail = _Tail(*tail)  # the values themselves: a new high...
        self.low_tail = _Tail(*tail)  # ... or a new low, against the series' own history
        self.points = 0
        self.last_page = -math.inf
        self.last_score = 0.0

    def _slot(self, ts: datetime) -> tuple[bool, int]:
        seconds = ts.hour * 3600 + ts.minute * 60 + ts.second
        return ts.weekday() >= 5, int(seconds // self.slot_seconds) % self.season

    def observe_point(self, point: Point) -> Verdict | None:
        """The :class:`~agents.anomaly.core.Detector` protocol: one point of the series."""
        return self.observe(point.ts, point.value)

    def observe(self, ts: datetime, value: float) -> Verdict:
        s = self.settings
        if self.level is None:
            self.level = value
        slot = self._slot(ts) if self.season else None
        seasonal = 0.0
        if slot is not None:
            known = self.profile.get(slot) or self.profile.get((not slot[0], slot[1]))
            seasonal = known[0] if known else 0.0
        use_profile = slot is not None and self.errors[1] < self.errors[0]
        predicted = self.level + (seasonal if use_profile else 0.0)
        residual = value - predicted
        spread = self.spread if self.spread and self.spread > 1e-12 else max(abs(value), 1.0)
        z = residual / spread
        self.recent.append(z)
        shift = sum(self.recent) / math.sqrt(len(self.recent))
        warming = self.points < self.warmup
        score = 0.0
        if not warming:
            score = max(
                self.point_tail.surprise(abs(z)),
                self.shift_tail.surprise(abs(shift)),
                self.high_tail.surprise(value),
                self.low_tail.surprise(-value),
            )
            score = max(0.0, score - math.log10(4))  # four statistics tested
        anomalous = (
            not warming
            and score >= s.series_threshold
            and (
                self.points - self.last_page >= self.refractory
                # within the refractory period only something 100 times rarer pages again
                or score >= self.last_score + 2.0
            )
        )
        if anomalous:
            self.last_page, self.last_score = self.points, score
        # Learn: the statistics' history (once the spread means something), then the
        # predictors with the value winsorised.
        self.high_tail.add(value)
        self.low_tail.add(-value)
        if not warming:
            self.point_tail.add(abs(z))
            if len(self.recent) == self.short:
                self.shift_tail.add(abs(shift))
        clip = s.series_clip_spreads * spread
        clipped = predicted + max(-clip, min(clip, residual))
        level_error = abs(clipped - self.level)
        profile_error = abs(clipped - self.level - seasonal)
        fade = s.series_error_fading
        self.errors[0] += fade * (level_error - self.errors[0])
        self.errors[1] += fade * (profile_error - self.errors[1])
        deseasonalised = clipped - seasonal if slot is not None else clipped
        if slot is not None:
            entry = self.profile.setdefault(slot, [seasonal, 0.0])
            entry[1] += 1
            rate = max(self.gamma, 1.0 / entry[1])  # the first visits set it, later ones adjust
            entry[0] += rate * (clipped - self.level - entry[0])
        self.level += self.alpha * (deseasonalised - self.level)
        if warming:  # the plain mean of the errors so far
            absolute = abs(residual)
            fading = 1.0 / (self.points + 1)
        else:  # then a slow exponential average of winsorised errors
            absolute = min(abs(residual), clip)
            fading = 0.01
        current = self.spread or 0.0
        self.spread = max(current + fading * (absolute - current), 1e-12)
        self.points += 1
        return Verdict(
            kind="volume_spike" if residual >= 0 else "volume_drop",
            scope=self.scope,
            ts=ts,
            score=score,
            is_anomaly=anomalous,
            expected=predicted,
            observed=value,
            unit="value",
            metric="value",
            window_seconds=int(self.interval),
            warming_up=warming,
        )


__all__ = ["SeriesDetector"]
