//! Dispatcher configuration: flags, each with an environment variable and a
//! default. `berth-dispatcher --help` lists them all.

use std::net::SocketAddr;
use std::time::Duration;

use berth_common::telemetry::LogFormat;
use berth_common::tls::TlsArgs;

fn parse_resolve(s: &str) -> Result<(String, SocketAddr), String> {
    let (name, addr) = s
        .split_once('=')
        .ok_or_else(|| format!("`{s}`: expected HOST:PORT=ADDR:PORT"))?;
    if !name.contains(':') {
        return Err(format!("`{s}`: `{name}` needs a port (HOST:PORT)"));
    }
    let addr = addr
        .parse()
        .map_err(|_| format!("`{s}`: `{addr}` is not an IP:PORT address"))?;
    Ok((name.to_string(), addr))
}

/// Configuration of one dispatcher.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "berth-dispatcher",
    version,
    about = "berth control plane: queues sessions, places them on nodes, relays their events"
)]
pub struct Config {
    /// Address the public API (berth.v1.Sessions) listens on.
    #[arg(long, env = "BERTH_LISTEN", default_value = "0.0.0.0:7000")]
    pub listen: SocketAddr,

    /// Postgres connection URL. TLS as libpq's parameters say: `sslmode=require`
    /// (encrypted), or `sslmode=verify-full&sslrootcert=/path/ca.pem` (the
    /// server's certificate checked against its CA, as managed services
    /// such as RDS, Cloud SQL and Azure publish it; `sslrootcert=system`:
    /// the system's roots). `sslcert=…&sslkey=…` present a client
    /// certificate to a server that authenticates by certificate. A bad
    /// TLS parameter is refused at start, by name.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://berth:berth@127.0.0.1:5432/berth"
    )]
    pub database_url: String,

    /// Largest number of Postgres connections this dispatcher holds.
    #[arg(long, env = "BERTH_DB_MAX_CONNECTIONS", default_value_t = 16)]
    pub db_max_connections: u32,

    /// Agent-server nodes, comma-separated URLs (`https://node-a:7443,https://node-b:7443`).
    /// A name that resolves to several addresses is several nodes (a Kubernetes
    /// headless service). Unset: the dispatcher runs one node in process on the
    /// local Docker daemon, over mTLS with an ephemeral CA; that node takes the
    /// agent-server's BERTH_* variables (e.g. BERTH_WARM_POOLS).
    #[arg(long, env = "AGENT_SERVERS", value_delimiter = ',')]
    pub agent_servers: Vec<String>,

    /// Static name resolution for nodes, comma-separated `HOST:PORT=ADDR:PORT`
    /// (like curl's --resolve). TLS still verifies HOST; the connection goes to ADDR.
    #[arg(long, env = "BERTH_NODE_RESOLVE", value_delimiter = ',', value_parser = parse_resolve)]
    pub node_resolve: Vec<(String, SocketAddr)>,

    /// How often node names are re-resolved, in seconds.
    #[arg(long, env = "BERTH_NODE_RESOLVE_INTERVAL", value_parser = berth_common::time::parse_duration, default_value = "30")]
    pub node_resolve_interval: Duration,

    /// A node whose load stream is silent this long (seconds) is down, and its
    /// sessions are rescheduled. Keep it several node heartbeats long.
    #[arg(long, env = "BERTH_NODE_LEASE", value_parser = berth_common::time::parse_duration, default_value = "5")]
    pub node_lease: Duration,

    /// mTLS to the nodes: the CA, and this dispatcher's client certificate
    /// (it must carry a name the nodes allow, `berth-dispatcher` by default).
    #[command(flatten)]
    pub tls: TlsArgs,

    /// Serve the public API over mTLS too, with the same --tls-ca/--tls-cert/--tls-key:
    /// clients must present a certificate signed by the CA (`berth certs init
    /// --client NAME`) and dial the name on this dispatcher's certificate
    /// (`berth-dispatcher` by default). Off: the public API is plaintext.
    #[arg(long, env = "BERTH_API_TLS", default_value_t = false)]
    pub api_tls: bool,

    /// Longest a public API call may take before DEADLINE_EXCEEDED (a
    /// client's own shorter `grpc-timeout` wins). A streaming call counts
    /// until its stream is open, not for its life.
    #[arg(long, env = "BERTH_API_CALL_TIMEOUT", value_parser = berth_common::time::parse_duration, default_value = "60")]
    pub api_call_timeout: Duration,

    /// Public API calls in progress at once, across all callers, before new
    /// ones are shed with UNAVAILABLE (reason OVERLOADED, RetryInfo 1 s).
    #[arg(long, env = "BERTH_API_MAX_IN_FLIGHT", default_value_t = 1024)]
    pub api_max_in_flight: usize,

    /// Calls per second each caller (API key or client certificate) may
    /// make; above it, RESOURCE_EXHAUSTED (reason RATE_LIMITED) with
    /// RetryInfo saying when to retry. 0 = no limit. Per dispatcher.
    #[arg(long, env = "BERTH_API_RATE_LIMIT", default_value_t = 200)]
    pub api_rate_limit: u32,

    /// Calls a caller may make in a burst above --api-rate-limit.
    #[arg(long, env = "BERTH_API_RATE_BURST", default_value_t = 400)]
    pub api_rate_burst: u32,

    /// HTTP/2 keepalive on the public API: a PING after this long idle; a
    /// connection that does not answer within the same time is closed, so
    /// dead clients do not hold streams. 0 = off.
    #[arg(long, env = "BERTH_API_KEEPALIVE", value_parser = berth_common::time::parse_duration, default_value = "30")]
    pub api_keepalive: Duration,

    /// How often each dispatcher looks for due schedules. Every dispatcher
    /// looks; each fire is claimed once in Postgres.
    #[arg(long, env = "BERTH_SCHEDULE_POLL", value_parser = berth_common::time::parse_duration, default_value = "1")]
    pub schedule_poll: Duration,

    /// Shortest gap a schedule's cron times may have: a cron that fires more
    /// often is INVALID_ARGUMENT naming `cron`.
    #[arg(long, env = "BERTH_SCHEDULE_MIN_INTERVAL", value_parser = berth_common::time::parse_duration, default_value = "60")]
    pub schedule_min_interval: Duration,

    /// A cron time missed (no dispatcher ran) and older than this is
    /// recorded as `missed` instead of fired late. Of several missed times
    /// only the latest fires (`catch_up`); the others are counted as skipped.
    #[arg(long, env = "BERTH_SCHEDULE_CATCH_UP_WINDOW", value_parser = berth_common::time::parse_duration, default_value = "3600")]
    pub schedule_catch_up_window: Duration,

    /// Address inbound webhooks are served on (`POST /hooks/{id}`, plain
    /// HTTP: put TLS in front beyond one machine), or `off`.
    #[arg(long, env = "BERTH_WEBHOOK_LISTEN", default_value = "0.0.0.0:7080")]
    pub webhook_listen: berth_common::metrics::Listen,

    /// How far a webhook delivery's `Berth-Timestamp` may be from now
    /// before it is refused (401) as a possible replay.
    #[arg(long, env = "BERTH_WEBHOOK_TOLERANCE", value_parser = berth_common::time::parse_duration, default_value = "300")]
    pub webhook_tolerance: Duration,

    /// How long a webhook delivery's headers, and then its body, may take
    /// to arrive before the connection is closed (headers) or answered 408
    /// (body). A declared length over the limit is refused at once (413).
    #[arg(long, env = "BERTH_WEBHOOK_READ_TIMEOUT", value_parser = berth_common::time::parse_duration, default_value = "10")]
    pub webhook_read_timeout: Duration,

    /// Hosts (`HOST` or `HOST:PORT`, comma-separated) outbound webhook
    /// subscriptions may POST to over plain `http://`; every other URL must
    /// be `https://`.
    #[arg(
        long,
        env = "BERTH_SUBSCRIPTION_ALLOW_HTTP_HOSTS",
        value_delimiter = ','
    )]
    pub subscription_allow_http_hosts: Vec<String>,

    /// Hosts (`HOST` or `HOST:PORT`, comma-separated) whose OAuth token
    /// endpoints (SECRET_USAGE_OAUTH2_REFRESH credentials) may be plain
    /// `http://`; every other token endpoint must be `https://`.
    #[arg(long, env = "BERTH_OAUTH_ALLOW_HTTP_HOSTS", value_delimiter = ',')]
    pub oauth_allow_http_hosts: Vec<String>,

    /// The Slack Web API that Slack apps' replies are posted to
    /// (`{url}/chat.postMessage`). A Slack app's bot token credential must
    /// name its host.
    #[arg(
        long,
        env = "BERTH_SLACK_API_URL",
        default_value = "https://slack.com/api"
    )]
    pub slack_api_url: String,

    /// Longest an outbound webhook receiver may take to answer an attempt.
    #[arg(long, env = "BERTH_SUBSCRIPTION_TIMEOUT", value_parser = berth_common::time::parse_duration, default_value = "10")]
    pub subscription_timeout: Duration,

    /// Wait before the second attempt of a failed delivery; doubled for each
    /// attempt after (jittered, at most an hour).
    #[arg(long, env = "BERTH_SUBSCRIPTION_RETRY_BASE", value_parser = berth_common::time::parse_duration, default_value = "5")]
    pub subscription_retry_base: Duration,

    /// Attempts of a delivery before it is marked failed.
    #[arg(long, env = "BERTH_SUBSCRIPTION_MAX_ATTEMPTS", default_value_t = 10)]
    pub subscription_max_attempts: i32,

    /// Outbound deliveries one dispatcher has in flight at once.
    #[arg(long, env = "BERTH_SUBSCRIPTION_CONCURRENCY", default_value_t = 32)]
    pub subscription_concurrency: usize,

    /// Session slots of the in-process node (only when AGENT_SERVERS is unset).
    #[arg(long, env = "BERTH_LOCAL_CAPACITY", default_value_t = 8)]
    pub local_capacity: u32,

    /// This dispatcher's id, recorded as the owner of the sessions it drives.
    /// Default: `$HOSTNAME-PID` (`dispatcher-PID` without a host name); set a
    /// stable one so a restart takes its sessions back at once.
    #[arg(long, env = "BERTH_DISPATCHER_ID", default_value_t = default_id(), hide_default_value = true)]
    pub dispatcher_id: String,

    /// A dispatcher that has not heartbeated (through Postgres) for this long,
    /// in seconds, is gone: any other dispatcher re-queues its live sessions.
    /// Heartbeats go every third of it.
    #[arg(long, env = "BERTH_DISPATCHER_LEASE", value_parser = berth_common::time::parse_duration, default_value = "15")]
    pub dispatcher_lease: Duration,

    /// How often the queue is polled when no NOTIFY wakes it, in seconds.
    #[arg(long, env = "BERTH_QUEUE_POLL", value_parser = berth_common::time::parse_duration, default_value = "1")]
    pub queue_poll: Duration,

    /// Where snapshots, memory stores and uploaded files are kept. The nodes
    /// must use the same store (S3 for a fleet; a shared directory on one machine).
    #[command(flatten)]
    pub objects: berth_common::objects::ObjectStoreArgs,

    /// Default inactivity timeout in seconds (no events and no input): the
    /// session is stopped with reason `inactivity`. A session's own value
    /// wins; unset here and there, 24 hours.
    #[arg(long, env = "BERTH_INACTIVITY_TIMEOUT", value_parser = berth_common::time::parse_duration)]
    pub inactivity_timeout: Option<Duration>,

    /// Hosts (`HOST` or `HOST:PORT`, comma-separated) git resources may come
    /// from besides public `https://` hosts: allowlisted ones may be
    /// internal and use `http://`, `git://` or `ssh://`. Host paths and
    /// `file://` are never allowed. Nodes check the same with their own list.
    #[arg(long, env = "BERTH_GIT_ALLOW_HOSTS", value_delimiter = ',')]
    pub git_allow_hosts: Vec<String>,

    /// Deliver again the input of a turn lost with its node: the session,
    /// placed anew, gets the message(s) of the unfinished turn again after a
    /// `session.turn_lost` event. `false`: the event only.
    #[arg(long, env = "BERTH_REDELIVER_LOST_TURNS", default_value_t = true, action = clap::ArgAction::Set)]
    pub redeliver_lost_turns: bool,

    /// Default queue timeout in seconds: a session still pending (never
    /// placed) this long after it was queued fails. A session's own value
    /// wins. 0 = no deadline.
    #[arg(long, env = "BERTH_QUEUE_TIMEOUT", value_parser = berth_common::time::parse_duration, default_value = "3600")]
    pub queue_timeout: Duration,

    /// Days an archived session's events are kept; then they are deleted (the
    /// session row, usage totals and snapshots stay until DeleteSession).
    #[arg(long, env = "BERTH_RETENTION_DAYS", default_value_t = 30)]
    pub retention_days: u32,

    /// Key file for secrets and env values at rest (envelope encryption):
    /// one `ID:BASE64` line per 32-byte key, the first sealing, the others
    /// only opening (rotation: docs/security.md, "Secrets"). Required: make one with
    /// `printf 'k1:%s\n' "$(head -c32 /dev/urandom | base64)" > FILE`.
    #[arg(long, env = "BERTH_SECRETS_KEY_FILE")]
    pub secrets_key_file: Option<std::path::PathBuf>,

    /// The same keys given in the environment instead of a file (the
    /// file's text: `ID:BASE64` lines, or `;`-separated). Never logged.
    #[arg(
        long,
        env = "BERTH_SECRETS_KEYS",
        hide_env_values = true,
        conflicts_with = "secrets_key_file"
    )]
    pub secrets_keys: Option<Redacted>,

    /// Client-certificate identities, `NAME=PROJECT:ROLE` (comma-separated;
    /// ROLE `member` or `fleet-admin`): with `--api-tls`, a call without an
    /// API key whose CA-signed client certificate carries NAME acts as that
    /// project and role. A key, when sent, wins.
    #[arg(long = "client-identity", env = "BERTH_CLIENT_IDENTITIES", value_delimiter = ',', value_parser = crate::access::auth::parse_identity)]
    pub client_identities: Vec<(String, (String, crate::access::auth::Role))>,

    /// Accept calls without an API key, as a fleet admin of project
    /// `default`. Local development only: logged as a warning at start.
    #[arg(long, env = "BERTH_ALLOW_ANONYMOUS")]
    pub allow_anonymous: bool,

    /// When no active fleet-admin key exists, make one (project `default`)
    /// and write its token to this file (mode 0600). The first key of a new
    /// deployment; later ones come from `berth keys create`.
    #[arg(long, env = "BERTH_BOOTSTRAP_TOKEN_FILE")]
    pub bootstrap_token_file: Option<std::path::PathBuf>,

    /// Log format: `text`, or `json` (one object per line; session log lines
    /// carry `session_id`).
    #[arg(long, env = "BERTH_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Address of the HTTP endpoint with `/metrics` (Prometheus), `/healthz`
    /// (liveness) and `/readyz` (readiness: 503 while Postgres is unreachable
    /// or the dispatcher is shutting down), or `off`. With no AGENT_SERVERS
    /// it also carries the in-process node's metrics.
    #[arg(long, env = "BERTH_METRICS_LISTEN", default_value = "0.0.0.0:9400")]
    pub metrics_listen: berth_common::metrics::Listen,

    /// Keys given in process instead of `--secrets-key-file` (tests).
    #[arg(skip)]
    pub sealer: Option<std::sync::Arc<crate::seal::Sealer>>,
}

