"""Retention: a job that ended is deleted `retention` after it ended, a dead delivery and its job
`dead_retention` after the delivery died, with their polls, deliveries and attempts, so the
database stops growing under a steady load.

Pruning runs beside the other loops and never holds them up: each batch is one transaction in
the store's writer thread (the event loop awaits it), sized by what the last one took. While the
writer is idle a batch holds it a few milliseconds, so the commits of polls and deliveries that
come meanwhile wait little. While the writer is busy, a batch waits in its queue behind those
commits, and then may hold it about as long as it waited: pruning gets a third to a half of the
writer's time and keeps up with the jobs that end. (Held to a few milliseconds, each batch a
queue's wait after the last, pruning on a slower disk fell behind a steady 250 jobs/s, and the
soak's file grew to 3.7 GB.)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from relayd.clock import Clock
from relayd.config import Settings
from relayd.errors import StoreError
from relayd.metrics import Metrics
from relayd.models import Pruned
from relayd.store import Store

log = logging.getLogger("relayd.retention")

MAX_PASS_GAP = 60.0  # seconds between two passes at most (a tenth of the shortest retention)
MIN_PASS_GAP = 0.05  # ... and at least
BATCH_TARGET = 0.005  # seconds one batch should hold an idle writer (and the writes after it)
MAX_HOLD = 0.05  # ... and a busy one at most, however long the batch waited for it
FIRST_BATCH, MIN_BATCH, MAX_BATCH = 64, 1, 2048  # jobs per batch
KEEP_RUN_TIMES = 4096  # run times learned that outlive their jobs (what RunTimes reads back)


def cutoffs(
    now: float, retention: float, dead_retention: float
) -> tuple[float | None, float | None]:
    """(jobs that ended before this go, dead ones before this go); None: kept forever."""
    return (
        now - retention if retention > 0 else None,
        now - dead_retention if dead_retention > 0 else None,
    )


def pass_gap(retention: float, dead_retention: float) -> float:
    """Seconds between two passes: a tenth of the shortest retention, within bounds, so a job
    outlives its retention by at most a tenth of it (or a minute)."""
    shortest = min((r for r in (retention, dead_retention) if r > 0), default=MAX_PASS_GAP * 10)
    return min(MAX_PASS_GAP, max(MIN_PASS_GAP, shortest / 10))


def hold_target(waited: float) -> float:
    """How long a batch may hold the writer, from how long batches wait in its queue behind
    the other writes: as long as that (batch sizes then settle between half and all of it, a
    third to a half of a busy writer's time), at least BATCH_TARGET, at most MAX_HOLD."""
    return min(MAX_HOLD, max(BATCH_TARGET, waited))


def next_batch(size: int, took: float, target: float = BATCH_TARGET) -> int:
    """The next batch size, from how long a batch of `size` took: double while well under the
    target, halve while over it."""
    if took > target:
        return max(MIN_BATCH, size // 2)
    if took < target / 2:
        return min(MAX_BATCH, size * 2)
    return size


class Pruner:
    def __init__(
        self,
        *,
        store: Store,
        settings: Callable[[], Settings],  # the current ones: a reload changes retention
        clock: Clock,
        metrics: Metrics,
    ) -> None:
        self._store = store
        self._settings = settings
        self._clock = clock
        self._metrics = metrics
        self._batch = FIRST_BATCH
        self._waited = 0.0  # how long batches wait in the writer's queue (a moving average)
        self._stop = asyncio.Event()
        self.removed = Pruned()  # since start
        self.last_pass_at: float | None = None  # wall time of the last pass that removed any

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        """A pass, then wait; until stopped. A database that refuses is tried at the next pass."""
        while not self._stop.is_set():
            settings = self._settings()
            try:
                await self.prune()
            except StoreError as exc:
                log.error("retention: cannot prune now: %s", exc)
            with contextlib.suppress(TimeoutError):
                gap = pass_gap(settings.retention, settings.dead_retention)
                await asyncio.wait_for(self._stop.wait(), gap)

    async def prune(self) -> Pruned:
        """One pass: batch after batch until nothing is due or relayd stops."""
        settings = self._settings()
        ended_before, dead_before = cutoffs(
            self._clock.time(), settings.retention, settings.dead_retention
        )
        removed = Pruned()
        while not self._stop.is_set():
            asked_at = time.perf_counter()
            batch, took = await self._store.run(self._timed, ended_before, dead_before, self._batch)
            waited = max(0.0, time.perf_counter() - asked_at - took)
            self._waited += (waited - self._waited) / 4
            removed += batch
            target = hold_target(self._waited)
            asked, self._batch = self._batch, next_batch(self._batch, took, target)
            if batch.jobs < asked:
                break
            await asyncio.sleep(0)  # the API, the polls and the deliveries go between batches
        await self._store.run(self._store.trim_run_times, KEEP_RUN_TIMES)
        if removed.jobs:
            self._count(removed)
        return removed

    def _timed(
        self, ended_before: float | None, dead_before: float | None, limit: int
    ) -> tuple[Pruned, float]:
        """One batch and the real time it held the store (where it runs: the writer thread),
        not counting its wait for the writes queued before it: under load that wait is long
        whatever the batch's size, and counting it shrank batches to one job while the jobs
        to prune piled up (the soak's file grew to 2 GB)."""
        started = time.perf_counter()
        batch = self._store.prune(ended_before=ended_before, dead_before=dead_before, limit=limit)
        return batch, time.perf_counter() - started

    def _count(self, removed: Pruned) -> None:
        self.removed += removed
        self.last_pass_at = self._clock.time()
        for what, n in removed.as_dict().items():
            self._metrics.pruned.labels(what).inc(n)
        log.info(
            "retention removed %d job(s): %d poll(s), %d delivery(ies), %d attempt(s)",
            removed.jobs,
            removed.polls,
            removed.deliveries,
            removed.attempts,
        )

    def status(self) -> dict[str, object]:
        return {"removed": self.removed.as_dict(), "last_removed_at": self.last_pass_at}
