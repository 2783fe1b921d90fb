"""What only the PostgreSQL store has (the behaviour it shares with SQLite is pinned by
tests/test_store.py on both): relayd's own schema migration, safe when relays start together; a
server that stops and comes back; relays claiming jobs and deliveries from one another; a password
never shown."""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Iterator
from contextlib import closing

import pytest

from relayd.errors import StoreError
from relayd.models import AttemptOutcome, JobState, NewDelivery, Submission
from tests import pg
from tests.pg import PASSWORD, SUPERUSER, PgCluster
from tests.test_store import T0, add

pytest.importorskip("psycopg", reason="psycopg, the postgres extra, is not installed")
import psycopg

from relayd.store.postgres import PostgresStore
from relayd.store.postgres_schema import LOCK_SPACE, PRUNE_LOCK, SCHEMA, TABLES

SERVER_GONE = 2.0  # seconds a call may take to fail once the server is stopped


def query(url: str, sql: str) -> list[tuple[object, ...]]:
    with psycopg.connect(url) as conn:
        return conn.execute(sql.encode()).fetchall()


def test_without_the_server_a_laptop_skips_and_ci_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    """No initdb anywhere: the PostgreSQL tests skip, saying what to install; with CI set they
    fail instead, so CI cannot pass without having run them."""
    monkeypatch.setattr(pg, "bindir", lambda: None)
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="apt-get install postgresql"):
        pg.server_binaries()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI must run the PostgreSQL store tests"):
        pg.server_binaries()


@pytest.fixture
def store(pg_url: str) -> Iterator[PostgresStore]:
    s = PostgresStore(pg_url)
    yield s
    s.close()


