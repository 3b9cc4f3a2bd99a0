//! The queue: batched claims, dispatcher liveness, and the sweep that finds
//! expired sessions (orphans are in [`super::orphans`]). Status names in
//! these statements come from [`SessionStatus`], so the queue and the status
//! machine cannot disagree.

use std::collections::HashMap;
use std::sync::LazyLock;
use std::time::Duration;

use sqlx::AssertSqlSafe;
use uuid::Uuid;

use super::claimed::{Claimed, FirstInput};
use super::sessions::{SESSION_COLUMNS, SessionRow};
use super::{Store, status_literals};
use crate::error::Result;
use crate::session::SessionStatus;

mod sql {
    /// Claims up to `$3` of the oldest queued sessions for this dispatcher
    /// and moves each to `{starting}` with a new epoch, logging the status
    /// change (event ids from `$2`, one per row). One statement for a whole
    /// batch: at hundreds of sessions a second, a claim per round trip falls
    /// behind. `FOR UPDATE SKIP LOCKED`: dispatchers claiming at once take
    /// different rows. `status IN ({claimable})` is `sessions_queue`'s
    /// predicate, so the scan is the index.
    pub const CLAIM_SESSIONS: &str = r#"
WITH next AS (
    SELECT id, status FROM sessions
    WHERE status IN ({claimable}) AND (claim_after IS NULL OR claim_after <= now())
    ORDER BY create_time
    LIMIT $3
    FOR UPDATE SKIP LOCKED
), {moved}"#;

    /// Like [`CLAIM_SESSIONS`], for re-attaches: claims up to `$3` of the
    /// `{rescheduling}` sessions whose last run was on one of the nodes in
    /// `$4` (nodes this dispatcher sees up), whatever their load. Such a
    /// run may still be going there, and re-attaching to it takes no slot:
    /// a full fleet must never turn a lost dispatcher into lost sessions.
    pub const CLAIM_REATTACH: &str = r#"
WITH next AS (
    SELECT id, status FROM sessions
    WHERE status = '{rescheduling}' AND node = ANY($4)
      AND (claim_after IS NULL OR claim_after <= now())
    ORDER BY update_time
    LIMIT $3
    FOR UPDATE SKIP LOCKED
), {moved}"#;

    /// The claim's common part: move `next` to `{starting}`, log it, and
    /// return each claimed session whole, with the first user input its
    /// run has to take (after `input_seq`), so that the start needs no
    /// read-back. The columns are as of the claim: the claim event itself is
    /// not in this statement's snapshot, and it is not input.
    pub const MOVE_CLAIMED: &str = r#"moved AS (
    UPDATE sessions s
    SET status = '{starting}', status_reason = '', epoch = s.epoch + 1, owner = $1,
        last_seq = s.last_seq + 1, update_time = now()
    FROM next
    WHERE s.id = next.id
    RETURNING s.*, next.status AS previous
), numbered AS (
    SELECT m.*, row_number() OVER () AS n FROM moved m
), logged AS (
    INSERT INTO events (session_id, seq, id, type, payload, traceparent)
    SELECT id, last_seq, ($2::uuid[])[n], 'session.status_{starting}',
           jsonb_build_object('status', '{starting}', 'previous', previous, 'epoch', epoch, 'reason', '')::text,
           traceparent
    FROM numbered
)
SELECT {session_columns},
       f.seq AS input_first_seq, f.type AS input_first_type,
       coalesce(f.payload::jsonb ->> 'text', '') AS input_first_text,
       f.traceparent AS input_first_traceparent
FROM numbered s
LEFT JOIN LATERAL (
    SELECT e.seq, e.type, e.payload, e.traceparent FROM events e
    WHERE e.session_id = s.id AND e.seq > s.input_seq AND e.type LIKE 'user.%'
    ORDER BY e.seq LIMIT 1
) f ON true
ORDER BY s.create_time
"#;

    /// Records that dispatcher $1 is alive.
    pub const HEARTBEAT: &str = r#"
INSERT INTO dispatchers (id, heartbeat_time) VALUES ($1, now())
ON CONFLICT (id) DO UPDATE SET heartbeat_time = now()
"#;

    /// Holds a session back from the next claim: a backoff that doubles
    /// with each start in a row that found no node (0.5 s, 1 s, … up to
    /// 30 s), with jitter (×0.5 to ×1.5). Set before the session goes back
    /// to the queue, at its epoch.
    pub const BACK_OFF: &str = r#"
