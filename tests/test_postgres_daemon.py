"""relayd on a PostgreSQL store, end to end: the daemon relays jobs kept there and nothing in
SQLite; two daemons on one store share its jobs, each delivered once; the CLI works on the store
with the daemon running or stopped; and the password in the store's URL shows nowhere."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
import tomli_w

from relayd.mock import provider as mock_provider
from relayd.mock.receiver import Receiver
from relayd.models import AttemptOutcome, NewDelivery, Submission
from relayd.store import SqliteStore
from relayd.views import job_detail
from tests.conftest import ENV, api, config_dict, eventually, make_config, running, settled
from tests.pg import PASSWORD, PgCluster

pytest.importorskip("psycopg", reason="psycopg, the postgres extra, is not installed")
from relayd.store.postgres import PostgresStore


def pg_config(tmp_path: Path, provider: int, receiver: int, url: str) -> dict[str, Any]:
    """The tests' config on the store at `url`; the budget is the store's, and a key's first
    use waits a window and the provider timeout (the lease), so both are short."""
    data = config_dict(tmp_path, provider, {"app": receiver}, timeout="500ms")
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


async def test_two_daemons_on_one_store_share_the_jobs_and_deliver_each_once(
    tmp_path: Path, receiver: Receiver, pg_url: str
) -> None:
    """Two daemons (each its own state, socket and port) on one store: jobs submitted to one
    of them are claimed by both (LISTEN/NOTIFY wakes the other), each polled by its owner
    only, each delivered once; the store lists both relays; a clean stop hands the stopped
    one's jobs back at once."""
    mock, runner, port = await mock_provider.serve(window=0.25, limit=8, ready_after=0.6)
    try:
        first = make_config(pg_config(tmp_path / "a", port, receiver.port, pg_url), tmp_path)
        second = make_config(pg_config(tmp_path / "b", port, receiver.port, pg_url), tmp_path)
        async with running(first) as a, running(second) as b:
            docs = [{"docId": f"two-{i}"} for i in range(12)]
            status, _ = await api(a, "POST", "/v1/jobs", docs)
            assert status == 202
            owned: tuple[set[int], set[int]] = (set(), set())

            def both_hold_some() -> bool:
                for seen, daemon in zip(owned, (a, b), strict=True):
                    seen |= daemon.poller.owned or set()
                return all(owned)

            await eventually(both_hold_some, what="both relays claimed jobs")
            await receiver.wait_for(12)
            await eventually(lambda: settled(a, 12), what="every job delivered")
            assert not owned[0] & owned[1]
            _, info = await api(b, "GET", "/v1/status")
            relays = info["store"]["relays"]
            assert relays["relay"] == b.store.relay  # type: ignore[attr-defined]
            assert relays["relays"] == 2 and relays["listening"] and relays["error"] is None
            assert {r["name"] for r in relays["seen"]} == {
                a.store.relay,  # type: ignore[attr-defined]
                b.store.relay,  # type: ignore[attr-defined]
            }
        ids = [r.headers["webhook-id"] for r in receiver.accepted]
        assert len(ids) == len(set(ids)) == 12
        assert mock.rejected == 0  # one budget for both, in the store
    finally:
        await runner.cleanup()


async def test_a_stopped_relay_hands_its_jobs_to_the_other_at_once(
    tmp_path: Path, receiver: Receiver, pg_url: str
) -> None:
    """A relay stopped cleanly gives its jobs back and says goodbye: the other relay claims
    them within a moment (not a lease later) and delivers them."""
    _mock, runner, port = await mock_provider.serve(window=0.25, limit=8, ready_after=1.5)
    try:
        first = make_config(pg_config(tmp_path / "a", port, receiver.port, pg_url), tmp_path)
        second = make_config(pg_config(tmp_path / "b", port, receiver.port, pg_url), tmp_path)
        async with running(second) as b:
            async with running(first) as a:
                docs = [{"docId": f"hand-{i}"} for i in range(10)]
                assert (await api(a, "POST", "/v1/jobs", docs))[0] == 202
                await eventually(lambda: bool(a.poller.owned), what="a claimed jobs")
            # a stopped: its jobs are free now, with store_lease 30 s
            await eventually(lambda: len(b.poller.owned or ()) == 10, timeout=5,
                             what="b took every job")  # fmt: skip
            await receiver.wait_for(10)
    finally:
        await runner.cleanup()


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


