//! Every metric the dispatcher exports, in one place. `deploy/grafana` and
//! `deploy/prometheus` use these names; a test checks them against a live
//! scrape.

use berth_common::metrics::{Def, Kind, LATENCY_BUCKETS, SIZE_BUCKETS};

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
pub const NODE_WARM_PROCESSES: &str = "berth_node_warm_ready_processes";
pub const EVENTS_RELAYED: &str = "berth_events_relayed_total";
pub const EVENTS_PERSISTED: &str = "berth_events_persisted_total";
pub const PERSIST_FAILURES: &str = "berth_event_persist_failures_total";
pub const PERSIST_BATCH: &str = "berth_event_persist_batch_size";
pub const PERSIST_DURATION: &str = "berth_event_persist_seconds";
pub const PERSIST_LAG: &str = "berth_event_persist_lag_seconds";
pub const WRITER_QUEUE: &str = "berth_event_writer_queue_depth";
pub const STREAMS_ACTIVE: &str = "berth_streams_active";
pub const STREAM_CATCHUPS: &str = "berth_stream_catchups_total";
pub const REATTACHED: &str = "berth_runs_reattached_total";
pub const RUNS_FENCED: &str = "berth_runs_fenced_total";
pub const TURNS_LOST: &str = "berth_turns_lost_total";
pub const TOKENS: &str = "berth_tokens_total";
pub const COST: &str = "berth_cost_microdollars_total";
pub const TOOL_PENDING: &str = "berth_tool_confirmations_pending";
pub const TOOL_OLDEST_AGE: &str = "berth_tool_confirmation_oldest_age_seconds";
pub const TOOL_WAIT: &str = "berth_tool_confirmation_wait_seconds";
pub const TOOL_REQUESTS: &str = "berth_tool_permission_requests_total";
pub const API_REJECTED: &str = "berth_api_rejected_total";
pub const SCHEDULE_FIRES: &str = "berth_schedule_fires_total";
pub const WEBHOOK_DELIVERIES: &str = "berth_webhook_deliveries_total";
pub const AUDIT_FAILURES: &str = "berth_audit_failures_total";
pub const SUBSCRIPTION_ATTEMPTS: &str = "berth_subscription_attempts_total";
pub const OAUTH_REFRESHES: &str = "berth_oauth_refreshes_total";
pub const DB_POOL_CONNECTIONS: &str = "berth_db_pool_connections";
pub const DB_POOL_ACQUIRE: &str = "berth_db_pool_acquire_seconds";

