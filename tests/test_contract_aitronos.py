"""Aitronos's own examples, verbatim, through relayd's Aitronos code: every status and error the
documents show, and what relayd makes of each (`tests/fixtures/providers/`, from
`shared/providers/aitronos-*.txt`)."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from relayd.cadence import Hints
from relayd.config import DEFAULT_BASE_URLS
from relayd.errors import NotFound, Retryable
from relayd.providers.aitronos import AitronosProvider
from relayd.providers.base import Finished, Progress
from tests.scripted import (
    API_KEY,
    ScriptedHttp,
    Sent,
    answer,
    fixture,
    fixture_bytes,
    job,
    provider_config,
)

DOC = "trans_a1b2c3d4e5f6a7b8c9d0e1f2a3b4c5d6"  # the id in every example
BASE = "https://api.aitronos.com/v1/audio/transcribe"
ACTIVE = {"ETag": '"abc123etag"', "Cache-Control": "public, max-age=5"}
FINAL = {"ETag": '"def456etag"', "Cache-Control": "public, max-age=86400"}
COMPLETED = "aitronos_transcription_200_completed.json"
PROCESSING = "aitronos_transcription_200_processing.json"
PARAGRAPHS = "aitronos_paragraphs_200.json"


@pytest.fixture
def provider() -> AitronosProvider:
    """relayd's Aitronos provider at the documented base_url (the default)."""
    return AitronosProvider(provider_config("aitronos"))


def with_status(status: str) -> dict[str, Any]:
    """The processing example with another `data.status`."""
    doc: dict[str, Any] = fixture(PROCESSING)
    doc["data"]["status"] = status
    return doc


def the_rest(sent: Sent) -> Any:
    """Paragraphs 2-7 of the example's eight, asked for at offset 2: the page the example's own
    `total_count` promises (its `next` link points at offset 10, past them)."""
    assert sent.params == {"limit": "1000", "offset": "2"}, sent.params
    doc = fixture(PARAGRAPHS)
    doc["data"]["paragraphs"] = [
        {"text": f"Paragraph {i} of the meeting.", "start": 13.1 * i, "end": 13.1 * i + 12.0}
        for i in range(2, 8)
    ]
    doc["metadata"]["returned_count"] = 6
    del doc["actions"]["next"]
    doc["actions"]["previous"] = f"{BASE}/{DOC}/paragraphs?limit=1000&offset=0"
    return answer(doc)


def test_the_default_base_url_is_the_documented_one() -> None:
    """Left out of the config, base_url is https://api.aitronos.com."""
    assert DEFAULT_BASE_URLS["aitronos"] == "https://api.aitronos.com"
    assert provider_config("aitronos").base_url == "https://api.aitronos.com"


async def test_processing_example_is_not_yet_and_teaches_the_cadence(
    provider: AitronosProvider,
) -> None:
    """200 (processing): not yet, its ETag kept, max-age=5 respected, and the media length
    (`data.audio_metadata.duration_seconds`) and model handed to the adaptive cadence."""
    http = ScriptedHttp(answer(fixture_bytes(PROCESSING), headers=ACTIVE))
    outcome = await provider.poll(job(DOC), http)
    assert outcome == Progress(
        "processing", 200, '"abc123etag"', 5.0, Hints("fvt-1", 125.5), finishing=False
    )
    [sent] = http.sent
    assert sent.url == f"{BASE}/{DOC}" and sent.prepaid
    assert sent.headers == {"Authorization": f"Bearer {API_KEY}"}


@pytest.mark.parametrize("status", ["queued", "processing", "cancelled", "exploding", ""])
async def test_statuses_other_than_completed_and_failed_are_not_yet(
    provider: AitronosProvider, status: str
) -> None:
    """The documented `queued`/`processing`, and any status the documents do not name."""
    outcome = await provider.poll(
        job(DOC), ScriptedHttp(answer(with_status(status), headers=ACTIVE))
    )
    assert isinstance(outcome, Progress) and outcome.status == status


async def test_304_revalidates_with_the_last_etag(provider: AitronosProvider) -> None:
    """If-None-Match carries the stored ETag; a 304 keeps the last status and is not parsed."""
    polled = job(DOC, etag='"abc123etag"', last_status="processing")
    http = ScriptedHttp(answer(b"", 304, headers=ACTIVE))
    outcome = await provider.poll(polled, http)
    assert outcome == Progress("processing", 304, '"abc123etag"', 5.0)
    assert http.sent[0].headers["If-None-Match"] == '"abc123etag"'


async def test_completed_example_with_the_paragraphs_example_delivers_all_eight_in_order(
    provider: AitronosProvider,
) -> None:
    """The paragraphs example says total_count 8, returns 2 and links `next` at offset 10:
    relayd asks for offset 2 (its own count), never 10, and delivers all eight in order."""
    http = ScriptedHttp(
        answer(fixture_bytes(COMPLETED), headers=FINAL),
        answer(fixture_bytes(PARAGRAPHS), headers=FINAL),
        the_rest,
    )
    outcome = await provider.poll(job(DOC, metadata={"team": "a"}), http)
    assert isinstance(outcome, Finished) and outcome.succeeded
    assert outcome.hints == Hints("fvt-1", 125.5)
    [event] = outcome.events
    body = event.payload
    assert event.name == body["event_type"] == "transcription.completed"
    assert list(body) == [
        "event_type", "transcription_id", "status", "data", "paragraphs", "text", "billing",
        "metadata",
    ]  # fmt: skip
    example = fixture(COMPLETED)
    assert (body["transcription_id"], body["status"]) == (DOC, "completed")
    assert body["data"] == example["data"]
    assert body["billing"] == example["billing"]
    assert body["metadata"] == {"team": "a"}
    first_two = fixture(PARAGRAPHS)["data"]["paragraphs"]
    assert body["paragraphs"][:2] == first_two
    assert [p["text"] for p in body["paragraphs"][2:]] == [
        f"Paragraph {i} of the meeting." for i in range(2, 8)
    ]
    assert body["text"] == "\n\n".join(p["text"] for p in body["paragraphs"])
    assert [s.params for s in http.sent[1:]] == [
        {"limit": "1000", "offset": "0"},
        {"limit": "1000", "offset": "2"},
    ]
    assert [s.prepaid for s in http.sent] == [True, False, False]  # pages spend budget too


