"""Aitronos: poll `/v1/audio/transcribe/{id}` with ETag revalidation, fetch every paragraph of a
completed transcript, and build the `transcription.*` body of SPEC §4.

Every request (status polls, 304s, each paragraph page) goes through the `Http` the poll loop
gives us, so each one spends the key's budget.
"""

from __future__ import annotations

import logging
import re
from typing import Any
from urllib.parse import quote

from relayd.cadence import hints_from
from relayd.config import ProviderConfig
from relayd.providers.base import (
    Answer,
    Event,
    Finished,
    Http,
    Progress,
    Retryable,
    auth_headers,
    classify,
    log_context,
    snippet,
)
from relayd.store import Job

log = logging.getLogger("relayd.providers.aitronos")

TERMINAL = frozenset({"completed", "failed", "cancelled"})
PAGE = 1000  # the most paragraphs Aitronos returns per page
MAX_PAGES = 10_000  # a transcript that needs more is refused rather than fetched forever
_MAX_AGE = re.compile(r"(?:^|,)\s*max-age\s*=\s*\"?(\d+(?:\.\d+)?)\"?\s*(?:,|$)", re.IGNORECASE)


class NotReady(Exception):
    """Paragraphs answered 409 TRANSCRIPTION_NOT_COMPLETE: the transcript is not there yet."""


def max_age(cache_control: str | None) -> float | None:
    """Seconds from `Cache-Control: max-age=N`, or None."""
    if not cache_control:
        return None
    match = _MAX_AGE.search(cache_control)
    return float(match[1]) if match else None


def _error(answer: Answer) -> dict[str, Any] | None:
    """The `error` object of an error envelope, if the answer is one."""
    try:
        doc = answer.json()
    except Retryable:
        return None
    error = doc.get("error") if isinstance(doc, dict) else None
    return error if isinstance(error, dict) else None


def envelope_error(answer: Answer) -> str:
    """The error envelope's code, message and trace id, for the log; else a body snippet."""
    error = _error(answer) or {}
    parts = [f"{k}={error[k]}" for k in ("code", "message", "trace_id") if error.get(k)]
    return " ".join(parts) if parts else snippet(answer.body)


def check(answer: Answer, what: str) -> None:
    """Raise the matching ProviderError for an answer that is not a 200 or a 304."""
    if answer.status not in (200, 304):
        classify(answer, what, envelope_error)
        raise Retryable(f"HTTP {answer.status} for {what}: {envelope_error(answer)}")


def _data(answer: Answer, what: str, ctx: dict[str, str]) -> dict[str, Any]:
    """The `data` object of a success envelope (a bare object is accepted too, and logged
    with `ctx`)."""
    doc = answer.json()
    if not isinstance(doc, dict):
        raise Retryable(f"answer for {what} is not a JSON object")
    if doc.get("success") is False:
        raise Retryable(f"answer for {what} is an error envelope: {envelope_error(answer)}")
    data = doc.get("data")
    if isinstance(data, dict):
        return data
    if isinstance(doc.get("status"), str) or isinstance(doc.get("paragraphs"), list):
        log.info("aitronos answer without an envelope", extra=ctx)
        return doc
    raise Retryable(f"answer for {what} has no 'data' object")


