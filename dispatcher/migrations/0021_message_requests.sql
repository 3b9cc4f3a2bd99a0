-- A message sent with a request id (SendMessage's idempotency key, AIP-155)
-- is logged once per session: a retry finds it here, and a retry that races
-- the first call is refused by the index. Messages without one index as
-- NULL, which never conflicts.
CREATE UNIQUE INDEX events_message_request
    ON events (session_id, (payload::jsonb ->> 'request_id'))
    WHERE type = 'user.message';
