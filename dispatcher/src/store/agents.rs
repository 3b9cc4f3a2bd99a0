//! Agents (with their immutable versions) and uploaded files.

use chrono::{DateTime, Utc};
use sqlx::types::Json;
use uuid::Uuid;

use super::Store;
use crate::error::{Error, Result};
use crate::session::{Agent, AgentSpec, FileInfo};

mod sql {
    /// An agent joined with one of its versions: `$2` NULL is the latest.
    pub const GET_AGENT: &str = "SELECT a.id, v.version, a.latest_version, v.spec, a.archived, \
         a.create_time, v.create_time AS version_create_time \
         FROM agents a JOIN agent_versions v ON v.agent_id = a.id \
         WHERE a.id = $1 AND v.version = coalesce($2, a.latest_version)";

    /// Agents by id after the keyset cursor $1 ('' = first page), at their
    /// latest versions; $2 includes archived ones.
    pub const LIST_AGENTS: &str = "SELECT a.id, v.version, a.latest_version, v.spec, a.archived, \
         a.create_time, v.create_time AS version_create_time \
         FROM agents a JOIN agent_versions v ON v.agent_id = a.id AND v.version = a.latest_version \
         WHERE a.id > $1 AND ($2 OR NOT a.archived) ORDER BY a.id LIMIT $3";

    pub const AGENT_EXISTS: &str = "SELECT EXISTS (SELECT 1 FROM agents WHERE id = $1)";

    /// Creates an agent at version 1. `ON CONFLICT DO NOTHING`: an existing
    /// id returns no row (ALREADY_EXISTS).
    pub const CREATE_AGENT: &str = r#"
WITH a AS (
    INSERT INTO agents (id) VALUES ($1) ON CONFLICT (id) DO NOTHING RETURNING id
)
INSERT INTO agent_versions (agent_id, version, spec)
SELECT id, 1, $2 FROM a
RETURNING agent_id
"#;

    /// Adds the next version of an agent that is not archived.
    pub const UPDATE_AGENT: &str = r#"
WITH a AS (
    UPDATE agents SET latest_version = latest_version + 1, update_time = now()
    WHERE id = $1 AND NOT archived
    RETURNING id, latest_version
)
INSERT INTO agent_versions (agent_id, version, spec)
SELECT id, latest_version, $2 FROM a
RETURNING version
"#;

    pub const ARCHIVE_AGENT: &str =
        "UPDATE agents SET archived = true, update_time = now() WHERE id = $1";

    pub const INSERT_FILE: &str = "INSERT INTO files (id, display_name, size_bytes, sha256, create_time) \
         VALUES ($1, $2, $3, $4, $5)";

    pub const GET_FILE: &str =
        "SELECT id, display_name, size_bytes, sha256, create_time FROM files WHERE id = $1";

    pub const DELETE_FILE: &str = "DELETE FROM files WHERE id = $1";
}

#[derive(sqlx::FromRow)]
struct AgentRow {
    id: String,
    version: i64,
    latest_version: i64,
    spec: Json<AgentSpec>,
    archived: bool,
    create_time: DateTime<Utc>,
    version_create_time: DateTime<Utc>,
}

impl From<AgentRow> for Agent {
    fn from(r: AgentRow) -> Self {
        Self {
            id: r.id,
            version: r.version,
            latest_version: r.latest_version,
            spec: r.spec.0,
            archived: r.archived,
            create_time: r.create_time,
            version_create_time: r.version_create_time,
        }
    }
}

#[derive(sqlx::FromRow)]
struct FileRow {
    id: Uuid,
    display_name: String,
    size_bytes: i64,
    sha256: String,
    create_time: DateTime<Utc>,
}

impl From<FileRow> for FileInfo {
    fn from(r: FileRow) -> Self {
        Self {
            id: r.id,
            display_name: r.display_name,
            size_bytes: r.size_bytes,
            sha256: r.sha256,
            create_time: r.create_time,
        }
    }
}

impl Store {
    /// Creates `id` at version 1.
    pub(crate) async fn create_agent(&self, id: &str, spec: &AgentSpec) -> Result<Agent> {
        let created: Option<String> = sqlx::query_scalar(sql::CREATE_AGENT)
            .bind(id)
            .bind(Json(spec))
            .fetch_optional(&self.pool)
            .await?;
        if created.is_none() {
            return Err(Error::AlreadyExists(format!("agent `{id}` already exists")));
        }
        self.get_agent(id, None).await
    }

    /// The agent at `version`, or at its latest.
    pub(crate) async fn get_agent(&self, id: &str, version: Option<i64>) -> Result<Agent> {
        let row: Option<AgentRow> = sqlx::query_as(sql::GET_AGENT)
            .bind(id)
            .bind(version)
            .fetch_optional(&self.pool)
            .await?;
        if let Some(r) = row {
            return Ok(r.into());
        }
        let exists: bool = sqlx::query_scalar(sql::AGENT_EXISTS)
            .bind(id)
            .fetch_one(&self.pool)
            .await?;
        Err(Error::NotFound(match (exists, version) {
            (true, Some(v)) => format!("agent `{id}` has no version {v}"),
            _ => format!("agent `{id}` not found"),
        }))
    }

    /// Agents by id after `after`, latest versions.
    pub(crate) async fn list_agents(
        &self,
        after: &str,
        show_archived: bool,
        limit: i64,
    ) -> Result<Vec<Agent>> {
        let rows: Vec<AgentRow> = sqlx::query_as(sql::LIST_AGENTS)
            .bind(after)
            .bind(show_archived)
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.into_iter().map(Agent::from).collect())
    }

    /// Adds a version; refused for an archived agent.
    pub(crate) async fn update_agent(&self, id: &str, spec: &AgentSpec) -> Result<Agent> {
        let version: Option<i64> = sqlx::query_scalar(sql::UPDATE_AGENT)
            .bind(id)
            .bind(Json(spec))
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

    pub(crate) async fn archive_agent(&self, id: &str) -> Result<Agent> {
        sqlx::query(sql::ARCHIVE_AGENT)
            .bind(id)
            .execute(&self.pool)
            .await?;
        self.get_agent(id, None).await
    }

    pub(crate) async fn insert_file(&self, f: &FileInfo) -> Result<()> {
        sqlx::query(sql::INSERT_FILE)
            .bind(f.id)
            .bind(&f.display_name)
            .bind(f.size_bytes)
            .bind(&f.sha256)
            .bind(f.create_time)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub(crate) async fn get_file(&self, id: Uuid) -> Result<FileInfo> {
        let row: FileRow = sqlx::query_as(sql::GET_FILE)
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .ok_or_else(|| Error::NotFound(format!("file files/{id} not found")))?;
        Ok(row.into())
    }

    pub(crate) async fn delete_file(&self, id: Uuid) -> Result<bool> {
        let r = sqlx::query(sql::DELETE_FILE)
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected() > 0)
    }
}
