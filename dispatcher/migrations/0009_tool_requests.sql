-- Tool permission requests: one row per request an agent asked, from the
-- `agent.tool_permission` event (written in the same transaction) until it
-- is answered (`user.tool_confirmation`, by a person or the timeout) or
-- closed without an answer (the agent withdrew it, or its run ended).
CREATE TABLE tool_requests (
    session_id    uuid NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    tool_use_id   text NOT NULL,
    -- The runtime's id for the request: the answer carries it back.
    request_id    text NOT NULL,
    tool_name     text NOT NULL DEFAULT '',
    input         jsonb NOT NULL DEFAULT '{}',
    reason        text NOT NULL DEFAULT '',
    suggestions   jsonb NOT NULL DEFAULT '[]',
    -- The run that asked, and the seq of its `agent.tool_permission` event.
    epoch         bigint NOT NULL,
    ask_seq       bigint NOT NULL,
    -- The `user.message` whose turn asked (delivered again when a pause
    -- closes the request, so the agent asks again after the resume).
    message_seq   bigint NOT NULL DEFAULT 0,
    ask_time      timestamptz NOT NULL DEFAULT now(),
    deadline      timestamptz NOT NULL,
    -- What the policy's timeout applies: 'allow' or 'deny'.
    timeout_decision text NOT NULL DEFAULT 'deny',
    -- NULL while pending; then 'allow', 'deny' or 'cancelled'.
    decision      text,
    -- The `user.tool_confirmation` payload (or the cancellation's), and
    -- its seq.
    answer        jsonb,
    answer_seq    bigint,
    answer_time   timestamptz,
    PRIMARY KEY (session_id, tool_use_id)
);

-- Pending requests, for the sessions' activity, the waiting list and the
-- pending-confirmations gauge.
CREATE INDEX tool_requests_pending ON tool_requests (session_id, ask_time)
    WHERE decision IS NULL;
