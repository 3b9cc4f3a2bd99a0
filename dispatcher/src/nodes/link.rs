//! One node as this dispatcher sees it: a gRPC client (mTLS) and the node's
//! last load report, kept fresh by a `WatchLoad` stream under a lease.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use berth_common::grpc::MAX_MESSAGE_BYTES;
use berth_common::sync::lock;
use berth_proto::node::v1::{LoadReport, WatchLoadRequest, agent_server_client::AgentServerClient};
use futures::StreamExt;
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};

use super::url::{FleetConfig, NodeUrl};
use crate::placement::NodeSnapshot;

/// A node's state as this dispatcher sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeState {
    Up = 0,
    Draining = 1,
    Down = 2,
}

impl NodeState {
    /// The lowercase name used in metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Up => "up",
            Self::Draining => "draining",
            Self::Down => "down",
        }
    }
}

/// One node: a resolved address of a configured URL.
pub struct NodeLink {
    /// The configured URL it came from.
    pub url: NodeUrl,
    /// The address it is dialled at.
    pub addr: SocketAddr,
    pub(super) client: Mutex<AgentServerClient<Channel>>,
    /// Last report; `None` while down.
    pub(super) load: watch::Receiver<Option<LoadReport>>,
    /// When the last report arrived.
    pub(super) last_report: Mutex<Option<std::time::Instant>>,
    /// Why the node is down, if it is.
    pub(super) last_error: Mutex<String>,
    /// The node id it last reported, kept while it is down.
    pub(super) known_id: Mutex<Option<String>>,
    /// Sessions this dispatcher placed here that have not ended.
    pub(super) inflight: AtomicU32,
    /// Cancelled when the address stops resolving.
    pub(super) gone: CancellationToken,
}

impl NodeLink {
    /// A client for the node API.
    pub fn client(&self) -> AgentServerClient<Channel> {
        lock(&self.client).clone()
    }

    /// A stable key: the URL and the address it resolved to.
    pub fn key(&self) -> String {
        format!("{}@{}", self.url.url, self.addr)
    }

    /// The node's id as it last reported it, or `host@addr` before its
    /// first report.
    pub fn name(&self) -> String {
        lock(&self.known_id)
            .clone()
            .unwrap_or_else(|| format!("{}@{}", self.url.host, self.addr))
    }

    /// Last report, if the node is up.
    pub fn report(&self) -> Option<LoadReport> {
        self.load.borrow().clone()
    }

    pub fn state(&self) -> NodeState {
        match self.load.borrow().as_ref() {
            None => NodeState::Down,
            Some(r) if r.draining => NodeState::Draining,
            Some(_) => NodeState::Up,
        }
    }

    pub fn last_error(&self) -> String {
        lock(&self.last_error).clone()
    }

    /// Time since the last report.
    pub fn report_age(&self) -> Option<Duration> {
        lock(&self.last_report).map(|t| t.elapsed())
    }

    pub fn inflight(&self) -> u32 {
        self.inflight.load(Ordering::SeqCst)
    }

    /// Resolves once the node's reports say it is draining (`true`) or
    /// not, or it is down: what the caller of a drain reads back next.
    pub async fn reported_draining(&self, draining: bool) {
        let mut rx = self.load.clone();
        let _ = rx
            .wait_for(|r| r.as_ref().is_none_or(|r| r.draining == draining))
            .await;
    }

