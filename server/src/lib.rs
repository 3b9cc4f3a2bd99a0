//! berth's default deployment in one process: a dispatcher and, when
//! `AGENT_SERVERS` is unset, one agent-server node on the local Docker daemon,
//! linked over mTLS with a CA made for this process.
//!
//! The in-process node's id is `BERTH_NODE_ID` when set, else
//! `local-{dispatcher id}`: unique among dispatchers sharing a Docker host
//! (each reaps only its own node's leftovers), and stable across restarts of
//! one dispatcher that keeps its id (so it reaps what it left behind).

use berth_common::tls::{CertKind, DISPATCHER_NAME, DevCa};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Runs `cfg`'s dispatcher on `listener` until `shutdown`, with an in-process
/// node configured by `node` when `cfg.agent_servers` is empty. The node
/// outlives the dispatcher's own shutdown, so the sessions the dispatcher
/// hands back are snapshotted first.
pub async fn run(
    mut cfg: berth_dispatcher::Config,
    node: berth_agent_server::Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    if cfg.metrics_listen.0.is_some() {
        // Before the in-process node starts, so its series are registered;
        // the dispatcher's /metrics carries the node's metrics too.
        berth_dispatcher::metrics::install(&[berth_agent_server::metrics::ALL])?;
        berth_agent_server::metrics::init_series();
    }
    let node_shutdown = CancellationToken::new();
    let local_node = if cfg.agent_servers.is_empty() {
        Some(start_local_node(&mut cfg, node, node_shutdown.clone()).await?)
    } else {
        None
    };
    let served = berth_dispatcher::run(cfg, listener, shutdown.clone()).await;
    shutdown.cancel();
    node_shutdown.cancel();
    if let Some(node) = local_node {
        node.await??;
    }
    served
}

/// The in-process node's configuration: the agent-server's own flags and
/// `BERTH_*` variables, with what the dispatcher decides on top.
pub fn local_node_config(
    cfg: &berth_dispatcher::Config,
    mut node: berth_agent_server::Config,
    node_id_from_env: bool,
) -> berth_agent_server::Config {
    if !node_id_from_env {
        node.node_id = format!("local-{}", cfg.dispatcher_id);
    }
    node.capacity = cfg.local_capacity;
    node.log_format = cfg.log_format;
    // The dispatcher's endpoint serves the node's metrics.
    node.metrics_listen = berth_common::metrics::Listen(None);
    // One object store for both, whatever flags the dispatcher was given.
    node.objects = cfg.objects.clone();
    node
}

/// Starts `node` on loopback, over mTLS with a CA made for this process, and
/// points `cfg` at it.
async fn start_local_node(
    cfg: &mut berth_dispatcher::Config,
    node: berth_agent_server::Config,
    shutdown: CancellationToken,
) -> anyhow::Result<tokio::task::JoinHandle<anyhow::Result<()>>> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let ca = DevCa::generate("berth in-process CA")?;
    let node_cert = ca.issue(CertKind::Node, &["local".to_string()])?;
    let dispatcher_cert = ca.issue(CertKind::Dispatcher, &[DISPATCHER_NAME.to_string()])?;
    let mut node = node;
    node.tls.material = Some(ca.material(&node_cert));
    node.tls_allowed_clients = vec![DISPATCHER_NAME.to_string()];
    cfg.tls.material = Some(ca.material(&dispatcher_cert));
    cfg.agent_servers = vec![format!("https://local:{}", addr.port())];
    cfg.node_resolve
        .push((format!("local:{}", addr.port()), addr));
    tracing::info!(%addr, node_id = %node.node_id, "AGENT_SERVERS is unset: running one node in process (mTLS, ephemeral CA)");
    Ok(tokio::spawn(berth_agent_server::run(
        node, listener, shutdown,
    )))
}
