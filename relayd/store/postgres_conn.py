"""The one connection a PostgreSQL store talks through: how it is opened (time bounds, read-only),
how a transaction is run and ended, how its errors become `StoreError` with the password left out,
and how it comes back after the server went away. psycopg is imported here and in `postgres.py`
only, so relayd without the `postgres` extra still imports.

The store is called on the event loop, as SQLite's is, so a call that hangs stops relayd (and
systemd's watchdog, WatchdogSec=30s, kills it). What bounds a call (each a default the URL may
override, e.g. `?connect_timeout=10&options=-c%20statement_timeout%3D20000`):
- `connect_timeout` 3 s: a server that does not answer a connection;
- `statement_timeout` and `lock_timeout` 5 s (SQLite's busy timeout is 5 s too): a query or a
  lock wait that takes too long; only `vacuum` lifts it;
- TCP keepalives (5 s idle, then 3 probes 2 s apart) and `tcp_user_timeout` 10 s, on both ends:
  a server or a relay that vanished (a lost machine, a cut network) breaks the connection within
  about 11 s, not TCP's 15 minutes, and the server frees the vanished relay's locks as soon;
- after a connect fails, calls fail at once for `RECONNECT_PAUSE` (5 s) instead of each waiting
  out the connect timeout: the event loop is held at most 3 s in every 8 while the server is away.
A stopped server (its socket closed) fails a call at once. A call on a broken connection raises
`StoreError`; the next call opens a new connection (after a failed connect, once the pause is
over).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from typing import Any
from urllib.parse import urlsplit

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.rows import TupleRow

from relayd.errors import StoreError

Cursor = psycopg.Cursor[TupleRow]
MASK = "********"
CONNECT_TIMEOUT = 3  # seconds (libpq's least is 2)
STATEMENT_TIMEOUT_MS = 5000
RECONNECT_PAUSE = 5.0  # seconds calls fail at once after a connect failed
# Server settings for relayd's sessions, sent at connect (libpq `options`).
SESSION = {
    "statement_timeout": str(STATEMENT_TIMEOUT_MS),
    "lock_timeout": str(STATEMENT_TIMEOUT_MS),
    # a transaction left open (a bug) does not hold its locks for ever
    "idle_in_transaction_session_timeout": "60000",
    "tcp_keepalives_idle": "5",
    "tcp_keepalives_interval": "2",
    "tcp_keepalives_count": "3",
    "tcp_user_timeout": "10000",
}
CLIENT = {
    "connect_timeout": str(CONNECT_TIMEOUT),
    "keepalives": "1",
    "keepalives_idle": "5",
    "keepalives_interval": "2",
    "keepalives_count": "3",
    "tcp_user_timeout": "10000",
    "application_name": "relayd",
    "client_encoding": "UTF8",
}


def conninfo_of(url: str) -> dict[str, Any]:
    """libpq's reading of a store URL. ValueError when it cannot read it; its message never
    holds the password."""
    try:
        return conninfo_to_dict(url)
    except psycopg.Error as exc:
        raise ValueError(f"not a URL libpq can read: {mask(str(exc).strip(), url)}") from None


def mask(text: str, url: str) -> str:
    """`text` with the URL's password masked, as written and as decoded (a `%40` is an '@')."""
    try:
        decoded = conninfo_to_dict(url).get("password")
    except psycopg.Error:
        decoded = None
    try:
        raw = urlsplit(url).password
    except ValueError:
        raw = None
    for secret in sorted({str(decoded or ""), raw or ""}, key=len, reverse=True):
        if secret:
            text = text.replace(secret, MASK)
    return text


def describe(url: str) -> str:
    """Where a store is, for messages: user@host:port/dbname, never the password."""
    params = conninfo_of(url)
    host = params.get("host") or "localhost"
    user = f"{params['user']}@" if params.get("user") else ""
    port = f":{params['port']}" if params.get("port") else ""
    return f"{user}{host}{port}/{params.get('dbname', '')}"


