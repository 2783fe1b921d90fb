"""The SQLite store's schema, version by version: SQL kept as data. A database is brought up to
date by running each version it lacks in order (`PRAGMA user_version` counts them); indexes
outside the versions are created when missing."""

from __future__ import annotations

SCHEMA = [
    # version 1
    """
    CREATE TABLE jobs (
        id INTEGER PRIMARY KEY,
        provider TEXT NOT NULL,
        doc_id TEXT NOT NULL,
        state TEXT NOT NULL,
        metadata TEXT,
        endpoints TEXT,
        source TEXT NOT NULL,
        submitted_at REAL NOT NULL,
        next_poll_at REAL NOT NULL,
        polls INTEGER NOT NULL DEFAULT 0,
        errors INTEGER NOT NULL DEFAULT 0,
        not_found INTEGER NOT NULL DEFAULT 0,
        last_status TEXT,
        etag TEXT,
        result_status TEXT,
        result TEXT,
        finished_at REAL,
        updated_at REAL NOT NULL,
        UNIQUE (provider, doc_id)
    );
    CREATE INDEX jobs_by_state ON jobs (state, next_poll_at);
    CREATE TABLE polls (
        id INTEGER PRIMARY KEY,
        job_id INTEGER NOT NULL REFERENCES jobs (id),
        at REAL NOT NULL,
        http_status INTEGER,
        outcome TEXT NOT NULL,
        detail TEXT
    );
    CREATE INDEX polls_by_job ON polls (job_id);
    CREATE TABLE deliveries (
        id INTEGER PRIMARY KEY,
        job_id INTEGER NOT NULL REFERENCES jobs (id),
        endpoint TEXT NOT NULL,
        event TEXT NOT NULL,
        webhook_id TEXT NOT NULL,
        payload TEXT NOT NULL,
        state TEXT NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt_at REAL NOT NULL,
        last_error TEXT,
        created_at REAL NOT NULL,
        delivered_at REAL,
        UNIQUE (job_id, endpoint, event)
    );
    CREATE INDEX deliveries_due ON deliveries (endpoint, state, next_attempt_at);
    CREATE TABLE attempts (
        id INTEGER PRIMARY KEY,
        delivery_id INTEGER NOT NULL REFERENCES deliveries (id),
        at REAL NOT NULL,
        status INTEGER,
        error TEXT,
        duration REAL NOT NULL,
        outcome TEXT NOT NULL
    );
    CREATE INDEX attempts_by_delivery ON attempts (delivery_id);
    """,
    # version 2: budgets survive a clean restart
    """
    CREATE TABLE budgets (
        key TEXT PRIMARY KEY,
        state TEXT NOT NULL,
        saved_at REAL NOT NULL
    );
    """,
    # version 3: how long finished jobs took, so the poll cadence can learn across restarts
    """
    ALTER TABLE jobs ADD COLUMN ran_for REAL;
    ALTER TABLE jobs ADD COLUMN media_kind TEXT;
    ALTER TABLE jobs ADD COLUMN media_seconds REAL;
    CREATE INDEX jobs_by_run ON jobs (finished_at) WHERE ran_for IS NOT NULL;
    """,
    # version 4: /readyz proves the database takes writes by writing this one row
    """
    CREATE TABLE probe (id INTEGER PRIMARY KEY CHECK (id = 1), at REAL NOT NULL);
    """,
    # version 5: retention. Run times live apart from the jobs they were learned from (those are
    # deleted); a job's polls and a delivery's attempts keep the first and the latest, counting
    # what was dropped between them.
    """
    CREATE TABLE run_times (
        id INTEGER PRIMARY KEY,
        provider TEXT NOT NULL,
        media_kind TEXT,
        media_seconds REAL,
        ran_for REAL NOT NULL
    );
    INSERT INTO run_times (provider, media_kind, media_seconds, ran_for)
        SELECT provider, media_kind, media_seconds, ran_for FROM jobs
        WHERE ran_for IS NOT NULL ORDER BY finished_at;
    DROP INDEX IF EXISTS jobs_by_run;
    ALTER TABLE jobs ADD COLUMN polls_dropped INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE deliveries ADD COLUMN attempts_dropped INTEGER NOT NULL DEFAULT 0;
    """,
    # version 6: jobs and deliveries counted by state as they change, so status, metrics and
    # the systemd STATUS line read a few rows, not every job (a GROUP BY over 200,000 jobs took
    # 60 ms of the event loop every 5 s)
    """
    CREATE TABLE job_counts (
        provider TEXT NOT NULL,
        state TEXT NOT NULL,
        n INTEGER NOT NULL,
        PRIMARY KEY (provider, state)
    ) WITHOUT ROWID;
    INSERT INTO job_counts SELECT provider, state, COUNT(*) FROM jobs GROUP BY provider, state;
    CREATE TRIGGER job_counted AFTER INSERT ON jobs BEGIN
        INSERT INTO job_counts VALUES (NEW.provider, NEW.state, 1)
            ON CONFLICT (provider, state) DO UPDATE SET n = n + 1;
    END;
    CREATE TRIGGER job_uncounted AFTER DELETE ON jobs BEGIN
        UPDATE job_counts SET n = n - 1 WHERE provider = OLD.provider AND state = OLD.state;
    END;
    CREATE TRIGGER job_recounted AFTER UPDATE OF provider, state ON jobs
    WHEN OLD.state IS NOT NEW.state OR OLD.provider IS NOT NEW.provider BEGIN
        UPDATE job_counts SET n = n - 1 WHERE provider = OLD.provider AND state = OLD.state;
        INSERT INTO job_counts VALUES (NEW.provider, NEW.state, 1)
            ON CONFLICT (provider, state) DO UPDATE SET n = n + 1;
    END;
    CREATE TABLE delivery_counts (
        endpoint TEXT NOT NULL,
        state TEXT NOT NULL,
        n INTEGER NOT NULL,
        PRIMARY KEY (endpoint, state)
    ) WITHOUT ROWID;
    INSERT INTO delivery_counts
        SELECT endpoint, state, COUNT(*) FROM deliveries GROUP BY endpoint, state;
    CREATE TRIGGER delivery_counted AFTER INSERT ON deliveries BEGIN
        INSERT INTO delivery_counts VALUES (NEW.endpoint, NEW.state, 1)
            ON CONFLICT (endpoint, state) DO UPDATE SET n = n + 1;
    END;
    CREATE TRIGGER delivery_uncounted AFTER DELETE ON deliveries BEGIN
        UPDATE delivery_counts SET n = n - 1 WHERE endpoint = OLD.endpoint AND state = OLD.state;
    END;
    CREATE TRIGGER delivery_recounted AFTER UPDATE OF endpoint, state ON deliveries
    WHEN OLD.state IS NOT NEW.state OR OLD.endpoint IS NOT NEW.endpoint BEGIN
        UPDATE delivery_counts SET n = n - 1 WHERE endpoint = OLD.endpoint AND state = OLD.state;
        INSERT INTO delivery_counts VALUES (NEW.endpoint, NEW.state, 1)
            ON CONFLICT (endpoint, state) DO UPDATE SET n = n + 1;
    END;
    """,
]

# Indexes outside the numbered versions: created when missing, on any schema version, so adding
# one takes no migration number.
INDEXES = {
    # expire_jobs runs per provider every 5 s: without it, each run reads every polling job
    # (100 providers x 100,000 jobs: 0.9 s per pass); oldest_polling and job_counts use it too.
    "jobs_by_state_provider": "ON jobs (state, provider, submitted_at)",
    # retention finds the jobs whose time is up by state and the time they ended
    "jobs_by_end": "ON jobs (state, updated_at)",
    # the console: a job found by its id, and one state's jobs newest first, a page at a time
    "jobs_by_doc": "ON jobs (doc_id)",
    "jobs_by_state_newest": "ON jobs (state, id)",
    # the console's dead letters (and `redeliver --state dead --since`): without it, 245 ms
    # to list the 1,000 dead among 91,000 deliveries
    "deliveries_by_state": "ON deliveries (state, created_at)",
}
