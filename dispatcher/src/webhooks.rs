//! Inbound webhooks: an HTTP POST, signed with the webhook's secret, makes
//! a session of its agent whose first message is the POST's JSON body. The
//! operations behind `berth.v1.Webhooks`, the signature check, and the HTTP
//! server on the dispatcher's webhook port.
//!
//! A delivery carries `Berth-Delivery` (its id), `Berth-Timestamp` (Unix
//! seconds) and `Berth-Signature` (`v1=` + hex HMAC-SHA256 of
//! `{timestamp}.{body}`, keyed with the secret string). Outside the replay
//! window, or with a signature that does not verify, it is 401 and nothing
//! is made. A repeat of a delivery id returns the first one's session.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::http::{HeaderMap, StatusCode};
use base64::Engine;
use chrono::{DateTime, Utc};
use ring::rand::SecureRandom;
use serde_json::json;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::error::{Error, Result};
pub(crate) use crate::records::Webhook;
use crate::session::{NewSession, limits};
use crate::sessions::Sessions;
use crate::store::Store;

/// The label every session a webhook makes carries, with its id.
pub(crate) const WEBHOOK_LABEL: &str = "berth.webhook";
/// Where deliveries are posted: `/hooks/{id}`.
pub(crate) const PATH_PREFIX: &str = "/hooks/";
const SECRET_PREFIX: &str = "whsec_";
const DELIVERY_HEADER: &str = "berth-delivery";
const TIMESTAMP_HEADER: &str = "berth-timestamp";
const SIGNATURE_HEADER: &str = "berth-signature";

/// `v1=` + the hex HMAC-SHA256 of `{timestamp}.{body}` under `secret`.
pub(crate) fn sign(secret: &[u8], timestamp: &str, body: &[u8]) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
    let mut ctx = ring::hmac::Context::with_key(&key);
    ctx.update(timestamp.as_bytes());
    ctx.update(b".");
    ctx.update(body);
    format!("v1={}", hex::encode(ctx.sign().as_ref()))
}

/// Whether `signature` (one or more `v1=…`, comma-separated, as a sender
/// rotating secrets sends) is `body`'s at `timestamp`. Constant time.
pub(crate) fn verify(secret: &[u8], timestamp: &str, body: &[u8], signature: &str) -> bool {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
    let mut message = Vec::with_capacity(timestamp.len() + 1 + body.len());
    message.extend_from_slice(timestamp.as_bytes());
    message.push(b'.');
    message.extend_from_slice(body);
    signature.split(',').any(|s| {
        s.trim()
            .strip_prefix("v1=")
            .and_then(|h| hex::decode(h).ok())
            .is_some_and(|tag| ring::hmac::verify(&key, &message, &tag).is_ok())
    })
}

/// A new signing secret: `whsec_` and 32 random bytes, base64url.
pub(crate) fn new_secret() -> Result<String> {
    let mut raw = [0u8; 32];
    ring::rand::SystemRandom::new()
        .fill(&mut raw)
        .map_err(|_| Error::Internal("no system randomness".into()))?;
    Ok(format!(
        "{SECRET_PREFIX}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw)
    ))
}

/// Whether a delivery id is 1–128 of `[A-Za-z0-9._:-]`.
fn delivery_id_ok(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._:-".contains(&b))
}

/// The webhook operations, and deliveries.
#[derive(Clone)]
pub(crate) struct Webhooks {
    pub store: Store,
    pub audit: crate::audit::Audit,
    pub sessions: Sessions,
    /// How far a delivery's timestamp may be from now.
    pub tolerance: Duration,
}

