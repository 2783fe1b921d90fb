"""A provider that misbehaves on purpose, for the chaos test (issue 8).

`ChaosProvider` wraps the well-behaved `MockProvider`: the mock admits, counts and rate limits
every request and computes the correct answer; then a share of those answers is replaced by a
fault. Whether the n-th request about a job is a fault, and which, comes from a `random.Random`
seeded with (seed, job, route, n): a job meets the same faults in the same order on a replay,
however the polls of different jobs interleave. Every good terminal answer it served is kept
per job, so a test can check that each delivery was built from one of them: a bad answer
never parses as a terminal answer about the job it was served for (a truncated or abandoned
good body is not JSON; a `wrong_job` answer carries another job's id and marker).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import random
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import hdrs, web

from relayd.mock.provider import MockProvider, scaled_cache_ages

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# What relayd must make of each fault: "retry" (a failed poll, logged, backoff), "not yet"
# (any status other than a terminal one), "ok" (a good answer, only slow) or "pause" (401).
FAULTS = {
    "5xx": "retry",  # 500/502/503 with an HTML, empty or JSON error body
    "stall": "retry",  # no answer until well after the client's timeout
    "truncated": "retry",  # 200, the good JSON cut short (Content-Length agrees)
    "not_json": "retry",  # 200 with HTML, text, binary or nothing
    "wrong_shape": "retry",  # valid JSON that is not the answer: a list, wrong types, no status
    "wrong_job": "retry",  # a good terminal answer, but about another job
    "reset": "retry",  # headers with a Content-Length, half the body, then a TCP reset
    "slow_timeout": "retry",  # headers at once, the body dribbled past the timeout
    "unknown_status": "not yet",  # a well-formed answer with a status nobody documented
    "slow_body": "ok",  # the good answer, dribbled but complete within the timeout
}
XOSUM_TERMINAL = frozenset({"transcribed", "failed"})
AIT_TERMINAL = frozenset({"completed", "failed"})


class ChaosProvider:
    """Xosum's and Aitronos's polling APIs, lying a `share` of the time (`page_share` for
    paragraph pages, which must all come good in one poll for a transcript to be delivered).

    `refuse_from`/`refuse_count`: for each API key, its requests number refuse_from to
    refuse_from + refuse_count - 1 are all answered 401 (a key revoked, then restored).
    """

    def __init__(
        self,
        *,
        seed: int,
        share: float,
        page_share: float,
        timeout: float,
        window: float,
        limit: int,
        refuse_from: int,
        refuse_count: int,
    ) -> None:
        self.seed = seed
        self.share = share
        self.page_share = page_share
        self.timeout = timeout
        self.refuse = range(refuse_from, refuse_from + refuse_count)
        self.mock = MockProvider(window=window, limit=limit, cache_ages=scaled_cache_ages(window))
        self.served: collections.Counter[str] = collections.Counter()  # fault kind -> n
        self.good = 0  # good answers served (not faults, not 429)
        # doc -> good terminal answers (Xosum's body; Aitronos's `data` and `billing`)
        self.good_terminal: dict[str, list[Any]] = collections.defaultdict(list)
        self.good_pages: dict[str, dict[int, list[Any]]] = collections.defaultdict(dict)
        self.good_totals: dict[str, int] = {}  # doc -> metadata.total_count of its pages
        self.slow_abandoned = 0  # slow_timeout bodies the client hung up on (as it should)
        self.slow_finished = 0  # slow_timeout bodies the client waited for in full (it must not)
        self.slow_ok_abandoned = 0  # slow_body answers the client gave up on all the same
        self._per_key: collections.Counter[str] = collections.Counter()
        self._per_job: collections.Counter[tuple[str, str]] = collections.Counter()

    def app(self) -> web.Application:
        app = self.mock.app()
        app.middlewares.append(self._chaos)
        return app

    # -- the middleware --------------------------------------------------------------------------

    @web.middleware
    async def _chaos(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        route, doc = _route(request)
        if route is None:
            return await handler(request)  # the mock's control routes
        good = await handler(request)  # admitted, counted and rate limited by the mock
        assert isinstance(good, web.Response)
        if good.status == 429:
            self.served["429"] += 1
            return good
        key = request.headers.get(hdrs.AUTHORIZATION, "")
        number = self._per_key[key]
        self._per_key[key] += 1
        if number in self.refuse:
            self.served["unauthorized"] += 1
            return _unauthorized(route)
        self._per_job[route, doc] += 1
        rng = random.Random(f"{self.seed}:{route}:{doc}:{self._per_job[route, doc]}")
        if rng.random() >= (self.page_share if route == "paragraphs" else self.share):
            self._record_good(route, doc, request, good)
            self.good += 1
            return good
        kind = rng.choice(sorted(FAULTS))
        other = self._other_answer(rng, route, doc) if kind == "wrong_job" else None
        if kind == "unknown_status" and route == "paragraphs":
            kind = "wrong_shape"  # a page has no status
        self.served[kind] += 1
        if other is not None:
            return web.json_response(other)
        return await self._fault(kind, rng, route, doc, request, good)

    def _record_good(self, route: str, doc: str, request: web.Request, good: web.Response) -> None:
        if good.status != 200 or not isinstance(good.body, bytes):
            return
        answer = json.loads(good.body)
        if route == "xosum" and answer.get("status") in XOSUM_TERMINAL:
            self.good_terminal[doc].append(answer)
        elif route == "status" and answer["data"].get("status") in AIT_TERMINAL:
            # what a delivery carries: not the request metadata, which differs every time
            self.good_terminal[doc].append({"data": answer["data"], "billing": answer["billing"]})
        elif route == "paragraphs":
            offset = int(request.query.get("offset", "0"))
            self.good_pages[doc][offset] = answer["data"]["paragraphs"]
            self.good_totals[doc] = answer["metadata"]["total_count"]

    async def _fault(
        self,
        kind: str,
        rng: random.Random,
        route: str,
        doc: str,
        request: web.Request,
        good: web.Response,
    ) -> web.StreamResponse:
        body = good.body if isinstance(good.body, bytes) else b""
        if kind == "5xx":
            status = rng.choice([500, 502, 503])
            text = rng.choice([f"<html><h1>{status}</h1></html>", "", '{"error": "internal"}'])
            return web.Response(status=status, text=text, content_type="text/html")
        if kind == "stall":
            await asyncio.sleep(self.timeout * 3)
            return web.Response(status=504)  # nobody is listening any more
        if kind == "truncated":
            whole = body if len(body) > 1 else b'{"status": "transcribed", "transcription": "x"}'
            return _json_bytes(whole[: rng.randrange(1, len(whole))])
        if kind == "not_json":
            return _json_bytes(rng.choice(NOT_JSON) if rng.random() < 0.8 else rng.randbytes(64))
        if kind == "wrong_shape":
            return web.json_response(rng.choice(WRONG_SHAPES[route])(doc))
        if kind == "unknown_status":  # the good answer's shape, with a status nobody documented
            odd = rng.choice(["exploding", "", "Transcribed", "done?", "COMPLETED", "cancelled"])
            answer = json.loads(body) if good.status == 200 and body else None
            if route == "xosum":
                return web.json_response({**(answer or {"docId": doc}), "status": odd})
            if answer is None:
                answer = {"success": True, "data": {"transcription_id": doc}}
            answer["data"]["status"] = odd
            return web.json_response(answer)
        if kind == "slow_body":
            return await self._dribble(request, route, doc, good, self.timeout / 4)
        if kind == "slow_timeout":
            return await self._dribble(request, route, doc, good, self.timeout * 3)
        if kind == "reset":
            return await self._reset(request, body or b'{"status": "processing"}')
        raise AssertionError(kind)

    def _other_answer(self, rng: random.Random, route: str, doc: str) -> Any:
        """A good terminal answer (or page) served for another job of the same provider, or
        (before any finished) one about a job of someone else's."""
        if route == "paragraphs":
            page = {"transcription_id": "trans_someone_else", "paragraphs": [{"text": "not yours"}]}
            return {"success": True, "data": page, "metadata": {"total_count": 1}}
        others = sorted(
            d for d, answers in self.good_terminal.items() if d != doc and _family(d) == route
        )
        if others:
            answer = self.good_terminal[rng.choice(others)][0]
            return answer if route == "xosum" else {"success": True, **answer}
        if route == "xosum":
            return {"docId": "x-else", "status": "transcribed", "transcription": "not yours"}
        data = {"transcription_id": "trans_someone_else", "status": "completed"}
        return {"success": True, "data": data}

    # -- faults at the transport -----------------------------------------------------------------

    async def _dribble(
        self, request: web.Request, route: str, doc: str, good: web.Response, seconds: float
    ) -> web.StreamResponse:
        """The good answer's headers at once, its body in eight pieces over `seconds`. Past the
        timeout the client must hang up; within it, it is a good answer, only slow."""
        slow = seconds > self.timeout
        body = good.body if isinstance(good.body, bytes) else b""
        status = good.status
        if not body and slow:  # a 304 has no body to dribble: a progress answer instead
            progress: dict[str, Any] = {"docId": doc, "status": "processing"}
            if route != "xosum":
                progress = {"success": True, "data": {"transcription_id": doc, **progress}}
            body, status = json.dumps(progress).encode(), 200
        response = web.StreamResponse(status=status, headers=_forwarded(good, len(body)))
        await response.prepare(request)
        step = max(1, -(-len(body) // 8))
        try:
            for start in range(0, len(body), step):
                await asyncio.sleep(seconds / 8)
                await response.write(body[start : start + step])
            await response.write_eof()
        except ConnectionError:
            if slow:
                self.slow_abandoned += 1
            else:
                self.slow_ok_abandoned += 1  # a loaded machine: late even within the timeout
            return response
        if slow:
            self.slow_finished += 1
        else:
            self._record_good(route, doc, request, good)
        return response

    async def _reset(self, request: web.Request, body: bytes) -> web.StreamResponse:
        """Promise the whole body, send half, then reset the connection (RST, not FIN)."""
        response = web.StreamResponse(
            headers={hdrs.CONTENT_TYPE: "application/json", hdrs.CONTENT_LENGTH: str(len(body))}
        )
        await response.prepare(request)
        await response.write(body[: len(body) // 2])
        await asyncio.sleep(0.01)  # let the half body leave before the reset
        transport = request.transport
        if transport is not None:
            sock = transport.get_extra_info("socket")
            if sock is not None:
                linger = struct.pack("ii", 1, 0)
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
            transport.abort()
        return response


def _route(request: web.Request) -> tuple[str | None, str]:
    """("xosum" | "status" | "paragraphs", job id), or (None, "") for the mock's own routes."""
    path = request.path
    if path == "/api/getTranscription":
        return "xosum", request.query.get("docId", "")
    if path.startswith("/v1/audio/transcribe/"):
        doc = request.match_info.get("id", "")
        return ("paragraphs" if path.endswith("/paragraphs") else "status"), doc
    return None, ""


def _family(doc: str) -> str:
    """Which route a job id's answers come from (the test names Aitronos jobs `trans_…`)."""
    return "status" if doc.startswith("trans_") else "xosum"


def _forwarded(good: web.Response, length: int) -> dict[str, str]:
    headers = {k: v for k, v in good.headers.items() if k.lower() != "content-length"}
    if length:
        headers[hdrs.CONTENT_LENGTH] = str(length)
    return headers


def _json_bytes(body: bytes) -> web.Response:
    return web.Response(status=200, body=body, content_type="application/json")


def _unauthorized(route: str) -> web.Response:
    if route == "xosum":
        return web.json_response({"error": "invalid API key"}, status=401)
    error = {"code": "UNAUTHORIZED", "message": "invalid API key", "trace_id": "chaos-401"}
    return web.json_response({"success": False, "error": error}, status=401)


NOT_JSON = [
    b"<!DOCTYPE html><html><body>Service temporarily unavailable</body></html>",
    b"OK",
    b"",
    b"\xff\xfe\x00garbage\x00",
    b'{"status": "transcribed", "transcription": NaN',
    b"null null",
]

Shape = Callable[[str], Any]
WRONG_SHAPES: dict[str, list[Shape]] = {
    "xosum": [
        lambda d: [],
        lambda d: [{"docId": d, "status": "transcribed", "transcription": "in a list"}],
        lambda d: {"status": 5},
        lambda d: {"status": ["transcribed"]},
        lambda d: {},
        lambda d: None,
        lambda d: "transcribed",
        lambda d: {"data": "transcribed"},
        lambda d: {"docId": d, "status": "transcribed"},  # no transcription
        lambda d: {"docId": d, "status": "transcribed", "transcription": 42},
        lambda d: {"docId": d, "status": "transcribed", "transcription": None},
        lambda d: {"docId": d, "status": "transcribed", "transcription": ["a", "b"]},
        lambda d: {"docId": d, "status": "transcribed", "transcription": {"text": "nested"}},
    ],
    "status": [
        lambda d: [],
        lambda d: {"success": True},
        lambda d: {"success": True, "data": []},
        lambda d: {"success": True, "data": "completed"},
        lambda d: {"success": True, "data": None},
        lambda d: {"success": True, "data": {"transcription_id": d, "status": 5}},
        lambda d: {"success": True, "data": {"transcription_id": d}},
        lambda d: {"success": False, "error": {"code": "INTERNAL", "message": "but 200"}},
        lambda d: {"success": True, "data": {"transcription_id": d, "status": ["completed"]}},
        lambda d: {"data": {"transcription_id": d, "status": "completed"}},  # no success
        lambda d: {"success": True, "data": {"id": d, "status": "completed"}},  # no id we know
    ],
    "paragraphs": [
        lambda d: [],
        lambda d: {"success": True, "data": []},
        lambda d: page(d, "none", 3),
        lambda d: page(d, [], "3"),
        lambda d: page(d, [1, 2, 3], 3),
        lambda d: page(d, [None], 1),
        lambda d: page(d, [{"text": 7}], 1),
        lambda d: {
            "success": True,
            "data": {"transcription_id": d},
            "metadata": {"total_count": 2},
        },
        lambda d: page(d, [], -1),
        lambda d: page(d, [{"text": "a"}], None),  # no count
        lambda d: {  # the counts where relayd once looked for them, not where Aitronos puts them
            "success": True,
            "data": {"transcription_id": d, "paragraphs": [{"text": "a"}], "total_count": 1},
        },
    ],
}


def page(doc: str, paragraphs: Any, total: Any) -> dict[str, Any]:
    """A paragraphs envelope with these (bad) parts."""
    data = {"transcription_id": doc, "paragraphs": paragraphs}
    return {"success": True, "data": data, "metadata": {"total_count": total}}
