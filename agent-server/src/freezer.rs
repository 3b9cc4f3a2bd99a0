//! Freezes the runs whose lease lapsed (see `lease.rs`): their containers
//! are paused (the cgroup freezer) until a dispatcher confirms them again,
//! and thawed then. A fenced run is killed instead, and an ending one is
//! left running to stop and snapshot.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use crate::node::Node;

/// How often the leases are looked at.
const TICK: Duration = Duration::from_millis(200);

/// Pauses lapsed runs' containers and unpauses confirmed ones, until the
/// node shuts down (when it unpauses what it froze, so the runs can stop).
pub async fn run(node: Arc<Node>) {
    let mut frozen: HashSet<String> = HashSet::new();
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = node.shutdown.cancelled() => break,
            _ = tick.tick() => {}
        }
        let now = tokio::time::Instant::now();
        let mut live = HashSet::new();
        for s in node.running() {
            if s.container_id.is_empty() {
                continue;
            }
            live.insert(s.container_id.clone());
            // Being killed: it stays frozen until it is gone.
            if s.lease().is_fenced() {
                continue;
            }
            let lapsed = s.lease().lapsed(now);
            let was = frozen.contains(&s.container_id);
            if lapsed && !was {
                tracing::warn!(session_id = %s.session_id, epoch = s.epoch, "no dispatcher confirmed this run in time: freezing it until one does");
                if node.runtime.pause(&s.container_id).await {
                    frozen.insert(s.container_id.clone());
                    metrics::counter!(crate::metrics::RUNS_FROZEN).increment(1);
                }
            } else if !lapsed && was {
                tracing::info!(session_id = %s.session_id, epoch = s.epoch, "run confirmed again (or ending): thawing it");
                node.runtime.unpause(&s.container_id).await;
                frozen.remove(&s.container_id);
            }
        }
        // Runs that ended meanwhile (their containers are removed).
        frozen.retain(|id| live.contains(id));
    }
    for id in frozen {
        node.runtime.unpause(&id).await;
    }
}
