"""The console in a real headless Chromium (Debian's chromium and chromium-driver), driven by
selenium against the real daemon: sign in with the token, dead deliveries listed, Redeliver
clicked and received, hostile markup shown as text, nothing loaded from another origin, a new
job appearing on an open page without a reload, and each page at desktop and phone width.

The daemon runs in this event loop; every selenium call is blocking, so each goes through a
thread (`Browser`), leaving the loop free to serve the page the browser asks for.

Without Chromium these tests are skipped on a laptop and fail in CI (CI=true), which installs it.
Set RELAYD_SCREENSHOTS=docs/console to refresh the README's screenshots from a run.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from relayd.daemon import Daemon
from relayd.mock import provider as mock_provider
from relayd.mock.receiver import Receiver
from tests.conftest import api, config_dict, eventually, make_config, running

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.common.exceptions import NoAlertPresentException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
TOKEN = "browser-test-token-0123456789"
DESKTOP, PHONE = (1280, 900), (390, 844)
HOSTILE = "<script>window.pwned=1</script><img src=x onerror=window.pwned=2>"

T = TypeVar("T")

if not (CHROMIUM and CHROMEDRIVER):
    if os.environ.get("CI"):
        raise RuntimeError("CI must install chromium and chromium-driver (see .ci/run)")
    pytest.skip("chromium and chromedriver are not installed", allow_module_level=True)


@pytest.fixture(scope="module")
def driver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM or ""
    for flag in (
        "--headless=new",
        "--no-sandbox",  # CI runs as root
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",  # no calls home: the machine has no network
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium')}",
        f"--window-size={DESKTOP[0]},{DESKTOP[1]}",
    ):
        options.add_argument(flag)
    os.environ.setdefault("SE_OFFLINE", "true")  # selenium-manager must not download anything
    chrome = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    chrome.set_page_load_timeout(20)
    try:
        yield chrome
    finally:
        chrome.quit()


class Browser:
    """The driver, with each blocking call run in a thread."""

    def __init__(self, driver: Any, base: str) -> None:
        self.driver = driver
        self.base = base

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.to_thread(fn, *args)

    async def get(self, path: str) -> None:
        await self.call(self.driver.get, self.base + path)

    async def script(self, source: str, *args: Any) -> Any:
        return await self.call(self.driver.execute_script, source, *args)

    async def find(self, css: str) -> Any:
        return await self.call(self.driver.find_element, By.CSS_SELECTOR, css)

    async def find_all(self, css: str) -> list[Any]:
        return await self.call(self.driver.find_elements, By.CSS_SELECTOR, css)

    async def text(self, css: str) -> str:
        element = await self.find(css)
        return str(await self.call(lambda: element.text))

    async def click(self, css: str) -> None:
        element = await self.find(css)
        await self.call(element.click)

    async def type(self, css: str, value: str) -> None:
        element = await self.find(css)
        await self.call(element.send_keys, value)

    async def until(self, css: str, timeout: float = 10.0) -> list[Any]:  # noqa: ASYNC109
        found: list[Any] = []

        async def look() -> None:
            found[:] = await self.find_all(css)

        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            await look()
            if found or asyncio.get_running_loop().time() > deadline:
                break
            await asyncio.sleep(0.1)
        assert found, f"nothing matches {css!r} on {self.driver.current_url}"
        return found

    async def title(self) -> str:
        return str(await self.call(lambda: self.driver.title))

    async def url(self) -> str:
        return str(await self.call(lambda: self.driver.current_url))

    async def size(self, width: int, height: int) -> None:
        await self.call(self.driver.set_window_size, width, height)

    async def shot(self, path: Path) -> None:
        await self.call(self.driver.save_screenshot, str(path))


@pytest.fixture
async def relay(
    tmp_path: Path, provider: mock_provider.MockProvider, receiver: Receiver
) -> AsyncIterator[Daemon]:
    data = config_dict(tmp_path, provider.port, {"app": receiver.port})
    data["relayd"]["api_token"] = TOKEN
    data["endpoints"]["app"]["max_attempts"] = 1
    async with running(make_config(data, tmp_path)) as daemon:
        yield daemon


@pytest.fixture
async def browser(driver: Any, relay: Daemon) -> AsyncIterator[Browser]:
    b = Browser(driver, f"http://127.0.0.1:{relay.http_port}")
    await b.call(driver.delete_all_cookies)
    await b.size(*DESKTOP)
    yield b
    await b.get("/ui/login")  # leave no page refreshing against a stopped daemon
    await b.call(driver.delete_all_cookies)


async def sign_in(b: Browser, then: str = "/ui/") -> None:
    await b.get(then)
    assert "/ui/login" in await b.url()
    await b.type("#token", TOKEN)
    await b.click("form.login button")
    await b.until("header.top nav")
    assert (await b.url()).endswith(then)


async def test_sign_in_see_dead_deliveries_and_redeliver_one(
    browser: Browser, relay: Daemon, provider: mock_provider.MockProvider, receiver: Receiver
) -> None:
    receiver.set_default_status(500)
    for name in ("dead-1", "dead-2"):
        provider.add_job(name, ready_after=0.0)
    await api(relay, "POST", "/v1/jobs", [{"docId": "dead-1"}, {"docId": "dead-2"}])
    await eventually(lambda: relay.store.delivery_counts().get("app", {}).get("dead") == 2)
    receiver.set_default_status(200)
    await sign_in(browser, "/ui/dead")
    links = await browser.until("a[data-doc-id]")
    assert sorted([await browser.call(a.get_attribute, "data-doc-id") for a in links]) == [
        "dead-1",
        "dead-2",
    ]
    assert await browser.text("#dead-total") == "2"
    await browser.click('[data-doc-id="dead-1"]')  # the job's element is its link
    await browser.until("#redeliver")
    assert (await browser.url()).endswith("/ui/jobs/main/dead-1")
    before = len(receiver.received)
    await browser.click("#redeliver")
    await browser.until("p.done")
    await eventually(lambda: len(receiver.received) > before, what="the redelivery")
    assert receiver.received[-1].json()["docId"] == "dead-1"
    assert receiver.received[-1].status == 200


async def test_hostile_markup_is_shown_as_text_and_never_runs(
    browser: Browser, relay: Daemon, provider: mock_provider.MockProvider, receiver: Receiver
) -> None:
    provider.add_job("markup-1", ready_after=0.0, title=HOSTILE)
    await api(relay, "POST", "/v1/jobs", {"docId": "markup-1", "metadata": {"note": HOSTILE}})
    await eventually(lambda: len(receiver.received) == 1)
    await sign_in(browser, "/ui/jobs/main/markup-1")
    assert await browser.title() == "main/markup-1 · relayd"
    assert HOSTILE in await browser.text("pre.meta")
    assert HOSTILE in await browser.text("section.body pre")
    assert await browser.script("return window.pwned === undefined")
    assert await browser.find_all("section img") == []
    with pytest.raises(NoAlertPresentException):
        await browser.call(lambda: browser.driver.switch_to.alert.text)


async def test_every_resource_comes_from_relayd_itself(browser: Browser, relay: Daemon) -> None:
    await sign_in(browser)
    for path in ("/ui/", "/ui/jobs", "/ui/dead"):
        await browser.get(path)
        await browser.until("main h1")
        names = await browser.script(
            "return performance.getEntriesByType('resource').map(e => e.name)"
        )
        assert names, path  # the stylesheet and the script at least
        assert all(n.startswith(browser.base + "/ui/static/") for n in names), names


async def test_a_job_submitted_while_the_jobs_page_is_open_appears_without_a_reload(
    browser: Browser, relay: Daemon, provider: mock_provider.MockProvider
) -> None:
    await sign_in(browser, "/ui/jobs")
    await browser.script("window.sameDocument = true")
    assert await browser.find_all('[data-doc-id="late-1"]') == []
    provider.add_job("late-1", ready_after=60.0)
    await api(relay, "POST", "/v1/jobs", {"docId": "late-1"})
    [late] = await browser.until('[data-doc-id="late-1"]', timeout=10)
    assert (await browser.call(late.get_attribute, "href")).endswith("/ui/jobs/main/late-1")
    assert await browser.script("return window.sameDocument === true")  # no reload happened


async def test_each_page_at_desktop_and_phone_width(
    browser: Browser,
    relay: Daemon,
    provider: mock_provider.MockProvider,
    receiver: Receiver,
    tmp_path: Path,
) -> None:
    """Every page renders at both widths with nothing wider than the screen but its tables'
    own scroll boxes; the screenshots land in RELAYD_SCREENSHOTS when it is set."""
    receiver.set_default_status(500)
    provider.add_job("call-0001", ready_after=0.0)
    jobs = [{"docId": "call-0001", "metadata": {"customer": "Hayk", "ticket": 4411}}]
    await api(relay, "POST", "/v1/jobs", jobs)
    await eventually(lambda: relay.store.delivery_counts().get("app", {}).get("dead") == 1)
    receiver.set_default_status(200)
    for i in range(12):
        provider.add_job(f"rec-{i:04d}", ready_after=0.0 if i % 3 else 60.0)
    await api(relay, "POST", "/v1/jobs", [{"docId": f"rec-{i:04d}"} for i in range(12)])
    await eventually(lambda: len(receiver.received) >= 9)
    out = Path(os.environ.get("RELAYD_SCREENSHOTS") or tmp_path)
    await asyncio.to_thread(out.mkdir, parents=True, exist_ok=True)
    pages = {
        "login": "/ui/login",
        "overview": "/ui/",
        "jobs": "/ui/jobs",
        "job": "/ui/jobs/main/call-0001",
        "dead": "/ui/dead",
    }
    for width, height in (DESKTOP, PHONE):
        await browser.size(width, height)
        for name, path in pages.items():
            if name == "login":
                await browser.call(browser.driver.delete_all_cookies)
                await browser.get(path)
            elif "/ui/login" in await browser.url():
                await sign_in(browser, path)
            else:
                await browser.get(path)
            await browser.until("main h1")
            overflow = await browser.script(
                "return document.documentElement.scrollWidth - window.innerWidth"
            )
            assert overflow <= 0, f"{name} at {width} px is {overflow} px too wide"
            await browser.shot(out / f"{name}-{width}.png")
    shots = [out / f"{name}-{w}.png" for name in pages for w in (DESKTOP[0], PHONE[0])]
    assert all(await asyncio.to_thread(lambda: [p.stat().st_size > 5000 for p in shots]))
