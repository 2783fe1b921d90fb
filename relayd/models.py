"""relayd's value objects and states: what a job, a submission and a delivery are, with no SQL
and no I/O. Every other module speaks of jobs in these terms; only `relayd.store` knows how they
are kept.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

JOB_JSON_BYTES = 400  # Job.as_dict() as JSON, besides its docId, metadata and endpoints
# A job's polls and a delivery's attempts keep the first few and the latest, however long the
# job lives; those between are dropped and counted (`Job.polls_dropped`).
HISTORY_FIRST = 5
HISTORY_LATEST = 50
HISTORY_KEPT = HISTORY_FIRST + HISTORY_LATEST


class JobState(StrEnum):
    POLLING = "polling"  # waiting for the provider to finish
    DELIVERING = "delivering"  # finished; deliveries pending
    DELIVERED = "delivered"
    FAILED = "failed"  # the provider failed it and no endpoint asked to hear about that
    EXPIRED = "expired"
    UNKNOWN = "unknown"
    CANCELLED = "cancelled"
    DEAD = "dead"  # a delivery ran out of attempts


FINAL_JOB_STATES = frozenset(JobState) - {JobState.POLLING, JobState.DELIVERING}
# states whose jobs `retention` deletes (a dead one waits `dead_retention` instead)
ENDED_JOB_STATES = FINAL_JOB_STATES - {JobState.DEAD}


class DeliveryState(StrEnum):
    PENDING = "pending"
    DELIVERED = "delivered"
    DEAD = "dead"
    CANCELLED = "cancelled"


class PollOutcome(StrEnum):
    """What one poll (or the end of polling) did to a job, as its history records it."""

    PENDING = "pending"  # an answer: not finished yet
    ERROR = "error"  # no usable answer: polled again with backoff
    NOT_FOUND = "not_found"  # a 404, not yet confirmed
    FINISHED = "finished"  # a terminal status
    EXPIRED = "expired"
    UNKNOWN = "unknown"
    CANCELLED = "cancelled"


class AttemptOutcome(StrEnum):
    """What one delivery attempt (or a replay) did, as its history records it."""

    DELIVERED = "delivered"
    RETRY = "retry"  # failed: tried again after a backoff, an attempt spent
    DEFERRED = "deferred"  # 429/503 with Retry-After: tried again then, no attempt spent
    DEAD = "dead"  # out of attempts
    REPLAY = "replay"  # queued again by an operator


class IntakeOutcome(StrEnum):
    """What became of one submission (a spool file, an API request), as metrics count it."""

    ACCEPTED = "accepted"
    REJECTED = "rejected"  # refused for its content: the submitter must fix it
    UNAVAILABLE = "unavailable"  # the store could not take it now: try again


@dataclass(frozen=True)
class Submission:
    """One job as submitted, checked (relayd.intake.envelope) and not yet stored."""

    doc_id: str
    provider: str
    metadata: Mapping[str, Any] | None = None
    endpoints: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Job:
    id: int
    provider: str
    doc_id: str
    state: JobState
    metadata: dict[str, Any] | None
    endpoints: tuple[str, ...] | None
    source: str
    submitted_at: float
    next_poll_at: float
    polls: int
    errors: int
    not_found: int
    last_status: str | None
    etag: str | None
    result_status: str | None
    finished_at: float | None
    updated_at: float  # for a job in a final state: when it got there (retention counts from it)
    polls_dropped: int = 0  # polls not kept between the first and the latest (bounded history)

    def as_dict(self) -> dict[str, Any]:
        return {
            "provider": self.provider,
            "docId": self.doc_id,
            "state": str(self.state),
            "metadata": self.metadata,
            "endpoints": list(self.endpoints) if self.endpoints is not None else None,
            "source": self.source,
            "submitted_at": self.submitted_at,
            "next_poll_at": self.next_poll_at if self.state == JobState.POLLING else None,
            "polls": self.polls,
            "last_status": self.last_status,
            "result_status": self.result_status,
            "finished_at": self.finished_at,
            "updated_at": self.updated_at,
        }


@dataclass(frozen=True)
class Delivery:
    id: int
    job_id: int
    endpoint: str
    event: str
    webhook_id: str
    payload: str
    state: DeliveryState
    attempts: int
    next_attempt_at: float
    last_error: str | None
    created_at: float
    delivered_at: float | None
    provider: str  # the job's, for log lines
    doc_id: str
    attempts_dropped: int = 0  # attempts not kept between the first and the latest

    def as_dict(self) -> dict[str, Any]:
        return {
            "endpoint": self.endpoint,
            "event": self.event,
            "webhook_id": self.webhook_id,
            "state": str(self.state),
            "attempts": self.attempts,
            "next_attempt_at": self.next_attempt_at if self.state == "pending" else None,
            "last_error": self.last_error,
            "created_at": self.created_at,
            "delivered_at": self.delivered_at,
        }


@dataclass(frozen=True)
class NewDelivery:
    endpoint: str
    event: str
    payload: str


EVENTS_PROVIDER = "relayd"  # the pseudo-provider of relayd's own operational events


def webhook_id(provider: str, doc_id: str, event: str) -> str:
    """Stable for one job and event, across retries, restarts and endpoints."""
    digest = hashlib.sha256(f"{provider}\0{doc_id}\0{event}".encode()).hexdigest()
    return f"msg_{digest[:32]}"


@dataclass(frozen=True)
class Pruned:
    """What retention removed: jobs, and the rows that went with them."""

    jobs: int = 0
    polls: int = 0
    deliveries: int = 0
    attempts: int = 0

    def __add__(self, other: Pruned) -> Pruned:
        return Pruned(
            self.jobs + other.jobs,
            self.polls + other.polls,
            self.deliveries + other.deliveries,
            self.attempts + other.attempts,
        )

    def as_dict(self) -> dict[str, int]:
        return {
            "jobs": self.jobs,
            "polls": self.polls,
            "deliveries": self.deliveries,
            "attempts": self.attempts,
        }
