-- OpenTelemetry: the trace context (W3C traceparent) a session was created
-- in, which its placement joins, and the one each event was written in (a
-- message's API call, an agent event's turn). NULL when traces are off.
ALTER TABLE sessions ADD COLUMN traceparent text;
ALTER TABLE events ADD COLUMN traceparent text;
