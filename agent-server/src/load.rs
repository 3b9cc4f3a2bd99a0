//! The node's load as it reports it to dispatchers.

/// A point-in-time view of the node's load.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Load {
    pub capacity: u32,
    pub running: u32,
    pub draining: bool,
    /// Warm containers ready per image, sorted by image.
    pub warm: Vec<(String, u32)>,
    /// Pre-started agent processes ready per agent key: (key, image, ready).
    pub warm_agents: Vec<(String, String, u32)>,
    pub cpu_utilization: f64,
    pub memory_used_bytes: u64,
    pub memory_total_bytes: u64,
}
