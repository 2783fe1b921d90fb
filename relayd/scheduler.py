"""Which job to poll next within one budget: the earliest due first, so none starves, and never
a free slot left idle while some job may be polled.

Pure: each job has a *due* time (when the cadence wants it polled) and a *ready* time (the
soonest it may be: `poll_interval` or the provider's `max-age` after its last poll, or the end of
an error backoff; ready <= due). The poll loop asks for a job whenever the budget has a slot and
gets the earliest-due job that is ready. So a due job always goes first; when none is due, the
slot goes to the ready job due soonest rather than to waste. Under overload every job's due time
is in the past, and earliest-due-first becomes a round robin in which each job gets its turn.

Two heaps with lazy removal: `_waiting` by ready time holds jobs not yet ready, `_ready` by due
time holds the rest.
"""

from __future__ import annotations

import heapq
import itertools


class Schedule:
    def __init__(self) -> None:
        self._due: dict[int, float] = {}
        self._entry: dict[int, int] = {}  # job -> sequence number of its live heap entry
        self._waiting: list[tuple[float, int, int]] = []  # (ready, seq, job)
        self._ready: list[tuple[float, int, int]] = []  # (due, seq, job)
        self._seq = itertools.count()

    def __len__(self) -> int:
        return len(self._due)

    def __contains__(self, job_id: object) -> bool:
        return job_id in self._due

    def add(self, job_id: int, due: float, ready: float | None = None) -> None:
        """Schedule (or reschedule) a job: wanted at `due`, allowed from `ready` (default due)."""
        seq = next(self._seq)
        self._entry[job_id] = seq
        self._due[job_id] = due
        start = due if ready is None else min(ready, due)
        heapq.heappush(self._waiting, (start, seq, job_id))

    def discard(self, job_id: int) -> None:
        """Forget a job (its heap entries go lazily)."""
        if self._due.pop(job_id, None) is not None:
            del self._entry[job_id]

    def _live(self, entry: tuple[float, int, int]) -> bool:
        return self._entry.get(entry[2]) == entry[1]

    def _settle(self, now: float) -> None:
        """Move jobs that are ready by `now` to the ready heap; drop stale entries on top."""
        waiting, ready = self._waiting, self._ready
        while waiting and (waiting[0][0] <= now or not self._live(waiting[0])):
            entry = heapq.heappop(waiting)
            if self._live(entry):
                heapq.heappush(ready, (self._due[entry[2]], entry[1], entry[2]))
        while ready and not self._live(ready[0]):
            heapq.heappop(ready)

    def pop(self, now: float, *, early: bool = True) -> int | None:
        """The ready job due soonest (which is due, if any is). `early=False`: only a due job."""
        self._settle(now)
        if not self._ready or (not early and self._ready[0][0] > now):
            return None
        _, _, job_id = heapq.heappop(self._ready)
        del self._due[job_id], self._entry[job_id]
        return job_id

    def next_at(self, now: float, *, early: bool = True) -> float | None:
        """The earliest time `pop` may return a job (a lower bound without `early`)."""
        self._settle(now)
        times = []
        if self._ready:
            times.append(now if early else max(now, self._ready[0][0]))
        if self._waiting:
            times.append(self._waiting[0][0])
        return min(times, default=None)

    def waiting(self, now: float) -> int:
        """How many jobs are due now (the backlog)."""
        return sum(1 for due in self._due.values() if due <= now)
