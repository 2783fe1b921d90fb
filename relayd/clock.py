"""Time as a dependency: the daemon reads time only through a `Clock`, so tests can steer it."""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def time(self) -> float:
        """Wall-clock seconds since the epoch (persisted timestamps, aligned windows)."""
        ...

    def monotonic(self) -> float:
        """Seconds that never jump (budgets, timeouts)."""
        ...


class SystemClock:
    def time(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()
