//! What a dispatcher runs, built in one place:
//! - [`Parts`]: the store, the event log, the node links and the operations
//!   clients call;
//! - [`spawn_loops`]: every background loop, on one tracker, stopped by one
//!   token (shutdown awaits them all);
//! - [`serve_api`]: every gRPC service from one list, each registered with
//!   the health service as it is added, and the HTTP/JSON API over them.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use berth_common::grpc::{MAX_MESSAGE_BYTES, health_and_reflection};
use berth_common::tls::LiveTls;
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
use tonic::server::NamedService;

use crate::access::{auth, revocations};
use crate::config::Config;
use crate::loops::{janitor, queue, reconcile, rewrap, sampler};
use crate::ops::{agents, audit, outbound, schedules, sessions, webhooks};
use crate::{api, driver, log, nodes, session, store};

/// The dispatcher's long-lived parts, shared by its loops and its API.
pub(crate) struct Parts {
    pub store: store::Store,
    pub authenticator: Arc<auth::Authenticator>,
    pub nodes: Arc<nodes::Nodes>,
    pub log: Arc<log::EventLog>,
    pub sessions: sessions::Sessions,
    pub agents: agents::Agents,
    pub audit: audit::Audit,
    pub webhooks: webhooks::Webhooks,
    pub schedules: schedules::Schedules,
    pub driver: Arc<driver::Ctx>,
    /// Whether the janitor's last heartbeat reached Postgres (readiness).
    pub db_ok: Arc<AtomicBool>,
    /// Sessions claimed as they were created, for the claim loop (taken
    /// when it starts).
    pub handed_off: std::sync::Mutex<Option<crate::handoff::HandedOff>>,
}

impl Parts {
    /// Builds the parts: the node links' loops start on `loops`, the event
    /// log's writer and followers on `log_tasks` (awaited last, once every
    /// other task that appends has ended).
    pub async fn build(
        cfg: &Config,
        store: store::Store,
        fleet: nodes::FleetConfig,
        shutdown: &CancellationToken,
        loops: &TaskTracker,
        log_tasks: &TaskTracker,
    ) -> anyhow::Result<Self> {
        let authenticator = Arc::new(auth::Authenticator::new(
            store.clone(),
            cfg.allow_anonymous,
            cfg.client_identities.iter().cloned().collect(),
        ));
        let objects = berth_common::objects::ObjectStore::open(&cfg.objects).await?;
        tracing::info!(store = ?objects, "object store");
        let log = log::EventLog::start(store.clone(), shutdown.clone(), log_tasks.clone());
        let nodes = nodes::Nodes::start(fleet, shutdown.clone(), loops.clone()).await?;
        let audit = audit::Audit {
            store: store.clone(),
        };
        let (handoff, handed_off) = crate::handoff::channel(&cfg.dispatcher_id);
        let sessions = sessions::Sessions {
            handoff,
            audit: audit.clone(),
            store: store.clone(),
            log: log.clone(),
            objects: objects.clone(),
            nodes: nodes.clone(),
            git_allow: cfg.git_allow_hosts.clone(),
            queue_timeout: Some(cfg.queue_timeout).filter(|t| !t.is_zero()),
        };
        let webhooks = webhooks::Webhooks {
            store: store.clone(),
            audit: audit.clone(),
            sessions: sessions.clone(),
            tolerance: cfg.webhook_tolerance,
            read_timeout: cfg.webhook_read_timeout,
            slack_api: cfg.slack_api_url.clone(),
        };
        let schedules = schedules::Schedules {
            store: store.clone(),
            audit: audit.clone(),
            sessions: sessions.clone(),
            min_interval: cfg.schedule_min_interval,
            owner: cfg.dispatcher_id.clone(),
        };
        let driver = Arc::new(driver::Ctx {
            store: store.clone(),
            log: log.clone(),
            nodes: nodes.clone(),
            shutdown: shutdown.clone(),
            redeliver_lost_turns: cfg.redeliver_lost_turns,
            dispatcher_id: cfg.dispatcher_id.clone(),
            oauth: crate::ops::oauth::OAuth::new(store.clone(), cfg.dispatcher_id.clone())?,
            inactivity_default: cfg
                .inactivity_timeout
                .unwrap_or(session::DEFAULT_INACTIVITY_TIMEOUT),
        });
        Ok(Self {
            agents: agents::Agents {
                store: store.clone(),
                objects,
                audit: audit.clone(),
            },
            store,
            authenticator,
            nodes,
            log,
            sessions,
            audit,
            webhooks,
            schedules,
            driver,
            db_ok: Arc::new(AtomicBool::new(true)),
            handed_off: std::sync::Mutex::new(Some(handed_off)),
        })
    }

