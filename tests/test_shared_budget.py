"""The Redis-shared budget against a real redis-server: slots, pacing, blocks, fair share between
instances, reset detection, expiry, and failure as SharedBudgetUnavailable."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import math
import re
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import redis.asyncio

from relayd.budget_grants import Denied, Grant
from relayd.budget_redis import SharedBudget
from relayd.errors import SharedBudgetUnavailable
from relayd.mock.net import free_port
from tests.redis_server import RedisServer

Client = redis.asyncio.Redis
_instances = itertools.count()


def connect(url: str) -> Client:
    return redis.asyncio.Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=0.5)


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[Client]:
    c = connect(redis_url)
    yield c
    await c.aclose()


@pytest.fixture
async def clients(redis_url: str) -> AsyncIterator[Callable[[], Client]]:
    """More clients, each with its own connections (as separate instances have)."""
    made: list[Client] = []

    def make() -> Client:
        made.append(connect(redis_url))
        return made[-1]

    yield make
    for c in made:
        await c.aclose()


def new_key() -> str:
    return hashlib.sha256(secrets.token_bytes(16)).hexdigest()


async def budget(
    client: Client, key: str | None = None, *, settled: bool = True, **kw: Any
) -> SharedBudget:
    """A budget on `key` (a fresh one by default). `settled` marks the key as already in use, so
    the test does not wait out the first-use settling."""
    kw = {"limit": 5, "window": 0.3, "lease": 1.0, **kw}
    kw.setdefault("instance", f"host:{next(_instances)}:test")
    b = SharedBudget(client, key or new_key(), **kw)
    if settled:
        await client.set(b.keys[KEY.epoch], "1")
    return b


def raw(value: bytes | str) -> bytes:
    """A Redis reply as the bytes it is (redis-py types replies as bytes or str)."""
    assert isinstance(value, bytes), value
    return value


class KEY:
    slots, seq, bucket, blocked, hungry, epoch, seen = range(7)


def now() -> float:
    return asyncio.get_running_loop().time()


async def granted_after(b: SharedBudget, timeout: float = 3.0) -> tuple[float, Grant]:  # noqa: ASYNC109
    """Ask until granted (sleeping as told, in steps of at most 20 ms); seconds taken, grant."""
    start = now()
    while now() - start < timeout:
        answer = await b.acquire()
        if isinstance(answer, Grant):
            return now() - start, answer
        await asyncio.sleep(min(answer.wait, 0.02))
    raise AssertionError(f"no grant within {timeout}s")


async def grant(b: SharedBudget) -> Grant:
    answer = await b.acquire()
    assert isinstance(answer, Grant), answer
    return answer


async def test_grants_up_to_limit_then_denies_budget(client: Client) -> None:
    """limit grants go out at once (burst = limit); the next ask is denied "budget"."""
    b = await budget(client, limit=5, burst=5)
    answers = [await b.acquire() for _ in range(6)]
    assert all(isinstance(a, Grant) for a in answers[:5])
    assert len({a.slot for a in answers[:5] if isinstance(a, Grant)}) == 5
    last = answers[5]
    assert isinstance(last, Denied) and last.reason == "budget"
    assert 0 < last.wait <= b.window + 0.01
    assert await client.zcard(b.keys[KEY.slots]) == 5


async def test_release_frees_the_slot_a_window_after_the_answer(client: Client) -> None:
    """A released slot is free again `window` after release(), not before."""
    b = await budget(client, limit=1, burst=1, window=0.3, lease=5.0)
    first = await b.acquire()
    assert isinstance(first, Grant)
    await asyncio.sleep(0.1)  # the request is in flight
    await b.release(first.slot)
    waited, _ = await granted_after(b)
    assert 0.27 <= waited <= 0.45


async def test_unused_gives_slot_and_token_back_at_once(client: Client) -> None:
    """unused() frees the slot and returns its pacing token: the next ask is granted at once."""
    b = await budget(client, limit=1, burst=1)
    first = await b.acquire()
    assert isinstance(first, Grant)
    assert isinstance(await b.acquire(), Denied)
    await b.unused(first.slot)
    assert isinstance(await b.acquire(), Grant)


async def test_pacing_spreads_grants_after_the_burst(client: Client) -> None:
    """After the bucket's burst, grants come one per window/limit: denied "pacing" till then."""
    b = await budget(client, limit=10, burst=2, window=0.5)
    await grant(b)
    await grant(b)
    denied = await b.acquire()
    assert isinstance(denied, Denied) and denied.reason == "pacing"
    assert 0.04 <= denied.wait <= 0.05
    waited, _ = await granted_after(b)
    assert 0.035 <= waited <= 0.1


