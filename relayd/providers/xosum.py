"""Xosum: poll `getTranscription` and rebuild the body of Xosum's own webhook from the answer.

The answer is Xosum's published one (`shared/providers/xosum-get-transcription.txt`): the base
fields `docId`, `status`, `createdAt`, `type` (`single_voice` | `phone_call`), `duration` and
`metadata` on every answer; `transcription`, `title`, `resolution`, `languageCode` once
`transcribed`; `error` once `failed`. Statuses other than those two (`uploading`, `processing`,
`converting`, or anything new) mean "not yet".
"""

from __future__ import annotations

from typing import Any

from relayd.cadence import hints_from
from relayd.config import ProviderConfig
from relayd.errors import Retryable
from relayd.models import Job
from relayd.providers.base import Event, Finished, Http, Progress, auth_headers, classify

TERMINAL = frozenset({"transcribed", "failed"})
EXTRA_FIELDS = ("languageCode", "type", "duration", "createdAt")


class XosumProvider:
    kind = "xosum"

    def __init__(self, config: ProviderConfig) -> None:
        self.name = config.name
        self._config = config
        self._url = f"{config.base_url}/api/getTranscription"
        self._headers = auth_headers(config.auth_header, config.api_key.value)

    async def poll(self, job: Job, http: Http) -> Progress | Finished:
        answer = await http.get(
            self._url, params={"docId": job.doc_id}, headers=self._headers, prepaid=True
        )
        classify(answer, f"docId {job.doc_id}")
        doc = answer.json()
        if not isinstance(doc, dict) or not isinstance(doc.get("status"), str):
            raise Retryable(f"answer for {job.doc_id} has no 'status' string")
        if doc.get("docId") != job.doc_id:  # every answer names its job; a mixed-up answer
            raise Retryable(f"answer for {job.doc_id} is about docId {doc.get('docId')!r:.80}")
        status: str = doc["status"]
        hints = hints_from(doc.get("type"), doc.get("duration"))
        if status not in TERMINAL:
            return Progress(status=status, http_status=answer.status, hints=hints)
        if status == "transcribed":
            if not isinstance(doc.get("transcription"), str):
                raise Retryable(f"answer for {job.doc_id} says transcribed with no transcript text")
            event = Event("transcript_ready", self.ready_body(job, doc))
            return Finished(status, answer.status, doc, [event], hints=hints)
        event = Event("transcript_failed", self.failed_body(job, doc))
        return Finished(status, answer.status, doc, [event], succeeded=False, hints=hints)

    def _common(self, job: Job, event_type: str, doc: dict[str, Any]) -> dict[str, Any]:
        secret = self._config.webhook_secret
        metadata = doc.get("metadata")
        if job.metadata:
            metadata = {**(metadata if isinstance(metadata, dict) else {}), **job.metadata}
        return {
            "event_type": event_type,
            "secret": secret.value if secret is not None else None,
            "docId": job.doc_id,
            "metadata": metadata,
        }

    def ready_body(self, job: Job, doc: dict[str, Any]) -> dict[str, Any]:
        """The fields of Xosum's `transcript_ready` webhook, then the poll's extras as they came."""
        common = self._common(job, "transcript_ready", doc)
        template = self._config.link_template
        body: dict[str, Any] = {
            "event_type": common["event_type"],
            "secret": common["secret"],
            "docId": common["docId"],
            "transcription": doc.get("transcription"),
            "metadata": common["metadata"],
            "title": doc.get("title"),
            "resolution": doc.get("resolution"),
            "link": template.replace("{docId}", job.doc_id) if template else None,
        }
        body.update((k, doc[k]) for k in EXTRA_FIELDS if k in doc)
        return body

    def failed_body(self, job: Job, doc: dict[str, Any]) -> dict[str, Any]:
        body = self._common(job, "transcript_failed", doc)
        body["error"] = doc.get("error")
        body.update((k, doc[k]) for k in ("type", "createdAt") if k in doc)
        return body
