"""A scripted transport for provider tests: the providers' documented answers (the fixtures in
`tests/fixtures/providers/`) fed straight to a provider's `poll`, every request recorded."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from relayd.config import ProviderConfig, parse_config
from relayd.models import Job, JobState
from relayd.providers.base import Answer

FIXTURES = Path(__file__).parent / "fixtures" / "providers"
API_KEY = "contract-test-key-0001"
WEBHOOK_SECRET = "contract-webhook-secret"


def fixture_bytes(name: str) -> bytes:
    """A fixture file exactly as stored (the documents' JSON, byte for byte)."""
    return (FIXTURES / name).read_bytes().rstrip(b"\n")


def fixture(name: str) -> Any:
    return json.loads(fixture_bytes(name))


def answer(
    body: bytes | Any, status: int = 200, headers: Mapping[str, str] | None = None
) -> Answer:
    """An answer with `body` (bytes as they are; anything else as JSON)."""
    raw = body if isinstance(body, bytes) else json.dumps(body, ensure_ascii=False).encode()
    return Answer(status, dict(headers or {}), raw)


@dataclass(frozen=True)
class Sent:
    url: str
    headers: dict[str, str]
    params: dict[str, str]
    prepaid: bool


Reply = Answer | Callable[[Sent], Answer]


class ScriptedHttp:
    """The `Http` a provider is given, answering each request with the next reply of the script
    (an Answer, or a function of the request); a request past the end of the script fails."""

    def __init__(self, *replies: Reply) -> None:
        self.replies = list(replies)
        self.sent: list[Sent] = []

    async def get(
        self,
        url: str,
        *,
        headers: Mapping[str, str] | None = None,
        params: Mapping[str, str] | None = None,
        prepaid: bool = False,
    ) -> Answer:
        sent = Sent(url, dict(headers or {}), dict(params or {}), prepaid)
        self.sent.append(sent)
        assert self.replies, f"a request the script did not expect: {sent}"
        reply = self.replies.pop(0)
        return reply(sent) if callable(reply) else reply


def provider_config(kind: str, **overrides: Any) -> ProviderConfig:
    """The provider table `main` of a minimal config of this kind."""
    table: dict[str, Any] = {
        "kind": kind,
        "api_key": "env:KEY",
        "webhook_secret": "env:SECRET",
        "endpoints": ["app"],
    }
    if kind == "xosum":
        table["base_url"] = "https://app.xosum.am"
    table.update(overrides)
    data = {
        "relayd": {"state_dir": "state", "spool_dir": "spool", "socket": "", "http": ""},
        "providers": {"main": table},
        "endpoints": {"app": {"url": "http://127.0.0.1:8080/hook"}},
    }
    config = parse_config(
        data, base_dir=Path("/nonexistent"), env={"KEY": API_KEY, "SECRET": WEBHOOK_SECRET}
    )
    return config.providers["main"]


def job(doc_id: str, **fields: Any) -> Job:
    """A job being polled, as the store would hand it to a provider."""
    values: dict[str, Any] = {
        "id": 1,
        "provider": "main",
        "doc_id": doc_id,
        "state": JobState.POLLING,
        "metadata": None,
        "endpoints": None,
        "source": "api",
        "submitted_at": 1_000.0,
        "next_poll_at": 1_000.0,
        "polls": 0,
        "errors": 0,
        "not_found": 0,
        "last_status": None,
        "etag": None,
        "result_status": None,
        "finished_at": None,
        "updated_at": 1_000.0,
    }
    values.update(fields)
    return Job(**values)
