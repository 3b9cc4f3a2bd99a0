//! berth's agent-server: a stateless node that runs each session in its own
//! Docker container and streams the agent's events back to the dispatcher.
//!
//! Layout, each layer using only those below it:
//! - `api`: thin gRPC handlers;
//! - `runs`: runs and the dispatcher streams attached to them (journal,
//!   re-attach), `session`: one run (start, relay, stop), `node`: slots,
//!   drain, load;
//! - `pool`: warm pools of containers per image and of started agent
//!   processes per agent key (pure state machines and their Docker side),
//!   `workspace`: prepare, snapshot and archive;
//! - `container`: Docker through bollard, `adapter`: runtime protocols;
//! - `spec`, `env`, `layout`, `load`, `lines`, [`config`], [`metrics`], `error`.

mod adapter;
mod api;
pub mod config;
mod container;
mod env;
mod error;
mod freezer;
pub mod gateway;
mod layout;
mod lease;
mod lines;
mod load;
pub mod metrics;
mod node;
mod pool;
mod runs;
mod session;
mod spec;
mod workspace;

use std::sync::Arc;

use berth_common::grpc::{MAX_MESSAGE_BYTES, health_and_reflection};
use berth_common::tls::{LiveTls, check_peer};
use berth_proto::node::v1::agent_server_server::AgentServerServer;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::service::interceptor::InterceptedService;

pub use config::Config;

/// Runs a node on `listener` until `shutdown` is cancelled. Leftover
/// containers of this node id are reaped first; on shutdown every running
/// session's container is removed before this returns.
pub async fn run(
    cfg: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    run_with_drain(cfg, listener, CancellationToken::new(), shutdown).await
}

/// [`run`], plus a graceful drain: when `drain` is cancelled (SIGTERM) the
/// node stops taking sessions, gives running ones `--drain-timeout` to
/// finish, snapshots the rest so their dispatchers place them elsewhere, and
/// then shuts down. Cancelling `shutdown` stops at once.
pub async fn run_with_drain(
    cfg: Config,
    listener: TcpListener,
    drain: CancellationToken,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let mut cfg = cfg;
    cfg.normalize();
    cfg.validate()?;
    let tls = cfg.tls.live()?;
    if tls.is_none() {
        tracing::warn!("node API runs WITHOUT TLS (--insecure-plaintext): local development only");
    }
    let runtime = container::ContainerRuntime::connect(cfg.container()).await?;
    let reaped = runtime.reap().await?;
    if reaped > 0 {
        tracing::info!(
            reaped,
            "removed containers a previous run of this node left behind"
        );
    }
    // Every background loop, so shutdown stops and awaits each one.
    let loops = TaskTracker::new();
    if let Some(tls) = &tls {
        // A renewed certificate is used from the next connection on.
        loops.spawn(tls.clone().watch(shutdown.clone()));
    }
    if let Some((dir, timeout)) = runtime.dead_man() {
        container::touch_alive(&dir)?;
        loops.spawn(container::heartbeat(dir, timeout, shutdown.clone()));
    }
    let objects = berth_common::objects::ObjectStore::open(&cfg.objects).await?;
    tracing::info!(store = ?objects, "object store");
    let gateway = gateway_of(&cfg)?;
    let node = node::Node::new(cfg, runtime, objects, gateway, shutdown.child_token());
    loops.spawn(node.clone().sample());
    loops.spawn(freezer::run(node.clone()));
    if let Some(addr) = node.cfg.metrics_listen.0 {
        let handle = metrics::install()?;
        let ready = {
            let node = node.clone();
            Arc::new(move || {
                if node.is_draining() {
                    Err("node is draining".to_string())
                } else {
                    Ok(())
                }
            })
        };
        berth_common::metrics::spawn_endpoint(addr, handle, ready, shutdown.clone(), &loops)
            .await?;
    }
    loops.spawn(load_gauges(node.clone()));
    node.pools.spawn();
    node.processes.spawn();
    {
        let (node, shutdown) = (node.clone(), shutdown.clone());
        loops.spawn(async move {
            tokio::select! {
                () = drain.cancelled() => {}
                () = shutdown.cancelled() => return,
            }
            let grace = node.cfg.stop_grace + config::EVICT_SNAPSHOT_GRACE;
            tokio::select! {
                () = node.drain_for_shutdown(node.cfg.drain_timeout, grace) => {}
                () = shutdown.cancelled() => {}
            }
            shutdown.cancel();
        });
    }
    let served = serve(node.clone(), listener, tls, shutdown, &loops).await;
    node.shutdown.cancel();
    node.wait_idle().await;
    // The runs' tasks end with their runs and streams.
    node.tasks.close();
    if tokio::time::timeout(TASKS_GRACE, node.tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            tasks = node.tasks.len(),
            "run tasks still going {TASKS_GRACE:?} after the runs ended"
        );
    }
    // Every gate closed with its run: their connections and tunnels end.
    if let Some(gateway) = &node.gateway {
        gateway.stopped().await;
    }
    // Each pool removes its spares as it stops (loops an undrain started too).
    node.pools.stopped().await;
    node.processes.stopped().await;
    loops.close();
    loops.wait().await;
    // Its gateway directory, now that no container of it is left.
    node.runtime.remove_gateway_root();
    served
}

