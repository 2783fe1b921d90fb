"""What relayd shows of its jobs, built from the store alone: a job with its history, and the
status figures the database can tell. The API serves them while the daemon runs; the CLI builds
them itself when it is stopped."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from relayd.config import Config, parse_duration
from relayd.store import Store


def totals(by_name: dict[str, dict[str, int]]) -> dict[str, int]:
    """{name: {state: n}} -> {state: sum over names}."""
    out: dict[str, int] = {}
    for counts in by_name.values():
        for state, n in counts.items():
            out[state] = out.get(state, 0) + n
    return out


def job_detail(
    store: Store, provider: str, doc_id: str, *, payloads: bool = False
) -> dict[str, Any] | None:
    """The job, its polls, and each delivery with its attempts: the first and the latest of
    each history, with how many were dropped between them; with `payloads`, each body too."""
    job = store.get_job(provider, doc_id)
    if job is None:
        return None
    deliveries = []
    for d in store.deliveries_for(job.id):
        history = store.attempts_for(d.id)
        entry = {**d.as_dict(), "history": history, "history_dropped": d.attempts_dropped}
        if payloads:
            entry["payload"] = d.payload
        deliveries.append(entry)
    return {
        "job": job.as_dict(),
        "polls": store.polls_for(job.id),
        "polls_dropped": job.polls_dropped,  # between the first polls kept and the latest
        "deliveries": deliveries,
    }


def status_from_store(store: Store, config: Config, now: float) -> dict[str, Any]:
    """Everything `relayd status` shows that the database alone can tell."""
    counts = store.job_counts()
    oldest = store.oldest_polling()
    deliveries = store.delivery_counts()
    providers = {}
    for name in sorted(set(config.providers) | set(counts)):
        since = oldest.get(name)
        providers[name] = {
            "kind": config.providers[name].kind if name in config.providers else None,
            "jobs": counts.get(name, {}),
            "oldest_waiting_seconds": round(now - since, 3) if since is not None else None,
        }
    endpoints = {}
    for name in sorted(set(config.endpoints) | set(deliveries)):
        c = deliveries.get(name, {})
        endpoints[name] = {
            "pending": c.get("pending", 0),
            "dead": c.get("dead", 0),
            "delivered": c.get("delivered", 0),
        }
    db_bytes, wal_bytes = store.disk_usage()
    return {
        "providers": providers,
        "endpoints": endpoints,
        "store": {"bytes": db_bytes + wal_bytes, "wal_bytes": wal_bytes},
    }


def parse_since(value: str, now: float) -> float:
    """`--since` and the console's filter: a duration back from now ("2h") or an ISO time;
    ValueError names what is expected."""
    try:
        return now - parse_duration(value)
    except ValueError:
        pass
    try:
        return datetime.fromisoformat(value).timestamp()
    except ValueError:
        raise ValueError(f"{value!r}: expected a duration ('2h') or an ISO time") from None
