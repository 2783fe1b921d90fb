"""Scale: many in-flight jobs across many API keys (issue 4). Measures, for the real daemon
(`python -m relayd run`) in its own process:

- CPU seconds per 1,000 polls in steady state, and polls/s against the configured budget;
- peak RSS (VmHWM), and RSS after the warm-up and at the end (a leak would show);
- start-up recovery: from spawn to systemd's READY=1 (sent once the jobs are loaded and
  scheduled and the spool is scanned) and to the first request the provider sees, for a first
  start on the filled database, a restart after kill -9 and one after a clean stop;
- the time `GET /v1/status` and `GET /metrics` take at this size, and the database's growth.

    PYTHONPATH=. .venv/bin/python benchmarks/scale.py [--jobs 100000] [--keys 100]
        [--rate 10] [--seconds 60] [--warmup 15] [--quick] [--profile FILE]

The database is filled beforehand with --jobs polling jobs spread evenly over --keys provider
tables (kind xosum), each with its own API key, `rate_limit = --rate` per 1 s window and a
1 s poll_interval, so the budget, not the interval, decides the pace. All of them point at one
mock provider (relayd.mock.provider) in its own process, whose jobs never finish and which
enforces the same per-key limit (a 429 would show relayd overrunning its budget).

The daemon and the mock run from this checkout (PYTHONPATH is set for them), whatever the
venv's `relayd` console script would import.

The baseline, in the same run and against the same mock, is a bare aiohttp client in this
process with the same budget discipline (per key, `--rate` slots; each slot sends one GET,
reads and parses the answer, and waits the window before it sends again): no database, no
scheduler. CPU figures count one process each; the mock's CPU is never counted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import resource
import shutil
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from relayd.mock.net import wait_port
from relayd.models import Submission
from relayd.store import SqliteStore

ROOT = Path(__file__).resolve().parent.parent
TICKS = os.sysconf("SC_CLK_TCK")
WINDOW = 1.0  # seconds; every key's rate_window

# The mock provider, with one extra control route for this benchmark: /_bench/count gives the
# number of API requests so far (and the arrival time of the first one after /_bench/mark)
# cheaply; the mock's own /_mock/stats recomputes window maxima over every arrival.
MOCK = """
import sys
from aiohttp import web
from relayd.mock.provider import MockProvider

port, window, limit = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
provider = MockProvider(window=window, limit=limit, ready_after=1e9)  # no job ever finishes
mark = 0

async def do_mark(request):
    global mark
    mark = len(provider.arrivals)
    return web.json_response({"mark": mark})

async def count(request):
    arrivals = provider.arrivals
    return web.json_response({
        "requests": len(arrivals),
        "rejected": provider.rejected,
        "first_since_mark": arrivals[mark][0] if len(arrivals) > mark else None,
        "status_counts": {str(k): v for k, v in provider.status_counts.items()},
    })

app = provider.app()
app.router.add_post("/_bench/mark", do_mark)
app.router.add_get("/_bench/count", count)
web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)
"""


def self_cpu() -> tuple[float, float]:
    """(user + system, system) CPU seconds of this process."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime, usage.ru_stime


def proc_cpu(pid: int) -> tuple[float, float]:
    """(utime + stime, stime) of a process, in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        data = f.read()
    fields = data[data.rindex(")") + 2 :].split()  # fields[0] is field 3 (state)
    return (int(fields[11]) + int(fields[12])) / TICKS, int(fields[12]) / TICKS


def proc_mem(pid: int) -> dict[str, int]:
    """VmHWM (peak RSS) and VmRSS in kB."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                out[key] = int(value.split()[0])
    return out


def env_with_path(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    path = os.environ.get("PYTHONPATH")
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + path if path else "")
    env.update(extra or {})
    return env


def provider_name(k: int) -> str:
    return f"p{k:03d}"


def write_config(tmp: Path, port: int, keys: int, rate: int) -> Path:
    lines = [
        "[relayd]",
        'state_dir = "state"',
        'spool_dir = "spool"',
        'socket = "relayd.sock"',
        'http = ""',
        'log_level = "info"',
        "",
        "[endpoints.app]",
        'url = "http://127.0.0.1:9/hook"  # nothing is ever delivered',
        "",
    ]
    for k in range(keys):
        lines += [
            f"[providers.{provider_name(k)}]",
            'kind = "xosum"',
            f'base_url = "http://127.0.0.1:{port}"',
            f'api_key = "env:RELAYD_BENCH_KEY_{k:03d}"',
            f"rate_limit = {rate}",
            f'rate_window = "{WINDOW:g}s"',
            'poll_interval = "1s"',
            'max_job_age = "24h"',
            'endpoints = ["app"]',
            "",
        ]
    path = tmp / "relayd.toml"
    path.write_text("\n".join(lines))
    return path


