"""Many instances, one key: budget use and latency for 1, 3 and 10 relayd processes sharing one
API key through Redis, and 3 processes without a shared budget for contrast, in the same run.

    .venv/bin/python benchmarks/shared.py [--jobs 480] [--spread 30] [--seed 1] [--instances 1,3,10]

Needs `redis-server` on PATH (apt-get install redis-server); a fresh one is started on a free
loopback port for each row. Time is compressed 30x: a 2 s window stands for 60 s (limit 60),
poll_interval 7/30 s for 7 s. Every row gets the same seeded jobs, split evenly over its
instances and submitted at once: each finishes 1 to `spread` s (compressed) after it is
submitted, so the key is overloaded (480 jobs want 2,000 polls/s; the key allows 30) and work
waits throughout.

Measured per row: 429s; budget used while work waited (requests in each of the provider's
aligned windows between the first request and the moment the last job became finished,
partial windows left out); latency from a job becoming finished at the provider to its POST
reaching the receiver (p50, p99, mean); the spread of those means across instances (worst
instance mean / best). Ratios are against the 1-instance row of the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import tomli_w

from relayd.mock import provider as mock_provider
from relayd.mock import receiver as mock_receiver
from relayd.mock.net import free_port

SCALE = 30.0
WINDOW, LIMIT = 60.0 / SCALE, 60
POLL_INTERVAL = 7.0 / SCALE
TIMEOUT = 1.0  # provider timeout = the shared budget's lease
API_KEY = "bench-shared-key"


def start_redis(workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    binary = shutil.which("redis-server")
    if binary is None:
        sys.exit("redis-server is not installed: apt-get install redis-server")
    port = free_port()
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(workdir)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2) as s:
            s.sendall(b"PING\r\n")
            if s.recv(16).startswith(b"+PONG"):
                return proc, f"redis://127.0.0.1:{port}/0"
        time.sleep(0.02)
    proc.kill()
    sys.exit("redis-server did not start")


def config(root: Path, name: str, provider_port: int, receiver_port: int, redis: str) -> Path:
    folder = root / name
    folder.mkdir()
    data: dict[str, Any] = {
        "relayd": {
            "state_dir": str(folder / "state"),
            "spool_dir": str(folder / "spool"),
            "socket": str(folder / "relayd.sock"),
            "http": "",
            "shared_budget": redis,
            "log_level": "warning",
        },
        "providers": {
            "main": {
                "kind": "xosum",
                "base_url": f"http://127.0.0.1:{provider_port}",
                "api_key": "env:BENCH_KEY",
                "rate_limit": LIMIT,
                "rate_window": WINDOW,
                "poll_interval": POLL_INTERVAL,
                "timeout": TIMEOUT,
                "webhook_secret": "env:BENCH_KEY",
                "endpoints": ["app"],
            }
        },
        "endpoints": {"app": {"url": f"http://127.0.0.1:{receiver_port}/hook"}},
    }
    path = folder / "relayd.toml"
    path.write_text(tomli_w.dumps(data))
    return path


async def call(sock: Path, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body)
    async with (
        aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(sock))) as s,
        s.request(method, "http://relayd" + path, data=data) as resp,
    ):
        return resp.status, await resp.json()


async def wait_up(sock: Path, seconds: float = 10.0) -> None:
    for _ in range(int(seconds / 0.02)):
        with contextlib.suppress(aiohttp.ClientError, OSError):
            if (await call(sock, "GET", "/healthz"))[0] == 200:
                return
        await asyncio.sleep(0.02)
    raise RuntimeError(f"{sock}: relayd never came up")


async def run_row(n: int, shared: bool, jobs: list[float]) -> dict[str, Any]:
    provider, prunner, pport = await mock_provider.serve(window=WINDOW, limit=LIMIT)
    receiver, rrunner, rport = await mock_receiver.serve()
    with tempfile.TemporaryDirectory(prefix="relayd-shared-") as tmp:
        root = Path(tmp)
        redis_proc, url = start_redis(root)
        procs, socks = [], []
        try:
            env = {**os.environ, "BENCH_KEY": API_KEY}
            for i in range(n):
                path = config(root, f"i{i}", pport, rport, url if shared else "")
                command = [sys.executable, "-m", "relayd", "run", "-c", str(path)]
                procs.append(
                    await asyncio.create_subprocess_exec(
                        *command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
                    )
                )
                socks.append(path.parent / "relayd.sock")
            await asyncio.gather(*(wait_up(s) for s in socks))
            owner: dict[str, int] = {}
            for k, ready_after in enumerate(jobs):
                doc_id = f"job-{k}"
                provider.add_job(doc_id, ready_after=ready_after)
                owner[doc_id] = k % n
            for i, sock in enumerate(socks):
                mine = [{"docId": d} for d, o in owner.items() if o == i]
                status, _ = await call(sock, "POST", "/v1/jobs", mine)
                assert status == 202
            await receiver.wait_for(len(jobs), timeout=600)
        finally:
            for proc in procs:
                if proc.returncode is None:
                    proc.send_signal(signal.SIGTERM)
            for proc in procs:
                await proc.wait()
            redis_proc.kill()
            redis_proc.wait()
            await prunner.cleanup()
            await rrunner.cleanup()
    finished_at = {d: j.first_seen + j.ready_after for d, j in provider.jobs.items()}
    latency: dict[str, float] = {}
    for item in receiver.accepted:
        doc_id = item.json()["docId"]
        latency.setdefault(doc_id, item.at - finished_at[doc_id])
    times = sorted(t for t, _ in provider.arrivals)
    counts = collections.Counter(int(t // WINDOW) for t in times)
    first, last = int(times[0] // WINDOW) + 1, int(max(finished_at.values()) // WINDOW) - 1
    windows = range(first, last + 1)
    fill = sum(min(counts[w], LIMIT) for w in windows) / (LIMIT * len(windows))
    values = sorted(latency.values())
    per_instance = collections.defaultdict(list)
    for doc_id, value in latency.items():
        per_instance[owner[doc_id]].append(value)
    means = [statistics.fmean(v) for v in per_instance.values()]
    return {
        "instances": n,
        "shared": shared,
        "rate_limited": provider.rejected,
        "max_in_rolling_window": provider.max_in_rolling_window(),
        "budget_used_while_waiting": round(fill, 3),
        "windows_measured": len(windows),
        "p50": round(values[len(values) // 2], 3),
        "p99": round(values[min(len(values) - 1, int(len(values) * 0.99))], 3),
        "mean": round(statistics.fmean(values), 3),
        "instance_spread": round(max(means) / min(means), 2),
        "delivered": len(latency),
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=480)
    parser.add_argument("--spread", type=float, default=30.0, help="jobs finish 1..S s after")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--instances", default="1,3,10")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    jobs = [rng.uniform(1.0, args.spread) for _ in range(args.jobs)]
    rows = []
    for n in (int(x) for x in args.instances.split(",")):
        rows.append(await run_row(n, True, jobs))
        print(json.dumps(rows[-1]), flush=True)
    rows.append(await run_row(3, False, jobs))
    print(json.dumps(rows[-1]), flush=True)
    base = rows[0]
    print()
    print("| instances | shared | 429s | budget used while work waited | p50 | p99 | mean |"
          " mean vs 1 instance | worst/best instance mean |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['instances']} | {'redis' if r['shared'] else 'no'} | {r['rate_limited']} |"
            f" {r['budget_used_while_waiting']:.1%} | {r['p50']:.2f} s | {r['p99']:.2f} s |"
            f" {r['mean']:.2f} s | {r['mean'] / base['mean']:.2f}x | {r['instance_spread']:.2f} |"
        )


if __name__ == "__main__":
    asyncio.run(main())
