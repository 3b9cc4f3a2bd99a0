//! Outbound webhooks: a project's subscriptions to session status changes,
//! and the [`Deliverer`] every dispatcher runs.
//!
//! Deliveries are queued by a trigger in the transaction that persists the
//! event (migration 0013; the rule is [`crate::session::notify`]'s), so a
//! session never waits on a receiver. Each
//! dispatcher claims due deliveries under a lease (one statement), POSTs
//! them signed (the inbound scheme: `Berth-Delivery`, `Berth-Timestamp`,
//! `Berth-Signature`), at most `--subscription-concurrency` at once, each
//! within `--subscription-timeout`. A non-2xx answer, a timeout or a
//! connection error is retried with exponential backoff (jittered) until
//! `--subscription-max-attempts`; each attempt's outcome is in the log.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use http_body_util::{BodyExt, Full};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::error::{Error, Result};
use crate::ops::audit::{Action, Detail};
pub(crate) use crate::records::{DeliveryRecord, DueDelivery, Subscription};
use crate::store::Store;

/// The event types a subscription may ask for.
pub(crate) use crate::session::notify::SUBSCRIBER_EVENT_TYPES as EVENT_TYPES;

/// How often a dispatcher looks for due deliveries.
const POLL: Duration = Duration::from_millis(500);
/// Longest wait between two attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(3600);

/// The subscription operations clients call.
#[derive(Clone)]
pub(crate) struct Subscriptions {
    pub store: Store,
    pub audit: crate::ops::audit::Audit,
    /// Hosts (`host` or `host:port`) a subscription may use plain `http://` to.
    pub allow_http: Vec<String>,
}

/// Checks a subscription's URL: https, or http to an allowed host.
fn check_url(url: &str, allow_http: &[String]) -> Result<()> {
    let bad = |why: &str| Error::invalid("subscription.url", format!("`{url}`: {why}"));
    let uri: http::Uri = url.parse().map_err(|_| bad("not a URL"))?;
    let host = uri.host().ok_or_else(|| bad("no host"))?;
    match uri.scheme_str() {
        Some("https") => Ok(()),
        Some("http") => {
            let with_port = uri.authority().map(|a| a.as_str()).unwrap_or(host);
            if allow_http.iter().any(|h| h == host || h == with_port) {
                Ok(())
            } else {
                Err(bad(
                    "must be https:// (plain http:// only to hosts in --subscription-allow-http-hosts)",
                ))
            }
        }
        _ => Err(bad("must be https://")),
    }
}

impl Subscriptions {
    pub async fn create(
        &self,
        project: &str,
        creator: &str,
        subscription_id: &str,
        url: &str,
        event_types: Vec<String>,
    ) -> Result<(Subscription, String)> {
        if !berth_common::names::is_agent_id(subscription_id) {
            return Err(Error::invalid(
                "subscription_id",
                "1-63 lowercase letters, digits and `-`, starting with a letter",
            ));
        }
        check_url(url, &self.allow_http)?;
        if event_types.is_empty() {
            return Err(Error::invalid(
                "subscription.event_types",
                format!("at least one of {}", EVENT_TYPES.join(", ")),
            ));
        }
        if let Some(bad) = event_types
            .iter()
            .find(|t| !EVENT_TYPES.contains(&t.as_str()))
        {
            return Err(Error::invalid(
                "subscription.event_types",
                format!("`{bad}` is not one of {}", EVENT_TYPES.join(", ")),
            ));
        }
        let secret = crate::ops::webhooks::new_secret()?;
        let s = Subscription {
            id: Uuid::new_v4(),
            project: project.into(),
            subscription_id: subscription_id.into(),
            url: url.into(),
            event_types,
            creator: creator.into(),
            create_time: Utc::now(),
        };
        let s = self.store.create_subscription(&s, &secret).await?;
        self.audit
            .record(
                project,
                creator,
                Action::SubscriptionCreate,
                &format!("subscriptions/{}", s.subscription_id),
                Detail::Subscription {
                    url: s.url.clone(),
                    event_types: s.event_types.clone(),
                },
            )
            .await;
        Ok((s, secret))
    }

    pub async fn list(&self, project: &str) -> Result<Vec<Subscription>> {
        self.store.list_subscriptions(project).await
    }

    /// Deletes a subscription, on `actor`'s behalf.
    pub async fn delete(&self, project: &str, actor: &str, id: &str) -> Result<()> {
        self.store.delete_subscription(project, id).await?;
        self.audit
            .record(
                project,
                actor,
                Action::SubscriptionDelete,
                &format!("subscriptions/{id}"),
                Detail::None {},
            )
            .await;
        Ok(())
    }

    pub async fn deliveries(
        &self,
        project: &str,
        id: &str,
        limit: i64,
    ) -> Result<Vec<DeliveryRecord>> {
        let s = self.store.get_subscription(project, id).await?;
        self.store.delivery_log(s.id, limit).await
    }
}

/// The wait before attempt `attempts + 1`: `base` doubled per attempt,
/// jittered ±20 %, at most an hour.
pub(crate) fn backoff(base: Duration, attempts: i32) -> Duration {
    let doublings = attempts.saturating_sub(1).clamp(0, 20) as u32;
    let raw = base.saturating_mul(1 << doublings).min(MAX_BACKOFF);
    raw.mul_f64(0.8 + 0.4 * fastrand::f64())
}

/// Sends due deliveries: every dispatcher runs one.
pub(crate) struct Deliverer {
    pub store: Store,
    pub timeout: Duration,
    pub retry_base: Duration,
    pub max_attempts: i32,
    pub concurrency: usize,
    pub shutdown: CancellationToken,
}

