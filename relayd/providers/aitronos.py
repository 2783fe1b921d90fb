"""Aitronos: poll `/v1/audio/transcribe/{id}` with ETag revalidation, fetch every paragraph of a
completed transcript, and build the `transcription.*` body of SPEC §4.

Shapes are Aitronos's published ones (`shared/providers/aitronos-*.txt`, copied into
`tests/fixtures/providers/`): every answer is an envelope of `success`, `data`, `billing`,
`metadata` and `actions`; the paragraph counts sit in `metadata`, not in `data`. Every request
(status polls, 304s, each paragraph page) goes through the `Http` the poll loop gives us, so each
one spends the key's budget.
"""

from __future__ import annotations

import logging
import re
from typing import Any
from urllib.parse import quote

from relayd.cadence import Hints, hints_from
from relayd.config import ProviderConfig
from relayd.errors import NotReady, ProviderError, Retryable
from relayd.models import Job
from relayd.providers.base import (
    Answer,
    Event,
    Finished,
    Http,
    Progress,
    auth_headers,
    classify,
    log_context,
    snippet,
)

log = logging.getLogger("relayd.providers.aitronos")

# The documented statuses are `queued`, `processing` (not yet), `completed` and `failed`; any
# other value is not yet, as SPEC §4 says of every provider.
TERMINAL = frozenset({"completed", "failed"})
PAGE = 1000  # the largest `limit` the paragraphs route takes
MAX_PAGES = 10_000  # a transcript that needs more is refused rather than fetched forever
_MAX_AGE = re.compile(r"(?:^|,)\s*max-age\s*=\s*\"?(\d+(?:\.\d+)?)\"?\s*(?:,|$)", re.IGNORECASE)


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


