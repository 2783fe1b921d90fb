"""How long to wait before polling one job again: adaptive, from what the polls say about the job
and what finished jobs have taught about how long such jobs take.

Pure: no I/O, no clock; ages and durations are passed in (seconds).

Why adapt: every poll spends budget that another job could use. A poll long before a job can be
done, or the hundredth poll of a job that is stuck, buys nothing; the same request spent on a job
that is about to finish buys latency. So each job gets a *target delay*:

- Before its expected finish window, when the budget is crowded: straight to the window (at
  most `MAX_EARLY_WAIT` poll_intervals at a time, so a wrong guess heals). The window opens at
  the 5th percentile less a margin, so few jobs finish before it; halving the gap instead was
  tried and cost more than it saved under overload, where a job gets only a few polls in its
  whole life.
- Inside the window (or before it, when the budget can poll every job every `poll_interval`):
  `poll_interval`.
- Past the window, or with nothing learned yet: the longer a job has been processing, the less
  often it is polled — `poll_interval` plus a share of the time it has overrun, up to
  `MAX_STRETCH` x `poll_interval`.

Every delay is at least `poll_interval`, so adapting never costs more requests than a fixed
cadence; it only moves them to where they are likely to find the job done.

The expected window comes from `RunTimes`: for each provider and kind of media (`type`), how many
seconds of processing finished jobs took per second of media (`duration`), or, when the polls
carry no duration, how many seconds they took outright. It is a robust range (5th to 95th
percentile with a margin), not a mean, so one odd job cannot move it far.

The scheduler (`scheduler.Schedule`) stays earliest-due-first: a job's due time is the end of its
target delay, and it is *ready* again `poll_interval` after its poll. A free budget slot goes to
the ready job due soonest, so adapting decides who goes first when the budget is short, never
whether the budget is used. Under overload every job is late by the same lag, so the budget is
shared fairly and a job with a long target delay simply takes fewer turns.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

MIN_SAMPLES = 8  # finished jobs needed before a learned window is trusted
KEEP = 256  # most recent run times kept per provider and kind
EARLY_Q, LATE_Q = 0.05, 0.95
MARGIN = 0.15  # the window is widened by this share on each side
OVERRUN_SHARE = 0.05  # extra delay per second a job is past its window (or processing, unlearned)
MAX_STRETCH = 4.0  # past the window: at most this many poll_intervals between two polls
MAX_EARLY_WAIT = 16.0  # before the window: at most this many poll_intervals (a wrong guess heals)


@dataclass(frozen=True)
class Hints:
    """What a provider's answer says about the job's media (either may be unknown)."""

    kind: str | None = None  # e.g. Xosum's `type`: "audio", "video"
    media_seconds: float | None = None  # length of the recording


@dataclass(frozen=True)
class Expected:
    """When a job is expected to finish, in seconds after it was submitted."""

    early: float
    late: float


def hints_from(kind: object, seconds: object) -> Hints:
    """Hints from raw answer fields; anything implausible is ignored (providers vary)."""
    clean_kind = kind if isinstance(kind, str) and 0 < len(kind) <= 64 else None
    value: float | None = None
    if isinstance(seconds, int | float) and not isinstance(seconds, bool):
        value = float(seconds)
    elif isinstance(seconds, str):
        try:
            value = float(seconds)
        except ValueError:
            value = None
    if value is not None and not (math.isfinite(value) and 0 < value < 1e7):
        value = None
    return Hints(clean_kind, value)


def next_delay(
    age: float, poll_interval: float, expected: Expected | None, *, crowded: bool
) -> float:
    """Seconds until the next poll of a job that has been processing for `age` seconds.

    `crowded`: the key's budget cannot poll all its jobs every poll_interval. Only then are
    polls before the expected window skipped; with budget to spare they cost nothing and catch
    the few jobs that finish early.
    """
    longest = poll_interval * MAX_STRETCH
    if expected is None:
        return min(longest, max(poll_interval, age * OVERRUN_SHARE))
    if age < expected.early and crowded:
        return min(poll_interval * MAX_EARLY_WAIT, max(poll_interval, expected.early - age))
    if age <= expected.late:
        return poll_interval
    return min(longest, poll_interval + (age - expected.late) * OVERRUN_SHARE)


class RunTimes:
    """How long finished jobs took to process, learned per provider and kind of media."""

    def __init__(self) -> None:
        self._samples: dict[tuple[str, str | None, bool], deque[float]] = {}
        self._sorted: dict[tuple[str, str | None, bool], list[float]] = {}

    def observe(self, provider: str, hints: Hints, seconds: float) -> None:
        """A job of `provider` with these hints took `seconds` from submission to done."""
        if not (math.isfinite(seconds) and seconds > 0):
            return
        self._add((provider, hints.kind, False), seconds)
        if hints.kind is not None:
            self._add((provider, None, False), seconds)
        if hints.media_seconds:
            self._add((provider, hints.kind, True), seconds / hints.media_seconds)

    def seed(self, rows: Iterable[tuple[str, str | None, float | None, float]]) -> None:
        """Learn from stored jobs: (provider, kind, media seconds, run seconds), oldest first."""
        for provider, kind, media, seconds in rows:
            self.observe(provider, Hints(kind, media), seconds)

    def expect(self, provider: str, hints: Hints) -> Expected | None:
        """The window a job like this is expected to finish in, or None if too little is known."""
        if hints.media_seconds:
            q = self._quantiles((provider, hints.kind, True))
            if q is not None:
                return _widen(q[0] * hints.media_seconds, q[1] * hints.media_seconds)
        for key in ((provider, hints.kind, False), (provider, None, False)):
            q = self._quantiles(key)
            if q is not None:
                return _widen(*q)
        return None

    def _add(self, key: tuple[str, str | None, bool], value: float) -> None:
        samples = self._samples.get(key)
        if samples is None:
            samples = self._samples[key] = deque(maxlen=KEEP)
        samples.append(value)
        self._sorted.pop(key, None)

    def _quantiles(self, key: tuple[str, str | None, bool]) -> tuple[float, float] | None:
        samples = self._samples.get(key)
        if samples is None or len(samples) < MIN_SAMPLES:
            return None
        ordered = self._sorted.get(key)
        if ordered is None:
            ordered = self._sorted[key] = sorted(samples)
        last = len(ordered) - 1
        return ordered[round(EARLY_Q * last)], ordered[round(LATE_Q * last)]


def _widen(early: float, late: float) -> Expected:
    return Expected(early * (1 - MARGIN), late * (1 + MARGIN))


def backlog_period(delays: Iterable[float], capacity: float) -> tuple[float, float]:
    """(polls per second wanted, mean seconds between two polls of one job) for jobs with these
    target delays, when the budget allows `capacity` polls per second."""
    count, demand = 0, 0.0
    for delay in delays:
        count += 1
        demand += 1.0 / delay
    if count == 0:
        return 0.0, 0.0
    return demand, count / min(demand, capacity)
