//! berth's dispatcher: the control plane.
//!
//! Layout, each layer using only those below it:
//! - `services`: what a dispatcher runs, built in one place;
//! - `api`: thin gRPC handlers (unpack, call, map the error), and the one
//!   wire ↔ domain conversion;
//! - `ops`: the operations clients call (sessions, agents, export,
//!   schedules, inbound webhooks, outbound subscriptions, audit), each with
//!   the loop that serves it where it has one;
//! - `loops` (queue claims, janitor, reconcile, re-wrap, sampler) and
//!   `driver` (start handshake, relay, deadlines): the background work;
//! - [`access`]: API keys and certificates, the rules of managing keys,
//!   limits, revoked keys' streams;
//! - `log`: the group-commit event log and its followers; `nodes`: links
//!   to the nodes and the node wire;
//! - `store`: Postgres, one file per aggregate; [`seal`]: sealing secrets;
//! - [`session`]: the domain types and rules; [`placement`]: the pure
//!   placement choice; [`metrics`], `error`, [`config`].

pub mod access;
mod api;
pub mod config;
mod driver;
mod error;
mod handoff;
mod http;
mod log;
mod loops;
pub mod metrics;
mod nodes;
mod ops;
pub mod placement;
mod records;
pub mod seal;
mod services;
pub mod session;
mod store;

use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use access::{auth, limits};
pub use config::Config;
use loops::janitor;

/// Runs a dispatcher on `listener` against the nodes in `cfg.agent_servers`
/// until `shutdown` is cancelled.
pub async fn run(
    cfg: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    cfg.validate()?;
    // One TLS configuration for the node links and the API, reloaded from
    // its files while the dispatcher runs.
    let tls = cfg.tls.live()?;
    let fleet = fleet_config(&cfg, tls.clone())?;
    let sealer = sealer(&cfg)?;
    tracing::info!(keys = ?sealer, "secrets key file loaded");
    let store = store::Store::connect(&cfg.database_url, cfg.db_max_connections, sealer).await?;
    if cfg.allow_anonymous {
        tracing::warn!(
            "--allow-anonymous: calls without an API key act as a fleet admin of project `default`; \
             local development only"
        );
    }
    if let Some(path) = &cfg.bootstrap_token_file {
        bootstrap_admin(&store, path).await?;
    }
    // Every background loop, every running driver, the event log's writer
    // and followers, and the metrics endpoint, so shutdown stops and awaits
    // each one.
    let loops = TaskTracker::new();
    let drivers = TaskTracker::new();
    let log_tasks = TaskTracker::new();
    // Notices to other dispatchers, sent after what they announce commits;
    // ends after the writer, with whatever it committed last.
    let notices = store::notices::CloseOnDrop(store.notices());
    let mut notifier = tokio::spawn(store::notices::run(store.pool().clone(), notices.0.clone()));
    let endpoint = TaskTracker::new();
    let parts = services::Parts::build(&cfg, store, fleet, &shutdown, &loops, &log_tasks).await?;
    let endpoint_stop = CancellationToken::new();
    let _endpoint = endpoint_stop.clone().drop_guard();
    if let Some(addr) = cfg.metrics_listen.0 {
        let handle = metrics::install(&[])?;
        // Serves until this returns: probes see `shutting down` meanwhile.
        berth_common::metrics::spawn_endpoint(
            addr,
            handle,
            parts.readiness(&shutdown),
            endpoint_stop.clone(),
            &endpoint,
        )
        .await?;
    }
    // Sessions a previous process under this id still owns are released
    // before this one claims anything (so none of them is its own yet).
    janitor::release_previous(&parts.store, &parts.log, &cfg.dispatcher_id, &shutdown).await;
    let served = async {
        services::spawn_loops(&cfg, &parts, &loops, &drivers, &shutdown).await?;
        if let Some(tls) = &tls {
            loops.spawn(tls.clone().watch(shutdown.clone()));
        }
        services::serve_api(&cfg, listener, tls.as_ref(), parts, &shutdown, &loops).await
    }
    .await;
    // Each driver re-queues its session (status `rescheduling`) so another
    // dispatcher picks it up, and each loop finishes the step it is in (a
    // delivery, a fire) or leaves it to its lease; wait for all, within
    // reason.
    shutdown.cancel();
    drivers.close();
    loops.close();
    let all = async { tokio::join!(drivers.wait(), loops.wait()) };
    if tokio::time::timeout(DRIVER_SHUTDOWN_GRACE, all)
        .await
        .is_err()
    {
        tracing::warn!(
            sessions = drivers.len(),
            loops = loops.len(),
            "sessions still being handed back, or loops still running, at exit"
        );
    }
    // The writer commits what the drivers and loops appended, then stops
    // (every handle on the log is gone with them).
    log_tasks.close();
    if tokio::time::timeout(LOG_SHUTDOWN_GRACE, log_tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            tasks = log_tasks.len(),
            "the event writer or a follower still running at exit"
        );
    }
    drop(notices);
    if tokio::time::timeout(LOG_SHUTDOWN_GRACE, &mut notifier)
        .await
        .is_err()
    {
        tracing::warn!("notices to other dispatchers still being sent at exit; dropped");
        notifier.abort();
        let _ = notifier.await;
    }
    endpoint_stop.cancel();
    endpoint.close();
    endpoint.wait().await;
    served
}

