"""Upstream, the budgeted transport a provider polls through, against a real server on loopback:
which slot each request spends and when it frees, what a 429 does to the key, which failures
become `Retryable`, and the API key blanked out of every answer."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from email.utils import formatdate
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from relayd.budget import Budget
from relayd.config import ProviderConfig, parse_config
from relayd.errors import RateLimited, Retryable
from relayd.keys import MAX_BLOCK, Key, key_id
from relayd.metrics import Metrics
from relayd.providers import upstream
from relayd.providers.base import Answer
from relayd.providers.upstream import MAX_ANSWER_BYTES, Upstream, blank
from tests.conftest import config_dict
from tests.fakes import FakeClock

API_KEY = "sk-live-upstream-7f3a9c1e"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Server:
    """A loopback server answering every GET with `handler`, counting the requests it saw."""

    def __init__(self, aiohttp_server: Any) -> None:
        self._aiohttp_server = aiohttp_server
        self.requests: list[web.Request] = []
        self.base = ""

    async def start(self, handler: Handler) -> Server:
        async def record(request: web.Request) -> web.StreamResponse:
            self.requests.append(request)
            return await handler(request)

        app = web.Application()
        app.router.add_get("/{tail:.*}", record)
        server = await self._aiohttp_server(app)
        self.base = f"http://127.0.0.1:{server.port}"
        return self


class Bounded(Upstream):
    """Upstream whose requests fail the test after 5 s (a slot never granted) instead of hanging."""

    async def get(self, url: str, **kwargs: Any) -> Answer:
        return await asyncio.wait_for(super().get(url, **kwargs), 5.0)


def provider_config(tmp_path: Path, port: int = 9, **overrides: Any) -> ProviderConfig:
    data = config_dict(tmp_path, port, {"app": 9}, api_key="env:KEY", **overrides)
    env = {"KEY": API_KEY, "XOSUM_SECRET": "webhook-secret"}
    return parse_config(data, base_dir=tmp_path, env=env).providers["main"]


class Rig:
    """One key on a fake clock, its provider table, and the calls it saw to acquire/release."""

    def __init__(self, tmp_path: Path, session: aiohttp.ClientSession, **overrides: Any) -> None:
        self.clock = FakeClock(1_000_010.0)
        self.provider = provider_config(tmp_path, **overrides)
        self.key = Key(
            key_id(API_KEY),
            Budget(self.provider.rate_limit, self.provider.rate_window),
            clock=self.clock,
            notify=lambda: None,
        )
        self.metrics = Metrics()
        self.session = session
        self.acquired = 0
        self.released: list[str | None] = []
        acquire, release = self.key.acquire, self.key.release

        async def counting_acquire() -> str | None:
            self.acquired += 1
            return await acquire()

        def recording_release(slot: str | None) -> None:
            self.released.append(slot)
            release(slot)

        self.key.acquire = counting_acquire  # type: ignore[method-assign]
        self.key.release = recording_release  # type: ignore[method-assign]

    def prepay(self) -> None:
        """Take the first request's slot, as the poll loop does before it polls a job."""
        self.key.add(1, self.clock.time(), self.provider.poll_interval)
        assert self.key.take(self.clock.monotonic(), self.clock.time()) == (1, None)

    def upstream(self, slot: str | None = None, max_bytes: int = MAX_ANSWER_BYTES) -> Upstream:
        return Bounded(
            session=self.session,
            key=self.key,
            provider=self.provider,
            slot=slot,
            metrics=self.metrics,
            max_bytes=max_bytes,
        )

    def count(self, metric: str, **labels: str) -> float:
        value = self.metrics.registry.get_sample_value(metric, {"provider": "main", **labels})
        return value or 0.0


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def ok(body: bytes = b'{"status": "processing"}') -> Handler:
    async def handler(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type="application/json")

    return handler


def status(code: int, **headers: str) -> Handler:
    """Answer `code`; header names are given with underscores (`Retry_After`)."""
    named = {name.replace("_", "-"): value for name, value in headers.items()}

    async def handler(request: web.Request) -> web.Response:
        return web.Response(status=code, headers=named, text="slow down")

    return handler


# -- slots ----------------------------------------------------------------------------------------


