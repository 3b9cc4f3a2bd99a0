//! berth's test harness: start a real cluster (dispatcher + nodes) in process,
//! against the real Docker daemon and a fresh Postgres database.
//!
//! ```no_run
//! # async fn f() -> anyhow::Result<()> {
//! let cluster = berth_tests::TestCluster::builder().nodes(1).start().await?;
//! let mut client = cluster.client();
//! # Ok(()) }
//! ```

pub mod git_http;
pub mod git_ssh;
pub mod pg;
pub mod s3;

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use berth_common::metrics::Listen;
use berth_common::tls::{CertKind, DISPATCHER_NAME, DevCa};
use berth_proto::v1::{self as pb, nodes_client::NodesClient, sessions_client::SessionsClient};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

pub use berth_cli::auth::{Api, Bearer};

/// The image `deploy/test-image/build.sh` builds.
pub const TEST_IMAGE: &str = "berth-test-agent:latest";
/// The recorded transcript, as the test image holds it.
pub const FIXTURE_IN_IMAGE: &str = "/fixtures/claude-code/explore_count_files.jsonl";

/// Where the public Claude Code captures are read in place: `BERTH_SHARED_FIXTURES`,
/// else `../shared/fixtures/claude-code` beside this checkout. The project
/// keeps no copy of them (see `SOURCES.md` there).
pub fn shared_fixtures() -> std::path::PathBuf {
    match std::env::var_os("BERTH_SHARED_FIXTURES") {
        Some(dir) => dir.into(),
        None => std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../shared/fixtures/claude-code"),
    }
}

/// A public capture by its path under [`shared_fixtures`].
pub fn fixture(name: &str) -> anyhow::Result<String> {
    let path = shared_fixtures().join(name);
    std::fs::read_to_string(&path).with_context(|| {
        format!(
            "cannot read the Claude Code capture {}: the public captures live in ../shared/fixtures/claude-code (or set BERTH_SHARED_FIXTURES)",
            path.display()
        )
    })
}

/// Postgres server for tests; each cluster creates its own database on it.
fn admin_url() -> String {
    std::env::var("BERTH_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://berth:berth@127.0.0.1:5432/postgres".into())
}

/// Adjusts one node's configuration before it starts: its index, its
/// config, and the cluster's CA (to issue it other certificates).
pub type NodeHook =
    std::sync::Arc<dyn Fn(usize, &mut berth_agent_server::Config, &DevCa) + Send + Sync>;

/// Configures a [`TestCluster`].
#[derive(Clone)]
pub struct Builder {
    nodes: usize,
    capacity: u32,
    warm_pools: Vec<String>,
    lease: Duration,
    node_hook: Option<NodeHook>,
    dispatcher_hook: Option<DispatcherHook>,
    metrics: bool,
    /// The CA to sign the cluster's certificates with (PEM cert, PEM key).
    ca: Option<(String, String)>,
    api_tls: bool,
    direct: bool,
    /// A database the test owns (on its own server), instead of a fresh one
    /// on the shared server.
    database_url: Option<String>,
}

/// A free loopback port (bound, then released) for a service that binds it itself.
pub fn free_addr() -> anyhow::Result<SocketAddr> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?)
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
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            let node_addr = listener.local_addr()?;
            let proxy = Proxy::start(node_addr).await?;
            let name = format!("node-{i}");
            let url = format!("https://{name}:{}", proxy.addr.port());
            let target = if self.direct { node_addr } else { proxy.addr };
            resolve.push((format!("{name}:{}", proxy.addr.port()), target));
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
                hook(i, &mut cfg, &ca);
            }
            let stop = shutdown.child_token();
            let drain = CancellationToken::new();
            let task = tokio::spawn(berth_agent_server::run_with_drain(
                cfg.clone(),
                listener,
                drain.clone(),
                stop.clone(),
            ));
            nodes.push(TestNode {
                id: cfg.node_id.clone(),
                url,
                addr: node_addr,
                metrics: cfg.metrics_listen.0,
                proxy,
                stop,
                drain,
                task: Some(task),
            });
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
        let cluster = TestCluster {
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
            killed: Vec::new(),
        };
        answering(cluster.client(), &cluster.tasks).await?;
        Ok(cluster)
    }
}

