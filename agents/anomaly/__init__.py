"""Anomaly detection (issues 5 and 12): request rates, cost per request, tier mix; alerts
with a lifecycle, correlated into one page per incident.

- :mod:`app.anomaly_config` -- every threshold, in one validated object.
- :mod:`agents.anomaly.rates`, :mod:`~agents.anomaly.costs`, :mod:`~agents.anomaly.mix`,
  :mod:`~agents.anomaly.series` -- the detectors (:mod:`agents.anomaly.detectors` re-exports).
- :mod:`agents.anomaly.alerting` -- verdicts to de-duplicated ``Alert`` records.
- :mod:`agents.anomaly.incidents` -- alerts of one incident to one page.
- :mod:`agents.anomaly.engine` -- Usage records to alerts: scopes, the event-time clock,
  checkpoints. Pure logic; :mod:`agents.anomaly.agent` is the Kafka runtime.
- :mod:`agents.anomaly.offline` -- a detector over a ``timestamp,value`` CSV.
"""

from agents.anomaly.alerting import AlertManager
from agents.anomaly.detectors import (
    CostDetector,
    Detector,
    DetectorSettings,
    Point,
    RateDetector,
    TierMixDetector,
    Verdict,
)
from agents.anomaly.engine import AnomalyEngine, SnapshotError
from agents.anomaly.incidents import Correlator
from agents.anomaly.offline import OfflineSummary, detect_csv

__all__ = [
    "AlertManager",
    "AnomalyEngine",
    "Correlator",
    "CostDetector",
    "Detector",
    "DetectorSettings",
    "OfflineSummary",
    "Point",
    "RateDetector",
    "SnapshotError",
    "TierMixDetector",
    "Verdict",
    "detect_csv",
]
