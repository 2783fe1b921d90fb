"""The budget kept in the PostgreSQL store (relayd/budget_pg.py) against a real server: the same
decisions as the Redis budget (tests/test_shared_budget.py) — slots up to the limit, a slot
given back, a 429 block for every relay, relays racing never over the limit in any window, two
busy relays sharing evenly, a key's first use settling — and failure as SharedBudgetUnavailable."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import secrets
import time
from collections.abc import AsyncIterator, Callable
from contextlib import closing
from typing import Any

import pytest

from relayd.budget_grants import Denied, Grant
from relayd.errors import SharedBudgetUnavailable

pytest.importorskip("psycopg", reason="psycopg, the postgres extra, is not installed")
import psycopg

from relayd.budget_pg import StoreBudget, StoreBudgets
from relayd.store.postgres import PostgresStore

_relays = itertools.count()
Make = Callable[..., StoreBudget]


def new_key() -> str:
    return secrets.token_hex(8)


@pytest.fixture
async def budgets(pg_url: str) -> AsyncIterator[Make]:
    """Budgets on the store at pg_url, each relay with its own connection. `settled` marks the
    key as in use already, so a test does not wait out the first use's settling."""
    with closing(PostgresStore(pg_url)) as store:
        conninfo, where = store.conninfo, store.where
    made: list[StoreBudgets] = []

    def make(key: str, *, settled: bool = True, **kw: Any) -> StoreBudget:
        relay = f"host:{next(_relays)}:test"
        keeper = StoreBudgets(conninfo, where=where, instance=relay, safe=str)
        made.append(keeper)
        kw = {"limit": 5, "window": 0.3, "lease": 1.0, **kw}
        b = StoreBudget(keeper._link, key, instance=relay, **kw)
        if settled:
            with psycopg.connect(pg_url) as conn:
                conn.execute(
                    "INSERT INTO budget_keys (key, tokens, at) VALUES (%s, %s, 0)"
                    " ON CONFLICT (key) DO NOTHING",
                    (b.key, b.burst),
                )
        return b

    yield make
    for keeper in made:
        await keeper.close()


async def test_grants_up_to_limit_then_denies_budget_and_unused_gives_one_back(
    budgets: Make,
) -> None:
    b = budgets(new_key(), limit=5, burst=5)
    answers = [await b.acquire() for _ in range(6)]
    granted = [a for a in answers[:5] if isinstance(a, Grant)]
    assert len({a.slot for a in granted}) == 5
    last = answers[5]
    assert isinstance(last, Denied) and last.reason == "budget"
    assert 0 < last.wait <= b.window + 0.01
    await b.unused(granted[0].slot)
    assert isinstance(await b.acquire(), Grant)
    snap = await b.snapshot()
    assert (snap["used"], snap["mine"], snap["limit"]) == (5, 5, 5)


async def test_the_api_key_never_reaches_the_database(pg_url: str) -> None:
    """Keyed by the key's sha256, as in Redis."""
    api_key = "sk-secret-" + secrets.token_hex(4)
    with closing(PostgresStore(pg_url)) as store:
        keeper = StoreBudgets(store.conninfo, where=store.where, instance="r", safe=str)
    b = keeper.budget(api_key, limit=5, window=0.3, lease=0.0)
    assert b.key == hashlib.sha256(api_key.encode()).hexdigest()
    assert isinstance(await b.acquire(), Denied)  # its first use settles
    await keeper.close()
    with psycopg.connect(pg_url) as conn:
        dump = str(
            [
                conn.execute(f"SELECT * FROM {t}").fetchall()
                for t in ("budget_keys", "budget_hungry")
            ]
        )
    assert api_key not in dump and b.key in dump


async def test_a_block_holds_for_every_relay_on_the_key(budgets: Make) -> None:
    key = new_key()
    a, b = budgets(key), budgets(key)
    await a.block(0.3, "429 Too Many Requests")
    await b.block(0.05, "shorter")
    denied = await b.acquire()
    assert isinstance(denied, Denied) and denied.reason == "blocked: 429 Too Many Requests"
    assert 0.2 <= denied.wait <= 0.3


async def test_a_keys_first_use_settles_for_a_window_and_the_lease(budgets: Make) -> None:
    b = budgets(new_key(), settled=False, window=0.2, lease=0.3)
    denied = await b.acquire()
    assert isinstance(denied, Denied) and denied.reason == "settling after a reset"
    assert 0.4 <= denied.wait <= 0.5


async def test_racing_relays_never_exceed_the_limit_in_any_window(budgets: Make) -> None:
    """Three relays x 150 asks racing on one key: never more than `limit` grants within one
    window (the database's clock decides, one relay at a time)."""
    key = new_key()
    limit, window = 10, 0.2
    relays = [budgets(key, limit=limit, burst=limit, window=window) for _ in range(3)]
    grants: list[float] = []

    async def worker(b: StoreBudget) -> None:
        for _ in range(150):
            answer = await b.acquire()
            if isinstance(answer, Grant):
                grants.append(time.monotonic())
                await b.release(answer.slot)
            else:
                await asyncio.sleep(min(answer.wait, 0.003))

    await asyncio.gather(*(worker(b) for b in relays))
    grants.sort()
    assert len(grants) > 2 * limit
    closest = min(grants[i + limit] - grants[i] for i in range(len(grants) - limit))
    assert closest >= window - 0.02


async def test_two_busy_relays_share_evenly(budgets: Make) -> None:
    """Two relays asking all the time split the budget 40-60 %, though one answers slower."""
    key = new_key()
    fair = {"limit": 20, "window": 0.5, "lease": 1.0}
    near, far = budgets(key, **fair), budgets(key, **fair)
    got = {"near": 0, "far": 0}
    until = time.monotonic() + 1.5

    async def ask(b: StoreBudget, name: str, latency: float) -> None:
        while time.monotonic() < until:
            answer = await b.acquire()
            await asyncio.sleep(latency)
            if isinstance(answer, Grant):
                got[name] += 1
                await b.release(answer.slot)
            else:
                await asyncio.sleep(max(0.0, min(answer.wait, until - time.monotonic())))

    await asyncio.gather(ask(near, "near", 0.0), ask(far, "far", 0.004))
    total = got["near"] + got["far"]
    assert total >= 40, got
    assert 0.4 <= got["far"] / total <= 0.6, got


async def test_an_unreachable_database_raises_unavailable(pg_url: str) -> None:
    closed = StoreBudgets(
        "host=127.0.0.1 port=1 connect_timeout=2", where="nowhere", instance="x", safe=str
    )
    b = closed.budget("k", limit=1, window=1.0, lease=1.0)
    with pytest.raises(SharedBudgetUnavailable, match="PostgreSQL"):
        await b.acquire()
    await closed.close()
