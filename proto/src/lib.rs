//! berth's gRPC protocols, generated at build time from `proto/` by protox and
//! tonic-prost-build (no protoc needed).
//!
//! - [`v1`]: the public API (`berth.v1.Sessions`, `berth.v1.Nodes`), served by the dispatcher.
//! - [`node::v1`]: the node API (`berth.node.v1.AgentServer`), served by agent-servers.

#![allow(clippy::all, missing_docs)]

/// The public API.
pub mod v1 {
    tonic::include_proto!("berth.v1");
}

/// The node API.
pub mod node {
    pub mod v1 {
        tonic::include_proto!("berth.node.v1");
    }
}

/// Encoded `FileDescriptorSet` of every berth proto, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/berth_descriptor.bin"));
