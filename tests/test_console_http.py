"""The console over plain HTTP, against the real daemon: sign-in and its cookie, what happens
without a session, CSRF and cross-site refusals, escaping, masking, paging and filters, and the
security headers. The browser tests (test_console_browser.py) drive the same pages in Chromium.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from html import unescape
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from yarl import URL

from relayd.console.charts import chart
from relayd.console.security import CSP, Sessions
from relayd.daemon import Daemon
from relayd.mock import provider as mock_provider
from relayd.mock.receiver import Receiver
from tests.conftest import WEBHOOK_SECRET, api, config_dict, eventually, make_config, running

TOKEN = "console-test-token-0123456789"


def console_config(tmp_path: Path, provider_port: int, receiver_port: int, **relayd: Any) -> Any:
    data = config_dict(tmp_path, provider_port, {"app": receiver_port})
    data["relayd"] |= relayd
    return make_config(data, tmp_path)


@pytest.fixture
async def daemon(
    tmp_path: Path, provider: mock_provider.MockProvider, receiver: Receiver
) -> AsyncIterator[Daemon]:
    async with running(
        console_config(tmp_path, provider.port, receiver.port, api_token=TOKEN)
    ) as d:
        yield d


def base(daemon: Daemon) -> str:
    return f"http://127.0.0.1:{daemon.http_port}"


def browser() -> aiohttp.ClientSession:
    """A client that keeps cookies for 127.0.0.1 (aiohttp drops them for IP hosts by default)
    and does not follow redirects unless told to."""
    return aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))


async def sign_in(session: aiohttp.ClientSession, daemon: Daemon) -> aiohttp.ClientResponse:
    async with session.post(
        f"{base(daemon)}/ui/login", data={"token": TOKEN, "next": "/ui/jobs"}, allow_redirects=False
    ) as resp:
        return resp


def csrf_of(html: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', html)
    assert found, "no CSRF field on the page"
    return found.group(1)


async def test_without_a_session_pages_redirect_to_sign_in_and_fetches_get_401(
    daemon: Daemon,
) -> None:
    async with browser() as s:
        async with s.get(f"{base(daemon)}/ui/jobs?state=dead", allow_redirects=False) as resp:
            assert resp.status == 303
            assert resp.headers["Location"] == "/ui/login?next=%2Fui%2Fjobs%3Fstate%3Ddead"
        headers = {"X-Relayd-Partial": "1"}
        async with s.get(f"{base(daemon)}/ui/", headers=headers, allow_redirects=False) as resp:
            assert resp.status == 401
        async with s.post(f"{base(daemon)}/ui/dead/redeliver", data={"csrf": "x"}) as resp:
            assert resp.status == 401
        async with s.get(f"{base(daemon)}/ui/login") as resp:
            assert resp.status == 200
            assert 'type="password"' in await resp.text()
        # the JSON API still wants its bearer token; a console cookie is not one
        async with s.get(f"{base(daemon)}/v1/status") as resp:
            assert resp.status == 401


async def test_signing_in_sets_an_httponly_strict_expiring_cookie(daemon: Daemon) -> None:
    async with browser() as s:
        async with s.post(
            f"{base(daemon)}/ui/login", data={"token": "wrong", "next": "/ui/"}
        ) as resp:
            assert resp.status == 401
            assert "not the API token" in await resp.text()
            assert "relayd_session" not in resp.cookies
        resp = await sign_in(s, daemon)
        assert resp.status == 303 and resp.headers["Location"] == "/ui/jobs"
        cookie = resp.headers["Set-Cookie"]
        assert cookie.startswith("relayd_session=")
        for flag in ("HttpOnly", "SameSite=Strict", "Path=/ui", "Max-Age=43200"):
            assert flag in cookie, cookie
        async with s.get(f"{base(daemon)}/ui/jobs") as page:
            assert page.status == 200
            assert "<h1>Jobs</h1>" in await page.text()


async def test_sign_in_goes_back_only_to_a_console_page(daemon: Daemon) -> None:
    async with browser() as s:
        for target in ("https://evil.example/", "//evil.example/ui", "/v1/jobs"):
            async with s.post(
                f"{base(daemon)}/ui/login",
                data={"token": TOKEN, "next": target},
                allow_redirects=False,
            ) as resp:
                assert resp.headers["Location"] == "/ui/", target


def test_a_session_expires() -> None:
    sessions = Sessions(lifetime=10.0, clock=lambda: now)
    now = 1000.0
    session = sessions.create()
    assert sessions.get(session.id) is session
    now = 1010.0
    assert sessions.get(session.id) is None
    assert sessions.get(None) is None


async def test_actions_need_the_pages_csrf_token_and_a_same_site_request(
    daemon: Daemon, provider: mock_provider.MockProvider, receiver: Receiver
) -> None:
    provider.add_job("act-1", ready_after=0.0)
    assert (await api(daemon, "POST", "/v1/jobs", {"docId": "act-1"}))[0] == 202
    await eventually(lambda: len(receiver.received) == 1, what="the first delivery")
    url = f"{base(daemon)}/ui/jobs/main/act-1"
    async with browser() as s:
        await sign_in(s, daemon)
        async with s.get(url) as resp:
            page = await resp.text()
        assert "Redeliver" in page
        token = csrf_of(page)
        # no token, a wrong one, a token with a cross-site Origin: each refused, nothing sent
        for data, headers in (
            ({}, {}),
            ({"csrf": "forged"}, {}),
            ({"csrf": token}, {"Origin": "https://evil.example"}),
            ({"csrf": token}, {"Sec-Fetch-Site": "cross-site"}),
        ):
            async with s.post(f"{url}/redeliver", data=data, headers=headers) as resp:
                assert resp.status == 403, (data, headers)
        origin = {"Origin": base(daemon), "Sec-Fetch-Site": "same-origin"}
        async with s.post(
            f"{url}/redeliver", data={"csrf": token}, headers=origin, allow_redirects=False
        ) as resp:
            assert resp.status == 303
            assert resp.headers["Location"].startswith("/ui/jobs/main/act-1?done=")
    await eventually(lambda: len(receiver.received) == 2, what="the redelivery")
    assert len(receiver.received) == 2  # the refused POSTs sent nothing


async def test_the_json_api_refuses_cross_site_requests_too(daemon: Daemon) -> None:
    """A page elsewhere cannot make a browser submit or cancel through the API."""
    headers = {"Authorization": f"Bearer {TOKEN}", "Origin": "http://evil.example"}
    async with (
        aiohttp.ClientSession() as s,
        s.post(f"{base(daemon)}/v1/jobs", json={"docId": "x-1"}, headers=headers) as resp,
    ):
        assert resp.status == 403
        assert "cross-site" in (await resp.json())["error"]
    assert daemon.store.get_job("main", "x-1") is None


async def test_provider_and_submitted_values_are_shown_as_text_and_secrets_masked(
    daemon: Daemon, provider: mock_provider.MockProvider, receiver: Receiver
) -> None:
    hostile = "<script>alert(1)</script><img src=x onerror=alert(2)>"
    provider.add_job("markup-1", ready_after=0.0, title=hostile)
    job = {"docId": "markup-1", "metadata": {"note": hostile}}
    assert (await api(daemon, "POST", "/v1/jobs", job))[0] == 202
    await eventually(lambda: len(receiver.received) == 1, what="the delivery")
    async with browser() as s:
        await sign_in(s, daemon)
        async with s.get(f"{base(daemon)}/ui/jobs/main/markup-1") as resp:
            page = await resp.text()
            assert resp.headers["Content-Security-Policy"] == CSP
    assert "<script>alert" not in page and "<img src=x" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page  # shown, as text
    assert unescape(page).count(hostile) >= 2  # in the metadata and in the delivered body
    assert WEBHOOK_SECRET not in page and '"secret": "********"' in unescape(page)
    assert re.findall(r"<script[^>]*>", page) == ['<script src="/ui/static/console.js" defer>']


async def test_every_console_answer_carries_the_security_headers(daemon: Daemon) -> None:
    async with browser() as s:
        await sign_in(s, daemon)
        for path in ("/ui/", "/ui/jobs", "/ui/dead", "/ui/login", "/ui/static/console.js"):
            async with s.get(base(daemon) + path, allow_redirects=False) as resp:
                assert resp.headers["Content-Security-Policy"] == CSP, path
                assert resp.headers["X-Content-Type-Options"] == "nosniff", path
                assert resp.headers["X-Frame-Options"] == "DENY", path
        escape = URL(f"{base(daemon)}/ui/static/..%2F..%2Fapi.py", encoded=True)
        async with s.get(escape) as resp:
            assert resp.status == 404


async def test_jobs_page_pages_filters_and_finds_by_id(
    daemon: Daemon, provider: mock_provider.MockProvider
) -> None:
    for i in range(60):
        provider.add_job(f"page-{i:03d}", ready_after=60.0)
    jobs = [{"docId": f"page-{i:03d}"} for i in range(60)]
    assert (await api(daemon, "POST", "/v1/jobs", jobs))[0] == 202
    async with browser() as s:
        await sign_in(s, daemon)
        async with s.get(f"{base(daemon)}/ui/jobs") as resp:
            first = await resp.text()
        ids = re.findall(r'data-doc-id="([^"]+)"', first)
        assert ids == [f"page-{i:03d}" for i in range(59, 9, -1)]  # newest first, 50
        older = re.search(r'href="([^"]+)" rel="next"', first)
        assert older
        async with s.get(base(daemon) + unescape(older.group(1))) as resp:
            second = await resp.text()
        assert re.findall(r'data-doc-id="([^"]+)"', second) == [
            f"page-{i:03d}" for i in range(9, -1, -1)
        ]
        assert 'rel="next"' not in second
        async with s.get(f"{base(daemon)}/ui/jobs", params={"q": "page-04"}) as resp:
            found = re.findall(r'data-doc-id="([^"]+)"', await resp.text())
        assert found == [f"page-{i:03d}" for i in range(49, 39, -1)]
        async with s.get(f"{base(daemon)}/ui/jobs", params={"state": "dead"}) as resp:
            assert "No job matches." in await resp.text()
        async with s.get(f"{base(daemon)}/ui/jobs", params={"state": "<b>"}) as resp:
            assert "state: unknown &#39;&lt;b&gt;&#39;" in await resp.text()


async def test_dead_letters_bulk_replay_says_how_many_first(
    tmp_path: Path, provider: mock_provider.MockProvider, receiver: Receiver
) -> None:
    receiver.set_default_status(500)
    config = console_config(tmp_path, provider.port, receiver.port)  # no token: loopback
    data = config_dict(tmp_path, provider.port, {"app": receiver.port})
    data["endpoints"]["app"]["max_attempts"] = 1
    config = make_config(data, tmp_path)
    for i in range(3):
        provider.add_job(f"dead-{i}", ready_after=0.0)
    async with running(config) as d:
        await api(d, "POST", "/v1/jobs", [{"docId": f"dead-{i}"} for i in range(3)])
        await eventually(lambda: d.store.delivery_counts().get("app", {}).get("dead") == 3)
        receiver.set_default_status(200)
        async with browser() as s:
            async with s.get(f"{base(d)}/ui/dead") as resp:
                page = await resp.text()
            assert 'id="dead-total">3<' in page
            assert sorted(re.findall(r'data-doc-id="([^"]+)"', page)) == [
                "dead-0",
                "dead-1",
                "dead-2",
            ]
            form = {"csrf": csrf_of(page), "endpoint": "app", "since": "1h"}
            async with s.post(f"{base(d)}/ui/dead/redeliver", data=form) as resp:
                asked = await resp.text()
            assert 'id="confirm-count">3<' in asked
            assert d.store.delivery_counts()["app"].get("dead") == 3  # asked, nothing done
            async with s.post(
                f"{base(d)}/ui/dead/redeliver", data={**form, "confirmed": "yes"}
            ) as resp:
                assert 'id="done-count">3<' in await resp.text()
            await eventually(lambda: d.store.delivery_counts()["app"].get("delivered") == 3)
            async with s.post(
                f"{base(d)}/ui/dead/redeliver", data={**form, "since": "soon"}
            ) as resp:
                assert resp.status == 400
                assert "expected a duration" in await resp.text()


async def test_a_listener_others_can_reach_without_a_token_warns_on_every_page(
    tmp_path: Path, provider: mock_provider.MockProvider, receiver: Receiver
) -> None:
    config = console_config(tmp_path, provider.port, receiver.port, http="0.0.0.0:0")
    async with running(config) as d, browser() as s:
        for path in ("/ui/", "/ui/jobs", "/ui/dead"):
            async with s.get(f"http://127.0.0.1:{d.http_port}{path}") as resp:
                assert resp.status == 200  # no sign-in without a token
                assert 'class="warning" role="alert">The TCP API listens on 0.0.0.0' in (
                    await resp.text()
                )
    config = console_config(tmp_path, provider.port, receiver.port)  # loopback: no warning
    async with (
        running(config) as d,
        browser() as s,
        s.get(f"http://127.0.0.1:{d.http_port}/ui/") as resp,
    ):
        assert 'class="warning"' not in await resp.text()


async def test_the_console_is_served_on_the_unix_socket_without_sign_in(daemon: Daemon) -> None:
    status, page = await api(daemon, "GET", "/ui/jobs")
    assert status == 200 and "<h1>Jobs</h1>" in page


async def test_overview_shows_budget_chart_jobs_and_endpoints(
    daemon: Daemon, provider: mock_provider.MockProvider, receiver: Receiver
) -> None:
    provider.add_job("ov-1", ready_after=0.0)
    await api(daemon, "POST", "/v1/jobs", {"docId": "ov-1"})
    await eventually(lambda: len(receiver.received) == 1)
    async with browser() as s:
        await sign_in(s, daemon)
        async with s.get(f"{base(daemon)}/ui/", headers={"X-Relayd-Partial": "1"}) as resp:
            fragment = await resp.text()
    assert "<html" not in fragment  # the live part only
    assert 'data-state="delivered">1<' in fragment
    assert "of 8 requests used this" in fragment
    assert re.search(r'<rect class="bar" ', fragment)  # at least one window with requests
    assert "429s: 0" in fragment
    assert 'data-endpoint="app"' in fragment and 'class="pill up"' in fragment


def test_chart_groups_short_windows_and_marks_429s() -> None:
    now = 10_000.0
    windows = [(now - 10, 5, 0), (now - 9, 8, 1), (now - 5000, 3, 0)]  # the last is too old
    c = chart(windows, window=1.0, limit=8, now=now)
    assert c.group == 30 and len(c.bars) == 1  # 3600 windows in 120 bars; both in the last
    assert c.bars[0].requests == 8 and c.bars[0].limited == 1 and c.limited == 1
    assert c.peak == 8 and c.limit_y == 0.0
    minute = chart([(now - 60, 30, 0)], window=60.0, limit=60, now=now)
    assert minute.group == 1 and minute.bars[0].height == 60.0
