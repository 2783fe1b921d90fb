"""A Python client for relayd's API (SPEC §7, "API description and client"; the API itself is
described by GET /v1/openapi.json).

    from relayd.client import Client

    with Client("/etc/relayd/relayd.toml") as relayd:
        relayd.submit(["doc-123"], provider="xosum")
        print(relayd.job("xosum", "doc-123")["job"]["state"])

`Client` is synchronous and needs nothing beyond the standard library (`http.client`, over the
unix socket or TCP); `AsyncClient` has the same methods as coroutines, on aiohttp. Where to
connect: `socket=` (a unix socket path) or `url=` (http://host:port, with `token=` when the
relay has an `api_token`), else what the config file at `config_path` says (its `socket`, or
its `http` listener and `api_token`). Every error answer raises `RelaydError` with the API's
message and the HTTP status; a relay that cannot be reached raises it with status None.
"""

from __future__ import annotations

import http.client
import json
import socket as socketlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

__all__ = ["AsyncClient", "Client", "RelaydError"]

TIMEOUT = 30.0  # seconds for one call


class RelaydError(Exception):
    """An answer that was not a success, or no answer. `status`: the HTTP status (None: relayd
    could not be reached); `message`: what the API said is wrong."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message if status is None else f"{status}: {message}")
        self.message = message
        self.status = status


@dataclass(frozen=True)
class Target:
    """Where the API is: a unix socket, or host and port; and the token to send."""

    socket: str | None
    host: str
    port: int
    token: str | None

    @classmethod
    def of(
        cls,
        config_path: str | Path | None,
        socket: str | Path | None,
        url: str | None,
        token: str | None,
    ) -> Target:
        if socket is not None:
            return cls(str(socket), "relayd", 80, token)
        if url is not None:
            parts = urlsplit(url)
            if parts.scheme != "http" or not parts.hostname:
                raise ValueError(f"url: expected http://host:port, got {url!r}")
            return cls(None, parts.hostname, parts.port or 80, token)
        if config_path is None:
            raise ValueError("say where relayd is: config_path, socket= or url=")
        from relayd.config import load_config

        settings = load_config(Path(config_path)).settings
        if token is None and settings.api_token is not None:
            token = settings.api_token.value
        if settings.socket is not None:
            return cls(str(settings.socket), "relayd", 80, token)
        if settings.http is not None:
            return cls(None, settings.http.host, settings.http.port, token)
        raise ValueError(f"{config_path}: the config disables both the socket and the TCP API")

    def headers(self) -> dict[str, str]:
        headers = {"Accept": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        return headers


def _job_path(provider: str, doc_id: str) -> str:
    return f"/v1/jobs/{quote(provider, safe='')}/{quote(doc_id, safe='')}"


def _submissions(
    doc_ids: Iterable[str] | str,
    provider: str | None,
    metadata: Mapping[str, Any] | None,
    endpoints: Iterable[str] | None,
) -> list[dict[str, Any]]:
    ids = [doc_ids] if isinstance(doc_ids, str) else list(doc_ids)
    jobs = []
    for doc_id in ids:
        job: dict[str, Any] = {"docId": doc_id}
        if provider is not None:
            job["provider"] = provider
        if metadata is not None:
            job["metadata"] = dict(metadata)
        if endpoints is not None:
            job["endpoints"] = list(endpoints)
        jobs.append(job)
    return jobs


def _answer(status: int, text: str) -> Any:
    try:
        body = json.loads(text) if text else None
    except ValueError:
        body = None
    if 200 <= status < 300:
        return body
    message = body.get("error") if isinstance(body, dict) else None
    raise RelaydError(str(message or text.strip() or "no answer body"), status)


def _query(**params: str | None) -> str:
    given = {k: v for k, v in params.items() if v is not None}
    return f"?{urlencode(given)}" if given else ""


class _UnixConnection(http.client.HTTPConnection):
    """http.client over a unix socket: the standard library has no such connection."""

    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("relayd", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


class Client:
    """relayd's API, synchronously (the standard library only)."""

    def __init__(
        self,
        config_path: str | Path | None = None,
        *,
        socket: str | Path | None = None,
        url: str | None = None,
        token: str | None = None,
        timeout: float = TIMEOUT,
    ) -> None:
        self._target = Target.of(config_path, socket, url, token)
        self._timeout = timeout

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Nothing is held between calls: here for symmetry with AsyncClient."""

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        t = self._target
        conn: http.client.HTTPConnection
        if t.socket is not None:
            conn = _UnixConnection(t.socket, self._timeout)
        else:
            conn = http.client.HTTPConnection(t.host, t.port, timeout=self._timeout)
        headers = t.headers()
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        try:
            conn.request(method, path, body=data, headers=headers)
            resp = conn.getresponse()
            text = resp.read().decode("utf-8", "replace")
        except (OSError, http.client.HTTPException) as exc:
            raise RelaydError(f"cannot reach relayd: {exc}") from None
        finally:
            conn.close()
        return _answer(resp.status, text)

    def submit(
        self,
        doc_ids: Iterable[str] | str,
        provider: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        endpoints: Iterable[str] | None = None,
    ) -> list[dict[str, Any]]:
        """Submit jobs (one transaction); each job as stored, with `created` False for one
        relayd knew already."""
        jobs: list[dict[str, Any]] = self._call(
            "POST", "/v1/jobs", _submissions(doc_ids, provider, metadata, endpoints)
        )["jobs"]
        return jobs

    def job(self, provider: str, doc_id: str) -> dict[str, Any]:
        """The job with its polls and deliveries (`job`, `polls`, `deliveries`)."""
        detail: dict[str, Any] = self._call("GET", _job_path(provider, doc_id))
        return detail

    def jobs(
        self, state: str | None = None, provider: str | None = None, limit: int | None = None
    ) -> list[dict[str, Any]]:
        """Jobs, newest first."""
        query = _query(state=state, provider=provider, limit=None if limit is None else str(limit))
        jobs: list[dict[str, Any]] = self._call("GET", "/v1/jobs" + query)["jobs"]
        return jobs

    def redeliver(self, provider: str, doc_id: str) -> int:
        """Deliver a finished job again; how many deliveries were queued."""
        count: int = self._call("POST", _job_path(provider, doc_id) + "/redeliver")["redelivered"]
        return count

    def cancel(self, provider: str, doc_id: str) -> dict[str, Any]:
        """Stop polling and delivering the job; the job as it is now."""
        job: dict[str, Any] = self._call("DELETE", _job_path(provider, doc_id))["job"]
        return job

    def status(self) -> dict[str, Any]:
        status: dict[str, Any] = self._call("GET", "/v1/status")
        return status


class AsyncClient:
    """relayd's API as coroutines (aiohttp); use `async with` or call `close()`."""

    def __init__(
        self,
        config_path: str | Path | None = None,
        *,
        socket: str | Path | None = None,
        url: str | None = None,
        token: str | None = None,
        timeout: float = TIMEOUT,
    ) -> None:
        import aiohttp

        self._target = Target.of(config_path, socket, url, token)
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _call(self, method: str, path: str, body: Any = None) -> Any:
        import aiohttp

        t = self._target
        if self._session is None:
            connector: aiohttp.BaseConnector | None = (
                aiohttp.UnixConnector(path=t.socket) if t.socket is not None else None
            )
            self._session = aiohttp.ClientSession(connector=connector, timeout=self._timeout)
        base = "http://relayd" if t.socket is not None else f"http://{t.host}:{t.port}"
        try:
            async with self._session.request(
                method, base + path, json=body, headers=t.headers()
            ) as resp:
                text = await resp.text()
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise RelaydError(f"cannot reach relayd: {exc}") from None
        return _answer(resp.status, text)

    async def submit(
        self,
        doc_ids: Iterable[str] | str,
        provider: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        endpoints: Iterable[str] | None = None,
    ) -> list[dict[str, Any]]:
        answer = await self._call(
            "POST", "/v1/jobs", _submissions(doc_ids, provider, metadata, endpoints)
        )
        jobs: list[dict[str, Any]] = answer["jobs"]
        return jobs

    async def job(self, provider: str, doc_id: str) -> dict[str, Any]:
        detail: dict[str, Any] = await self._call("GET", _job_path(provider, doc_id))
        return detail

    async def jobs(
        self, state: str | None = None, provider: str | None = None, limit: int | None = None
    ) -> list[dict[str, Any]]:
        query = _query(state=state, provider=provider, limit=None if limit is None else str(limit))
        jobs: list[dict[str, Any]] = (await self._call("GET", "/v1/jobs" + query))["jobs"]
        return jobs

    async def redeliver(self, provider: str, doc_id: str) -> int:
        answer = await self._call("POST", _job_path(provider, doc_id) + "/redeliver")
        count: int = answer["redelivered"]
        return count

    async def cancel(self, provider: str, doc_id: str) -> dict[str, Any]:
        job: dict[str, Any] = (await self._call("DELETE", _job_path(provider, doc_id)))["job"]
        return job

    async def status(self) -> dict[str, Any]:
        status: dict[str, Any] = await self._call("GET", "/v1/status")
        return status
