"""Templates and the small formatting the pages need. Jinja2 escapes every value it prints
(autoescape on for all templates): a transcript or metadata holding markup is shown as text.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import jinja2

FOLD_CHARS = 2000  # a delivered body longer than this shows its start; the rest is folded
SECRET_KEYS = frozenset({"secret", "token", "password", "api_key", "apikey", "authorization"})
MASK = "********"

environment = jinja2.Environment(
    loader=jinja2.PackageLoader("relayd.console", "templates"),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)


def when(t: float | None) -> str:
    """An absolute UTC time, to the second."""
    if t is None:
        return "-"
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def ago(t: float | None, now: float) -> str:
    """How long ago `t` was at `now` (or, for a time ahead, "in ..."), in the largest unit that
    fits."""
    if t is None:
        return "-"
    seconds = now - t
    text = span(abs(seconds))
    return f"in {text}" if seconds < -0.5 else f"{text} ago"


def span(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit}"
    return f"{seconds:.0f} s" if seconds >= 1 else f"{seconds * 1000:.0f} ms"


def masked(value: Any) -> Any:
    """The value with every secret-looking field's value replaced (Xosum's `secret`, say)."""
    if isinstance(value, dict):
        return {
            k: MASK if k.lower() in SECRET_KEYS and v not in (None, "") else masked(v)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [masked(v) for v in value]
    return value


def body_text(payload: str) -> str:
    """A delivered body for reading: pretty JSON with secrets masked (as sent if not JSON)."""
    try:
        value = json.loads(payload)
    except ValueError:
        return payload
    return json.dumps(masked(value), indent=2, ensure_ascii=False)


def pretty(value: Any) -> str:
    """JSON for reading, characters as they are (the template escapes them)."""
    return json.dumps(masked(value), indent=2, ensure_ascii=False)


environment.filters.update(when=when, ago=ago, span=span, pretty=pretty)
environment.globals.update(FOLD_CHARS=FOLD_CHARS)


def page(name: str, **context: Any) -> str:
    return environment.get_template(name).render(**context)
