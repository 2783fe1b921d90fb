"""A local fake of the Xosum and Aitronos polling APIs, rate limit included (`mock-provider`).

It answers in the providers' published shapes (`shared/providers/`; their JSON examples are the
fixtures in `tests/fixtures/providers/`, and `tests/test_mock.py` holds every answer here to them
field by field), so trying relayd against the mock is trying it against what the real services
send. Options reproduce the races the documents allow: paragraphs that lag behind a `completed`
status, and answers about another job. Instrumented for tests: it records every arrival and
answer, and measures the busiest window.
"""

from __future__ import annotations

import asyncio
import collections
import json
import math
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Collection, Iterable
from email.utils import formatdate
from typing import Any

from aiohttp import hdrs, web

from relayd.mock import xosum
from relayd.mock.aitronos import (
    AIT_TRANSCRIBE,
    DOCUMENTED_CACHE_AGES,
    Aitronos,
    scaled_cache_ages,
)
from relayd.mock.jobs import (
    DEFAULT_DURATION,
    DEFAULT_PARAGRAPHS,
    MockJob,
    check_job,
    default_outcome,
    job_json,
)
from relayd.mock.net import serve_app

__all__ = ["MockJob", "MockProvider", "scaled_cache_ages", "serve"]

ApiHandler = Callable[[web.Request, float], Awaitable[web.Response]]


