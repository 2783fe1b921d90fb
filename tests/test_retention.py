"""Retention through the real daemon and a real SQLite file, in compressed time: every ended state
goes at its retention and not before, dead ones at dead_retention, a redelivery starts the clock
again, live jobs stay, a reload applies new values, and a pass never holds the loop up. The
pure rules (cutoffs, pass gaps, batch sizes) first."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import pytest
import tomli_w

from relayd import retention
from relayd.config import Config, Settings
from relayd.daemon import Daemon
from relayd.metrics import Metrics
from relayd.mock import provider as mock_provider
from relayd.mock import receiver as mock_receiver
from relayd.mock.net import free_port
from relayd.models import Pruned
from relayd.retention import (
    BATCH_TARGET,
    FIRST_BATCH,
    MAX_BATCH,
    MAX_HOLD,
    MAX_PASS_GAP,
    MIN_BATCH,
    MIN_PASS_GAP,
    cutoffs,
    hold_target,
    next_batch,
    pass_gap,
)
from relayd.store import SqliteStore, Store
from relayd.store.sqlite_file import WAL_LIMIT
from relayd.views import totals
from tests.conftest import ENV, api, config_dict, eventually, make_config, running
from tests.db import integrity_check
from tests.fakes import FakeClock

RETENTION, DEAD_RETENTION = 0.6, 1.5


# -- the rules ------------------------------------------------------------------------------------


def test_cutoffs_and_zero_for_forever() -> None:
    assert cutoffs(100.0, 10.0, 30.0) == (90.0, 70.0)
    assert cutoffs(100.0, 0.0, 30.0) == (None, 70.0)
    assert cutoffs(100.0, 10.0, 0.0) == (90.0, None)


def test_passes_come_every_tenth_of_the_shortest_retention_within_bounds() -> None:
    """A job outlives its retention by a tenth of it at most (or a minute)."""
    assert pass_gap(7 * 86400, 30 * 86400) == MAX_PASS_GAP
    assert pass_gap(2.0, 30.0) == 0.2
    assert pass_gap(0.0, 3.0) == pytest.approx(0.3)
    assert pass_gap(0.1, 0.1) == MIN_PASS_GAP
    assert pass_gap(0.0, 0.0) == MAX_PASS_GAP  # only the run times are trimmed


def test_batches_grow_while_quick_and_shrink_when_slow() -> None:
    """Doubling under half the target, halving over it, within [MIN_BATCH, MAX_BATCH]."""
    assert next_batch(64, BATCH_TARGET / 4) == 128
    assert next_batch(64, BATCH_TARGET * 0.75) == 64
    assert next_batch(64, BATCH_TARGET * 3) == 32
    assert next_batch(MAX_BATCH, 0.0) == MAX_BATCH
    assert next_batch(MIN_BATCH, 1.0) == MIN_BATCH
    assert next_batch(64, 0.02, target=0.03) == 64  # a busy writer's target
    assert next_batch(64, 0.01, target=0.03) == 128


def test_a_batch_may_hold_a_busy_writer_as_long_as_it_waited_for_it() -> None:
    assert hold_target(0.0) == BATCH_TARGET  # an idle writer
    assert hold_target(0.03) == 0.03  # half of a busy one
    assert hold_target(10.0) == MAX_HOLD


class QueuedStore:
    """A store whose writes wait `wait` seconds in a queue before they run (a busy writer
    thread), then prune a batch in `per_batch` + `per_job` a job; time is the fake
    `perf_counter` both advance."""

    def __init__(
        self, jobs: int, *, wait: float = 1.0, per_batch: float = BATCH_TARGET / 10,
        per_job: float = 0.0,
    ) -> None:  # fmt: skip
        self.left = jobs
        self.now = 0.0
        self.asked: list[int] = []
        self.wait, self.per_batch, self.per_job = wait, per_batch, per_job
        self.held = 0.0  # seconds the batches held the writer, in all

    def perf_counter(self) -> float:
        return self.now

    async def run(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        self.now += self.wait  # behind the writes queued before it
        return fn(*args, **kwargs)

    def prune(self, *, ended_before: float | None, dead_before: float | None, limit: int) -> Pruned:
        self.asked.append(limit)
        taken, self.left = min(limit, self.left), self.left - min(limit, self.left)
        took = self.per_batch + self.per_job * taken
        self.now += took
        self.held += took
        return Pruned(jobs=taken)

    def trim_run_times(self, keep: int) -> int:
        return 0


async def one_pass(store: QueuedStore, monkeypatch: pytest.MonkeyPatch) -> Pruned:
    """One pruning pass over `store`, on its fake time."""
    fake_time = types.SimpleNamespace(perf_counter=store.perf_counter)
    monkeypatch.setattr("relayd.retention.time", fake_time)
    settings = types.SimpleNamespace(retention=1.0, dead_retention=1.0)
    pruner = retention.Pruner(
        store=cast(Store, store),
        settings=lambda: cast(Settings, settings),
        clock=FakeClock(),
        metrics=Metrics(),
    )
    return await pruner.prune()


async def test_a_batch_is_sized_by_its_own_time_not_its_wait_behind_other_writes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Under load a batch waits behind the polls' and deliveries' commits; sized by that wait
    batches fell to one job while the jobs to prune piled up. Quick batches grow, however long
    they waited."""
    store = QueuedStore(jobs=10_000)
    removed = await one_pass(store, monkeypatch)
    assert removed.jobs == 10_000
    assert store.asked[:3] == [FIRST_BATCH, FIRST_BATCH * 2, FIRST_BATCH * 4]
    assert len(store.asked) < 15


