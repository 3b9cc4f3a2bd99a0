//! Every metric a node exports, in one place. `deploy/grafana` and
//! `deploy/prometheus` use these names; a test checks them against a live
//! scrape. Pool metrics are labelled by image, and only for configured pools
//! (a client cannot mint label values by asking for images).

use berth_common::metrics::{BYTE_BUCKETS, Def, Kind, LATENCY_BUCKETS};

pub const POOL_HITS: &str = "berth_pool_hits_total";
pub const POOL_MISSES: &str = "berth_pool_misses_total";
pub const POOL_REFILLS: &str = "berth_pool_refills_total";
pub const POOL_REFILL_FAILURES: &str = "berth_pool_refill_failures_total";
pub const POOL_EVICTIONS: &str = "berth_pool_evictions_total";
pub const POOL_READY: &str = "berth_pool_ready_containers";
pub const POOL_TARGET: &str = "berth_pool_target_containers";
pub const WARM_AGENT_CLAIMS: &str = "berth_warm_agent_claims_total";
pub const WARM_AGENT_REFILLS: &str = "berth_warm_agent_refills_total";
pub const WARM_AGENT_EVICTIONS: &str = "berth_warm_agent_evictions_total";
pub const WARM_AGENT_READY: &str = "berth_warm_agent_processes_ready";
pub const WARM_AGENT_KEYS: &str = "berth_warm_agent_pools";
pub const WARM_AGENT_START: &str = "berth_warm_agent_start_seconds";
pub const CONTAINER_START: &str = "berth_container_start_seconds";
pub const CONTAINER_EXEC: &str = "berth_container_exec_seconds";
pub const AGENT_FIRST_LINE: &str = "berth_agent_first_line_seconds";
pub const CONTAINER_REMOVE: &str = "berth_container_remove_seconds";
pub const PREPARE: &str = "berth_session_prepare_seconds";
pub const SNAPSHOT: &str = "berth_snapshot_seconds";
pub const SNAPSHOT_BYTES: &str = "berth_snapshot_bytes";
pub const NODE_CAPACITY: &str = "berth_agent_server_capacity_sessions";
pub const NODE_RUNNING: &str = "berth_agent_server_running_sessions";
pub const NODE_DRAINING: &str = "berth_agent_server_draining";
pub const NODE_STARTS: &str = "berth_agent_server_session_starts_total";
pub const NODE_REFUSALS: &str = "berth_agent_server_refusals_total";
pub const AGENT_EVENTS: &str = "berth_agent_events_total";
pub const EGRESS_CONNECTIONS: &str = "berth_egress_connections_total";
pub const EGRESS_BYTES: &str = "berth_egress_bytes_total";
pub const GATEWAY_MODEL_REQUESTS: &str = "berth_gateway_model_requests_total";
pub const GATEWAY_TELEMETRY_EXPORTS: &str = "berth_gateway_telemetry_exports_total";
pub const RUNS_FENCED: &str = "berth_agent_server_runs_fenced_total";
pub const GATEWAY_HELD: &str = "berth_gateway_held_requests_total";
pub const RUNS_FROZEN: &str = "berth_agent_server_runs_frozen_total";
pub const GATEWAY_CREDENTIAL_REQUESTS: &str = "berth_gateway_credential_requests_total";

/// The `start` label's values: how an agent started.
pub const START_PATHS: [&str; 3] = ["warm_process", "warm_container", "cold"];

