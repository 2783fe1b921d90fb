"""The mock provider and mock receiver: faithful to the APIs, and honest instruments."""

from __future__ import annotations

import asyncio
from email.utils import formatdate
from typing import Any

import aiohttp
import pytest
from pytest_aiohttp import AiohttpClient

from relayd.mock import provider as mock_provider
from relayd.mock import receiver as mock_receiver
from relayd.mock.provider import MockProvider
from relayd.mock.receiver import Receiver

KEY = {"Authorization": "Bearer k1"}


class FakeClock:
    def __init__(self, now: float = 1_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def xosum(client: Any, doc_id: str, headers: dict[str, str] = KEY) -> tuple[int, Any]:
    async with client.get("/api/getTranscription", params={"docId": doc_id}, headers=headers) as r:
        return r.status, await r.json()


async def test_xosum_lifecycle_uploading_processing_transcribed(
    aiohttp_client: AiohttpClient,
) -> None:
    """A new docId reads uploading, then processing, then transcribed with the job's fields."""
    clock = FakeClock()
    provider = MockProvider(ready_after=10, clock=clock)
    client = await aiohttp_client(provider.app())

    assert await xosum(client, "doc1") == (200, {"docId": "doc1", "status": "uploading"})
    clock.now = 1_001.9
    assert (await xosum(client, "doc1"))[1]["status"] == "uploading"
    clock.now = 1_002.0
    assert (await xosum(client, "doc1"))[1]["status"] == "processing"
    clock.now = 1_009.99
    assert (await xosum(client, "doc1"))[1]["status"] == "processing"
    clock.now = 1_010.0
    async with client.get("/api/getTranscription?docId=doc1", headers=KEY) as resp:
        body = await resp.json()
        assert resp.headers["Date"] == formatdate(1_010.0, usegmt=True)
    assert body == {
        "docId": "doc1",
        "status": "transcribed",
        "title": "Recording doc1",
        "transcription": body["transcription"],
        "metadata": {},
        "resolution": None,
        "languageCode": "en",
        "type": "audio",
        "duration": 12.5,
        "createdAt": "1970-01-01T00:16:40Z",
    }
    assert "doc1" in body["transcription"]
    assert provider.finished_at("doc1") == 1_010.0
    assert provider.finished_at("nope") is None

    provider.add_job("doc2", ready_after=0, title="Custom", metadata={"k": "v"})
    _, body = await xosum(client, "doc2")
    assert (body["status"], body["title"], body["metadata"]) == (
        "transcribed",
        "Custom",
        {"k": "v"},
    )


async def test_progress_fields_appear_while_in_progress(aiohttp_client: AiohttpClient) -> None:
    """`progress` adds fields (the audio's type and duration) to in-progress answers only."""
    clock = FakeClock()
    provider = MockProvider(clock=clock)
    client = await aiohttp_client(provider.app())
    provider.add_job("doc3", ready_after=10, progress={"type": "video", "duration": 600.0})
    _, body = await xosum(client, "doc3")
    assert body == {"docId": "doc3", "status": "uploading", "type": "video", "duration": 600.0}
    clock.now += 10
    _, body = await xosum(client, "doc3")
    assert (body["status"], body["type"], body["duration"]) == ("transcribed", "audio", 12.5)
    async with client.post("/_mock/jobs", json={"docId": "d", "progress": [1]}) as resp:
        assert resp.status == 400
        assert "progress must be an object" in (await resp.json())["error"]


async def test_xosum_failed_job(aiohttp_client: AiohttpClient) -> None:
    """A docId starting with 'fail' ends failed with an error, type and createdAt."""
    clock = FakeClock()
    client = await aiohttp_client(MockProvider(ready_after=1, clock=clock).app())
    assert (await xosum(client, "fail-1"))[1]["status"] == "uploading"
    clock.now += 1
    assert await xosum(client, "fail-1") == (
        200,
        {
            "docId": "fail-1",
            "status": "failed",
            "error": "audio could not be decoded",
            "type": "audio",
            "createdAt": "1970-01-01T00:16:40Z",
        },
    )


async def test_xosum_missing_job_is_404_forever(aiohttp_client: AiohttpClient) -> None:
    """A docId starting with 'missing' answers 404 before and after its ready time."""
    clock = FakeClock()
    provider = MockProvider(ready_after=1, clock=clock)
    client = await aiohttp_client(provider.app())
    assert await xosum(client, "missing-1") == (404, {"error": "document not found"})
    clock.now += 100
    assert await xosum(client, "missing-1") == (404, {"error": "document not found"})
    assert provider.status_counts[404] == 2


async def test_wrong_or_absent_key_is_401_and_missing_docid_is_400(
    aiohttp_client: AiohttpClient,
) -> None:
    """With api_keys set, any other bearer token gets 401; a request without docId gets 400."""
    provider = MockProvider(api_keys={"k1"}, clock=FakeClock())
    client = await aiohttp_client(provider.app())
    assert await xosum(client, "d", {"Authorization": "Bearer k2"}) == (
        401,
        {"error": "unauthorized"},
    )
    assert (await xosum(client, "d", {}))[0] == 401
    assert (await xosum(client, "d"))[0] == 200
    async with client.get("/api/getTranscription", headers=KEY) as resp:
        assert resp.status == 400
    async with client.get("/v1/audio/transcribe/trans_1", headers={"Authorization": "x"}) as r:
        assert r.status == 401
        assert (await r.json())["error"]["code"] == "UNAUTHORIZED"
    assert provider.status_counts == {401: 3, 200: 1, 400: 1}


async def test_rate_limit_429_until_the_next_aligned_window(aiohttp_client: AiohttpClient) -> None:
    """Past `limit` in one aligned window: 429 with integer Retry-After >= 1; resets next window."""
    clock = FakeClock(1_000.0)  # window [960, 1020)
    provider = MockProvider(window=60, limit=3, clock=clock)
    client = await aiohttp_client(provider.app())
    for _ in range(3):
        assert (await xosum(client, "d"))[0] == 200
    async with client.get("/api/getTranscription?docId=d", headers=KEY) as resp:
        assert resp.status == 429
        assert resp.headers["Retry-After"] == "20"
        assert "Date" in resp.headers
        assert await resp.json() == {"error": "rate limited"}
    assert (await xosum(client, "d", {"Authorization": "Bearer other"}))[0] == 200

    clock.now = 1_019.9
    async with client.get("/v1/audio/transcribe/trans_1", headers=KEY) as resp:
        assert resp.status == 429
        assert resp.headers["Retry-After"] == "1"
        body = await resp.json()
        assert body["success"] is False
        assert body["error"]["code"] == "RATE_LIMIT_EXCEEDED"
        assert body["error"]["trace_id"]

    clock.now = 1_020.0
    assert (await xosum(client, "d"))[0] == 200
    assert provider.rejected == 2
    assert provider.status_counts == {200: 5, 429: 2}
    assert len(provider.arrivals) == 7
    assert provider.max_in_fixed_window("Bearer k1") == 5
    assert provider.max_in_fixed_window("k1") == 5
    assert provider.max_in_fixed_window("other") == 1


def test_window_maxima_on_crafted_arrivals() -> None:
    """Fixed windows are aligned [k*w, (k+1)*w); rolling ones are any half-open [t, t+w)."""
    provider = MockProvider(window=10, limit=100)
    assert provider.max_in_fixed_window() == 0
    assert provider.max_in_rolling_window() == 0
    a, b = "Bearer a", "Bearer b"
    provider.arrivals = [(t, a) for t in (0.0, 9.0, 9.5, 10.0, 15.0, 19.9, 30.0)]
    # [0,10): 0, 9, 9.5  [10,20): 10, 15, 19.9  -- but [9,19) holds 9, 9.5, 10, 15.
    assert provider.max_in_fixed_window("a") == 3
    assert provider.max_in_rolling_window("a") == 4
    assert provider.max_in_rolling_window(a) == 4
    provider.arrivals += [(29.0, b), (31.0, b), (33.0, b), (38.9, b), (40.0, b)]
    # b: [20,30): 1, [30,40): 3; rolling [29,39) holds 4, 40 is excluded (half-open).
    assert provider.max_in_fixed_window("b") == 3
    assert provider.max_in_rolling_window("b") == 4
    provider.arrivals += [(45.0, a), (46.0, a), (47.0, a), (48.0, a)]
    assert provider.max_in_fixed_window() == 4  # key=None: the busiest key, keys not summed
    assert provider.max_in_rolling_window() == 4
    assert provider.max_in_fixed_window("nobody") == 0
    stats = provider.stats()
    assert stats["max_in_fixed_window"] == 4
    assert stats["requests"] == 16


async def test_aitronos_etag_304_and_cache_control(aiohttp_client: AiohttpClient) -> None:
    """Aitronos answers carry an ETag and max-age; a matching If-None-Match gets a costed 304."""
    clock = FakeClock()
    provider = MockProvider(ready_after=10, clock=clock, aitronos_max_age=5)
    client = await aiohttp_client(provider.app())
    url = "/v1/audio/transcribe/trans_1"
    async with client.get(url, headers=KEY) as resp:
        assert resp.status == 200
        assert resp.headers["Cache-Control"] == "max-age=5"
        etag = resp.headers["ETag"]
        body = await resp.json()
    assert body == {
        "success": True,
        "data": {
            "id": "trans_1",
            "status": "queued",
            "created_at": "1970-01-01T00:16:40Z",
            "language": "en",
            "duration_seconds": 12.5,
            "paragraph_count": 0,
        },
    }
    async with client.get(url, headers={**KEY, "If-None-Match": etag}) as resp:
        assert resp.status == 304
        assert resp.headers["ETag"] == etag
        assert await resp.read() == b""
    assert provider.status_counts[304] == 1
    assert len(provider.arrivals) == 2

    clock.now += 5
    async with client.get(url, headers={**KEY, "If-None-Match": etag}) as resp:
        assert resp.status == 200
        assert resp.headers["ETag"] != etag
        assert (await resp.json())["data"]["status"] == "processing"
    clock.now += 5
    async with client.get(url, headers=KEY) as resp:
        data = (await resp.json())["data"]
    assert (data["status"], data["paragraph_count"]) == ("completed", 3)

    fractional = await aiohttp_client(MockProvider(aitronos_max_age=0.5).app())
    async with fractional.get(url, headers=KEY) as resp:
        assert resp.headers["Cache-Control"] == "max-age=0.5"
    default = await aiohttp_client(MockProvider().app())
    async with default.get(url, headers=KEY) as resp:
        assert resp.headers["Cache-Control"] == "max-age=0"


async def test_aitronos_failed_and_missing(aiohttp_client: AiohttpClient) -> None:
    """'fail…' ids end failed with an error; 'missing…' ids get the TRANSCRIPTION_NOT_FOUND 404."""
    provider = MockProvider(ready_after=0, clock=FakeClock())
    client = await aiohttp_client(provider.app())
    async with client.get("/v1/audio/transcribe/fail_1", headers=KEY) as resp:
        data = (await resp.json())["data"]
    assert (data["status"], data["error"]) == ("failed", "audio could not be decoded")
    async with client.get("/v1/audio/transcribe/missing_1", headers=KEY) as resp:
        assert resp.status == 404
        body = await resp.json()
    assert body["success"] is False
    assert body["error"]["code"] == "TRANSCRIPTION_NOT_FOUND"
    assert set(body["error"]) == {"code", "message", "trace_id"}


async def test_paragraph_paging_returns_all_in_order(aiohttp_client: AiohttpClient) -> None:
    """2,500 paragraphs read in pages of 1,000 come back complete and in order."""
    provider = MockProvider(clock=FakeClock())
    provider.add_job("trans_big", ready_after=0, paragraphs=2_500)
    client = await aiohttp_client(provider.app())
    url = "/v1/audio/transcribe/trans_big/paragraphs"
    paragraphs: list[dict[str, Any]] = []
    offset = 0
    while True:
        params = {"limit": "1000", "offset": str(offset)}
        async with client.get(url, params=params, headers=KEY) as resp:
            assert resp.status == 200
            assert "ETag" in resp.headers
            data = (await resp.json())["data"]
        assert (data["total_count"], data["limit"], data["offset"]) == (2_500, 1_000, offset)
        paragraphs += data["paragraphs"]
        offset += len(data["paragraphs"])
        if offset >= data["total_count"]:
            break
    assert len(provider.arrivals) == 3
    assert [p["index"] for p in paragraphs] == list(range(2_500))
    assert paragraphs[7]["text"] == "Paragraph 7 of trans_big."
    assert paragraphs[7]["start"] < paragraphs[7]["end"]

    async with client.get(url, params={"limit": "5000"}, headers=KEY) as resp:
        assert (await resp.json())["data"]["limit"] == 1_000
    async with client.get(url, headers=KEY) as resp:
        data = (await resp.json())["data"]
    assert (data["limit"], data["offset"], len(data["paragraphs"])) == (100, 0, 100)
    async with client.get(url, params={"offset": "-1"}, headers=KEY) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"]["code"] == "INVALID_PARAMETER"


async def test_paragraphs_before_completion_are_409(aiohttp_client: AiohttpClient) -> None:
    """Paragraphs of a job not yet completed answer 409 TRANSCRIPTION_NOT_COMPLETE."""
    clock = FakeClock()
    provider = MockProvider(clock=clock)
    provider.add_job("trans_2", ready_after=5)
    client = await aiohttp_client(provider.app())
    url = "/v1/audio/transcribe/trans_2/paragraphs"
    async with client.get(url, headers=KEY) as resp:
        assert resp.status == 409
        assert (await resp.json())["error"]["code"] == "TRANSCRIPTION_NOT_COMPLETE"
    clock.now += 5
    async with client.get(url, headers=KEY) as resp:
        assert resp.status == 200
        assert len((await resp.json())["data"]["paragraphs"]) == 3


async def test_control_routes_register_and_report_without_counting(
    aiohttp_client: AiohttpClient,
) -> None:
    """/_mock routes register jobs and report stats; they are neither limited nor counted."""
    clock = FakeClock()
    provider = MockProvider(limit=1, ready_after=3, clock=clock)
    client = await aiohttp_client(provider.app())
    async with client.post("/_mock/jobs", json={"docId": "a", "outcome": "failed"}) as resp:
        assert resp.status == 201
        assert (await resp.json())["jobs"][0]["finished_at"] == 1_003.0
    jobs = [{"docId": "b", "ready_after": 0, "title": "B"}, {"docId": "c", "paragraphs": 7}]
    async with client.post("/_mock/jobs", json=jobs) as resp:
        assert [j["docId"] for j in (await resp.json())["jobs"]] == ["b", "c"]
    bad = [{"docId": "d"}, {"docId": "e", "outcome": "exploded"}]
    async with client.post("/_mock/jobs", json=bad) as resp:
        assert resp.status == 400
        assert "outcome" in (await resp.json())["error"]
    assert set(provider.jobs) == {"a", "b", "c"}
    assert (provider.jobs["b"].fields, provider.jobs["c"].paragraphs) == ({"title": "B"}, 7)

    async with client.get("/_mock/jobs/a") as resp:
        job = await resp.json()
    assert (job["outcome"], job["first_seen"], job["finished_at"]) == ("failed", 1_000.0, 1_003.0)
    async with client.get("/_mock/jobs/zzz") as resp:
        assert resp.status == 404
    assert (await xosum(client, "b"))[1]["title"] == "B"
    assert (await xosum(client, "b"))[0] == 429
    for _ in range(3):
        async with client.get("/_mock/stats") as resp:
            stats = await resp.json()
    assert stats == {
        "requests": 2,
        "rejected": 1,
        "max_in_fixed_window": 2,
        "max_in_rolling_window": 2,
        "status_counts": {"200": 1, "429": 1},
        "jobs": 3,
        "window": 60.0,
        "limit": 1,
    }


async def test_receiver_scripted_statuses_and_wait_for(aiohttp_client: AiohttpClient) -> None:
    """Scripted statuses answer the first POSTs; wait_for returns once enough were accepted."""
    seen: list[int] = []
    receiver = Receiver(
        statuses=[500, 503], retry_after="2", on_receive=lambda r: seen.append(r.status)
    )
    client = await aiohttp_client(receiver.app())
    waiter = asyncio.create_task(receiver.wait_for(2, timeout=5))
    statuses = []
    for n in range(4):
        headers = {"webhook-id": f"msg_{n // 2}"}
        async with client.post("/hooks/x", json={"n": n}, headers=headers) as resp:
            statuses.append((resp.status, resp.headers.get("Retry-After")))
    accepted = await waiter
    assert statuses == [(500, "2"), (503, "2"), (200, None), (200, None)]
    assert seen == [500, 503, 200, 200]
    assert [r.json()["n"] for r in accepted] == [2, 3]
    assert len(receiver.received) == 4
    assert receiver.received[0].headers["Webhook-Id"] == "msg_0"
    assert receiver.received[0].path == "/hooks/x"
    assert {k: len(v) for k, v in receiver.by_webhook_id().items()} == {"msg_0": 2, "msg_1": 2}

    receiver.set_default_status(502)
    async with client.post("/", data=b"x") as resp:
        assert resp.status == 502
    assert len(receiver.accepted) == 2
    async with client.get("/_receiver/received") as resp:
        summary = await resp.json()
    assert (summary["received"], summary["accepted"]) == (5, 2)
    assert [i["status"] for i in summary["items"]] == [500, 503, 200, 200, 502]


async def test_receiver_wait_for_times_out_with_a_useful_message() -> None:
    """wait_for raises TimeoutError that says how many were accepted and received."""
    receiver = Receiver()
    with pytest.raises(TimeoutError, match="0 accepted of 0 received"):
        await receiver.wait_for(1, timeout=0.05)
    assert await receiver.wait_for(0) == []


async def test_serve_binds_real_ports() -> None:
    """serve() starts both fakes on loopback and reports the bound ports."""
    provider, p_runner, p_port = await mock_provider.serve(limit=5, ready_after=0)
    receiver, r_runner, r_port = await mock_receiver.serve(statuses=[201])
    try:
        assert p_port > 0 and r_port > 0
        async with aiohttp.ClientSession() as session:
            url = f"http://127.0.0.1:{p_port}/api/getTranscription?docId=x"
            async with session.get(url, headers=KEY) as resp:
                assert (await resp.json())["status"] == "transcribed"
            async with session.post(f"http://127.0.0.1:{r_port}/wh", json={}) as resp:
                assert resp.status == 201
        assert provider.stats()["requests"] == 1
        assert len(await receiver.wait_for(1, timeout=1)) == 1
    finally:
        await p_runner.cleanup()
        await r_runner.cleanup()
