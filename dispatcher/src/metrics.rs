//! Every metric the dispatcher exports, in one place. `deploy/grafana` and
//! `deploy/prometheus` use these names; a test checks them against a live
//! scrape.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use berth_common::metrics::{Def, Kind, LATENCY_BUCKETS, SIZE_BUCKETS};

use crate::driver::Ctx;
use crate::nodes::NodeState;

pub const QUEUE_DEPTH: &str = "berth_queue_depth";
pub const QUEUE_OLDEST_AGE: &str = "berth_queue_oldest_age_seconds";
pub const QUEUE_WAIT: &str = "berth_queue_wait_seconds";
pub const SESSIONS: &str = "berth_sessions";
pub const SESSIONS_CREATED: &str = "berth_sessions_created_total";
pub const SESSIONS_ENDED: &str = "berth_sessions_ended_total";
pub const PLACEMENT: &str = "berth_placement_seconds";
pub const SESSION_START: &str = "berth_session_start_seconds";
pub const FIRST_EVENT: &str = "berth_first_event_seconds";
pub const NODES: &str = "berth_nodes";
pub const NODE_CAPACITY: &str = "berth_node_capacity_sessions";
pub const NODE_RUNNING: &str = "berth_node_running_sessions";
pub const NODE_WARM_READY: &str = "berth_node_warm_ready_containers";
pub const EVENTS_RELAYED: &str = "berth_events_relayed_total";
pub const EVENTS_PERSISTED: &str = "berth_events_persisted_total";
pub const PERSIST_FAILURES: &str = "berth_event_persist_failures_total";
pub const PERSIST_BATCH: &str = "berth_event_persist_batch_size";
pub const PERSIST_DURATION: &str = "berth_event_persist_seconds";
pub const PERSIST_LAG: &str = "berth_event_persist_lag_seconds";
pub const WRITER_QUEUE: &str = "berth_event_writer_queue_depth";
pub const STREAMS_ACTIVE: &str = "berth_streams_active";
pub const STREAM_CATCHUPS: &str = "berth_stream_catchups_total";
pub const TOKENS: &str = "berth_tokens_total";
pub const COST: &str = "berth_cost_microdollars_total";

