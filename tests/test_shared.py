"""Several relayd instances on one API key, sharing its budget through a real Redis: the limit
kept across processes, the budget used, no instance starved, and Redis going away and back."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import tomli_w
from prometheus_client.parser import text_string_to_metric_families

from relayd.mock import provider as mock_provider
from relayd.mock import receiver as mock_receiver
from relayd.mock.receiver import Receiver
from tests.conftest import ENV, api, config_dict, eventually, make_config, running, settled
from tests.redis_server import RedisServer

WINDOW, LIMIT = 0.5, 10  # the key: 10 requests per 0.5 s window
LEASE = 0.5  # provider timeout: a request in flight holds its slot at most this long


def shared_data(tmp_path: Path, provider_port: int, receiver_port: int, url: str) -> dict[str, Any]:
    data = config_dict(
        tmp_path, provider_port, {"app": receiver_port},
        rate_limit=LIMIT, rate_window=f"{int(WINDOW * 1000)}ms", poll_interval="50ms",
        timeout=f"{int(LEASE * 1000)}ms",
    )  # fmt: skip
    data["relayd"]["shared_budget"] = url
    return data


async def test_redis_away_pauses_the_key_says_so_and_recovers(
    tmp_path: Path,
    provider: mock_provider.MockProvider,
    receiver: Receiver,
    redis_server: RedisServer,
) -> None:
    """With Redis unreachable nothing is sent on the key (no instance can know what the others
    spend); status, /readyz, /metrics and the log say so; intake still works; once Redis is back
    the key settles for a window and every job is delivered."""
    provider.add_job("waits-for-redis", ready_after=0)
    config = make_config(
        shared_data(tmp_path, provider.port, receiver.port, redis_server.url), tmp_path
    )
    redis_server.kill()
    try:
        async with running(config) as daemon:
            assert (await api(daemon, "POST", "/v1/jobs", {"docId": "waits-for-redis"}))[0] == 202
            await eventually(
                lambda: bool(daemon.poller.keys.shared_problems()), what="Redis missed"
            )
            status, ready = await api(daemon, "GET", "/readyz")
            assert status == 200 and ready["status"] == "degraded"
            assert "shared budget unreachable" in ready["degraded"][0]
            _, info = await api(daemon, "GET", "/v1/status")
            budget = info["providers"]["main"]["budget"]
            assert "shared budget unreachable" in budget["paused"]
            assert budget["shared"]["reachable"] is False
            _, text = await api(daemon, "GET", "/metrics")
            reachable = {
                s.labels["provider"]: s.value
                for f in text_string_to_metric_families(text)
                for s in f.samples
                if s.name == "relayd_shared_budget_reachable"
            }
            assert reachable == {"main": 0}
            await asyncio.sleep(0.3)  # a few retry rounds: still nothing may go out
            assert provider.arrivals == []
            redis_server.start()  # empty: the key settles for window + lease, then polls
            await eventually(lambda: settled(daemon, 1), timeout=10, what="delivery")
            assert daemon.poller.keys.shared_problems() == []
            assert (await api(daemon, "GET", "/readyz"))[1] == {"status": "ready"}
    finally:
        redis_server.start()
    assert [r.json()["docId"] for r in receiver.accepted] == ["waits-for-redis"]
    assert provider.rejected == 0


# -- several processes ------------------------------------------------------------------------


class Instance:
    """One `relayd run` subprocess with its own state, spool and socket."""

    def __init__(self, root: Path, name: str, data: dict[str, Any], api_key: str) -> None:
        self.name = name
        self.dir = root / name
        self.dir.mkdir()
        cfg = json.loads(json.dumps(data))
        cfg["relayd"].update(
            state_dir=str(self.dir / "state"),
            spool_dir=str(self.dir / "spool"),
            socket=str(self.dir / "relayd.sock"),
            http="",
        )
        self.config = self.dir / "relayd.toml"
        self.config.write_text(tomli_w.dumps(cfg))
        self.sock = self.dir / "relayd.sock"
        self.env = {**os.environ, **ENV, "XOSUM_KEY": api_key}
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "relayd", "run", "-c", str(self.config),
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=self.env,
        )  # fmt: skip

    async def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body)
        async with (
            aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(self.sock))) as s,
            s.request(method, "http://relayd" + path, data=data) as resp,
        ):
            return resp.status, await resp.json()

    async def ready(self) -> None:
        async def up() -> bool:
            with contextlib.suppress(aiohttp.ClientError, OSError):
                return (await self.call("GET", "/healthz"))[0] == 200
            return False

        for _ in range(500):
            if await up():
                return
            await asyncio.sleep(0.02)
        raise AssertionError(f"{self.name} never answered /healthz")

    async def stop(self) -> str:
        """SIGTERM; returns stderr. Asserts a clean exit."""
        assert self.proc is not None and self.proc.stderr is not None
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(self.proc.communicate(), 20)
        assert self.proc.returncode == 0, err.decode()[-3000:]
        return err.decode()

    def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()

    def poll_times(self) -> list[float]:
        with contextlib.closing(sqlite3.connect(self.dir / "state" / "relayd.db")) as db:
            return [r[0] for r in db.execute("SELECT at FROM polls")]


async def fleet(
    tmp_path: Path, n: int, provider_port: int, receiver_port: int, url: str
) -> list[Instance]:
    data = shared_data(tmp_path, provider_port, receiver_port, url)
    api_key = f"shared-{uuid.uuid4().hex[:8]}"  # a fresh key: nothing of other tests in Redis
    instances = [Instance(tmp_path, f"i{i}", data, api_key) for i in range(n)]
    for each in instances:
        await each.start()
    await asyncio.gather(*(each.ready() for each in instances))
    return instances


def window_fill(times: list[float], start: float, end: float) -> float:
    """Share of the budget used in the provider's aligned windows wholly inside [start, end]."""
    counts = collections.Counter(int(t // WINDOW) for t in times)
    first, last = int(start // WINDOW) + 1, int(end // WINDOW) - 1
    windows = range(first, last + 1)
    assert len(windows) >= 3, "too short a busy period to measure"
    return sum(counts[w] for w in windows) / (LIMIT * len(windows))


async def test_three_processes_share_one_key(tmp_path: Path, redis_server: RedisServer) -> None:
    """Three relayd processes on one key, one with four times the jobs of the others: 0 x 429,
    at least 90 % of the budget used while work waits, every job delivered, and while all three
    have work each gets a fair third of the polls (none starved by the busy one)."""
    provider, prunner, pport = await mock_provider.serve(window=WINDOW, limit=LIMIT)
    receiver, rrunner, rport = await mock_receiver.serve()
    instances = await fleet(tmp_path, 3, pport, rport, redis_server.url)
    jobs = {"i0": 40, "i1": 10, "i2": 10}
    try:
        for each in instances:
            ids = [f"{each.name}-{k}" for k in range(jobs[each.name])]
            for doc_id in ids:
                provider.add_job(doc_id, ready_after=4.0)
            assert (await each.call("POST", "/v1/jobs", [{"docId": d} for d in ids]))[0] == 202
        seen: dict[str, Any] = {}
        for _ in range(100):  # Redis's view, as `relayd status` shows it: all three on the key
            _, info = await instances[0].call("GET", "/v1/status")
            seen = info["providers"]["main"]["budget"]["shared"]
            if seen.get("instances") == 3:
                break
            await asyncio.sleep(0.05)
        assert seen["reachable"] and seen["instances"] == 3, seen
        assert 0 <= seen["used_by_all"] <= LIMIT
        await receiver.wait_for(sum(jobs.values()), timeout=30)
        errors = [await each.stop() for each in instances]
    finally:
        for each in instances:
            each.kill()
        await prunner.cleanup()
        await rrunner.cleanup()
    assert provider.rejected == 0, "a 429: the instances overran the key"
    assert provider.max_in_rolling_window() <= LIMIT
    delivered = collections.Counter(r.json()["docId"].split("-")[0] for r in receiver.accepted)
    assert delivered == jobs
    times = sorted(t for t, _ in provider.arrivals)
    last_ready = max(job.first_seen + job.ready_after for job in provider.jobs.values())
    fill = window_fill(times, times[0], last_ready)
    assert fill >= 0.9, f"budget used while work waited: {fill:.0%}"
    # while every instance still had jobs waiting (before any was ready), shares were fair
    contended = (times[0], min(job.first_seen + job.ready_after for job in provider.jobs.values()))
    shares = {
        each.name: sum(1 for t in each.poll_times() if contended[0] <= t < contended[1])
        for each in instances
    }
    total = sum(shares.values())
    for name, count in shares.items():
        assert 0.25 <= count / total <= 0.42, f"{name} got {count} of {total} polls: {shares}"
    assert all("Traceback" not in err for err in errors)


async def test_redis_killed_mid_run_and_restarted(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """Redis killed while two processes poll one key, then restarted empty: nothing is sent
    while it is away, no 429 after it returns, no job lost, and both resume by themselves."""
    provider, prunner, pport = await mock_provider.serve(window=WINDOW, limit=LIMIT)
    receiver, rrunner, rport = await mock_receiver.serve()
    instances = await fleet(tmp_path, 2, pport, rport, redis_server.url)
    try:
        for each in instances:
            ids = [f"{each.name}-{k}" for k in range(15)]
            for doc_id in ids:
                provider.add_job(doc_id, ready_after=3.0)
            assert (await each.call("POST", "/v1/jobs", [{"docId": d} for d in ids]))[0] == 202
        await eventually(lambda: len(provider.arrivals) >= 2 * LIMIT, what="polling under way")
        redis_server.kill()
        killed_at = provider.clock()

        async def degraded() -> bool:
            answers = [await each.call("GET", "/readyz") for each in instances]
            return all(body.get("status") == "degraded" for _, body in answers)

        for _ in range(250):
            if await degraded():
                break
            await asyncio.sleep(0.02)
        else:
            raise AssertionError("the instances never reported Redis missing")
        await asyncio.sleep(0.5)
        restarted_at = provider.clock()
        redis_server.start()
        await receiver.wait_for(30, timeout=30)
        for each in instances:
            _, body = await each.call("GET", "/readyz")
            assert body == {"status": "ready"}
        errors = [await each.stop() for each in instances]
    finally:
        for each in instances:
            each.kill()
        redis_server.start()
        await prunner.cleanup()
        await rrunner.cleanup()
    assert provider.rejected == 0
    assert provider.max_in_rolling_window() <= LIMIT
    away = [t for t, _ in provider.arrivals if killed_at + 0.2 < t < restarted_at]
    assert away == [], "requests went out while Redis was away"
    assert len({r.json()["docId"] for r in receiver.accepted}) == 30
    assert all("SHARED BUDGET UNREACHABLE" in err for err in errors)
    assert all("shared budget reachable again" in err for err in errors)


async def test_a_grant_in_hand_goes_back_at_shutdown(redis_server: RedisServer) -> None:
    """A relayd that stops while holding a grant gives it back, so the other instances on the
    key do not wait a lease and a window for a request that was never sent."""
    from relayd.budget_shared import SharedBudgets

    shared = SharedBudgets(redis_server.url)
    budget = shared.budget(f"grant-{uuid.uuid4().hex}", limit=5, window=0.2, lease=0.1)
    granted = asyncio.Event()
    grants = shared.grants(budget, providers=lambda: ["main"], on_grant=granted.set)
    try:
        grants.want(True)
        await asyncio.wait_for(granted.wait(), 5)  # after the key's first-use settling
        assert (await budget.snapshot())["used"] == 1
        await grants.close()
        assert (await budget.snapshot())["used"] == 0
    finally:
        await shared.close()
