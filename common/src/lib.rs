//! Shared pieces of berth that both services (and the CLI) need: telemetry,
//! gRPC server plumbing, event type names, resource names and time conversion.

pub mod causes;
pub mod credentials;
pub mod events;
pub mod field;
pub mod grpc;
#[cfg(feature = "https")]
pub mod https;
#[cfg(feature = "metrics")]
pub mod metrics;
pub mod names;
#[cfg(feature = "objects")]
pub mod objects;
pub mod questions;
pub mod retry;
pub mod spec;
pub mod sync;
#[cfg(feature = "telemetry")]
pub mod telemetry;
pub mod time;
pub mod tls;
pub mod tools;
#[cfg(feature = "telemetry")]
pub mod traces;
pub mod usage;
pub mod warm;

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

pub use usage::TurnUsage;
