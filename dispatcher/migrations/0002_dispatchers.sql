-- Dispatcher liveness: each dispatcher refreshes its row on a timer. A live
-- session whose owner has not heartbeated within the dispatcher lease is
-- orphaned (its dispatcher crashed) and is re-queued by any live dispatcher.
CREATE TABLE dispatchers (
    id              text PRIMARY KEY,
    heartbeat_time  timestamptz NOT NULL DEFAULT now()
);

-- Finds live sessions by owner without scanning finished ones.
CREATE INDEX sessions_live_owner ON sessions (owner)
    WHERE status IN ('starting', 'running', 'idle', 'stopping');
