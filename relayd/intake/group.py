"""Group commit for API intake: submissions that arrive together share one transaction, so one
fsync, and each request is answered once that commit is on disk.

A request's jobs still go in whole or not at all: if a shared transaction fails, each request
is tried again in a transaction of its own, and only the one that cannot be stored is refused.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

MAX_TURNS = 8  # a bound on the wait for one more request, whatever the load
# Items one shared transaction takes at most (about 0.1 ms of the writer's time an item): the
# rest waits for the next, and so do the writes of polls and deliveries queued behind it. A
# single larger request still goes in whole, in one transaction of its own.
MAX_GROUP = 256
T = TypeVar("T")
R = TypeVar("R")


class GroupCommit(Generic[T, R]):
    """Batches calls of `commit` (one transaction over a list, one result per item, in order).

    A batch opens with the first `add` and stays open, turn by turn of the event loop, while
    each turn brings someone new (MAX_TURNS at most: an aiohttp request takes a few turns from
    its socket to its handler). One commit at a time: requests that arrive while one is being
    made go together in the next, so under load batches grow by themselves; alone, a request
    waits a turn or two.
    """

    def __init__(
        self,
        commit: Callable[[Sequence[T]], Awaitable[list[R]]],
        rolled_back: tuple[type[Exception], ...],
    ) -> None:
        """`rolled_back`: errors after which `commit` has stored nothing (a retry is safe)."""
        self._commit = commit
        self._rolled_back = rolled_back
        self._waiting: list[tuple[Sequence[T], asyncio.Future[list[R]]]] = []
        self._scheduled = False
        self._seen = 0  # waiters at the last turn of the loop
        self._turns = 0
        self._drain: asyncio.Task[None] | None = None
        self.commits = 0  # transactions, for tests and benchmarks

    async def add(self, items: Sequence[T]) -> list[R]:
        """Results for `items`, once they are committed; the commit's exception if not."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[R]] = loop.create_future()
        self._waiting.append((items, future))
        if not self._scheduled:
            self._scheduled = True
            self._seen, self._turns = 0, 0
            loop.call_soon(self._tick, loop)
        return await future

    def _tick(self, loop: asyncio.AbstractEventLoop) -> None:
        """Commit once a turn of the loop brought no one new (or after MAX_TURNS turns)."""
        self._turns += 1
        if len(self._waiting) > self._seen and self._turns < MAX_TURNS:
            self._seen = len(self._waiting)
            loop.call_soon(self._tick, loop)
            return
        self._drain = loop.create_task(self._commit_all())

    async def _commit_all(self) -> None:
        """Batch after batch, each whole requests up to MAX_GROUP items, until no one waits."""
        try:
            while self._waiting:
                batch: list[tuple[Sequence[T], asyncio.Future[list[R]]]] = []
                size = 0
                while self._waiting and (not batch or size + len(self._waiting[0][0]) <= MAX_GROUP):
                    batch.append(self._waiting.pop(0))
                    size += len(batch[-1][0])
                await self._commit_batch(batch)
        finally:
            self._scheduled = False

    async def _commit_batch(self, batch: list[tuple[Sequence[T], asyncio.Future[list[R]]]]) -> None:
        if len(batch) == 1:
            await self._one(*batch[0])
            return
        try:
            self.commits += 1
            results = await self._commit([item for items, _ in batch for item in items])
        except self._rolled_back:
            for items, future in batch:  # each alone: only what cannot be stored is refused
                await self._one(items, future)
            return
        except Exception as exc:
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        start = 0
        for items, future in batch:
            if not future.done():  # a waiter cancelled meanwhile was stored all the same
                future.set_result(results[start : start + len(items)])
            start += len(items)

    async def _one(self, items: Sequence[T], future: asyncio.Future[list[R]]) -> None:
        try:
            self.commits += 1
            result = await self._commit(items)
        except Exception as exc:
            if not future.done():
                future.set_exception(exc)
        else:
            if not future.done():
                future.set_result(result)
