//! berth's test harness: start a real cluster (dispatcher + nodes) in process,
//! against the real Docker daemon and a fresh Postgres database.
//!
//! ```no_run
//! # async fn f() -> anyhow::Result<()> {
//! let cluster = berth_tests::TestCluster::builder().nodes(1).start().await?;
//! let mut client = cluster.client();
//! # Ok(()) }
//! ```

use std::time::Duration;

use anyhow::Context;
use berth_proto::v1::{self as pb, sessions_client::SessionsClient};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

/// The image `deploy/test-image/build.sh` builds.
pub const TEST_IMAGE: &str = "berth-test-agent:latest";
/// The recorded transcript, as the test image holds it.
pub const FIXTURE_IN_IMAGE: &str = "/fixtures/claude-code/explore_count_files.jsonl";
/// The recorded transcript, from this repository.
pub const FIXTURE: &str = include_str!("../fixtures/claude-code/explore_count_files.jsonl");

/// Postgres server for tests; each cluster creates its own database on it.
fn admin_url() -> String {
    std::env::var("BERTH_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://berth:berth@127.0.0.1:5432/postgres".into())
}

/// Configures a [`TestCluster`].
#[derive(Debug, Clone)]
pub struct Builder {
    nodes: usize,
    capacity: u32,
}

impl Builder {
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

    /// Starts the cluster and waits until its dispatcher answers and sees a node.
    pub async fn start(self) -> anyhow::Result<TestCluster> {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| "warn".into()),
            )
            .with_test_writer()
            .try_init();
        let tag = uuid::Uuid::new_v4().simple().to_string()[..10].to_string();
        let database = format!("berth_test_{tag}");
        let admin = admin_url();
        let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&admin)
            .await
            .with_context(|| format!("tests need Postgres at {admin} (run scripts/setup.sh)"))?;
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {database}")))
            .execute(&mut conn)
            .await?;
        let database_url = match admin.rsplit_once('/') {
            Some((base, _)) => format!("{base}/{database}"),
            None => anyhow::bail!("BERTH_TEST_DATABASE_URL must end in /DBNAME"),
        };

        let shutdown = CancellationToken::new();
        let mut tasks = Vec::new();
        let mut node_urls = Vec::new();
        let mut node_ids = Vec::new();
        for i in 0..self.nodes {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            node_urls.push(format!("http://{}", listener.local_addr()?));
            let mut cfg = berth_agent_server::Config::defaults();
            cfg.node_id = format!("test-{tag}-{i}");
            cfg.capacity = self.capacity;
            cfg.stop_grace = Duration::from_secs(2);
            cfg.load_heartbeat = Duration::from_millis(200);
            cfg.memory_mib = 256;
            cfg.cpus = 1.0;
            node_ids.push(cfg.node_id.clone());
            tasks.push(tokio::spawn(berth_agent_server::run(
                cfg,
                listener,
                shutdown.child_token(),
            )));
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let dispatcher_url = format!("http://{}", listener.local_addr()?);
        let mut cfg = berth_dispatcher::Config::defaults();
        cfg.database_url = database_url.clone();
        cfg.agent_servers = node_urls.clone();
        cfg.queue_poll = Duration::from_millis(250);
        cfg.db_max_connections = 8;
        cfg.dispatcher_id = format!("test-dispatcher-{tag}");
        tasks.push(tokio::spawn(berth_dispatcher::run(
            cfg,
            listener,
            shutdown.clone(),
        )));

        let channel =
            tonic::transport::Endpoint::from_shared(dispatcher_url.clone())?.connect_lazy();
        let client = SessionsClient::new(channel)
            .max_decoding_message_size(berth_common::grpc::MAX_MESSAGE_BYTES);
        let cluster = TestCluster {
            client,
            dispatcher_url,
            node_urls,
            node_ids,
            database,
            shutdown,
            tasks,
        };
        let mut probe = cluster.client();
        for _ in 0..100 {
            let req = pb::ListSessionsRequest {
                page_size: 1,
                ..Default::default()
            };
            if probe.list_sessions(req).await.is_ok() {
                return Ok(cluster);
            }
            if let Some(t) = cluster.tasks.iter().find(|t| t.is_finished()) {
                anyhow::bail!(
                    "a cluster process exited during start-up ({t:?}); run with RUST_LOG=info to see why"
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        anyhow::bail!("the test dispatcher did not answer within 10 s")
    }
}

/// A running dispatcher and its nodes.
pub struct TestCluster {
    client: SessionsClient<Channel>,
    pub dispatcher_url: String,
    pub node_urls: Vec<String>,
    pub node_ids: Vec<String>,
    pub database: String,
    shutdown: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl TestCluster {
    pub fn builder() -> Builder {
        Builder {
            nodes: 1,
            capacity: 4,
        }
    }

    /// A client for the public API.
    pub fn client(&self) -> SessionsClient<Channel> {
        self.client.clone()
    }

    /// Stops everything and drops the cluster's database.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        for t in self.tasks {
            t.await??;
        }
        let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&admin_url()).await?;
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.database
        )))
        .execute(&mut conn)
        .await?;
        Ok(())
    }
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
    client: &mut SessionsClient<Channel>,
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
                break;
            }
        }
        anyhow::Ok(())
    };
    tokio::time::timeout(timeout, read)
        .await
        .map_err(|_| anyhow::anyhow!("timed out waiting for events of {name}"))??;
    Ok(out)
}

/// Reads events until the session's first turn has ended (usage recorded, idle).
pub async fn until_turn_ends(
    client: &mut SessionsClient<Channel>,
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

/// Waits until the session reaches `status`.
pub async fn wait_for_status(
    client: &mut SessionsClient<Channel>,
    name: &str,
    status: pb::SessionStatus,
    timeout: Duration,
) -> anyhow::Result<pb::Session> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let s = client
            .get_session(pb::GetSessionRequest { name: name.into() })
            .await?
            .into_inner();
        if s.status == status as i32 {
            return Ok(s);
        }
        if tokio::time::Instant::now() > deadline {
            anyhow::bail!(
                "session {name} is {:?} ({}), not {status:?}",
                pb::SessionStatus::try_from(s.status),
                s.status_reason
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Containers Docker still has for a session (running or not).
pub async fn containers_of(session_id: &str) -> anyhow::Result<Vec<String>> {
    let docker = bollard::Docker::connect_with_local_defaults()?
        .negotiate_version()
        .await?;
    let filters = std::collections::HashMap::from([(
        "label".to_string(),
        vec![format!("berth.session={session_id}")],
    )]);
    let opts = bollard::query_parameters::ListContainersOptionsBuilder::new()
        .all(true)
        .filters(&filters)
        .build();
    Ok(docker
        .list_containers(Some(opts))
        .await?
        .into_iter()
        .filter_map(|c| c.id)
        .collect())
}

/// Parses an event's JSON payload.
pub fn payload(e: &pb::Event) -> serde_json::Value {
    serde_json::from_str(&e.payload_json).unwrap_or(serde_json::Value::Null)
}
