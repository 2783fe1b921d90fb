"""What relayd shows of its jobs from the store alone: totals, a job's detail, the status figures;
on a real SQLite store."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from relayd.config import Config
from relayd.models import AttemptOutcome, NewDelivery, PollOutcome, Submission, webhook_id
from relayd.store import SqliteStore
from relayd.views import job_detail, status_from_store, totals
from tests.conftest import config_dict, make_config

T0 = 1_700_000_000.0


@pytest.fixture
def config(tmp_path: Path) -> Config:
    """Provider `main`; endpoints `app` and `audit` (the ports are never dialled)."""
    return make_config(config_dict(tmp_path, 9, {"app": 9, "audit": 9}), tmp_path)


def add(store: SqliteStore, provider: str, doc_id: str, at: float) -> int:
    [(job, created)] = store.add_jobs([Submission(doc_id, provider)], source="api", now=at)
    assert created
    return job.id


def finish(store: SqliteStore, job_id: int, at: float, *endpoints: str) -> None:
    deliveries = [NewDelivery(e, "transcript_ready", '{"docId": "x"}') for e in endpoints]
    assert store.finish_job(
        job_id,
        now=at,
        result_status="transcribed",
        result={"status": "transcribed"},
        deliveries=deliveries,
        http_status=200,
        detail="done",
    )


def test_totals_sums_each_state_over_names() -> None:
    """{name: {state: n}} adds up per state across names; nothing in, nothing out."""
    by_provider = {"main": {"polling": 2, "delivered": 5}, "other": {"polling": 1, "dead": 1}}
    assert totals(by_provider) == {"polling": 3, "delivered": 5, "dead": 1}
    assert totals({}) == {}
    assert totals({"main": {}}) == {}


def test_job_detail_of_an_unknown_job_is_none(store: SqliteStore) -> None:
    """No such (provider, docId): None, also when the id exists under another provider."""
    add(store, "main", "known", T0)
    assert job_detail(store, "main", "missing") is None
    assert job_detail(store, "other", "known") is None


def test_job_detail_shows_the_job_its_polls_and_each_delivery_with_history(
    store: SqliteStore,
) -> None:
    """The job as a dict, its polls oldest first, each delivery with its attempts oldest first."""
    job_id = add(store, "main", "d1", T0)
    assert store.record_poll(
        job_id,
        now=T0 + 1,
        http_status=200,
        outcome=PollOutcome.PENDING,
        detail="processing",
        next_poll_at=T0 + 5,
        errors=0,
        not_found=0,
        last_status="processing",
    )
    finish(store, job_id, T0 + 5, "app", "audit")
    app, _ = store.deliveries_for(job_id)
    assert store.record_attempt(
        app.id,
        now=T0 + 6,
        duration=0.25,
        status=500,
        error="HTTP 500",
        outcome=AttemptOutcome.RETRY,
        next_attempt_at=T0 + 8,
    )
    assert store.record_attempt(
        app.id, now=T0 + 8, duration=0.5, status=200, error=None, outcome=AttemptOutcome.DELIVERED
    )

    detail = job_detail(store, "main", "d1")
    assert detail is not None
    job = store.get_job("main", "d1")
    assert job is not None
    assert detail["job"] == job.as_dict()
    assert detail["job"]["state"] == "delivering"  # audit still pending
    assert detail["polls"] == [
        {"at": T0 + 1, "http_status": 200, "outcome": "pending", "detail": "processing"},
        {"at": T0 + 5, "http_status": 200, "outcome": "finished", "detail": "done"},
    ]
    [shown_app, shown_audit] = detail["deliveries"]
    assert shown_app == {
        "endpoint": "app",
        "event": "transcript_ready",
        "webhook_id": webhook_id("main", "d1", "transcript_ready"),
        "state": "delivered",
        "attempts": 2,
        "next_attempt_at": None,
        "last_error": None,
        "created_at": T0 + 5,
        "delivered_at": T0 + 8,
        "history": [
            {
                "at": T0 + 6,
                "status": 500,
                "error": "HTTP 500",
                "duration": 0.25,
                "outcome": "retry",
            },
            {"at": T0 + 8, "status": 200, "error": None, "duration": 0.5, "outcome": "delivered"},
        ],
        "history_dropped": 0,
    }
    assert detail["polls_dropped"] == 0
    assert shown_audit["endpoint"] == "audit"
    assert (shown_audit["state"], shown_audit["next_attempt_at"]) == ("pending", T0 + 5)
    assert shown_audit["history"] == []
    json.dumps(detail)  # the API answers it as is


def test_status_counts_jobs_per_provider_and_the_oldest_waiting_age(
    store: SqliteStore, config: Config
) -> None:
    """Jobs by state per provider; oldest_waiting is now minus the oldest polling job's submit."""
    add(store, "main", "old", T0)
    add(store, "main", "new", T0 + 30)
    finish(store, add(store, "main", "done", T0 - 100), T0 + 1)  # no endpoints: delivered

    status = status_from_store(store, config, now=T0 + 42.5)
    assert status["providers"] == {
        "main": {
            "kind": "xosum",
            "jobs": {"polling": 2, "delivered": 1},
            "oldest_waiting_seconds": 42.5,
        }
    }


