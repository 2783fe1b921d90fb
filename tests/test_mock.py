"""The mock provider and mock receiver: faithful to the APIs, and honest instruments.

The mock's answers are held to the providers' documents: field by field, in order, against the
documents' own examples (`tests/fixtures/providers/`), so it cannot drift from them again."""

from __future__ import annotations

import asyncio
from email.utils import formatdate
from typing import Any

import aiohttp
import pytest
from pytest_aiohttp import AiohttpClient

from relayd.mock import net
from relayd.mock import provider as mock_provider
from relayd.mock import receiver as mock_receiver
from relayd.mock.provider import MockProvider
from relayd.mock.receiver import Receiver
from tests.scripted import fixture

KEY = {"Authorization": "Bearer k1"}


class FakeClock:
    def __init__(self, now: float = 1_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def shape(value: Any, opaque: tuple[str, ...] = ()) -> Any:
    """A JSON value's shape, field by field and in order: objects as (key, shape) pairs, lists
    by their first item, scalars by type (int and float apart, as JSON parsers keep them).
    Fields named in `opaque` show only their type (Xosum's `metadata` is whatever the job was
    created with)."""
    if isinstance(value, dict):
        return [
            (k, type(v).__name__ if k in opaque else shape(v, opaque)) for k, v in value.items()
        ]
    if isinstance(value, list):
        return [shape(value[0], opaque)] if value else []
    return type(value).__name__


def xshape(value: Any) -> Any:
    return shape(value, opaque=("metadata",))


def without(doc_shape: Any, *path: str) -> Any:
    """`doc_shape` with the field at `path` left out."""
    head, *rest = path
    return [
        (k, without(v, *rest) if rest and k == head else v)
        for k, v in doc_shape
        if rest or k != head
    ]


async def get(client: Any, url: str, **headers: str) -> tuple[int, Any, Any]:
    """(status, JSON body or None, headers) of a GET with the test key."""
    async with client.get(url, headers={**KEY, **headers}) as resp:
        body = await resp.json() if resp.status != 304 else None
        return resp.status, body, resp.headers


async def xosum(client: Any, doc_id: str, headers: dict[str, str] = KEY) -> tuple[int, Any]:
    async with client.get("/api/getTranscription", params={"docId": doc_id}, headers=headers) as r:
        return r.status, await r.json()


AIT = "/v1/audio/transcribe"
XOSUM_BASE = ["docId", "status", "createdAt", "type", "duration", "metadata"]


# -- Aitronos: the documents' examples, field by field ------------------------------------------


async def test_aitronos_status_answers_have_the_documented_shapes(
    aiohttp_client: AiohttpClient,
) -> None:
    """queued/processing answers have the processing example's fields (max-age=5), completed
    ones the completed example's (max-age=86400; `redacted_audio` only with PII redaction)."""
    clock = FakeClock()
    provider = MockProvider(ready_after=10, clock=clock)
    provider.add_job("trans_pii", ready_after=10, pii_policies=["email"])
    client = await aiohttp_client(provider.app())
    processing = shape(fixture("aitronos_transcription_200_processing.json"))
    completed = shape(fixture("aitronos_transcription_200_completed.json"))
    for at, status in ((1_000.0, "queued"), (1_002.0, "processing"), (1_009.9, "processing")):
        clock.now = at
        code, body, headers = await get(client, f"{AIT}/trans_1")
        assert (code, body["data"]["status"], shape(body)) == (200, status, processing)
        assert body["data"]["transcription_id"] == "trans_1"
        assert headers["Cache-Control"] == "public, max-age=5"
        assert headers["ETag"].startswith('"') and headers["Last-Modified"].endswith("GMT")
    clock.now = 1_010.0
    code, body, headers = await get(client, f"{AIT}/trans_pii")
    assert (code, body["data"]["status"], shape(body)) == (200, "completed", completed)
    assert headers["Cache-Control"] == "public, max-age=86400"
    assert headers["X-PII-Redacted"] == "true" and headers["X-PII-Policies"] == "email"
    assert body["actions"]["get_paragraphs"].endswith(f"{AIT}/trans_pii/paragraphs")
    assert body["metadata"]["upstream_refreshed"] is False
    _, body, _ = await get(client, f"{AIT}/trans_1")
    assert shape(body) == without(completed, "actions", "redacted_audio")
    assert body["data"]["audio_metadata"]["duration_seconds"] == 125.5
    assert body["billing"] == {
        "synapses_consumed": 126,
        "synapses_refunded": 0,
        "currency": "synapses",
    }


async def test_aitronos_failed_and_missing(aiohttp_client: AiohttpClient) -> None:
    """'fail…' ids end `failed` (refunded, max-age=86400); 'missing…' ids get the 404 example's
    NOT_FOUND envelope."""
    provider = MockProvider(ready_after=0, clock=FakeClock())
    client = await aiohttp_client(provider.app())
    code, body, headers = await get(client, f"{AIT}/fail_1")
    assert (code, body["data"]["status"]) == (200, "failed")
    processing = fixture("aitronos_transcription_200_processing.json")
    completed = fixture("aitronos_transcription_200_completed.json")
    assert shape(body) == [
        ("success", "bool"),
        ("data", shape(processing["data"])),  # no completed_at
        ("billing", shape(processing["billing"])),
        ("metadata", shape(completed["metadata"])),  # served as stored
        ("actions", [("check_status", "str")]),  # nothing to fetch
    ]
    assert body["billing"]["synapses_refunded"] == body["billing"]["synapses_consumed"]
    assert headers["Cache-Control"] == "public, max-age=86400"
    code, body, _ = await get(client, f"{AIT}/missing_1")
    assert (code, shape(body)) == (404, shape(fixture("aitronos_transcription_404.json")))
    assert body["error"]["code"] == "NOT_FOUND"
    assert body["error"]["details"] == {"transcription_id": "missing_1"}


async def test_aitronos_etag_304(aiohttp_client: AiohttpClient) -> None:
    """A matching If-None-Match gets a costed, empty 304 with the same ETag; a change of status
    changes the ETag (the request metadata does not)."""
    clock = FakeClock()
    provider = MockProvider(ready_after=10, clock=clock)
    client = await aiohttp_client(provider.app())
    _, _, headers = await get(client, f"{AIT}/trans_1")
    etag = headers["ETag"]
    code, body, headers = await get(client, f"{AIT}/trans_1", **{"If-None-Match": etag})
    assert (code, body, headers["ETag"]) == (304, None, etag)
    assert headers["Cache-Control"] == "public, max-age=5"
    assert provider.status_counts[304] == 1 and len(provider.arrivals) == 2
    clock.now += 5
    code, body, headers = await get(client, f"{AIT}/trans_1", **{"If-None-Match": etag})
    assert (code, body["data"]["status"]) == (200, "processing")
    assert headers["ETag"] != etag


async def test_aitronos_paragraph_pages_have_the_documented_shape(
    aiohttp_client: AiohttpClient,
) -> None:
    """Counts in `metadata`, links in `actions` (`next`, `previous`), the paragraphs example's
    fields; no `limit` returns all; `limit` outside 1-1000 or a bad `offset` is a 422."""
    provider = MockProvider(clock=FakeClock())
    provider.add_job("trans_big", ready_after=0, paragraphs=25, pii_policies=["name"])
    client = await aiohttp_client(provider.app())
    url = f"{AIT}/trans_big/paragraphs"
    example = fixture("aitronos_paragraphs_200.json")
    code, body, headers = await get(client, f"{url}?limit=10&offset=0")
    assert (code, shape(body)) == (200, shape(example))
    assert (body["metadata"]["total_count"], body["metadata"]["returned_count"]) == (25, 10)
    assert body["actions"]["next"].endswith(f"{url}?limit=10&offset=10")
    assert headers["Cache-Control"] == "public, max-age=86400"
    assert headers["X-PII-Redacted"] == "true" and headers["X-PII-Policies"] == "name"
    _, body, _ = await get(client, f"{url}?limit=10&offset=10")
    assert list(body["actions"])[-2:] == ["next", "previous"]
    assert body["actions"]["previous"].endswith(f"{url}?limit=10&offset=0")
    assert body["data"]["paragraphs"][0]["text"] == "Paragraph 10 of trans_big."
    _, body, _ = await get(client, url)
    assert len(body["data"]["paragraphs"]) == body["metadata"]["returned_count"] == 25
    assert "next" not in body["actions"] and "previous" not in body["actions"]
    _, body, _ = await get(client, f"{url}?limit=1000&offset=20")
    assert body["metadata"]["returned_count"] == 5 and "next" not in body["actions"]
    error_fields = [k for k, _ in shape(fixture("aitronos_paragraphs_409.json")["error"])]
    for query in ("limit=0", "limit=1001", "limit=x", "offset=-1", "offset=1.5"):
        code, body, _ = await get(client, f"{url}?{query}")
        assert (code, body["error"]["code"]) == (422, "VALIDATION_ERROR"), query
        assert [k for k in body["error"]] == error_fields


async def test_aitronos_paragraphs_before_completion_are_the_409_example(
    aiohttp_client: AiohttpClient,
) -> None:
    """409 TRANSCRIPTION_NOT_COMPLETE with `details.current_status`, as the example has it."""
    clock = FakeClock()
    provider = MockProvider(clock=clock)
    provider.add_job("trans_2", ready_after=5)
    client = await aiohttp_client(provider.app())
    example = fixture("aitronos_paragraphs_409.json")
    code, body, _ = await get(client, f"{AIT}/trans_2/paragraphs")
    assert (code, shape(body)) == (409, shape(example))
    assert body["error"]["details"] == {"transcription_id": "trans_2", "current_status": "queued"}
    clock.now += 5
    code, body, _ = await get(client, f"{AIT}/trans_2/paragraphs")
    assert (code, len(body["data"]["paragraphs"])) == (200, 3)


async def test_aitronos_races_paragraphs_lag_and_a_mixed_up_answer(
    aiohttp_client: AiohttpClient,
) -> None:
    """`paragraphs_lag`: the status says completed while the paragraphs still answer 409;
    `mixed_up`: the first finished answer is about another transcription."""
    clock = FakeClock()
    provider = MockProvider(clock=clock)
    provider.add_job("trans_lag", ready_after=1, paragraphs_lag=2, mixed_up=1)
    client = await aiohttp_client(provider.app())
    clock.now += 1
    _, body, _ = await get(client, f"{AIT}/trans_lag")
    assert (body["data"]["transcription_id"], body["data"]["status"]) == (
        "trans_someone_else",
        "completed",
    )
    _, body, _ = await get(client, f"{AIT}/trans_lag")
    assert (body["data"]["transcription_id"], body["data"]["status"]) == ("trans_lag", "completed")
    code, body, _ = await get(client, f"{AIT}/trans_lag/paragraphs")
    assert (code, body["error"]["details"]["current_status"]) == (409, "processing")
    clock.now += 2
    code, _, _ = await get(client, f"{AIT}/trans_lag/paragraphs")
    assert code == 200


# -- Xosum: the fields the document lists per status ---------------------------------------------


async def test_xosum_lifecycle_has_the_documented_fields_per_status(
    aiohttp_client: AiohttpClient,
) -> None:
    """uploading, converting, processing: the base fields only (`duration` once the upload is
    in); transcribed adds transcription, title, resolution, languageCode; in that order, as the
    fixtures built from the document have them."""
    clock = FakeClock()
    provider = MockProvider(ready_after=10, clock=clock)
    client = await aiohttp_client(provider.app())
    seen = []
    for at in (1_000.0, 1_001.99, 1_002.0, 1_004.0, 1_009.99):
        clock.now = at
        code, body = await xosum(client, "doc1")
        assert code == 200 and list(body) == XOSUM_BASE
        assert xshape(body) == xshape(fixture(f"xosum_{body['status']}.json"))
        seen.append(body["status"])
    assert seen == ["uploading", "uploading", "converting", "processing", "processing"]
    clock.now = 1_010.0
    async with client.get("/api/getTranscription?docId=doc1", headers=KEY) as resp:
        body = await resp.json()
        assert resp.headers["Date"] == formatdate(1_010.0, usegmt=True)
    example = fixture("xosum_transcribed_single_voice.json")
    assert xshape(body) == xshape(example)
    assert (body["status"], body["type"], body["duration"]) == (
        "transcribed",
        "single_voice",
        125.5,
    )
    assert "doc1" in body["transcription"] and "Խոսնակ" not in body["transcription"]
    assert body["resolution"] and "\n" not in body["resolution"]  # one paragraph
    assert provider.finished_at("doc1") == 1_010.0
    assert provider.finished_at("nope") is None

    provider.add_job("doc2", ready_after=0, title="Custom", metadata={"k": "v"})
    _, body = await xosum(client, "doc2")
    assert (body["status"], body["title"], body["metadata"]) == (
        "transcribed",
        "Custom",
        {"k": "v"},
    )


async def test_xosum_phone_call_has_speaker_labels(aiohttp_client: AiohttpClient) -> None:
    """A `phone_call` (ids starting "call", or `type` given) is diarized with Խոսնակ 1/2."""
    provider = MockProvider(ready_after=0, clock=FakeClock())
    provider.add_job("order-7", type="phone_call")
    client = await aiohttp_client(provider.app())
    for doc_id in ("call-1", "order-7"):
        _, body = await xosum(client, doc_id)
        assert body["type"] == "phone_call"
        assert "Խոսնակ 1: " in body["transcription"] and "Խոսնակ 2: " in body["transcription"]
    assert xshape(body) == xshape(fixture("xosum_transcribed_phone_call.json"))


async def test_progress_fields_appear_while_in_progress(aiohttp_client: AiohttpClient) -> None:
    """`progress` adds or overrides fields of in-progress answers only; base fields given as
    `fields` hold on every answer."""
    clock = FakeClock()
    provider = MockProvider(clock=clock)
    client = await aiohttp_client(provider.app())
    provider.add_job("doc3", ready_after=10, progress={"duration": 600.0}, metadata={"k": 1})
    _, body = await xosum(client, "doc3")
    assert (body["status"], body["duration"], body["metadata"]) == ("uploading", 600.0, {"k": 1})
    clock.now += 10
    _, body = await xosum(client, "doc3")
    assert (body["status"], body["duration"], body["metadata"]) == ("transcribed", 125.5, {"k": 1})
    async with client.post("/_mock/jobs", json={"docId": "d", "progress": [1]}) as resp:
        assert resp.status == 400
        assert "progress must be an object" in (await resp.json())["error"]


async def test_xosum_failed_job(aiohttp_client: AiohttpClient) -> None:
    """A docId starting with 'fail' ends failed: the base fields and an `error`."""
    clock = FakeClock()
    client = await aiohttp_client(MockProvider(ready_after=1, clock=clock).app())
    assert (await xosum(client, "fail-1"))[1]["status"] == "uploading"
    clock.now += 1
    code, body = await xosum(client, "fail-1")
    assert code == 200
    assert list(body) == [*XOSUM_BASE, "error"] == list(fixture("xosum_failed.json"))
    assert (body["status"], body["error"]) == ("failed", "The audio could not be decoded.")


async def test_xosum_mixed_up_answer(aiohttp_client: AiohttpClient) -> None:
    """`mixed_up`: the first finished answer is another job's transcript."""
    provider = MockProvider(ready_after=0, clock=FakeClock())
    provider.add_job("doc4", mixed_up=1)
    client = await aiohttp_client(provider.app())
    assert (await xosum(client, "doc4"))[1]["docId"] == "someone-else"
    assert (await xosum(client, "doc4"))[1]["docId"] == "doc4"


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
    """With api_keys set, any other bearer token gets 401 (Aitronos: its error envelope); a
    request without docId gets 400."""
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
    async with client.get(f"{AIT}/trans_1", headers={"Authorization": "x"}) as r:
        assert r.status == 401
        body = await r.json()
    assert body["error"]["code"] == "UNAUTHORIZED"
    assert shape(body)[:1] == [("success", "bool")]
    assert [k for k in body["error"]] == [
        k for k, _ in shape(fixture("aitronos_transcription_404.json")["error"])
    ]
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


async def test_loopback_helpers() -> None:
    """serve_app binds a free port and wait_port sees it; a port nobody serves times out."""
    app = aiohttp.web.Application()
    runner, port = await net.serve_app(app, host="127.0.0.1", port=0)
    try:
        await net.wait_port(port, timeout=1)
    finally:
        await runner.cleanup()
    with pytest.raises(RuntimeError, match="nothing listens"):
        await net.wait_port(net.free_port(), timeout=0.1)
