"""relayd's value objects: what a job and a delivery show as JSON, the webhook id, final states."""

from __future__ import annotations

import hashlib
import re
from typing import Any

import pytest

from relayd.models import (
    FINAL_JOB_STATES,
    Delivery,
    DeliveryState,
    Job,
    JobState,
    webhook_id,
)


def make_job(state: JobState, **fields: Any) -> Job:
    values: dict[str, Any] = {
        "id": 7,
        "provider": "main",
        "doc_id": "doc-1",
        "state": state,
        "metadata": {"order": 42, "name": "Անի"},
        "endpoints": ("app", "audit"),
        "source": "spool",
        "submitted_at": 1_000.0,
        "next_poll_at": 1_030.5,
        "polls": 3,
        "errors": 1,
        "not_found": 0,
        "last_status": "processing",
        "etag": '"abc"',
        "result_status": None,
        "finished_at": None,
        "updated_at": 1_020.0,
    }
    values.update(fields)
    return Job(**values)


def make_delivery(state: DeliveryState, **fields: Any) -> Delivery:
    values: dict[str, Any] = {
        "id": 3,
        "job_id": 7,
        "endpoint": "app",
        "event": "transcript_ready",
        "webhook_id": "msg_0123",
        "payload": '{"docId": "doc-1"}',
        "state": state,
        "attempts": 2,
        "next_attempt_at": 1_200.0,
        "last_error": "HTTP 500",
        "created_at": 1_100.0,
        "delivered_at": None,
        "provider": "main",
        "doc_id": "doc-1",
    }
    values.update(fields)
    return Delivery(**values)


def test_job_as_dict_shows_every_public_field_while_polling() -> None:
    """A polling job's dict: docId, state as a string, endpoints as a list, next_poll_at kept."""
    assert make_job(JobState.POLLING).as_dict() == {
        "provider": "main",
        "docId": "doc-1",
        "state": "polling",
        "metadata": {"order": 42, "name": "Անի"},
        "endpoints": ["app", "audit"],
        "source": "spool",
        "submitted_at": 1_000.0,
        "next_poll_at": 1_030.5,
        "polls": 3,
        "last_status": "processing",
        "result_status": None,
        "finished_at": None,
        "updated_at": 1_020.0,
    }


@pytest.mark.parametrize("state", [s for s in JobState if s != JobState.POLLING])
def test_job_as_dict_drops_next_poll_at_once_not_polling(state: JobState) -> None:
    """In every state but polling, next_poll_at is None (the job will not be polled again)."""
    shown = make_job(state, result_status="transcribed", finished_at=1_050.0).as_dict()
    assert shown["next_poll_at"] is None
    assert shown["state"] == str(state)
    assert (shown["result_status"], shown["finished_at"]) == ("transcribed", 1_050.0)


def test_job_as_dict_keeps_no_endpoints_apart_from_internal_fields() -> None:
    """endpoints None stays None (not []); id, etag, errors and not_found are never shown."""
    shown = make_job(JobState.POLLING, endpoints=None, metadata=None).as_dict()
    assert shown["endpoints"] is None and shown["metadata"] is None
    assert not {"id", "etag", "errors", "not_found", "doc_id"} & set(shown)


def test_delivery_as_dict_while_pending() -> None:
    """A pending delivery shows when it is next tried, its attempts and last error."""
    assert make_delivery(DeliveryState.PENDING).as_dict() == {
        "endpoint": "app",
        "event": "transcript_ready",
        "webhook_id": "msg_0123",
        "state": "pending",
        "attempts": 2,
        "next_attempt_at": 1_200.0,
        "last_error": "HTTP 500",
        "created_at": 1_100.0,
        "delivered_at": None,
    }


@pytest.mark.parametrize(
    "state", [DeliveryState.DELIVERED, DeliveryState.DEAD, DeliveryState.CANCELLED]
)
def test_delivery_as_dict_drops_next_attempt_at_once_settled(state: DeliveryState) -> None:
    """Delivered, dead or cancelled: next_attempt_at is None; payload and ids are never shown."""
    shown = make_delivery(state, delivered_at=1_300.0).as_dict()
    assert shown["next_attempt_at"] is None
    assert shown["state"] == str(state)
    assert shown["delivered_at"] == 1_300.0
    assert not {"payload", "id", "job_id", "provider", "doc_id"} & set(shown)


def test_webhook_id_is_stable_for_one_job_and_event() -> None:
    """The same (provider, docId, event) gives the same `msg_` + 32 hex id every time."""
    first = webhook_id("main", "doc-1", "transcript_ready")
    assert first == webhook_id("main", "doc-1", "transcript_ready")
    assert re.fullmatch(r"msg_[0-9a-f]{32}", first)
    # pinned: ids already handed to receivers must not change across versions
    digest = hashlib.sha256(b"main\0doc-1\0transcript_ready").hexdigest()
    assert first == "msg_" + digest[:32]


def test_webhook_id_differs_across_events_providers_and_jobs() -> None:
    """Another event, provider or docId is another id; the separator keeps fields apart."""
    ids = {
        webhook_id("main", "doc-1", "transcript_ready"),
        webhook_id("main", "doc-1", "transcription.completed"),
        webhook_id("other", "doc-1", "transcript_ready"),
        webhook_id("main", "doc-2", "transcript_ready"),
        webhook_id("mai", "ndoc-1", "transcript_ready"),  # same characters, other split
    }
    assert len(ids) == 5


def test_final_job_states_are_every_state_but_polling_and_delivering() -> None:
    """A job is final once delivered, failed, expired, unknown, cancelled or dead."""
    assert {
        JobState.DELIVERED,
        JobState.FAILED,
        JobState.EXPIRED,
        JobState.UNKNOWN,
        JobState.CANCELLED,
        JobState.DEAD,
    } == FINAL_JOB_STATES
    assert JobState.POLLING not in FINAL_JOB_STATES
    assert JobState.DELIVERING not in FINAL_JOB_STATES
