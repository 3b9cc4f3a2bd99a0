//! Agent-server configuration: flags, each with an environment variable and a
//! default. `berth-agent-server --help` lists them all.

use std::net::SocketAddr;
use std::time::Duration;

use berth_common::telemetry::LogFormat;
use berth_common::tls::TlsArgs;

use std::str::FromStr;

use berth_common::time::parse_duration;

use crate::layout::Layout;

mod derived;

/// How long evicted sessions get to save their snapshots before the node
/// exits anyway (on top of `--stop-grace`).
pub const EVICT_SNAPSHOT_GRACE: Duration = Duration::from_secs(60);

pub use derived::{AgentPoolConfig, ContainerConfig, GatewayMount, PoolConfig, WorkspaceConfig};

/// Largest `--max-line-bytes`: a line travels to the dispatcher with the
/// events made from it in one gRPC message of at most
/// [`berth_common::grpc::MAX_MESSAGE_BYTES`].
pub const MAX_LINE_BYTES: usize = 6 * 1024 * 1024;

/// Configuration of one agent-server node.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "berth-agent-server",
    version,
    about = "berth node: runs agent sessions in Docker containers"
)]
pub struct Config {
    /// Address the node API (berth.node.v1.AgentServer) listens on.
    #[arg(long, env = "BERTH_NODE_LISTEN", default_value = "0.0.0.0:7443")]
    pub listen: SocketAddr,

    /// This node's id: labels its containers (`berth.node`) and names it in load
    /// reports. Must be stable across restarts so leftovers are reaped.
    /// Default: the host name (`$HOSTNAME`, else `/etc/hostname`).
    #[arg(long, env = "BERTH_NODE_ID", default_value_t = default_node_id(), hide_default_value = true)]
    pub node_id: String,

    /// Session slots on this node.
    #[arg(long, env = "BERTH_NODE_CAPACITY", default_value_t = 16)]
    pub capacity: u32,

    /// User the agent runs as inside the container (uid:gid). Never root.
    #[arg(long, env = "BERTH_AGENT_USER", default_value = "1000:1000")]
    pub agent_user: String,

    /// Writable workspace inside the container (a volume; the root filesystem is read-only).
    #[arg(long, env = "BERTH_WORKSPACE", default_value = "/workspace")]
    pub workspace: String,

    /// The agent's home directory in the container: a second writable
    /// volume. Its contents (Claude Code's session files, skills) are part of
    /// every snapshot.
    #[arg(long, env = "BERTH_AGENT_HOME", default_value = "/home/agent")]
    pub home: String,

    /// Where snapshots, memory stores and files are kept. Must be the store
    /// the dispatcher uses.
    #[command(flatten)]
    pub objects: berth_common::objects::ObjectStoreArgs,

    /// The git program used to clone git resources (on the node; containers
    /// need neither git nor network).
    #[arg(long, env = "BERTH_GIT", default_value = "git")]
    pub git_bin: String,

    /// Hosts (`HOST` or `HOST:PORT`, comma-separated) git resources may come
    /// from besides public `https://` hosts (which must also resolve to
    /// public addresses): allowlisted ones may be internal and use
    /// `http://`, `git://` or `ssh://`. Host paths and `file://` never.
    #[arg(long, env = "BERTH_GIT_ALLOW_HOSTS", value_delimiter = ',')]
    pub git_allow_hosts: Vec<String>,

    /// Longest a git clone may take, in seconds.
    #[arg(long, env = "BERTH_GIT_TIMEOUT", value_parser = parse_duration, default_value = "120")]
    pub git_timeout: Duration,

    /// Largest volume archive read for a snapshot or memory store, in bytes
    /// (uncompressed). A bigger workspace fails its snapshot with that reason.
    /// Archives stream, so this bounds time and storage, not memory.
    #[arg(long, env = "BERTH_SNAPSHOT_MAX_BYTES", default_value_t = 16 << 30)]
    pub snapshot_max_bytes: u64,

