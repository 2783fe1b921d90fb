"""The operator console (SPEC §7): server-rendered pages under /ui on every listener of the API.

Pages read relayd through the API's `Backend`, the same calls the JSON API makes, and render
with Jinja2; a little JavaScript (static/console.js) refreshes the live part of a page by
fetching the same URL with `X-Relayd-Partial: 1` and swapping in the fragment, so there is no
second rendering path to keep true. Nothing is loaded from anywhere but /ui/static.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlencode

from aiohttp import web

from relayd.console.charts import chart
from relayd.console.render import FOLD_CHARS, body_text, page
from relayd.console.security import HEADERS, Guard, Sessions, set_session_cookie
from relayd.errors import IntakeError
from relayd.intake.envelope import check_job_id
from relayd.models import FINAL_JOB_STATES, JobState
from relayd.views import parse_since, totals

if TYPE_CHECKING:
    from relayd.api import Backend

__all__ = ["Guard", "Sessions", "add_console"]

PAGE_JOBS = 50  # jobs on one page of /ui/jobs
PAGE_DEAD = 100
PARTIAL = "X-Relayd-Partial"
REFRESH_SECONDS = 2  # how often an open page fetches its live part again
STATIC = resources.files("relayd.console") / "static"
STATIC_TYPES = {".css": "text/css", ".js": "text/javascript", ".svg": "image/svg+xml"}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def add_console(
    app: web.Application,
    backend: Backend,
    guard: Guard,
    *,
    clock: Callable[[], float] = time.time,
    warning: str | None = None,
) -> None:
    """Serve the console on `app` (before it starts). `clock`: wall time, the daemon's.
    `warning`: shown on every page (no api_token on a listener others can reach)."""
    console = Console(backend, guard, warning, clock)
    app.middlewares.append(console.middleware)
    router = app.router
    router.add_get("/ui", console.to_overview)
    router.add_get("/ui/", console.overview)
    router.add_get("/ui/login", console.login_form)
    router.add_post("/ui/login", console.login)
    router.add_post("/ui/logout", console.logout)
    router.add_get("/ui/jobs", console.jobs)
    router.add_get("/ui/jobs/{provider}/{doc_id}", console.job)
    router.add_post("/ui/jobs/{provider}/{doc_id}/redeliver", console.redeliver)
    router.add_post("/ui/jobs/{provider}/{doc_id}/cancel", console.cancel)
    router.add_get("/ui/dead", console.dead)
    router.add_post("/ui/dead/redeliver", console.redeliver_dead)
    router.add_get("/ui/static/{name}", console.static)


class Console:
    def __init__(
        self, backend: Backend, guard: Guard, warning: str | None, clock: Callable[[], float]
    ) -> None:
        self.backend = backend
        self.guard = guard
        self.warning = warning
        self.clock = clock

    # -- access -----------------------------------------------------------------------------------

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Sign-in and CSRF for /ui (the JSON API's token does not apply here), and the security
        headers on every console answer."""
        path = request.path
        if not (path == "/ui" or path.startswith("/ui/")):
            return await handler(request)
        response = await self._checked(request, handler)
        for name, value in HEADERS.items():
            response.headers.setdefault(name, value)  # a static file keeps its Cache-Control
        return response

    async def _checked(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        path = request.path
        public = path in ("/ui/login", "/ui/static") or path.startswith("/ui/static/")
        if not public and not self.guard.allowed(request):
            if request.method == "GET" and PARTIAL not in request.headers:
                target = "/ui/login?" + urlencode({"next": request.path_qs})
                return see_other(target)
            return self._error(request, 401, "Sign in first: your session is missing or expired.")
        if request.method == "POST" and path != "/ui/login":
            form = await request.post()
            given = form.get("csrf")
            if not isinstance(given, str) or not self.guard.csrf_ok(request, given):
                return self._error(
                    request, 403, "This form is stale or was not sent from this console; reload."
                )
        return await handler(request)

    # -- rendering --------------------------------------------------------------------------------

    def _render(
        self, request: web.Request, template: str, *, status: int = 200, **context: Any
    ) -> web.Response:
        partial = PARTIAL in request.headers
        html = page(
            template,
            partial=partial,
            warning=self.warning,
            csrf=self.guard.csrf(request),
            signed_in=self.guard.signs_in and self.guard.session(request) is not None,
            refresh=REFRESH_SECONDS,
            path=request.path_qs,
            **context,
        )
        return web.Response(text=html, status=status, content_type="text/html", charset="utf-8")

    def _error(self, request: web.Request, status: int, message: str) -> web.Response:
        return self._render(
            request, "error.html", status=status, title=str(status), message=message
        )

    async def static(self, request: web.Request) -> web.StreamResponse:
        found = static_file(request.match_info["name"])
        if found is None:
            return web.Response(status=404, text="not found")
        body, kind = found
        response = web.Response(body=body, content_type=kind)
        response.headers["Cache-Control"] = "max-age=300"
        return response

    # -- sign-in ----------------------------------------------------------------------------------

    async def login_form(self, request: web.Request) -> web.StreamResponse:
        if not self.guard.signs_in:
            return see_other("/ui/")
        return self._render(
            request,
            "login.html",
            title="Sign in",
            next=_local(request.query.get("next")),
            error=None,
        )

    async def login(self, request: web.Request) -> web.StreamResponse:
        if not self.guard.signs_in:
            return see_other("/ui/")
        form = await request.post()
        token, target = form.get("token"), _local(form.get("next"))
        if not isinstance(token, str) or not self.guard.token_matches(token):
            return self._render(
                request,
                "login.html",
                title="Sign in",
                status=401,
                next=target,
                error="That is not the API token.",
            )
        session = self.guard.sessions.create()
        response = see_other(target)
        set_session_cookie(response, session, self.guard.sessions.lifetime)
        return response

    async def logout(self, request: web.Request) -> web.StreamResponse:
        session = self.guard.session(request)
        self.guard.sessions.drop(session.id if session else None)
        response = see_other("/ui/login" if self.guard.signs_in else "/ui/")
        response.del_cookie("relayd_session", path="/ui")
        return response

    # -- pages ------------------------------------------------------------------------------------

    async def to_overview(self, request: web.Request) -> web.StreamResponse:
        return see_other("/ui/")

    async def overview(self, request: web.Request) -> web.StreamResponse:
        status = await self.backend.status()
        history = self.backend.requests_per_window()
        keys: dict[str, dict[str, Any]] = {}
        for name, provider in status["providers"].items():
            budget = provider.get("budget")
            if not budget:
                continue
            entry = keys.setdefault(budget["key"], {"budget": budget, "providers": []})
            entry["providers"].append(name)
        now = self.clock()
        for key_id, entry in keys.items():
            budget = entry["budget"]
            entry["chart"] = chart(
                history.get(key_id, []),
                window=budget["rate_window"],
                limit=budget["rate_limit"],
                now=now,
            )
        jobs = totals({n: p["jobs"] for n, p in status["providers"].items()})
        waiting = [
            (p["oldest_waiting_seconds"], name)
            for name, p in status["providers"].items()
            if p.get("oldest_waiting_seconds") is not None
        ]
        return self._render(
            request,
            "overview.html",
            title="Overview",
            keys=keys,
            jobs={state: jobs.get(state, 0) for state in JobState},
            oldest=max(waiting, default=None),
            providers=status["providers"],
            endpoints=status["endpoints"],
            store=status.get("store", {}),
            info=status,
            now=now,
        )

    async def jobs(self, request: web.Request) -> web.StreamResponse:
        q = request.query
        state = q.get("state") or None
        provider = q.get("provider") or None
        search = (q.get("q") or "").strip() or None
        problems = []
        if state is not None and state not in set(JobState):
            problems.append(f"state: unknown {state!r}")
            state = None
        before = None
        if q.get("before"):
            try:
                before = int(q["before"])
            except ValueError:
                problems.append("before: expected a job number")
        jobs = self.backend.jobs_page(
            state=state, provider=provider, q=search, before=before, limit=PAGE_JOBS + 1
        )
        more = len(jobs) > PAGE_JOBS
        jobs = jobs[:PAGE_JOBS]
        filters = {k: v for k, v in (("state", state), ("provider", provider), ("q", search)) if v}
        older = (
            "/ui/jobs?" + urlencode({**filters, "before": jobs[-1].id}) if more and jobs else None
        )
        catalog = self.backend.catalog()
        return self._render(
            request,
            "jobs.html",
            title="Jobs",
            jobs=jobs,
            state=state or "",
            provider=provider or "",
            q=search or "",
            states=list(JobState),
            providers=sorted(catalog.providers),
            older=older,
            first_page=before is None,
            newest="/ui/jobs?" + urlencode(filters) if before is not None else None,
            problems=problems,
            link=job_link,
            now=self.clock(),
        )

    async def job(self, request: web.Request) -> web.StreamResponse:
        provider, doc_id = request.match_info["provider"], request.match_info["doc_id"]
        try:
            check_job_id(doc_id, "docId")
        except IntakeError as exc:
            return self._error(request, 400, str(exc))
        detail = self.backend.job_detail(provider, doc_id, payloads=True)
        if detail is None:
            return self._error(request, 404, f"There is no job {provider}/{doc_id}.")
        for delivery in detail["deliveries"]:
            delivery["body"] = body_text(delivery.pop("payload"))
        job = detail["job"]
        return self._render(
            request,
            "job.html",
            title=f"{provider}/{doc_id}",
            detail=detail,
            job=job,
            can_cancel=job["state"] not in FINAL_JOB_STATES,
            can_redeliver=bool(detail["deliveries"]),
            action=job_link(provider, doc_id),
            fold=FOLD_CHARS,
            message=request.query.get("done"),
            now=self.clock(),
        )

    async def redeliver(self, request: web.Request) -> web.StreamResponse:
        provider, doc_id = request.match_info["provider"], request.match_info["doc_id"]
        done = await self.backend.redeliver(provider, doc_id)
        if done is None:
            return self._error(request, 404, f"There is no job {provider}/{doc_id}.")
        job, count = done
        message = (
            f"{count} delivery(ies) queued again."
            if count
            else f"Nothing to deliver: the job is {job.state}."
        )
        return see_other(job_link(provider, doc_id) + "?" + urlencode({"done": message}))

    async def cancel(self, request: web.Request) -> web.StreamResponse:
        provider, doc_id = request.match_info["provider"], request.match_info["doc_id"]
        done = await self.backend.cancel(provider, doc_id)
        if done is None:
            return self._error(request, 404, f"There is no job {provider}/{doc_id}.")
        job, cancelled = done
        message = "Cancelled." if cancelled else f"Not cancelled: the job is already {job.state}."
        return see_other(job_link(provider, doc_id) + "?" + urlencode({"done": message}))

    def _dead_filters(self, values: Any) -> tuple[str | None, str, float | None, list[str]]:
        endpoint = (values.get("endpoint") or "").strip() or None
        since_text = (values.get("since") or "").strip()
        since, problems = None, []
        if since_text:
            try:
                since = parse_since(since_text, self.clock())
            except ValueError as exc:
                problems.append(f"since: {exc}")
        return endpoint, since_text, since, problems

    async def dead(self, request: web.Request) -> web.StreamResponse:
        endpoint, since_text, since, problems = self._dead_filters(request.query)
        deliveries, total = self.backend.dead_letters(
            endpoint=endpoint, since=since, limit=PAGE_DEAD
        )
        return self._render(
            request,
            "dead.html",
            title="Dead letters",
            deliveries=deliveries,
            total=total,
            endpoint=endpoint or "",
            since=since_text,
            endpoints=sorted(self.backend.catalog().endpoints),
            problems=problems,
            link=job_link,
            confirm=None,
            now=self.clock(),
        )

    async def redeliver_dead(self, request: web.Request) -> web.StreamResponse:
        form = await request.post()
        endpoint, since_text, since, problems = self._dead_filters(form)
        back = "/ui/dead?" + urlencode(
            {k: v for k, v in (("endpoint", endpoint), ("since", since_text)) if v}
        )
        if problems:
            return self._error(request, 400, "; ".join(problems))
        if form.get("confirmed") != "yes":  # first say how many, and ask
            _, total = self.backend.dead_letters(endpoint=endpoint, since=since, limit=1)
            return self._render(
                request,
                "confirm.html",
                title="Redeliver dead deliveries?",
                total=total,
                endpoint=endpoint or "",
                since=since_text,
                back=back,
            )
        count = await self.backend.redeliver_dead(endpoint=endpoint, since=since)
        return self._render(request, "done.html", title="Redelivered", count=count, back=back)


@functools.lru_cache(maxsize=16)  # names asked for are not ours to keep: bounded
def static_file(name: str) -> tuple[bytes, str] | None:
    """(the bytes, the content type) of a file in static/, read once; None if there is none."""
    kind = next((t for ext, t in STATIC_TYPES.items() if name.endswith(ext)), None)
    item = STATIC / name
    if kind is None or "/" in name or not item.is_file():
        return None
    return item.read_bytes(), kind


def see_other(location: str) -> web.Response:
    """303 to `location` (answered, not raised: the JSON API's error middleware stays out)."""
    return web.Response(status=303, headers={"Location": location})


def job_link(provider: str, doc_id: str) -> str:
    return f"/ui/jobs/{quote(provider, safe='')}/{quote(doc_id, safe='')}"


def _local(target: Any) -> str:
    """Where to go after signing in: a path on this console only (never another site)."""
    if isinstance(target, str) and target.startswith("/ui") and not target.startswith("//"):
        return target
    return "/ui/"