def key_env(keys: int) -> dict[str, str]:
    return {f"RELAYD_BENCH_KEY_{k:03d}": f"key-{k:03d}" for k in range(keys)}


def prefill(db: Path, jobs: int, keys: int) -> float:
    """Store `jobs` polling jobs, spread evenly over the providers; return the seconds it took."""
    started = time.perf_counter()
    store = SqliteStore(db)
    now = time.time()
    batch: list[Submission] = []
    for i in range(jobs):
        k = i % keys
        batch.append(Submission(f"scale-{k:03d}-{i // keys:07d}", provider_name(k)))
        if len(batch) == 10_000:
            store.add_jobs(batch, source="bench", now=now)
            batch = []
    if batch:
        store.add_jobs(batch, source="bench", now=now)
    store.close()
    return time.perf_counter() - started


class Mock:
    def __init__(self, session: aiohttp.ClientSession, port: int) -> None:
        self.session = session
        self.base = f"http://127.0.0.1:{port}"

    async def mark(self) -> None:
        async with self.session.post(f"{self.base}/_bench/mark") as resp:
            await resp.read()

    async def count(self) -> dict[str, Any]:
        async with self.session.get(f"{self.base}/_bench/count") as resp:
            result: dict[str, Any] = await resp.json()
            return result


@dataclass
class Steady:
    seconds: float
    requests: int
    cpu: float
    system: float  # of which in the kernel
    rss_kb: tuple[int, int] = (0, 0)  # at the start and the end of the interval
    db_bytes: tuple[int, int] = (0, 0)

    @property
    def rate(self) -> float:
        return self.requests / self.seconds

    @property
    def cpu_per_1000(self) -> float:
        return 1000 * self.cpu / self.requests if self.requests else float("nan")


