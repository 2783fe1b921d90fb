"""API submissions under load (issue 8): how fast the real daemon (`python -m relayd run`, in its
own process) takes jobs through `POST /v1/jobs` on its unix socket, each answered 202 only once
durably stored, against baselines measured in the same run.

    PYTHONPATH=. .venv/bin/python benchmarks/api_load.py [--jobs 10000] [--clients 16]
        [--batch 100] [--fsyncs] [--before DIR] [--profile FILE]

What runs, one after another, each with --jobs fresh job ids and --clients concurrent clients
in this process (plain HTTP/1.1 over asyncio streams, one keep-alive connection each, on a
unix socket; requests built beforehand, so that the load generator costs little):

- **bare aiohttp**: a server in its own process that reads each body, parses the JSON and answers
  202 with the ids, storing nothing: what the HTTP layer and this load generator cost alone;
- **relayd, 1 job/request**: the daemon on a fresh database (state dir on the real disk, not
  tmpfs, so every commit is a real fsync);
- **relayd, N jobs/request**: the same with --batch jobs per request, for contrast;
- **relayd (before), 1 job/request**: with --before DIR, relayd's code from DIR (an older
  checkout, e.g. `git archive COMMIT relayd | tar -x -C DIR`), for an A/B in the same run;
- **store.add_jobs, 1 job/txn**: the store alone in this process, one synced transaction per job,
  no HTTP: what one fsync per submission allows.

Latency is per request, from just before it is sent to its 202 read in full (intake latency).
The daemon polls a provider that is not there at 1 request a minute, so polling costs nothing.
The CPU column counts the server process only (relayd or the bare server), per request;
--fsyncs adds the server's fsync/fdatasync calls per request, counted by `perf stat` on the
kernel's syscall tracepoints (needs perf and root or perf_event_paranoid <= 1).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from relayd.models import Submission
from relayd.store import SqliteStore

ROOT = Path(__file__).resolve().parent.parent
TICKS = os.sysconf("SC_CLK_TCK")

BARE = """
import json, sys
from aiohttp import web

async def submit(request):
    doc = json.loads(await request.read())
    items = doc if isinstance(doc, list) else [doc]
    jobs = [{"provider": "main", "docId": i["docId"], "state": "polling"} for i in items]
    return web.json_response({"jobs": jobs}, status=202)

async def healthz(request):
    return web.json_response({"status": "ok"})

app = web.Application(client_max_size=1 << 20)
app.router.add_post("/v1/jobs", submit)
app.router.add_get("/healthz", healthz)
web.run_app(app, path=sys.argv[1], print=None, access_log=None)
"""

CONFIG = """
[relayd]
state_dir = "{tmp}/state"
spool_dir = "{tmp}/spool"
socket = "{tmp}/relayd.sock"
http = ""
log_level = "warning"

[providers.main]
kind = "xosum"
base_url = "http://127.0.0.1:9"
api_key = "env:BENCH_KEY"
rate_limit = 1
rate_window = "60s"
endpoints = ["app"]

