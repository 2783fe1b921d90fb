"""The mock provider's jobs: what each will answer, and when it finishes."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

OUTCOMES = ("transcribed", "failed", "missing")
DEFAULT_PARAGRAPHS = 3
DEFAULT_DURATION = 125.5  # seconds of audio, as in Aitronos's example


@dataclass
class MockJob:
    """One job the mock knows. `fields` override the terminal answer (Xosum body, Aitronos
    `data`); Xosum base fields among them (`type`, `metadata`, ...) hold on every answer."""

    doc_id: str
    outcome: str  # "transcribed" | "failed" | "missing" (404 forever)
    ready_after: float  # seconds after first_seen when it becomes terminal
    first_seen: float  # clock time the job became known (registered or first polled)
    fields: dict[str, Any] = field(default_factory=dict)
    paragraphs: int = DEFAULT_PARAGRAPHS  # Aitronos paragraph count once completed
    progress: dict[str, Any] = field(default_factory=dict)  # extra fields while in progress
    pii_policies: list[str] | None = None  # Aitronos: answer with X-PII-Redacted/-Policies
    duration: float = DEFAULT_DURATION  # the audio's length in seconds
    paragraphs_lag: float = 0.0  # Aitronos: paragraphs answer 409 this long after `completed`
    mixed_up: int = 0  # once finished, this many answers are about another job

    @property
    def finished_at(self) -> float:
        return self.first_seen + self.ready_after

    def stage(self, now: float, stages: tuple[tuple[float, str], ...]) -> tuple[str | None, float]:
        """(the in-progress status at `now`, or None once finished; when that stage began)."""
        if now - self.first_seen >= self.ready_after:
            return None, self.finished_at
        began = self.first_seen
        for end, name in stages:
            until = self.first_seen + end * self.ready_after
            if now < until:
                return name, began
            began = until
        return stages[-1][1], began  # pragma: no cover - the last stage ends at ready_after

    @property
    def media_type(self) -> str:
        """Xosum's `type`: `single_voice`, or `phone_call` for ids that start with "call"."""
        kind = self.fields.get("type")
        if isinstance(kind, str):
            return kind
        return "phone_call" if self.doc_id.startswith("call") else "single_voice"

    def take_mixed_up(self) -> bool:
        """Whether this finished answer is served about another job (and count it)."""
        if self.mixed_up <= 0:
            return False
        self.mixed_up -= 1
        return True

    def someone_else(self) -> MockJob:
        """The finished job whose answer a mixed-up proxy serves instead of this one's."""
        other = "trans_someone_else" if self.doc_id.startswith("trans_") else "someone-else"
        return replace(self, doc_id=other, outcome="transcribed", fields={})


def check_job(
    doc_id: Any, outcome: Any, ready_after: Any, paragraphs: Any, options: dict[str, Any]
) -> None:
    if not isinstance(doc_id, str) or not doc_id:
        raise ValueError("docId must be a non-empty string")
    if outcome not in OUTCOMES:
        raise ValueError(f"outcome must be one of {', '.join(OUTCOMES)}, not {outcome!r}")
    if not _number(ready_after):
        raise ValueError(f"ready_after must be a number >= 0, not {ready_after!r}")
    if isinstance(paragraphs, bool) or not isinstance(paragraphs, int) or paragraphs < 0:
        raise ValueError(f"paragraphs must be an integer >= 0, not {paragraphs!r}")
    duration = options.get("duration", DEFAULT_DURATION)
    if not _number(duration) or duration == 0:
        raise ValueError(f"duration must be a number > 0, not {duration!r}")
    if not _number(options.get("paragraphs_lag", 0)):
        raise ValueError(f"paragraphs_lag must be a number >= 0, not {options['paragraphs_lag']!r}")
    mixed = options.get("mixed_up", 0)
    if isinstance(mixed, bool) or not isinstance(mixed, int) or mixed < 0:
        raise ValueError(f"mixed_up must be an integer >= 0, not {mixed!r}")


def _number(value: Any) -> bool:
    """A finite number >= 0."""
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value >= 0
    )


def default_outcome(doc_id: str) -> str:
    if doc_id.startswith("fail"):
        return "failed"
    return "missing" if doc_id.startswith("missing") else "transcribed"


def iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def job_json(job: MockJob) -> dict[str, Any]:
    return {
        "docId": job.doc_id,
        "outcome": job.outcome,
        "ready_after": job.ready_after,
        "first_seen": job.first_seen,
        "finished_at": job.finished_at,
        "paragraphs": job.paragraphs,
        "fields": job.fields,
        "progress": job.progress,
        "pii_policies": job.pii_policies,
        "duration": job.duration,
        "paragraphs_lag": job.paragraphs_lag,
        "mixed_up": job.mixed_up,
    }
