//! The fleet as this dispatcher sees it: a link per node address, each with
//! a gRPC client (mTLS) and the node's last load report, kept fresh by a
//! `WatchLoad` stream under a lease.
//!
//! - `AGENT_SERVERS` names are re-resolved every `resolve_interval`; a name
//!   with several addresses is several nodes (a Kubernetes headless service).
//!   A node that stops resolving is dropped once nothing uses it.
//! - TLS verifies each node's certificate against the *name* in its URL,
//!   while the connection goes to the resolved address.
//! - A node whose load stream is silent past `lease` is down: its link's
//!   state flips, and drivers relaying its sessions reschedule them. The
//!   link keeps redialling; a node that comes back is used again.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use berth_common::grpc::MAX_MESSAGE_BYTES;
use berth_common::tls::TlsMaterial;
use berth_proto::node::v1::{LoadReport, WatchLoadRequest, agent_server_client::AgentServerClient};
use futures::StreamExt;
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};

use crate::placement::{self, NodeSnapshot};

/// One configured `AGENT_SERVERS` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeUrl {
    pub url: String,
    pub tls: bool,
    pub host: String,
    pub port: u16,
}

impl NodeUrl {
    /// Parses `https://host:port` (or `http://` for plaintext development).
    pub fn parse(url: &str) -> anyhow::Result<Self> {
        let (tls, rest) = if let Some(r) = url.strip_prefix("https://") {
            (true, r)
        } else if let Some(r) = url.strip_prefix("http://") {
            (false, r)
        } else {
            anyhow::bail!(
                "AGENT_SERVERS: `{url}` must start with https:// (or http:// with --insecure-plaintext)"
            );
        };
        let authority = rest.trim_end_matches('/');
        anyhow::ensure!(
            !authority.contains('/'),
            "AGENT_SERVERS: `{url}` must be a bare https://host:port"
        );
        let uri: tonic::codegen::http::uri::Authority = authority
            .parse()
            .map_err(|e| anyhow::anyhow!("AGENT_SERVERS: `{url}` is not a valid URL: {e}"))?;
        let port = match uri.port() {
            Some(p) => p.as_str().parse::<u16>().map_err(|_| {
                anyhow::anyhow!(
                    "AGENT_SERVERS: `{url}` has an invalid port `{}`",
                    p.as_str()
                )
            })?,
            None => {
                if tls {
                    443
                } else {
                    80
                }
            }
        };
        let host = uri.host().trim_matches(['[', ']']).to_string();
        anyhow::ensure!(!host.is_empty(), "AGENT_SERVERS: `{url}` has no host");
        Ok(Self {
            url: url.to_string(),
            tls,
            host,
            port,
        })
    }

    fn host_port(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }
}

/// How this dispatcher reaches its nodes.
#[derive(Debug, Clone)]
pub struct FleetConfig {
    pub urls: Vec<NodeUrl>,
    /// Client certificate and CA; `None` only for plaintext development.
    pub tls: Option<TlsMaterial>,
    /// `host:port` → address, consulted before DNS (like curl's `--resolve`).
    pub resolve: HashMap<String, SocketAddr>,
    pub resolve_interval: Duration,
    pub lease: Duration,
}

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
    client: Mutex<AgentServerClient<Channel>>,
    /// Last report; `None` while down.
    load: watch::Receiver<Option<LoadReport>>,
    /// When the last report arrived.
    last_report: Mutex<Option<std::time::Instant>>,
    /// Why the node is down, if it is.
    last_error: Mutex<String>,
    /// The node id it last reported, kept while it is down.
    known_id: Mutex<Option<String>>,
    /// Sessions this dispatcher placed here that have not ended.
    inflight: AtomicU32,
    /// Cancelled when the address stops resolving.
    gone: CancellationToken,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Every value behind these locks is replaced whole: poison is harmless.
    m.lock().unwrap_or_else(|p| p.into_inner())
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

    /// Resolves when the node is down (lease expired or stream failed).
    /// Never resolves once the link itself is dropped (shutdown).
    pub async fn down(&self) {
        let mut rx = self.load.clone();
        if rx.wait_for(Option::is_none).await.is_err() {
            std::future::pending::<()>().await;
        }
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
    cfg: FleetConfig,
    links: Mutex<Vec<Arc<NodeLink>>>,
    /// Notified when capacity may have changed.
    pub changed: Arc<Notify>,
    shutdown: CancellationToken,
}

