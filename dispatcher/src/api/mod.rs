//! The public gRPC API: thin handlers that unpack, call [`crate::sessions`],
//! and map the error.

pub mod access;
pub mod agents;
pub mod audit;
pub mod convert;
pub mod nodes;
pub mod pages;
pub mod schedules;
pub mod sessions;
pub mod webhooks;
