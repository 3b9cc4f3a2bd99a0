//! The agent-server's one error type and its mapping to gRPC status.

/// Everything that can go wrong on a node.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A request field is missing or malformed.
    #[error("invalid {field}: {reason}")]
    Invalid { field: &'static str, reason: String },
    /// The image is not present on this node. Nodes never pull.
    #[error(
        "image `{0}` is not present on this node; build or load it there first (nodes never pull)"
    )]
    ImageNotFound(String),
    /// A Docker call failed.
    #[error("docker: {0}")]
    Docker(String),
    /// The dispatcher's frames broke the protocol.
    #[error("protocol: {0}")]
    Protocol(String),
}

impl Error {
    /// An invalid-argument error naming `field`.
    pub fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        Self::Invalid {
            field,
            reason: reason.into(),
        }
    }
}

impl From<berth_common::spec::FieldError> for Error {
    fn from(e: berth_common::spec::FieldError) -> Self {
        Self::Invalid {
            field: e.field,
            reason: e.message,
        }
    }
}

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        match &e {
            Error::Invalid { .. } => tonic::Status::invalid_argument(e.to_string()),
            Error::ImageNotFound(_) => tonic::Status::failed_precondition(e.to_string()),
            Error::Protocol(_) => tonic::Status::failed_precondition(e.to_string()),
            Error::Docker(_) => {
                tracing::error!(error = %e, "docker failure");
                tonic::Status::unavailable(e.to_string())
            }
        }
    }
}
