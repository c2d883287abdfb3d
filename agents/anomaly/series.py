"""Anomalies in any regular series (``tollgate detect --kind volume``): one page per event.

Owns :class:`SeriesDetector`, for a ``timestamp,value`` series that is not Tollgate's
own traffic: requests per minute exported from elsewhere, a metric, a daily demand
series. It predicts each point from the series' level and its daily profile, and
pages when the recent points are far from that prediction:

- **Prediction.** A level that follows the series (exponential smoothing of the
  values with their daily profile removed) plus a daily profile learned per time of
  day (when the series spans days and its spacing divides a day), both learned with
  winsorised values so that an incident does not teach the model.
- **Surprise.** The residuals are standardised by a robust running spread (mean
  absolute residual), and two statistics are tested against their own history of
  values: the single point (a spike) and the mean of the last few points (a level
  shift, a dip that lasts). The surprise is how rare the statistic is among its own
  past values (an empirical tail with a Gaussian extrapolation beyond), so a series
  with heavy-tailed noise pages as rarely as a calm one.
- **Pages, not floods.** After a page the series does not page again for a
  refractory period (a day of points, or a share of its history): the output's
  ``is_anomaly`` marks the start of each event, usable as a page. ``score`` is the
  surprise of every point, for anyone who wants their own threshold.

It does not own reading files (:mod:`agents.anomaly.offline`).
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from datetime import datetime
from statistics import NormalDist

from agents.anomaly.core import Verdict
from agents.anomaly.settings import DetectorSettings

_normal = NormalDist()
_SHORT = 6  # points in the level-shift statistic
_HISTORY = 2000  # past values of each statistic kept for its empirical tail


class _Tail:
    """How rare a value is among the past values of a statistic (one-sided, upper)."""

    __slots__ = ("ordered", "values")

    def __init__(self) -> None:
        self.values: deque[float] = deque()
        self.ordered: list[float] = []

    def add(self, value: float) -> None:
        self.values.append(value)
        bisect.insort(self.ordered, value)
        if len(self.values) > _HISTORY:
            old = self.values.popleft()
            del self.ordered[bisect.bisect_left(self.ordered, old)]

    def surprise(self, value: float) -> float:
        """-log10 P(past value >= value), extrapolated past the largest seen."""
        n = len(self.ordered)
        if n < 20:
            return 0.0
        above = n - bisect.bisect_left(self.ordered, value)
        if above > 0:
            return -math.log10(above / (n + 1))
        # Beyond every past value: a Gaussian tail fitted to the upper decile.
        top = self.ordered[int(0.9 * n) :]
        q90 = self.ordered[int(0.9 * n)]
        scale = max((sum(top) / len(top) - q90) / 0.6, 1e-9)
        excess = (value - q90) / scale
        p = 0.1 * 2 * (1 - _normal.cdf(1.2816 + excess)) / 0.2
        return -math.log10(max(p / 1, 1e-300)) if p > 0 else 300.0


class SeriesDetector:
    """One regular series: predict, standardise, test, page once per event."""

    def __init__(
        self,
        scope: str,
        settings: DetectorSettings,
        interval_seconds: float,
        season_points: int = 0,
        total_points: int = 0,
    ) -> None:
        s = settings
        self.scope = scope
        self.settings = settings
        self.interval = max(interval_seconds, 1.0)
        day = 86400.0 / self.interval
        if s.series_season_points:
            season_points = s.series_season_points
        elif not season_points and abs(day - round(day)) < 1e-6 and 4 <= round(day) <= 1440:
            season_points = round(day)
        self.season_points = season_points
        refractory = s.series_refractory_points
        if not refractory:
            refractory = season_points or max(12, int(0.05 * max(total_points, 240)))
        self.refractory = refractory
        self.alpha = 2.0 / (min(season_points or 48, 96) + 1)  # level memory
        self.gamma = 0.1  # profile memory (per visit of a time of day)
        self.level: float | None = None
        self.profile: dict[int, float] = {}
        self.spread: float | None = None
        self.recent: deque[float] = deque(maxlen=_SHORT)
        self.point_tail = _Tail()
        self.shift_tail = _Tail()
        self.points = 0
        self.last_page = -math.inf

    def _slot(self, ts: datetime) -> int:
        if not self.season_points:
            return 0
        seconds = ts.hour * 3600 + ts.minute * 60 + ts.second
        return int(seconds // self.interval) % self.season_points

    def observe(self, ts: datetime, value: float) -> Verdict:
        s = self.settings
        slot = self._slot(ts)
        seasonal = self.profile.get(slot, 0.0)
        warming = self.points < s.series_warmup_points
        if self.level is None:
            self.level = value
        predicted = self.level + seasonal
        residual = value - predicted
        spread = self.spread if self.spread else max(abs(value) * 0.05, 1e-9)
        z = residual / spread
        self.recent.append(z)
        shift = sum(self.recent) / len(self.recent) * math.sqrt(len(self.recent))
        point_surprise = self.point_tail.surprise(abs(z))
        shift_surprise = self.shift_tail.surprise(abs(shift))
        score = max(point_surprise, shift_surprise)
        anomalous = (
            not warming
            and score >= s.series_threshold
            and self.points - self.last_page >= self.refractory
        )
        if anomalous:
            self.last_page = self.points
        # Learn: statistics first, then the model with the value winsorised.
        self.point_tail.add(abs(z))
        if len(self.recent) == _SHORT:
            self.shift_tail.add(abs(shift))
        clipped = predicted + max(-4 * spread, min(4 * spread, residual))
        deseasonalised = clipped - seasonal
        self.level += self.alpha * (deseasonalised - self.level)
        if self.season_points:
            self.profile[slot] = seasonal + self.gamma * (clipped - self.level - seasonal)
        absolute = min(abs(residual), 4 * spread)
        self.spread = (
            absolute if self.spread is None else self.spread + 0.02 * (absolute - self.spread)
        )
        self.spread = max(self.spread, 1e-9)
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
