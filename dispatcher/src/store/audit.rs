//! The audit trail.

use chrono::{DateTime, Utc};
use sqlx::types::Json;

use super::Store;
use crate::error::Result;
use crate::records::AuditEvent;

mod sql {
    pub const INSERT: &str = "INSERT INTO audit_events (project, identity, action, resource, detail) \
         VALUES ($1, $2, $3, $4, $5)";
    /// Oldest first after id $2; `$3` '' = every resource.
    pub const LIST: &str = "SELECT id, time, identity, action, resource, detail FROM audit_events \
         WHERE project = $1 AND id > $2 AND ($3 = '' OR resource = $3) ORDER BY id LIMIT $4";
}

/// An audit record written in the same statement as the change it records
/// (a session's creation): the two commit together or not at all.
pub(crate) struct AuditEntry {
    pub identity: String,
    /// The action's name (`session.create`…).
    pub action: &'static str,
    pub detail: serde_json::Value,
}

#[derive(sqlx::FromRow)]
struct AuditRow {
    id: i64,
    time: DateTime<Utc>,
    identity: String,
    action: String,
    resource: String,
    detail: Json<serde_json::Value>,
}

impl Store {
    pub(crate) async fn insert_audit(
        &self,
        project: &str,
        identity: &str,
        action: &str,
        resource: &str,
        detail: &serde_json::Value,
    ) -> Result<()> {
        sqlx::query(sql::INSERT)
            .bind(project)
            .bind(identity)
            .bind(action)
            .bind(resource)
            .bind(Json(detail))
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub(crate) async fn list_audit(
        &self,
        project: &str,
        resource: &str,
        after: i64,
        limit: i64,
    ) -> Result<Vec<AuditEvent>> {
        let rows: Vec<AuditRow> = sqlx::query_as(sql::LIST)
            .bind(project)
            .bind(after)
            .bind(resource)
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
        Ok(rows
            .into_iter()
            .map(|r| AuditEvent {
                id: r.id,
                time: r.time,
                identity: r.identity,
                action: r.action,
                resource: r.resource,
                detail: r.detail.0,
            })
            .collect())
    }
}