async def test_behind_a_busy_writer_pruning_takes_a_third_to_a_half_of_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each batch waits 30 ms behind the polls' and deliveries' commits and deleting a job
    takes 1 ms (a slow disk). Batches held to 5 ms would get 5 jobs every 35 ms, 140 jobs/s,
    and fell behind the soak's 250 jobs/s that ended; a batch may hold the writer about as
    long as it waited: sizes settle where a batch holds it between half and all of its wait,
    so pruning gets a third to a half of the writer, and no batch holds it past MAX_HOLD."""
    store = QueuedStore(jobs=5_000, wait=0.030, per_batch=0.0, per_job=0.001)
    removed = await one_pass(store, monkeypatch)
    assert removed.jobs == 5_000
    assert store.held / store.now > 1 / 3  # of the writer's time, the waits included
    assert removed.jobs / store.now > 300  # jobs a second (held to 5 ms: 140)
    assert max(store.asked[1:]) * store.per_job <= MAX_HOLD  # the first is a guess


# -- through the daemon ---------------------------------------------------------------------------


def retention_config(
    tmp_path: Path, provider_port: int, ok: int, broken: int, **relayd: Any
) -> Config:
    """`main` (jobs expire after 1 s) and `long` (they do not), one key; endpoint `app` hears
    transcript_ready, `broken` answers 500 and gives up after one attempt."""
    data = config_dict(tmp_path, provider_port, {"app": ok, "broken": broken}, max_job_age="1s")
    data["providers"]["main"]["endpoints"] = ["app"]
    data["providers"]["long"] = {**data["providers"]["main"], "max_job_age": "1h"}
    data["endpoints"]["broken"]["max_attempts"] = 1
    data["relayd"] |= {"retention": f"{RETENTION * 1000:.0f}ms"} | relayd
    data["relayd"].setdefault("dead_retention", f"{DEAD_RETENTION * 1000:.0f}ms")
    return make_config(data, tmp_path)


@dataclasses.dataclass
class Watch:
    """When each job ended (its `updated_at` in a final state) and when it was gone."""

    daemon: Daemon
    jobs: dict[str, tuple[str, str]]  # name -> (provider, docId)
    ended: dict[str, tuple[str, float]] = dataclasses.field(default_factory=dict)
    gone: dict[str, float] = dataclasses.field(default_factory=dict)

    def look(self) -> None:
        now = self.daemon.clock.time()
        for name, (provider, doc_id) in self.jobs.items():
            job = self.daemon.store.get_job(provider, doc_id)
            if job is None:
                self.gone.setdefault(name, now)
            elif job.state not in ("polling", "delivering"):
                self.ended[name] = (str(job.state), job.updated_at)

    async def until(self, names: set[str], timeout: float = 10.0) -> None:  # noqa: ASYNC109
        async def watching() -> None:
            while not names <= set(self.gone):
                self.look()
                await asyncio.sleep(0.01)

        await asyncio.wait_for(watching(), timeout)


@pytest.fixture
async def broken() -> Any:
    recv, runner, _ = await mock_receiver.serve(default_status=500)
    yield recv
    await runner.cleanup()


async def test_every_ended_state_goes_at_its_retention_and_not_before(
    tmp_path: Path,
    provider: mock_provider.MockProvider,
    receiver: mock_receiver.Receiver,
    broken: mock_receiver.Receiver,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """delivered, failed, expired, unknown and cancelled go `retention` after they ended, dead
    goes `dead_retention` after; the API then answers 404. A polling job older than both stays."""
    provider.add_job("done-1", ready_after=0.1)
    provider.add_job("dead-1", ready_after=0.1)
    provider.add_job("slow-1", ready_after=3600)
    provider.add_job("live-1", ready_after=3600)
    provider.add_job("cancel-1", ready_after=3600)
    config = retention_config(tmp_path, provider.port, receiver.port, broken.port)
    submissions: list[dict[str, Any]] = [
        {"docId": "done-1", "provider": "main"},
        {"docId": "fail-1", "provider": "main"},  # the mock fails it; `app` hears no failures
        {"docId": "slow-1", "provider": "main"},  # expires at 1 s
        {"docId": "missing-1", "provider": "main"},  # 404 three times: unknown
        {"docId": "cancel-1", "provider": "long"},
        {"docId": "dead-1", "provider": "main", "endpoints": ["broken"]},
        {"docId": "live-1", "provider": "long"},
    ]
    with caplog.at_level(logging.INFO, logger="relayd.retention"):
        async with running(config) as daemon:
            assert (await api(daemon, "POST", "/v1/jobs", submissions))[0] == 202
            assert (await api(daemon, "DELETE", "/v1/jobs/long/cancel-1"))[0] == 200
            watch = Watch(daemon, {s["docId"]: (s["provider"], s["docId"]) for s in submissions})
            mortal = {"done-1", "fail-1", "slow-1", "missing-1", "cancel-1", "dead-1"}
            await watch.until(mortal)
            live = daemon.store.get_job("long", "live-1")
            code, _ = await api(daemon, "GET", "/v1/jobs/main/done-1")
            _, status = await api(daemon, "GET", "/v1/status")
            metrics = daemon.metrics.render().decode()
    states = {name: state for name, (state, _) in watch.ended.items()}
    assert states == {
        "done-1": "delivered",
        "fail-1": "failed",
        "slow-1": "expired",
        "missing-1": "unknown",
        "cancel-1": "cancelled",
        "dead-1": "dead",
    }
    for name in mortal:
        state, ended_at = watch.ended[name]
        kept = watch.gone[name] - ended_at
        limit = DEAD_RETENTION if state == "dead" else RETENTION
        assert limit <= kept < limit + 1.0, (name, state, kept)
    assert live is not None and live.state == "polling"  # older than both, still polled
    assert code == 404
    removed = status["store"]["retention"]["removed"]
    assert removed["jobs"] == 6 and removed["deliveries"] == 2 and removed["polls"] >= 6
    assert status["store"]["bytes"] > 0
    assert 'relayd_pruned_total{what="jobs"} 6.0' in metrics
    assert "relayd_store_bytes " in metrics
    lines = [r.getMessage() for r in caplog.records if r.name == "relayd.retention"]
    assert lines and all(line.startswith("retention removed ") for line in lines)
    assert sum(int(line.split()[2]) for line in lines) == 6  # one line per pass that removed


async def test_a_redelivery_starts_the_dead_clock_again(
    tmp_path: Path,
    provider: mock_provider.MockProvider,
    receiver: mock_receiver.Receiver,
    broken: mock_receiver.Receiver,
) -> None:
    """A dead job redelivered (and dead again) is kept dead_retention from its new death."""
    provider.add_job("dead-1", ready_after=0.1)
    config = retention_config(tmp_path, provider.port, receiver.port, broken.port)
    async with running(config) as daemon:
        job = {"docId": "dead-1", "provider": "main", "endpoints": ["broken"]}
        await api(daemon, "POST", "/v1/jobs", job)
        watch = Watch(daemon, {"dead-1": ("main", "dead-1")})

        def dead() -> bool:
            watch.look()
            return "dead-1" in watch.ended

        await eventually(dead, what="the delivery dead")
        _, first_death = watch.ended.pop("dead-1")
        await asyncio.sleep(DEAD_RETENTION / 2)
        assert (await api(daemon, "POST", "/v1/jobs/main/dead-1/redeliver"))[0] == 202
        await eventually(dead, what="dead again")
        _, second_death = watch.ended["dead-1"]
        await watch.until({"dead-1"})
    assert second_death > first_death + DEAD_RETENTION / 2
    assert watch.gone["dead-1"] - second_death >= DEAD_RETENTION


async def test_a_reload_applies_new_retention(
    tmp_path: Path,
    provider: mock_provider.MockProvider,
    receiver: mock_receiver.Receiver,
    broken: mock_receiver.Receiver,
) -> None:
    """retention "0" keeps an ended job; SIGHUP's reload to 300 ms lets it go."""
    provider.add_job("done-1", ready_after=0.05)
    config = retention_config(tmp_path, provider.port, receiver.port, broken.port, retention="0")
    async with running(config) as daemon:
        await api(daemon, "POST", "/v1/jobs", {"docId": "done-1", "provider": "main"})
        watch = Watch(daemon, {"done-1": ("main", "done-1")})

        def delivered() -> bool:
            watch.look()
            return "done-1" in watch.ended

        await eventually(delivered, what="delivered")
        await asyncio.sleep(RETENTION * 2)
        assert daemon.store.get_job("main", "done-1") is not None  # "0": kept
        settings = dataclasses.replace(daemon.config.settings, retention=0.3)
        daemon.reload(dataclasses.replace(daemon.config, settings=settings))
        await watch.until({"done-1"}, timeout=MAX_PASS_GAP + 5)


