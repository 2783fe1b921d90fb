"""Several relays on one PostgreSQL store (issue 18): 1, 3 and 10 `relayd run` processes sharing
one store and one API key under overload, beside one relayd on SQLite in the same run, and the
takeover after `kill -9` of one relay of three.

    PYTHONPATH=. .venv/bin/python benchmarks/relays.py [--seconds 40] [--in-flight 120]

Needs PostgreSQL's server programs (apt-get install postgresql): a throwaway cluster is started
on a free loopback port (as tests/pg.py does; fsync off, so the disk is not what is measured).
Time is compressed 30x: a 2 s window stands for 60 s (limit 60), poll_interval 7/30 s for 7 s.
A feeder keeps `in-flight` jobs submitted and not yet delivered, spread round robin over the
relays; each job finishes 1-10 s after it is submitted. The key is overloaded: 120 jobs in
flight want 510 polls/s; the key allows 30.

Per row: 429s; budget used while work waited (the provider's aligned windows, partial ones left
out); detection latency (a job finished at the provider -> its POST at the receiver), p50 and
p99, and p99 against the fair bound P = in-flight x window / limit (every job polled once per P
when the budget is shared evenly); deliveries a second; CPU seconds of all relays per 1,000
polls. Ratios are against the SQLite row of the same run. The takeover row: three relays at
work for a while, one killed with SIGKILL; the time until every job it held is owned by another
relay (against store_lease), and until each was polled again (against store_lease + the
interval a job is polled at under this load, max(poll_interval, P)).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psycopg
import tomli_w

from benchmarks.shared import call, wait_up
from relayd.mock import provider as mock_provider
from relayd.mock import receiver as mock_receiver
from tests.pg import PgCluster, _user, bindir

SCALE = 30.0
WINDOW, LIMIT = 60.0 / SCALE, 60
POLL_INTERVAL = 7.0 / SCALE
TIMEOUT = 1.0  # provider timeout: a budget slot's lease
LEASE = 2.0  # store_lease for the takeover row (and every row)
API_KEY = "bench-relays-key"


def config(root: Path, name: str, pport: int, rport: int, store: str) -> Path:
    folder = root / name
    folder.mkdir()
    data: dict[str, Any] = {
        "relayd": {
            "state_dir": str(folder / "state"),
            "spool_dir": str(folder / "spool"),
            "socket": str(folder / "relayd.sock"),
            "http": "",
            "store": store,
            "store_lease": LEASE,
            "log_level": "warning",
        },
        "providers": {
            "main": {
                "kind": "xosum",
                "base_url": f"http://127.0.0.1:{pport}",
                "api_key": "env:BENCH_KEY",
                "rate_limit": LIMIT,
                "rate_window": WINDOW,
                "poll_interval": POLL_INTERVAL,
                "timeout": TIMEOUT,
                "webhook_secret": "env:BENCH_KEY",
                "endpoints": ["app"],
            }
        },
        "endpoints": {"app": {"url": f"http://127.0.0.1:{rport}/hook", "max_in_flight": 32}},
    }
    path = folder / "relayd.toml"
    path.write_text(tomli_w.dumps(data))
    return path


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Row:
    """One run: `n` relays on `store` ("" = each its own SQLite)."""

    def __init__(self, n: int, store: str, in_flight: int, seconds: float, seed: int) -> None:
        self.n, self.store, self.in_flight, self.seconds = n, store, in_flight, seconds
        self.rng = random.Random(seed)
        self.procs: list[asyncio.subprocess.Process] = []
        self.socks: list[Path] = []
        self.submitted = 0
        self.dead: set[int] = set()  # relays killed: submit to the others
        self.cpu_at_start = 0.0

    async def start(self, root: Path, pport: int, rport: int) -> None:
        env = {**os.environ, "BENCH_KEY": API_KEY}
        for i in range(self.n):
            path = config(root, f"i{i}", pport, rport, self.store)
            command = [sys.executable, "-m", "relayd", "run", "-c", str(path)]
            proc = await asyncio.create_subprocess_exec(
                *command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            self.procs.append(proc)
            self.socks.append(path.parent / "relayd.sock")
        await asyncio.gather(*(wait_up(s, seconds=30.0) for s in self.socks))
        self.cpu_at_start = sum(cpu_seconds(p.pid) for p in self.procs)  # start-up not counted

    async def feed(
        self, provider: mock_provider.MockProvider, receiver: mock_receiver.Receiver, until: float
    ) -> None:
        """Keep `in_flight` jobs submitted and not delivered, round robin over the relays."""
        while time.monotonic() < until:
            want = self.in_flight - (self.submitted - len(receiver.accepted))
            batch: dict[int, list[dict[str, str]]] = collections.defaultdict(list)
            alive = [i for i in range(self.n) if i not in self.dead]
            for _ in range(max(0, want)):
                doc = f"job-{self.submitted}"
                provider.add_job(doc, ready_after=self.rng.uniform(1.0, 10.0))
                batch[alive[self.submitted % len(alive)]].append({"docId": doc})
                self.submitted += 1
            for i, docs in batch.items():
                status, _ = await call(self.socks[i], "POST", "/v1/jobs", docs)
                assert status == 202
            await asyncio.sleep(0.05)

    async def stop(self) -> float:
        """SIGTERM every relay still running; their CPU seconds since the start (a killed
        relay's last reading is lost: its CPU counts up to the start only)."""
        cpu = -self.cpu_at_start
        for proc in self.procs:
            if proc.returncode is None:
                cpu += cpu_seconds(proc.pid)
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            await proc.wait()
        return cpu


def measure(
    row: Row,
    provider: mock_provider.MockProvider,
    receiver: mock_receiver.Receiver,
    started: float,
    ended: float,
    cpu: float,
) -> dict[str, Any]:
    finished_at = {d: j.finished_at for d, j in provider.jobs.items()}
    latency: dict[str, float] = {}
    for item in receiver.accepted:
        doc_id = item.json()["docId"]
        if finished_at[doc_id] >= started + 5:  # past the start-up
            latency.setdefault(doc_id, item.at - finished_at[doc_id])
    times = sorted(t for t, _ in provider.arrivals)
    counts = collections.Counter(int(t // WINDOW) for t in times)
    windows = range(int(times[0] // WINDOW) + 1, int(ended // WINDOW) - 1)
    fill = sum(min(counts[w], LIMIT) for w in windows) / (LIMIT * len(windows))
    values = sorted(latency.values())
    fair = row.in_flight * WINDOW / LIMIT
    p99 = values[min(len(values) - 1, int(len(values) * 0.99))]
    return {
        "store": "postgresql" if row.store else "sqlite",
        "relays": row.n,
        "rate_limited": provider.rejected,
        "budget_used": round(fill, 3),
        "p50": round(statistics.median(values), 3),
        "p99": round(p99, 3),
        "p99_fair": round(p99 / fair, 2),
        "deliveries_per_s": round(len(receiver.accepted) / (ended - started), 1),
        "cpu_per_1000_polls": round(cpu / len(times) * 1000, 3),
        "polls": len(times),
    }


async def run_row(
    n: int, store: str, in_flight: int, seconds: float, seed: int, *, kill: bool = False
) -> dict[str, Any]:
    provider, prunner, pport = await mock_provider.serve(window=WINDOW, limit=LIMIT)
    receiver, rrunner, rport = await mock_receiver.serve()
    row = Row(n, store, in_flight, seconds, seed)
    try:
        with tempfile.TemporaryDirectory(prefix="relayd-relays-") as tmp:
            await row.start(Path(tmp), pport, rport)
            started = time.time()  # the mock's and the receiver's clock
            feeding = asyncio.create_task(row.feed(provider, receiver, time.monotonic() + seconds))
            takeover: dict[str, Any] = {}
            if kill:
                await asyncio.sleep(seconds / 2)
                takeover = await kill_one(row, store)
            await feeding
            ended = time.time()
            cpu = await row.stop()
    finally:
        await prunner.cleanup()
        await rrunner.cleanup()
    result = measure(row, provider, receiver, started, ended, cpu)
    return {**result, **takeover}


async def kill_one(row: Row, store: str) -> dict[str, Any]:
    """SIGKILL the first relay; how long until its jobs are owned, then polled, by others."""
    victim = row.procs[0]
    name = f":{victim.pid}:"
    row.dead.add(0)
    row.cpu_at_start -= cpu_seconds(victim.pid)  # its CPU is not read at the end
    with psycopg.connect(store, autocommit=True) as conn:
        held = dict(
            conn.execute(
                "SELECT id, polls FROM jobs WHERE state = 'polling' AND owner LIKE %s",
                (f"%{name}%",),
            ).fetchall()
        )
        victim.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        owned_at = polled_at = None
        while polled_at is None and time.monotonic() - killed < 60:
            rows = conn.execute(
                "SELECT id, polls, state, owner FROM jobs WHERE id = ANY(%s)", (list(held),)
            ).fetchall()
            if owned_at is None and all(
                o and name not in o for _, _, s, o in rows if s == "polling"
            ):
                owned_at = time.monotonic() - killed
            if all(p > held[i] or s != "polling" for i, p, s, _ in rows):
                polled_at = time.monotonic() - killed
            await asyncio.sleep(0.02)
    # its jobs are due at once on their new owners, where they wait their turn like any other:
    # under overload a turn comes every fair bound P, not every poll_interval
    bound = LEASE + max(POLL_INTERVAL, row.in_flight * WINDOW / LIMIT)
    return {
        "killed_held": len(held),
        "taken_over_s": round(owned_at or -1, 2),
        "polled_again_s": round(polled_at or -1, 2),
        "takeover_bound_s": round(bound, 2),
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=40.0)
    parser.add_argument("--in-flight", type=int, default=120)
    parser.add_argument("--relays", default="1,3,10")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    binaries = bindir()
    if binaries is None:
        sys.exit("PostgreSQL's server programs are not installed: apt-get install postgresql")
    workdir = Path(tempfile.mkdtemp(prefix="relayd-pg-"))
    cluster = PgCluster(binaries, workdir, _user())
    rows = []
    try:
        cluster._own(workdir)
        cluster.init()
        cluster.start()
        rows.append(await run_row(1, "", args.in_flight, args.seconds, args.seed))
        print(json.dumps(rows[-1]), flush=True)
        for n in (int(x) for x in args.relays.split(",")):
            url = cluster.url(cluster.create_database())
            rows.append(await run_row(n, url, args.in_flight, args.seconds, args.seed))
            print(json.dumps(rows[-1]), flush=True)
        url = cluster.url(cluster.create_database())
        kill = await run_row(3, url, args.in_flight, args.seconds, args.seed, kill=True)
        print(json.dumps(kill), flush=True)
    finally:
        cluster.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    base = rows[0]
    fair = args.in_flight * WINDOW / LIMIT
    print(f"\nfair bound P = {args.in_flight} x {WINDOW:g} s / {LIMIT} = {fair:.2f} s\n")
    print("| store | relays | 429s | budget used | p50 | p99 | p99 / fair bound |"
          " deliveries/s | vs SQLite | CPU s / 1,000 polls | vs SQLite |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['store']} | {r['relays']} | {r['rate_limited']} | {r['budget_used']:.1%} |"
            f" {r['p50']:.2f} s | {r['p99']:.2f} s | {r['p99_fair']:.2f} |"
            f" {r['deliveries_per_s']:.1f} |"
            f" {r['deliveries_per_s'] / base['deliveries_per_s']:.2f}x |"
            f" {r['cpu_per_1000_polls']:.2f} |"
            f" {r['cpu_per_1000_polls'] / base['cpu_per_1000_polls']:.2f}x |"
        )
    print(
        f"\ntakeover (3 relays, one killed holding {kill['killed_held']} jobs): owned by others"
        f" after {kill['taken_over_s']:.2f} s, all polled again after {kill['polled_again_s']:.2f}"
        f" s; bound store_lease + max(poll_interval, P) = {kill['takeover_bound_s']:.2f} s;"
        f" 429s {kill['rate_limited']}, budget used {kill['budget_used']:.1%}"
    )


if __name__ == "__main__":
    asyncio.run(main())
