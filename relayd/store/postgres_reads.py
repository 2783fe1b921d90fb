"""What a PostgreSQL store answers without changing anything: jobs, their histories and the
counts status shows, each in one query whose transaction ends at once (postgres_conn.Link.read).
`PostgresStore` (postgres.py) adds the changes; split so that each half reads in one sitting."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from relayd.models import HISTORY_KEPT, JOB_JSON_BYTES, Delivery, DeliveryState, Job, JobState
from relayd.store.postgres_conn import Link
from relayd.store.postgres_schema import TABLES
from relayd.store.rows import DELIVERY_COLUMNS, DELIVERY_FROM, JOB_COLUMNS, delivery_row, job_row


class PostgresReads:
    """The reading half of `PostgresStore`: each method answers as SqliteStore's of its name."""

    _link: Link

    def get_job(self, provider: str, doc_id: str) -> Job | None:
        rows = self._link.read(
            f"SELECT {JOB_COLUMNS} FROM jobs WHERE provider=%s AND doc_id=%s", (provider, doc_id)
        )
        return job_row(rows[0]) if rows else None

    def find_jobs(self, doc_id: str) -> list[Job]:
        rows = self._link.read(
            f"SELECT {JOB_COLUMNS} FROM jobs WHERE doc_id=%s ORDER BY id", (doc_id,)
        )
        return [job_row(r) for r in rows]

    def job_by_id(self, job_id: int) -> Job | None:
        rows = self._link.read(f"SELECT {JOB_COLUMNS} FROM jobs WHERE id=%s", (job_id,))
        return job_row(rows[0]) if rows else None

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
        """As SQLite's: the newest first, as many (at least one) as fit in about `max_bytes` of
        JSON. The server counts the sizes and sends the jobs that fit and the first that does
        not (so the cut is known), never the rest: a cut-off list holds one row more than it
        returns, whatever the metadata (up to 1 MiB a job)."""
        where, args = [], []
        if state:
            where.append("state=%s")
            args.append(state)
        if provider:
            where.append("provider=%s")
            args.append(provider)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        newest = f"SELECT {JOB_COLUMNS} FROM jobs {clause} ORDER BY id DESC LIMIT %s"
        if max_bytes is None:
            rows = self._link.read(newest, (*args, limit))
        else:
            # `before`: the size of the newer jobs. The first two always come (the first is
            # kept whatever its size; the second shows whether it was cut), then those whose
            # newer jobs fit: the jobs that fit and the first that does not.
            size = "%s + length(doc_id) + coalesce(length(metadata), 0)"
            size += " + coalesce(length(endpoints), 0)"
            window = "OVER (ORDER BY id DESC)"
            rows = self._link.read(
                f"SELECT {JOB_COLUMNS} FROM (SELECT *, sum(size) {window} - size AS before,"
                f" row_number() {window} AS n FROM (SELECT *, {size} AS size FROM ({newest}) j)"
                " s) t WHERE n <= 2 OR before <= %s ORDER BY id DESC",
                (JOB_JSON_BYTES, *args, limit, max_bytes),
            )
        jobs: list[Job] = []
        size_so_far = 0
        for row in rows:
            size_so_far += JOB_JSON_BYTES + len(row[2]) + len(row[4] or "") + len(row[5] or "")
            if max_bytes is not None and jobs and size_so_far > max_bytes:
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
        """One page, newest first, older than job `before`; `q` a docId or the start of one (a
        range in byte order: doc_id is COLLATE "C", its index serves it)."""
        where: list[str] = []
        args: list[Any] = []
        for clause, value in (("state=%s", state), ("provider=%s", provider), ("id<%s", before)):
            if value is not None and value != "":
                where.append(clause)
                args.append(value)
        if q:
            where.append("doc_id>=%s AND doc_id<%s")
            args += [q, q + "\U0010ffff"]
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        rows = self._link.read(
            f"SELECT {JOB_COLUMNS} FROM jobs {clause} ORDER BY id DESC LIMIT %s", (*args, limit)
        )
        return [job_row(r) for r in rows]

    def polling_jobs(self) -> list[tuple[int, str, float]]:
        rows = self._link.read(
            "SELECT id, provider, next_poll_at FROM jobs WHERE state=%s ORDER BY id",
            (JobState.POLLING,),
        )
        return [(r[0], r[1], r[2]) for r in rows]

    def run_times(self, limit: int = 4096) -> list[tuple[str, str | None, float | None, float]]:
        rows = self._link.read(
            "SELECT provider, media_kind, media_seconds, ran_for FROM run_times"
            " ORDER BY id DESC LIMIT %s",
            (limit,),
        )
        return [(r[0], r[1], r[2], r[3]) for r in reversed(rows)]

    def polls_for(self, job_id: int, limit: int = HISTORY_KEPT) -> list[dict[str, Any]]:
        rows = self._link.read(
            "SELECT at, http_status, outcome, detail FROM polls WHERE job_id=%s"
            " ORDER BY id DESC LIMIT %s",
            (job_id, limit),
        )
        keys = ("at", "http_status", "outcome", "detail")
        return [dict(zip(keys, r, strict=True)) for r in reversed(rows)]

    def deliveries_for(self, job_id: int) -> list[Delivery]:
        rows = self._link.read(
            f"SELECT {DELIVERY_COLUMNS} FROM {DELIVERY_FROM} WHERE d.job_id=%s ORDER BY d.id",
            (job_id,),
        )
        return [delivery_row(r) for r in rows]

    def attempts_for(self, delivery_id: int, limit: int = HISTORY_KEPT) -> list[dict[str, Any]]:
        rows = self._link.read(
            "SELECT at, status, error, duration, outcome FROM attempts WHERE delivery_id=%s"
            " ORDER BY id DESC LIMIT %s",
            (delivery_id, limit),
        )
        keys = ("at", "status", "error", "duration", "outcome")
        return [dict(zip(keys, r, strict=True)) for r in reversed(rows)]

    def job_counts(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for provider, state, n in self._link.read(
            "SELECT provider, state, COUNT(*) FROM jobs GROUP BY provider, state"
        ):
            out.setdefault(provider, {})[state] = int(n)
        return out

    def oldest_polling(self) -> dict[str, float]:
        rows = self._link.read(
            "SELECT provider, MIN(submitted_at) FROM jobs WHERE state=%s GROUP BY provider",
            (JobState.POLLING,),
        )
        return {r[0]: r[1] for r in rows}

    def dead_deliveries(
        self, *, endpoint: str | None = None, since: float | None = None, limit: int = 100
    ) -> tuple[list[Delivery], int]:
        where = ["d.state=%s"]
        args: list[Any] = [DeliveryState.DEAD]
        if endpoint:
            where.append("d.endpoint=%s")
            args.append(endpoint)
        if since is not None:
            where.append("d.created_at>=%s")
            args.append(since)
        clause = " AND ".join(where)
        # the count beside every row, in one query: both from one snapshot
        rows = self._link.read(
            f"SELECT {DELIVERY_COLUMNS}, (SELECT COUNT(*) FROM {DELIVERY_FROM} WHERE {clause})"
            f" FROM {DELIVERY_FROM} WHERE {clause} ORDER BY j.updated_at DESC, d.id DESC LIMIT %s",
            (*args, *args, limit),
        )
        if not rows:
            return [], 0
        return [delivery_row(r) for r in rows], int(rows[0][-1])

    def delivery_counts(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for endpoint, state, n in self._link.read(
            "SELECT endpoint, state, COUNT(*) FROM deliveries GROUP BY endpoint, state"
        ):
            out.setdefault(endpoint, {})[state] = int(n)
        return out

    def disk_usage(self) -> tuple[int, int]:
        """(bytes relayd's tables take with their indexes and TOAST, 0). Not the database's
        whole size: other applications may share it. The second figure, SQLite's WAL, is 0: the
        server's write-ahead log is the server's, shared by every database in it."""
        names = ",".join(f"'{table}'" for table in TABLES)
        [(size,)] = self._link.read(
            "SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0) FROM pg_class c"
            f" WHERE c.oid = ANY(ARRAY[{names}]::regclass[])"
        )
        return int(size), 0

    # -- budgets and delivery

    def recently_active(self, providers: Sequence[str], since: float) -> bool:
        rows = self._link.read(
            "SELECT 1 FROM jobs WHERE provider = ANY(%s) AND (state=%s OR updated_at>=%s) LIMIT 1",
            (list(providers), JobState.POLLING, since),
        )
        return bool(rows)

    def due_deliveries(self, endpoint: str, now: float, limit: int) -> list[Delivery]:
        rows = self._link.read(
            f"SELECT {DELIVERY_COLUMNS} FROM {DELIVERY_FROM} WHERE d.endpoint=%s AND d.state=%s"
            " AND d.next_attempt_at<=%s ORDER BY d.next_attempt_at, d.id LIMIT %s",
            (endpoint, DeliveryState.PENDING, now, limit),
        )
        return [delivery_row(r) for r in rows]

    def next_delivery_at(self, endpoint: str, after: float) -> float | None:
        [(at,)] = self._link.read(
            "SELECT MIN(next_attempt_at) FROM deliveries WHERE endpoint=%s AND state=%s"
            " AND next_attempt_at>%s",
            (endpoint, DeliveryState.PENDING, after),
        )
        return float(at) if at is not None else None
