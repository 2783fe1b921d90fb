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
import hashlib
import itertools
import json
import math
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Collection, Iterable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from email.utils import formatdate
from typing import Any
from urllib.parse import quote

from aiohttp import hdrs, web

OUTCOMES = ("transcribed", "failed", "missing")
DEFAULT_PARAGRAPHS = 3
DEFAULT_DURATION = 125.5  # seconds of audio, as in Aitronos's example
MAX_LIMIT = 1000  # Aitronos paragraphs: `limit` must be 1-1000
# Aitronos's Cache-Control max-age: while queued/processing, and once completed/failed
DOCUMENTED_CACHE_AGES = (5.0, 86400.0)
# In-progress statuses by share of a job's life (the last one runs until it is done)
XOSUM_STAGES = ((0.2, "uploading"), (0.4, "converting"), (1.0, "processing"))
AITRONOS_STAGES = ((0.2, "queued"), (1.0, "processing"))
XOSUM_BASE = ("docId", "status", "createdAt", "type", "duration", "metadata")
AIT_TRANSCRIBE = "/v1/audio/transcribe"

ApiHandler = Callable[[web.Request, float], Awaitable[web.Response]]


@dataclass
class MockJob:
    """One job the mock knows. `fields` override the terminal answer (Xosum body, Aitronos
    `data`); Xosum base fields among them (`type`, `metadata`, ...) hold on every answer."""

    doc_id: str
    outcome: str  # "transcribed" | "failed" | "missing" (404 forever)
    ready_after: float  # seconds after first_seen when it becomes terminal
    first_seen: float  # clock time the job became known (registered or first polled)
    fields: dict[str, Any] = field(default_factory=dict)
    paragraphs: int = DEFAULT_PARAGRAPHS  # Aitronos paragraph count once completed
    progress: dict[str, Any] = field(default_factory=dict)  # extra fields while in progress
    pii_policies: list[str] | None = None  # Aitronos: answer with X-PII-Redacted/-Policies
    duration: float = DEFAULT_DURATION  # the audio's length in seconds
    paragraphs_lag: float = 0.0  # Aitronos: paragraphs answer 409 this long after `completed`
    mixed_up: int = 0  # once finished, this many answers are about another job

    @property
    def finished_at(self) -> float:
        return self.first_seen + self.ready_after

    def stage(self, now: float, stages: tuple[tuple[float, str], ...]) -> tuple[str | None, float]:
        """(the in-progress status at `now`, or None once finished; when that stage began)."""
        if now - self.first_seen >= self.ready_after:
            return None, self.finished_at
        began = self.first_seen
        for end, name in stages:
            until = self.first_seen + end * self.ready_after
            if now < until:
                return name, began
            began = until
        return stages[-1][1], began  # pragma: no cover - the last stage ends at ready_after

    @property
    def media_type(self) -> str:
        """Xosum's `type`: `single_voice`, or `phone_call` for ids that start with "call"."""
        kind = self.fields.get("type")
        if isinstance(kind, str):
            return kind
        return "phone_call" if self.doc_id.startswith("call") else "single_voice"

    def take_mixed_up(self) -> bool:
        """Whether this finished answer is served about another job (and count it)."""
        if self.mixed_up <= 0:
            return False
        self.mixed_up -= 1
        return True

    def someone_else(self) -> MockJob:
        """The finished job whose answer a mixed-up proxy serves instead of this one's."""
        other = "trans_someone_else" if self.doc_id.startswith("trans_") else "someone-else"
        return replace(self, doc_id=other, outcome="transcribed", fields={})


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
        if len(cache_ages) != 2 or min(cache_ages) < 0:
            raise ValueError("cache_ages must be two numbers >= 0")
        self.window = window
        self.limit = limit
        self.ready_after = ready_after
        self.api_keys = None if api_keys is None else frozenset(api_keys)
        self.clock = clock
        self.cache_ages = cache_ages
        self.jobs: dict[str, MockJob] = {}
        self.arrivals: list[tuple[float, str]] = []
        self.rejected = 0
        self.status_counts: collections.Counter[int] = collections.Counter()
        self._windows: dict[str, tuple[int, int]] = {}  # key -> (window index, requests in it)
        self._ids = itertools.count(1)

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
        duration: float = DEFAULT_DURATION,
        paragraphs_lag: float = 0.0,
        mixed_up: int = 0,
        **fields: Any,
    ) -> MockJob:
        """Register (or re-register) a job now; `fields` override its terminal answer and
        `progress` adds fields to its in-progress answers (e.g. the audio's `duration`)."""
        ready = self.ready_after if ready_after is None else ready_after
        options = {"duration": duration, "paragraphs_lag": paragraphs_lag, "mixed_up": mixed_up}
        _check_job(doc_id, outcome, ready, paragraphs, options)
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
                response = self._ait_error(
                    now, 429, "RATE_LIMIT_EXCEEDED", "Rate limit exceeded", {"retry_after": wait}
                )
            else:
                response = web.json_response({"error": "rate limited"}, status=429)
            response.headers[hdrs.RETRY_AFTER] = str(wait)
            return response
        scheme, _, token = key.partition(" ")
        if self.api_keys is not None and (scheme.lower() != "bearer" or token not in self.api_keys):
            if envelope:
                return self._ait_error(now, 401, "UNAUTHORIZED", "Invalid API key", {})
            return web.json_response({"error": "unauthorized"}, status=401)
        return None

    # -- Xosum -----------------------------------------------------------------------------------

    async def _xosum(self, request: web.Request, now: float) -> web.Response:
        doc_id = request.query.get("docId", "")
        if not doc_id:
            return web.json_response({"error": "docId is required"}, status=400)
        job = self._job(doc_id, now)
        if job.outcome == "missing":
            return web.json_response({"error": "document not found"}, status=404)
        status, _ = job.stage(now, XOSUM_STAGES)
        if status is None and job.take_mixed_up():
            job = job.someone_else()
        return web.json_response(_xosum_answer(job, status))

    # -- Aitronos --------------------------------------------------------------------------------

    async def _ait_status(self, request: web.Request, now: float) -> web.Response:
        job = self._job(request.match_info["id"], now)
        if job.outcome == "missing":
            return self._ait_not_found(now, job.doc_id)
        status, since = job.stage(now, AITRONOS_STAGES)
        if status is None and job.take_mixed_up():
            job = job.someone_else()
        status = status or ("completed" if job.outcome == "transcribed" else "failed")
        data: dict[str, Any] = {
            "transcription_id": job.doc_id,
            "status": status,
            "model_key": "fvt-1",
            "audio_metadata": {
                "url": f"https://storage.example.com/{quote(job.doc_id, safe='')}.mp3",
                "duration_seconds": job.duration,
                "language_code": "en",
            },
            "timestamps": {"created_at": _iso(job.first_seen), "updated_at": _iso(since)},
        }
        if status == "completed":
            data["timestamps"] |= {
                "completed_at": _iso(since),
                "processing_time_seconds": float(round(job.ready_after, 1)),
            }
        if status in ("completed", "failed"):
            data |= job.fields
        consumed = math.ceil(job.duration)
        billing = {
            "synapses_consumed": consumed,
            "synapses_refunded": consumed if status == "failed" else 0,
            "currency": "synapses",
        }
        # only the documented final statuses are cached for long (a test may override `status`)
        active = data["status"] not in ("completed", "failed")
        link = self._ait_link(request, job.doc_id)
        actions = {"check_status": link}
        if status == "completed":
            actions |= _format_links(link)
            actions["search"] = f"{link}/search"
            if job.pii_policies is not None:
                actions["redacted_audio"] = f"{link}/redacted-audio"
        # Like the service: a status still in progress is refreshed upstream (the examples'
        # `upstream_refreshed`), a finished one is served as stored.
        metadata = self._status_metadata(now, refreshed=active)
        return self._cacheable(
            request,
            {"success": True, "data": data, "billing": billing, "metadata": metadata},
            actions,
            identity=(data, billing),
            max_age=self.cache_ages[0 if active else 1],
            modified=since,
            extra=_pii_headers(job),
        )

    async def _ait_paragraphs(self, request: web.Request, now: float) -> web.Response:
        job = self._job(request.match_info["id"], now)
        if job.outcome == "missing":
            return self._ait_not_found(now, job.doc_id)
        try:
            limit = _int_query(request, "limit", 1, MAX_LIMIT)
            offset = _int_query(request, "offset", 0, None) or 0
        except ValueError as exc:
            name, _, problem = str(exc).partition(":")
            return self._ait_error(
                now, 422, "VALIDATION_ERROR", problem.strip(), {"parameter": name}
            )
        status, _ = job.stage(now, AITRONOS_STAGES)
        if job.outcome != "transcribed" or now < job.finished_at + job.paragraphs_lag:
            current = status or ("failed" if job.outcome == "failed" else "processing")
            return self._ait_error(
                now,
                409,
                "TRANSCRIPTION_NOT_COMPLETE",
                "Transcription is not completed yet",
                {"transcription_id": job.doc_id, "current_status": current},
            )
        total = job.paragraphs
        stop = total if limit is None else min(offset + limit, total)
        items = [_paragraph(job.doc_id, i) for i in range(offset, stop)]
        data = {
            "transcription_id": job.doc_id,
            "audio_duration_seconds": job.duration,
            "paragraphs": items,
            "billing": None,
        }
        metadata = {
            "request_id": self._request_id(),
            "timestamp": _iso(now),
            "processing_time_ms": 120,
            "upstream_latency_ms": 95,
            "retry_attempts": 0,
            "cache_hit": False,
            "total_count": total,
            "returned_count": len(items),
        }
        link = self._ait_link(request, job.doc_id)
        actions = _format_links(link)
        actions.pop("get_paragraphs", None)
        page = limit if limit is not None else max(offset, 1)
        if stop < total:
            actions["next"] = f"{link}/paragraphs?limit={page}&offset={stop}"
        if offset > 0:
            actions["previous"] = f"{link}/paragraphs?limit={page}&offset={max(0, offset - page)}"
        return self._cacheable(
            request,
            {"success": True, "data": data, "metadata": metadata},
            actions,
            identity=data,
            max_age=self.cache_ages[1],  # completed paragraphs are immutable
            modified=job.finished_at,
            extra=_pii_headers(job),
        )

    def _ait_link(self, request: web.Request, doc_id: str) -> str:
        return f"{request.scheme}://{request.host}{AIT_TRANSCRIBE}/{quote(doc_id, safe='')}"

    def _status_metadata(self, now: float, *, refreshed: bool) -> dict[str, Any]:
        """A status answer's request metadata, keys in the documented order."""
        metadata: dict[str, Any] = {
            "request_id": self._request_id(),
            "timestamp": _iso(now),
            "processing_time_ms": 1250 if refreshed else 52,
            "upstream_refreshed": refreshed,
        }
        if refreshed:
            metadata |= {"upstream_latency_ms": 1200, "retry_attempts": 0}
        return metadata

    def _request_id(self) -> str:
        return f"req_{next(self._ids):032x}"

    def _cacheable(
        self,
        request: web.Request,
        envelope: dict[str, Any],
        actions: dict[str, str],
        *,
        identity: Any,
        max_age: float,
        modified: float,
        extra: dict[str, str],
    ) -> web.Response:
        """A success envelope with ETag, Last-Modified and Cache-Control; 304 when If-None-Match
        matches. The ETag is the resource's (`identity`), not the request metadata's."""
        canonical = json.dumps(identity, sort_keys=True, separators=(",", ":"))
        etag = '"' + hashlib.sha256(canonical.encode()).hexdigest()[:24] + '"'
        age = int(max_age) if float(max_age).is_integer() else max_age
        headers = {
            hdrs.ETAG: etag,
            hdrs.LAST_MODIFIED: formatdate(modified, usegmt=True),
            hdrs.CACHE_CONTROL: f"public, max-age={age}",
            **extra,
        }
        candidates = {
            c.strip().removeprefix("W/")
            for c in request.headers.get(hdrs.IF_NONE_MATCH, "").split(",")
        }
        if etag in candidates or "*" in candidates:
            return web.Response(status=304, headers=headers)
        return web.json_response(envelope | {"actions": actions}, headers=headers)

    def _ait_not_found(self, now: float, doc_id: str) -> web.Response:
        return self._ait_error(
            now, 404, "NOT_FOUND", "Transcription not found", {"transcription_id": doc_id}
        )

    def _ait_error(
        self, now: float, status: int, code: str, system_message: str, details: dict[str, Any]
    ) -> web.Response:
        """Aitronos's documented error envelope."""
        error = {
            "code": code,
            "message": _MESSAGES.get(code, system_message),
            "system_message": system_message,
            "type": "client_error" if status < 500 else "server_error",
            "status": status,
            "details": details,
            "trace_id": f"mock-{next(self._ids):06d}",
            "timestamp": _iso(now),
        }
        return web.json_response({"success": False, "error": error}, status=status)

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
                    options,
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


