"""Tier-mix anomalies: has a scope's economy-tier share dropped (a routing regression)?

Owns :class:`TierMixDetector`: a Bernoulli CUSUM on "served by the economy tier or not",
each call adding the log-likelihood ratio of "the share dropped by ``mix_design_drop``"
against "the share is what it was over the past day". It is the optimal sequential test
for that drop: an 85 % -> 35 % regression builds ~0.56 nats of evidence per call, so
with the threshold at 11.5 nats it is found in ~21 calls (92 s at 13.6 calls/min). A busy
scope gets a higher threshold (``mix_arl0_days``): a fixed one is a fixed number of calls
between chance triggers, hours for a scope of hundreds of calls a minute.
The reference share learns a call only once the CUSUM has fallen back to 0 after it,
and never during a drop, nor a call of a volume spike (the engine says which) that
leaves it at 0: a burst's thousands of economy calls would outweigh the scope's day. A
trigger alerts when the share since the estimated change point (or, for a drop still
deepening, of the later half of the calls since it) is at least ``mix_min_drop`` below
the reference, and the recent share (an exponential average over ~33 calls, kept all
along) is that far below too, so a dip that only the CUSUM's selection makes look deep is
not paged; the alert lasts while the recent share stays half that far below.

It does not own alert lifecycles or the choice of scopes.
"""

from __future__ import annotations

import math
from datetime import datetime

from agents.anomaly.core import Point, Verdict
from app.anomaly_config import DetectorSettings

_RECENT_CALLS = 33  # the span of ``recent`` (an exponential average with weight 0.03)


