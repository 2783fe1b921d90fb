"""Logging setup: one line per event, `text` or `json`, with provider/job/endpoint when known."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

from aiohttp.http_exceptions import HttpProcessingError

from relayd.tracing import current_trace_id

CONTEXT = ("provider", "job", "job_id", "endpoint", "webhook_id", "trace_id")


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        parts = [f"{stamp}.{int(record.msecs):03d}Z", record.levelname.lower(), record.name]
        ctx = " ".join(f"{k}={getattr(record, k)}" for k in CONTEXT if hasattr(record, k))
        line = " ".join(parts) + ": " + record.getMessage() + (f" [{ctx}]" if ctx else "")
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        out.update((k, getattr(record, k)) for k in CONTEXT if hasattr(record, k))
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class HideRequestLine(logging.Filter):
    """aiohttp logs a request it cannot parse with the offending header line quoted: that line
    may be the client's `Authorization: Bearer <api_token>`. Keep the event, drop the quote."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            record.msg = f"{record.getMessage()}: malformed HTTP request, answered {exc.code}"
            record.args = None
            record.exc_info = None
            record.exc_text = None
        return True


class TraceId(logging.Filter):
    """A line written inside a span (a poll, a delivery attempt) carries its trace id."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "trace_id") and (trace_id := current_trace_id()) is not None:
            record.trace_id = trace_id
        return True


def setup(level: str = "info", fmt: str = "text") -> None:
    """relayd's lines at `level`; other libraries' (aiohttp, asyncio) warnings and errors through
    the same handler, so they too come out in `fmt` and pass the same filter."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(HideRequestLine())
    handler.addFilter(TraceId())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    relayd = logging.getLogger("relayd")
    relayd.handlers.clear()
    relayd.setLevel(level.upper())
    relayd.propagate = True
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