# -- kill -9 in the middle of a pass --------------------------------------------------------------

OLD, KEPT_ENDED, KEPT_DEAD, LIVE = 30_000, 100, 50, 100


def fill(path: Path, now: float) -> None:
    """A database with OLD jobs long past retention (each with 2 polls, a delivery of 2 KB and
    an attempt), and the jobs that must stay: ended within retention, dead within
    dead_retention, and live ones submitted long ago."""
    SqliteStore(path).close()  # the schema, as relayd makes it
    old, day = now - 7200, 86400.0
    jobs = [(f"old-{i}", "delivered", old) for i in range(OLD)]
    jobs += [(f"ended-{i}", "delivered", now) for i in range(KEPT_ENDED)]
    jobs += [(f"dead-{i}", "dead", old) for i in range(KEPT_DEAD)]
    jobs += [(f"live-{i}", "polling", old) for i in range(LIVE)]
    payload = json.dumps({"transcription": "x" * 2000})
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("BEGIN")
    db.executemany(
        "INSERT INTO jobs (id, provider, doc_id, state, source, submitted_at, next_poll_at,"
        " updated_at, polls) VALUES (?, 'main', ?, ?, 'api', ?, ?, ?, 2)",
        [(i, doc, state, old, now + day, at) for i, (doc, state, at) in enumerate(jobs, 1)],
    )
    db.executemany(
        "INSERT INTO polls (job_id, at, http_status, outcome) VALUES (?, ?, 200, 'pending')",
        [(i, old) for i in range(1, len(jobs) + 1) for _ in range(2)],
    )
    ended = [(i, state) for i, (_, state, _) in enumerate(jobs, 1) if state != "polling"]
    db.executemany(
        "INSERT INTO deliveries (id, job_id, endpoint, event, webhook_id, payload, state,"
        " attempts, next_attempt_at, created_at) VALUES (?, ?, 'app', 'transcript_ready', ?, ?,"
        " ?, 1, 0, 0)",
        [(i, i, f"msg_{i}", payload, state) for i, state in ended],
    )
    db.executemany(
        "INSERT INTO attempts (delivery_id, at, status, duration, outcome)"
        " VALUES (?, 0, 200, 0.01, 'delivered')",
        [(i,) for i, _ in ended],
    )
    db.execute("COMMIT")
    db.close()


