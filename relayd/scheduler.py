"""Which job to poll next within one budget: the earliest due first, so none starves.

Pure: a heap of (due time, job) with lazy removal; the poll loop asks it for the next due job
whenever the budget has a slot. Under overload every job's due time is in the past, and
earliest-due-first becomes a round robin in which each job gets an equal share.
"""

from __future__ import annotations

import heapq
import itertools


class Schedule:
    def __init__(self) -> None:
        self._heap: list[tuple[float, int, int]] = []
        self._due: dict[int, float] = {}
        self._seq = itertools.count()

    def __len__(self) -> int:
        return len(self._due)

    def __contains__(self, job_id: object) -> bool:
        return job_id in self._due

    def add(self, job_id: int, due: float) -> None:
        """Schedule (or reschedule) a job."""
        self._due[job_id] = due
        heapq.heappush(self._heap, (due, next(self._seq), job_id))

    def remove(self, job_id: int) -> None:
        self._due.pop(job_id, None)

    def _clean(self) -> None:
        heap, due = self._heap, self._due
        while heap and due.get(heap[0][2]) != heap[0][0]:
            heapq.heappop(heap)

    def next_due(self) -> float | None:
        self._clean()
        return self._heap[0][0] if self._heap else None

    def pop_due(self, now: float) -> int | None:
        """The job that has waited longest past its due time, if any is due."""
        self._clean()
        if not self._heap or self._heap[0][0] > now:
            return None
        _, _, job_id = heapq.heappop(self._heap)
        del self._due[job_id]
        return job_id

    def waiting(self, now: float) -> int:
        """How many jobs are due now (the backlog)."""
        return sum(1 for due in self._due.values() if due <= now)
