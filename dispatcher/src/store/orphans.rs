//! Orphans: the live sessions a dispatcher left when it died (stopped
//! heartbeating) or restarted (a new process under the same id). They are
//! released a page at a time: one transaction reads the page under row
//! locks, the status machine plans each session's change, and one
//! statement applies them all. A dead dispatcher's thousands of sessions are
//! a few commits, not thousands of changes queued behind the event writer.

use std::sync::LazyLock;
use std::time::Duration;

use berth_common::events::payload::StatusDetail;
use sqlx::AssertSqlSafe;
use uuid::Uuid;

use super::transitions::{self, Change, Transitioned};
use super::{Store, status_literals};
use crate::error::{Error, Result};
use crate::session::{SessionStatus, StatusEvent};

/// Most orphaned sessions one page releases.
pub(crate) const ORPHAN_PAGE: usize = 1000;

mod sql {
    /// Dispatchers that own claimed sessions ({claimed}: a dispatcher drives
    /// them) and have not heartbeated within $1 seconds, or never did. The
    /// owners are found by skipping through `sessions_live_owner`, an index
    /// probe per owner, so the look costs the same at any number of live
    /// sessions and of long-gone dispatchers: cheap enough every second.
    pub const LAPSED_OWNERS: &str = r#"
WITH RECURSIVE owners(owner) AS (
    (SELECT owner FROM sessions
     WHERE status IN ({claimed}) AND owner > '' ORDER BY owner LIMIT 1)
    UNION ALL
    SELECT (SELECT s.owner FROM sessions s
            WHERE s.status IN ({claimed}) AND s.owner > o.owner ORDER BY s.owner LIMIT 1)
    FROM owners o WHERE o.owner IS NOT NULL
)
SELECT o.owner FROM owners o
WHERE o.owner IS NOT NULL AND NOT EXISTS (
    SELECT 1 FROM dispatchers d
    WHERE d.id = o.owner AND d.heartbeat_time > now() - make_interval(secs => $1)
)
"#;

    /// A page of the claimed sessions of the owners in $1, locked. `SKIP
    /// LOCKED`: dispatchers sweeping at once take different pages, and a
    /// row another writer holds is taken at the next sweep. By id: the
    /// writers' lock order.
    pub const OF_OWNERS: &str = r#"
SELECT s.id, s.epoch, s.owner, s.status FROM sessions s
WHERE s.status IN ({claimed}) AND s.owner = ANY($1)
ORDER BY s.id
LIMIT {page}
FOR UPDATE OF s SKIP LOCKED
"#;

    /// A page of the claimed sessions owned by $1 (at a dispatcher's start:
    /// those a previous process under its id left), locked. It waits for a
    /// row another writer holds: nobody else would ever release it.
    pub const OWNED: &str = r#"
SELECT s.id, s.epoch, s.owner, s.status FROM sessions s
WHERE s.status IN ({claimed}) AND s.owner = $1
ORDER BY s.id
LIMIT {page}
FOR UPDATE OF s
"#;
}

fn fill(sql: &str) -> String {
    use SessionStatus::*;
    sql.replace(
        "{claimed}",
        &status_literals([Starting, Running, Idle, Stopping]),
    )
    .replace("{page}", &ORPHAN_PAGE.to_string())
}

static LAPSED_OWNERS: LazyLock<String> = LazyLock::new(|| fill(sql::LAPSED_OWNERS));
static OF_OWNERS: LazyLock<String> = LazyLock::new(|| fill(sql::OF_OWNERS));
static OWNED: LazyLock<String> = LazyLock::new(|| fill(sql::OWNED));

/// A live session whose dispatcher is gone.
#[derive(Debug, Clone, sqlx::FromRow)]
pub(crate) struct Orphan {
    pub id: Uuid,
    pub epoch: i64,
    pub owner: String,
    /// Its status as its owner left it.
    pub status: String,
}

/// Whose sessions to release.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Abandoned<'a> {
    /// Dispatchers that have not heartbeated within this lease.
    Lapsed(Duration),
    /// A previous process under this dispatcher id.
    Owner(&'a str),
}

