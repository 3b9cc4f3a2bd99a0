//! The public gRPC API: thin handlers that unpack, call [`crate::sessions`],
//! and map the error.

pub mod access;
pub mod agents;
pub mod audit;
mod connect;
pub mod convert;
pub mod nodes;
pub mod pages;
pub mod schedules;
pub mod sessions;
mod steer;
pub mod webhooks;
