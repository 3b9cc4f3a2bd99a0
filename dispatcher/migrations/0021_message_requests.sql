-- A message sent with a request id (SendMessage's idempotency key, AIP-155)
-- is logged once per session: a retry finds it here, and a retry that races
-- the first call is refused by the index. Its own column, not a path into
-- the payload: a message's text may hold an escaped NUL, which no JSON
-- operator of Postgres can read.
ALTER TABLE events ADD COLUMN request_id text;
CREATE UNIQUE INDEX events_message_request
    ON events (session_id, request_id)
    WHERE request_id IS NOT NULL;
