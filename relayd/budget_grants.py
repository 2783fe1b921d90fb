"""What a shared budget answers, whoever keeps it (Redis: budget_redis.py; the PostgreSQL store:
budget_pg.py): a grant of one slot, or how long to wait. budget_shared.py turns those answers into
the grants the poller's dispatch takes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True)
class Grant:
    slot: str  # an opaque slot id to pass to release()/unused()


@dataclass(frozen=True)
class Denied:
    wait: float  # seconds (the keeper's clock) until asking again may succeed
    # "blocked: <429 reason>" | "budget" | "pacing" | "fair share" | "settling after a reset"
    reason: str


def check_limits(limit: int, window: float, lease: float) -> None:
    """What every shared budget refuses to be built with."""
    if limit < 1 or window <= 0 or lease < 0:
        raise ValueError("limit must be >= 1, window > 0 and lease >= 0")


class KeyBudget(Protocol):
    """One API key's budget shared by every relay that uses it. Every method raises
    SharedBudgetUnavailable when its keeper cannot be reached."""

    limit: int
    window: float

    async def acquire(self) -> Grant | Denied:
        """One slot for a request about to be sent, or how long to wait before asking again."""
        ...

    async def release(self, slot: str) -> None:
        """The answer arrived (or we gave up): the slot frees `window` from now."""
        ...

    async def unused(self, slot: str) -> None:
        """Granted but no request went out: the slot and its pacing token come back at once."""
        ...

    async def block(self, seconds: float, reason: str) -> None:
        """A 429: nobody on this key sends for `seconds` (a longer block already set stays)."""
        ...

    async def snapshot(self) -> dict[str, Any]:
        """used, mine, limit, blocked_for, block_reason, instances, hungry, epoch."""
        ...