    /// Readiness: not shutting down, and Postgres answered last time.
    pub fn readiness(
        &self,
        shutdown: &CancellationToken,
    ) -> Arc<dyn Fn() -> Result<(), String> + Send + Sync> {
        let (db_ok, shutdown) = (self.db_ok.clone(), shutdown.clone());
        Arc::new(move || {
            if shutdown.is_cancelled() {
                Err("shutting down".to_string())
            } else if !db_ok.load(Ordering::Relaxed) {
                Err("Postgres unreachable (last heartbeat failed)".to_string())
            } else {
                Ok(())
            }
        })
    }
}

/// Starts every background loop on `loops` (sessions this dispatcher
/// claims run on `drivers`). Each ends when `shutdown` is cancelled.
impl Parts {
    /// The secret operations.
    fn secrets(&self, cfg: &Config) -> crate::ops::access::Secrets {
        crate::ops::access::Secrets {
            store: self.store.clone(),
            audit: self.audit.clone(),
            oauth_allow_http: cfg.oauth_allow_http_hosts.clone(),
        }
    }
}

pub(crate) async fn spawn_loops(
    cfg: &Config,
    parts: &Parts,
    loops: &TaskTracker,
    drivers: &TaskTracker,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let store = &parts.store;
    loops.spawn(rewrap::run(store.clone(), shutdown.clone()));
    loops.spawn(revocations::watch(
        store.clone(),
        parts.authenticator.clone(),
        shutdown.clone(),
    ));
    if cfg.metrics_listen.0.is_some() {
        loops.spawn(sampler::run(
            store.clone(),
            parts.nodes.clone(),
            shutdown.clone(),
        ));
    }
    // Confirms each node's current runs and fences superseded ones: a
    // confirmation lasts 3/5 of the node lease, renewed every 1/5 (so a
    // node this dispatcher would call lost has held its runs' traffic for
    // at least a heartbeat already).
    loops.spawn(reconcile::run(
        parts.nodes.clone(),
        store.clone(),
        cfg.node_lease / 5,
        cfg.node_lease * 3 / 5,
        shutdown.clone(),
    ));
    let wake = Arc::new(tokio::sync::Notify::new());
    loops.spawn(queue::listen(parts.driver.clone(), wake.clone()));
    let handed_off = berth_common::sync::lock(&parts.handed_off)
        .take()
        .ok_or_else(|| anyhow::anyhow!("the loops were started twice"))?;
    loops.spawn(queue::claim_loop(
        parts.driver.clone(),
        cfg.dispatcher_id.clone(),
        drivers.clone(),
        queue::Wakes {
            wake,
            handed_off,
            poll: cfg.queue_poll,
        },
    ));
    loops.spawn(
        janitor::Janitor {
            store: store.clone(),
            log: parts.log.clone(),
            owner: cfg.dispatcher_id.clone(),
            lease: cfg.dispatcher_lease,
            retention_days: cfg.retention_days,
            db_ok: parts.db_ok.clone(),
            shutdown: shutdown.clone(),
        }
        .run(),
    );
    if let Some(addr) = cfg.webhook_listen.0 {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|e| anyhow::anyhow!("--webhook-listen {addr}: {e}"))?;
        loops.spawn(webhooks::serve(
            listener,
            parts.webhooks.clone(),
            shutdown.clone(),
        ));
    }
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
    loops.spawn(
        crate::ops::slack_replies::SlackReplies {
            store: store.clone(),
            api: cfg.slack_api_url.clone(),
            owner: cfg.dispatcher_id.clone(),
            shutdown: shutdown.clone(),
        }
        .run(),
    );
    loops.spawn(
        schedules::Scheduler {
            schedules: parts.schedules.clone(),
            poll: cfg.schedule_poll,
            window: cfg.schedule_catch_up_window,
            takeover: cfg.dispatcher_lease,
            shutdown: shutdown.clone(),
        }
        .run(),
    );
    Ok(())
}

/// The API's services: each added once, and reported serving by the
/// health service under its own name.
#[derive(Default)]
struct Services {
    routes: tonic::service::RoutesBuilder,
    names: Vec<&'static str>,
}

impl Services {
    fn add<S>(&mut self, svc: S) -> &mut Self
    where
        S: tower::Service<
                http::Request<tonic::body::Body>,
                Error = Infallible,
                Response = http::Response<tonic::body::Body>,
            > + NamedService
            + Clone
            + Send
            + Sync
            + 'static,
        S::Future: Send + 'static,
    {
        self.names.push(S::NAME);
        self.routes.add_service(svc);
        self
    }
}

