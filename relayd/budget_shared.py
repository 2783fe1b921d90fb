"""The shared budget (Redis) seen from one key group: asks for a grant while the key has work,
hands it to the poller's synchronous dispatch, and knows whether Redis can be reached.

While Redis cannot be reached nothing is sent on the key: no instance can know what the others
spend, so the only way never to overrun is to wait. Jobs stay stored and resume on their own.
Imported only when `shared_budget` is set: redis-py is an optional extra.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import secrets
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit

from relayd.budget_grants import Denied, KeyBudget
from relayd.clock import Clock, SystemClock
from relayd.errors import SharedBudgetUnavailable

log = logging.getLogger("relayd.budget_shared")


if TYPE_CHECKING:
    from relayd.budget_redis import SharedBudget


class SharedGrants:
    def __init__(
        self,
        budget: KeyBudget,
        *,
        where: str,
        keeper: str = "redis",
        providers: Callable[[], list[str]],
        on_grant: Callable[[], None],
        retry: float,
        clock: Clock,
    ) -> None:
        self.budget = budget
        self._clock = clock
        self.where = where  # the keeper's address, without credentials, for messages
        self.keeper = keeper  # what keeps the budget: "redis" or "store"
        self._providers = providers
        self._on_grant = on_grant
        self.retry = retry  # seconds between attempts to reach Redis again
        self.grant: str | None = None  # at most one grant in hand
        self.wanted = False
        self.unreachable_since: float | None = None  # wall time
        self.error = ""
        self.last_denial = ""
        self._want = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._side: set[asyncio.Task[None]] = set()

    # -- the poller's side (synchronous) --------------------------------------------------------

    def want(self, wanted: bool) -> None:
        """The key has work that could go now (or not): fetch a grant (or return the one held)."""
        self.wanted = wanted
        if wanted and self.grant is None:
            if self._task is None or self._task.done():
                self._task = asyncio.create_task(self._fetch(), name=f"grant-{self.where}")
            self._want.set()
        elif not wanted and self.grant is not None:
            self.unused(self.take())

    def take(self) -> str | None:
        grant, self.grant = self.grant, None
        return grant

    def release(self, slot: str | None) -> None:
        """The answer arrived: the slot frees a window from now (for every instance)."""
        if slot is not None:
            self._spawn(self.budget.release(slot))

    def unused(self, slot: str | None) -> None:
        if slot is not None:
            self._spawn(self.budget.unused(slot))

    def block(self, seconds: float, reason: str) -> None:
        """A 429 seen here holds for every instance on the key."""
        self._spawn(self.budget.block(seconds, reason))

    # -- Redis's side ---------------------------------------------------------------------------

    async def acquire(self) -> str:
        """A grant for a request outside the dispatch (a paragraph page); waits as long as it
        takes, Redis outages included."""
        while True:
            answer = await self._ask()
            if isinstance(answer, str):
                return answer
            await asyncio.sleep(answer)

    async def _fetch(self) -> None:
        while True:
            await self._want.wait()
            if not self._needs_grant():
                self._want.clear()
                continue
            try:
                answer = await self._ask()
            except Exception:  # a bug here must not leave the key without grants for good
                log.exception("shared budget: asking for a grant failed", extra=self._ctx())
                answer = self.retry
            if isinstance(answer, str):
                if self._needs_grant():  # asked again: the poll loop may have moved on meanwhile
                    self.grant = answer
                    self._on_grant()
                else:
                    await self._quiet(self.budget.unused(answer))
                continue
            await asyncio.sleep(answer)

    def _needs_grant(self) -> bool:
        """The key wants a grant and holds none. A method, not an inline test, because the
        answer changes across every await (the poll loop runs meanwhile)."""
        return self.wanted and self.grant is None

    async def _ask(self) -> str | float:
        """A slot id, or how long to wait before asking again."""
        try:
            answer = await self.budget.acquire()
        except SharedBudgetUnavailable as exc:
            self._down(str(exc))
            return self.retry
        self._up()
        if isinstance(answer, Denied):
            self.last_denial = answer.reason
            return max(answer.wait, 0.001)
        self.last_denial = ""
        return answer.slot

    def _down(self, error: str) -> None:
        self.error = error
        if self.unreachable_since is None:
            self.unreachable_since = self._clock.time()
            log.error(
                "SHARED BUDGET UNREACHABLE (%s: %s): polling on this key is paused until it"
                " returns, so no instance can overrun the key; retrying every %.3gs",
                self.where,
                error,
                self.retry,
                extra=self._ctx(),
            )

    def _up(self) -> None:
        if self.unreachable_since is not None:
            log.warning(
                "shared budget reachable again (%s) after %.1fs: polling resumes",
                self.where,
                self._clock.time() - self.unreachable_since,
                extra=self._ctx(),
            )
            self.unreachable_since = None
            self.error = ""

    def _ctx(self) -> dict[str, str]:
        return {"provider": ",".join(self._providers())}

    def _spawn(self, call: Any) -> None:
        task = asyncio.create_task(self._quiet(call))
        self._side.add(task)
        task.add_done_callback(self._side.discard)

    async def _quiet(self, call: Any) -> None:
        """A release or block that cannot reach Redis is dropped: the slot then frees at its
        lease's end (grant + timeout + window), later than it would have, never earlier."""
        try:
            await call
        except SharedBudgetUnavailable as exc:
            self._down(str(exc))

    async def snapshot(self) -> dict[str, Any]:
        """What every instance on the key does now (Redis's view); {} while it is unreachable."""
        try:
            snap = await self.budget.snapshot()
        except SharedBudgetUnavailable as exc:
            self._down(str(exc))
            return {}
        return {
            "used_by_all": snap["used"],
            "instances": len(snap["instances"]),
            "instances_waiting": len(snap["hungry"]),
            "blocked_for": snap["blocked_for"],
            "block_reason": snap["block_reason"] or None,
        }

    def status(self) -> dict[str, Any]:
        return {
            self.keeper: self.where,
            "reachable": self.unreachable_since is None,
            "unreachable_since": self.unreachable_since,
            "error": self.error or None,
            "waiting_for": self.last_denial or None,
        }

    async def close(self) -> None:
        """Stop asking; a grant still in hand goes back, so no other instance waits for it."""
        if self._task is not None:
            self._task.cancel()
        if self.grant is not None:
            self.unused(self.take())
        tasks = [t for t in (self._task, *self._side) if t is not None]
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*tasks, return_exceptions=True)


