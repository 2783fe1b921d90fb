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
]

# The table that says which versions a database has; made before any version, under the lock.
VERSION_TABLE = """
    CREATE TABLE IF NOT EXISTS schema_version (
        version integer PRIMARY KEY,
        applied_at timestamptz NOT NULL DEFAULT now()
    )
"""

# Every table relayd keeps: what `disk_usage` adds up and `vacuum` goes over.
TABLES = ("jobs", "polls", "deliveries", "attempts", "budgets", "probe", "run_times")

# pg_advisory locks are (int, int) pairs per database: the first says "relayd", the second what for.
LOCK_SPACE = 0x72656C61  # "rela"
MIGRATE_LOCK = 1  # held (per transaction) while a relayd creates or migrates the schema
SOLE_USE_LOCK = 2  # held (per session) by the one relayd daemon on the store, for now
