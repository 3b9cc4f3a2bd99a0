//! Samples the fleet-wide gauges: queue depth and age, sessions by status
//! (from Postgres, so every dispatcher reports the same values and
//! dashboards take `max`), and each node's load as this dispatcher sees it.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::metrics::*;
use crate::nodes::{NodeState, Nodes};
use crate::session::SessionStatus;
use crate::store::Store;

/// How often the sampled gauges (queue, sessions, nodes) are refreshed.
const SAMPLE_INTERVAL: Duration = Duration::from_secs(5);

/// Refreshes the queue, session and node gauges every [`SAMPLE_INTERVAL`].
/// Queue and session counts come from Postgres, so every dispatcher reports
/// the same fleet-wide values (dashboards take `max`).
pub(crate) async fn run(store: Store, nodes: Arc<Nodes>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(SAMPLE_INTERVAL);
    let mut seen_nodes: BTreeSet<String> = BTreeSet::new();
    let mut seen_pools: BTreeSet<(String, String)> = BTreeSet::new();
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        sample_nodes(&nodes, &mut seen_nodes, &mut seen_pools);
        sample_pool(&store).await;
        match store.open_counts().await {
            Ok(counts) => {
                for status in SessionStatus::ALL.iter().filter(|s| s.is_open()) {
                    let n = counts.by_status.get(status).copied().unwrap_or(0);
                    metrics::gauge!(SESSIONS, "status" => status.as_str()).set(n as f64);
                    if SessionStatus::CLAIMABLE.contains(status) {
                        metrics::gauge!(QUEUE_DEPTH, "status" => status.as_str()).set(n as f64);
                    }
                }
                metrics::gauge!(QUEUE_OLDEST_AGE).set(counts.oldest_queued_age.as_secs_f64());
            }
            Err(e) => tracing::debug!(error = %e, "sampling session counts failed"),
        }
        match store.pending_tool_summary().await {
            Ok((n, oldest)) => {
                metrics::gauge!(TOOL_PENDING).set(n as f64);
                metrics::gauge!(TOOL_OLDEST_AGE).set(oldest);
            }
            Err(e) => tracing::debug!(error = %e, "sampling tool requests failed"),
        }
    }
}

/// The database pool: connections in use and idle, and how long taking
/// one takes now (a probe: a pool that is exhausted, or a Postgres that is
/// slow or gone, shows here first).
async fn sample_pool(store: &Store) {
    let pool = store.pool();
    let (size, idle) = (pool.size(), pool.num_idle() as u32);
    metrics::gauge!(DB_POOL_CONNECTIONS, "state" => "idle").set(f64::from(idle));
    metrics::gauge!(DB_POOL_CONNECTIONS, "state" => "in_use")
        .set(f64::from(size.saturating_sub(idle)));
    let started = std::time::Instant::now();
    let outcome = match pool.acquire().await {
        Ok(_) => "ok",
        Err(e) => {
            tracing::debug!(error = %e, "the database pool gave no connection");
            "error"
        }
    };
    metrics::histogram!(DB_POOL_ACQUIRE, "outcome" => outcome)
        .record(started.elapsed().as_secs_f64());
}

fn sample_nodes(
    fleet: &Nodes,
    seen_nodes: &mut BTreeSet<String>,
    seen_pools: &mut BTreeSet<(String, String)>,
) {
    let mut by_state = [0u32; 3];
    let mut nodes = BTreeSet::new();
    let mut pools = BTreeSet::new();
    for link in fleet.links() {
        let state = link.state();
        by_state[state as usize] += 1;
        let node = link.name();
        let report = link.report().unwrap_or_default();
        let up = state != NodeState::Down;
        metrics::gauge!(NODE_CAPACITY, "node" => node.clone()).set(if up {
            f64::from(report.capacity)
        } else {
            0.0
        });
        metrics::gauge!(NODE_RUNNING, "node" => node.clone()).set(if up {
            f64::from(report.running)
        } else {
            0.0
        });
        let processes: i32 = report
            .warm
            .iter()
            .filter(|w| !w.agent_key.is_empty())
            .map(|w| w.ready)
            .sum();
        metrics::gauge!(NODE_WARM_PROCESSES, "node" => node.clone()).set(if up {
            f64::from(processes)
        } else {
            0.0
        });
        for w in report.warm.iter().filter(|w| w.agent_key.is_empty()) {
            let ready = if up { f64::from(w.ready) } else { 0.0 };
            metrics::gauge!(NODE_WARM_READY, "node" => node.clone(), "image" => w.image.clone())
                .set(ready);
            pools.insert((node.clone(), w.image.clone()));
        }
        nodes.insert(node);
    }
    for (state, n) in [
        (NodeState::Up, by_state[NodeState::Up as usize]),
        (NodeState::Draining, by_state[NodeState::Draining as usize]),
        (NodeState::Down, by_state[NodeState::Down as usize]),
    ] {
        metrics::gauge!(NODES, "state" => state.as_str()).set(f64::from(n));
    }
    // A node that left the fleet (DNS changed) reads as empty, not stale.
    for gone in seen_nodes.difference(&nodes) {
        metrics::gauge!(NODE_CAPACITY, "node" => gone.clone()).set(0.0);
        metrics::gauge!(NODE_RUNNING, "node" => gone.clone()).set(0.0);
        metrics::gauge!(NODE_WARM_PROCESSES, "node" => gone.clone()).set(0.0);
    }
    for (node, image) in seen_pools.difference(&pools) {
        metrics::gauge!(NODE_WARM_READY, "node" => node.clone(), "image" => image.clone()).set(0.0);
    }
    *seen_nodes = nodes;
    *seen_pools = pools;
}