_MESSAGES = {  # the user-facing `message` of Aitronos's error envelopes
    "NOT_FOUND": "We couldn't find the resource you're looking for.",
    "TRANSCRIPTION_NOT_COMPLETE": "This transcription is still being processed.",
    "VALIDATION_ERROR": "The request is not valid.",
    "RATE_LIMIT_EXCEEDED": "Too many requests. Please slow down.",
    "UNAUTHORIZED": "Authentication failed.",
}


def _xosum_answer(job: MockJob, status: str | None) -> dict[str, Any]:
    """Xosum's answer: the base fields always (`duration` once the upload is in), the
    transcript fields once `transcribed`, `error` once `failed`."""
    answer: dict[str, Any] = {
        "docId": job.doc_id,
        "status": status or job.outcome,
        "createdAt": _iso(job.first_seen),
        "type": job.media_type,
        "duration": None if status == "uploading" else job.duration,
        "metadata": {},
    }
    answer |= {k: v for k, v in job.fields.items() if k in XOSUM_BASE and k != "status"}
    if status is not None:
        return answer | job.progress
    if job.outcome == "failed":
        answer["error"] = "The audio could not be decoded."
    else:
        answer |= {
            "transcription": _xosum_text(job),
            "title": f"Ձայնագրություն {job.doc_id}",
            "resolution": (
                f"Ձայնագրությունում ({job.doc_id}) խոսնակը ներկայացնում է օրվա աշխատանքը, "
                "նշում է հաջորդ քայլերը և ամփոփում է քննարկումը։"
            ),
            "languageCode": "hy-AM",
        }
    return answer | job.fields


