"""The API keys as the poll loop sees them. A `Key` is one API key: its budget, the schedule of its
jobs, whether the provider refuses it, and (with `shared_budget`) its grants from Redis; providers
that share an API key share one `Key`. `Keys` holds every key of the config and carries their
budgets across a reload and a clean restart.

Nothing here sends a request: the poll loop asks a key what may go now and tells it what came
back.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from relayd.budget import Budget, next_window_start
from relayd.cadence import backlog_period
from relayd.clock import Clock
from relayd.config import Config
from relayd.scheduler import Schedule

if TYPE_CHECKING:  # redis-py is an optional extra: imported only when it is used
    from relayd.budget_shared import Budgets, SharedGrants
    from relayd.store import Store

log = logging.getLogger("relayd.keys")

MAX_BLOCK = 3600.0  # seconds: a longer Retry-After (a year-9999 date) is taken as this
HISTORY_SECONDS = 3600.0  # how far back a key remembers its requests per window


def key_id(api_key: str) -> str:
    """Names a budget without revealing the key."""
    return hashlib.sha256(api_key.encode()).hexdigest()[:12]


def block_seconds(retry_after: float | None, wall: float, window: float) -> float:
    """How long a 429 closes a key: its Retry-After (at most MAX_BLOCK); without one, until the
    provider's next aligned window, plus a guard band for the skew between the two clocks."""
    if retry_after is not None:
        return min(retry_after, MAX_BLOCK)
    return next_window_start(wall, window) - wall + min(3.0, window * 0.1)


@dataclass(frozen=True)
class Next:
    """When a polled job is due again, and the soonest it may be polled when budget is spare
    (`ready` <= `due`). `delay`: the soonest gap between two of its polls, as status shows it
    (None: unchanged)."""

    due: float
    ready: float
    delay: float | None = None


class Requests:
    """Requests sent on one key per wall-clock window, and how many of them were answered 429,
    over the last HISTORY_SECONDS: the console's chart. A window with no request is absent."""

    def __init__(self, window: float) -> None:
        self.window = window
        self._windows: deque[list[int]] = deque(maxlen=max(1, math.ceil(HISTORY_SECONDS / window)))

    def sent(self, wall: float, *, limited: bool) -> None:
        index = math.floor(wall / self.window)
        if not self._windows or self._windows[-1][0] != index:
            self._windows.append([index, 0, 0])
        self._windows[-1][1] += 1
        self._windows[-1][2] += limited

    def last(self, wall: float) -> list[tuple[float, int, int]]:
        """(window start, requests, 429s) of each window that began in the last HISTORY_SECONDS
        and saw a request, oldest first (none after `wall`: the clock may have been set back)."""
        first, now = (
            math.floor((wall - HISTORY_SECONDS) / self.window),
            math.floor(wall / self.window),
        )
        return [(i * self.window, n, r) for i, n, r in self._windows if first < i <= now]


class Refusal(StrEnum):
    """What a 401/403 did to a key."""

    STALE = "stale"  # a poll sent later found the key accepted: it stays accepted
    NEW = "new"  # the key is paused now
    AGAIN = "again"  # it was paused already (a probe failed, or an older poll answered)