/// The node's metrics.
pub const ALL: &[Def] = &[
    Def {
        name: RUNS_FENCED,
        kind: Kind::Counter,
        help: "Runs stopped because a dispatcher said their session moved on (a newer epoch elsewhere, ended or gone).",
        labels: &[],
    },
    Def {
        name: RUNS_FROZEN,
        kind: Kind::Counter,
        help: "Runs frozen (container paused) because no dispatcher confirmed them within their lease; thawed when one does.",
        labels: &[],
    },
    Def {
        name: GATEWAY_HELD,
        kind: Kind::Counter,
        help: "Gateway requests of a run whose lease had lapsed, by outcome (released: confirmed again; refused: fenced or never confirmed).",
        labels: &["outcome"],
    },
    Def {
        name: POOL_HITS,
        kind: Kind::Counter,
        help: "Sessions that started in a warm container, by image.",
        labels: &["image"],
    },
    Def {
        name: POOL_MISSES,
        kind: Kind::Counter,
        help: "Sessions of a pooled image that had to start cold (none ready, or the claimed one was dead), by image.",
        labels: &["image"],
    },
    Def {
        name: POOL_REFILLS,
        kind: Kind::Counter,
        help: "Warm containers started and health-checked, by image.",
        labels: &["image"],
    },
    Def {
        name: POOL_REFILL_FAILURES,
        kind: Kind::Counter,
        help: "Warm containers that failed to start or failed their health check, by image.",
        labels: &["image"],
    },
    Def {
        name: POOL_EVICTIONS,
        kind: Kind::Counter,
        help: "Ready warm containers removed unused, by image and reason (dead, expired).",
        labels: &["image", "reason"],
    },
    Def {
        name: POOL_READY,
        kind: Kind::Gauge,
        help: "Warm containers ready to take a session, by image.",
        labels: &["image"],
    },
    Def {
        name: POOL_TARGET,
        kind: Kind::Gauge,
        help: "Warm containers the pool aims to keep ready or starting, by image (between its MIN and MAX).",
        labels: &["image"],
    },
    Def {
        name: WARM_AGENT_CLAIMS,
        kind: Kind::Counter,
        help: "Sessions that could take a pre-started agent process, by result (hit, miss, unpooled: agent pools off or full of other agents).",
        labels: &["result"],
    },
    Def {
        name: WARM_AGENT_REFILLS,
        kind: Kind::Counter,
        help: "Agent processes pre-started, by result (ok, error).",
        labels: &["result"],
    },
    Def {
        name: WARM_AGENT_EVICTIONS,
        kind: Kind::Counter,
        help: "Pre-started agent processes removed unused, by reason (dead, expired).",
        labels: &["reason"],
    },
    Def {
        name: WARM_AGENT_READY,
        kind: Kind::Gauge,
        help: "Pre-started agent processes ready to take a session, over every agent.",
        labels: &[],
    },
    Def {
        name: WARM_AGENT_KEYS,
        kind: Kind::Gauge,
        help: "Agents (agent keys) with a pool on this node.",
        labels: &[],
    },
    Def {
        name: WARM_AGENT_START,
        kind: Kind::Histogram(LATENCY_BUCKETS),
        help: "Seconds to pre-start one agent process: container, check, limits, skills and the process.",
        labels: &[],
    },
    Def {
        name: AGENT_FIRST_LINE,
        kind: Kind::Histogram(LATENCY_BUCKETS),
        help: "Seconds from a message written to an idle agent's stdin to the agent's next stdout line: the agent's own time to answer, with no berth in it.",
        labels: &[],
    },
    Def {
        name: CONTAINER_START,
        kind: Kind::Histogram(LATENCY_BUCKETS),
        help: "Seconds to create and start a container, by purpose (session: a cold start; warm: a pool refill).",
        labels: &["purpose"],
    },
    Def {
        name: CONTAINER_EXEC,
        kind: Kind::Histogram(LATENCY_BUCKETS),
        help: "Seconds to create, start and attach the agent's exec in its container.",
        labels: &[],
    },
    Def {
        name: CONTAINER_REMOVE,
        kind: Kind::Histogram(LATENCY_BUCKETS),
        help: "Seconds to force-remove a container and its volumes.",
        labels: &[],
    },
    Def {
        name: PREPARE,
        kind: Kind::Histogram(LATENCY_BUCKETS),
        help: "Seconds to apply limits and copy a session's snapshot, files, git clones, memory and skills in before the agent starts.",
        labels: &[],
    },
    Def {
        name: SNAPSHOT,
        kind: Kind::Histogram(LATENCY_BUCKETS),
        help: "Seconds to save a session's snapshot to the object store, by result (ok, error).",
        labels: &["result"],
    },
    Def {
        name: SNAPSHOT_BYTES,
        kind: Kind::Histogram(BYTE_BUCKETS),
        help: "Compressed size of saved snapshots, in bytes.",
        labels: &[],
    },
    Def {
        name: NODE_CAPACITY,
        kind: Kind::Gauge,
        help: "Session slots this node offers.",
        labels: &[],
    },
    Def {
        name: NODE_RUNNING,
        kind: Kind::Gauge,
        help: "Sessions holding a slot on this node.",
        labels: &[],
    },
    Def {
        name: NODE_DRAINING,
        kind: Kind::Gauge,
        help: "1 while the node is draining (no new sessions), else 0.",
        labels: &[],
    },
    Def {
        name: NODE_STARTS,
        kind: Kind::Counter,
        help: "Agents started, by start (warm_process: a pre-started process; warm_container: a warm container, the process started now; cold).",
        labels: &["start"],
    },
    Def {
        name: NODE_REFUSALS,
        kind: Kind::Counter,
        help: "Starts this node refused, by reason (draining, at_capacity, stale_epoch).",
        labels: &["reason"],
    },
    Def {
        name: AGENT_EVENTS,
        kind: Kind::Counter,
        help: "Events agents emitted on this node and sent to a dispatcher.",
        labels: &[],
    },
    Def {
        name: EGRESS_CONNECTIONS,
        kind: Kind::Counter,
        help: "Sandbox egress connections through the gateway, by decision (allowed, denied).",
        labels: &["decision"],
    },
    Def {
        name: EGRESS_BYTES,
        kind: Kind::Counter,
        help: "Bytes through allowed egress tunnels, by direction (sent, received).",
        labels: &["direction"],
    },
    Def {
        name: GATEWAY_CREDENTIAL_REQUESTS,
        kind: Kind::Counter,
        help: "Requests the gateway sent on a declared route (MCP server, git repository) with a credential attached, by credential id, host and outcome (2xx..5xx, refused, unreachable). Never the value.",
        labels: &["credential", "host", "outcome"],
    },
    Def {
        name: GATEWAY_MODEL_REQUESTS,
        kind: Kind::Counter,
        help: "Model API requests the gateway proxied with the session's key, by outcome (2xx..5xx, no_key, unreachable).",
        labels: &["outcome"],
    },
    Def {
        name: GATEWAY_TELEMETRY_EXPORTS,
        kind: Kind::Counter,
        help: "The agents' own OpenTelemetry exports the gateway took, by signal (metrics, logs, traces) and outcome (forwarded to the collector, refused as malformed, failed at the collector).",
        labels: &["signal", "outcome"],
    },
];