[endpoints.app]
url = "http://127.0.0.1:9/hook"
"""


def proc_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


async def wait_socket(path: Path, proc: asyncio.subprocess.Process) -> None:
    for _ in range(600):
        if proc.returncode is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        with contextlib.suppress(OSError, aiohttp.ClientError):
            connector = aiohttp.UnixConnector(path=str(path))
            async with (
                aiohttp.ClientSession(connector=connector) as session,
                session.get("http://relayd/healthz") as resp,
            ):
                if resp.status == 200:
                    return
        await asyncio.sleep(0.05)
    raise RuntimeError(f"nothing answers on {path}")


async def load(path: Path, bodies: list[bytes], clients: int) -> tuple[float, list[float]]:
    """Send every body with `clients` concurrent keep-alive connections; wall time, latencies.

    Plain HTTP/1.1 over asyncio streams, requests built beforehand: a tenth of what aiohttp's
    client costs per request, so that the load generator is not what is measured.
    """
    latencies: list[float] = []
    queue = iter(
        b"POST /v1/jobs HTTP/1.1\r\nHost: relayd\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        for body in bodies
    )

    async def client() -> None:
        reader, writer = await asyncio.open_unix_connection(str(path))
        try:
            for request in queue:
                t0 = time.perf_counter()
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length:", 1)[1].split(b"\r\n", 1)[0])
                answer = await reader.readexactly(length)
                latencies.append(time.perf_counter() - t0)
                if not head.startswith(b"HTTP/1.1 202"):
                    raise RuntimeError(f"{head.splitlines()[0]!r}: {answer[:200]!r}")
        finally:
            writer.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return time.perf_counter() - t0, latencies


def bodies_for(tag: str, jobs: int, batch: int) -> list[bytes]:
    ids = [f"{tag}-{i:07d}" for i in range(jobs)]
    if batch == 1:
        return [json.dumps({"docId": i, "metadata": {"n": n}}).encode() for n, i in enumerate(ids)]
    return [
        json.dumps(
            [{"docId": i, "metadata": {"n": n}} for n, i in enumerate(ids[k : k + batch])]
        ).encode()
        for k in range(0, jobs, batch)
    ]


class Row:
    def __init__(
        self, name: str, jobs: int, wall: float, lat: list[float], cpu: float | None
    ) -> None:
        self.name, self.jobs, self.wall, self.cpu = name, jobs, wall, cpu
        self.fsyncs: int | None = None
        self.requests = len(lat) or jobs
        lat = sorted(lat)
        self.p50 = statistics.median(lat) * 1000 if lat else None
        self.p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000 if lat else None

    @property
    def rate(self) -> float:
        return self.jobs / self.wall

    def line(self) -> str:
        p50 = f"{self.p50:8.2f}" if self.p50 is not None else "       -"
        p99 = f"{self.p99:8.2f}" if self.p99 is not None else "       -"
        cpu = f"{self.cpu / self.requests * 1000:10.3f}" if self.cpu is not None else " " * 9 + "-"
        fsyncs = f" {self.fsyncs / self.requests:10.3f}" if self.fsyncs is not None else ""
        return f"{self.name:30} {self.rate:9.0f} {self.requests:8d} {p50} {p99} {cpu}{fsyncs}"


async def serve(
    cmd: list[str], sock: Path, log: Path, code: Path = ROOT
) -> asyncio.subprocess.Process:
    env = {**os.environ, "PYTHONPATH": str(code), "BENCH_KEY": "bench-key"}
    with log.open("ab") as out:
        # cwd elsewhere: `python -m` puts the working directory first on sys.path
        proc = await asyncio.create_subprocess_exec(
            *cmd, env=env, stdout=out, stderr=out, cwd=log.parent
        )
    await wait_socket(sock, proc)
    return proc


async def measured(
    name: str,
    proc: asyncio.subprocess.Process,
    sock: Path,
    bodies: list[bytes],
    args: argparse.Namespace,
    jobs: int,
) -> Row:
    perf = await count_fsyncs(proc.pid) if args.fsyncs else None
    c0 = proc_cpu(proc.pid)
    wall, lat = await load(sock, bodies, args.clients)
    row = Row(name, jobs, wall, lat, proc_cpu(proc.pid) - c0)
    if perf is not None:
        row.fsyncs = await perf_result(*perf)
    return row


async def count_fsyncs(pid: int) -> tuple[asyncio.subprocess.Process, Path]:
    """`perf stat` on fsync and fdatasync calls of `pid` (kernel tracepoints: no slow-down)."""
    out = Path(tempfile.mkstemp(suffix=".perf")[1])
    events = "syscalls:sys_enter_fsync,syscalls:sys_enter_fdatasync"
    perf = await asyncio.create_subprocess_exec(
        "perf", "stat", "-x,", "-o", str(out), "-e", events, "-p", str(pid)
    )
    await asyncio.sleep(0.5)  # attached
    return perf, out


async def perf_result(perf: asyncio.subprocess.Process, out: Path) -> int:
    perf.send_signal(signal.SIGINT)
    await perf.wait()
    text = await asyncio.to_thread(out.read_text)
    await asyncio.to_thread(out.unlink)
    return sum(int(line.split(",")[0]) for line in text.splitlines() if "sys_enter_f" in line)


async def stop(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 60)


def store_rate(tmp: Path, jobs: int) -> Row:
    store = SqliteStore(tmp / "raw" / "relayd.db")
    try:
        t0 = time.perf_counter()
        for i in range(jobs):
            store.add_jobs([Submission(f"raw-{i:07d}", "main", {"n": i})], source="api", now=0.0)
        return Row("store.add_jobs, 1 job/txn", jobs, time.perf_counter() - t0, [], None)
    finally:
        store.close()


async def run(args: argparse.Namespace, tmp: Path) -> list[Row]:
    rows = []
    log = tmp / "servers.log"
    bare_sock = tmp / "bare.sock"
    bare = await serve([sys.executable, "-c", BARE, str(bare_sock)], bare_sock, log)
    try:
        bodies = bodies_for("bare", args.jobs, 1)
        rows.append(
            await measured("bare aiohttp, 1 job/request", bare, bare_sock, bodies, args, args.jobs)
        )
    finally:
        await stop(bare)

    runs = [(1, ROOT, ""), (args.batch, ROOT, "")]
    if args.before:
        runs.append((1, args.before, " (before)"))
    for batch, code, label in runs:
        where = tmp / f"relayd-{batch}{label.strip(' ()')}"
        where.mkdir()
        config = where / "relayd.toml"
        config.write_text(CONFIG.format(tmp=where))
        cmd = [sys.executable]
        if args.profile and batch == 1 and not label:
            cmd += ["-m", "cProfile", "-o", args.profile]
        cmd += ["-m", "relayd", "run", "-c", str(config)]
        sock = where / "relayd.sock"
        daemon = await serve(cmd, sock, log, code)
        try:
            bodies = bodies_for(f"b{batch}", args.jobs, batch)
            name = f"relayd{label}, {batch} job{'s' if batch > 1 else ''}/request"
            rows.append(await measured(name, daemon, sock, bodies, args, args.jobs))
        finally:
            await stop(daemon)
        check = SqliteStore(where / "state" / "relayd.db", readonly=True)
        try:
            stored = sum(sum(c.values()) for c in check.job_counts().values())
        finally:
            check.close()
        if stored != args.jobs:
            raise RuntimeError(f"relayd stored {stored} of {args.jobs} jobs")

    rows.append(store_rate(tmp, min(args.jobs, 2000)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=10000)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--profile", help="cProfile the relayd 1 job/request run into FILE")
    parser.add_argument("--fsyncs", action="store_true", help="count the servers' fsyncs (perf)")
    parser.add_argument(
        "--before",
        metavar="DIR",
        help="also run relayd from DIR (an older checkout), 1 job/request",
    )
    args = parser.parse_args()
    if args.before:
        args.before = Path(args.before).resolve()
    # the real disk, so that fsync costs what it costs (/tmp may be tmpfs)
    tmp = Path(tempfile.mkdtemp(prefix="api-load-", dir=ROOT / "benchmarks"))
    try:
        rows = asyncio.run(run(args, tmp))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"{args.jobs} jobs through POST /v1/jobs on a unix socket, {args.clients} clients")
    print(
        f"{'':30} {'jobs/s':>9} {'requests':>8} {'p50 ms':>8} {'p99 ms':>8} {'CPU ms/req':>10}"
        + (f" {'fsyncs/req':>10}" if args.fsyncs else "")
    )
    for row in rows:
        print(row.line())
    bare, one, many = rows[:3]
    raw = rows[-1]
    print(
        f"ratio relayd/bare (1 job/request): throughput {one.rate / bare.rate:.2f}x, "
        f"p50 {one.p50 / bare.p50:.2f}x, p99 {one.p99 / bare.p99:.2f}x"
    )
    print(f"relayd 1 job/request vs store alone at 1 job/txn: {one.rate / raw.rate:.2f}x")
    print(f"batches of {args.batch}: {many.rate / one.rate:.1f}x the jobs/s of 1 job/request")
    if args.before:
        print(f"relayd now / before (1 job/request): {one.rate / rows[3].rate:.2f}x")


if __name__ == "__main__":
    main()