async def test_slots_freed_together_are_not_spent_together(client: Client) -> None:
    """While the rolling window is full the bucket holds at most one token, so slots that free
    together a window after a burst go out paced, not as a second burst."""
    b = await budget(client, limit=2, burst=2, window=0.4)  # a token every 0.2 s
    slots = [await grant(b), await grant(b)]
    await asyncio.gather(*(b.release(s.slot) for s in slots))
    await asyncio.sleep(0.42)  # both slots are free again
    await grant(b)
    denied = await b.acquire()
    assert isinstance(denied, Denied) and denied.reason == "pacing"


async def test_unreleased_slot_frees_after_lease_plus_window(client: Client) -> None:
    """A slot never released (its instance died) frees at grant + lease + window."""
    b = await budget(client, limit=1, burst=1, window=0.2, lease=0.2)
    assert isinstance(await b.acquire(), Grant)
    waited, _ = await granted_after(b)
    assert 0.37 <= waited <= 0.55


async def test_block_holds_for_every_instance_on_the_key(clients: Callable[[], Client]) -> None:
    """A 429 seen by one instance blocks the others; a shorter block does not shorten it."""
    key = new_key()
    a = await budget(clients(), key)
    b = await budget(clients(), key)
    await a.block(0.3, "429 Too Many Requests")
    await b.block(0.05, "shorter")
    denied = await b.acquire()
    assert isinstance(denied, Denied)
    assert denied.reason == "blocked: 429 Too Many Requests"
    assert 0.2 <= denied.wait <= 0.3
    waited, _ = await granted_after(b)
    assert 0.2 <= waited <= 0.45


async def test_api_keys_are_independent(client: Client) -> None:
    """A full budget on one API key leaves another key's budget untouched."""
    full = await budget(client, limit=1, burst=1)
    other = await budget(client, limit=1, burst=1)
    await full.block(5, "429")
    assert isinstance(await full.acquire(), Denied)
    assert isinstance(await other.acquire(), Grant)


async def test_api_key_never_reaches_redis(client: Client) -> None:
    """Only the key's sha256 names the Redis keys; the key itself is nowhere in Redis."""
    canary = "sk-canary-" + secrets.token_hex(8)
    with pytest.raises(ValueError):
        SharedBudget(client, canary, limit=5, window=1, lease=1, instance="x")
    digest = hashlib.sha256(canary.encode()).hexdigest()
    b = await budget(client, digest, settled=False)
    await b.acquire()
    await client.delete(b.keys[KEY.blocked])
    grant = await b.acquire()
    assert isinstance(grant, Grant)
    await b.release(grant.slot)
    await b.block(1, "429")
    stored = b""
    for name in map(raw, await client.keys("*")):
        stored += name
        kind = raw(await client.type(name)).decode()
        if kind == "string":
            stored += raw(await client.get(name) or b"")
        elif kind == "hash":
            stored += repr(await client.hgetall(name)).encode()
        elif kind == "zset":
            stored += repr(await client.zrange(name, 0, -1, withscores=True)).encode()
    assert digest.encode() in stored
    assert canary.encode() not in stored
    named = re.compile(rb"relayd:budget:\{[0-9a-f]{64}\}:[a-z]+")
    assert all(named.fullmatch(raw(k)) for k in await client.keys())


