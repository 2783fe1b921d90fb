"""The SQLite file under the store and its upkeep: opening it (WAL mode, its pragmas, the
schema), one transaction at a time, checkpoints beside the writer, retention's deletes, and
giving space back. `SqliteStore` (sqlite.py) holds the queries about jobs on top of it.
"""

from __future__ import annotations

import asyncio
import functools
import sqlite3
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar

from relayd.errors import StoreError
from relayd.models import ENDED_JOB_STATES, JobState, Pruned
from relayd.store.sqlite_schema import INDEXES, SCHEMA

# Bytes of WAL the serving store lets pile up. A WAL starts over only at a moment when no reader
# is in it; with the event loop reading while the writer thread writes, such moments can be
# missed for a while, and each miss leaves the file larger for good (SQLite reuses it, never
# shrinks it, below journal_size_limit). Past this size the checkpoint thread waits for the
# readers (milliseconds) and truncates it: the WAL stays under this plus 50 ms of writes.
WAL_LIMIT = 4 * 1024 * 1024
# The commit that takes the WAL past this many pages copies them into the database first (in
# the writer thread): 1 MB at a time, not SQLite's 4 MB (with 40 KB rows, the longest commit
# went from 15 ms to 5 ms; benchmarks/README.md, "Soak").
CHECKPOINT_PAGES = 250
ASSIST_EVERY = 0.05  # seconds between the serving store's background checkpoints

P = ParamSpec("P")
R = TypeVar("R")
F = TypeVar("F", bound="SqliteFile")


def writes(method: Callable[Concatenate[F, P], R]) -> Callable[Concatenate[F, P], R]:
    """Marks a method that writes: in a serving store it runs in the writer thread, on the
    writer's connection. Called from another thread (the event loop's, for the few writes
    that are not awaited through `run`), it waits there for its turn, so that two connections
    never contend for SQLite's write lock."""

    @functools.wraps(method)
    def wrapper(self: F, /, *args: P.args, **kwargs: P.kwargs) -> R:
        if self._writer is None or threading.get_ident() == self._writer_ident:
            return method(self, *args, **kwargs)
        return self._writer.submit(method, self, *args, **kwargs).result()

    return wrapper


