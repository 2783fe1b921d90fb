"""The Deliverer on its own: a real store and a real receiver on loopback, no daemon around
it. Retries and backoff, deferrals, dead letters, probing a down endpoint, the Standard Webhooks
headers, and drain at shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from relayd.clock import SystemClock
from relayd.delivery import USER_AGENT, Deliverer, EndpointState
from relayd.metrics import Metrics
from relayd.mock import receiver as mock_receiver
from relayd.mock.receiver import Receiver
from relayd.models import Delivery, NewDelivery, Submission, webhook_id
from relayd.store import SqliteStore
from tests.conftest import (
    config_dict,
    eventually,
    make_config,
)

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
OLD_SECRET = "whsec_dGhlIG9sZCBzZWNyZXQgd2UgYXJlIHJvdGF0aW5n"


# -- the Deliverer on its own: a real store and receiver, no daemon --------------------------------


class RecordingStore(SqliteStore):
    """The real SQLite store, keeping what each `record_attempt` was told."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.recorded: list[dict[str, Any]] = []

    def record_attempt(self, delivery_id: int, **kwargs: Any) -> bool:
        self.recorded.append(kwargs)
        return super().record_attempt(delivery_id, **kwargs)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[RecordingStore]:
    """The rig's store; closed only after the test has read it."""
    opened = RecordingStore(tmp_path / "relayd.db")
    yield opened
    opened.close()


@dataclass
class Rig:
    deliverer: Deliverer
    store: RecordingStore
    receiver: Receiver
    metrics: Metrics
    doc_ids: list[str]

    def job_state(self, doc_id: str | None = None) -> str:
        job = self.store.get_job("main", doc_id or self.doc_ids[0])
        assert job is not None
        return str(job.state)

    def delivery(self, doc_id: str | None = None) -> Delivery:
        job = self.store.get_job("main", doc_id or self.doc_ids[0])
        assert job is not None
        [delivery] = self.store.deliveries_for(job.id)
        return delivery

    def history(self, doc_id: str | None = None) -> list[tuple[int | None, str]]:
        attempts = self.store.attempts_for(self.delivery(doc_id).id)
        return [(a["status"], a["outcome"]) for a in attempts]

    def count(self, outcome: str) -> float | None:
        labels = {"endpoint": "app", "outcome": outcome}
        return self.metrics.registry.get_sample_value("relayd_deliveries_total", labels)


@contextlib.asynccontextmanager
async def deliverer_rig(
    tmp_path: Path,
    store: RecordingStore,
    *,
    jobs: int = 1,
    url: str | None = None,
    rand: Callable[[], float] = lambda: 0.5,
    on_arrival: Callable[[Deliverer], None] | None = None,
    endpoint: dict[str, Any] | None = None,
    **receiver_args: Any,
) -> AsyncIterator[Rig]:
    """A `Deliverer` running over `jobs` finished jobs with one pending delivery each to `app`
    (a scripted receiver, or `url`), backoff 100 ms to 400 ms unless `endpoint` says otherwise."""
    holder: list[Deliverer] = []
    if on_arrival is not None:
        receiver_args["on_receive"] = lambda _: on_arrival(holder[0])
    receiver, runner, port = await mock_receiver.serve(**receiver_args)
    data = config_dict(tmp_path, port, {"app": port})
    data["endpoints"]["app"].update(
        {"retry_initial": "100ms", "retry_max": "400ms", **(endpoint or {})}
    )
    if url is not None:
        data["endpoints"]["app"]["url"] = url
    config = make_config(data, tmp_path)
    doc_ids = [f"doc-{i}" for i in range(jobs)]
    now = time.time()
    for (job, _), doc_id in zip(
        store.add_jobs([Submission(d, "main") for d in doc_ids], source="api", now=now),
        doc_ids,
        strict=True,
    ):
        payload = json.dumps({"docId": doc_id, "text": "Բարև"}, ensure_ascii=False)
        assert store.finish_job(
            job.id,
            now=now,
            result_status="transcribed",
            result={},
            deliveries=[NewDelivery("app", "transcript_ready", payload)],
            http_status=200,
            detail=None,
        )
    metrics = Metrics()
    session = aiohttp.ClientSession()
    deliverer = Deliverer(
        config=config, store=store, session=session, clock=SystemClock(), metrics=metrics, rand=rand
    )
    holder.append(deliverer)
    task = asyncio.create_task(deliverer.run())
    try:
        yield Rig(deliverer, store, receiver, metrics, doc_ids)
    finally:
        deliverer.stop()
        await asyncio.wait_for(task, 2)
        await deliverer.drain(0.5)
        await session.close()
        await runner.cleanup()