UPDATE sessions
SET claim_after = now() + least(30.0, 0.5 * power(2, least(requeues, 10))) * (0.5 + random())
                          * interval '1 second',
    requeues = requeues + 1
WHERE id = $1 AND epoch = $2
RETURNING claim_after - now() AS delay
"#;

    /// Queued sessions whose queue deadline has passed and that were never
    /// placed (`start_time IS NULL`: a rescheduling session that no node
    /// would take never ran either), oldest first. Served by
    /// `sessions_queue_deadline`.
    pub const EXPIRED_PENDING: &str = r#"
SELECT id, epoch FROM sessions
WHERE status IN ({claimable}) AND start_time IS NULL
  AND queue_deadline IS NOT NULL AND queue_deadline < now()
ORDER BY queue_deadline
LIMIT 1000
"#;

    /// Sessions not yet ended ({open}), by status, and how long the oldest
    /// queued one has waited (its last status change: creation, a resume or
    /// a re-queue). Served by `sessions_open_status`.
    pub const OPEN_COUNTS: &str = r#"
SELECT status, count(*) AS n,
       COALESCE(EXTRACT(EPOCH FROM now() - min(update_time)), 0)::float8 AS oldest_s
FROM sessions
WHERE status IN ({open})
GROUP BY status
"#;
}

/// Fills a statement's `{…}` status lists from [`SessionStatus`].
fn statuses(sql: &str) -> String {
    use SessionStatus::*;
    let open = SessionStatus::ALL.into_iter().filter(|s| s.is_open());
    sql.replace("{moved}", sql::MOVE_CLAIMED)
        .replace("{session_columns}", SESSION_COLUMNS)
        .replace("{claimable}", &status_literals(SessionStatus::CLAIMABLE))
        .replace("{rescheduling}", Rescheduling.as_str())
        .replace("{starting}", Starting.as_str())
        .replace("{open}", &status_literals(open))
}

static CLAIM_SESSIONS: LazyLock<String> = LazyLock::new(|| statuses(sql::CLAIM_SESSIONS));
static CLAIM_REATTACH: LazyLock<String> = LazyLock::new(|| statuses(sql::CLAIM_REATTACH));
static EXPIRED_PENDING: LazyLock<String> = LazyLock::new(|| statuses(sql::EXPIRED_PENDING));
static OPEN_COUNTS: LazyLock<String> = LazyLock::new(|| statuses(sql::OPEN_COUNTS));

/// A row of a claim statement: the session and its first input.
#[derive(sqlx::FromRow)]
struct ClaimRow {
    #[sqlx(flatten)]
    row: SessionRow,
    input_first_seq: Option<i64>,
    input_first_type: Option<String>,
    input_first_text: String,
    input_first_traceparent: Option<String>,
}

/// Sessions not yet ended, by status.
#[derive(Debug, Default)]
pub(crate) struct OpenCounts {
    pub by_status: HashMap<SessionStatus, i64>,
    /// How long the oldest pending or rescheduling session has waited.
    pub oldest_queued_age: Duration,
}

impl Store {
    /// Claims up to `limit` of the oldest queued sessions for `owner`, moving
    /// each to `starting`; oldest first. One round trip for the batch. Each
    /// session's `last_seq` is its claim event's: what the run starts after.
    pub(crate) async fn claim(&self, owner: &str, limit: usize) -> Result<Vec<Claimed>> {
        self.claim_with(&CLAIM_SESSIONS, owner, limit, None).await
    }

    /// Claims up to `limit` rescheduling sessions whose last run was on one
    /// of `nodes`, for a re-attach that needs no free slot (see
    /// [`sql::CLAIM_REATTACH`]).
    pub(crate) async fn claim_reattach(
        &self,
        owner: &str,
        limit: usize,
        nodes: &[String],
    ) -> Result<Vec<Claimed>> {
        if nodes.is_empty() {
            return Ok(Vec::new());
        }
        self.claim_with(&CLAIM_REATTACH, owner, limit, Some(nodes))
            .await
    }

