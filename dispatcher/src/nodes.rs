//! Links to agent-server nodes: a gRPC client each, and the node's last load
//! report, kept fresh by a `WatchLoad` stream.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use berth_common::grpc::MAX_MESSAGE_BYTES;
use berth_proto::node::v1::{LoadReport, WatchLoadRequest, agent_server_client::AgentServerClient};
use futures::StreamExt;
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};

use crate::placement::{self, NodeSnapshot};

/// One node.
pub struct NodeLink {
    /// The URL it was dialled at.
    pub url: String,
    client: AgentServerClient<Channel>,
    /// Last report; `None` while its load stream is down.
    load: watch::Receiver<Option<LoadReport>>,
    /// Sessions this dispatcher placed here that have not ended.
    inflight: AtomicU32,
}

impl NodeLink {
    /// A client for the node API.
    pub fn client(&self) -> AgentServerClient<Channel> {
        self.client.clone()
    }

    /// The node's id as it reports it, or its URL before the first report.
    pub fn name(&self) -> String {
        self.load
            .borrow()
            .as_ref()
            .map(|r| r.node_id.clone())
            .unwrap_or_else(|| self.url.clone())
    }

    fn snapshot(&self, image: &str) -> NodeSnapshot {
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
                    .find(|w| w.image == image)
                    .map_or(0, |w| u32::try_from(w.ready).unwrap_or(0)),
            },
            None => NodeSnapshot {
                up: false,
                draining: false,
                capacity: 0,
                running: 0,
                inflight,
                warm_ready: 0,
            },
        }
    }
}

/// A slot this dispatcher holds on a node until the session's run ends.
pub struct Placed {
    pub link: Arc<NodeLink>,
    nodes: Arc<Nodes>,
}

impl Drop for Placed {
    fn drop(&mut self) {
        self.link.inflight.fetch_sub(1, Ordering::SeqCst);
        self.nodes.changed.notify_one();
    }
}

/// Every node this dispatcher places on.
pub struct Nodes {
    links: Vec<Arc<NodeLink>>,
    /// Notified when capacity may have freed up.
    pub changed: Arc<Notify>,
}

impl Nodes {
    /// Dials every node lazily and starts following its load.
    pub fn connect(urls: &[String], shutdown: CancellationToken) -> anyhow::Result<Arc<Self>> {
        let changed = Arc::new(Notify::new());
        let mut links = Vec::new();
        for url in urls {
            let endpoint = Endpoint::from_shared(url.clone())
                .map_err(|e| anyhow::anyhow!("AGENT_SERVERS: `{url}` is not a valid URL: {e}"))?
                .connect_timeout(Duration::from_secs(5))
                .tcp_nodelay(true)
                .http2_keep_alive_interval(Duration::from_secs(10))
                .keep_alive_while_idle(true);
            let client = AgentServerClient::new(endpoint.connect_lazy())
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES);
            let (tx, rx) = watch::channel(None);
            tokio::spawn(watch_load(
                url.clone(),
                client.clone(),
                tx,
                changed.clone(),
                shutdown.clone(),
            ));
            links.push(Arc::new(NodeLink {
                url: url.clone(),
                client,
                load: rx,
                inflight: AtomicU32::new(0),
            }));
        }
        Ok(Arc::new(Self { links, changed }))
    }

    /// All links.
    pub fn links(&self) -> &[Arc<NodeLink>] {
        &self.links
    }

    /// Free slots across live nodes, as this dispatcher sees them.
    pub fn free_slots(&self) -> u32 {
        self.links
            .iter()
            .map(|l| l.snapshot(""))
            .filter(|s| s.up && !s.draining)
            .map(|s| s.capacity.saturating_sub(s.used()))
            .sum()
    }

    /// Places a session for `image`, skipping `exclude`d URLs (nodes that
    /// already refused it). The slot is held until the returned value drops.
    pub fn place(self: &Arc<Self>, image: &str, exclude: &[String]) -> Option<Placed> {
        let candidates: Vec<&Arc<NodeLink>> = self
            .links
            .iter()
            .filter(|l| !exclude.contains(&l.url))
            .collect();
        let snapshots: Vec<NodeSnapshot> = candidates.iter().map(|l| l.snapshot(image)).collect();
        let i = placement::choose(&snapshots, |n| fastrand::usize(..n))?;
        let link = candidates[i].clone();
        link.inflight.fetch_add(1, Ordering::SeqCst);
        Some(Placed {
            link,
            nodes: self.clone(),
        })
    }

    /// Waits until at least one node has reported its load, or `timeout`.
    pub async fn wait_ready(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if self.links.iter().any(|l| l.load.borrow().is_some()) {
                return true;
            }
            if tokio::time::timeout_at(deadline, self.changed.notified())
                .await
                .is_err()
            {
                return false;
            }
        }
    }
}

/// Follows one node's load stream, reconnecting with backoff.
async fn watch_load(
    url: String,
    mut client: AgentServerClient<Channel>,
    tx: watch::Sender<Option<LoadReport>>,
    changed: Arc<Notify>,
    shutdown: CancellationToken,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let stream = tokio::select! {
            () = shutdown.cancelled() => return,
            r = client.watch_load(WatchLoadRequest {}) => r,
        };
        match stream {
            Ok(resp) => {
                let mut stream = resp.into_inner();
                loop {
                    let next = tokio::select! {
                        () = shutdown.cancelled() => return,
                        n = stream.next() => n,
                    };
                    match next {
                        Some(Ok(report)) => {
                            if tx.borrow().is_none() {
                                tracing::info!(node = %url, node_id = %report.node_id, capacity = report.capacity, "node up");
                            }
                            backoff = Duration::from_millis(100);
                            tx.send_replace(Some(report));
                            changed.notify_one();
                        }
                        Some(Err(status)) => {
                            tracing::warn!(node = %url, %status, "node load stream failed");
                            break;
                        }
                        None => break,
                    }
                }
            }
            Err(status) => tracing::debug!(node = %url, %status, "cannot open node load stream"),
        }
        if tx.send_replace(None).is_some() {
            tracing::warn!(node = %url, "node down");
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}