/// Creates a fresh database `berth_test_{tag}` on the test Postgres server
/// (`BERTH_TEST_DATABASE_URL`); returns its name and URL.
pub async fn create_database(tag: &str) -> anyhow::Result<(String, String)> {
    let database = format!("berth_test_{tag}");
    let admin = admin_url();
    let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&admin)
        .await
        .with_context(|| format!("needs Postgres at {admin} (run scripts/setup.sh)"))?;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {database}")))
        .execute(&mut conn)
        .await?;
    let url = match admin.rsplit_once('/') {
        Some((base, _)) => format!("{base}/{database}"),
        None => anyhow::bail!("BERTH_TEST_DATABASE_URL must end in /DBNAME"),
    };
    Ok((database, url))
}

/// A plain HTTP/1.0 GET on loopback (a `/metrics` scrape): (status, body).
pub async fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: berth\r\n\r\n").as_bytes())
        .await?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).await?;
    let (head, body) = buf.split_once("\r\n\r\n").unwrap_or((&buf, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    Ok((status, body.to_string()))
}

/// Drops a database made by [`create_database`].
pub async fn drop_database(database: &str) -> anyhow::Result<()> {
    let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&admin_url()).await?;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS {database} WITH (FORCE)"
    )))
    .execute(&mut conn)
    .await?;
    Ok(())
}

/// Waits until the dispatcher behind `client` answers, failing early if a
/// cluster task exits.
/// Every line berth's crates log in this process at debug level and above,
/// for tests that check what never reaches a log; the newest 64 MiB.
static CAPTURED: std::sync::Mutex<Vec<u8>> = std::sync::Mutex::new(Vec::new());
const CAPTURE_BYTES: usize = 64 * 1024 * 1024;

#[derive(Clone, Copy)]
struct Capture;

impl std::io::Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut c = CAPTURED
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if c.len() + buf.len() > CAPTURE_BYTES {
            let cut = (c.len() + buf.len() - CAPTURE_BYTES).min(c.len());
            c.drain(..cut);
        }
        c.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Capture {
    type Writer = Capture;
    fn make_writer(&'a self) -> Self::Writer {
        *self
    }
}

/// What berth logged in this process so far (see [`CAPTURED`]).
pub fn captured_logs() -> String {
    let c = CAPTURED
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    String::from_utf8_lossy(&c).into_owned()
}

/// Logs to the test's output (`RUST_LOG`, default `warn`) and, at debug
/// level for berth's crates, to the in-memory capture.
fn init_logging() {
    use tracing_subscriber::Layer;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let shown =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into());
    let captured = tracing_subscriber::EnvFilter::new(
        "berth_dispatcher=debug,berth_agent_server=debug,berth_common=debug,berth_server=debug",
    );
    let _ = tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_test_writer()
                .with_filter(shown),
        )
        .with(
            tracing_subscriber::fmt::layer()
                .with_ansi(false)
                .with_writer(Capture)
                .with_filter(captured),
        )
        .try_init();
}

/// The `berth-forward` binary `scripts/setup.sh` builds beside the tests.
pub fn forwarder() -> std::path::PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    exe.ancestors()
        .map(|d| d.join("berth-forward"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| "target/debug/berth-forward".into())
}

/// A test node's egress gateway: the built forwarder, a directory of its
/// own, and a model API on a loopback port nothing listens on (a test that
/// wants one sets its own), so no test traffic can leave the machine.
pub fn gateway_for_tests(cfg: &mut berth_agent_server::Config) {
    cfg.gateway_forwarder = Some(forwarder());
    cfg.gateway_dir = std::env::temp_dir()
        .join("berth-test-gateway")
        .display()
        .to_string();
    cfg.model_api_url = "http://127.0.0.1:9".into();
}

