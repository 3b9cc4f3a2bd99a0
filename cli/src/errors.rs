//! The structured details of a gRPC error (`google.rpc.Status` details, as
//! the dispatcher sends them): which fields were wrong, why, and when to
//! retry.

use tonic_types::StatusExt;

/// One readable line per detail: `field spec.image: must be set`,
/// `retry after 2s`, `reason: RATE_LIMITED (berth.dev)`.
pub fn describe(status: &tonic::Status) -> Vec<String> {
    let details = status.get_error_details();
    let mut lines = Vec::new();
    if let Some(bad) = details.bad_request() {
        for v in &bad.field_violations {
            lines.push(format!("field {}: {}", v.field, v.description));
        }
    }
    if let Some(retry) = details.retry_info()
        && let Some(delay) = retry.retry_delay
    {
        lines.push(format!(
            "retry after {}",
            humantime::format_duration(std::time::Duration::from_millis(delay.as_millis() as u64))
        ));
    }
    lines
}

/// The `ErrorInfo` reason of `status` (e.g. `RATE_LIMITED`), if it has one.
pub fn reason(status: &tonic::Status) -> Option<String> {
    status
        .get_error_details()
        .error_info()
        .map(|i| i.reason.clone())
}