def count(path: Path, where: str = "") -> int:
    db = sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro", uri=True)
    try:
        return int(db.execute(f"SELECT COUNT(*) FROM jobs {where}").fetchone()[0])
    finally:
        db.close()


async def test_kill_9_in_the_middle_of_a_pass_loses_nothing_that_should_stay(
    tmp_path: Path,
) -> None:
    """relayd killed while it deletes 30,000 jobs past their retention: the file is intact,
    every job that should stay is there with its history, and the next run finishes the job."""
    data = config_dict(tmp_path, free_port(), {"app": free_port()})  # nothing answers: no POSTs
    data["relayd"] |= {"retention": "1h", "dead_retention": "1d"}
    config_path = tmp_path / "relayd.toml"
    config_path.write_text(tomli_w.dumps(data))
    db = tmp_path / "state" / "relayd.db"
    fill(db, time.time())
    total = count(db)
    stay = {
        "ended": "WHERE doc_id LIKE 'ended-%'",
        "dead": "WHERE doc_id LIKE 'dead-%'",
        "live": "WHERE doc_id LIKE 'live-%'",
    }
    env = {**os.environ, **ENV}
    cmd = [sys.executable, "-m", "relayd", "run", "-c", str(config_path)]
    proc = await asyncio.create_subprocess_exec(*cmd, env=env, stderr=subprocess.DEVNULL)
    try:
        await eventually(lambda: count(db) < total, timeout=30, what="the pass under way")
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
        left = count(db, "WHERE doc_id LIKE 'old-%'")
        assert 0 < left < OLD, "killed outside the pass: nothing shown"
        assert integrity_check(db) == "ok"
        assert {k: count(db, w) for k, w in stay.items()} == {
            "ended": KEPT_ENDED,
            "dead": KEPT_DEAD,
            "live": LIVE,
        }
        raw = sqlite3.connect(db)
        orphans = raw.execute(
            "SELECT (SELECT COUNT(*) FROM polls WHERE job_id NOT IN (SELECT id FROM jobs)),"
            " (SELECT COUNT(*) FROM deliveries WHERE job_id NOT IN (SELECT id FROM jobs)),"
            " (SELECT COUNT(*) FROM attempts WHERE delivery_id NOT IN (SELECT id FROM deliveries))"
        ).fetchone()
        kept_history = raw.execute(
            "SELECT COUNT(*) FROM polls JOIN jobs ON jobs.id = polls.job_id"
            " WHERE doc_id NOT LIKE 'old-%'"
        ).fetchone()[0]
        raw.close()
        assert orphans == (0, 0, 0)  # each batch went whole, or not at all
        assert kept_history >= 2 * (KEPT_ENDED + KEPT_DEAD + LIVE)
        proc = await asyncio.create_subprocess_exec(*cmd, env=env, stderr=subprocess.DEVNULL)
        await eventually(lambda: count(db, "WHERE doc_id LIKE 'old-%'") == 0, timeout=30)
        assert count(db) == KEPT_ENDED + KEPT_DEAD + LIVE
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            await asyncio.wait_for(proc.wait(), 15)


