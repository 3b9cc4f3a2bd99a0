//! Dispatcher configuration: flags, each with an environment variable and a
//! default. `berth-dispatcher --help` lists them all.

use std::net::SocketAddr;
use std::time::Duration;

use berth_common::telemetry::LogFormat;

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

    /// Postgres connection URL.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://berth:berth@127.0.0.1:5432/berth"
    )]
    pub database_url: String,

    /// Largest number of Postgres connections this dispatcher holds.
    #[arg(long, env = "BERTH_DB_MAX_CONNECTIONS", default_value_t = 16)]
    pub db_max_connections: u32,

    /// Agent-server nodes, comma-separated URLs (`http://node-a:7443,http://node-b:7443`).
    /// Unset: the dispatcher runs one node in process on the local Docker daemon.
    #[arg(long, env = "AGENT_SERVERS", value_delimiter = ',')]
    pub agent_servers: Vec<String>,

    /// Session slots of the in-process node (only when AGENT_SERVERS is unset).
    #[arg(long, env = "BERTH_LOCAL_CAPACITY", default_value_t = 8)]
    pub local_capacity: u32,

    /// This dispatcher's id, recorded as the owner of the sessions it drives.
    #[arg(long, env = "BERTH_DISPATCHER_ID", default_value_t = default_id())]
    pub dispatcher_id: String,

    /// How often the queue is polled when no NOTIFY wakes it, in seconds.
    #[arg(long, env = "BERTH_QUEUE_POLL", value_parser = berth_agent_server::config::humantime_secs, default_value = "1")]
    pub queue_poll: Duration,

    /// Log format.
    #[arg(long, env = "BERTH_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
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
        for url in &self.agent_servers {
            anyhow::ensure!(
                url.starts_with("http://") || url.starts_with("https://"),
                "AGENT_SERVERS: `{url}` must start with http:// or https://"
            );
        }
        Ok(())
    }
}
