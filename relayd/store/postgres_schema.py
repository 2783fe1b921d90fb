"""The PostgreSQL store's schema, version by version: SQL kept as data, the tables of SQLite's
latest version in PostgreSQL's words. A database is brought up to date by running each version it
lacks in order, each in the transaction that records it in `schema_version`.

The choices that keep both stores answering alike:
- times are `double precision` epoch seconds, as the interface passes them (exact round trip);
- ids are `bigint generated always as identity`: ascending in the order rows are made, as
  SQLite's rowids, which every "oldest first" and "newest first" relies on;
- JSON (metadata, endpoints, results, budgets) is `text`, not `jsonb`: it reads back byte for
  byte as written (jsonb reorders keys and respaces), non-ASCII included (a UTF8 database);
- the names relayd compares or sorts by are `COLLATE "C"`: byte order, as SQLite's BINARY, so
  "a docId or the start of one" is the same range on both, whatever the database's locale.
"""

from __future__ import annotations

SCHEMA = [
    # version 1: SQLite's version 5 at once
    """
    CREATE TABLE jobs (
        id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        provider text COLLATE "C" NOT NULL,
        doc_id text COLLATE "C" NOT NULL,
        state text COLLATE "C" NOT NULL,
        metadata text,
        endpoints text,
        source text NOT NULL,
        submitted_at double precision NOT NULL,
        next_poll_at double precision NOT NULL,
        polls bigint NOT NULL DEFAULT 0,
        errors bigint NOT NULL DEFAULT 0,
        not_found bigint NOT NULL DEFAULT 0,
        last_status text,
        etag text,
        result_status text,
        result text,
        finished_at double precision,
        updated_at double precision NOT NULL,
        polls_dropped bigint NOT NULL DEFAULT 0,
        UNIQUE (provider, doc_id)
    );
    CREATE INDEX jobs_by_state ON jobs (state, next_poll_at);
    CREATE INDEX jobs_by_state_provider ON jobs (state, provider, submitted_at);
    CREATE INDEX jobs_by_end ON jobs (state, updated_at);
    CREATE INDEX jobs_by_doc ON jobs (doc_id);
    CREATE INDEX jobs_by_state_newest ON jobs (state, id);
    CREATE TABLE polls (
        id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        job_id bigint NOT NULL REFERENCES jobs (id),
        at double precision NOT NULL,
        http_status integer,
        outcome text NOT NULL,
        detail text
    );
    CREATE INDEX polls_by_job ON polls (job_id);
    CREATE TABLE deliveries (
        id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        job_id bigint NOT NULL REFERENCES jobs (id),
        endpoint text COLLATE "C" NOT NULL,
        event text COLLATE "C" NOT NULL,
        webhook_id text NOT NULL,
        payload text NOT NULL,
        state text COLLATE "C" NOT NULL,
        attempts bigint NOT NULL DEFAULT 0,
        next_attempt_at double precision NOT NULL,
        last_error text,
        created_at double precision NOT NULL,
        delivered_at double precision,
        attempts_dropped bigint NOT NULL DEFAULT 0,
        UNIQUE (job_id, endpoint, event)
    );
    CREATE INDEX deliveries_due ON deliveries (endpoint, state, next_attempt_at);
    CREATE TABLE attempts (
        id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        delivery_id bigint NOT NULL REFERENCES deliveries (id),
        at double precision NOT NULL,
        status integer,
        error text,
        duration double precision NOT NULL,
        outcome text NOT NULL
    );
    CREATE INDEX attempts_by_delivery ON attempts (delivery_id);
    CREATE TABLE budgets (
        key text PRIMARY KEY,
        state text NOT NULL,
        saved_at double precision NOT NULL
    );
    CREATE TABLE probe (
        id integer PRIMARY KEY CHECK (id = 1),
        at double precision NOT NULL
    );
    CREATE TABLE run_times (
        id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        provider text NOT NULL,
        media_kind text,
        media_seconds double precision,
        ran_for double precision NOT NULL
    )
    """,
    # version 2: several relays on one store. A polling job is owned by one relay at a time,
    # for as long as its lease (renewed by that relay's heartbeat) lasts; a due delivery is
    # claimed for one attempt. Leases are in the database's clock (DB_NOW), never a relay's.
    # The budget of each API key is kept here too (relayd/budget_pg.py).
    """
    ALTER TABLE jobs ADD COLUMN owner text,
        ADD COLUMN owned_until double precision NOT NULL DEFAULT 0;
    CREATE INDEX jobs_by_owner ON jobs (owner) WHERE state = 'polling';
    CREATE INDEX jobs_claimable ON jobs (owned_until) WHERE state = 'polling';
    ALTER TABLE deliveries ADD COLUMN claimed_by text,
        ADD COLUMN claimed_until double precision NOT NULL DEFAULT 0;
    CREATE INDEX deliveries_claimed ON deliveries (claimed_by) WHERE state = 'pending';
    CREATE TABLE relays (
        name text PRIMARY KEY,
        started_at double precision NOT NULL,
        seen_at double precision NOT NULL
    );
    CREATE TABLE budget_keys (
        key text PRIMARY KEY,
        tokens double precision NOT NULL,
        at double precision NOT NULL,
        seq bigint NOT NULL DEFAULT 0,
        blocked_until double precision NOT NULL DEFAULT 0,
        block_reason text NOT NULL DEFAULT ''
    );
    CREATE TABLE budget_slots (
        key text NOT NULL,
        slot text NOT NULL,
        owner text NOT NULL,
        frees_at double precision NOT NULL,
        PRIMARY KEY (key, slot)
    );
    CREATE TABLE budget_hungry (
        key text NOT NULL,
        relay text NOT NULL,
        until double precision NOT NULL,
        PRIMARY KEY (key, relay)
    )
    """,
]

# The database's clock, in epoch seconds: every lease and budget time is read from it, so the
# relays' own clocks may differ by any amount.
DB_NOW = "extract(epoch FROM clock_timestamp())::double precision"

# The table that says which versions a database has; made before any version, under the lock.
VERSION_TABLE = """
    CREATE TABLE IF NOT EXISTS schema_version (
        version integer PRIMARY KEY,
        applied_at timestamptz NOT NULL DEFAULT now()
    )
"""

# Every table relayd keeps: what `disk_usage` adds up and `vacuum` goes over.
TABLES = (
    "jobs",
    "polls",
    "deliveries",
    "attempts",
    "budgets",
    "probe",
    "run_times",
    "relays",
    "budget_keys",
    "budget_slots",
    "budget_hungry",
)

# pg_advisory locks are (int, int) pairs per database: the first says "relayd", the second what for.
LOCK_SPACE = 0x72656C61  # "rela"
MIGRATE_LOCK = 1  # held (per transaction) while a relayd creates or migrates the schema
PRUNE_LOCK = 3  # held (per transaction) by the one relay pruning: never all of them at once
# NOTIFY channels: a job anyone may claim, a delivery anyone may attempt
JOBS_CHANNEL = "relayd_jobs"
DELIVERIES_CHANNEL = "relayd_deliveries"
