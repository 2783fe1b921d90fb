"""A local fake of the Xosum and Aitronos polling APIs, rate limit included (`mock-provider`).

Instrumented for tests: it records every arrival and answer, and measures the busiest window.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import itertools
import json
import math
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Collection, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import formatdate
from typing import Any

from aiohttp import hdrs, web

OUTCOMES = ("transcribed", "failed", "missing")
DEFAULT_PARAGRAPHS = 3
DEFAULT_PAGE = 100
MAX_PAGE = 1000
EARLY_SHARE = 0.2  # the first fifth of a job's life reads "uploading" (Xosum) / "queued" (Aitronos)

ApiHandler = Callable[[web.Request, float], Awaitable[web.Response]]


@dataclass
class MockJob:
    """One job the mock knows. `fields` override the terminal answer (Xosum body, Aitronos data)."""

    doc_id: str
    outcome: str  # "transcribed" | "failed" | "missing" (404 forever)
    ready_after: float  # seconds after first_seen when it becomes terminal
    first_seen: float  # clock time the job became known (registered or first polled)
    fields: dict[str, Any] = field(default_factory=dict)
    paragraphs: int = DEFAULT_PARAGRAPHS  # Aitronos paragraph count once completed
    progress: dict[str, Any] = field(default_factory=dict)  # extra fields while in progress
    pii_policies: list[str] | None = None  # Aitronos: answer with X-PII-Redacted/-Policies

    @property
    def finished_at(self) -> float:
        return self.first_seen + self.ready_after

    def phase(self, now: float) -> str:
        """'early', 'late' (both still in progress) or 'done' at `now`."""
        age = now - self.first_seen
        if age >= self.ready_after:
            return "done"
        return "early" if age < EARLY_SHARE * self.ready_after else "late"


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
        aitronos_max_age: float = 0,
    ) -> None:
        if window <= 0 or limit < 1:
            raise ValueError("window must be > 0 and limit >= 1")
        self.window = window
        self.limit = limit
        self.ready_after = ready_after
        self.api_keys = None if api_keys is None else frozenset(api_keys)
        self.clock = clock
        self.aitronos_max_age = aitronos_max_age
        self.jobs: dict[str, MockJob] = {}
        self.arrivals: list[tuple[float, str]] = []
        self.rejected = 0
        self.status_counts: collections.Counter[int] = collections.Counter()
        self._windows: dict[str, tuple[int, int]] = {}  # key -> (window index, requests in it)
        self._trace_ids = itertools.count(1)

    # -- jobs ------------------------------------------------------------------------------------

    def add_job(
        self,
        doc_id: str,
        *,
        outcome: str = "transcribed",
        ready_after: float | None = None,
        paragraphs: int = DEFAULT_PARAGRAPHS,
        progress: dict[str, Any] | None = None,
        pii_policies: list[str] | None = None,
        **fields: Any,
    ) -> MockJob:
        """Register (or re-register) a job now; `fields` override its terminal answer and
        `progress` adds fields to its in-progress answers (e.g. the audio's `duration`)."""
        ready = self.ready_after if ready_after is None else ready_after
        _check_job(doc_id, outcome, ready, paragraphs)
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
            job = MockJob(doc_id, _default_outcome(doc_id), self.ready_after, now)
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
        app.router.add_get("/v1/audio/transcribe/{id}", self._api(self._ait_status, envelope=True))
        app.router.add_get(
            "/v1/audio/transcribe/{id}/paragraphs", self._api(self._ait_paragraphs, envelope=True)
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
            response = self._error(envelope, 429, "RATE_LIMIT_EXCEEDED", "rate limited")
            response.headers[hdrs.RETRY_AFTER] = str(wait)
            return response
        scheme, _, token = key.partition(" ")
        if self.api_keys is not None and (scheme.lower() != "bearer" or token not in self.api_keys):
            return self._error(envelope, 401, "UNAUTHORIZED", "unauthorized")
        return None

    def _error(self, envelope: bool, status: int, code: str, message: str) -> web.Response:
        if not envelope:
            return web.json_response({"error": message}, status=status)
        trace_id = f"mock-{next(self._trace_ids):06d}"
        body = {"code": code, "message": message, "trace_id": trace_id}
        return web.json_response({"success": False, "error": body}, status=status)

    # -- Xosum -----------------------------------------------------------------------------------

    async def _xosum(self, request: web.Request, now: float) -> web.Response:
        doc_id = request.query.get("docId", "")
        if not doc_id:
            return web.json_response({"error": "docId is required"}, status=400)
        job = self._job(doc_id, now)
        if job.outcome == "missing":
            return web.json_response({"error": "document not found"}, status=404)
        phase = job.phase(now)
        if phase != "done":
            status = "uploading" if phase == "early" else "processing"
            return web.json_response({"docId": doc_id, "status": status} | job.progress)
        body: dict[str, Any]
        if job.outcome == "failed":
            body = {"docId": doc_id, "status": "failed", "error": "audio could not be decoded"}
            body |= {"type": "audio", "createdAt": _iso(job.first_seen)}
        else:
            body = {
                "docId": doc_id,
                "status": "transcribed",
                "title": f"Recording {doc_id}",
                "transcription": f"This is the mock transcription of {doc_id}.",
                "metadata": {},
                "resolution": None,
                "languageCode": "en",
                "type": "audio",
                "duration": 12.5,
                "createdAt": _iso(job.first_seen),
            }
        return web.json_response(body | job.fields)

    # -- Aitronos --------------------------------------------------------------------------------

    async def _ait_status(self, request: web.Request, now: float) -> web.Response:
        job = self._job(request.match_info["id"], now)
        if job.outcome == "missing":
            return self._error(True, 404, "TRANSCRIPTION_NOT_FOUND", "transcription not found")
        phase = job.phase(now)
        status = {"early": "queued", "late": "processing"}.get(phase)
        completed = status is None and job.outcome == "transcribed"
        data: dict[str, Any] = {
            "id": job.doc_id,
            "status": status or ("completed" if completed else "failed"),
            "created_at": _iso(job.first_seen),
            "language": "en",
            "duration_seconds": 12.5,
            "paragraph_count": job.paragraphs if completed else 0,
        }
        if phase == "done":
            if not completed:
                data["error"] = "audio could not be decoded"
            data |= job.fields
        return self._cacheable(request, data, _pii_headers(job))

    async def _ait_paragraphs(self, request: web.Request, now: float) -> web.Response:
        job = self._job(request.match_info["id"], now)
        if job.outcome == "missing":
            return self._error(True, 404, "TRANSCRIPTION_NOT_FOUND", "transcription not found")
        try:
            limit = min(_int_query(request, "limit", DEFAULT_PAGE, minimum=1), MAX_PAGE)
            offset = _int_query(request, "offset", 0, minimum=0)
        except ValueError as exc:
            return self._error(True, 400, "INVALID_PARAMETER", str(exc))
        if job.outcome != "transcribed" or job.phase(now) != "done":
            return self._error(
                True, 409, "TRANSCRIPTION_NOT_COMPLETE", "transcription not complete"
            )
        stop = min(offset + limit, job.paragraphs)
        items = [_paragraph(job.doc_id, i) for i in range(offset, stop)]
        data = {
            "paragraphs": items,
            "total_count": job.paragraphs,
            "limit": limit,
            "offset": offset,
        }
        return self._cacheable(request, data, _pii_headers(job))

    def _cacheable(
        self, request: web.Request, data: dict[str, Any], extra: dict[str, str] | None = None
    ) -> web.Response:
        """A success envelope with ETag and Cache-Control; 304 when If-None-Match matches."""
        canonical = json.dumps(data, sort_keys=True, separators=(",", ":"))
        etag = '"' + hashlib.sha256(canonical.encode()).hexdigest()[:24] + '"'
        age = self.aitronos_max_age
        headers = {
            hdrs.ETAG: etag,
            hdrs.CACHE_CONTROL: f"max-age={int(age) if float(age).is_integer() else age}",
            **(extra or {}),
        }
        candidates = {
            c.strip().removeprefix("W/")
            for c in request.headers.get(hdrs.IF_NONE_MATCH, "").split(",")
        }
        if etag in candidates or "*" in candidates:
            return web.Response(status=304, headers=headers)
        return web.json_response({"success": True, "data": data}, headers=headers)

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
                _check_job(
                    item["docId"],
                    options["outcome"],
                    options.get("ready_after", self.ready_after),
                    options.get("paragraphs", DEFAULT_PARAGRAPHS),
                )
                if not isinstance(options.get("progress", {}), dict):
                    raise ValueError("progress must be an object")
            except ValueError as exc:
                return web.json_response({"error": str(exc)}, status=400)
            specs.append((item["docId"], options))
        jobs = [self.add_job(doc_id, **options) for doc_id, options in specs]
        return web.json_response({"jobs": [_job_json(j) for j in jobs]}, status=201)

    async def _control_list(self, request: web.Request) -> web.Response:
        return web.json_response({"jobs": [_job_json(j) for j in self.jobs.values()]})

    async def _control_job(self, request: web.Request) -> web.Response:
        job = self.jobs.get(request.match_info["doc_id"])
        if job is None:
            return web.json_response({"error": "unknown job"}, status=404)
        return web.json_response(_job_json(job))

    async def _control_stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.stats())


def _check_job(doc_id: Any, outcome: Any, ready_after: Any, paragraphs: Any) -> None:
    if not isinstance(doc_id, str) or not doc_id:
        raise ValueError("docId must be a non-empty string")
    if outcome not in OUTCOMES:
        raise ValueError(f"outcome must be one of {', '.join(OUTCOMES)}, not {outcome!r}")
    if isinstance(ready_after, bool) or not isinstance(ready_after, int | float) or ready_after < 0:
        raise ValueError(f"ready_after must be a number >= 0, not {ready_after!r}")
    if isinstance(paragraphs, bool) or not isinstance(paragraphs, int) or paragraphs < 0:
        raise ValueError(f"paragraphs must be an integer >= 0, not {paragraphs!r}")


def _pii_headers(job: MockJob) -> dict[str, str]:
    if job.pii_policies is None:
        return {}
    return {"X-PII-Redacted": "true", "X-PII-Policies": ",".join(job.pii_policies)}


def _default_outcome(doc_id: str) -> str:
    if doc_id.startswith("fail"):
        return "failed"
    return "missing" if doc_id.startswith("missing") else "transcribed"


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _paragraph(doc_id: str, i: int) -> dict[str, Any]:
    return {
        "index": i,
        "text": f"Paragraph {i} of {doc_id}.",
        "start": i * 4.0,
        "end": i * 4.0 + 3.5,
    }


def _int_query(request: web.Request, name: str, default: int, *, minimum: int) -> int:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name} must be an integer, not {raw!r}") from None
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}")
    return value