async def test_racing_clients_never_exceed_the_limit(clients: Callable[[], Client]) -> None:
    """3 clients x 200 acquires racing: never more than `limit` slots held, never more than
    `limit` grants within one window."""
    key = new_key()
    limit, window = 10, 0.2
    budgets = [await budget(clients(), key, limit=limit, burst=limit, window=window)]
    budgets += [await budget(clients(), key, limit=limit, burst=limit, window=window)]
    budgets += [await budget(clients(), key, limit=limit, burst=limit, window=window)]
    watcher = clients()
    grants: list[float] = []
    most = 0

    async def worker(b: SharedBudget) -> None:
        nonlocal most
        for _ in range(200):
            answer = await b.acquire()
            if isinstance(answer, Grant):
                grants.append(now())
                most = max(most, await watcher.zcard(b.keys[KEY.slots]))
                await b.release(answer.slot)
            else:
                await asyncio.sleep(min(answer.wait, 0.003))

    await asyncio.gather(*(worker(b) for b in budgets))
    grants.sort()
    assert most == limit
    assert len(grants) > 2 * limit
    closest = min(grants[i + limit] - grants[i] for i in range(len(grants) - limit))
    assert closest >= window - 0.02


async def ask_continuously(
    b: SharedBudget,
    until: float,
    grants: list[float],
    latency: float = 0.0,
    poll: float | None = None,
) -> None:
    """An instance with jobs always waiting: ask, poll (answer at once), ask again; after a
    denial sleep as told, or at most `poll` (a tight loop). `latency` is extra delay on every
    answer (a farther host)."""
    while now() < until:
        answer = await b.acquire()
        await asyncio.sleep(latency)
        if isinstance(answer, Grant):
            grants.append(now())
            await b.release(answer.slot)
        else:
            await asyncio.sleep(max(0.0, min(answer.wait, poll or answer.wait, until - now())))


FAIR: dict[str, Any] = {"limit": 20, "window": 0.5, "lease": 1.0}  # 40 a second, burst 2


def allowed(seconds: float) -> float:
    """Grants the budget allows in `seconds` from a fresh start: the pacing (a full bucket, then
    limit/window a second) and the rolling window (limit in any window) both bind."""
    limit: int = FAIR["limit"]
    window: float = FAIR["window"]
    return min(2 + seconds * limit / window, limit * math.ceil(seconds / window))


async def test_two_busy_instances_share_evenly(clients: Callable[[], Client]) -> None:
    """Two instances asking all the time split the budget 40-60 %, though one answers slower,
    and together use >= 90 % of it."""
    key = new_key()
    near = await budget(clients(), key, **FAIR)
    far = await budget(clients(), key, **FAIR)
    got_near: list[float] = []
    got_far: list[float] = []
    until = now() + 1.0
    await asyncio.gather(
        ask_continuously(near, until, got_near),
        ask_continuously(far, until, got_far, latency=0.004),
    )
    total = len(got_near) + len(got_far)
    assert total >= 0.9 * allowed(1.0)
    assert 0.4 <= len(got_far) / total <= 0.6, (len(got_near), len(got_far))


async def test_light_instance_is_served_beside_a_busy_one(clients: Callable[[], Client]) -> None:
    """An instance with few jobs (a poll every 0.1 s, on a farther host) gets each within a few
    pacing steps beside a near instance asking in a tight loop, which takes the rest."""
    key = new_key()
    busy = await budget(clients(), key, **FAIR)
    light = await budget(clients(), key, **FAIR)
    got_busy: list[float] = []
    waits: list[tuple[float, float]] = []  # (asked, granted) for each of the light one's jobs
    start = now()
    until = start + 1.0

    async def few_jobs() -> None:
        for k in range(10):
            await asyncio.sleep(max(0.0, start + k * 0.1 - now()))
            asked = now()
            while True:
                answer = await light.acquire()
                await asyncio.sleep(0.01)  # a farther host
                if isinstance(answer, Grant):
                    waits.append((asked, now()))
                    await light.release(answer.slot)
                    break
                await asyncio.sleep(answer.wait)

    await asyncio.gather(ask_continuously(busy, until, got_busy, poll=0.005), few_jobs())
    assert len(waits) == 10
    # Counted in grants, not seconds (a loaded machine stretches both): while the light one
    # waits, the busy one gets at most the slot already on its way and one more.
    ahead = [sum(asked < t < granted for t in got_busy) for asked, granted in waits]
    assert max(ahead) <= 2, (ahead, waits)
    assert len(got_busy) + len(waits) >= 0.9 * allowed(1.0)