async def test_the_prepaid_request_spends_the_slot_it_was_given_and_no_other(
    tmp_path: Path, aiohttp_server: Any, session: aiohttp.ClientSession
) -> None:
    """A prepaid first request acquires nothing and releases the slot (and grant) it was given."""
    server = await Server(aiohttp_server).start(ok())
    rig = Rig(tmp_path, session, rate_limit=10, rate_window="60s")
    rig.prepay()
    http = rig.upstream(slot="grant-7")
    answer = await http.get(server.base + "/v1/jobs/a", prepaid=True)
    assert answer.status == 200 and answer.body == b'{"status": "processing"}'
    assert http.prepaid_used
    assert (rig.acquired, rig.released) == (0, ["grant-7"])
    assert rig.key.budget.in_flight == 0
    assert rig.key.budget.pending_frees(rig.clock.monotonic()) == [rig.clock.monotonic() + 60.0]
    assert rig.count("relayd_upstream_requests_total", code="200") == 1
    assert len(server.requests) == 1


async def test_every_further_request_acquires_a_slot_of_its_own(
    tmp_path: Path, aiohttp_server: Any, session: aiohttp.ClientSession
) -> None:
    """Every request after the prepaid one waits for a slot of its own before it is sent."""
    server = await Server(aiohttp_server).start(ok())
    rig = Rig(tmp_path, session, rate_limit=10, rate_window="60s")  # burst of 2, 1 per 6 s
    rig.prepay()
    http = rig.upstream(slot="grant-7")
    await http.get(server.base + "/job", prepaid=True)
    await http.get(server.base + "/job/paragraphs", prepaid=True)  # the prepaid one is spent
    assert (rig.acquired, len(server.requests)) == (1, 2)
    third = asyncio.create_task(http.get(server.base + "/job/paragraphs?offset=1000"))
    await asyncio.sleep(0.05)
    assert not third.done() and len(server.requests) == 2  # no slot: nothing was sent
    rig.clock.advance(6)  # the bucket earns a token
    rig.key.wake()
    answer = await asyncio.wait_for(third, 2.0)
    assert answer.status == 200 and len(server.requests) == 3
    assert rig.acquired == 2
    assert rig.released == ["grant-7", None, None]
    assert rig.key.budget.in_flight == 0
    assert len(rig.key.budget.pending_frees(rig.clock.monotonic())) == 3


async def test_a_prepaid_poll_that_asks_for_no_prepaid_request_acquires_anyway(
    tmp_path: Path, aiohttp_server: Any, session: aiohttp.ClientSession
) -> None:
    """A request without prepaid=True acquires a slot even when the prepaid one is unused."""
    server = await Server(aiohttp_server).start(ok())
    rig = Rig(tmp_path, session, rate_limit=10, rate_window="60s")
    http = rig.upstream(slot="grant-7")
    await http.get(server.base + "/job")
    assert not http.prepaid_used
    assert (rig.acquired, rig.released) == (1, [None])


async def test_a_slot_frees_a_window_after_its_answer_not_its_send(
    tmp_path: Path, aiohttp_server: Any, session: aiohttp.ClientSession
) -> None:
    """The slot is released when the answer arrives, so it frees `window` after the answer."""
    rig = Rig(tmp_path, session, rate_limit=10, rate_window="60s")

    async def slow(request: web.Request) -> web.Response:
        rig.clock.advance(2.5)  # the answer takes 2.5 s
        return web.Response(text="{}")

    server = await Server(aiohttp_server).start(slow)
    rig.prepay()
    sent = rig.clock.monotonic()
    await rig.upstream().get(server.base + "/job", prepaid=True)
    assert rig.key.budget.pending_frees(rig.clock.monotonic()) == [sent + 2.5 + 60.0]


async def test_headers_and_params_are_sent_and_redirects_not_followed(
    tmp_path: Path, aiohttp_server: Any, session: aiohttp.ClientSession
) -> None:
    """Headers and query reach the server; a redirect is returned as is, never followed."""

    async def redirect(request: web.Request) -> web.Response:
        if request.path == "/elsewhere":
            return web.Response(text="followed")
        return web.Response(status=302, headers={"Location": "/elsewhere"})

    server = await Server(aiohttp_server).start(redirect)
    rig = Rig(tmp_path, session)
    rig.prepay()
    answer = await rig.upstream().get(
        server.base + "/job",
        headers={"Authorization": f"Bearer {API_KEY}"},
        params={"limit": "1000", "offset": "0"},
        prepaid=True,
    )
    assert answer.status == 302 and answer.headers["Location"] == "/elsewhere"
    [request] = server.requests
    assert request.headers["Authorization"] == f"Bearer {API_KEY}"
    assert dict(request.query) == {"limit": "1000", "offset": "0"}


