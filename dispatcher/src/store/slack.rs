//! Slack threads: one session of an agent per (project, agent, team,
//! channel, thread) at a time, and the replies posted to each.

use uuid::Uuid;

use super::Store;
use crate::error::Result;

mod sql {
    pub const THREAD: &str = "SELECT session_id, generation FROM slack_threads \
         WHERE project = $1 AND agent = $2 AND team = $3 AND channel = $4 AND thread_ts = $5";

    /// The thread's first session; nothing when another got there first.
    pub const INSERT: &str = "INSERT INTO slack_threads \
         (webhook, project, agent, team, channel, thread_ts, session_id, generation) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, 0) ON CONFLICT DO NOTHING";

    /// The thread's next session, if it is still at generation `$6`.
    pub const NEXT: &str = "UPDATE slack_threads SET session_id = $6, generation = generation + 1, \
         posted_seq = 0 \
         WHERE project = $1 AND agent = $2 AND team = $3 AND channel = $4 AND thread_ts = $5 \
         AND generation = $7";

    /// Threads with events not yet posted, leased to `$1` for `$2` ms.
    pub const CLAIM: &str = "UPDATE slack_threads t SET lease_until = now() + $2 * interval '1 millisecond', \
         lease_owner = $1 \
         FROM (SELECT st.session_id FROM slack_threads st JOIN sessions s ON s.id = st.session_id \
               WHERE s.last_seq > st.posted_seq \
               AND (st.lease_until IS NULL OR st.lease_until < now()) \
               ORDER BY st.create_time LIMIT 32 FOR UPDATE OF st SKIP LOCKED) due \
         WHERE t.session_id = due.session_id \
         RETURNING t.webhook, t.project, t.channel, t.thread_ts, t.session_id, t.posted_seq, t.generation";

    /// Posted up to `$3`; the lease ends.
    pub const POSTED: &str = "UPDATE slack_threads SET posted_seq = greatest(posted_seq, $3), \
         lease_until = NULL WHERE session_id = $1 AND lease_owner = $2";
}

/// Where a thread is.
#[derive(Debug, Clone)]
pub(crate) struct ThreadKey<'a> {
    pub project: &'a str,
    pub agent: &'a str,
    pub team: &'a str,
    pub channel: &'a str,
    pub thread_ts: &'a str,
}

/// A thread with replies to post.
#[derive(Debug, Clone, sqlx::FromRow)]
pub(crate) struct DueThread {
    pub webhook: Uuid,
    pub project: String,
    pub channel: String,
    pub thread_ts: String,
    pub session_id: Uuid,
    pub posted_seq: i64,
    /// Sessions the thread had before this one.
    pub generation: i32,
}

impl Store {
    /// The thread's session and generation.
    pub(crate) async fn slack_thread(&self, k: &ThreadKey<'_>) -> Result<Option<(Uuid, i32)>> {
        Ok(sqlx::query_as(sql::THREAD)
            .bind(k.project)
            .bind(k.agent)
            .bind(k.team)
            .bind(k.channel)
            .bind(k.thread_ts)
            .fetch_optional(&self.pool)
            .await?)
    }

    /// Binds a new thread to `session`; `false` when it was bound first.
    pub(crate) async fn bind_slack_thread(
        &self,
        webhook: Uuid,
        k: &ThreadKey<'_>,
        session: Uuid,
    ) -> Result<bool> {
        let r = sqlx::query(sql::INSERT)
            .bind(webhook)
            .bind(k.project)
            .bind(k.agent)
            .bind(k.team)
            .bind(k.channel)
            .bind(k.thread_ts)
            .bind(session)
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected() == 1)
    }

    /// Moves a thread at `generation` to its next session; `false` when
    /// another did first.
    pub(crate) async fn next_slack_session(
        &self,
        k: &ThreadKey<'_>,
        session: Uuid,
        generation: i32,
    ) -> Result<bool> {
        let r = sqlx::query(sql::NEXT)
            .bind(k.project)
            .bind(k.agent)
            .bind(k.team)
            .bind(k.channel)
            .bind(k.thread_ts)
            .bind(session)
            .bind(generation)
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected() == 1)
    }

    pub(crate) async fn claim_slack_threads(
        &self,
        owner: &str,
        lease: std::time::Duration,
    ) -> Result<Vec<DueThread>> {
        Ok(sqlx::query_as(sql::CLAIM)
            .bind(owner)
            .bind(lease.as_millis() as f64)
            .fetch_all(&self.pool)
            .await?)
    }

    pub(crate) async fn slack_posted(&self, session: Uuid, owner: &str, seq: i64) -> Result<()> {
        sqlx::query(sql::POSTED)
            .bind(session)
            .bind(owner)
            .bind(seq)
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}
