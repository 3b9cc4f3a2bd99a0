//! A gRPC status as an HTTP error: the status code HTTP clients expect
//! (AIP-193's mapping) and Google's JSON error body, with the call's
//! `google.rpc` details (the reason, the field violations, when to retry).
//!
//! ```json
//! {"error": {"code": 400, "status": "INVALID_ARGUMENT",
//!   "message": "invalid spec.image: …", "reason": "INVALID_FIELD",
//!   "details": [{"@type": "type.googleapis.com/google.rpc.BadRequest",
//!                "fieldViolations": [{"field": "spec.image", "description": "…"}]}]}}
//! ```

use http::{HeaderValue, StatusCode, header};
use serde_json::{Value, json};
use tonic::{Code, Status};
use tonic_types::StatusExt;

/// HTTP's status for a gRPC code, and the code's canonical name.
pub(crate) fn http_status(code: Code) -> (StatusCode, &'static str) {
    match code {
        Code::Ok => (StatusCode::OK, "OK"),
        Code::Cancelled => (
            StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
            "CANCELLED",
        ),
        Code::Unknown => (StatusCode::INTERNAL_SERVER_ERROR, "UNKNOWN"),
        Code::InvalidArgument => (StatusCode::BAD_REQUEST, "INVALID_ARGUMENT"),
        Code::DeadlineExceeded => (StatusCode::GATEWAY_TIMEOUT, "DEADLINE_EXCEEDED"),
        Code::NotFound => (StatusCode::NOT_FOUND, "NOT_FOUND"),
        Code::AlreadyExists => (StatusCode::CONFLICT, "ALREADY_EXISTS"),
        Code::PermissionDenied => (StatusCode::FORBIDDEN, "PERMISSION_DENIED"),
        Code::ResourceExhausted => (StatusCode::TOO_MANY_REQUESTS, "RESOURCE_EXHAUSTED"),
        Code::FailedPrecondition => (StatusCode::BAD_REQUEST, "FAILED_PRECONDITION"),
        Code::Aborted => (StatusCode::CONFLICT, "ABORTED"),
        Code::OutOfRange => (StatusCode::BAD_REQUEST, "OUT_OF_RANGE"),
        Code::Unimplemented => (StatusCode::NOT_IMPLEMENTED, "UNIMPLEMENTED"),
        Code::Internal => (StatusCode::INTERNAL_SERVER_ERROR, "INTERNAL"),
        Code::Unavailable => (StatusCode::SERVICE_UNAVAILABLE, "UNAVAILABLE"),
        Code::DataLoss => (StatusCode::INTERNAL_SERVER_ERROR, "DATA_LOSS"),
        Code::Unauthenticated => (StatusCode::UNAUTHORIZED, "UNAUTHENTICATED"),
    }
}

/// The JSON body of an error (`{"error": {…}}`).
pub(crate) fn body(status: &Status) -> Value {
    let (http, name) = http_status(status.code());
    let details = status.get_error_details();
    let mut out = json!({
        "code": http.as_u16(),
        "status": name,
        "message": status.message(),
    });
    let mut extra = Vec::new();
    if let Some(info) = details.error_info() {
        out["reason"] = json!(info.reason);
        extra.push(json!({
            "@type": "type.googleapis.com/google.rpc.ErrorInfo",
            "reason": info.reason,
            "domain": info.domain,
            "metadata": info.metadata,
        }));
    }
    if let Some(bad) = details.bad_request() {
        let violations: Vec<Value> = bad
            .field_violations
            .iter()
            .map(|v| json!({"field": v.field, "description": v.description}))
            .collect();
        extra.push(json!({
            "@type": "type.googleapis.com/google.rpc.BadRequest",
            "fieldViolations": violations,
        }));
    }
    if let Some(delay) = details.retry_info().and_then(|r| r.retry_delay) {
        extra.push(json!({
            "@type": "type.googleapis.com/google.rpc.RetryInfo",
            "retryDelay": format!("{}s", delay.as_secs_f64()),
        }));
    }
    out["details"] = Value::Array(extra);
    json!({ "error": out })
}

/// The whole HTTP response of an error, with `Retry-After` when the call
/// says when to retry, and `WWW-Authenticate` when it needs a key.
pub(crate) fn response(status: &Status) -> http::Response<tonic::body::Body> {
    let (code, _) = http_status(status.code());
    let mut response = super::respond::json(code, &body(status));
    let headers = response.headers_mut();
    if let Some(delay) = status
        .get_error_details()
        .retry_info()
        .and_then(|r| r.retry_delay)
    {
        let secs = delay.as_secs() + u64::from(delay.subsec_nanos() > 0);
        headers.insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
    }
    if status.code() == Code::Unauthenticated {
        headers.insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"berth\""),
        );
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_invalid_field_is_a_400_naming_it() {
        let status = berth_common::grpc::rich_status(
            Code::InvalidArgument,
            "invalid spec.image: required",
            "INVALID_FIELD",
            Some("spec.image"),
            None,
        );
        let body = body(&status);
        assert_eq!(body["error"]["code"], 400);
        assert_eq!(body["error"]["status"], "INVALID_ARGUMENT");
        assert_eq!(body["error"]["reason"], "INVALID_FIELD");
        let violation = body["error"]["details"]
            .as_array()
            .expect("details")
            .iter()
            .find(|d| d["@type"] == "type.googleapis.com/google.rpc.BadRequest")
            .expect("a BadRequest");
        assert_eq!(violation["fieldViolations"][0]["field"], "spec.image");
    }

    #[test]
    fn a_retryable_error_says_when() {
        let status = berth_common::grpc::rich_status(
            Code::Unavailable,
            "the dispatcher cannot reach its database; retry shortly",
            "DATABASE_UNAVAILABLE",
            None,
            Some(std::time::Duration::from_millis(1500)),
        );
        let response = response(&status);
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers()[header::RETRY_AFTER], "2");
    }
}
