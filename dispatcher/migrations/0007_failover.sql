-- A session no node would start goes back to the queue with a backoff, so
-- it never churns epochs: it is not claimed again before `claim_after`.
-- `requeues` counts the starts in a row that found no node (reset when one
-- starts it).
ALTER TABLE sessions
    ADD COLUMN claim_after timestamptz,
    ADD COLUMN requeues integer NOT NULL DEFAULT 0;

-- The node-side sequence number of the last frame of the session's current
-- run whose events are persisted. A dispatcher that takes over a run its
-- lost owner left (re-attach) asks the node for the frames after it.
ALTER TABLE sessions ADD COLUMN node_seq bigint NOT NULL DEFAULT 0;
