//! Inbound webhooks (their secrets sealed) and the deliveries they accepted.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use sqlx::types::Json;
use uuid::Uuid;

use super::Store;
use crate::error::{Error, Result};
use crate::records::Webhook;

mod sql {
    macro_rules! webhooks {
        ($filter:literal) => {
            concat!(
                "SELECT id, project, webhook_id, agent, labels, creator, create_time, sealed, \
                 slack_bot_secret FROM webhooks ",
                $filter
            )
        };
    }

    pub const CREATE: &str = "INSERT INTO webhooks (id, project, webhook_id, agent, labels, sealed, kek, creator, slack_bot_secret) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) \
         ON CONFLICT (project, webhook_id) DO NOTHING RETURNING id";
    pub const GET: &str = webhooks!("WHERE project = $1 AND webhook_id = $2");
    pub const BY_ID: &str = webhooks!("WHERE id = $1");
    pub const LIST: &str =
        webhooks!("WHERE project = $1 AND webhook_id > $2 ORDER BY webhook_id LIMIT $3");
    pub const DELETE: &str = "DELETE FROM webhooks WHERE project = $1 AND webhook_id = $2";
    /// Records a delivery; a repeat of its id records nothing and returns
    /// the first one's session.
    /// Records a delivery and what it signed; `false` when one with the
    /// same id or the same signed content got there first.
    pub const DELIVERY: &str = "INSERT INTO webhook_deliveries (webhook, delivery_id, session_id, content_sha256) \
         VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING";

    /// The deliveries of webhook `$1` with id `$2` or signed content `$3`
    /// (by the primary key and `webhook_deliveries_content`).
    pub const DELIVERIES_LIKE: &str = "SELECT delivery_id, session_id, content_sha256 FROM webhook_deliveries \
         WHERE webhook = $1 AND (delivery_id = $2 OR content_sha256 = $3)";
}

#[derive(sqlx::FromRow)]
struct WebhookRow {
    id: Uuid,
    project: String,
    webhook_id: String,
    agent: String,
    labels: Json<BTreeMap<String, String>>,
    creator: String,
    create_time: DateTime<Utc>,
    sealed: Vec<u8>,
    slack_bot_secret: Option<Uuid>,
}

impl WebhookRow {
    fn split(self) -> (Webhook, Vec<u8>) {
        (
            Webhook {
                id: self.id,
                project: self.project,
                webhook_id: self.webhook_id,
                agent: self.agent,
                labels: self.labels.0,
                creator: self.creator,
                create_time: self.create_time,
                slack_bot_secret: self.slack_bot_secret,
            },
            self.sealed,
        )
    }
}

/// The context a webhook secret is sealed in.
pub(crate) fn webhook_context(project: &str) -> String {
    format!("webhook/{project}")
}

fn not_found(webhook_id: &str) -> Error {
    Error::NotFound(format!(
        "webhook webhooks/{webhook_id} not found; ListWebhooks shows the webhooks there are"
    ))
}

impl Store {
    /// Creates a webhook whose secret is `secret` (sealed here).
    pub(crate) async fn create_webhook(&self, w: &Webhook, secret: &str) -> Result<Webhook> {
        let sealed = self
            .sealer()
            .seal(&webhook_context(&w.project), secret.as_bytes());
        let created: Option<Uuid> = sqlx::query_scalar(sql::CREATE)
            .bind(w.id)
            .bind(&w.project)
            .bind(&w.webhook_id)
            .bind(&w.agent)
            .bind(Json(&w.labels))
            .bind(&sealed)
            .bind(self.sealer().primary())
            .bind(&w.creator)
            .bind(w.slack_bot_secret)
            .fetch_optional(&self.pool)
            .await?;
        if created.is_none() {
            return Err(Error::AlreadyExists(format!(
                "webhook `{}` already exists",
                w.webhook_id
            )));
        }
        self.get_webhook(&w.project, &w.webhook_id).await
    }

