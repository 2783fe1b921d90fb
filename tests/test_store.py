"""The store, on a real SQLite file and on a real PostgreSQL database (tests.stores.backend):
state transitions, stable webhook ids, durability; then what only SQLite has (its file, pragmas,
migrations from its older versions)."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

from relayd.errors import StoreError
from relayd.models import (
    AttemptOutcome,
    DeliveryState,
    JobState,
    NewDelivery,
    PollOutcome,
    Submission,
    webhook_id,
)
from relayd.store import Store
from relayd.store.sqlite import SqliteStore
from relayd.store.sqlite_schema import SCHEMA
from tests.db import integrity_check
from tests.stores import Backend

T0 = 1_700_000_000.0


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "relayd.db"


@pytest.fixture
def store(backend: Backend) -> Iterator[Store]:
    """The test's store: SQLite, then PostgreSQL."""
    s = backend.open()
    yield s
    s.close()


def add(
    store: Store,
    doc_id: str = "doc-1",
    provider: str = "xosum",
    metadata: dict[str, Any] | None = None,
    endpoints: tuple[str, ...] | None = None,
) -> int:
    subs = [Submission(doc_id, provider, metadata, endpoints)]
    job, created = store.add_jobs(subs, source="api", now=T0)[0]
    assert created
    return job.id


def finish(
    store: Store,
    job_id: int,
    endpoints: tuple[str, ...] = ("app", "audit"),
    status: str = "done",
) -> bool:
    return store.finish_job(
        job_id,
        now=T0 + 10,
        result_status=status,
        result={"status": status, "text": "hello"},
        deliveries=[NewDelivery(e, "transcript_ready", json.dumps({"e": e})) for e in endpoints],
        http_status=200,
        detail=None,
        succeeded=status != "failed",
    )


def attempt(
    store: Store,
    delivery_id: int,
    outcome: str,
    *,
    now: float = T0 + 20,
    next_attempt_at: float | None = None,
    spend: bool = True,
) -> bool:
    ok = outcome == "delivered"
    return store.record_attempt(
        delivery_id,
        now=now,
        duration=0.05,
        status=200 if ok else 500,
        error=None if ok else "HTTP 500",
        outcome=AttemptOutcome(outcome),
        next_attempt_at=next_attempt_at,
        spend=spend,
    )


def state(store: Store, job_id: int) -> JobState:
    job = store.job_by_id(job_id)
    assert job is not None
    return job.state


# -- schema and files ----------------------------------------------------------------------------


