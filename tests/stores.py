"""Both stores for one test suite: the `backend` fixture runs a test once on a SQLite file and once
on a PostgreSQL database of its own, so every behaviour the store tests pin holds for both. A
backend opens its store (again: a reopen is a restart), and reads its database behind the store's
back, for what the tests check that relayd itself never asks."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from relayd.store import SqliteStore, Store
from tests.db import integrity_check

BACKENDS = ["sqlite", "postgres"]


class Backend:
    """One kind of store, for one test: opens it, and queries it directly (`?` placeholders)."""

    def __init__(self, name: str, opener: Callable[[bool], Store], location: Path | str) -> None:
        self.name = name
        self._open = opener
        self.location = location  # the SQLite file, or the PostgreSQL URL

    def open(self, *, readonly: bool = False) -> Store:
        return self._open(readonly)

    def query(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        if isinstance(self.location, Path):
            db = sqlite3.connect(f"{self.location.absolute().as_uri()}?mode=ro", uri=True)
            try:
                return db.execute(sql, args).fetchall()
            finally:
                db.close()
        import psycopg

        with psycopg.connect(self.location) as conn:
            return conn.execute(sql.replace("?", "%s"), args).fetchall()

    def rows(self, table: str) -> int:
        return int(self.query(f"SELECT COUNT(*) FROM {table}")[0][0])

    def job_result(self, job_id: int) -> Any:
        """The provider's terminal answer stored with a finished job (None before)."""
        rows = self.query("SELECT result FROM jobs WHERE id=?", job_id)
        return json.loads(rows[0][0]) if rows and rows[0][0] else None

    def pending_endpoints(self) -> set[str]:
        """Endpoints with a delivery still pending."""
        rows = self.query("SELECT DISTINCT endpoint FROM deliveries WHERE state='pending'")
        return {r[0] for r in rows}

    def integrity(self) -> str:
        """SQLite's verdict on its file; PostgreSQL keeps its files whole itself ("ok")."""
        return integrity_check(self.location) if isinstance(self.location, Path) else "ok"


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    """SQLite in the test's directory, then PostgreSQL in a new database (skipped, with the
    reason, where PostgreSQL is not installed; CI installs it)."""
    if request.param == "sqlite":
        path = tmp_path / "state" / "relayd.db"
        return Backend("sqlite", lambda readonly: SqliteStore(path, readonly=readonly), path)
    url: str = request.getfixturevalue("pg_url")  # first: it skips where there is no server
    from relayd.store.postgres import PostgresStore

    return Backend("postgres", lambda readonly: PostgresStore(url, readonly=readonly), url)


@pytest.fixture
def sqlite_store(tmp_path: Path) -> Iterator[SqliteStore]:
    """A SQLite store alone, for what only SQLite has (its file, its pragmas, its plans)."""
    opened = SqliteStore(tmp_path / "state" / "relayd.db")
    yield opened
    opened.close()
