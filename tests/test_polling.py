"""The poll loop at the limit, end to end: learned cadence across restarts, the status a person
reads to see how the budget is shared, 429 blocks read against the provider's own clock; and
answers that must not finish a job, or decide whether the key works."""

from __future__ import annotations

import asyncio
import logging
import time
from email.utils import formatdate
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from relayd.cadence import Hints
from relayd.mock import provider as mock_provider
from relayd.mock.receiver import Receiver
from tests.conftest import api, config_dict, eventually, make_config, running, settled

# a phone call of 100 s: Xosum says so on every answer (`duration` from the first one here)
PROGRESS = {"type": "phone_call", "duration": 100.0}


def add_call(provider: mock_provider.MockProvider, doc_id: str, ready_after: float) -> None:
    """A phone call of 100 s (`type` is a base field: every answer says it)."""
    provider.add_job(
        doc_id, ready_after=ready_after, progress=PROGRESS, type="phone_call", duration=100.0
    )


async def test_learned_run_times_survive_a_restart(
    tmp_path: Path, provider: mock_provider.MockProvider, receiver: Receiver
) -> None:
    """Finished jobs teach how long jobs of their kind take; a restarted daemon still knows."""
    config = make_config(config_dict(tmp_path, provider.port, {"app": receiver.port}), tmp_path)
    async with running(config) as daemon:
        assert daemon.poller.run_times.expect("main", Hints("phone_call", 100.0)) is None
        # registered as they are submitted: a slow start-up must not count as their run time
        for i in range(10):
            add_call(provider, f"learn-{i}", 0.3)
        await api(daemon, "POST", "/v1/jobs", [{"docId": f"learn-{i}"} for i in range(10)])
        await eventually(lambda: settled(daemon, 10))
        rows = daemon.store.run_times()
    assert len(rows) == 10
    for name, kind, media, ran_for in rows:
        assert (name, kind, media) == ("main", "phone_call", 100.0)
        assert 0.1 < ran_for < 1.0  # done 0.3 s after registering: the middle of its last gap
    async with running(config) as daemon:
        expected = daemon.poller.run_times.expect("main", Hints("phone_call", 100.0))
        assert expected is not None and 0.1 < expected.early < 0.35 < expected.late < 1.2


@pytest.mark.parametrize("adaptive", [True, False])
async def test_a_crowded_key_skips_polls_before_the_expected_finish(
    tmp_path: Path, provider: mock_provider.MockProvider, receiver: Receiver, adaptive: bool
) -> None:
    """With the budget short, a young job whose kind is known to take ~1 s is next polled near
    its expected finish, not every poll_interval; with adaptive_polling off, every interval."""
    data = config_dict(tmp_path, provider.port, {"app": receiver.port}, adaptive_polling=adaptive)
    config = make_config(data, tmp_path)
    for i in range(10):
        provider.add_job(
            f"learn-{i}", ready_after=1.0, progress=PROGRESS, type="phone_call", duration=100.0
        )
    for i in range(6):  # crowd the key: 6 jobs x 0.1 s interval want more than 32 polls/s
        provider.add_job(
            f"slow-{i}", ready_after=3600, progress=PROGRESS, type="phone_call", duration=100.0
        )
    provider.add_job(
        "young", ready_after=3600, progress=PROGRESS, type="phone_call", duration=100.0
    )
    async with running(config) as daemon:
        await api(daemon, "POST", "/v1/jobs", [{"docId": f"learn-{i}"} for i in range(10)])
        await eventually(lambda: len(daemon.store.run_times()) == 10)
        await api(daemon, "POST", "/v1/jobs", [{"docId": f"slow-{i}"} for i in range(6)])
        await api(daemon, "POST", "/v1/jobs", {"docId": "young"})
        await eventually(lambda: (job := daemon.store.get_job("main", "young")) is not None
                         and job.polls >= 1)  # fmt: skip
        job = daemon.store.get_job("main", "young")
        expected = daemon.poller.run_times.expect("main", Hints("phone_call", 100.0))
    assert job is not None and expected is not None
    age = job.updated_at - job.submitted_at  # at its first poll (a busy machine delays it)
    if adaptive and age < expected.early:  # not before the learned window opens (~0.8 s)
        assert expected.early > 0.6  # far more than one 0.1 s interval away: polls skipped
        assert job.next_poll_at - job.submitted_at >= expected.early - 0.01
        assert job.next_poll_at - job.updated_at <= 16 * 0.1 + 0.01  # MAX_EARLY_WAIT intervals
    else:  # polled every interval: adaptive off, or first polled once the window was open
        assert job.next_poll_at - job.updated_at == pytest.approx(0.1, abs=0.01)


