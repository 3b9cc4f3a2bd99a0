//! The public gRPC API: thin handlers that unpack, call [`crate::ops::sessions`],
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

/// A server stream of `T` as the generated services take it.
type BoxStream<T> =
    std::pin::Pin<Box<dyn futures::Stream<Item = std::result::Result<T, tonic::Status>> + Send>>;