# -- 429 ------------------------------------------------------------------------------------------


async def test_a_429_with_retry_after_seconds_closes_the_key_that_long(
    tmp_path: Path, aiohttp_server: Any, session: aiohttp.ClientSession
) -> None:
    """429 + Retry-After: 7 blocks the key 7 s, raises RateLimited(7) and counts the 429."""
    server = await Server(aiohttp_server).start(status(429, Retry_After="7"))
    rig = Rig(tmp_path, session, rate_window="60s")
    rig.prepay()
    with pytest.raises(RateLimited) as raised:
        await rig.upstream().get(server.base + "/job", prepaid=True)
    assert raised.value.retry_after == 7.0
    assert rig.key.budget.blocked_until() == rig.clock.monotonic() + 7.0
    assert rig.key.budget.block_reason == "429 from provider"
    assert rig.key.budget.in_flight == 0  # the slot was released too
    assert rig.count("relayd_upstream_rate_limited_total") == 1
    assert rig.count("relayd_upstream_requests_total", code="429") == 1


async def test_a_429_with_an_http_date_is_read_against_the_answers_own_clock(
    tmp_path: Path, aiohttp_server: Any, session: aiohttp.ClientSession
) -> None:
    """Retry-After as an HTTP date counts from the answer's Date header, not relayd's clock."""
    provider_now = 1_600_000_000  # far from relayd's (fake) clock
    server = await Server(aiohttp_server).start(
        status(
            429,
            Date=formatdate(provider_now, usegmt=True),
            Retry_After=formatdate(provider_now + 30, usegmt=True),
        )
    )
    rig = Rig(tmp_path, session, rate_window="60s")
    rig.prepay()
    with pytest.raises(RateLimited) as raised:
        await rig.upstream().get(server.base + "/job", prepaid=True)
    assert raised.value.retry_after == 30.0
    assert rig.key.budget.blocked_until() == rig.clock.monotonic() + 30.0
    assert rig.count("relayd_upstream_rate_limited_total") == 1


async def test_a_429_without_retry_after_closes_the_key_until_the_next_window(
    tmp_path: Path, aiohttp_server: Any, session: aiohttp.ClientSession
) -> None:
    """No Retry-After: the key stays closed until the next aligned window plus a guard band."""
    server = await Server(aiohttp_server).start(status(429))
    rig = Rig(tmp_path, session, rate_window="60s")  # clock at 1_000_010: next window 1_000_020
    rig.prepay()
    with pytest.raises(RateLimited) as raised:
        await rig.upstream().get(server.base + "/job", prepaid=True)
    assert raised.value.retry_after is None
    assert rig.key.budget.blocked_until() == pytest.approx(rig.clock.monotonic() + 10.0 + 3.0)
    assert rig.key.take(rig.clock.monotonic(), rig.clock.time()) is None
    assert rig.count("relayd_upstream_rate_limited_total") == 1


async def test_an_implausible_retry_after_is_capped(
    tmp_path: Path, aiohttp_server: Any, session: aiohttp.ClientSession
) -> None:
    """A Retry-After of days closes the key for MAX_BLOCK; RateLimited still says what was asked."""
    server = await Server(aiohttp_server).start(status(429, Retry_After="999999"))
    rig = Rig(tmp_path, session)
    rig.prepay()
    with pytest.raises(RateLimited) as raised:
        await rig.upstream().get(server.base + "/job", prepaid=True)
    assert raised.value.retry_after == 999999.0
    assert rig.key.budget.blocked_until() == rig.clock.monotonic() + MAX_BLOCK


# -- failures that become Retryable ---------------------------------------------------------------