def test_new_file_gets_schema_version_and_wal(sqlite_store: SqliteStore, db_path: Path) -> None:
    """A fresh database is created with its parent dir, stamped with user_version, in WAL mode."""
    with sqlite3.connect(db_path) as raw:
        assert raw.execute("PRAGMA user_version").fetchone()[0] == len(SCHEMA)
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        tables = {r[0] for r in raw.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    raw.close()
    assert {"jobs", "polls", "deliveries", "attempts"} <= tables
    assert integrity_check(sqlite_store.path) == "ok"


def test_reopening_does_not_migrate_again(db_path: Path) -> None:
    """Opening an up-to-date database leaves its schema version and data alone."""
    first = SqliteStore(db_path)
    add(first)
    first.close()
    second = SqliteStore(db_path)
    try:
        assert second._db.execute("PRAGMA user_version").fetchone()[0] == len(SCHEMA)
        assert second.get_job("xosum", "doc-1") is not None
    finally:
        second.close()


def test_reopen_keeps_everything(backend: Backend) -> None:
    """Jobs, polls, deliveries and attempts all survive a close and reopen."""
    s = backend.open()
    job_id = add(s, metadata={"user": 7}, endpoints=("app",))
    s.record_poll(
        job_id,
        now=T0 + 1,
        http_status=200,
        outcome=PollOutcome.PENDING,
        detail=None,
        next_poll_at=T0 + 5,
        errors=0,
        not_found=0,
        last_status="processing",
        etag='"v1"',
    )
    assert finish(s, job_id, ("app",))
    (delivery,) = s.deliveries_for(job_id)
    assert attempt(s, delivery.id, "retry", next_attempt_at=T0 + 30)
    s.close()

    s = backend.open()
    try:
        job = s.job_by_id(job_id)
        assert job is not None
        assert job.state == JobState.DELIVERING
        assert job.metadata == {"user": 7}
        assert job.endpoints == ("app",)
        assert job.etag == '"v1"'
        assert job.polls == 2
        assert backend.job_result(job_id) == {"status": "done", "text": "hello"}
        assert [p["outcome"] for p in s.polls_for(job_id)] == ["pending", "finished"]
        (again,) = s.deliveries_for(job_id)
        assert again.webhook_id == delivery.webhook_id
        assert again.attempts == 1
        assert again.next_attempt_at == T0 + 30
        assert [a["outcome"] for a in s.attempts_for(again.id)] == ["retry"]
        assert backend.integrity() == "ok"
    finally:
        s.close()


def test_migrates_a_version_1_database(db_path: Path) -> None:
    """A database from schema version 1 is upgraded in place, its jobs kept."""
    db_path.parent.mkdir(parents=True)
    raw = sqlite3.connect(db_path)
    raw.executescript(SCHEMA[0])
    raw.execute(
        "INSERT INTO jobs (provider, doc_id, state, source, submitted_at, next_poll_at,"
        " updated_at) VALUES ('xosum', 'old-job', 'polling', 'spool', 1, 1, 1)"
    )
    raw.execute("PRAGMA user_version = 1")
    raw.commit()
    raw.close()
    s = SqliteStore(db_path)
    try:
        assert s._db.execute("PRAGMA user_version").fetchone()[0] == len(SCHEMA)
        job = s.get_job("xosum", "old-job")
        assert job is not None and job.state == JobState.POLLING
        assert s.take_budgets() == {}
        assert s.run_times() == []
        assert integrity_check(s.path) == "ok"
    finally:
        s.close()


def test_run_times_keep_what_finished_jobs_teach(store: Store) -> None:
    """Only jobs finished with a run time teach; the latest are returned, oldest first."""
    for i in range(4):
        job_id = add(store, f"doc-{i}")
        store.finish_job(
            job_id,
            now=T0 + 10 + i,
            result_status="transcribed" if i != 2 else "failed",
            result={},
            deliveries=[],
            http_status=200,
            detail=None,
            ran_for=None if i == 2 else 5.0 + i,
            media_kind="audio" if i else None,
            media_seconds=60.0 if i == 3 else None,
        )
    assert store.run_times() == [
        ("xosum", None, None, 5.0),
        ("xosum", "audio", None, 6.0),
        ("xosum", "audio", 60.0, 8.0),
    ]
    assert store.run_times(limit=1) == [("xosum", "audio", 60.0, 8.0)]


def test_expiry_reads_only_the_providers_old_jobs(db_path: Path) -> None:
    """The per-provider expiry query (every 5 s) is an index range, not a pass over every
    polling job; a database from an older schema gets the index when opened."""
    db_path.parent.mkdir(parents=True)
    raw = sqlite3.connect(db_path)
    raw.executescript(SCHEMA[0])
    raw.execute("PRAGMA user_version = 1")
    raw.commit()
    raw.close()
    s = SqliteStore(db_path)
    try:
        plan = " ".join(
            row[3]
            for row in s._db.execute(
                "EXPLAIN QUERY PLAN SELECT id FROM jobs"
                " WHERE provider=? AND state=? AND submitted_at<?",
                ("xosum", JobState.POLLING, T0),
            )
        )
        assert "(state=? AND provider=? AND submitted_at<?)" in plan
    finally:
        s.close()


def test_budgets_survive_a_clean_restart_once(backend: Backend) -> None:
    """Saved budgets are read back after reopening, then forgotten (a crash must not reuse them)."""
    s = backend.open()
    s.save_budgets({"key-a": {"frees": [T0 + 1.5]}, "key-b": {"frees": []}}, now=T0)
    latest = {"key-a": {"frees": [T0 + 3.0], "blocked_until": T0 + 9.0}}
    s.save_budgets(latest, now=T0 + 1)  # the latest save replaces the last
    s.close()
    s = backend.open()
    try:
        assert s.take_budgets() == latest
        assert s.take_budgets() == {}
    finally:
        s.close()


def test_recently_active(store: Store) -> None:
    """A provider is active if a job is still polled or one changed since `since`."""
    assert not store.recently_active(["xosum"], T0 - 100)
    job_id = add(store)
    assert store.recently_active(["xosum", "aitronos"], T0 + 1000)  # still polling
    assert not store.recently_active(["aitronos"], T0 - 100)
    store.end_job(job_id, JobState.EXPIRED, now=T0 + 10, detail="old")
    assert store.recently_active(["xosum"], T0 + 10)
    assert not store.recently_active(["xosum"], T0 + 11)


def test_readonly_store_reads_but_refuses_writes(store: Store, backend: Backend) -> None:
    """A read-only Store (CLI status) sees the data; any write raises StoreError, not the
    database's own error."""
    job_id = add(store)
    ro = backend.open(readonly=True)
    try:
        assert ro.get_job("xosum", "doc-1") is not None
        with pytest.raises(StoreError) as info:
            ro.add_jobs([Submission("doc-2", "xosum")], source="api", now=T0)
        assert type(info.value) is StoreError
        with pytest.raises(StoreError):
            ro.cancel(job_id, now=T0)
        with pytest.raises(StoreError):
            ro.end_job(job_id, JobState.EXPIRED, now=T0, detail="x")
    finally:
        ro.close()
    assert store.get_job("xosum", "doc-2") is None
    assert state(store, job_id) == JobState.POLLING


def test_readonly_store_of_missing_file_is_a_store_error(tmp_path: Path) -> None:
    """Opening a database that does not exist read-only fails as StoreError, creating nothing."""
    path = tmp_path / "nothing" / "relayd.db"
    with pytest.raises(StoreError, match="cannot open"):
        SqliteStore(path, readonly=True)
    assert not path.exists()


def test_readonly_store_path_with_hash(tmp_path: Path) -> None:
    """A state_dir whose name contains '#' opens the same database read-only."""
    path = tmp_path / "state#1" / "relayd.db"
    s = SqliteStore(path)
    add(s)
    s.close()
    ro = SqliteStore(path, readonly=True)
    try:
        assert ro.get_job("xosum", "doc-1") is not None
    finally:
        ro.close()
        assert not (tmp_path / "state").exists(), "a stray database was created"


@pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() == 0,
    reason="root ignores directory permissions",
)
def test_readonly_directory_is_a_store_error(tmp_path: Path) -> None:
    """A state dir that cannot be written gives StoreError, not a raw sqlite3 error."""
    state_dir = tmp_path / "ro"
    state_dir.mkdir()
    state_dir.chmod(0o500)
    try:
        with pytest.raises(StoreError) as info:
            SqliteStore(state_dir / "relayd.db")
        assert not isinstance(info.value, sqlite3.Error)
    finally:
        state_dir.chmod(0o700)