    async fn claim_with(
        &self,
        statement: &str,
        owner: &str,
        limit: usize,
        nodes: Option<&[String]>,
    ) -> Result<Vec<Claimed>> {
        let event_ids: Vec<Uuid> = (0..limit).map(|_| Uuid::now_v7()).collect();
        let mut query = sqlx::query_as(AssertSqlSafe(statement))
            .bind(owner)
            .bind(&event_ids)
            .bind(i64::try_from(limit).unwrap_or(i64::MAX));
        if let Some(nodes) = nodes {
            query = query.bind(nodes);
        }
        let rows: Vec<ClaimRow> = query.fetch_all(&self.pool).await?;
        let mut claimed = Vec::with_capacity(rows.len());
        for r in rows {
            let first_input = match (r.input_first_seq, r.input_first_type) {
                (Some(seq), Some(kind)) => Some(FirstInput::new(
                    seq,
                    &kind,
                    r.input_first_text,
                    r.input_first_traceparent,
                )),
                _ => None,
            };
            claimed.push(Claimed {
                session: self.session(r.row)?,
                first_input,
            });
        }
        self.notices
            .events(claimed.iter().map(|c| (c.session.id, c.session.last_seq)));
        Ok(claimed)
    }

    /// Wakes every dispatcher's claim loop (a session was queued again),
    /// with the next batch of notices.
    pub(crate) async fn notify_queue(&self) -> Result<()> {
        self.notices.queue();
        Ok(())
    }

    /// Records that dispatcher `id` is alive.
    pub(crate) async fn heartbeat(&self, id: &str) -> Result<()> {
        sqlx::query(sql::HEARTBEAT)
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Holds the session back from claims for a growing, jittered while
    /// (see [`sql::BACK_OFF`]); returns how long.
    pub(crate) async fn back_off(&self, id: Uuid, epoch: i64) -> Result<Duration> {
        let delay: Option<sqlx::postgres::types::PgInterval> = sqlx::query_scalar(sql::BACK_OFF)
            .bind(id)
            .bind(epoch)
            .fetch_optional(&self.pool)
            .await?;
        Ok(delay.map_or(Duration::ZERO, |d| {
            Duration::from_micros(d.microseconds.max(0) as u64)
        }))
    }

    /// Never-placed queued sessions past their queue deadline, with their epochs.
    pub(crate) async fn expired_pending(&self) -> Result<Vec<(Uuid, i64)>> {
        Ok(sqlx::query_as(AssertSqlSafe(EXPIRED_PENDING.as_str()))
            .fetch_all(&self.pool)
            .await?)
    }

    /// Sessions not yet ended, by status (for the metrics sampler).
    pub(crate) async fn open_counts(&self) -> Result<OpenCounts> {
        let rows: Vec<(String, i64, f64)> = sqlx::query_as(AssertSqlSafe(OPEN_COUNTS.as_str()))
            .fetch_all(&self.pool)
            .await?;
        let mut counts = OpenCounts::default();
        for (status, n, oldest_s) in rows {
            let Ok(status) = status.parse::<SessionStatus>() else {
                continue;
            };
            if SessionStatus::CLAIMABLE.contains(&status) {
                counts.oldest_queued_age = counts
                    .oldest_queued_age
                    .max(Duration::from_secs_f64(oldest_s.max(0.0)));
            }
            counts.by_status.insert(status, n);
        }
        Ok(counts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_status_list_is_filled_from_the_enum() {
        for s in [
            &*CLAIM_SESSIONS,
            &*CLAIM_REATTACH,
            &*EXPIRED_PENDING,
            &*OPEN_COUNTS,
        ] {
            for hole in [
                "{claimable}",
                "{starting}",
                "{open}",
                "{moved}",
                "{rescheduling}",
            ] {
                assert!(!s.contains(hole), "{hole} left in {s}");
            }
        }
        assert!(CLAIM_SESSIONS.contains("status IN ('pending', 'rescheduling')"));
        assert!(CLAIM_REATTACH.contains("status = 'rescheduling' AND node = ANY($4)"));
        assert!(CLAIM_REATTACH.contains("SET status = 'starting'"));
        assert!(OPEN_COUNTS.contains("'paused'") && !OPEN_COUNTS.contains("'archived'"));
    }
}