/// Installs the recorder with the node's metrics.
pub fn install() -> anyhow::Result<berth_common::metrics::PrometheusHandle> {
    let handle = berth_common::metrics::install("agent-server", &[ALL])?;
    init_series();
    Ok(handle)
}

/// Registers every series whose labels are known up front, at zero, so
/// `rate()` and alerts see them before the first event. Pool series are
/// registered per configured image by [`init_pool_series`].
pub fn init_series() {
    let _ = metrics::counter!(AGENT_EVENTS);
    let _ = metrics::counter!(RUNS_FENCED);
    let _ = metrics::counter!(RUNS_FROZEN);
    for outcome in ["released", "refused"] {
        let _ = metrics::counter!(GATEWAY_HELD, "outcome" => outcome);
    }
    for start in START_PATHS {
        let _ = metrics::counter!(NODE_STARTS, "start" => start);
    }
    for result in ["hit", "miss", "unpooled"] {
        let _ = metrics::counter!(WARM_AGENT_CLAIMS, "result" => result);
    }
    for result in ["ok", "error"] {
        let _ = metrics::counter!(WARM_AGENT_REFILLS, "result" => result);
    }
    for reason in ["dead", "expired"] {
        let _ = metrics::counter!(WARM_AGENT_EVICTIONS, "reason" => reason);
    }
    let _ = metrics::histogram!(WARM_AGENT_START);
    for decision in ["allowed", "denied"] {
        let _ = metrics::counter!(EGRESS_CONNECTIONS, "decision" => decision);
    }
    for direction in ["sent", "received"] {
        let _ = metrics::counter!(EGRESS_BYTES, "direction" => direction);
    }
    for signal in ["metrics", "logs", "traces"] {
        for outcome in ["forwarded", "refused", "failed"] {
            let _ = metrics::counter!(GATEWAY_TELEMETRY_EXPORTS, "signal" => signal, "outcome" => outcome);
        }
    }
    for outcome in ["2xx", "4xx", "5xx", "no_key", "unreachable"] {
        let _ = metrics::counter!(GATEWAY_MODEL_REQUESTS, "outcome" => outcome);
    }
    for reason in ["draining", "at_capacity", "stale_epoch"] {
        let _ = metrics::counter!(NODE_REFUSALS, "reason" => reason);
    }
    for purpose in ["session", "warm"] {
        let _ = metrics::histogram!(CONTAINER_START, "purpose" => purpose);
    }
    for result in ["ok", "error"] {
        let _ = metrics::histogram!(SNAPSHOT, "result" => result);
    }
    for name in [
        CONTAINER_EXEC,
        CONTAINER_REMOVE,
        PREPARE,
        SNAPSHOT_BYTES,
        AGENT_FIRST_LINE,
    ] {
        let _ = metrics::histogram!(name);
    }
}

/// Registers a pool's series at zero.
pub fn init_pool_series(image: &str) {
    for name in [POOL_HITS, POOL_MISSES, POOL_REFILLS, POOL_REFILL_FAILURES] {
        let _ = metrics::counter!(name, "image" => image.to_string());
    }
    for reason in ["dead", "expired"] {
        let _ = metrics::counter!(POOL_EVICTIONS, "image" => image.to_string(), "reason" => reason);
    }
}

/// Times a future into a histogram (seconds).
pub async fn timed<T>(histogram: metrics::Histogram, f: impl std::future::Future<Output = T>) -> T {
    let started = std::time::Instant::now();
    let out = f.await;
    histogram.record(started.elapsed().as_secs_f64());
    out
}
