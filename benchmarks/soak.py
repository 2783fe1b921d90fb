"""Soak: relay a long stream of jobs with realistic bodies through the real daemon, once with a
short `retention` (pruning all along) and once keeping everything, and watch what grows
(issue 16). Reports, side by side:

- the database file and its WAL over time (and a plot, --plot FILE);
- RSS and open file descriptors of the daemon over time;
- event-loop lag (p99, max) and the longest single pruning batch;
- throughput (jobs delivered per second) with and without pruning.

    PYTHONPATH=. .venv/bin/python benchmarks/soak.py [--jobs 200000] [--retention 5]
        [--in-flight 600] [--keys 4] [--plot benchmarks/soak.png] [--only retention|keep]

Every job is a Xosum job that is finished at its first poll; the mock provider (its own
process) answers with a transcript of 10-50 KB (the size follows the docId), so relayd stores
the answer and one delivery body of that size per job. A receiver in its own process counts
the POSTs. This process submits through the TCP API in batches of 100, keeping --in-flight
jobs submitted but not yet delivered, so the daemon always has work and the run measures its
throughput.

The daemon runs from this checkout with two probes added by a wrapper (nothing in relayd
itself): a task that sleeps 5 ms over and over and records how late it wakes (the event-loop
lag: whatever held the loop, a pruning batch, a commit, a large JSON encode), and a timer
around `SqliteStore.prune` (one batch). The baseline for the ratios is the same run with
`retention = "0"` (nothing deleted), measured in the same session.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from benchmarks.scale import env_with_path
from relayd.mock.net import free_port, wait_port

ROOT = Path(__file__).resolve().parent.parent
BATCH = 100  # jobs per POST /v1/jobs

MOCK = """
import sys
from aiohttp import web
from relayd.mock.provider import MockProvider
from relayd.mock.jobs import MockJob

