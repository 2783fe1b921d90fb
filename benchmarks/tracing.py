"""What tracing costs (issue 19): relayd's CPU per poll and per delivery with tracing off (the
default: opentelemetry-api's no-op spans, the traceparent header still sent) and on (the otel
extra, spans exported over OTLP/HTTP to a collector on loopback), in the same run.

    PYTHONPATH=. .venv/bin/python benchmarks/tracing.py [--polls 6000] [--jobs 3000]

Each variant runs a real `relayd run` (its own process, whose CPU time is read from /proc) twice:
- polls: jobs that never finish, polled as fast as a generous budget lets (2,000 a second):
  CPU seconds per poll;
- jobs: jobs finished at their first poll, each then delivered once: CPU per job minus CPU per
  poll is the CPU per delivery.
The mock provider, the receiver and the collector run in this process, not relayd's.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import tomli_w
from aiohttp import web

from benchmarks.relays import cpu_seconds
from relayd.mock import provider as mock_provider
from relayd.mock import receiver as mock_receiver
from relayd.mock.net import serve_app

API_KEY = "bench-tracing-key"


async def collector() -> tuple[list[int], web.AppRunner, int]:
    """An OTLP/HTTP trace collector that accepts everything and counts the bytes."""
    got: list[int] = []

    async def traces(request: web.Request) -> web.Response:
        got.append(len(await request.read()))
        return web.Response(status=200, content_type="application/x-protobuf")

    app = web.Application(client_max_size=64 << 20)
    app.router.add_post("/v1/traces", traces)
    runner, port = await serve_app(app, host="127.0.0.1", port=0)
    return got, runner, port


def write_config(root: Path, pport: int, rport: int) -> Path:
    data: dict[str, Any] = {
        "relayd": {
            "state_dir": str(root / "state"),
            "spool_dir": str(root / "spool"),
            "socket": str(root / "relayd.sock"),
            "http": "",
            "log_level": "warning",
            "retention": "0",
        },
        "providers": {
            "main": {
                "kind": "xosum",
                "base_url": f"http://127.0.0.1:{pport}",
                "api_key": "env:BENCH_KEY",
                "rate_limit": 1000,
                "rate_window": 0.5,
                "poll_interval": 0.05,
                "adaptive_polling": False,
                "webhook_secret": "env:BENCH_KEY",
                "endpoints": ["app"],
            }
        },
        "endpoints": {"app": {"url": f"http://127.0.0.1:{rport}/hook", "max_in_flight": 32}},
    }
    path = root / "relayd.toml"
    path.write_text(tomli_w.dumps(data))
    return path


async def submit(sock: Path, docs: list[str]) -> None:
    connector = aiohttp.UnixConnector(path=str(sock))
    async with aiohttp.ClientSession(connector=connector) as session:
        for i in range(0, len(docs), 500):
            body = [{"docId": d} for d in docs[i : i + 500]]
            async with session.post("http://relayd/v1/jobs", json=body) as resp:
                assert resp.status == 202, await resp.text()


async def run(traced: bool, workload: str, n: int, collector_port: int) -> dict[str, float]:
    provider, prunner, pport = await mock_provider.serve(window=0.5, limit=1000)
    receiver, rrunner, rport = await mock_receiver.serve()
    env = {**os.environ, "BENCH_KEY": API_KEY}
    env.pop("OTEL_EXPORTER_OTLP_ENDPOINT", None)
    if traced:
        env |= {
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{collector_port}",
            "OTEL_SERVICE_NAME": "relayd-bench",
        }
    try:
        with tempfile.TemporaryDirectory(prefix="relayd-tracing-") as tmp:
            path = write_config(Path(tmp), pport, rport)
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "relayd", "run", "-c", str(path),
                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            sock = Path(tmp) / "relayd.sock"
            for _ in range(1000):
                if sock.exists():
                    break
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.5)
            docs = [f"{workload}-{i}" for i in range(n if workload == "jobs" else 200)]
            ready = 0.0 if workload == "jobs" else 1e9
            for doc in docs:
                provider.add_job(doc, ready_after=ready)
            before, sent_before = cpu_seconds(proc.pid), len(provider.arrivals)
            started = time.perf_counter()
            await submit(sock, docs)
            if workload == "jobs":
                await receiver.wait_for(len(docs), timeout=600)
            else:
                while len(provider.arrivals) - sent_before < n:  # noqa: ASYNC110 - the mock counts
                    await asyncio.sleep(0.05)
            used = cpu_seconds(proc.pid) - before
            elapsed = time.perf_counter() - started
            polls = len(provider.arrivals) - sent_before
            proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), 30)
    finally:
        await prunner.cleanup()
        await rrunner.cleanup()
    return {"cpu": used, "polls": polls, "jobs": len(docs), "seconds": elapsed}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--polls", type=int, default=6000)
    parser.add_argument("--jobs", type=int, default=3000)
    args = parser.parse_args()
    spans, crunner, cport = await collector()
    rows = {}
    try:
        for traced in (False, True):
            p = await run(traced, "polls", args.polls, cport)
            j = await run(traced, "jobs", args.jobs, cport)
            per_poll = p["cpu"] / p["polls"]
            per_delivery = (j["cpu"] - per_poll * j["polls"]) / j["jobs"]
            rows[traced] = {"per_poll_ms": per_poll * 1000, "per_delivery_ms": per_delivery * 1000}
            print(json.dumps({"traced": traced, "polls": p, "jobs": j, **rows[traced]}), flush=True)
    finally:
        await crunner.cleanup()
    off, on = rows[False], rows[True]
    print(f"\nspans exported: {len(spans)} batch(es), {sum(spans):,} bytes\n")
    print("| tracing | CPU ms per poll | vs off | CPU ms per delivery | vs off |")
    print("|---|---|---|---|---|")
    for name, r in (("off (no-op API, traceparent sent)", off), ("on (SDK, OTLP/HTTP)", on)):
        print(
            f"| {name} | {r['per_poll_ms']:.3f} | {r['per_poll_ms'] / off['per_poll_ms']:.2f}x |"
            f" {r['per_delivery_ms']:.3f} | {r['per_delivery_ms'] / off['per_delivery_ms']:.2f}x |"
        )


if __name__ == "__main__":
    asyncio.run(main())