use super::HttpsClient;

impl Deliverer {
    pub(crate) async fn run(self) {
        let client = match super::https_client() {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "outbound webhooks off: cannot load the system's CA roots");
                return;
            }
        };
        let slots = Arc::new(tokio::sync::Semaphore::new(self.concurrency.max(1)));
        let me = Arc::new(self);
        // Attempts in flight: on shutdown each finishes (within its timeout)
        // and records its outcome, so none is sent again by another
        // dispatcher once this one's lease runs out.
        let attempts = tokio_util::task::TaskTracker::new();
        let mut tick = tokio::time::interval(POLL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = me.shutdown.cancelled() => {
                    attempts.close();
                    attempts.wait().await;
                    return;
                }
                _ = tick.tick() => {}
            }
            let free = slots.available_permits();
            if free == 0 {
                continue;
            }
            // The lease outlives the attempt, so no other dispatcher sends
            // it meanwhile.
            let due = match me
                .store
                .claim_deliveries(me.timeout * 2 + Duration::from_secs(5), free as i64)
                .await
            {
                Ok(d) => d,
                Err(e) => {
                    tracing::warn!(error = %e, "claiming webhook deliveries failed");
                    continue;
                }
            };
            for d in due {
                let Ok(permit) = slots.clone().acquire_owned().await else {
                    return;
                };
                let (me, client) = (me.clone(), client.clone());
                attempts.spawn(async move {
                    me.attempt(&client, d).await;
                    drop(permit);
                });
            }
        }
    }

    /// One attempt: POST, then record the outcome.
    async fn attempt(&self, client: &HttpsClient, d: DueDelivery) {
        let body = serde_json::json!({
            "id": d.id.to_string(),
            "type": d.event_type,
            "session": berth_common::names::session_name(d.session_id),
            "project": d.project,
            "seq": d.seq,
            "time": d.event_time.to_rfc3339(),
            "payload": serde_json::from_str::<serde_json::Value>(&d.payload).unwrap_or_default(),
        })
        .to_string();
        let timestamp = Utc::now().timestamp().to_string();
        let signature = crate::ops::webhooks::sign(&d.secret, &timestamp, body.as_bytes());
        let request = http::Request::post(&d.url)
            .header("content-type", "application/json")
            .header("user-agent", concat!("berth/", env!("CARGO_PKG_VERSION")))
            .header("berth-delivery", d.id.to_string())
            .header("berth-timestamp", &timestamp)
            .header("berth-signature", signature)
            .body(Full::new(bytes::Bytes::from(body)));
        let outcome = match request {
            Err(e) => Err((None, format!("bad request: {e}"))),
            Ok(req) => match tokio::time::timeout(self.timeout, client.request(req)).await {
                Err(_) => Err((
                    None,
                    format!("no answer within {} s", self.timeout.as_secs_f64()),
                )),
                Ok(Err(e)) => Err((None, format!("connection: {e}"))),
                Ok(Ok(resp)) => {
                    let status = resp.status();
                    // Drain a little of the body, within the same deadline.
                    let _ =
                        tokio::time::timeout(Duration::from_secs(1), resp.into_body().collect())
                            .await;
                    if status.is_success() {
                        Ok(i32::from(status.as_u16()))
                    } else {
                        Err((Some(i32::from(status.as_u16())), format!("HTTP {status}")))
                    }
                }
            },
        };
        let recorded = match outcome {
            Ok(status) => {
                metrics::counter!(crate::metrics::SUBSCRIPTION_ATTEMPTS, "outcome" => "delivered")
                    .increment(1);
                self.store.delivered(d.id, status).await
            }
            Err((status, error)) => {
                let last = d.attempts >= self.max_attempts;
                let outcome = if last { "failed" } else { "retry" };
                metrics::counter!(crate::metrics::SUBSCRIPTION_ATTEMPTS, "outcome" => outcome)
                    .increment(1);
                let next = Utc::now()
                    + chrono::Duration::from_std(backoff(self.retry_base, d.attempts))
                        .unwrap_or_default();
                tracing::info!(subscription = %d.subscription_id, delivery = %d.id, attempts = d.attempts, last, error, "webhook delivery attempt failed");
                self.store
                    .delivery_failed(d.id, status, &error, next, last)
                    .await
            }
        };
        if let Err(e) = recorded {
            // The lease runs out and the delivery is attempted again.
            tracing::warn!(delivery = %d.id, error = %e, "recording a delivery attempt failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_https_unless_the_host_is_allowed_plain() {
        let allow = vec!["127.0.0.1".to_string(), "hooks.internal:8080".to_string()];
        assert!(check_url("https://example.com/hook", &[]).is_ok());
        assert!(check_url("http://127.0.0.1:9999/x", &allow).is_ok());
        assert!(check_url("http://hooks.internal:8080/x", &allow).is_ok());
        for bad in [
            "http://example.com/x",
            "ftp://example.com",
            "not a url",
            "http://hooks.internal:9090/x",
        ] {
            let e = check_url(bad, &allow).expect_err(bad);
            assert!(e.to_string().contains("subscription.url"), "{e}");
        }
    }

    #[test]
    fn backoff_doubles_with_jitter_and_is_capped() {
        let base = Duration::from_secs(2);
        for (attempts, want) in [(1, 2.0), (2, 4.0), (3, 8.0), (5, 32.0)] {
            let b = backoff(base, attempts).as_secs_f64();
            assert!(b >= want * 0.8 && b <= want * 1.2, "{attempts}: {b}");
        }
        assert!(backoff(base, 40) <= MAX_BACKOFF.mul_f64(1.2));
    }
}
