//! Freezes the runs whose lease lapsed (see `lease.rs`): their containers
//! are paused (the cgroup freezer) until a dispatcher confirms them again,
//! and thawed then. A fenced run is killed instead, and an ending one is
//! thawed to stop and snapshot (its session does that).

use std::sync::Arc;
use std::time::Duration;

use crate::node::{Node, RunningSession};

/// How often the leases are looked at.
const TICK: Duration = Duration::from_millis(200);

/// Pauses lapsed runs' containers and unpauses confirmed ones, until the
/// node shuts down (when it thaws what it froze, so the runs can stop).
pub async fn run(node: Arc<Node>) {
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = node.shutdown.cancelled() => break,
            _ = tick.tick() => {}
        }
        for s in node.running() {
            step(&node, &s).await;
        }
    }
    for s in node.running() {
        if s.lease().is_frozen() {
            thaw(&node, &s).await;
        }
    }
}

/// Freezes or thaws one run as its lease says.
async fn step(node: &Node, s: &RunningSession) {
    let lease = s.lease();
    // No container yet; or being killed: it stays as it is until it is gone.
    if s.container_id.is_empty() || lease.is_fenced() {
        return;
    }
    let lapsed = lease.lapsed(tokio::time::Instant::now());
    if lapsed && !lease.is_frozen() {
        tracing::warn!(session_id = %s.session_id, epoch = s.epoch, "no dispatcher confirmed this run in time: freezing it until one does");
        if node.runtime.pause(&s.container_id).await {
            lease.set_frozen(true);
            metrics::counter!(crate::metrics::RUNS_FROZEN).increment(1);
        }
        // Confirmed or ending while it was being paused.
        if !lease.lapsed(tokio::time::Instant::now()) {
            thaw(node, s).await;
        }
    } else if !lapsed && lease.is_frozen() {
        tracing::info!(session_id = %s.session_id, epoch = s.epoch, "run confirmed again (or ending): thawing it");
        thaw(node, s).await;
    }
}

async fn thaw(node: &Node, s: &RunningSession) {
    node.runtime.unpause(&s.container_id).await;
    s.lease().set_frozen(false);
}
