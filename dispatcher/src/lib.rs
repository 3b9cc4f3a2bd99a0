//! berth's dispatcher: the control plane.
//!
//! Layout, each layer using only those below it:
//! - [`api`]: thin gRPC handlers (unpack, call, map the error), and the one
//!   wire ↔ domain conversion;
//! - `sessions`, `agents`, `export`, `schedules`, `webhooks`: the
//!   operations clients call (`schedules` also fires due schedules;
//!   `webhooks` also serves deliveries on the webhook port);
//! - `queue` (claims, LISTEN), `driver` (start handshake, relay, deadlines),
//!   `janitor` (liveness, orphans, queue deadline, retention), `sampler`
//!   (gauges): the background work;
//! - `log`: the group-commit event log and its followers; `nodes`: links
//!   to the nodes and the node wire;
//! - `store`: Postgres, one file per aggregate;
//! - [`session`]: the domain types and the status machine; [`placement`]:
//!   the pure placement choice; [`metrics`], `error`, [`config`].

mod agents;
mod api;
mod audit;
pub mod auth;
pub mod config;
mod driver;
mod error;
mod export;
mod export_pdf;
mod janitor;
mod keys;
pub mod limits;
mod log;
pub mod metrics;
mod nodes;
mod outbound;
pub mod placement;
mod queue;
mod reconcile;
mod records;
mod revocations;
mod rewrap;
mod sampler;
mod schedules;
pub mod seal;
pub mod session;
mod sessions;
mod store;
mod webhooks;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use berth_common::grpc::{MAX_MESSAGE_BYTES, health_and_reflection};
use berth_proto::v1::agents_server::AgentsServer;
use berth_proto::v1::api_keys_server::ApiKeysServer;
use berth_proto::v1::audit_server::AuditServer;
use berth_proto::v1::files_server::FilesServer;
use berth_proto::v1::nodes_server::NodesServer;
use berth_proto::v1::schedules_server::SchedulesServer;
use berth_proto::v1::secrets_server::SecretsServer;
use berth_proto::v1::sessions_server::SessionsServer;
use berth_proto::v1::webhooks_server::WebhooksServer;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::Config;