async def test_idle_instance_does_not_slow_a_busy_one(clients: Callable[[], Client]) -> None:
    """An instance that is not asking (it polled once, then went quiet) leaves the whole budget
    (>= 90 %) to the busy one: fair share is work conserving."""
    key = new_key()
    busy = await budget(clients(), key, **FAIR)
    idle = await budget(clients(), key, **FAIR)
    until = now() + 1.0
    await idle.release((await grant(idle)).slot)
    got: list[float] = []
    await ask_continuously(busy, until, got)
    assert len(got) >= 0.9 * (allowed(1.0) - 1)


async def test_denied_instance_gets_the_next_free_slot(clients: Callable[[], Client]) -> None:
    """An instance denied for a full budget is hungry: when a slot frees, the instance holding
    more is denied "fair share" and the hungry one gets the slot."""
    key = new_key()
    a = await budget(clients(), key, limit=4, burst=4)
    b = await budget(clients(), key, limit=4, burst=4)
    slots = [await grant(a) for _ in range(4)]
    denied = await b.acquire()
    assert isinstance(denied, Denied) and denied.reason == "budget"
    await a.unused(slots[0].slot)
    held_back = await a.acquire()
    assert isinstance(held_back, Denied) and held_back.reason == "fair share"
    assert held_back.wait < 0.1
    await grant(b)
    assert (await a.snapshot())["hungry"] == [a.instance]


async def test_fair_share_yields_only_to_fewer_slots(client: Client) -> None:
    """A hungry instance holds back only instances holding strictly more slots than it does,
    and only until its next grant."""
    key = new_key()
    a = await budget(client, key, limit=6, burst=6)
    b = await budget(client, key, limit=6, burst=6)
    await grant(a)
    await grant(b)
    await client.zadd(a.keys[KEY.hungry], {b.instance: 1e12})  # b waits for a slot
    await grant(a)  # 1 against 1: equal, a is not held back
    held_back = await a.acquire()  # 2 against 1
    assert isinstance(held_back, Denied) and held_back.reason == "fair share"
    await grant(b)  # b's grant ends its hunger
    await grant(a)


async def test_hungry_mark_expires(client: Client) -> None:
    """A denied instance that never asks again holds others back only until its wait plus a
    short grace (here 0.05 + 0.1 s) has passed."""
    key = new_key()
    a = await budget(client, key, limit=6, burst=2, window=0.3)
    b = await budget(client, key, limit=6, burst=2, window=0.3)
    await grant(a)
    await grant(a)
    denied = await b.acquire()
    assert isinstance(denied, Denied) and denied.reason == "pacing"
    await asyncio.sleep(denied.wait)
    held_back = await a.acquire()
    assert isinstance(held_back, Denied) and held_back.reason == "fair share"
    waited, _ = await granted_after(a)
    assert 0.05 <= waited <= 0.2


async def test_flushall_settles_the_key_for_window_plus_lease(client: Client) -> None:
    """After Redis lost its data, the next ask is denied "settling after a reset" for
    window + lease: long enough for every slot taken before the loss to have freed."""
    b = await budget(client, limit=3, window=0.2, lease=0.1)
    assert isinstance(await b.acquire(), Grant)
    await client.flushall()
    denied = await b.acquire()
    assert isinstance(denied, Denied) and denied.reason == "settling after a reset"
    assert 0.28 <= denied.wait <= 0.3
    waited, _ = await granted_after(b)
    assert 0.25 <= waited <= 0.45


