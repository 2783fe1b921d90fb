"""Aitronos end to end, the real daemon against fakes that answer in the documented shapes: ETag
revalidation, Cache-Control, paragraph paging inside the budget, the 409 race after `completed`,
answers about another transcription, error envelopes, PII headers, and both providers in one
daemon."""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from relayd.config import parse_config
from relayd.mock import provider as mock_provider
from relayd.mock.receiver import Receiver
from relayd.providers.aitronos import envelope_error, max_age
from relayd.providers.base import Answer
from tests.conftest import (
    ENV,
    api,
    config_dict,
    eventually,
    make_config,
    running,
    settled,
    states,
)
from tests.scripted import fixture
from tests.test_cli import arelayd, write_config

AIT_KEY = "ait-key-0002"
# max-age while queued/processing compressed like the 0.25 s window; once completed/failed the
# documented day, which relayd must never wait out
AIT_CACHE = (0.02, 86400.0)


async def fake_aitronos(aiohttp_server: Any, status: Any, paragraphs: Any) -> Any:
    """A hand-written Aitronos on loopback: the test's own status and paragraphs handlers."""
    app = web.Application()
    app.router.add_get("/v1/audio/transcribe/{id}", status)
    app.router.add_get("/v1/audio/transcribe/{id}/paragraphs", paragraphs)
    return await aiohttp_server(app)


def status_answer(doc_id: str, status: str, **headers: str) -> web.Response:
    """The documented status answer (the completed example, or the processing one with
    `status`), about `doc_id`."""
    name = "completed" if status == "completed" else "processing"
    doc = fixture(f"aitronos_transcription_200_{name}.json")
    doc["data"] |= {"transcription_id": doc_id, "status": status}
    return web.json_response(doc, headers=headers)


def page_answer(doc_id: str, items: list[Any], total: int | None = None) -> web.Response:
    """The documented paragraphs answer about `doc_id`: `items`, counts in `metadata`."""
    doc = fixture("aitronos_paragraphs_200.json")
    doc["data"] |= {"transcription_id": doc_id, "paragraphs": items}
    count = len(items) if total is None else total
    doc["metadata"] |= {"total_count": count, "returned_count": len(items)}
    del doc["actions"]["next"]
    return web.json_response(doc)


def paragraphs(*texts: str) -> list[dict[str, Any]]:
    return [{"text": t, "start": 4.0 * i, "end": 4.0 * i + 3.5} for i, t in enumerate(texts)]


def envelope(status: int, code: str, message: str, trace: str) -> web.Response:
    """The documented error envelope with this code."""
    doc = fixture("aitronos_paragraphs_409.json")
    doc["error"] |= {"code": code, "message": message, "status": status, "trace_id": trace}
    return web.json_response(doc, status=status)


def ait_config(tmp_path: Path, port: int, receiver: Receiver, **overrides: Any) -> dict[str, Any]:
    data = config_dict(tmp_path, port, {"app": receiver.port}, kind="aitronos", **overrides)
    data["endpoints"]["app"]["events"] = ["transcription.completed", "transcription.failed"]
    return data


@pytest.fixture
async def ait() -> Any:
    """A mock Aitronos: 8 requests per 0.25 s window, documented answers (max-age compressed)."""
    mock, runner, _ = await mock_provider.serve(
        window=0.25, limit=8, ready_after=0.6, cache_ages=AIT_CACHE
    )
    yield mock
    await runner.cleanup()


# -- pure helpers --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "seconds"),
    [
        ("max-age=10", 10.0),
        ("public, max-age=86400", 86400.0),
        ("private, max-age=2.5", 2.5),
        ('public, MAX-AGE="7", must-revalidate', 7.0),
        ("no-cache", None),
        ("s-maxage=5", None),
        (None, None),
    ],
)
def test_max_age(header: str | None, seconds: float | None) -> None:
    assert max_age(header) == seconds


def test_error_envelope_is_read_for_the_log() -> None:
    body = b'{"success": false, "error": {"code": "X", "message": "m", "trace_id": "t-1"}}'
    assert envelope_error(Answer(500, {}, body)) == "code=X message=m trace_id=t-1"
    documented = (
        Path(__file__).parent / "fixtures/providers/aitronos_paragraphs_409.json"
    ).read_bytes()
    assert envelope_error(Answer(409, {}, documented)) == (
        "code=TRANSCRIPTION_NOT_COMPLETE message=This transcription is still being processed."
        " trace_id=abc-123-def"
    )
    assert (
        envelope_error(Answer(502, {}, b"<html>bad gateway</html>")) == "<html>bad gateway</html>"
    )


