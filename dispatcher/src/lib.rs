//! berth's dispatcher: the control plane.
//!
//! Layout: [`api`] (thin gRPC handlers) → [`sessions`] (operations) →
//! [`log`] (group-commit event log + fan-out) and [`store`] (Postgres).
//! [`driver`] claims queued sessions, places them ([`placement`], [`nodes`])
//! and relays their streams. [`session`] holds the domain types and the
//! status machine.

pub mod agents;
pub mod api;
pub mod config;
pub mod driver;
pub mod error;
pub mod export;
pub mod log;
pub mod metrics;
pub mod nodes;
pub mod placement;
pub mod session;
pub mod sessions;
pub mod store;

use std::sync::Arc;

use berth_common::grpc::{MAX_MESSAGE_BYTES, health_and_reflection};
use berth_proto::v1::agents_server::AgentsServer;
use berth_proto::v1::files_server::FilesServer;
use berth_proto::v1::nodes_server::NodesServer;
use berth_proto::v1::sessions_server::SessionsServer;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use config::Config;

/// Runs a dispatcher on `listener` against the nodes in `cfg.agent_servers`
/// until `shutdown` is cancelled.
pub async fn run(
    cfg: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    cfg.validate()?;
    let fleet = fleet_config(&cfg)?;
    let store = store::Store::connect(&cfg.database_url, cfg.db_max_connections).await?;
    let objects = berth_common::objects::ObjectStore::open(&cfg.objects)?;
    tracing::info!(store = ?objects, "object store");
    let log = log::EventLog::start(store.clone(), shutdown.clone());
    let nodes = nodes::Nodes::start(fleet, shutdown.clone()).await?;
    let ctx = Arc::new(driver::Ctx {
        store: store.clone(),
        log: log.clone(),
        nodes,
        owner: cfg.dispatcher_id.clone(),
        shutdown: shutdown.clone(),
        drivers: tokio_util::task::TaskTracker::new(),
        inactivity_default: cfg
            .inactivity_timeout
            .unwrap_or(session::DEFAULT_INACTIVITY_TIMEOUT),
        retention_days: cfg.retention_days,
        db_ok: std::sync::atomic::AtomicBool::new(true),
    });
    let endpoint_stop = CancellationToken::new();
    let _endpoint = endpoint_stop.clone().drop_guard();
    if let Some(addr) = cfg.metrics_listen.0 {
        let handle = metrics::install()?;
        let ready = {
            let ctx = ctx.clone();
            Arc::new(move || {
                if ctx.shutdown.is_cancelled() {
                    Err("shutting down".to_string())
                } else if !ctx.db_ok.load(std::sync::atomic::Ordering::Relaxed) {
                    Err("Postgres unreachable (last heartbeat failed)".to_string())
                } else {
                    Ok(())
                }
            })
        };
        // Serves until this returns: probes see `shutting down` meanwhile.
        berth_common::metrics::spawn_endpoint(addr, handle, ready, endpoint_stop.clone()).await?;
        tokio::spawn(metrics::sampler(ctx.clone()));
    }
    let wake = Arc::new(tokio::sync::Notify::new());
    tokio::spawn(driver::listen(ctx.clone(), wake.clone()));
    tokio::spawn(driver::claim_loop(ctx.clone(), wake, cfg.queue_poll));
    tokio::spawn(driver::liveness_loop(ctx.clone(), cfg.dispatcher_lease));

    let (reporter, health, reflection) = health_and_reflection()?;
    reporter
        .set_serving::<SessionsServer<api::sessions::SessionsService>>()
        .await;
    reporter
        .set_serving::<NodesServer<api::nodes::NodesService>>()
        .await;
    reporter
        .set_serving::<AgentsServer<api::agents::AgentsService>>()
        .await;
    reporter
        .set_serving::<FilesServer<api::agents::AgentsService>>()
        .await;
    let agents_svc = api::agents::AgentsService {
        agents: agents::Agents {
            store: store.clone(),
            objects: objects.clone(),
        },
    };
    let svc = SessionsServer::new(api::sessions::SessionsService {
        sessions: sessions::Sessions {
            store,
            log,
            objects,
            queue_timeout: Some(cfg.queue_timeout).filter(|t| !t.is_zero()),
        },
        shutdown: shutdown.clone(),
    })
    .max_decoding_message_size(MAX_MESSAGE_BYTES)
    .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let nodes_svc = NodesServer::new(api::nodes::NodesService {
        nodes: ctx.nodes.clone(),
    });
    tracing::info!(addr = %listener.local_addr()?, nodes = ?cfg.agent_servers, id = %cfg.dispatcher_id, "dispatcher listening");
    let mut server = tonic::transport::Server::builder();
    if cfg.api_tls {
        let tls = cfg
            .tls
            .load()?
            .ok_or_else(|| anyhow::anyhow!("--api-tls needs --tls-ca, --tls-cert and --tls-key"))?;
        server = server.tls_config(tls.server())?;
    }
    server
        .layer(berth_common::metrics::GrpcMetricsLayer)
        .add_service(health)
        .add_service(reflection)
        .add_service(svc)
        .add_service(nodes_svc)
        .add_service(AgentsServer::new(agents_svc.clone()))
        .add_service(
            FilesServer::new(agents_svc)
                .max_decoding_message_size(session::limits::FILE_BYTES + 64 * 1024),
        )
        .serve_with_incoming_shutdown(
            // No Nagle: a small frame (one event, one ack) goes out at once instead
            // of waiting up to 40 ms for the peer's delayed ACK.
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            shutdown.cancelled_owned(),
        )
        .await?;
    // Each driver re-queues its session (status `rescheduling`) so another
    // dispatcher picks it up; wait for them, within reason.
    ctx.drivers.close();
    if tokio::time::timeout(DRIVER_SHUTDOWN_GRACE, ctx.drivers.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            remaining = ctx.drivers.len(),
            "sessions still being handed back at exit"
        );
    }
    Ok(())
}