/// What one page released.
#[derive(Debug, Default)]
pub(crate) struct Released {
    /// Orphans the page found (a full page: look again).
    pub found: usize,
    /// Each one moved, with its logged change.
    pub moved: Vec<(Orphan, Transitioned)>,
}

impl Store {
    /// Releases a page of `whose` sessions: each goes back to the queue
    /// (`rescheduling`), or ends `stopped` when a stop was under way, as
    /// the status machine decides for a lost run. `why` gives each change's
    /// reason and detail. The page is read and moved in one transaction.
    pub(crate) async fn release_orphans(
        &self,
        whose: Abandoned<'_>,
        why: &(dyn Fn(&Orphan) -> (String, StatusDetail) + Sync),
    ) -> Result<Released> {
        let lapsed: Vec<String>;
        let query = match whose {
            Abandoned::Lapsed(lease) => {
                lapsed = sqlx::query_scalar(AssertSqlSafe(LAPSED_OWNERS.as_str()))
                    .bind(lease.as_secs_f64())
                    .fetch_all(&self.pool)
                    .await?;
                if lapsed.is_empty() {
                    return Ok(Released::default());
                }
                sqlx::query_as(AssertSqlSafe(OF_OWNERS.as_str())).bind(&lapsed)
            }
            Abandoned::Owner(owner) => sqlx::query_as(AssertSqlSafe(OWNED.as_str())).bind(owner),
        };
        let mut tx = self.pool.begin().await?;
        let orphans: Vec<Orphan> = query.fetch_all(&mut *tx).await?;
        let found = orphans.len();
        if found == 0 {
            return Ok(Released::default());
        }
        let statuses = orphans
            .iter()
            .map(|o| {
                o.status
                    .parse::<SessionStatus>()
                    .map_err(|e| Error::Internal(format!("session {}: {e}", o.id)))
            })
            .collect::<Result<Vec<_>>>()?;
        let reasons: Vec<(String, StatusDetail)> = orphans.iter().map(why).collect();
        let changes: Vec<Change<'_>> = orphans
            .iter()
            .zip(&statuses)
            .zip(&reasons)
            .map(|((o, status), (reason, detail))| Change {
                id: o.id,
                epoch: Some(o.epoch),
                assumed: Some(*status),
                placement: None,
                event: StatusEvent::NodeLost,
                reason,
                detail,
                traceparent: None,
            })
            .collect();
        let (mut out, planned) =
            transitions::plan_all(&changes, &transitions::assumed_positions(&changes));
        let rows = if planned.is_empty() {
            Vec::new()
        } else {
            transitions::apply(&mut *tx, &planned).await?
        };
        tx.commit().await?;
        self.notices
            .events(rows.iter().map(|(id, seq, _)| (*id, *seq)));
        transitions::landed(&mut out, planned, rows);
        let moved = orphans
            .into_iter()
            .zip(out)
            .filter_map(|(o, r)| match r {
                Some(Ok(t)) => Some((o, t)),
                // Locked and read in this transaction: nothing moved it.
                // A change the status machine refuses is left as it was.
                Some(Err(e)) => {
                    tracing::warn!(session_id = %o.id, error = %e, "an orphaned session cannot be released");
                    None
                }
                None => None,
            })
            .collect();
        Ok(Released { found, moved })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_statements_lock_live_sessions_only() {
        for s in [&*LAPSED_OWNERS, &*OF_OWNERS, &*OWNED] {
            assert!(
                s.contains("status IN ('starting', 'running', 'idle', 'stopping')"),
                "{s}"
            );
        }
        for s in [&*OF_OWNERS, &*OWNED] {
            assert!(s.contains(&format!("LIMIT {ORPHAN_PAGE}")), "{s}");
            assert!(s.contains("ORDER BY s.id"), "{s}");
        }
        // The partial index the probes need has the same predicate.
        let migration = include_str!("../../migrations/0002_dispatchers.sql");
        assert!(migration.contains("WHERE status IN ('starting', 'running', 'idle', 'stopping')"));
    }
}