/// Serves the public API on `listener` until `shutdown` is cancelled (over
/// mTLS with `tls` under `--api-tls`); the tasks its streams start run on
/// `loops`.
pub(crate) async fn serve_api(
    cfg: &Config,
    listener: TcpListener,
    tls: Option<&Arc<LiveTls>>,
    parts: Parts,
    shutdown: &CancellationToken,
    loops: &TaskTracker,
) -> anyhow::Result<()> {
    let (reporter, health, reflection, reflection_alpha) = health_and_reflection(&["berth.v1"])?;
    let store = &parts.store;
    let agents = api::agents::AgentsService {
        agents: parts.agents.clone(),
    };
    let mut services = Services::default();
    services
        .add(
            SessionsServer::new(api::sessions::SessionsService {
                sessions: parts.sessions.clone(),
                shutdown: shutdown.clone(),
                auth: parts.authenticator.clone(),
                tasks: loops.clone(),
            })
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES),
        )
        .add(NodesServer::new(api::nodes::NodesService {
            nodes: parts.nodes.clone(),
        }))
        .add(ApiKeysServer::new(api::access::ApiKeysService {
            keys: crate::ops::access::Keys {
                store: store.clone(),
                audit: parts.audit.clone(),
                auth: parts.authenticator.clone(),
            },
        }))
        .add(SecretsServer::new(api::access::SecretsService {
            secrets: parts.secrets(cfg),
        }))
        .add(SchedulesServer::new(api::schedules::SchedulesService {
            schedules: parts.schedules.clone(),
        }))
        .add(WebhooksServer::new(api::webhooks::WebhooksService {
            webhooks: parts.webhooks.clone(),
            subscriptions: outbound::Subscriptions {
                store: store.clone(),
                audit: parts.audit.clone(),
                allow_http: cfg.subscription_allow_http_hosts.clone(),
            },
        }))
        .add(AuditServer::new(api::audit::AuditService {
            audit: parts.audit.clone(),
        }))
        .add(AgentsServer::new(agents.clone()))
        .add(
            FilesServer::new(agents)
                .max_decoding_message_size(session::limits::FILE_BYTES + 64 * 1024),
        );
    for name in &services.names {
        reporter
            .set_service_status(name, tonic_health::ServingStatus::Serving)
            .await;
    }
    tracing::info!(addr = %listener.local_addr()?, nodes = ?cfg.agent_servers, id = %cfg.dispatcher_id, "dispatcher listening");
    let keepalive = Some(cfg.api_keepalive).filter(|k| !k.is_zero());
    let server = tonic::transport::Server::builder()
        .timeout(cfg.api_call_timeout)
        .http2_keepalive_interval(keepalive)
        .http2_keepalive_timeout(keepalive)
        .tcp_keepalive(keepalive)
        // grpc-web (browsers, HTTP/1.1 proxies) beside native gRPC.
        .accept_http1(true)
        // A span per call, in the caller's trace (`traceparent`).
        .trace_fn(berth_common::traces::server_span);
    let api_tls = match (cfg.api_tls, tls) {
        (false, _) => None,
        (true, Some(tls)) => Some(tls.clone()),
        (true, None) => anyhow::bail!("--api-tls needs --tls-ca, --tls-cert and --tls-key"),
    };
    let router = server
        // The HTTP/JSON API (`/v1/…`, `/openapi.json`): outermost, so each
        // of its calls goes through every layer below as a gRPC call.
        .layer(crate::http::HttpLayer(crate::http::Api::new(
            parts.authenticator.clone(),
        )?))
        .layer(tower::util::MapResponseLayer::new(
            berth_common::grpc::client_decode_errors,
        ))
        .layer(berth_common::metrics::GrpcMetricsLayer)
        .layer(tonic_web::GrpcWebLayer::new())
        .layer(auth::AuthLayer(parts.authenticator.clone()))
        .layer(crate::access::limits::LimitsLayer::new(
            crate::access::limits::Limits {
                per_key_rate: cfg.api_rate_limit,
                per_key_burst: cfg.api_rate_burst,
                max_in_flight: cfg.api_max_in_flight,
            },
        ))
        .add_routes(services.routes.routes())
        .add_service(health)
        .add_service(reflection)
        .add_service(reflection_alpha);
    // No Nagle either way: a small frame (one event, one ack) goes out at
    // once instead of waiting up to 40 ms for the peer's delayed ACK.
    match api_tls {
        // Each handshake takes the current certificate (see LiveTls).
        Some(tls) => {
            let incoming = berth_common::tls::incoming(listener, tls, shutdown.clone(), loops);
            router
                .serve_with_incoming_shutdown(incoming, shutdown.clone().cancelled_owned())
                .await?;
        }
        None => {
            let incoming =
                tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
            router
                .serve_with_incoming_shutdown(incoming, shutdown.clone().cancelled_owned())
                .await?;
        }
    }
    Ok(())
}
