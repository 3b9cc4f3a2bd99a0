//! What goes into a session's container before the agent starts
//! ([`prepare`]), and what comes out when it stops ([`snapshot`]): snapshots,
//! memory stores, files, git clones and skills, all moved as tar streams
//! through the Docker API and packed by [`archive`].
//!
//! A snapshot is one tar of both writable volumes (see [`crate::layout`]),
//! entries rooted at `/` (`workspace/…`, `home/agent/…`), compressed with zstd.
//!
//! Invariants: preparation either completes or fails the start with a reason
//! naming the resource (the caller then removes the container: nothing
//! half-prepared ever runs); objects are read fully before anything is copied
//! in.

mod archive;
mod prepare;
mod snapshot;

use std::time::Duration;

use crate::layout::Layout;

pub use prepare::prepare;
pub use snapshot::{snapshot, write_back_memory};

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
}
