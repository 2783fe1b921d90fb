"""Fakes at the true seams: the clock."""

from __future__ import annotations


class FakeClock:
    """A clock tests advance by hand; wall and monotonic move together."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self._now = start

    def time(self) -> float:
        return self._now

    def monotonic(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        self._now += seconds
