//! The HTTP responses the API builds itself.

use http::{HeaderValue, StatusCode, header};

/// `value` as the JSON body of a `code` response.
pub(crate) fn json(
    code: StatusCode,
    value: &serde_json::Value,
) -> http::Response<tonic::body::Body> {
    bytes(
        code,
        "application/json",
        serde_json::to_vec(value).unwrap_or_default(),
    )
}

/// `body` as a `code` response of `content_type`.
pub(crate) fn bytes(
    code: StatusCode,
    content_type: &'static str,
    body: impl Into<bytes::Bytes>,
) -> http::Response<tonic::body::Body> {
    let mut response = http::Response::new(tonic::body::Body::new(http_body_util::Full::new(
        body.into(),
    )));
    *response.status_mut() = code;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}
