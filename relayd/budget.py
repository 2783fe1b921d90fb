"""The request budget of one API key: how many requests relayd may send now.

Pure bookkeeping with `now` passed in (monotonic seconds); no asyncio, no I/O.
"""

from __future__ import annotations

import itertools
import math
from collections import deque

# Why a rolling window counted from *answers*, not an aligned window:
# the provider counts requests in fixed windows aligned to *its* clock, which may differ from
# ours by seconds. A fixed window on our clock can then put 2 x limit requests into one of the
# provider's windows. Instead, each request holds its slot from the moment it is sent until
# `window` after its answer arrived. The provider saw the request before we saw the answer, so
# any two requests that share a slot reach the provider at least `window` apart: no interval of
# length `window` on any clock (hence no fixed window of the provider's) holds more than
# `limit` of them. It costs one round trip per slot per window: at 60 s windows and a 50 ms
# answer, under 0.1 % of the budget. A request that fails without an answer (timeout, reset)
# frees its slot `window` after we gave up, which is later than it could have arrived.
#
# Why a token bucket in front of it: the rolling window alone lets a whole window's requests go
# out in the first instant, and under overload that burst repeats every window; a job that misses
# one burst then waits a whole window more (a poll every 60 or 120 s instead of every 70). The
# bucket refills at limit/window per second and holds a tenth of the limit, so a quiet key still
# answers a small batch of new jobs at once, while a busy key's requests are spread evenly
# through the window (one every window/limit seconds) and every job's turn comes round at the
# same pace. The bucket only delays; the rolling window alone keeps the provider's limit.

BURST_SHARE = 0.1  # the bucket holds this share of the limit (at least two requests, so a send
# that went out a little late is made up for and the whole budget is still used)


class Budget:
    def __init__(
        self, limit: int, window: float, *, now: float = 0.0, burst: int | None = None
    ) -> None:
        if limit < 1 or window <= 0:
            raise ValueError("limit must be >= 1 and window > 0")
        self.limit = limit
        self.window = window
        self.rate = limit / window
        self._burst_arg = burst  # None: BURST_SHARE of the limit; kept across a resize
        self.burst = burst if burst is not None else max(2, int(limit * BURST_SHARE))
        self._tokens = float(self.burst)
        self._tokens_at = now
        self.in_flight = 0
        self._frees: deque[float] = deque()  # when finished requests give their slot back
        self._blocked_until = now
        self.block_reason = ""
        self._sent: deque[float] = deque()  # wall times of sends, for "used this window"

    def _advance(self, now: float) -> None:
        """Bring the state to `now`: earn tokens, then drop slots that have freed."""
        if now > self._tokens_at:
            self._tokens = self._tokens_by(now)
            self._tokens_at = now
        while self._frees and self._frees[0] <= now:
            self._frees.popleft()

    def _tokens_by(self, until: float) -> float:
        """Tokens at `until`, changing nothing. Beyond one token they build up only while the
        rolling window has room for them, so on a busy key the slots that free together (a
        window after a burst) are not spent together again: the key stays evenly paced."""
        t, tokens = self._tokens_at, self._tokens
        if until <= t:
            return tokens
        # every slot in _frees frees after _tokens_at (both move together in _advance)
        held = self.in_flight + len(self._frees)
        for free in itertools.chain(self._frees, (math.inf,)):
            end = min(free, until)
            cap = min(self.burst, max(1, self.limit - held + 1))
            tokens = max(tokens, min(cap, tokens + (end - t) * self.rate))
            if free >= until:
                return tokens
            t, held = end, held - 1  # that slot is free from here on
        return tokens

    def blocked(self, now: float) -> bool:
        return now < self._blocked_until

    def available(self, now: float) -> int:
        if self.blocked(now):
            return 0
        self._advance(now)
        rolling = self.limit - self.in_flight - len(self._frees)
        return max(0, min(rolling, math.floor(self._tokens + 1e-9)))

    def try_acquire(self, now: float, *, wall: float | None = None) -> bool:
        """Take a slot for one request about to be sent."""
        if self.available(now) <= 0:
            return False
        self.in_flight += 1
        self._tokens -= 1
        if wall is not None:
            self._sent.append(wall)
            while self._sent and self._sent[0] < wall - 2 * self.window:
                self._sent.popleft()
        return True

    def release(self, now: float) -> None:
        """The request's answer arrived (or we gave up on it) at `now`."""
        self.in_flight = max(0, self.in_flight - 1)
        self._frees.append(now + self.window)

    def unused(self) -> None:
        """A slot was taken but no request went out: nor is one counted as sent."""
        self.in_flight = max(0, self.in_flight - 1)
        self._tokens = min(self.burst, self._tokens + 1)
        if self._sent:
            self._sent.pop()

    def pending_frees(self, now: float) -> list[float]:
        """When the used slots free up (requests still in flight count as answered now)."""
        self._advance(now)
        return list(self._frees) + [now + self.window] * self.in_flight

    def seed(self, frees: list[float], now: float) -> None:
        """Carry slots used by a previous run of the daemon into this one."""
        for t in sorted(frees):
            if t > now:
                self._frees.append(t)
        while len(self._frees) > self.limit:
            self._frees.popleft()

    def resized(self, limit: int, window: float, now: float) -> Budget:
        """The same key under a new limit (config reload): spent slots and blocks carry over."""
        fresh = Budget(limit, window, now=now, burst=self._burst_arg)
        self._advance(now)
        longer = max(0.0, window - self.window)
        fresh._frees = deque(t + longer for t in self._frees)
        fresh.in_flight = self.in_flight  # their answers release into the new budget
        fresh._tokens, fresh._tokens_at = min(fresh.burst, self._tokens), now
        fresh._blocked_until, fresh.block_reason = self._blocked_until, self.block_reason
        fresh._sent = deque(self._sent)
        return fresh

    def block_until(self, until: float, reason: str = "") -> None:
        """The provider said stop (429): send nothing before `until`."""
        if until > self._blocked_until:
            self._blocked_until = until
            self.block_reason = reason

    def blocked_until(self) -> float:
        return self._blocked_until

    def next_free_at(self, now: float) -> float | None:
        """When a slot will next be free: `now` if one is, None if only an answer can free one."""
        if self.blocked(now):
            free = self._first_free(self._blocked_until)
            return None if free is None else max(self._blocked_until, free)
        return self._first_free(now)

    def _first_free(self, at: float) -> float | None:
        """When, from `at` on (not before the last update), a request may go: the rolling window
        has a slot and the bucket a token. Changes nothing."""
        freed = 0  # slots already free by `at`
        for t in self._frees:
            if t > at:
                break
            freed += 1
        pending = len(self._frees) - freed
        room = self.limit - self.in_flight
        if room - pending > 0:
            free = at
        elif pending and room > 0:
            free = self._frees[freed + pending - room]  # the k-th free time frees one slot
        else:
            return None
        tokens = self._tokens_by(free)
        return free if tokens >= 1 - 1e-9 else free + (1 - tokens) / self.rate

    def used_in_window(self, wall: float) -> int:
        """Requests sent in the current wall-clock-aligned window (for status and metrics)."""
        start = math.floor(wall / self.window) * self.window
        return sum(1 for t in self._sent if t >= start)


def next_window_start(wall: float, window: float) -> float:
    """Start of the next wall-clock-aligned window after `wall`."""
    return (math.floor(wall / window) + 1) * window
