"""The API's answers checked against its OpenAPI document (relayd/openapi.json): `check` is
called by tests.conftest.api on every answer the test suite gets, so the document cannot drift
from what the API does. A status the document does not list for the operation fails the test,
and so does a JSON body its schema refuses."""

from __future__ import annotations

import functools
import json
import re
from importlib import resources
from typing import Any

import jsonschema


@functools.cache
def document() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((resources.files("relayd") / "openapi.json").read_text())
    return doc


@functools.cache
def _routes() -> list[tuple[re.Pattern[str], str]]:
    out = []
    for template in document()["paths"]:
        pattern = "[^/]+".join(re.escape(part) for part in re.split(r"\{[^}]+\}", template))
        out.append((re.compile(f"^{pattern}$"), template))
    return out


def operation(method: str, path: str) -> tuple[str, dict[str, Any]] | None:
    """(path template, operation) the request goes to; None for paths the API does not own
    (the console's pages)."""
    bare = path.split("?", 1)[0]
    for pattern, template in _routes():
        if pattern.match(bare):
            op = document()["paths"][template].get(method.lower())
            return (template, op) if op is not None else None
    return None


def check(method: str, path: str, status: int, body: Any, content_type: str) -> None:
    """Raise AssertionError when the answer is not one the document describes."""
    found = operation(method, path)
    if found is None:
        return
    template, op = found
    answers = op["responses"]
    answer = answers.get(str(status))
    assert answer is not None, (
        f"{method} {template} answered {status}, which relayd/openapi.json does not list"
        f" ({', '.join(answers)}): {body!r:.300}"
    )
    media = answer.get("content", {})
    if "application/json" in media:
        assert content_type == "application/json", (method, template, status, content_type)
        schema = {**media["application/json"]["schema"], "components": document()["components"]}
        errors = sorted(
            jsonschema.Draft202012Validator(schema).iter_errors(body), key=lambda e: e.path
        )
        assert not errors, (
            f"{method} {template} {status}: the answer does not match relayd/openapi.json:"
            f" {errors[0].message} at {list(errors[0].absolute_path)}"
        )
