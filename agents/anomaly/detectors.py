"""The anomaly detectors, one import away: settings, the verdict, and one detector per question.

- :class:`~agents.anomaly.rates.RateDetector`: is a scope calling far more (or, for the
  global stream, far less) than usual?
- :class:`~agents.anomaly.costs.CostDetector`: has what its calls cost shifted upward?
- :class:`~agents.anomaly.mix.TierMixDetector`: has its economy-tier share dropped?
- :class:`~agents.anomaly.series.SeriesDetector`: is a point of any regular series
  (``tollgate detect``) far from what its level, season and recent behaviour predict?

All of them speak one protocol, :class:`~agents.anomaly.core.Detector`
(``observe_point(Point) -> Verdict | None``); a new detector plugs into the engine through
it (``AnomalyEngine(detectors=[factory])``) without touching the engine.

Each module's docstring says what it catches and what it cannot; ``docs/ANOMALY.md``
collects the thresholds and the detectability figures. This module owns nothing itself.
"""

from typing import TYPE_CHECKING

from agents.anomaly.core import Detector, DetectorFactory, Kind, Point, Verdict
from agents.anomaly.costs import CostDetector, CostReference
from agents.anomaly.mix import TierMixDetector
from agents.anomaly.rates import PeerPrior, RateDetector
from agents.anomaly.series import SeriesDetector
from app.anomaly_config import DetectorSettings

if TYPE_CHECKING:  # mypy checks that every built-in detector speaks the protocol

    def _speak_the_protocol(
        rate: RateDetector, cost: CostDetector, mix: TierMixDetector, series: SeriesDetector
    ) -> tuple[Detector, ...]:
        return (rate, cost, mix, series)


__all__ = [
    "CostDetector",
    "CostReference",
    "Detector",
    "DetectorFactory",
    "DetectorSettings",
    "Kind",
    "PeerPrior",
    "Point",
    "RateDetector",
    "SeriesDetector",
    "TierMixDetector",
    "Verdict",
]
