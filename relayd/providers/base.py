"""What the poll loop needs from a provider, and what a provider hands back.

Providers turn one HTTP answer (or a few) into a `Progress` or a `Finished`, or raise one of
the `ProviderError` kinds of `relayd.errors` (`classify` picks it from an HTTP status); they
never see aiohttp. The `Http` they are given spends the key's budget on every request.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from relayd.cadence import Hints
from relayd.errors import NotFound, Retryable, Unauthorized
from relayd.models import Job


@dataclass(frozen=True)
class Answer:
    status: int
    headers: Mapping[str, str]
    body: bytes

    def json(self) -> Any:
        try:
            return json.loads(self.body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise Retryable(f"HTTP {self.status}: body is not JSON ({exc})") from None


class Http(Protocol):
    async def get(
        self,
        url: str,
        *,
        headers: Mapping[str, str] | None = None,
        params: Mapping[str, str] | None = None,
        prepaid: bool = False,
    ) -> Answer:
        """GET within the key's budget. `prepaid`: the caller already holds a slot for it."""
        ...


@dataclass(frozen=True)
class Progress:
    """Not finished yet."""

    status: str
    http_status: int
    etag: str | None = None
    min_interval: float | None = None  # do not poll this job again sooner (Cache-Control)
    hints: Hints = field(default_factory=Hints)  # what the answer says about the media
    # the provider says it is done, but the rest of the result is not there yet (a short race):
    # poll again after `poll_interval`, whatever the adaptive cadence or `min_interval` say
    finishing: bool = False


@dataclass(frozen=True)
class Event:
    name: str
    payload: dict[str, Any]


@dataclass(frozen=True)
class Finished:
    """A terminal status, with the events it produces (one per event type)."""

    status: str
    http_status: int
    result: dict[str, Any]
    events: list[Event] = field(default_factory=list)
    succeeded: bool = True  # False: failed or cancelled (the job ends `failed` if unwanted)
    hints: Hints = field(default_factory=Hints)  # the media; a success teaches how long it took


class Provider(Protocol):
    name: str
    kind: str

    async def poll(self, job: Job, http: Http) -> Progress | Finished:
        """Ask about one job. The first request is prepaid. Raises ProviderError subclasses."""
        ...


def classify(answer: Answer, what: str, detail: Callable[[Answer], str] | None = None) -> None:
    """Raise the matching ProviderError for an answer that is not a usable 2xx/304.

    `detail` says what the provider's error body means (default: a snippet of it, on 5xx)."""
    status = answer.status
    if 200 <= status < 300 or status == 304:
        return
    said = detail(answer) if detail else None
    if status in (401, 403):
        extra = f" ({said})" if said else ""
        raise Unauthorized(f"HTTP {status} for {what}: check the API key{extra}", status)
    if status == 404:
        raise NotFound(f"HTTP 404 for {what}" + (f": {said}" if said else ""))
    raise Retryable(f"HTTP {status} for {what}: {said or snippet(answer.body)}")


def auth_headers(auth_header: str, api_key: str) -> dict[str, str]:
    """`Authorization: Bearer` sends "Bearer KEY" in Authorization; `X-API-Key` the bare KEY."""
    name, _, prefix = auth_header.partition(":")
    prefix = prefix.strip()
    return {name.strip(): f"{prefix} {api_key}" if prefix else api_key}


def log_context(provider: str, job: Job) -> dict[str, str]:
    """The `extra=` of a log line about one job."""
    return {"provider": provider, "job": job.doc_id}


def snippet(body: bytes, limit: int = 200) -> str:
    text = body[:limit].decode("utf-8", "replace").replace("\n", " ")
    return text + ("..." if len(body) > limit else "")