def settled_as(rig: Rig, state: str) -> Callable[[], bool]:
    return lambda: all(rig.job_state(d) == state for d in rig.doc_ids)


async def test_deliverer_a_2xx_marks_the_delivery_and_the_job_delivered(
    tmp_path: Path,
    store: RecordingStore,
) -> None:
    """One POST of the stored body; a 200 makes the delivery and its job `delivered`, once."""
    async with deliverer_rig(tmp_path, store) as rig:
        await eventually(settled_as(rig, "delivered"), timeout=5, what="job delivered")
        delivery = rig.delivery()
        await asyncio.sleep(0.05)  # no second POST follows
    [got] = rig.receiver.received
    assert got.path == "/hook/app"
    assert got.body.decode() == delivery.payload == '{"docId": "doc-0", "text": "Բարև"}'
    assert (delivery.state, delivery.attempts, delivery.last_error) == ("delivered", 1, None)
    assert delivery.delivered_at is not None and delivery.delivered_at >= got.at
    assert rig.history() == [(200, "delivered")]
    assert rig.count("success") == 1.0 and rig.count("retry") is None
    latency = rig.metrics.registry.get_sample_value("relayd_delivery_latency_seconds_count")
    assert latency == 1.0


@pytest.mark.parametrize("rand", [0.25, 0.75])
async def test_deliverer_retries_a_500_after_the_backoff_rand_gives(
    tmp_path: Path, store: RecordingStore, rand: float
) -> None:
    """A 500 spends an attempt and schedules the next at rand * retry_initial; then a 200."""
    async with deliverer_rig(tmp_path, store, statuses=[500], rand=lambda: rand) as rig:
        await eventually(settled_as(rig, "delivered"), timeout=5, what="job delivered")
    retry, success = rig.store.recorded
    assert (retry["status"], retry["error"], retry["outcome"]) == (500, "HTTP 500", "retry")
    assert retry["spend"] is True
    assert retry["next_attempt_at"] - retry["now"] == pytest.approx(rand * 0.1, abs=1e-6)
    _, second = rig.receiver.received
    assert second.at >= retry["next_attempt_at"]  # not a moment early
    assert success["outcome"] == "delivered"
    assert rig.history() == [(500, "retry"), (200, "delivered")]
    assert rig.delivery().attempts == 2
    assert (rig.count("retry"), rig.count("success")) == (1.0, 1.0)


async def test_deliverer_backoff_doubles_per_failure_up_to_retry_max(
    tmp_path: Path,
    store: RecordingStore,
) -> None:
    """Failures 1, 2, 3 wait rand * 50, 100 and 200 ms, the last capped at retry_max 125 ms."""
    endpoint = {"retry_initial": "50ms", "retry_max": "125ms"}
    async with deliverer_rig(tmp_path, store, statuses=[500, 500, 500], endpoint=endpoint) as rig:
        await eventually(settled_as(rig, "delivered"), timeout=5, what="job delivered")
    waits = [r["next_attempt_at"] - r["now"] for r in rig.store.recorded[:3]]
    assert waits == pytest.approx([0.025, 0.05, 0.0625], abs=1e-6)
    assert rig.delivery().attempts == 4
    arrivals = [r.at for r in rig.receiver.received]
    assert all(b - a >= w for (a, b), w in zip(itertools.pairwise(arrivals), waits, strict=True))


