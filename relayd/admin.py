"""The HTTP API (SPEC §3) on the unix socket and on TCP: intake, job queries, redeliver/cancel,
status, health and metrics. Every error answer is JSON `{"error": "…"}`.
"""

from __future__ import annotations

import asyncio
import hmac
import json
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web
from aiohttp.typedefs import Middleware

from relayd.errors import IntakeError, StoreError
from relayd.intake.envelope import MAX_BYTES, check_job_id, load_json, parse_json
from relayd.metrics import CONTENT_TYPE
from relayd.models import FINAL_JOB_STATES, JobState

if TYPE_CHECKING:
    from relayd.daemon import Daemon

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
OPEN_PATHS = frozenset({"/healthz", "/readyz"})  # probes carry no token

# Slow and idle clients must not hold a connection for long. aiohttp has no timeout of its own
# for reading a request head, but its keep-alive timer runs from the moment a connection opens
# (and again after each answer) and closes a connection still waiting for a complete head: so
# IDLE_SECONDS bounds an idle keep-alive connection and a head sent byte by byte alike. A body
# is bounded by BODY_SECONDS in Api.submit. Read at start, so tests can shorten them.
IDLE_SECONDS = 15.0
BODY_SECONDS = 30.0  # the whole body of a POST, counted from its head: else 408
LINGER_SECONDS = 2.0  # after an early answer (408, 413), unread body is drained this long at most
LIST_BYTES = 16 * 1024 * 1024  # about the most one GET /v1/jobs answer holds; then "truncated"


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


def token_auth(token: str) -> Middleware:
    expected = f"Bearer {token}".encode()

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path not in OPEN_PATHS:
            # aiohttp keeps a header's non-UTF-8 bytes as surrogates: compare the bytes sent
            given = request.headers.get("Authorization", "").encode("utf-8", "surrogateescape")
            if not hmac.compare_digest(given, expected):
                return error(401, "missing or wrong 'Authorization: Bearer <api_token>'")
        return await handler(request)

    return check


def make_runner(app: web.Application) -> web.AppRunner:
    return web.AppRunner(
        app, access_log=None, keepalive_timeout=IDLE_SECONDS, lingering_time=LINGER_SECONDS
    )


def make_app(daemon: Daemon, *, token: str | None = None) -> web.Application:
    middlewares: list[Middleware] = [json_errors]
    if token:
        middlewares.append(token_auth(token))
    app = web.Application(client_max_size=MAX_BYTES, middlewares=middlewares)
    api = Api(daemon)
    app.router.add_post("/v1/jobs", api.submit)
    app.router.add_get("/v1/jobs", api.list_jobs)
    app.router.add_get("/v1/jobs/{provider}/{doc_id}", api.show)
    app.router.add_post("/v1/jobs/{provider}/{doc_id}/redeliver", api.redeliver)
    app.router.add_delete("/v1/jobs/{provider}/{doc_id}", api.cancel)
    app.router.add_get("/v1/status", api.status)
    app.router.add_get("/healthz", api.healthz)
    app.router.add_get("/readyz", api.readyz)
    app.router.add_get("/metrics", api.metrics)
    return app


class Api:
    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon

    async def submit(self, request: web.Request) -> web.Response:
        if self.daemon.draining:
            return error(503, "shutting down: not taking new jobs")
        if (request.content_length or 0) > MAX_BYTES:  # say so now, not after 1 MiB
            raise web.HTTPRequestEntityTooLarge(MAX_BYTES, request.content_length or 0)
        try:
            async with asyncio.timeout(BODY_SECONDS):
                raw = await request.read()
        except TimeoutError:
            self.daemon.metrics.intake.labels("api", "rejected").inc()
            return error(408, f"the body did not arrive within {BODY_SECONDS:g} s")
        try:
            subs = parse_json(load_json(raw), self.daemon.catalog())
        except IntakeError as exc:
            self.daemon.metrics.intake.labels("api", "rejected").inc()
            return error(400, str(exc))
        try:
            stored = await self.daemon.accept_api(subs)
        except StoreError as exc:
            self.daemon.metrics.intake.labels("api", "unavailable").inc()
            return error(503, f"cannot store jobs now: {exc}")
        self.daemon.metrics.intake.labels("api", "accepted").inc()
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
        jobs, truncated = self.daemon.store.list_jobs_within(
            state=state, provider=q.get("provider"), limit=limit, max_bytes=LIST_BYTES
        )
        return web.json_response({"jobs": [j.as_dict() for j in jobs], "truncated": truncated})

    def _job_ref(self, request: web.Request) -> tuple[str, str]:
        provider, doc_id = request.match_info["provider"], request.match_info["doc_id"]
        try:
            check_job_id(doc_id, "docId")
        except IntakeError as exc:
            raise web.HTTPBadRequest(reason=str(exc)) from None
        return provider, doc_id

    async def show(self, request: web.Request) -> web.Response:
        provider, doc_id = self._job_ref(request)
        detail = self.daemon.job_detail(provider, doc_id)
        if detail is None:
            return error(404, f"no job {provider}/{doc_id}")
        return web.json_response(detail)

    async def redeliver(self, request: web.Request) -> web.Response:
        provider, doc_id = self._job_ref(request)
        job = self.daemon.store.get_job(provider, doc_id)
        if job is None:
            return error(404, f"no job {provider}/{doc_id}")
        count = self.daemon.store.redeliver(job_id=job.id, now=self.daemon.clock.time())
        if not count:
            return error(409, f"job {provider}/{doc_id} has nothing to deliver ({job.state})")
        self.daemon.deliverer.wake()
        return web.json_response({"redelivered": count}, status=202)

    async def cancel(self, request: web.Request) -> web.Response:
        provider, doc_id = self._job_ref(request)
        job = self.daemon.store.get_job(provider, doc_id)
        if job is None:
            return error(404, f"no job {provider}/{doc_id}")
        if job.state in FINAL_JOB_STATES:
            return error(409, f"job {provider}/{doc_id} is already {job.state}")
        self.daemon.store.cancel(job.id, now=self.daemon.clock.time())
        updated = self.daemon.store.job_by_id(job.id)
        assert updated is not None
        return web.json_response({"job": updated.as_dict()})

    async def status(self, request: web.Request) -> web.Response:
        info = self.daemon.status()
        await self.daemon.poller.keys.shared_status(info["providers"])
        return web.json_response(info)

    async def healthz(self, request: web.Request) -> web.Response:
        problem = self.daemon.health_problem()
        if problem:
            return web.json_response({"status": "failing", "error": problem}, status=503)
        return web.json_response({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        """Ready for work: started, not draining, loops alive, the database takes writes."""
        problems = self.daemon.readiness_problems()
        if problems:
            body = {"status": "not ready", "error": "; ".join(problems), "problems": problems}
            return web.json_response(body, status=503)
        # A shared budget out of reach stops polling on its keys, but intake and delivery go on
        # and taking this instance out of service would not help (a sidecar's pod with it).
        if degraded := self.daemon.degraded():
            return web.json_response({"status": "degraded", "degraded": degraded})
        return web.json_response({"status": "ready"})

    async def metrics(self, request: web.Request) -> web.Response:
        body = self.daemon.metrics.render()
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


def dumps(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=False)
