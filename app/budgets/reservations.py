"""What a call may cost before it runs: its worst case, a realistic estimate, and output caps.

Owns the numbers the gate reserves with. ``CallCost`` prices a call for any
number of output tokens (exactly as the price catalog will charge it), knows
its true worst case (the client's ``max_tokens``, else the model's output
limit) and its expected output (a high quantile of recent calls of that model,
``OutputEstimator``). ``fit_output_tokens`` finds the largest output cap whose
worst case fits a budget, so the gate can cap a call near a limit instead of
refusing it. Does not own admission (``gate.py``) or prices (``app/pricing/catalog.py``).
"""

from __future__ import annotations

import bisect
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

MIN_SAMPLES = 20
DEFAULT_WINDOW = 500


class OutputEstimator:
    """A high quantile of the output tokens of the last ``window`` calls, per model."""

    def __init__(self, fallback: int, quantile: float = 0.95, window: int = DEFAULT_WINDOW) -> None:
        self.fallback = fallback
        self.quantile = quantile
        self.window = window
        self._recent: dict[str, deque[int]] = {}
        self._sorted: dict[str, list[int]] = {}
        self._lock = threading.Lock()

    def observe(self, model: str, output_tokens: int) -> None:
        with self._lock:
            recent = self._recent.setdefault(model, deque())
            ordered = self._sorted.setdefault(model, [])
            recent.append(output_tokens)
            bisect.insort(ordered, output_tokens)
            if len(recent) > self.window:
                oldest = recent.popleft()
                del ordered[bisect.bisect_left(ordered, oldest)]

    def expected(self, model: str) -> int:
        """The quantile once ``MIN_SAMPLES`` calls were seen; the fallback before that."""
        with self._lock:
            ordered = self._sorted.get(model) or []
            if len(ordered) < MIN_SAMPLES:
                return self.fallback
            return ordered[min(len(ordered) - 1, int(self.quantile * len(ordered)))]


@dataclass(frozen=True)
class CallCost:
    """A call's cost as a function of its output tokens, and the bounds on those tokens."""

    price: Callable[[int], int]  # output tokens -> nano-dollars (prompt included), monotone
    max_output_tokens: int  # the client's max_tokens, else the model's output limit
    expected_output_tokens: int  # realistic: a high quantile of recent calls, within the max
    client_capped: bool  # the client set max_tokens itself
    # What the call costs at least (its prompt's floor and one output token per choice), for
    # refusing it on its prompt alone; None: ``price(1)``.
    least_nanos: int | None = None

    @property
    def least(self) -> int:
        return self.price(1) if self.least_nanos is None else self.least_nanos

    @property
    def worst_nanos(self) -> int:
        return self.price(self.max_output_tokens)

    @property
    def expected_nanos(self) -> int:
        return self.price(min(self.expected_output_tokens, self.max_output_tokens))


def fit_output_tokens(cost: CallCost, budget_nanos: int) -> int:
    """The largest output cap (0..max) whose worst case is within ``budget_nanos``."""
    if cost.price(0) > budget_nanos:
        return 0
    low, high = 0, cost.max_output_tokens
    while low < high:
        middle = (low + high + 1) // 2
        if cost.price(middle) <= budget_nanos:
            low = middle
        else:
            high = middle - 1
    return low