def _job_json(job: MockJob) -> dict[str, Any]:
    return {
        "docId": job.doc_id,
        "outcome": job.outcome,
        "ready_after": job.ready_after,
        "first_seen": job.first_seen,
        "finished_at": job.finished_at,
        "paragraphs": job.paragraphs,
        "fields": job.fields,
        "progress": job.progress,
        "pii_policies": job.pii_policies,
    }


async def serve(
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    window: float = 60.0,
    limit: int = 60,
    ready_after: float = 2.0,
    api_keys: Collection[str] | None = None,
    aitronos_max_age: float = 0,
    clock: Callable[[], float] = time.time,
) -> tuple[MockProvider, web.AppRunner, int]:
    """Start a provider on a TCP site; the caller owns the runner (`await runner.cleanup()`)."""
    provider = MockProvider(
        window=window,
        limit=limit,
        ready_after=ready_after,
        api_keys=api_keys,
        aitronos_max_age=aitronos_max_age,
        clock=clock,
    )
    runner = web.AppRunner(provider.app(), access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except BaseException:
        await runner.cleanup()
        raise
    return provider, runner, int(runner.addresses[0][1])


async def _serve_until_signalled(port: int, window: float, limit: int, ready_after: float) -> None:
    _, runner, bound = await serve(port=port, window=window, limit=limit, ready_after=ready_after)
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
