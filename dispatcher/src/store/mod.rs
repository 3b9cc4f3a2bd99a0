//! The `Store` seam: every SQL statement the dispatcher runs lives behind it,
//! one file per aggregate, each statement named beside the code that runs it.
//! Postgres through sqlx; migrations are embedded.
//!
//! - [`sessions`]: the session rows and their status (compare-and-set);
//! - [`events`]: each session's log, usage and retention;
//! - [`queue`]: claims, dispatcher liveness and the queue's sweeps;
//! - [`orphans`]: releasing the sessions of a dispatcher that died or restarted;
//! - [`agents`]: agents with their versions, and uploaded files;
//! - [`access`]: API keys and secrets;
//! - [`credentials`]: OAuth credentials' access tokens and refresh leases;
//! - [`tools`]: tool permission requests and their answers;
//! - [`schedules`]: schedules and their fires (claimed by compare-and-set);
//! - [`webhooks`]: inbound webhooks and the deliveries they accepted;
//! - [`slack`]: Slack threads and their sessions;
//! - [`audit`]: the audit trail;
//! - [`feedback`]: ratings of sessions and turns, and message search.
//!
//! Env values and secrets are sealed (see `seal`) before they reach a row.
//!
//! Rows are read through `#[derive(sqlx::FromRow)]` structs and converted to
//! domain types with `TryFrom`, so a new column is one field and one line.
//! Every write is a single statement: atomic without an explicit
//! transaction, and one round trip. The one exception is the release of
//! orphans, which reads a page under row locks so that the status machine,
//! not SQL, plans each change, then moves the page in one statement.

mod access;
mod agents;
mod audit;
mod claimed;
mod credentials;
pub(crate) mod database_url;
mod events;
mod feedback;
pub(crate) mod notices;
mod orphans;
mod queue;
mod runs;
mod schedules;
mod sessions;
mod slack;
mod tools;
mod transitions;
mod usage;
mod webhooks;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::{PgPool, PgPoolOptions};

use crate::error::{Error, Result};
use crate::seal::Sealer;
use crate::session::SessionStatus;

pub(crate) use access::{
    ApiKeyRow, SealedSecret, SealedTable, SecretRow, SecretShape, USAGE_ANTHROPIC_API_KEY,
    USAGE_GIT_SSH_KEY, USAGE_HTTP_HEADER, USAGE_OAUTH2_REFRESH, secret_context,
};
pub use access::{KeyRecord, Role};
pub(crate) use audit::AuditEntry;
pub(crate) use claimed::{Claimed, FirstInput};
pub(crate) use credentials::{OAuthRow, Refreshed};
pub(crate) use events::{Append, Stored, TurnEnd};
pub(crate) use feedback::{FeedbackRow, SearchHit};
pub(crate) use orphans::{Abandoned, ORPHAN_PAGE, Orphan, Released};
pub(crate) use runs::RunState;
pub(crate) use sessions::{Created, SessionFilter};
pub(crate) use slack::{DueThread, ThreadKey};
pub(crate) use tools::{NewToolRequest, PendingTool, ToolEffect, ToolOutcome};
pub(crate) use transitions::{Change, Placement, Transitioned};
pub(crate) use usage::UsageRecorded;

/// Channel a new pending session is announced on.
pub(crate) const QUEUE_CHANNEL: &str = "berth_queue";
/// Channel announcing `{session_id}:{last_seq}` after events are persisted.
pub(crate) const EVENTS_CHANNEL: &str = "berth_events";

/// Postgres-backed storage for sessions, their event logs, agents and files.
#[derive(Clone)]
pub struct Store {
    pool: PgPool,
    sealer: Arc<Sealer>,
    /// What committed, for other dispatchers' LISTEN ([`notices`]).
    notices: Arc<notices::Notices>,
}

/// Longest a call waits for a database connection. While Postgres is down
/// (or every connection is busy), calls fail with UNAVAILABLE after this
/// rather than hanging until the client's deadline.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(3);

/// A pooled connection idle at least this long is pinged before it is
/// handed out (Postgres may have restarted meanwhile). A busy one is not:
/// sqlx pings every connection it hands out by default, inside the acquire
/// timeout, and under load an acquire that timed out mid-ping dropped its
/// connection. Each new one then cost Postgres a backend and a TLS
/// handshake that the next timeout cut short: a storm that left a
/// dispatcher with a few connections of its 16.
const PING_WHEN_IDLE: Duration = Duration::from_secs(5);