# -- against the mock ----------------------------------------------------------------------------


async def test_etag_revalidation_and_the_delivered_body(
    tmp_path: Path, ait: mock_provider.MockProvider, receiver: Receiver
) -> None:
    """Unchanged answers come back as 304 (counted by the fake); the body is SPEC §4's, with
    the envelope's billing and the PII headers."""
    ait.add_job("trans_1", ready_after=1.0, paragraphs=3, pii_policies=["email", "phone"])
    config = make_config(ait_config(tmp_path, ait.port, receiver), tmp_path)
    async with running(config) as daemon:
        await api(daemon, "POST", "/v1/jobs", {"docId": "trans_1", "metadata": {"team": "a"}})
        await receiver.wait_for(1)
    assert ait.status_counts[304] >= 2, ait.status_counts
    body = receiver.accepted[0].json()
    assert list(body) == [
        "event_type", "transcription_id", "status", "data", "paragraphs", "text", "billing",
        "pii_redacted", "pii_policies", "metadata",
    ]  # fmt: skip
    assert body["event_type"] == "transcription.completed"
    assert (body["transcription_id"], body["status"]) == ("trans_1", "completed")
    assert body["data"]["transcription_id"] == "trans_1" and body["data"]["status"] == "completed"
    assert body["data"]["audio_metadata"]["duration_seconds"] == 125.5
    assert [p["text"] for p in body["paragraphs"]] == [
        f"Paragraph {i} of trans_1." for i in range(3)
    ]
    assert body["text"] == "\n\n".join(p["text"] for p in body["paragraphs"])
    assert body["billing"] == {
        "synapses_consumed": 126,
        "synapses_refunded": 0,
        "currency": "synapses",
    }
    assert body["pii_redacted"] is True and body["pii_policies"] == ["email", "phone"]
    assert body["metadata"] == {"team": "a"}


async def test_cache_control_max_age_spaces_the_polls_of_one_job(
    tmp_path: Path, receiver: Receiver
) -> None:
    """max-age=0.5 with poll_interval 0.1: one job is polled at most every 0.5 s."""
    mock, runner, port = await mock_provider.serve(window=0.25, limit=8, cache_ages=(0.5, 86400))
    try:
        mock.add_job("trans_cc", ready_after=1.6, paragraphs=1)
        config = make_config(ait_config(tmp_path, port, receiver), tmp_path)
        async with running(config) as daemon:
            await api(daemon, "POST", "/v1/jobs", {"docId": "trans_cc"})
            await receiver.wait_for(1)
        status_polls = len(mock.arrivals) - 1  # one paragraph page
        assert status_polls <= 5  # 0, 0.5, 1.0, 1.5, 2.0 — not sixteen
    finally:
        await runner.cleanup()


async def test_2500_paragraphs_arrive_whole_in_order_inside_the_budget(
    tmp_path: Path, ait: mock_provider.MockProvider, receiver: Receiver
) -> None:
    """Three jobs of 2,500 paragraphs: pages of 1,000, every request within 8 per 0.25 s."""
    for i in range(3):
        ait.add_job(f"trans_big{i}", ready_after=0.2, paragraphs=2500)
    for i in range(10):
        ait.add_job(f"trans_small{i}", ready_after=0.4, paragraphs=2)
    config = make_config(ait_config(tmp_path, ait.port, receiver), tmp_path)
    async with running(config) as daemon:
        docs = [{"docId": f"trans_big{i}"} for i in range(3)]
        docs += [{"docId": f"trans_small{i}"} for i in range(10)]
        await api(daemon, "POST", "/v1/jobs", docs)
        await eventually(lambda: settled(daemon, 13), timeout=20)
    big = [r.json() for r in receiver.accepted if "big" in r.json()["transcription_id"]]
    assert len(big) == 3
    for body in big:
        doc = body["transcription_id"]
        assert [p["text"] for p in body["paragraphs"]] == [
            f"Paragraph {i} of {doc}." for i in range(2500)
        ]
        assert body["text"].count("\n\n") == 2499
    assert ait.rejected == 0
    assert ait.max_in_rolling_window() <= 8


