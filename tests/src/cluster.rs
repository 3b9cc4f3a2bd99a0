//! A running [`TestCluster`]: clients, and the faults a test can cause
//! (SIGTERM, kill, stall, added dispatchers).

use super::*;

/// Waits until the dispatcher behind `client` answers, failing early if a
/// cluster task exits.
pub async fn answering(
    mut client: SessionsClient<Api>,
    tasks: &mut [tokio::task::JoinHandle<anyhow::Result<()>>],
) -> anyhow::Result<()> {
    for _ in 0..100 {
        let req = pb::ListSessionsRequest {
            page_size: 1,
            ..Default::default()
        };
        if client.list_sessions(req).await.is_ok() {
            return Ok(());
        }
        if let Some(t) = tasks.iter_mut().find(|t| t.is_finished()) {
            let ended = match t.await {
                Ok(Ok(())) => "ended without an error".to_string(),
                Ok(Err(e)) => format!("failed: {e:#}"),
                Err(e) => format!("panicked: {e}"),
            };
            anyhow::bail!("a cluster process exited during start-up: it {ended}");
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
    pub(crate) drain: CancellationToken,
    /// The proxy the dispatcher reaches it through.
    pub proxy: Proxy,
    pub(crate) stop: CancellationToken,
    pub(crate) task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

/// A running dispatcher and its nodes.
pub struct TestCluster {
    pub(crate) client: SessionsClient<Api>,
    pub(crate) nodes_client: NodesClient<Api>,
    /// A channel carrying the bootstrap fleet-admin key (project `default`).
    pub(crate) api: Api,
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
    pub(crate) shutdown: CancellationToken,
    /// The first dispatcher's own shutdown (SIGTERM).
    pub(crate) dispatcher_stop: CancellationToken,
    /// Its `/metrics` endpoint, with [`Builder::metrics`].
    pub dispatcher_metrics: Option<SocketAddr>,
    pub(crate) dispatcher_cfg: berth_dispatcher::Config,
    pub(crate) tasks: Vec<tokio::task::JoinHandle<anyhow::Result<()>>>,
    /// The shutdown of each dispatcher added later, by id.
    pub(crate) added_stops: Vec<(String, CancellationToken)>,
    /// The URLs of the dispatchers added since the start, in order.
    pub added_urls: Vec<String>,
    /// Nodes killed with [`Self::kill_node`].
    pub(crate) killed: Vec<String>,
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

    /// The API of the most recently added dispatcher, as the fleet admin.
    pub fn api_on_last_dispatcher(&self) -> anyhow::Result<Api> {
        let url = self
            .added_urls
            .last()
            .ok_or_else(|| anyhow::anyhow!("no dispatcher was added"))?;
        let channel = tonic::transport::Endpoint::from_shared(url.clone())?.connect_lazy();
        self.authorized(channel)
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
        self.add_dispatcher_configured(id, addr, |_| {}).await
    }

    /// Starts another dispatcher that drives `nodes` (processes of their
    /// own) instead of the cluster's; returns its client.
    pub async fn add_dispatcher_for(
        &mut self,
        nodes: &[&crate::ProcessNode],
    ) -> anyhow::Result<SessionsClient<Api>> {
        let id = format!(
            "{}-{}",
            self.dispatcher_cfg.dispatcher_id,
            self.tasks.len() + 1
        );
        let urls: Vec<String> = nodes.iter().map(|n| n.url.clone()).collect();
        let resolve: Vec<(String, SocketAddr)> = nodes.iter().map(|n| n.resolve.clone()).collect();
        self.add_dispatcher_configured(&id, "127.0.0.1:0".parse()?, move |cfg| {
            cfg.agent_servers = urls.clone();
            cfg.node_resolve = resolve.clone();
        })
        .await
    }

    /// Starts another dispatcher `id` on `addr`, its configuration the
    /// cluster's adjusted by `hook`.
    pub async fn add_dispatcher_configured(
        &mut self,
        id: &str,
        addr: SocketAddr,
        hook: impl FnOnce(&mut berth_dispatcher::Config),
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
        hook(&mut cfg);
        let stop = self.shutdown.child_token();
        self.added_stops.push((id.to_string(), stop.clone()));
        self.added_urls.push(url.clone());
        self.tasks
            .push(tokio::spawn(berth_dispatcher::run(cfg, listener, stop)));
        let channel = tonic::transport::Endpoint::from_shared(url)?.connect_lazy();
        let client = SessionsClient::new(self.authorized(channel)?)
            .max_decoding_message_size(berth_common::grpc::MAX_MESSAGE_BYTES);
        answering(client.clone(), &mut self.tasks).await?;
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
        let run = rt.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener)?;
            berth_dispatcher::run(cfg, listener, token).await
        });
        let channel = tonic::transport::Endpoint::from_shared(url)?.connect_lazy();
        let client = SessionsClient::new(self.authorized(channel)?)
            .max_decoding_message_size(berth_common::grpc::MAX_MESSAGE_BYTES);
        let killable = KillableDispatcher {
            rt: Some(rt),
            run: Some(run),
            client,
            stop,
        };
        answering(killable.client.clone(), &mut []).await?;
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
    pub(crate) rt: Option<tokio::runtime::Runtime>,
    pub(crate) run: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
    pub client: SessionsClient<Api>,
    pub(crate) stop: CancellationToken,
}

impl KillableDispatcher {
    /// Stops it as SIGTERM would and waits for `run` to return. Returns
    /// how many tasks are still alive in its runtime once they have had
    /// `settle` to end (0: shutdown awaited everything it started).
    pub async fn stop_gracefully(&mut self, settle: Duration) -> anyhow::Result<usize> {
        self.stop.cancel();
        if let Some(run) = self.run.take() {
            run.await??;
        }
        let Some(rt) = &self.rt else {
            anyhow::bail!("the dispatcher was killed");
        };
        let deadline = tokio::time::Instant::now() + settle;
        loop {
            let alive = rt.metrics().num_alive_tasks();
            if alive == 0 || tokio::time::Instant::now() >= deadline {
                return Ok(alive);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

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

/// The `berth` binary `scripts/setup.sh` builds beside the tests.
pub fn berth_bin() -> std::path::PathBuf {
    built_binary("berth")
}

/// `berth` against `cluster`, with no user config in the way.
pub fn berth_command(cluster: &TestCluster) -> std::process::Command {
    let mut c = std::process::Command::new(berth_bin());
    c.env("BERTH_DISPATCHER", &cluster.dispatcher_url)
        .env("BERTH_TOKEN", &cluster.token)
        .env("BERTH_CONFIG", "/nonexistent/berth-config.json")
        .env_remove("BERTH_OUTPUT")
        .env("NO_COLOR", "1");
    c
}
