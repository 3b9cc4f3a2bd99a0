//! [`Builder`]: how a test configures and starts a [`TestCluster`].

use super::*;

/// Adjusts one node's configuration before it starts: its index, its
/// config, and the cluster's CA (to issue it other certificates).
pub type NodeHook =
    std::sync::Arc<dyn Fn(usize, &mut berth_agent_server::Config, &DevCa) + Send + Sync>;

/// Configures a [`TestCluster`].
#[derive(Clone)]
pub struct Builder {
    pub(crate) nodes: usize,
    pub(crate) capacity: u32,
    pub(crate) warm_pools: Vec<String>,
    pub(crate) lease: Duration,
    pub(crate) node_hook: Option<NodeHook>,
    pub(crate) dispatcher_hook: Option<DispatcherHook>,
    pub(crate) metrics: bool,
    /// The CA to sign the cluster's certificates with (PEM cert, PEM key).
    pub(crate) ca: Option<(String, String)>,
    pub(crate) api_tls: bool,
    pub(crate) direct: bool,
    /// A database the test owns (on its own server), instead of a fresh one
    /// on the shared server.
    pub(crate) database_url: Option<String>,
}

type DispatcherHook = std::sync::Arc<dyn Fn(&mut berth_dispatcher::Config) + Send + Sync>;

impl Builder {
    /// Uses `url` (a database the test owns, e.g. on a
    /// [`pg::PrivatePostgres`]) instead of a fresh one on the shared server.
    pub fn database(mut self, url: String) -> Self {
        self.database_url = Some(url);
        self
    }

    /// Serve `/metrics`, `/healthz` and `/readyz` on every part of the
    /// cluster (the recorder is process-wide: each endpoint shows all).
    pub fn metrics(mut self) -> Self {
        self.metrics = true;
        self
    }

    /// Signs the cluster's certificates with `ca` instead of a fresh CA, so
    /// the caller can issue certificates (for its own nodes or clients) first.
    pub fn ca(mut self, ca: &DevCa) -> Self {
        self.ca = Some((ca.cert_pem.clone(), ca.key_pem()));
        self
    }

    /// Serves the dispatcher's public API over mTLS (`--api-tls`); the
    /// cluster's own client then presents a client certificate.
    pub fn api_tls(mut self) -> Self {
        self.api_tls = true;
        self
    }

    /// The dispatcher dials nodes directly, not through their [`Proxy`]
    /// (benchmarks: no extra hop; `Proxy::set_paused` then has no effect).
    pub fn direct(mut self) -> Self {
        self.direct = true;
        self
    }

    /// Number of agent-server nodes.
    pub fn nodes(mut self, n: usize) -> Self {
        self.nodes = n;
        self
    }

    /// Session slots per node.
    pub fn capacity(mut self, c: u32) -> Self {
        self.capacity = c;
        self
    }

    /// A warm pool on every node, `IMAGE=MIN[:MAX]`.
    pub fn warm_pool(mut self, spec: &str) -> Self {
        self.warm_pools.push(spec.to_string());
        self
    }

