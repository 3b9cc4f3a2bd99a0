//! Shared pieces of berth that both services (and the CLI) need: telemetry,
//! gRPC server plumbing, event type names, resource names and time conversion.

pub mod events;
pub mod grpc;
pub mod names;
pub mod telemetry;
pub mod time;