class MockProvider:
    """Both providers' polling APIs over one job table, with a fixed-window limit per API key.

    The limit counts per Authorization header value, in windows aligned to the clock
    (index = floor(now / window)); every request counts, 429s included, before auth.
    """

    def __init__(
        self,
        *,
        window: float = 60.0,
        limit: int = 60,
        ready_after: float = 2.0,
        api_keys: Collection[str] | None = None,
        clock: Callable[[], float] = time.time,
        cache_ages: tuple[float, float] = DOCUMENTED_CACHE_AGES,
    ) -> None:
        if window <= 0 or limit < 1:
            raise ValueError("window must be > 0 and limit >= 1")
        self.window = window
        self.limit = limit
        self.ready_after = ready_after
        self.api_keys = None if api_keys is None else frozenset(api_keys)
        self.clock = clock
        self.aitronos = Aitronos(cache_ages)
        self.port = 0  # where serve() bound it
        self.jobs: dict[str, MockJob] = {}
        self.arrivals: list[tuple[float, str]] = []
        self.rejected = 0
        self.status_counts: collections.Counter[int] = collections.Counter()
        self._windows: dict[str, tuple[int, int]] = {}  # key -> (window index, requests in it)

    # -- jobs -------------------------------------------------------------------------------------

    def add_job(
        self,
        doc_id: str,
        *,
        outcome: str = "transcribed",
        ready_after: float | None = None,
        paragraphs: int = DEFAULT_PARAGRAPHS,
        progress: dict[str, Any] | None = None,
        pii_policies: list[str] | None = None,
        duration: float = DEFAULT_DURATION,
        paragraphs_lag: float = 0.0,
        mixed_up: int = 0,
        **fields: Any,
    ) -> MockJob:
        """Register (or re-register) a job now; `fields` override its terminal answer and
        `progress` adds fields to its in-progress answers (e.g. the audio's `duration`)."""
        ready = self.ready_after if ready_after is None else ready_after
        options = {"duration": duration, "paragraphs_lag": paragraphs_lag, "mixed_up": mixed_up}
        check_job(doc_id, outcome, ready, paragraphs, options)
        if progress is not None and not isinstance(progress, dict):
            raise ValueError(f"progress must be an object, not {progress!r}")
        job = MockJob(
            doc_id,
            outcome,
            float(ready),
            self.clock(),
            dict(fields),
            paragraphs,
            dict(progress or {}),
            None if pii_policies is None else [str(p) for p in pii_policies],
            float(duration),
            float(paragraphs_lag),
            mixed_up,
        )
        self.jobs[doc_id] = job
        return job

    def finished_at(self, doc_id: str) -> float | None:
        job = self.jobs.get(doc_id)
        return None if job is None else job.finished_at

    def _job(self, doc_id: str, now: float) -> MockJob:
        """The known job, or one auto-registered on this first poll with defaults by prefix."""
        job = self.jobs.get(doc_id)
        if job is None:
            job = MockJob(doc_id, default_outcome(doc_id), self.ready_after, now)
            self.jobs[doc_id] = job
        return job

    # -- instrumentation -------------------------------------------------------------------------

    def window_index(self, t: float) -> int:
        return math.floor(t / self.window)

    def max_in_fixed_window(self, key: str | None = None) -> int:
        """Most requests one key made in any aligned window; key=None: the busiest key."""
        counts = collections.Counter((k, self.window_index(t)) for t, k in self._arrivals(key))
        return max(counts.values(), default=0)

    def max_in_rolling_window(self, key: str | None = None) -> int:
        """Most requests one key made in any half-open interval [t, t + window)."""
        by_key: dict[str, list[float]] = collections.defaultdict(list)
        for t, k in self._arrivals(key):
            by_key[k].append(t)
        best = 0
        for times in by_key.values():
            times.sort()
            end = 0
            for start, t in enumerate(times):
                while end < len(times) and times[end] < t + self.window:
                    end += 1
                best = max(best, end - start)
        return best

    def _arrivals(self, key: str | None) -> Iterable[tuple[float, str]]:
        # `key` may be the header value ("Bearer k1") or the bare token ("k1").
        if key is None:
            return self.arrivals
        return [(t, k) for t, k in self.arrivals if k in (key, f"Bearer {key}")]

    def stats(self) -> dict[str, Any]:
        return {
            "requests": len(self.arrivals),
            "rejected": self.rejected,
            "max_in_fixed_window": self.max_in_fixed_window(),
            "max_in_rolling_window": self.max_in_rolling_window(),
            "status_counts": {str(s): n for s, n in sorted(self.status_counts.items())},
            "jobs": len(self.jobs),
            "window": self.window,
            "limit": self.limit,
        }

    # -- the application -------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/api/getTranscription", self._api(self._xosum, envelope=False))
        app.router.add_get(f"{AIT_TRANSCRIBE}/{{id}}", self._api(self._ait_status, envelope=True))
        app.router.add_get(
            f"{AIT_TRANSCRIBE}/{{id}}/paragraphs", self._api(self._ait_paragraphs, envelope=True)
        )
        app.router.add_post("/_mock/jobs", self._control_add)
        app.router.add_get("/_mock/jobs", self._control_list)
        app.router.add_get("/_mock/jobs/{doc_id}", self._control_job)
        app.router.add_get("/_mock/stats", self._control_stats)
        return app

    def _api(
        self, handler: ApiHandler, *, envelope: bool
    ) -> Callable[[web.Request], Awaitable[web.Response]]:
        """Wrap an API route: count, rate limit, authenticate; stamp Date and tally the status."""

        async def route(request: web.Request) -> web.Response:
            now = self.clock()
            response = self._admit(request, now, envelope) or await handler(request, now)
            response.headers[hdrs.DATE] = formatdate(now, usegmt=True)  # the provider's own clock
            self.status_counts[response.status] += 1
            return response

        return route

    def _admit(self, request: web.Request, now: float, envelope: bool) -> web.Response | None:
        key = request.headers.get(hdrs.AUTHORIZATION, "")
        self.arrivals.append((now, key))
        index = self.window_index(now)
        seen_index, used = self._windows.get(key, (index, 0))
        used = used + 1 if seen_index == index else 1
        self._windows[key] = (index, used)
        if used > self.limit:
            self.rejected += 1
            wait = max(1, math.ceil(round((index + 1) * self.window - now, 6)))
            if envelope:
                response = self.aitronos.error(
                    now, 429, "RATE_LIMIT_EXCEEDED", "Rate limit exceeded", {"retry_after": wait}
                )
            else:
                response = web.json_response({"error": "rate limited"}, status=429)
            response.headers[hdrs.RETRY_AFTER] = str(wait)
            return response
        scheme, _, token = key.partition(" ")
        if self.api_keys is not None and (scheme.lower() != "bearer" or token not in self.api_keys):
            if envelope:
                return self.aitronos.error(now, 401, "UNAUTHORIZED", "Invalid API key", {})
            return web.json_response({"error": "unauthorized"}, status=401)
        return None

    # -- the providers ---------------------------------------------------------------------------

    async def _xosum(self, request: web.Request, now: float) -> web.Response:
        doc_id = request.query.get("docId", "")
        if not doc_id:
            return web.json_response({"error": "docId is required"}, status=400)
        job = self._job(doc_id, now)
        if job.outcome == "missing":
            return web.json_response({"error": "document not found"}, status=404)
        status, _ = job.stage(now, xosum.STAGES)
        if status is None and job.take_mixed_up():
            job = job.someone_else()
        return web.json_response(xosum.answer(job, status))

    async def _ait_status(self, request: web.Request, now: float) -> web.Response:
        return self.aitronos.status(request, self._job(request.match_info["id"], now), now)

    async def _ait_paragraphs(self, request: web.Request, now: float) -> web.Response:
        return self.aitronos.paragraphs(request, self._job(request.match_info["id"], now), now)

    # -- control (not rate limited, not counted) -------------------------------------------------

    async def _control_add(self, request: web.Request) -> web.Response:
        try:
            payload = await request.json()
        except json.JSONDecodeError:
            return web.json_response({"error": "body is not JSON"}, status=400)
        items = payload if isinstance(payload, list) else [payload]
        specs: list[tuple[str, dict[str, Any]]] = []
        for item in items:  # validate everything first: nothing is half-registered
            if not isinstance(item, dict) or not isinstance(item.get("docId"), str):
                return web.json_response({"error": "each job needs a string docId"}, status=400)
            options = {k: v for k, v in item.items() if k != "docId" and v is not None}
            options.setdefault("outcome", "transcribed")
            try:
                if "doc_id" in options:
                    raise ValueError("use docId, not doc_id")
                check_job(
                    item["docId"],
                    options["outcome"],
                    options.get("ready_after", self.ready_after),
                    options.get("paragraphs", DEFAULT_PARAGRAPHS),
                    options,
                )
                if not isinstance(options.get("progress", {}), dict):
                    raise ValueError("progress must be an object")
            except ValueError as exc:
                return web.json_response({"error": str(exc)}, status=400)
            specs.append((item["docId"], options))
        jobs = [self.add_job(doc_id, **options) for doc_id, options in specs]
        return web.json_response({"jobs": [job_json(j) for j in jobs]}, status=201)

    async def _control_list(self, request: web.Request) -> web.Response:
        return web.json_response({"jobs": [job_json(j) for j in self.jobs.values()]})

    async def _control_job(self, request: web.Request) -> web.Response:
        job = self.jobs.get(request.match_info["doc_id"])
        if job is None:
            return web.json_response({"error": "unknown job"}, status=404)
        return web.json_response(job_json(job))

    async def _control_stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.stats())


