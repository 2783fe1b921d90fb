"""Delivery against real endpoints on loopback: concurrency, probing a down endpoint, signing;
through the whole daemon (the Deliverer alone: tests/test_deliverer.py)."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from standardwebhooks.webhooks import Webhook

from relayd.mock import provider as mock_provider
from relayd.mock.receiver import Receiver
from relayd.store import SqliteStore
from tests.conftest import (
    api,
    config_dict,
    eventually,
    make_config,
    on_writer,
    running,
    settled,
    states,
)
from tests.db import integrity_check

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

        async def counting(*args: Any) -> float | None:
            nonlocal calls
            calls += 1
            return await original(*args)

        daemon.deliverer._dispatch = counting  # type: ignore[method-assign, assignment]
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
    # the first burst (max_in_flight), then at most one probe per shortest probe delay
    # (retry_max / 2);
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


async def test_a_running_daemon_picks_up_a_replay_made_on_the_database(
    tmp_path: Path, provider: mock_provider.MockProvider, receiver: Receiver
) -> None:
    """`relayd redeliver` writes to the database; the running daemon sends it within ~1 s."""

    config = make_config(config_dict(tmp_path, provider.port, {"app": receiver.port}), tmp_path)
    async with running(config) as daemon:
        await api(daemon, "POST", "/v1/jobs", {"docId": "again"})
        await receiver.wait_for(1)
        await eventually(lambda: settled(daemon, 1))
        other = SqliteStore(config.settings.state_dir / "relayd.db")  # what the CLI opens
        try:
            assert other.redeliver(now=time.time(), endpoint="app") == 1
        finally:
            other.close()
        await receiver.wait_for(2, timeout=5)
        await eventually(lambda: settled(daemon, 1))
    first, second = receiver.accepted
    assert first.headers["webhook-id"] == second.headers["webhook-id"]


async def test_endpoint_deferrals_do_not_spend_attempts_and_redirects_fail(
    tmp_path: Path, provider: mock_provider.MockProvider, aiohttp_server: Any
) -> None:
    """429/503 with Retry-After defer without spending attempts; a 3xx is never followed."""
    answers = [
        web.Response(status=429, headers={"Retry-After": "0"}),
        web.Response(status=503, headers={"Retry-After": "0"}),
        web.Response(status=302, headers={"Location": "/elsewhere"}),
        web.Response(status=200),
    ]
    seen: list[str] = []

    async def hook(request: web.Request) -> web.Response:
        seen.append(request.path)
        return answers[min(len(seen) - 1, 3)] if request.path == "/hook/app" else web.Response()

    app = web.Application()
    app.router.add_post("/{tail:.*}", hook)
    server = await aiohttp_server(app)
    data = config_dict(tmp_path, provider.port, {"app": server.port})
    data["endpoints"]["app"]["max_attempts"] = 2
    config = make_config(data, tmp_path)
    async with running(config) as daemon:
        await api(daemon, "POST", "/v1/jobs", {"docId": "defer"})
        await eventually(lambda: settled(daemon, 1))
        _, detail = await api(daemon, "GET", "/v1/jobs/main/defer")
    assert seen == ["/hook/app"] * 4  # never /elsewhere
    history = [(a["status"], a["outcome"]) for a in detail["deliveries"][0]["history"]]
    assert history == [(429, "deferred"), (503, "deferred"), (302, "retry"), (200, "delivered")]
    assert detail["deliveries"][0]["attempts"] == 2  # the redirect and the success, no deferral


@pytest.mark.parametrize("fault", ["full", "readonly"])
async def test_disk_full_refuses_intake_and_harms_nothing(
    tmp_path: Path, provider: mock_provider.MockProvider, receiver: Receiver, fault: str
) -> None:
    """With the database full (or read-only), the API answers 503 and spool files stay; once
    it can be written again everything is taken and delivered."""
    provider.add_job("stored-before", ready_after=0.6)
    config = make_config(config_dict(tmp_path, provider.port, {"app": receiver.port}), tmp_path)
    async with running(config) as daemon:
        await api(daemon, "POST", "/v1/jobs", {"docId": "stored-before"})
        if fault == "full":
            [(pages,)] = await on_writer(daemon, "PRAGMA page_count")
            await on_writer(daemon, f"PRAGMA max_page_count = {pages}")  # SQLITE_FULL from here
        else:
            await on_writer(daemon, "PRAGMA query_only = ON")  # SQLITE_READONLY from here on
        filler = [{"docId": f"fill-{i}", "metadata": {"pad": "x" * 2000}} for i in range(40)]
        status, answer = await api(daemon, "POST", "/v1/jobs", filler)
        assert status == 503
        assert ("full" if fault == "full" else "readonly") in answer["error"]
        spool_file = config.settings.spool_dir / "waiting.json"
        spool_file.write_text(json.dumps(filler))
        await eventually(lambda: daemon.spool.error is not None, what="spool refusal")
        assert spool_file.exists()
        _, health = await api(daemon, "GET", "/healthz")
        assert health == {"status": "ok"}
        await on_writer(daemon, "PRAGMA max_page_count = 1073741823")  # space again
        await on_writer(daemon, "PRAGMA query_only = OFF")
        daemon.spool.scan()
        assert not spool_file.exists()
        await eventually(lambda: settled(daemon, 41), timeout=15)
        assert integrity_check(daemon.config.settings.state_dir / "relayd.db") == "ok"
    assert {r.json()["docId"] for r in receiver.accepted} >= {"stored-before", "fill-0"}


async def test_graceful_stop_lets_a_post_in_flight_finish(
    tmp_path: Path, provider: mock_provider.MockProvider, aiohttp_server: Any
) -> None:
    """Stopping while a POST is in flight waits for its answer and records it as delivered."""

    server, _ = await slow_endpoint(aiohttp_server, 0.4)
    config = make_config(config_dict(tmp_path, provider.port, {"app": server.port}), tmp_path)
    async with running(config) as daemon:
        await api(daemon, "POST", "/v1/jobs", {"docId": "in-flight"})
        await eventually(lambda: any(s.in_flight for s in daemon.deliverer.endpoints.values()))
    store = SqliteStore(config.settings.state_dir / "relayd.db")
    try:
        job = store.get_job("main", "in-flight")
        assert job is not None and job.state == "delivered"
    finally:
        store.close()