async def test_an_answer_over_max_answer_bytes_is_retryable_and_frees_its_slot(
    tmp_path: Path,
    aiohttp_server: Any,
    session: aiohttp.ClientSession,
) -> None:
    """An answer of `max_bytes` passes; one byte more is a Retryable, its slot released."""

    async def sized(request: web.Request) -> web.Response:
        return web.Response(body=b"x" * int(request.query["size"]))

    server = await Server(aiohttp_server).start(sized)
    rig = Rig(tmp_path, session, rate_limit=10, rate_window="60s")
    rig.prepay()
    http = rig.upstream(max_bytes=1000)
    answer = await http.get(server.base + "/job", params={"size": "1000"}, prepaid=True)
    assert len(answer.body) == 1000
    with pytest.raises(Retryable, match="answer larger than 1000 bytes"):
        await http.get(server.base + "/job", params={"size": "1001"})
    assert rig.released == [None, None]
    assert rig.key.budget.in_flight == 0
    assert len(rig.key.budget.pending_frees(rig.clock.monotonic())) == 2


async def test_a_refused_connection_is_retryable_and_frees_its_slot(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    """Nothing listening: Retryable, the slot released, the request counted under 'error'."""
    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens on it
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    rig = Rig(tmp_path, session)
    rig.prepay()
    with pytest.raises(Retryable):
        await rig.upstream(slot="grant-1").get(f"http://127.0.0.1:{port}/job", prepaid=True)
    assert rig.released == ["grant-1"]
    assert rig.key.budget.in_flight == 0
    assert rig.key.budget.pending_frees(rig.clock.monotonic()) == [rig.clock.monotonic() + 0.25]
    assert rig.count("relayd_upstream_requests_total", code="error") == 1


async def test_a_timeout_is_retryable_and_frees_its_slot(
    tmp_path: Path, aiohttp_server: Any, session: aiohttp.ClientSession
) -> None:
    """An answer slower than the provider's timeout: Retryable, the slot released."""
    done = asyncio.Event()

    async def hang(request: web.Request) -> web.Response:
        await asyncio.wait_for(done.wait(), 5.0)
        return web.Response(text="{}")

    server = await Server(aiohttp_server).start(hang)
    rig = Rig(tmp_path, session, timeout="50ms")
    rig.prepay()
    try:
        with pytest.raises(Retryable, match="Timeout"):
            await rig.upstream().get(server.base + "/job", prepaid=True)
    finally:
        done.set()
    assert rig.released == [None]
    assert rig.key.budget.in_flight == 0
    assert rig.count("relayd_upstream_requests_total", code="error") == 1


# -- blanking the key -----------------------------------------------------------------------------


async def test_the_api_key_quoted_in_an_answer_is_blanked(
    tmp_path: Path, aiohttp_server: Any, session: aiohttp.ClientSession
) -> None:
    """Every occurrence of the API key in an answer body (an error, or a 2xx) becomes ********."""
    bodies = {
        "/refused": f'{{"error": "invalid API key {API_KEY}"}}'.encode(),
        "/echo": f'{{"auth": "Bearer {API_KEY}", "again": "{API_KEY}"}}'.encode(),
    }

    async def quote(request: web.Request) -> web.Response:
        return web.Response(status=401 if request.path == "/refused" else 200,
                            body=bodies[request.path])  # fmt: skip

    server = await Server(aiohttp_server).start(quote)
    rig = Rig(tmp_path, session, rate_limit=10, rate_window="60s")
    rig.prepay()
    http = rig.upstream()
    refused = await http.get(server.base + "/refused", prepaid=True)
    echo = await http.get(server.base + "/echo")
    assert (refused.status, refused.body) == (401, b'{"error": "invalid API key ********"}')
    assert echo.body == b'{"auth": "Bearer ********", "again": "********"}'


def test_blanking_never_touches_a_transcript_for_a_short_key() -> None:
    """A long key is blanked; a short one is left alone, as it may be a word of a transcript."""
    long_key = "sk-live-7f3a9c1e5b2d"
    assert blank(b'{"error": "bad key sk-live-7f3a9c1e5b2d"}', long_key) == (
        b'{"error": "bad key ********"}'
    )
    transcript = b'{"status": "transcribed", "transcription": "a test of the test"}'
    assert blank(transcript, "test") == transcript


def test_blanking_starts_at_blank_min_characters() -> None:
    """A key of BLANK_MIN characters is blanked; one character shorter is not."""
    key = "k" * upstream.BLANK_MIN
    assert blank(b"<" + key.encode() + b">", key) == b"<********>"
    short = key[:-1]
    assert blank(b"<" + short.encode() + b">", short) == b"<" + short.encode() + b">"