def test_database_path_that_is_a_directory_is_a_store_error(tmp_path: Path) -> None:
    """A path SQLite cannot open gives StoreError naming the path."""
    path = tmp_path / "relayd.db"
    path.mkdir()
    with pytest.raises(StoreError, match="cannot open"):
        SqliteStore(path)


def test_state_dir_that_cannot_be_created_is_a_store_error(tmp_path: Path) -> None:
    """A state dir that cannot be made (its parent is a file) gives StoreError, not OSError."""
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(StoreError):
        SqliteStore(tmp_path / "file" / "state" / "relayd.db")


# -- intake --------------------------------------------------------------------------------------


def test_add_jobs_is_idempotent(store: Store) -> None:
    """A known (provider, docId) is left as is and reported as not created."""
    first = store.add_jobs(
        [Submission("doc-1", "xosum", {"v": 1}, ("app",))], source="spool", now=T0
    )
    again = store.add_jobs(
        [Submission("doc-1", "xosum", {"v": 2}, None), Submission("doc-2", "xosum")],
        source="api",
        now=T0 + 5,
    )
    (job, created), (same, created_again), (other, created_other) = *first, *again
    assert created and not created_again and created_other
    assert same == job
    assert same.metadata == {"v": 1}
    assert same.endpoints == ("app",)
    assert same.source == "spool"
    assert job.state == JobState.POLLING
    assert job.next_poll_at == T0  # first poll as soon as the budget allows
    assert other.id != job.id


def test_duplicate_in_one_batch_is_created_once(store: Store) -> None:
    """The same id twice in one file gives one job, created the first time only."""
    out = store.add_jobs([Submission("a", "xosum"), Submission("a", "xosum")], source="api", now=T0)
    assert [created for _, created in out] == [True, False]
    assert out[0][0].id == out[1][0].id


def test_same_doc_id_under_two_providers_is_two_jobs(store: Store) -> None:
    """Jobs are keyed by provider and docId together."""
    a = add(store, "doc-1", "xosum")
    b = add(store, "doc-1", "aitronos")
    assert a != b
    assert {j.provider for j in store.find_jobs("doc-1")} == {"xosum", "aitronos"}


# -- polling -------------------------------------------------------------------------------------


def test_record_poll_updates_the_job(store: Store) -> None:
    """A not-yet poll counts, reschedules, and keeps the last status and ETag unless replaced."""
    job_id = add(store)
    assert store.record_poll(
        job_id,
        now=T0 + 1,
        http_status=200,
        outcome=PollOutcome.PENDING,
        detail=None,
        next_poll_at=T0 + 6,
        errors=0,
        not_found=0,
        last_status="processing",
        etag='"e1"',
    )
    assert store.record_poll(
        job_id,
        now=T0 + 6,
        http_status=503,
        outcome=PollOutcome.ERROR,
        detail="HTTP 503",
        next_poll_at=T0 + 20,
        errors=1,
        not_found=0,
    )
    job = store.job_by_id(job_id)
    assert job is not None
    assert (job.polls, job.errors, job.next_poll_at) == (2, 1, T0 + 20)
    assert (job.last_status, job.etag) == ("processing", '"e1"')
    assert job.state == JobState.POLLING
    assert store.polling_jobs() == [(job_id, "xosum", T0 + 20)]
    polls = store.polls_for(job_id)
    assert [(p["http_status"], p["outcome"]) for p in polls] == [(200, "pending"), (503, "error")]


