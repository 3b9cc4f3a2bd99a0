-- The metrics sampler counts sessions that have not ended, by status, every
-- few seconds on every dispatcher: without scanning finished sessions.
CREATE INDEX sessions_open_status ON sessions (status)
    WHERE status IN ('pending', 'starting', 'running', 'idle', 'stopping', 'rescheduling', 'paused');