# -- a steady stream levels off -------------------------------------------------------------------

TRANSCRIPT = "Բարև " * 4444  # 40 KB of UTF-8 (an Armenian letter takes two bytes)
RATE, SECONDS, STREAM_RETENTION = 120, 6.0, 0.5  # jobs/s submitted, for how long, kept


async def test_under_a_steady_stream_the_database_levels_off(
    tmp_path: Path, receiver: mock_receiver.Receiver
) -> None:
    """Jobs with 40 KB transcripts, submitted at a steady rate and kept 0.5 s: the file stops
    growing once retention cycles, at a size set by the jobs alive (about a tenth of those
    relayed), not by how many were relayed, and its WAL stays under WAL_LIMIT (and what 50 ms
    adds). On a busy machine more jobs are alive at once (each waits longer for its turn), so
    the size is judged against the most jobs the database held at once, and every job must be
    gone in the end."""
    mock, runner, port = await mock_provider.serve(window=0.25, limit=500, ready_after=0.0)
    try:
        data = config_dict(tmp_path, port, {"app": receiver.port}, rate_limit=500)
        data["relayd"] |= {"retention": f"{STREAM_RETENTION * 1000:.0f}ms"}
        sizes: list[tuple[float, int, int]] = []  # (when, file bytes, most jobs held so far)
        wal = 0  # the largest the WAL was
        most = 0
        async with running(make_config(data, tmp_path)) as daemon:
            loop = asyncio.get_running_loop()
            start = loop.time()
            submitted = 0
            while (elapsed := loop.time() - start) < SECONDS:
                due = int(elapsed * RATE) - submitted
                batch = [f"s-{submitted + i}" for i in range(due)]
                for doc in batch:
                    mock.add_job(doc, ready_after=0.0, transcription=TRANSCRIPT)
                if batch:
                    assert (await api(daemon, "POST", "/v1/jobs", [{"docId": d} for d in batch]))[
                        0
                    ] == 202
                    submitted += len(batch)
                most = max(most, sum(totals(daemon.store.job_counts()).values()))
                file_bytes, wal_bytes = daemon.store.disk_usage()
                sizes.append((elapsed, file_bytes, most))
                wal = max(wal, wal_bytes)
                await asyncio.sleep(0.05)
            await eventually(lambda: len(receiver.accepted) >= submitted * 0.95, timeout=30)
            # and retention catches up: every job goes once its time is up
            await eventually(lambda: not daemon.store.job_counts(), timeout=30, what="all gone")
    finally:
        await runner.cleanup()
    settled = STREAM_RETENTION * 2 + 0.5  # retention has cycled by then
    early, early_most = max((size, n) for at, size, n in sizes if at <= settled)
    late, late_most = max((size, n) for at, size, n in sizes if at > SECONDS - 1.5)
    assert submitted >= RATE * SECONDS * 0.9
    assert late_most < submitted * 0.8, (late_most, submitted)  # jobs went during the stream
    grew = max(1.0, late_most / early_most)  # more jobs alive at once than early on
    # freed pages are reused: the file follows the jobs alive, not the 57 MB relayed
    assert late <= 1.1 * early * grew, (early, late, early_most, late_most)
    assert wal <= WAL_LIMIT + 2 * 1024 * 1024, wal