def test_finish_job_creates_pending_deliveries(store: Store, backend: Backend) -> None:
    """A terminal poll stores the result and one pending delivery per endpoint, due at once."""
    job_id = add(store)
    assert finish(store, job_id)
    job = store.job_by_id(job_id)
    assert job is not None
    assert job.state == JobState.DELIVERING
    assert job.result_status == "done"
    assert job.finished_at == T0 + 10
    deliveries = store.deliveries_for(job_id)
    assert [d.endpoint for d in deliveries] == ["app", "audit"]
    assert all(d.state == DeliveryState.PENDING for d in deliveries)
    assert all(d.next_attempt_at == T0 + 10 and d.attempts == 0 for d in deliveries)
    assert backend.pending_endpoints() == {"app", "audit"}
    assert store.next_delivery_at("app", T0) == T0 + 10
    assert store.next_delivery_at("app", T0 + 10) is None  # those due now are in hand
    assert [d.id for d in store.due_deliveries("app", T0 + 10, 10)] == [deliveries[0].id]
    assert store.due_deliveries("app", T0 + 9, 10) == []
    assert store.polling_jobs() == []


def test_finish_job_twice_is_refused(store: Store) -> None:
    """Only a job still being polled can finish; a second finish changes nothing."""
    job_id = add(store)
    assert finish(store, job_id)
    assert not finish(store, job_id, ("app", "audit", "other"))
    assert len(store.deliveries_for(job_id)) == 2


def test_finish_without_deliveries_is_final(store: Store) -> None:
    """No endpoint wants the event: done ends delivered, failed ends failed, at once."""
    done, failed = add(store, "a"), add(store, "b")
    assert finish(store, done, ())
    assert finish(store, failed, (), status="failed")
    assert state(store, done) == JobState.DELIVERED
    assert state(store, failed) == JobState.FAILED


def test_webhook_id_is_stable_per_job_and_event(store: Store) -> None:
    """Every endpoint and retry of one (provider, docId, event) shares one webhook-id."""
    job_id = add(store)
    assert finish(store, job_id)
    ids = {d.webhook_id for d in store.deliveries_for(job_id)}
    assert ids == {webhook_id("xosum", "doc-1", "transcript_ready")}
    (wid,) = ids
    assert wid.startswith("msg_") and len(wid) == 36
    assert webhook_id("xosum", "doc-1", "transcript_ready") == wid
    assert webhook_id("xosum", "doc-1", "transcript_failed") != wid
    assert webhook_id("aitronos", "doc-1", "transcript_ready") != wid
    assert webhook_id("xosum", "doc-2", "transcript_ready") != wid
    # the separator keeps fields apart: ("a", "b.c") and ("a.b", "c") differ
    assert webhook_id("a", "bc", "e") != webhook_id("ab", "c", "e")


def test_what_acknowledges_nothing_commits_unsynced_and_the_rest_stay_synced(
    sqlite_store: SqliteStore,
) -> None:
    """A poll, a finish and a delivery attempt skip the fsync (nobody is told of them; a power
    cut makes relayd poll or send again); intake, cancel and redeliver, which answer someone,
    are committed with synchronous=FULL, even right after an unsynced one or a failed one."""
    job_id = add(sqlite_store)
    other = add(sqlite_store, "doc-2")
    statements: list[str] = []
    sqlite_store._db.set_trace_callback(statements.append)

    def poll(job: int) -> bool:
        return sqlite_store.record_poll(
            job,
            now=T0 + 1,
            http_status=200,
            outcome=PollOutcome.PENDING,
            detail=None,
            next_poll_at=T0 + 6,
            errors=0,
            not_found=0,
        )

    def unsynced(done: bool) -> None:
        assert done
        assert statements[0] == "PRAGMA synchronous=NORMAL"
        assert statements[-2:] == ["COMMIT", "PRAGMA synchronous=FULL"]
        del statements[:]

    def synced(done: object) -> None:
        assert done
        assert not any(s.startswith("PRAGMA") for s in statements), statements
        del statements[:]

    unsynced(poll(job_id))
    assert not poll(job_id + 99)
    assert statements[-1] == "PRAGMA synchronous=FULL"
    del statements[:]
    unsynced(finish(sqlite_store, job_id))
    [d, _] = sqlite_store.deliveries_for(job_id)
    del statements[:]
    unsynced(attempt(sqlite_store, d.id, "delivered"))
    synced(sqlite_store.add_jobs([Submission("doc-3", "xosum")], source="api", now=T0))
    synced(sqlite_store.cancel(other, now=T0 + 2))
    synced(sqlite_store.redeliver(now=T0 + 3, job_id=job_id))
    sqlite_store._db.set_trace_callback(None)
    assert sqlite_store._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