async def test_failed_is_transcription_failed(
    tmp_path: Path, ait: mock_provider.MockProvider, receiver: Receiver
) -> None:
    """`failed` sends transcription.failed with the answer's data and billing."""
    ait.add_job("fail_1", outcome="failed", ready_after=0.1)
    config = make_config(ait_config(tmp_path, ait.port, receiver), tmp_path)
    async with running(config) as daemon:
        await api(daemon, "POST", "/v1/jobs", {"docId": "fail_1"})
        [got] = await receiver.wait_for(1)
        job = daemon.store.get_job("main", "fail_1")
        assert job is not None and job.result_status == "failed"
    body = got.json()
    assert list(body) == ["event_type", "transcription_id", "status", "data", "billing"]
    assert (body["event_type"], body["status"]) == ("transcription.failed", "failed")
    assert body["data"]["status"] == "failed"
    assert body["billing"]["synapses_refunded"] == body["billing"]["synapses_consumed"]


async def test_a_failed_job_nobody_wants_ends_failed_not_delivered(
    tmp_path: Path, ait: mock_provider.MockProvider, receiver: Receiver
) -> None:
    """With no endpoint hearing transcription.failed, a failed job is `failed`: nothing was
    delivered, and it must not read `delivered`."""
    ait.add_job("trans_f", outcome="failed", ready_after=0.1)
    data = ait_config(tmp_path, ait.port, receiver)
    data["endpoints"]["app"]["events"] = ["transcription.completed"]
    async with running(make_config(data, tmp_path)) as daemon:
        await api(daemon, "POST", "/v1/jobs", {"docId": "trans_f"})
        await eventually(lambda: settled(daemon, 1))
        assert states(daemon) == {"failed": 1}
    assert receiver.accepted == []


async def test_an_undocumented_status_is_not_yet_until_max_job_age(
    tmp_path: Path, ait: mock_provider.MockProvider, receiver: Receiver
) -> None:
    """`cancelled` is not among the documented statuses: not yet, polled until max_job_age,
    then `expired`; never delivered as a failure."""
    ait.add_job("trans_c", outcome="failed", ready_after=0.1, status="cancelled")
    data = ait_config(tmp_path, ait.port, receiver, max_job_age="1s")
    async with running(make_config(data, tmp_path)) as daemon:
        await api(daemon, "POST", "/v1/jobs", {"docId": "trans_c"})
        await eventually(lambda: settled(daemon, 1))
        assert states(daemon) == {"expired": 1}
        job = daemon.store.get_job("main", "trans_c")
        assert job is not None and job.last_status == "cancelled" and job.polls >= 2
    assert receiver.accepted == []


async def test_the_409_race_after_completed_is_delivered_within_a_few_polls(
    tmp_path: Path, ait: mock_provider.MockProvider, receiver: Receiver
) -> None:
    """The status says completed (max-age=86400) while the paragraphs answer 409 for 0.5 s more:
    the job is polled again at poll_interval (0.1 s), so the transcript arrives well within a
    second of the paragraphs being ready, not a day later."""
    job = ait.add_job("trans_lag", ready_after=0.2, paragraphs=2, paragraphs_lag=0.5)
    config = make_config(ait_config(tmp_path, ait.port, receiver), tmp_path)
    async with running(config) as daemon:
        await api(daemon, "POST", "/v1/jobs", {"docId": "trans_lag"})
        [got] = await receiver.wait_for(1, timeout=5)
        _, detail = await api(daemon, "GET", "/v1/jobs/main/trans_lag")
    assert got.at - (job.finished_at + job.paragraphs_lag) < 1.0
    assert [p["text"] for p in got.json()["paragraphs"]] == [
        "Paragraph 0 of trans_lag.",
        "Paragraph 1 of trans_lag.",
    ]
    assert ait.status_counts[409] >= 2  # it really raced
    assert "pending" in [p["outcome"] for p in detail["polls"]]


async def test_a_mixed_up_answer_is_never_delivered(
    tmp_path: Path, ait: mock_provider.MockProvider, receiver: Receiver
) -> None:
    """The mock serves the first finished answers about another transcription: relayd fails
    those polls and delivers the job's own transcript, once."""
    ait.add_job("trans_mine", ready_after=0.1, paragraphs=1, mixed_up=2)
    config = make_config(ait_config(tmp_path, ait.port, receiver), tmp_path)
    async with running(config) as daemon:
        await api(daemon, "POST", "/v1/jobs", {"docId": "trans_mine"})
        [got] = await receiver.wait_for(1)
        await eventually(lambda: settled(daemon, 1))
        _, detail = await api(daemon, "GET", "/v1/jobs/main/trans_mine")
    body = got.json()
    assert body["data"]["transcription_id"] == "trans_mine"
    assert body["text"] == "Paragraph 0 of trans_mine."
    errors = [p["detail"] for p in detail["polls"] if p["outcome"] == "error"]
    assert len(errors) == 2
    assert all("about transcription_id 'trans_someone_else'" in e for e in errors)
    assert len(receiver.received) == 1