class Budgets(Protocol):
    """Where a relay's keys get their shared budgets: Redis (budget_shared.SharedBudgets) or the
    PostgreSQL store (budget_pg.StoreBudgets)."""

    def grants(
        self,
        budget: KeyBudget,
        *,
        providers: Callable[[], list[str]],
        on_grant: Callable[[], None],
    ) -> SharedGrants: ...

    def budget(self, api_key: str, *, limit: int, window: float, lease: float) -> KeyBudget: ...

    async def close(self) -> None: ...


class GrantSource:
    """What the keepers of shared budgets (Redis here, the PostgreSQL store in budget_pg.py)
    do alike: one SharedGrants per key, and a key named by its hash."""

    keeper = "redis"  # the name status gives the keeper's address under
    where: str
    retry: float
    _clock: Clock

    def grants(
        self,
        budget: KeyBudget,
        *,
        providers: Callable[[], list[str]],
        on_grant: Callable[[], None],
    ) -> SharedGrants:
        return SharedGrants(
            budget,
            where=self.where,
            keeper=self.keeper,
            providers=providers,
            on_grant=on_grant,
            retry=min(self.retry, budget.window),
            clock=self._clock,
        )

    @staticmethod
    def digest(api_key: str) -> str:
        """The key as its keeper knows it: the key itself never leaves relayd."""
        return hashlib.sha256(api_key.encode()).hexdigest()


class SharedBudgets(GrantSource):
    """One Redis connection for every key of this relayd; one SharedGrants per key."""

    def __init__(self, url: str, *, retry: float = 1.0, clock: Clock | None = None) -> None:
        import redis.asyncio  # the optional redis extra

        self._clock: Clock = clock or SystemClock()
        parts = urlsplit(url)
        host = parts.hostname or ""
        self.where = f"{parts.scheme}://{host}{f':{parts.port}' if parts.port else ''}{parts.path}"
        self.client = redis.asyncio.from_url(
            url, socket_connect_timeout=1.0, socket_timeout=1.0, retry_on_timeout=False
        )
        self.instance = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self.retry = retry

    def budget(self, api_key: str, *, limit: int, window: float, lease: float) -> SharedBudget:
        """Keyed by a hash of the API key: the key itself never reaches Redis."""
        from relayd.budget_redis import SharedBudget

        return SharedBudget(
            self.client,
            self.digest(api_key),
            limit=limit,
            window=window,
            lease=lease,
            instance=self.instance,
        )

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.client.aclose()
