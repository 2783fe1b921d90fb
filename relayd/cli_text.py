"""How the command line prints: aligned columns, times, ages, sizes, and the lines of
`relayd status` that more than one source (the daemon's API, the database) fills."""

from __future__ import annotations

import time
from typing import Any


def table(rows: list[list[Any]], headers: list[str]) -> str:
    """Aligned columns for a terminal; a column of numbers is right-aligned, header included."""
    cells = [headers] + [["-" if v is None else str(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    numeric = [
        bool(rows) and all(isinstance(row[i], int | float) or row[i] is None for row in rows)
        for i in range(len(headers))
    ]
    return "\n".join(
        "  ".join(
            c.rjust(w) if num else c.ljust(w) for c, w, num in zip(r, widths, numeric, strict=True)
        ).rstrip()
        for r in cells
    )


def when(ts: float | None) -> str | None:
    if ts is None:
        return None
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def age(seconds: float | None) -> str | None:
    if seconds is None:
        return None
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 120:
        return f"{seconds:.1f}s"
    if seconds < 7200:
        return f"{seconds / 60:.1f}m"
    return f"{seconds / 3600:.1f}h"


def key_rows(providers: dict[str, Any]) -> list[list[Any]]:
    """One row per API key (providers sharing a key share its budget): its use of the window,
    the jobs on it, how often each is polled, and how long the due backlog takes to clear."""
    keys: dict[str, list[Any]] = {}
    for name, p in providers.items():
        b = p.get("budget")
        if not b:
            continue
        if b["key"] in keys:
            keys[b["key"]][1] += f",{name}"
            continue
        used = f"{b['budget_used']}/{b['rate_limit']} per {age(b['rate_window'])}"
        shared = b.get("shared") or {}
        if "used_by_all" in shared:  # the key's use by every instance, from Redis
            used = f"{shared['used_by_all']}/{b['rate_limit']} by {shared['instances']} relayd"
        keys[b["key"]] = [
            b["key"],
            name,
            used,
            b["jobs_in_flight"],
            f"every {age(b['poll_interval_effective'])}" if b["jobs_in_flight"] else "-",
            b["due_now"],
            age(b["backlog_clear_seconds"]),
        ]
    return list(keys.values())


def store_line(store: dict[str, Any]) -> str:
    """The database's size and, from a running daemon, what retention removed."""
    line = f"database {size_text(store['bytes'])} (WAL {size_text(store['wal_bytes'])})"
    removed = (store.get("retention") or {}).get("removed")
    if removed is not None:
        line += (
            f"; retention removed {removed['jobs']} job(s), {removed['polls']} poll(s),"
            f" {removed['deliveries']} delivery(ies), {removed['attempts']} attempt(s)"
            " since start"
        )
    return line


def size_text(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    size = n / 1024
    for unit in ("KB", "MB"):
        if size < 1024:
            return f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GB"
