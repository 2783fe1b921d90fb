"""Tracing (relayd/tracing.py) with the OpenTelemetry SDK's in-memory exporter: the submission,
every poll and every delivery attempt are spans of the job's one trace, every delivery carries
a `traceparent` of that trace and its attempt's span, and a log line written inside a span
carries the trace id."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from relayd import tracing
from relayd.logs import TraceId
from relayd.mock import provider as mock_provider
from relayd.mock.receiver import Receiver
from tests.conftest import api, config_dict, eventually, make_config, running, settled

TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-01$")
_exporter = InMemorySpanExporter()


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """The SDK as the process's tracer provider (it can be set once per process: the first
    test sets it, the others share it), emptied for each test."""
    if not isinstance(trace.get_tracer_provider(), TracerProvider):
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(_exporter))
        trace.set_tracer_provider(provider)
    _exporter.clear()
    yield _exporter
    _exporter.clear()


async def test_a_jobs_polls_and_delivery_are_one_trace_and_the_header_carries_it(
    tmp_path: Path,
    provider: mock_provider.MockProvider,
    receiver: Receiver,
    spans: InMemorySpanExporter,
) -> None:
    provider.add_job("tr-1", ready_after=0.3)
    config = make_config(config_dict(tmp_path, provider.port, {"app": receiver.port}), tmp_path)
    async with running(config) as daemon:
        await api(daemon, "POST", "/v1/jobs", {"docId": "tr-1"})
        [got] = await receiver.wait_for(1)
        await eventually(lambda: settled(daemon, 1), what="delivered")
    match = TRACEPARENT.match(got.headers["traceparent"])
    assert match, got.headers["traceparent"]
    trace_id, parent = match.groups()
    expected = trace.get_current_span(tracing.job_context("main", "tr-1")).get_span_context()
    assert trace_id == f"{expected.trace_id:032x}"
    finished = spans.get_finished_spans()
    [submit] = [s for s in finished if s.name == "relayd.submit"]
    polls = [s for s in finished if s.name == "relayd.poll"]
    [deliver] = [s for s in finished if s.name == "relayd.deliver"]
    assert len(polls) >= 2  # queued, then finished
    assert submit.attributes is not None and submit.attributes["relayd.source"] == "api"
    for span in [submit, *polls, deliver]:
        assert span.context is not None and span.parent is not None
        assert f"{span.context.trace_id:032x}" == trace_id  # one trace for the job
        assert span.parent.span_id == expected.span_id  # the job's root
        assert span.attributes is not None and span.attributes["relayd.doc_id"] == "tr-1"
    assert deliver.context is not None and f"{deliver.context.span_id:016x}" == parent
    assert deliver.attributes is not None
    assert deliver.attributes["http.response.status_code"] == 200
    assert deliver.attributes["relayd.webhook_id"] == got.headers["webhook-id"]


def test_two_jobs_two_traces_the_same_job_always_the_same() -> None:
    def trace_of(provider: str, doc: str) -> int:
        return (
            trace.get_current_span(tracing.job_context(provider, doc)).get_span_context().trace_id
        )

    assert trace_of("main", "a") == trace_of("main", "a") != trace_of("main", "b")
    assert trace_of("main", "a") != trace_of("other", "a")


def test_a_log_line_inside_a_span_carries_the_trace_id(spans: InMemorySpanExporter) -> None:
    record = logging.LogRecord("relayd.poller", logging.INFO, __file__, 1, "polled", None, None)
    outside = logging.LogRecord("relayd.poller", logging.INFO, __file__, 1, "idle", None, None)
    with tracing.job_span("relayd.poll", "main", "log-1") as span:
        assert TraceId().filter(record)
    assert TraceId().filter(outside)
    assert getattr(record, "trace_id") == f"{span.get_span_context().trace_id:032x}"  # noqa: B009
    assert not hasattr(outside, "trace_id")


def test_export_is_configured_only_when_the_environment_asks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
    monkeypatch.delenv("OTEL_TRACES_EXPORTER", raising=False)
    assert tracing.configure() is False
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318")
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")
    assert tracing.configure() is False
