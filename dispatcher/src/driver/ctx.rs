//! What every driver shares ([`Ctx`]), and how a driver calls the store
//! ([`durably`]: through an outage of the database).

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::error::Result;
use crate::log::EventLog;
use crate::nodes::Nodes;
use crate::store::Store;

/// What every driver shares.
pub(crate) struct Ctx {
    pub store: Store,
    pub log: Arc<EventLog>,
    pub nodes: Arc<Nodes>,
    pub shutdown: CancellationToken,
    /// Inactivity timeout for sessions that set none.
    pub inactivity_default: std::time::Duration,
    /// Whether a turn lost with its node is delivered again.
    pub redeliver_lost_turns: bool,
    /// This dispatcher's id, for the reasons it gives.
    pub dispatcher_id: String,
    /// OAuth credentials' access tokens.
    pub oauth: crate::ops::oauth::OAuth,
}

impl Ctx {
    /// A node's gateway attached a credential: its `last_use_time` moves
    /// (at most once a minute). Best effort: a failed write is logged,
    /// never the session's problem.
    pub(super) async fn credential_used(&self, u: &berth_proto::node::v1::CredentialUse) {
        let Ok(id) = u.credential_id.parse::<uuid::Uuid>() else {
            tracing::warn!(credential_id = %u.credential_id, "node reported the use of a credential that is no secret id; ignored");
            return;
        };
        tracing::debug!(credential_id = %id, host = %u.host, requests = u.requests, "credential used");
        if let Err(e) = self.store.credential_used(id).await {
            tracing::warn!(credential_id = %id, error = %e, "could not record a credential's use");
        }
    }
}

/// Runs a store call, retrying while Postgres is unreachable (backoff up
/// to 2 s) until it answers or this dispatcher shuts down: an outage of the
/// database never fails the session it happens to.
pub(super) async fn durably<T, F, Fut>(ctx: &Ctx, mut f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let mut backoff = berth_common::retry::Backoff::new(
        std::time::Duration::from_millis(50),
        std::time::Duration::from_secs(2),
    );
    loop {
        match f().await {
            Err(e) if e.is_transient() && !ctx.shutdown.is_cancelled() => {
                let delay = backoff.next_delay();
                tracing::warn!(error = %e, retry_in = ?delay, "database call failed; retrying");
                tokio::time::sleep(delay).await;
            }
            r => return r,
        }
    }
}
