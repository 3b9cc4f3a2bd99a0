//! berth's agent-server: a stateless node that runs each session in its own
//! Docker container and streams the agent's events back to the dispatcher.
//!
//! Layout: [`api`] (thin gRPC handlers) → [`node`] (slots, load) and
//! [`session`] (one run) → [`container`] (bollard) and [`adapter`] (runtime
//! protocols).

pub mod adapter;
pub mod api;
pub mod config;
pub mod container;
pub mod error;
pub mod lines;
pub mod node;
pub mod session;
pub mod spec;

use std::sync::Arc;

use berth_common::grpc::{MAX_MESSAGE_BYTES, health_and_reflection};
use berth_proto::node::v1::agent_server_server::AgentServerServer;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use config::Config;

/// Runs a node on `listener` until `shutdown` is cancelled. Leftover
/// containers of this node id are reaped first; on shutdown every running
/// session's container is removed before this returns.
pub async fn run(
    cfg: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    cfg.validate()?;
    let runtime = container::ContainerRuntime::connect(cfg.clone()).await?;
    let reaped = runtime.reap().await?;
    if reaped > 0 {
        tracing::info!(
            reaped,
            "removed containers a previous run of this node left behind"
        );
    }
    let node = node::Node::new(cfg, runtime, shutdown.child_token());
    node.spawn_sampler();
    serve(node.clone(), listener, shutdown).await?;
    node.shutdown.cancel();
    node.wait_idle().await;
    Ok(())
}

async fn serve(
    node: Arc<node::Node>,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let (reporter, health, reflection) = health_and_reflection()?;
    reporter
        .set_serving::<AgentServerServer<api::NodeApi>>()
        .await;
    let svc = AgentServerServer::new(api::NodeApi::new(node.clone()))
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    tracing::info!(addr = %listener.local_addr()?, node_id = %node.cfg.node_id, capacity = node.cfg.capacity, "agent-server listening");
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
