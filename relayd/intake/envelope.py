"""One validation path for both intakes: bytes from a spool file or an API body -> submissions.

Everything is checked before anything is stored, so a file or body is taken whole or refused whole.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass

from relayd.errors import IntakeError
from relayd.models import Submission

MAX_BYTES = 1024 * 1024
JOB_ID = re.compile(r"[A-Za-z0-9_.:\-]{1,200}")
ALLOWED_KEYS = frozenset({"docId", "provider", "metadata", "endpoints"})


@dataclass(frozen=True)
class Catalog:
    """What a submission may name: providers (with their default) and endpoints."""

    providers: frozenset[str]
    endpoints: frozenset[str]
    default_provider: str | None

    def provider(self, name: str | None, where: str) -> str:
        if name is None:
            if self.default_provider is None:
                raise IntakeError(
                    f"{where}: no provider named and no default_provider "
                    f"(known: {', '.join(sorted(self.providers))})"
                )
            return self.default_provider
        if name not in self.providers:
            raise IntakeError(
                f"{where}: unknown provider {_show(name)} "
                f"(known: {', '.join(sorted(self.providers))})"
            )
        return name


def check_job_id(value: object, where: str) -> str:
    if not isinstance(value, str):
        raise IntakeError(f"{where}: docId must be a string, got {_type(value)}")
    if not JOB_ID.fullmatch(value):
        raise IntakeError(
            f"{where}: invalid job id {_show(value)} ({len(value)} chars): use 1-200 letters, "
            "digits, '_', '-', '.', ':'"
        )
    return value


def parse_bytes(data: bytes, catalog: Catalog) -> list[Submission]:
    """Parse a spool file: plain text (one id per line) or JSON (an object or a list)."""
    if len(data) > MAX_BYTES:
        raise IntakeError(f"too large: {len(data)} bytes, the limit is {MAX_BYTES} (split it)")
    if b"\x00" in data:
        raise IntakeError("binary content (NUL byte): expected text or JSON")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise IntakeError(f"not UTF-8 text: invalid byte at offset {exc.start}") from None
    stripped = text.lstrip()
    if stripped.startswith(("{", "[")):
        return parse_json(load_json(text), catalog)
    return _parse_text(text, catalog)


def _no_constants(name: str) -> None:
    raise IntakeError(f"malformed JSON: {name} is not valid JSON")


def _finite(literal: str) -> float:
    # json.loads reads 1e999 as inf, which json.dumps then writes as Infinity: not JSON, and
    # relayd would store it, answer it and deliver it in a webhook body.
    value = float(literal)
    if math.isinf(value):
        raise ValueError(f"number out of range: {_show(literal)}")
    return value


def load_json(text: str | bytes) -> object:
    """json.loads that only ever raises IntakeError (deep nesting, huge numbers, NaN included)."""
    try:
        return json.loads(text, parse_constant=_no_constants, parse_float=_finite)
    except json.JSONDecodeError as exc:
        raise IntakeError(
            f"malformed JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None
    except RecursionError:
        raise IntakeError("malformed JSON: nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as exc:  # e.g. integers over 4300 digits
        raise IntakeError(f"malformed JSON: {exc}") from None


def _parse_text(text: str, catalog: Catalog) -> list[Submission]:
    provider = catalog.provider(None, "file")
    subs: list[Submission] = []
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        subs.append(Submission(check_job_id(line, f"line {lineno}"), provider))
    if not subs:
        raise IntakeError("no job id in it")
    return subs


def parse_json(doc: object, catalog: Catalog) -> list[Submission]:
    """Validate an already-decoded JSON document: one object or a non-empty list of them."""
    if isinstance(doc, dict):
        return [_parse_object(doc, catalog, "job")]
    if isinstance(doc, list):
        if not doc:
            raise IntakeError("empty list: no job id in it")
        return [_parse_object(item, catalog, f"[{i}]") for i, item in enumerate(doc)]
    raise IntakeError(f"expected a JSON object or a list of objects, got {_type(doc)}")


def _parse_object(obj: object, catalog: Catalog, where: str) -> Submission:
    if not isinstance(obj, dict):
        raise IntakeError(f"{where}: expected an object, got {_type(obj)}")
    unknown = sorted(set(obj) - ALLOWED_KEYS)
    if unknown:
        raise IntakeError(
            f"{where}: unknown field {_show(unknown[0])} "
            "(allowed: docId, provider, metadata, endpoints)"
        )
    if "docId" not in obj:
        raise IntakeError(f"{where}: docId is required")
    doc_id = check_job_id(obj["docId"], f"{where}.docId")
    provider_name = obj.get("provider")
    if provider_name is not None and not isinstance(provider_name, str):
        raise IntakeError(f"{where}.provider: expected a string, got {_type(provider_name)}")
    provider = catalog.provider(provider_name, f"{where}.provider")
    metadata = obj.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise IntakeError(f"{where}.metadata: expected an object, got {_type(metadata)}")
    endpoints: tuple[str, ...] | None = None
    if "endpoints" in obj and obj["endpoints"] is not None:
        raw = obj["endpoints"]
        if not isinstance(raw, list) or not raw:
            raise IntakeError(f"{where}.endpoints: expected a non-empty list of endpoint names")
        for i, name in enumerate(raw):
            if not isinstance(name, str):
                raise IntakeError(f"{where}.endpoints[{i}]: expected a string, got {_type(name)}")
            if name not in catalog.endpoints:
                raise IntakeError(
                    f"{where}.endpoints[{i}]: unknown endpoint {_show(name)} "
                    f"(known: {', '.join(sorted(catalog.endpoints))})"
                )
        endpoints = tuple(dict.fromkeys(raw))
    return Submission(doc_id, provider, metadata, endpoints)


def _show(value: str) -> str:
    """A name from the input, quoted and cut short: a reason stays readable whatever was sent."""
    return repr(value if len(value) <= 60 else value[:57] + "...")


def _type(value: object) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}
    if value is None:
        return "null"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return "a number"
    return names.get(type(value), type(value).__name__)
