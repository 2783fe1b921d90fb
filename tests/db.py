"""Read a relayd database behind the store's back: what tests check that relayd itself never
needs to ask (the integrity of the file, a finished job's stored result)."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any


def _query(path: Path, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    db = sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro", uri=True)
    try:
        return db.execute(sql, args).fetchall()
    finally:
        db.close()


def integrity_check(path: Path) -> str:
    """SQLite's own verdict on the file: "ok" or what is broken."""
    return str(_query(path, "PRAGMA integrity_check")[0][0])


def job_result(path: Path, job_id: int) -> Any:
    """The provider's terminal answer stored with a finished job (None before)."""
    rows = _query(path, "SELECT result FROM jobs WHERE id=?", job_id)
    return json.loads(rows[0][0]) if rows and rows[0][0] else None


def pending_endpoints(path: Path) -> set[str]:
    """Endpoints with a delivery still pending."""
    rows = _query(path, "SELECT DISTINCT endpoint FROM deliveries WHERE state='pending'")
    return {r[0] for r in rows}
