//! Drives one claimed session: places it on a node ([`start`]), relays its
//! frames into the event log and user input from the log to the node
//! ([`relay`]), under its timeouts ([`deadlines`]).
//!
//! User input reaches the node *through the log*: `SendMessage` on any
//! dispatcher persists a `user.message` event; the driver (on the owning
//! dispatcher) follows the log and forwards each user event past the
//! session's `input_seq` cursor. So input is ordered, durable, and survives a
//! re-placement.
//!
//! Every write a driver makes carries its run's epoch: once another
//! placement has superseded the run, nothing it writes lands.

mod deadlines;
mod relay;
mod start;

use std::sync::Arc;

use berth_common::events::payload::StatusDetail;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::error::{Error, Result};
use crate::log::EventLog;
use crate::nodes::Nodes;
use crate::session::{Session, StatusEvent};
use crate::store::Store;

/// What every driver shares.
pub(crate) struct Ctx {
    pub store: Store,
    pub log: Arc<EventLog>,
    pub nodes: Arc<Nodes>,
    pub shutdown: CancellationToken,
    /// Inactivity timeout for sessions that set none.
    pub inactivity_default: std::time::Duration,
}

/// Runs a session from `starting` until its run ends.
pub(crate) async fn drive(ctx: Arc<Ctx>, session: Session) {
    let span = tracing::info_span!("session", session_id = %session.id, epoch = session.epoch);
    async move {
        if let Err(e) = run(&ctx, &session).await {
            if let Error::Superseded { .. } | Error::Transition(_) = e {
                // Another placement owns the session now, or it left this
                // run (re-queued, stopped, timed out elsewhere): this run
                // just ends; failing the session would undo that.
                tracing::info!(error = %e, "the session left this run");
                return;
            }
            tracing::warn!(error = %e, "session run failed");
            let reason = e.to_string();
            if let Err(e) = ctx
                .log
                .transition_at(
                    session.id,
                    session.epoch,
                    StatusEvent::Failed,
                    &reason,
                    StatusDetail::default(),
                )
                .await
            {
                tracing::debug!(error = %e, "could not mark the session failed");
            }
        }
    }
    .instrument(span)
    .await
}

async fn run(ctx: &Ctx, session: &Session) -> Result<()> {
    if session.epoch == 1 {
        let waited = (chrono::Utc::now() - session.create_time)
            .to_std()
            .unwrap_or_default();
        metrics::histogram!(crate::metrics::QUEUE_WAIT).record(waited.as_secs_f64());
    }
    let claimed = std::time::Instant::now();
    let placed = start::start(ctx, session, claimed).await;
    let result = match &placed {
        Ok(Some(_)) => "placed",
        Ok(None) => "not_placed",
        Err(_) => "error",
    };
    metrics::histogram!(crate::metrics::PLACEMENT, "result" => result)
        .record(claimed.elapsed().as_secs_f64());
    let Some(link) = placed? else {
        return Ok(());
    };
    metrics::histogram!(crate::metrics::SESSION_START, "start" => start_label(link.warm))
        .record(claimed.elapsed().as_secs_f64());
    let node = link.placed.link.name();
    ctx.store.set_node(session.id, session.epoch, &node).await?;
    let busy = ctx
        .store
        .has_pending_input(session.id, session.input_seq)
        .await?;
    let detail = StatusDetail {
        node: Some(node.clone()),
        epoch: Some(session.epoch),
        warm: Some(link.warm),
        ..StatusDetail::default()
    };
    ctx.log
        .transition_at(
            session.id,
            session.epoch,
            StatusEvent::Started { busy },
            "",
            detail,
        )
        .await?;
    tracing::info!(%node, warm = link.warm, "session started");
    relay::Relay::new(ctx, session, link).run().await
}

/// The `start` label of the latency metrics.
fn start_label(warm: bool) -> &'static str {
    if warm { "warm" } else { "cold" }
}