    /// Resolves when the node is down (lease expired or stream failed).
    /// Never resolves once the link itself is dropped (shutdown).
    pub async fn down(&self) {
        let mut rx = self.load.clone();
        if rx.wait_for(Option::is_none).await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    /// What placement knows of this node for a session of `image` (and
    /// agent key `agent`, when a pre-started process can serve it).
    pub(super) fn snapshot(&self, image: &str, agent: Option<&str>) -> NodeSnapshot {
        let report = self.load.borrow();
        let inflight = self.inflight.load(Ordering::SeqCst);
        match report.as_ref() {
            Some(r) => NodeSnapshot {
                up: true,
                draining: r.draining,
                capacity: u32::try_from(r.capacity).unwrap_or(0),
                running: u32::try_from(r.running).unwrap_or(0),
                inflight,
                warm_ready: r
                    .warm
                    .iter()
                    .find(|w| w.agent_key.is_empty() && w.image == image)
                    .map_or(0, |w| u32::try_from(w.ready).unwrap_or(0)),
                warm_process_ready: agent.map_or(0, |key| {
                    r.warm
                        .iter()
                        .find(|w| w.agent_key == key)
                        .map_or(0, |w| u32::try_from(w.ready).unwrap_or(0))
                }),
            },
            None => NodeSnapshot {
                up: false,
                draining: false,
                capacity: 0,
                running: 0,
                inflight,
                warm_ready: 0,
                warm_process_ready: 0,
            },
        }
    }
}

/// A lazily connecting client for one node address: TLS verifies the name
/// in the URL, the connection goes to `addr`.
pub(super) fn dial(
    cfg: &FleetConfig,
    url: &NodeUrl,
    addr: SocketAddr,
) -> anyhow::Result<AgentServerClient<Channel>> {
    // TLS, when the URL is https, is the connector's: each connection
    // takes the current certificate (see LiveTls), so the URI tonic sees
    // is plain.
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(20))
        .keep_alive_while_idle(true);
    let channel = if url.tls {
        let tls = cfg.tls.clone().ok_or_else(|| {
            anyhow::anyhow!("{} is https but no TLS material is configured", url.url)
        })?;
        let host = url.host.clone();
        endpoint.connect_with_connector_lazy(tower::service_fn(move |_: http::Uri| {
            let (tls, host) = (tls.clone(), host.clone());
            async move {
                let stream = berth_common::tls::connect(&tls, addr, &host).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        }))
    } else {
        endpoint.connect_lazy()
    };
    Ok(AgentServerClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES))
}

/// Follows one node's load stream under a lease, redialling with backoff.
pub(super) async fn watch_load(
    link: Arc<NodeLink>,
    tx: watch::Sender<Option<LoadReport>>,
    changed: Arc<Notify>,
    cfg: FleetConfig,
) {
    let lease = cfg.lease;
    let node = link.key();
    let mut backoff =
        berth_common::retry::Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    loop {
        let why = async {
            type Never = std::convert::Infallible;
            let mut client = link.client();
            let mut stream = tokio::time::timeout(lease, client.watch_load(WatchLoadRequest {}))
                .await
                .map_err(|_| format!("no answer to WatchLoad within the {lease:?} lease"))?
                .map_err(|s| describe(&s))?
                .into_inner();
            loop {
                match tokio::time::timeout(lease, stream.next()).await {
                    Err(_) => {
                        return Err::<Never, _>(format!(
                            "load stream silent past its {lease:?} lease"
                        ));
                    }
                    Ok(Some(Ok(report))) => {
                        if tx.borrow().is_none() {
                            tracing::info!(%node, node_id = %report.node_id, capacity = report.capacity, "node up");
                            lock(&link.last_error).clear();
                        }
                        *lock(&link.last_report) = Some(std::time::Instant::now());
                        *lock(&link.known_id) = Some(report.node_id.clone());
                        backoff.reset();
                        tx.send_replace(Some(report));
                        changed.notify_waiters();
                    }
                    Ok(Some(Err(status))) => return Err(describe(&status)),
                    Ok(None) => return Err("load stream ended".to_string()),
                }
            }
        };
        let why: String = tokio::select! {
            () = link.gone.cancelled() => return,
            r = why => match r { Err(why) => why, Ok(never) => match never {} },
        };
        *lock(&link.last_error) = why.clone();
        let was_up = tx.send_replace(None).is_some();
        if was_up {
            tracing::warn!(%node, %why, "node down");
            changed.notify_waiters();
            // A silent connection would hold every new RPC: start afresh.
            match dial(&cfg, &link.url, link.addr) {
                Ok(client) => *lock(&link.client) = client,
                Err(e) => tracing::warn!(%node, error = %e, "cannot redial node"),
            }
        } else {
            tracing::debug!(%node, %why, "node still down");
        }
        tokio::select! {
            () = link.gone.cancelled() => return,
            () = tokio::time::sleep(backoff.next_delay()) => {}
        }
    }
}

/// A status in words, with the transport cause (a TLS error names the
/// certificate problem) when there is one.
fn describe(status: &tonic::Status) -> String {
    use std::error::Error as _;
    berth_common::causes::with_causes(status.message().to_string(), status.source())
}
