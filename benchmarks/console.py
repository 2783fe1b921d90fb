"""Console pages on a large database (issue 17): how long the real daemon (`relayd run`, its
own process) takes to answer each console page when it holds --jobs jobs, against the JSON API
answering the same question in the same run (`GET /v1/jobs?limit=50`, the baseline).

    PYTHONPATH=. .venv/bin/python benchmarks/console.py [--jobs 100000] [--rounds 200]

The database is filled beforehand: 90 % delivered (each with a 2 KB transcript and its
delivery), 1 % dead, 9 % polling with their next poll a day away (so the daemon is idle and
only the pages are measured). Each page is fetched --rounds times one after another over
keep-alive, signed in with the token like a browser; times are wall-clock from request to the
last byte, as a browser on the same machine would see them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from relayd.mock.net import free_port, wait_port
from relayd.models import Submission
from relayd.store import SqliteStore

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "bench-console-token-0123456789"


def fill(db: Path, jobs: int) -> tuple[str, int]:
    """Store the jobs; (a delivered job's docId, the id of a job half-way down the list)."""
    store = SqliteStore(db)
    now = time.time()
    for start in range(0, jobs, 10_000):
        store.add_jobs(
            [Submission(f"bench-{i:07d}", "main") for i in range(start, min(jobs, start + 10_000))],
            source="bench",
            now=now - 3600 + start / 100,  # younger than max_job_age: none expires
        )
    store.close()
    body = json.dumps({"event_type": "transcript_ready", "transcription": "word " * 400})
    raw = __import__("sqlite3").connect(db, isolation_level=None)
    raw.execute("BEGIN")
    raw.execute(
        "UPDATE jobs SET state = CASE WHEN id % 100 = 0 THEN 'dead' WHEN id % 100 < 10"
        " THEN 'polling' ELSE 'delivered' END, next_poll_at = ?, result_status = 'transcribed',"
        " last_status = 'transcribed', polls = 3",
        (now + 86400,),
    )
    raw.execute(
        "INSERT INTO deliveries (job_id, endpoint, event, webhook_id, payload, state, attempts,"
        " next_attempt_at, created_at) SELECT id, 'app', 'transcript_ready', 'msg_' || id, ?,"
        " CASE state WHEN 'dead' THEN 'dead' ELSE 'delivered' END, 1, 0, submitted_at"
        " FROM jobs WHERE state != 'polling'",
        (body,),
    )
    raw.execute("COMMIT")
    raw.close()
    return "bench-0000001", jobs // 2


def write_config(tmp: Path, port: int) -> Path:
    path = tmp / "relayd.toml"
    path.write_text(
        "\n".join(
            [
                "[relayd]",
                'state_dir = "state"',
                'spool_dir = "spool"',
                'socket = ""',
                f'http = "127.0.0.1:{port}"',
                f'api_token = "{TOKEN}"',
                'log_level = "warning"',
                'retention = "0"',
                "",
                "[providers.main]",
                'kind = "xosum"',
                'base_url = "http://127.0.0.1:9"',
                'api_key = "bench-key"',
                'endpoints = ["app"]',
                "",
                "[endpoints.app]",
                'url = "http://127.0.0.1:9/hook"',
                "",
            ]
        )
    )
    return path


async def timed(session: aiohttp.ClientSession, url: str, rounds: int, **kw: object) -> list[float]:
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        async with session.get(url, **kw) as resp:  # type: ignore[arg-type]
            await resp.read()
            assert resp.status == 200, (url, resp.status)
        times.append((time.perf_counter() - started) * 1000)
    return times


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="console-") as tmp_name:
        tmp = Path(tmp_name)
        started = time.perf_counter()
        doc, middle = fill(tmp / "state" / "relayd.db", args.jobs)
        print(f"filled {args.jobs:,} jobs in {time.perf_counter() - started:.1f} s")
        port = free_port()
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        config = write_config(tmp, port)
        relay = subprocess.Popen(  # noqa: ASYNC220 - started once, before anything is timed
            [sys.executable, "-m", "relayd", "run", "--config", str(config)], env=env, cwd=tmp
        )
        try:
            await wait_port(port, timeout=60)
            base = f"http://127.0.0.1:{port}"
            jar = aiohttp.CookieJar(unsafe=True)
            async with aiohttp.ClientSession(cookie_jar=jar) as session:
                async with session.post(f"{base}/ui/login", data={"token": TOKEN}) as resp:
                    assert resp.status == 200, resp.status
                bearer = {"headers": {"Authorization": f"Bearer {TOKEN}"}}
                pages: list[tuple[str, str, dict[str, object]]] = [
                    ("JSON API: GET /v1/jobs?limit=50 (baseline)", "/v1/jobs?limit=50", bearer),
                    ("/ui/jobs (newest 50)", "/ui/jobs", {}),
                    ("/ui/jobs, page half-way down", f"/ui/jobs?before={middle}", {}),
                    ("/ui/jobs?state=dead", "/ui/jobs?state=dead", {}),
                    ("/ui/jobs?q=bench-00012 (by id)", "/ui/jobs?q=bench-00012", {}),
                    ("/ui/jobs, live refresh (fragment)", "/ui/jobs",
                     {"headers": {"X-Relayd-Partial": "1"}}),
                    ("/ui/ overview", "/ui/", {}),
                    ("/ui/jobs/main/{docId}", f"/ui/jobs/main/{doc}", {}),
                    ("/ui/dead (latest 100 of 1,000)", "/ui/dead", {}),
                ]  # fmt: skip
                results = []
                for name, path, kw in pages:
                    await timed(session, base + path, 5, **kw)  # warm
                    results.append((name, await timed(session, base + path, args.rounds, **kw)))
        finally:
            relay.terminate()
            relay.wait()
    baseline = statistics.median(results[0][1])
    print(f"{args.jobs:,} jobs; {args.rounds} requests each, one at a time; milliseconds")
    print(f"{'page':46}{'median':>8}{'p99':>8}{'max':>8}{'/ baseline':>12}")
    for name, times in results:
        times.sort()
        median, p99 = statistics.median(times), times[int(0.99 * len(times)) - 1]
        print(f"{name:46}{median:8.2f}{p99:8.2f}{times[-1]:8.2f}{median / baseline:11.2f}x")


if __name__ == "__main__":
    asyncio.run(main())
