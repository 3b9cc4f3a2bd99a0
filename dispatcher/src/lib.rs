//! berth's dispatcher: the control plane.
//!
//! Layout: [`api`] (thin gRPC handlers) → [`sessions`] (operations) →
//! [`log`] (group-commit event log + fan-out) and [`store`] (Postgres).
//! [`driver`] claims queued sessions, places them ([`placement`], [`nodes`])
//! and relays their streams. [`session`] holds the domain types and the
//! status machine.

pub mod api;
pub mod config;
pub mod driver;
pub mod error;
pub mod log;
pub mod nodes;
pub mod placement;
pub mod session;
pub mod sessions;
pub mod store;

use std::sync::Arc;

use berth_common::grpc::{MAX_MESSAGE_BYTES, health_and_reflection};
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
    anyhow::ensure!(
        !cfg.agent_servers.is_empty(),
        "no agent-server nodes: set AGENT_SERVERS"
    );
    let store = store::Store::connect(&cfg.database_url, cfg.db_max_connections).await?;
    let log = log::EventLog::start(store.clone(), shutdown.clone());
    let nodes = nodes::Nodes::connect(&cfg.agent_servers, shutdown.clone())?;
    let ctx = Arc::new(driver::Ctx {
        store: store.clone(),
        log: log.clone(),
        nodes,
        owner: cfg.dispatcher_id.clone(),
        shutdown: shutdown.clone(),
    });
    let wake = Arc::new(tokio::sync::Notify::new());
    tokio::spawn(driver::listen(ctx.clone(), wake.clone()));
    tokio::spawn(driver::claim_loop(ctx.clone(), wake, cfg.queue_poll));

    let (reporter, health, reflection) = health_and_reflection()?;
    reporter
        .set_serving::<SessionsServer<api::sessions::SessionsService>>()
        .await;
    let svc = SessionsServer::new(api::sessions::SessionsService {
        sessions: sessions::Sessions { store, log },
        shutdown: shutdown.clone(),
    })
    .max_decoding_message_size(MAX_MESSAGE_BYTES)
    .max_encoding_message_size(MAX_MESSAGE_BYTES);
    tracing::info!(addr = %listener.local_addr()?, nodes = ?cfg.agent_servers, id = %cfg.dispatcher_id, "dispatcher listening");
    tonic::transport::Server::builder()
        .add_service(health)
        .add_service(reflection)
        .add_service(svc)
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            shutdown.cancelled_owned(),
        )
        .await?;
    Ok(())
}
