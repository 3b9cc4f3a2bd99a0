//! The webhook listener: `POST /hooks/{id}` over HTTP/1.1, with bounds a
//! hostile sender cannot hold open. Headers must arrive within the read
//! timeout, a declared length over the limit is refused at once (413,
//! before a byte of the body is read), and the body must arrive within the
//! read timeout too (408). Every connection is owned: shutdown closes them
//! gracefully and waits a little for the last answers.

use std::sync::Arc;
use std::time::Duration;

use axum::http::{HeaderMap, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::json;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::Webhooks;
use crate::session::limits;

/// How long shutdown waits for open connections to finish their answer.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// Serves `POST /hooks/{id}` on `listener` until `shutdown`.
pub(crate) async fn serve(
    listener: tokio::net::TcpListener,
    webhooks: Webhooks,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    use axum::extract::{Path, State};
    use axum::routing::post;
    let read_timeout = webhooks.read_timeout;
    let app = axum::Router::new()
        .route(
            "/hooks/{id}",
            post(
                |State(w): State<Arc<Webhooks>>,
                 Path(id): Path<String>,
                 headers: HeaderMap,
                 body: axum::body::Body| async move {
                    let (status, reply) = match read_body(&headers, body, w.read_timeout).await {
                        Ok(bytes) => w.deliver(&id, &headers, &bytes).await,
                        Err((status, why)) => {
                            metrics::counter!(crate::metrics::WEBHOOK_DELIVERIES, "outcome" => "invalid")
                                .increment(1);
                            (status, json!({ "error": why }))
                        }
                    };
                    (
                        status,
                        [("content-type", "application/json")],
                        format!("{reply}\n"),
                    )
                },
            ),
        )
        .with_state(Arc::new(webhooks));
    tracing::info!(addr = %listener.local_addr()?, "webhooks listening");
    let connections = TaskTracker::new();
    loop {
        let stream = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "webhook listener: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let stop = shutdown.clone();
        connections.spawn(async move {
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(read_timeout)
                .serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            let result = tokio::select! {
                r = conn.as_mut() => r,
                () = stop.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    tokio::time::timeout(CLOSE_GRACE, conn.as_mut()).await.unwrap_or(Ok(()))
                }
            };
            if let Err(e) = result {
                tracing::debug!(error = %e, "webhook connection ended");
            }
        });
    }
    connections.close();
    connections.wait().await;
    Ok(())
}

/// The body of a delivery, or the status and words that refuse it: a
/// declared length over the limit at once, before reading; a body that does
/// not arrive within `timeout`, or that is longer than it said.
async fn read_body(
    headers: &HeaderMap,
    body: axum::body::Body,
    timeout: Duration,
) -> Result<axum::body::Bytes, (StatusCode, String)> {
    let limit = limits::MESSAGE_BYTES;
    let too_large = |n: String| {
        (
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the body is {n} bytes; a delivery may be at most {limit} bytes"),
        )
    };
    let declared = headers
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if let Some(n) = declared.filter(|n| *n > limit as u64) {
        return Err(too_large(n.to_string()));
    }
    match tokio::time::timeout(timeout, axum::body::to_bytes(body, limit)).await {
        Ok(Ok(bytes)) => Ok(bytes),
        Ok(Err(_)) => Err(too_large("more than that".into())),
        Err(_) => Err((
            StatusCode::REQUEST_TIMEOUT,
            format!("the body did not arrive within {}s", timeout.as_secs_f64()),
        )),
    }
}
