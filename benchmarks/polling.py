"""Polling at the limit: relayd (adaptive and fixed cadence) against the naive poll loop from the
provider's docs, on one rate-limited mock provider, in compressed time, in the same run.

    .venv/bin/python benchmarks/polling.py [--seconds 60] [--seed 1] \
        [--workload all|light|overload|skew] [--quick]

Time is compressed 30x: a 2 s rate window stands for 60 s, poll_interval 7/30 s for 7 s; all
latencies are printed in compressed seconds. Every system runs alone (one after another) against
a fresh mock provider and receiver in this process, and sees the same seeded job sequence: a
closed loop keeps N jobs in flight, replacing each job as soon as its POST reaches the receiver.

Measured: every job submitted after the first 20 % of the run (warm-up) and before its end; once
the run ends the loop keeps replacing jobs, so the load stays the same, until those jobs are
delivered (at most DRAIN_LIMIT). Budget share and polls per job count the measurement period
only (warm-up to end); 429s count the whole run.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import itertools
import json
import logging
import math
import random
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import aiohttp

from relayd.config import parse_config
from relayd.daemon import Daemon
from relayd.mock import provider as mock_provider
from relayd.mock import receiver as mock_receiver
from relayd.models import Submission

SCALE = 30.0  # compressed time: 1 s here stands for 30 s
WINDOW = 60.0 / SCALE  # rate_window
LIMIT = 60  # rate_limit
POLL_INTERVAL = 7.0 / SCALE
WARMUP_SHARE = 0.2  # jobs submitted in the first 20 % of a run are not measured
DRAIN_LIMIT = 60.0  # after the run, wait at most this long for measured jobs still in flight
API_KEY = "bench-polling-key"
TERMINAL = frozenset({"transcribed", "failed"})


@dataclass(frozen=True)
class Workload:
    name: str
    in_flight: int  # N: jobs kept in flight by the closed loop
    skew: float = 0.0  # provider clock minus real clock, seconds

    @property
    def period(self) -> float:
        """P: the per-job poll period the budget allows."""
        return max(POLL_INTERVAL, self.in_flight * WINDOW / LIMIT)


WORKLOADS = {
    "light": [Workload("light", 5)],
    "overload": [Workload("overload", 70)],
    "skew": [Workload("skew +0.1s", 70, +0.1), Workload("skew -0.1s", 70, -0.1)],
}


@dataclass(frozen=True)
class JobSpec:
    doc_id: str
    ready_after: float  # compressed seconds from registration to terminal
    audio_seconds: float  # real audio duration, shown by the provider while in progress


def job_specs(seed: int) -> Iterator[JobSpec]:
    """The job sequence: audio 1-30 min, processing 0.15-0.3 x audio, both compressed."""
    rng = random.Random(seed)
    for i in itertools.count():
        audio = rng.uniform(60.0, 1800.0)
        ratio = rng.uniform(0.15, 0.3)
        yield JobSpec(f"job-{i:06d}", audio * ratio / SCALE, audio)


# -- the systems under test ---------------------------------------------------------------------


class System(Protocol):
    name: str

    async def start(self, provider_url: str, receiver_url: str, tmp: Path) -> None: ...

    def submit(self, doc_ids: list[str]) -> None: ...

    async def stop(self) -> None: ...


class Relayd:
    """The real daemon, in process; jobs go in through its accept path (as the API does)."""

    def __init__(self, name: str, *, adaptive: bool) -> None:
        self.name = name
        self.adaptive = adaptive
        self._daemon: Daemon | None = None
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self, provider_url: str, receiver_url: str, tmp: Path) -> None:
        raw = {
            "relayd": {"state_dir": str(tmp), "spool_dir": str(tmp / "spool"), "socket": "",
                       "http": ""},
            "providers": {"main": {"kind": "xosum", "base_url": provider_url,
                                   "api_key": "env:BENCH_KEY", "rate_limit": LIMIT,
                                   "rate_window": WINDOW, "poll_interval": POLL_INTERVAL,
                                   "adaptive_polling": self.adaptive, "endpoints": ["app"]}},
            "endpoints": {"app": {"url": receiver_url}},
        }  # fmt: skip
        config = parse_config(raw, base_dir=tmp, env={"BENCH_KEY": API_KEY})
        self._daemon = Daemon(config)
        self._task = asyncio.create_task(self._daemon.serve(self._stop.wait))
        await self._daemon.ready.wait()

    def submit(self, doc_ids: list[str]) -> None:
        assert self._daemon is not None
        self._daemon.accept([Submission(d, "main") for d in doc_ids], source="bench")

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task


class NaiveLoop:
    """The provider docs' loop: one task per job; GET, honour 429 Retry-After, else sleep."""

    name = "naive loop"

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[None]] = set()
        self._session: aiohttp.ClientSession | None = None
        self._urls = ("", "")
        self.errors: collections.Counter[str] = collections.Counter()

    async def start(self, provider_url: str, receiver_url: str, tmp: Path) -> None:
        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        self._urls = (f"{provider_url}/api/getTranscription", receiver_url)

    def submit(self, doc_ids: list[str]) -> None:
        for doc_id in doc_ids:
            task = asyncio.create_task(self._follow(doc_id))
            self._tasks.add(task)
            task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.errors[type(task.exception()).__name__] += 1

    async def _follow(self, doc_id: str) -> None:
        assert self._session is not None
        poll_url, receiver_url = self._urls
        headers = {"Authorization": f"Bearer {API_KEY}"}
        while True:
            async with self._session.get(poll_url, params={"docId": doc_id}, headers=headers) as r:
                status, body, retry_after = r.status, await r.read(), r.headers.get("Retry-After")
            if status == 429:
                await asyncio.sleep(int(retry_after) if retry_after else POLL_INTERVAL)
                continue
            if status == 200 and json.loads(body).get("status") in TERMINAL:
                post_headers = {"Content-Type": "application/json"}
                async with self._session.post(receiver_url, data=body, headers=post_headers) as r:
                    await r.read()
                return
            await asyncio.sleep(POLL_INTERVAL)

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()


