-- Slack apps: a webhook with a bot token (a credential secret) takes
-- Slack's Events API (its sealed secret is then the app's signing secret),
-- and each Slack thread is one session of its agent at a time.
ALTER TABLE webhooks ADD COLUMN slack_bot_secret uuid;

CREATE TABLE slack_threads (
    webhook     uuid NOT NULL REFERENCES webhooks (id) ON DELETE CASCADE,
    project     text NOT NULL,
    agent       text NOT NULL,
    team        text NOT NULL,
    channel     text NOT NULL,
    thread_ts   text NOT NULL,
    -- The thread's session, and how many it had before (a thread whose
    -- session ended starts the next one).
    session_id  uuid NOT NULL,
    generation  integer NOT NULL DEFAULT 0,
    -- Replies: the last event posted to the thread, and the lease of the
    -- dispatcher posting.
    posted_seq  bigint NOT NULL DEFAULT 0,
    lease_until timestamptz,
    lease_owner text NOT NULL DEFAULT '',
    create_time timestamptz NOT NULL DEFAULT now(),
    UNIQUE (project, agent, team, channel, thread_ts)
);
CREATE INDEX slack_threads_session ON slack_threads (session_id);