/// How long shutdown waits for run tasks once every run has ended.
const TASKS_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

/// Keeps the node's capacity, running and draining gauges current until
/// the node shuts down.
async fn load_gauges(node: Arc<node::Node>) {
    let mut load = node.watch_load();
    loop {
        {
            let l = load.borrow_and_update();
            ::metrics::gauge!(metrics::NODE_CAPACITY).set(f64::from(l.capacity));
            ::metrics::gauge!(metrics::NODE_RUNNING).set(f64::from(l.running));
            ::metrics::gauge!(metrics::NODE_DRAINING).set(if l.draining { 1.0 } else { 0.0 });
        }
        tokio::select! {
            changed = load.changed() => if changed.is_err() { return },
            () = node.shutdown.cancelled() => return,
        }
    }
}

async fn serve(
    node: Arc<node::Node>,
    listener: TcpListener,
    tls: Option<Arc<LiveTls>>,
    shutdown: CancellationToken,
    loops: &TaskTracker,
) -> anyhow::Result<()> {
    let (reporter, health, reflection, reflection_alpha) =
        health_and_reflection(&["berth.node.v1"])?;
    reporter
        .set_serving::<AgentServerServer<api::NodeApi>>()
        .await;
    // grpc.health.v1 watchers see a draining node as NOT_SERVING (and
    // SERVING again once undrained).
    let mut load = node.watch_load();
    let stop = node.shutdown.clone();
    loops.spawn(async move {
        let mut draining = false;
        loop {
            let now = load.borrow_and_update().draining;
            if now != draining {
                draining = now;
                if draining {
                    reporter
                        .set_not_serving::<AgentServerServer<api::NodeApi>>()
                        .await;
                } else {
                    reporter
                        .set_serving::<AgentServerServer<api::NodeApi>>()
                        .await;
                }
            }
            tokio::select! {
                changed = load.changed() => if changed.is_err() { return },
                () = stop.cancelled() => return,
            }
        }
    });
    let svc = AgentServerServer::new(api::NodeApi::new(node.clone()))
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let builder = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(std::time::Duration::from_secs(20)))
        // A span per call, in the dispatcher's trace (`traceparent`).
        .trace_fn(berth_common::traces::server_span);
    // With TLS, the handshake requires a CA-signed client certificate and the
    // interceptor requires one of the allowed names on it.
    let allowed = tls.is_some().then(|| node.cfg.tls_allowed_clients.clone());
    let svc = InterceptedService::new(svc, move |req: tonic::Request<()>| match &allowed {
        Some(allowed) => check_peer(&req, allowed).map(|()| req),
        None => Ok(req),
    });
    tracing::info!(
        addr = %listener.local_addr()?,
        node_id = %node.cfg.node_id,
        capacity = node.capacity,
        tls = tls.is_some(),
        pools = ?node.cfg.warm_pools.iter().map(|p| &p.image).collect::<Vec<_>>(),
        "agent-server listening"
    );
    let router = builder
        .layer(tower::util::MapResponseLayer::new(
            berth_common::grpc::client_decode_errors,
        ))
        .layer(berth_common::metrics::GrpcMetricsLayer)
        .add_service(health)
        .add_service(reflection)
        .add_service(reflection_alpha)
        .add_service(svc);
    // No Nagle either way: a small frame (one event, one ack) goes out at
    // once instead of waiting up to 40 ms for the peer's delayed ACK.
    match tls {
        // Each handshake takes the current certificate (see LiveTls).
        Some(tls) => {
            let incoming = berth_common::tls::incoming(listener, tls, shutdown.clone(), loops);
            router
                .serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned())
                .await?;
        }
        None => {
            let incoming =
                tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
            router
                .serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned())
                .await?;
        }
    }
    Ok(())
}

/// The node's egress gateway as `cfg` configures it; `None` with
/// `--gateway-dir off` (sessions then have no egress and no model API).
fn gateway_of(cfg: &Config) -> anyhow::Result<Option<Arc<gateway::Gateway>>> {
    Ok(match cfg.gateway_mount() {
        Some(g) => {
            anyhow::ensure!(
                g.root.as_os_str().len() <= container::MAX_GATEWAY_DIR_BYTES,
                "--gateway-dir {} is longer than {} bytes: its sockets' paths would not fit a Unix socket address",
                g.root.display(),
                container::MAX_GATEWAY_DIR_BYTES
            );
            anyhow::ensure!(
                g.forwarder.is_file(),
                "the egress gateway's forwarder is not at {} (build `berth-forward`, set \
                 --gateway-forwarder, or --gateway-dir off for no egress at all)",
                g.forwarder.display()
            );
            let telemetry = cfg
                .agent_telemetry()
                .map(|e| gateway::TelemetryCollector::new(&e))
                .transpose()?;
            let gw = gateway::Gateway::new(
                &cfg.model_api_url,
                cfg.egress_allow_internal.clone(),
                telemetry,
            )?;
            tracing::info!(gateway = ?gw, dir = %g.root.display(), "egress gateway");
            Some(Arc::new(gw))
        }
        None => {
            tracing::warn!("--gateway-dir off: sessions have no egress and no model API");
            None
        }
    })
}
