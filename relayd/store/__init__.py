"""Where jobs are kept: the `Store` interface every part of relayd uses, and `open_store`.

Two implementations answer alike (one test suite runs against both): `SqliteStore`
(`state_dir/relayd.db`, the default) and `PostgresStore` (`[relayd] store = "postgresql://…"`, the
`postgres` extra), a store several relays can reach. Every method that changes something is one
transaction, committed before it returns, and raises `StoreError` when the database cannot take
it; nothing is acknowledged to anyone before that.
"""

from __future__ import annotations

import os
import secrets
import socket
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, ParamSpec, Protocol, TypeVar

from relayd.models import (
    AttemptOutcome,
    Delivery,
    DeliveryState,
    Job,
    JobState,
    NewDelivery,
    PollOutcome,
    Pruned,
    Submission,
)
from relayd.store.sqlite import SqliteStore

if TYPE_CHECKING:
    from relayd.config import Settings

__all__ = ["SqliteStore", "Store", "open_store"]

DATABASE = "relayd.db"
P = ParamSpec("P")
R = TypeVar("R")


class Store(Protocol):
    # several relays may use it at once, each claiming its work (PostgreSQL); else this relay
    # alone polls and delivers everything in it
    shared: bool

    def close(self) -> None: ...

    async def run(self, fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> R:
        """Call `fn`, one of this store's methods, where the event loop need not wait for it:
        the daemon awaits its writes (commits, pruning) through this. A store may run it in a
        thread of its own (a serving SQLite store does) or call it there and then."""
        ...

    async def read(self, fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> R:
        """Call `fn`, one of this store's reads, where the event loop need not wait for it
        (the polls' and deliveries' own reads); as `run`, maybe in a thread of its own."""
        ...

    # -- intake

    def add_jobs(
        self, subs: Sequence[Submission], *, source: str, now: float
    ) -> list[tuple[Job, bool]]:
        """Store every submission in one transaction: (job, created); a known (provider,
        docId) is left as it is (created False)."""
        ...

    def add_event(self, doc_id: str, deliveries: Sequence[NewDelivery], *, now: float) -> bool:
        """An operational event (relayd/events.py): a job of the pseudo-provider `relayd`,
        finished at once, with its deliveries, in one transaction; False if `doc_id` is known."""
        ...

    # -- reading

    def get_job(self, provider: str, doc_id: str) -> Job | None: ...

    def find_jobs(self, doc_id: str) -> list[Job]:
        """Every job with this id, whatever its provider."""
        ...

    def job_by_id(self, job_id: int) -> Job | None: ...

    def list_jobs(
        self, *, state: str | None = None, provider: str | None = None, limit: int = 100
    ) -> list[Job]:
        """The newest jobs first."""
        ...

    def list_jobs_within(
        self,
        *,
        state: str | None = None,
        provider: str | None = None,
        limit: int = 100,
        max_bytes: int | None = None,
    ) -> tuple[list[Job], bool]:
        """The newest jobs first, at most about `max_bytes` of them as JSON; the flag says some
        were left out for size."""
        ...

    def polling_jobs(self) -> list[tuple[int, str, float]]:
        """(id, provider, next_poll_at) of every job still being polled."""
        ...

    def run_times(self, limit: int = 4096) -> list[tuple[str, str | None, float | None, float]]:
        """(provider, media kind, media seconds, run seconds) of recently finished jobs that
        can teach how long jobs take, oldest first."""
        ...

    def polls_for(self, job_id: int, limit: int = 50) -> list[dict[str, Any]]: ...

    def jobs_page(
        self,
        *,
        state: str | None = None,
        provider: str | None = None,
        q: str | None = None,
        before: int | None = None,
        limit: int = 50,
    ) -> list[Job]:
        """Newest first, older than job id `before`; `q`: a docId or the start of one."""
        ...

    def dead_deliveries(
        self, *, endpoint: str | None = None, since: float | None = None, limit: int = 100
    ) -> tuple[list[Delivery], int]:
        """(the latest dead deliveries, how many in all), filtered as `redeliver` filters."""
        ...

    def deliveries_for(self, job_id: int) -> list[Delivery]: ...

    def attempts_for(self, delivery_id: int, limit: int = 50) -> list[dict[str, Any]]: ...

    def job_counts(self) -> dict[str, dict[str, int]]:
        """provider -> state -> count."""
        ...

    def oldest_polling(self) -> dict[str, float]:
        """provider -> submitted_at of its oldest job still being polled."""
        ...

    def delivery_counts(self) -> dict[str, dict[str, int]]:
        """endpoint -> delivery state -> count."""
        ...

    def probe_write(self, now: float) -> None:
        """A real write, for readiness: raises StoreError when none can be made."""
        ...

    def disk_usage(self) -> tuple[int, int]:
        """Bytes the store takes on disk: (the database, its write-ahead log). PostgreSQL:
        (relayd's tables with their indexes, 0): the server's WAL is not relayd's."""
        ...

    # -- budgets across restarts

    def save_budgets(self, budgets: dict[str, dict[str, Any]], *, now: float) -> None: ...

    def take_budgets(self) -> dict[str, dict[str, Any]]:
        """Read and forget the saved budgets."""
        ...

    def recently_active(self, providers: Sequence[str], since: float) -> bool: ...

    # -- polling

    def record_poll(
        self,
        job_id: int,
        *,
        now: float,
        http_status: int | None,
        outcome: PollOutcome,
        detail: str | None,
        next_poll_at: float,
        errors: int,
        not_found: int,
        last_status: str | None = None,
        etag: str | None = None,
    ) -> bool:
        """A poll that did not finish the job; False if it is no longer being polled."""
        ...

    def finish_job(
        self,
        job_id: int,
        *,
        now: float,
        result_status: str,
        result: dict[str, Any],
        deliveries: Iterable[NewDelivery],
        http_status: int | None,
        detail: str | None,
        succeeded: bool = True,
        ran_for: float | None = None,
        media_kind: str | None = None,
        media_seconds: float | None = None,
    ) -> bool:
        """A terminal status and the deliveries it calls for, in one transaction."""
        ...

    def end_job(self, job_id: int, state: JobState, *, now: float, detail: str) -> bool: ...

    def expire_jobs(self, provider: str, submitted_before: float, now: float) -> list[Job]: ...

    def cancel(self, job_id: int, *, now: float) -> bool: ...

    # -- retention

    def prune(self, *, ended_before: float | None, dead_before: float | None, limit: int) -> Pruned:
        """Delete up to `limit` jobs (with their history) that ended before `ended_before`, or
        died before `dead_before` (None: keep those forever), in one transaction."""
        ...

    def trim_run_times(self, keep: int) -> int:
        """Forget all but the latest `keep` run times learned; how many were forgotten."""
        ...

    # -- delivery

    def due_deliveries(self, endpoint: str, now: float, limit: int) -> list[Delivery]: ...

    def next_delivery_at(self, endpoint: str, after: float) -> float | None: ...

    def record_attempt(
        self,
        delivery_id: int,
        *,
        now: float,
        duration: float,
        status: int | None,
        error: str | None,
        outcome: AttemptOutcome,
        next_attempt_at: float | None = None,
        spend: bool = True,
    ) -> bool:
        """One POST and what came of it; False if the delivery was no longer pending."""
        ...

    def redeliver(
        self,
        *,
        now: float,
        job_id: int | None = None,
        endpoint: str | None = None,
        states: Sequence[str] = (
            DeliveryState.DELIVERED,
            DeliveryState.DEAD,
            DeliveryState.PENDING,
        ),
        since: float | None = None,
    ) -> int:
        """Queue deliveries again with a fresh set of attempts; how many."""
        ...


def relay_name() -> str:
    """This relay's name among those on a shared store: host, process and a random part (a
    restarted relay is a new one; what the old one held comes back when its leases end)."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


def open_store(settings: Settings, *, readonly: bool = False, serving: bool = False) -> Store:
    """The store the config names: PostgreSQL when `store` is a URL, else SQLite in `state_dir`.

    `readonly`: for looking (the CLI's status, jobs, show). `serving`: the daemon's, open for
    long: SQLite writes and checkpoints in threads of their own; on PostgreSQL the relay claims
    its work under a name of its own (`relay_name`), beside any other relays on the store."""
    if settings.store:
        from relayd.store.postgres import PostgresStore  # psycopg: the optional extra

        relay = relay_name() if serving else None
        return PostgresStore(
            settings.store, readonly=readonly, relay=relay, lease=settings.store_lease
        )
    return SqliteStore(settings.state_dir / DATABASE, readonly=readonly, serving=serving)
