"""The store's side of retention, on a real SQLite file and a real PostgreSQL database
(tests.stores.backend): which jobs a pass deletes and what goes with them, bounded histories, run
times that outlive their jobs; then SQLite's migration of them and its giving space back."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from relayd.models import (
    HISTORY_FIRST,
    HISTORY_LATEST,
    AttemptOutcome,
    JobState,
    PollOutcome,
    Pruned,
    Submission,
)
from relayd.store import Store
from relayd.store.sqlite import SqliteStore
from relayd.store.sqlite_schema import SCHEMA
from tests.db import integrity_check
from tests.stores import Backend
from tests.test_store import T0, add, attempt, finish

ENDED_AT = T0 + 10  # finish() ends a job at T0 + 10


@pytest.fixture
def store(backend: Backend) -> Iterator[Store]:
    """The test's store: SQLite, then PostgreSQL."""
    s = backend.open()
    yield s
    s.close()


def ended(store: Store, doc_id: str, state: JobState) -> int:
    """A job that ended in `state` at ENDED_AT, with a poll, and deliveries where it has any."""
    job_id = add(store, doc_id)
    if state == JobState.DELIVERED:
        finish(store, job_id, endpoints=("app",))
        [d] = store.deliveries_for(job_id)
        assert attempt(store, d.id, "delivered", now=ENDED_AT)
    elif state == JobState.DEAD:
        finish(store, job_id, endpoints=("app",))
        [d] = store.deliveries_for(job_id)
        assert attempt(store, d.id, "retry", now=ENDED_AT - 1, next_attempt_at=ENDED_AT)
        assert attempt(store, d.id, "dead", now=ENDED_AT)
    elif state == JobState.FAILED:
        finish(store, job_id, endpoints=(), status="failed")
    elif state == JobState.CANCELLED:
        assert store.cancel(job_id, now=ENDED_AT)
    else:
        assert store.end_job(job_id, state, now=ENDED_AT, detail="ended")
    job = store.job_by_id(job_id)
    assert job is not None and job.state == state and job.updated_at == ENDED_AT
    return job_id


@pytest.mark.parametrize(
    "state",
    [JobState.DELIVERED, JobState.FAILED, JobState.EXPIRED, JobState.UNKNOWN, JobState.CANCELLED],
)
def test_an_ended_job_goes_at_its_retention_and_not_before(
    store: Store, backend: Backend, state: JobState
) -> None:
    """Every ended state: kept while it ended at or after the cutoff, deleted once before."""
    job_id = ended(store, "d1", state)
    assert store.prune(ended_before=ENDED_AT, dead_before=None, limit=100) == Pruned()
    assert store.job_by_id(job_id) is not None
    pruned = store.prune(ended_before=ENDED_AT + 0.001, dead_before=None, limit=100)
    assert pruned.jobs == 1
    assert store.job_by_id(job_id) is None
    assert store.get_job("xosum", "d1") is None
    assert [backend.rows(table) for table in ("polls", "deliveries", "attempts")] == [0, 0, 0]
    # and the id is free again: a new submission of it is a new job
    [(again, created)] = store.add_jobs([Submission("d1", "xosum")], source="api", now=T0 + 99)
    assert created and again.state == JobState.POLLING and again.polls == 0


def test_a_pass_deletes_what_goes_with_the_job_and_says_how_much(
    store: Store, backend: Backend
) -> None:
    """Polls, deliveries and attempts go with their job, and the counts say so."""
    job_id = ended(store, "d1", JobState.DELIVERED)  # poll, finish poll; 1 delivery, 1 attempt
    assert store.record_attempt is not None
    polls = len(store.polls_for(job_id))
    pruned = store.prune(ended_before=ENDED_AT + 1, dead_before=None, limit=100)
    assert pruned == Pruned(jobs=1, polls=polls, deliveries=1, attempts=1)
    assert backend.integrity() == "ok"


def test_a_dead_job_waits_for_dead_retention(store: Store) -> None:
    """`retention` leaves a dead job alone; `dead_retention` deletes it once its time is up."""
    job_id = ended(store, "d1", JobState.DEAD)
    assert store.prune(ended_before=ENDED_AT + 100, dead_before=None, limit=100) == Pruned()
    assert store.prune(ended_before=None, dead_before=ENDED_AT, limit=100) == Pruned()
    assert store.prune(ended_before=None, dead_before=ENDED_AT + 1, limit=100).jobs == 1
    assert store.job_by_id(job_id) is None


def test_a_redelivery_starts_the_clock_again(store: Store) -> None:
    """A dead job redelivered (and dead again later) counts from its new end."""
    job_id = ended(store, "d1", JobState.DEAD)
    assert store.redeliver(now=ENDED_AT + 50, job_id=job_id) == 1
    assert store.prune(ended_before=None, dead_before=ENDED_AT + 1, limit=100) == Pruned()
    [d] = store.deliveries_for(job_id)
    assert attempt(store, d.id, "dead", now=ENDED_AT + 60)
    assert store.prune(ended_before=None, dead_before=ENDED_AT + 59, limit=100) == Pruned()
    assert store.prune(ended_before=None, dead_before=ENDED_AT + 61, limit=100).jobs == 1


def test_a_live_job_is_never_pruned_whatever_its_age(store: Store) -> None:
    """Polling and delivering jobs stay, however old, whatever the cutoffs."""
    polling = add(store, "polling")
    delivering = add(store, "delivering")
    finish(store, delivering, endpoints=("app",))
    far = T0 + 10**9
    assert store.prune(ended_before=far, dead_before=far, limit=100) == Pruned()
    assert store.job_by_id(polling) is not None and store.job_by_id(delivering) is not None