impl Nodes {
    /// Resolves every URL, dials each address lazily and follows its load;
    /// re-resolves in the background.
    pub async fn start(cfg: FleetConfig, shutdown: CancellationToken) -> anyhow::Result<Arc<Self>> {
        anyhow::ensure!(
            !cfg.urls.is_empty(),
            "no agent-server nodes: set AGENT_SERVERS"
        );
        let nodes = Arc::new(Self {
            cfg,
            links: Mutex::new(Vec::new()),
            changed: Arc::new(Notify::new()),
            shutdown,
        });
        nodes.resolve_once().await;
        tokio::spawn(nodes.clone().resolve_loop());
        Ok(nodes)
    }

    /// All links.
    pub fn links(&self) -> Vec<Arc<NodeLink>> {
        lock(&self.links).clone()
    }

    async fn resolve_loop(self: Arc<Self>) {
        let mut tick = tokio::time::interval(self.cfg.resolve_interval);
        tick.tick().await;
        loop {
            tokio::select! {
                () = self.shutdown.cancelled() => return,
                _ = tick.tick() => self.resolve_once().await,
            }
        }
    }

    /// Resolves every URL and reconciles links with the addresses found. A
    /// name that fails to resolve keeps its links (DNS blips are not node loss;
    /// the lease decides that).
    async fn resolve_once(&self) {
        let mut found: Vec<(NodeUrl, SocketAddr)> = Vec::new();
        let mut failed: Vec<&NodeUrl> = Vec::new();
        for url in &self.cfg.urls {
            if let Some(addr) = self.cfg.resolve.get(&url.host_port()) {
                found.push((url.clone(), *addr));
                continue;
            }
            match tokio::net::lookup_host(url.host_port()).await {
                Ok(addrs) => {
                    let mut addrs: Vec<SocketAddr> = addrs.collect();
                    addrs.sort();
                    addrs.dedup();
                    found.extend(addrs.into_iter().map(|a| (url.clone(), a)));
                }
                Err(e) => {
                    tracing::warn!(url = %url.url, error = %e, "cannot resolve node; keeping its known addresses");
                    failed.push(url);
                }
            }
        }
        let mut links = lock(&self.links);
        let before = links.len();
        links.retain(|l| {
            let keep =
                failed.contains(&&l.url) || found.iter().any(|(u, a)| *u == l.url && *a == l.addr);
            if !keep {
                tracing::info!(node = %l.key(), "node no longer resolves; dropping it");
                l.gone.cancel();
            }
            keep
        });
        for (url, addr) in found {
            if links.iter().any(|l| l.url == url && l.addr == addr) {
                continue;
            }
            match self.link(url.clone(), addr) {
                Ok(link) => {
                    tracing::info!(node = %link.key(), "dialling node");
                    links.push(link);
                }
                Err(e) => tracing::warn!(url = %url.url, %addr, error = %e, "cannot dial node"),
            }
        }
        if links.len() != before {
            self.changed.notify_waiters();
        }
    }

    fn link(&self, url: NodeUrl, addr: SocketAddr) -> anyhow::Result<Arc<NodeLink>> {
        let client = dial(&self.cfg, &url, addr)?;
        let (tx, rx) = watch::channel(None);
        let link = Arc::new(NodeLink {
            url,
            addr,
            client: Mutex::new(client),
            load: rx,
            last_report: Mutex::new(None),
            last_error: Mutex::new(String::new()),
            known_id: Mutex::new(None),
            inflight: AtomicU32::new(0),
            gone: self.shutdown.child_token(),
        });
        tokio::spawn(watch_load(
            link.clone(),
            tx,
            self.changed.clone(),
            self.cfg.clone(),
        ));
        Ok(link)
    }

    /// Links to place on: one per node. Two addresses of one node (a name
    /// resolving to both 127.0.0.1 and ::1, say) report the same node id and
    /// count once.
    fn distinct_links(&self) -> Vec<Arc<NodeLink>> {
        let mut seen = std::collections::HashSet::new();
        lock(&self.links)
            .iter()
            // Placement runs this per session: borrow the report, don't copy it.
            .filter(|l| match l.load.borrow().as_ref() {
                Some(r) => seen.insert(r.node_id.clone()),
                None => true,
            })
            .cloned()
            .collect()
    }

