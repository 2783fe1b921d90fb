"""Delivery: POST each finished job's body to its endpoints, at least once, with retries.

The store is the queue: a delivery is `pending` until a 2xx is committed. Per endpoint, at most
`max_in_flight` POSTs at once; once an endpoint fails twice in a row it is probed with one
delivery at a time (behind an endpoint-wide backoff) until it answers 2xx again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import aiohttp
from opentelemetry.trace import StatusCode

from relayd import __version__
from relayd.clock import Clock
from relayd.config import Config, EndpointConfig
from relayd.errors import StoreError
from relayd.metrics import Metrics
from relayd.models import AttemptOutcome, Delivery
from relayd.retry import backoff, parse_retry_after, probe_delay
from relayd.signing import decode_secret, sign
from relayd.store import Store
from relayd.tracing import inject, job_span

if TYPE_CHECKING:
    from relayd.events import Events

log = logging.getLogger("relayd.delivery")

USER_AGENT = f"relayd/{__version__}"
PROBE_AFTER_FAILURES = 2
RECHECK = 1.0  # seconds: pick up changes made to the database by `relayd redeliver`
MAX_DEFERRAL = 24 * 3600.0


@dataclass
class EndpointState:
    in_flight: set[int] = field(default_factory=set)
    failures: int = 0  # consecutive failed attempts
    probe_at: float = 0.0  # wall time; while probing, no attempt before this
    since: float | None = None  # wall time `condition` last changed; None: not since start
    # while the due deliveries are read (off the loop), the ids whose attempts ended meanwhile:
    # the read may still show them pending, and they must not be sent again
    ended_while_reading: set[int] | None = None

    @property
    def probing(self) -> bool:
        return self.failures >= PROBE_AFTER_FAILURES

    @property
    def condition(self) -> str:
        """ "up" (the last attempt succeeded, or none failed yet), "failing" (retrying), or
        "down" (probed with one attempt at a time)."""
        if self.probing:
            return "down"
        return "failing" if self.failures else "up"

    def succeeded(self, now: float) -> None:
        if self.failures:
            self.since = now
        self.failures = 0

    def failed(self, now: float) -> None:
        self.failures += 1
        if self.failures in (1, PROBE_AFTER_FAILURES):
            self.since = now


@dataclass(frozen=True)
class Outcome:
    status: int | None
    error: str | None
    retry_after: float | None


class Deliverer:
    def __init__(
        self,
        *,
        config: Config,
        store: Store,
        session: aiohttp.ClientSession,
        clock: Clock,
        metrics: Metrics,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.config = config
        self.store = store
        self.session = session
        self.clock = clock
        self.metrics = metrics
        self._rand = rand
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping = False
        self.events: Events | None = None  # relayd's operational events (relayd/events.py)
        self.endpoints: dict[str, EndpointState] = {}

    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._stopping = True
        self.wake()

    async def run(self) -> None:
        while not self._stopping:
            self._wake.clear()
            timeout = RECHECK
            wall = self.clock.time()
            if self.events is not None:
                self.events.check(wall)
            for name, endpoint in self.config.endpoints.items():
                try:
                    delay = await self._dispatch(name, endpoint, wall)
                except StoreError as exc:
                    log.error("cannot read deliveries: %s", exc, extra={"endpoint": name})
                    delay = RECHECK
                if delay is not None:
                    timeout = min(timeout, delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), max(timeout, 0.001))

    async def _dispatch(self, name: str, endpoint: EndpointConfig, wall: float) -> float | None:
        """Start the due deliveries this endpoint has room for; return when to look again."""
        state = self.endpoints.setdefault(name, EndpointState())
        if state.probing:
            if state.in_flight:
                return None  # the probe's answer wakes us
            if wall < state.probe_at:
                return state.probe_at - wall
            room = 1
        else:
            room = endpoint.max_in_flight - len(state.in_flight)
            if room <= 0:
                return None
        store = self.store
        ended: set[int] = set()
        state.ended_while_reading = ended
        try:
            due = await store.read(store.due_deliveries, name, wall, room + len(state.in_flight))
        finally:
            state.ended_while_reading = None
        if state.probing:  # it may have gone down while the list was read
            if state.in_flight:
                return None
            room = 1
        started = 0
        for delivery in due:
            if started >= room:
                return 0.0
            if delivery.id in state.in_flight or delivery.id in ended:
                continue
            state.in_flight.add(delivery.id)
            task = asyncio.create_task(self._attempt(endpoint, state, delivery))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            started += 1
        nxt = await store.read(store.next_delivery_at, name, after=wall)
        return None if nxt is None else max(0.0, nxt - wall)

    async def _attempt(self, endpoint: EndpointConfig, state: EndpointState, d: Delivery) -> None:
        try:
            attributes: dict[str, str | int | float] = {
                "relayd.endpoint": endpoint.name,
                "relayd.event": d.event,
                "relayd.webhook_id": d.webhook_id,
                "relayd.attempt": d.attempts + 1,
            }
            with job_span("relayd.deliver", d.provider, d.doc_id, **attributes) as span:
                started = self.clock.monotonic()
                outcome = await self._post(endpoint, d)
                if outcome.status is not None:
                    span.set_attribute("http.response.status_code", outcome.status)
                if outcome.error is not None:
                    span.set_status(StatusCode.ERROR, outcome.error)
                await self._record(endpoint, state, d, outcome, self.clock.monotonic() - started)
        except StoreError as exc:
            log.error("cannot record delivery attempt: %s", exc, extra=_context(endpoint, d))
        except Exception:
            log.exception("delivery attempt failed unexpectedly", extra=_context(endpoint, d))
        finally:
            state.in_flight.discard(d.id)
            if state.ended_while_reading is not None:
                state.ended_while_reading.add(d.id)
            self.wake()

    async def _post(self, endpoint: EndpointConfig, d: Delivery) -> Outcome:
        body = d.payload.encode()
        timestamp = int(self.clock.time())
        headers = {
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
            "webhook-id": d.webhook_id,
            "webhook-timestamp": str(timestamp),
        }
        inject(headers)  # traceparent: the job's trace, this attempt's span
        if endpoint.signing_secrets:
            keys = [decode_secret(s.value) for s in endpoint.signing_secrets]
            headers["webhook-signature"] = sign(keys, d.webhook_id, timestamp, body)
        try:
            async with self.session.post(
                endpoint.url,
                data=body,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=endpoint.timeout),
                allow_redirects=False,
            ) as resp:
                with contextlib.suppress(aiohttp.ClientError):
                    await resp.content.read(65536)  # drain a little; the body is not used
                retry_after = parse_retry_after(
                    resp.headers.get("Retry-After"), resp.headers.get("Date"), self.clock.time()
                )
                error = None if 200 <= resp.status < 300 else f"HTTP {resp.status}"
                return Outcome(resp.status, error, retry_after)
        except TimeoutError:
            return Outcome(None, f"timeout after {endpoint.timeout:g}s", None)
        except (aiohttp.ClientError, OSError) as exc:
            return Outcome(None, f"{type(exc).__name__}: {exc}".rstrip(": "), None)

    async def _record(
        self,
        endpoint: EndpointConfig,
        state: EndpointState,
        d: Delivery,
        outcome: Outcome,
        duration: float,
    ) -> None:
        now = self.clock.time()
        ctx = _context(endpoint, d)
        if outcome.error is None:
            was_down = state.probing
            if await self.store.run(
                self.store.record_attempt,
                d.id,
                now=now,
                duration=duration,
                status=outcome.status,
                error=None,
                outcome=AttemptOutcome.DELIVERED,
            ):
                self.metrics.deliveries.labels(endpoint.name, "success").inc()
                self.metrics.delivery_latency.observe(max(0.0, now - d.created_at))
            if state.probing:
                log.info("endpoint answers again: draining backlog", extra=ctx)
            state.succeeded(now)
            if was_down and self.events is not None:
                self.events.endpoint_up(endpoint.name, now)
            return
        was_down = state.probing
        state.failed(now)
        if state.probing and not was_down and self.events is not None:
            self.events.endpoint_down(endpoint.name, state.since or now)
        if state.probing:
            state.probe_at = now + probe_delay(
                state.failures - PROBE_AFTER_FAILURES + 1,
                endpoint.retry_initial,
                endpoint.retry_max,
                self._rand,
            )
        deferral = outcome.status in (429, 503) and outcome.retry_after is not None
        attempts = d.attempts + (0 if deferral else 1)
        if not deferral and attempts >= endpoint.max_attempts:
            if await self.store.run(
                self.store.record_attempt,
                d.id,
                now=now,
                duration=duration,
                status=outcome.status,
                error=outcome.error,
                outcome=AttemptOutcome.DEAD,
            ):
                self.metrics.deliveries.labels(endpoint.name, "dead").inc()
                log.error("delivery dead after %d attempts: %s", attempts, outcome.error, extra=ctx)
                if self.events is not None:
                    self.events.delivery_dead(d, attempts, outcome.error)
            return
        delay = backoff(attempts, endpoint.retry_initial, endpoint.retry_max, self._rand)
        if outcome.retry_after is not None:
            delay = max(delay, min(outcome.retry_after, MAX_DEFERRAL))
        if state.probing:
            state.probe_at = max(state.probe_at, now + delay)
        if not await self.store.run(
            self.store.record_attempt,
            d.id,
            now=now,
            duration=duration,
            status=outcome.status,
            error=outcome.error,
            outcome=AttemptOutcome.DEFERRED if deferral else AttemptOutcome.RETRY,
            next_attempt_at=now + delay,
            spend=not deferral,
        ):
            return  # cancelled meanwhile: nothing to retry, nothing to count
        self.metrics.deliveries.labels(endpoint.name, "retry").inc()
        if deferral:
            log.warning("endpoint deferred delivery (%s): next in %.2fs", outcome.error, delay,
                        extra=ctx)  # fmt: skip
        else:
            log.warning(
                "delivery failed (attempt %d of %d): %s; next in %.2fs",
                attempts,
                endpoint.max_attempts,
                outcome.error,
                delay,
                extra=ctx,
            )

    async def drain(self, bound: float) -> int:
        """Let POSTs in flight finish within `bound` seconds; return how many were cut off."""
        tasks = list(self._tasks)
        if not tasks:
            return 0
        _, pending = await asyncio.wait(tasks, timeout=bound)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        return len(pending)


def _context(endpoint: EndpointConfig, d: Delivery) -> dict[str, str]:
    """The `extra=` of a log line about one delivery: which job, where to."""
    return {
        "provider": d.provider,
        "job": d.doc_id,
        "endpoint": endpoint.name,
        "webhook_id": d.webhook_id,
    }
