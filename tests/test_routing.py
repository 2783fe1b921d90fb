"""Routing a finished job's events to endpoints: who hears what, and the body they get."""

from __future__ import annotations

import json

from relayd.config import EndpointConfig
from relayd.models import NewDelivery
from relayd.providers.base import Event
from relayd.routing import route


def endpoint(name: str, *events: str) -> EndpointConfig:
    return EndpointConfig(
        name=name,
        url=f"http://127.0.0.1:9/hook/{name}",
        timeout=10.0,
        events=events,
        signing_secrets=(),
        max_attempts=15,
        retry_initial=1.0,
        retry_max=600.0,
        max_in_flight=8,
    )


ENDPOINTS = {
    "app": endpoint("app", "transcript_ready", "transcription.completed"),
    "audit": endpoint("audit", "transcription.failed"),
    "ready-only": endpoint("ready-only", "transcript_ready"),
}
READY = Event("transcript_ready", {"docId": "d1", "text": "ready"})
FAILED = Event("transcription.failed", {"docId": "d1", "error": "bad audio"})


def test_each_event_goes_to_every_target_that_lists_it() -> None:
    """One delivery per (event, target listening to it), in event then target order."""
    got = route([READY, FAILED], ["app", "audit", "ready-only"], ENDPOINTS)
    assert [(d.event, d.endpoint) for d in got] == [
        ("transcript_ready", "app"),
        ("transcript_ready", "ready-only"),
        ("transcription.failed", "audit"),
    ]


def test_only_the_targets_are_considered() -> None:
    """An endpoint that listens but is not among the job's targets gets nothing."""
    got = route([READY], ["ready-only"], ENDPOINTS)
    assert got == [NewDelivery("ready-only", "transcript_ready", json.dumps(READY.payload))]


def test_an_event_nobody_listens_to_makes_no_delivery() -> None:
    """An event no target lists is dropped; no events, no deliveries."""
    assert route([Event("transcription.progress", {"p": 1})], ["app", "audit"], ENDPOINTS) == []
    assert route([], ["app"], ENDPOINTS) == []


def test_a_target_missing_from_the_config_gets_nothing() -> None:
    """A job naming an endpoint since removed from the config: no delivery for it, others go."""
    got = route([READY], ["gone", "app"], ENDPOINTS)
    assert [d.endpoint for d in got] == ["app"]


def test_the_body_is_the_event_payload_as_json_with_non_ascii_kept() -> None:
    """The payload is serialized once as JSON, Armenian and emoji as UTF-8, not \\u escapes."""
    payload = {"docId": "d1", "text": "Խոսնակ 1: բարև", "tags": ["ok", "🎙"], "n": 1.5}
    [delivery] = route([Event("transcript_ready", payload)], ["app"], ENDPOINTS)
    assert delivery.payload == json.dumps(payload, ensure_ascii=False)
    assert "Խոսնակ 1: բարև" in delivery.payload and "\\u" not in delivery.payload
    assert json.loads(delivery.payload) == payload


def test_every_target_of_one_event_gets_the_same_body() -> None:
    """Two endpoints hearing the same event are handed byte-identical bodies."""
    first, second = route([READY], ["app", "ready-only"], ENDPOINTS)
    assert first.payload == second.payload == '{"docId": "d1", "text": "ready"}'