async def test_migrate_store_copies_a_sqlite_relay_and_the_relay_goes_on_there(
    tmp_path: Path, provider: mock_provider.MockProvider, receiver: Receiver, pg_url: str
) -> None:
    """`relayd migrate-store` with relayd stopped copies every job, poll, delivery, attempt,
    run time and budget (ids kept) into an empty PostgreSQL store; relayd started on it then
    polls the job that was polling and delivers the delivery that was pending. A second run
    refuses (the store holds jobs), and so does a run without `store` set."""
    provider.add_job("was-polling", ready_after=0.0)
    data = pg_config(tmp_path, provider.port, receiver.port, pg_url)
    local = {**data, "relayd": {k: v for k, v in data["relayd"].items() if k != "store"}}
    path, local_path = tmp_path / "relayd.toml", tmp_path / "local.toml"
    path.write_text(tomli_w.dumps(data))
    local_path.write_text(tomli_w.dumps(local))
    sqlite = make_config(local, tmp_path)
    at = time.time()  # not long ago: a job polled once relayd runs must not have expired
    with closing(SqliteStore(sqlite.settings.state_dir / "relayd.db")) as old:
        [(polling, _), (done, _), (pending, _)] = old.add_jobs(
            [Submission(d, "main") for d in ("was-polling", "was-done", "was-pending")],
            source="api",
            now=at,
        )
        for job in (done, pending):
            old.finish_job(
                job.id, now=at + 1, result_status="done", result={"text": job.doc_id},
                deliveries=[NewDelivery("app", "transcript_ready", f'{{"docId": "{job.doc_id}"}}')],
                http_status=200, detail=None, ran_for=1.0,
            )  # fmt: skip
        [delivered] = old.deliveries_for(done.id)
        old.record_attempt(delivered.id, now=at + 2, duration=0.1, status=200, error=None,
                           outcome=AttemptOutcome.DELIVERED)  # fmt: skip
        old.save_budgets({"k": {"used": 1}}, now=at)
        before = {j.doc_id: job_detail(old, "main", j.doc_id) for j in (polling, done, pending)}
    code, out, err = await relayd("migrate-store", "-c", str(local_path))
    assert code == 1 and "store is not set" in err
    code, out, err = await relayd("migrate-store", "-c", str(path))
    assert code == 0, err
    assert "copied 3 job(s) and 2 delivery(ies)" in out and PASSWORD not in out + err
    with closing(PostgresStore(pg_url)) as new:
        for doc, detail in before.items():
            assert job_detail(new, "main", doc) == detail
        assert new.take_budgets() == {"k": {"used": 1}}
        assert len(new.run_times()) == 2
        [(next_id, _)] = new.add_jobs([Submission("new", "main")], source="api", now=at)
        assert next_id.id == pending.id + 1  # the identity moved past what was copied
    code, _, err = await relayd("migrate-store", "-c", str(path))
    assert code == 1 and "already holds 4 job(s)" in err
    async with running(make_config(data, tmp_path)):
        got = await receiver.wait_for(2)
    assert sorted(r.json()["docId"] for r in got) == ["was-pending", "was-polling"]


async def test_a_relay_that_joins_gets_a_share_of_the_jobs(
    tmp_path: Path, receiver: Receiver, pg_url: str
) -> None:
    """One relay holds all ten jobs; a second joins: at the first's next heartbeat it gives
    back what is over its share, and the newcomer claims it."""
    mock, runner, port = await mock_provider.serve(window=0.25, limit=8, ready_after=3600)
    try:
        data = [pg_config(tmp_path / n, port, receiver.port, pg_url) for n in ("a", "b")]
        for d in data:
            d["relayd"]["store_lease"] = "600ms"  # a heartbeat every 200 ms
        first, second = (make_config(d, tmp_path) for d in data)
        async with running(first) as a:
            await api(a, "POST", "/v1/jobs", [{"docId": f"share-{i}"} for i in range(10)])
            await eventually(lambda: len(a.poller.owned or ()) == 10, what="a holds all")
            async with running(second) as b:

                def shared() -> bool:
                    mine, theirs = a.poller.owned or set(), b.poller.owned or set()
                    return len(theirs) >= 4 and len(mine) <= 6 and not mine & theirs

                await eventually(shared, what="the jobs shared out")
        assert mock.rejected == 0
    finally:
        await runner.cleanup()
