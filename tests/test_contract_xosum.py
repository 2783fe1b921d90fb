"""Xosum's documented answers through relayd's Xosum code: every status the document names, and
the webhook bodies relayd builds from them. Xosum's document has no JSON example, so the
fixtures are built from its field table (`tests/fixtures/providers/README.md`)."""

from __future__ import annotations

from typing import Any

import pytest

from relayd.cadence import Hints
from relayd.errors import NotFound, Retryable, Unauthorized
from relayd.providers.base import Finished, Progress
from relayd.providers.xosum import XosumProvider
from tests.scripted import (
    API_KEY,
    WEBHOOK_SECRET,
    ScriptedHttp,
    answer,
    fixture,
    fixture_bytes,
    job,
    provider_config,
)

DOC = "Xk29fQm3LpA7"
LINK = "https://app.xosum.am/t/{docId}"


@pytest.fixture
def provider() -> XosumProvider:
    return XosumProvider(provider_config("xosum", link_template=LINK))


@pytest.mark.parametrize(
    ("name", "media"),
    [
        ("xosum_uploading.json", None),
        ("xosum_converting.json", 48.2),
        ("xosum_processing.json", 48.2),
    ],
)
async def test_in_progress_statuses_are_not_yet(
    provider: XosumProvider, name: str, media: float | None
) -> None:
    """uploading, converting, processing: not yet; `type` and `duration` (once known) teach the
    adaptive cadence."""
    http = ScriptedHttp(answer(fixture_bytes(name)))
    outcome = await provider.poll(job(DOC), http)
    assert outcome == Progress(fixture(name)["status"], 200, hints=Hints("single_voice", media))
    [sent] = http.sent
    assert sent.url == "https://app.xosum.am/api/getTranscription"
    assert sent.params == {"docId": DOC} and sent.prepaid
    assert sent.headers == {"Authorization": f"Bearer {API_KEY}"}


async def test_transcribed_is_xosums_own_webhook_body(provider: XosumProvider) -> None:
    """transcript_ready: Xosum's webhook fields in order, then the poll's extras as they came;
    the submitted metadata is merged over Xosum's."""
    doc = fixture("xosum_transcribed_single_voice.json")
    outcome = await provider.poll(
        job(DOC, metadata={"ticket": "7"}),
        ScriptedHttp(answer(fixture_bytes("xosum_transcribed_single_voice.json"))),
    )
    assert isinstance(outcome, Finished) and outcome.succeeded
    assert outcome.hints == Hints("single_voice", 48.2)
    [event] = outcome.events
    assert event.name == "transcript_ready"
    assert list(event.payload.items()) == [
        ("event_type", "transcript_ready"),
        ("secret", WEBHOOK_SECRET),
        ("docId", DOC),
        ("transcription", doc["transcription"]),
        ("metadata", {"orderId": "A-1042", "ticket": "7"}),
        ("title", doc["title"]),
        ("resolution", doc["resolution"]),
        ("link", f"https://app.xosum.am/t/{DOC}"),
        ("languageCode", "hy-AM"),
        ("type", "single_voice"),
        ("duration", 48.2),
        ("createdAt", doc["createdAt"]),
    ]


async def test_a_phone_call_keeps_its_speaker_labels(provider: XosumProvider) -> None:
    """A `phone_call` transcript is diarized with inline `Խոսնակ 1:` / `Խոսնակ 2:` labels; it
    reaches the endpoint exactly as Xosum wrote it."""
    name = "xosum_transcribed_phone_call.json"
    doc = fixture(name)
    outcome = await provider.poll(job(doc["docId"]), ScriptedHttp(answer(fixture_bytes(name))))
    assert isinstance(outcome, Finished)
    body = outcome.events[0].payload
    assert body["transcription"] == doc["transcription"]
    assert "Խոսնակ 1:" in body["transcription"] and "Խոսնակ 2:" in body["transcription"]
    assert (body["type"], body["duration"]) == ("phone_call", 183.0)
    assert body["metadata"] == {}
    assert outcome.hints == Hints("phone_call", 183.0)


async def test_failed_is_transcript_failed(provider: XosumProvider) -> None:
    """transcript_failed: event_type, secret, docId, metadata, error, type, createdAt."""
    doc = fixture("xosum_failed.json")
    outcome = await provider.poll(
        job(DOC), ScriptedHttp(answer(fixture_bytes("xosum_failed.json")))
    )
    assert isinstance(outcome, Finished) and not outcome.succeeded
    [event] = outcome.events
    assert event.name == "transcript_failed"
    assert list(event.payload.items()) == [
        ("event_type", "transcript_failed"),
        ("secret", WEBHOOK_SECRET),
        ("docId", DOC),
        ("metadata", {"orderId": "A-1042"}),
        ("error", "Audio file could not be decoded"),
        ("type", "single_voice"),
        ("createdAt", doc["createdAt"]),
    ]


@pytest.mark.parametrize(
    "mangle",
    [
        lambda d: d.update(docId="someone-else"),
        lambda d: d.pop("docId"),
        lambda d: d.pop("transcription"),
        lambda d: d.update(transcription=None),
        lambda d: d.pop("status"),
    ],
    ids=["another-job", "no-docId", "no-transcription", "null-transcription", "no-status"],
)
async def test_an_answer_that_is_not_this_jobs_transcript_is_a_failed_poll(
    provider: XosumProvider, mangle: Any
) -> None:
    """Every answer names its job (`docId` is a base field): an answer about another job, or a
    `transcribed` without its text, is never delivered."""
    doc = fixture("xosum_transcribed_single_voice.json")
    mangle(doc)
    with pytest.raises(Retryable):
        await provider.poll(job(DOC), ScriptedHttp(answer(doc)))


@pytest.mark.parametrize(
    ("status", "error"),
    [(404, NotFound), (401, Unauthorized), (403, Unauthorized), (500, Retryable)],
)
async def test_error_statuses(provider: XosumProvider, status: int, error: type[Exception]) -> None:
    with pytest.raises(error):
        await provider.poll(job(DOC), ScriptedHttp(answer({"error": "nope"}, status)))
