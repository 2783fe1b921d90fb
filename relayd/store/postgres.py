"""The PostgreSQL store (`[relayd] store = "postgresql://…"`): the `Store` SQLite implements, with
the same answers, in a database a relay reaches over the network. With the other stores, the
only code that knows SQL; each method does what `SqliteStore`'s of the same name does, and one
test suite runs against both (tests/test_store.py).

Every change is one transaction, committed before the method returns; every read ends its
transaction at once (postgres_conn.Link). How long a call may hold the event loop, and what
happens when the server goes away, is said in postgres_conn.py. Several relays share a store by
claiming work from one another (postgres_claims.py).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from typing import Any, ParamSpec, TypeVar

from relayd.errors import StoreError
from relayd.models import (
    ENDED_JOB_STATES,
    EVENTS_PROVIDER,
    FINAL_JOB_STATES,
    AttemptOutcome,
    DeliveryState,
    Job,
    JobState,
    NewDelivery,
    PollOutcome,
    Pruned,
    Submission,
    webhook_id,
)
from relayd.store.postgres_claims import PostgresClaims
from relayd.store.postgres_conn import Cursor, Link, conninfo_of
from relayd.store.postgres_schema import (
    DELIVERIES_CHANNEL,
    JOBS_CHANNEL,
    LOCK_SPACE,
    MIGRATE_LOCK,
    PRUNE_LOCK,
    SCHEMA,
    TABLES,
    VERSION_TABLE,
)
from relayd.store.rows import JOB_COLUMNS, job_row, trim_attempts, trim_polls

P = ParamSpec("P")
R = TypeVar("R")

__all__ = ["PostgresStore", "conninfo_of"]


def _text(value: str | None) -> str | None:
    """Text from a provider or an endpoint as PostgreSQL can keep it: a NUL (which SQLite keeps
    and PostgreSQL's text refuses) becomes U+FFFD, so one odd answer cannot fail every write."""
    return value.replace("\x00", "\ufffd") if value is not None else None


class PostgresStore(PostgresClaims):
    """The `Store` in a PostgreSQL database (13 or later), its schema made and kept up to date by
    relayd. `readonly`: every transaction is read-only and nothing is migrated (the CLI's
    views); `relay`: the daemon's name among the relays on the store, which makes it claim its
    work (postgres_claims.py); `lease`: how long its claims last unrenewed."""

    shared = True  # several relays may use it at once

    def __init__(
        self, url: str, *, readonly: bool = False, relay: str | None = None, lease: float = 30.0
    ) -> None:
        self._link = Link(url, readonly=readonly)
        self.where = self._link.where
        self.relay = relay
        self.lease = lease
        try:
            if readonly:
                self._check_schema()
            else:
                self._migrate()
        except BaseException:
            self._link.close()
            raise

    def close(self) -> None:
        self._link.close()

    async def run(self, fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> R:
        """`fn(*args, **kwargs)` there and then: the connection is the event loop's."""
        return fn(*args, **kwargs)

    async def read(self, fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> R:
        return fn(*args, **kwargs)

    def _migrate(self) -> None:
        """Run each schema version the database lacks, under a transaction-level advisory lock:
        relays starting together wait for the first, which does it, and then find it done."""
        with self._link.write() as cur:
            cur.execute("SELECT pg_advisory_xact_lock(%s, %s)", (LOCK_SPACE, MIGRATE_LOCK))
            row = cur.execute("SELECT to_regclass('schema_version') IS NOT NULL").fetchone()
            if row and row[0]:  # asked first: once made, relayd needs no CREATE right to start
                row = cur.execute("SELECT coalesce(max(version), 0) FROM schema_version").fetchone()
            else:
                cur.execute(VERSION_TABLE)
                row = (0,)
            version = int(row[0]) if row else 0
            for number, script in enumerate(SCHEMA[version:], start=version + 1):
                cur.execute(script)
                cur.execute("INSERT INTO schema_version (version) VALUES (%s)", (number,))

    def _check_schema(self) -> None:
        """A read-only store migrates nothing: it refuses a database relayd never set up."""
        [(table,)] = self._link.read("SELECT to_regclass('schema_version')::text")
        if table is None:
            raise StoreError(f"no relayd tables in {self.where} (has relayd run with this config?)")

    # -- intake ---------------------------------------------------------------------------------

    def add_jobs(
        self, subs: Sequence[Submission], *, source: str, now: float
    ) -> list[tuple[Job, bool]]:
        """Store every submission in one transaction; a known (provider, docId) is left as is."""
        out: list[tuple[Job, bool]] = []
        with self._link.write() as cur:
            for sub in subs:
                row = cur.execute(
                    "INSERT INTO jobs (provider, doc_id, state, metadata, endpoints, source,"
                    " submitted_at, next_poll_at, updated_at) VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s)"
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
                ).fetchone()  # a row if it was inserted, none if it was known
                if row is not None:
                    out.append((job_row(row), True))
                    continue
                row = cur.execute(
                    f"SELECT {JOB_COLUMNS} FROM jobs WHERE provider=%s AND doc_id=%s",
                    (sub.provider, sub.doc_id),
                ).fetchone()
                assert row is not None  # a conflict: it is there
                out.append((job_row(row), False))
            if any(created for _, created in out):
                cur.execute(f"NOTIFY {JOBS_CHANNEL}")  # sent at the commit
        return out

    def add_event(self, doc_id: str, deliveries: Sequence[NewDelivery], *, now: float) -> bool:
        event = deliveries[0].event
        with self._link.write() as cur:
            row = cur.execute(
                "INSERT INTO jobs (provider, doc_id, state, source, submitted_at, next_poll_at,"
                " updated_at, result_status, last_status, result, finished_at)"
                " VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s)"
                " ON CONFLICT (provider, doc_id) DO NOTHING RETURNING id",
                (EVENTS_PROVIDER, doc_id, JobState.DELIVERING, EVENTS_PROVIDER, now, now, now,
                 event, event, _text(deliveries[0].payload), now),
            ).fetchone()  # fmt: skip
            if row is None:
                return False
            cur.executemany(
                "INSERT INTO deliveries (job_id, endpoint, event, webhook_id, payload, state,"
                " next_attempt_at, created_at) VALUES (%s,%s,%s,%s,%s,%s,%s,%s)",
                [
                    (row[0], d.endpoint, d.event, webhook_id(EVENTS_PROVIDER, doc_id, d.event),
                     _text(d.payload), DeliveryState.PENDING, now, now)
                    for d in deliveries
                ],
            )  # fmt: skip
            cur.execute(f"NOTIFY {DELIVERIES_CHANNEL}")
        return True

    # -- readiness and upkeep ---------------------------------------------------------------------

    def probe_write(self, now: float) -> None:
        """A real (unsynced) write: raises StoreError when the server takes none."""
        with self._link.write(synced=False) as cur:
            cur.execute(
                "INSERT INTO probe (id, at) VALUES (1, %s)"
                " ON CONFLICT (id) DO UPDATE SET at = excluded.at",
                (now,),
            )

    def vacuum(self) -> None:
        """VACUUM (ANALYZE) relayd's tables: their dead rows' space is reused at once and a
        table's empty end goes back to the file system. It takes no lock that stops relayd
        (autovacuum does the same by itself): for `relayd vacuum`, with the daemon running."""
        for table in TABLES:
            self._link.autocommit(f"VACUUM (ANALYZE) {table}")

    # -- budgets across restarts ------------------------------------------------------------------

    def save_budgets(self, budgets: dict[str, dict[str, Any]], *, now: float) -> None:
        with self._link.write() as cur:
            cur.execute("DELETE FROM budgets")
            cur.executemany(
                "INSERT INTO budgets (key, state, saved_at) VALUES (%s,%s,%s)",
                [(key, json.dumps(state), now) for key, state in budgets.items()],
            )

    def take_budgets(self) -> dict[str, dict[str, Any]]:
        with self._link.write() as cur:
            rows = cur.execute("DELETE FROM budgets RETURNING key, state").fetchall()
        return {key: json.loads(state) for key, state in rows}

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
        """Not synced, as SQLite's: a poll acknowledges nothing and one lost is polled again."""
        with self._link.write(synced=False) as cur:
            cur.execute(
                "UPDATE jobs SET polls=polls+1, next_poll_at=%s, errors=%s, not_found=%s,"
                " last_status=COALESCE(%s, last_status), etag=COALESCE(%s, etag), updated_at=%s"
                " WHERE id=%s AND state=%s",
                (
                    next_poll_at,
                    errors,
                    not_found,
                    _text(last_status),
                    _text(etag),
                    now,
                    job_id,
                    JobState.POLLING,
                ),
            )
            if cur.rowcount == 0:
                return False
            _poll_row(cur, job_id, now, http_status, outcome, detail)
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
        """A terminal status and the deliveries it calls for, in one transaction; the job row
        locked first, so a cancel meanwhile waits rather than crosses it."""
        with self._link.write() as cur:
            job = cur.execute(
                "SELECT provider, doc_id FROM jobs WHERE id=%s AND state=%s FOR UPDATE",
                (job_id, JobState.POLLING),
            ).fetchone()
            if job is None:
                return False
            rows = [
                (job_id, d.endpoint, d.event, webhook_id(job[0], job[1], d.event), d.payload)
                for d in deliveries
            ]
            cur.executemany(
                "INSERT INTO deliveries (job_id, endpoint, event, webhook_id, payload, state,"
                " next_attempt_at, created_at) VALUES (%s,%s,%s,%s,%s,%s,%s,%s)",
                [(*row, DeliveryState.PENDING, now, now) for row in rows],
            )
            if rows:
                state = JobState.DELIVERING
            else:
                state = JobState.DELIVERED if succeeded else JobState.FAILED
            status = _text(result_status)
            cur.execute(
                "UPDATE jobs SET state=%s, polls=polls+1, result_status=%s, last_status=%s,"
                " result=%s, finished_at=%s, updated_at=%s WHERE id=%s",
                (state, status, status, json.dumps(result, ensure_ascii=False), now, now, job_id),
            )
            if ran_for is not None:  # kept apart: it outlives the job (retention)
                cur.execute(
                    "INSERT INTO run_times (provider, media_kind, media_seconds, ran_for)"
                    " VALUES (%s,%s,%s,%s)",
                    (job[0], media_kind, media_seconds, ran_for),
                )
            _poll_row(cur, job_id, now, http_status, PollOutcome.FINISHED, detail)
            if rows:
                cur.execute(f"NOTIFY {DELIVERIES_CHANNEL}")
        return True

    def end_job(self, job_id: int, state: JobState, *, now: float, detail: str) -> bool:
        with self._link.write() as cur:
            cur.execute(
                "UPDATE jobs SET state=%s, updated_at=%s WHERE id=%s AND state=%s",
                (state, now, job_id, JobState.POLLING),
            )
            if cur.rowcount == 0:
                return False
            _poll_row(cur, job_id, now, None, PollOutcome(state), detail)
        return True

    def expire_jobs(self, provider: str, submitted_before: float, now: float) -> list[Job]:
        rows = self._link.read(
            f"SELECT {JOB_COLUMNS} FROM jobs WHERE provider=%s AND state=%s AND submitted_at<%s"
            " ORDER BY id",
            (provider, JobState.POLLING, submitted_before),
        )
        expired = [job_row(r) for r in rows]
        for job in expired:
            self.end_job(job.id, JobState.EXPIRED, now=now, detail="max_job_age passed")
        return expired

    def cancel(self, job_id: int, *, now: float) -> bool:
        with self._link.write() as cur:
            row = cur.execute("SELECT state FROM jobs WHERE id=%s FOR UPDATE", (job_id,)).fetchone()
            if row is None or row[0] in FINAL_JOB_STATES:
                return False
            cur.execute(
                "UPDATE deliveries SET state=%s WHERE job_id=%s AND state=%s",
                (DeliveryState.CANCELLED, job_id, DeliveryState.PENDING),
            )
            cur.execute(
                "UPDATE jobs SET state=%s, updated_at=%s WHERE id=%s",
                (JobState.CANCELLED, now, job_id),
            )
            _poll_row(cur, job_id, now, None, PollOutcome.CANCELLED, "cancelled by operator")
        return True

    # -- retention ------------------------------------------------------------------------------

    def prune(self, *, ended_before: float | None, dead_before: float | None, limit: int) -> Pruned:
        """As SQLite's: up to `limit` jobs whose time is up, with their history, in one unsynced
        transaction (a deletion lost to a server crash is made again)."""
        where: list[str] = []
        args: list[Any] = []
        if ended_before is not None:
            where.append("(state = ANY(%s) AND updated_at < %s)")
            args += [sorted(ENDED_JOB_STATES), ended_before]
        if dead_before is not None:
            where.append("(state = %s AND updated_at < %s)")
            args += [JobState.DEAD, dead_before]
        if not where:
            return Pruned()
        with self._link.write(synced=False) as cur:
            [(mine,)] = cur.execute(
                "SELECT pg_try_advisory_xact_lock(%s, %s)", (LOCK_SPACE, PRUNE_LOCK)
            ).fetchall()
            if not mine:
                return Pruned()  # another relay is pruning: one at a time, never all of them
            ids = [
                r[0]
                for r in cur.execute(
                    f"SELECT id FROM jobs WHERE {' OR '.join(where)} LIMIT %s", (*args, limit)
                ).fetchall()
            ]
            if not ids:
                return Pruned()
            attempts = cur.execute(
                "DELETE FROM attempts WHERE delivery_id IN"
                " (SELECT id FROM deliveries WHERE job_id = ANY(%s))",
                (ids,),
            ).rowcount
            deliveries = cur.execute("DELETE FROM deliveries WHERE job_id = ANY(%s)", (ids,))
            delivered = deliveries.rowcount
            polls = cur.execute("DELETE FROM polls WHERE job_id = ANY(%s)", (ids,)).rowcount
            cur.execute("DELETE FROM jobs WHERE id = ANY(%s)", (ids,))
            return Pruned(len(ids), polls, delivered, attempts)

    def trim_run_times(self, keep: int) -> int:
        with self._link.write(synced=False) as cur:
            return cur.execute(
                "DELETE FROM run_times WHERE id <="
                " (SELECT id FROM run_times ORDER BY id DESC LIMIT 1 OFFSET %s)",
                (keep,),
            ).rowcount

    # -- delivery -------------------------------------------------------------------------------

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
        with self._link.write() as cur:
            row = cur.execute(
                "SELECT job_id, state FROM deliveries WHERE id=%s FOR UPDATE", (delivery_id,)
            ).fetchone()
            if row is None or row[1] != DeliveryState.PENDING:
                return False  # cancelled meanwhile
            cur.execute(
                "INSERT INTO attempts (delivery_id, at, status, error, duration, outcome)"
                " VALUES (%s,%s,%s,%s,%s,%s)",
                (delivery_id, now, status, _text(error), duration, outcome),
            )
            trim_attempts(cur, "%s", delivery_id)
            cur.execute(
                "UPDATE deliveries SET state=%s, attempts=attempts+%s, last_error=%s,"
                " next_attempt_at=COALESCE(%s, next_attempt_at), delivered_at=%s,"
                " claimed_by=NULL, claimed_until=0 WHERE id=%s",
                (
                    state,
                    1 if spend else 0,
                    _text(error),
                    next_attempt_at,
                    now if state == DeliveryState.DELIVERED else None,
                    delivery_id,
                ),
            )
            if state != DeliveryState.PENDING:
                _settle_job(cur, row[0], now)
        return True

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
        """Queue deliveries again with a fresh set of attempts, each replay recorded in the
        attempt history; how many were queued."""
        where = ["state = ANY(%s)"]
        args: list[Any] = [[str(s) for s in states]]
        for clause, value in (("job_id=%s", job_id), ("endpoint=%s", endpoint)):
            if value is not None:
                where.append(clause)
                args.append(value)
        if since is not None:
            where.append("created_at>=%s")
            args.append(since)
        with self._link.write() as cur:
            rows = cur.execute(
                f"SELECT id, job_id FROM deliveries WHERE {' AND '.join(where)} ORDER BY id"
                " FOR UPDATE",
                args,
            ).fetchall()
            cur.executemany(
                "UPDATE deliveries SET state=%s, attempts=0, next_attempt_at=%s, last_error=NULL,"
                " claimed_by=NULL, claimed_until=0 WHERE id=%s",
                [(DeliveryState.PENDING, now, delivery_id) for delivery_id, _ in rows],
            )
            cur.executemany(
                "INSERT INTO attempts (delivery_id, at, status, error, duration, outcome)"
                " VALUES (%s,%s,NULL,NULL,0,%s)",
                [(delivery_id, now, AttemptOutcome.REPLAY) for delivery_id, _ in rows],
            )
            for delivery_id, _ in rows:
                trim_attempts(cur, "%s", delivery_id)
            cur.executemany(
                "UPDATE jobs SET state=%s, updated_at=%s WHERE id=%s",
                [(JobState.DELIVERING, now, owner) for owner in sorted({o for _, o in rows})],
            )
            if rows:
                cur.execute(f"NOTIFY {DELIVERIES_CHANNEL}")
        return len(rows)


def _poll_row(
    cur: Cursor,
    job_id: int,
    now: float,
    http_status: int | None,
    outcome: PollOutcome,
    detail: str | None,
) -> None:
    cur.execute(
        "INSERT INTO polls (job_id, at, http_status, outcome, detail) VALUES (%s,%s,%s,%s,%s)",
        (job_id, now, http_status, outcome, _text(detail)),
    )
    trim_polls(cur, "%s", job_id)


def _settle_job(cur: Cursor, job_id: int, now: float) -> None:
    """The job ends when its last delivery does: dead if one died, else delivered."""
    rows = cur.execute("SELECT state FROM deliveries WHERE job_id=%s", (job_id,)).fetchall()
    states = {r[0] for r in rows}
    if DeliveryState.PENDING in states:
        return
    final = JobState.DEAD if DeliveryState.DEAD in states else JobState.DELIVERED
    cur.execute(
        "UPDATE jobs SET state=%s, updated_at=%s WHERE id=%s AND state=%s",
        (final, now, job_id, JobState.DELIVERING),
    )
