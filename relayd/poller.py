"""The poll loop: takes due jobs from each key's schedule while its budget has a slot, polls them,
and records what came back. One `KeyGroup` per API key; providers sharing a key share it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import aiohttp
from multidict import CIMultiDict

from relayd.budget import Budget, next_window_start
from relayd.cadence import RunTimes, backlog_period, next_delay
from relayd.clock import Clock
from relayd.config import Config, ProviderConfig
from relayd.errors import NotFound, ProviderError, RateLimited, Retryable, StoreError, Unauthorized
from relayd.metrics import Metrics
from relayd.models import Job, JobState, NewDelivery, PollOutcome
from relayd.providers.base import Answer, Finished, Provider
from relayd.retry import parse_retry_after, poll_backoff
from relayd.scheduler import Schedule
from relayd.store import Store

if TYPE_CHECKING:  # redis-py is an optional extra: the gate is imported only when it is used
    from relayd.gate import SharedBudgets, SharedGate

log = logging.getLogger("relayd.poller")

NOT_FOUND_CONFIRMATIONS = 3
MAX_BLOCK = 3600  # seconds: a longer Retry-After (a year-9999 date) is taken as this
MAX_ANSWER_BYTES = 32 * 1024 * 1024


def key_id(api_key: str) -> str:
    """Names a budget without revealing the key."""
    return hashlib.sha256(api_key.encode()).hexdigest()[:12]


@dataclass
class KeyGroup:
    """One API key: its budget, its schedule, and whether the provider has refused the key."""

    key: str
    budget: Budget
    providers: list[str]
    schedule: Schedule = field(default_factory=Schedule)
    paused_until: float = 0.0  # monotonic; set after 401/403
    pause_reason: str = ""
    # monotonic send time of the newest poll whose answer said whether the key works: an older
    # answer, arriving later, says nothing about the key now and changes nothing
    key_news_at: float = -math.inf
    waiters: int = 0  # requests waiting for a slot outside the schedule (paragraph pages)
    in_flight: set[int] = field(default_factory=set)
    idle_until: float = 0.0  # monotonic: nothing to do before then unless the group is woken
    # job -> the soonest it may be polled again, as a delay (poll_interval, max-age, backoff)
    targets: dict[int, float] = field(default_factory=dict)
    ready_at: dict[int, float] = field(default_factory=dict)  # polls in flight: when ready again
    gate: SharedGate | None = None  # with shared_budget: every request also needs Redis's grant

    def can_dispatch(self, now: float) -> bool:
        if self.pause_reason and (now < self.paused_until or self.in_flight):
            return False  # while the key is refused, one probe at a time
        if self.gate is not None and self.gate.grant is None:
            return False
        return self.budget.available(now) > self.waiters


class Upstream:
    """The `Http` a provider uses for one poll: every request spends the key's budget."""

    def __init__(
        self, poller: Poller, group: KeyGroup, provider: ProviderConfig, slot: str | None
    ) -> None:
        self._poller = poller
        self._group = group
        self._provider = provider
        self.slot = slot  # the shared budget's grant for the prepaid request
        self.prepaid_used = False

    async def get(
        self,
        url: str,
        *,
        headers: Mapping[str, str] | None = None,
        params: Mapping[str, str] | None = None,
        prepaid: bool = False,
    ) -> Answer:
        poller, group, clock = self._poller, self._group, self._poller.clock
        if prepaid and not self.prepaid_used:
            self.prepaid_used = True
            slot = self.slot
        else:
            slot = await poller.acquire(group)
        code = "error"
        try:
            timeout = aiohttp.ClientTimeout(total=self._provider.timeout)
            async with poller.session.get(
                url, headers=headers, params=params, timeout=timeout, allow_redirects=False
            ) as resp:
                code = str(resp.status)
                chunks, size = [], 0
                async for chunk in resp.content.iter_chunked(65536):
                    size += len(chunk)
                    if size > MAX_ANSWER_BYTES:
                        raise Retryable(f"answer larger than {MAX_ANSWER_BYTES} bytes")
                    chunks.append(chunk)
                body = _blank(b"".join(chunks), self._provider.api_key.value)
                answer = Answer(resp.status, CIMultiDict(resp.headers), body)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise Retryable(f"{type(exc).__name__}: {exc}".rstrip(": ")) from None
        finally:
            group.budget.release(clock.monotonic())
            if group.gate is not None:
                group.gate.release(slot)
            poller.metrics.upstream_requests.labels(self._provider.name, code).inc()
            poller.wake(group)
        if answer.status == 429:
            poller.metrics.rate_limited.labels(self._provider.name).inc()
            retry_after = parse_retry_after(
                answer.headers.get("Retry-After"), answer.headers.get("Date"), clock.time()
            )
            poller.block(group, self._provider, retry_after)
            raise RateLimited("HTTP 429", retry_after)
        return answer


