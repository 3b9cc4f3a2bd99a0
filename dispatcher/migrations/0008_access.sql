-- Access control: API keys, projects (tenancy) and secrets.
--
-- Every agent, session, file, memory store, secret and key belongs to a
-- project. Rows from before projects existed belong to `default`.

CREATE TABLE api_keys (
    -- The public half of the token `berth_{id}_{secret}`.
    id            text PRIMARY KEY,
    project       text NOT NULL,
    role          text NOT NULL,
    display_name  text NOT NULL DEFAULT '',
    -- SHA-256 of the whole token; the token itself is never stored.
    token_sha256  bytea NOT NULL,
    create_time   timestamptz NOT NULL DEFAULT now(),
    revoke_time   timestamptz
);
CREATE INDEX api_keys_project ON api_keys (project, create_time);

-- Values sealed by envelope encryption (a data key per value, wrapped by the
-- deployment's key `kek`): see README, "Secrets".
CREATE TABLE secrets (
    id            uuid PRIMARY KEY,
    project       text NOT NULL,
    display_name  text NOT NULL DEFAULT '',
    usage         text NOT NULL,
    sealed        bytea NOT NULL,
    kek           text NOT NULL,
    create_time   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX secrets_project ON secrets (project, create_time);

ALTER TABLE sessions ADD COLUMN project text NOT NULL DEFAULT 'default';
ALTER TABLE sessions ALTER COLUMN project DROP DEFAULT;
-- A request id is unique within its project only: another project's ids
-- must not be detectable through a collision.
ALTER TABLE sessions DROP CONSTRAINT sessions_request_id_key;
CREATE UNIQUE INDEX sessions_request_id ON sessions (project, request_id);
CREATE INDEX sessions_project_list ON sessions (project, create_time DESC, id DESC);

-- Env values leave the spec: sealed like secrets (NULL = no env).
ALTER TABLE sessions ADD COLUMN env_sealed bytea, ADD COLUMN env_kek text;
ALTER TABLE agent_versions ADD COLUMN env_sealed bytea, ADD COLUMN env_kek text;

ALTER TABLE files ADD COLUMN project text NOT NULL DEFAULT 'default';
ALTER TABLE files ALTER COLUMN project DROP DEFAULT;

-- Agent ids are unique per project.
ALTER TABLE agent_versions DROP CONSTRAINT agent_versions_agent_id_fkey;
ALTER TABLE agent_versions DROP CONSTRAINT agent_versions_pkey;
ALTER TABLE agents DROP CONSTRAINT agents_pkey;
ALTER TABLE agents ADD COLUMN project text NOT NULL DEFAULT 'default';
ALTER TABLE agents ALTER COLUMN project DROP DEFAULT;
ALTER TABLE agent_versions ADD COLUMN project text NOT NULL DEFAULT 'default';
ALTER TABLE agent_versions ALTER COLUMN project DROP DEFAULT;
ALTER TABLE agents ADD PRIMARY KEY (project, id);
ALTER TABLE agent_versions ADD PRIMARY KEY (project, agent_id, version);
ALTER TABLE agent_versions ADD FOREIGN KEY (project, agent_id)
    REFERENCES agents (project, id) ON DELETE CASCADE;