@pytest.mark.parametrize("final", [JobState.EXPIRED, JobState.UNKNOWN, JobState.CANCELLED])
def test_end_job_stops_polling(store: Store, final: JobState) -> None:
    """end_job moves a polled job to its final state once; later polls are refused."""
    job_id = add(store)
    assert store.end_job(job_id, final, now=T0 + 1, detail="why")
    assert state(store, job_id) == final
    assert not store.end_job(job_id, JobState.EXPIRED, now=T0 + 2, detail="again")
    assert not store.record_poll(
        job_id,
        now=T0 + 3,
        http_status=200,
        outcome=PollOutcome.PENDING,
        detail=None,
        next_poll_at=T0 + 4,
        errors=0,
        not_found=0,
    )
    assert not finish(store, job_id)
    assert store.polls_for(job_id)[-1]["outcome"] == str(final)


def test_expire_jobs_takes_only_old_polling_jobs(store: Store) -> None:
    """Jobs submitted before the cutoff and still polled expire; others are untouched."""
    old = add(store, "old")
    store.add_jobs([Submission("new", "xosum")], source="api", now=T0 + 100)
    done = add(store, "done")
    finish(store, done, ())
    other = add(store, "other-provider", "aitronos")
    expired = store.expire_jobs("xosum", T0 + 50, T0 + 200)
    assert [j.id for j in expired] == [old]
    assert state(store, old) == JobState.EXPIRED
    assert state(store, done) == JobState.DELIVERED
    assert state(store, other) == JobState.POLLING
    new = store.get_job("xosum", "new")
    assert new is not None and new.state == JobState.POLLING


# -- delivery ------------------------------------------------------------------------------------


def test_retry_keeps_delivery_pending(store: Store) -> None:
    """A failed attempt counts, records the error and the next due time; the job waits."""
    job_id = add(store)
    finish(store, job_id)
    d = store.deliveries_for(job_id)[0]
    assert attempt(store, d.id, "retry", next_attempt_at=T0 + 60)
    d = store.deliveries_for(job_id)[0]
    assert (d.state, d.attempts, d.last_error, d.next_attempt_at) == (
        DeliveryState.PENDING,
        1,
        "HTTP 500",
        T0 + 60,
    )
    assert state(store, job_id) == JobState.DELIVERING


def test_deferred_attempt_does_not_spend(store: Store) -> None:
    """An attempt not spent (a 429 or 503 with Retry-After) leaves the attempt count alone."""
    job_id = add(store)
    finish(store, job_id)
    d = store.deliveries_for(job_id)[0]
    assert attempt(store, d.id, "deferred", next_attempt_at=T0 + 90, spend=False)
    d = store.deliveries_for(job_id)[0]
    assert (d.state, d.attempts, d.next_attempt_at) == (DeliveryState.PENDING, 0, T0 + 90)
    assert len(store.attempts_for(d.id)) == 1


def test_job_settles_delivered_when_all_deliveries_succeed(store: Store, backend: Backend) -> None:
    """The job is delivered only once its last delivery is."""
    job_id = add(store)
    finish(store, job_id)
    first, second = store.deliveries_for(job_id)
    assert attempt(store, first.id, "delivered")
    assert state(store, job_id) == JobState.DELIVERING
    assert attempt(store, second.id, "delivered", now=T0 + 25)
    assert state(store, job_id) == JobState.DELIVERED
    delivered = store.deliveries_for(job_id)[1]
    assert delivered.state == DeliveryState.DELIVERED
    assert delivered.delivered_at == T0 + 25
    assert backend.pending_endpoints() == set()


def test_job_settles_dead_when_any_delivery_dies(store: Store) -> None:
    """One dead delivery makes the job dead, even if the other was delivered."""
    job_id = add(store)
    finish(store, job_id)
    first, second = store.deliveries_for(job_id)
    assert attempt(store, first.id, "dead")
    assert state(store, job_id) == JobState.DELIVERING
    assert attempt(store, second.id, "delivered")
    assert state(store, job_id) == JobState.DEAD
    assert store.deliveries_for(job_id)[0].state == DeliveryState.DEAD


def test_attempt_on_a_finished_delivery_is_refused(store: Store) -> None:
    """Once delivered, a late attempt result is ignored and not recorded."""
    job_id = add(store)
    finish(store, job_id, ("app",))
    (d,) = store.deliveries_for(job_id)
    assert attempt(store, d.id, "delivered")
    assert not attempt(store, d.id, "retry")
    assert not attempt(store, 9999, "delivered")
    assert [a["outcome"] for a in store.attempts_for(d.id)] == ["delivered"]


