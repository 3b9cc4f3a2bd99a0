//! `berth-dispatcher`: the control plane. With `AGENT_SERVERS` unset it also
//! runs one node in process, so one command gives a working berth.

use clap::Parser;
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let mut cfg = berth_dispatcher::Config::parse();
    berth_common::telemetry::init(cfg.log_format);
    let shutdown = CancellationToken::new();
    let signal = shutdown.clone();
    tokio::spawn(async move {
        berth_common::shutdown_signal().await;
        tracing::info!("shutting down");
        signal.cancel();
    });
    let result = async {
        // Before the in-process node starts, so its series are registered.
        if cfg.metrics_listen.0.is_some() {
            berth_dispatcher::metrics::install()?;
        }
        let mut local_node = None;
        // The in-process node outlives the dispatcher's own shutdown, so the
        // sessions it hands back are snapshotted first.
        let node_shutdown = CancellationToken::new();
        if cfg.agent_servers.is_empty() {
            let mut node_cfg = berth_agent_server::Config::defaults();
            node_cfg.node_id = "local".into();
            node_cfg.capacity = cfg.local_capacity;
            node_cfg.log_format = cfg.log_format;
            // The dispatcher's /metrics carries the node's metrics too.
            node_cfg.metrics_listen = berth_common::metrics::Listen(None);
            // One object store for both, whatever flags the dispatcher was given.
            node_cfg.objects = cfg.objects.clone();
            local_node = Some(
                berth_dispatcher::start_local_node(&mut cfg, node_cfg, node_shutdown.clone())
                    .await?,
            );
        }
        let listener = tokio::net::TcpListener::bind(cfg.listen)
            .await
            .map_err(|e| {
                anyhow::anyhow!(
                    "cannot listen on {} (--listen / BERTH_LISTEN): {e}",
                    cfg.listen
                )
            })?;
        let served = berth_dispatcher::run(cfg, listener, shutdown.clone()).await;
        shutdown.cancel();
        node_shutdown.cancel();
        if let Some(node) = local_node {
            node.await??;
        }
        served
    }
    .await;
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("berth-dispatcher: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
