"""kill -9 at random moments: the real daemon as a subprocess, hundreds of jobs, nothing lost."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import aiohttp
import tomli_w

from relayd.mock import provider as mock_provider
from relayd.mock import receiver as mock_receiver
from tests.conftest import ENV, config_dict, eventually

SEED = 20261120
LIVES = 8
PER_LIFE = 40  # jobs submitted in each life: half through the spool, half through the API


async def start(path: Path) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "relayd", "run", "-c", str(path),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, **ENV},
    )  # fmt: skip


async def wait_ready(sock: Path) -> None:
    """Until /healthz answers: a killed daemon leaves its socket file behind."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 15
    while loop.time() < deadline:
        with contextlib.suppress(aiohttp.ClientError, OSError):
            async with (
                aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(sock))) as s,
                s.get("http://relayd/healthz") as resp,
            ):
                if resp.status == 200:
                    return
        await asyncio.sleep(0.02)
    raise AssertionError("the daemon never answered /healthz")


async def submit(sock: Path, doc_ids: list[str]) -> bool:
    """POST through the socket; True only if relayd answered 202 (it has committed them)."""
    body = json.dumps([{"docId": d} for d in doc_ids])
    try:
        async with (
            aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(sock))) as s,
            s.post("http://relayd/v1/jobs", data=body) as resp,
        ):
            return resp.status == 202
    except (aiohttp.ClientError, OSError):
        return False


async def test_kill_9_at_random_moments_loses_nothing(tmp_path: Path) -> None:
    """Over 8 lives killed with SIGKILL at random, every accepted job is delivered at least
    once, repeats carry the same webhook-id, and the database passes integrity_check."""
    rng = random.Random(SEED)
    provider, prunner, pport = await mock_provider.serve(window=0.2, limit=40, ready_after=0.15)
    receiver, rrunner, rport = await mock_receiver.serve()
    data = config_dict(tmp_path, pport, {"app": rport}, rate_limit=40, rate_window="200ms")
    data["providers"]["main"]["poll_interval"] = "50ms"
    path = tmp_path / "relayd.toml"
    path.write_text(tomli_w.dumps(data))
    spool, sock = tmp_path / "spool", tmp_path / "relayd.sock"
    spool.mkdir()
    accepted: set[str] = set()
    kills = 0
    try:
        for life in range(LIVES):
            proc = await start(path)
            ids = [f"c{life}-{i:03d}" for i in range(PER_LIFE)]
            half = PER_LIFE // 2
            for n in range(0, half, 5):  # spool files are accepted the moment they are renamed in
                tmp = spool / f".life{life}-{n}.tmp"
                tmp.write_text("\n".join(ids[n : n + 5]))
                tmp.rename(spool / f"life{life}-{n}.txt")
                accepted.update(ids[n : n + 5])
            await wait_ready(sock)
            for n in range(half, PER_LIFE, 5):
                if await submit(sock, ids[n : n + 5]):
                    accepted.update(ids[n : n + 5])
                await asyncio.sleep(rng.uniform(0, 0.05))
            # random moments, but the last kill lands right after a submission, mid-work
            await asyncio.sleep(rng.uniform(0.0, 0.6) if life < LIVES - 1 else 0.0)
            proc.send_signal(signal.SIGKILL)
            await proc.wait()
            kills += 1

        def delivered() -> set[str]:
            return {r.json()["docId"] for r in receiver.accepted}

        unfinished = len(accepted - delivered())
        proc = await start(path)  # the last life runs to the end
        try:
            await eventually(lambda: accepted <= delivered(), timeout=60, what="all delivered")
        finally:
            proc.send_signal(signal.SIGTERM)
            _, stderr = await asyncio.wait_for(proc.communicate(), 20)
        assert proc.returncode == 0, stderr.decode()[-2000:]
    finally:
        await rrunner.cleanup()
        await prunner.cleanup()

    assert kills == LIVES
    assert unfinished > 0, "the kills never interrupted work"
    assert len(accepted) >= LIVES * PER_LIFE // 2 + 100  # the spool half, and most API batches
    by_doc: dict[str, set[str]] = {}
    for r in receiver.received:
        by_doc.setdefault(r.json()["docId"], set()).add(r.headers["webhook-id"])
    assert accepted <= set(by_doc)
    assert all(len(ids) == 1 for ids in by_doc.values()), "a repeat changed its webhook-id"
    assert provider.rejected == 0  # no 429 across eight unclean restarts
    db = sqlite3.connect(tmp_path / "state" / "relayd.db")
    try:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        states = dict(db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall())
    finally:
        db.close()
    assert states == {"delivered": len(by_doc)}
    assert not [p for p in spool.iterdir() if p.name != "rejected"]