    /// Memory limit per container, in MiB (memory+swap is set to the same value).
    #[arg(long, env = "BERTH_CONTAINER_MEMORY_MIB", default_value_t = 2048)]
    pub memory_mib: i64,

    /// CPU limit per container, in cores.
    #[arg(long, env = "BERTH_CONTAINER_CPUS", default_value_t = 2.0)]
    pub cpus: f64,

    /// Process limit per container.
    #[arg(long, env = "BERTH_CONTAINER_PIDS", default_value_t = 512)]
    pub pids_limit: i64,

    /// The container's main process: it only keeps the container alive; the agent is exec'd.
    #[arg(
        long,
        env = "BERTH_KEEPALIVE_CMD",
        value_delimiter = ' ',
        default_value = "tail -f /dev/null"
    )]
    pub keepalive_cmd: Vec<String>,

    /// Docker network mode of session containers. The default, `none`,
    /// gives them only their own loopback: sandboxes reach nothing they were
    /// not granted. Containers need no network of their own (files, git
    /// clones and snapshots move through the node). A network name (e.g.
    /// `bridge`) gives them that network; empty: Docker's default.
    #[arg(long, env = "BERTH_CONTAINER_NETWORK", default_value = "none")]
    pub container_network: String,

    /// Directory of the egress gateway's per-container sockets, as this
    /// node sees it (each container gets a subdirectory, mounted read-only
    /// at `/run/berth`). The container engine must see the same directory,
    /// at `--gateway-engine-dir`. `off` disables the gateway: sessions then
    /// have no way out at all, model API included.
    #[arg(long, env = "BERTH_GATEWAY_DIR", default_value = "/run/berth/gateway")]
    pub gateway_dir: String,

    /// The gateway directory as the container engine sees it: the source
    /// path of each container's bind mount. Default: `--gateway-dir` (the
    /// host's Docker, or an engine sidecar that mounts the shared volume at
    /// the same path). Set it when the engine mounts the directory
    /// elsewhere, e.g. a Docker-in-Docker sidecar that sees the node's
    /// volume at another path.
    #[arg(long, env = "BERTH_GATEWAY_ENGINE_DIR")]
    pub gateway_engine_dir: Option<std::path::PathBuf>,

    /// The `berth-forward` binary put in each container (glibc images).
    /// Default: `berth-forward` beside this program.
    #[arg(long, env = "BERTH_GATEWAY_FORWARDER")]
    pub gateway_forwarder: Option<std::path::PathBuf>,

    /// Port the forwarder listens on in each container's loopback:
    /// `ANTHROPIC_BASE_URL` and `HTTPS_PROXY` point at it.
    #[arg(long, env = "BERTH_GATEWAY_PORT", default_value_t = 18080)]
    pub gateway_port: u16,

    /// Where the gateway sends model API requests, with the session's key.
    #[arg(
        long,
        env = "BERTH_MODEL_API_URL",
        default_value = "https://api.anthropic.com"
    )]
    pub model_api_url: String,

    /// The OTLP/gRPC collector (`http://HOST:4317`, or https) the gateway
    /// forwards agents' own telemetry to, for sessions whose agent has
    /// `telemetry` on. Defaults to `OTEL_EXPORTER_OTLP_ENDPOINT` (where the
    /// node's own traces go); unset: agents export nothing.
    #[arg(long, env = "BERTH_AGENT_TELEMETRY_ENDPOINT")]
    pub agent_telemetry_endpoint: Option<String>,

    /// Internal destinations (`HOST` or `HOST:PORT`, comma-separated) that
    /// sessions may still reach through the gateway when their egress
    /// policy allows them. Loopback, link-local and private addresses are
    /// refused otherwise, whatever a session asks.
    #[arg(long, env = "BERTH_EGRESS_ALLOW_INTERNAL", value_delimiter = ',')]
    pub egress_allow_internal: Vec<String>,

    /// Longest runtime output line kept whole, in bytes (at most 6 MiB).
    /// Longer lines become a truncated `runtime.raw` event.
    #[arg(long, env = "BERTH_MAX_LINE_BYTES", default_value_t = MAX_LINE_BYTES)]
    pub max_line_bytes: usize,

    /// How long a stopped agent gets to exit after its stdin closes, before its container is killed.
    #[arg(long, env = "BERTH_STOP_GRACE", value_parser = parse_duration, default_value = "5")]
    pub stop_grace: Duration,

    /// How long an agent goes on after its dispatcher's stream drops,
    /// waiting for the session's next owner to re-attach, in seconds. Then
    /// it is stopped with a snapshot.
    #[arg(long, env = "BERTH_REATTACH_GRACE", value_parser = parse_duration, default_value = "60")]
    pub reattach_grace: Duration,

    /// Dead man's switch: a container that has not seen this node's
    /// heartbeat for this long (a node killed with SIGKILL, or hung) stops
    /// its agent and itself, and Docker removes it with its volumes; no
    /// node restart is needed. The node touches a file in the gateway
    /// directory every sixth of it. Needs the gateway (`--gateway-dir`);
    /// `0` turns it off. Keep it well above any stall you expect a node to
    /// survive (a stalled node's containers are gone when it resumes).
    #[arg(long, env = "BERTH_DEAD_MAN_TIMEOUT", value_parser = parse_duration, default_value = "30")]
    pub dead_man_timeout: Duration,

    /// Most bytes of a session's output kept for a re-attach before the
    /// dispatcher acknowledges them; past it, the agent's output is not read
    /// until it does (backpressure, never loss).
    #[arg(long, env = "BERTH_JOURNAL_BYTES", default_value_t = 64 * 1024 * 1024)]
    pub journal_bytes: usize,

    /// Checkpoints: after a turn ends, the session's workspace and home are
    /// saved in the background (like a pause's snapshot), at most once per
    /// this many seconds, so a lost node loses at most the current turn's
    /// files. 0 = no checkpoints.
    #[arg(long, env = "BERTH_CHECKPOINT_INTERVAL", value_parser = parse_duration, default_value = "60")]
    pub checkpoint_interval: Duration,

    /// Largest checkpoint, in bytes (uncompressed volumes); a bigger one is
    /// skipped with a warning (pauses and stops still snapshot).
    #[arg(long, env = "BERTH_CHECKPOINT_MAX_BYTES", default_value_t = 256 * 1024 * 1024)]
    pub checkpoint_max_bytes: u64,

    /// Interval between load reports when nothing changes, in seconds.
    #[arg(long, env = "BERTH_LOAD_HEARTBEAT", value_parser = parse_duration, default_value = "1")]
    pub load_heartbeat: Duration,

    /// Warm pools, comma-separated `IMAGE=MIN[:MAX]` (e.g.
    /// `agent:latest=2:8`). Each keeps MIN..MAX containers started ahead of
    /// demand: a miss raises its target, an idle expiry lowers it. Images
    /// without a pool start cold.
    #[arg(long = "warm-pool", env = "BERTH_WARM_POOLS", value_delimiter = ',')]
    pub warm_pools: Vec<PoolSpec>,

    /// Most warm containers each pool starts per second.
    #[arg(long, env = "BERTH_WARM_REFILL_PER_SEC", default_value_t = 4.0)]
    pub warm_refill_per_sec: f64,

    /// A warm container unclaimed this long (seconds) is replaced by a fresh one.
    #[arg(long, env = "BERTH_WARM_MAX_IDLE", value_parser = parse_duration, default_value = "900")]
    pub warm_max_idle: Duration,

    /// Command run in each new warm container; it is offered only if this exits 0.
    /// Empty disables the check.
    #[arg(
        long,
        env = "BERTH_WARM_HEALTH_CMD",
        value_delimiter = ' ',
        default_value = "true"
    )]
    pub warm_health_cmd: Vec<String>,

    /// How often ready warm containers are checked for death and age, in seconds.
    #[arg(long, env = "BERTH_WARM_CHECK_INTERVAL", value_parser = parse_duration, default_value = "10")]
    pub warm_check_interval: Duration,

    /// Pre-started agent processes kept on this node over every agent, ready
    /// or starting (0 turns agent pools off). A session whose agent could
    /// use one (no resume, no resources, no env: see the README's "Warm
    /// agents") claims a container whose agent process already runs.
    #[arg(long, env = "BERTH_WARM_AGENTS", default_value_t = 4)]
    pub warm_agents: u32,

    /// Pre-started processes each agent keeps ready at the least (even
    /// when not asked for, once its first session was seen).
    #[arg(long, env = "BERTH_WARM_AGENT_MIN", default_value_t = 0)]
    pub warm_agent_min: u32,

    /// Pre-started processes each agent keeps ready at the most. A miss
    /// raises the agent's target by one, up to this; an idle expiry lowers it.
    #[arg(long, env = "BERTH_WARM_AGENT_MAX", default_value_t = 2)]
    pub warm_agent_max: u32,

    /// Agents (agent keys) remembered at once; a new one displaces the
    /// least recently used agent that holds no process.
    #[arg(long, env = "BERTH_WARM_AGENT_KEYS", default_value_t = 16)]
    pub warm_agent_keys: usize,

    /// A pre-started process unclaimed this long (seconds) is removed and
    /// its agent's target lowered; an agent not asked for this long is
    /// forgotten (a retired agent version's pool drains this way).
    #[arg(long, env = "BERTH_WARM_AGENT_MAX_IDLE", value_parser = parse_duration, default_value = "600")]
    pub warm_agent_max_idle: Duration,

    /// Most agent processes pre-started per second, over every agent.
    #[arg(long, env = "BERTH_WARM_AGENT_REFILL_PER_SEC", default_value_t = 2.0)]
    pub warm_agent_refill_per_sec: f64,

    /// mTLS for the node API.
    #[command(flatten)]
    pub tls: TlsArgs,

    /// Names a client certificate must carry to use this node (comma-separated).
    #[arg(
        long,
        env = "BERTH_TLS_ALLOWED_CLIENTS",
        value_delimiter = ',',
        default_value = berth_common::tls::DISPATCHER_NAME
    )]
    pub tls_allowed_clients: Vec<String>,

    /// Log format: `text`, or `json` (one object per line; session log lines
    /// carry `session_id`).
    #[arg(long, env = "BERTH_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Address of the HTTP endpoint with `/metrics` (Prometheus), `/healthz`
    /// (liveness) and `/readyz` (readiness: 503 while draining), or `off`.
    #[arg(long, env = "BERTH_METRICS_LISTEN", default_value = "0.0.0.0:9401")]
    pub metrics_listen: berth_common::metrics::Listen,

    /// On SIGTERM the node drains: it takes no new sessions and gives running
    /// ones this long (seconds) to finish. Then each remaining session is
    /// stopped with a snapshot and placed again on another node by its
    /// dispatcher. A second SIGTERM (or SIGINT) stops at once.
    #[arg(long, env = "BERTH_DRAIN_TIMEOUT", value_parser = parse_duration, default_value = "60")]
    pub drain_timeout: Duration,
}