def test_relays_starting_together_make_one_schema(pg_url: str) -> None:
    """Four stores opening one empty database at the same moment: each waits for the first to
    migrate it (an advisory lock), none fails, and the schema is there once, at its version."""
    start = threading.Barrier(4)
    opened: list[PostgresStore] = []
    failures: list[BaseException] = []

    def open_one() -> None:
        start.wait()
        try:
            opened.append(PostgresStore(pg_url))
        except BaseException as exc:  # reported by the assertion below
            failures.append(exc)

    threads = [threading.Thread(target=open_one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    try:
        assert failures == [] and len(opened) == 4
        assert query(pg_url, "SELECT version FROM schema_version ORDER BY version") == [
            (n,) for n in range(1, len(SCHEMA) + 1)
        ]
        tables = query(
            pg_url,
            "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()"
            " ORDER BY tablename",
        )
        assert [t for (t,) in tables] == sorted([*TABLES, "schema_version"])
        [(job, created)] = opened[0].add_jobs([Submission("d", "xosum")], source="api", now=T0)
        assert created and opened[3].job_by_id(job.id) == job
    finally:
        for s in opened:
            s.close()


def test_reopening_does_not_migrate_again(pg_url: str) -> None:
    """An up-to-date database keeps its schema version rows and its data when opened again."""
    first = PostgresStore(pg_url)
    job_id = add(first)
    first.close()
    before = query(pg_url, "SELECT version, applied_at FROM schema_version")
    second = PostgresStore(pg_url)
    try:
        assert query(pg_url, "SELECT version, applied_at FROM schema_version") == before
        assert second.job_by_id(job_id) is not None
    finally:
        second.close()


def test_a_readonly_store_refuses_a_database_relayd_never_set_up(pg_url: str) -> None:
    """The CLI's read-only views do not create tables; an empty database is a StoreError."""
    with pytest.raises(StoreError, match="no relayd tables"):
        PostgresStore(pg_url, readonly=True)
    assert query(pg_url, "SELECT to_regclass('schema_version')") == [(None,)]


def test_text_reads_back_byte_for_byte(store: PostgresStore, pg_url: str) -> None:
    """A result is stored as the JSON relayd wrote, Armenian as it is (text, not jsonb)."""
    job_id = add(store, metadata={"b": 1, "a": "Երևան"})
    result = {"z": 1, "text": "Բարև ձեզ", "a": [1.5, None]}
    assert store.finish_job(
        job_id, now=T0 + 1, result_status="done", result=result, deliveries=[],
        http_status=200, detail=None,
    )  # fmt: skip
    [(stored, metadata)] = query(pg_url, f"SELECT result, metadata FROM jobs WHERE id={job_id}")
    assert stored == '{"z": 1, "text": "Բարև ձեզ", "a": [1.5, null]}'
    assert metadata == '{"b": 1, "a": "\\u0535\\u0580\\u0587\\u0561\\u0576"}'


def test_a_doc_id_start_is_found_through_an_index(store: PostgresStore, pg_url: str) -> None:
    """The console's search by the start of a docId is a range on jobs_by_doc (byte order)."""
    for i in range(20):
        add(store, f"page-{i:03d}")
    with psycopg.connect(pg_url) as conn:
        conn.execute("SET enable_seqscan = off")
        plan = " ".join(
            str(r[0])
            for r in conn.execute(
                "EXPLAIN SELECT id FROM jobs WHERE doc_id>=%s AND doc_id<%s ORDER BY id DESC",
                ("page-01", "page-01\U0010ffff"),
            )
        )
    assert "jobs_by_doc" in plan, plan


def test_vacuum_gives_a_pruned_tables_space_back(store: PostgresStore) -> None:
    """`relayd vacuum` on PostgreSQL: with every transcript pruned, VACUUM cuts the tables'
    empty pages off, and disk_usage (relayd's tables alone, no WAL of ours) says so."""
    for i in range(100):
        job_id = add(store, f"d{i}")
        store.finish_job(
            job_id, now=T0 + 10, result_status="done", result={"t": secrets.token_hex(10_000)},
            deliveries=[], http_status=200, detail=None,
        )  # fmt: skip
    full, wal = store.disk_usage()
    assert wal == 0 and full > 100 * 20_000
    while store.prune(ended_before=T0 + 11, dead_before=None, limit=64).jobs:
        pass
    store.vacuum()
    emptied, _ = store.disk_usage()
    assert emptied < full / 2
    add(store, "after")  # the store goes on as before (the statement timeout is back)
    assert store.get_job("xosum", "after") is not None


def test_a_stopped_server_is_a_store_error_not_a_hang_and_its_return_is_used(
    pg_cluster: PgCluster, pg_url: str
) -> None:
    """The server stops: every call fails at once with StoreError (no password in it), reads and
    writes alike; once it is back, the same store reconnects and goes on with the same data."""
    store = PostgresStore(pg_url)
    store._link.reconnect_pause = 0.2
    try:
        job_id = add(store)
        pg_cluster.stop()
        try:
            for call in (
                lambda: store.get_job("xosum", "doc-1"),
                lambda: store.add_jobs([Submission("d2", "xosum")], source="api", now=T0),
                lambda: store.probe_write(T0),
                lambda: store.job_counts(),
            ):
                started = time.monotonic()
                with pytest.raises(StoreError) as info:
                    call()
                assert time.monotonic() - started < SERVER_GONE
                assert PASSWORD not in str(info.value)
        finally:
            pg_cluster.start()
        deadline = time.monotonic() + 10
        while True:
            try:
                job = store.job_by_id(job_id)
                break
            except StoreError:
                assert time.monotonic() < deadline, "the store did not reconnect"
                time.sleep(0.1)
        assert job is not None and job.doc_id == "doc-1"
        assert add(store, "after-restart")
    finally:
        store.close()


def test_a_wrong_password_or_port_fails_fast_without_the_password(
    pg_cluster: PgCluster, pg_url: str
) -> None:
    """What libpq says of a refused connection reaches the operator; the password does not."""
    wrong = pg_url.replace(PASSWORD, "Wr0ng-pw-77")
    with pytest.raises(StoreError, match="password authentication failed") as info:
        PostgresStore(wrong)
    assert "Wr0ng-pw-77" not in str(info.value) and "relayd@127.0.0.1" in str(info.value)
    closed = pg_url.replace(f":{pg_cluster.port}/", ":1/")
    started = time.monotonic()
    with pytest.raises(StoreError, match="cannot connect to PostgreSQL") as info:
        PostgresStore(closed)
    assert time.monotonic() - started < SERVER_GONE
    assert PASSWORD not in str(info.value)


LEASE = 0.4  # seconds a claim lasts unrenewed, in these tests


def relay(url: str, name: str) -> PostgresStore:
    return PostgresStore(url, relay=name, lease=LEASE)


def finish(store: PostgresStore, job_id: int) -> None:
    assert store.finish_job(
        job_id,
        now=T0 + 1,
        result_status="done",
        result={"text": "hi"},
        deliveries=[NewDelivery("app", "transcript_ready", "{}")],
        http_status=200,
        detail=None,
    )


def test_relays_claim_disjoint_jobs_and_take_a_silent_ones_over_after_its_lease(
    pg_url: str,
) -> None:
    """Two relays alive share the jobs evenly and without overlap, each only its providers';
    once a relay stops renewing, its jobs are free a lease later (the database's clock), the
    other takes them all, and the first's next heartbeat names them lost."""
    a, b = relay(pg_url, "a"), relay(pg_url, "b")
    try:
        assert a.heartbeat([], ["xosum"]).relays == 1
        assert b.heartbeat([], ["xosum"]).relays == 2
        ids = {add(a, f"j-{i}") for i in range(10)}
        add(a, "other", provider="aitronos")
        claimed, left = a.claim_jobs(["xosum"])
        mine = {i for i, _, _ in claimed}
        assert (len(mine), left) == (5, 5)  # half of what is free: two relays are alive
        claimed, left = b.claim_jobs(["xosum"])
        theirs = {i for i, _, _ in claimed}
        assert (theirs | mine, left) == (ids, 0) and not mine & theirs
        assert a.claim_jobs(["xosum"]) == ([], 0)
        beat = a.heartbeat(sorted(mine), ["xosum"])
        assert (beat.relays, beat.polling, beat.lost) == (2, 10, set())
        deadline = time.monotonic() + 10
        while (beat := b.heartbeat(sorted(theirs), ["xosum"])).relays > 1:  # a says nothing
            assert time.monotonic() < deadline, "a's lease never ran out"
            time.sleep(LEASE / 4)
        claimed, left = b.claim_jobs(["xosum"])  # alone now: its share is all ten
        assert ({i for i, _, _ in claimed}, left) == (mine, 0)
        assert a.heartbeat(sorted(mine), ["xosum"]).lost == mine
        assert [r["name"] for r in b.relays()] == ["a", "b"]
    finally:
        a.close()
        b.close()


def test_relays_claiming_at_once_never_take_the_same_job(pg_url: str) -> None:
    """Eight relays claiming 100 jobs at the same moment (SKIP LOCKED): every job goes to
    exactly one of them."""
    with closing(PostgresStore(pg_url)) as store:
        for i in range(100):
            add(store, f"c-{i}")
    stores = [relay(pg_url, f"r{i}") for i in range(8)]
    for s in stores:
        s.heartbeat([], ["xosum"])
    start = threading.Barrier(len(stores))
    got: list[list[int]] = [[] for _ in stores]

    def claim(n: int) -> None:
        start.wait()
        while (batch := stores[n].claim_jobs(["xosum"], greedy=True))[0]:
            got[n] += [i for i, _, _ in batch[0]]

    threads = [threading.Thread(target=claim, args=(n,)) for n in range(len(stores))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for s in stores:
        s.close()
    every = [i for ids in got for i in ids]
    assert len(every) == len(set(every)) == 100
    assert sum(1 for ids in got if ids) > 1  # shared out, not one relay's


def test_a_delivery_is_claimed_for_one_attempt_and_retaken_after_its_lease(pg_url: str) -> None:
    """A due delivery goes to one relay; the other sees none until the attempt is recorded
    (the claim ends) or the claimer goes silent for a lease: then it is sent again, with the
    same webhook-id."""
    a, b = relay(pg_url, "a"), relay(pg_url, "b")
    try:
        finish(a, add(a, "d-1"))
        [first] = a.due_deliveries("app", T0 + 2, 10)
        assert b.due_deliveries("app", T0 + 2, 10) == []
        assert [d.id for d in a.due_deliveries("app", T0 + 2, 10)] == [first.id]  # its own
        assert a.record_attempt(
            first.id, now=T0 + 2, duration=0.1, status=500, error="HTTP 500",
            outcome=AttemptOutcome.RETRY, next_attempt_at=T0 + 2,
        )  # fmt: skip
        [again] = b.due_deliveries("app", T0 + 3, 10)  # the claim ended with the attempt
        assert again.id == first.id
        deadline = time.monotonic() + 10
        while not (taken := a.due_deliveries("app", T0 + 3, 10)):
            assert time.monotonic() < deadline, "b's claim never ran out"
            time.sleep(LEASE / 4)
        assert taken[0].webhook_id == first.webhook_id
    finally:
        a.close()
        b.close()


def test_one_relay_prunes_at_a_time(pg_url: str) -> None:
    """While one relay's pruning transaction runs, another's pass removes nothing (it does not
    wait either); afterwards it prunes."""
    with closing(PostgresStore(pg_url)) as store:
        job_id = add(store, "p-1")
        store.end_job(job_id, JobState.CANCELLED, now=T0, detail="x")
        with psycopg.connect(pg_url) as holder:
            holder.execute("SELECT pg_advisory_xact_lock(%s, %s)", (LOCK_SPACE, PRUNE_LOCK))
            assert store.prune(ended_before=T0 + 1, dead_before=None, limit=10).jobs == 0
        assert store.prune(ended_before=T0 + 1, dead_before=None, limit=10).jobs == 1


def test_the_time_bounds_are_defaults_the_url_may_change(pg_url: str) -> None:
    """relayd's session sets a 5 s statement and lock timeout (VACUUM lifts it for itself
    only); an operator's value in the URL (libpq `options`) wins over it."""

    def setting(store: PostgresStore, name: str) -> str:
        [(value,)] = store._link.read(f"SHOW {name}")
        return str(value)

    store = PostgresStore(pg_url)
    try:
        assert (setting(store, "statement_timeout"), setting(store, "lock_timeout")) == ("5s", "5s")
        assert setting(store, "default_transaction_read_only") == "off"
        store.vacuum()  # lifts the statement timeout for itself only
        assert setting(store, "statement_timeout") == "5s"
    finally:
        store.close()
    store = PostgresStore(pg_url + "?options=-c%20statement_timeout%3D7000&connect_timeout=9")
    try:
        assert setting(store, "statement_timeout") == "7s"
    finally:
        store.close()


def test_a_role_without_create_rights_uses_a_store_set_up_before(
    pg_cluster: PgCluster, pg_url: str
) -> None:
    """Where a DBA set the schema up (or relayd did, as its owner) and relayd runs as a role
    that may only read and write rows, it starts and works: an up-to-date schema asks for no
    CREATE right."""
    PostgresStore(pg_url).close()  # the owner sets it up
    role = f"relayd_rows_{threading.get_native_id()}"
    database = pg_url.rsplit("/", 1)[1]
    pg_cluster.admin(f"CREATE ROLE {role} LOGIN PASSWORD '{PASSWORD}'")
    try:
        with psycopg.connect(pg_url, autocommit=True) as conn:
            conn.execute(f"REVOKE CREATE ON SCHEMA public FROM PUBLIC, {role}".encode())
            rights = "SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public"
            conn.execute(f"GRANT {rights} TO {role}".encode())
        url = pg_url.replace(f"//{SUPERUSER}:", f"//{role}:", 1)
        store = PostgresStore(url)
        try:
            job_id = add(store)
            assert store.job_by_id(job_id) is not None
            assert store.prune(ended_before=T0 + 1, dead_before=None, limit=10).jobs == 0
        finally:
            store.close()
    finally:
        pg_cluster.admin(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")
        pg_cluster.admin(f"DROP ROLE {role}")
