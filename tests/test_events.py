"""Operational events (relayd/events.py): through the real daemon, an endpoint that subscribes
hears `relayd.endpoint.down`/`up`, `relayd.delivery.dead` and `relayd.key.refused`/`accepted`,
signed like any delivery, with the fields SPEC §5 names, and never about itself; the down/up
debounce in compressed time, with a fake clock."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any, cast

import pytest
from standardwebhooks.webhooks import Webhook

from relayd.config import Config
from relayd.errors import ConfigError
from relayd.events import DEAD, DOWN, UP, Events
from relayd.mock import provider as mock_provider
from relayd.mock import receiver as mock_receiver
from relayd.models import NewDelivery
from relayd.store import Store
from tests.conftest import API_KEY, api, config_dict, eventually, make_config, running
from tests.fakes import FakeClock

WHSEC = "whsec_" + base64.b64encode(b"ops-signing-key-0123456789abcdef").decode()
OPERATIONAL = [
    "relayd.delivery.dead",
    "relayd.endpoint.down",
    "relayd.endpoint.up",
    "relayd.key.refused",
    "relayd.key.accepted",
]


@pytest.fixture
async def ops() -> AsyncIterator[mock_receiver.Receiver]:
    receiver, runner, _ = await mock_receiver.serve()
    yield receiver
    await runner.cleanup()


@pytest.fixture
async def broken() -> AsyncIterator[mock_receiver.Receiver]:
    receiver, runner, _ = await mock_receiver.serve(default_status=500)
    yield receiver
    await runner.cleanup()


def events_config(tmp_path: Path, provider: int, ops: int, broken: int) -> Config:
    """`broken` hears transcripts (and would hear its own down and dead events, which it must
    never get); `ops` hears every operational event, signed."""
    data = config_dict(tmp_path, provider, {"broken": broken, "ops": ops})
    data["providers"]["main"]["endpoints"] = ["broken"]
    data["endpoints"]["broken"] |= {
        "max_attempts": 2,
        "events": ["transcript_ready", DEAD, DOWN, UP],
    }
    data["endpoints"]["ops"] |= {"events": OPERATIONAL, "signing_secret": WHSEC}
    return make_config(data, tmp_path)


def of(receiver: mock_receiver.Receiver, event: str) -> list[dict[str, Any]]:
    return [r.json() for r in receiver.accepted if r.json().get("event_type") == event]


async def test_an_endpoint_going_down_its_dead_delivery_and_its_return_are_told_to_ops(
    tmp_path: Path,
    provider: mock_provider.MockProvider,
    ops: mock_receiver.Receiver,
    broken: mock_receiver.Receiver,
) -> None:
    provider.add_job("ev-1", ready_after=0.0)
    config = events_config(tmp_path, provider.port, ops.port, broken.port)
    async with running(config) as daemon:
        await api(daemon, "POST", "/v1/jobs", {"docId": "ev-1"})
        await eventually(lambda: bool(of(ops, DEAD)) and bool(of(ops, DOWN)), what="events")
        [dead] = of(ops, DEAD)
        [down] = of(ops, DOWN)
        assert dead == {
            "event_type": DEAD,
            "endpoint": "broken",
            "provider": "main",
            "docId": "ev-1",
            "webhook_id": dead["webhook_id"],
            "attempts": 2,
            "last_error": "HTTP 500",
        }
        assert dead["webhook_id"].startswith("msg_")
        assert down["endpoint"] == "broken" and isinstance(down["since"], float)
        broken.set_default_status(200)
        assert (await api(daemon, "POST", "/v1/jobs/main/ev-1/redeliver"))[0] == 202
        await eventually(lambda: bool(of(ops, UP)), what="the up event")
        [up] = of(ops, UP)
        assert up["endpoint"] == "broken" and up["since"] >= down["since"]
        _, events = await api(daemon, "GET", "/v1/jobs?provider=relayd")
    # never about itself: broken heard only the transcript
    assert {r.json()["event_type"] for r in broken.accepted} == {"transcript_ready"}
    verifier = Webhook(WHSEC)
    for r in ops.accepted:
        verifier.verify(r.body, dict(r.headers))  # signed like any delivery
    assert {j["docId"].split(":")[0] for j in events["jobs"]} == {DEAD, DOWN, UP}
    assert all(j["state"] == "delivered" for j in events["jobs"])


async def test_a_refused_key_and_its_return_are_told(
    tmp_path: Path, ops: mock_receiver.Receiver, broken: mock_receiver.Receiver
) -> None:
    mock, runner, port = await mock_provider.serve(
        window=0.25, limit=8, ready_after=0.0, api_keys={"another-key"}
    )
    try:
        config = events_config(tmp_path, port, ops.port, broken.port)
        async with running(config) as daemon:
            await api(daemon, "POST", "/v1/jobs", {"docId": "k-1"})
            await eventually(lambda: bool(of(ops, "relayd.key.refused")), what="refused")
            mock.api_keys = frozenset({API_KEY})
            await eventually(lambda: bool(of(ops, "relayd.key.accepted")), timeout=15,
                             what="accepted")  # fmt: skip
        assert of(ops, "relayd.key.refused") == [
            {"event_type": "relayd.key.refused", "provider": "main", "http_status": 401}
        ]
        assert of(ops, "relayd.key.accepted") == [
            {"event_type": "relayd.key.accepted", "provider": "main", "http_status": 200}
        ]
    finally:
        await runner.cleanup()


class Recorder:
    """A store that only records the events it is asked to keep."""

    def __init__(self) -> None:
        self.events: list[tuple[str, list[str]]] = []

    async def run(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs)

    def add_event(self, doc_id: str, deliveries: Sequence[NewDelivery], *, now: float) -> bool:
        self.events.append((deliveries[0].event, [d.endpoint for d in deliveries]))
        return True


async def test_a_flapping_endpoint_sends_one_down_and_one_up_per_retry_max(
    tmp_path: Path,
) -> None:
    """retry_max 10 s: down at 0 and up at 1 are sent; down at 2 (too soon) is held and its up
    at 3 dropped with it; down at 4 is held and sent at 11, when its hold is over, because the
    endpoint is still down then; nothing goes to the endpoint itself."""
    data = config_dict(tmp_path, 1, {"flappy": 2, "ops": 3})
    data["endpoints"]["flappy"] |= {"retry_max": "10s", "events": [DOWN, UP]}
    data["endpoints"]["ops"] |= {"events": [DOWN, UP]}
    config = make_config(data, tmp_path)
    clock, store = FakeClock(0.0), Recorder()
    events = Events(store=cast(Store, store), config=lambda: config, clock=clock,
                    on_stored=lambda: None)  # fmt: skip
    script = [(0, "down"), (1, "up"), (2, "down"), (3, "up"), (4, "down")]
    for at, what in script:
        clock.advance(at - clock.time())
        (events.endpoint_down if what == "down" else events.endpoint_up)("flappy", at)
        await events.drain()
    assert store.events == [(DOWN, ["ops"]), (UP, ["ops"])]
    clock.advance(10.0 - clock.time())
    events.check(clock.time())
    await events.drain()
    assert len(store.events) == 2  # 10 - 1 < 10: still held
    clock.advance(1.0)
    events.check(clock.time())
    await events.drain()
    assert store.events == [(DOWN, ["ops"]), (UP, ["ops"]), (DOWN, ["ops"])]
    await asyncio.sleep(0)


def test_a_provider_may_not_take_relayds_own_name(tmp_path: Path) -> None:
    """Events are jobs of the pseudo-provider `relayd`: a provider table of that name would
    mix its jobs with them (and its dead deliveries would raise no event)."""
    data = config_dict(tmp_path, 1, {"app": 2})
    data["providers"]["relayd"] = data["providers"].pop("main")
    with pytest.raises(ConfigError, match=r"providers\.relayd: the name is relayd.s own"):
        make_config(data, tmp_path)
