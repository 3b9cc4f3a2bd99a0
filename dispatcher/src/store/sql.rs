//! The dispatcher's SQL, one named statement each, with what every predicate
//! is for. Each write is a single statement, so it is atomic without an
//! explicit transaction and costs one round trip.

/// Columns read into a `Session`.
pub const SESSION_COLUMNS: &str = "id, request_id, display_name, status, status_reason, spec, labels, node, owner, \
     epoch, last_seq, input_seq, runtime_session_id, input_tokens, output_tokens, cache_read_input_tokens, \
     cache_creation_input_tokens, cost_usd, turns, timeout_ms, create_time, update_time, start_time, end_time, \
     agent_id, agent_version, resources, inactivity_timeout_ms, budget_usd, queue_timeout_ms, queue_deadline, \
     snapshot_key, snapshot_bytes, snapshot_time, snapshots, archive_time";

/// Creates a session with its first events, and wakes the queue.
/// `ON CONFLICT (request_id) DO NOTHING`: a retried create inserts nothing and
/// the caller reads the existing row instead.
pub const CREATE_SESSION: &str = r#"
WITH created AS (
    INSERT INTO sessions (id, request_id, display_name, status, spec, labels, timeout_ms, last_seq,
                          agent_id, agent_version, resources, inactivity_timeout_ms, budget_usd,
                          queue_timeout_ms, queue_deadline)
    VALUES ($1, $2, $3, 'pending', $4, $5, $6, cardinality($7::bigint[]),
            $11, $12, $13, $14, $15, $16, now() + $16 * interval '1 millisecond')
    ON CONFLICT (request_id) DO NOTHING
    RETURNING id, pg_notify('berth_queue', id::text) IS NULL AS notified
), logged AS (
    INSERT INTO events (session_id, seq, id, type, payload)
    SELECT c.id, e.seq, e.id, e.type, e.payload::jsonb
    FROM created c, unnest($7::bigint[], $8::uuid[], $9::text[], $10::text[]) AS e(seq, id, type, payload)
)
SELECT id FROM created
"#;

/// Claims up to `$3` of the oldest queued sessions for this dispatcher and
/// moves each to `starting` with a new epoch, logging the status change
/// (event ids from `$2`, one per row). One statement for a whole batch: at
/// hundreds of sessions a second, a claim per round trip falls behind.
/// `FOR UPDATE SKIP LOCKED`: dispatchers claiming at once take different rows.
pub const CLAIM_SESSIONS: &str = r#"
WITH next AS (
    SELECT id, status FROM sessions
    WHERE status IN ('pending', 'rescheduling')
    ORDER BY create_time
    LIMIT $3
    FOR UPDATE SKIP LOCKED
), moved AS (
    UPDATE sessions s
    SET status = 'starting', status_reason = '', epoch = s.epoch + 1, owner = $1,
        last_seq = s.last_seq + 1, update_time = now()
    FROM next
    WHERE s.id = next.id
    RETURNING s.id, s.last_seq, s.epoch, next.status AS previous,
              pg_notify('berth_events', s.id::text || ':' || s.last_seq) IS NULL AS notified
), numbered AS (
    SELECT m.*, row_number() OVER () AS n FROM moved m
), logged AS (
    INSERT INTO events (session_id, seq, id, type, payload)
    SELECT id, last_seq, ($2::uuid[])[n], 'session.status_starting',
           jsonb_build_object('status', 'starting', 'previous', previous, 'epoch', epoch, 'reason', '')
    FROM numbered
)
SELECT id FROM numbered
"#;

