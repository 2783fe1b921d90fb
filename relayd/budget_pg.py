"""One API key's budget shared by every relay on a PostgreSQL store, kept in that store: with
`shared_budget` empty, a relay on PostgreSQL needs no other engine to share its keys.

The same model and the same decisions as the Redis budget (budget_redis.py, whose Lua scripts this
follows line for line): a slot is held from the send until `window` after the answer, a token
bucket paces the sends, a 429 seen by one relay blocks the key for all, and a relay waiting for a
slot (hungry) gets it before one that holds more. Each decision is one transaction that first
locks the key's row (`SELECT … FOR UPDATE`), so relays decide one at a time; every time is the
database's clock (DB_NOW), so the relays' clocks may differ by any amount. The first use of a key
waits one window (plus the lease), as after a Redis reset: slots taken before the store knew
the key (another relay's, a restarted relay's) cannot be seen.

Calls go over a connection of their own (psycopg's async one), not the store's: a grant never
waits behind a pruning batch. While the database cannot be reached every method raises
SharedBudgetUnavailable, and budget_shared.SharedGrants sends nothing on the key until it answers.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

import psycopg
from psycopg.rows import TupleRow

from relayd.budget import BURST_SHARE
from relayd.budget_grants import Denied, Grant, KeyBudget, check_limits
from relayd.budget_shared import GrantSource
from relayd.clock import Clock, SystemClock
from relayd.errors import SharedBudgetUnavailable
from relayd.store.postgres_schema import DB_NOW

SETTLING = "settling after a reset"
Conn = psycopg.AsyncConnection[TupleRow]
Cur = psycopg.AsyncCursor[TupleRow]


class StoreLink:
    """The budget's connection to the store, opened on first use and again after a failure;
    one transaction at a time."""

    def __init__(self, conninfo: str, safe: Callable[[BaseException], str]) -> None:
        self._conninfo = conninfo
        self._safe = safe
        self._conn: Conn | None = None
        self._lock = asyncio.Lock()

    @contextlib.asynccontextmanager
    async def transaction(self) -> Any:
        async with self._lock:
            try:
                if self._conn is None or self._conn.closed or self._conn.broken:
                    self._conn = await psycopg.AsyncConnection.connect(self._conninfo)
                async with self._conn.transaction():
                    yield self._conn.cursor()
            except psycopg.Error as exc:
                if self._conn is not None and (self._conn.closed or self._conn.broken):
                    self._conn = None
                raise SharedBudgetUnavailable(f"PostgreSQL: {self._safe(exc)}") from None

    async def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(psycopg.Error):
                await self._conn.close()
            self._conn = None


async def _one(cur: Cur, sql: str, args: tuple[Any, ...] = ()) -> Any:
    await cur.execute(sql, args)
    row = await cur.fetchone()
    return row[0] if row is not None else None


class StoreBudget(KeyBudget):
    """The budget of the API key whose sha256 is `key`, as relay `instance` sees it."""

    def __init__(
        self,
        link: StoreLink,
        key: str,
        *,
        limit: int,
        window: float,
        lease: float,
        instance: str,
        burst: int | None = None,
    ) -> None:
        check_limits(limit, window, lease)
        self._link = link
        self.key = key
        self.limit = limit
        self.window = window
        self.lease = lease
        self.instance = instance
        self.burst = burst if burst is not None else max(2, int(limit * BURST_SHARE))

    async def acquire(self) -> Grant | Denied:
        async with self._link.transaction() as cur:
            return await self._acquire(cur)

    async def _acquire(self, cur: Cur) -> Grant | Denied:
        key, me, limit, window = self.key, self.instance, self.limit, self.window
        rate = limit / window
        grace = max(2 * window / limit, 0.05)
        now = float(await _one(cur, f"SELECT {DB_NOW}"))
        await cur.execute(
            "INSERT INTO budget_keys (key, tokens, at, blocked_until, block_reason)"
            " VALUES (%s, %s, %s, %s, %s) ON CONFLICT (key) DO NOTHING",
            (key, self.burst, now, now + window + self.lease, SETTLING),
        )
        await cur.execute(
            "SELECT tokens, at, seq, blocked_until, block_reason FROM budget_keys"
            " WHERE key = %s FOR UPDATE",
            (key,),
        )
        row = await cur.fetchone()
        assert row is not None
        tokens, at, seq, blocked_until, block_reason = row
        tokens, at = float(tokens), min(float(at), now)  # a clock that went back: from now
        await cur.execute("DELETE FROM budget_hungry WHERE key = %s AND until <= %s", (key, now))

        async def deny(wait: float, reason: str) -> Denied:
            wait = max(wait, 0.001)
            await cur.execute(
                "INSERT INTO budget_hungry (key, relay, until) VALUES (%s, %s, %s)"
                " ON CONFLICT (key, relay) DO UPDATE"
                " SET until = greatest(budget_hungry.until, excluded.until)",
                (key, me, now + wait + grace),
            )
            return Denied(wait, reason)

        async def save() -> None:
            await cur.execute(
                "UPDATE budget_keys SET tokens = %s, at = %s WHERE key = %s", (tokens, now, key)
            )

        if now < blocked_until:
            return await deny(blocked_until - now, block_reason)
        # the bucket earns limit/window tokens a second up to `burst`, beyond one token only
        # while the window has room for them: walk the slots freed since `at`
        await cur.execute("DELETE FROM budget_slots WHERE key = %s AND frees_at <= %s", (key, at))
        held = int(await _one(cur, "SELECT count(*) FROM budget_slots WHERE key = %s", (key,)))
        await cur.execute(
            "SELECT frees_at FROM budget_slots WHERE key = %s AND frees_at <= %s ORDER BY frees_at",
            (key, now),
        )
        frees = [float(r[0]) for r in await cur.fetchall()]
        t = at
        for stop in [*[min(f, now) for f in frees], now]:
            cap = min(self.burst, max(1, limit - held + 1))
            tokens = max(tokens, min(cap, tokens + (stop - t) * rate))
            t, held = stop, held - 1
        await cur.execute("DELETE FROM budget_slots WHERE key = %s AND frees_at <= %s", (key, now))
        held = int(await _one(cur, "SELECT count(*) FROM budget_slots WHERE key = %s", (key,)))
        token_wait = max(0.0, (1 - tokens) / rate)
        if held >= limit:
            # an in-flight slot may be answered any moment and then frees a window later
            first = float(
                await _one(cur, "SELECT min(frees_at) FROM budget_slots WHERE key = %s", (key,))
            )
            await save()
            return await deny(max(min(first - now, window), token_wait), "budget")
        if tokens < 1 - 1e-9:
            await save()
            return await deny(token_wait, "pacing")
        # fair share: the slot goes to a hungry relay that holds fewer slots than this one
        await cur.execute(
            "SELECT h.relay, (SELECT count(*) FROM budget_slots s"
            "  WHERE s.key = h.key AND s.owner = h.relay)"
            " FROM budget_hungry h WHERE h.key = %s AND h.relay <> %s",
            (key, me),
        )
        others = await cur.fetchall()
        if others:
            mine = int(
                await _one(
                    cur,
                    "SELECT count(*) FROM budget_slots WHERE key = %s AND owner = %s",
                    (key, me),
                )
            )
            if any(int(n) < mine for _, n in others):
                await save()
                return await deny(window / limit / 2, "fair share")
        tokens -= 1
        seq = int(seq) + 1
        await cur.execute(
            "UPDATE budget_keys SET tokens = %s, at = %s, seq = %s WHERE key = %s",
            (tokens, now, seq, key),
        )
        slot = f"{me}|{seq}"
        await cur.execute(
            "INSERT INTO budget_slots (key, slot, owner, frees_at) VALUES (%s, %s, %s, %s)",
            (key, slot, me, now + self.lease + window),
        )
        await cur.execute("DELETE FROM budget_hungry WHERE key = %s AND relay = %s", (key, me))
        return Grant(slot)

    async def release(self, slot: str) -> None:
        async with self._link.transaction() as cur:
            await cur.execute(
                f"UPDATE budget_slots SET frees_at = {DB_NOW} + %s"
                f" WHERE key = %s AND slot = %s AND frees_at > {DB_NOW}",
                (self.window, self.key, slot),
            )

    async def unused(self, slot: str) -> None:
        async with self._link.transaction() as cur:
            await cur.execute(
                "DELETE FROM budget_slots WHERE key = %s AND slot = %s", (self.key, slot)
            )
            if cur.rowcount:
                await cur.execute(
                    "UPDATE budget_keys SET tokens = least(%s, tokens + 1) WHERE key = %s",
                    (self.burst, self.key),
                )

    async def block(self, seconds: float, reason: str) -> None:
        async with self._link.transaction() as cur:
            await cur.execute(
                "UPDATE budget_keys SET"
                f" block_reason = CASE WHEN {DB_NOW} + %s > blocked_until THEN %s"
                "  ELSE block_reason END,"
                f" blocked_until = greatest(blocked_until, {DB_NOW} + %s) WHERE key = %s",
                (max(0.0, seconds), f"blocked: {reason}", max(0.0, seconds), self.key),
            )

    async def snapshot(self) -> dict[str, Any]:
        async with self._link.transaction() as cur:
            now = float(await _one(cur, f"SELECT {DB_NOW}"))
            await cur.execute(
                "SELECT owner FROM budget_slots WHERE key = %s AND frees_at > %s", (self.key, now)
            )
            owners = [r[0] for r in await cur.fetchall()]
            await cur.execute(
                "SELECT relay FROM budget_hungry WHERE key = %s AND until > %s", (self.key, now)
            )
            hungry = sorted(r[0] for r in await cur.fetchall())
            await cur.execute(
                "SELECT blocked_until, block_reason FROM budget_keys WHERE key = %s", (self.key,)
            )
            row = await cur.fetchone()
        blocked_for = max(0.0, float(row[0]) - now) if row else 0.0
        return {
            "used": len(owners),
            "mine": owners.count(self.instance),
            "limit": self.limit,
            "blocked_for": blocked_for,
            "block_reason": row[1] if row and blocked_for > 0 else "",
            "instances": sorted({*owners, *hungry}),
            "hungry": hungry,
            "epoch": row is not None,
        }


class StoreBudgets(GrantSource):
    """The budgets of every key of this relay, in the PostgreSQL store it runs on."""

    keeper = "store"

    def __init__(
        self,
        conninfo: str,
        *,
        where: str,
        instance: str,
        safe: Callable[[BaseException], str],
        retry: float = 1.0,
        clock: Clock | None = None,
    ) -> None:
        self._clock: Clock = clock or SystemClock()
        self._link = StoreLink(conninfo, safe)
        self.where = where
        self.instance = instance
        self.retry = retry

    def budget(self, api_key: str, *, limit: int, window: float, lease: float) -> StoreBudget:
        """Keyed by a hash of the API key: the key itself never reaches the database."""
        return StoreBudget(
            self._link,
            self.digest(api_key),
            limit=limit,
            window=window,
            lease=lease,
            instance=self.instance,
        )

    async def close(self) -> None:
        await self._link.close()
