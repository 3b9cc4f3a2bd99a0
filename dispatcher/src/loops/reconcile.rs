//! The reconcile pass: keeps every node's runs honest about whose they are.
//!
//! About every fifth of the node lease, and for every node that is up, the
//! dispatcher lists the node's runs and judges each against the store: the
//! session's current run (confirmed: its gateway lease goes on), a run its
//! session left behind (fenced: stopped at once, gateway first), or one in
//! the middle of a hand-over (no word either way). See the node's
//! `lease.rs` for the invariant this keeps: one live agent per session.
//!
//! A node that comes back after being declared lost (a stall, a partition)
//! is reconciled on the first pass after its load stream resumes, so the
//! runs whose sessions moved while it was away stop within a pass or two.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use berth_proto::node::v1 as pb;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::nodes::{NodeLink, Nodes};
use crate::session::SessionStatus;
use crate::store::{RunState, Store};

/// What the store says of one run on a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// The session's current run: it may go on using the gateway.
    Current,
    /// The session moved on (a newer epoch elsewhere), ended, or is gone.
    Superseded,
}

/// Judges the run of a session at `run_epoch` on node `node` against the
/// session's row (`None`: no such session). `None` when the store cannot
/// tell yet: a claim at a newer epoch is re-attaching to this very node,
/// or a fresh start here has replaced it (the node fences that itself).
pub(crate) fn verdict(node: &str, run_epoch: i64, row: Option<&RunState>) -> Option<Verdict> {
    let Some(row) = row else {
        return Some(Verdict::Superseded);
    };
    let here = row.node == node;
    let status = row.status.parse::<SessionStatus>().ok();
    let live = status.is_some_and(SessionStatus::is_live);
    if row.epoch >= run_epoch && !live {
        return Some(Verdict::Superseded);
    }
    if row.epoch > run_epoch {
        return (!here).then_some(Verdict::Superseded);
    }
    if row.epoch < run_epoch {
        // The row is behind the node (a re-attach it has not recorded).
        return None;
    }
    // Same epoch. The row names the run's node once the node accepted it;
    // before that (starting, or a stop asked while starting) it names none
    // or the previous run's.
    if here || status == Some(SessionStatus::Starting) || row.node.is_empty() {
        Some(Verdict::Current)
    } else if status == Some(SessionStatus::Stopping) {
        // Stopping, and recorded elsewhere: the stop decides; no word.
        None
    } else {
        // Placed at this epoch on another node: a start that this node
        // answered too late, after the dispatcher had moved on.
        Some(Verdict::Superseded)
    }
}

/// Reconciles every up node each `interval`, confirming runs for
/// `valid_for` past the moment each node listed them.
pub(crate) async fn run(
    nodes: Arc<Nodes>,
    store: Store,
    interval: Duration,
    valid_for: Duration,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let links: Vec<Arc<NodeLink>> = nodes
            .links()
            .into_iter()
            .filter(|l| l.report().is_some())
            .collect();
        // A pass slower than a confirmation lasts is of no use.
        let passes = links
            .iter()
            .map(|l| reconcile(l, &store, valid_for, valid_for));
        futures::future::join_all(passes).await;
    }
}

