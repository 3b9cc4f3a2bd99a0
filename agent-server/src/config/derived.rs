//! What each part of the node needs of its configuration, derived from the
//! flags by [`super::Config`]'s methods.

use std::time::Duration;

use super::PoolSpec;
use crate::layout::Layout;

/// What the container runtime needs of the node's configuration.
#[derive(Debug, Clone)]
pub struct ContainerConfig {
    /// Labels every container (`berth.node`), so a restarted node reaps its own.
    pub node_id: String,
    /// uid:gid the agent runs as (never root).
    pub agent_user: String,
    /// The two writable volumes.
    pub workspace: String,
    pub home: String,
    /// Default limits per container.
    pub memory_mib: i64,
    pub cpus: f64,
    pub pids_limit: i64,
    /// The container's main process (it only keeps the container alive).
    pub keepalive_cmd: Vec<String>,
    /// Docker network mode; `None` is Docker's default.
    pub network: Option<String>,
    /// The egress gateway's directory and forwarder; `None`: no gateway.
    pub gateway: Option<GatewayMount>,
}

/// Where each container's gateway directory is made, and what runs there.
#[derive(Debug, Clone)]
pub struct GatewayMount {
    /// The directory as the node sees it.
    pub root: std::path::PathBuf,
    /// The same directory as the container engine sees it.
    pub engine_root: std::path::PathBuf,
    pub forwarder: std::path::PathBuf,
    pub port: u16,
    /// The dead man's switch's timeout; `None`: off.
    pub dead_man: Option<Duration>,
}

/// What the warm pools need of the node's configuration.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    pub pools: Vec<PoolSpec>,
    /// Most containers each pool starts per second.
    pub refill_per_sec: f64,
    /// A container unclaimed this long is replaced.
    pub max_idle: Duration,
    /// Run in each new container; it is offered only if this exits 0 (empty: no check).
    pub health_cmd: Vec<String>,
    /// How often ready containers are checked for death and age.
    pub check_interval: Duration,
}

/// What the agent pools need of the node's configuration.
#[derive(Debug, Clone)]
pub struct AgentPoolConfig {
    /// Processes ready or starting over every agent (0: off).
    pub total: u32,
    pub min: u32,
    pub max: u32,
    pub max_keys: usize,
    pub max_idle: Duration,
    pub refill_per_sec: f64,
    /// How often ready processes are checked for death and age.
    pub check_interval: Duration,
}

/// What moving workspaces in and out needs to know.
#[derive(Debug, Clone)]
pub struct WorkspaceConfig {
    pub layout: Layout,
    /// Largest volume archive read for a snapshot or memory store (uncompressed).
    pub snapshot_max_bytes: u64,
    /// The git program that clones git resources on the node.
    pub git_bin: String,
    /// Longest a git clone may take.
    pub git_timeout: Duration,
    /// Hosts git resources may come from beyond public https.
    pub git_allow: Vec<String>,
    /// The gateway's port in containers, when there is a gateway: a
    /// checkout cloned with a credential has its `origin` there.
    pub gateway_port: Option<u16>,
}
