//! gRPC server plumbing shared by both services: health and reflection, and
//! the shutdown signal servers take.

use tonic_health::server::HealthReporter;

/// Largest gRPC message either side accepts: a runtime line can be long.
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

/// The `grpc.health.v1` service and its reporter, plus gRPC reflection over
/// berth's protos and the health proto, so `grpcurl` can list and call them.
pub fn health_and_reflection() -> anyhow::Result<(
    HealthReporter,
    tonic_health::pb::health_server::HealthServer<impl tonic_health::pb::health_server::Health>,
    tonic_reflection::server::v1::ServerReflectionServer<
        impl tonic_reflection::server::v1::ServerReflection,
    >,
)> {
    let (reporter, health) = tonic_health::server::health_reporter();
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(berth_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    Ok((reporter, health, reflection))
}