def systems() -> list[Callable[[], System]]:
    return [
        lambda: Relayd("relayd", adaptive=True),
        lambda: Relayd("relayd fixed", adaptive=False),
        NaiveLoop,
    ]


# -- the closed loop ----------------------------------------------------------------------------


@dataclass
class Tracked:
    submitted_at: float  # real clock
    finished_at: float  # real clock: the provider's finished_at minus its skew
    received_at: float | None = None


@dataclass
class ClosedLoop:
    """Keeps `in_flight` jobs going: each POST received registers and submits the next job."""

    provider: mock_provider.MockProvider
    system: System
    specs: Iterator[JobSpec]
    skew: float
    jobs: dict[str, Tracked] = field(default_factory=dict)
    duplicates: int = 0
    replacing: bool = True
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def register(self, count: int) -> None:
        now = time.time()
        batch = [next(self.specs) for _ in range(count)]
        for spec in batch:
            job = self.provider.add_job(
                spec.doc_id,
                ready_after=spec.ready_after,
                progress={"duration": spec.audio_seconds},  # known from the first answer on
                duration=spec.audio_seconds,
                type="single_voice",  # a base field: every answer says it
            )
            self.jobs[spec.doc_id] = Tracked(now, job.finished_at - self.skew)
        self.system.submit([spec.doc_id for spec in batch])

    def on_receive(self, item: mock_receiver.Received) -> None:
        tracked = self.jobs.get(str(item.json().get("docId")))
        if tracked is None or tracked.received_at is not None:
            self.duplicates += 1
            return
        tracked.received_at = item.at
        if self.replacing:
            self.register(1)
        self.changed.set()

    def measured(self, start: float, end: float) -> list[Tracked]:
        """Every job submitted after warm-up and before the end, however long it runs."""
        return [j for j in self.jobs.values() if start <= j.submitted_at < end]

    async def wait_received(self, jobs: list[Tracked], limit: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(limit):
                while any(j.received_at is None for j in jobs):
                    self.changed.clear()
                    await self.changed.wait()


# -- one run ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Result:
    workload: Workload
    system: str
    rejected: int
    budget_share: float
    latencies: list[float]
    missing: int
    polls_per_job: float
    completed: int
    duplicates: int
    seconds: float
    notes: str

    def pct(self, q: float) -> float:
        return percentile(self.latencies, q)

    @property
    def mean(self) -> float:
        return sum(self.latencies) / len(self.latencies) if self.latencies else math.nan


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (q in [0, 100])."""
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def budget_share(arrivals: list[float], start: float, end: float) -> float:
    """Mean over the full provider windows in [start, end) of accepted requests / LIMIT."""
    counts = collections.Counter(math.floor(t / WINDOW) for t in arrivals)
    first, last = math.ceil(start / WINDOW), math.floor(end / WINDOW)  # windows first..last-1
    shares = [min(counts[k], LIMIT) / LIMIT for k in range(first, last)]
    return sum(shares) / len(shares) if shares else math.nan


class WarningCounter(logging.Handler):
    """Counts relayd's warnings and errors by message template, instead of printing them."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.counts: collections.Counter[str] = collections.Counter()

    def emit(self, record: logging.LogRecord) -> None:
        self.counts[f"{record.levelname.lower()}: {record.msg}"] += 1


@contextlib.contextmanager
def relayd_warnings() -> Iterator[WarningCounter]:
    logger = logging.getLogger("relayd")
    handler = WarningCounter()
    saved = logger.handlers[:], logger.propagate
    logger.handlers[:] = [handler]
    logger.propagate = False
    try:
        yield handler
    finally:
        logger.handlers[:], logger.propagate = saved


async def run_one(
    make: Callable[[], System], workload: Workload, seconds: float, seed: int
) -> Result:
    skew = workload.skew
    started = time.perf_counter()
    provider, provider_runner, provider_port = await mock_provider.serve(
        window=WINDOW, limit=LIMIT, clock=lambda: time.time() + skew
    )
    system = make()
    loop = ClosedLoop(provider, system, job_specs(seed), skew)
    _, receiver_runner, receiver_port = await mock_receiver.serve(on_receive=loop.on_receive)
    try:
        with tempfile.TemporaryDirectory(prefix="relayd-bench-") as tmp, relayd_warnings() as warn:
            provider_url = f"http://127.0.0.1:{provider_port}"
            await system.start(provider_url, f"http://127.0.0.1:{receiver_port}/hook", Path(tmp))
            t0 = time.time()
            loop.register(workload.in_flight)
            await asyncio.sleep(seconds)
            warm, end = t0 + WARMUP_SHARE * seconds, t0 + seconds
            measured = loop.measured(warm, end)
            await loop.wait_received(measured, DRAIN_LIMIT)  # the load stays on meanwhile
            loop.replacing = False
            await system.stop()
            notes = dict(warn.counts)
    finally:
        await receiver_runner.cleanup()
        await provider_runner.cleanup()
    if isinstance(system, NaiveLoop):
        notes |= {f"naive task error: {k}": n for k, n in system.errors.items()}
    arrivals = [t - skew for t, _ in provider.arrivals]  # back on the real clock
    in_period = sum(1 for t in arrivals if warm <= t < end)
    completed = sum(1 for j in loop.jobs.values() if j.received_at and warm <= j.received_at < end)
    done = [j.received_at - j.finished_at for j in measured if j.received_at is not None]
    return Result(
        workload=workload,
        system=system.name,
        rejected=provider.rejected,
        budget_share=budget_share([t for t, _ in provider.arrivals], warm + skew, end + skew),
        latencies=done,
        missing=len(measured) - len(done),
        polls_per_job=in_period / completed if completed else math.nan,
        completed=completed,
        duplicates=loop.duplicates,
        seconds=time.perf_counter() - started,
        notes="; ".join(f"{msg} x{n}" for msg, n in sorted(notes.items())),
    )


# -- report -------------------------------------------------------------------------------------


def print_workload(workload: Workload, results: list[Result]) -> None:
    p = workload.period
    print(
        f"\n{workload.name}: N={workload.in_flight} in flight, P = max(poll_interval, "
        f"N x window / limit) = {p:.3f} s, floor P/2 = {p / 2:.3f} s, fair bound P = {p:.3f} s"
    )
    print(
        f"  {'system':14}{'429s':>6}{'budget':>8}{'p50 s':>8}{'p99 s':>8}{'p50/flr':>9}"
        f"{'p99/fair':>9}{'mean s':>8}{'polls/job':>10}{'jobs':>6}{'miss':>5}"
    )
    for r in results:
        print(
            f"  {r.system:14}{r.rejected:6d}{r.budget_share:8.1%}{r.pct(50):8.3f}{r.pct(99):8.3f}"
            f"{r.pct(50) / (p / 2):9.2f}{r.pct(99) / p:9.2f}{r.mean:8.3f}{r.polls_per_job:10.2f}"
            f"{len(r.latencies):6d}{r.missing:5d}"
        )


def print_summary(results: list[Result]) -> None:
    by = {(r.workload.name, r.system): r for r in results}
    print()
    for wl in dict.fromkeys(r.workload for r in results):
        relayd, fixed, naive = (
            by.get((wl.name, s)) for s in ("relayd", "relayd fixed", "naive loop")
        )
        if relayd and naive and wl.in_flight > LIMIT * POLL_INTERVAL / WINDOW:
            print(
                f"{wl.name}: relayd p99 / naive p99 = {relayd.pct(99) / naive.pct(99):.2f}"
                f" (target <= 0.50); relayd p99 / fair bound = {relayd.pct(99) / wl.period:.2f}"
                f" (target <= 1.20); relayd budget used {relayd.budget_share:.1%} (target >= 95%)"
            )
        if relayd and fixed:
            print(
                f"{wl.name}: relayd mean / fixed-cadence mean = {relayd.mean / fixed.mean:.3f}"
                f" (target < 1)"
            )
    if any(len(r.latencies) < 100 for r in results):
        print("few jobs (< 100) in some rows: their p99 is close to the maximum")
    relayd_429 = sum(r.rejected for r in results if r.system == "relayd")
    print(f"429s caused by relayd, all workloads: {relayd_429} (target 0)")
    for r in results:
        extra = []
        if r.duplicates:
            extra.append(f"{r.duplicates} duplicate POST(s)")
        if r.notes:
            extra.append(r.notes)
        if extra:
            print(f"note {r.workload.name} / {r.system}: {'; '.join(extra)}")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="run length per system")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--workload", choices=["all", *WORKLOADS], default="all")
    parser.add_argument("--quick", action="store_true", help="smoke run: 10 s per system")
    args = parser.parse_args()
    seconds = 10.0 if args.quick else args.seconds
    chosen = [w for name, ws in WORKLOADS.items() if args.workload in ("all", name) for w in ws]
    began = time.perf_counter()
    print(
        f"compressed time x{SCALE:g}: rate_limit {LIMIT} per {WINDOW:g} s window, poll_interval "
        f"{POLL_INTERVAL:.4f} s; {seconds:g} s per system per workload, first "
        f"{WARMUP_SHARE:.0%} warm-up; seed {args.seed}; latencies in compressed seconds"
    )
    results: list[Result] = []
    for workload in chosen:
        rows = []
        for make in systems():
            result = await run_one(make, workload, seconds, args.seed)
            print(f"  ran {workload.name} / {result.system} in {result.seconds:.1f} s",
                  file=sys.stderr, flush=True)  # fmt: skip
            rows.append(result)
        print_workload(workload, rows)
        results += rows
    print_summary(results)
    print(f"whole run: {time.perf_counter() - began:.0f} s")


if __name__ == "__main__":
    asyncio.run(main())
