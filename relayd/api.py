"""The HTTP API (SPEC §3) on the unix socket and on TCP: intake, job queries, redeliver/cancel,
status, health and metrics. Every error answer is JSON `{"error": "…"}`.

The API sees relayd through `Backend`, the few things it needs; the daemon is one. It never
reaches into the store, the poll loop or the delivery loop itself.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any, Protocol
from urllib.parse import urlsplit

from aiohttp import web
from aiohttp.typedefs import Middleware

from relayd.errors import IntakeError, StoreError
from relayd.intake.envelope import MAX_BYTES, Catalog, check_job_id, load_json, parse_json
from relayd.metrics import CONTENT_TYPE
from relayd.models import Delivery, IntakeOutcome, Job, JobState, Submission

log = logging.getLogger("relayd.api")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
OPEN_PATHS = frozenset({"/healthz", "/readyz"})  # probes carry no token
CONSOLE = "/ui"  # the console's pages: it signs its users in itself (relayd.console)
UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


@dataclass(frozen=True)
class ApiLimits:
    """How long and how much one client may take. Slow and idle clients must not hold a
    connection for long: aiohttp has no timeout of its own for reading a request head, but its
    keep-alive timer runs from the moment a connection opens (and again after each answer) and
    closes a connection still waiting for a complete head, so `idle` bounds an idle keep-alive
    connection and a head sent byte by byte alike."""

    idle: float = 15.0  # seconds: see above
    body: float = 30.0  # seconds for the whole body of a POST, counted from its head: else 408
    linger: float = 2.0  # after an early answer (408, 413), unread body is drained this long
    list_bytes: int = 16 * 1024 * 1024  # about the most one GET /v1/jobs holds; "truncated"


class Backend(Protocol):
    """What the API needs from relayd."""

    draining: bool  # shutting down: no new jobs

    def catalog(self) -> Catalog:
        """What a submission may name."""
        ...

    async def submit(self, subs: Sequence[Submission]) -> list[tuple[Job, bool]]:
        """Store the submissions (committed on return): (job, created) each."""
        ...

    def count_intake(self, outcome: IntakeOutcome) -> None: ...

    def list_jobs(
        self, *, state: str | None, provider: str | None, limit: int, max_bytes: int
    ) -> tuple[list[Job], bool]:
        """The newest jobs first; True if some were left out for size."""
        ...

    def job_detail(
        self, provider: str, doc_id: str, *, payloads: bool = False
    ) -> dict[str, Any] | None:
        """The job with its polls and deliveries (with each body if `payloads`)."""
        ...

    def jobs_page(
        self, *, state: str | None, provider: str | None, q: str | None, before: int | None,
        limit: int,
    ) -> list[Job]:  # fmt: skip
        """Newest first, older than job id `before`; `q`: a docId or the start of one."""
        ...

    def dead_letters(
        self, *, endpoint: str | None, since: float | None, limit: int
    ) -> tuple[list[Delivery], int]:
        """(the latest dead deliveries, how many in all)."""
        ...

    async def redeliver_dead(self, *, endpoint: str | None, since: float | None) -> int:
        """Queue the dead deliveries the filters select again; how many."""
        ...

    def requests_per_window(self) -> dict[str, list[tuple[float, int, int]]]:
        """key id -> (window start, requests, 429s) over the last hour."""
        ...

    async def redeliver(self, provider: str, doc_id: str) -> tuple[Job, int] | None:
        """Queue the job's deliveries again: (the job, how many); None if there is no job."""
        ...

    async def cancel(self, provider: str, doc_id: str) -> tuple[Job, bool] | None:
        """Cancel the job: (the job as it is now, whether it was cancelled); None: no job."""
        ...

    async def status(self) -> dict[str, Any]: ...

    def health_problem(self) -> str | None: ...

    async def readiness_problems(self) -> list[str]: ...

    def degraded(self) -> list[str]: ...

    def render_metrics(self) -> bytes: ...


@functools.cache
def openapi_document() -> bytes:
    return (resources.files("relayd") / "openapi.json").read_bytes()


