"""How soon any test can page a gradual cost drift (issue 12's "statistics of why").

The drift: a feature's cost per call rising linearly 1x -> 5x over 3 hours, so its excess
crosses +50 % after 1,350 s. Log cost of a call is normal with spread ``sigma`` around the
log of the current level. Two bounds, neither of them the project's detector:

* ``fixed_calls``: calls a one-sided z test of a +50 % shift (log 0.405) needs at false
  alarm rate ``alpha`` and the given power, had the shift been there all along.
* ``cusum_delay``: the best case of a sequential test on the ramp itself, a CUSUM of the
  log-likelihood ratio with the spread and the reference known exactly (a frozen reference
  that learned nothing of the rise), tuned to a shift ``design``, threshold ln(``arl0``)
  (Lorden: at least ``arl0`` calls between false alarms); seconds from the +50 % crossing
  to its alarm (negative: before it).

``python -m bench.drift_floor`` prints both tables (docs/ANOMALY.md, "Drift: the statistics").
"""

from __future__ import annotations

import math
import random
import statistics
from statistics import NormalDist

RAMP_S = 3 * 3600.0
PLUS_50_S = RAMP_S * 0.5 / 4  # 1x + 4x * progress reaches 1.5x at 1,350 s
SHIFT = math.log(1.5)


def fixed_calls(sigma: float, alpha: float, power: float) -> float:
    """Calls a one-sided z test needs to find a mean shift of log 1.5 in log costs."""
    z = NormalDist().inv_cdf
    return ((z(1 - alpha) + z(power)) * sigma / SHIFT) ** 2


def cusum_delay(
    per_minute: float, sigma: float, design: float, arl0: float, seed: int
) -> float | None:
    """Seconds from the +50 % crossing to the best-case CUSUM's alarm (None: not in 3 h)."""
    rng = random.Random(seed)
    threshold = math.log(arl0)
    stat = 0.0
    t = 0.0
    while t < RAMP_S:
        level = math.log(1 + 4 * t / RAMP_S)
        x = rng.gauss(level, sigma)
        stat = max(0.0, stat + design / sigma**2 * (x - design / 2))
        if stat >= threshold:
            return t - PLUS_50_S
        t += rng.expovariate(per_minute / 60)
    return None


def cusum_floor(
    per_minute: float, sigma: float, arl0: float, seeds: int = 40
) -> tuple[float, float, float]:
    """The best design among 0.2, 0.3, ln 1.5 and 0.6 (by median delay): (design, median
    delay, 90th percentile delay), seconds after +50 %; a miss counts as never."""
    best: tuple[float, float, float] | None = None
    for design in (0.2, 0.3, SHIFT, 0.6):
        delays = sorted(
            math.inf if d is None else d
            for d in (cusum_delay(per_minute, sigma, design, arl0, s) for s in range(seeds))
        )
        row = (design, statistics.median(delays), delays[int(0.9 * seeds) - 1])
        if best is None or row[1] < best[1]:
            best = row
    assert best is not None
    return best


def main() -> None:
    print("one-sided z test of +50 % (log 0.405): calls needed (50 % / 90 % power)")
    for sigma in (0.5, 0.8, 1.0, 1.26):
        cells = [
            f"alpha {alpha:g}: {fixed_calls(sigma, alpha, 0.5):.0f} / "
            f"{fixed_calls(sigma, alpha, 0.9):.0f}"
            for alpha in (1e-3, 1e-5, 1e-7)
        ]
        print(f"  spread {sigma}: " + "; ".join(cells))
    print("best-case CUSUM on a 1x -> 5x / 3 h ramp: seconds after +50 % (median, 90th pct)")
    for per_minute in (4.0, 9.0, 20.0):
        for sigma in (0.8, 1.0):
            for arl0 in (1e5, 1e7):
                design, median, p90 = cusum_floor(per_minute, sigma, arl0)
                print(
                    f"  {per_minute:g}/min spread {sigma} ARL0 {arl0:g}: design {design:.3f}: "
                    f"{median:.0f} s, {p90:.0f} s ({median * per_minute / 60:.0f} / "
                    f"{p90 * per_minute / 60:.0f} calls)"
                )


if __name__ == "__main__":
    main()
