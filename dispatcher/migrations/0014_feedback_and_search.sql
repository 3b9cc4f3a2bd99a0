-- Feedback: a rating (1-5) and a comment per caller, for a whole session
-- (turn 0) or one of its turns.
CREATE TABLE feedback (
    session_id  uuid NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    turn        bigint NOT NULL,
    identity    text NOT NULL,
    rating      integer NOT NULL CHECK (rating BETWEEN 1 AND 5),
    comment     text NOT NULL DEFAULT '',
    update_time timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (session_id, turn, identity)
);

-- Search over the messages' text (the user's and the agent's).
CREATE INDEX events_message_text ON events
    USING gin (to_tsvector('simple', payload::jsonb ->> 'text'))
    WHERE type IN ('user.message', 'agent.message');