port, limit = int(sys.argv[1]), int(sys.argv[2])
# 41 transcripts of 10..50 KB (ASCII words), shared: the mock keeps every job it saw
WORDS = "the quick brown fox jumps over the lazy dog and then some more words follow "
TEXTS = [(WORDS * (1 + kb * 1024 // len(WORDS)))[: kb * 1024] for kb in range(10, 51)]

class Provider(MockProvider):
    def _job(self, doc_id, now):
        job = self.jobs.get(doc_id)
        if job is None:
            text = TEXTS[int(doc_id.rsplit("-", 1)[1]) % len(TEXTS)]
            job = MockJob(doc_id, "transcribed", 0.0, now, {"transcription": text})
            self.jobs[doc_id] = job
        return job

provider = Provider(window=1.0, limit=limit, ready_after=0.0)
web.run_app(provider.app(), host="127.0.0.1", port=port, print=None, access_log=None)
"""

RECEIVER = """
import sys
from aiohttp import web
count = 0
async def hook(request):
    global count
    await request.read()
    count += 1
    return web.Response(status=204)
async def counted(request):
    return web.json_response({"received": count})
app = web.Application(client_max_size=1 << 20)
app.router.add_post("/hook", hook)
app.router.add_get("/_count", counted)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)
"""

# relayd run, with the probes; one JSON line per second to the file named by SOAK_PROBE
WRAPPER = """
import asyncio, asyncio.events, gc, json, os, sys, threading, time, traceback
from relayd import cli, daemon
from relayd.store import sqlite

out = open(os.environ["SOAK_PROBE"], "a", buffering=1)
lags, batches, long_steps, collections = [], [], [], []
gc_started = [0.0]
def timed_gc(phase, info):  # a garbage collection: which generation, how long it held
    if phase == "start":
        gc_started[0] = time.perf_counter()
    else:
        took = time.perf_counter() - gc_started[0]
        if took > 0.002:
            collections.append((round(took * 1000, 2), info["generation"]))
gc.callbacks.append(timed_gc)
pragma = os.environ.get("SOAK_SECURE_DELETE")

if pragma:
    opened = sqlite.SqliteStore.__init__
    def __init__(self, *args, **kwargs):
        opened(self, *args, **kwargs)
        self._db.execute(f"PRAGMA secure_delete={pragma}")
    sqlite.SqliteStore.__init__ = __init__

prune = sqlite.SqliteStore.prune
def timed_prune(self, **kwargs):
    started = time.perf_counter()
    try:
        return prune(self, **kwargs)
    finally:
        batches.append(time.perf_counter() - started)
sqlite.SqliteStore.prune = timed_prune

# A sampler thread: while one callback holds the loop past 20 ms, the loop thread's stack every
# 10 ms (what it is doing, not only which callback), kept with that callback's entry.
loop_thread = threading.get_ident()
current = [0, 0.0, []]  # callback number, when it started, the stacks sampled during it
def sample():
    while True:
        time.sleep(0.01)
        number, started, stacks = current
        if started and time.perf_counter() - started > 0.02 and len(stacks) < 20:
            frame = sys._current_frames().get(loop_thread)
            if frame is not None and current[0] == number:
                stacks.append(" < ".join(f"{f.name} ({os.path.basename(f.filename)}:{f.lineno})"
                                         for f in reversed(traceback.extract_stack(frame)[-12:])))
threading.Thread(target=sample, daemon=True).start()

step = asyncio.events.Handle._run
def timed_step(self):  # one callback: one uninterrupted hold of the event loop
    owner = getattr(self._callback, "__self__", None)
    coro = getattr(owner, "get_coro", lambda: None)()
    frame = getattr(coro, "cr_frame", None)  # kept: a finished coroutine's frame is gone after
    stacks = []
    started, cpu = time.perf_counter(), time.thread_time()
    current[:] = [current[0] + 1, started, stacks]
    step(self)
    took = time.perf_counter() - started
    current[1] = 0.0
    if took > 0.005:
        cpu = time.thread_time() - cpu
        name = getattr(coro, "__qualname__", None) or repr(self._callback)[:60]
        # a request handler's request (f_locals copies every local: only for a long step)
        request = frame.f_locals.get("request") if frame is not None else None
        if request is not None and hasattr(request, "path"):
            name += f" {request.method} {request.path}"
        long_steps.append((round(took * 1000, 2), round(cpu * 1000, 2), name, stacks))
asyncio.events.Handle._run = timed_step

async def probe():
    last = time.time()
    while True:
        started = time.perf_counter()
        await asyncio.sleep(0.005)
        lags.append(time.perf_counter() - started - 0.005)
        if time.time() - last >= 1.0:
            last = time.time()
            out.write(json.dumps({"t": last, "lags": [round(x * 1000, 2) for x in lags],
                                  "batches": [round(x * 1000, 2) for x in batches],
                                  "steps": long_steps, "gc": collections}) + "\\n")
            lags.clear()
            batches.clear()
            long_steps.clear()
            collections.clear()

run = daemon.run
async def probed(*args, **kwargs):
    task = asyncio.create_task(probe())
    try:
        return await run(*args, **kwargs)
    finally:
        task.cancel()
daemon.run = probed
sys.exit(cli.main(sys.argv[1:]))
"""


def yield_cpu() -> None:
    os.nice(10)


def write_config(tmp: Path, *, http: int, mock: int, receiver: int, keys: int, rate: int,
                 retention: str, in_flight: int) -> Path:  # fmt: skip
    lines = [
        "[relayd]",
        'state_dir = "state"',
        'spool_dir = "spool"',
        'socket = ""',
        f'http = "127.0.0.1:{http}"',
        'log_level = "warning"',
        f'retention = "{retention}"',
        f'dead_retention = "{retention}"',
        "",
        "[endpoints.app]",
        f'url = "http://127.0.0.1:{receiver}/hook"',
        f"max_in_flight = {in_flight}",
        "",
    ]
    for k in range(keys):
        lines += [
            f"[providers.p{k}]",
            'kind = "xosum"',
            f'base_url = "http://127.0.0.1:{mock}"',
            f'api_key = "key-{k}"',
            f"rate_limit = {rate}",
            'rate_window = "1s"',
            'poll_interval = "0.5s"',
            "adaptive_polling = false",
            'endpoints = ["app"]',
            "",
        ]
    path = tmp / "relayd.toml"
    path.write_text("\n".join(lines))
    return path


def proc_rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


@dataclass
class Sample:
    t: float  # seconds since the start of the run
    delivered: int
    db: int  # bytes
    wal: int
    rss_kb: int
    fds: int


@dataclass
class Run:
    name: str
    retention: str
    samples: list[Sample] = field(default_factory=list)
    lags: list[float] = field(default_factory=list)  # ms
    batches: list[float] = field(default_factory=list)  # ms
    # callbacks that held the loop over 5 ms: (wall ms, CPU ms of the loop's thread, coroutine
    # with the request's method and path for a request handler, the loop's stack sampled every
    # 10 ms after the first 20)
    steps: list[tuple[float, float, str, list[str]]] = field(default_factory=list)
    collections: list[tuple[float, int]] = field(default_factory=list)  # GC over 2 ms: (ms, gen)
    paced_from: float = 0.0  # wall time the paced phase began
    seconds: float = 0.0  # the saturated phase: how long
    jobs: int = 0  # ... and how many jobs it delivered
    pruned: dict[str, Any] = field(default_factory=dict)


async def soak(args: argparse.Namespace, name: str, retention: str, tmp: Path) -> Run:
    http, mock_port, receiver_port = free_port(), free_port(), free_port()
    config = write_config(
        tmp, http=http, mock=mock_port, receiver=receiver_port, keys=args.keys, rate=args.rate,
        retention=retention, in_flight=args.endpoint_in_flight,
    )  # fmt: skip
    probe = tmp / "probe.jsonl"
    extra = {"SOAK_PROBE": str(probe)}
    if args.secure_delete:
        extra["SOAK_SECURE_DELETE"] = args.secure_delete
    env = env_with_path(extra)
    # The mock and the receiver yield the CPU to relayd (nice 10): on 2 cores the loop-lag
    # probe would otherwise time the machine's contention as much as relayd's own loop.
    helpers = [
        subprocess.Popen(  # noqa: ASYNC220 - started once, before anything is timed
            [sys.executable, "-c", script, str(port), *extra_args], env=env, preexec_fn=yield_cpu
        )
        for script, port, extra_args in (
            (MOCK, mock_port, [str(args.rate * 2)]),
            (RECEIVER, receiver_port, []),
        )
    ]
    relay = subprocess.Popen(  # noqa: ASYNC220 - started once, before anything is timed
        [sys.executable, "-c", WRAPPER, "run", "--config", str(config)], env=env, cwd=tmp
    )
    run = Run(name, retention)
    db = tmp / "state" / "relayd.db"
    wal = db.with_name(db.name + "-wal")
    base = f"http://127.0.0.1:{http}"
    try:
        for port in (mock_port, receiver_port, http):
            await wait_port(port, timeout=30)
        async with aiohttp.ClientSession() as session:

            async def received() -> int:
                async with session.get(f"http://127.0.0.1:{receiver_port}/_count") as resp:
                    return int((await resp.json())["received"])

            submitted, started, next_sample = 0, time.perf_counter(), 0.0
            delivered, paced_from = 0, args.jobs - int(args.paced_seconds * args.paced_rate)
            paced_started = 0.0
            while delivered < args.jobs:
                delivered = await received()
                now = time.perf_counter() - started
                if now >= next_sample:
                    run.samples.append(
                        Sample(now, delivered, file_size(db), file_size(wal),
                               proc_rss_kb(relay.pid), len(os.listdir(f"/proc/{relay.pid}/fd")))
                    )  # fmt: skip
                    next_sample += args.sample
                if delivered < paced_from:  # as much as it takes: --in-flight not yet delivered
                    due = min(paced_from, delivered + args.in_flight)
                else:  # then an even stream well below what relayd can do
                    if not paced_started:
                        paced_started = now
                        run.seconds, run.jobs = now, delivered
                        run.paced_from = time.time()
                    due = paced_from + int((now - paced_started) * args.paced_rate)
                due = min(due, args.jobs)
                while submitted < due:
                    n = min(BATCH, due - submitted)
                    jobs = [
                        {"docId": f"soak-{i:07d}", "provider": f"p{i % args.keys}"}
                        for i in range(submitted, submitted + n)
                    ]
                    async with session.post(f"{base}/v1/jobs", json=jobs) as resp:
                        if resp.status != 202:
                            raise RuntimeError(f"submit: {resp.status} {await resp.text()}")
                    submitted += n
                await asyncio.sleep(0.05)
            async with session.get(f"{base}/v1/status") as resp:
                run.pruned = (await resp.json())["store"]["retention"]["removed"]
    finally:
        relay.terminate()
        relay.wait()
        for helper in helpers:
            helper.terminate()
            helper.wait()
    for line in probe.read_text().splitlines():
        entry = json.loads(line)
        if entry["t"] >= run.paced_from:
            run.lags += entry["lags"]
        run.batches += entry["batches"]
        run.steps += [tuple(step) for step in entry["steps"]]
        run.collections += [tuple(c) for c in entry.get("gc", [])]
    return run


def pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def mb(n: float) -> str:
    return f"{n / 1e6:,.0f} MB"


def report(runs: list[Run], args: argparse.Namespace) -> None:
    print(f"{args.jobs:,} jobs, transcripts 10-50 KB, {args.keys} keys x {args.rate}/s, "
          f"{args.paced_seconds:g} s paced at {args.paced_rate} jobs/s, then {args.in_flight} in"
          f" flight; secure_delete {args.secure_delete or 'as relayd sets it'}")  # fmt: skip
    for run in runs:
        saturated = [s for s in run.samples if s.t <= run.seconds]
        end = run.samples[-1]
        print(f"\n{run.name} (retention {run.retention}):")
        print(f"  throughput        {run.jobs / run.seconds:8.1f} jobs/s ({run.jobs:,} in "
              f"{run.seconds:.0f} s, saturated)")  # fmt: skip
        if run.retention != "0":  # the size two retention periods in, against the largest later
            period = float(run.retention.rstrip("s"))
            early = next(s for s in saturated if s.t >= 2 * period)
            later = max(s.db + s.wal for s in saturated if s.t >= early.t)
            print(f"  db+WAL            {mb(early.db + early.wal)} two retention periods in, at "
                  f"most {mb(later)} after: {later / (early.db + early.wal):.2f}x; "
                  f"{mb(end.db + end.wal)} at the end")  # fmt: skip
        else:
            print(f"  db+WAL            {mb(end.db + end.wal)} at the end")
        rss = [s.rss_kb for s in saturated if s.t >= run.seconds * 0.1]  # after a warm-up
        fds = [s.fds for s in run.samples]
        print(f"  max db / max WAL  {mb(max(s.db for s in run.samples))} / "
              f"{mb(max(s.wal for s in run.samples))}")  # fmt: skip
        print(f"  RSS (saturated)   {min(rss) / 1024:.0f}-{max(rss) / 1024:.0f} MB after the "
              f"first 10 %: spread {max(rss) / min(rss) - 1:.1%}; {end.rss_kb / 1024:.0f} MB at "
              "the end")  # fmt: skip
        print(f"  open fds          {min(fds)}-{max(fds)}")
        print(f"  loop lag (paced)  p99 {pct(run.lags, 0.99):.1f} ms, max {max(run.lags):.1f} ms "
              f"({len(run.lags):,} samples at {args.paced_rate} jobs/s)")  # fmt: skip
        longest = sorted(run.steps, reverse=True)
        over = collections.Counter(name for ms, _, name, _ in longest if ms > 20)
        wall, cpu, name, _ = longest[0] if longest else (0.0, 0.0, "-", [])
        print(f"  longest callback  {wall:.1f} ms ({cpu:.1f} ms of CPU, {name}); over 20 ms:"
              f" {dict(over) or 'none'}")  # fmt: skip
        for ms, cpu, name, stacks in longest[:5]:
            if stacks:  # where the loop was, sampled while it was held
                print(f"    {ms:.1f} ms, {name}:")
                for stack, n in collections.Counter(stacks).most_common(3):
                    print(f"      {n} x {stack}")
        if run.collections:
            ms, gen = max(run.collections)
            print(f"  garbage collections over 2 ms: {len(run.collections)}, longest {ms:.1f} ms"
                  f" (generation {gen})")  # fmt: skip
        if run.batches:
            print(f"  prune batches     {len(run.batches):,}, p99 {pct(run.batches, 0.99):.1f} ms, "
                  f"max {max(run.batches):.1f} ms; removed {run.pruned}")  # fmt: skip
    if len(runs) == 2:
        keep, pruned = runs
        ratio = (pruned.jobs / pruned.seconds) / (keep.jobs / keep.seconds)
        print(f"\nthroughput with pruning / without: {ratio:.2f}x")
    if args.plot:
        plot(runs, Path(args.plot))
        print(f"plot: {args.plot}")


def plot(runs: list[Run], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (size, rss) = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
    for run, colour in zip(runs, ("tab:red", "tab:blue"), strict=False):
        delivered = [s.delivered / 1000 for s in run.samples]
        size.plot(delivered, [s.db / 1e6 for s in run.samples], colour,
                  label=f"{run.name}: database")  # fmt: skip
        size.plot(delivered, [s.wal / 1e6 for s in run.samples], colour, linestyle=":",
                  label=f"{run.name}: WAL")  # fmt: skip
        rss.plot(delivered, [s.rss_kb / 1024 for s in run.samples], colour, label=run.name)
    size.set_ylabel("MB on disk")
    size.set_yscale("log")
    size.legend()
    size.set_title("relayd soak: retention keeps the database flat")
    rss.set_ylabel("RSS, MB")
    rss.set_ylim(bottom=0)
    rss.set_xlabel("thousand jobs delivered")
    rss.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=200_000)
    parser.add_argument("--retention", type=float, default=5.0, help="seconds")
    parser.add_argument("--in-flight", type=int, default=600)
    parser.add_argument("--endpoint-in-flight", type=int, default=16)
    parser.add_argument("--keys", type=int, default=4)
    parser.add_argument("--rate", type=int, default=500, help="polls per second per key")
    parser.add_argument("--paced-seconds", type=float, default=60.0)
    parser.add_argument("--paced-rate", type=int, default=100, help="jobs/s while paced")
    parser.add_argument("--sample", type=float, default=1.0, help="seconds between samples")
    parser.add_argument("--secure-delete", choices=("", "on", "fast", "off"), default="")
    parser.add_argument("--only", choices=("keep", "retention"))
    parser.add_argument("--plot")
    args = parser.parse_args()
    runs = []
    for name, retention in (("keep", "0"), ("retention", f"{args.retention:g}s")):
        if args.only and args.only != name:
            continue
        with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
            runs.append(await soak(args, name, retention, Path(tmp)))
    report(runs, args)


if __name__ == "__main__":
    asyncio.run(main())