async def test_deliverer_429_and_503_with_retry_after_defer_without_spending_attempts(
    tmp_path: Path,
    store: RecordingStore,
) -> None:
    """With max_attempts 1, a 429 and a 503 with Retry-After only defer: the 200 still lands."""
    async with deliverer_rig(
        tmp_path, store, statuses=[429, 503], retry_after="0.1", endpoint={"max_attempts": 1}
    ) as rig:
        await eventually(settled_as(rig, "delivered"), timeout=5, what="job delivered")
    assert rig.history() == [(429, "deferred"), (503, "deferred"), (200, "delivered")]
    assert rig.delivery().attempts == 1  # only the 200
    deferrals = rig.store.recorded[:2]
    assert [d["spend"] for d in deferrals] == [False, False]
    # Retry-After (100 ms) wins over the backoff (0.5 * 100 ms)
    assert [d["next_attempt_at"] - d["now"] for d in deferrals] == pytest.approx(
        [0.1, 0.1], abs=1e-6
    )
    arrivals = [r.at for r in rig.receiver.received]
    assert arrivals[1] - arrivals[0] >= 0.1 and arrivals[2] - arrivals[1] >= 0.1


@pytest.mark.parametrize(
    ("status", "retry_after"), [(429, None), (500, "0.1")], ids=["429-bare", "500-retry-after"]
)
async def test_deliverer_other_failures_spend_an_attempt(
    tmp_path: Path, store: RecordingStore, status: int, retry_after: str | None
) -> None:
    """A 429 without Retry-After, or a 500 with one, is a failure: max_attempts 1 makes it dead."""
    async with deliverer_rig(
        tmp_path, store, statuses=[status], retry_after=retry_after, endpoint={"max_attempts": 1}
    ) as rig:
        await eventually(settled_as(rig, "dead"), timeout=5, what="job dead")
    assert rig.history() == [(status, "dead")]
    assert len(rig.receiver.received) == 1


async def test_deliverer_max_attempts_failures_make_the_delivery_and_job_dead(
    tmp_path: Path,
    store: RecordingStore,
) -> None:
    """max_attempts 3 answered 500: three POSTs, retry, retry, dead; no fourth; the job is dead."""
    endpoint = {"max_attempts": 3, "retry_initial": "20ms", "retry_max": "50ms"}
    async with deliverer_rig(tmp_path, store, default_status=500, endpoint=endpoint) as rig:
        await eventually(settled_as(rig, "dead"), timeout=5, what="job dead")
        await asyncio.sleep(0.1)  # several backoffs: nothing more is sent
    assert len(rig.receiver.received) == 3
    assert rig.history() == [(500, "retry"), (500, "retry"), (500, "dead")]
    delivery = rig.delivery()
    assert (delivery.state, delivery.attempts, delivery.last_error) == ("dead", 3, "HTTP 500")
    assert delivery.delivered_at is None
    assert (rig.count("retry"), rig.count("dead"), rig.count("success")) == (2.0, 1.0, None)


async def test_deliverer_probes_a_failing_endpoint_one_post_at_a_time_until_a_2xx(
    tmp_path: Path,
    store: RecordingStore,
) -> None:
    """Two failures in a row: one POST at a time behind the probe backoff until a 2xx ends it."""
    seen: list[tuple[int, bool]] = []  # at each POST's arrival: POSTs in flight, probing

    def note(deliverer: Deliverer) -> None:
        state = deliverer.endpoints["app"]
        seen.append((len(state.in_flight), state.probing))

    endpoint = {"retry_initial": "50ms", "retry_max": "100ms"}
    async with deliverer_rig(
        tmp_path, store, jobs=4, statuses=[500] * 6, on_arrival=note, endpoint=endpoint
    ) as rig:
        await eventually(settled_as(rig, "delivered"), timeout=5, what="backlog delivered")
        state = rig.deliverer.endpoints["app"]
        assert (state.probing, state.failures) == (False, 0)
    statuses = [r.status for r in rig.receiver.received]
    assert statuses == [500] * 6 + [200] * 4
    assert seen[0] == (4, False)  # the first burst: all four at once
    assert seen[4:7] == [(1, True)] * 3  # three probes, each alone: two fail, one lands
    assert seen[7] == (3, False)  # then the other three together again
    arrivals = [r.at for r in rig.receiver.received]
    # probe delay with rand 0.5: 3/4 of min(retry_max, retry_initial * 2**(failures - 2))
    assert all(b - a >= 0.075 for a, b in itertools.pairwise(arrivals[3:7]))


