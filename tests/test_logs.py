"""Log lines: one per event, text or JSON, carrying the job's context; aiohttp's quote of a
malformed request line (which may hold the API token) is dropped."""

from __future__ import annotations

import json
import logging
import sys

import pytest
from aiohttp.http_exceptions import BadHttpMessage

from relayd import logs


def record(msg: str = "poll failed: %s", *args: object, **extra: object) -> logging.LogRecord:
    rec = logging.LogRecord("relayd.poller", logging.WARNING, __file__, 1, msg, args, None)
    rec.created = 1_767_225_600.25  # 2026-01-01T00:00:00.250Z
    rec.msecs = 250.0
    for key, value in extra.items():
        setattr(rec, key, value)
    return rec


def test_text_line_carries_time_level_logger_and_context() -> None:
    """The text format: UTC time with ms, level, logger, message, then the context it has."""
    line = logs.TextFormatter().format(
        record("poll failed: %s", "HTTP 502", provider="main", job="d-1")
    )
    assert line == (
        "2026-01-01T00:00:00.250Z warning relayd.poller: poll failed: HTTP 502 "
        "[provider=main job=d-1]"
    )
    assert logs.TextFormatter().format(record("no context")).endswith("relayd.poller: no context")


def test_json_line_is_one_object_with_the_same_context() -> None:
    """`log_format = "json"`: one object per line with ts, level, logger, msg and the context."""
    line = logs.JsonFormatter().format(
        record("delivery failed", endpoint="app", webhook_id="msg_1", provider="main", job="d")
    )
    assert "\n" not in line
    assert json.loads(line) == {
        "ts": 1767225600.25,
        "level": "warning",
        "logger": "relayd.poller",
        "msg": "delivery failed",
        "provider": "main",
        "job": "d",
        "endpoint": "app",
        "webhook_id": "msg_1",
    }


def test_an_exception_stays_inside_its_json_line() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        rec = record("crashed")
        rec.exc_info = sys.exc_info()
    doc = json.loads(logs.JsonFormatter().format(rec))
    assert "ValueError: boom" in doc["exc"]


def test_a_malformed_request_line_is_not_quoted() -> None:
    """aiohttp quotes the offending header of a bad request; relayd keeps the event, not the
    quote (it may be an `Authorization: Bearer` line)."""
    try:
        raise BadHttpMessage("Invalid header: Authorization: Bearer sekrit-token-42")
    except BadHttpMessage:
        rec = record("Error handling request")
        rec.exc_info = sys.exc_info()
    assert logs.HideRequestLine().filter(rec)
    line = logs.TextFormatter().format(rec)
    assert "sekrit-token-42" not in line
    assert "malformed HTTP request, answered 400" in line


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_setup_routes_relayd_and_library_warnings_through_one_handler(
    fmt: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """relayd logs at its level; other libraries' warnings come out in the same format."""
    root, ours, access = (logging.getLogger(n) for n in ("", "relayd", "aiohttp.access"))
    saved = root.handlers[:], root.level, ours.level, access.level
    try:
        logs.setup("info", fmt)
        logging.getLogger("relayd.test").info("relayd line", extra={"provider": "main"})
        logging.getLogger("asyncio").info("not shown")
        logging.getLogger("asyncio").warning("library line")
        err = capsys.readouterr().err.splitlines()
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
        ours.setLevel(saved[2])
        access.setLevel(saved[3])
    assert len(err) == 2
    if fmt == "json":
        assert [json.loads(line)["msg"] for line in err] == ["relayd line", "library line"]
        assert json.loads(err[0])["provider"] == "main"
    else:
        assert err[0].endswith("relayd.test: relayd line [provider=main]")
        assert err[1].endswith("asyncio: library line")