/// One pass over one node. Errors are logged: the next pass tries again,
/// and a run left unconfirmed only holds its traffic meanwhile.
async fn reconcile(link: &NodeLink, store: &Store, timeout: Duration, valid_for: Duration) {
    let node = link.name();
    let pass = async {
        let mut client = link.client();
        let listed = client
            .list_sessions(pb::ListNodeSessionsRequest {})
            .await?
            .into_inner();
        let ids: Vec<Uuid> = listed
            .sessions
            .iter()
            .filter_map(|s| s.session_id.parse().ok())
            .collect();
        let rows: HashMap<Uuid, RunState> = store
            .run_states(&ids)
            .await
            .map_err(|e| tonic::Status::unavailable(e.to_string()))?
            .into_iter()
            .map(|r| (r.id, r))
            .collect();
        let (mut confirm, mut fence) = (Vec::new(), Vec::new());
        for s in listed.sessions {
            let row = s.session_id.parse().ok().and_then(|id: Uuid| rows.get(&id));
            let run = pb::RunRef {
                session_id: s.session_id,
                epoch: s.epoch,
            };
            match verdict(&node, s.epoch, row) {
                Some(Verdict::Current) => confirm.push(run),
                Some(Verdict::Superseded) => fence.push(run),
                None => {}
            }
        }
        if confirm.is_empty() && fence.is_empty() {
            return Ok(0);
        }
        let answer = client
            .reconcile_sessions(pb::ReconcileSessionsRequest {
                listed_at_ms: listed.listed_at_ms,
                valid_for_ms: u32::try_from(valid_for.as_millis()).unwrap_or(u32::MAX),
                confirm,
                fence,
            })
            .await?
            .into_inner();
        Ok::<_, tonic::Status>(answer.fenced)
    };
    match tokio::time::timeout(timeout, pass).await {
        Ok(Ok(0)) => {}
        Ok(Ok(fenced)) => {
            tracing::warn!(%node, fenced, "fenced runs whose sessions moved on");
            metrics::counter!(crate::metrics::RUNS_FENCED).increment(u64::from(fenced));
        }
        Ok(Err(e)) => tracing::debug!(%node, error = %e.message(), "reconcile pass failed"),
        Err(_) => tracing::debug!(%node, "reconcile pass timed out"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(epoch: i64, node: &str, status: &str) -> RunState {
        RunState {
            id: Uuid::nil(),
            epoch,
            node: node.into(),
            status: status.into(),
        }
    }

    #[test]
    fn the_current_run_is_confirmed_while_its_session_is_open() {
        for status in ["starting", "running", "idle", "stopping", "rescheduling"] {
            assert_eq!(
                verdict("a", 3, Some(&row(3, "a", status))),
                Some(Verdict::Current),
                "{status}"
            );
        }
    }

    #[test]
    fn a_run_whose_session_moved_to_another_node_is_fenced() {
        for status in ["starting", "running", "idle", "rescheduling", "pending"] {
            assert_eq!(
                verdict("a", 3, Some(&row(4, "b", status))),
                Some(Verdict::Superseded),
                "{status}"
            );
        }
        // Moved, but not placed yet: the row names no node.
        assert_eq!(
            verdict("a", 3, Some(&row(4, "", "starting"))),
            Some(Verdict::Superseded)
        );
    }

    #[test]
    fn a_run_of_an_ended_or_missing_session_is_fenced() {
        for status in [
            "stopped",
            "paused",
            "completed",
            "failed",
            "timeout",
            "archived",
        ] {
            assert_eq!(
                verdict("a", 3, Some(&row(3, "a", status))),
                Some(Verdict::Superseded),
                "{status}"
            );
        }
        assert_eq!(verdict("a", 3, None), Some(Verdict::Superseded));
    }

    #[test]
    fn a_hand_over_in_progress_gets_no_word() {
        // A claim at epoch 4 re-attaching to this very node.
        assert_eq!(verdict("a", 3, Some(&row(4, "a", "starting"))), None);
        // The row is behind the node (a re-attach it has not recorded).
        assert_eq!(verdict("a", 5, Some(&row(4, "a", "running"))), None);
    }

    #[test]
    fn a_run_being_placed_is_confirmed_before_the_row_names_its_node() {
        assert_eq!(
            verdict("a", 3, Some(&row(3, "", "starting"))),
            Some(Verdict::Current)
        );
        // A stop asked while it starts.
        assert_eq!(
            verdict("a", 3, Some(&row(3, "", "stopping"))),
            Some(Verdict::Current)
        );
        assert_eq!(
            verdict("a", 3, Some(&row(3, "old", "starting"))),
            Some(Verdict::Current)
        );
        // Placed at this epoch on another node after this one answered late.
        assert_eq!(
            verdict("a", 3, Some(&row(3, "b", "running"))),
            Some(Verdict::Superseded)
        );
    }
}
