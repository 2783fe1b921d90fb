"""Tracing (SPEC §5, `traceparent`): a job's submission, each of its polls and each delivery
attempt is an OpenTelemetry span, and every delivery carries a W3C `traceparent` header.

One trace per job, from its submission to its last delivery: the trace id is derived from the
job (its provider and docId), not stored, so the spans of one job join up whichever relay made
them, across restarts and takeovers, and a receiver that continues the `traceparent` joins the
same trace. Each span's parent is the job's own (implicit) root span, whose id is derived too.

opentelemetry-api alone (a dependency of relayd) records nothing: the spans are no-ops, and the
header still carries the job's trace. With the `otel` extra (the SDK and the OTLP exporter)
and the standard environment (`OTEL_EXPORTER_OTLP_ENDPOINT`, or `OTEL_TRACES_EXPORTER=otlp`,
`OTEL_SERVICE_NAME`, ...), `configure` exports the spans over OTLP/HTTP.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterator, MutableMapping
from contextlib import contextmanager

from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.trace import NonRecordingSpan, Span, SpanContext, SpanKind, TraceFlags

log = logging.getLogger("relayd.tracing")

tracer = trace.get_tracer("relayd")


def job_context(provider: str, doc_id: str) -> Context:
    """The job's trace, as the parent of its spans."""
    digest = hashlib.sha256(f"{provider}\0{doc_id}".encode()).digest()
    trace_id = int.from_bytes(digest[:16], "big") or 1
    span_id = int.from_bytes(digest[16:24], "big") or 1
    root = SpanContext(
        trace_id, span_id, is_remote=True, trace_flags=TraceFlags(TraceFlags.SAMPLED)
    )
    return trace.set_span_in_context(NonRecordingSpan(root))


@contextmanager
def job_span(
    name: str, provider: str, doc_id: str, **attributes: str | int | float
) -> Iterator[Span]:
    """A span of the job's trace, current while the block runs (log lines in it carry the
    trace id)."""
    with tracer.start_as_current_span(
        name,
        context=job_context(provider, doc_id),
        kind=SpanKind.CLIENT,
        attributes={"relayd.provider": provider, "relayd.doc_id": doc_id, **attributes},
    ) as span:
        yield span


def inject(headers: MutableMapping[str, str]) -> None:
    """Add `traceparent` (and `tracestate` if any) for the current span to `headers`."""
    propagate.inject(headers)


def current_trace_id() -> str | None:
    """The current span's trace id in hex (None outside a span): for log lines."""
    ctx = trace.get_current_span().get_span_context()
    return f"{ctx.trace_id:032x}" if ctx.is_valid else None


def configure() -> bool:
    """Export spans over OTLP when the environment asks for it and the `otel` extra is there;
    whether it does. Without either, tracing stays the API's no-op."""
    wanted = os.environ.get("OTEL_TRACES_EXPORTER", "").lower()
    if wanted == "none" or not (wanted or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")):
        return False
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        log.warning("OTEL_* is set but the otel extra is missing: pip install 'relayd[otel]'")
        return False
    service = os.environ.get("OTEL_SERVICE_NAME", "relayd")
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    return True


def shutdown() -> None:
    """Export what is still batched (a configured SDK provider); nothing otherwise."""
    provider = trace.get_tracer_provider()
    close = getattr(provider, "shutdown", None)
    if close is not None:
        close()
