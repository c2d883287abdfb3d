"""Anomaly detection (issue 5): cost per request, volume, tier mix; alerts with a lifecycle.

- :mod:`agents.anomaly.detectors` -- the River-based detectors and their settings.
- :mod:`agents.anomaly.alerting` -- verdicts to de-duplicated ``Alert`` records.
- :mod:`agents.anomaly.engine` -- Usage records to alerts: scopes, minute buckets,
  checkpoints. Pure logic; the Kafka agent wraps it.
- :mod:`agents.anomaly.offline` -- the same detectors over a ``timestamp,value`` CSV.
"""

from agents.anomaly.alerting import AlertManager
from agents.anomaly.detectors import (
    CostDetector,
    Detector,
    DetectorSettings,
    Point,
    TierMixDetector,
    Verdict,
    VolumeDetector,
)
from agents.anomaly.engine import AnomalyEngine, SnapshotError
from agents.anomaly.offline import OfflineSummary, detect_csv

__all__ = [
    "AlertManager",
    "AnomalyEngine",
    "CostDetector",
    "Detector",
    "DetectorSettings",
    "OfflineSummary",
    "Point",
    "SnapshotError",
    "TierMixDetector",
    "Verdict",
    "VolumeDetector",
    "detect_csv",
]
