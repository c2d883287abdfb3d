"""The anomaly detectors, one import away: settings, the verdict, and one detector per question.

- :class:`~agents.anomaly.rates.RateDetector`: is a scope calling far more (or, for the
  global stream, far less) than usual?
- :class:`~agents.anomaly.costs.CostDetector`: has what its calls cost shifted upward?
- :class:`~agents.anomaly.mix.TierMixDetector`: has its economy-tier share dropped?
- :class:`~agents.anomaly.series.SeriesDetector`: is a point of any regular series
  (``tollgate detect``) far from what its level, season and recent behaviour predict?

Each module's docstring says what it catches and what it cannot; ``docs/ANOMALY.md``
collects the thresholds and the detectability figures. This module owns nothing itself.
"""

from agents.anomaly.core import Detector, Kind, Point, Verdict
from agents.anomaly.costs import CostDetector, CostReference
from agents.anomaly.mix import TierMixDetector
from agents.anomaly.rates import PeerPrior, RateDetector
from app.anomaly_config import DetectorSettings

__all__ = [
    "CostDetector",
    "CostReference",
    "Detector",
    "DetectorSettings",
    "Kind",
    "PeerPrior",
    "Point",
    "RateDetector",
    "TierMixDetector",
    "Verdict",
]