def test_status_oldest_waiting_is_none_when_nothing_is_polled(
    store: SqliteStore, config: Config
) -> None:
    """A configured provider with no jobs shows empty counts and no oldest age."""
    status = status_from_store(store, config, now=T0)
    db_bytes, wal_bytes = store.disk_usage()
    assert status == {
        "providers": {"main": {"kind": "xosum", "jobs": {}, "oldest_waiting_seconds": None}},
        "endpoints": {
            "app": {"pending": 0, "dead": 0, "delivered": 0},
            "audit": {"pending": 0, "dead": 0, "delivered": 0},
        },
        "store": {"bytes": db_bytes + wal_bytes, "wal_bytes": wal_bytes},
    }
    assert db_bytes > 0


def test_status_shows_a_provider_in_the_store_but_not_in_the_config(
    store: SqliteStore, config: Config
) -> None:
    """A provider since removed from the config still shows, with kind None, sorted by name."""
    add(store, "retired", "r1", T0 - 10)
    add(store, "main", "m1", T0)
    status = status_from_store(store, config, now=T0 + 0.0004)
    assert list(status["providers"]) == ["main", "retired"]
    assert status["providers"]["retired"] == {
        "kind": None,
        "jobs": {"polling": 1},
        "oldest_waiting_seconds": 10.0,
    }
    assert status["providers"]["main"]["oldest_waiting_seconds"] == 0.0  # rounded to ms


def test_status_counts_deliveries_per_endpoint_configured_or_not(
    store: SqliteStore, config: Config
) -> None:
    """Pending, dead and delivered per endpoint; an endpoint only in the store shows too."""
    first = add(store, "main", "a", T0)
    second = add(store, "main", "b", T0)
    finish(store, first, T0 + 1, "app", "audit", "removed")
    finish(store, second, T0 + 1, "app")
    by_endpoint = {d.endpoint: d for d in store.deliveries_for(first)}
    store.record_attempt(
        by_endpoint["app"].id,
        now=T0 + 2,
        duration=0.1,
        status=200,
        error=None,
        outcome=AttemptOutcome.DELIVERED,
    )
    store.record_attempt(
        by_endpoint["audit"].id,
        now=T0 + 2,
        duration=0.1,
        status=500,
        error="HTTP 500",
        outcome=AttemptOutcome.DEAD,
    )
    status = status_from_store(store, config, now=T0 + 3)
    assert status["endpoints"] == {
        "app": {"pending": 1, "dead": 0, "delivered": 1},
        "audit": {"pending": 0, "dead": 1, "delivered": 0},
        "removed": {"pending": 1, "dead": 0, "delivered": 0},
    }
