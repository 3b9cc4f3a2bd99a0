//! What goes into a session's container before the agent starts
//! ([`prepare`]), and what comes out when it stops ([`snapshot`]): snapshots,
//! memory stores, files, git clones and skills, all moved as tar streams
//! through the Docker API and packed by [`archive`].
//!
//! A snapshot is one tar of both writable volumes (see [`crate::layout`]),
//! entries rooted at `/` (`workspace/…`, `home/agent/…`), compressed with zstd.
//!
//! Snapshots and memory stores stream (Docker → tar → zstd → S3 multipart,
//! and back) in bounded memory: a few MiB per copy, whatever the size.
//!
//! Invariants: preparation either completes or fails the start with a reason
//! naming the resource (the caller then removes the container: nothing
//! half-prepared ever runs); a saved object replaces the previous one only
//! once it is whole.

mod archive;
mod pipe;
mod prepare;
mod restore;
mod snapshot;

pub use prepare::prepare;
pub use snapshot::{snapshot, write_back_memory};
