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
use std::time::Duration;

use axum::http::{HeaderMap, StatusCode};
use chrono::{DateTime, Utc};
use serde_json::json;
use uuid::Uuid;

mod replay;
mod server;
mod signature;
pub(crate) mod slack;

pub(crate) use server::serve;
use signature::{content_sha256, delivery_id_ok};
pub(crate) use signature::{new_secret, sign, verify};

use crate::error::{Error, Result};
use crate::ops::audit::{Action, Detail};
use crate::ops::sessions::Sessions;
pub(crate) use crate::records::Webhook;
use crate::session::{NewSession, limits};
use crate::store::Store;

/// The label every session a webhook makes carries, with its id.
pub(crate) const WEBHOOK_LABEL: &str = "berth.webhook";
/// Where deliveries are posted: `/hooks/{id}`.
pub(crate) const PATH_PREFIX: &str = "/hooks/";
pub(crate) const SECRET_PREFIX: &str = "whsec_";
const DELIVERY_HEADER: &str = "berth-delivery";
const TIMESTAMP_HEADER: &str = "berth-timestamp";
const SIGNATURE_HEADER: &str = "berth-signature";

/// The webhook operations, and deliveries.
#[derive(Clone)]
pub(crate) struct Webhooks {
    pub store: Store,
    pub audit: crate::ops::audit::Audit,
    pub sessions: Sessions,
    /// How far a delivery's timestamp may be from now.
    pub tolerance: Duration,
    /// How long a delivery's headers, and then its body, may take to arrive.
    pub read_timeout: Duration,
    /// The Slack Web API (`chat.postMessage`'s base), for Slack apps.
    pub slack_api: String,
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
        slack: Option<slack::NewSlackApp>,
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
        let (secret, slack_bot_secret) = match &slack {
            Some(app) => (
                String::new(),
                Some(self.check_slack_app(project, app).await?),
            ),
            None => (new_secret()?, None),
        };
        let w = Webhook {
            id: Uuid::new_v4(),
            project: project.to_string(),
            webhook_id: webhook_id.to_string(),
            agent: agent.to_string(),
            labels,
            creator: creator.to_string(),
            create_time: Utc::now(),
            slack_bot_secret,
        };
        let sealed_secret = match &slack {
            Some(app) => app.signing_secret.clone(),
            None => secret.clone(),
        };
        let w = self.store.create_webhook(&w, &sealed_secret).await?;
        self.audit
            .record(
                project,
                creator,
                Action::WebhookCreate,
                &format!("webhooks/{}", w.webhook_id),
                Detail::WebhookAgent {
                    agent: w.agent.clone(),
                },
            )
            .await;
        Ok((w, secret))
    }

    pub async fn get(&self, project: &str, webhook_id: &str) -> Result<Webhook> {
        self.store.get_webhook(project, webhook_id).await
    }

    pub async fn list(&self, project: &str, after: &str, limit: i64) -> Result<Vec<Webhook>> {
        self.store.list_webhooks(project, after, limit).await
    }

    /// Deletes a webhook, on `actor`'s behalf.
    pub async fn delete(&self, project: &str, actor: &str, webhook_id: &str) -> Result<()> {
        self.store.delete_webhook(project, webhook_id).await?;
        self.audit
            .record(
                project,
                actor,
                Action::WebhookDelete,
                &format!("webhooks/{webhook_id}"),
                Detail::None {},
            )
            .await;
        Ok(())
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
        if w.slack_bot_secret.is_some() {
            return self.slack_event(&w, &secret, headers, body, now).await;
        }
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
        if let Err(why) = signature::within_window(TIMESTAMP_HEADER, timestamp, now, self.tolerance)
        {
            return refuse(StatusCode::UNAUTHORIZED, "unauthorized", why);
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
        let content = content_sha256(timestamp, body);
        self.admit(&w, delivery, &content, text).await
    }

    /// Makes the session of an authentic delivery, unless it is a retry
    /// (the first one's session), a replay or a reused id (409).
    async fn admit(
        &self,
        w: &Webhook,
        delivery: &str,
        content: &[u8],
        text: &str,
    ) -> (StatusCode, &'static str, serde_json::Value) {
        let refuse = |status, outcome, why: String| (status, outcome, json!({ "error": why }));
        // Twice: a delivery racing this one may be recorded in between.
        for _ in 0..2 {
            let recorded = match self.store.deliveries_like(w.id, delivery, content).await {
                Ok(r) => r,
                Err(e) => return unavailable(e),
            };
            let session_id = match replay::judge(delivery, content, &recorded) {
                replay::Verdict::Retry(session_id) => {
                    let reply = json!({
                        "session": berth_common::names::session_name(session_id),
                        "duplicate": true,
                    });
                    return (StatusCode::OK, "duplicate", reply);
                }
                replay::Verdict::Replay { of } => {
                    tracing::warn!(webhook = %w.webhook_id, delivery, of = %of, "webhook replay refused");
                    return refuse(
                        StatusCode::CONFLICT,
                        "replay",
                        format!(
                            "this signed content was delivered as `{of}`; a new `{DELIVERY_HEADER}` does not make it new"
                        ),
                    );
                }
                replay::Verdict::IdReused => {
                    return refuse(
                        StatusCode::CONFLICT,
                        "replay",
                        format!(
                            "`{DELIVERY_HEADER}` {delivery} was used for another delivery; give each its own id"
                        ),
                    );
                }
                replay::Verdict::New => match self.create_for(w, delivery, content, text).await {
                    Ok(id) => id,
                    // The same content under another delivery id made the
                    // session first: judge again against that one.
                    Err(Error::InvalidArgument {
                        field: "request_id",
                        ..
                    }) => continue,
                    Err(e) if e.is_transient() => return unavailable(e),
                    Err(e) => {
                        return refuse(StatusCode::UNPROCESSABLE_ENTITY, "error", e.to_string());
                    }
                },
            };
            match self
                .store
                .record_delivery(w.id, delivery, session_id, content)
                .await
            {
                Ok(true) => {
                    tracing::info!(webhook = %w.webhook_id, delivery, %session_id, "webhook delivery");
                    let reply = json!({
                        "session": berth_common::names::session_name(session_id),
                        "duplicate": false,
                    });
                    return (StatusCode::ACCEPTED, "created", reply);
                }
                // Another one got there first: judge again against it.
                Ok(false) => continue,
                Err(e) => return unavailable(e),
            }
        }
        unavailable(Error::Conflict)
    }

    /// The session of a new delivery, made idempotently on what it signs:
    /// deliveries racing with the same content get the same session.
    async fn create_for(
        &self,
        w: &Webhook,
        delivery: &str,
        content: &[u8],
        text: &str,
    ) -> Result<Uuid> {
        let mut labels = w.labels.clone();
        labels.insert(WEBHOOK_LABEL.into(), w.webhook_id.clone());
        let new = NewSession::of_agent(
            &w.agent,
            text.to_string(),
            labels,
            format!("{} {delivery}", w.webhook_id),
            format!("webhook/{}/{}", w.id, hex::encode(content)),
        );
        let by = format!("webhooks/{}", w.webhook_id);
        let origin = crate::ops::sessions::Origin::Webhook {
            delivery: delivery.to_string(),
            agent: w.agent.clone(),
        };
        Ok(self.sessions.create(&w.project, new, &by, origin).await?.id)
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
