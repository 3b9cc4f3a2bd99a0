-- A session no node would start goes back to the queue with a backoff, so
-- it never churns epochs: it is not claimed again before `claim_after`.
-- `requeues` counts the starts in a row that found no node (reset when one
-- starts it).
ALTER TABLE sessions
    ADD COLUMN claim_after timestamptz,
    ADD COLUMN requeues integer NOT NULL DEFAULT 0;
