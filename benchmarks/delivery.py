"""Delivery throughput: relayd draining N pending 10 KB deliveries to a local endpoint, against
a bare aiohttp POST loop (no database, no retries) to the same endpoint in the same run.

    .venv/bin/python benchmarks/delivery.py [--n 3000] [--in-flight 8]

The receiver runs in its own process, so the CPU time measured is relayd's alone.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from relayd.config import parse_config
from relayd.daemon import Daemon
from relayd.mock.net import wait_port
from relayd.models import JobState, NewDelivery, Submission
from relayd.store import SqliteStore

RECEIVER = """
import sys
from aiohttp import web
async def hook(request):
    await request.read()
    return web.Response(status=204)
app = web.Application(client_max_size=1 << 20)
app.router.add_post("/hook", hook)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)
"""


def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def body(i: int) -> str:
    payload = {"event_type": "transcript_ready", "docId": f"bench-{i:06d}"}
    payload["transcription"] = "lorem ipsum " * 850  # ~10 KB
    return json.dumps(payload)


async def baseline(port: int, n: int, in_flight: int) -> tuple[float, float]:
    bodies = [body(i).encode() for i in range(n)]
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    for b in bodies:
        queue.put_nowait(b)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

        async def worker() -> None:
            while not queue.empty():
                data = queue.get_nowait()
                async with session.post(f"http://127.0.0.1:{port}/hook", data=data) as resp:
                    await resp.read()

        c0, t0 = cpu(), time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(in_flight)))
        return time.perf_counter() - t0, cpu() - c0


async def relayd(port: int, n: int, in_flight: int, state: Path) -> tuple[float, float]:
    config = parse_config(
        {
            "relayd": {"state_dir": str(state), "spool_dir": str(state / "spool"), "socket": "",
                       "http": "", "log_level": "error"},
            "providers": {"main": {"kind": "xosum", "base_url": "http://127.0.0.1:9",
                                   "api_key": "bench", "endpoints": ["app"]}},
            "endpoints": {"app": {"url": f"http://127.0.0.1:{port}/hook",
                                  "max_in_flight": in_flight}},
        },
        base_dir=state,
        env={},
    )  # fmt: skip
    store = SqliteStore(state / "relayd.db")
    jobs = store.add_jobs([Submission(f"bench-{i:06d}", "main") for i in range(n)], source="bench",
                          now=time.time())  # fmt: skip
    for i, (job, _) in enumerate(jobs):
        store.finish_job(job.id, now=time.time(), result_status="transcribed", result={},
                         deliveries=[NewDelivery("app", "transcript_ready", body(i))],
                         http_status=200, detail=None)  # fmt: skip
    store.close()
    daemon = Daemon(config)
    stop = asyncio.Event()
    c0, t0 = cpu(), time.perf_counter()
    task = asyncio.create_task(daemon.serve(stop.wait))
    await daemon.ready.wait()
    while daemon.store.job_counts().get("main", {}).get(JobState.DELIVERED, 0) < n:
        await asyncio.sleep(0.01)
    elapsed, used = time.perf_counter() - t0, cpu() - c0
    stop.set()
    await task
    return elapsed, used


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=3000)
    parser.add_argument("--in-flight", type=int, default=8)
    args = parser.parse_args()
    port = 18000 + os.getpid() % 1000
    receiver = subprocess.Popen([sys.executable, "-c", RECEIVER, str(port)])
    try:
        await wait_port(port)
        b_time, b_cpu = await baseline(port, args.n, args.in_flight)
        with tempfile.TemporaryDirectory() as tmp:
            r_time, r_cpu = await relayd(port, args.n, args.in_flight, Path(tmp))
    finally:
        receiver.terminate()
        receiver.wait()
    n = args.n
    print(f"{n} deliveries of ~10 KB, {args.in_flight} in flight, receiver in its own process")
    print(f"{'':28}{'deliveries/s':>14}{'CPU ms/delivery':>18}")
    print(f"{'baseline (bare aiohttp)':28}{n / b_time:14.0f}{1000 * b_cpu / n:18.3f}")
    print(f"{'relayd (SQLite, FULL sync)':28}{n / r_time:14.0f}{1000 * r_cpu / n:18.3f}")
    print(f"ratio relayd/baseline: throughput {b_time / r_time:.2f}x, "
          f"CPU per delivery {r_cpu / b_cpu:.2f}x")  # fmt: skip


if __name__ == "__main__":
    asyncio.run(main())
