"""Wall-clock time, replaceable for demos and tests of period boundaries.

``TOLLGATE_CLOCK_START`` (testing only) makes the clock start at that instant
and run at normal speed, so "23:59:59 on the last day of the month" can be
reached on purpose. Every component that needs "now" gets a Clock at start-up.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime


class Clock:
    def __init__(self, start: datetime | None = None) -> None:
        self._offset_s = 0.0
        if start is not None:
            self._offset_s = start.timestamp() - time.time()

    def now(self) -> datetime:
        return datetime.fromtimestamp(time.time() + self._offset_s, UTC)

    def now_ms(self) -> int:
        return int((time.time() + self._offset_s) * 1000)