async def baseline(mock: Mock, port: int, keys: int, rate: int, jobs: int, warmup: float,
                   seconds: float) -> Steady:  # fmt: skip
    """Bare aiohttp with the same budget: per key, `rate` slots of GET, parse, wait a window."""
    per_key = max(1, jobs // keys)
    url = f"http://127.0.0.1:{port}/api/getTranscription"
    stop = False

    async def slot(session: aiohttp.ClientSession, k: int, s: int) -> None:
        headers = {"Authorization": f"Bearer base-{k:03d}"}
        i = s
        while not stop:
            params = {"docId": f"base-{k:03d}-{i % per_key:07d}"}
            async with session.get(url, params=params, headers=headers) as resp:
                json.loads(await resp.read())
            i += rate
            await asyncio.sleep(WINDOW)

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        tasks = [asyncio.create_task(slot(session, k, s)) for k in range(keys) for s in range(rate)]
        await asyncio.sleep(warmup)
        n0, c0, t0 = (await mock.count())["requests"], self_cpu(), time.perf_counter()
        await asyncio.sleep(seconds)
        n1, c1, t1 = (await mock.count())["requests"], self_cpu(), time.perf_counter()
        stop = True
        await asyncio.gather(*tasks)
    return Steady(t1 - t0, n1 - n0, c1[0] - c0[0], c1[1] - c0[1])


class Daemon:
    """`python -m relayd run -c FILE` in its own process, with NOTIFY_SOCKET pointed at us."""

    def __init__(self, tmp: Path, config: Path, keys: int, profile: Path | None) -> None:
        self.tmp, self.config, self.keys, self.profile = tmp, config, keys, profile
        self.notify_path = tmp / "notify.sock"
        self.log = tmp / "relayd.log"

    async def start(self, mock: Mock) -> dict[str, float]:
        """Spawn; return seconds from spawn to READY=1 and to the provider's first request."""
        self.notify_path.unlink(missing_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(str(self.notify_path))
        sock.setblocking(False)
        await mock.mark()
        cmd = [sys.executable]
        if self.profile is not None:
            cmd += ["-m", "cProfile", "-o", str(self.profile)]
            self.profile = None  # the first run only
        cmd += ["-m", "relayd", "run", "-c", str(self.config)]
        env = env_with_path({"NOTIFY_SOCKET": str(self.notify_path), **key_env(self.keys)})
        loop = asyncio.get_running_loop()
        with self.log.open("ab") as log:
            wall0, t0 = time.time(), time.perf_counter()
            self.proc = await asyncio.create_subprocess_exec(
                *cmd, env=env, stdout=log, stderr=log, cwd=self.tmp
            )
        try:
            while True:
                message = await asyncio.wait_for(loop.sock_recv(sock, 4096), 120)
                if b"READY=1" in message:
                    ready = time.perf_counter() - t0
                    ready_cpu = self.cpu()
                    break
        except TimeoutError:
            raise RuntimeError(f"no READY=1; see {self.log}") from None
        finally:
            sock.close()
        while (first := (await mock.count())["first_since_mark"]) is None:
            if self.proc.returncode is not None:
                raise RuntimeError(f"relayd exited with {self.proc.returncode}; see {self.log}")
            await asyncio.sleep(0.01)
        return {"ready": ready, "first_poll": first - wall0, "cpu": ready_cpu}

    async def kill(self) -> None:
        """After a failure: leave no daemon behind."""
        proc = getattr(self, "proc", None)
        if proc is not None and proc.returncode is None:
            proc.kill()
            await proc.wait()

    def cpu(self) -> float:
        return proc_cpu(self.proc.pid)[0]

    def mem(self) -> dict[str, int]:
        return proc_mem(self.proc.pid)

    async def get_seconds(self, path: str) -> float:
        """Time one GET on the API's unix socket (`/v1/status` is what `relayd status` asks)."""
        connector = aiohttp.UnixConnector(path=str(self.tmp / "relayd.sock"))
        async with aiohttp.ClientSession(connector=connector) as session:
            t0 = time.perf_counter()
            async with session.get(f"http://relayd{path}") as resp:
                await resp.read()
                assert resp.status == 200, resp.status
            return time.perf_counter() - t0

    async def crash(self) -> None:
        """kill -9."""
        self.proc.kill()
        await self.proc.wait()

    async def stop(self) -> float:
        """SIGTERM; return the seconds it took to exit."""
        t0 = time.perf_counter()
        self.proc.terminate()
        code = await asyncio.wait_for(self.proc.wait(), 60)
        if code != 0:
            raise RuntimeError(f"relayd exited with {code}; see {self.log}")
        return time.perf_counter() - t0


async def steady(daemon: Daemon, mock: Mock, warmup: float, seconds: float) -> Steady:
    state = daemon.tmp / "state"
    await asyncio.sleep(warmup)
    pid = daemon.proc.pid
    n0, c0, t0 = (await mock.count())["requests"], proc_cpu(pid), time.perf_counter()
    m0, d0 = daemon.mem()["VmRSS"], db_bytes(state)
    await asyncio.sleep(seconds)
    n1, c1, t1 = (await mock.count())["requests"], proc_cpu(pid), time.perf_counter()
    m1, d1 = daemon.mem()["VmRSS"], db_bytes(state)
    return Steady(t1 - t0, n1 - n0, c1[0] - c0[0], c1[1] - c0[1], (m0, m1), (d0, d1))


def db_bytes(state: Path) -> int:
    """The database with its WAL (which a checkpoint rewinds but never shrinks)."""
    return sum(p.stat().st_size for p in state.glob("relayd.db*") if not p.name.endswith("-shm"))


async def run(args: argparse.Namespace, tmp: Path) -> None:
    jobs, keys, rate = args.jobs, args.keys, args.rate
    budget = keys * rate / WINDOW
    load0 = os.getloadavg()[0]
    port = 19000 + os.getpid() % 1000
    config = write_config(tmp, port, keys, rate)
    fill = prefill(tmp / "state" / "relayd.db", jobs, keys)
    mock_proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", MOCK, str(port), str(WINDOW), str(rate), env=env_with_path()
    )
    daemon = Daemon(tmp, config, keys, args.profile)
    starts: dict[str, dict[str, float]] = {}
    stops: list[float] = []
    try:
        async with aiohttp.ClientSession() as session:
            await wait_port(port)
            mock = Mock(session, port)
            base = await baseline(mock, port, keys, rate, jobs, min(args.warmup, 5), args.seconds)
            starts["first start, filled database"] = await daemon.start(mock)
            run1 = await steady(daemon, mock, args.warmup, args.seconds)
            mem = daemon.mem()
            status = await daemon.get_seconds("/v1/status")
            metrics = await daemon.get_seconds("/metrics")
            if args.profile is None:
                await daemon.crash()
                starts["restart after kill -9"] = await daemon.start(mock)
            else:  # cProfile writes its file at a clean exit
                stops.append(await daemon.stop())
                starts["restart after the profiled run"] = await daemon.start(mock)
            await asyncio.sleep(3)
            stops.append(await daemon.stop())
            starts["restart after a clean stop"] = await daemon.start(mock)
            await asyncio.sleep(3)
            stops.append(await daemon.stop())
            counts = await mock.count()
    finally:
        await daemon.kill()
        mock_proc.terminate()
        await mock_proc.wait()
    log = daemon.log.read_text(errors="replace").splitlines()
    problems = [line for line in log if " error " in line or "Traceback" in line]

    print(f"{jobs} polling jobs across {keys} keys; budget {rate} req/{WINDOW:g}s per key "
          f"= {budget:.0f} polls/s; mock provider in its own process")  # fmt: skip
    print(f"python {platform.python_version()}, {os.cpu_count()} cores (load average "
          f"{load0:.2f} at start, {os.getloadavg()[0]:.2f} at end); {args.seconds:g}s "
          f"measured after {args.warmup:g}s warm-up; prefill {fill:.1f}s")  # fmt: skip
    print()
    print(f"{'':34}{'polls/s':>9}{'of budget':>11}{'CPU-s/1000 polls':>18}{'in kernel':>11}")
    for label, s in (("baseline (bare aiohttp, same pace)", base), ("relayd", run1)):
        print(f"{label:34}{s.rate:9.0f}{s.rate / budget:10.0%} {s.cpu_per_1000:18.3f}"
              f"{s.system / s.cpu:10.0%}")  # fmt: skip
    print(f"ratio relayd/baseline: CPU per poll {run1.cpu_per_1000 / base.cpu_per_1000:.2f}x, "
          f"relayd busy {run1.cpu / run1.seconds:.0%} of one core")  # fmt: skip
    print()
    print(f"{'':34}{'to READY=1':>11}{'CPU-s':>7}{'to 1st poll':>13}")
    for label, start in starts.items():
        print(f"{label:34}{start['ready']:10.2f}s{start['cpu']:7.2f}{start['first_poll']:12.2f}s")
    print()
    rss0, rss1 = (kb / 1024 for kb in run1.rss_kb)
    print(f"peak RSS (VmHWM) {mem['VmHWM'] / 1024:.0f} MB; RSS {rss0:.0f} MB after warm-up, "
          f"{rss1:.0f} MB {args.seconds:g}s later")  # fmt: skip
    grown = run1.db_bytes[1] - run1.db_bytes[0]
    print(f"database {run1.db_bytes[1] / 1e6:.0f} MB, grew {grown / 1e6:.1f} MB in the interval "
          f"({grown / run1.requests:.0f} bytes per poll)")  # fmt: skip
    print(f"GET /v1/status {1000 * status:.0f} ms, GET /metrics {1000 * metrics:.0f} ms; "
          f"SIGTERM to exit " + " and ".join(f"{s:.2f}s" for s in stops))  # fmt: skip
    print(f"provider answers {counts['status_counts']}, 429s: {counts['rejected']}")
    print()
    targets = (
        ("peak RSS <= 200 MB", mem["VmHWM"] / 1024 <= 200),
        ("CPU <= 0.5 s per 1,000 polls", run1.cpu_per_1000 <= 0.5),
        ("recovery <= 3 s", max(start["ready"] for start in starts.values()) <= 3),
    )
    print("targets: " + ", ".join(f"{name} {'met' if ok else 'MISSED'}" for name, ok in targets))
    if problems:
        print(f"relayd logged {len(problems)} error(s), first: {problems[0]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument("--keys", type=int, default=100)
    parser.add_argument("--rate", type=int, default=10, help="requests per second per key")
    parser.add_argument("--seconds", type=float, default=60, help="measured steady state")
    parser.add_argument("--warmup", type=float, default=15)
    parser.add_argument("--quick", action="store_true", help="10,000 jobs, 20 keys, 10 s")
    parser.add_argument("--profile", type=Path,
                        help="run relayd's first start under cProfile, stats to FILE")  # fmt: skip
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args()
    if args.quick:
        args.jobs, args.keys, args.seconds, args.warmup = 10_000, 20, 10, 3
    if args.jobs < args.keys:
        parser.error("--jobs must be at least --keys (every key needs a job to poll)")
    if args.profile is not None:
        args.profile = args.profile.absolute()
    tmp = Path(tempfile.mkdtemp(prefix="relayd-scale-"))
    try:
        asyncio.run(run(args, tmp))
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            with contextlib.suppress(OSError):
                shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