impl Store {
    /// Connects and applies the embedded migrations.
    pub async fn connect(url: &str, max_connections: u32, sealer: Arc<Sealer>) -> Result<Self> {
        let checked = database_url::for_sqlx(url).map_err(|e| Error::InvalidArgument {
            field: "DATABASE_URL",
            reason: e.0,
        })?;
        let pool = PgPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .test_before_acquire(false)
            .before_acquire(|conn, meta| {
                Box::pin(async move {
                    if meta.idle_for >= PING_WHEN_IDLE {
                        sqlx::Connection::ping(conn).await?;
                    }
                    Ok(true)
                })
            })
            .connect(&checked)
            .await
            .map_err(|e| {
                Error::Unavailable(format!(
                    "cannot connect to Postgres at {}: {e}",
                    redact(url)
                ))
            })?;
        sqlx::migrate!("./migrations")
            .run(&pool)
            .await
            .map_err(|e| Error::Internal(format!("database migration failed: {e}")))?;
        Ok(Self {
            pool,
            sealer,
            notices: Arc::default(),
        })
    }

    /// The notices this store's commits leave for other dispatchers; run
    /// [`notices::run`] to send them.
    pub(crate) fn notices(&self) -> Arc<notices::Notices> {
        self.notices.clone()
    }

    /// The deployment's keys.
    pub(crate) fn sealer(&self) -> &Sealer {
        &self.sealer
    }

    /// Splits env for storage: the keys stay readable (values blanked), the
    /// values are sealed together. `None` for no env.
    pub(crate) fn seal_env(
        &self,
        project: &str,
        env: &BTreeMap<String, String>,
    ) -> (BTreeMap<String, String>, Option<Vec<u8>>) {
        if env.is_empty() {
            return (BTreeMap::new(), None);
        }
        let blank = env.keys().map(|k| (k.clone(), String::new())).collect();
        let json = serde_json::to_vec(env).expect("a string map serializes");
        (blank, Some(self.sealer.seal(&env_context(project), &json)))
    }

    /// The env values [`Store::seal_env`] sealed.
    pub(crate) fn open_env(
        &self,
        project: &str,
        sealed: Option<&[u8]>,
    ) -> Result<BTreeMap<String, String>> {
        let Some(sealed) = sealed else {
            return Ok(BTreeMap::new());
        };
        let json = self
            .sealer
            .open(&env_context(project), sealed)
            .map_err(|e| Error::Internal(format!("env values: {e}")))?;
        serde_json::from_slice(&json).map_err(|e| Error::Internal(format!("env values: {e}")))
    }
}

/// What sealed env values are bound to: their project.
fn env_context(project: &str) -> String {
    format!("env/{project}")
}

impl Store {
    /// The pool, for LISTEN connections.
    pub(crate) fn pool(&self) -> &PgPool {
        &self.pool
    }
}

/// `'a', 'b'`: statuses as SQL literals, for statements whose predicate must
/// match a partial index (a bound array would hide it from the planner's
/// generic plans). Built from [`SessionStatus`], never spelled by hand.
fn status_literals(statuses: impl IntoIterator<Item = SessionStatus>) -> String {
    statuses
        .into_iter()
        .map(|s| format!("'{}'", s.as_str()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Statuses of sessions that may be running somewhere.
fn live_statuses() -> Vec<&'static str> {
    SessionStatus::ALL
        .into_iter()
        .filter(|s| s.is_live())
        .map(SessionStatus::as_str)
        .collect()
}

/// Milliseconds stored for a duration.
fn to_millis(d: Option<Duration>) -> Option<i64> {
    d.map(|t| i64::try_from(t.as_millis()).unwrap_or(i64::MAX))
}

/// A stored millisecond count as a duration (negative reads as zero).
fn from_millis(ms: Option<i64>) -> Option<Duration> {
    ms.map(|ms| Duration::from_millis(u64::try_from(ms).unwrap_or(0)))
}

/// A database URL without its password, for error messages.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            let user = creds.split(':').next().unwrap_or("");
            format!("{}{}:***{}", &url[..s + 3], user, &url[at..])
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_reach_error_messages() {
        assert_eq!(
            redact("postgres://berth:secret@db:5432/berth"),
            "postgres://berth:***@db:5432/berth"
        );
        assert_eq!(redact("postgres://db/berth"), "postgres://db/berth");
    }

    #[test]
    fn the_queue_index_matches_the_claimable_statuses() {
        // The claim statement's predicate must be the partial index's, or
        // the queue scans the whole table.
        let migration = include_str!("../../migrations/0001_sessions.sql");
        let predicate = format!(
            "WHERE status IN ({})",
            status_literals(SessionStatus::CLAIMABLE)
        );
        assert!(migration.contains(&predicate), "{predicate}");
    }
}