def error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPRequestEntityTooLarge:
        return error(413, f"body too large: the limit is {MAX_BYTES} bytes")
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return error(exc.status, exc.reason)
    except StoreError as exc:
        return error(503, f"the database cannot take this now: {exc}")
    except Exception:  # a bug: logged with its traceback, answered in JSON like the rest
        log.exception("API %s %s failed unexpectedly", request.method, request.path)
        return error(500, "internal error (logged)")


def cross_site(request: web.Request) -> str | None:
    """Why a request looks sent by a browser on behalf of another site (None: it does not).
    Browsers send `Sec-Fetch-Site`, and `Origin` on a POST; a script or curl sends neither."""
    fetch_site = request.headers.get("Sec-Fetch-Site")
    if fetch_site in ("cross-site", "same-site"):
        return f"Sec-Fetch-Site: {fetch_site}"
    origin = request.headers.get("Origin")
    if origin is None:
        return None
    if origin == "null" or urlsplit(origin).netloc.lower() != request.host.lower():
        return f"Origin {origin} is not this server"
    return None


@web.middleware
async def same_site_only(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A page on another site can make a browser POST here (a form, a no-cors fetch), with
    the browser's cookies; it cannot read the answer. Such a request changes nothing."""
    if request.method in UNSAFE_METHODS and (why := cross_site(request)):
        return error(403, f"cross-site request refused ({why})")
    return await handler(request)


def in_console(path: str) -> bool:
    return path == CONSOLE or path.startswith(CONSOLE + "/")


def token_auth(token: str) -> Middleware:
    expected = f"Bearer {token}".encode()

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path not in OPEN_PATHS and not in_console(request.path):
            # aiohttp keeps a header's non-UTF-8 bytes as surrogates: compare the bytes sent
            given = request.headers.get("Authorization", "").encode("utf-8", "surrogateescape")
            if not hmac.compare_digest(given, expected):
                return error(401, "missing or wrong 'Authorization: Bearer <api_token>'")
        return await handler(request)

    return check


def make_runner(app: web.Application, limits: ApiLimits) -> web.AppRunner:
    return web.AppRunner(
        app, access_log=None, keepalive_timeout=limits.idle, lingering_time=limits.linger
    )


def make_app(
    backend: Backend, *, token: str | None = None, limits: ApiLimits = ApiLimits()
) -> web.Application:
    middlewares: list[Middleware] = [json_errors, same_site_only]
    if token:
        middlewares.append(token_auth(token))
    app = web.Application(client_max_size=MAX_BYTES, middlewares=middlewares)
    api = Api(backend, limits)
    app.router.add_post("/v1/jobs", api.submit)
    app.router.add_get("/v1/jobs", api.list_jobs)
    app.router.add_get("/v1/jobs/{provider}/{doc_id}", api.show)
    app.router.add_post("/v1/jobs/{provider}/{doc_id}/redeliver", api.redeliver)
    app.router.add_delete("/v1/jobs/{provider}/{doc_id}", api.cancel)
    app.router.add_get("/v1/status", api.status)
    app.router.add_get("/v1/openapi.json", api.openapi)
    app.router.add_get("/healthz", api.healthz)
    app.router.add_get("/readyz", api.readyz)
    app.router.add_get("/metrics", api.metrics)
    return app


class Api:
    def __init__(self, backend: Backend, limits: ApiLimits) -> None:
        self.backend = backend
        self.limits = limits

    async def submit(self, request: web.Request) -> web.Response:
        backend = self.backend
        if backend.draining:
            return error(503, "shutting down: not taking new jobs")
        if (request.content_length or 0) > MAX_BYTES:  # say so now, not after 1 MiB
            backend.count_intake(IntakeOutcome.REJECTED)
            raise web.HTTPRequestEntityTooLarge(MAX_BYTES, request.content_length or 0)
        try:
            async with asyncio.timeout(self.limits.body):
                raw = await request.read()
        except TimeoutError:
            backend.count_intake(IntakeOutcome.REJECTED)
            return error(408, f"the body did not arrive within {self.limits.body:g} s")
        except web.HTTPRequestEntityTooLarge:  # sent without a length, cut at the limit
            backend.count_intake(IntakeOutcome.REJECTED)
            raise
        try:
            subs = parse_json(load_json(raw), backend.catalog())
        except IntakeError as exc:
            backend.count_intake(IntakeOutcome.REJECTED)
            return error(400, str(exc))
        try:
            stored = await backend.submit(subs)
        except StoreError as exc:
            backend.count_intake(IntakeOutcome.UNAVAILABLE)
            return error(503, f"cannot store jobs now: {exc}")
        backend.count_intake(IntakeOutcome.ACCEPTED)
        jobs = [{**job.as_dict(), "created": created} for job, created in stored]
        return web.json_response({"jobs": jobs}, status=202)

    async def list_jobs(self, request: web.Request) -> web.Response:
        q = request.query
        state = q.get("state") or None
        if state is not None and state not in set(JobState):
            return error(400, f"state: unknown {state!r} (one of {', '.join(JobState)})")
        try:
            limit = int(q.get("limit", "100"))
            if not 1 <= limit <= 10000:
                raise ValueError
        except ValueError:
            return error(400, "limit: expected an integer from 1 to 10000")
        jobs, truncated = self.backend.list_jobs(
            state=state, provider=q.get("provider"), limit=limit, max_bytes=self.limits.list_bytes
        )
        return web.json_response({"jobs": [j.as_dict() for j in jobs], "truncated": truncated})

    @staticmethod
    def _job_ref(request: web.Request) -> tuple[str, str]:
        provider, doc_id = request.match_info["provider"], request.match_info["doc_id"]
        try:
            check_job_id(doc_id, "docId")
        except IntakeError as exc:
            raise web.HTTPBadRequest(reason=str(exc)) from None
        return provider, doc_id

    async def show(self, request: web.Request) -> web.Response:
        provider, doc_id = self._job_ref(request)
        detail = self.backend.job_detail(provider, doc_id)
        if detail is None:
            return error(404, f"no job {provider}/{doc_id}")
        return web.json_response(detail)

    async def redeliver(self, request: web.Request) -> web.Response:
        provider, doc_id = self._job_ref(request)
        done = await self.backend.redeliver(provider, doc_id)
        if done is None:
            return error(404, f"no job {provider}/{doc_id}")
        job, count = done
        if not count:
            return error(409, f"job {provider}/{doc_id} has nothing to deliver ({job.state})")
        return web.json_response({"redelivered": count}, status=202)

    async def cancel(self, request: web.Request) -> web.Response:
        provider, doc_id = self._job_ref(request)
        done = await self.backend.cancel(provider, doc_id)
        if done is None:
            return error(404, f"no job {provider}/{doc_id}")
        job, cancelled = done
        if not cancelled:
            return error(409, f"job {provider}/{doc_id} is already {job.state}")
        return web.json_response({"job": job.as_dict()})

    async def openapi(self, request: web.Request) -> web.Response:
        """The API's OpenAPI 3.1 description, kept beside this module (tests check every answer
        of the test suite against it)."""
        return web.Response(body=openapi_document(), content_type="application/json")

    async def status(self, request: web.Request) -> web.Response:
        return web.json_response(await self.backend.status())

    async def healthz(self, request: web.Request) -> web.Response:
        problem = self.backend.health_problem()
        if problem:
            return web.json_response({"status": "failing", "error": problem}, status=503)
        return web.json_response({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        """Ready for work: started, not draining, loops alive, the database takes writes."""
        problems = await self.backend.readiness_problems()
        if problems:
            body = {"status": "not ready", "error": "; ".join(problems), "problems": problems}
            return web.json_response(body, status=503)
        # A shared budget out of reach stops polling on its keys, but intake and delivery go on
        # and taking this instance out of service would not help (a sidecar's pod with it).
        if degraded := self.backend.degraded():
            return web.json_response({"status": "degraded", "degraded": degraded})
        return web.json_response({"status": "ready"})

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(
            body=self.backend.render_metrics(), headers={"Content-Type": CONTENT_TYPE}
        )
