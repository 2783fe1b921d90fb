"""Operational events (SPEC §5): relayd telling endpoints about itself, as Svix's operational
webhooks and Convoy's and Outpost's failure alerts do.

An endpoint subscribes through its `events` list, as to a provider's events:
- `relayd.delivery.dead` (`endpoint`, `provider`, `docId`, `webhook_id`, `attempts`, `last_error`):
  a delivery ran out of attempts;
- `relayd.endpoint.down` / `relayd.endpoint.up` (`endpoint`, `since`): an endpoint stopped
  answering (relayd probes it one delivery at a time) / answers again;
- `relayd.key.refused` / `relayd.key.accepted` (`provider`, `http_status`): a provider refused
  an API key (its jobs are paused) / accepts it again.

Each event is stored as a job of the pseudo-provider `relayd` (its docId names the event and
when it happened) with one delivery per subscribed endpoint, in one transaction: it is signed,
retried, recorded, shown by `relayd jobs --provider relayd` and the console, redelivered and
pruned like any other delivery. An event about an endpoint never goes to that endpoint (it is
down, or it is the one whose delivery died), and the death of an event's own delivery raises
no further event.

Debounced: an endpoint that flaps sends at most one `down` and one `up` per its `retry_max`
(10 minutes by default). An `up` follows only a `down` that was sent; a `down` held back
because one was sent less than `retry_max` ago is sent once that much time has passed, if the
endpoint is still down then. Keys need no debouncing: a refused key is probed at most every
`max(rate_window, 4 x poll_interval)`, so its refused/accepted events come no faster.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from relayd.clock import Clock
from relayd.config import Config
from relayd.errors import StoreError
from relayd.models import EVENTS_PROVIDER, Delivery, NewDelivery
from relayd.store import Store

log = logging.getLogger("relayd.events")

PROVIDER = EVENTS_PROVIDER  # the pseudo-provider an event is stored under
DEAD = "relayd.delivery.dead"
DOWN, UP = "relayd.endpoint.down", "relayd.endpoint.up"
REFUSED, ACCEPTED = "relayd.key.refused", "relayd.key.accepted"
OPERATIONAL = frozenset({DEAD, DOWN, UP, REFUSED, ACCEPTED})


@dataclass
class Flaps:
    """One endpoint's down/up events: when the last was sent, and whether a down was sent
    that no up has answered yet; `held`: when a down was held back (it went down then)."""

    last_sent: float | None = None
    down_sent: bool = False
    held: float | None = None


class Events:
    def __init__(
        self,
        *,
        store: Store,
        config: Callable[[], Config],  # the current one: a reload changes subscriptions
        clock: Clock,
        on_stored: Callable[[], None],  # the deliverer's wake-up
    ) -> None:
        self._store = store
        self._config = config
        self._clock = clock
        self._on_stored = on_stored
        self._flaps: dict[str, Flaps] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.sent = 0  # events stored, for tests and status

    # -- what happened ------------------------------------------------------------------------

    def delivery_dead(self, d: Delivery, attempts: int, last_error: str | None) -> None:
        if d.provider == PROVIDER:
            return  # an event's own delivery died: no event about the event
        fields = {
            "endpoint": d.endpoint,
            "provider": d.provider,
            "docId": d.doc_id,
            "webhook_id": d.webhook_id,
            "attempts": attempts,
            "last_error": last_error,
        }
        self._emit(DEAD, f"{d.endpoint}:{d.webhook_id}", fields, about=d.endpoint)

    def endpoint_down(self, endpoint: str, since: float) -> None:
        flaps = self._flaps.setdefault(endpoint, Flaps())
        if flaps.down_sent:
            return
        if flaps.last_sent is not None and since - flaps.last_sent < self._hold(endpoint):
            flaps.held = since  # too soon after the last: sent later if still down (`check`)
            return
        self._down(endpoint, since, flaps)

    def endpoint_up(self, endpoint: str, since: float) -> None:
        flaps = self._flaps.setdefault(endpoint, Flaps())
        flaps.held = None
        if not flaps.down_sent:
            return  # its down was never sent: neither is its up
        flaps.down_sent, flaps.last_sent = False, since
        self._emit(UP, f"{endpoint}:{since:.6f}", {"endpoint": endpoint, "since": since},
                   about=endpoint)  # fmt: skip

    def check(self, now: float) -> None:
        """Send a held-back down whose endpoint is still down once its hold is over (the
        deliverer calls this as it goes round)."""
        for endpoint, flaps in self._flaps.items():
            held, last = flaps.held, flaps.last_sent
            if held is not None and last is not None and now - last >= self._hold(endpoint):
                self._down(endpoint, held, flaps)

    def key_refused(self, provider: str, http_status: int | None) -> None:
        now = self._clock.time()
        self._emit(REFUSED, f"{provider}:{now:.6f}",
                   {"provider": provider, "http_status": http_status})  # fmt: skip

    def key_accepted(self, provider: str, http_status: int | None) -> None:
        now = self._clock.time()
        self._emit(ACCEPTED, f"{provider}:{now:.6f}",
                   {"provider": provider, "http_status": http_status})  # fmt: skip

    # -- sending ------------------------------------------------------------------------------

    def _down(self, endpoint: str, since: float, flaps: Flaps) -> None:
        flaps.down_sent, flaps.held, flaps.last_sent = True, None, self._clock.time()
        self._emit(DOWN, f"{endpoint}:{since:.6f}", {"endpoint": endpoint, "since": since},
                   about=endpoint)  # fmt: skip

    def _hold(self, endpoint: str) -> float:
        config = self._config().endpoints.get(endpoint)
        return config.retry_max if config is not None else 600.0

    def _emit(self, event: str, key: str, fields: dict[str, Any], about: str | None = None) -> None:
        """Store the event with a delivery to each endpoint that subscribes to it (but the one
        it is about); in the background, so that what raised it goes on at once."""
        targets = [
            name
            for name, endpoint in sorted(self._config().endpoints.items())
            if event in endpoint.events and name != about
        ]
        if not targets:
            return
        body = json.dumps({"event_type": event, **fields}, ensure_ascii=False)
        doc_id = f"{event}:{key}"[:256]
        deliveries = [NewDelivery(name, event, body) for name in targets]
        task = asyncio.get_running_loop().create_task(self._store_event(doc_id, deliveries))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _store_event(self, doc_id: str, deliveries: list[NewDelivery]) -> None:
        store = self._store
        try:
            stored = await store.run(store.add_event, doc_id, deliveries, now=self._clock.time())
        except StoreError as exc:
            log.error("cannot store operational event %s: %s", doc_id, exc)
            return
        if stored:
            self.sent += 1
            self._on_stored()

    async def drain(self) -> None:
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