impl Webhooks {
    /// Creates a webhook; returns it and its secret (shown once).
    pub async fn create(
        &self,
        project: &str,
        creator: &str,
        webhook_id: &str,
        agent: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<(Webhook, String)> {
        if !berth_common::names::is_agent_id(webhook_id) {
            return Err(Error::invalid(
                "webhook_id",
                "1-63 lowercase letters, digits and `-`, starting with a letter",
            ));
        }
        self.sessions
            .check_agent(project, agent, "webhook.agent")
            .await?;
        let secret = new_secret()?;
        let w = Webhook {
            id: Uuid::new_v4(),
            project: project.to_string(),
            webhook_id: webhook_id.to_string(),
            agent: agent.to_string(),
            labels,
            creator: creator.to_string(),
            create_time: Utc::now(),
        };
        let w = self.store.create_webhook(&w, &secret).await?;
        Ok((w, secret))
    }

    pub async fn get(&self, project: &str, webhook_id: &str) -> Result<Webhook> {
        self.store.get_webhook(project, webhook_id).await
    }

    pub async fn list(&self, project: &str, after: &str, limit: i64) -> Result<Vec<Webhook>> {
        self.store.list_webhooks(project, after, limit).await
    }

    pub async fn delete(&self, project: &str, webhook_id: &str) -> Result<()> {
        self.store.delete_webhook(project, webhook_id).await
    }

    /// Handles one POST to `/hooks/{id}`: the status and JSON body to answer.
    pub async fn deliver(
        &self,
        id: &str,
        headers: &HeaderMap,
        body: &[u8],
    ) -> (StatusCode, serde_json::Value) {
        let (status, outcome, reply) = self.deliver_inner(id, headers, body, Utc::now()).await;
        metrics::counter!(crate::metrics::WEBHOOK_DELIVERIES, "outcome" => outcome).increment(1);
        (status, reply)
    }

    async fn deliver_inner(
        &self,
        id: &str,
        headers: &HeaderMap,
        body: &[u8],
        now: DateTime<Utc>,
    ) -> (StatusCode, &'static str, serde_json::Value) {
        let refuse = |status, outcome, why: String| (status, outcome, json!({ "error": why }));
        let not_found = || refuse(StatusCode::NOT_FOUND, "not_found", "no such webhook".into());
        let Ok(id) = Uuid::parse_str(id) else {
            return not_found();
        };
        let (w, secret) = match self.store.webhook_by_id(id).await {
            Ok(Some(found)) => found,
            Ok(None) => return not_found(),
            Err(e) => return unavailable(e),
        };
        let header = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
        };
        let (timestamp, signature, delivery) = (
            header(TIMESTAMP_HEADER),
            header(SIGNATURE_HEADER),
            header(DELIVERY_HEADER),
        );
        // Authenticity first: an unsigned caller learns nothing else.
        let Ok(sent) = timestamp.parse::<i64>() else {
            return refuse(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                format!("`{TIMESTAMP_HEADER}` must be Unix seconds"),
            );
        };
        let skew = (now.timestamp() - sent).unsigned_abs();
        if skew > self.tolerance.as_secs() {
            return refuse(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                format!(
                    "`{TIMESTAMP_HEADER}` is {skew} s from now, outside the {} s replay window",
                    self.tolerance.as_secs()
                ),
            );
        }
        if !verify(&secret, timestamp, body, signature) {
            return refuse(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                format!(
                    "`{SIGNATURE_HEADER}` does not verify: expected `v1=` and the hex HMAC-SHA256 of `{{timestamp}}.{{body}}` keyed with the webhook's secret"
                ),
            );
        }
        if !delivery_id_ok(delivery) {
            return refuse(
                StatusCode::BAD_REQUEST,
                "invalid",
                format!("`{DELIVERY_HEADER}` is required: 1-128 of [A-Za-z0-9._:-]"),
            );
        }
        if body.len() > limits::MESSAGE_BYTES {
            return refuse(
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid",
                format!("the body may be at most {} bytes", limits::MESSAGE_BYTES),
            );
        }
        let text = match std::str::from_utf8(body) {
            Ok(t) if serde_json::from_str::<serde::de::IgnoredAny>(t).is_ok() => t,
            _ => {
                return refuse(
                    StatusCode::BAD_REQUEST,
                    "invalid",
                    "the body must be JSON".into(),
                );
            }
        };
        let mut labels = w.labels.clone();
        labels.insert(WEBHOOK_LABEL.into(), w.webhook_id.clone());
        let new = NewSession::of_agent(
            &w.agent,
            text.to_string(),
            labels,
            format!("{} {delivery}", w.webhook_id),
            format!("webhook/{}/{delivery}", w.id),
        );
        let session = match self.sessions.create(&w.project, new).await {
            Ok(s) => s,
            Err(e) if e.is_transient() => return unavailable(e),
            Err(e) => return refuse(StatusCode::UNPROCESSABLE_ENTITY, "error", e.to_string()),
        };
        match self.store.record_delivery(w.id, delivery, session.id).await {
            Ok((session_id, fresh)) => {
                tracing::info!(webhook = %w.webhook_id, delivery, %session_id, fresh, "webhook delivery");
                if fresh {
                    self.audit
                        .record(
                            &w.project,
                            &format!("webhooks/{}", w.webhook_id),
                            "session.create",
                            &berth_common::names::session_name(session_id),
                            serde_json::json!({ "delivery": delivery, "agent": w.agent }),
                        )
                        .await;
                }
                let reply = json!({
                    "session": berth_common::names::session_name(session_id),
                    "duplicate": !fresh,
                });
                if fresh {
                    (StatusCode::ACCEPTED, "created", reply)
                } else {
                    (StatusCode::OK, "duplicate", reply)
                }
            }
            Err(e) => unavailable(e),
        }
    }
}

