"""A fake webhook endpoint: records every POST and answers from a script of statuses.

Used by tests and `relayd demo` to see exactly what relayd delivered, retries included.
"""

from __future__ import annotations

import asyncio
import collections
import json
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import hdrs, web
from multidict import CIMultiDict, CIMultiDictProxy

from relayd.mock.net import serve_app


@dataclass(frozen=True)
class Received:
    """One POST as it arrived, and the status it was answered with."""

    at: float  # time.time()
    path: str
    headers: Mapping[str, str]  # case-insensitive: headers["webhook-id"]
    body: bytes
    status: int = 200

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def accepted(self) -> bool:
        return 200 <= self.status < 300


class Receiver:
    """A webhook endpoint that records every POST and answers from a script.

    The first POSTs are answered with `statuses` in order, later ones with `default_status`;
    `retry_after`, if set, goes out as a Retry-After header on every non-2xx answer.
    """

    def __init__(
        self,
        *,
        statuses: Iterable[int] = (),
        default_status: int = 200,
        on_receive: Callable[[Received], None] | None = None,
        retry_after: str | None = None,
    ) -> None:
        self.received: list[Received] = []
        self.accepted: list[Received] = []
        self._script = collections.deque(statuses)
        self.port = 0  # where serve() bound it
        self._default_status = default_status
        self._on_receive = on_receive
        self._retry_after = retry_after
        self._changed = asyncio.Condition()

    def set_default_status(self, status: int) -> None:
        self._default_status = status

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/_receiver/received", self._summary)
        app.router.add_post("/{tail:.*}", self._receive)
        return app

    # A timeout argument (not a caller-side asyncio.timeout) keeps test code one line.
    async def wait_for(self, n: int, timeout: float = 10.0) -> list[Received]:  # noqa: ASYNC109
        """Wait until at least `n` POSTs were accepted (2xx); return all accepted so far."""
        try:
            async with asyncio.timeout(timeout), self._changed:
                await self._changed.wait_for(lambda: len(self.accepted) >= n)
        except TimeoutError:
            raise TimeoutError(
                f"waited {timeout:g}s for {n} accepted webhook(s): {len(self.accepted)} accepted"
                f" of {len(self.received)} received (statuses {self._statuses()})"
            ) from None
        return list(self.accepted)

    def by_webhook_id(self) -> dict[str, list[Received]]:
        """Every POST (accepted or not) grouped by its `webhook-id` header ("" when absent)."""
        groups: dict[str, list[Received]] = {}
        for item in self.received:
            groups.setdefault(item.headers.get("webhook-id", ""), []).append(item)
        return groups

    def _statuses(self) -> list[int]:
        return [item.status for item in self.received]

    async def _receive(self, request: web.Request) -> web.Response:
        body = await request.read()
        status = self._script.popleft() if self._script else self._default_status
        item = Received(
            at=time.time(),
            path=request.path,
            headers=CIMultiDictProxy(CIMultiDict(request.headers)),
            body=body,
            status=status,
        )
        self.received.append(item)
        if item.accepted:
            self.accepted.append(item)
        if self._on_receive is not None:
            self._on_receive(item)
        async with self._changed:
            self._changed.notify_all()
        headers = {}
        if not item.accepted and self._retry_after is not None:
            headers[hdrs.RETRY_AFTER] = self._retry_after
        if status in (204, 304):
            return web.Response(status=status, headers=headers)
        answer = {"ok": True} if item.accepted else {"error": f"scripted status {status}"}
        return web.json_response(answer, status=status, headers=headers)

    async def _summary(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "received": len(self.received),
                "accepted": len(self.accepted),
                "items": [
                    {
                        "at": item.at,
                        "path": item.path,
                        "status": item.status,
                        "webhook_id": item.headers.get("webhook-id"),
                        "bytes": len(item.body),
                    }
                    for item in self.received
                ],
            }
        )


async def serve(
    *, host: str = "127.0.0.1", port: int = 0, **kwargs: Any
) -> tuple[Receiver, web.AppRunner, int]:
    """Start a receiver on a TCP site; the caller owns the runner (`await runner.cleanup()`)."""
    receiver = Receiver(**kwargs)
    runner, receiver.port = await serve_app(receiver.app(), host=host, port=port)
    return receiver, runner, receiver.port
