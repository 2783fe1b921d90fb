"""Several relays on one PostgreSQL store: which relay polls a job, which attempts a delivery.

Work is claimed, never assigned (as procrastinate, Convoy and Hook0 do it):
- a polling job is *owned* by one relay while its lease lasts. The relay renews the leases of
  all its jobs with each heartbeat (`heartbeat`), and claims jobs nobody owns, or whose owner
  stopped renewing, up to its fair share (`claim_jobs`), with `FOR UPDATE SKIP LOCKED`: two
  relays claiming at once never take the same job, nor wait for each other;
- a due delivery is *claimed* for one attempt (`due_deliveries`), its lease long enough for the
  POST; the attempt's record ends the claim. A relay that dies mid-POST leaves a claim that
  expires, and another relay sends it again, with the same `webhook-id`.
Leases are kept in the database's clock (DB_NOW), so the relays' clocks may differ.

A new job and a new due delivery are announced with NOTIFY (JOBS_CHANNEL, DELIVERIES_CHANNEL),
so the relays that LISTEN claim them within milliseconds, not at their next heartbeat.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from relayd.models import Delivery, DeliveryState, JobState
from relayd.store.postgres_conn import Cursor
from relayd.store.postgres_reads import PostgresReads
from relayd.store.postgres_schema import DB_NOW, DELIVERIES_CHANNEL, JOBS_CHANNEL
from relayd.store.rows import DELIVERY_COLUMNS, DELIVERY_FROM, delivery_row

SHARE_SLACK = 0.1  # a relay holding more than its share by this much gives the rest back
FORGET_RELAY_AFTER = 86400.0  # seconds a relay that left no goodbye stays listed (status)


@dataclass
class Heartbeat:
    """What one heartbeat found: the relays alive (seen within a lease, this one included),
    the jobs being polled in all, and which of the jobs this relay held another relay owns now
    (its lease ran out before it was renewed)."""

    relays: int
    polling: int
    lost: set[int] = field(default_factory=set)


class PostgresClaims(PostgresReads):
    """Claiming on top of the reads. `relay` names this relay (None: a store that only looks or
    that one process uses alone, as the CLI's); `lease`: seconds a claim lasts unrenewed."""

    relay: str | None
    lease: float

    @property
    def conninfo(self) -> str:
        """How to connect as the store does (for the LISTEN connection)."""
        return self._link.conninfo

    def safe(self, exc: BaseException) -> str:
        return self._link.safe(exc)

    def heartbeat(self, held: list[int], providers: list[str]) -> Heartbeat:
        """Say this relay is alive and renew the leases of everything it holds; `held`: the
        jobs it polls, of which those another relay owns now are named in the answer;
        `providers`: those it polls, whose jobs are counted."""
        with self._link.write(synced=False) as cur:
            cur.execute(
                "INSERT INTO relays (name, started_at, seen_at)"
                f" VALUES (%s, {DB_NOW}, {DB_NOW})"
                " ON CONFLICT (name) DO UPDATE SET seen_at = excluded.seen_at",
                (self.relay,),
            )
            cur.execute(f"DELETE FROM relays WHERE seen_at < {DB_NOW} - %s", (FORGET_RELAY_AFTER,))
            cur.execute(
                f"UPDATE jobs SET owned_until = {DB_NOW} + %s WHERE owner = %s AND state = %s",
                (self.lease, self.relay, JobState.POLLING),
            )
            cur.execute(
                f"UPDATE deliveries SET claimed_until = {DB_NOW} + %s"
                " WHERE claimed_by = %s AND state = %s",
                (self.lease, self.relay, DeliveryState.PENDING),
            )
            lost = cur.execute(
                "SELECT id FROM jobs WHERE id = ANY(%s) AND state = %s"
                " AND owner IS DISTINCT FROM %s",
                (held, JobState.POLLING, self.relay),
            ).fetchall()
            relays, polling, _, _ = self._counts(cur, providers)
        return Heartbeat(relays, polling, {int(r[0]) for r in lost})

    def _counts(self, cur: Cursor, providers: list[str]) -> tuple[int, int, int, int]:
        """(relays alive, jobs of `providers` being polled, of those nobody holds now, held by
        this relay)."""
        [(relays, polling, free, mine)] = cur.execute(
            f"SELECT (SELECT count(*) FROM relays WHERE seen_at >= {DB_NOW} - %s),"
            " count(*),"
            f" count(*) FILTER (WHERE owned_until < {DB_NOW}),"
            " count(*) FILTER (WHERE owner = %s)"
            " FROM jobs WHERE state = %s AND provider = ANY(%s)",
            (self.lease, self.relay, JobState.POLLING, providers),
        ).fetchall()
        return max(1, int(relays)), int(polling), int(free), int(mine)

    def claim_jobs(
        self, providers: list[str], *, greedy: bool = False
    ) -> tuple[list[tuple[int, str, float]], int]:
        """Take jobs of these providers that nobody holds, soonest due first, up to this
        relay's even share of all their jobs being polled; `greedy`: at least an even split of
        the free ones too (for jobs left free a while: their relay is gone, or every relay is
        at its share), but never more than SHARE_SLACK over the share, where this relay's
        heartbeat would give them back. (id, provider, due) of each, and how many are still
        free after it. A relay claims only what its config can poll."""
        with self._link.write(synced=False) as cur:
            relays, polling, free, mine = self._counts(cur, providers)
            share = -(-polling // relays)
            limit = share - mine
            if greedy:  # never past what a heartbeat would give back (relayd/claimer.py)
                cap = math.ceil(share * (1 + SHARE_SLACK))
                limit = max(limit, min(-(-free // relays), cap - mine))
            if not free or limit <= 0:
                return [], free
            rows = cur.execute(
                f"UPDATE jobs SET owner = %s, owned_until = {DB_NOW} + %s WHERE id IN"
                " (SELECT id FROM jobs WHERE state = %s AND provider = ANY(%s)"
                f" AND owned_until < {DB_NOW} ORDER BY next_poll_at LIMIT %s"
                " FOR UPDATE SKIP LOCKED) RETURNING id, provider, next_poll_at",
                (self.relay, self.lease, JobState.POLLING, providers, limit),
            ).fetchall()
        claimed = sorted((int(i), str(p), float(due)) for i, p, due in rows)
        return claimed, free - len(claimed)

    def release_jobs(self, ids: list[int]) -> int:
        """Give jobs back for others to claim (too many here, or shutting down)."""
        if not ids:
            return 0
        with self._link.write(synced=False) as cur:
            n = cur.execute(
                "UPDATE jobs SET owner = NULL, owned_until = 0 WHERE owner = %s AND id = ANY(%s)",
                (self.relay, ids),
            ).rowcount
            cur.execute(f"NOTIFY {JOBS_CHANNEL}")
        return n

    def leave(self) -> None:
        """A clean stop: everything this relay held goes back at once, not a lease later."""
        with self._link.write(synced=False) as cur:
            cur.execute(
                "UPDATE jobs SET owner = NULL, owned_until = 0 WHERE owner = %s", (self.relay,)
            )
            cur.execute(
                "UPDATE deliveries SET claimed_by = NULL, claimed_until = 0 WHERE claimed_by = %s",
                (self.relay,),
            )
            cur.execute("DELETE FROM relays WHERE name = %s", (self.relay,))
            cur.execute(f"NOTIFY {JOBS_CHANNEL}")
            cur.execute(f"NOTIFY {DELIVERIES_CHANNEL}")

    def due_deliveries(self, endpoint: str, now: float, limit: int) -> list[Delivery]:
        """The endpoint's due deliveries, oldest first; a relay claims them for one attempt
        each (and gets its own claims again), skipping those another relay holds."""
        if self.relay is None:
            return super().due_deliveries(endpoint, now, limit)
        with self._link.write(synced=False) as cur:
            claimed = cur.execute(
                f"UPDATE deliveries SET claimed_by = %s, claimed_until = {DB_NOW} + %s"
                " WHERE id IN (SELECT id FROM deliveries WHERE endpoint = %s AND state = %s"
                " AND next_attempt_at <= %s"
                f" AND (claimed_by = %s OR claimed_until < {DB_NOW})"
                " ORDER BY next_attempt_at, id LIMIT %s FOR UPDATE SKIP LOCKED) RETURNING id",
                (
                    self.relay,
                    self.lease,
                    endpoint,
                    DeliveryState.PENDING,
                    now,
                    self.relay,
                    limit,
                ),
            ).fetchall()
            if not claimed:
                return []
            rows = cur.execute(
                f"SELECT {DELIVERY_COLUMNS} FROM {DELIVERY_FROM} WHERE d.id = ANY(%s)"
                " ORDER BY d.next_attempt_at, d.id",
                ([int(r[0]) for r in claimed],),
            ).fetchall()
        return [delivery_row(r) for r in rows]

    def relays(self) -> list[dict[str, object]]:
        """Every relay seen in the last day: name, when it started and was last seen (the
        database's clock), and whether it is alive (seen within a lease)."""
        rows = self._link.read(
            "SELECT name, started_at, seen_at,"
            f" seen_at >= {DB_NOW} - %s,"
            " (SELECT count(*) FROM jobs WHERE owner = relays.name AND state = %s)"
            " FROM relays ORDER BY name",
            (self.lease, JobState.POLLING),
        )
        return [
            {"name": n, "started_at": s, "seen_at": seen, "alive": bool(a), "jobs": int(j)}
            for n, s, seen, a, j in rows
        ]
