"""The poll loop: takes due jobs from each key's schedule while its budget has a slot, polls them
through their provider, and records what came back (still going, failed, finished).

The keys (`relayd.keys`) decide what may go; the providers (`relayd.providers`) turn answers
into progress or a result; this module only runs the loop and writes down each outcome.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import aiohttp

from relayd.cadence import RunTimes, next_delay
from relayd.clock import Clock
from relayd.config import Config, ProviderConfig
from relayd.errors import NotFound, ProviderError, RateLimited, StoreError, Unauthorized
from relayd.keys import Key, Keys, Next, Refusal
from relayd.metrics import Metrics
from relayd.models import Job, JobState, PollOutcome
from relayd.providers.base import Finished, Progress, Provider
from relayd.providers.upstream import Upstream
from relayd.retry import poll_backoff
from relayd.routing import route
from relayd.store import Store
from relayd.tracing import job_span

if TYPE_CHECKING:  # redis-py is an optional extra
    from relayd.budget_shared import Budgets
    from relayd.events import Events

log = logging.getLogger("relayd.poller")

NOT_FOUND_CONFIRMATIONS = 3  # 404s in a row before a job is `unknown`
EXPIRY_SECONDS = 5.0  # how often jobs past max_job_age are looked for, besides at their polls
RETRY_AFTER_FAILURE = 1.0  # a poll that could not be recorded (or crashed) is due again then


class Poller:
    def __init__(
        self,
        *,
        config: Config,
        store: Store,
        providers: Mapping[str, Provider],
        session: aiohttp.ClientSession,
        clock: Clock,
        metrics: Metrics,
        on_finished: Callable[[], None],
        shared: Budgets | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.providers = providers
        self.session = session
        self.clock = clock
        self.metrics = metrics
        self._on_finished = on_finished
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping = False
        self.keys = Keys(clock=clock, notify=self._wake.set, shared=shared)
        self.keys.configure(config)
        self.run_times = RunTimes()
        # on a shared store, the jobs this relay owns (relayd/claimer.py adopts and disowns
        # them); None: every job in the store is this relay's
        self.owned: set[int] | None = set() if store.shared else None
        self.events: Events | None = None  # relayd's operational events (relayd/events.py)

    def reconfigure(self, config: Config, providers: Mapping[str, Provider]) -> None:
        """Apply a reloaded config: new providers and keys take effect, jobs are kept."""
        self.config = config
        self.providers = providers
        self.keys.configure(config)
        self._schedule_all()

    # -- scheduling -----------------------------------------------------------------------------

    def load(self) -> int:
        """Schedule every job the store says is still being polled (start-up recovery), and
        recall how long recent jobs took and what the keys spent before a clean stop. On a
        shared store the jobs come as they are claimed, and the budget is the store's."""
        self.run_times.seed(self.store.run_times())
        if self.owned is not None:
            return 0
        self.keys.restore(self.store)
        return self._schedule_all()

    def adopt(self, jobs: list[tuple[int, str, float]]) -> None:
        """Jobs this relay now owns (id, provider, due): schedule them, due now at the latest.
        Their due times were set by the clocks of other relays, which may be minutes off this
        one's: a job that changes hands is polled at its first turn, and its cadence goes on
        from there by this relay's clock."""
        assert self.owned is not None
        wall = self.clock.time()
        for job_id, provider, due in jobs:
            key = self.keys.of(provider)
            if key is not None:
                self.owned.add(job_id)
                key.add(job_id, min(due, wall), self.config.providers[provider].poll_interval)
        self.wake()

    def disown(self, ids: set[int]) -> None:
        """Jobs another relay owns now: no longer polled here."""
        assert self.owned is not None
        self.owned -= ids
        for key in self.keys:
            for job_id in ids:
                key.forget(job_id)

    def spare(self, count: int) -> list[int]:
        """Up to `count` jobs waiting for their next poll (none in flight): those a relay above
        its share gives back (they are dropped with `disown` once the store has them back)."""
        spare: list[int] = []
        for key in self.keys:
            spare += key.scheduled()[: count - len(spare)]
        return spare

    def _schedule_all(self) -> int:
        if self.owned is not None:
            count = 0
            for job_id, provider, due in self.store.polling_jobs():
                if job_id in self.owned and (key := self.keys.of(provider)) is not None:
                    key.add(job_id, due, self.config.providers[provider].poll_interval)
                    count += 1
            self.wake()
            return count
        count = 0
        orphans: set[str] = set()
        for job_id, provider, due in self.store.polling_jobs():
            key = self.keys.of(provider)
            if key is None:
                orphans.add(provider)
                continue
            key.add(job_id, due, self.config.providers[provider].poll_interval)
            count += 1
        for provider in sorted(orphans):
            log.warning(
                "jobs of provider %r wait: it is not in the config",
                provider,
                extra={"provider": provider},
            )
        self.wake()
        return count

    def add(self, job: Job) -> None:
        """A new job was stored: schedule it (its first poll is due now)."""
        key = self.keys.of(job.provider)
        if key is not None:
            key.add(job.id, job.next_poll_at, self.config.providers[job.provider].poll_interval)

    def wake(self) -> None:
        """Run the dispatch loop now, for every key."""
        for key in self.keys:
            key.wake()
        self._wake.set()

    async def run(self) -> None:
        """Dispatch polls until stopped. The caller has run `load()` (recovery) first."""
        expiry_due = 0.0
        try:
            while not self._stopping:
                self._wake.clear()
                now, wall = self.clock.monotonic(), self.clock.time()
                if now >= expiry_due:
                    await self._expire(wall)
                    expiry_due = now + EXPIRY_SECONDS
                timeout = expiry_due - now
                for key in self.keys:
                    if now < key.idle_until:  # not woken, and nothing due before then
                        timeout = min(timeout, key.idle_until - now)
                        continue
                    self._dispatch(key, now, wall)
                    delay = key.next_wake(now, wall)
                    if key.shared is not None:
                        # work that could go now waits only for Redis's grant, which wakes us
                        key.shared.want(delay == 0.0)
                        delay = None if delay == 0.0 else delay
                    key.idle_until = math.inf if delay is None else now + delay
                    if delay is not None:
                        timeout = min(timeout, delay)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), max(timeout, 0.001))
        finally:
            await self.drain()

    def _dispatch(self, key: Key, now: float, wall: float) -> None:
        while (taken := key.take(now, wall)) is not None:
            job_id, slot = taken
            task = asyncio.create_task(self._poll(key, job_id, slot), name=f"poll-{job_id}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _expire(self, wall: float) -> None:
        for name, pc in self.config.providers.items():
            try:
                expired = await self.store.run(
                    self.store.expire_jobs, name, wall - pc.max_job_age, wall
                )
                for job in expired:
                    log.warning("job expired", extra={"provider": name, "job": job.doc_id})
            except StoreError as exc:
                log.error("cannot expire jobs: %s", exc, extra={"provider": name})

    # -- one poll -------------------------------------------------------------------------------

    async def _poll(self, key: Key, job_id: int, slot: str | None) -> None:
        after: Next | None = None
        ctx: dict[str, object] = {"job_id": job_id}  # _poll_once adds provider and job
        try:
            after = await self._poll_once(key, job_id, slot, ctx)
        except StoreError as exc:
            log.error("cannot record poll: %s", exc, extra=ctx)
            after = self._retry_soon()
        except Exception:
            log.exception("poll failed unexpectedly", extra=ctx)
            after = self._retry_soon()
        finally:
            if self.owned is not None:
                if job_id not in self.owned:
                    after = None  # another relay has it now
                elif after is None:
                    self.owned.discard(job_id)  # no longer polled
            key.done(job_id, after, keep=not self._stopping)

    def _retry_soon(self) -> Next:
        due = self.clock.time() + RETRY_AFTER_FAILURE
        return Next(due, due)

    async def _poll_once(
        self, key: Key, job_id: int, slot: str | None, ctx: dict[str, object]
    ) -> Next | None:
        """Poll one job (its budget slot, and `slot` of a shared budget, are already taken);
        return when it is due again, or None when it is no longer polled. `ctx` gets the job's
        log context once the job is read."""
        wall = self.clock.time()
        try:
            job = await self.store.read(self.store.job_by_id, job_id)
        except StoreError:
            key.unused(slot)  # nothing was sent: the slot must not stay taken for good
            raise
        provider = self.providers.get(job.provider) if job else None
        if job is None or job.state != JobState.POLLING or provider is None:
            key.unused(slot)
            return None  # cancelled, or finished elsewhere
        ctx.pop("job_id", None)  # the provider and doc id name the job for an operator
        ctx.update(provider=job.provider, job=job.doc_id)
        with job_span("relayd.poll", job.provider, job.doc_id) as span:
            after = await self._poll_job(key, job, provider, slot, ctx, wall)
            span.set_attribute("relayd.job_state", "polling" if after else "ended")
            return after

    async def _poll_job(
        self,
        key: Key,
        job: Job,
        provider: Provider,
        slot: str | None,
        ctx: dict[str, object],
        wall: float,
    ) -> Next | None:
        pc = self.config.providers[job.provider]
        sent_at = self.clock.monotonic()
        if wall - job.submitted_at >= pc.max_job_age:
            key.unused(slot)
            await self.store.run(
                self.store.end_job, job.id, JobState.EXPIRED, now=wall, detail="max_job_age passed"
            )
            log.warning("job expired", extra=ctx)
            return None
        upstream = Upstream(
            session=self.session, key=key, provider=pc, slot=slot, metrics=self.metrics
        )
        try:
            outcome = await provider.poll(job, upstream)
        except RateLimited:
            return Next(job.next_poll_at, job.next_poll_at)  # keeps its place in line
        except Unauthorized as exc:
            self._refused(key, pc, exc, ctx, sent_at)
            return Next(job.next_poll_at, job.next_poll_at)
        except NotFound as exc:
            return await self._not_found(job, pc, exc, ctx)
        except ProviderError as exc:
            return await self._failed(job, pc, exc, ctx)
        finally:
            if not upstream.prepaid_used:
                key.unused(slot)  # the provider never sent: give the slot back
        if key.accepted(sent_at):
            log.warning("API key accepted again: jobs resume", extra={"provider": pc.name})
            if self.events is not None:
                self.events.key_accepted(pc.name, outcome.http_status)
        now = self.clock.time()
        if isinstance(outcome, Finished):
            await self._finish(job, pc, outcome, now)
            return None
        return await self._progress(key, job, pc, outcome, now)

    async def _progress(
        self, key: Key, job: Job, pc: ProviderConfig, outcome: Progress, now: float
    ) -> Next:
        """Not finished: due again after the cadence's delay, never sooner than poll_interval or
        the answer's max-age (but spare budget may poll it from then on)."""
        interval = pc.poll_interval
        if pc.adaptive_polling and not outcome.finishing:
            expected = self.run_times.expect(job.provider, outcome.hints)
            crowded = key.jobs * key.budget.window / key.budget.limit > pc.poll_interval
            interval = next_delay(
                now - job.submitted_at, pc.poll_interval, expected, crowded=crowded
            )
        soonest = pc.poll_interval
        if not outcome.finishing:  # a race, not a wait: the answer's max-age does not apply
            soonest = max(soonest, outcome.min_interval or 0.0)
        due = now + max(interval, soonest)
        await self.store.run(
            self.store.record_poll,
            job.id,
            now=now,
            http_status=outcome.http_status,
            outcome=PollOutcome.PENDING,
            detail=None,
            next_poll_at=due,
            errors=0,
            not_found=0,
            last_status=outcome.status,
            etag=outcome.etag,
        )
        return Next(due, now + soonest, soonest)

    async def _not_found(
        self, job: Job, pc: ProviderConfig, exc: NotFound, ctx: dict[str, object]
    ) -> Next | None:
        """A 404: polled again at poll_interval until it is confirmed, then `unknown`."""
        now = self.clock.time()
        if job.not_found + 1 >= NOT_FOUND_CONFIRMATIONS:
            await self.store.run(
                self.store.end_job, job.id, JobState.UNKNOWN, now=now, detail=str(exc)
            )
            log.warning("job unknown to the provider", extra=ctx)
            return None
        due = now + pc.poll_interval
        await self.store.run(
            self.store.record_poll,
            job.id,
            now=now,
            http_status=404,
            outcome=PollOutcome.NOT_FOUND,
            detail=str(exc),
            next_poll_at=due,
            errors=job.errors,
            not_found=job.not_found + 1,
        )
        return Next(due, due, pc.poll_interval)

    async def _failed(
        self, job: Job, pc: ProviderConfig, exc: ProviderError, ctx: dict[str, object]
    ) -> Next:
        """No usable answer: polled again after a backoff that grows with each failure."""
        now = self.clock.time()
        errors = job.errors + 1
        due = now + poll_backoff(errors, pc.poll_interval)
        log.warning("poll failed (%d in a row): %s", errors, exc, extra=ctx)
        await self.store.run(
            self.store.record_poll,
            job.id,
            now=now,
            http_status=None,
            outcome=PollOutcome.ERROR,
            detail=str(exc),
            next_poll_at=due,
            errors=errors,
            not_found=job.not_found,
            last_status=exc.status,
        )
        return Next(due, due, due - now)

    async def _finish(self, job: Job, pc: ProviderConfig, outcome: Finished, now: float) -> None:
        targets = job.endpoints if job.endpoints is not None else pc.endpoints
        deliveries = route(outcome.events, targets, self.config.endpoints)
        ran_for = None
        if outcome.succeeded:
            # it finished between the previous poll (or submission) and this one
            ran_for = max(0.0, (max(job.updated_at, job.submitted_at) + now) / 2 - job.submitted_at)
        if not await self.store.run(
            self.store.finish_job,
            job.id,
            now=now,
            result_status=outcome.status,
            result=outcome.result,
            deliveries=deliveries,
            http_status=outcome.http_status,
            detail=f"{len(deliveries)} deliveries",
            succeeded=outcome.succeeded,
            ran_for=ran_for,
            media_kind=outcome.hints.kind,
            media_seconds=outcome.hints.media_seconds,
        ):
            return  # cancelled while it was polled: nothing stored, nothing to deliver
        if ran_for is not None:
            self.run_times.observe(job.provider, outcome.hints, ran_for)
        log.info(
            "job %s: %d deliveries",
            outcome.status,
            len(deliveries),
            extra={"provider": job.provider, "job": job.doc_id},
        )
        if deliveries:
            self._on_finished()

    def _refused(
        self,
        key: Key,
        pc: ProviderConfig,
        exc: Unauthorized,
        ctx: dict[str, object],
        sent_at: float,
    ) -> None:
        """The provider refused the key while polling the job in `ctx`: pause the key."""
        reason = str(exc)
        probe_after = max(pc.rate_window, min(60.0, pc.poll_interval * 4))
        refusal = key.refused(sent_at, reason, probe_after)
        if refusal is Refusal.STALE:
            log.info(
                "401/403 to a poll sent before one that found the key accepted: not pausing",
                extra=ctx,
            )
        elif refusal is Refusal.NEW:
            if self.events is not None:
                self.events.key_refused(pc.name, exc.http_status)
            log.error(
                "API KEY REFUSED (%s): jobs on this key are paused; probing every %.1fs",
                reason,
                probe_after,
                extra=ctx,
            )

    # -- status and shutdown --------------------------------------------------------------------

    def status(self) -> dict[str, dict[str, Any]]:
        return self.keys.status()

    def stop(self) -> None:
        self._stopping = True
        self.wake()

    async def drain(self) -> None:
        """Let polls in flight finish (their answers are recorded) — the caller bounds the wait."""
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
        await self.keys.close()  # after the polls: their releases reach Redis