# -- against hand-written fakes ------------------------------------------------------------------


async def test_409_means_not_yet_and_error_envelopes_are_logged(
    tmp_path: Path, receiver: Receiver, aiohttp_server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A 500 envelope is logged with its code and trace id and retried; paragraphs answering
    409 TRANSCRIPTION_NOT_COMPLETE are asked again later; then the transcript is delivered."""
    calls = {"status": 0, "paragraphs": 0}

    async def status(request: web.Request) -> web.Response:
        calls["status"] += 1
        assert request.headers["X-API-Key"] == AIT_KEY  # auth_header = "X-API-Key"
        if calls["status"] == 1:
            return envelope(500, "INTERNAL", "database hiccup", "trace-500")
        return status_answer("trans_x", "completed", ETag='"v1"')

    async def pages(request: web.Request) -> web.Response:
        calls["paragraphs"] += 1
        if calls["paragraphs"] <= 2:
            return envelope(409, "TRANSCRIPTION_NOT_COMPLETE", "not complete", "trace-409")
        return page_answer("trans_x", paragraphs("Hello."))

    server = await fake_aitronos(aiohttp_server, status, pages)
    data_cfg = ait_config(tmp_path, server.port, receiver, auth_header="X-API-Key")
    data_cfg["providers"]["main"]["api_key"] = "env:AIT_KEY"
    config = parse_config(data_cfg, base_dir=tmp_path, env={**ENV, "AIT_KEY": AIT_KEY})
    with caplog.at_level(logging.INFO):
        async with running(config) as daemon:
            await api(daemon, "POST", "/v1/jobs", {"docId": "trans_x"})
            await receiver.wait_for(1)
    assert calls["status"] >= 4 and calls["paragraphs"] == 3
    assert receiver.accepted[0].json()["text"] == "Hello."
    assert "code=INTERNAL message=database hiccup trace_id=trace-500" in caplog.text
    assert "paragraphs not ready yet (current_status 'processing')" in caplog.text


async def test_garbage_paging_is_never_delivered(
    tmp_path: Path, receiver: Receiver, aiohttp_server: Any
) -> None:
    """A page that stops short of total_count is retried, not delivered as a partial transcript."""
    calls = 0

    async def status(request: web.Request) -> web.Response:
        return status_answer("trans_g", "completed")

    async def pages(request: web.Request) -> web.Response:
        nonlocal calls
        calls += 1
        return page_answer("trans_g", [] if calls <= 2 else paragraphs("a", "b"), total=2)

    server = await fake_aitronos(aiohttp_server, status, pages)
    config = make_config(ait_config(tmp_path, server.port, receiver), tmp_path)
    async with running(config) as daemon:
        await api(daemon, "POST", "/v1/jobs", {"docId": "trans_g"})
        await receiver.wait_for(1)
    assert len(receiver.accepted) == 1
    assert receiver.accepted[0].json()["text"] == "a\n\nb"


async def test_a_completed_job_whose_paragraphs_fail_shows_completed(
    tmp_path: Path, receiver: Receiver, aiohttp_server: Any
) -> None:
    """While the paragraphs keep failing, `relayd jobs` shows LAST STATUS `completed` (what the
    provider last said), not the status before it."""
    calls = 0

    async def status(request: web.Request) -> web.Response:
        nonlocal calls
        calls += 1
        return status_answer("trans_s", "processing" if calls == 1 else "completed")

    async def pages(request: web.Request) -> web.Response:
        return envelope(500, "INTERNAL", "paragraph store down", "trace-p")

    server = await fake_aitronos(aiohttp_server, status, pages)
    data = ait_config(tmp_path, server.port, receiver)
    path = write_config(tmp_path, data)
    async with running(make_config(data, tmp_path)) as daemon:
        await api(daemon, "POST", "/v1/jobs", {"docId": "trans_s"})
        await eventually(lambda: calls >= 3, what="polls after completed")
        code, out, err = await arelayd("jobs", "-c", str(path))
    assert code == 0, err
    [row] = [line.split() for line in out.splitlines() if "trans_s" in line]
    assert row[:4] == ["main", "trans_s", "polling", "completed"]
    assert receiver.accepted == []


@pytest.mark.parametrize("status", ["completed", "failed"])
async def test_an_answer_about_another_id_is_a_failed_poll(
    tmp_path: Path, receiver: Receiver, aiohttp_server: Any, status: str
) -> None:
    """A terminal answer whose `data.transcription_id` names another transcription is never
    taken as this job's result: the poll fails, and the job's own answer is what gets
    delivered."""
    calls = 0

    async def status_route(request: web.Request) -> web.Response:
        nonlocal calls
        calls += 1
        if calls == 1:
            return status_answer("trans_other", status)
        return status_answer("trans_mine", "completed")

    async def pages(request: web.Request) -> web.Response:
        return page_answer(request.match_info["id"], paragraphs("mine"))

    server = await fake_aitronos(aiohttp_server, status_route, pages)
    config = make_config(ait_config(tmp_path, server.port, receiver), tmp_path)
    async with running(config) as daemon:
        await api(daemon, "POST", "/v1/jobs", {"docId": "trans_mine"})
        [got] = await receiver.wait_for(1)
        _, detail = await api(daemon, "GET", "/v1/jobs/main/trans_mine")
    body = got.json()
    assert (body["event_type"], body["data"]["transcription_id"], body["text"]) == (
        "transcription.completed",
        "trans_mine",
        "mine",
    )
    assert [p["outcome"] for p in detail["polls"]] == ["error", "finished"]
    assert "about transcription_id 'trans_other'" in detail["polls"][0]["detail"]


@pytest.mark.parametrize(
    "items",
    [[1, 2], [None, None], [{"text": 7}, {"text": "b"}], [{}, {}]],
    ids=["numbers", "nulls", "text-not-a-string", "no-text"],
)
async def test_a_page_of_paragraphs_that_are_not_paragraphs_is_retried(
    tmp_path: Path, receiver: Receiver, aiohttp_server: Any, items: list[Any]
) -> None:
    """Paragraphs that are not objects with a `text` string are garbage: the poll fails and the
    next full transcript is delivered, never the garbage items or an empty text."""
    calls = 0

    async def status(request: web.Request) -> web.Response:
        return status_answer("trans_p", "completed")

    async def pages(request: web.Request) -> web.Response:
        nonlocal calls
        calls += 1
        return page_answer("trans_p", copy.deepcopy(items) if calls == 1 else paragraphs("a", "b"))

    server = await fake_aitronos(aiohttp_server, status, pages)
    config = make_config(ait_config(tmp_path, server.port, receiver), tmp_path)
    async with running(config) as daemon:
        await api(daemon, "POST", "/v1/jobs", {"docId": "trans_p"})
        [got] = await receiver.wait_for(1)
        _, detail = await api(daemon, "GET", "/v1/jobs/main/trans_p")
    assert got.json()["paragraphs"] == paragraphs("a", "b")
    assert got.json()["text"] == "a\n\nb"
    assert [p["outcome"] for p in detail["polls"]] == ["error", "finished"]


async def test_both_providers_side_by_side_each_on_its_own_budget(
    tmp_path: Path, receiver: Receiver
) -> None:
    """Xosum and Aitronos in one daemon, each key with its own budget of 6 per 0.25 s."""
    mock, runner, port = await mock_provider.serve(
        window=0.25,
        limit=6,
        ready_after=0.4,
        api_keys={ENV["XOSUM_KEY"], AIT_KEY},
        cache_ages=AIT_CACHE,
    )
    try:
        data = config_dict(tmp_path, port, {"app": receiver.port}, rate_limit=6)
        data["providers"]["ait"] = {
            **data["providers"]["main"],
            "kind": "aitronos",
            "api_key": "env:AIT_KEY",
        }
        config = parse_config(data, base_dir=tmp_path, env={**ENV, "AIT_KEY": AIT_KEY})
        async with running(config) as daemon:
            status = daemon.poller.status()
            assert status["main"]["key"] != status["ait"]["key"]
            xs = [{"docId": f"x-{i}", "provider": "main"} for i in range(20)]
            ais = [{"docId": f"trans_{i}", "provider": "ait"} for i in range(20)]
            await api(daemon, "POST", "/v1/jobs", xs + ais)
            await eventually(lambda: settled(daemon, 40), timeout=20)
        events = sorted(r.json()["event_type"] for r in receiver.accepted)
        assert events == ["transcript_ready"] * 20 + ["transcription.completed"] * 20
        assert mock.rejected == 0
        assert mock.max_in_rolling_window(ENV["XOSUM_KEY"]) <= 6
        assert mock.max_in_rolling_window(AIT_KEY) <= 6
        assert len(mock.arrivals) > 80  # each key polled its 20 jobs (and paragraph pages)
    finally:
        await runner.cleanup()
