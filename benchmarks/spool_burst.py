"""A burst of spool files: how long each waits between its rename into the spool and the commit
of its job, while the API keeps answering.

    .venv/bin/python benchmarks/spool_burst.py [--files 10000] [--rates 1000,2000,5000,10000,0]
                                               [--watch binding|asyncinotify]

The real daemon runs in this process (logging at info to a file, as in production). For each
rate, a writer in its own process first writes the files as `.burst-N.tmp` in the spool, each
holding one job id, then renames them to their final names at that many files per second (0: as
fast as it can, 30-45k/s here: `mv` of a finished batch). The writer notes the wall time just
before each rename; relayd's accept path notes the wall time just after each commit. Meanwhile
`/healthz` is asked over the unix socket every 10 ms, and a ticker measures how late the event
loop runs a 5 ms sleep.

`--watch asyncinotify` runs the daemon with the spool watched through the asyncinotify library
(`pip install asyncinotify`; see `watch_asyncinotify` below) instead of relayd's own inotify
binding, everything else alike: run the two interleaved to compare them in one session.

Baseline, in the same run: the same ids through `Store.add_jobs`, one call (one commit) per
file, with no spool at all: what taking files one by one costs in commits alone.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import aiohttp

from relayd.config import parse_config
from relayd.daemon import Daemon
from relayd.intake import inotify
from relayd.logs import TextFormatter
from relayd.models import Job, Submission
from relayd.store import SqliteStore

WRITER = r"""
import json, os, sys, time
spool, n, rate, out = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
tmps = []
for i in range(n):
    tmp = f"{spool}/.burst-{i}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
    os.write(fd, f"burst-{i}\n".encode())
    os.close(fd)
    tmps.append(tmp)
renamed = []
start = time.time() + 0.5  # relayd has seen the .tmp files come and settled down
time.sleep(0.5)
for i, tmp in enumerate(tmps):
    if rate and (ahead := start + i / rate - time.time()) > 0:
        time.sleep(ahead)
    renamed.append(time.time())
    os.rename(tmp, f"{spool}/burst-{i}.txt")
with open(out, "w") as f:
    json.dump(renamed, f)
"""


async def watch_asyncinotify(
    directory: Path, stop: asyncio.Event, rescan: float
) -> AsyncIterator[dict[str, bool]]:
    """relayd's inotify.watch written on asyncinotify 4.4.4, as closely as its API allows: the
    same mask, the same batches (every event queued when the loop gets to it, up to about 30,000),
    {} at first, after an overflow and after `rescan` quiet seconds, and the end when the directory
    goes. `get()` awaits one event (one read of cache_size x 272 bytes, then from its cache);
    `sync_get()` with sync_timeout=0 drains what is queued without blocking."""
    import asyncinotify as ai  # a benchmark-only dependency

    mask = ai.Mask(inotify.MASK)
    # InitFlags.NONBLOCK is O_CLOEXEC in 4.4.4; ask for O_NONBLOCK by value
    flags = ai.InitFlags(os.O_NONBLOCK | os.O_CLOEXEC)
    with ai.Inotify(flags=flags, cache_size=inotify.READ_SIZE // 272, sync_timeout=0) as ino:
        ino.add_watch(directory, mask)
        # woken like the binding (one Event, set when events come or on stop); one get()
        # outstanding at a time, kept across quiet spells: cancelling a get() could drop events
        # it has already read from the kernel
        ready = asyncio.Event()
        stopping = asyncio.ensure_future(stop.wait())
        stopping.add_done_callback(lambda _: ready.set())
        getting: asyncio.Future[ai.Event] | None = None
        try:
            yield {}
            while not stop.is_set():
                if getting is None:
                    ready.clear()
                    getting = asyncio.ensure_future(ino.get())
                    getting.add_done_callback(lambda _: ready.set())
                try:
                    async with asyncio.timeout(rescan):
                        await ready.wait()
                except TimeoutError:
                    yield {}
                    continue
                if not getting.done():
                    continue  # stopping
                events = [getting.result()]
                getting = None
                while len(events) < 30_000 and (event := ino.sync_get()) is not None:
                    events.append(event)
                changes: dict[str, bool] = {}
                lost = gone = False
                for event in events:
                    bits = int(event.mask)
                    lost = lost or bool(bits & inotify.IN_Q_OVERFLOW)
                    gone = gone or bool(bits & inotify.GONE)
                    if event.name is not None:
                        name = str(event.name)
                        changes[name] = changes.get(name, False) or not bits & inotify.IN_MOVED_TO
                if lost:
                    yield {}
                elif changes:
                    yield changes
                if gone:
                    logging.getLogger("relayd.intake.spool").error(
                        "spool directory %s was removed or moved away", directory
                    )
                    return
        finally:
            if getting is not None:
                getting.cancel()
            stopping.cancel()


class TimedDaemon(Daemon):
    """The real daemon; notes when each job's commit returned, and how often each id came in."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.stored: dict[str, float] = {}
        self.submitted: collections.Counter[str] = collections.Counter()
        self.commits = 0

    def accept(self, subs: Sequence[Submission], source: str) -> list[tuple[Job, bool]]:
        out = super().accept(subs, source)
        now = time.time()
        self.commits += 1
        for sub in subs:
            self.stored.setdefault(sub.doc_id, now)
            self.submitted[sub.doc_id] += 1
        return out


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