    pub(crate) async fn get_webhook(&self, project: &str, webhook_id: &str) -> Result<Webhook> {
        let row: Option<WebhookRow> = sqlx::query_as(sql::GET)
            .bind(project)
            .bind(webhook_id)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| r.split().0)
            .ok_or_else(|| not_found(webhook_id))
    }

    /// By id after `after` (keyset).
    pub(crate) async fn list_webhooks(
        &self,
        project: &str,
        after: &str,
        limit: i64,
    ) -> Result<Vec<Webhook>> {
        let rows: Vec<WebhookRow> = sqlx::query_as(sql::LIST)
            .bind(project)
            .bind(after)
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.into_iter().map(|r| r.split().0).collect())
    }

    pub(crate) async fn delete_webhook(&self, project: &str, webhook_id: &str) -> Result<()> {
        let done = sqlx::query(sql::DELETE)
            .bind(project)
            .bind(webhook_id)
            .execute(&self.pool)
            .await?;
        if done.rows_affected() == 0 {
            return Err(not_found(webhook_id));
        }
        Ok(())
    }

    /// The webhook served at `/hooks/{id}`, with its secret opened.
    pub(crate) async fn webhook_by_id(&self, id: Uuid) -> Result<Option<(Webhook, Vec<u8>)>> {
        let row: Option<WebhookRow> = sqlx::query_as(sql::BY_ID)
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| {
            let (w, sealed) = r.split();
            let secret = self
                .sealer()
                .open(&webhook_context(&w.project), &sealed)
                .map_err(|e| Error::Internal(format!("webhook {} secret: {e}", w.webhook_id)))?;
            Ok((w, secret))
        })
        .transpose()
    }

    /// Records delivery `delivery_id` as having made `session_id`; returns
    /// the session the delivery id stands for and whether this call made it.
    pub(crate) async fn record_delivery(
        &self,
        webhook: Uuid,
        delivery_id: &str,
        session_id: Uuid,
        content_sha256: &[u8],
    ) -> Result<bool> {
        let done = sqlx::query(sql::DELIVERY)
            .bind(webhook)
            .bind(delivery_id)
            .bind(session_id)
            .bind(content_sha256)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    /// The deliveries recorded with `delivery_id` or `content_sha256`.
    pub(crate) async fn deliveries_like(
        &self,
        webhook: Uuid,
        delivery_id: &str,
        content_sha256: &[u8],
    ) -> Result<Vec<crate::records::Recorded>> {
        Ok(sqlx::query_as(sql::DELIVERIES_LIKE)
            .bind(webhook)
            .bind(delivery_id)
            .bind(content_sha256)
            .fetch_all(&self.pool)
            .await?)
    }
}

mod sub_sql {
    pub const CREATE: &str = "INSERT INTO subscriptions (id, project, subscription_id, url, event_types, sealed, kek, creator) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
         ON CONFLICT (project, subscription_id) DO NOTHING \
         RETURNING id, project, subscription_id, url, event_types, creator, create_time";
    pub const LIST: &str = "SELECT id, project, subscription_id, url, event_types, creator, create_time \
         FROM subscriptions WHERE project = $1 ORDER BY subscription_id";
    pub const GET: &str = "SELECT id, project, subscription_id, url, event_types, creator, create_time \
         FROM subscriptions WHERE project = $1 AND subscription_id = $2";
    pub const DELETE: &str =
        "DELETE FROM subscriptions WHERE project = $1 AND subscription_id = $2";

    /// Claims up to $2 due deliveries for $1 ms, counting the attempt.
    pub const CLAIM: &str = r#"
UPDATE outbound_deliveries d
SET lease_until = now() + make_interval(secs => $1::float8 / 1000), attempts = d.attempts + 1
FROM subscriptions s
WHERE s.id = d.subscription AND d.id IN (
    SELECT id FROM outbound_deliveries
    WHERE status = 'pending' AND next_attempt_time <= now()
      AND (lease_until IS NULL OR lease_until < now())
    ORDER BY next_attempt_time LIMIT $2
    FOR UPDATE SKIP LOCKED
)
RETURNING d.id, s.project, s.subscription_id, s.url, s.sealed, d.event_type, d.session_id,
          d.seq, d.payload, d.event_time, d.attempts
"#;

    pub const DELIVERED: &str = "UPDATE outbound_deliveries SET status = 'delivered', deliver_time = now(), \
         last_status_code = $2, last_error = '', lease_until = NULL WHERE id = $1";
    /// A failed attempt: retried at $4, or given up when $5.
    pub const FAILED: &str = "UPDATE outbound_deliveries SET last_status_code = $2, last_error = $3, \
         next_attempt_time = $4, lease_until = NULL, \
         status = CASE WHEN $5 THEN 'failed' ELSE 'pending' END WHERE id = $1";

    pub const LOG: &str = "SELECT id, event_type, session_id, seq, status, attempts, last_status_code, \
         last_error, create_time, next_attempt_time, deliver_time \
         FROM outbound_deliveries WHERE subscription = $1 ORDER BY create_time DESC, id LIMIT $2";
}

use crate::records::{DeliveryRecord, DueDelivery, Subscription};

#[derive(sqlx::FromRow)]
struct SubscriptionRow {
    id: Uuid,
    project: String,
    subscription_id: String,
    url: String,
    event_types: Vec<String>,
    creator: String,
    create_time: DateTime<Utc>,
}

impl From<SubscriptionRow> for Subscription {
    fn from(r: SubscriptionRow) -> Self {
        Self {
            id: r.id,
            project: r.project,
            subscription_id: r.subscription_id,
            url: r.url,
            event_types: r.event_types,
            creator: r.creator,
            create_time: r.create_time,
        }
    }
}

#[derive(sqlx::FromRow)]
struct DueRow {
    id: Uuid,
    project: String,
    subscription_id: String,
    url: String,
    sealed: Vec<u8>,
    event_type: String,
    session_id: Uuid,
    seq: i64,
    payload: String,
    event_time: DateTime<Utc>,
    attempts: i32,
}

