"""Edges both stores must meet alike (tests.stores.backend: SQLite, then PostgreSQL): a list cut
for size, text PostgreSQL cannot keep as it is, non-ASCII read back as written, and the byte order
in which a docId's start is found."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from relayd.models import JOB_JSON_BYTES, AttemptOutcome, PollOutcome
from relayd.store import Store
from tests.stores import Backend
from tests.test_store import T0, add, finish


@pytest.fixture
def store(backend: Backend) -> Iterator[Store]:
    """The test's store: SQLite, then PostgreSQL."""
    s = backend.open()
    yield s
    s.close()


def test_a_list_is_cut_for_size_newest_first_and_says_so(store: Store) -> None:
    """list_jobs_within keeps the newest jobs that fit in max_bytes (at least one, however big)
    and flags the cut; without a cut the flag is down."""
    for i in range(5):
        add(store, f"big-{i}", metadata={"blob": "x" * 1000})
    one = JOB_JSON_BYTES + len("big-0") + len('{"blob": "' + "x" * 1000 + '"}')
    jobs, cut = store.list_jobs_within(max_bytes=2 * one + 10)
    assert ([j.doc_id for j in jobs], cut) == (["big-4", "big-3"], True)
    jobs, cut = store.list_jobs_within(max_bytes=1)
    assert ([j.doc_id for j in jobs], cut) == (["big-4"], True)
    jobs, cut = store.list_jobs_within(max_bytes=5 * one)
    assert (len(jobs), cut) == (5, False)
    jobs, cut = store.list_jobs_within(limit=2, max_bytes=10 * one)
    assert ([j.doc_id for j in jobs], cut) == (["big-4", "big-3"], False)
    assert [j.doc_id for j in store.list_jobs(limit=3)] == ["big-4", "big-3", "big-2"]


def test_a_nul_from_a_provider_or_an_endpoint_does_not_stop_the_store(store: Store) -> None:
    """A NUL in a poll's detail, a status or an attempt's error is stored (PostgreSQL's text
    cannot hold it: there it reads back as U+FFFD) instead of failing every later write."""
    job_id = add(store)
    assert store.record_poll(
        job_id, now=T0 + 1, http_status=200, outcome=PollOutcome.PENDING, detail="odd\x00body",
        next_poll_at=T0 + 2, errors=0, not_found=0, last_status="proc\x00", etag='"e\x00"',
    )  # fmt: skip
    assert finish(store, job_id, ("app",), status="do\x00ne")
    [d] = store.deliveries_for(job_id)
    assert store.record_attempt(
        d.id, now=T0 + 20, duration=0.1, status=None, error="reset\x00by peer",
        outcome=AttemptOutcome.RETRY, next_attempt_at=T0 + 30,
    )  # fmt: skip

    def same(read: object, written: str) -> bool:
        return read in (written, written.replace("\x00", "\ufffd"))

    assert same(store.polls_for(job_id)[0]["detail"], "odd\x00body")
    job = store.job_by_id(job_id)
    assert job is not None and same(job.etag, '"e\x00"') and same(job.result_status, "do\x00ne")
    [d] = store.deliveries_for(job_id)
    assert same(d.last_error, "reset\x00by peer")
    assert same(store.attempts_for(d.id)[0]["error"], "reset\x00by peer")


def test_non_ascii_reads_back_as_written(store: Store, backend: Backend) -> None:
    """Metadata, results and details in Armenian read back unchanged, the result's JSON text
    byte for byte as relayd wrote it."""
    job_id = add(store, metadata={"title": "Ժողով", "n": 1})
    assert store.record_poll(
        job_id, now=T0 + 1, http_status=200, outcome=PollOutcome.PENDING, detail="Սպասում",
        next_poll_at=T0 + 2, errors=0, not_found=0,
    )  # fmt: skip
    assert store.finish_job(
        job_id, now=T0 + 10, result_status="done", result={"text": "Բարև", "k": [1, 2.5]},
        deliveries=[], http_status=200, detail=None,
    )  # fmt: skip
    job = store.job_by_id(job_id)
    assert job is not None and job.metadata == {"title": "Ժողով", "n": 1}
    assert store.polls_for(job_id)[0]["detail"] == "Սպասում"
    [(raw,)] = backend.query("SELECT result FROM jobs WHERE id=?", job_id)
    assert raw == '{"text": "Բարև", "k": [1, 2.5]}'


def test_a_doc_id_start_is_found_in_byte_order(store: Store) -> None:
    """`q` finds docIds by their start as bytes compare, whatever PostgreSQL's locale: capitals
    before lower case, '-' and '.' and '_' where ASCII puts them."""
    for doc_id in ("A-1", "a-1", "a.1", "a_1", "a1", "b-1", "a"):
        add(store, doc_id)
    assert sorted(j.doc_id for j in store.jobs_page(q="a")) == ["a", "a-1", "a.1", "a1", "a_1"]
    assert [j.doc_id for j in store.jobs_page(q="a-")] == ["a-1"]
    assert [j.doc_id for j in store.jobs_page(q="A")] == ["A-1"]