def _xosum_text(job: MockJob) -> str:
    """Plain text for `single_voice`; a `phone_call` is diarized with Xosum's speaker labels."""
    if job.media_type == "phone_call":
        return (
            f"Խոսնակ 1: Բարև ձեզ, զանգում եմ {job.doc_id} հայտի մասին։\n"
            "Խոսնակ 2: Բարև, լսում եմ ձեզ։\n"
            "Խոսնակ 1: Շնորհակալություն, ցտեսություն։"
        )
    return f"Սա {job.doc_id} ձայնագրության փորձնական վերծանումն է։"


def _format_links(link: str) -> dict[str, str]:
    """Aitronos's links to the other formats of a completed transcript, in its order."""
    return {
        "get_paragraphs": f"{link}/paragraphs",
        "get_sentences": f"{link}/sentences",
        "get_subtitles_srt": f"{link}/subtitles/srt",
        "get_subtitles_vtt": f"{link}/subtitles/vtt",
        "get_subtitles_txt": f"{link}/subtitles/txt",
    }


def _check_job(
    doc_id: Any, outcome: Any, ready_after: Any, paragraphs: Any, options: dict[str, Any]
) -> None:
    if not isinstance(doc_id, str) or not doc_id:
        raise ValueError("docId must be a non-empty string")
    if outcome not in OUTCOMES:
        raise ValueError(f"outcome must be one of {', '.join(OUTCOMES)}, not {outcome!r}")
    if not _number(ready_after):
        raise ValueError(f"ready_after must be a number >= 0, not {ready_after!r}")
    if isinstance(paragraphs, bool) or not isinstance(paragraphs, int) or paragraphs < 0:
        raise ValueError(f"paragraphs must be an integer >= 0, not {paragraphs!r}")
    duration = options.get("duration", DEFAULT_DURATION)
    if not _number(duration) or duration == 0:
        raise ValueError(f"duration must be a number > 0, not {duration!r}")
    if not _number(options.get("paragraphs_lag", 0)):
        raise ValueError(f"paragraphs_lag must be a number >= 0, not {options['paragraphs_lag']!r}")
    mixed = options.get("mixed_up", 0)
    if isinstance(mixed, bool) or not isinstance(mixed, int) or mixed < 0:
        raise ValueError(f"mixed_up must be an integer >= 0, not {mixed!r}")


def _number(value: Any) -> bool:
    """A finite number >= 0."""
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value >= 0
    )


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
    return {"text": f"Paragraph {i} of {doc_id}.", "start": i * 4.0 + 0.5, "end": i * 4.0 + 3.5}


def _int_query(request: web.Request, name: str, low: int, high: int | None) -> int | None:
    """An integer query parameter in [low, high], or None when absent."""
    raw = request.query.get(name)
    if raw is None:
        return None
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name}: {name} must be an integer, not {raw[:40]!r}") from None
    if value < low or (high is not None and value > high):
        bounds = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise ValueError(f"{name}: {name} must be {bounds}")
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
        "duration": job.duration,
        "paragraphs_lag": job.paragraphs_lag,
        "mixed_up": job.mixed_up,
    }


def scaled_cache_ages(window: float) -> tuple[float, float]:
    """Aitronos's documented max-age values, compressed like a `window` of less than 60 s."""
    scale = window / 60.0
    return (DOCUMENTED_CACHE_AGES[0] * scale, DOCUMENTED_CACHE_AGES[1] * scale)


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
    runner = web.AppRunner(provider.app(), access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except BaseException:
        await runner.cleanup()
        raise
    return provider, runner, int(runner.addresses[0][1])


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
