//! Inbound webhooks (their secrets sealed) and the deliveries they accepted.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use sqlx::types::Json;
use uuid::Uuid;

use super::Store;
use crate::error::{Error, Result};
use crate::webhooks::Webhook;

mod sql {
    macro_rules! webhooks {
        ($filter:literal) => {
            concat!(
                "SELECT id, project, webhook_id, agent, labels, creator, create_time, sealed \
                 FROM webhooks ",
                $filter
            )
        };
    }

    pub const CREATE: &str = "INSERT INTO webhooks (id, project, webhook_id, agent, labels, sealed, kek, creator) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
         ON CONFLICT (project, webhook_id) DO NOTHING RETURNING id";
    pub const GET: &str = webhooks!("WHERE project = $1 AND webhook_id = $2");
    pub const BY_ID: &str = webhooks!("WHERE id = $1");
    pub const LIST: &str =
        webhooks!("WHERE project = $1 AND webhook_id > $2 ORDER BY webhook_id LIMIT $3");
    pub const DELETE: &str = "DELETE FROM webhooks WHERE project = $1 AND webhook_id = $2";
    /// Records a delivery; a repeat of its id records nothing and returns
    /// the first one's session.
    pub const DELIVERY: &str = r#"
WITH d AS (
    INSERT INTO webhook_deliveries (webhook, delivery_id, session_id) VALUES ($1, $2, $3)
    ON CONFLICT DO NOTHING RETURNING session_id, true AS fresh
)
SELECT session_id, fresh FROM d
UNION ALL
SELECT session_id, false FROM webhook_deliveries WHERE webhook = $1 AND delivery_id = $2
LIMIT 1
"#;
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
    ) -> Result<(Uuid, bool)> {
        let row: Option<(Uuid, bool)> = sqlx::query_as(sql::DELIVERY)
            .bind(webhook)
            .bind(delivery_id)
            .bind(session_id)
            .fetch_optional(&self.pool)
            .await?;
        row.ok_or(Error::Conflict)
    }
}
