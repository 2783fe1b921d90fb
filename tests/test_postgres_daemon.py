"""relayd on a PostgreSQL store, end to end: the daemon relays jobs kept there and nothing in
SQLite; a second daemon on the same store refuses to start (exit 1, with the reason), as several
relays on one store need the claiming that comes next; the CLI works on the store with the daemon
running or stopped; and the password in the store's URL shows nowhere."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import tomli_w

from relayd.daemon import Daemon
from relayd.errors import StoreError
from relayd.mock import provider as mock_provider
from relayd.mock.receiver import Receiver
from tests.conftest import ENV, api, config_dict, eventually, make_config, running, settled
from tests.pg import PASSWORD, PgCluster

pytest.importorskip("psycopg", reason="psycopg, the postgres extra, is not installed")
from relayd.store.postgres import PostgresStore
from relayd.store.postgres_conn import IN_USE


def pg_config(tmp_path: Path, provider: int, receiver: int, url: str) -> dict[str, Any]:
    data = config_dict(tmp_path, provider, {"app": receiver})
    data["relayd"]["store"] = url
    return data


async def relayd(*args: str) -> tuple[int, str, str]:
    """The `relayd` command as a subprocess, without holding the event loop meanwhile."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "relayd", *args,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, **ENV},
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_the_daemon_relays_through_postgresql_and_never_shows_the_password(
    tmp_path: Path,
    provider: mock_provider.MockProvider,
    receiver: Receiver,
    pg_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Submitted, polled, delivered with every state in PostgreSQL; the API's status, the
    metrics and the logs never carry the URL's password."""
    provider.add_job("pg-1", ready_after=0.2)
    config = make_config(pg_config(tmp_path, provider.port, receiver.port, pg_url), tmp_path)
    with caplog.at_level(logging.DEBUG, logger="relayd"):
        async with running(config) as daemon:
            status, body = await api(daemon, "POST", "/v1/jobs", [{"docId": "pg-1"}])
            assert status == 202, body
            [got] = await receiver.wait_for(1)
            await eventually(lambda: settled(daemon, 1), what="job delivered")
            _, info = await api(daemon, "GET", "/v1/status")
            _, metrics = await api(daemon, "GET", "/metrics")
            _, job = await api(daemon, "GET", "/v1/jobs/main/pg-1")
    assert got.json()["docId"] == "pg-1"
    assert job["job"]["state"] == "delivered" and job["deliveries"][0]["state"] == "delivered"
    assert info["store"]["bytes"] > 0 and info["store"]["wal_bytes"] == 0
    assert "relayd_store_bytes" in metrics
    for shown in (json.dumps(info), metrics, json.dumps(job), caplog.text):
        assert PASSWORD not in shown
    assert not (config.settings.state_dir / "relayd.db").exists()  # nothing went to SQLite


async def test_a_second_daemon_on_one_store_refuses_to_start(
    tmp_path: Path, provider: mock_provider.MockProvider, receiver: Receiver, pg_url: str
) -> None:
    """While one daemon runs on a store, another (its own state, socket and port) refuses to
    start, in the test's loop and as `relayd run` (exit 1, the reason on stderr); once the
    first has stopped, the second starts."""
    first = make_config(pg_config(tmp_path / "a", provider.port, receiver.port, pg_url), tmp_path)
    data = pg_config(tmp_path / "b", provider.port, receiver.port, pg_url)
    second = make_config(data, tmp_path)
    path = tmp_path / "b.toml"
    path.write_text(tomli_w.dumps(data))
    async with running(first):
        with pytest.raises(StoreError, match=IN_USE):
            await Daemon(second).serve(asyncio.Event().wait)
        code, _, err = await relayd("run", "-c", str(path))
        assert code == 1, err
        assert f"relayd: {IN_USE}" in err and PASSWORD not in err
        assert not (tmp_path / "b" / "relayd.sock").exists()  # it stopped before serving
    async with running(second) as daemon:
        assert daemon.ready.is_set()


async def test_the_cli_works_on_the_store_with_the_daemon_running_and_stopped(
    tmp_path: Path, provider: mock_provider.MockProvider, receiver: Receiver, pg_url: str
) -> None:
    """`relayd run` on PostgreSQL serves submit and status; with it stopped, status, jobs,
    redeliver, cancel and vacuum work on the store itself; check-config masks the password and
    no output or log line shows it."""
    provider.add_job("pg-slow", ready_after=3600)
    path = tmp_path / "relayd.toml"
    path.write_text(tomli_w.dumps(pg_config(tmp_path, provider.port, receiver.port, pg_url)))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "relayd", "run", "-c", str(path),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, **ENV},
    )  # fmt: skip
    outputs: list[str] = []
    try:
        await eventually((tmp_path / "relayd.sock").exists, timeout=15, what="the socket")
        code, out, err = await relayd("submit", "-c", str(path), "pg-1", "pg-slow")
        assert code == 0, err
        await receiver.wait_for(1)
        code, out, err = await relayd("status", "-c", str(path))
        assert code == 0 and "running" in out, err
        outputs += [out, err]
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 0, stderr.decode()
    outputs.append(stderr.decode())
    code, out, err = await relayd("status", "-c", str(path))
    assert code == 0 and "NOT RUNNING" in out, err
    outputs += [out, err]
    code, out, err = await relayd("jobs", "-c", str(path), "--json")
    by_id = {j["docId"]: j["state"] for j in json.loads(out)}
    assert by_id == {"pg-1": "delivered", "pg-slow": "polling"}, err
    code, out, err = await relayd("redeliver", "-c", str(path), "pg-1")
    assert code == 0 and "1 delivery(ies)" in out, (out, err)
    code, out, err = await relayd("cancel", "-c", str(path), "pg-slow")
    assert code == 0 and "cancelled" in out, err
    code, out, err = await relayd("vacuum", "-c", str(path))
    assert code == 0 and out.startswith("PostgreSQL tables "), err
    code, out, err = await relayd("check-config", "-c", str(path))
    assert code == 0 and "postgresql://relayd:********@127.0.0.1:" in out, err
    outputs += [out, err]
    for text in outputs:
        assert PASSWORD not in text


