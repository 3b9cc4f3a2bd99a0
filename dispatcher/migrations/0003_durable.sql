-- Durable sessions: agents with versions, uploaded files, resources,
-- snapshots, timeouts, budget, archive.

CREATE TABLE agents (
    id              text PRIMARY KEY,
    latest_version  bigint NOT NULL DEFAULT 1,
    archived        boolean NOT NULL DEFAULT false,
    create_time     timestamptz NOT NULL DEFAULT now(),
    update_time     timestamptz NOT NULL DEFAULT now()
);

-- Immutable: an update inserts a new row.
CREATE TABLE agent_versions (
    agent_id    text NOT NULL REFERENCES agents (id) ON DELETE CASCADE,
    version     bigint NOT NULL,
    spec        jsonb NOT NULL,
    create_time timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (agent_id, version)
);

CREATE TABLE files (
    id            uuid PRIMARY KEY,
    display_name  text NOT NULL DEFAULT '',
    size_bytes    bigint NOT NULL,
    sha256        text NOT NULL,
    create_time   timestamptz NOT NULL DEFAULT now()
);

ALTER TABLE sessions
    ADD COLUMN agent_id              text,
    ADD COLUMN agent_version         bigint,
    ADD COLUMN resources             jsonb NOT NULL DEFAULT '[]',
    ADD COLUMN inactivity_timeout_ms bigint,
    ADD COLUMN budget_usd            double precision,
    ADD COLUMN queue_timeout_ms      bigint,
    -- A pending session still unplaced at this time fails.
    ADD COLUMN queue_deadline        timestamptz,
    -- The newest snapshot; `snapshots` counts them (the next one's number).
    ADD COLUMN snapshot_key          text NOT NULL DEFAULT '',
    ADD COLUMN snapshot_bytes        bigint NOT NULL DEFAULT 0,
    ADD COLUMN snapshot_time         timestamptz,
    ADD COLUMN snapshots             bigint NOT NULL DEFAULT 0,
    ADD COLUMN archive_time          timestamptz;

-- The queue-deadline sweep reads only queued sessions that have a deadline.
CREATE INDEX sessions_queue_deadline ON sessions (queue_deadline)
    WHERE status IN ('pending', 'rescheduling') AND queue_deadline IS NOT NULL;
-- Retention reads archived sessions by archive time.
CREATE INDEX sessions_archived ON sessions (archive_time) WHERE status = 'archived';