/// Waits for a starting dispatcher's bootstrap token file.
async fn read_token(
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

pub async fn answering(
    mut client: SessionsClient<Api>,
    tasks: &[tokio::task::JoinHandle<anyhow::Result<()>>],
) -> anyhow::Result<()> {
    for _ in 0..100 {
        let req = pb::ListSessionsRequest {
            page_size: 1,
            ..Default::default()
        };
        if client.list_sessions(req).await.is_ok() {
            return Ok(());
        }
        if let Some(t) = tasks.iter().find(|t| t.is_finished()) {
            anyhow::bail!(
                "a cluster process exited during start-up ({t:?}); run with RUST_LOG=info to see why"
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anyhow::bail!("the test dispatcher did not answer within 10 s")
}

/// One node of a [`TestCluster`].
pub struct TestNode {
    /// Its node id (as in load reports and `Session.node`).
    pub id: String,
    /// The URL the dispatcher dials.
    pub url: String,
    /// Where the node itself listens (behind the proxy).
    pub addr: SocketAddr,
    /// Its `/metrics` endpoint, with [`Builder::metrics`].
    pub metrics: Option<SocketAddr>,
    /// Cancelled by [`TestCluster::sigterm_node`].
    drain: CancellationToken,
    /// The proxy the dispatcher reaches it through.
    pub proxy: Proxy,
    stop: CancellationToken,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

/// A running dispatcher and its nodes.
pub struct TestCluster {
    client: SessionsClient<Api>,
    nodes_client: NodesClient<Api>,
    /// A channel carrying the bootstrap fleet-admin key (project `default`).
    api: Api,
    /// That key's token.
    pub token: String,
    pub dispatcher_url: String,
    /// With [`Builder::api_tls`]: a client certificate for the public API
    /// (dial the dispatcher as [`DISPATCHER_NAME`]).
    pub client_tls: Option<berth_common::tls::TlsMaterial>,
    pub nodes: Vec<TestNode>,
    /// The CA every certificate of the cluster is signed by.
    pub ca: DevCa,
    pub database: String,
    /// The cluster's own database, for tests that inspect or tamper with it.
    pub database_url: String,
    /// The S3 server every part of the cluster keeps its objects in.
    pub s3: s3::S3Server,
    shutdown: CancellationToken,
    /// The first dispatcher's own shutdown (SIGTERM).
    dispatcher_stop: CancellationToken,
    /// Its `/metrics` endpoint, with [`Builder::metrics`].
    pub dispatcher_metrics: Option<SocketAddr>,
    dispatcher_cfg: berth_dispatcher::Config,
    tasks: Vec<tokio::task::JoinHandle<anyhow::Result<()>>>,
    /// The shutdown of each dispatcher added later, by id.
    added_stops: Vec<(String, CancellationToken)>,
    /// Nodes killed with [`Self::kill_node`].
    killed: Vec<String>,
}

impl TestCluster {
    pub fn builder() -> Builder {
        Builder {
            nodes: 1,
            capacity: 4,
            warm_pools: Vec::new(),
            lease: Duration::from_secs(2),
            node_hook: None,
            dispatcher_hook: None,
            metrics: false,
            ca: None,
            api_tls: false,
            direct: false,
            database_url: None,
        }
    }

    /// A client for the public API.
    pub fn client(&self) -> SessionsClient<Api> {
        self.client.clone()
    }

    /// The first dispatcher's API with the bootstrap fleet-admin key.
    pub fn api(&self) -> Api {
        self.api.clone()
    }

    /// The first dispatcher's API as `token` (none: anonymous).
    pub fn api_as(&self, token: Option<&str>) -> anyhow::Result<Api> {
        let mut endpoint = tonic::transport::Endpoint::from_shared(self.dispatcher_url.clone())?;
        if let Some(tls) = &self.client_tls {
            endpoint = endpoint.tls_config(tls.client(DISPATCHER_NAME))?;
        }
        Ok(berth_cli::auth::api(
            endpoint.connect_lazy(),
            Bearer::new(token).map_err(anyhow::Error::msg)?,
        ))
    }

    /// A client for the fleet API.
    pub fn nodes_client(&self) -> NodesClient<Api> {
        self.nodes_client.clone()
    }

    /// `channel` with the cluster's admin key.
    pub fn authorized(&self, channel: Channel) -> anyhow::Result<Api> {
        Ok(berth_cli::auth::api(
            channel,
            Bearer::new(Some(&self.token)).map_err(anyhow::Error::msg)?,
        ))
    }

    /// The dispatcher's view of node `i`.
    pub async fn node_status(&self, i: usize) -> anyhow::Result<pb::Node> {
        let id = &self.nodes[i].id;
        let url = &self.nodes[i].url;
        let nodes = self
            .nodes_client()
            .list_nodes(pb::ListNodesRequest {})
            .await?
            .into_inner()
            .nodes;
        nodes
            .into_iter()
            .find(|n| &n.name == id || &n.url == url)
            .ok_or_else(|| anyhow::anyhow!("node {i} is not listed"))
    }

    /// Waits until node `i` satisfies `pred`, as ListNodes shows it.
    pub async fn wait_node(
        &self,
        i: usize,
        timeout: Duration,
        pred: impl Fn(&pb::Node) -> bool,
    ) -> anyhow::Result<pb::Node> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let n = self.node_status(i).await?;
            if pred(&n) {
                return Ok(n);
            }
            if tokio::time::Instant::now() > deadline {
                anyhow::bail!("node {i} did not reach the expected state: {n:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Sends node `i` what SIGTERM sends: it drains (its drain timeout, then
    /// snapshots what still runs). Returns its task, to await.
    pub fn sigterm_node(&mut self, i: usize) -> tokio::task::JoinHandle<anyhow::Result<()>> {
        let node = &mut self.nodes[i];
        node.drain.cancel();
        node.task.take().expect("node already stopped")
    }

    /// Shuts the first dispatcher down as SIGTERM does, and waits for it.
    pub async fn sigterm_dispatcher(&mut self) -> anyhow::Result<()> {
        self.dispatcher_stop.cancel();
        if !self.tasks.is_empty() {
            self.tasks.remove(0).await??;
        }
        Ok(())
    }

    /// Begins the shutdown of the added dispatcher `id`, as SIGTERM does
    /// (it hands its sessions on; [`Self::shutdown`] waits for it).
    pub fn sigterm_dispatcher_id(&mut self, id: &str) -> anyhow::Result<()> {
        let Some((_, stop)) = self.added_stops.iter().find(|(i, _)| i == id) else {
            anyhow::bail!("no dispatcher `{id}` was added");
        };
        stop.cancel();
        Ok(())
    }

    /// Starts another dispatcher on the same database and nodes; returns
    /// its client.
    pub async fn add_dispatcher(&mut self) -> anyhow::Result<SessionsClient<Api>> {
        let id = format!(
            "{}-{}",
            self.dispatcher_cfg.dispatcher_id,
            self.tasks.len() + 1
        );
        self.add_dispatcher_as(&id).await
    }

    /// Starts another dispatcher under the id `id` (as a restarted process
    /// keeps its id); returns its client.
    pub async fn add_dispatcher_as(&mut self, id: &str) -> anyhow::Result<SessionsClient<Api>> {
        self.add_dispatcher_on(id, "127.0.0.1:0".parse()?).await
    }

    /// Starts another dispatcher `id` listening on `addr` (e.g. the address
    /// of one that stopped: a restart behind the same URL). Retries the
    /// bind for a few seconds while the old listener lets go.
    pub async fn add_dispatcher_on(
        &mut self,
        id: &str,
        addr: SocketAddr,
    ) -> anyhow::Result<SessionsClient<Api>> {
        let mut tries = 0;
        let listener = loop {
            match tokio::net::TcpListener::bind(addr).await {
                Ok(l) => break l,
                Err(e) if tries < 100 => {
                    tries += 1;
                    tracing::debug!(error = %e, %addr, "address still taken; retrying");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => return Err(e.into()),
            }
        };
        let url = format!("http://{}", listener.local_addr()?);
        let mut cfg = self.dispatcher_cfg.clone();
        cfg.dispatcher_id = id.to_string();
        cfg.metrics_listen = Listen(None);
        let stop = self.shutdown.child_token();
        self.added_stops.push((id.to_string(), stop.clone()));
        self.tasks
            .push(tokio::spawn(berth_dispatcher::run(cfg, listener, stop)));
        let channel = tonic::transport::Endpoint::from_shared(url)?.connect_lazy();
        let client = SessionsClient::new(self.authorized(channel)?)
            .max_decoding_message_size(berth_common::grpc::MAX_MESSAGE_BYTES);
        answering(client.clone(), &self.tasks).await?;
        Ok(client)
    }

    /// Stops node `i` at once (a second SIGTERM, or SIGKILL but cleaner),
    /// and waits for it.
    pub async fn stop_node(&mut self, i: usize) -> anyhow::Result<()> {
        let node = &mut self.nodes[i];
        node.proxy.set_paused(false);
        node.stop.cancel();
        if let Some(t) = node.task.take() {
            t.await??;
        }
        Ok(())
    }

    /// Starts another dispatcher in a runtime of its own, so that it can be
    /// killed as `kill -9` would: every task of it gone at once, with no
    /// hand-back and no goodbye to its nodes or database.
    pub async fn add_killable_dispatcher(
        &mut self,
        id: &str,
    ) -> anyhow::Result<KillableDispatcher> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let url = format!("http://{}", listener.local_addr()?);
        let mut cfg = self.dispatcher_cfg.clone();
        cfg.dispatcher_id = id.to_string();
        cfg.metrics_listen = Listen(None);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        let stop = CancellationToken::new();
        let token = stop.clone();
        rt.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener)?;
            berth_dispatcher::run(cfg, listener, token).await
        });
        let channel = tonic::transport::Endpoint::from_shared(url)?.connect_lazy();
        let client = SessionsClient::new(self.authorized(channel)?)
            .max_decoding_message_size(berth_common::grpc::MAX_MESSAGE_BYTES);
        let killable = KillableDispatcher {
            rt: Some(rt),
            client,
            stop,
        };
        answering(killable.client.clone(), &[]).await?;
        Ok(killable)
    }

    /// The index of the node whose id is `id`.
    pub fn node_index(&self, id: &str) -> anyhow::Result<usize> {
        self.nodes
            .iter()
            .position(|n| n.id == id)
            .ok_or_else(|| anyhow::anyhow!("no node `{id}` in this cluster"))
    }

    /// Kills node `i` as a crash of its machine would: it stops answering
    /// at once (its proxy stalls), its process is gone, and so are its
    /// containers.
    pub fn kill_node(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        node.proxy.set_paused(true);
        // Its background loops (warm pools) are tasks of their own that an
        // abort would leave running in this process: stop them too, as a
        // crash would (they remove what they started).
        node.stop.cancel();
        if let Some(t) = node.task.take() {
            t.abort();
        }
        remove_node_containers(&node.id);
        self.killed.push(node.id.clone());
    }

    /// Stops everything and drops the cluster's database.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        for n in &self.nodes {
            n.proxy.set_paused(false);
        }
        self.shutdown.cancel();
        for t in std::mem::take(&mut self.tasks) {
            t.await??;
        }
        for n in &mut self.nodes {
            if let Some(t) = n.task.take() {
                t.await??;
            }
        }
        // A killed node's pool may have finished a start after its kill.
        for id in &self.killed {
            remove_node_containers(id);
        }
        if self.database.is_empty() {
            return Ok(());
        }
        drop_database(&self.database).await
    }
}

/// A dispatcher in a runtime of its own (see
/// [`TestCluster::add_killable_dispatcher`]).
pub struct KillableDispatcher {
    rt: Option<tokio::runtime::Runtime>,
    pub client: SessionsClient<Api>,
    stop: CancellationToken,
}

impl KillableDispatcher {
    /// Kills it: its runtime, with every task, connection and stream, is
    /// dropped at once.
    pub fn kill(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

impl Drop for KillableDispatcher {
    fn drop(&mut self) {
        self.stop.cancel();
        self.kill();
    }
}

impl Drop for TestCluster {
    /// A test that fails before `shutdown` still leaves no containers: its
    /// nodes' containers are removed through the docker CLI (Drop cannot await).
    fn drop(&mut self) {
        if self.shutdown.is_cancelled() {
            return;
        }
        for n in &self.nodes {
            remove_node_containers(&n.id);
        }
    }
}

/// Removes every container of node `node_id` through the docker CLI: for
/// `Drop`, which cannot await, when a test fails before its shutdown.
pub fn remove_node_containers(node_id: &str) {
    let filter = format!("label=berth.node={node_id}");
    let Ok(out) = std::process::Command::new("docker")
        .args(["ps", "-aq", "--filter", &filter])
        .output()
    else {
        return;
    };
    let ids: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(String::from)
        .collect();
    if !ids.is_empty() {
        let _ = std::process::Command::new("docker")
            .args(["rm", "-fv"])
            .args(&ids)
            .output();
    }
}

/// A TCP proxy in front of a node that can go silent: while paused it
/// forwards nothing but keeps every connection open, as a hung or
/// partitioned machine does. Only the node *lease* can tell.
pub struct Proxy {
    pub addr: SocketAddr,
    paused: tokio::sync::watch::Sender<bool>,
}

impl Proxy {
    async fn start(target: SocketAddr) -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (paused, rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let rx = rx.clone();
                tokio::spawn(async move {
                    let Ok(outbound) = tokio::net::TcpStream::connect(target).await else {
                        return;
                    };
                    let _ = inbound.set_nodelay(true);
                    let _ = outbound.set_nodelay(true);
                    let (ri, wi) = inbound.into_split();
                    let (ro, wo) = outbound.into_split();
                    tokio::join!(pipe(ri, wo, rx.clone()), pipe(ro, wi, rx));
                });
            }
        });
        Ok(Self { addr, paused })
    }

    /// Pauses (silences) or resumes forwarding.
    pub fn set_paused(&self, paused: bool) {
        self.paused.send_replace(paused);
    }
}

async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut paused: tokio::sync::watch::Receiver<bool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if paused.wait_for(|p| !*p).await.is_err() {
            break;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}

/// A create request for the fake agent with `prompt` as the first message.
pub fn fake_session(prompt: &str) -> pb::CreateSessionRequest {
    pb::CreateSessionRequest {
        spec: Some(pb::SessionSpec {
            image: TEST_IMAGE.into(),
            ..Default::default()
        }),
        initial_message: prompt.into(),
        ..Default::default()
    }
}

/// Reads the session's events from `after_seq` until `done` says stop (or the
/// stream ends), within `timeout`.
pub async fn collect_until(
    client: &mut SessionsClient<Api>,
    name: &str,
    after_seq: i64,
    timeout: Duration,
    mut done: impl FnMut(&pb::Event) -> bool,
) -> anyhow::Result<Vec<pb::Event>> {
    let mut stream = client
        .stream_events(pb::StreamEventsRequest {
            name: name.into(),
            after_seq,
        })
        .await?
        .into_inner();
    let mut out = Vec::new();
    let read = async {
        while let Some(e) = stream.next().await {
            let e = e?;
            let stop = done(&e);
            out.push(e);
            if stop {
                return anyhow::Ok(());
            }
        }
        let (last, why) = out
            .last()
            .map(|e| (e.r#type.clone(), e.payload_json.clone()))
            .unwrap_or_default();
        anyhow::bail!(
            "the event stream of {name} ended after {} events (last `{last}`: {why}) before the awaited event",
            out.len()
        )
    };
    tokio::time::timeout(timeout, read)
        .await
        .map_err(|_| anyhow::anyhow!("timed out waiting for events of {name}"))??;
    Ok(out)
}

/// Reads events until the session's first turn has ended (usage recorded, idle).
pub async fn until_turn_ends(
    client: &mut SessionsClient<Api>,
    name: &str,
    after_seq: i64,
) -> anyhow::Result<Vec<pb::Event>> {
    let mut usage_seen = false;
    collect_until(client, name, after_seq, Duration::from_secs(60), |e| {
        usage_seen |= e.r#type == "session.usage";
        usage_seen && e.r#type == "session.status_idle"
    })
    .await
}

/// Waits until the session satisfies `pred`; `what` describes it for the
/// error when it does not within `timeout`.
pub async fn wait_for_session(
    client: &mut SessionsClient<Api>,
    name: &str,
    timeout: Duration,
    what: &str,
    mut pred: impl FnMut(&pb::Session) -> bool,
) -> anyhow::Result<pb::Session> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let s = client
            .get_session(pb::GetSessionRequest { name: name.into() })
            .await?
            .into_inner();
        if pred(&s) {
            return Ok(s);
        }
        if tokio::time::Instant::now() > deadline {
            anyhow::bail!(
                "session {name} is not {what} within {timeout:?}: {:?} ({}) on `{}` at epoch {}",
                pb::SessionStatus::try_from(s.status),
                s.status_reason,
                s.node,
                s.epoch
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until the session reaches `status`.
pub async fn wait_for_status(
    client: &mut SessionsClient<Api>,
    name: &str,
    status: pb::SessionStatus,
    timeout: Duration,
) -> anyhow::Result<pb::Session> {
    wait_for_session(client, name, timeout, &format!("{status:?}"), |s| {
        s.status == status as i32
    })
    .await
}

/// Every persisted event of a session (up to 1000), as ListEvents returns them.
pub async fn events_of(
    client: &mut SessionsClient<Api>,
    name: &str,
) -> anyhow::Result<Vec<pb::Event>> {
    Ok(client
        .list_events(pb::ListEventsRequest {
            name: name.into(),
            page_size: 1000,
            ..Default::default()
        })
        .await?
        .into_inner()
        .events)
}

/// The local Docker daemon, API version negotiated.
pub async fn docker() -> anyhow::Result<bollard::Docker> {
    Ok(bollard::Docker::connect_with_local_defaults()?
        .negotiate_version()
        .await?)
}

/// Containers (running or not) carrying every label in `labels` (`key` or `key=value`).
pub async fn containers_labelled(labels: &[String]) -> anyhow::Result<Vec<String>> {
    let filters = std::collections::HashMap::from([("label".to_string(), labels.to_vec())]);
    let opts = bollard::query_parameters::ListContainersOptionsBuilder::new()
        .all(true)
        .filters(&filters)
        .build();
    Ok(docker()
        .await?
        .list_containers(Some(opts))
        .await?
        .into_iter()
        .filter_map(|c| c.id)
        .collect())
}

/// Containers Docker still has for a session (running or not).
/// Runs `cmd` in a container, as its image's user (the agent's: what a
/// prompt-injected agent could run), to its end; its stdout, lossily.
pub async fn exec_output(container: &str, cmd: &[&str]) -> anyhow::Result<String> {
    use bollard::exec::{CreateExecOptions, StartExecResults};
    let docker = docker().await?;
    let exec = docker
        .create_exec(
            container,
            CreateExecOptions {
                attach_stdout: Some(true),
                attach_stderr: Some(true),
                cmd: Some(cmd.iter().map(|c| c.to_string()).collect()),
                ..Default::default()
            },
        )
        .await?;
    let mut out = Vec::new();
    if let StartExecResults::Attached { mut output, .. } = docker.start_exec(&exec.id, None).await?
    {
        while let Some(chunk) = output.next().await {
            if let Ok(bollard::container::LogOutput::StdOut { message }) = chunk {
                out.extend_from_slice(&message);
            }
        }
    }
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// A cold start's container carries the session's label; a warm one takes
/// its name (`berth-{node}-s-{session}`) when claimed.
pub async fn containers_of(session_id: &str) -> anyhow::Result<Vec<String>> {
    let mut ids = containers_labelled(&[format!("berth.session={session_id}")]).await?;
    let filters =
        std::collections::HashMap::from([("name".to_string(), vec![format!("-s-{session_id}")])]);
    let opts = bollard::query_parameters::ListContainersOptionsBuilder::new()
        .all(true)
        .filters(&filters)
        .build();
    for c in docker().await?.list_containers(Some(opts)).await? {
        if let Some(id) = c.id
            && !ids.contains(&id)
        {
            ids.push(id);
        }
    }
    Ok(ids)
}

/// Parses an event's JSON payload.
pub fn payload(e: &pb::Event) -> serde_json::Value {
    serde_json::from_str(&e.payload_json).unwrap_or(serde_json::Value::Null)
}

/// The agent's lines, byte for byte, in order: each is carried once, by the
/// first event made from it.
pub fn agent_lines(events: &[pb::Event]) -> Vec<Vec<u8>> {
    events
        .iter()
        .filter(|e| e.line_seq == e.seq && e.line_seq != 0)
        .map(|e| e.raw.clone())
        .collect()
}

/// An agent line as JSON (the line the event at `line_seq` carries).
pub fn line_json(events: &[pb::Event], e: &pb::Event) -> serde_json::Value {
    events
        .iter()
        .find(|l| l.seq == e.line_seq)
        .and_then(|l| serde_json::from_slice(&l.raw).ok())
        .unwrap_or(serde_json::Value::Null)
}

/// Checks what every event of an agent's line must hold: the line is
/// carried once, by the first of its events, and the rest point back to it
/// from the seqs right after.
pub fn assert_lines_well_formed(events: &[pb::Event]) {
    let mut current = 0;
    for e in events {
        if e.line_seq == 0 {
            assert!(
                e.raw.is_empty(),
                "an event not from a line carries one: {e:?}"
            );
            continue;
        }
        if e.line_seq == e.seq {
            current = e.seq;
        } else {
            assert_eq!(
                e.line_seq, current,
                "event {} points to another line",
                e.seq
            );
            assert!(e.raw.is_empty(), "line stored twice at {}", e.seq);
        }
    }
}

/// Sends `text` to the session; returns the seq of its `user.message`.
pub async fn send(c: &mut SessionsClient<Api>, name: &str, text: &str) -> anyhow::Result<i64> {
    Ok(c.send_message(pb::SendMessageRequest {
        name: name.into(),
        text: text.into(),
    })
    .await?
    .into_inner()
    .seq)
}

/// Creates a session and waits until its first turn has ended.
pub async fn idle_session(
    c: &mut SessionsClient<Api>,
    req: pb::CreateSessionRequest,
) -> anyhow::Result<pb::Session> {
    let s = c.create_session(req).await?.into_inner();
    reply_after(c, &s.name, 0).await?;
    Ok(s)
}

/// Sends `text` and waits for its turn to end; returns the agent's reply.
pub async fn turn(c: &mut SessionsClient<Api>, name: &str, text: &str) -> anyhow::Result<String> {
    let seq = send(c, name, text).await?;
    reply_after(c, name, seq).await
}

/// The agent's reply to the turn whose input is at `seq`.
pub async fn reply_after(
    c: &mut SessionsClient<Api>,
    name: &str,
    seq: i64,
) -> anyhow::Result<String> {
    let mut usage = false;
    let events = collect_until(c, name, seq, Duration::from_secs(60), |e| {
        usage |= e.r#type == "session.usage";
        usage && e.r#type == "session.status_idle"
    })
    .await?;
    Ok(events
        .iter()
        .filter(|e| e.r#type == "agent.message")
        .map(|e| payload(e)["text"].as_str().unwrap_or_default().to_string())
        .collect::<Vec<_>>()
        .join("\n"))
}

pub async fn get(c: &mut SessionsClient<Api>, name: &str) -> anyhow::Result<pb::Session> {
    Ok(c.get_session(pb::GetSessionRequest { name: name.into() })
        .await?
        .into_inner())
}

/// Waits (briefly) until no container of the session exists: removal
/// follows the status change by a moment.
pub async fn no_containers_left(id: &str) -> anyhow::Result<()> {
    for _ in 0..50 {
        if containers_of(id).await?.is_empty() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    anyhow::bail!("session {id} still has containers after 10 s")
}

/// Stops a session and waits until it is `stopped` (its snapshot saved).
pub async fn stop_and_wait(c: &mut SessionsClient<Api>, name: &str) -> anyhow::Result<pb::Session> {
    c.stop_session(pb::StopSessionRequest { name: name.into() })
        .await?;
    wait_for_status(c, name, pb::SessionStatus::Stopped, Duration::from_secs(60)).await
}