/// The key that seals secrets: given (tests), a key file, or keys inline.
fn sealer(cfg: &Config) -> anyhow::Result<Arc<seal::Sealer>> {
    Ok(
        match (&cfg.sealer, &cfg.secrets_key_file, &cfg.secrets_keys) {
            (Some(s), _, _) => s.clone(),
            (None, Some(path), _) => Arc::new(seal::Sealer::from_file(path)?),
            (None, None, Some(text)) => Arc::new(
                seal::Sealer::parse(&text.0.replace(';', "\n"))
                    .map_err(|e| anyhow::anyhow!("BERTH_SECRETS_KEYS: {e}"))?,
            ),
            (None, None, None) => anyhow::bail!("--secrets-key-file is required"),
        },
    )
}

/// Makes the first fleet-admin key when there is none, and writes its token
/// to `path` (mode 0600).
async fn bootstrap_admin(store: &store::Store, path: &std::path::Path) -> anyhow::Result<()> {
    let t = auth::new_token();
    if !store
        .bootstrap_admin(&t.key_id, auth::DEFAULT_PROJECT, &t.sha256)
        .await?
    {
        tracing::info!(path = %path.display(), "a fleet-admin key exists; no bootstrap key made");
        return Ok(());
    }
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| anyhow::anyhow!("--bootstrap-token-file {}: {e}", path.display()))?;
    writeln!(f, "{}", t.token)?;
    tracing::warn!(
        key_id = %t.key_id,
        path = %path.display(),
        "no fleet-admin key existed: made one; its token is in the file (keep it safe, or revoke it once you have your own keys)"
    );
    Ok(())
}

/// How long shutdown waits for drivers to hand their sessions back.
/// Longer than a node's hand-back snapshot (the relay's 20 s).
const DRIVER_SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(25);
/// How long shutdown waits for the event writer to commit what is queued.
const LOG_SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

/// How to reach the nodes: URLs, TLS, static resolution, lease. Plaintext
/// only with `--insecure-plaintext`; https needs the TLS files.
fn fleet_config(
    cfg: &Config,
    tls: Option<Arc<berth_common::tls::LiveTls>>,
) -> anyhow::Result<nodes::FleetConfig> {
    anyhow::ensure!(
        !cfg.agent_servers.is_empty(),
        "no agent-server nodes: set AGENT_SERVERS"
    );
    let urls = cfg
        .agent_servers
        .iter()
        .map(|u| nodes::NodeUrl::parse(u.trim()))
        .collect::<anyhow::Result<Vec<_>>>()?;
    if let Some(u) = urls.iter().find(|u| !u.tls) {
        anyhow::ensure!(
            cfg.tls.insecure_plaintext,
            "AGENT_SERVERS: `{}` is plaintext; use https:// with --tls-ca/--tls-cert/--tls-key, \
             or pass --insecure-plaintext for local development",
            u.url
        );
        tracing::warn!(url = %u.url, "node link WITHOUT TLS (--insecure-plaintext): local development only");
    }
    let tls = if urls.iter().any(|u| u.tls) {
        anyhow::ensure!(
            tls.is_some(),
            "https nodes need --tls-ca, --tls-cert and --tls-key (`berth certs init` makes a development set)"
        );
        tls
    } else {
        None
    };
    Ok(nodes::FleetConfig {
        urls,
        tls,
        resolve: cfg.node_resolve.iter().cloned().collect(),
        resolve_interval: cfg.node_resolve_interval,
        lease: cfg.node_lease,
    })
}