/// A value `Debug` never shows.
#[derive(Clone)]
pub struct Redacted(pub String);

impl std::fmt::Debug for Redacted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

impl std::str::FromStr for Redacted {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self(s.to_string()))
    }
}

fn default_id() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "dispatcher".into());
    format!("{host}-{}", std::process::id())
}

impl Config {
    /// Every default, for tests.
    pub fn defaults() -> Self {
        <Self as clap::Parser>::parse_from(["berth-dispatcher"])
    }

    /// Checks values clap cannot, naming the offending field.
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.db_max_connections >= 2,
            "--db-max-connections must be at least 2 (one is held for LISTEN)"
        );
        anyhow::ensure!(!self.queue_poll.is_zero(), "--queue-poll must be positive");
        anyhow::ensure!(!self.node_lease.is_zero(), "--node-lease must be positive");
        anyhow::ensure!(
            self.dispatcher_lease >= Duration::from_secs(1),
            "--dispatcher-lease must be at least 1 second"
        );
        anyhow::ensure!(
            !self.node_resolve_interval.is_zero(),
            "--node-resolve-interval must be positive"
        );
        anyhow::ensure!(
            self.secrets_key_file.is_some() || self.secrets_keys.is_some() || self.sealer.is_some(),
            "--secrets-key-file (BERTH_SECRETS_KEY_FILE) or BERTH_SECRETS_KEYS is required: secrets and env values \
             are encrypted under it. Make one with \
             `printf 'k1:%s\\n' \"$(head -c32 /dev/urandom | base64)\" > secrets.key`"
        );
        anyhow::ensure!(
            !self.api_tls || self.tls.material.is_some() || self.tls.cert.is_some(),
            "--api-tls needs --tls-ca, --tls-cert and --tls-key (the dispatcher's certificate)"
        );
        anyhow::ensure!(
            berth_common::credentials::target_of(&self.slack_api_url).is_some(),
            "--slack-api-url `{}` must be an http(s) URL with a host (default https://slack.com/api)",
            self.slack_api_url
        );
        Ok(())
    }
}
