//! The berth under test: a cluster started in process (dispatcher, real
//! agent-server nodes on the local Docker daemon, or simulated nodes; a fresh
//! Postgres database; an S3 server on loopback), or a running one (`--target`).

use std::path::PathBuf;
use std::time::Duration;

use berth_common::tls::{DevCa, TlsMaterial};
use berth_tests::TestCluster;
use tokio_util::sync::CancellationToken;

use crate::driver::Conns;
use crate::simnode::SimNode;

/// How to reach berth, shared by every scenario.
#[derive(Debug, Clone, clap::Args)]
pub struct ClusterArgs {
    /// Drive a running dispatcher at this URL (`http://host:7000`, or
    /// `https://…` with --tls-*) instead of starting a cluster in process.
    /// Only `warm`, `burst` and `relay` can (the others need the cluster's
    /// internals: simulated nodes, its database, its process).
    #[arg(long, env = "BERTH_LOADTEST_TARGET")]
    pub target: Option<String>,
    /// With --target: the CA that signed the dispatcher's certificate (PEM).
    #[arg(long, requires_all = ["tls_cert", "tls_key"])]
    pub tls_ca: Option<PathBuf>,
    /// With --target: the client certificate to present (`berth certs init --client NAME`).
    #[arg(long, requires = "tls_ca")]
    pub tls_cert: Option<PathBuf>,
    /// With --target: the client certificate's key.
    #[arg(long, requires = "tls_ca")]
    pub tls_key: Option<PathBuf>,
    /// In process: serve the public API over mTLS (`--api-tls`) and connect
    /// with a client certificate. Default: plaintext, as the dispatcher's default.
    #[arg(long)]
    pub mtls: bool,
    /// HTTP/2 connections the driver spreads its calls over.
    #[arg(long, default_value_t = 4)]
    pub connections: usize,
    /// Container image for real nodes (it must hold the fake `claude`; see
    /// deploy/test-image/build.sh).
    #[arg(long, default_value = berth_tests::TEST_IMAGE)]
    pub image: String,
}

impl ClusterArgs {
    fn target_tls(&self) -> anyhow::Result<Option<TlsMaterial>> {
        let read = |p: &Option<PathBuf>, flag: &str| -> anyhow::Result<String> {
            let p = p
                .as_ref()
                .ok_or_else(|| anyhow::anyhow!("{flag} is required"))?;
            std::fs::read_to_string(p)
                .map_err(|e| anyhow::anyhow!("{flag}: cannot read {}: {e}", p.display()))
        };
        match &self.tls_ca {
            None => Ok(None),
            Some(_) => Ok(Some(TlsMaterial {
                ca_pem: read(&self.tls_ca, "--tls-ca")?,
                cert_pem: read(&self.tls_cert, "--tls-cert")?,
                key_pem: read(&self.tls_key, "--tls-key")?,
            })),
        }
    }

    /// Refuses `--target` for a scenario that needs an in-process cluster.
    pub fn in_process_only(&self, scenario: &str, why: &str) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.target.is_none(),
            "{scenario} cannot run against --target: {why}"
        );
        Ok(())
    }
}

/// Keeps `n` pre-started processes per agent (min = max = n), or turns
/// agent pools off (0).
fn agent_pools(cfg: &mut berth_agent_server::Config, n: u32) {
    cfg.warm_agents = n;
    cfg.warm_agent_min = n;
    cfg.warm_agent_max = n;
    // As fast as the machine allows: the benchmark waits for full pools.
    cfg.warm_agent_refill_per_sec = 20.0;
}

/// The node's default most pre-started processes per agent.
fn cfg_defaults_max() -> u32 {
    berth_agent_server::Config::defaults().warm_agent_max
}

/// Real agent-server nodes, each with a warm pool.
#[derive(Debug, Clone)]
pub struct RealNodes {
    pub nodes: usize,
    pub capacity: u32,
    /// Warm containers kept per node (0: no pool).
    pub pool: u32,
    /// Pre-started agent processes kept per node and agent (0: agent pools
    /// off). Agent pools fill once an agent's first session was seen.
    pub agents: u32,
}

/// A cluster under test and connections to its dispatcher.
pub struct Cluster {
    pub conns: Conns,
    /// The in-process cluster (None with --target).
    pub local: Option<TestCluster>,
    /// Simulated nodes, when the cluster has them.
    pub sims: Vec<SimNode>,
    /// The CA of an in-process cluster.
    pub ca: Option<DevCa>,
    sims_stop: CancellationToken,
}

impl Cluster {
    /// A cluster of real nodes on the local Docker daemon, or the target.
    pub async fn real(args: &ClusterArgs, nodes: &RealNodes) -> anyhow::Result<Self> {
        if let Some(url) = &args.target {
            let tls = args.target_tls()?;
            eprintln!(
                "target: {url} ({})",
                if tls.is_some() { "mTLS" } else { "plaintext" }
            );
            let token = std::env::var("BERTH_TOKEN").ok();
            let conns = Conns::open(url, tls.as_ref(), token.as_deref(), args.connections).await?;
            return Ok(Self {
                conns,
                local: None,
                sims: Vec::new(),
                ca: None,
                sims_stop: CancellationToken::new(),
            });
        }
        let agents = nodes.agents;
        let mut b = TestCluster::builder()
            .direct()
            .metrics()
            .nodes(nodes.nodes)
            .capacity(nodes.capacity)
            .lease(Duration::from_secs(5))
            .configure_node(move |_, cfg, _| {
                // Production's defaults, not the test suite's quick ones.
                cfg.load_heartbeat = Duration::from_secs(1);
                agent_pools(cfg, agents);
            });
        if nodes.pool > 0 {
            b = b.warm_pool(&format!("{}={}", args.image, nodes.pool));
        }
        Self::local(args, b, Vec::new(), CancellationToken::new(), None).await
    }

