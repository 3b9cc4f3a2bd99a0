//! Where a session's run is and what it has been sent: its node, the
//! forwarded-input cursor, the turn a lost run left in flight, its
//! snapshots, and the state the reconcile pass judges runs by.

use uuid::Uuid;

use super::Store;
use crate::error::Result;

mod sql {
    /// Moves the forwarded-input cursor forward (never back).
    pub const SET_INPUT_SEQ: &str =
        "UPDATE sessions SET input_seq = greatest(input_seq, $2) WHERE id = $1";

    /// Records where the session runs. `epoch = $2`: a superseded placement
    /// does not overwrite the current one.
    /// A start also ends the backoff of earlier starts that found no node;
    /// a fresh run (`$4` false) starts the node's frame count over, a
    /// re-attached one goes on with it. The input cursor moves to `$5` (the
    /// message the start carried) in the same write, so a later owner
    /// that re-attaches never sends it again.
    pub const SET_NODE: &str = "UPDATE sessions SET node = $3, update_time = now(), \
         requeues = 0, claim_after = NULL, node_seq = CASE WHEN $4 THEN node_seq ELSE 0 END, \
         input_seq = greatest(input_seq, $5) \
         WHERE id = $1 AND epoch = $2";

    /// Each session's epoch, node and status (the reconcile pass judges a
    /// node's runs by them). By primary key.
    pub const RUN_STATES: &str = "SELECT id, epoch, node, status FROM sessions WHERE id = ANY($1)";

    /// Forgets where the session ran: its node said it has no run of it
    /// any more, so it is no longer one to re-attach.
    pub const CLEAR_NODE: &str = "UPDATE sessions SET node = '' WHERE id = $1 AND epoch = $2";

    /// Moves the forwarded-input cursor back, so input from `$2` on is
    /// delivered again (a turn lost with its node).
    pub const REWIND_INPUT_SEQ: &str =
        "UPDATE sessions SET input_seq = $2 WHERE id = $1 AND epoch = $3";

    /// The first user message forwarded ($2: the input cursor) after the
    /// last turn that ended: a turn the lost run never finished.
    pub const TURN_IN_FLIGHT: &str = r#"
WITH last_turn AS (
    SELECT coalesce(max(seq), 0) AS seq FROM events
    WHERE session_id = $1 AND type = 'session.usage'
)
SELECT min(m.seq) FROM events m, last_turn t
WHERE m.session_id = $1 AND m.type = 'user.message' AND m.seq > t.seq AND m.seq <= $2
"#;

    /// `runtime_session_id = ''`: only the first id sticks; on resume the CLI
    /// may report another.
    pub const SET_RUNTIME_SESSION_ID: &str =
        "UPDATE sessions SET runtime_session_id = $2 WHERE id = $1 AND runtime_session_id = ''";

    /// Records a saved snapshot as the session's newest.
    pub const RECORD_SNAPSHOT: &str = r#"
UPDATE sessions
SET snapshot_key = $2, snapshot_bytes = $3, snapshot_time = now(), snapshots = snapshots + 1
WHERE id = $1
"#;

    /// Records a checkpoint as the session's newest snapshot (checkpoints
    /// have keys of their own: they do not count toward `snapshots`).
    pub const RECORD_CHECKPOINT: &str = r#"
UPDATE sessions
SET snapshot_key = $2, snapshot_bytes = $3, snapshot_time = now()
WHERE id = $1
"#;
}

/// Where a session runs now, as the reconcile pass reads it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub(crate) struct RunState {
    pub id: Uuid,
    pub epoch: i64,
    /// The node of its current run ('' when none).
    pub node: String,
    pub status: String,
}

impl Store {
    /// Moves the forwarded-input cursor forward (never back).
    pub(crate) async fn set_input_seq(&self, id: Uuid, seq: i64) -> Result<()> {
        sqlx::query(sql::SET_INPUT_SEQ)
            .bind(id)
            .bind(seq)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Records where the session runs.
    pub(crate) async fn set_node(
        &self,
        id: Uuid,
        epoch: i64,
        node: &str,
        attached: bool,
        input_seq: i64,
    ) -> Result<()> {
        sqlx::query(sql::SET_NODE)
            .bind(id)
            .bind(epoch)
            .bind(node)
            .bind(attached)
            .bind(input_seq)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Where each of `ids` runs now, for the reconcile pass.
    pub(crate) async fn run_states(&self, ids: &[Uuid]) -> Result<Vec<RunState>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        Ok(sqlx::query_as(sql::RUN_STATES)
            .bind(ids)
            .fetch_all(&self.pool)
            .await?)
    }

    /// Forgets where the session ran (see [`sql::CLEAR_NODE`]).
    pub(crate) async fn clear_node(&self, id: Uuid, epoch: i64) -> Result<()> {
        sqlx::query(sql::CLEAR_NODE)
            .bind(id)
            .bind(epoch)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// The seq of the first user message of a turn that was forwarded but
    /// never ended (see [`sql::TURN_IN_FLIGHT`]).
    pub(crate) async fn turn_in_flight(&self, id: Uuid, input_seq: i64) -> Result<Option<i64>> {
        Ok(sqlx::query_scalar(sql::TURN_IN_FLIGHT)
            .bind(id)
            .bind(input_seq)
            .fetch_one(&self.pool)
            .await?)
    }

    /// Moves the input cursor back to `seq` (at `epoch`).
    pub(crate) async fn rewind_input_seq(&self, id: Uuid, seq: i64, epoch: i64) -> Result<()> {
        sqlx::query(sql::REWIND_INPUT_SEQ)
            .bind(id)
            .bind(seq)
            .bind(epoch)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Keeps the first runtime session id the runtime reports.
    pub(crate) async fn set_runtime_session_id(&self, id: Uuid, runtime_id: &str) -> Result<()> {
        sqlx::query(sql::SET_RUNTIME_SESSION_ID)
            .bind(id)
            .bind(runtime_id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Records a checkpoint the node saved (see [`sql::RECORD_CHECKPOINT`]).
    pub(crate) async fn record_checkpoint(&self, id: Uuid, key: &str, bytes: i64) -> Result<()> {
        sqlx::query(sql::RECORD_CHECKPOINT)
            .bind(id)
            .bind(key)
            .bind(bytes)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Records a saved snapshot as the session's newest.
    pub(crate) async fn record_snapshot(&self, id: Uuid, key: &str, size_bytes: i64) -> Result<()> {
        sqlx::query(sql::RECORD_SNAPSHOT)
            .bind(id)
            .bind(key)
            .bind(size_bytes)
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}
