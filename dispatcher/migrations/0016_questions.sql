-- The agent's questions (`agent.question`) wait on a person as a tool
-- permission request does: subscribers see `session.requires_action` for
-- them too. The outbox function and its trigger learn the event type
-- (`berth_dispatcher::session::notify` is the rule they follow; the test
-- `notify::the_outbound_trigger_agrees_with_the_domain` holds them to it).
CREATE OR REPLACE FUNCTION berth_enqueue_outbound() RETURNS trigger LANGUAGE plpgsql AS $$
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
        WHEN 'agent.question' THEN ARRAY['session.requires_action']
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

DROP TRIGGER events_outbound ON events;
CREATE TRIGGER events_outbound AFTER INSERT ON events FOR EACH ROW
    WHEN (NEW.type IN ('session.status_idle', 'session.status_failed',
                       'session.status_stopped', 'agent.tool_permission', 'agent.question'))
    EXECUTE FUNCTION berth_enqueue_outbound();