class Key:
    def __init__(
        self, key: str, budget: Budget, *, clock: Clock, notify: Callable[[], None]
    ) -> None:
        self.id = key
        self.budget = budget
        self.providers: list[str] = []
        self.schedule = Schedule()
        self.requests = Requests(budget.window)
        self.shared: SharedGrants | None = None  # with shared_budget: Redis grants every request
        self.idle_until = 0.0  # monotonic: nothing to do before then unless woken
        self.clock = clock
        self._notify = notify  # the poll loop has something to look at
        self._in_flight: set[int] = set()  # jobs being polled now
        self._delays: dict[int, float] = {}  # job -> soonest gap between its polls (status)
        self._waiters = 0  # requests waiting for a slot outside the schedule (paragraph pages)
        self._freed: set[asyncio.Future[None]] = set()
        # after a 401/403: probing with one poll at a time until `_paused_until`
        self._pause_reason = ""
        self._paused_until = 0.0
        # monotonic send time of the newest poll whose answer said whether the key works: an
        # older answer, arriving later, says nothing about the key now and changes nothing
        self._news_at = -math.inf

    # -- jobs -------------------------------------------------------------------------------------

    def reset(self) -> None:
        """Forget the providers and the schedule (a reload builds them again); jobs in flight
        come back when their polls end."""
        self.providers = []
        self.schedule = Schedule()
        self._delays = {}

    def add(self, job_id: int, due: float, delay: float) -> None:
        """Schedule a job (a new one, or one found again in the store) unless it is being
        polled; `delay` is its usual gap between polls."""
        if job_id not in self._in_flight:
            self.schedule.add(job_id, due)
            self._delays.setdefault(job_id, delay)
            self.wake()

    def forget(self, job_id: int) -> None:
        """Stop polling a job (another relay has it now); one in flight ends its poll."""
        self.schedule.discard(job_id)
        self._delays.pop(job_id, None)

    def scheduled(self) -> list[int]:
        """The jobs waiting for their next poll (none in flight)."""
        return list(self.schedule._due)

    @property
    def jobs(self) -> int:
        """Jobs being polled on this key: scheduled or in flight."""
        return len(self.schedule) + len(self._in_flight)

    def take(self, now: float, wall: float) -> tuple[int, str | None] | None:
        """The next job to poll now, with its budget slot taken (and Redis's grant, if shared);
        None when the budget, a pause or the schedule says nothing may go."""
        if not self._can_dispatch(now):
            return None
        job_id = self.schedule.pop(wall)
        if job_id is None:
            return None
        self.budget.try_acquire(now, wall=wall)
        self._in_flight.add(job_id)
        return job_id, self.shared.take() if self.shared is not None else None

    def done(self, job_id: int, after: Next | None, *, keep: bool) -> None:
        """A poll of `job_id` ended: schedule it again (`after`), or drop it (None: it is no
        longer polled). `keep=False` (shutting down): nothing is scheduled any more."""
        self._in_flight.discard(job_id)
        if after is None:
            self._delays.pop(job_id, None)
        elif keep:
            self.schedule.add(job_id, after.due, after.ready)
            if after.delay is not None:
                self._delays[job_id] = after.delay
        self.wake()

    def _can_dispatch(self, now: float) -> bool:
        if self._pause_reason and (now < self._paused_until or self._in_flight):
            return False  # while the key is refused, one probe at a time
        if self.shared is not None and self.shared.grant is None:
            return False
        return self.budget.available(now) > self._waiters

    def next_wake(self, now: float, wall: float) -> float | None:
        """Seconds until something may be polled, or None when only an answer can change it."""
        due = self.schedule.next_at(wall)
        if due is None or self._waiters or (self._pause_reason and self._in_flight):
            return None
        free = self.budget.next_free_at(now)
        if free is None:
            return None
        delay = max(0.0, due - wall, free - now)
        if self._pause_reason:
            delay = max(delay, self._paused_until - now)
        return delay

    def wake(self) -> None:
        """Something changed: look at this key now, and let waiting requests try for a slot."""
        self.idle_until = 0.0
        for waiter in self._freed:
            if not waiter.done():
                waiter.set_result(None)
        self._notify()

    # -- requests ---------------------------------------------------------------------------------

    async def acquire(self) -> str | None:
        """Wait for a budget slot outside the schedule (paragraph pages of a finished job); with
        a shared budget, also for Redis's grant, whose slot id is returned."""
        self._waiters += 1
        try:
            while True:
                now = self.clock.monotonic()
                if self.budget.try_acquire(now, wall=self.clock.time()):
                    return None if self.shared is None else await self.shared.acquire()
                nxt = self.budget.next_free_at(now)
                freed = asyncio.get_running_loop().create_future()
                self._freed.add(freed)
                try:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(freed, None if nxt is None else nxt - now)
                finally:
                    self._freed.discard(freed)
        finally:
            self._waiters -= 1

    def release(self, slot: str | None) -> None:
        """A request's answer arrived (or relayd gave up on it): its slot frees a window on."""
        self.budget.release(self.clock.monotonic())
        if self.shared is not None:
            self.shared.release(slot)
        self.wake()

    def unused(self, slot: str | None) -> None:
        """A slot was taken but no request went out."""
        self.budget.unused()
        if self.shared is not None:
            self.shared.unused(slot)

    def block(self, retry_after: float | None, window: float) -> float:
        """A 429: send nothing on this key (and, shared, on any instance) for the seconds
        returned."""
        seconds = block_seconds(retry_after, self.clock.time(), window)
        self.budget.block_until(self.clock.monotonic() + seconds, "429 from provider")
        if self.shared is not None:
            self.shared.block(seconds, "429 from provider")
        return seconds

    # -- whether the provider accepts the key -----------------------------------------------------

    def refused_now(self) -> bool:
        """The provider refuses this key (a 401/403 paused it, and no poll since said it
        works)."""
        return bool(self._pause_reason)

    @property
    def paused(self) -> str:
        """Why polling on this key is paused ("" when it is not)."""
        if self._pause_reason:
            return self._pause_reason
        if self.shared is not None and self.shared.unreachable_since is not None:
            where = self.shared.where
            return f"shared budget unreachable ({where}): sending nothing until it returns"
        return ""

    def refused(self, sent_at: float, reason: str, probe_after: float) -> Refusal:
        """A poll sent at `sent_at` was answered 401/403: pause the key and probe it again in
        `probe_after` seconds, unless a poll sent later found the key accepted."""
        if sent_at < self._news_at:
            return Refusal.AGAIN if self._pause_reason else Refusal.STALE
        self._news_at = sent_at
        known = bool(self._pause_reason)
        self._pause_reason = reason
        self._paused_until = self.clock.monotonic() + probe_after
        return Refusal.AGAIN if known else Refusal.NEW

    def accepted(self, sent_at: float) -> bool:
        """A poll sent at `sent_at` was answered: the key works, unless a poll sent later was
        refused (this one may have reached the provider first). True: it had been paused."""
        if sent_at < self._news_at:
            return False
        self._news_at = sent_at
        was_paused = bool(self._pause_reason)
        self._pause_reason, self._paused_until = "", 0.0
        return was_paused

    # -- status -----------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        now, wall = self.clock.monotonic(), self.clock.time()
        budget = self.budget
        capacity = budget.limit / budget.window
        wanted, period = backlog_period(self._delays.values(), capacity)
        due_now = self.schedule.waiting(wall)
        blocked_for = max(0.0, budget.blocked_until() - now)
        closed_for = blocked_for  # nothing can be polled before then
        if self._pause_reason:
            closed_for = max(closed_for, self._paused_until - now)
        backlog = max(0, due_now - budget.available(now))
        return {
            "key": self.id,
            "rate_limit": budget.limit,
            "rate_window": budget.window,
            "budget_used": budget.used_in_window(wall),
            "budget_available": budget.available(now),
            "in_flight_requests": budget.in_flight,
            "jobs_in_flight": self.jobs,
            "scheduled": len(self.schedule),
            "due_now": due_now,
            "polls_wanted_per_second": round(wanted, 3),
            "poll_interval_effective": round(period, 3),
            "backlog_clear_seconds": round(backlog / capacity + closed_for, 3),
            "blocked_for": blocked_for,
            "paused": self.paused or None,
            "shared": self.shared.status() if self.shared is not None else None,
        }


