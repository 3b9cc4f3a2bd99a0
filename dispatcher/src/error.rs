//! The dispatcher's one error type and its one mapping to gRPC status.
//!
//! Internal details (SQL, node transport) are logged, not sent: clients get a
//! precise code and a message that says what to fix.

use uuid::Uuid;

use crate::session::{InvalidTransition, SessionStatus};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid {field}: {reason}")]
    InvalidArgument { field: &'static str, reason: String },
    #[error("session {0} not found")]
    SessionNotFound(String),
    #[error("session {id} is {status}: {what}")]
    WrongStatus {
        id: Uuid,
        status: SessionStatus,
        what: &'static str,
    },
    /// Something other than a session is missing (an agent, a file).
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    /// The request is valid but the system is not in a state to do it.
    #[error("{0}")]
    Precondition(String),
    /// The object store failed.
    #[error("object store: {0}")]
    Objects(String),
    #[error("the session changed concurrently; retry")]
    Conflict,
    /// A write from a run (placement) that a newer placement has replaced.
    #[error("session {id} has moved on to epoch {current}; this run (epoch {epoch}) is stale")]
    Superseded { id: Uuid, epoch: i64, current: i64 },
    #[error(transparent)]
    Transition(#[from] InvalidTransition),
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// This dispatcher is stopping; the call may go to another (its words
    /// say how to resume).
    #[error("{0}")]
    ShuttingDown(String),
    /// A node did not answer, or refused, a call made of it.
    #[error("{0}")]
    NodeUnavailable(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    pub fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        Self::InvalidArgument {
            field,
            reason: reason.into(),
        }
    }

    /// Whether retrying the same operation may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Unavailable(_) | Self::Conflict)
    }
}

/// Postgres error codes we act on.
mod pg_code {
    pub const FOREIGN_KEY_VIOLATION: &str = "23503";
    pub const UNIQUE_VIOLATION: &str = "23505";
    pub const SERIALIZATION_FAILURE: &str = "40001";
    pub const DEADLOCK_DETECTED: &str = "40P01";
    /// Text with a NUL byte (`invalid byte sequence for encoding "UTF8": 0x00`).
    pub const CHARACTER_NOT_IN_REPERTOIRE: &str = "22021";
    /// JSON with `\u0000`, which `jsonb` cannot hold as text.
    pub const UNTRANSLATABLE_CHARACTER: &str = "22P05";
    /// Class 08, connection exceptions.
    pub const CONNECTION_EXCEPTION_CLASS: &str = "08";
    /// The server is shutting down (`57P01`), crashed (`57P02`), is not
    /// accepting connections yet (`57P03`) or dropped the database
    /// (`57P04`). A pooled connection reports it on its next statement.
    pub const SERVER_GONE: &str = "57P";
}

impl From<berth_common::spec::FieldError> for Error {
    fn from(e: berth_common::spec::FieldError) -> Self {
        Self::InvalidArgument {
            field: e.field,
            reason: e.message,
        }
    }
}

impl From<berth_common::objects::ObjectError> for Error {
    fn from(e: berth_common::objects::ObjectError) -> Self {
        Self::Objects(e.to_string())
    }
}