@pytest.mark.parametrize(
    ("given", "returned_count", "total_count"),
    [(0, 0, 8), (6, 6, 2), (6, 5, 8), (7, 7, 8)],
    ids=["the-promised-six-never-come", "count-changes", "returned-count-lies", "too-many"],
)
async def test_paragraphs_that_contradict_themselves_are_a_failed_poll(
    provider: AitronosProvider, given: int, returned_count: int, total_count: int
) -> None:
    """Never a partial transcript: a follow-up page that cannot complete the example's count
    fails the poll, and the job's history shows the status seen (`completed`)."""
    doc = fixture(PARAGRAPHS)
    doc["data"]["paragraphs"] = [{"text": f"p{i}", "start": i, "end": i + 1} for i in range(given)]
    doc["metadata"] |= {"returned_count": returned_count, "total_count": total_count}
    http = ScriptedHttp(
        answer(fixture_bytes(COMPLETED), headers=FINAL),
        answer(fixture_bytes(PARAGRAPHS)),
        answer(doc),
    )
    with pytest.raises(Retryable) as caught:
        await provider.poll(job(DOC), http)
    assert caught.value.status == "completed"


async def test_paragraphs_409_example_after_completed_polls_again_soon(
    provider: AitronosProvider,
) -> None:
    """The status says completed (max-age=86400), the paragraphs answer the 409 example: a
    short race, so the job is due again at poll_interval, not after the day's max-age."""
    http = ScriptedHttp(
        answer(fixture_bytes(COMPLETED), headers=FINAL),
        answer(fixture_bytes("aitronos_paragraphs_409.json"), 409),
    )
    outcome = await provider.poll(job(DOC), http)
    assert outcome == Progress(
        "completed", 200, '"def456etag"', None, Hints("fvt-1", 125.5), finishing=True
    )
    # the next poll needs the full answer again (its `data` goes into the body): no 304
    again = ScriptedHttp(
        answer(fixture_bytes(COMPLETED), headers=FINAL),
        answer(fixture_bytes(PARAGRAPHS)),
        the_rest,
    )
    polled = job(DOC, etag='"def456etag"', last_status="completed")
    assert isinstance(await provider.poll(polled, again), Finished)
    assert "If-None-Match" not in again.sent[0].headers


@pytest.mark.parametrize("example", [COMPLETED, PROCESSING])
async def test_an_answer_about_another_transcription_is_a_failed_poll(
    provider: AitronosProvider, example: str
) -> None:
    """`data.transcription_id` names the job; an example polled for another id is not its
    answer, whatever its status."""
    http = ScriptedHttp(answer(fixture_bytes(example), headers=FINAL))
    with pytest.raises(Retryable, match=f"about transcription_id '{DOC}'"):
        await provider.poll(job("trans_mine"), http)
    assert len(http.sent) == 1  # no paragraphs fetched for someone else's transcript


async def test_paragraphs_about_another_transcription_are_a_failed_poll(
    provider: AitronosProvider,
) -> None:
    doc = fixture(PARAGRAPHS)
    doc["data"]["transcription_id"] = "trans_someone_else"
    http = ScriptedHttp(answer(fixture_bytes(COMPLETED), headers=FINAL), answer(doc))
    with pytest.raises(Retryable, match="trans_someone_else"):
        await provider.poll(job(DOC), http)


async def test_404_example_is_not_found_with_its_code(provider: AitronosProvider) -> None:
    http = ScriptedHttp(answer(fixture_bytes("aitronos_transcription_404.json"), 404))
    with pytest.raises(NotFound, match=r"code=NOT_FOUND .*trace_id=abc-123-def"):
        await provider.poll(job("trans_nonexistent"), http)


async def test_failed_is_transcription_failed_with_its_billing(provider: AitronosProvider) -> None:
    """`failed` (terminal, max-age=86400): transcription.failed with `data` and `billing`; no
    paragraphs are asked for."""
    doc = with_status("failed")
    http = ScriptedHttp(answer(doc, headers=FINAL))
    outcome = await provider.poll(job(DOC), http)
    assert isinstance(outcome, Finished) and not outcome.succeeded
    [event] = outcome.events
    assert event.name == "transcription.failed"
    assert event.payload == {
        "event_type": "transcription.failed",
        "transcription_id": DOC,
        "status": "failed",
        "data": doc["data"],
        "billing": doc["billing"],
    }
    assert len(http.sent) == 1


@pytest.mark.parametrize(
    "mangle",
    [
        lambda d: d.pop("data"),
        lambda d: d.update(success=False),
        lambda d: d["data"].pop("status"),
        lambda d: d["data"].pop("transcription_id"),
    ],
    ids=["no-data", "success-false", "no-status", "no-transcription-id"],
)
async def test_an_example_missing_what_identifies_it_is_a_failed_poll(
    provider: AitronosProvider, mangle: Any
) -> None:
    doc = copy.deepcopy(fixture(COMPLETED))
    mangle(doc)
    with pytest.raises(Retryable):
        await provider.poll(job(DOC), ScriptedHttp(answer(doc, headers=FINAL)))