def _envelope(answer: Answer, what: str, doc_id: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the envelope, its `data`) of a success envelope about `doc_id`; anything else is a
    failed poll, and so is an answer whose `data.transcription_id` names another job (a cache
    or proxy that mixed up answers)."""
    doc = answer.json()
    if not isinstance(doc, dict):
        raise Retryable(f"answer for {what} is not a JSON object")
    if doc.get("success") is not True:
        raise Retryable(f"answer for {what} is not a success envelope: {envelope_error(answer)}")
    data = doc.get("data")
    if not isinstance(data, dict):
        raise Retryable(f"answer for {what} has no 'data' object")
    if data.get("transcription_id") != doc_id:
        raise Retryable(
            f"answer for {what} is about transcription_id {data.get('transcription_id')!r:.80}"
        )
    return doc, data


def _hints(data: dict[str, Any]) -> Hints:
    """The model (Aitronos's kind of job) and the media length the adaptive cadence learns from."""
    audio = data.get("audio_metadata")
    seconds = audio.get("duration_seconds") if isinstance(audio, dict) else None
    return hints_from(data.get("model_key"), seconds)


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
        # After a `completed` whose paragraphs were not ready, the full answer is needed again
        # (its `data` goes into the body): a 304 would say nothing new.
        if job.etag and job.last_status not in TERMINAL:
            headers["If-None-Match"] = job.etag
        answer = await http.get(url, headers=headers, prepaid=True)
        check(answer, f"transcription {job.doc_id}")
        wait = max_age(answer.headers.get("Cache-Control"))
        etag = answer.headers.get("ETag")
        if answer.status == 304:  # unchanged since the last full answer: nothing to parse
            return Progress(job.last_status or "unchanged", 304, job.etag, wait)
        envelope, data = _envelope(answer, job.doc_id, job.doc_id)
        status = data.get("status")
        if not isinstance(status, str):
            raise Retryable(f"answer for {job.doc_id} has no 'status' string")
        hints = _hints(data)
        if status not in TERMINAL:
            return Progress(status, answer.status, etag, wait, hints)
        pii = _pii(answer)
        billing = envelope.get("billing")
        if status == "failed":
            body = self.failed_body(job, data, billing, pii)
            event = Event("transcription.failed", body)
            return Finished(status, answer.status, data, [event], succeeded=False, hints=hints)
        try:
            paragraphs, pii = await self._paragraphs(job, http, url, pii)
        except NotReady as exc:
            # A short race: the status is ahead of the paragraphs. Poll again within about
            # poll_interval, not after the completed answer's max-age (a day).
            log.info(
                "completed, paragraphs not ready yet (%s)", exc, extra=log_context(self.name, job)
            )
            return Progress(status, answer.status, etag, None, hints, finishing=True)
        except ProviderError as exc:
            exc.status = status  # the job's history shows `completed`, not the status before
            raise
        body = self.completed_body(job, data, paragraphs, billing, pii)
        event = Event("transcription.completed", body)
        return Finished(status, answer.status, data, [event], hints=hints)

    async def _paragraphs(
        self, job: Job, http: Http, url: str, pii: dict[str, Any]
    ) -> tuple[list[Any], dict[str, Any]]:
        """Every paragraph in order, one budgeted request per page of up to 1000.

        Pages are asked for at relayd's own count of paragraphs in hand, never by following
        `actions.next`: the documented example returns 2 of `total_count` 8 and links `next`
        at offset 10, which would skip paragraphs 2-9. The transcript is complete when the
        paragraphs in hand are exactly `metadata.total_count`; an answer that contradicts
        itself or an earlier page is a failed poll, so a partial transcript is never delivered.
        """
        paragraphs: list[Any] = []
        total: int | None = None
        what = f"paragraphs of {job.doc_id}"
        for _ in range(MAX_PAGES):
            params = {"limit": str(PAGE), "offset": str(len(paragraphs))}
            answer = await http.get(f"{url}/paragraphs", headers=self._headers, params=params)
            if answer.status == 409:
                raise NotReady(self._not_ready(job, answer))
            check(answer, what)
            if answer.status != 200:  # relayd sent no If-None-Match: a 304 is not an answer
                raise Retryable(f"HTTP {answer.status} for {what}")
            envelope, data = _envelope(answer, what, job.doc_id)
            page = data.get("paragraphs")
            meta = envelope.get("metadata")
            count: Any = meta.get("total_count") if isinstance(meta, dict) else None
            if not isinstance(page, list) or not _count(count):
                raise Retryable(f"{what}: no 'data.paragraphs' list or 'metadata.total_count'")
            if not all(isinstance(p, dict) and isinstance(p.get("text"), str) for p in page):
                raise Retryable(f"{what}: a paragraph without a 'text' string")
            returned = meta.get("returned_count") if isinstance(meta, dict) else None
            if returned is not None and returned != len(page):
                raise Retryable(f"{what}: returned_count {returned!r:.20} but {len(page)} given")
            if total is not None and count != total:
                raise Retryable(f"{what}: total_count changed while paging")
            total = count
            pii = _pii(answer) or pii
            paragraphs.extend(page)
            if len(paragraphs) == count:
                return paragraphs, pii
            if len(paragraphs) > count:
                raise Retryable(f"{what}: {len(paragraphs)} paragraphs, total_count {count}")
            if not page:
                raise Retryable(f"{what}: empty page at offset {len(paragraphs)} of {count}")
        raise Retryable(f"{what}: more than {MAX_PAGES} pages")

    def _not_ready(self, job: Job, answer: Answer) -> str:
        """What a 409 from the paragraphs route said; an unexpected code is logged loudly."""
        error = _error(answer) or {}
        if error.get("code") not in (None, "TRANSCRIPTION_NOT_COMPLETE"):
            log.warning(
                "paragraphs answered 409: %s",
                envelope_error(answer),
                extra=log_context(self.name, job),
            )
        details = error.get("details")
        current = details.get("current_status") if isinstance(details, dict) else None
        return f"current_status {current!r:.40}" if current is not None else "409"

    def completed_body(
        self,
        job: Job,
        data: dict[str, Any],
        paragraphs: list[Any],
        billing: Any,
        pii: dict[str, Any],
    ) -> dict[str, Any]:
        body: dict[str, Any] = {
            "event_type": "transcription.completed",
            "transcription_id": job.doc_id,
            "status": "completed",
            "data": data,
            "paragraphs": paragraphs,
            "text": "\n\n".join(p["text"] for p in paragraphs),
        }
        return self._extras(job, body, billing, pii)

    def failed_body(
        self, job: Job, data: dict[str, Any], billing: Any, pii: dict[str, Any]
    ) -> dict[str, Any]:
        body = {
            "event_type": "transcription.failed",
            "transcription_id": job.doc_id,
            "status": "failed",
            "data": data,
        }
        return self._extras(job, body, billing, pii)

    @staticmethod
    def _extras(
        job: Job, body: dict[str, Any], billing: Any, pii: dict[str, Any]
    ) -> dict[str, Any]:
        if billing is not None:
            body["billing"] = billing
        body.update(pii)
        if job.metadata:
            body["metadata"] = job.metadata
        return body


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


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
