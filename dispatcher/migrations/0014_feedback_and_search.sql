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

-- Search over the messages' text (the user's and the agent's). The text is
-- read from the payload's JSON; a payload jsonb cannot hold (a `\u0000`
-- escape) is read with the NULs dropped, and one that still fails gives no
-- text: an index expression that raised would fail the event's insert. Only
-- the first 65,536 characters are indexed (a tsvector holds at most 1 MiB).
CREATE FUNCTION berth_message_text(payload text) RETURNS text
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
BEGIN
    BEGIN
        RETURN left(payload::jsonb ->> 'text', 65536);
    EXCEPTION WHEN others THEN
        BEGIN
            RETURN left(replace(payload, '\u0000', '')::jsonb ->> 'text', 65536);
        EXCEPTION WHEN others THEN
            RETURN '';
        END;
    END;
END
$$;

CREATE INDEX events_message_text ON events
    USING gin (to_tsvector('simple', berth_message_text(payload)))
    WHERE type IN ('user.message', 'agent.message');
