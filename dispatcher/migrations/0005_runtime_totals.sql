-- The running totals (cost and tokens) the runtime last reported for the
-- session's conversation: Claude Code reports totals, not per-turn figures,
-- and continues them across --resume, so each turn is the rise from these.
ALTER TABLE sessions ADD COLUMN runtime_totals jsonb NOT NULL DEFAULT '{}';