/// Compare-and-set of a status, logging the change as an event.
/// `status = $2 AND epoch = $9`: the change applies only if nobody moved or
/// re-placed the session since the caller read it; no row back means the
/// caller must re-read.
pub const TRANSITION: &str = r#"
WITH moved AS (
    UPDATE sessions
    SET status = $3, status_reason = $4, last_seq = last_seq + 1, update_time = now(),
        start_time = CASE WHEN $3 IN ('running', 'idle') THEN coalesce(start_time, now()) ELSE start_time END,
        end_time = CASE WHEN $5 THEN now() WHEN $3 = 'pending' THEN NULL ELSE end_time END,
        -- Archiving stamps the time retention counts from.
        archive_time = CASE WHEN $3 = 'archived' THEN now() ELSE archive_time END,
        -- Back in the queue (resumed): a fresh queue deadline.
        queue_deadline = CASE WHEN $3 = 'pending' THEN now() + queue_timeout_ms * interval '1 millisecond'
                              ELSE queue_deadline END,
        node = CASE WHEN $5 THEN '' ELSE node END,
        owner = CASE WHEN $5 THEN '' ELSE owner END
    WHERE id = $1 AND status = $2 AND epoch = $9
    RETURNING id, last_seq, pg_notify('berth_events', id::text || ':' || last_seq) IS NULL AS notified
)
INSERT INTO events (session_id, seq, id, type, payload)
SELECT id, last_seq, $6, $7, $8::jsonb FROM moved
RETURNING seq, create_time
"#;

/// Appends a batch of events for any number of sessions, numbering each
/// session's events from its `last_seq` under the row lock (gapless), and
/// notifies other dispatchers once per session.
pub const APPEND_EVENTS: &str = r#"
WITH input AS (
    SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::text[]) WITH ORDINALITY
        AS t(session_id, id, type, payload, ord)
), counts AS (
    SELECT session_id, count(*) AS n FROM input GROUP BY session_id
), bumped AS (
    UPDATE sessions s
    SET last_seq = s.last_seq + c.n, update_time = now()
    FROM counts c
    WHERE s.id = c.session_id
    RETURNING s.id, s.last_seq - c.n AS base,
              pg_notify('berth_events', s.id::text || ':' || s.last_seq) IS NULL AS notified
)
INSERT INTO events (session_id, seq, id, type, payload)
SELECT i.session_id, b.base + row_number() OVER (PARTITION BY i.session_id ORDER BY i.ord), i.id, i.type, i.payload::jsonb
FROM input i JOIN bumped b ON b.id = i.session_id
RETURNING session_id, seq, id, create_time
"#;

/// Adds a turn's usage to the session's totals, records the turn, and logs
/// a `session.usage` event carrying both.
pub const RECORD_USAGE: &str = r#"
WITH totals AS (
    UPDATE sessions
    SET input_tokens = input_tokens + $2, output_tokens = output_tokens + $3,
        cache_read_input_tokens = cache_read_input_tokens + $4,
        cache_creation_input_tokens = cache_creation_input_tokens + $5,
        cost_usd = cost_usd + $6, turns = turns + 1, last_seq = last_seq + 1, update_time = now()
    WHERE id = $1
    RETURNING id, turns, last_seq, input_tokens, output_tokens, cache_read_input_tokens,
              cache_creation_input_tokens, cost_usd,
              pg_notify('berth_events', id::text || ':' || last_seq) IS NULL AS notified
), turn AS (
    INSERT INTO session_turns (session_id, turn, model, input_tokens, output_tokens,
                               cache_read_input_tokens, cache_creation_input_tokens, cost_usd)
    SELECT id, turns, $7, $2, $3, $4, $5, $6 FROM totals
)
INSERT INTO events (session_id, seq, id, type, payload)
SELECT id, last_seq, $8, 'session.usage', jsonb_build_object(
    'turn', jsonb_build_object('number', turns, 'model', $7::text, 'input_tokens', $2::bigint,
        'output_tokens', $3::bigint, 'cache_read_input_tokens', $4::bigint,
        'cache_creation_input_tokens', $5::bigint, 'cost_usd', $6::float8),
    'total', jsonb_build_object('turns', turns, 'input_tokens', input_tokens, 'output_tokens', output_tokens,
        'cache_read_input_tokens', cache_read_input_tokens,
        'cache_creation_input_tokens', cache_creation_input_tokens, 'cost_usd', cost_usd))
FROM totals
RETURNING session_id, seq, id, create_time, payload::text
"#;

/// One page of a session's log after a seq.
pub const LIST_EVENTS: &str = "SELECT session_id, seq, id, type, create_time, payload::text AS payload \
     FROM events WHERE session_id = $1 AND seq > $2 ORDER BY seq LIMIT $3";