BLANK_MIN = 12  # keys shorter than this are not blanked: they could be words of a transcript


def _blank(body: bytes, key: str) -> bytes:
    """The answer without the API key. Some APIs quote the key they refuse, and error bodies
    reach the log, the poll history and status; the key never belongs in a delivery either.
    A short key (a test key, say) might also occur in a transcript, which must arrive intact."""
    raw = key.encode()
    return body.replace(raw, b"********") if len(raw) >= BLANK_MIN and raw in body else body


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
        shared: SharedBudgets | None = None,
    ) -> None:
        self.config = config
        self.shared = shared
        self.store = store
        self.providers = providers
        self.session = session
        self.clock = clock
        self.metrics = metrics
        self._on_finished = on_finished
        self._wake = asyncio.Event()
        self._slot_waiters: set[asyncio.Future[None]] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping = False
        self.groups: dict[str, KeyGroup] = {}
        self.group_of: dict[str, KeyGroup] = {}
        self.run_times = RunTimes()
        self._build_groups()

    def _build_groups(self) -> None:
        """One group per API key; a key already known keeps its budget (and what it spent)."""
        old = self.groups
        now = self.clock.monotonic()
        self.groups, self.group_of = {}, {}
        for name, pc in self.config.providers.items():
            key = key_id(pc.api_key.value)
            group = self.groups.get(key)
            if group is None:
                group = old.get(key) or KeyGroup(key, Budget(pc.rate_limit, pc.rate_window), [])
                group.providers = []
                group.schedule = Schedule()
                group.targets = {}
                self.groups[key] = group
                self._resize(group, pc.rate_limit, pc.rate_window, now)
            elif pc.rate_limit / pc.rate_window < group.budget.limit / group.budget.window:
                # two tables with one key: the provider allows the smaller of their limits
                self._resize(group, pc.rate_limit, pc.rate_window, now)
            group.providers.append(name)
            self.group_of[name] = group
        if self.shared is not None:
            for group in self.groups.values():
                self._share(group, self.shared)
        for key, group in old.items():
            if key not in self.groups and group.gate is not None:
                task = asyncio.ensure_future(group.gate.close())
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    def _share(self, group: KeyGroup, shared: SharedBudgets) -> None:
        """The key's gate to the shared budget, for its (possibly reloaded) limit."""
        pcs = [self.config.providers[name] for name in group.providers]
        budget = shared.budget(
            pcs[0].api_key.value,
            limit=group.budget.limit,
            window=group.budget.window,
            lease=max(pc.timeout for pc in pcs),  # a request may be in flight this long
        )
        if group.gate is None:
            group.gate = shared.gate(
                budget, providers=lambda: group.providers, on_grant=lambda: self.wake(group)
            )
        else:
            group.gate.budget = budget

    @staticmethod
    def _resize(group: KeyGroup, limit: int, window: float, now: float) -> None:
        if (group.budget.limit, group.budget.window) != (limit, window):
            group.budget = group.budget.resized(limit, window, now)

    def reconfigure(self, config: Config, providers: Mapping[str, Provider]) -> None:
        """Apply a reloaded config: new providers and keys take effect, jobs are kept."""
        self.config = config
        self.providers = providers
        self._build_groups()
        self._schedule_all()

    # -- scheduling -----------------------------------------------------------------------------

    def restore_budgets(self) -> None:
        """Start where the last run left off, so a restart cannot double a window's requests.

        After a clean stop the saved slots are seeded. After a crash nothing was saved: a key
        that was busy then stays closed for one window, the time its unknown requests need to
        age out.
        """
        saved = self.store.take_budgets()
        now, wall = self.clock.monotonic(), self.clock.time()
        for key, group in self.groups.items():
            if key in saved:
                state = saved[key]
                group.budget.seed([t - wall + now for t in state.get("frees", [])], now)
                if state.get("blocked_until"):
                    group.budget.block_until(state["blocked_until"] - wall + now, "429 (saved)")
            elif self.store.recently_active(group.providers, wall - group.budget.window):
                group.budget.block_until(now + group.budget.window, "restart after a crash")
                log.warning(
                    "no clean shutdown record: key closed for one window (%.3gs) to stay in budget",
                    group.budget.window,
                    extra={"provider": ",".join(group.providers)},
                )

    def save_budgets(self) -> None:
        now, wall = self.clock.monotonic(), self.clock.time()
        budgets = {}
        for key, group in self.groups.items():
            budget = group.budget
            budgets[key] = {
                "frees": [t - now + wall for t in budget.pending_frees(now)],
                "blocked_until": budget.blocked_until() - now + wall
                if budget.blocked(now)
                else None,
            }
        self.store.save_budgets(budgets, now=wall)

    def load(self) -> int:
        """Schedule every job the store says is still being polled (start-up recovery), and
        recall how long recent jobs took."""
        self.restore_budgets()
        self.run_times.seed(self.store.run_times())
        return self._schedule_all()

    def _schedule_all(self) -> int:
        count = 0
        orphans: set[str] = set()
        for job_id, provider, due in self.store.polling_jobs():
            group = self.group_of.get(provider)
            if group is None:
                orphans.add(provider)
            elif job_id not in group.in_flight:
                group.schedule.add(job_id, due)
                group.targets.setdefault(job_id, self.config.providers[provider].poll_interval)
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
        group = self.group_of.get(job.provider)
        if group is not None and job.id not in group.in_flight:
            group.schedule.add(job.id, job.next_poll_at)
            group.targets.setdefault(job.id, self.config.providers[job.provider].poll_interval)
            self.wake(group)

    def wake(self, group: KeyGroup | None = None) -> None:
        """Run the dispatch loop now: for `group`, or for every group."""
        if group is None:
            for each in self.groups.values():
                each.idle_until = 0.0
        else:
            group.idle_until = 0.0
        self._wake.set()
        for waiter in self._slot_waiters:
            if not waiter.done():
                waiter.set_result(None)

    def block(self, group: KeyGroup, provider: ProviderConfig, retry_after: float | None) -> None:
        now, wall = self.clock.monotonic(), self.clock.time()
        if retry_after is not None and retry_after > MAX_BLOCK:
            log.warning(
                "Retry-After of %.0fs is implausible; honouring %ds",
                retry_after,
                MAX_BLOCK,
                extra={"provider": provider.name},
            )
            retry_after = MAX_BLOCK
        if retry_after is None:
            # no Retry-After: wait for the provider's next window, with a guard band for skew
            retry_after = next_window_start(wall, provider.rate_window) - wall
            retry_after += min(3.0, provider.rate_window * 0.1)
        group.budget.block_until(now + retry_after, "429 from provider")
        if group.gate is not None:
            group.gate.block(retry_after, "429 from provider")
        log.warning(
            "rate limited: key paused for %.3fs",
            retry_after,
            extra={"provider": provider.name},
        )

    async def acquire(self, group: KeyGroup) -> str | None:
        """Wait for a budget slot outside the schedule (paragraph pages of a finished job); with
        a shared budget, also for Redis's grant, whose slot id is returned."""
        group.waiters += 1
        try:
            while True:
                now = self.clock.monotonic()
                if group.budget.try_acquire(now, wall=self.clock.time()):
                    return None if group.gate is None else await group.gate.acquire()
                nxt = group.budget.next_free_at(now)
                freed = asyncio.get_running_loop().create_future()
                self._slot_waiters.add(freed)
                try:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(freed, None if nxt is None else nxt - now)
                finally:
                    self._slot_waiters.discard(freed)
        finally:
            group.waiters -= 1

    async def run(self) -> None:
        """Dispatch polls until stopped. The caller has run `load()` (recovery) first."""
        expiry_due = 0.0
        try:
            while not self._stopping:
                self._wake.clear()
                now, wall = self.clock.monotonic(), self.clock.time()
                if now >= expiry_due:
                    self._expire(wall)
                    expiry_due = now + 5.0
                timeout = expiry_due - now
                for group in self.groups.values():
                    if now < group.idle_until:  # not woken, and nothing due before then
                        timeout = min(timeout, group.idle_until - now)
                        continue
                    self._dispatch(group, now, wall)
                    delay = self._next_wake(group, now, wall)
                    if group.gate is not None:
                        # work that could go now waits only for Redis's grant, which wakes us
                        group.gate.want(delay == 0.0)
                        delay = None if delay == 0.0 else delay
                    group.idle_until = math.inf if delay is None else now + delay
                    if delay is not None:
                        timeout = min(timeout, delay)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), max(timeout, 0.001))
        finally:
            await self.drain()

    def _dispatch(self, group: KeyGroup, now: float, wall: float) -> None:
        while group.can_dispatch(now):
            job_id = group.schedule.pop(wall)
            if job_id is None:
                return
            group.budget.try_acquire(now, wall=wall)
            group.in_flight.add(job_id)
            slot = group.gate.take() if group.gate is not None else None
            task = asyncio.create_task(self._poll(group, job_id, slot), name=f"poll-{job_id}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _next_wake(self, group: KeyGroup, now: float, wall: float) -> float | None:
        due = group.schedule.next_at(wall)
        if due is None or group.waiters or (group.pause_reason and group.in_flight):
            return None  # an answer will wake us
        delay = max(0.0, due - wall)
        free = group.budget.next_free_at(now)
        if free is None:
            return None  # an answer will wake us
        delay = max(delay, free - now)
        if group.pause_reason:
            delay = max(delay, group.paused_until - now)
        return delay

    def _expire(self, wall: float) -> None:
        for name, pc in self.config.providers.items():
            try:
                for job in self.store.expire_jobs(name, wall - pc.max_job_age, wall):
                    log.warning("job expired", extra={"provider": name, "job": job.doc_id})
            except StoreError as exc:
                log.error("cannot expire jobs: %s", exc, extra={"provider": name})

    # -- one poll -------------------------------------------------------------------------------

    async def _poll(self, group: KeyGroup, job_id: int, slot: str | None) -> None:
        due: float | None = None
        ctx: dict[str, object] = {"job_id": job_id}  # _poll_once adds provider and job
        try:
            due = await self._poll_once(group, job_id, slot, ctx)
        except StoreError as exc:
            log.error("cannot record poll: %s", exc, extra=ctx)
            due = self.clock.time() + 1.0
        except Exception:
            log.exception("poll failed unexpectedly", extra=ctx)
            due = self.clock.time() + 1.0
        finally:
            group.in_flight.discard(job_id)
            ready = group.ready_at.pop(job_id, due)
            if due is None:
                group.targets.pop(job_id, None)
            elif not self._stopping:
                group.schedule.add(job_id, due, ready)
            self.wake(group)

    async def _poll_once(
        self, group: KeyGroup, job_id: int, slot: str | None, ctx: dict[str, object]
    ) -> float | None:
        """Poll one job (a slot, and `slot` of a shared budget, are already taken); return when
        it is due again, or None. `ctx` gets the job's log context once the job is read."""
        wall = self.clock.time()
        job = self.store.job_by_id(job_id)
        provider = self.providers.get(job.provider) if job else None
        if job is None or job.state != JobState.POLLING or provider is None:
            self._unused(group, slot)
            return None  # cancelled, or finished elsewhere
        pc = self.config.providers[job.provider]
        sent_at = self.clock.monotonic()
        ctx.pop("job_id", None)  # the provider and doc id name the job for an operator
        ctx.update(provider=job.provider, job=job.doc_id)
        if wall - job.submitted_at >= pc.max_job_age:
            self._unused(group, slot)
            self.store.end_job(job.id, JobState.EXPIRED, now=wall, detail="max_job_age passed")
            log.warning("job expired", extra=ctx)
            return None
        upstream = Upstream(self, group, pc, slot)
        try:
            outcome = await provider.poll(job, upstream)
        except RateLimited:
            return job.next_poll_at  # keeps its place in line
        except Unauthorized as exc:
            self._pause(group, pc, str(exc), ctx, sent_at)
            return job.next_poll_at
        except NotFound as exc:
            now = self.clock.time()
            if job.not_found + 1 >= NOT_FOUND_CONFIRMATIONS:
                self.store.end_job(job.id, JobState.UNKNOWN, now=now, detail=str(exc))
                log.warning("job unknown to the provider", extra=ctx)
                return None
            due = now + pc.poll_interval
            self._record(
                job, now, 404, PollOutcome.NOT_FOUND, str(exc), due, job.errors, job.not_found + 1
            )
            return due
        except ProviderError as exc:
            return self._failed_poll(job, pc, exc, ctx)
        finally:
            if not upstream.prepaid_used:
                self._unused(group, slot)  # the provider never sent: give the slot back
        self._resume(group, pc, sent_at)
        now = self.clock.time()
        if isinstance(outcome, Finished):
            self._finish(job, pc, outcome, now)
            return None
        interval = pc.poll_interval
        if pc.adaptive_polling and not outcome.finishing:
            expected = self.run_times.expect(job.provider, outcome.hints)
            jobs = len(group.schedule) + len(group.in_flight)
            crowded = jobs * group.budget.window / group.budget.limit > pc.poll_interval
            interval = next_delay(
                now - job.submitted_at, pc.poll_interval, expected, crowded=crowded
            )
        soonest = max(pc.poll_interval, outcome.min_interval or 0.0)
        due = now + max(interval, soonest)
        self._record(
            job,
            now,
            outcome.http_status,
            PollOutcome.PENDING,
            None,
            due,
            0,
            0,
            outcome.status,
            outcome.etag,
            ready=now + soonest,  # spare budget may poll it before it is due
        )
        return due

    def _failed_poll(
        self, job: Job, pc: ProviderConfig, exc: ProviderError, ctx: dict[str, object]
    ) -> float | None:
        now = self.clock.time()
        errors = job.errors + 1
        due = now + poll_backoff(errors, pc.poll_interval)
        log.warning("poll failed (%d in a row): %s", errors, exc, extra=ctx)
        self._record(
            job, now, None, PollOutcome.ERROR, str(exc), due, errors, job.not_found, exc.status
        )
        return due

    def _record(
        self,
        job: Job,
        now: float,
        http_status: int | None,
        outcome: PollOutcome,
        detail: str | None,
        due: float,
        errors: int,
        not_found: int,
        status: str | None = None,
        etag: str | None = None,
        ready: float | None = None,
    ) -> None:
        """Store a poll that did not finish the job. It is due again at `due`, and may be
        polled from `ready` on when budget is spare (default: not before `due`, a backoff)."""
        self.store.record_poll(
            job.id,
            now=now,
            http_status=http_status,
            outcome=outcome,
            detail=detail,
            next_poll_at=due,
            errors=errors,
            not_found=not_found,
            last_status=status,
            etag=etag,
        )
        group = self.group_of.get(job.provider)
        if group is not None:
            ready = due if ready is None else ready
            group.targets[job.id] = ready - now  # the soonest delay, for status
            group.ready_at[job.id] = ready

    def _finish(self, job: Job, pc: ProviderConfig, outcome: Finished, now: float) -> None:
        targets = job.endpoints if job.endpoints is not None else pc.endpoints
        deliveries = []
        for event in outcome.events:
            body = json.dumps(event.payload, ensure_ascii=False)
            for name in targets:
                endpoint = self.config.endpoints.get(name)
                if endpoint is not None and event.name in endpoint.events:
                    deliveries.append(NewDelivery(name, event.name, body))
        ran_for = None
        if outcome.succeeded:
            # it finished between the previous poll (or submission) and this one
            ran_for = max(0.0, (max(job.updated_at, job.submitted_at) + now) / 2 - job.submitted_at)
        self.store.finish_job(
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
        )
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

    @staticmethod
    def _unused(group: KeyGroup, slot: str | None) -> None:
        group.budget.unused()
        if group.gate is not None:
            group.gate.unused(slot)

    def _pause(
        self,
        group: KeyGroup,
        pc: ProviderConfig,
        reason: str,
        ctx: dict[str, object],
        sent_at: float,
    ) -> None:
        """The provider refused the key while polling the job in `ctx` (a poll sent at
        `sent_at`): pause the key, unless a poll sent later found it accepted."""
        if sent_at < group.key_news_at:
            if not group.pause_reason:
                log.info(
                    "401/403 to a poll sent before one that found the key accepted: not pausing",
                    extra=ctx,
                )
            return
        group.key_news_at = sent_at
        probe_after = max(pc.rate_window, min(60.0, pc.poll_interval * 4))
        if not group.pause_reason:
            log.error(
                "API KEY REFUSED (%s): jobs on this key are paused; probing every %.1fs",
                reason,
                probe_after,
                extra=ctx,
            )
        group.pause_reason = reason
        group.paused_until = self.clock.monotonic() + probe_after

    def _resume(self, group: KeyGroup, pc: ProviderConfig, sent_at: float) -> None:
        """A poll sent at `sent_at` was answered: the key works, unless a poll sent later was
        refused (this one may have reached the provider first)."""
        if sent_at < group.key_news_at:
            return
        group.key_news_at = sent_at
        if group.pause_reason:
            log.warning("API key accepted again: jobs resume", extra={"provider": pc.name})
            group.pause_reason = ""
            group.paused_until = 0.0

    # -- status and shutdown --------------------------------------------------------------------

    def status(self) -> dict[str, dict[str, Any]]:
        now, wall = self.clock.monotonic(), self.clock.time()
        out: dict[str, dict[str, Any]] = {}
        for name, group in self.group_of.items():
            budget = group.budget
            capacity = budget.limit / budget.window
            wanted, period = backlog_period(group.targets.values(), capacity)
            due_now = group.schedule.waiting(wall)
            blocked_for = max(0.0, budget.blocked_until() - now)
            closed_for = blocked_for  # nothing can be polled before then
            if group.pause_reason:
                closed_for = max(closed_for, group.paused_until - now)
            backlog = max(0, due_now - budget.available(now))
            out[name] = {
                "key": group.key,
                "rate_limit": budget.limit,
                "rate_window": budget.window,
                "budget_used": budget.used_in_window(wall),
                "budget_available": budget.available(now),
                "in_flight_requests": budget.in_flight,
                "jobs_in_flight": len(group.schedule) + len(group.in_flight),
                "scheduled": len(group.schedule),
                "due_now": due_now,
                "polls_wanted_per_second": round(wanted, 3),
                "poll_interval_effective": round(period, 3),
                "backlog_clear_seconds": round(backlog / capacity + closed_for, 3),
                "blocked_for": blocked_for,
                "paused": group.pause_reason or self._unshared(group) or None,
                "shared": group.gate.status() if group.gate is not None else None,
            }
        return out

    @staticmethod
    def _unshared(group: KeyGroup) -> str:
        if group.gate is None or group.gate.unreachable_since is None:
            return ""
        return f"shared budget unreachable ({group.gate.where}): sending nothing until it returns"

    async def shared_status(self, providers: dict[str, dict[str, Any]]) -> None:
        """Add Redis's view (every instance's use of each shared key) to `status()` entries."""
        for name, group in self.group_of.items():
            budget = providers.get(name, {}).get("budget")
            if group.gate is not None and budget and budget.get("shared") is not None:
                budget["shared"].update(await group.gate.snapshot())

    def shared_problems(self) -> list[str]:
        """One line per key that cannot reach its shared budget (for /readyz and the log)."""
        return [
            f"{problem} [{','.join(g.providers)}]"
            for g in self.groups.values()
            if (problem := self._unshared(g))
        ]

    def budget_used(self) -> dict[str, int]:
        wall = self.clock.time()
        return {name: g.budget.used_in_window(wall) for name, g in self.group_of.items()}

    def stop(self) -> None:
        self._stopping = True
        self.wake()

    async def drain(self) -> None:
        """Let polls in flight finish (their answers are recorded) — the caller bounds the wait."""
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
        for group in self.groups.values():
            if group.gate is not None:
                await group.gate.close()  # after the polls: their releases reach Redis
        if self.shared is not None:
            await self.shared.close()
