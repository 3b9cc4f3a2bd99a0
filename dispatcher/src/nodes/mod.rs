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

mod link;
mod url;
pub(crate) mod wire;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use berth_common::sync::lock;
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use link::{NodeLink, NodeState};
pub use url::{FleetConfig, NodeUrl};

use crate::placement::{self, NodeSnapshot};

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

/// What the live nodes can give one session (see [`Nodes::limits`]).
#[derive(Debug, Clone, PartialEq)]
pub struct FleetLimits {
    /// 0 when no node said.
    pub memory_bytes: u64,
    /// 0 when no node said.
    pub cpus: u32,
    /// Empty when no node said.
    pub volumes: Vec<String>,
}

/// Every node this dispatcher places on.
pub struct Nodes {
    cfg: FleetConfig,
    links: Mutex<Vec<Arc<NodeLink>>>,
    /// Notified when capacity may have changed.
    pub changed: Arc<Notify>,
    shutdown: CancellationToken,
    /// The re-resolve loop and each link's load watcher (shutdown awaits
    /// them).
    tasks: TaskTracker,
}

impl Nodes {
    /// Resolves every URL, dials each address lazily and follows its load;
    /// re-resolves in the background.
    pub async fn start(
        cfg: FleetConfig,
        shutdown: CancellationToken,
        tasks: TaskTracker,
    ) -> anyhow::Result<Arc<Self>> {
        anyhow::ensure!(
            !cfg.urls.is_empty(),
            "no agent-server nodes: set AGENT_SERVERS"
        );
        let nodes = Arc::new(Self {
            cfg,
            links: Mutex::new(Vec::new()),
            changed: Arc::new(Notify::new()),
            shutdown,
            tasks,
        });
        nodes.resolve_once().await;
        nodes.tasks.spawn(nodes.clone().resolve_loop());
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
        let client = link::dial(&self.cfg, &url, addr)?;
        let (tx, rx) = watch::channel(None);
        let link = Arc::new(NodeLink {
            url,
            addr,
            client: Mutex::new(client),
            load: rx,
            last_report: Mutex::new(None),
            last_error: Mutex::new(String::new()),
            known_id: Mutex::new(None),
            inflight: std::sync::atomic::AtomicU32::new(0),
            gone: self.shutdown.child_token(),
        });
        self.tasks.spawn(link::watch_load(
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

    /// The most a session may ask of the fleet's live nodes: the largest
    /// node's memory and CPUs, and the writable volumes every node has.
    /// `None` while no node has reported.
    pub fn limits(&self) -> Option<FleetLimits> {
        let reports: Vec<_> = self
            .distinct_links()
            .iter()
            .filter_map(|l| l.report())
            .collect();
        let first = reports.first()?;
        let mut volumes = first.volumes.clone();
        for r in &reports[1..] {
            volumes.retain(|v| r.volumes.contains(v));
        }
        Some(FleetLimits {
            memory_bytes: reports
                .iter()
                .map(|r| r.memory_total_bytes)
                .max()
                .unwrap_or(0),
            cpus: reports.iter().map(|r| r.cpus).max().unwrap_or(0),
            volumes,
        })
    }

    /// Free slots across live nodes, as this dispatcher sees them.
    pub fn free_slots(&self) -> u32 {
        self.distinct_links()
            .iter()
            .map(|l| l.snapshot("", None))
            .filter(|s| s.up && !s.draining)
            .map(|s| s.capacity.saturating_sub(s.used()))
            .sum()
    }

    /// The ids of the nodes that are up (draining ones too: their runs go
    /// on), as sessions record them.
    pub fn up_names(&self) -> Vec<String> {
        let mut names: Vec<String> = lock(&self.links)
            .iter()
            .filter(|l| l.report().is_some())
            .map(|l| l.name())
            .collect();
        names.sort();
        names.dedup();
        names
    }

    /// Places a session for `image`, skipping `exclude`d link keys (nodes that
    /// already refused it). The slot is held until the returned value drops.
    pub fn place(
        self: &Arc<Self>,
        image: &str,
        agent_key: Option<&str>,
        exclude: &[String],
    ) -> Option<Placed> {
        let candidates: Vec<Arc<NodeLink>> = self
            .distinct_links()
            .into_iter()
            .filter(|l| !exclude.contains(&l.key()))
            .collect();
        let snapshots: Vec<NodeSnapshot> = candidates
            .iter()
            .map(|l| l.snapshot(image, agent_key))
            .collect();
        let i = placement::choose(&snapshots, |n| fastrand::usize(..n))?;
        let link = candidates[i].clone();
        link.inflight.fetch_add(1, Ordering::SeqCst);
        Some(Placed {
            link,
            nodes: self.clone(),
        })
    }

    /// Holds `link` as [`Self::place`] would (a run re-attached there).
    pub fn hold(self: &Arc<Self>, link: Arc<NodeLink>) -> Placed {
        link.inflight.fetch_add(1, Ordering::SeqCst);
        Placed {
            link,
            nodes: self.clone(),
        }
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
}
