//! gRPC server plumbing shared by both services: health and reflection, and
//! the shutdown signal servers take.

use tonic_health::server::HealthReporter;

/// Largest gRPC message either side accepts: a runtime line can be long.
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

/// The domain of berth's `google.rpc.ErrorInfo` reasons.
pub const ERROR_DOMAIN: &str = "berth.dev";

/// A status with `google.rpc` details a program can act on without parsing
/// the message: an `ErrorInfo` with `reason` (e.g. `INVALID_FIELD`,
/// `RATE_LIMITED`), a `BadRequest` field violation when `field` names the
/// field at fault, and a `RetryInfo` when retrying after `retry` may
/// succeed.
pub fn rich_status(
    code: tonic::Code,
    message: impl Into<String>,
    reason: &str,
    field: Option<&str>,
    retry: Option<std::time::Duration>,
) -> tonic::Status {
    use tonic_types::{ErrorDetails, StatusExt};
    let message = message.into();
    let mut details = ErrorDetails::new();
    details.set_error_info(reason, ERROR_DOMAIN, std::collections::HashMap::new());
    if let Some(field) = field {
        details.add_bad_request_violation(field, message.clone());
    }
    if retry.is_some() {
        details.set_retry_info(retry);
    }
    tonic::Status::with_error_details(code, message, details)
}

/// The `grpc.health.v1` service and its reporter, plus gRPC reflection (v1
/// and v1alpha) over the protos of `packages` (e.g. `berth.v1` on the dispatcher's public
/// port: it lists nothing of the node API) and the health proto, so
/// `grpcurl` can list and call them.
pub fn health_and_reflection(
    packages: &[&str],
) -> anyhow::Result<(
    HealthReporter,
    tonic_health::pb::health_server::HealthServer<impl tonic_health::pb::health_server::Health>,
    tonic_reflection::server::v1::ServerReflectionServer<
        impl tonic_reflection::server::v1::ServerReflection,
    >,
    tonic_reflection::server::v1alpha::ServerReflectionServer<
        impl tonic_reflection::server::v1alpha::ServerReflection,
    >,
)> {
    let (reporter, health) = tonic_health::server::health_reporter();
    let builder = || -> anyhow::Result<_> {
        Ok(tonic_reflection::server::Builder::configure()
            .register_file_descriptor_set(served(packages)?)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET))
    };
    // v1alpha too: the stock clients of several languages (Python's
    // grpcio-reflection among them) still ask it.
    let reflection = builder()?.build_v1()?;
    let reflection_alpha = builder()?.build_v1alpha()?;
    Ok((reporter, health, reflection, reflection_alpha))
}

/// berth's descriptors of `packages`, with the well-known types they use.
fn served(packages: &[&str]) -> anyhow::Result<prost_types::FileDescriptorSet> {
    use prost::Message;
    let mut set = prost_types::FileDescriptorSet::decode(berth_proto::FILE_DESCRIPTOR_SET)?;
    set.file.retain(|f| {
        let package = f.package();
        package.starts_with("google.protobuf")
            || package == "google.api"
            || packages.contains(&package)
    });
    Ok(set)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_public_descriptors_hold_nothing_of_the_node_api() {
        let set = served(&["berth.v1"]).expect("descriptors");
        let packages: Vec<&str> = set.file.iter().map(|f| f.package()).collect();
        assert!(packages.contains(&"berth.v1"));
        assert!(
            !packages.iter().any(|p| p.starts_with("berth.node")),
            "{packages:?}"
        );
    }
}

/// A status tonic gives a message it could not decode (malformed:
/// INTERNAL; oversized: OUT_OF_RANGE) as the caller's error it is:
/// INVALID_ARGUMENT or RESOURCE_EXHAUSTED naming the limit, with an
/// `ErrorInfo`. `None` for any other status. A streaming handler applies
/// it to what its inbound stream yields mid-way.
pub fn callers_decode_error(status: &tonic::Status) -> Option<tonic::Status> {
    match status.code() {
        tonic::Code::Internal if status.message().starts_with("failed to decode Protobuf") => {
            Some(rich_status(
                tonic::Code::InvalidArgument,
                format!(
                    "the request is not a valid protobuf message of this method: {}",
                    status.message()
                ),
                "MALFORMED_REQUEST",
                None,
                None,
            ))
        }
        tonic::Code::OutOfRange
            if status
                .message()
                .contains("decoded message length too large") =>
        {
            Some(rich_status(
                tonic::Code::ResourceExhausted,
                format!(
                    "the request message is larger than the {} MiB limit ({})",
                    MAX_MESSAGE_BYTES / (1024 * 1024),
                    status.message()
                ),
                "MESSAGE_TOO_LARGE",
                None,
                None,
            ))
        }
        _ => None,
    }
}

/// Rewrites the status a request that could not be decoded gets: tonic
/// answers a malformed message INTERNAL and an oversized one OUT_OF_RANGE,
/// as if the server were at fault. They are the caller's: INVALID_ARGUMENT
/// and RESOURCE_EXHAUSTED (naming the limit), with an `ErrorInfo`. Applied
/// to every response of a server (`tower::util::MapResponseLayer`); only a
/// trailers-only answer (a unary call, or a stream's first message) carries
/// such a status in its headers.
pub fn client_decode_errors<B>(
    mut response: tonic::codegen::http::Response<B>,
) -> tonic::codegen::http::Response<B> {
    let Some(status) = tonic::Status::from_header_map(response.headers()) else {
        return response;
    };
    let Some(fixed) = callers_decode_error(&status) else {
        return response;
    };
    let headers = response.headers_mut();
    headers.remove("grpc-status-details-bin");
    if fixed.add_header(headers).is_err() {
        tracing::debug!("could not rewrite a decode error's status");
    }
    response
}

#[cfg(test)]
mod decode_tests {
    use super::*;

    fn answered(status: tonic::Status) -> tonic::Status {
        let response: tonic::codegen::http::Response<()> = client_decode_errors(status.into_http());
        tonic::Status::from_header_map(response.headers()).expect("a status")
    }

    #[test]
    fn a_request_that_cannot_be_decoded_is_the_callers_error() {
        let s = answered(tonic::Status::internal(
            "failed to decode Protobuf message: buffer underflow",
        ));
        assert_eq!(s.code(), tonic::Code::InvalidArgument, "{s:?}");
        let s = answered(tonic::Status::out_of_range(
            "Error, decoded message length too large: found 20000000 bytes, the limit is: 16777216 bytes",
        ));
        assert_eq!(s.code(), tonic::Code::ResourceExhausted, "{s:?}");
        assert!(s.message().contains("16 MiB"), "{}", s.message());
        // Everything else passes untouched.
        let s = answered(tonic::Status::internal("database on fire"));
        assert_eq!(s.code(), tonic::Code::Internal);
    }
}
