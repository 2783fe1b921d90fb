"""Logging setup: one line per event, `text` or `json`, with provider/job/endpoint when known."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

CONTEXT = ("provider", "job", "job_id", "endpoint", "webhook_id")


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


def setup(level: str = "info", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger("relayd")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