async def test_status_shows_how_the_budget_is_shared(
    tmp_path: Path, provider: mock_provider.MockProvider, receiver: Receiver
) -> None:
    """Per key: budget used, jobs in flight, how often each job is polled, backlog clear time."""
    config = make_config(config_dict(tmp_path, provider.port, {"app": receiver.port}), tmp_path)
    for i in range(40):
        provider.add_job(f"busy-{i}", ready_after=3600)
    async with running(config) as daemon:
        await api(daemon, "POST", "/v1/jobs", [{"docId": f"busy-{i}"} for i in range(40)])
        await eventually(lambda: len(provider.arrivals) >= 40)
        _, status = await api(daemon, "GET", "/v1/status")
    budget = status["providers"]["main"]["budget"]
    assert budget["jobs_in_flight"] == 40
    assert budget["budget_used"] <= 8  # (0 just after a window boundary)
    # 40 jobs want a poll every 0.1 s; 8 per 0.25 s allows 32/s: each is polled every 1.25 s
    assert budget["polls_wanted_per_second"] == pytest.approx(400, rel=0.01)
    assert budget["poll_interval_effective"] == pytest.approx(1.25, rel=0.01)
    assert 0 <= budget["backlog_clear_seconds"] <= 40 / 32
    assert budget["due_now"] <= 40


@pytest.mark.parametrize("skew", [+100.0, -100.0])
async def test_retry_after_as_a_date_is_read_against_the_answers_date(
    tmp_path: Path, receiver: Receiver, aiohttp_server: object, skew: float
) -> None:
    """A 429 with `Retry-After: <HTTP date>` from a provider whose clock is 100 s off blocks
    for the 2 s the provider meant — not 102 s, and not zero."""

    async def limited(request: web.Request) -> web.Response:
        theirs = time.time() + skew
        headers = {"Date": formatdate(theirs, usegmt=True)}
        headers["Retry-After"] = formatdate(theirs + 2, usegmt=True)
        return web.json_response({"error": "slow down"}, status=429, headers=headers)

    app = web.Application()
    app.router.add_get("/api/getTranscription", limited)
    server = await aiohttp_server(app)  # type: ignore[operator]
    config = make_config(config_dict(tmp_path, server.port, {"app": receiver.port}), tmp_path)
    async with running(config) as daemon:
        await api(daemon, "POST", "/v1/jobs", {"docId": "dated"})
        await eventually(lambda: daemon.poller.status()["main"]["blocked_for"] > 0)
        blocked = daemon.poller.status()["main"]["blocked_for"]
    assert 0.9 < blocked <= 2.0  # HTTP dates have whole seconds


async def scripted_xosum(aiohttp_server: Any, answers: list[Any]) -> tuple[Any, list[web.Request]]:
    """A Xosum that answers `answers` in order (JSON bodies), then repeats the last."""
    seen: list[web.Request] = []

    async def handler(request: web.Request) -> web.Response:
        seen.append(request)
        return web.json_response(answers[min(len(seen), len(answers)) - 1])

    app = web.Application()
    app.router.add_get("/api/getTranscription", handler)
    return await aiohttp_server(app), seen


GOOD = {"docId": "j1", "status": "transcribed", "transcription": "the real one", "metadata": {}}


@pytest.mark.parametrize(
    "bad",
    [
        {**GOOD, "docId": "j2", "transcription": "another job's transcript"},
        {"docId": "j2", "status": "failed", "error": "another job's failure"},
    ],
    ids=["transcribed", "failed"],
)
async def test_an_answer_about_another_doc_id_is_a_failed_poll(
    tmp_path: Path, receiver: Receiver, aiohttp_server: Any, bad: dict[str, Any]
) -> None:
    """A terminal answer naming another docId (a cache mixed up answers) is never taken as this
    job's result: the poll fails, and the job's own answer is what gets delivered."""
    server, seen = await scripted_xosum(aiohttp_server, [bad, GOOD])
    data = config_dict(tmp_path, server.port, {"app": receiver.port})
    data["endpoints"]["app"]["events"] = ["transcript_ready", "transcript_failed"]
    async with running(make_config(data, tmp_path)) as daemon:
        await api(daemon, "POST", "/v1/jobs", {"docId": "j1"})
        [got] = await receiver.wait_for(1)
        _, detail = await api(daemon, "GET", "/v1/jobs/main/j1")
    assert (got.json()["event_type"], got.json()["transcription"]) == (
        "transcript_ready",
        "the real one",
    )
    assert [p["outcome"] for p in detail["polls"]] == ["error", "finished"]
    assert "about docId 'j2'" in detail["polls"][0]["detail"]
    assert len(seen) == 2


