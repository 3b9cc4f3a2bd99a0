-- Outbound webhooks: a project's subscriptions to session status changes.
-- A trigger on `events` enqueues one delivery per matching subscription in
-- the same transaction that persists the event (an outbox): nothing the
-- sessions do waits on a receiver, and no change is lost between the event
-- and its delivery. Dispatchers claim due deliveries (a lease, one
-- statement), POST them signed, and retry with backoff.
CREATE TABLE subscriptions (
    id              uuid PRIMARY KEY,
    project         text NOT NULL,
    subscription_id text NOT NULL,
    url             text NOT NULL,
    event_types     text[] NOT NULL,
    sealed          bytea NOT NULL,
    kek             text NOT NULL,
    creator         text NOT NULL,
    create_time     timestamptz NOT NULL DEFAULT now(),
    UNIQUE (project, subscription_id)
);

CREATE TABLE outbound_deliveries (
    id                uuid PRIMARY KEY,
    subscription      uuid NOT NULL REFERENCES subscriptions (id) ON DELETE CASCADE,
    event_type        text NOT NULL,
    session_id        uuid NOT NULL,
    seq               bigint NOT NULL,
    payload           text NOT NULL,
    event_time        timestamptz NOT NULL,
    -- 'pending', 'delivered' or 'failed' (attempts used up).
    status            text NOT NULL DEFAULT 'pending',
    attempts          integer NOT NULL DEFAULT 0,
    next_attempt_time timestamptz NOT NULL DEFAULT now(),
    -- A claimed delivery is the claimer's until then.
    lease_until       timestamptz,
    last_status_code  integer,
    last_error        text NOT NULL DEFAULT '',
    create_time       timestamptz NOT NULL DEFAULT now(),
    deliver_time      timestamptz
);

CREATE INDEX outbound_deliveries_due ON outbound_deliveries (next_attempt_time)
    WHERE status = 'pending';
CREATE INDEX outbound_deliveries_log ON outbound_deliveries (subscription, create_time);

-- The event types subscribers see, from the events that make them.
CREATE FUNCTION berth_enqueue_outbound() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    kinds text[];
BEGIN
    kinds := CASE NEW.type
        WHEN 'session.status_idle' THEN ARRAY['session.idle']
        WHEN 'session.status_failed' THEN ARRAY['session.failed']
        -- A text match, not a jsonb cast: a payload jsonb cannot hold (a
        -- `\u0000` in a stderr tail) must never fail the event's insert.
        WHEN 'session.status_stopped' THEN
            CASE WHEN position('"reason":"budget"' IN NEW.payload) > 0
                THEN ARRAY['session.terminated', 'session.budget_reached']
                ELSE ARRAY['session.terminated'] END
        WHEN 'agent.tool_permission' THEN ARRAY['session.requires_action']
        ELSE ARRAY[]::text[]
    END;
    INSERT INTO outbound_deliveries (id, subscription, event_type, session_id, seq, payload, event_time)
    SELECT gen_random_uuid(), s.id, k, NEW.session_id, NEW.seq, NEW.payload, NEW.create_time
    FROM sessions x
    JOIN subscriptions s ON s.project = x.project
    CROSS JOIN unnest(kinds) AS k
    WHERE x.id = NEW.session_id AND k = ANY (s.event_types);
    RETURN NULL;
END
$$;

CREATE TRIGGER events_outbound AFTER INSERT ON events FOR EACH ROW
    WHEN (NEW.type IN ('session.status_idle', 'session.status_failed',
                       'session.status_stopped', 'agent.tool_permission'))
    EXECUTE FUNCTION berth_enqueue_outbound();