    /// Free slots across live nodes, as this dispatcher sees them.
    pub fn free_slots(&self) -> u32 {
        self.distinct_links()
            .iter()
            .map(|l| l.snapshot(""))
            .filter(|s| s.up && !s.draining)
            .map(|s| s.capacity.saturating_sub(s.used()))
            .sum()
    }

    /// Places a session for `image`, skipping `exclude`d link keys (nodes that
    /// already refused it). The slot is held until the returned value drops.
    pub fn place(self: &Arc<Self>, image: &str, exclude: &[String]) -> Option<Placed> {
        let candidates: Vec<Arc<NodeLink>> = self
            .distinct_links()
            .into_iter()
            .filter(|l| !exclude.contains(&l.key()))
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

    /// Finds a link by node id, key, URL or address.
    pub fn find(&self, name: &str) -> Vec<Arc<NodeLink>> {
        lock(&self.links)
            .iter()
            .filter(|l| {
                l.name() == name
                    || l.key() == name
                    || l.url.url == name
                    || l.url.host == name
                    || l.addr.to_string() == name
            })
            .cloned()
            .collect()
    }

    /// Waits until at least one node has reported its load, or `timeout`.
    pub async fn wait_ready(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.changed.notified();
            if self.links().iter().any(|l| l.report().is_some()) {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return false;
            }
        }
    }
}

/// A lazily connecting client for one node address: TLS verifies the name
/// in the URL, the connection goes to `addr`.
fn dial(
    cfg: &FleetConfig,
    url: &NodeUrl,
    addr: SocketAddr,
) -> anyhow::Result<AgentServerClient<Channel>> {
    let scheme = if url.tls { "https" } else { "http" };
    let mut endpoint = Endpoint::from_shared(format!("{scheme}://{addr}"))?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(20))
        .keep_alive_while_idle(true);
    if url.tls {
        let tls = cfg.tls.as_ref().ok_or_else(|| {
            anyhow::anyhow!("{} is https but no TLS material is configured", url.url)
        })?;
        endpoint = endpoint.tls_config(tls.client(&url.host))?;
    }
    Ok(AgentServerClient::new(endpoint.connect_lazy())
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES))
}

/// Follows one node's load stream under a lease, redialling with backoff.
async fn watch_load(
    link: Arc<NodeLink>,
    tx: watch::Sender<Option<LoadReport>>,
    changed: Arc<Notify>,
    cfg: FleetConfig,
) {
    let lease = cfg.lease;
    let node = link.key();
    let mut backoff = Duration::from_millis(100);
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
                        backoff = Duration::from_millis(100);
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
            () = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// A status in words, with the transport cause (a TLS error names the
/// certificate problem) when there is one.
fn describe(status: &tonic::Status) -> String {
    use std::error::Error as _;
    let mut msg = status.message().to_string();
    let mut source = status.source();
    while let Some(s) = source {
        let s_msg = s.to_string();
        // Transport errors repeat their cause in their own text.
        if !msg.contains(&s_msg) {
            msg.push_str(": ");
            msg.push_str(&s_msg);
        }
        source = s.source();
    }
    msg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_urls_parse_with_their_dial_name_and_port() {
        let u = NodeUrl::parse("https://node-a.berth.svc:7443").expect("parse");
        assert_eq!(
            (u.tls, u.host.as_str(), u.port),
            (true, "node-a.berth.svc", 7443)
        );
        let u = NodeUrl::parse("https://node-b/").expect("parse");
        assert_eq!((u.host.as_str(), u.port), ("node-b", 443));
        let u = NodeUrl::parse("http://[::1]:7443").expect("parse");
        assert_eq!((u.tls, u.host.as_str()), (false, "::1"));
        for bad in [
            "node-a:7443",
            "ftp://node-a",
            "https://node-a:7443/path",
            "https://:x",
        ] {
            let e = NodeUrl::parse(bad).expect_err(bad).to_string();
            assert!(e.contains("AGENT_SERVERS"), "{bad}: {e}");
        }
    }
}