class SqliteFile:
    """One SQLite database file (WAL mode, synchronous commits for what is acknowledged).

    `serving=True` (the daemon) adds a writer thread and a checkpoint thread. The writer
    thread owns a connection of its own and makes every change (`writes`), so the event loop
    never waits for a commit's fsync, a checkpoint or a pruning batch: it awaits them through
    `run` and reads on its own connection meanwhile (WAL: readers never wait for the writer,
    and see each commit once it is made). The soak found those waits to be the loop's longest
    stalls, 50-100 ms under a saturated disk (benchmarks/README.md, "Soak"). A reader thread,
    with a third connection, takes the reads polls and deliveries make as they go (`read`):
    those may wait for the disk too.

    The checkpoint thread: the commit that crosses
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
        self._writer: ThreadPoolExecutor | None = None
        self._writer_ident: int | None = None
        self._reader: ThreadPoolExecutor | None = None
        self._reader_ident: int | None = None
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
            configure(self._db, readonly=readonly)
            self._wdb = self._rdb = self._db
            if not readonly:
                self._migrate()
            if serving and not readonly:
                self._wdb = sqlite3.connect(
                    path, isolation_level=None, timeout=5.0, check_same_thread=False
                )
                configure(self._wdb, readonly=False)
                self._writer = ThreadPoolExecutor(1, "relayd-writer", self._writer_started)
                self._writer.submit(lambda: None).result()  # the thread is there, its id known
                self._rdb = sqlite3.connect(
                    path, isolation_level=None, timeout=5.0, check_same_thread=False
                )
                configure(self._rdb, readonly=False)
                self._reader = ThreadPoolExecutor(1, "relayd-reader", self._reader_started)
                self._reader.submit(lambda: None).result()
                assist = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
                self._assist = threading.Thread(
                    target=self._checkpoints, args=(assist,), name="relayd-checkpoint"
                )
                self._assist.start()
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(f"cannot open {path}: {exc}") from exc

    def close(self) -> None:
        if self._reader is not None:
            self._reader.shutdown(wait=True)
            self._reader = None
            self._rdb.close()
        if self._writer is not None:
            self._writer.shutdown(wait=True)  # what was asked is done first
            self._writer = None
            self._wdb.close()
        if self._assist is not None:
            self._stop_assist.set()
            self._assist.join()
        self._db.close()

    def _writer_started(self) -> None:
        self._writer_ident = threading.get_ident()

    def _reader_started(self) -> None:
        self._reader_ident = threading.get_ident()

    async def read(self, fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> R:
        """`fn(*args, **kwargs)`, one of this store's reads, in the reader thread when there is
        one: for the reads the polls and deliveries make as they go. A read on the event loop
        never waits for the writer (WAL), but it may wait for the disk: under the soak's load
        one such read held the loop 23 ms with 0.3 ms of CPU."""
        if self._reader is None:
            return fn(*args, **kwargs)
        return await asyncio.wrap_future(self._reader.submit(fn, *args, **kwargs))

    async def run(self, fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> R:
        """`fn(*args, **kwargs)`, one of this store's methods, in the writer thread when there
        is one (a serving store), so that the event loop goes on meanwhile; else here."""
        if self._writer is None:
            return fn(*args, **kwargs)
        return await asyncio.wrap_future(self._writer.submit(fn, *args, **kwargs))

    @property
    def _conn(self) -> sqlite3.Connection:
        """The connection of the thread that asks: the writer's in the writer thread, the
        reader's in the reader thread, else the event loop's."""
        me = threading.get_ident()
        if me == self._writer_ident:
            return self._wdb
        if me == self._reader_ident:
            return self._rdb
        return self._db

    def _checkpoints(self, db: sqlite3.Connection) -> None:
        """The checkpoint thread: a passive checkpoint every ASSIST_EVERY seconds (one with
        nothing new to copy costs a lock and a read), a truncating one when the WAL has grown
        past WAL_LIMIT (it holds the writer thread, not the event loop, while it waits for
        readers); a failed one is tried again next time."""
        wal = self.path.with_name(self.path.name + "-wal")
        try:
            while not self._stop_assist.wait(ASSIST_EVERY):
                with suppress(sqlite3.Error, OSError):
                    mode = "TRUNCATE" if wal.stat().st_size > WAL_LIMIT else "PASSIVE"
                    db.execute(f"PRAGMA wal_checkpoint({mode})").fetchall()
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
        db = self._conn
        if not synced:
            db.execute("PRAGMA synchronous=NORMAL")
        try:
            db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise StoreError(str(exc)) from exc
        try:
            yield db
            db.execute("COMMIT")
        except BaseException as exc:
            if db.in_transaction:
                with suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
            if isinstance(exc, sqlite3.Error):
                raise StoreError(str(exc)) from exc
            raise
        finally:
            if not synced:
                db.execute("PRAGMA synchronous=FULL")

    def disk_usage(self) -> tuple[int, int]:
        """Bytes on disk: (the database file, its WAL)."""
        sizes = []
        for path in (self.path, self.path.with_name(self.path.name + "-wal")):
            try:
                sizes.append(path.stat().st_size)
            except FileNotFoundError:
                sizes.append(0)
        return sizes[0], sizes[1]

    @writes
    def probe_write(self, now: float) -> None:
        """A real (unsynced) write: raises StoreError when the disk is full or read-only."""
        with self._write(synced=False) as db:
            db.execute("INSERT OR REPLACE INTO probe (id, at) VALUES (1, ?)", (now,))

    # -- retention ------------------------------------------------------------------------------

    @writes
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

    @writes
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


def configure(db: sqlite3.Connection, *, readonly: bool) -> None:
    """The pragmas every connection of relayd's says for itself."""
    if not readonly:
        # after a checkpoint, a WAL that grew (a reader held it back) shrinks to this
        db.execute(f"PRAGMA journal_size_limit={WAL_LIMIT}")
        # Deleted rows are zeroed only where that costs no extra writes: zeroing every freed
        # page of a 40 KB transcript made pruning ten times slower (SECURE_DELETE is compiled
        # in on Debian). The bytes stay in free pages until they are reused or `relayd vacuum`
        # gives them back.
        db.execute("PRAGMA secure_delete=FAST")
        db.execute(f"PRAGMA wal_autocheckpoint={CHECKPOINT_PAGES}")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("PRAGMA foreign_keys=ON")
    # big sorts and temp tables stay in memory: on a read-only root filesystem (a container)
    # there is no writable temp directory, and SQLite would fail with EIO
    db.execute("PRAGMA temp_store=MEMORY")


def statements(script: str) -> Iterator[str]:
    """The statements of a schema script, one at a time (a trigger's body holds semicolons)."""
    pending = ""
    for part in script.split(";"):
        pending += part + ";"
        if sqlite3.complete_statement(pending):
            if pending.strip(" \n;"):
                yield pending
            pending = ""
