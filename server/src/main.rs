//! `berth-dispatcher`: the control plane. With `AGENT_SERVERS` unset it also
//! runs one node in process, so one command gives a working berth.

use clap::Parser;
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cfg = berth_dispatcher::Config::parse();
    let traces = match berth_common::telemetry::init(cfg.log_format, "berth-dispatcher") {
        Ok(t) => t,
        Err(e) => {
            eprintln!("berth-dispatcher: {e:#}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let shutdown = CancellationToken::new();
    let signal = shutdown.clone();
    tokio::spawn(async move {
        berth_common::shutdown_signal().await;
        tracing::info!("shutting down");
        signal.cancel();
    });
    let result = async {
        let node_id_from_env = std::env::var_os("BERTH_NODE_ID").is_some_and(|v| !v.is_empty());
        let node = berth_server::local_node_config(
            &cfg,
            berth_agent_server::Config::defaults(),
            node_id_from_env,
        );
        let listener = tokio::net::TcpListener::bind(cfg.listen)
            .await
            .map_err(|e| {
                anyhow::anyhow!(
                    "cannot listen on {} (--listen / BERTH_LISTEN): {e}",
                    cfg.listen
                )
            })?;
        berth_server::run(cfg, node, listener, shutdown).await
    }
    .await;
    if let Some(t) = traces {
        // Blocks until the last spans are sent (the exporter runs on this
        // runtime): off the async workers.
        let _ = tokio::task::spawn_blocking(move || t.shutdown()).await;
    }
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("berth-dispatcher: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