/// Whether user input is waiting beyond the forwarded cursor.
pub const PENDING_INPUT: &str = "SELECT EXISTS (SELECT 1 FROM events \
     WHERE session_id = $1 AND seq > $2 AND type = 'user.message')";

/// Records that dispatcher $1 is alive.
pub const HEARTBEAT: &str = r#"
INSERT INTO dispatchers (id, heartbeat_time) VALUES ($1, now())
ON CONFLICT (id) DO UPDATE SET heartbeat_time = now()
"#;

/// Live sessions whose owner has not heartbeated within $1 seconds: their
/// dispatcher is gone. (`owner <> ''`: claimed sessions only.)
pub const ORPHANED_SESSIONS: &str = r#"
SELECT s.id, s.epoch, s.owner FROM sessions s
WHERE s.status IN ('starting', 'running', 'idle', 'stopping')
  AND s.owner <> ''
  AND NOT EXISTS (
      SELECT 1 FROM dispatchers d
      WHERE d.id = s.owner AND d.heartbeat_time > now() - make_interval(secs => $1)
  )
LIMIT 1000
"#;

/// Queued sessions whose queue deadline has passed and that were never
/// placed (`start_time IS NULL`: a `rescheduling` session that no node would
/// take never ran either), oldest first.
pub const EXPIRED_PENDING: &str = r#"
SELECT id, epoch FROM sessions
WHERE status IN ('pending', 'rescheduling') AND start_time IS NULL
  AND queue_deadline IS NOT NULL AND queue_deadline < now()
ORDER BY queue_deadline
LIMIT 1000
"#;

/// Records a saved snapshot as the session's newest.
pub const RECORD_SNAPSHOT: &str = r#"
UPDATE sessions
SET snapshot_key = $2, snapshot_bytes = $3, snapshot_time = now(), snapshots = snapshots + 1
WHERE id = $1
"#;

/// Deletes a session that is not live; events and turns go with it (cascade).
/// `status <> ALL($2)`: a live session is never deleted.
pub const DELETE_SESSION: &str =
    "DELETE FROM sessions WHERE id = $1 AND status <> ALL($2) RETURNING id";

/// Deletes the events of sessions archived before the cutoff ($1 days ago).
pub const PURGE_ARCHIVED_EVENTS: &str = r#"
DELETE FROM events e
USING sessions s
WHERE e.session_id = s.id
  AND s.status = 'archived'
  AND s.archive_time < now() - make_interval(days => $1)
"#;

/// Columns read into an `Agent`: the agent joined with one of its versions.
pub const AGENT_COLUMNS: &str = "a.id, v.version, a.latest_version, v.spec, a.archived, a.create_time, v.create_time AS version_create_time";

/// Creates an agent at version 1. `ON CONFLICT DO NOTHING`: an existing id
/// returns no row (ALREADY_EXISTS).
pub const CREATE_AGENT: &str = r#"
WITH a AS (
    INSERT INTO agents (id) VALUES ($1) ON CONFLICT (id) DO NOTHING RETURNING id
)
INSERT INTO agent_versions (agent_id, version, spec)
SELECT id, 1, $2 FROM a
RETURNING agent_id
"#;

/// Adds the next version of an agent that is not archived.
pub const UPDATE_AGENT: &str = r#"
WITH a AS (
    UPDATE agents SET latest_version = latest_version + 1, update_time = now()
    WHERE id = $1 AND NOT archived
    RETURNING id, latest_version
)
INSERT INTO agent_versions (agent_id, version, spec)
SELECT id, latest_version, $2 FROM a
RETURNING version
"#;

/// Sessions not yet ended, by status, and how long the oldest queued one has
/// waited (its last status change: creation, a resume or a re-queue).
/// Served by `sessions_open_status`.
pub const OPEN_COUNTS: &str = r#"
SELECT status, count(*) AS n,
       COALESCE(EXTRACT(EPOCH FROM now() - min(update_time)), 0)::float8 AS oldest_s
FROM sessions
WHERE status IN ('pending', 'starting', 'running', 'idle', 'stopping', 'rescheduling', 'paused')
GROUP BY status
"#;