@pytest.mark.parametrize(
    "transcription",
    [42, None, ["a", "b"], {"text": "nested"}, "absent"],
    ids=["number", "null", "list", "object", "absent"],
)
async def test_transcribed_without_a_transcript_string_is_a_failed_poll(
    tmp_path: Path, receiver: Receiver, aiohttp_server: Any, transcription: Any
) -> None:
    """`transcribed` whose `transcription` is missing or not a string is garbage: the poll fails
    and the next good answer is delivered, never a null or a number as the transcript."""
    bad = {**GOOD, "transcription": transcription}
    if transcription == "absent":
        del bad["transcription"]
    server, _ = await scripted_xosum(aiohttp_server, [bad, GOOD])
    config = make_config(config_dict(tmp_path, server.port, {"app": receiver.port}), tmp_path)
    async with running(config) as daemon:
        await api(daemon, "POST", "/v1/jobs", {"docId": "j1"})
        [got] = await receiver.wait_for(1)
        _, detail = await api(daemon, "GET", "/v1/jobs/main/j1")
    assert got.json()["transcription"] == "the real one"
    assert [p["outcome"] for p in detail["polls"]] == ["error", "finished"]


@pytest.mark.parametrize("late", ["success", "refusal"])
async def test_an_answer_overtaken_by_a_later_polls_says_nothing_about_the_key(
    tmp_path: Path,
    receiver: Receiver,
    aiohttp_server: Any,
    caplog: pytest.LogCaptureFixture,
    late: str,
) -> None:
    """Of two polls in flight, the one sent later tells whether the key works now: a success
    sent before a 401 but answered after it does not resume the key (no flapping), and a 401
    sent before a success does not pause it."""
    arrived: list[str] = []
    refused = {"success": "second", "refusal": "first"}[late]

    async def handler(request: web.Request) -> web.Response:
        doc = request.query["docId"]
        arrived.append(doc)
        refuse = len(arrived) <= 2 and doc == refused
        if arrived == ["first"]:
            await asyncio.sleep(0.15)  # sent first, answered after the second poll
        if refuse:
            return web.json_response({"error": "invalid API key"}, status=401)
        return web.json_response({"docId": doc, "status": "processing"})

    app = web.Application()
    app.router.add_get("/api/getTranscription", handler)
    server = await aiohttp_server(app)
    config = make_config(config_dict(tmp_path, server.port, {"app": receiver.port}), tmp_path)

    def polls(doc: str) -> int:
        job = daemon.store.get_job("main", doc)
        return job.polls if job else 0

    with caplog.at_level(logging.INFO, logger="relayd"):
        async with running(config) as daemon:
            await api(daemon, "POST", "/v1/jobs", {"docId": "first"})
            await eventually(lambda: arrived == ["first"])
            await api(daemon, "POST", "/v1/jobs", {"docId": "second"})
            if late == "success":
                await eventually(lambda: polls("first") == 1)  # its success is recorded
                assert daemon.poller.status()["main"]["paused"], "a stale success resumed it"
                await eventually(lambda: not daemon.poller.status()["main"]["paused"], timeout=2)
                assert arrived[2] == "second"  # the probe, sent after the refusal
            else:
                await eventually(lambda: "not pausing" in caplog.text or "REFUSED" in caplog.text)
                assert not daemon.poller.status()["main"]["paused"], "a stale 401 paused it"
    refusals = sum("API KEY REFUSED" in r.getMessage() for r in caplog.records)
    resumes = sum("API key accepted again" in r.getMessage() for r in caplog.records)
    assert (refusals, resumes) == ((1, 1) if late == "success" else (0, 0))