fn default_node_id() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|h| h.trim().to_string())
        })
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "node".to_string())
}

/// One pool's configuration: `IMAGE=MIN[:MAX]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolSpec {
    pub image: String,
    pub min: u32,
    pub max: u32,
}

impl FromStr for PoolSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (image, sizes) = s
            .rsplit_once('=')
            .ok_or_else(|| format!("`{s}`: expected IMAGE=MIN[:MAX], e.g. `agent:latest=2:8`"))?;
        let image = image.trim();
        if image.is_empty() {
            return Err(format!("`{s}`: the image is empty"));
        }
        let number = |n: &str| {
            n.trim()
                .parse::<u32>()
                .map_err(|_| format!("`{s}`: `{n}` is not a whole number"))
        };
        let (min, max) = match sizes.split_once(':') {
            Some((min, max)) => (number(min)?, number(max)?),
            None => {
                let min = number(sizes)?;
                (min, min)
            }
        };
        if max < min || max == 0 {
            return Err(format!("`{s}`: MAX must be at least MIN and at least 1"));
        }
        Ok(Self {
            image: image.to_string(),
            min,
            max,
        })
    }
}

impl Config {
    /// A configuration with every default, for tests and the in-process node.
    /// Where agents' own telemetry goes: `--agent-telemetry-endpoint`,
    /// else `OTEL_EXPORTER_OTLP_ENDPOINT`.
    pub fn agent_telemetry(&self) -> Option<String> {
        self.agent_telemetry_endpoint
            .clone()
            .or_else(|| std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT").ok())
            .filter(|e| !e.trim().is_empty())
    }

    pub fn defaults() -> Self {
        <Self as clap::Parser>::parse_from(["berth-agent-server"])
    }

    /// What the container runtime needs.
    pub fn container(&self) -> ContainerConfig {
        ContainerConfig {
            node_id: self.node_id.clone(),
            agent_user: self.agent_user.clone(),
            workspace: self.workspace.clone(),
            home: self.home.clone(),
            memory_mib: self.memory_mib,
            cpus: self.cpus,
            pids_limit: self.pids_limit,
            keepalive_cmd: self.keepalive_cmd.clone(),
            network: Some(self.container_network.clone()).filter(|n| !n.is_empty()),
            gateway: self.gateway_mount(),
        }
    }

    /// The gateway's mount, or `None` when it is off.
    pub fn gateway_mount(&self) -> Option<GatewayMount> {
        if self.gateway_dir == "off" {
            return None;
        }
        let forwarder = self.gateway_forwarder.clone().unwrap_or_else(|| {
            std::env::current_exe()
                .map(|e| e.with_file_name("berth-forward"))
                .unwrap_or_else(|_| "berth-forward".into())
        });
        Some(GatewayMount {
            root: self.gateway_dir.clone().into(),
            engine_root: self
                .gateway_engine_dir
                .clone()
                .unwrap_or_else(|| self.gateway_dir.clone().into()),
            forwarder,
            port: self.gateway_port,
            dead_man: Some(self.dead_man_timeout).filter(|t| !t.is_zero()),
        })
    }

    /// What the warm pools need.
    pub fn pools(&self) -> PoolConfig {
        PoolConfig {
            pools: self.warm_pools.clone(),
            refill_per_sec: self.warm_refill_per_sec,
            max_idle: self.warm_max_idle,
            health_cmd: self.warm_health_cmd.clone(),
            check_interval: self.warm_check_interval,
        }
    }

    /// What the agent pools need.
    pub fn agent_pools(&self) -> AgentPoolConfig {
        AgentPoolConfig {
            total: self.warm_agents,
            min: self.warm_agent_min,
            max: self.warm_agent_max,
            max_keys: self.warm_agent_keys,
            max_idle: self.warm_agent_max_idle,
            refill_per_sec: self.warm_agent_refill_per_sec,
            check_interval: self.warm_check_interval,
        }
    }

    /// What moving workspaces in and out needs.
    pub fn workspace(&self) -> WorkspaceConfig {
        WorkspaceConfig {
            layout: Layout::new(&self.agent_user, &self.workspace, &self.home),
            snapshot_max_bytes: self.snapshot_max_bytes,
            git_bin: self.git_bin.clone(),
            git_timeout: self.git_timeout,
            git_allow: self.git_allow_hosts.clone(),
            gateway_port: (self.gateway_dir != "off").then_some(self.gateway_port),
        }
    }

    /// `--warm-health-cmd ""` means no check.
    pub fn normalize(&mut self) {
        self.warm_health_cmd.retain(|a| !a.is_empty());
    }

    /// Checks values clap cannot, naming the offending field.
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(self.capacity > 0, "--capacity must be at least 1");
        anyhow::ensure!(
            self.dead_man_timeout.is_zero() || self.dead_man_timeout >= Duration::from_secs(3),
            "--dead-man-timeout must be 0 (off) or at least 3 seconds"
        );
        anyhow::ensure!(!self.node_id.is_empty(), "--node-id must not be empty");
        anyhow::ensure!(
            !self.agent_user.is_empty()
                && !self.agent_user.starts_with("0:")
                && self.agent_user != "0"
                && self.agent_user != "root",
            "--agent-user must be a non-root uid:gid, got `{}`",
            self.agent_user
        );
        anyhow::ensure!(self.memory_mib >= 16, "--memory-mib must be at least 16");
        anyhow::ensure!(self.cpus > 0.0, "--cpus must be positive");
        anyhow::ensure!(self.pids_limit > 0, "--pids-limit must be positive");
        anyhow::ensure!(
            !self.keepalive_cmd.is_empty(),
            "--keepalive-cmd must not be empty"
        );
        anyhow::ensure!(
            self.journal_bytes >= 2 * berth_common::grpc::MAX_MESSAGE_BYTES,
            "--journal-bytes must be at least {} (two of the largest frames)",
            2 * berth_common::grpc::MAX_MESSAGE_BYTES
        );
        anyhow::ensure!(
            (1024..=MAX_LINE_BYTES).contains(&self.max_line_bytes),
            "--max-line-bytes must be between 1024 and {MAX_LINE_BYTES} (a line and its events travel in one gRPC message)"
        );
        anyhow::ensure!(
            self.warm_refill_per_sec > 0.0 && self.warm_refill_per_sec.is_finite(),
            "--warm-refill-per-sec must be positive"
        );
        anyhow::ensure!(
            !self.warm_max_idle.is_zero(),
            "--warm-max-idle must be positive"
        );
        anyhow::ensure!(
            self.warm_agent_refill_per_sec > 0.0 && self.warm_agent_refill_per_sec.is_finite(),
            "--warm-agent-refill-per-sec must be positive"
        );
        anyhow::ensure!(
            self.warm_agent_min <= self.warm_agent_max,
            "--warm-agent-min ({}) must not exceed --warm-agent-max ({})",
            self.warm_agent_min,
            self.warm_agent_max
        );
        anyhow::ensure!(
            !self.warm_agent_max_idle.is_zero(),
            "--warm-agent-max-idle must be positive"
        );
        anyhow::ensure!(
            !self.warm_check_interval.is_zero(),
            "--warm-check-interval must be positive"
        );
        let mut images: Vec<&str> = self.warm_pools.iter().map(|p| p.image.as_str()).collect();
        images.sort_unstable();
        if let Some(w) = images.windows(2).find(|w| w[0] == w[1]) {
            anyhow::bail!("--warm-pool: `{}` is configured twice", w[0]);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_specs_parse_with_and_without_a_max() {
        assert_eq!(
            "berth-test-agent:latest=2:8".parse::<PoolSpec>(),
            Ok(PoolSpec {
                image: "berth-test-agent:latest".into(),
                min: 2,
                max: 8
            })
        );
        assert_eq!(
            "registry:5000/agent=3"
                .parse::<PoolSpec>()
                .map(|p| (p.min, p.max)),
            Ok((3, 3))
        );
        for bad in [
            "agent",
            "=2",
            "agent=x",
            "agent=4:2",
            "agent=0",
            "agent=1:y",
        ] {
            assert!(bad.parse::<PoolSpec>().is_err(), "{bad} should not parse");
        }
        assert_eq!("agent=0:4".parse::<PoolSpec>().map(|p| p.min), Ok(0));
    }
}
