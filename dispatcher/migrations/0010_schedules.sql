-- Schedules: cron-driven sessions of an agent. Every dispatcher polls for due
-- schedules; a fire is claimed by a compare-and-set on `next_fire_time` that
-- also inserts its row in `schedule_fires` (one statement), so each cron time
-- fires once however many dispatchers run. The fire's session is created
-- with a request id derived from (schedule, fire time): a dispatcher that
-- dies between the claim and the creation leaves a fire any other
-- dispatcher completes with the same session.
CREATE TABLE schedules (
    id             uuid PRIMARY KEY,
    project        text NOT NULL,
    schedule_id    text NOT NULL,
    display_name   text NOT NULL DEFAULT '',
    agent          text NOT NULL,
    cron           text NOT NULL,
    timezone       text NOT NULL,
    input          text NOT NULL,
    labels         jsonb NOT NULL DEFAULT '{}',
    suspended      boolean NOT NULL DEFAULT false,
    -- NULL while suspended.
    next_fire_time timestamptz,
    last_fire_time timestamptz,
    creator        text NOT NULL,
    create_time    timestamptz NOT NULL DEFAULT now(),
    update_time    timestamptz NOT NULL DEFAULT now(),
    UNIQUE (project, schedule_id)
);

CREATE INDEX schedules_due ON schedules (next_fire_time) WHERE NOT suspended;

CREATE TABLE schedule_fires (
    schedule    uuid NOT NULL REFERENCES schedules (id) ON DELETE CASCADE,
    fire_time   timestamptz NOT NULL,
    -- 'cron', 'catch_up', 'manual' or 'missed'.
    kind        text NOT NULL,
    -- Cron times before this one missed and not run.
    skipped     integer NOT NULL DEFAULT 0,
    -- NULL until the session exists (or for a missed fire or an error).
    session_id  uuid,
    error       text NOT NULL DEFAULT '',
    -- Whoever holds the fire until its session is recorded; a claim older
    -- than the dispatcher lease is taken over.
    dispatcher  text NOT NULL,
    claim_time  timestamptz NOT NULL DEFAULT now(),
    -- The manual trigger's request id, if any.
    request_id  text,
    create_time timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (schedule, fire_time)
);

CREATE UNIQUE INDEX schedule_fires_request ON schedule_fires (schedule, request_id)
    WHERE request_id IS NOT NULL;
-- Fires still owed a session, for the takeover sweep.
CREATE INDEX schedule_fires_open ON schedule_fires (claim_time)
    WHERE session_id IS NULL AND error = '' AND kind <> 'missed';
