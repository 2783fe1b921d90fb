"""Which endpoints hear a finished job: each event goes to every target endpoint whose `events`
list names it (a job's own `endpoints`, else its provider's)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence

from relayd.config import EndpointConfig
from relayd.models import NewDelivery
from relayd.providers.base import Event


def route(
    events: Iterable[Event], targets: Sequence[str], endpoints: Mapping[str, EndpointConfig]
) -> list[NewDelivery]:
    """One delivery per event and listening target; a target no longer in the config (a job
    that named an endpoint since removed) gets nothing."""
    deliveries = []
    for event in events:
        body = json.dumps(event.payload, ensure_ascii=False)
        for name in targets:
            endpoint = endpoints.get(name)
            if endpoint is not None and event.name in endpoint.events:
                deliveries.append(NewDelivery(name, event.name, body))
    return deliveries
