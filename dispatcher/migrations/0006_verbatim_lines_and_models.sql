-- Agent lines are kept byte for byte: the line itself in `raw` (bytea, on
-- the first event made from it), and each event's payload as the text it
-- was written as (jsonb would normalise it, and cannot hold \u0000).
-- `line_part` is an event's place among the events of its line (0 carries
-- `raw`); NULL for events not made from an agent's line. The line's first
-- event is at seq - line_part: a line's events are appended together.
ALTER TABLE events ALTER COLUMN payload TYPE text USING payload::text;
ALTER TABLE events ADD COLUMN raw bytea, ADD COLUMN line_part integer;

-- Usage per model: a turn has one row per model it used (a sub-agent on
-- another model has its own), and the session's totals per model.
ALTER TABLE session_turns DROP CONSTRAINT session_turns_pkey;
ALTER TABLE session_turns ADD PRIMARY KEY (session_id, turn, model);
CREATE TABLE session_models (
    session_id                  uuid NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    model                       text NOT NULL,
    input_tokens                bigint NOT NULL DEFAULT 0,
    output_tokens               bigint NOT NULL DEFAULT 0,
    cache_read_input_tokens     bigint NOT NULL DEFAULT 0,
    cache_creation_input_tokens bigint NOT NULL DEFAULT 0,
    cost_usd                    double precision NOT NULL DEFAULT 0,
    PRIMARY KEY (session_id, model)
);
INSERT INTO session_models (session_id, model, input_tokens, output_tokens,
                            cache_read_input_tokens, cache_creation_input_tokens, cost_usd)
SELECT session_id, model, sum(input_tokens), sum(output_tokens), sum(cache_read_input_tokens),
       sum(cache_creation_input_tokens), sum(cost_usd)
FROM session_turns GROUP BY session_id, model;