def test_cancel_polling_job(store: Store) -> None:
    """Cancelling a polled job stops it; cancelling again is refused."""
    job_id = add(store)
    assert store.cancel(job_id, now=T0 + 1)
    assert state(store, job_id) == JobState.CANCELLED
    assert store.polling_jobs() == []
    assert not store.cancel(job_id, now=T0 + 2)


def test_cancel_delivering_job_cancels_only_pending(store: Store) -> None:
    """Cancel stops undelivered deliveries and keeps delivered ones as they were."""
    job_id = add(store)
    finish(store, job_id)
    first, second = store.deliveries_for(job_id)
    attempt(store, first.id, "delivered")
    assert store.cancel(job_id, now=T0 + 30)
    assert state(store, job_id) == JobState.CANCELLED
    states = [d.state for d in store.deliveries_for(job_id)]
    assert states == [DeliveryState.DELIVERED, DeliveryState.CANCELLED]
    assert not attempt(store, second.id, "delivered")  # an in-flight POST finishing late


@pytest.mark.parametrize("outcome", ["delivered", "dead"])
def test_cancel_final_job_is_refused(store: Store, outcome: str) -> None:
    """A job already in a final state cannot be cancelled."""
    job_id = add(store)
    finish(store, job_id, ("app",))
    (d,) = store.deliveries_for(job_id)
    attempt(store, d.id, outcome)
    before = store.job_by_id(job_id)
    assert not store.cancel(job_id, now=T0 + 99)
    assert store.job_by_id(job_id) == before
    assert not store.cancel(424242, now=T0)


def test_redeliver_dead_job(store: Store) -> None:
    """redeliver resets every finished delivery, same webhook-id, and the job delivers again."""
    job_id = add(store)
    finish(store, job_id)
    first, second = store.deliveries_for(job_id)
    attempt(store, first.id, "dead")
    attempt(store, second.id, "delivered")
    assert state(store, job_id) == JobState.DEAD
    assert store.redeliver(job_id=job_id, now=T0 + 100) == 2
    assert state(store, job_id) == JobState.DELIVERING
    again = store.deliveries_for(job_id)
    assert all(d.state == DeliveryState.PENDING for d in again)
    assert all(d.attempts == 0 and d.next_attempt_at == T0 + 100 for d in again)
    assert all(d.last_error is None for d in again)
    assert [d.webhook_id for d in again] == [first.webhook_id, second.webhook_id]
    for d in again:
        attempt(store, d.id, "delivered", now=T0 + 101)
    assert state(store, job_id) == JobState.DELIVERED


def test_redeliver_job_without_deliveries_does_nothing(store: Store) -> None:
    """A job still polling (or with nothing to send) has nothing to redeliver."""
    job_id = add(store)
    assert store.redeliver(job_id=job_id, now=T0 + 1) == 0
    assert state(store, job_id) == JobState.POLLING


def test_counts_and_listing(store: Store) -> None:
    """Status counts group jobs by provider and state, deliveries by endpoint and state."""
    a, b = add(store, "a"), add(store, "b")
    add(store, "c", "aitronos")
    finish(store, a, ("app",))
    store.end_job(b, JobState.UNKNOWN, now=T0 + 1, detail="404 x3")
    assert store.job_counts() == {
        "xosum": {"delivering": 1, "unknown": 1},
        "aitronos": {"polling": 1},
    }
    assert store.delivery_counts() == {"app": {"pending": 1}}
    assert [j.doc_id for j in store.list_jobs()] == ["c", "b", "a"]
    assert [j.doc_id for j in store.list_jobs(state="unknown")] == ["b"]
    assert [j.doc_id for j in store.list_jobs(provider="aitronos")] == ["c"]
    assert store.oldest_polling() == {"aitronos": T0}


def test_redeliver_by_filter_records_each_replay(store: Store) -> None:
    """Filters (endpoint, state, since) pick deliveries; each replay is an attempt row."""
    old, new = add(store, "old-doc"), add(store, "new-doc")
    for job_id, at in ((old, T0 + 10), (new, T0 + 50)):
        store.finish_job(
            job_id, now=at, result_status="done", result={}, http_status=200, detail=None,
            deliveries=[NewDelivery("app", "ev", "{}"), NewDelivery("audit", "ev", "{}")],
        )  # fmt: skip
        for d in store.deliveries_for(job_id):
            attempt(store, d.id, "dead" if d.endpoint == "app" else "delivered", now=T0 + 60)
    assert store.redeliver(now=T0 + 70, states=("dead",), since=T0 + 40) == 1
    [replayed] = [d for d in store.deliveries_for(new) if d.state == DeliveryState.PENDING]
    assert replayed.endpoint == "app"
    assert [a["outcome"] for a in store.attempts_for(replayed.id)] == ["dead", "replay"]
    assert state(store, old) == JobState.DEAD  # too old for --since
    assert store.redeliver(now=T0 + 80, endpoint="app", states=("dead",)) == 1  # old-doc's
    assert state(store, old) == JobState.DELIVERING
    assert store.redeliver(now=T0 + 90, endpoint="audit", states=("dead",)) == 0