async def serve(
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    window: float = 60.0,
    limit: int = 60,
    ready_after: float = 2.0,
    api_keys: Collection[str] | None = None,
    cache_ages: tuple[float, float] = DOCUMENTED_CACHE_AGES,
    clock: Callable[[], float] = time.time,
) -> tuple[MockProvider, web.AppRunner, int]:
    """Start a provider on a TCP site; the caller owns the runner (`await runner.cleanup()`)."""
    provider = MockProvider(
        window=window,
        limit=limit,
        ready_after=ready_after,
        api_keys=api_keys,
        cache_ages=cache_ages,
        clock=clock,
    )
    runner, provider.port = await serve_app(provider.app(), host=host, port=port)
    return provider, runner, provider.port


async def _serve_until_signalled(port: int, window: float, limit: int, ready_after: float) -> None:
    _, runner, bound = await serve(
        port=port,
        window=window,
        limit=limit,
        ready_after=ready_after,
        cache_ages=scaled_cache_ages(window),
    )
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = (signal.SIGINT, signal.SIGTERM)
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)
    try:
        print(
            f"mock provider on http://127.0.0.1:{bound} (limit {limit} per {window:g}s window)",
            flush=True,
        )
        await stop.wait()
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
        await runner.cleanup()


def main(port: int, window: float, limit: int, ready_after: float) -> int:
    """`relayd mock-provider`: serve in the foreground until Ctrl-C or SIGTERM."""
    try:
        asyncio.run(_serve_until_signalled(port, window, limit, ready_after))
    except (OSError, ValueError) as exc:
        print(f"relayd mock-provider: {exc}", file=sys.stderr)
        return 1
    return 0