class Keys:
    """Every API key of the config, found by key or by provider name."""

    def __init__(self, *, clock: Clock, notify: Callable[[], None], shared: Budgets | None) -> None:
        self._clock = clock
        self._notify = notify
        self._shared = shared
        self._keys: dict[str, Key] = {}
        self._of: dict[str, Key] = {}
        self._closing: set[asyncio.Task[None]] = set()

    def __iter__(self) -> Iterator[Key]:
        return iter(self._keys.values())

    def of(self, provider: str) -> Key | None:
        return self._of.get(provider)

    def providers(self) -> Iterator[tuple[str, Key]]:
        return iter(self._of.items())

    def configure(self, config: Config) -> None:
        """One key per API key of `config`; a key already known keeps its budget (what it spent,
        a 429 block) under its new limit. Jobs are scheduled again by the caller."""
        old = self._keys
        now = self._clock.monotonic()
        self._keys, self._of = {}, {}
        for name, pc in config.providers.items():
            kid = key_id(pc.api_key.value)
            key = self._keys.get(kid)
            if key is None:
                key = old.get(kid) or Key(
                    kid,
                    Budget(pc.rate_limit, pc.rate_window),
                    clock=self._clock,
                    notify=self._notify,
                )
                key.reset()
                self._keys[kid] = key
                _resize(key, pc.rate_limit, pc.rate_window, now)
            elif pc.rate_limit / pc.rate_window < key.budget.limit / key.budget.window:
                # two tables with one key: the provider allows the smaller of their limits
                _resize(key, pc.rate_limit, pc.rate_window, now)
            key.providers.append(name)
            self._of[name] = key
        if self._shared is not None:
            for key in self._keys.values():
                self._share(key, self._shared, config)
        for kid, key in old.items():
            if kid not in self._keys and key.shared is not None:
                task = asyncio.ensure_future(key.shared.close())
                self._closing.add(task)
                task.add_done_callback(self._closing.discard)

    @staticmethod
    def _share(key: Key, shared: Budgets, config: Config) -> None:
        """The key's grants from the shared budget, for its (possibly reloaded) limit."""
        pcs = [config.providers[name] for name in key.providers]
        budget = shared.budget(
            pcs[0].api_key.value,
            limit=key.budget.limit,
            window=key.budget.window,
            lease=max(pc.timeout for pc in pcs),  # a request may be in flight this long
        )
        if key.shared is None:
            key.shared = shared.grants(budget, providers=lambda: key.providers, on_grant=key.wake)
        else:
            key.shared.budget = budget

    # -- across restarts --------------------------------------------------------------------------

    def restore(self, store: Store) -> None:
        """Start where the last run left off, so a restart cannot double a window's requests.

        After a clean stop the saved slots are seeded. After a crash nothing was saved: a key
        that was busy then stays closed for one window, the time its unknown requests need to
        age out.
        """
        saved = store.take_budgets()
        now, wall = self._clock.monotonic(), self._clock.time()
        for kid, key in self._keys.items():
            if kid in saved:
                state = saved[kid]
                key.budget.seed([t - wall + now for t in state.get("frees", [])], now)
                if state.get("blocked_until"):
                    key.budget.block_until(state["blocked_until"] - wall + now, "429 (saved)")
            elif store.recently_active(key.providers, wall - key.budget.window):
                key.budget.block_until(now + key.budget.window, "restart after a crash")
                log.warning(
                    "no clean shutdown record: key closed for one window (%.3gs) to stay in budget",
                    key.budget.window,
                    extra={"provider": ",".join(key.providers)},
                )

    def save(self, store: Store) -> None:
        """At a clean stop: each key's spent slots and 429 block, in wall-clock time."""
        now, wall = self._clock.monotonic(), self._clock.time()
        budgets = {}
        for kid, key in self._keys.items():
            budget = key.budget
            budgets[kid] = {
                "frees": [t - now + wall for t in budget.pending_frees(now)],
                "blocked_until": budget.blocked_until() - now + wall
                if budget.blocked(now)
                else None,
            }
        store.save_budgets(budgets, now=wall)

    # -- views ------------------------------------------------------------------------------------

    def status(self) -> dict[str, dict[str, Any]]:
        """provider -> its key's budget, jobs and pause, as `relayd status` shows them."""
        return {name: key.status() for name, key in self._of.items()}

    async def shared_status(self, providers: dict[str, dict[str, Any]]) -> None:
        """Add Redis's view (every instance's use of each shared key) to status entries."""
        for name, key in self._of.items():
            budget = providers.get(name, {}).get("budget")
            if key.shared is not None and budget and budget.get("shared") is not None:
                budget["shared"].update(await key.shared.snapshot())

    def shared_problems(self) -> list[str]:
        """One line per key that cannot reach its shared budget (for /readyz and the log)."""
        return [
            f"{key.paused} [{','.join(key.providers)}]"
            for key in self._keys.values()
            if key.shared is not None and key.shared.unreachable_since is not None
        ]

    def shared_reachable(self) -> dict[str, int]:
        """provider -> 1 if its shared budget answers, 0 if not (shared keys only)."""
        return {
            name: int(key.shared.unreachable_since is None)
            for name, key in self._of.items()
            if key.shared is not None
        }

    def budget_used(self) -> dict[str, int]:
        wall = self._clock.time()
        return {name: key.budget.used_in_window(wall) for name, key in self._of.items()}

    async def close(self) -> None:
        """Give back grants in hand and stop asking Redis (after the polls in flight ended)."""
        for key in self._keys.values():
            if key.shared is not None:
                await key.shared.close()
        if self._shared is not None:
            await self._shared.close()


def _resize(key: Key, limit: int, window: float, now: float) -> None:
    if (key.budget.limit, key.budget.window) != (limit, window):
        key.budget = key.budget.resized(limit, window, now)
    if key.requests.window != window:
        key.requests = Requests(window)