/// How long shutdown waits for drivers to hand their sessions back.
/// Longer than a node's hand-back snapshot ([`driver`]'s 20 s).
const DRIVER_SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(25);

/// How to reach the nodes: URLs, TLS, static resolution, lease. Plaintext
/// only with `--insecure-plaintext`; https needs the TLS files.
fn fleet_config(cfg: &Config) -> anyhow::Result<nodes::FleetConfig> {
    anyhow::ensure!(
        !cfg.agent_servers.is_empty(),
        "no agent-server nodes: set AGENT_SERVERS"
    );
    let urls = cfg
        .agent_servers
        .iter()
        .map(|u| nodes::NodeUrl::parse(u.trim()))
        .collect::<anyhow::Result<Vec<_>>>()?;
    if let Some(u) = urls.iter().find(|u| !u.tls) {
        anyhow::ensure!(
            cfg.tls.insecure_plaintext,
            "AGENT_SERVERS: `{}` is plaintext; use https:// with --tls-ca/--tls-cert/--tls-key, \
             or pass --insecure-plaintext for local development",
            u.url
        );
        tracing::warn!(url = %u.url, "node link WITHOUT TLS (--insecure-plaintext): local development only");
    }
    let tls = if urls.iter().any(|u| u.tls) {
        let tls = cfg.tls.load()?;
        anyhow::ensure!(
            tls.is_some(),
            "https nodes need --tls-ca, --tls-cert and --tls-key (`berth certs init` makes a development set)"
        );
        tls
    } else {
        None
    };
    Ok(nodes::FleetConfig {
        urls,
        tls,
        resolve: cfg.node_resolve.iter().cloned().collect(),
        resolve_interval: cfg.node_resolve_interval,
        lease: cfg.node_lease,
    })
}

/// Starts one node in process for a dispatcher with no `AGENT_SERVERS`: on
/// loopback, over mTLS with a CA made for this process. Points `cfg` at it.
pub async fn start_local_node(
    cfg: &mut Config,
    node_cfg: berth_agent_server::Config,
    shutdown: CancellationToken,
) -> anyhow::Result<tokio::task::JoinHandle<anyhow::Result<()>>> {
    use berth_common::tls::{CertKind, DISPATCHER_NAME, DevCa};
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let ca = DevCa::generate("berth in-process CA")?;
    let node_cert = ca.issue(CertKind::Node, &["local".to_string()])?;
    let dispatcher_cert = ca.issue(CertKind::Dispatcher, &[DISPATCHER_NAME.to_string()])?;
    let mut node_cfg = node_cfg;
    node_cfg.tls.material = Some(ca.material(&node_cert));
    node_cfg.tls_allowed_clients = vec![DISPATCHER_NAME.to_string()];
    cfg.tls.material = Some(ca.material(&dispatcher_cert));
    cfg.agent_servers = vec![format!("https://local:{}", addr.port())];
    cfg.node_resolve
        .push((format!("local:{}", addr.port()), addr));
    tracing::info!(%addr, "AGENT_SERVERS is unset: running one node in process (mTLS, ephemeral CA)");
    Ok(tokio::spawn(berth_agent_server::run(
        node_cfg, listener, shutdown,
    )))
}