    /// One real node for the real Claude Code image: each container's main
    /// process is the Messages stand-in on its own loopback, and containers
    /// have no network but that (`--container-network none`). `agents`:
    /// pre-started processes kept per agent (`Some(0)`: none), or `None`
    /// for the node's production defaults (an adaptive pool).
    pub async fn real_claude(
        args: &ClusterArgs,
        image: &str,
        pool: u32,
        agents: Option<u32>,
    ) -> anyhow::Result<Self> {
        args.in_process_only("claude", "it configures the node's containers")?;
        let mut b = TestCluster::builder()
            .direct()
            .metrics()
            .nodes(1)
            .capacity(pool.max(agents.unwrap_or(cfg_defaults_max())).max(2) * 2)
            .lease(Duration::from_secs(5))
            .configure_node(move |_, cfg, _| {
                cfg.load_heartbeat = Duration::from_secs(1);
                if let Some(agents) = agents {
                    agent_pools(cfg, agents);
                }
                cfg.keepalive_cmd = ["fake-anthropic", "--listen", "127.0.0.1:8787"]
                    .map(String::from)
                    .to_vec();
                cfg.container_network = "none".into();
            });
        if pool > 0 {
            b = b.warm_pool(&format!("{image}={pool}"));
        }
        Self::local(args, b, Vec::new(), CancellationToken::new(), None).await
    }

    /// A dispatcher in process with `n` simulated nodes of `capacity` slots,
    /// reporting load every `heartbeat` (and on every change).
    pub async fn simulated(
        args: &ClusterArgs,
        n: usize,
        capacity: u32,
        heartbeat: Duration,
    ) -> anyhow::Result<Self> {
        let ca = DevCa::generate("berth loadtest CA")?;
        let stop = CancellationToken::new();
        let mut sims = Vec::with_capacity(n);
        for i in 0..n {
            sims.push(SimNode::start(i, capacity, heartbeat, &ca, stop.clone()).await?);
        }
        let urls: Vec<(String, std::net::SocketAddr)> =
            sims.iter().map(|s| (s.url.clone(), s.addr)).collect();
        let b = TestCluster::builder()
            .nodes(0)
            .metrics()
            .ca(&ca)
            .lease(Duration::from_secs(5))
            .configure_dispatcher(move |cfg| {
                cfg.db_max_connections = 16;
                for (url, addr) in &urls {
                    cfg.agent_servers.push(url.clone());
                    let host = url.trim_start_matches("https://");
                    cfg.node_resolve.push((host.to_string(), *addr));
                }
            });
        let c = Self::local(args, b, sims, stop, Some(ca)).await?;
        // Wait until every node's load stream is live, so placement sees them all.
        let want = c.sims.len();
        for _ in 0..100 {
            let nodes = c.local.as_ref().map(|l| l.nodes_client());
            if let Some(mut nc) = nodes {
                let up = nc
                    .list_nodes(berth_proto::v1::ListNodesRequest {})
                    .await
                    .map(|r| {
                        r.into_inner()
                            .nodes
                            .iter()
                            .filter(|n| n.state == berth_proto::v1::NodeState::Up as i32)
                            .count()
                    })
                    .unwrap_or(0);
                if up == want {
                    return Ok(c);
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        anyhow::bail!("the simulated nodes did not all come up within 10 s")
    }

    async fn local(
        args: &ClusterArgs,
        mut b: berth_tests::Builder,
        sims: Vec<SimNode>,
        sims_stop: CancellationToken,
        ca: Option<DevCa>,
    ) -> anyhow::Result<Self> {
        if args.mtls {
            b = b.api_tls();
        }
        let local = b.start().await?;
        let conns = Conns::open(
            &local.dispatcher_url,
            local.client_tls.as_ref(),
            Some(&local.token),
            args.connections,
        )
        .await?;
        Ok(Self {
            conns,
            local: Some(local),
            sims,
            ca,
            sims_stop,
        })
    }

    /// Mean seconds of each histogram whose name starts with one of
    /// `families`, by series, from the in-process dispatcher's `/metrics`
    /// (the recorder is process-wide: node metrics are there too).
    pub async fn stage_means(&self, families: &[&str]) -> Vec<(String, f64, f64)> {
        self.histogram_totals(families)
            .await
            .into_iter()
            .filter(|(_, (_, n))| *n > 0.0)
            .map(|(k, (sum, n))| (k, sum / n, n))
            .collect()
    }

    /// Sum and count of each histogram series whose name starts with one of
    /// `families`, from the in-process dispatcher's `/metrics`.
    pub async fn histogram_totals(
        &self,
        families: &[&str],
    ) -> std::collections::BTreeMap<String, (f64, f64)> {
        let Some(addr) = self.local.as_ref().and_then(|l| l.dispatcher_metrics) else {
            return Default::default();
        };
        let Ok((200, text)) = berth_tests::http_get(addr, "/metrics").await else {
            return Default::default();
        };
        crate::prometheus::histogram_totals(&text, families)
    }

    /// The in-process cluster's database URL.
    pub fn database_url(&self) -> Option<&str> {
        self.local.as_ref().map(|l| l.database_url.as_str())
    }

    /// Stops everything started in process and drops its database.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        if let Some(l) = self.local {
            l.shutdown().await?;
        }
        self.sims_stop.cancel();
        for s in &self.sims {
            s.stopped().await;
        }
        Ok(())
    }
}
