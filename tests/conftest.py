"""Shared fixtures: a mock provider and receivers on loopback, configs with compressed time,
and a helper that runs the real daemon in the test's event loop."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from relayd.config import Config, parse_config
from relayd.daemon import Daemon
from relayd.mock import provider as mock_provider
from relayd.mock import receiver as mock_receiver
from relayd.models import JobState
from relayd.store import SqliteStore
from relayd.views import totals
from tests import openapi
from tests.pg import pg_cluster, pg_url  # noqa: F401 - fixtures for every test
from tests.redis_server import redis_server, redis_url  # noqa: F401 - fixtures for every test
from tests.stores import backend, sqlite_store  # noqa: F401 - fixtures for every test

API_KEY = "test-key-0001"
API_TIMEOUT = aiohttp.ClientTimeout(total=30)  # an API call that hangs fails the test instead
WEBHOOK_SECRET = "xosum-webhook-secret-42"


@pytest.fixture
async def provider() -> AsyncIterator[mock_provider.MockProvider]:
    """A mock Xosum on loopback: 8 requests per 0.25 s window, jobs ready after 0.3 s."""
    mock, runner, _ = await mock_provider.serve(window=0.25, limit=8, ready_after=0.3)
    yield mock
    await runner.cleanup()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqliteStore]:
    """A real SQLite store in the test's own directory."""
    opened = SqliteStore(tmp_path / "relayd.db")
    yield opened
    opened.close()


async def start_receiver(**kwargs: Any) -> tuple[mock_receiver.Receiver, Any, int]:
    return await mock_receiver.serve(**kwargs)


@pytest.fixture
async def receiver() -> AsyncIterator[mock_receiver.Receiver]:
    """A webhook receiver that answers 200 to everything."""
    recv, runner, _ = await mock_receiver.serve()
    yield recv
    await runner.cleanup()


def config_dict(
    tmp_path: Path, provider_port: int, endpoints: dict[str, int], **provider_overrides: Any
) -> dict[str, Any]:
    """A config with sub-second windows; `endpoints` maps endpoint name -> receiver port."""
    prov = {
        "kind": "xosum",
        "base_url": f"http://127.0.0.1:{provider_port}",
        "api_key": f"env:{'XOSUM_KEY'}",
        "rate_limit": 8,
        "rate_window": "250ms",
        "poll_interval": "100ms",
        "webhook_secret": "env:XOSUM_SECRET",
        "link_template": "https://app.xosum.am/t/{docId}",
        "endpoints": list(endpoints),
    }
    prov.update(provider_overrides)
    return {
        "relayd": {
            "state_dir": str(tmp_path / "state"),
            "spool_dir": str(tmp_path / "spool"),
            "socket": str(tmp_path / "relayd.sock"),
            "http": "127.0.0.1:0",
        },
        "providers": {"main": prov},
        "endpoints": {
            name: {
                "url": f"http://127.0.0.1:{port}/hook/{name}",
                "retry_initial": "50ms",
                "retry_max": "200ms",
                "timeout": "2s",
            }
            for name, port in endpoints.items()
        },
    }


ENV = {"XOSUM_KEY": API_KEY, "XOSUM_SECRET": WEBHOOK_SECRET}


def make_config(data: dict[str, Any], tmp_path: Path) -> Config:
    return parse_config(data, base_dir=tmp_path, env=ENV)


@contextlib.asynccontextmanager
async def running(config: Config, **kwargs: Any) -> AsyncIterator[Daemon]:
    """The real daemon in this event loop; stopped (gracefully) on exit."""
    daemon = Daemon(config, drain_seconds=2.0, **kwargs)
    stop = asyncio.Event()
    task = asyncio.create_task(daemon.serve(stop.wait))
    ready = asyncio.create_task(daemon.ready.wait())
    done, _ = await asyncio.wait({task, ready}, timeout=30, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        ready.cancel()
        task.result()  # raises what broke the start
    if not done:  # a hang becomes a failure that says where, not a stuck CI run
        ready.cancel()
        task.cancel()
        raise AssertionError("the daemon did not get ready within 30 s")
    try:
        yield daemon
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)


async def api(
    daemon: Daemon, method: str, path: str, body: Any = None, raw: bytes | None = None
) -> tuple[int, Any]:
    """Call the daemon's API over its unix socket."""
    socket = daemon.config.settings.socket
    assert socket is not None
    if raw is None and body is not None:
        raw = json.dumps(body).encode()
    data = io.BytesIO(raw) if raw is not None else None
    connector = aiohttp.UnixConnector(path=str(socket))
    async with (
        aiohttp.ClientSession(connector=connector, timeout=API_TIMEOUT) as session,
        session.request(method, "http://relayd" + path, data=data) as resp,
    ):
        text = await resp.text()
        try:
            answer = json.loads(text)
        except ValueError:
            answer = text
    openapi.check(method, path, resp.status, answer, resp.content_type)
    return resp.status, answer


async def eventually(
    predicate: Callable[[], bool],
    timeout: float = 10.0,  # noqa: ASYNC109 - a test helper's deadline, not a cancel scope
    what: str = "condition",
) -> None:
    """Wait (in small steps) until predicate() holds; fail with `what` after `timeout`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)


def sqlite_of(daemon: Daemon) -> SqliteStore:
    """The daemon's store as the SQLite file it is, for tests that break the database."""
    assert isinstance(daemon.store, SqliteStore)
    return daemon.store


async def on_writer(daemon: Daemon, sql: str) -> list[Any]:
    """Run `sql` on the connection the daemon writes with, in its writer thread (a pragma
    there, such as query_only, is what breaks the daemon's writes)."""
    store = sqlite_of(daemon)
    return await store.run(lambda: store._conn.execute(sql).fetchall())


def states(daemon: Daemon) -> dict[str, int]:
    return totals(daemon.store.job_counts())


def settled(daemon: Daemon, total: int) -> bool:
    """Every one of `total` jobs is in a final state."""
    counts = states(daemon)
    busy = counts.get(JobState.POLLING, 0) + counts.get(JobState.DELIVERING, 0)
    return sum(counts.values()) >= total and busy == 0