def test_jobs_page_pages_newest_first_filters_and_finds_by_id_start(store: Store) -> None:
    ids = [add(store, f"page-{i:03d}") for i in range(30)]
    add(store, "other-1", provider="aitronos")
    first = store.jobs_page(provider="xosum", limit=10)
    assert [j.doc_id for j in first] == [f"page-{i:03d}" for i in range(29, 19, -1)]
    second = store.jobs_page(provider="xosum", before=first[-1].id, limit=10)
    assert [j.doc_id for j in second] == [f"page-{i:03d}" for i in range(19, 9, -1)]
    assert [j.doc_id for j in store.jobs_page(q="page-01", limit=50)] == [
        f"page-{i:03d}" for i in range(19, 9, -1)
    ]
    assert [j.doc_id for j in store.jobs_page(q="other-1")] == ["other-1"]
    assert store.jobs_page(state="dead") == []
    assert store.jobs_page(before=ids[0]) == []


def test_jobs_page_finds_a_doc_id_start_through_an_index(sqlite_store: SqliteStore) -> None:
    """The console's search by the start of a docId is an index range, not a scan."""
    plan = " ".join(
        str(r[3])
        for r in sqlite_store._db.execute(
            "EXPLAIN QUERY PLAN SELECT id FROM jobs WHERE doc_id>=? AND doc_id<? ORDER BY id DESC",
            ("a", "b"),
        )
    )
    assert "jobs_by_doc" in plan or "USING INDEX" in plan, plan


def test_dead_deliveries_filter_as_redeliver_does_and_count_them_all(store: Store) -> None:
    for i in range(3):
        job_id = add(store, f"dead-{i}")
        finish(store, job_id)
        for d in store.deliveries_for(job_id):
            assert attempt(store, d.id, "dead", now=T0 + 30 + i)
    found, total = store.dead_deliveries(limit=2)
    assert total == 6 and len(found) == 2
    assert {d.doc_id for d in found} == {"dead-2"}  # the latest to die first
    app, total = store.dead_deliveries(endpoint="app")
    assert total == 3 and {d.endpoint for d in app} == {"app"}
    assert store.dead_deliveries(since=T0 + 11)[1] == 0  # created at T0 + 10
    assert store.redeliver(now=T0 + 40, endpoint="app", states=("dead",)) == 3
    assert store.dead_deliveries()[1] == 3


def test_a_writable_store_zeroes_only_what_costs_nothing_and_checkpoints_often(
    sqlite_store: SqliteStore,
) -> None:
    """secure_delete=FAST (Debian compiles SECURE_DELETE in: pruning was ten times slower) and
    a 1 MB auto-checkpoint (a commit that checkpoints holds the event loop)."""
    assert sqlite_store._db.execute("PRAGMA secure_delete").fetchone()[0] == 2
    assert sqlite_store._db.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 250


def group_counts(store: SqliteStore, table: str, by: str) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for name, state, n in store._db.execute(
        f"SELECT {by}, state, COUNT(*) FROM {table} GROUP BY {by}, state"
    ):
        out.setdefault(name, {})[state] = n
    return out


def test_counts_kept_as_rows_change_agree_with_counting_every_row(
    sqlite_store: SqliteStore,
) -> None:
    """job_counts and delivery_counts read counters the database keeps as rows change; after
    submissions, finishes, deliveries, deaths, a cancel, a redelivery and a prune they agree
    with a count of every row."""
    store = sqlite_store
    ids = [add(store, f"c-{i}", provider="xosum" if i % 2 else "aitronos") for i in range(8)]
    for job_id in ids[:6]:
        finish(store, job_id)
    for d in store.deliveries_for(ids[0]) + store.deliveries_for(ids[1]):
        assert attempt(store, d.id, "delivered")
    for d in store.deliveries_for(ids[2]):
        assert attempt(store, d.id, "dead")
    assert store.cancel(ids[7], now=T0 + 30)
    assert store.redeliver(now=T0 + 40, job_id=ids[2]) == 2
    assert store.prune(ended_before=T0 + 100, dead_before=None, limit=10).jobs == 3
    assert store.job_counts() == group_counts(store, "jobs", "provider")
    assert store.delivery_counts() == group_counts(store, "deliveries", "endpoint")
    assert store.job_counts()["xosum"]["delivering"] >= 1


