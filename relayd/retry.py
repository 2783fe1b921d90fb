"""Backoff maths for deliveries and polls, and `Retry-After` parsing. Pure functions."""

from __future__ import annotations

import contextlib
import email.utils
from collections.abc import Callable


def backoff(attempt: int, initial: float, maximum: float, rand: Callable[[], float]) -> float:
    """Full jitter: a uniform delay in [0, min(maximum, initial * 2**(attempt-1))).

    `attempt` counts failures so far (1 after the first). Full jitter spreads the retries of
    many deliveries that failed together, so a recovering endpoint is not hit in lockstep.
    """
    exp = min(max(attempt - 1, 0), 60)
    return rand() * min(maximum, initial * 2.0**exp)


def probe_delay(failures: int, initial: float, maximum: float, rand: Callable[[], float]) -> float:
    """Equal jitter for an endpoint-wide pause: between half and all of the exponential step."""
    exp = min(max(failures - 1, 0), 60)
    step = min(maximum, initial * 2.0**exp)
    return step / 2 + rand() * step / 2


def poll_backoff(errors: int, interval: float) -> float:
    """Delay before polling a job again after `errors` failed polls in a row."""
    cap = max(interval, min(300.0, interval * 32))
    return min(cap, interval * 2.0 ** min(errors, 30))


def parse_retry_after(
    value: str | None, date: str | None = None, now: float | None = None
) -> float | None:
    """Seconds to wait from a `Retry-After` header: delta-seconds, or an HTTP date.

    An HTTP date is read against the answer's own `Date` header when there is one, so a skewed
    clock on either side does not distort it; otherwise against `now` (epoch seconds).
    """
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return seconds if seconds >= 0 and seconds == seconds and seconds != float("inf") else None
    try:
        when = email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    reference = now
    if date:
        with contextlib.suppress(TypeError, ValueError, IndexError, OverflowError):
            reference = email.utils.parsedate_to_datetime(date).timestamp()
    if reference is None:
        return None
    return max(0.0, when - reference)
