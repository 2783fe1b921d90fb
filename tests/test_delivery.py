"""Delivery against real endpoints on loopback: concurrency, probing a down endpoint, signing."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from aiohttp import web
from standardwebhooks.webhooks import Webhook

from relayd.mock import provider as mock_provider
from relayd.mock.receiver import Receiver
from tests.conftest import api, config_dict, eventually, make_config, running, settled, states

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
OLD_SECRET = "whsec_dGhlIG9sZCBzZWNyZXQgd2UgYXJlIHJvdGF0aW5n"


async def slow_endpoint(aiohttp_server: Any, delay: float) -> tuple[Any, list[float]]:
    active: list[float] = []
    peak = [0.0]

    async def handler(request: web.Request) -> web.Response:
        await request.read()
        active.append(1)
        peak[0] = max(peak[0], len(active))
        await asyncio.sleep(delay)
        active.pop()
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/{tail:.*}", handler)
    return await aiohttp_server(app), peak


async def test_a_slow_post_does_not_spin_the_delivery_loop(
    tmp_path: Path, provider: mock_provider.MockProvider, aiohttp_server: Any
) -> None:
    """While a POST is in flight the loop waits for it instead of re-checking in a tight loop."""
    server, _ = await slow_endpoint(aiohttp_server, 0.5)
    config = make_config(config_dict(tmp_path, provider.port, {"app": server.port}), tmp_path)
    async with running(config) as daemon:
        calls = 0
        original = daemon.deliverer._dispatch

        def counting(*args: Any) -> float | None:
            nonlocal calls
            calls += 1
            return original(*args)

        daemon.deliverer._dispatch = counting  # type: ignore[method-assign]
        await api(daemon, "POST", "/v1/jobs", {"docId": "slow-post"})
        await eventually(lambda: settled(daemon, 1))
    assert calls < 40, f"{calls} dispatch passes for one 0.5 s POST"


async def test_concurrency_per_endpoint_is_bounded(
    tmp_path: Path, provider: mock_provider.MockProvider, aiohttp_server: Any
) -> None:
    """Never more than max_in_flight POSTs at once to one endpoint."""
    server, peak = await slow_endpoint(aiohttp_server, 0.1)
    data = config_dict(tmp_path, provider.port, {"app": server.port}, rate_limit=40)
    data["endpoints"]["app"]["max_in_flight"] = 3
    config = make_config(data, tmp_path)
    for i in range(12):
        provider.add_job(f"c-{i}", ready_after=0)
    async with running(config) as daemon:
        await api(daemon, "POST", "/v1/jobs", [{"docId": f"c-{i}"} for i in range(12)])
        await eventually(lambda: settled(daemon, 12))
    assert peak[0] == 3


async def test_down_endpoint_is_probed_not_hammered_then_drains(
    tmp_path: Path, provider: mock_provider.MockProvider, receiver: Receiver
) -> None:
    """20 deliveries to an endpoint answering 503: few POSTs while down, all land after."""
    receiver.set_default_status(503)
    data = config_dict(tmp_path, provider.port, {"app": receiver.port}, rate_limit=40)
    data["endpoints"]["app"].update(retry_initial="20ms", retry_max="100ms")
    config = make_config(data, tmp_path)
    ids = [f"p-{i}" for i in range(20)]
    for doc in ids:
        provider.add_job(doc, ready_after=0)
    async with running(config) as daemon:
        started = time.monotonic()
        await api(daemon, "POST", "/v1/jobs", [{"docId": d} for d in ids])
        await eventually(lambda: states(daemon).get("delivering") == 20)
        await asyncio.sleep(0.6)  # the outage, compressed
        outage = time.monotonic() - started
        during = len(receiver.received)
        receiver.set_default_status(200)
        await eventually(lambda: settled(daemon, 20), what="backlog drained")
        assert states(daemon) == {"delivered": 20}
    # the first burst (max_in_flight), then at most one probe per minimum gate (retry_max / 2);
    # without probing, 8 POSTs in flight retrying every ~50 ms would make ~160 per second
    bound = 8 + outage / 0.05 + 2
    assert during <= bound, f"{during} POSTs in a {outage:.2f}s outage (bound {bound:.0f})"
    assert {r.json()["docId"] for r in receiver.accepted} == set(ids)


async def test_signatures_verify_with_the_standard_webhooks_library(
    tmp_path: Path, provider: mock_provider.MockProvider, receiver: Receiver
) -> None:
    """Signed with two secrets (rotation): a receiver holding either one verifies."""
    data = config_dict(tmp_path, provider.port, {"app": receiver.port})
    data["endpoints"]["app"]["signing_secret"] = f"{SECRET} {OLD_SECRET}"
    config = make_config(data, tmp_path)
    async with running(config) as daemon:
        await api(daemon, "POST", "/v1/jobs", {"docId": "signed"})
        [got] = await receiver.wait_for(1)
    headers = {k: got.headers[k] for k in ("webhook-id", "webhook-timestamp", "webhook-signature")}
    assert got.headers["webhook-signature"].count("v1,") == 2
    for secret in (SECRET, OLD_SECRET):
        assert Webhook(secret).verify(got.body, headers)["docId"] == "signed"