def test_migration_to_version_6_counts_the_rows_already_there(db_path: Path) -> None:
    db_path.parent.mkdir(parents=True)
    raw = sqlite3.connect(db_path, isolation_level=None)
    for number, script in enumerate(SCHEMA[:5], start=1):
        raw.executescript(script)
        raw.execute(f"PRAGMA user_version = {number}")
    raw.executemany(
        "INSERT INTO jobs (provider, doc_id, state, source, submitted_at, next_poll_at,"
        " updated_at) VALUES (?, ?, ?, 'api', 1, 1, 1)",
        [("xosum", "a", "polling"), ("xosum", "b", "polling"), ("aitronos", "c", "dead")],
    )
    raw.close()
    with closing(SqliteStore(db_path)) as store:
        assert store.job_counts() == {"xosum": {"polling": 2}, "aitronos": {"dead": 1}}
        add(store, "d")
        assert store.job_counts()["xosum"] == {"polling": 3}


def test_a_serving_store_checkpoints_in_a_thread_of_its_own_and_stops_it(db_path: Path) -> None:
    """The daemon's store copies the WAL into the database beside the writer; the WAL stays
    small under a stream of 40 KB rows, and closing the store ends the thread."""
    store = SqliteStore(db_path, serving=True)
    try:
        assert [t for t in threading.enumerate() if t.name == "relayd-checkpoint"]
        text = "x" * 40_000
        for i in range(300):
            job_id = add(store, f"w-{i}")
            store.finish_job(
                job_id,
                now=T0 + 10,
                result_status="done",
                result={"text": text},
                deliveries=[NewDelivery("app", "transcript_ready", text)],
                http_status=200,
                detail=None,
            )
        assert db_path.with_name("relayd.db-wal").stat().st_size < 4 * 1024 * 1024
    finally:
        store.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("relayd-")]


async def test_a_serving_store_commits_in_its_writer_thread_while_the_loop_goes_on(
    db_path: Path,
) -> None:
    """`run` makes a serving store's writes in the writer thread: while one is held there, the
    event loop reads (on its own connection, the state before the commit), and once awaited
    the commit is seen. The gate is opened by the loop: a write made on the loop would hold
    it shut."""
    store = SqliteStore(db_path, serving=True)
    try:
        gate = threading.Event()
        threads: list[int] = []

        def held_write() -> list[tuple[Any, bool]]:
            threads.append(threading.get_ident())
            opened = gate.wait(10)
            assert opened, "the event loop was held while the writer worked"
            return store.add_jobs([Submission("late", "xosum")], source="api", now=T0)

        pending = asyncio.ensure_future(store.run(held_write))
        await asyncio.sleep(0)
        assert store.get_job("xosum", "late") is None  # read on the loop meanwhile
        gate.set()
        [(job, created)] = await pending
        assert created and store.get_job("xosum", "late") == job
        assert threads and threads[0] != threading.get_ident()
    finally:
        store.close()


def test_a_serving_store_makes_the_loops_own_writes_in_its_writer_thread(db_path: Path) -> None:
    """A write called outside `run` (the spool's intake, the CLI's nothing) still goes to the
    writer thread and its connection, after what is queued there: two connections never
    contend for SQLite's write lock."""
    store = SqliteStore(db_path, serving=True)
    try:
        on_writer: list[str] = []
        on_loop: list[str] = []
        store._wdb.set_trace_callback(on_writer.append)
        store._db.set_trace_callback(on_loop.append)
        job_id = add(store, "x")
        assert store.cancel(job_id, now=T0 + 1)
        assert any(s.startswith("UPDATE jobs") for s in on_writer)
        assert not [s for s in on_loop if s.split()[0] in ("INSERT", "UPDATE", "BEGIN")]
        assert store.job_by_id(job_id).state == JobState.CANCELLED  # type: ignore[union-attr]
    finally:
        store.close()


async def test_a_serving_store_reads_for_the_polls_in_its_reader_thread(db_path: Path) -> None:
    """`read` runs in the reader thread on its own connection (a read that waits for the disk
    does not hold the loop), and sees what the writer committed."""
    store = SqliteStore(db_path, serving=True)
    try:
        job_id = await store.run(add, store, "r-1")
        gate = threading.Event()
        seen: list[tuple[int, sqlite3.Connection]] = []

        def held_read() -> object:
            seen.append((threading.get_ident(), store._conn))
            assert gate.wait(10), "the event loop was held while the reader worked"
            return store.job_by_id(job_id)

        pending = asyncio.ensure_future(store.read(held_read))
        await asyncio.sleep(0)
        gate.set()
        job = await pending
        assert job is not None and job.doc_id == "r-1"  # type: ignore[attr-defined]
        [(thread, conn)] = seen
        assert thread != threading.get_ident() and conn is store._rdb
        assert conn is not store._db and conn is not store._wdb
    finally:
        store.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("relayd-")]
