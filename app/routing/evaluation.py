"""RouteLLM's router metrics: the quality/cost curve, APGR and CPT.

Owns the arithmetic of judging a router on labelled data (each prompt answered by a
weak and a strong model, each answer right or wrong), as RouteLLM defines it
(Ong et al. 2024, ``routellm/evals/evaluate.py`` and ``benchmarks.py``):

- the router scores every prompt; thresholds are the score quantiles at 0, 10, ..., 100 %;
  at each threshold the prompts scoring at or above it (above it, for the last one) go to
  the strong model, giving a point (share of strong calls, accuracy);
- **APGR** is the area under that curve between the weak model's accuracy (0) and the
  strong model's (1): ``(AUC - weak_acc * span) / ((strong_acc - weak_acc) * span)``
  with the trapezoid rule; a random router scores about 0.5;
- **CPT(x %)** is the share of strong calls at which the curve first recovers x % of the
  gap between the two models, linearly interpolated (RouteLLM uses ``np.interp``, which
  assumes the curve rises; this walks the curve and takes its first crossing, the same
  value when it does rise).

It does not own any router; :mod:`bench.router_quality` runs them.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class QualityCurve:
    strong_shares: tuple[float, ...]  # ascending, 0..1
    accuracies: tuple[float, ...]
    weak_accuracy: float
    strong_accuracy: float

    @property
    def apgr(self) -> float:
        x = np.asarray(self.strong_shares)
        y = np.asarray(self.accuracies)
        span = float(x[-1] - x[0])
        gap = self.strong_accuracy - self.weak_accuracy
        if span <= 0 or gap == 0:
            return float("nan")
        area = float(np.trapezoid(y, x))
        return (area - self.weak_accuracy * span) / (gap * span)

    def cpt(self, recovered: float) -> float:
        """Share of strong calls needed to recover ``recovered`` (0..1) of the gap; nan if never."""
        target = self.weak_accuracy + recovered * (self.strong_accuracy - self.weak_accuracy)
        points = list(zip(self.strong_shares, self.accuracies, strict=True))
        if points[0][1] >= target:
            return points[0][0]
        for (x0, y0), (x1, y1) in itertools.pairwise(points):
            if y1 >= target > y0:
                return x0 + (x1 - x0) * (target - y0) / (y1 - y0)
        return float("nan")


def quality_curve(
    scores: Sequence[float],
    weak_correct: Sequence[bool],
    strong_correct: Sequence[bool],
    bins: int = 10,
) -> QualityCurve:
    """RouteLLM's curve for ``scores`` (higher = send to the strong model)."""
    s = np.asarray(scores, dtype=float)
    weak = np.asarray(weak_correct, dtype=float)
    strong = np.asarray(strong_correct, dtype=float)
    if not (len(s) == len(weak) == len(strong)) or not len(s):
        raise ValueError("scores, weak_correct and strong_correct must be equally long, not empty")
    thresholds = np.quantile(s, np.linspace(0.0, 1.0, bins + 1))
    points = []
    for index, threshold in enumerate(thresholds):
        strong_call = s >= threshold if index < bins else s > threshold
        points.append(
            (float(strong_call.mean()), float(np.where(strong_call, strong, weak).mean()))
        )
    points.sort()
    return QualityCurve(
        tuple(p[0] for p in points),
        tuple(p[1] for p in points),
        float(weak.mean()),
        float(strong.mean()),
    )