class TierMixDetector:
    """The economy-tier share of one scope's calls; flags a drop."""

    __slots__ = (
        "alarm_since",
        "at",
        "at_warm",
        "economy",
        "expected_recent",
        "last_anomalous",
        "pending",
        "pending_expected",
        "recent",
        "run_economy",
        "run_expected",
        "run_n",
        "scope",
        "settings",
        "stat",
        "total",
    )

    def __init__(self, scope: str, settings: DetectorSettings) -> None:
        self.scope = scope
        self.settings = settings
        self.economy = 0.0  # time-decayed calls served by the economy tier
        self.total = 0.0  # time-decayed calls
        self.at: float | None = None
        self.stat = 0.0
        self.run_n = 0
        self.run_economy = 0
        self.pending: list[float] = []  # economy flags of the open run, not yet learned
        self.alarm_since: float | None = None
        self.last_anomalous = -math.inf
        self.recent = 0.0  # the share of the last ~33 calls (exponential average)
        self.at_warm = False
        # What those calls were expected to share (each call's own feature's share, for the
        # global scope; else the scope's own share), the open run's sum of it, and per call
        self.expected_recent = 0.0
        self.run_expected = 0.0
        self.pending_expected: list[float] = []

    def __setstate__(self, state: tuple[None, dict[str, object]] | dict[str, object]) -> None:
        slots = state[1] if isinstance(state, tuple) else state
        for name, value in (slots or {}).items():
            setattr(self, name, value)
        if not hasattr(self, "pending_expected"):  # a checkpoint from before (session 25)
            p0 = min(max(self.share(), 0.01), 0.99)
            self.expected_recent = p0
            self.run_expected = p0 * self.run_n
            self.pending_expected = [p0] * len(self.pending)

    def _fade(self, t: float) -> None:
        if self.at is not None and t > self.at:
            fade = math.exp(-(t - self.at) / self.settings.mix_reference_memory_seconds)
            self.economy *= fade
            self.total *= fade
        if self.at is None or t > self.at:
            self.at = t

    def _learn(self, flags: list[float]) -> None:
        for flag in flags:
            self.economy += flag
            self.total += 1.0

    def share(self) -> float:
        return self.economy / self.total if self.total > 0 else 0.0

    def observe_point(self, point: Point) -> Verdict | None:
        """The :class:`~agents.anomaly.core.Detector` protocol: ``point.value`` is 1 for a
        call served by the economy tier, 0 otherwise."""
        return self.observe(point.ts, point.value >= 0.5)

    def observe(
        self,
        ts: datetime,
        economy: bool,
        cost_delta_usd: float = 0.0,
        requests_per_hour: float = 0.0,
        expected: float | None = None,
        learn: bool = True,
    ) -> Verdict | None:
        """Judge one call. ``cost_delta_usd``: how much more a non-economy call costs than an
        economy one in this scope (for the money at stake). ``expected``: the share this
        call is expected to have, if not the scope's own (the global scope: the share of
        the call's feature, so that a day whose busy feature changes is no drop). ``learn``:
        False for a call judged but not learned when its CUSUM is back at 0 (the engine's:
        one made in a volume spike; a run it is part of is learned as a run). Returns an
        anomalous verdict, a normal one while an alarm is open, or None."""
        s = self.settings
        t = ts.timestamp()
        self._fade(t)
        flag = 1.0 if economy else 0.0
        if self.total < s.mix_warmup_requests:
            if learn:
                self._learn([flag])
            return None
        own = min(max(self.share(), 0.01), 0.99)
        p0 = own if expected is None else min(max(expected, 0.01), 0.99)
        if self.at_warm:
            self.recent += 0.03 * (flag - self.recent)
            if expected is None:
                self.expected_recent = p0
            else:
                self.expected_recent += 0.03 * (p0 - self.expected_recent)
        else:
            self.recent = self.expected_recent = own
            self.at_warm = True
        p1 = max(p0 - s.mix_design_drop, p0 / 4)
        llr = math.log(p1 / p0) if economy else math.log((1 - p1) / (1 - p0))
        self.stat = max(0.0, self.stat + llr)
        threshold = mix_threshold(
            s,
            own,
            max(own - s.mix_design_drop, own / 4),
            self.total * 86_400 / s.mix_reference_memory_seconds,
        )
        note = ""
        gap = self.recent - self.expected_recent  # negative: fewer economy calls than expected
        if self.alarm_since is None:
            if self.stat == 0.0:
                self._learn([*self.pending, flag] if learn else self.pending)
                self.pending.clear()
                self.pending_expected.clear()
                self.run_n = self.run_economy = 0
                self.run_expected = 0.0
                return None
            self.pending.append(flag)
            self.pending_expected.append(p0)
            self.run_n += 1
            self.run_economy += int(economy)
            self.run_expected += p0
            run_share = self.run_economy / self.run_n
            run_expected = self.run_expected / self.run_n
            if (
                self.stat < threshold
                or min(run_share - run_expected, self._later_half_gap()) > -s.mix_min_drop
                or gap > -s.mix_min_drop
            ):
                if len(self.pending) > 2000:  # a long mild dip under the gate: learn it
                    self._learn(self.pending[:1000])
                    del self.pending[:1000]
                    del self.pending_expected[:1000]
                return None
            self.alarm_since = self.last_anomalous = t
            self.pending.clear()
            self.pending_expected.clear()
            anomalous = True
            observed = run_share
            p0 = run_expected
            note = f"share of the {self.run_n} calls since the change"
        else:
            observed = self.recent
            p0 = self.expected_recent
            anomalous = gap <= -s.mix_min_drop / 2
            if anomalous:
                self.last_anomalous = t
                if t - self.alarm_since >= s.mix_adapt_after_seconds:
                    note = f"low for {s.mix_adapt_after_seconds // 60} min, now learned as normal"
                    self.economy, self.total = self.recent * self.total, self.total
                    self._end_alarm()
                    anomalous = False
                else:
                    note = "share of the last ~30 calls"
            elif t - self.last_anomalous > s.resolve_after_seconds:
                self._end_alarm()
        drop = p0 - observed
        return Verdict(
            kind="tier_mix",
            scope=self.scope,
            ts=ts,
            score=self.stat / threshold,
            is_anomaly=anomalous,
            expected=p0,
            observed=observed,
            unit="share",
            metric="economy-tier share",
            window_seconds=None,
            note=note,
            impact_usd_per_hour=max(0.0, drop) * requests_per_hour * cost_delta_usd,
        )

    def _later_half_gap(self) -> float:
        """The share of the later half of the run's calls less what they were expected to
        share, once that half holds as many calls as the recent average (``_RECENT_CALLS``;
        else 1: no evidence). A drop still deepening (a drift) is under-stated by the run's
        share, which lags it by half the run; the later half lags by a quarter."""
        half = self.run_n // 2
        if half < _RECENT_CALLS or len(self.pending) < half:
            return 1.0
        return (sum(self.pending[-half:]) - sum(self.pending_expected[-half:])) / half

    def _end_alarm(self) -> None:
        self.alarm_since = None
        self.stat = 0.0
        self.run_n = self.run_economy = 0
        self.run_expected = 0.0
        self.pending.clear()
        self.pending_expected.clear()


def mix_threshold(settings: DetectorSettings, p0: float, p1: float, calls_per_day: float) -> float:
    """The CUSUM's threshold in nats for a scope of ``calls_per_day`` at share ``p0``, tuned
    to ``p1``: ``mix_threshold``, raised so that chance triggers stay about
    ``mix_arl0_days`` apart (average run between them ~ e^h / KL(p0 || p1) calls)."""
    drift = p0 * math.log(p0 / p1) + (1 - p0) * math.log((1 - p0) / (1 - p1))
    calls = calls_per_day * settings.mix_arl0_days * drift
    return max(settings.mix_threshold, math.log(calls) if calls > 1 else 0.0)


__all__ = ["TierMixDetector", "mix_threshold"]
