//! Agents (with their immutable versions) and uploaded files.

use chrono::{DateTime, Utc};
use sqlx::postgres::PgRow;
use sqlx::{AssertSqlSafe, Row};
use uuid::Uuid;

use super::{Store, sql};
use crate::agents::{Agent, FileInfo};
use crate::error::{Error, Result};
use crate::session::SessionSpec;

impl Store {
    /// Creates `id` at version 1.
    pub async fn create_agent(&self, id: &str, spec: &SessionSpec) -> Result<Agent> {
        let spec_json = serde_json::to_value(spec).map_err(|e| Error::Internal(e.to_string()))?;
        let created: Option<String> = sqlx::query_scalar(sql::CREATE_AGENT)
            .bind(id)
            .bind(spec_json)
            .fetch_optional(&self.pool)
            .await?;
        if created.is_none() {
            return Err(Error::AlreadyExists(format!("agent `{id}` already exists")));
        }
        self.get_agent(id, None).await
    }

    /// The agent at `version`, or at its latest.
    pub async fn get_agent(&self, id: &str, version: Option<i64>) -> Result<Agent> {
        // $2 NULL: the latest version.
        let q = format!(
            "SELECT {} FROM agents a JOIN agent_versions v ON v.agent_id = a.id \
             WHERE a.id = $1 AND v.version = coalesce($2, a.latest_version)",
            sql::AGENT_COLUMNS
        );
        let row = sqlx::query(AssertSqlSafe(q))
            .bind(id)
            .bind(version)
            .fetch_optional(&self.pool)
            .await?;
        match row {
            Some(r) => agent_from_row(&r),
            None => {
                let exists: bool =
                    sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM agents WHERE id = $1)")
                        .bind(id)
                        .fetch_one(&self.pool)
                        .await?;
                Err(Error::NotFound(match (exists, version) {
                    (true, Some(v)) => format!("agent `{id}` has no version {v}"),
                    _ => format!("agent `{id}` not found"),
                }))
            }
        }
    }

    /// Agents by id after `after`, latest versions.
    pub async fn list_agents(
        &self,
        after: &str,
        show_archived: bool,
        limit: i64,
    ) -> Result<Vec<Agent>> {
        // $1 keyset cursor ('' = first page); $2 include archived.
        let q = format!(
            "SELECT {} FROM agents a JOIN agent_versions v ON v.agent_id = a.id AND v.version = a.latest_version \
             WHERE a.id > $1 AND ($2 OR NOT a.archived) ORDER BY a.id LIMIT $3",
            sql::AGENT_COLUMNS
        );
        let rows = sqlx::query(AssertSqlSafe(q))
            .bind(after)
            .bind(show_archived)
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(agent_from_row).collect()
    }

    /// Adds a version; refused for an archived agent.
    pub async fn update_agent(&self, id: &str, spec: &SessionSpec) -> Result<Agent> {
        let spec_json = serde_json::to_value(spec).map_err(|e| Error::Internal(e.to_string()))?;
        let version: Option<i64> = sqlx::query_scalar(sql::UPDATE_AGENT)
            .bind(id)
            .bind(spec_json)
            .fetch_optional(&self.pool)
            .await?;
        match version {
            Some(v) => self.get_agent(id, Some(v)).await,
            None => {
                let a = self.get_agent(id, None).await?;
                Err(Error::Precondition(format!(
                    "agent `{}` is archived; it takes no new versions",
                    a.id
                )))
            }
        }
    }

    pub async fn archive_agent(&self, id: &str) -> Result<Agent> {
        sqlx::query("UPDATE agents SET archived = true, update_time = now() WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await?;
        self.get_agent(id, None).await
    }

    pub async fn insert_file(&self, f: &FileInfo) -> Result<()> {
        sqlx::query(
            "INSERT INTO files (id, display_name, size_bytes, sha256, create_time) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(f.id)
        .bind(&f.display_name)
        .bind(f.size_bytes)
        .bind(&f.sha256)
        .bind(f.create_time)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn get_file(&self, id: Uuid) -> Result<FileInfo> {
        let row = sqlx::query(
            "SELECT id, display_name, size_bytes, sha256, create_time FROM files WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?
        .ok_or_else(|| Error::NotFound(format!("file files/{id} not found")))?;
        Ok(FileInfo {
            id: row.try_get("id")?,
            display_name: row.try_get("display_name")?,
            size_bytes: row.try_get("size_bytes")?,
            sha256: row.try_get("sha256")?,
            create_time: row.try_get("create_time")?,
        })
    }

    pub async fn delete_file(&self, id: Uuid) -> Result<bool> {
        let r = sqlx::query("DELETE FROM files WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected() > 0)
    }
}

fn agent_from_row(r: &PgRow) -> Result<Agent> {
    let spec: serde_json::Value = r.try_get("spec")?;
    Ok(Agent {
        id: r.try_get("id")?,
        version: r.try_get("version")?,
        latest_version: r.try_get("latest_version")?,
        spec: serde_json::from_value(spec)
            .map_err(|e| Error::Internal(format!("stored agent spec: {e}")))?,
        archived: r.try_get("archived")?,
        create_time: r.try_get::<DateTime<Utc>, _>("create_time")?,
        version_create_time: r.try_get("version_create_time")?,
    })
}