async def test_first_use_of_a_key_settles(client: Client) -> None:
    """A key Redis has never seen is closed for window + lease, for every instance."""
    key = new_key()
    a = await budget(client, key, settled=False, window=0.2, lease=0.1)
    b = await budget(client, key, settled=False, window=0.2, lease=0.1)
    first = await a.acquire()
    other = await b.acquire()
    assert isinstance(first, Denied) and first.reason == "settling after a reset"
    assert isinstance(other, Denied) and other.reason == "settling after a reset"
    waited, _ = await granted_after(b)
    assert 0.2 <= waited <= 0.4


async def test_every_key_expires(client: Client) -> None:
    """Every key the budget writes has a TTL: an abandoned key leaves nothing behind."""
    b = await budget(client, settled=False, window=0.2, lease=0.1)
    await b.acquire()
    await client.delete(b.keys[KEY.blocked])
    grant = await b.acquire()
    assert isinstance(grant, Grant)
    await b.block(3600, "429")
    await b.acquire()  # denied: marks this instance hungry
    mine = await client.keys(b.keys[KEY.slots].removesuffix("slots") + "*")
    ttls = {raw(name).decode(): await client.pttl(name) for name in mine}
    assert len(ttls) == 7
    assert all(ttl > 0 for ttl in ttls.values()), ttls
    assert ttls[b.keys[KEY.epoch]] > 6 * 24 * 3600 * 1000
    assert ttls[b.keys[KEY.blocked]] >= 3600 * 1000  # outlives the block it holds
    assert ttls[b.keys[KEY.slots]] <= 601 * 1000


async def test_snapshot_reports_the_shared_state(clients: Callable[[], Client]) -> None:
    """snapshot(): slots used (all and mine), limit, block, active and hungry instances."""
    key = new_key()
    a = await budget(clients(), key, limit=2, burst=2)
    b = await budget(clients(), key, limit=2, burst=2)
    assert isinstance(await a.acquire(), Grant)
    assert isinstance(await b.acquire(), Grant)
    assert isinstance(await b.acquire(), Denied)
    await a.block(2, "429 slow down")
    snap = await a.snapshot()
    assert snap["used"] == 2 and snap["mine"] == 1 and snap["limit"] == 2
    assert 1.9 <= snap["blocked_for"] <= 2
    assert snap["block_reason"] == "blocked: 429 slow down"
    assert snap["instances"] == sorted([a.instance, b.instance])
    assert snap["hungry"] == [b.instance]


async def test_unreachable_redis_raises_unavailable_quickly() -> None:
    """A closed port fails every method with SharedBudgetUnavailable within a second."""
    c = connect(f"redis://127.0.0.1:{free_port()}/0")
    b = SharedBudget(c, new_key(), limit=5, window=1, lease=1, instance="x")
    calls: list[Callable[[], Awaitable[Any]]] = [
        b.acquire,
        lambda: b.release("x|1"),
        lambda: b.unused("x|1"),
        lambda: b.block(1, "429"),
        b.snapshot,
    ]
    try:
        for call in calls:
            start = now()
            with pytest.raises(SharedBudgetUnavailable):
                await call()
            assert now() - start < 1.0
    finally:
        await c.aclose()


async def test_redis_error_answer_raises_unavailable(client: Client) -> None:
    """An error answer (a key of the wrong type) is SharedBudgetUnavailable, not a redis error."""
    b = await budget(client)
    await client.set(b.keys[KEY.slots], "not a zset")
    with pytest.raises(SharedBudgetUnavailable, match="WRONGTYPE"):
        await b.acquire()


async def test_redis_restart_is_a_reset(redis_server: RedisServer) -> None:
    """Redis killed: Unavailable; started again empty: the key settles before granting."""
    c = connect(redis_server.url)
    try:
        b = await budget(c, window=0.2, lease=0.1)
        assert isinstance(await b.acquire(), Grant)
        redis_server.kill()
        try:
            with pytest.raises(SharedBudgetUnavailable):
                await b.acquire()
        finally:
            redis_server.start()
        answer = await b.acquire()
        assert isinstance(answer, Denied) and answer.reason == "settling after a reset"
    finally:
        await c.aclose()