async def test_deliverer_sends_webhook_id_and_timestamp_and_no_signature_without_a_secret(
    tmp_path: Path,
    store: RecordingStore,
) -> None:
    """webhook-id is the job+event id (same on a retry), timestamp in seconds, no signature."""
    async with deliverer_rig(tmp_path, store, statuses=[500]) as rig:
        await eventually(settled_as(rig, "delivered"), timeout=5, what="job delivered")
    expected = webhook_id("main", "doc-0", "transcript_ready")
    for got in rig.receiver.received:
        assert got.headers["webhook-id"] == expected
        assert 0 <= got.at - int(got.headers["webhook-timestamp"]) < 2  # whole seconds
        assert got.headers["Content-Type"] == "application/json"
        assert got.headers["User-Agent"] == USER_AGENT
        assert "webhook-signature" not in got.headers
    assert len(rig.receiver.received) == 2


async def test_deliverer_signs_so_that_standardwebhooks_verifies(
    tmp_path: Path,
    store: RecordingStore,
) -> None:
    """Every POST (the retry too) verifies with standardwebhooks; another secret rejects it."""
    endpoint = {"signing_secret": SECRET}
    async with deliverer_rig(tmp_path, store, statuses=[500], endpoint=endpoint) as rig:
        await eventually(settled_as(rig, "delivered"), timeout=5, what="job delivered")
    assert len(rig.receiver.received) == 2
    for got in rig.receiver.received:
        headers = {
            k: got.headers[k] for k in ("webhook-id", "webhook-timestamp", "webhook-signature")
        }
        assert got.headers["webhook-signature"].count("v1,") == 1
        assert Webhook(SECRET).verify(got.body, headers) == {"docId": "doc-0", "text": "Բարև"}
        with pytest.raises(WebhookVerificationError):
            Webhook(OLD_SECRET).verify(got.body, headers)


async def hanging_endpoint(
    aiohttp_server: Any, status: int = 204
) -> tuple[str, asyncio.Event, asyncio.Event]:
    """An endpoint that answers `status` only once `release` is set; `arrived` is set on a POST."""
    arrived, release = asyncio.Event(), asyncio.Event()

    async def handler(request: web.Request) -> web.Response:
        await request.read()
        arrived.set()
        await release.wait()
        return web.Response(status=status)

    app = web.Application()
    app.router.add_post("/{tail:.*}", handler)
    server = await aiohttp_server(app)
    return f"http://127.0.0.1:{server.port}/hook/app", arrived, release


async def test_deliverer_drain_cuts_a_post_that_outlives_its_bound(
    tmp_path: Path, store: RecordingStore, aiohttp_server: Any
) -> None:
    """drain(0.1) cuts a hanging POST after ~0.1 s: counted, nothing recorded, still pending."""
    url, arrived, release = await hanging_endpoint(aiohttp_server)
    try:
        async with deliverer_rig(tmp_path, store, url=url) as rig:
            async with asyncio.timeout(5):
                await arrived.wait()
            rig.deliverer.stop()
            loop = asyncio.get_running_loop()
            started = loop.time()
            cut = await rig.deliverer.drain(0.1)
            took = loop.time() - started
            assert cut == 1
            assert 0.1 <= took < 1.0
            assert rig.deliverer.endpoints["app"].in_flight == set()
    finally:
        release.set()
    delivery = rig.delivery()
    assert (delivery.state, delivery.attempts) == ("pending", 0)
    assert rig.store.recorded == []
    assert rig.job_state() == "delivering"


