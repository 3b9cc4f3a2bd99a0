//! `berth-agent-server`: a berth node.

use clap::Parser;
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cfg = berth_agent_server::Config::parse();
    let traces = match berth_common::telemetry::init(cfg.log_format, "berth-agent-server") {
        Ok(t) => t,
        Err(e) => {
            eprintln!("berth-agent-server: {e:#}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let drain = CancellationToken::new();
    let shutdown = CancellationToken::new();
    // The first signal drains, the second stops; watched beside the node
    // (not in a task of its own), so it ends with it.
    let signals = {
        let (drain, shutdown) = (drain.clone(), shutdown.clone());
        let drain_timeout = cfg.drain_timeout;
        async move {
            berth_common::shutdown_signal().await;
            tracing::info!(
                ?drain_timeout,
                "signal received: draining (no new sessions; running ones finish or move); a second signal stops at once"
            );
            drain.cancel();
            berth_common::shutdown_signal().await;
            tracing::warn!("second signal: stopping sessions and removing their containers now");
            shutdown.cancel();
            std::future::pending::<std::convert::Infallible>().await
        }
    };
    let node = async {
        let listener = tokio::net::TcpListener::bind(cfg.listen)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {} (--listen): {e}", cfg.listen))?;
        berth_agent_server::run_with_drain(cfg, listener, drain, shutdown).await
    };
    let result = tokio::select! {
        r = node => r,
        never = signals => match never {},
    };
    if let Some(t) = traces {
        // Blocks until the last spans are sent (the exporter runs on this
        // runtime): off the async workers.
        let _ = tokio::task::spawn_blocking(move || t.shutdown()).await;
    }
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("berth-agent-server: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