async def burst(n: int, rate: float, tmp: Path) -> dict[str, float]:
    raw = {
        "relayd": {"state_dir": str(tmp / "state"), "spool_dir": str(tmp / "spool"),
                   "socket": str(tmp / "relayd.sock"), "http": ""},
        "providers": {"main": {"kind": "xosum", "base_url": "http://127.0.0.1:9",
                               "api_key": "env:BENCH_KEY", "rate_limit": 1, "rate_window": "1h",
                               "endpoints": ["app"]}},
        "endpoints": {"app": {"url": "http://127.0.0.1:9/hook"}},
    }  # fmt: skip
    config = parse_config(raw, base_dir=tmp, env={"BENCH_KEY": "bench-key"})
    daemon = TimedDaemon(config)
    stop = asyncio.Event()
    serving = asyncio.create_task(daemon.serve(stop.wait))
    await daemon.ready.wait()
    spool = config.settings.spool_dir
    times_file = tmp / "renamed.json"
    health: list[float] = []
    lags: list[float] = []
    done = asyncio.Event()

    async def ping() -> None:
        connector = aiohttp.UnixConnector(path=str(config.settings.socket))
        async with aiohttp.ClientSession(connector=connector) as session:
            while not done.is_set():
                t = time.perf_counter()
                async with session.get("http://relayd/healthz") as resp:
                    assert resp.status == 200, resp.status
                    await resp.read()
                health.append(time.perf_counter() - t)
                await asyncio.sleep(0.01)

    async def tick() -> None:
        while not done.is_set():
            t = time.perf_counter()
            await asyncio.sleep(0.005)
            lags.append(time.perf_counter() - t - 0.005)

    watchers = [asyncio.create_task(ping()), asyncio.create_task(tick())]
    cpu = time.process_time()
    writer = await asyncio.create_subprocess_exec(
        sys.executable, "-c", WRITER, str(spool), str(n), str(rate), str(times_file)
    )
    assert await writer.wait() == 0
    renamed = json.loads(times_file.read_text())
    deadline = time.time() + 120
    while len(daemon.stored) < n and time.time() < deadline:  # noqa: ASYNC110 - polls a dict
        await asyncio.sleep(0.05)
    cpu = time.process_time() - cpu
    done.set()
    await asyncio.gather(*watchers)
    while len(list(spool.iterdir())) > 1 and time.time() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.01)  # the last batch may still be being deleted
    left = [p.name for p in spool.iterdir() if p.name != "rejected"]
    stop.set()
    await serving
    ids = [f"burst-{i}" for i in range(n)]
    missing = [d for d in ids if d not in daemon.stored]
    if missing or left:
        raise SystemExit(
            f"{rate:.0f}/s: {len(missing)} job(s) not stored, {len(left)} file(s) left"
        )
    latency = [daemon.stored[d] - renamed[i] for i, d in enumerate(ids)]
    return {
        "p50": pct(latency, 50),
        "p95": pct(latency, 95),
        "p99": pct(latency, 99),
        "max": max(latency),
        "arrival/s": n / (renamed[-1] - renamed[0]),
        "taken/s": n / (max(daemon.stored.values()) - renamed[0]),
        "commits": daemon.commits,
        "twice": sum(1 for c in daemon.submitted.values() if c > 1),
        "healthz p99": pct(health, 99),
        "healthz max": max(health),
        "lag max": max(lags),
        "cpu ms/file": cpu * 1000 / n,
    }


