"""`relayd migrate-store`: copy a relay's SQLite file into the PostgreSQL store its config names,
so that a relay (and then several) continues there with every job, delivery and budget.

Run with relayd stopped (the command refuses while the daemon answers). Everything goes in one
PostgreSQL transaction: a copy that fails leaves the store as it was, and the SQLite file is
never changed. Ids are kept (a job's webhook-id does not depend on them, but `relayd show` and
the console's links do), and each table's identity is moved past the highest id copied. A store
that already holds jobs is refused: merging two relays' histories is not a copy.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path

import psycopg

from relayd.errors import StoreError
from relayd.store.postgres import PostgresStore

# In the order foreign keys need; run_times and budgets stand alone.
TABLES = ("jobs", "polls", "deliveries", "attempts", "budgets", "run_times")
IDENTITY = {"jobs", "polls", "deliveries", "attempts", "run_times"}  # `id` made by the database
BATCH = 1000


def migrate(
    source: Path, target: PostgresStore, *, say: Callable[[str], None] = print
) -> dict[str, int]:
    """Copy every row of TABLES from the SQLite file `source` into `target`; rows per table."""
    if not source.exists():
        raise StoreError(f"no SQLite database at {source}: nothing to migrate")
    db = sqlite3.connect(f"{source.absolute().as_uri()}?mode=ro", uri=True)
    try:
        return _copy(db, target, say)
    except sqlite3.Error as exc:
        raise StoreError(f"cannot read {source}: {exc}") from None
    finally:
        db.close()


def _copy(
    db: sqlite3.Connection, target: PostgresStore, say: Callable[[str], None]
) -> dict[str, int]:
    copied: dict[str, int] = {}
    with target._link.write() as cur:
        [(held,)] = cur.execute("SELECT count(*) FROM jobs").fetchall()
        if held:
            raise StoreError(
                f"the store at {target.where} already holds {held} job(s): migrate-store copies"
                " into an empty store only"
            )
        for table in TABLES:
            theirs = {r[1] for r in db.execute(f"PRAGMA table_info({table})")}
            ours = [
                r[0]
                for r in cur.execute(
                    "SELECT column_name FROM information_schema.columns"
                    " WHERE table_schema = current_schema() AND table_name = %s"
                    " ORDER BY ordinal_position",
                    (table,),
                ).fetchall()
            ]
            columns = [c for c in ours if c in theirs]
            names = ", ".join(columns)
            overriding = " OVERRIDING SYSTEM VALUE" if table in IDENTITY else ""
            insert = (
                f"INSERT INTO {table} ({names}){overriding}"
                f" VALUES ({', '.join(['%s'] * len(columns))})"
            )
            rows = db.execute(f"SELECT {names} FROM {table} ORDER BY rowid")
            count = 0
            while batch := rows.fetchmany(BATCH):
                try:
                    cur.executemany(insert, [_clean(row) for row in batch])
                except psycopg.Error as exc:
                    raise StoreError(f"cannot copy {table}: {target.safe(exc)}") from None
                count += len(batch)
            if table in IDENTITY:
                [(top,)] = cur.execute(f"SELECT coalesce(max(id), 0) FROM {table}").fetchall()
                cur.execute(f"ALTER TABLE {table} ALTER COLUMN id RESTART WITH {int(top) + 1}")
            copied[table] = count
            say(f"{table}: {count} row(s)")
    return copied


def _clean(row: tuple[object, ...]) -> tuple[object, ...]:
    """A SQLite row as PostgreSQL's text takes it: a NUL (which SQLite keeps) becomes U+FFFD."""
    return tuple(v.replace("\x00", "\ufffd") if isinstance(v, str) else v for v in row)