    /// The dispatcher's node lease (default 2 s; nodes report every 200 ms).
    /// Runs' gateway leases last 3/5 of it: under a loaded CI machine a
    /// shorter one freezes runs between reconcile passes.
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self
    }

    /// Adjusts the dispatcher's configuration before it starts.
    pub fn configure_dispatcher(
        mut self,
        hook: impl Fn(&mut berth_dispatcher::Config) + Send + Sync + 'static,
    ) -> Self {
        self.dispatcher_hook = Some(std::sync::Arc::new(hook));
        self
    }

    /// Adjusts each node's configuration before it starts.
    pub fn configure_node(
        mut self,
        hook: impl Fn(usize, &mut berth_agent_server::Config, &DevCa) + Send + Sync + 'static,
    ) -> Self {
        self.node_hook = Some(std::sync::Arc::new(hook));
        self
    }

    /// Starts node `i` in process, behind a [`Proxy`]: the node, and how
    /// the dispatcher resolves its name.
    async fn start_node(
        &self,
        i: usize,
        tag: &str,
        ca: &DevCa,
        s3: &s3::S3Server,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<(TestNode, (String, SocketAddr))> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let node_addr = listener.local_addr()?;
        let proxy = Proxy::start(node_addr).await?;
        let name = format!("node-{i}");
        let url = format!("https://{name}:{}", proxy.addr.port());
        let target = if self.direct { node_addr } else { proxy.addr };
        let route = (format!("{name}:{}", proxy.addr.port()), target);
        let mut cfg = berth_agent_server::Config::defaults();
        cfg.metrics_listen = Listen(None);
        if self.metrics {
            cfg.metrics_listen = Listen(Some(free_addr()?));
        }
        cfg.node_id = format!("test-{tag}-{i}");
        cfg.capacity = self.capacity;
        cfg.stop_grace = Duration::from_secs(2);
        // Long enough for a lost dispatcher's sessions to be claimed
        // and re-attached (the test lease is 2 s), short enough that a
        // run nobody re-attaches to ends within a test.
        cfg.reattach_grace = Duration::from_secs(10);
        cfg.load_heartbeat = Duration::from_millis(200);
        cfg.memory_mib = 256;
        cfg.cpus = 1.0;
        cfg.warm_check_interval = Duration::from_secs(1);
        cfg.objects = s3.args();
        gateway_for_tests(&mut cfg);
        cfg.warm_pools = self
            .warm_pools
            .iter()
            .map(|p| p.parse().map_err(|e: String| anyhow::anyhow!(e)))
            .collect::<anyhow::Result<_>>()?;
        cfg.tls.material =
            Some(ca.material(&ca.issue(CertKind::Node, std::slice::from_ref(&name))?));
        if let Some(hook) = &self.node_hook {
            hook(i, &mut cfg, ca);
        }
        let stop = shutdown.child_token();
        let drain = CancellationToken::new();
        let task = tokio::spawn(berth_agent_server::run_with_drain(
            cfg.clone(),
            listener,
            drain.clone(),
            stop.clone(),
        ));
        let node = TestNode {
            id: cfg.node_id.clone(),
            url,
            addr: node_addr,
            metrics: cfg.metrics_listen.0,
            proxy,
            stop,
            drain,
            task: Some(task),
        };
        Ok((node, route))
    }

    /// Starts the cluster and waits until its dispatcher answers. Every node
    /// link is mTLS with a CA made for this cluster; node `i` is dialled as
    /// `https://node-i:PORT` (resolved to a [`Proxy`] in front of it).
    pub async fn start(self) -> anyhow::Result<TestCluster> {
        init_logging();
        let tag = uuid::Uuid::new_v4().simple().to_string()[..10].to_string();
        let (database, database_url) = match &self.database_url {
            Some(url) => (String::new(), url.clone()),
            None => create_database(&tag).await?,
        };
        let ca = match &self.ca {
            Some((cert, key)) => DevCa::load(cert, key)?,
            None => DevCa::generate("berth test CA")?,
        };
        let s3 = s3::S3Server::start().await?;
        let shutdown = CancellationToken::new();
        let mut tasks = Vec::new();
        let mut nodes = Vec::new();
        let mut resolve = Vec::new();
        for i in 0..self.nodes {
            let (node, route) = self.start_node(i, &tag, &ca, &s3, &shutdown).await?;
            resolve.push(route);
            nodes.push(node);
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let scheme = if self.api_tls { "https" } else { "http" };
        let dispatcher_url = format!("{scheme}://{}", listener.local_addr()?);
        let client_tls = match self.api_tls {
            true => Some(ca.material(&ca.issue(CertKind::Client, &[format!("client-{tag}")])?)),
            false => None,
        };
        let mut cfg = berth_dispatcher::Config::defaults();
        cfg.api_tls = self.api_tls;
        cfg.metrics_listen = Listen(None);
        if self.metrics {
            cfg.metrics_listen = Listen(Some(free_addr()?));
        }
        cfg.database_url = database_url.clone();
        cfg.agent_servers = nodes.iter().map(|n| n.url.clone()).collect();
        cfg.node_resolve = resolve;
        cfg.node_lease = self.lease;
        cfg.dispatcher_lease = Duration::from_secs(2);
        cfg.tls.material =
            Some(ca.material(&ca.issue(CertKind::Dispatcher, &[DISPATCHER_NAME.to_string()])?));
        cfg.queue_poll = Duration::from_millis(250);
        cfg.db_max_connections = 8;
        // Tests and benchmarks drive one key hard; the limits test sets its own.
        cfg.api_rate_limit = 0;
        // A webhook port of its own only where a test asks for one.
        cfg.webhook_listen = Listen(None);
        cfg.dispatcher_id = format!("test-dispatcher-{tag}");
        cfg.objects = s3.args();
        // One key file for every dispatcher of the cluster; the first key
        // comes from the bootstrap, as on a fresh deployment.
        cfg.sealer = Some(std::sync::Arc::new(
            berth_dispatcher::seal::Sealer::ephemeral(),
        ));
        let token_file = std::env::temp_dir().join(format!("berth-admin-{tag}.token"));
        let _ = std::fs::remove_file(&token_file);
        cfg.bootstrap_token_file = Some(token_file.clone());
        if let Some(hook) = &self.dispatcher_hook {
            hook(&mut cfg);
        }
        let dispatcher_stop = shutdown.child_token();
        let dispatcher_metrics = cfg.metrics_listen.0;
        let dispatcher_cfg = cfg.clone();
        tasks.push(tokio::spawn(berth_dispatcher::run(
            cfg,
            listener,
            dispatcher_stop.clone(),
        )));

        let mut endpoint = tonic::transport::Endpoint::from_shared(dispatcher_url.clone())?;
        if let Some(tls) = &client_tls {
            endpoint = endpoint.tls_config(tls.client(DISPATCHER_NAME))?;
        }
        let token = read_token(&token_file, &mut tasks).await?;
        let _ = std::fs::remove_file(&token_file);
        let channel = berth_cli::auth::api(
            endpoint.connect_lazy(),
            Bearer::new(Some(&token)).map_err(anyhow::Error::msg)?,
        );
        let client = SessionsClient::new(channel.clone())
            .max_decoding_message_size(berth_common::grpc::MAX_MESSAGE_BYTES);
        let mut cluster = TestCluster {
            client,
            nodes_client: NodesClient::new(channel.clone()),
            api: channel,
            token,
            dispatcher_url,
            client_tls,
            nodes,
            ca,
            database,
            database_url,
            s3,
            shutdown,
            dispatcher_stop,
            dispatcher_metrics,
            dispatcher_cfg,
            tasks,
            added_stops: Vec::new(),
            added_urls: Vec::new(),
            killed: Vec::new(),
        };
        answering(cluster.client(), &mut cluster.tasks).await?;
        Ok(cluster)
    }
}

/// Waits for a starting dispatcher's bootstrap token file.
pub(crate) async fn read_token(
    path: &std::path::Path,
    tasks: &mut [tokio::task::JoinHandle<anyhow::Result<()>>],
) -> anyhow::Result<String> {
    for _ in 0..600 {
        if let Ok(t) = std::fs::read_to_string(path)
            && !t.trim().is_empty()
        {
            return Ok(t.trim().to_string());
        }
        if let Some(t) = tasks.iter_mut().find(|t| t.is_finished()) {
            t.await??;
            anyhow::bail!("the dispatcher ended before writing its bootstrap token");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    anyhow::bail!("no bootstrap token in {} after 30 s", path.display())
}
