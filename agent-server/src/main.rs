//! `berth-agent-server`: a berth node.

use clap::Parser;
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cfg = berth_agent_server::Config::parse();
    berth_common::telemetry::init(cfg.log_format);
    let shutdown = CancellationToken::new();
    let signal = shutdown.clone();
    tokio::spawn(async move {
        berth_common::shutdown_signal().await;
        tracing::info!("shutting down: stopping sessions and removing their containers");
        signal.cancel();
    });
    let result = async {
        let listener = tokio::net::TcpListener::bind(cfg.listen)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {} (--listen): {e}", cfg.listen))?;
        berth_agent_server::run(cfg, listener, shutdown).await
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