impl From<sqlx::Error> for Error {
    /// Classifies database errors once, for the whole crate.
    fn from(e: sqlx::Error) -> Self {
        match &e {
            sqlx::Error::Database(db) => match db.code().as_deref() {
                Some(pg_code::SERIALIZATION_FAILURE | pg_code::DEADLOCK_DETECTED) => Self::Conflict,
                // Caught here for every field that reaches a text or jsonb
                // column; the fields people name most are checked before.
                Some(pg_code::CHARACTER_NOT_IN_REPERTOIRE | pg_code::UNTRANSLATABLE_CHARACTER) => {
                    Self::invalid(
                        "request",
                        "a text field holds a NUL character (U+0000), which cannot be stored",
                    )
                }
                // A message under a request id its session has logged (a
                // retry that raced the first call).
                Some(pg_code::UNIQUE_VIOLATION)
                    if db.constraint() == Some("events_message_request") =>
                {
                    Self::AlreadyExists(
                        "the session has a message under this request_id already".into(),
                    )
                }
                Some(pg_code::FOREIGN_KEY_VIOLATION) => foreign_key(
                    db.try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
                        .and_then(|pg| pg.detail()),
                ),
                Some(c)
                    if c.starts_with(pg_code::CONNECTION_EXCEPTION_CLASS)
                        || c.starts_with(pg_code::SERVER_GONE) =>
                {
                    Self::Unavailable(e.to_string())
                }
                _ => Self::Internal(e.to_string()),
            },
            sqlx::Error::Io(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::Tls(_) => Self::Unavailable(e.to_string()),
            _ => Self::Internal(e.to_string()),
        }
    }
}

/// What a foreign-key violation means to the caller: the record it
/// references does not exist. `detail` is Postgres's (`Key (session_id)=(…)
/// is not present in table "sessions".`).
fn foreign_key(detail: Option<&str>) -> Error {
    let detail = detail.unwrap_or_default();
    let table = detail
        .split("in table \"")
        .nth(1)
        .and_then(|t| t.split('"').next())
        .unwrap_or_default();
    let key = detail
        .split(")=(")
        .nth(1)
        .and_then(|k| k.split(')').next())
        .unwrap_or_default();
    let what = match table {
        "sessions" => return Error::SessionNotFound(key.to_string()),
        "agents" => "agent",
        "schedules" => "schedule",
        "webhooks" => "webhook",
        "subscriptions" => "subscription",
        "api_keys" => "API key",
        _ => return Error::NotFound("a record this one refers to does not exist".into()),
    };
    Error::NotFound(format!("{what} {key} not found"))
}

impl From<Error> for tonic::Status {
    /// The code and message, plus `google.rpc` details: an `ErrorInfo`
    /// reason for every error, the field at fault as a `BadRequest`
    /// violation, and `RetryInfo` where a retry may succeed.
    fn from(e: Error) -> Self {
        use berth_common::grpc::rich_status;
        use std::time::Duration;
        use tonic::Code;
        let status = |code, reason: &str| rich_status(code, e.to_string(), reason, None, None);
        match &e {
            Error::InvalidArgument { field, .. } => rich_status(
                Code::InvalidArgument,
                e.to_string(),
                "INVALID_FIELD",
                Some(field),
                None,
            ),
            Error::SessionNotFound(_) => status(Code::NotFound, "SESSION_NOT_FOUND"),
            Error::NotFound(_) => status(Code::NotFound, "NOT_FOUND"),
            Error::AlreadyExists(_) => status(Code::AlreadyExists, "ALREADY_EXISTS"),
            Error::Precondition(_) => status(Code::FailedPrecondition, "FAILED_PRECONDITION"),
            Error::Objects(_) => {
                tracing::error!(error = %e, "object store failure");
                rich_status(
                    Code::Unavailable,
                    e.to_string(),
                    "OBJECT_STORE_UNAVAILABLE",
                    None,
                    Some(Duration::from_secs(2)),
                )
            }
            Error::WrongStatus { .. } => status(Code::FailedPrecondition, "WRONG_SESSION_STATUS"),
            Error::Transition(_) => status(Code::FailedPrecondition, "INVALID_TRANSITION"),
            Error::Superseded { .. } => status(Code::FailedPrecondition, "SUPERSEDED"),
            Error::Conflict => rich_status(
                Code::Aborted,
                e.to_string(),
                "CONFLICT",
                None,
                Some(Duration::from_millis(100)),
            ),
            Error::ShuttingDown(_) => rich_status(
                Code::Unavailable,
                e.to_string(),
                "SHUTTING_DOWN",
                None,
                Some(Duration::from_secs(1)),
            ),
            Error::NodeUnavailable(_) => rich_status(
                Code::Unavailable,
                e.to_string(),
                "NODE_UNAVAILABLE",
                None,
                Some(Duration::from_secs(1)),
            ),
            Error::Unavailable(_) => {
                tracing::error!(error = %e, "database unavailable");
                rich_status(
                    Code::Unavailable,
                    "the dispatcher cannot reach its database; retry shortly",
                    "DATABASE_UNAVAILABLE",
                    None,
                    Some(Duration::from_secs(2)),
                )
            }
            Error::Internal(_) => {
                tracing::error!(error = %e, "internal error");
                rich_status(
                    Code::Internal,
                    "internal error; see the dispatcher's log",
                    "INTERNAL",
                    None,
                    None,
                )
            }
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_foreign_key_violation_names_what_is_missing() {
        let e = foreign_key(Some(
            "Key (session_id)=(01a2) is not present in table \"sessions\".",
        ));
        assert!(
            matches!(&e, Error::SessionNotFound(k) if k == "01a2"),
            "{e:?}"
        );
        let e = foreign_key(Some(
            "Key (project, agent_id)=(default, 7) is not present in table \"agents\".",
        ));
        assert_eq!(e.to_string(), "agent default, 7 not found");
        let e = foreign_key(None);
        assert_eq!(e.to_string(), "a record this one refers to does not exist");
        assert_eq!(
            tonic::Status::from(foreign_key(Some(
                "Key (schedule_id)=(9) is not present in table \"schedules\"."
            )))
            .code(),
            tonic::Code::NotFound
        );
    }

    #[test]
    fn shutting_down_is_unavailable_with_its_own_reason() {
        let status = tonic::Status::from(Error::ShuttingDown(
            "dispatcher shutting down; reconnect with after_seq=4".into(),
        ));
        assert_eq!(status.code(), tonic::Code::Unavailable);
        assert!(status.message().contains("after_seq=4"));
    }
}
