"""A relay's part in sharing a PostgreSQL store with other relays (SPEC §6, "Many machines").

Each relay polls only the jobs it owns (postgres_claims.py). This loop keeps that true:
- every `lease / 3` a heartbeat renews the leases of this relay's jobs and deliveries; a job
  it no longer owns (its lease ran out while the database was away, and another relay took
  it) is dropped from its schedule;
- it claims jobs nobody owns (new, given back, or a dead relay's once its lease ran out) up to
  its fair share, the jobs being polled divided by the relays alive; a relay over its share by
  more than a tenth gives the excess back, so a relay that joins gets work;
- it LISTENs: a new job (on any relay) wakes the claim at once, a new due delivery wakes the
  deliverer, so nobody polls the database in a tight loop for them. Without notifications
  (the listening connection lost), the claim still runs every CLAIM_EVERY seconds.
While the database is unreachable, nothing is claimed and the leases are not renewed: after
`store_lease` other relays that can reach it take the work over.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Callable
from typing import TYPE_CHECKING

from relayd.errors import StoreError
from relayd.store.postgres_claims import SHARE_SLACK

if TYPE_CHECKING:
    from relayd.poller import Poller
    from relayd.store.postgres import PostgresStore

log = logging.getLogger("relayd.claimer")

CLAIM_EVERY = 1.0  # seconds between claims when nothing wakes them (a dead relay's lease ends)
LISTEN_RETRY = 1.0  # seconds before listening again after the connection was lost


class Claimer:
    def __init__(
        self,
        store: PostgresStore,
        poller: Poller,
        *,
        on_delivery: Callable[[], None],
    ) -> None:
        self._store = store
        self._poller = poller
        self._on_delivery = on_delivery
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._beat_every = max(0.05, store.lease / 3)
        self.relays = 1  # alive at the last heartbeat, this one included
        self.error: str | None = None  # why the store cannot be reached, while it cannot
        self.listening = False

    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    async def run(self) -> None:
        listener = asyncio.create_task(self._listen(), name="listen")
        try:
            await self._loop()
        finally:
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listener

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        beat_due = 0.0
        woken = False
        while not self._stop.is_set():
            self._wake.clear()
            try:
                if loop.time() >= beat_due:
                    beat_due = loop.time() + self._beat_every
                    await self._heartbeat()
                await self._claim(greedy=not woken)
                self._reachable()
            except StoreError as exc:
                self._unreachable(str(exc))
            except Exception:  # a bug must not stop the claiming for good: the next round tries
                log.exception("claiming failed unexpectedly")
            timeout = min(CLAIM_EVERY, max(0.0, beat_due - loop.time()))
            try:
                await asyncio.wait_for(self._wake.wait(), max(timeout, 0.001))
                woken = True
            except TimeoutError:
                woken = False

    async def _heartbeat(self) -> None:
        store, poller = self._store, self._poller
        owned = poller.owned if poller.owned is not None else set()
        beat = await store.run(store.heartbeat, sorted(owned), sorted(poller.config.providers))
        self.relays = beat.relays
        if beat.lost:
            poller.disown(beat.lost)
            log.warning("%d job(s) now polled by another relay (this one's lease ran out)",
                        len(beat.lost))  # fmt: skip
        share = math.ceil(beat.polling / self.relays)
        excess = len(poller.owned or ()) - math.ceil(share * (1 + SHARE_SLACK))
        if excess > 0 and self.relays > 1:
            given = poller.spare(excess)
            await store.run(store.release_jobs, given)  # first: a failure changes nothing
            poller.disown(set(given))
            log.info("gave %d job(s) back: %d relays share %d", len(given), self.relays,
                     beat.polling)  # fmt: skip

    async def _claim(self, *, greedy: bool) -> None:
        """Woken (a new job, a relay leaving): up to this relay's share, so that every relay
        woken with it gets its part. On the periodic round, also part of what stayed free."""
        store, poller = self._store, self._poller
        providers = sorted(poller.config.providers)
        claimed, left = await store.run(store.claim_jobs, providers, greedy=greedy)
        if claimed:
            poller.adopt(claimed)
            log.debug("claimed %d job(s), %d left free", len(claimed), left)

    def _unreachable(self, error: str) -> None:
        if self.error is None:
            log.error("cannot reach the store: %s; polling and delivery wait for it", error)
        self.error = error

    def _reachable(self) -> None:
        if self.error is not None:
            log.warning("the store answers again: claiming resumes")
        self.error = None

    async def _listen(self) -> None:
        """LISTEN on the store's channels for as long as the relay runs; again after a loss."""
        import psycopg  # the postgres extra, there since the store is

        from relayd.store.postgres_schema import DELIVERIES_CHANNEL, JOBS_CHANNEL

        while True:
            try:
                conn = await psycopg.AsyncConnection.connect(self._store.conninfo, autocommit=True)
                async with conn:
                    await conn.execute(f"LISTEN {JOBS_CHANNEL}")
                    await conn.execute(f"LISTEN {DELIVERIES_CHANNEL}")
                    self.listening = True
                    self.wake()  # what was announced while nobody listened
                    self._on_delivery()
                    async for note in conn.notifies():
                        if note.channel == JOBS_CHANNEL:
                            self.wake()
                        else:
                            self._on_delivery()
            except psycopg.Error as exc:
                if self.listening:
                    log.warning("lost the store's notifications: %s", self._store.safe(exc))
            finally:
                self.listening = False
            await asyncio.sleep(LISTEN_RETRY)

    async def leave(self) -> None:
        """After the poller and the deliverer stopped: hand everything back at once."""
        try:
            await self._store.run(self._store.leave)
        except StoreError as exc:
            log.error("cannot hand this relay's jobs back (others take them in %.0fs): %s",
                      self._store.lease, exc)  # fmt: skip

    def status(self) -> dict[str, object]:
        return {
            "relay": self._store.relay,
            "relays": self.relays,
            "owned": len(self._poller.owned or ()),
            "listening": self.listening,
            "error": self.error,
        }
