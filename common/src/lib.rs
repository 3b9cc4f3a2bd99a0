//! Shared pieces of berth that both services (and the CLI) need: telemetry,
//! gRPC server plumbing, event type names, resource names and time conversion.

pub mod events;
pub mod grpc;
#[cfg(feature = "metrics")]
pub mod metrics;
pub mod names;
#[cfg(feature = "objects")]
pub mod objects;
pub mod spec;
pub mod sync;
pub mod telemetry;
pub mod time;
pub mod tls;

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let term = async {
            match signal(SignalKind::terminate()) {
                Ok(mut s) => {
                    s.recv().await;
                }
                Err(_) => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term => {}
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}

/// Usage and cost of one turn, as the runtime reported it. Shared by the
/// node's adapters and the dispatcher's usage accounting. Counts are never
/// negative and cost is finite and never negative: adapters clamp what a
/// runtime wrote.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TurnUsage {
    pub input_tokens: i64,
    pub output_tokens: i64,
    pub cache_read_input_tokens: i64,
    pub cache_creation_input_tokens: i64,
    pub cost_usd: f64,
    pub model: String,
    /// `cost_usd` is the conversation's running total (Claude Code's
    /// `total_cost_usd`), not this turn's cost.
    pub cumulative_cost: bool,
    /// The token counts are running totals (Claude Code's `modelUsage` sums).
    pub cumulative_tokens: bool,
}

impl From<berth_proto::node::v1::TurnUsage> for TurnUsage {
    fn from(u: berth_proto::node::v1::TurnUsage) -> Self {
        Self {
            input_tokens: u.input_tokens,
            output_tokens: u.output_tokens,
            cache_read_input_tokens: u.cache_read_input_tokens,
            cache_creation_input_tokens: u.cache_creation_input_tokens,
            cost_usd: u.cost_usd,
            model: u.model,
            cumulative_cost: u.cumulative_cost,
            cumulative_tokens: u.cumulative_tokens,
        }
    }
}

impl From<TurnUsage> for berth_proto::node::v1::TurnUsage {
    fn from(u: TurnUsage) -> Self {
        Self {
            input_tokens: u.input_tokens,
            output_tokens: u.output_tokens,
            cache_read_input_tokens: u.cache_read_input_tokens,
            cache_creation_input_tokens: u.cache_creation_input_tokens,
            cost_usd: u.cost_usd,
            model: u.model,
            cumulative_cost: u.cumulative_cost,
            cumulative_tokens: u.cumulative_tokens,
        }
    }
}