def test_none_keeps_forever_and_limit_bounds_a_batch(store: Store) -> None:
    """A cutoff of None keeps those jobs; `limit` jobs at most go per call."""
    for i in range(5):
        ended(store, f"d{i}", JobState.EXPIRED)
    assert store.prune(ended_before=None, dead_before=None, limit=100) == Pruned()
    assert store.prune(ended_before=ENDED_AT + 1, dead_before=None, limit=2).jobs == 2
    assert store.prune(ended_before=ENDED_AT + 1, dead_before=None, limit=2).jobs == 2
    assert store.prune(ended_before=ENDED_AT + 1, dead_before=None, limit=2).jobs == 1
    assert store.prune(ended_before=ENDED_AT + 1, dead_before=None, limit=2).jobs == 0


def test_a_long_lived_jobs_polls_keep_the_first_and_the_latest(
    store: Store, backend: Backend
) -> None:
    """A job polled 1,000 times keeps its first 5 polls and its latest 50, and counts the rest."""
    job_id = add(store)
    for n in range(1000):
        store.record_poll(
            job_id,
            now=T0 + n,
            http_status=200,
            outcome=PollOutcome.PENDING,
            detail=f"poll {n}",
            next_poll_at=T0 + n + 1,
            errors=0,
            not_found=0,
        )
    kept = [p["detail"] for p in store.polls_for(job_id)]
    first, latest = range(HISTORY_FIRST), range(1000 - HISTORY_LATEST, 1000)
    assert kept == [f"poll {n}" for n in (*first, *latest)]
    job = store.job_by_id(job_id)
    assert job is not None and job.polls == 1000
    assert job.polls_dropped == 1000 - HISTORY_FIRST - HISTORY_LATEST
    assert backend.rows("polls") == HISTORY_FIRST + HISTORY_LATEST


def test_a_deliverys_attempts_keep_the_first_and_the_latest(store: Store) -> None:
    """Retries and replays without end keep a bounded history, its gap counted."""
    job_id = add(store)
    finish(store, job_id, endpoints=("app",))
    [d] = store.deliveries_for(job_id)
    for n in range(70):
        assert attempt(store, d.id, "retry", now=T0 + 20 + n, next_attempt_at=T0 + 1000)
    assert store.redeliver(now=T0 + 200, job_id=job_id) == 1
    [d] = store.deliveries_for(job_id)
    history = store.attempts_for(d.id)
    assert len(history) == HISTORY_FIRST + HISTORY_LATEST
    assert [a["at"] for a in history[:HISTORY_FIRST]] == [T0 + 20 + n for n in range(5)]
    assert history[-1]["outcome"] == AttemptOutcome.REPLAY
    assert d.attempts_dropped == 71 - HISTORY_FIRST - HISTORY_LATEST


def test_run_times_outlive_the_jobs_they_came_from(store: Store, backend: Backend) -> None:
    """What the cadence learned stays when its jobs are pruned, and across a reopen."""
    for i in range(3):
        job_id = add(store, f"d{i}")
        store.finish_job(
            job_id,
            now=ENDED_AT,
            result_status="transcribed",
            result={},
            deliveries=[],
            http_status=200,
            detail=None,
            ran_for=4.0 + i,
            media_kind="phone_call",
            media_seconds=60.0,
        )
    assert store.prune(ended_before=ENDED_AT + 1, dead_before=None, limit=100).jobs == 3
    learned = [("xosum", "phone_call", 60.0, 4.0 + i) for i in range(3)]
    assert store.run_times() == learned
    store.close()
    again = backend.open()
    try:
        assert again.run_times() == learned
        assert again.trim_run_times(keep=2) == 1
        assert again.run_times() == learned[1:]
    finally:
        again.close()


def test_version_4_databases_keep_their_run_times(tmp_path: Path) -> None:
    """The migration to version 5 copies the run times the jobs carried into their own table."""
    path = tmp_path / "relayd.db"
    raw = sqlite3.connect(path, isolation_level=None)
    for number, script in enumerate(SCHEMA[:4], start=1):
        raw.executescript(script)
        raw.execute(f"PRAGMA user_version = {number}")
    raw.execute(
        "INSERT INTO jobs (provider, doc_id, state, source, submitted_at, next_poll_at,"
        " updated_at, finished_at, ran_for, media_kind, media_seconds)"
        " VALUES ('xosum', 'old', 'delivered', 'api', 1, 1, 5, 5, 3.5, 'single_voice', 30)"
    )
    raw.close()
    store = SqliteStore(path)
    try:
        assert store.run_times() == [("xosum", "single_voice", 30.0, 3.5)]
        job = store.get_job("xosum", "old")
        assert job is not None and job.polls_dropped == 0
        assert integrity_check(path) == "ok"
    finally:
        store.close()


def test_a_new_database_gives_free_space_back_in_steps(sqlite_store: SqliteStore) -> None:
    """A database relayd creates is INCREMENTAL: pruned pages go back to the file system."""
    store = sqlite_store
    assert store.incremental()
    for i in range(200):
        job_id = add(store, f"d{i}")
        store.finish_job(
            job_id,
            now=ENDED_AT,
            result_status="transcribed",
            result={"transcription": "x" * 20_000},
            deliveries=[],
            http_status=200,
            detail=None,
        )
    store.checkpoint()
    full, _ = store.disk_usage()
    while store.prune(ended_before=ENDED_AT + 1, dead_before=None, limit=64).jobs:
        pass
    free, page = store.free_pages()
    assert free * page > full // 2  # the transcripts' pages are free, the file as big as before
    store.give_back(free)
    store.checkpoint()
    emptied, wal = store.disk_usage()
    assert store.free_pages()[0] == 0
    assert emptied < full // 4 and wal == 0
    assert integrity_check(store.path) == "ok"