async def test_the_cli_on_an_unreachable_store_says_so_without_the_password(
    tmp_path: Path, pg_url: str
) -> None:
    """A store that cannot be reached is a one-line failure (exit 1) naming where it is."""
    closed = pg_url.rsplit("@", 1)[0] + "@127.0.0.1:1/nothing"
    path = tmp_path / "relayd.toml"
    path.write_text(tomli_w.dumps(pg_config(tmp_path, 1, 1, closed)))
    code, out, err = await relayd("jobs", "-c", str(path))
    assert code == 1 and "cannot connect to PostgreSQL at relayd@127.0.0.1:1/nothing" in err
    assert PASSWORD not in out + err


async def test_the_daemon_rides_out_a_postgresql_outage(
    tmp_path: Path,
    provider: mock_provider.MockProvider,
    receiver: Receiver,
    pg_url: str,
    pg_cluster: PgCluster,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The server stops under a running daemon: it stays up, says it is not ready, answers 503
    to submissions (nothing acknowledged that is not stored); the server comes back and the
    daemon goes on by itself; stopped again, the daemon still shuts down cleanly."""
    caplog.set_level(logging.INFO, logger="relayd")
    config = make_config(pg_config(tmp_path, provider.port, receiver.port, pg_url), tmp_path)
    try:
        async with running(config) as daemon:
            assert isinstance(daemon.store, PostgresStore)
            daemon.store._link.reconnect_pause = 0.2
            pg_cluster.stop()
            status, body = await api(daemon, "POST", "/v1/jobs", [{"docId": "out-1"}])
            assert status == 503 and PASSWORD not in json.dumps(body), body
            status, body = await api(daemon, "GET", "/readyz")
            assert status == 503 and "the database refuses writes" in json.dumps(body)
            assert (await api(daemon, "GET", "/healthz"))[0] == 200
            pg_cluster.start()
            provider.add_job("out-1", ready_after=0.2)
            for _ in range(100):
                status, body = await api(daemon, "POST", "/v1/jobs", [{"docId": "out-1"}])
                if status == 202:
                    break
                await asyncio.sleep(0.1)
            assert status == 202, body
            [got] = await receiver.wait_for(1)
            assert got.json()["docId"] == "out-1"
            pg_cluster.stop()  # and the daemon stops without it
    finally:
        pg_cluster.start()  # for the tests after this one
    assert "shutting down: cannot count what is left" in caplog.text
    assert "relayd stopped" in caplog.text and PASSWORD not in caplog.text