async def test_deliverer_drain_lets_a_post_within_its_bound_finish(
    tmp_path: Path, store: RecordingStore, aiohttp_server: Any
) -> None:
    """drain(2) while a POST is answered 0.1 s later: nothing cut, the 2xx is recorded."""
    url, arrived, release = await hanging_endpoint(aiohttp_server)
    try:
        async with deliverer_rig(tmp_path, store, url=url) as rig:
            async with asyncio.timeout(5):
                await arrived.wait()
            rig.deliverer.stop()
            asyncio.get_running_loop().call_later(0.1, release.set)
            assert await rig.deliverer.drain(2.0) == 0
            assert rig.job_state() == "delivered"
    finally:
        release.set()
    assert rig.history() == [(204, "delivered")]


def refused_url() -> str:
    """A loopback URL nothing listens on (a port just bound and released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/hook/app"


@pytest.mark.parametrize("failure", ["timeout", "refused"])
async def test_deliverer_a_timeout_or_a_refused_connection_spends_an_attempt(
    tmp_path: Path, store: RecordingStore, aiohttp_server: Any, failure: str
) -> None:
    """A timeout or refused connection is a statusless failure with its reason as last_error."""
    release = asyncio.Event()
    if failure == "timeout":
        url, _, release = await hanging_endpoint(aiohttp_server)
    else:
        url = refused_url()
    endpoint = {"max_attempts": 1, "timeout": "100ms"}
    try:
        async with deliverer_rig(tmp_path, store, url=url, endpoint=endpoint) as rig:
            await eventually(settled_as(rig, "dead"), timeout=5, what="job dead")
    finally:
        release.set()
    assert rig.history() == [(None, "dead")]
    error = rig.delivery().last_error
    assert error is not None
    if failure == "timeout":
        assert error == "timeout after 0.1s"
    else:
        assert error.startswith("ClientConnectorError: Cannot connect to host 127.0.0.1")


@pytest.mark.parametrize("status", [204, 500])
async def test_deliverer_an_answer_for_a_delivery_cancelled_during_its_post_changes_nothing(
    tmp_path: Path,
    store: RecordingStore,
    aiohttp_server: Any,
    caplog: pytest.LogCaptureFixture,
    status: int,
) -> None:
    """Cancelled mid-POST: whatever the answer, stays cancelled, uncounted, no retry logged."""
    url, arrived, release = await hanging_endpoint(aiohttp_server, status=status)
    try:
        async with deliverer_rig(tmp_path, store, url=url) as rig:
            async with asyncio.timeout(5):
                await arrived.wait()
            job = store.get_job("main", "doc-0")
            assert job is not None and store.cancel(job.id, now=time.time())
            release.set()
            await eventually(lambda: len(store.recorded) == 1, timeout=5, what="answer handled")
            await eventually(lambda: not rig.deliverer.endpoints["app"].in_flight, timeout=5)
    finally:
        release.set()
    assert (rig.delivery().state, rig.job_state()) == ("cancelled", "cancelled")
    assert rig.history() == []  # record_attempt refused it
    assert [rig.count(o) for o in ("success", "retry", "dead")] == [None, None, None]
    assert not [r for r in caplog.records if r.name == "relayd.delivery"]


def test_endpoint_condition_and_since_follow_the_attempts() -> None:
    """up -> failing at the first failure -> down once probing; since changes only then."""
    state = EndpointState()
    assert (state.condition, state.since) == ("up", None)
    state.failed(10.0)
    assert (state.condition, state.since) == ("failing", 10.0)
    state.failed(11.0)
    assert (state.condition, state.since, state.probing) == ("down", 11.0, True)
    state.failed(12.0)
    assert state.since == 11.0
    state.succeeded(13.0)
    assert (state.condition, state.since) == ("up", 13.0)
    state.succeeded(14.0)
    assert state.since == 13.0