/// The dispatcher's metrics.
pub const ALL: &[Def] = &[
    Def {
        name: QUEUE_DEPTH,
        kind: Kind::Gauge,
        help: "Sessions waiting for a node, by status (pending: never placed; rescheduling: to be placed again).",
        labels: &["status"],
    },
    Def {
        name: QUEUE_OLDEST_AGE,
        kind: Kind::Gauge,
        help: "Seconds the oldest waiting session has been queued (0 when the queue is empty).",
        labels: &[],
    },
    Def {
        name: QUEUE_WAIT,
        kind: Kind::Histogram(LATENCY_BUCKETS),
        help: "Seconds from CreateSession to the claim of a session's first run.",
        labels: &[],
    },
    Def {
        name: SESSIONS,
        kind: Kind::Gauge,
        help: "Sessions not yet ended (including paused), by status, across the fleet's database.",
        labels: &["status"],
    },
    Def {
        name: SESSIONS_CREATED,
        kind: Kind::Counter,
        help: "Sessions created through this dispatcher.",
        labels: &[],
    },
    Def {
        name: SESSIONS_ENDED,
        kind: Kind::Counter,
        help: "Session runs that ended, by final status (completed, stopped, failed, timeout), as applied by this dispatcher.",
        labels: &["status"],
    },
    Def {
        name: PLACEMENT,
        kind: Kind::Histogram(LATENCY_BUCKETS),
        help: "Seconds from a claim until a node accepted the session (result=placed), no node could (not_placed: re-queued, or the start failed) or placing it errored (error).",
        labels: &["result"],
    },
    Def {
        name: SESSION_START,
        kind: Kind::Histogram(LATENCY_BUCKETS),
        help: "Seconds from a claim until the agent process ran on its node, by warm-pool hit (warm) or miss (cold).",
        labels: &["start"],
    },
    Def {
        name: FIRST_EVENT,
        kind: Kind::Histogram(LATENCY_BUCKETS),
        help: "Seconds from a claim until the agent's first event reached the dispatcher, by warm or cold start (includes waiting for a first prompt if none was given).",
        labels: &["start"],
    },
    Def {
        name: NODES,
        kind: Kind::Gauge,
        help: "Nodes this dispatcher knows, by state (up, draining, down).",
        labels: &["state"],
    },
    Def {
        name: NODE_CAPACITY,
        kind: Kind::Gauge,
        help: "Session slots a node reports (0 when it is down).",
        labels: &["node"],
    },
    Def {
        name: NODE_RUNNING,
        kind: Kind::Gauge,
        help: "Sessions a node reports running.",
        labels: &["node"],
    },
    Def {
        name: NODE_WARM_READY,
        kind: Kind::Gauge,
        help: "Warm containers ready to take a session, per node and image.",
        labels: &["node", "image"],
    },
    Def {
        name: EVENTS_RELAYED,
        kind: Kind::Counter,
        help: "Agent events received from nodes and queued for the log.",
        labels: &[],
    },
    Def {
        name: EVENTS_PERSISTED,
        kind: Kind::Counter,
        help: "Events committed to Postgres (agent events, user input, status changes, usage).",
        labels: &[],
    },
    Def {
        name: PERSIST_FAILURES,
        kind: Kind::Counter,
        help: "Events that could not be persisted (their session was deleted, or the database refused them).",
        labels: &[],
    },
    Def {
        name: PERSIST_BATCH,
        kind: Kind::Histogram(SIZE_BUCKETS),
        help: "Events committed per INSERT statement (group commit).",
        labels: &[],
    },
    Def {
        name: PERSIST_DURATION,
        kind: Kind::Histogram(LATENCY_BUCKETS),
        help: "Seconds one batch INSERT took, retries included.",
        labels: &[],
    },
    Def {
        name: PERSIST_LAG,
        kind: Kind::Histogram(LATENCY_BUCKETS),
        help: "Seconds the oldest event of a batch waited between being queued and being committed.",
        labels: &[],
    },
    Def {
        name: WRITER_QUEUE,
        kind: Kind::Gauge,
        help: "Writes queued for the event writer and not yet committed.",
        labels: &[],
    },
    Def {
        name: STREAMS_ACTIVE,
        kind: Kind::Gauge,
        help: "Client streams open on this dispatcher, by call (events: StreamEvents; connect: Connect).",
        labels: &["call"],
    },
    Def {
        name: STREAM_CATCHUPS,
        kind: Kind::Counter,
        help: "Times a slow subscriber fell behind its live buffer and caught up from Postgres.",
        labels: &[],
    },
    Def {
        name: TOKENS,
        kind: Kind::Counter,
        help: "Tokens agents reported, by model and kind (input, output, cache_read, cache_write).",
        labels: &["model", "kind"],
    },
    Def {
        name: COST,
        kind: Kind::Counter,
        help: "Millionths of a US dollar agents reported spending, by model (the metrics facade counts in integers: divide by 1e6 for USD).",
        labels: &["model"],
    },
];

/// Installs the recorder with the dispatcher's metrics and, since a
/// dispatcher may run a node in process, the node's.
pub fn install() -> anyhow::Result<berth_common::metrics::PrometheusHandle> {
    let handle =
        berth_common::metrics::install("dispatcher", &[ALL, berth_agent_server::metrics::ALL])?;
    init_series();
    berth_agent_server::metrics::init_series();
    Ok(handle)
}

/// Registers every series whose labels are known up front, at zero, so
/// `rate()` and alerts see them before the first event.
fn init_series() {
    use crate::session::SessionStatus;
    for name in [
        SESSIONS_CREATED,
        EVENTS_RELAYED,
        EVENTS_PERSISTED,
        PERSIST_FAILURES,
        STREAM_CATCHUPS,
    ] {
        let _ = metrics::counter!(name);
    }
    for status in SessionStatus::ALL.iter().filter(|s| s.ends_run()) {
        let _ = metrics::counter!(SESSIONS_ENDED, "status" => status.as_str());
    }
    for name in [QUEUE_WAIT, PERSIST_BATCH, PERSIST_DURATION, PERSIST_LAG] {
        let _ = metrics::histogram!(name);
    }
    for result in ["placed", "not_placed", "error"] {
        let _ = metrics::histogram!(PLACEMENT, "result" => result);
    }
    for start in ["warm", "cold"] {
        let _ = metrics::histogram!(SESSION_START, "start" => start);
        let _ = metrics::histogram!(FIRST_EVENT, "start" => start);
    }
    for call in ["events", "connect"] {
        metrics::gauge!(STREAMS_ACTIVE, "call" => call).increment(0.0);
    }
    metrics::gauge!(WRITER_QUEUE).set(0.0);
}

