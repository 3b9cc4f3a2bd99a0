-- Sessions, their event logs and per-turn usage.

CREATE TABLE sessions (
    id                          uuid PRIMARY KEY,
    -- Idempotency key of the create request (NULLs never conflict).
    request_id                  text UNIQUE,
    display_name                text NOT NULL DEFAULT '',
    status                      text NOT NULL,
    status_reason               text NOT NULL DEFAULT '',
    spec                        jsonb NOT NULL,
    labels                      jsonb NOT NULL DEFAULT '{}',
    node                        text NOT NULL DEFAULT '',
    -- The dispatcher driving the session while it runs.
    owner                       text NOT NULL DEFAULT '',
    -- Incremented on every placement (fencing).
    epoch                       bigint NOT NULL DEFAULT 0,
    -- Seq of the newest event; bumped under the row lock, so seqs are gapless.
    last_seq                    bigint NOT NULL DEFAULT 0,
    -- Seq of the last user event forwarded to the runtime.
    input_seq                   bigint NOT NULL DEFAULT 0,
    runtime_session_id          text NOT NULL DEFAULT '',
    input_tokens                bigint NOT NULL DEFAULT 0,
    output_tokens               bigint NOT NULL DEFAULT 0,
    cache_read_input_tokens     bigint NOT NULL DEFAULT 0,
    cache_creation_input_tokens bigint NOT NULL DEFAULT 0,
    cost_usd                    double precision NOT NULL DEFAULT 0,
    turns                       bigint NOT NULL DEFAULT 0,
    timeout_ms                  bigint,
    create_time                 timestamptz NOT NULL DEFAULT now(),
    update_time                 timestamptz NOT NULL DEFAULT now(),
    start_time                  timestamptz,
    end_time                    timestamptz
);

-- The queue: oldest claimable first.
CREATE INDEX sessions_queue ON sessions (create_time) WHERE status IN ('pending', 'rescheduling');
-- ListSessions: newest first, keyset-paginated.
CREATE INDEX sessions_list ON sessions (create_time DESC, id DESC);

CREATE TABLE events (
    session_id  uuid NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    seq         bigint NOT NULL,
    id          uuid NOT NULL,
    type        text NOT NULL,
    payload     jsonb NOT NULL,
    create_time timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (session_id, seq)
);

CREATE TABLE session_turns (
    session_id                  uuid NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    turn                        bigint NOT NULL,
    model                       text NOT NULL,
    input_tokens                bigint NOT NULL,
    output_tokens               bigint NOT NULL,
    cache_read_input_tokens     bigint NOT NULL,
    cache_creation_input_tokens bigint NOT NULL,
    cost_usd                    double precision NOT NULL,
    create_time                 timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (session_id, turn)
);