def baseline(n: int, tmp: Path) -> float:
    """Files/s when every file is its own commit: add_jobs once per id, nothing else."""
    store = SqliteStore(tmp / "baseline.db")
    started = time.perf_counter()
    for i in range(n):
        store.add_jobs([Submission(f"base-{i}", "main")], source="spool", now=time.time())
    elapsed = time.perf_counter() - started
    store.close()
    return n / elapsed


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=10_000)
    parser.add_argument(
        "--rates", default="1000,2000,5000,10000,0", help="files/s, comma-separated; 0: at once"
    )
    parser.add_argument(
        "--watch", choices=("binding", "asyncinotify"), default="binding",
        help="how the spool is watched on Linux: relayd's inotify binding or asyncinotify",
    )  # fmt: skip
    args = parser.parse_args()
    if args.watch == "asyncinotify":
        inotify.watch = watch_asyncinotify  # watch_directory looks it up at each start
    n = args.files
    rates = [float(r) for r in args.rates.split(",")]
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())  # other work on the machine
    with tempfile.TemporaryDirectory(prefix="relayd-spool-") as name:
        tmp = Path(name)
        handler = logging.FileHandler(tmp / "relayd.log")
        handler.setFormatter(TextFormatter())
        relayd_log = logging.getLogger("relayd")
        relayd_log.handlers[:] = [handler]
        relayd_log.setLevel(logging.INFO)
        relayd_log.propagate = False
        results = {}
        for i, rate in enumerate(rates):
            results[rate] = await burst(n, rate, tmp / f"run-{i}")
        base = baseline(n, tmp)
        log_lines = sum(1 for _ in (tmp / "relayd.log").open())
    print(f"{n} spool files, one job id each, watch: {args.watch}; load average before: {load}")
    print("latency = ms from the rename into the spool to the commit of the file's job")
    print(
        "rate       arrival/s taken/s commits    p50    p95    p99    max"
        "  healthz p99/max  lag max  CPU ms/file"
    )
    for rate, r in results.items():
        label = f"{rate:.0f}/s" if rate else "at once"
        print(
            f"{label:<10} {r['arrival/s']:9.0f} {r['taken/s']:7.0f} {r['commits']:7.0f}"
            f" {r['p50'] * 1e3:6.1f} {r['p95'] * 1e3:6.1f} {r['p99'] * 1e3:6.1f}"
            f" {r['max'] * 1e3:6.1f}    {r['healthz p99'] * 1e3:5.1f}/{r['healthz max'] * 1e3:5.1f}"
            f"   {r['lag max'] * 1e3:6.1f}  {r['cpu ms/file']:11.3f}"
        )
        if r["twice"]:
            print(f"  !! {r['twice']:.0f} id(s) submitted twice")
    print(f"baseline: one add_jobs commit per file, no spool: {base:.0f} files/s")
    at_once = results.get(0.0)
    if at_once:
        print(f"ratio relayd at once/baseline files/s: {at_once['taken/s'] / base:.2f}x")
    print(f"({log_lines} log lines written)")


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())
