"""Several relays on one PostgreSQL store (SPEC §6, "Many machines"), as real processes: three
`relayd run` share the jobs submitted to one of them; that one killed with SIGKILL mid-run
leaves nothing stranded (its jobs are taken over within `store_lease`, every job is delivered,
a repeat carries the same webhook-id) and no relay ever causes a 429 at a provider enforcing the
limit; the database restarted mid-run; relays starting at once on an empty database; relays whose
clocks disagree by a minute."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, closing
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import tomli_w

from relayd.clock import SystemClock
from relayd.mock import provider as mock_provider
from relayd.mock.receiver import Receiver
from tests.conftest import ENV, api, config_dict, eventually, make_config, running
from tests.pg import PgCluster

pytest.importorskip("psycopg", reason="psycopg, the postgres extra, is not installed")
import psycopg

from relayd.store.postgres import PostgresStore

LEASE = "1s"  # store_lease: how soon a dead relay's work is taken over


def relay_config(
    tmp_path: Path, name: str, provider: int, receiver: int, url: str
) -> dict[str, Any]:
    data = config_dict(tmp_path / name, provider, {"app": receiver}, timeout="500ms")
    data["relayd"] |= {"store": url, "store_lease": LEASE}
    return data


class Relay:
    """One `relayd run` process."""

    def __init__(self, tmp_path: Path, name: str, data: dict[str, Any]) -> None:
        self.name = name
        self.path = tmp_path / f"{name}.toml"
        self.path.write_text(tomli_w.dumps(data))
        self.socket = Path(data["relayd"]["socket"])
        self.log = tmp_path / f"{name}.log"
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        with self.log.open("ab") as log:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "relayd", "run", "-c", str(self.path),
                env={**os.environ, **ENV}, stdout=subprocess.DEVNULL, stderr=log,
            )  # fmt: skip

    async def ready(self) -> None:
        await eventually(self.socket.exists, timeout=30, what=f"{self.name}'s socket")

    async def get(self, path: str) -> tuple[int, Any]:
        connector = aiohttp.UnixConnector(path=str(self.socket))
        async with (
            aiohttp.ClientSession(connector=connector) as session,
            session.get(f"http://relayd{path}") as resp,
        ):
            return resp.status, await resp.json()

    async def submit(self, docs: list[str]) -> None:
        connector = aiohttp.UnixConnector(path=str(self.socket))
        async with aiohttp.ClientSession(connector=connector) as session:
            body = [{"docId": d} for d in docs]
            async with session.post("http://relayd/v1/jobs", json=body) as resp:
                assert resp.status == 202, await resp.text()

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)

    async def stop(self) -> str:
        """SIGTERM (if it still runs) and its stderr."""
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(self.proc.wait(), 30)
        return self.log.read_text()


@asynccontextmanager
async def relays(
    tmp_path: Path, n: int, provider: int, receiver: int, url: str
) -> AsyncIterator[list[Relay]]:
    group = [
        Relay(tmp_path, f"r{i}", relay_config(tmp_path, f"r{i}", provider, receiver, url))
        for i in range(n)
    ]
    try:
        await asyncio.gather(*(r.start() for r in group))  # at once, on an empty database
        await asyncio.gather(*(r.ready() for r in group))
        yield group
    finally:
        errors = await asyncio.gather(*(r.stop() for r in group))
        for relay, err in zip(group, errors, strict=True):
            assert "Traceback" not in err, f"{relay.name}: {err}"


def owners(url: str) -> Counter[str]:
    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT owner FROM jobs WHERE state = 'polling'").fetchall()
    return Counter(str(r[0]).split(":")[1] if r[0] else "" for r in rows)


def delivered_once_each(receiver: Receiver, docs: list[str]) -> Callable[[], bool]:
    return lambda: {r.json()["docId"] for r in receiver.accepted} >= set(docs)


async def test_three_relays_one_killed_every_job_delivered_and_no_429(
    tmp_path: Path, receiver: Receiver, pg_url: str
) -> None:
    """Three relays started at once on an empty database; 40 jobs submitted to the first; once
    it holds some of them it is killed with SIGKILL. The other two take its jobs over when its
    lease ends, every job is delivered, any repeat carries the same webhook-id, and the
    provider, enforcing 8 a window for the key all three share, never answered 429."""
    mock, runner, port = await mock_provider.serve(window=0.25, limit=8, ready_after=2.5)
    docs = [f"kill-{i}" for i in range(40)]
    try:
        async with relays(tmp_path, 3, port, receiver.port, pg_url) as group:
            first = group[0]
            await first.submit(docs)
            assert first.proc is not None
            pid = str(first.proc.pid)
            await eventually(lambda: owners(pg_url)[pid] > 0, what="the first relay's jobs")
            held = owners(pg_url)[pid]
            first.kill()
            killed_at = time.monotonic()
            await eventually(lambda: owners(pg_url)[pid] == 0, timeout=15,
                             what="the killed relay's jobs taken over")  # fmt: skip
            took = time.monotonic() - killed_at
            await eventually(delivered_once_each(receiver, docs), timeout=60, what="deliveries")
            busy = [n for n, c in owners(pg_url).items() if c]
        assert took <= 1.0 + 2.0, took  # store_lease + a claim round or two
        by_doc: dict[str, set[str]] = {}
        for r in receiver.accepted:
            by_doc.setdefault(r.json()["docId"], set()).add(r.headers["webhook-id"])
        assert sorted(by_doc) == sorted(docs)
        assert all(len(ids) == 1 for ids in by_doc.values())  # a repeat: the same webhook-id
        assert mock.rejected == 0
        assert held > 0 and pid not in busy
    finally:
        await runner.cleanup()


async def test_the_database_restarted_mid_run_loses_nothing(
    tmp_path: Path, receiver: Receiver, pg_url: str, pg_cluster: PgCluster
) -> None:
    """Two relays; the server stops while jobs are being polled and starts again 2 s later:
    meanwhile intake answers 503 and /readyz says why; the relays then resume by themselves,
    every job is delivered, no 429."""
    mock, runner, port = await mock_provider.serve(window=0.25, limit=8, ready_after=1.0)
    docs = [f"restart-{i}" for i in range(20)]
    try:
        async with relays(tmp_path, 2, port, receiver.port, pg_url) as group:
            await group[1].submit(docs)
            await eventually(lambda: sum(owners(pg_url).values()) > 0, what="claims")
            pg_cluster.stop()
            started = time.monotonic()
            status, ready = await group[0].get("/readyz")
            assert status == 503 and "the database refuses writes" in ready["error"], ready
            connector = aiohttp.UnixConnector(path=str(group[0].socket))
            async with (
                aiohttp.ClientSession(connector=connector) as session,
                session.post("http://relayd/v1/jobs", json={"docId": "in-outage"}) as resp,
            ):
                assert resp.status == 503
            await asyncio.sleep(max(0.0, 2.0 - (time.monotonic() - started)))  # the outage
            pg_cluster.start()
            await eventually(delivered_once_each(receiver, docs), timeout=60, what="deliveries")
        assert mock.rejected == 0
    finally:
        await runner.cleanup()


class SkewedClock(SystemClock):
    def __init__(self, skew: float) -> None:
        self.skew = skew

    def time(self) -> float:
        return super().time() + self.skew


async def test_relays_whose_clocks_disagree_by_two_minutes_share_one_budget(
    tmp_path: Path, receiver: Receiver, pg_url: str
) -> None:
    """One relay's clock a minute ahead, the other's a minute behind: leases and the budget are
    the database's, so both claim, neither overruns the key, and every job is delivered."""
    mock, runner, port = await mock_provider.serve(window=0.25, limit=8, ready_after=0.8)
    docs = [f"skew-{i}" for i in range(24)]
    try:
        ahead = make_config(relay_config(tmp_path, "a", port, receiver.port, pg_url), tmp_path)
        behind = make_config(relay_config(tmp_path, "b", port, receiver.port, pg_url), tmp_path)
        async with (
            running(ahead, clock=SkewedClock(60.0)) as a,
            running(behind, clock=SkewedClock(-60.0)) as b,
        ):
            status, _ = await api(a, "POST", "/v1/jobs", [{"docId": d} for d in docs])
            assert status == 202
            held: list[set[int]] = [set(), set()]

            def both_claimed() -> bool:
                for seen, relay in zip(held, (a, b), strict=True):
                    seen |= relay.poller.owned or set()
                return all(held)

            await eventually(both_claimed, what="both relays claimed jobs")
            await eventually(delivered_once_each(receiver, docs), timeout=30, what="deliveries")
        assert mock.rejected == 0
    finally:
        await runner.cleanup()


def test_a_relay_that_stopped_cleanly_is_gone_from_the_store(pg_url: str) -> None:
    """`leave` hands back the jobs and deliveries and removes the relay's row."""
    with closing(PostgresStore(pg_url, relay="r", lease=30)) as store:
        store.heartbeat([], ["xosum"])
        assert [r["name"] for r in store.relays()] == ["r"]
        store.leave()
        assert store.relays() == []