fn unavailable(e: Error) -> (StatusCode, &'static str, serde_json::Value) {
    tracing::warn!(error = %e, "webhook delivery failed; the sender should retry");
    (
        StatusCode::SERVICE_UNAVAILABLE,
        "unavailable",
        json!({ "error": "the dispatcher cannot take deliveries now; retry with the same Berth-Delivery" }),
    )
}

/// Makes every delivery outcome's series exist from the start (whether or
/// not this dispatcher serves webhooks), so `rate()` sees the first one.
pub(crate) fn register_metrics() {
    for outcome in [
        "created",
        "duplicate",
        "unauthorized",
        "invalid",
        "not_found",
        "error",
        "unavailable",
    ] {
        metrics::counter!(crate::metrics::WEBHOOK_DELIVERIES, "outcome" => outcome).increment(0);
    }
}

/// Serves `POST /hooks/{id}` on `listener` until `shutdown`.
pub(crate) async fn serve(
    listener: tokio::net::TcpListener,
    webhooks: Webhooks,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    use axum::extract::{Path, State};
    use axum::routing::post;
    let app = axum::Router::new()
        .route(
            "/hooks/{id}",
            post(
                |State(w): State<Arc<Webhooks>>,
                 Path(id): Path<String>,
                 headers: HeaderMap,
                 body: axum::body::Bytes| async move {
                    let (status, reply) = w.deliver(&id, &headers, &body).await;
                    (
                        status,
                        [("content-type", "application/json")],
                        format!("{reply}\n"),
                    )
                },
            ),
        )
        .layer(axum::extract::DefaultBodyLimit::max(
            limits::MESSAGE_BYTES + 1,
        ))
        .with_state(Arc::new(webhooks));
    tracing::info!(addr = %listener.local_addr()?, "webhooks listening");
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signature_verifies_only_for_its_secret_timestamp_and_body() {
        let s = sign(b"whsec_a", "1700000000", br#"{"x":1}"#);
        assert!(s.starts_with("v1=") && s.len() == 3 + 64, "{s}");
        assert!(verify(b"whsec_a", "1700000000", br#"{"x":1}"#, &s));
        assert!(verify(
            b"whsec_a",
            "1700000000",
            br#"{"x":1}"#,
            &format!("v1=00,{s}")
        ));
        assert!(!verify(b"whsec_b", "1700000000", br#"{"x":1}"#, &s));
        assert!(!verify(b"whsec_a", "1700000001", br#"{"x":1}"#, &s));
        assert!(!verify(b"whsec_a", "1700000000", br#"{"x":2}"#, &s));
        assert!(!verify(b"whsec_a", "1700000000", br#"{"x":1}"#, ""));
        assert!(!verify(b"whsec_a", "1700000000", br#"{"x":1}"#, "v1=zz"));
    }

    #[test]
    fn delivery_ids_are_bounded() {
        assert!(delivery_id_ok("evt_123:a.b-c"));
        assert!(!delivery_id_ok(""));
        assert!(!delivery_id_ok("a b"));
        assert!(!delivery_id_ok(&"a".repeat(129)));
    }
}
