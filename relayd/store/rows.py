"""How a row of either SQL store becomes a model: the columns every query of jobs and deliveries
selects, in the order the converters read them. SQLite and PostgreSQL share them, so one job reads
back the same from both."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from relayd.models import HISTORY_FIRST, HISTORY_KEPT, Delivery, DeliveryState, Job, JobState

JOB_COLUMNS = (
    "id, provider, doc_id, state, metadata, endpoints, source, submitted_at, next_poll_at, "
    "polls, errors, not_found, last_status, etag, result_status, finished_at, updated_at, "
    "polls_dropped"
)
DELIVERY_COLUMNS = (
    "d.id, d.job_id, d.endpoint, d.event, d.webhook_id, d.payload, d.state, d.attempts,"
    " d.next_attempt_at, d.last_error, d.created_at, d.delivered_at, j.provider, j.doc_id,"
    " d.attempts_dropped"
)
DELIVERY_FROM = "deliveries d JOIN jobs j ON j.id = d.job_id"


def job_row(row: Sequence[Any]) -> Job:
    return Job(
        id=row[0],
        provider=row[1],
        doc_id=row[2],
        state=JobState(row[3]),
        metadata=json.loads(row[4]) if row[4] is not None else None,
        endpoints=tuple(json.loads(row[5])) if row[5] is not None else None,
        source=row[6],
        submitted_at=row[7],
        next_poll_at=row[8],
        polls=row[9],
        errors=row[10],
        not_found=row[11],
        last_status=row[12],
        etag=row[13],
        result_status=row[14],
        finished_at=row[15],
        updated_at=row[16],
        polls_dropped=row[17],
    )


def delivery_row(row: Sequence[Any]) -> Delivery:
    return Delivery(
        id=row[0],
        job_id=row[1],
        endpoint=row[2],
        event=row[3],
        webhook_id=row[4],
        payload=row[5],
        state=DeliveryState(row[6]),
        attempts=row[7],
        next_attempt_at=row[8],
        last_error=row[9],
        created_at=row[10],
        delivered_at=row[11],
        provider=row[12],
        doc_id=row[13],
        attempts_dropped=row[14],
    )


def trim_history(
    db: Any, mark: str, table: str, owner: str, owner_id: int, counted_in: str, counter: str
) -> None:
    """Keep the first and the latest rows of one history (a job's polls, a delivery's
    attempts); drop those between and count them, so one history stays bounded however long
    its owner lives. `db`: a SQLite connection or a PostgreSQL cursor, in the transaction that
    added a row; `mark`: its placeholder ("?" or "%s")."""
    row = db.execute(f"SELECT COUNT(*) FROM {table} WHERE {owner}={mark}", (owner_id,)).fetchone()
    extra = int(row[0]) - HISTORY_KEPT if row else 0
    if extra > 0:
        db.execute(
            f"DELETE FROM {table} WHERE id IN (SELECT id FROM {table} WHERE {owner}={mark}"
            f" ORDER BY id LIMIT {mark} OFFSET {mark})",
            (owner_id, extra, HISTORY_FIRST),
        )
        db.execute(
            f"UPDATE {counted_in} SET {counter} = {counter} + {mark} WHERE id={mark}",
            (extra, owner_id),
        )


def trim_polls(db: Any, mark: str, job_id: int) -> None:
    trim_history(db, mark, "polls", "job_id", job_id, "jobs", "polls_dropped")


def trim_attempts(db: Any, mark: str, delivery_id: int) -> None:
    trim_history(db, mark, "attempts", "delivery_id", delivery_id, "deliveries", "attempts_dropped")
