"""The SQLite store: jobs, their polls, deliveries and delivery attempts in one database file
(`state_dir/relayd.db`). With the other stores, the only code that knows SQL.

Every state change is one transaction, committed before anything is acknowledged.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from relayd.errors import StoreError
from relayd.models import (
    ENDED_JOB_STATES,
    FINAL_JOB_STATES,
    HISTORY_FIRST,
    HISTORY_KEPT,
    JOB_JSON_BYTES,
    AttemptOutcome,
    Delivery,
    DeliveryState,
    Job,
    JobState,
    NewDelivery,
    PollOutcome,
    Pruned,
    Submission,
    webhook_id,
)
from relayd.store.rows import DELIVERY_COLUMNS, DELIVERY_FROM, JOB_COLUMNS, delivery_row, job_row
from relayd.store.sqlite_schema import INDEXES, SCHEMA

WAL_LIMIT = 16 * 1024 * 1024  # bytes a WAL file is cut back to after a checkpoint
# The commit that takes the WAL past this many pages copies them into the database first, on
# the event loop: 1 MB at a time, not SQLite's 4 MB (with 40 KB rows, the longest commit went
# from 15 ms to 5 ms; benchmarks/README.md, "Soak").
CHECKPOINT_PAGES = 250
ASSIST_EVERY = 0.05  # seconds between the serving store's background checkpoints


class SqliteStore:
    """The `Store` in one SQLite file (WAL mode, synchronous commits for what is acknowledged).

    `serving=True` (the daemon) adds a checkpoint thread. The commit that crosses
    CHECKPOINT_PAGES still checkpoints, as SQLite does, because only a checkpoint made between
    two commits of the writer lets the next one start the WAL over (else it grows without
    bound). But by then the thread has already copied nearly every page and synced the file,
    off the event loop (the sqlite3 module releases the GIL while SQLite works), so the
    commit's part is small. A passive checkpoint never blocks a writer, and a commit whose
    checkpoint finds the thread at it skips its own.
    """

    def __init__(self, path: Path, *, readonly: bool = False, serving: bool = False) -> None:
        self.path = path
        self._assist: threading.Thread | None = None
        self._stop_assist = threading.Event()
        try:
            if readonly:
                uri = path.absolute().as_uri() + "?mode=ro"  # as_uri escapes '#', '?', '%'
                self._db = sqlite3.connect(uri, uri=True, isolation_level=None, timeout=5.0)
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                self._db = sqlite3.connect(path, isolation_level=None, timeout=5.0)
                # A new file gives freed pages back bit by bit (`relayd vacuum`); it must be
                # said before WAL mode and the first table. An older file keeps its mode.
                self._db.execute("PRAGMA auto_vacuum=INCREMENTAL")
                self._db.execute("PRAGMA journal_mode=WAL")
                # after a checkpoint, a WAL that grew (a reader held it back) shrinks to this
                self._db.execute(f"PRAGMA journal_size_limit={WAL_LIMIT}")
                # Deleted rows are zeroed only where that costs no extra writes: zeroing every
                # freed page of a 40 KB transcript made pruning ten times slower (SECURE_DELETE
                # is compiled in on Debian). The bytes stay in free pages until they are reused
                # or `relayd vacuum` gives them back.
                self._db.execute("PRAGMA secure_delete=FAST")
                self._db.execute(f"PRAGMA wal_autocheckpoint={CHECKPOINT_PAGES}")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA foreign_keys=ON")
            # big sorts and temp tables stay in memory: on a read-only root filesystem (a
            # container) there is no writable temp directory, and SQLite would fail with EIO
            self._db.execute("PRAGMA temp_store=MEMORY")
            if not readonly:
                self._migrate()
            if serving and not readonly:
                assist = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
                self._assist = threading.Thread(
                    target=self._checkpoints, args=(assist,), name="relayd-checkpoint"
                )
                self._assist.start()
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(f"cannot open {path}: {exc}") from exc

    def close(self) -> None:
        if self._assist is not None:
            self._stop_assist.set()
            self._assist.join()
        self._db.close()

    def _checkpoints(self, db: sqlite3.Connection) -> None:
        """The checkpoint thread: a passive checkpoint every ASSIST_EVERY seconds (one with
        nothing new to copy costs a lock and a read); a failed one is tried again next time."""
        try:
            while not self._stop_assist.wait(ASSIST_EVERY):
                with suppress(sqlite3.Error):
                    db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        finally:
            db.close()

    def _migrate(self) -> None:
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        for number, script in enumerate(SCHEMA[version:], start=version + 1):
            with self._write():
                for statement in statements(script):
                    self._db.execute(statement)
                self._db.execute(f"PRAGMA user_version = {number}")
        rows = self._db.execute("SELECT name FROM sqlite_master WHERE type='index'")
        known = {r[0] for r in rows}
        if missing := INDEXES.keys() - known:
            with self._write():
                for name in sorted(missing):
                    self._db.execute(f"CREATE INDEX IF NOT EXISTS {name} {INDEXES[name]}")

    @contextmanager
    def _write(self, *, synced: bool = True) -> Iterator[sqlite3.Connection]:
        """One transaction (BEGIN IMMEDIATE ... COMMIT); sqlite errors surface as StoreError.

        `synced=False` commits without waiting for the disk (synchronous=NORMAL in WAL mode):
        the change survives relayd being killed, and a power cut can only drop the newest such
        commits, never one made before the next synced commit. For changes nobody is told about.
        """
        if not synced:
            self._db.execute("PRAGMA synchronous=NORMAL")
        try:
            self._db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise StoreError(str(exc)) from exc
        try:
            yield self._db
            self._db.execute("COMMIT")
        except BaseException as exc:
            if self._db.in_transaction:
                with suppress(sqlite3.Error):
                    self._db.execute("ROLLBACK")
            if isinstance(exc, sqlite3.Error):
                raise StoreError(str(exc)) from exc
            raise
        finally:
            if not synced:
                self._db.execute("PRAGMA synchronous=FULL")

    # -- intake ---------------------------------------------------------------------------------

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

    # -- reading --------------------------------------------------------------------------------

    def get_job(self, provider: str, doc_id: str) -> Job | None:
        row = self._db.execute(
            f"SELECT {JOB_COLUMNS} FROM jobs WHERE provider=? AND doc_id=?", (provider, doc_id)
        ).fetchone()
        return job_row(row) if row else None

    def find_jobs(self, doc_id: str) -> list[Job]:
        rows = self._db.execute(f"SELECT {JOB_COLUMNS} FROM jobs WHERE doc_id=?", (doc_id,))
        return [job_row(r) for r in rows]

    def job_by_id(self, job_id: int) -> Job | None:
        row = self._db.execute(f"SELECT {JOB_COLUMNS} FROM jobs WHERE id=?", (job_id,)).fetchone()
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
        rows = self._db.execute(
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
        rows = self._db.execute(
            f"SELECT {JOB_COLUMNS} FROM jobs {clause} ORDER BY id DESC LIMIT ?", (*args, limit)
        )
        return [job_row(r) for r in rows]

    def polling_jobs(self) -> list[tuple[int, str, float]]:
        """(id, provider, next_poll_at) of every job still being polled, for the scheduler."""
        rows = self._db.execute(
            "SELECT id, provider, next_poll_at FROM jobs WHERE state=?", (JobState.POLLING,)
        )
        return [(r[0], r[1], r[2]) for r in rows]

    def run_times(self, limit: int = 4096) -> list[tuple[str, str | None, float | None, float]]:
        """(provider, media kind, media seconds, run seconds) of the latest finished jobs that
        can teach how long jobs take, oldest first."""
        rows = self._db.execute(
            "SELECT provider, media_kind, media_seconds, ran_for FROM run_times"
            " ORDER BY id DESC LIMIT ?",
            (limit,),
        ).fetchall()
        return [(r[0], r[1], r[2], r[3]) for r in reversed(rows)]

    def polls_for(self, job_id: int, limit: int = HISTORY_KEPT) -> list[dict[str, Any]]:
        """The polls kept (the first and the latest; `Job.polls_dropped` between them)."""
        rows = self._db.execute(
            "SELECT at, http_status, outcome, detail FROM polls WHERE job_id=?"
            " ORDER BY id DESC LIMIT ?",
            (job_id, limit),
        ).fetchall()
        keys = ("at", "http_status", "outcome", "detail")
        return [dict(zip(keys, r, strict=True)) for r in reversed(rows)]

    def deliveries_for(self, job_id: int) -> list[Delivery]:
        rows = self._db.execute(
            f"SELECT {DELIVERY_COLUMNS} FROM {DELIVERY_FROM} WHERE d.job_id=? ORDER BY d.id",
            (job_id,),
        )
        return [delivery_row(r) for r in rows]

    def attempts_for(self, delivery_id: int, limit: int = HISTORY_KEPT) -> list[dict[str, Any]]:
        """The attempts kept, oldest first: the first and the latest (redeliveries add
        attempts without end; `Delivery.attempts_dropped` counts those left out)."""
        rows = self._db.execute(
            "SELECT at, status, error, duration, outcome FROM attempts WHERE delivery_id=?"
            " ORDER BY id DESC LIMIT ?",
            (delivery_id, limit),
        ).fetchall()
        keys = ("at", "status", "error", "duration", "outcome")
        return [dict(zip(keys, r, strict=True)) for r in reversed(rows)]

    def job_counts(self) -> dict[str, dict[str, int]]:
        """provider -> state -> count."""
        out: dict[str, dict[str, int]] = {}
        for provider, state, n in self._db.execute(
            "SELECT provider, state, n FROM job_counts WHERE n > 0"
        ):
            out.setdefault(provider, {})[state] = n
        return out

    def oldest_polling(self) -> dict[str, float]:
        """provider -> submitted_at of its oldest job still being polled."""
        rows = self._db.execute(
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
        total = self._db.execute(f"SELECT COUNT(*) FROM {DELIVERY_FROM} WHERE {clause}", args)
        rows = self._db.execute(
            f"SELECT {DELIVERY_COLUMNS} FROM {DELIVERY_FROM} WHERE {clause}"
            " ORDER BY j.updated_at DESC, d.id DESC LIMIT ?",
            (*args, limit),
        )
        return [delivery_row(r) for r in rows], int(total.fetchone()[0])

    def delivery_counts(self) -> dict[str, dict[str, int]]:
        """endpoint -> delivery state -> count."""
        out: dict[str, dict[str, int]] = {}
        for endpoint, state, n in self._db.execute(
            "SELECT endpoint, state, n FROM delivery_counts WHERE n > 0"
        ):
            out.setdefault(endpoint, {})[state] = n
        return out

    def disk_usage(self) -> tuple[int, int]:
        """Bytes on disk: (the database file, its WAL)."""
        sizes = []
        for path in (self.path, self.path.with_name(self.path.name + "-wal")):
            try:
                sizes.append(path.stat().st_size)
            except FileNotFoundError:
                sizes.append(0)
        return sizes[0], sizes[1]

    def probe_write(self, now: float) -> None:
        """A real (unsynced) write: raises StoreError when the disk is full or read-only."""
        with self._write(synced=False) as db:
            db.execute("INSERT OR REPLACE INTO probe (id, at) VALUES (1, ?)", (now,))

    # -- budgets across restarts ------------------------------------------------------------------

    def save_budgets(self, budgets: dict[str, dict[str, Any]], *, now: float) -> None:
        """At a clean stop: each key's spent slots and 429 block, as JSON (wall-clock times)."""
        with self._write() as db:
            db.execute("DELETE FROM budgets")
            db.executemany(
                "INSERT INTO budgets (key, state, saved_at) VALUES (?,?,?)",
                [(key, json.dumps(state), now) for key, state in budgets.items()],
            )

    def take_budgets(self) -> dict[str, dict[str, Any]]:
        """Read and forget the saved budgets, so a later crash is not mistaken for a clean stop."""
        with self._write() as db:
            rows = db.execute("SELECT key, state FROM budgets").fetchall()
            db.execute("DELETE FROM budgets")
        return {key: json.loads(state) for key, state in rows}

    def recently_active(self, providers: Sequence[str], since: float) -> bool:
        """Did these providers' jobs see a poll since `since`, or is any still being polled?"""
        marks = ",".join("?" * len(providers))
        row = self._db.execute(
            f"SELECT 1 FROM jobs WHERE provider IN ({marks}) AND (state=? OR updated_at>=?)"
            " LIMIT 1",
            (*providers, JobState.POLLING, since),
        ).fetchone()
        return row is not None

    # -- polling --------------------------------------------------------------------------------

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
        learning how long jobs take; None when the job should not teach (it failed)."""
        with self._write() as db:
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

    def expire_jobs(self, provider: str, submitted_before: float, now: float) -> list[Job]:
        rows = self._db.execute(
            f"SELECT {JOB_COLUMNS} FROM jobs WHERE provider=? AND state=? AND submitted_at<?",
            (provider, JobState.POLLING, submitted_before),
        ).fetchall()
        expired = [job_row(r) for r in rows]
        for job in expired:
            self.end_job(job.id, JobState.EXPIRED, now=now, detail="max_job_age passed")
        return expired

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
        _trim(db, "polls", "job_id", job_id, "jobs", "polls_dropped")

    # -- retention ------------------------------------------------------------------------------

    def prune(self, *, ended_before: float | None, dead_before: float | None, limit: int) -> Pruned:
        """Delete up to `limit` jobs whose time is up, with their polls, deliveries and
        attempts, in one transaction: ended (delivered, failed, expired, unknown, cancelled)
        before `ended_before`, dead before `dead_before` (None: keep those forever). A job in
        a final state got there at its `updated_at`. Not synced: a deletion lost to a power cut
        is made again."""
        where: list[str] = []
        args: list[Any] = []
        if ended_before is not None:
            ended = sorted(ENDED_JOB_STATES)
            where.append(f"(state IN ({','.join('?' * len(ended))}) AND updated_at < ?)")
            args += [*ended, ended_before]
        if dead_before is not None:
            where.append("(state = ? AND updated_at < ?)")
            args += [JobState.DEAD, dead_before]
        if not where:
            return Pruned()
        with self._write(synced=False) as db:
            ids = [
                r[0]
                for r in db.execute(
                    f"SELECT id FROM jobs WHERE {' OR '.join(where)} LIMIT ?", (*args, limit)
                )
            ]
            if not ids:
                return Pruned()
            marks = ",".join("?" * len(ids))
            attempts = db.execute(
                f"DELETE FROM attempts WHERE delivery_id IN"
                f" (SELECT id FROM deliveries WHERE job_id IN ({marks}))",
                ids,
            ).rowcount
            deliveries = db.execute(f"DELETE FROM deliveries WHERE job_id IN ({marks})", ids)
            polls = db.execute(f"DELETE FROM polls WHERE job_id IN ({marks})", ids)
            db.execute(f"DELETE FROM jobs WHERE id IN ({marks})", ids)
            return Pruned(len(ids), polls.rowcount, deliveries.rowcount, attempts)

    def trim_run_times(self, keep: int) -> int:
        """Forget all but the latest `keep` run times; how many were forgotten."""
        with self._write(synced=False) as db:
            return db.execute(
                "DELETE FROM run_times WHERE id <="
                " (SELECT id FROM run_times ORDER BY id DESC LIMIT 1 OFFSET ?)",
                (keep,),
            ).rowcount

    # -- giving space back (`relayd vacuum`) ----------------------------------------------------

    def free_pages(self) -> tuple[int, int]:
        """(pages on the free list, bytes a page)."""
        free = self._db.execute("PRAGMA freelist_count").fetchone()[0]
        return int(free), int(self._db.execute("PRAGMA page_size").fetchone()[0])

    def incremental(self) -> bool:
        """Whether free pages can be given back bit by bit (auto_vacuum = INCREMENTAL)."""
        return int(self._db.execute("PRAGMA auto_vacuum").fetchone()[0]) == 2

    def give_back(self, pages: int) -> None:
        """Return up to `pages` free pages to the file system, in one short transaction (an
        INCREMENTAL database only; a running daemon waits for it at most that long).

        Through executescript: the pragma frees one page per step, and only sqlite3_exec steps
        it to the end (execute() would free one page)."""
        if self._db.in_transaction:
            raise StoreError("give_back inside a transaction")
        try:
            self._db.executescript(
                f"BEGIN IMMEDIATE; PRAGMA incremental_vacuum({int(pages)}); COMMIT;"
            )
        except sqlite3.Error as exc:
            with suppress(sqlite3.Error):  # nothing open is fine too
                self._db.execute("ROLLBACK")
            raise StoreError(str(exc)) from exc

    def checkpoint(self) -> None:
        """Copy the WAL into the database and cut it to nothing (waits for readers, up to the
        busy timeout): what `relayd vacuum` does last, so the file shrinks at once."""
        try:
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error as exc:
            raise StoreError(str(exc)) from exc

    def vacuum(self) -> None:
        """Rewrite the whole file without its free pages, and make it INCREMENTAL from then on.
        Holds the database for as long as that takes: only with the daemon stopped."""
        try:
            self._db.execute("PRAGMA auto_vacuum=INCREMENTAL")
            self._db.execute("VACUUM")
        except sqlite3.Error as exc:
            raise StoreError(str(exc)) from exc

    # -- delivery -------------------------------------------------------------------------------

    def due_deliveries(self, endpoint: str, now: float, limit: int) -> list[Delivery]:
        rows = self._db.execute(
            f"SELECT {DELIVERY_COLUMNS} FROM {DELIVERY_FROM} WHERE d.endpoint=? AND d.state=?"
            " AND d.next_attempt_at<=? ORDER BY d.next_attempt_at, d.id LIMIT ?",
            (endpoint, DeliveryState.PENDING, now, limit),
        )
        return [delivery_row(r) for r in rows]

    def next_delivery_at(self, endpoint: str, after: float) -> float | None:
        """The earliest pending delivery due later than `after` (those due now are in hand)."""
        row = self._db.execute(
            "SELECT MIN(next_attempt_at) FROM deliveries WHERE endpoint=? AND state=?"
            " AND next_attempt_at>?",
            (endpoint, DeliveryState.PENDING, after),
        ).fetchone()
        return float(row[0]) if row and row[0] is not None else None

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
        """One POST and what came of it: delivered, retry, deferred or dead."""
        state = {
            AttemptOutcome.DELIVERED: DeliveryState.DELIVERED,
            AttemptOutcome.DEAD: DeliveryState.DEAD,
        }.get(outcome, DeliveryState.PENDING)
        with self._write() as db:
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
            _trim(db, "attempts", "delivery_id", delivery_id, "deliveries", "attempts_dropped")
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
                _trim(db, "attempts", "delivery_id", delivery_id, "deliveries", "attempts_dropped")
            db.executemany(
                "UPDATE jobs SET state=?, updated_at=? WHERE id=?",
                [(JobState.DELIVERING, now, owner) for owner in {owner for _, owner in rows}],
            )
        return len(rows)


def statements(script: str) -> Iterator[str]:
    """The statements of a schema script, one at a time (a trigger's body holds semicolons)."""
    pending = ""
    for part in script.split(";"):
        pending += part + ";"
        if sqlite3.complete_statement(pending):
            if pending.strip(" \n;"):
                yield pending
            pending = ""


def _trim(
    db: sqlite3.Connection, table: str, owner: str, owner_id: int, counted_in: str, counter: str
) -> None:
    """Keep the first and the latest rows of one history (a job's polls, a delivery's
    attempts); drop those between and count them, so one history stays bounded however long
    its owner lives."""
    kept = db.execute(f"SELECT COUNT(*) FROM {table} WHERE {owner}=?", (owner_id,)).fetchone()[0]
    extra = kept - HISTORY_KEPT
    if extra > 0:
        db.execute(
            f"DELETE FROM {table} WHERE id IN"
            f" (SELECT id FROM {table} WHERE {owner}=? ORDER BY id LIMIT ? OFFSET ?)",
            (owner_id, extra, HISTORY_FIRST),
        )
        db.execute(
            f"UPDATE {counted_in} SET {counter} = {counter} + ? WHERE id=?", (extra, owner_id)
        )
