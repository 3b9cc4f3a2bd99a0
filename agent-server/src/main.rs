//! `berth-agent-server`: a berth node.

use clap::Parser;
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cfg = berth_agent_server::Config::parse();
    berth_common::telemetry::init(cfg.log_format);
    let drain = CancellationToken::new();
    let shutdown = CancellationToken::new();
    {
        let (drain, shutdown) = (drain.clone(), shutdown.clone());
        let drain_timeout = cfg.drain_timeout;
        tokio::spawn(async move {
            berth_common::shutdown_signal().await;
            tracing::info!(
                ?drain_timeout,
                "signal received: draining (no new sessions; running ones finish or move); a second signal stops at once"
            );
            drain.cancel();
            berth_common::shutdown_signal().await;
            tracing::warn!("second signal: stopping sessions and removing their containers now");
            shutdown.cancel();
        });
    }
    let result = async {
        let listener = tokio::net::TcpListener::bind(cfg.listen)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {} (--listen): {e}", cfg.listen))?;
        berth_agent_server::run_with_drain(cfg, listener, drain, shutdown).await
    }
    .await;
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("berth-agent-server: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