/// Runs a dispatcher on `listener` against the nodes in `cfg.agent_servers`
/// until `shutdown` is cancelled.
pub async fn run(
    cfg: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    cfg.validate()?;
    let fleet = fleet_config(&cfg)?;
    let sealer = match (&cfg.sealer, &cfg.secrets_key_file, &cfg.secrets_keys) {
        (Some(s), _, _) => s.clone(),
        (None, Some(path), _) => Arc::new(seal::Sealer::from_file(path)?),
        (None, None, Some(text)) => Arc::new(
            seal::Sealer::parse(&text.0.replace(';', "\n"))
                .map_err(|e| anyhow::anyhow!("BERTH_SECRETS_KEYS: {e}"))?,
        ),
        (None, None, None) => anyhow::bail!("--secrets-key-file is required"),
    };
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
    // Every background loop, so shutdown stops and awaits each one.
    let loops = TaskTracker::new();
    loops.spawn(rewrap::run(store.clone(), shutdown.clone()));
    let authenticator = Arc::new(auth::Authenticator::new(
        store.clone(),
        cfg.allow_anonymous,
        cfg.client_identities.iter().cloned().collect(),
    ));
    loops.spawn(revocations::watch(
        store.clone(),
        authenticator.clone(),
        shutdown.clone(),
    ));
    let objects = berth_common::objects::ObjectStore::open(&cfg.objects)?;
    tracing::info!(store = ?objects, "object store");
    let log = log::EventLog::start(store.clone(), shutdown.clone());
    let nodes = nodes::Nodes::start(fleet, shutdown.clone()).await?;
    let db_ok = Arc::new(AtomicBool::new(true));
    let endpoint_stop = CancellationToken::new();
    let _endpoint = endpoint_stop.clone().drop_guard();
    if let Some(addr) = cfg.metrics_listen.0 {
        let handle = metrics::install(&[])?;
        let ready = {
            let (db_ok, shutdown) = (db_ok.clone(), shutdown.clone());
            Arc::new(move || {
                if shutdown.is_cancelled() {
                    Err("shutting down".to_string())
                } else if !db_ok.load(Ordering::Relaxed) {
                    Err("Postgres unreachable (last heartbeat failed)".to_string())
                } else {
                    Ok(())
                }
            })
        };
        // Serves until this returns: probes see `shutting down` meanwhile.
        berth_common::metrics::spawn_endpoint(addr, handle, ready, endpoint_stop.clone()).await?;
        loops.spawn(sampler::run(store.clone(), nodes.clone(), shutdown.clone()));
    }
    let ctx = Arc::new(driver::Ctx {
        store: store.clone(),
        log: log.clone(),
        nodes: nodes.clone(),
        shutdown: shutdown.clone(),
        redeliver_lost_turns: cfg.redeliver_lost_turns,
        dispatcher_id: cfg.dispatcher_id.clone(),
        inactivity_default: cfg
            .inactivity_timeout
            .unwrap_or(session::DEFAULT_INACTIVITY_TIMEOUT),
    });
    // Every running driver, so shutdown waits for each to record where its
    // session stands (handed back for another dispatcher).
    let drivers = TaskTracker::new();
    // Sessions a previous process under this id still owns are released
    // before this one claims anything (so none of them is its own yet).
    janitor::release_previous(&store, &log, &cfg.dispatcher_id, &shutdown).await;
    let wake = Arc::new(tokio::sync::Notify::new());
    // Confirms each node's current runs and fences superseded ones: a
    // confirmation lasts 3/5 of the node lease, renewed every 1/5 (so a
    // node this dispatcher would call lost has held its runs' traffic for
    // at least a heartbeat already).
    loops.spawn(reconcile::run(
        nodes.clone(),
        store.clone(),
        cfg.node_lease / 5,
        cfg.node_lease * 3 / 5,
        shutdown.clone(),
    ));
    loops.spawn(queue::listen(ctx.clone(), wake.clone()));
    loops.spawn(queue::claim_loop(
        ctx.clone(),
        cfg.dispatcher_id.clone(),
        drivers.clone(),
        wake,
        cfg.queue_poll,
    ));
    loops.spawn(
        janitor::Janitor {
            store: store.clone(),
            log: log.clone(),
            owner: cfg.dispatcher_id.clone(),
            lease: cfg.dispatcher_lease,
            retention_days: cfg.retention_days,
            db_ok,
            shutdown: shutdown.clone(),
        }
        .run(),
    );

    let (reporter, health, reflection, reflection_alpha) = health_and_reflection(&["berth.v1"])?;
    reporter
        .set_serving::<SessionsServer<api::sessions::SessionsService>>()
        .await;
    reporter
        .set_serving::<NodesServer<api::nodes::NodesService>>()
        .await;
    reporter
        .set_serving::<AgentsServer<api::agents::AgentsService>>()
        .await;
    reporter
        .set_serving::<FilesServer<api::agents::AgentsService>>()
        .await;
    reporter
        .set_serving::<ApiKeysServer<api::access::ApiKeysService>>()
        .await;
    reporter
        .set_serving::<SecretsServer<api::access::SecretsService>>()
        .await;
    let keys_svc = ApiKeysServer::new(api::access::ApiKeysService {
        store: store.clone(),
        auth: authenticator.clone(),
    });
    let secrets_svc = SecretsServer::new(api::access::SecretsService {
        store: store.clone(),
    });
    let agents_svc = api::agents::AgentsService {
        agents: agents::Agents {
            store: store.clone(),
            objects: objects.clone(),
        },
    };
    let sessions = sessions::Sessions {
        store: store.clone(),
        log,
        objects,
        nodes: nodes.clone(),
        git_allow: cfg.git_allow_hosts.clone(),
        queue_timeout: Some(cfg.queue_timeout).filter(|t| !t.is_zero()),
    };
    let audit = audit::Audit {
        store: store.clone(),
    };
    ::metrics::counter!(crate::metrics::AUDIT_FAILURES).increment(0);
    let webhooks = webhooks::Webhooks {
        store: store.clone(),
        audit: audit.clone(),
        sessions: sessions.clone(),
        tolerance: cfg.webhook_tolerance,
        read_timeout: cfg.webhook_read_timeout,
    };
    webhooks::register_metrics();
    if let Some(addr) = cfg.webhook_listen.0 {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| anyhow::anyhow!("--webhook-listen {addr}: {e}"))?;
        loops.spawn(webhooks::serve(
            listener,
            webhooks.clone(),
            shutdown.clone(),
        ));
    }
    reporter
        .set_serving::<WebhooksServer<api::webhooks::WebhooksService>>()
        .await;
    loops.spawn(
        outbound::Deliverer {
            store: store.clone(),
            timeout: cfg.subscription_timeout,
            retry_base: cfg.subscription_retry_base,
            max_attempts: cfg.subscription_max_attempts.max(1),
            concurrency: cfg.subscription_concurrency,
            shutdown: shutdown.clone(),
        }
        .run(),
    );
    let webhooks_svc = WebhooksServer::new(api::webhooks::WebhooksService {
        webhooks,
        subscriptions: outbound::Subscriptions {
            store: store.clone(),
            allow_http: cfg.subscription_allow_http_hosts.clone(),
        },
    });
    let schedules = schedules::Schedules {
        store,
        audit: audit.clone(),
        sessions: sessions.clone(),
        min_interval: cfg.schedule_min_interval,
        owner: cfg.dispatcher_id.clone(),
    };
    loops.spawn(
        schedules::Scheduler {
            schedules: schedules.clone(),
            poll: cfg.schedule_poll,
            window: cfg.schedule_catch_up_window,
            takeover: cfg.dispatcher_lease,
            shutdown: shutdown.clone(),
        }
        .run(),
    );
    reporter
        .set_serving::<SchedulesServer<api::schedules::SchedulesService>>()
        .await;
    let schedules_svc = SchedulesServer::new(api::schedules::SchedulesService { schedules });
    reporter
        .set_serving::<AuditServer<api::audit::AuditService>>()
        .await;
    let audit_svc = AuditServer::new(api::audit::AuditService {
        audit: audit.clone(),
    });
    let svc = SessionsServer::new(api::sessions::SessionsService {
        sessions,
        audit,
        shutdown: shutdown.clone(),
        auth: authenticator.clone(),
    })
    .max_decoding_message_size(MAX_MESSAGE_BYTES)
    .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let nodes_svc = NodesServer::new(api::nodes::NodesService { nodes });
    tracing::info!(addr = %listener.local_addr()?, nodes = ?cfg.agent_servers, id = %cfg.dispatcher_id, "dispatcher listening");
    let keepalive = Some(cfg.api_keepalive).filter(|k| !k.is_zero());
    let mut server = tonic::transport::Server::builder()
        .timeout(cfg.api_call_timeout)
        .http2_keepalive_interval(keepalive)
        .http2_keepalive_timeout(keepalive)
        .tcp_keepalive(keepalive)
        // grpc-web (browsers, HTTP/1.1 proxies) beside native gRPC.
        .accept_http1(true);
    if cfg.api_tls {
        let tls = cfg
            .tls
            .load()?
            .ok_or_else(|| anyhow::anyhow!("--api-tls needs --tls-ca, --tls-cert and --tls-key"))?;
        server = server.tls_config(tls.server())?;
    }
    server
        .layer(tower::util::MapResponseLayer::new(
            berth_common::grpc::client_decode_errors,
        ))
        .layer(berth_common::metrics::GrpcMetricsLayer)
        .layer(tonic_web::GrpcWebLayer::new())
        .layer(auth::AuthLayer(authenticator))
        .layer(limits::LimitsLayer::new(limits::Limits {
            per_key_rate: cfg.api_rate_limit,
            per_key_burst: cfg.api_rate_burst,
            max_in_flight: cfg.api_max_in_flight,
        }))
        .add_service(health)
        .add_service(reflection)
        .add_service(reflection_alpha)
        .add_service(svc)
        .add_service(nodes_svc)
        .add_service(keys_svc)
        .add_service(schedules_svc)
        .add_service(webhooks_svc)
        .add_service(audit_svc)
        .add_service(secrets_svc)
        .add_service(AgentsServer::new(agents_svc.clone()))
        .add_service(
            FilesServer::new(agents_svc)
                .max_decoding_message_size(session::limits::FILE_BYTES + 64 * 1024),
        )
        .serve_with_incoming_shutdown(
            // No Nagle: a small frame (one event, one ack) goes out at once instead
            // of waiting up to 40 ms for the peer's delayed ACK.
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            shutdown.cancelled_owned(),
        )
        .await?;
    // Each driver re-queues its session (status `rescheduling`) so another
    // dispatcher picks it up, and each loop finishes the step it is in (a
    // delivery, a fire) or leaves it to its lease; wait for all, within
    // reason.
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
    Ok(())
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

/// How to reach the nodes: URLs, TLS, static resolution, lease. Plaintext
/// only with `--insecure-plaintext`; https needs the TLS files.
fn fleet_config(cfg: &Config) -> anyhow::Result<nodes::FleetConfig> {
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
        let tls = cfg.tls.load()?;
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