/// The dispatcher's metrics.
pub const ALL: &[Def] = &[
    Def {
        name: DB_POOL_CONNECTIONS,
        kind: Kind::Gauge,
        help: "This dispatcher's Postgres connections, by state (in_use, idle), sampled every 5 s.",
        labels: &["state"],
    },
    Def {
        name: DB_POOL_ACQUIRE,
        kind: Kind::Histogram(LATENCY_BUCKETS),
        help: "How long taking a Postgres connection from the pool took, probed every 5 s, by outcome (ok, error: none came within the pool's acquire timeout).",
        labels: &["outcome"],
    },
    Def {
        name: OAUTH_REFRESHES,
        kind: Kind::Counter,
        help: "OAuth access-token refreshes this dispatcher made, by outcome (ok, error).",
        labels: &["outcome"],
    },
    Def {
        name: SUBSCRIPTION_ATTEMPTS,
        kind: Kind::Counter,
        help: "Outbound webhook delivery attempts this dispatcher made, by outcome: delivered, retry (failed, to be tried again) or failed (the last attempt failed).",
        labels: &["outcome"],
    },
    Def {
        name: AUDIT_FAILURES,
        kind: Kind::Counter,
        help: "Actions that succeeded but whose audit event could not be recorded (the dispatcher's log has each).",
        labels: &[],
    },
    Def {
        name: WEBHOOK_DELIVERIES,
        kind: Kind::Counter,
        help: "Inbound webhook deliveries, by outcome: created, duplicate (a repeated delivery id), unauthorized (bad signature or timestamp), invalid, not_found, error (the session was refused) or unavailable.",
        labels: &["outcome"],
    },
    Def {
        name: SCHEDULE_FIRES,
        kind: Kind::Counter,
        help: "Schedule fires this dispatcher made, by outcome: session (created), error (refused, e.g. an archived agent) or missed (beyond the catch-up window).",
        labels: &["outcome"],
    },
    Def {
        name: API_REJECTED,
        kind: Kind::Counter,
        help: "Public API calls refused before their handler, by reason: rate_limited (a caller over --api-rate-limit) or overloaded (over --api-max-in-flight).",
        labels: &["reason"],
    },
    Def {
        name: TOOL_PENDING,
        kind: Kind::Gauge,
        help: "Tool permission requests waiting for a person, across the fleet's database.",
        labels: &[],
    },
    Def {
        name: TOOL_OLDEST_AGE,
        kind: Kind::Gauge,
        help: "Seconds the oldest waiting tool permission request has waited (0 when none waits).",
        labels: &[],
    },
    Def {
        name: TOOL_WAIT,
        kind: Kind::Histogram(LATENCY_BUCKETS),
        help: "Seconds from a tool permission request to its answer, by decision (allow, deny) and by whom (user, timeout); answers after 60 s fall in +Inf (berth_tool_confirmation_oldest_age_seconds shows long waits).",
        labels: &["decision", "by"],
    },
    Def {
        name: TOOL_REQUESTS,
        kind: Kind::Counter,
        help: "Tool permission requests agents asked, by tool.",
        labels: &["tool"],
    },
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
        help: "Warm containers ready to take a session, per node and image (image pools).",
        labels: &["node", "image"],
    },
    Def {
        name: NODE_WARM_PROCESSES,
        kind: Kind::Gauge,
        help: "Pre-started agent processes ready to take a session, per node (over every agent).",
        labels: &["node"],
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
        name: REATTACHED,
        kind: Kind::Counter,
        help: "Runs a dispatcher took over from a lost owner on their node (re-attach), instead of starting them again.",
        labels: &[],
    },
    Def {
        name: RUNS_FENCED,
        kind: Kind::Counter,
        help: "Runs this dispatcher's reconcile pass fenced on their node: their session had moved to a newer run, ended, or was gone.",
        labels: &[],
    },
    Def {
        name: TURNS_LOST,
        kind: Kind::Counter,
        help: "Turns lost with their node before they ended (each also a session.turn_lost event).",
        labels: &[],
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

/// Installs the recorder with the dispatcher's metrics and any others that
/// share its endpoint (an in-process node's), and registers the series
/// known up front. Installing again returns the same handle.
pub fn install(also: &[&'static [Def]]) -> anyhow::Result<berth_common::metrics::PrometheusHandle> {
    let mut defs = vec![ALL];
    defs.extend_from_slice(also);
    let handle = berth_common::metrics::install("dispatcher", &defs)?;
    init_series();
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
        REATTACHED,
        RUNS_FENCED,
        TURNS_LOST,
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
    for start in ["warm_process", "warm_container", "cold"] {
        let _ = metrics::histogram!(SESSION_START, "start" => start);
        let _ = metrics::histogram!(FIRST_EVENT, "start" => start);
    }
    for call in ["events", "connect"] {
        metrics::gauge!(STREAMS_ACTIVE, "call" => call).increment(0.0);
    }
    metrics::gauge!(WRITER_QUEUE).set(0.0);
    let _ = metrics::counter!(AUDIT_FAILURES);
    for (name, label, values) in LABELLED {
        for value in *values {
            let _ = metrics::counter!(*name, *label => *value);
        }
    }
}

/// Counters whose one label takes values known up front: every value each
/// takes, as the loop or layer that counts it says it.
const LABELLED: &[(&str, &str, &[&str])] = &[
    (OAUTH_REFRESHES, "outcome", &["ok", "error"]),
    (
        WEBHOOK_DELIVERIES,
        "outcome",
        &[
            "created",
            "duplicate",
            "unauthorized",
            "invalid",
            "not_found",
            "error",
            "unavailable",
            "replay",
        ],
    ),
    (SCHEDULE_FIRES, "outcome", &["session", "error", "missed"]),
    (
        SUBSCRIPTION_ATTEMPTS,
        "outcome",
        &["delivered", "retry", "failed"],
    ),
    (API_REJECTED, "reason", &["rate_limited", "overloaded"]),
];

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

/// Records how long a tool permission request waited for its answer
/// (`payload`: a `user.tool_confirmation`).
pub fn record_tool_answer(payload: &str) {
    use berth_common::events::payload as p;
    if let Some(a) = p::parse::<p::ToolConfirmation>(payload) {
        let decision = if a.decision == "allow" {
            "allow"
        } else {
            "deny"
        };
        let by = if a.by == "timeout" { "timeout" } else { "user" };
        metrics::histogram!(TOOL_WAIT, "decision" => decision, "by" => by).record(a.waited_s);
    }
}

/// Records a turn's tokens and cost, by model.
pub fn record_usage(turn: &crate::session::usage::Turn) {
    for m in &turn.models {
        let model = berth_common::metrics::label_value(&m.model);
        let f = &m.figures;
        for (kind, n) in [
            ("input", f.input_tokens),
            ("output", f.output_tokens),
            ("cache_read", f.cache_read_input_tokens),
            ("cache_write", f.cache_creation_input_tokens),
        ] {
            metrics::counter!(TOKENS, "model" => model.clone(), "kind" => kind)
                .increment(u64::try_from(n).unwrap_or(0));
        }
        if f.cost_usd.is_finite() && f.cost_usd > 0.0 {
            metrics::counter!(COST, "model" => model).increment((f.cost_usd * 1e6).round() as u64);
        }
    }
}
