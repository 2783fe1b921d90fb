"""The SQLite store: jobs, their polls, deliveries and delivery attempts in one database file
(`state_dir/relayd.db`). With the other stores, the only code that knows SQL.

Every state change is one transaction, committed before anything is acknowledged.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Sequence
from typing import Any

from relayd.models import (
    EVENTS_PROVIDER,
    FINAL_JOB_STATES,
    HISTORY_KEPT,
    JOB_JSON_BYTES,
    AttemptOutcome,
    Delivery,
    DeliveryState,
    Job,
    JobState,
    NewDelivery,
    PollOutcome,
    Submission,
    webhook_id,
)
from relayd.store.rows import (
    DELIVERY_COLUMNS,
    DELIVERY_FROM,
    JOB_COLUMNS,
    delivery_row,
    job_row,
    trim_attempts,
    trim_polls,
)
from relayd.store.sqlite_file import SqliteFile, writes


class SqliteStore(SqliteFile):
    """The `Store` in one SQLite file (`SqliteFile`: WAL mode, its schema, checkpoints)."""

    shared = False  # one relay's own

    # -- intake ---------------------------------------------------------------------------------

    @writes
    def add_jobs(
        self, subs: Sequence[Submission], *, source: str, now: float
    ) -> list[tuple[Job, bool]]:
        """Store every submission in one transaction; a known (provider, docId) is left as is."""
        out: list[tuple[Job, bool]] = []
        with self._write() as db:
            for sub in subs:
                rows = db.execute(
                    "INSERT INTO jobs (provider, doc_id, state, metadata, endpoints, source,"
                    " submitted_at, next_poll_at, updated_at) VALUES (?,?,?,?,?,?,?,?,?)"
                    f" ON CONFLICT (provider, doc_id) DO NOTHING RETURNING {JOB_COLUMNS}",
                    (
                        sub.provider,
                        sub.doc_id,
                        JobState.POLLING,
                        json.dumps(dict(sub.metadata)) if sub.metadata is not None else None,
                        json.dumps(list(sub.endpoints)) if sub.endpoints is not None else None,
                        source,
                        now,
                        now,
                        now,
                    ),
                ).fetchall()  # one row if it was inserted, none if it was known
                if rows:
                    out.append((job_row(rows[0]), True))
                    continue
                row = db.execute(
                    f"SELECT {JOB_COLUMNS} FROM jobs WHERE provider=? AND doc_id=?",
                    (sub.provider, sub.doc_id),
                ).fetchone()
                out.append((job_row(row), False))
        return out

    @writes
    def add_event(self, doc_id: str, deliveries: Sequence[NewDelivery], *, now: float) -> bool:
        event = deliveries[0].event
        with self._write() as db:
            row = db.execute(
                "INSERT INTO jobs (provider, doc_id, state, source, submitted_at, next_poll_at,"
                " updated_at, result_status, last_status, result, finished_at)"
                " VALUES (?,?,?,?,?,?,?,?,?,?,?) ON CONFLICT (provider, doc_id) DO NOTHING"
                " RETURNING id",
                (EVENTS_PROVIDER, doc_id, JobState.DELIVERING, EVENTS_PROVIDER, now, now, now,
                 event, event, deliveries[0].payload, now),
            ).fetchone()  # fmt: skip
            if row is None:
                return False
            db.executemany(
                "INSERT INTO deliveries (job_id, endpoint, event, webhook_id, payload, state,"
                " next_attempt_at, created_at) VALUES (?,?,?,?,?,?,?,?)",
                [
                    (row[0], d.endpoint, d.event, webhook_id(EVENTS_PROVIDER, doc_id, d.event),
                     d.payload, DeliveryState.PENDING, now, now)
                    for d in deliveries
                ],
            )  # fmt: skip
        return True

    # -- reading --------------------------------------------------------------------------------

    def get_job(self, provider: str, doc_id: str) -> Job | None:
        row = self._conn.execute(
            f"SELECT {JOB_COLUMNS} FROM jobs WHERE provider=? AND doc_id=?", (provider, doc_id)
        ).fetchone()
        return job_row(row) if row else None

    def find_jobs(self, doc_id: str) -> list[Job]:
        rows = self._conn.execute(f"SELECT {JOB_COLUMNS} FROM jobs WHERE doc_id=?", (doc_id,))
        return [job_row(r) for r in rows]

    def job_by_id(self, job_id: int) -> Job | None:
        row = self._conn.execute(f"SELECT {JOB_COLUMNS} FROM jobs WHERE id=?", (job_id,)).fetchone()
        return job_row(row) if row else None

    def list_jobs(
        self, *, state: str | None = None, provider: str | None = None, limit: int = 100
    ) -> list[Job]:
        return self.list_jobs_within(state=state, provider=provider, limit=limit)[0]

    def list_jobs_within(
        self,
        *,
        state: str | None = None,
        provider: str | None = None,
        limit: int = 100,
        max_bytes: int | None = None,
    ) -> tuple[list[Job], bool]:
        """The newest jobs first; with max_bytes, only as many (at least one) as fit in about
        that many bytes of JSON, metadata counted (a job's may be up to 1 MiB). The flag says
        that jobs were left out for size."""
        where, args = [], []
        if state:
            where.append("state=?")
            args.append(state)
        if provider:
            where.append("provider=?")
            args.append(provider)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        rows = self._conn.execute(
            f"SELECT {JOB_COLUMNS} FROM jobs {clause} ORDER BY id DESC LIMIT ?", (*args, limit)
        )
        jobs: list[Job] = []
        size = 0
        for row in rows:  # one at a time: a cut-off list never holds more rows than it returns
            size += JOB_JSON_BYTES + len(row[2]) + len(row[4] or "") + len(row[5] or "")
            if max_bytes is not None and jobs and size > max_bytes:
                rows.close()
                return jobs, True
            jobs.append(job_row(row))
        return jobs, False

    def jobs_page(
        self,
        *,
        state: str | None = None,
        provider: str | None = None,
        q: str | None = None,
        before: int | None = None,
        limit: int = 50,
    ) -> list[Job]:
        """One page of jobs, newest first, for a list too long to load whole: those older than
        job `before` (an id from the previous page); `q` is a docId or the start of one."""
        where, args = [], []
        for clause, value in (("state=?", state), ("provider=?", provider), ("id<?", before)):
            if value is not None and value != "":
                where.append(clause)
                args.append(value)
        if q:
            where.append("doc_id>=? AND doc_id<?")
            args += [q, q + "\U0010ffff"]
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        rows = self._conn.execute(
            f"SELECT {JOB_COLUMNS} FROM jobs {clause} ORDER BY id DESC LIMIT ?", (*args, limit)
        )
        return [job_row(r) for r in rows]

    def polling_jobs(self) -> list[tuple[int, str, float]]:
        """(id, provider, next_poll_at) of every job still being polled, for the scheduler."""
        rows = self._conn.execute(
            "SELECT id, provider, next_poll_at FROM jobs WHERE state=?", (JobState.POLLING,)
        )
        return [(r[0], r[1], r[2]) for r in rows]

    def run_times(self, limit: int = 4096) -> list[tuple[str, str | None, float | None, float]]:
        """(provider, media kind, media seconds, run seconds) of the latest finished jobs that
        can teach how long jobs take, oldest first."""
        rows = self._conn.execute(
            "SELECT provider, media_kind, media_seconds, ran_for FROM run_times"
            " ORDER BY id DESC LIMIT ?",
            (limit,),
        ).fetchall()
        return [(r[0], r[1], r[2], r[3]) for r in reversed(rows)]

    def polls_for(self, job_id: int, limit: int = HISTORY_KEPT) -> list[dict[str, Any]]:
        """The polls kept (the first and the latest; `Job.polls_dropped` between them)."""
        rows = self._conn.execute(
            "SELECT at, http_status, outcome, detail FROM polls WHERE job_id=?"
            " ORDER BY id DESC LIMIT ?",
            (job_id, limit),
        ).fetchall()
        keys = ("at", "http_status", "outcome", "detail")
        return [dict(zip(keys, r, strict=True)) for r in reversed(rows)]

    def deliveries_for(self, job_id: int) -> list[Delivery]:
        rows = self._conn.execute(
            f"SELECT {DELIVERY_COLUMNS} FROM {DELIVERY_FROM} WHERE d.job_id=? ORDER BY d.id",
            (job_id,),
        )
        return [delivery_row(r) for r in rows]

    def attempts_for(self, delivery_id: int, limit: int = HISTORY_KEPT) -> list[dict[str, Any]]:
        """The attempts kept, oldest first: the first and the latest (redeliveries add
        attempts without end; `Delivery.attempts_dropped` counts those left out)."""
        rows = self._conn.execute(
            "SELECT at, status, error, duration, outcome FROM attempts WHERE delivery_id=?"
            " ORDER BY id DESC LIMIT ?",
            (delivery_id, limit),
        ).fetchall()
        keys = ("at", "status", "error", "duration", "outcome")
        return [dict(zip(keys, r, strict=True)) for r in reversed(rows)]

    def job_counts(self) -> dict[str, dict[str, int]]:
        """provider -> state -> count."""
        out: dict[str, dict[str, int]] = {}
        for provider, state, n in self._conn.execute(
            "SELECT provider, state, n FROM job_counts WHERE n > 0"
        ):
            out.setdefault(provider, {})[state] = n
        return out

    def oldest_polling(self) -> dict[str, float]:
        """provider -> submitted_at of its oldest job still being polled."""
        rows = self._conn.execute(
            "SELECT provider, MIN(submitted_at) FROM jobs WHERE state=? GROUP BY provider",
            (JobState.POLLING,),
        )
        return {r[0]: r[1] for r in rows}

    def dead_deliveries(
        self, *, endpoint: str | None = None, since: float | None = None, limit: int = 100
    ) -> tuple[list[Delivery], int]:
        """Dead deliveries, the latest to die first (up to `limit`), and how many there are in
        all, filtered as `redeliver` filters (endpoint, created at or after `since`)."""
        where = ["d.state=?"]
        args: list[Any] = [DeliveryState.DEAD]
        if endpoint:
            where.append("d.endpoint=?")
            args.append(endpoint)
        if since is not None:
            where.append("d.created_at>=?")
            args.append(since)
        clause = " AND ".join(where)
        total = self._conn.execute(f"SELECT COUNT(*) FROM {DELIVERY_FROM} WHERE {clause}", args)
        rows = self._conn.execute(
            f"SELECT {DELIVERY_COLUMNS} FROM {DELIVERY_FROM} WHERE {clause}"
            " ORDER BY j.updated_at DESC, d.id DESC LIMIT ?",
            (*args, limit),
        )
        return [delivery_row(r) for r in rows], int(total.fetchone()[0])

    def delivery_counts(self) -> dict[str, dict[str, int]]:
        """endpoint -> delivery state -> count."""
        out: dict[str, dict[str, int]] = {}
        for endpoint, state, n in self._conn.execute(
            "SELECT endpoint, state, n FROM delivery_counts WHERE n > 0"
        ):
            out.setdefault(endpoint, {})[state] = n
        return out

    # -- budgets across restarts ------------------------------------------------------------------

    @writes
    def save_budgets(self, budgets: dict[str, dict[str, Any]], *, now: float) -> None:
        """At a clean stop: each key's spent slots and 429 block, as JSON (wall-clock times)."""
        with self._write() as db:
            db.execute("DELETE FROM budgets")
            db.executemany(
                "INSERT INTO budgets (key, state, saved_at) VALUES (?,?,?)",
                [(key, json.dumps(state), now) for key, state in budgets.items()],
            )

    @writes
    def take_budgets(self) -> dict[str, dict[str, Any]]:
        """Read and forget the saved budgets, so a later crash is not mistaken for a clean stop."""
        with self._write() as db:
            rows = db.execute("SELECT key, state FROM budgets").fetchall()
            db.execute("DELETE FROM budgets")
        return {key: json.loads(state) for key, state in rows}

    def recently_active(self, providers: Sequence[str], since: float) -> bool:
        """Did these providers' jobs see a poll since `since`, or is any still being polled?"""
        marks = ",".join("?" * len(providers))
        row = self._conn.execute(
            f"SELECT 1 FROM jobs WHERE provider IN ({marks}) AND (state=? OR updated_at>=?)"
            " LIMIT 1",
            (*providers, JobState.POLLING, since),
        ).fetchone()
        return row is not None

    # -- polling --------------------------------------------------------------------------------

    @writes
    def record_poll(
        self,
        job_id: int,
        *,
        now: float,
        http_status: int | None,
        outcome: PollOutcome,
        detail: str | None,
        next_poll_at: float,
        errors: int,
        not_found: int,
        last_status: str | None = None,
        etag: str | None = None,
    ) -> bool:
        """A poll that did not finish the job. False if the job is no longer being polled.

        Not synced: a poll acknowledges nothing, and one lost to a power cut is polled again.
        """
        with self._write(synced=False) as db:
            cur = db.execute(
                "UPDATE jobs SET polls=polls+1, next_poll_at=?, errors=?, not_found=?,"
                " last_status=COALESCE(?, last_status), etag=COALESCE(?, etag), updated_at=?"
                " WHERE id=? AND state=?",
                (next_poll_at, errors, not_found, last_status, etag, now, job_id, JobState.POLLING),
            )
            if cur.rowcount == 0:
                return False
            self._poll_row(db, job_id, now, http_status, outcome, detail)
        return True

    @writes
    def finish_job(
        self,
        job_id: int,
        *,
        now: float,
        result_status: str,
        result: dict[str, Any],
        deliveries: Iterable[NewDelivery],
        http_status: int | None,
        detail: str | None,
        succeeded: bool = True,
        ran_for: float | None = None,
        media_kind: str | None = None,
        media_seconds: float | None = None,
    ) -> bool:
        """The provider reported a terminal status: store it and the deliveries it calls for.
        With none, the job ends `delivered`, or `failed` if it did not succeed.

        `ran_for` (seconds from submission to done) and the media it was for are kept for
        learning how long jobs take; None when the job should not teach (it failed).

        Not synced: nobody is told of it, and it survives kill -9; a power cut can only undo
        it, and the job is then polled again and finishes again (the provider keeps the
        result). Waiting for the disk here held the event loop up to 116 ms in the soak."""
        with self._write(synced=False) as db:
            job = db.execute(
                "SELECT provider, doc_id FROM jobs WHERE id=? AND state=?",
                (job_id, JobState.POLLING),
            ).fetchone()
            if job is None:
                return False
            count = 0
            for new in deliveries:
                db.execute(
                    "INSERT INTO deliveries (job_id, endpoint, event, webhook_id, payload, state,"
                    " next_attempt_at, created_at) VALUES (?,?,?,?,?,?,?,?)",
                    (
                        job_id,
                        new.endpoint,
                        new.event,
                        webhook_id(job[0], job[1], new.event),
                        new.payload,
                        DeliveryState.PENDING,
                        now,
                        now,
                    ),
                )
                count += 1
            if count:
                state = JobState.DELIVERING
            else:
                state = JobState.DELIVERED if succeeded else JobState.FAILED
            db.execute(
                "UPDATE jobs SET state=?, polls=polls+1, result_status=?, last_status=?,"
                " result=?, finished_at=?, updated_at=? WHERE id=?",
                (
                    state,
                    result_status,
                    result_status,
                    json.dumps(result, ensure_ascii=False),
                    now,
                    now,
                    job_id,
                ),
            )
            if ran_for is not None:  # kept apart: it outlives the job (retention)
                db.execute(
                    "INSERT INTO run_times (provider, media_kind, media_seconds, ran_for)"
                    " VALUES (?,?,?,?)",
                    (job[0], media_kind, media_seconds, ran_for),
                )
            self._poll_row(db, job_id, now, http_status, PollOutcome.FINISHED, detail)
        return True

    @writes
    def end_job(self, job_id: int, state: JobState, *, now: float, detail: str) -> bool:
        """Stop polling a job (expired, unknown, cancelled). False if it was not being polled."""
        with self._write() as db:
            cur = db.execute(
                "UPDATE jobs SET state=?, updated_at=? WHERE id=? AND state=?",
                (state, now, job_id, JobState.POLLING),
            )
            if cur.rowcount == 0:
                return False
            self._poll_row(db, job_id, now, None, PollOutcome(state), detail)
        return True

    @writes
    def expire_jobs(self, provider: str, submitted_before: float, now: float) -> list[Job]:
        rows = self._conn.execute(
            f"SELECT {JOB_COLUMNS} FROM jobs WHERE provider=? AND state=? AND submitted_at<?",
            (provider, JobState.POLLING, submitted_before),
        ).fetchall()
        expired = [job_row(r) for r in rows]
        for job in expired:
            self.end_job(job.id, JobState.EXPIRED, now=now, detail="max_job_age passed")
        return expired

    @writes
    def cancel(self, job_id: int, *, now: float) -> bool:
        """Stop polling, and stop delivering anything not yet delivered."""
        with self._write() as db:
            row = db.execute("SELECT state FROM jobs WHERE id=?", (job_id,)).fetchone()
            if row is None or row[0] in FINAL_JOB_STATES:
                return False
            db.execute(
                "UPDATE deliveries SET state=? WHERE job_id=? AND state=?",
                (DeliveryState.CANCELLED, job_id, DeliveryState.PENDING),
            )
            db.execute(
                "UPDATE jobs SET state=?, updated_at=? WHERE id=?",
                (JobState.CANCELLED, now, job_id),
            )
            self._poll_row(db, job_id, now, None, PollOutcome.CANCELLED, "cancelled by operator")
        return True

    @staticmethod
    def _poll_row(
        db: sqlite3.Connection,
        job_id: int,
        now: float,
        http_status: int | None,
        outcome: PollOutcome,
        detail: str | None,
    ) -> None:
        db.execute(
            "INSERT INTO polls (job_id, at, http_status, outcome, detail) VALUES (?,?,?,?,?)",
            (job_id, now, http_status, outcome, detail),
        )
        trim_polls(db, "?", job_id)

    # -- delivery -------------------------------------------------------------------------------

    def due_deliveries(self, endpoint: str, now: float, limit: int) -> list[Delivery]:
        rows = self._conn.execute(
            f"SELECT {DELIVERY_COLUMNS} FROM {DELIVERY_FROM} WHERE d.endpoint=? AND d.state=?"
            " AND d.next_attempt_at<=? ORDER BY d.next_attempt_at, d.id LIMIT ?",
            (endpoint, DeliveryState.PENDING, now, limit),
        )
        return [delivery_row(r) for r in rows]

    def next_delivery_at(self, endpoint: str, after: float) -> float | None:
        """The earliest pending delivery due later than `after` (those due now are in hand)."""
        row = self._conn.execute(
            "SELECT MIN(next_attempt_at) FROM deliveries WHERE endpoint=? AND state=?"
            " AND next_attempt_at>?",
            (endpoint, DeliveryState.PENDING, after),
        ).fetchone()
        return float(row[0]) if row and row[0] is not None else None

    @writes
    def record_attempt(
        self,
        delivery_id: int,
        *,
        now: float,
        duration: float,
        status: int | None,
        error: str | None,
        outcome: AttemptOutcome,
        next_attempt_at: float | None = None,
        spend: bool = True,
    ) -> bool:
        """One POST and what came of it: delivered, retry, deferred or dead.

        Not synced, as `finish_job`: it survives kill -9, and what a power cut undoes is sent
        again with the same webhook-id (at least once, as SPEC §6 allows)."""
        state = {
            AttemptOutcome.DELIVERED: DeliveryState.DELIVERED,
            AttemptOutcome.DEAD: DeliveryState.DEAD,
        }.get(outcome, DeliveryState.PENDING)
        with self._write(synced=False) as db:
            row = db.execute(
                "SELECT job_id, state FROM deliveries WHERE id=?", (delivery_id,)
            ).fetchone()
            if row is None or row[1] != DeliveryState.PENDING:
                return False  # cancelled meanwhile
            db.execute(
                "INSERT INTO attempts (delivery_id, at, status, error, duration, outcome)"
                " VALUES (?,?,?,?,?,?)",
                (delivery_id, now, status, error, duration, outcome),
            )
            trim_attempts(db, "?", delivery_id)
            db.execute(
                "UPDATE deliveries SET state=?, attempts=attempts+?, last_error=?,"
                " next_attempt_at=COALESCE(?, next_attempt_at), delivered_at=? WHERE id=?",
                (
                    state,
                    1 if spend else 0,
                    error,
                    next_attempt_at,
                    now if state == DeliveryState.DELIVERED else None,
                    delivery_id,
                ),
            )
            if state != DeliveryState.PENDING:
                self._settle_job(db, row[0], now)
        return True

    @staticmethod
    def _settle_job(db: sqlite3.Connection, job_id: int, now: float) -> None:
        rows = db.execute("SELECT state FROM deliveries WHERE job_id=?", (job_id,))
        states = {r[0] for r in rows}
        if DeliveryState.PENDING in states:
            return
        final = JobState.DEAD if DeliveryState.DEAD in states else JobState.DELIVERED
        db.execute(
            "UPDATE jobs SET state=?, updated_at=? WHERE id=? AND state=?",
            (final, now, job_id, JobState.DELIVERING),
        )

    @writes
    def redeliver(
        self,
        *,
        now: float,
        job_id: int | None = None,
        endpoint: str | None = None,
        states: Sequence[str] = (
            DeliveryState.DELIVERED,
            DeliveryState.DEAD,
            DeliveryState.PENDING,
        ),
        since: float | None = None,
    ) -> int:
        """Queue deliveries again with a fresh set of attempts; each replay is recorded in the
        attempt history. Filters combine; returns how many deliveries were queued."""
        where = [f"state IN ({','.join('?' * len(states))})"]
        args: list[Any] = [*states]
        for clause, value in (("job_id=?", job_id), ("endpoint=?", endpoint)):
            if value is not None:
                where.append(clause)
                args.append(value)
        if since is not None:
            where.append("created_at>=?")
            args.append(since)
        with self._write() as db:
            rows = db.execute(
                f"SELECT id, job_id FROM deliveries WHERE {' AND '.join(where)}", args
            ).fetchall()
            db.executemany(
                "UPDATE deliveries SET state=?, attempts=0, next_attempt_at=?, last_error=NULL"
                " WHERE id=?",
                [(DeliveryState.PENDING, now, delivery_id) for delivery_id, _ in rows],
            )
            db.executemany(
                "INSERT INTO attempts (delivery_id, at, status, error, duration, outcome)"
                " VALUES (?,?,NULL,NULL,0,?)",
                [(delivery_id, now, AttemptOutcome.REPLAY) for delivery_id, _ in rows],
            )
            for delivery_id, _ in rows:
                trim_attempts(db, "?", delivery_id)
            db.executemany(
                "UPDATE jobs SET state=?, updated_at=? WHERE id=?",
                [(JobState.DELIVERING, now, owner) for owner in {owner for _, owner in rows}],
            )
        return len(rows)