class Link:
    """A psycopg connection with autocommit off, opened again when it broke."""

    def __init__(self, url: str, *, readonly: bool = False) -> None:
        self._url = url
        self.where = describe(url)
        # relayd's bounds, unless the URL says otherwise: an operator's value wins (a later
        # `-c` in options overrides an earlier one)
        params = conninfo_of(url)
        client = {name: value for name, value in CLIENT.items() if name not in params}
        settings = dict(SESSION, default_transaction_read_only="on" if readonly else "off")
        options = [f"-c {name}={value}" for name, value in settings.items()]
        options.append(params.get("options", ""))
        self._conninfo = make_conninfo(url, **client, options=" ".join(filter(None, options)))
        self._conn: psycopg.Connection[TupleRow] | None = None
        self._retry_at = 0.0
        self._last_problem = ""
        self.reconnect_pause = RECONNECT_PAUSE
        self.connection()  # fail now, not at the first call, when the store cannot be used

    @property
    def conninfo(self) -> str:
        return self._conninfo

    def close(self) -> None:
        if self._conn is not None:
            with suppress(psycopg.Error):
                self._conn.close()
            self._conn = None

    def safe(self, exc: BaseException) -> str:
        """An error's text as a StoreError may carry it: on one line (libpq adds hints on
        lines of their own; a log line is one event), the password masked."""
        return " ".join(mask(str(exc), self._url).split())

    def connection(self) -> psycopg.Connection[TupleRow]:
        """The open connection, or a new one; StoreError when none can be had now."""
        if self._conn is not None and not self._conn.closed and not self._conn.broken:
            return self._conn
        self.close()
        now = time.monotonic()
        if now < self._retry_at:
            raise StoreError(f"PostgreSQL at {self.where} is unreachable: {self._last_problem}")
        try:
            conn = psycopg.connect(self._conninfo, autocommit=False)
        except psycopg.Error as exc:
            self._retry_at = now + self.reconnect_pause
            self._last_problem = self.safe(exc)
            raise StoreError(
                f"cannot connect to PostgreSQL at {self.where}: {self._last_problem}"
            ) from None
        try:
            self._check(conn)
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        return conn

    def _check(self, conn: psycopg.Connection[TupleRow]) -> None:
        """What a new connection must have before relayd uses it: a UTF8 database (transcripts
        are not Latin-1)."""
        try:
            encoding = conn.execute("SHOW server_encoding").fetchone()
            conn.rollback()
        except psycopg.Error as exc:
            raise StoreError(f"PostgreSQL at {self.where}: {self.safe(exc)}") from None
        name = encoding[0] if encoding else "unknown"
        if name != "UTF8":
            raise StoreError(
                f"PostgreSQL at {self.where}: the database's encoding is {name}; relayd"
                " needs UTF8 (CREATE DATABASE … ENCODING 'UTF8')"
            )

    def _failed(self, exc: psycopg.Error) -> StoreError:
        """End what the failed call left open; the error to raise."""
        conn = self._conn
        if conn is not None:
            if conn.closed or conn.broken:
                self.close()  # the next call connects again
            else:
                with suppress(psycopg.Error):
                    conn.rollback()
        return StoreError(self.safe(exc))

    def read(self, sql: str, args: Sequence[Any] = ()) -> list[TupleRow]:
        """Every row of one query; its transaction is ended at once, so no snapshot (and no
        lock) is held between two calls."""
        conn = self.connection()
        try:
            rows = conn.execute(sql, args).fetchall()
            conn.rollback()
        except psycopg.Error as exc:
            raise self._failed(exc) from exc
        return rows

    @contextmanager
    def write(self, *, synced: bool = True) -> Iterator[psycopg.Cursor[TupleRow]]:
        """One transaction, committed when the block ends, rolled back if it raises (a rollback
        that fails cannot mask the first error); psycopg errors surface as StoreError.

        `synced=False`: the commit does not wait for the WAL to reach the disk
        (synchronous_commit off, this transaction only): a server crash can lose the newest such
        commits, never one made before a synced commit. For changes nobody is told about."""
        conn = self.connection()
        try:
            cur = conn.cursor()
            if not synced:
                cur.execute("SET LOCAL synchronous_commit TO off")
            yield cur
            conn.commit()
        except psycopg.Error as exc:
            raise self._failed(exc) from exc
        except BaseException:
            with suppress(psycopg.Error):
                conn.rollback()
            raise

    def autocommit(self, sql: str) -> None:
        """A statement that cannot run in a transaction (VACUUM), with no time limit."""
        conn = self.connection()
        try:
            conn.autocommit = True
            try:
                conn.execute("SET statement_timeout = 0")
                conn.execute(sql)
            finally:
                conn.execute("RESET statement_timeout")
                conn.autocommit = False
        except psycopg.Error as exc:
            raise self._failed(exc) from exc