/// Counts a stream while it is open.
pub struct StreamGauge(&'static str);

impl StreamGauge {
    pub fn open(call: &'static str) -> Self {
        metrics::gauge!(STREAMS_ACTIVE, "call" => call).increment(1.0);
        Self(call)
    }
}

impl Drop for StreamGauge {
    fn drop(&mut self) {
        metrics::gauge!(STREAMS_ACTIVE, "call" => self.0).decrement(1.0);
    }
}

/// Records a turn's tokens and cost.
pub fn record_usage(u: &crate::session::TurnUsage) {
    let model = berth_common::metrics::label_value(&u.model);
    for (kind, n) in [
        ("input", u.input_tokens),
        ("output", u.output_tokens),
        ("cache_read", u.cache_read_input_tokens),
        ("cache_write", u.cache_creation_input_tokens),
    ] {
        metrics::counter!(TOKENS, "model" => model.clone(), "kind" => kind)
            .increment(u64::try_from(n).unwrap_or(0));
    }
    if u.cost_usd.is_finite() && u.cost_usd > 0.0 {
        metrics::counter!(COST, "model" => model).increment((u.cost_usd * 1e6).round() as u64);
    }
}

/// How often the sampled gauges (queue, sessions, nodes) are refreshed.
pub const SAMPLE_INTERVAL: Duration = Duration::from_secs(5);

/// Refreshes the queue, session and node gauges every [`SAMPLE_INTERVAL`].
/// Queue and session counts come from Postgres, so every dispatcher reports
/// the same fleet-wide values (dashboards take `max`).
pub async fn sampler(ctx: Arc<Ctx>) {
    let mut tick = tokio::time::interval(SAMPLE_INTERVAL);
    let mut seen_nodes: BTreeSet<String> = BTreeSet::new();
    let mut seen_pools: BTreeSet<(String, String)> = BTreeSet::new();
    loop {
        tokio::select! {
            () = ctx.shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        sample_nodes(&ctx, &mut seen_nodes, &mut seen_pools);
        match ctx.store.open_counts().await {
            Ok(counts) => {
                for status in crate::session::SessionStatus::ALL
                    .iter()
                    .filter(|s| s.is_open())
                {
                    let n = counts.by_status.get(status).copied().unwrap_or(0);
                    metrics::gauge!(SESSIONS, "status" => status.as_str()).set(n as f64);
                    if matches!(
                        status,
                        crate::session::SessionStatus::Pending
                            | crate::session::SessionStatus::Rescheduling
                    ) {
                        metrics::gauge!(QUEUE_DEPTH, "status" => status.as_str()).set(n as f64);
                    }
                }
                metrics::gauge!(QUEUE_OLDEST_AGE).set(counts.oldest_queued_age.as_secs_f64());
            }
            Err(e) => tracing::debug!(error = %e, "sampling session counts failed"),
        }
    }
}

fn sample_nodes(
    ctx: &Ctx,
    seen_nodes: &mut BTreeSet<String>,
    seen_pools: &mut BTreeSet<(String, String)>,
) {
    let mut by_state = [0u32; 3];
    let mut nodes = BTreeSet::new();
    let mut pools = BTreeSet::new();
    for link in ctx.nodes.links() {
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
        for w in &report.warm {
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
    }
    for (node, image) in seen_pools.difference(&pools) {
        metrics::gauge!(NODE_WARM_READY, "node" => node.clone(), "image" => image.clone()).set(0.0);
    }
    *seen_nodes = nodes;
    *seen_pools = pools;
}
