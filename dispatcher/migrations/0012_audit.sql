-- The audit trail: one row per action a caller (or a schedule or webhook on
-- their behalf) took. Rows outlive the resources they name.
CREATE TABLE audit_events (
    id        bigserial PRIMARY KEY,
    project   text NOT NULL,
    time      timestamptz NOT NULL DEFAULT now(),
    identity  text NOT NULL,
    action    text NOT NULL,
    resource  text NOT NULL,
    detail    jsonb NOT NULL DEFAULT '{}'
);

CREATE INDEX audit_events_project ON audit_events (project, id);
CREATE INDEX audit_events_resource ON audit_events (project, resource, id);