class AitronosProvider:
    kind = "aitronos"

    def __init__(self, config: ProviderConfig) -> None:
        self.name = config.name
        self._config = config
        self._base = f"{config.base_url}/v1/audio/transcribe"
        self._headers = auth_headers(config.auth_header, config.api_key.value)

    async def poll(self, job: Job, http: Http) -> Progress | Finished:
        url = f"{self._base}/{quote(job.doc_id, safe='')}"
        headers = dict(self._headers)
        if job.etag:
            headers["If-None-Match"] = job.etag
        answer = await http.get(url, headers=headers, prepaid=True)
        check(answer, f"transcription {job.doc_id}")
        wait = max_age(answer.headers.get("Cache-Control"))
        etag = answer.headers.get("ETag")
        if answer.status == 304:  # unchanged since the last full answer: nothing to parse
            return Progress(job.last_status or "unchanged", 304, job.etag, wait)
        data = _data(answer, job.doc_id, log_context(self.name, job))
        status = data.get("status")
        if not isinstance(status, str):
            raise Retryable(f"answer for {job.doc_id} has no 'status' string")
        if data.get("id", job.doc_id) != job.doc_id:  # a cache or proxy mixed up answers
            raise Retryable(f"answer for {job.doc_id} is about id {data['id']!r:.80}")
        hints = hints_from(data.get("type"), data.get("duration_seconds", data.get("duration")))
        if status not in TERMINAL:
            return Progress(status, answer.status, etag, wait, hints)
        pii = _pii(answer)
        if status == "completed":
            try:
                paragraphs, pii = await self._paragraphs(job, http, url, pii)
            except NotReady:
                # keep the old ETag: the next poll must see this answer in full again
                log.info("completed, paragraphs not ready yet", extra=log_context(self.name, job))
                return Progress(status, answer.status, None, wait, hints)
            body = self.completed_body(job, data, paragraphs, pii)
            event = Event("transcription.completed", body)
            return Finished(status, answer.status, data, [event], hints=hints)
        event = Event("transcription.failed", self.failed_body(job, status, data, pii))
        return Finished(status, answer.status, data, [event], succeeded=False, hints=hints)

    async def _paragraphs(
        self, job: Job, http: Http, url: str, pii: dict[str, Any]
    ) -> tuple[list[Any], dict[str, Any]]:
        """Every paragraph in order, one budgeted request per page of up to 1000."""
        paragraphs: list[Any] = []
        total: int | None = None
        for _ in range(MAX_PAGES):
            params = {"limit": str(PAGE), "offset": str(len(paragraphs))}
            answer = await http.get(f"{url}/paragraphs", headers=self._headers, params=params)
            if answer.status == 409:
                code = (_error(answer) or {}).get("code")
                if code not in (None, "TRANSCRIPTION_NOT_COMPLETE"):
                    log.warning(
                        "paragraphs answered 409: %s",
                        envelope_error(answer),
                        extra=log_context(self.name, job),
                    )
                raise NotReady
            check(answer, f"paragraphs of {job.doc_id}")
            data = _data(answer, job.doc_id, log_context(self.name, job))
            page = data.get("paragraphs")
            count = data.get("total_count")
            if not isinstance(page, list) or not isinstance(count, int) or count < 0:
                raise Retryable(
                    f"paragraphs of {job.doc_id}: no 'paragraphs' list or 'total_count'"
                )
            if not all(isinstance(p, dict) and isinstance(p.get("text"), str) for p in page):
                raise Retryable(f"paragraphs of {job.doc_id}: a paragraph without a 'text' string")
            if total is None:
                total = count
            elif count != total:
                raise Retryable(f"paragraphs of {job.doc_id}: total_count changed while paging")
            pii = _pii(answer) or pii
            paragraphs.extend(page)
            if len(paragraphs) >= total:
                return paragraphs[:total], pii
            if not page:
                raise Retryable(
                    f"paragraphs of {job.doc_id}: empty page at offset {len(paragraphs)} of {total}"
                )
        raise Retryable(f"paragraphs of {job.doc_id}: more than {MAX_PAGES} pages")

    def completed_body(
        self, job: Job, data: dict[str, Any], paragraphs: list[Any], pii: dict[str, Any]
    ) -> dict[str, Any]:
        body: dict[str, Any] = {
            "event_type": "transcription.completed",
            "transcription_id": job.doc_id,
            "status": "completed",
            "data": data,
            "paragraphs": paragraphs,
            "text": "\n\n".join(p["text"] for p in paragraphs),
        }
        return self._extras(job, body, pii)

    def failed_body(
        self, job: Job, status: str, data: dict[str, Any], pii: dict[str, Any]
    ) -> dict[str, Any]:
        body = {
            "event_type": "transcription.failed",
            "transcription_id": job.doc_id,
            "status": status,
            "data": data,
        }
        return self._extras(job, body, pii)

    @staticmethod
    def _extras(job: Job, body: dict[str, Any], pii: dict[str, Any]) -> dict[str, Any]:
        body.update(pii)
        if job.metadata:
            body["metadata"] = job.metadata
        return body


def _pii(answer: Answer) -> dict[str, Any]:
    """`X-PII-Redacted` / `X-PII-Policies` as body fields, when the answer carries them."""
    out: dict[str, Any] = {}
    redacted = answer.headers.get("X-PII-Redacted")
    if redacted is not None:
        value = redacted.strip().lower()
        out["pii_redacted"] = value == "true" if value in ("true", "false") else redacted
    policies = answer.headers.get("X-PII-Policies")
    if policies is not None:
        out["pii_policies"] = [p.strip() for p in policies.split(",") if p.strip()]
    return out
