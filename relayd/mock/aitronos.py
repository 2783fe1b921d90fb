"""The mock's Aitronos: the status and paragraphs routes in the documented envelopes, with ETag,
Last-Modified and Cache-Control (`shared/providers/aitronos-*.txt`)."""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from email.utils import formatdate
from typing import Any
from urllib.parse import quote

from aiohttp import hdrs, web

from relayd.mock.jobs import MockJob, iso

MAX_LIMIT = 1000  # Aitronos paragraphs: `limit` must be 1-1000
# Aitronos's Cache-Control max-age: while queued/processing, and once completed/failed
DOCUMENTED_CACHE_AGES = (5.0, 86400.0)
STAGES = ((0.2, "queued"), (1.0, "processing"))
AIT_TRANSCRIBE = "/v1/audio/transcribe"


class Aitronos:
    """Answers for the two routes; the caller has found the job (and counted the request)."""

    def __init__(self, cache_ages: tuple[float, float] = DOCUMENTED_CACHE_AGES) -> None:
        if min(cache_ages) < 0:
            raise ValueError("cache_ages must be >= 0")
        self.cache_ages = cache_ages
        self._ids = itertools.count(1)

    def status(self, request: web.Request, job: MockJob, now: float) -> web.Response:
        """GET /v1/audio/transcribe/{id}."""
        if job.outcome == "missing":
            return self.not_found(now, job.doc_id)
        status, since = job.stage(now, STAGES)
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
            "timestamps": {"created_at": iso(job.first_seen), "updated_at": iso(since)},
        }
        if status == "completed":
            data["timestamps"] |= {
                "completed_at": iso(since),
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
        link = self._link(request, job.doc_id)
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

    def paragraphs(self, request: web.Request, job: MockJob, now: float) -> web.Response:
        """GET /v1/audio/transcribe/{id}/paragraphs."""
        if job.outcome == "missing":
            return self.not_found(now, job.doc_id)
        try:
            limit = _int_query(request, "limit", 1, MAX_LIMIT)
            offset = _int_query(request, "offset", 0, None) or 0
        except ValueError as exc:
            name, _, problem = str(exc).partition(":")
            return self.error(now, 422, "VALIDATION_ERROR", problem.strip(), {"parameter": name})
        status, _ = job.stage(now, STAGES)
        if job.outcome != "transcribed" or now < job.finished_at + job.paragraphs_lag:
            current = status or ("failed" if job.outcome == "failed" else "processing")
            return self.error(
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
            "timestamp": iso(now),
            "processing_time_ms": 120,
            "upstream_latency_ms": 95,
            "retry_attempts": 0,
            "cache_hit": False,
            "total_count": total,
            "returned_count": len(items),
        }
        link = self._link(request, job.doc_id)
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

    def _link(self, request: web.Request, doc_id: str) -> str:
        return f"{request.scheme}://{request.host}{AIT_TRANSCRIBE}/{quote(doc_id, safe='')}"

    def _status_metadata(self, now: float, *, refreshed: bool) -> dict[str, Any]:
        """A status answer's request metadata, keys in the documented order."""
        metadata: dict[str, Any] = {
            "request_id": self._request_id(),
            "timestamp": iso(now),
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

    def not_found(self, now: float, doc_id: str) -> web.Response:
        return self.error(
            now, 404, "NOT_FOUND", "Transcription not found", {"transcription_id": doc_id}
        )

    def error(
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
            "timestamp": iso(now),
        }
        return web.json_response({"success": False, "error": error}, status=status)


_MESSAGES = {  # the user-facing `message` of Aitronos's error envelopes
    "NOT_FOUND": "We couldn't find the resource you're looking for.",
    "TRANSCRIPTION_NOT_COMPLETE": "This transcription is still being processed.",
    "VALIDATION_ERROR": "The request is not valid.",
    "RATE_LIMIT_EXCEEDED": "Too many requests. Please slow down.",
    "UNAUTHORIZED": "Authentication failed.",
}


def _format_links(link: str) -> dict[str, str]:
    """Aitronos's links to the other formats of a completed transcript, in its order."""
    return {
        "get_paragraphs": f"{link}/paragraphs",
        "get_sentences": f"{link}/sentences",
        "get_subtitles_srt": f"{link}/subtitles/srt",
        "get_subtitles_vtt": f"{link}/subtitles/vtt",
        "get_subtitles_txt": f"{link}/subtitles/txt",
    }


def _pii_headers(job: MockJob) -> dict[str, str]:
    if job.pii_policies is None:
        return {}
    return {"X-PII-Redacted": "true", "X-PII-Policies": ",".join(job.pii_policies)}


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


def scaled_cache_ages(window: float) -> tuple[float, float]:
    """Aitronos's documented max-age values, compressed like a `window` of less than 60 s."""
    scale = window / 60.0
    return (DOCUMENTED_CACHE_AGES[0] * scale, DOCUMENTED_CACHE_AGES[1] * scale)