#[derive(sqlx::FromRow)]
struct LogRow {
    id: Uuid,
    event_type: String,
    session_id: Uuid,
    seq: i64,
    status: String,
    attempts: i32,
    last_status_code: Option<i32>,
    last_error: String,
    create_time: DateTime<Utc>,
    next_attempt_time: DateTime<Utc>,
    deliver_time: Option<DateTime<Utc>>,
}

/// The context a subscription secret is sealed in.
pub(crate) fn subscription_context(project: &str) -> String {
    format!("subscription/{project}")
}

fn no_subscription(id: &str) -> Error {
    Error::NotFound(format!(
        "subscription subscriptions/{id} not found; ListSubscriptions shows the subscriptions there are"
    ))
}

impl Store {
    pub(crate) async fn create_subscription(
        &self,
        s: &Subscription,
        secret: &str,
    ) -> Result<Subscription> {
        let sealed = self
            .sealer()
            .seal(&subscription_context(&s.project), secret.as_bytes());
        let row: Option<SubscriptionRow> = sqlx::query_as(sub_sql::CREATE)
            .bind(s.id)
            .bind(&s.project)
            .bind(&s.subscription_id)
            .bind(&s.url)
            .bind(&s.event_types)
            .bind(&sealed)
            .bind(self.sealer().primary())
            .bind(&s.creator)
            .fetch_optional(&self.pool)
            .await?;
        row.map(Into::into).ok_or_else(|| {
            Error::AlreadyExists(format!(
                "subscription `{}` already exists",
                s.subscription_id
            ))
        })
    }

    pub(crate) async fn list_subscriptions(&self, project: &str) -> Result<Vec<Subscription>> {
        let rows: Vec<SubscriptionRow> = sqlx::query_as(sub_sql::LIST)
            .bind(project)
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.into_iter().map(Into::into).collect())
    }

    pub(crate) async fn get_subscription(&self, project: &str, id: &str) -> Result<Subscription> {
        let row: Option<SubscriptionRow> = sqlx::query_as(sub_sql::GET)
            .bind(project)
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.map(Into::into).ok_or_else(|| no_subscription(id))
    }

    pub(crate) async fn delete_subscription(&self, project: &str, id: &str) -> Result<()> {
        let done = sqlx::query(sub_sql::DELETE)
            .bind(project)
            .bind(id)
            .execute(&self.pool)
            .await?;
        if done.rows_affected() == 0 {
            return Err(no_subscription(id));
        }
        Ok(())
    }

    /// Claims up to `limit` due deliveries for `lease`, secrets opened.
    pub(crate) async fn claim_deliveries(
        &self,
        lease: std::time::Duration,
        limit: i64,
    ) -> Result<Vec<DueDelivery>> {
        let rows: Vec<DueRow> = sqlx::query_as(sub_sql::CLAIM)
            .bind(lease.as_millis() as f64)
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
        rows.into_iter()
            .map(|r| {
                let secret = self
                    .sealer()
                    .open(&subscription_context(&r.project), &r.sealed)
                    .map_err(|e| Error::Internal(format!("subscription secret: {e}")))?;
                Ok(DueDelivery {
                    id: r.id,
                    project: r.project,
                    subscription_id: r.subscription_id,
                    url: r.url,
                    secret,
                    event_type: r.event_type,
                    session_id: r.session_id,
                    seq: r.seq,
                    payload: r.payload,
                    event_time: r.event_time,
                    attempts: r.attempts,
                })
            })
            .collect()
    }

    pub(crate) async fn delivered(&self, id: Uuid, status: i32) -> Result<()> {
        sqlx::query(sub_sql::DELIVERED)
            .bind(id)
            .bind(status)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Records a failed attempt: retried at `next`, or given up (`last`).
    pub(crate) async fn delivery_failed(
        &self,
        id: Uuid,
        status: Option<i32>,
        error: &str,
        next: DateTime<Utc>,
        last: bool,
    ) -> Result<()> {
        sqlx::query(sub_sql::FAILED)
            .bind(id)
            .bind(status)
            .bind(error)
            .bind(next)
            .bind(last)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub(crate) async fn delivery_log(
        &self,
        subscription: Uuid,
        limit: i64,
    ) -> Result<Vec<DeliveryRecord>> {
        let rows: Vec<LogRow> = sqlx::query_as(sub_sql::LOG)
            .bind(subscription)
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
        Ok(rows
            .into_iter()
            .map(|r| DeliveryRecord {
                id: r.id,
                event_type: r.event_type,
                session_id: r.session_id,
                seq: r.seq,
                status: r.status,
                attempts: r.attempts,
                last_status_code: r.last_status_code.unwrap_or(0),
                last_error: r.last_error,
                create_time: r.create_time,
                next_attempt_time: r.next_attempt_time,
                deliver_time: r.deliver_time,
            })
            .collect())
    }
}
