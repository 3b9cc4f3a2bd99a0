//! Agents (with their immutable versions) and uploaded files.

use chrono::{DateTime, Utc};
use sqlx::types::Json;
use uuid::Uuid;

use super::Store;
use crate::error::{Error, Result};
use crate::session::{Agent, AgentSpec, FileInfo};

mod sql {
    /// An agent joined with one of its versions: `$2` NULL is the latest.
    pub const GET_AGENT: &str = "SELECT a.project, a.id, v.version, a.latest_version, v.spec, \
         v.env_sealed, a.archived, a.create_time, v.create_time AS version_create_time \
         FROM agents a JOIN agent_versions v ON v.project = a.project AND v.agent_id = a.id \
         WHERE a.project = $3 AND a.id = $1 AND v.version = coalesce($2, a.latest_version)";

    /// Agents by id after the keyset cursor $1 ('' = first page), at their
    /// latest versions; $2 includes archived ones.
    pub const LIST_AGENTS: &str = "SELECT a.project, a.id, v.version, a.latest_version, v.spec, \
         v.env_sealed, a.archived, a.create_time, v.create_time AS version_create_time \
         FROM agents a JOIN agent_versions v \
           ON v.project = a.project AND v.agent_id = a.id AND v.version = a.latest_version \
         WHERE a.project = $4 AND a.id > $1 AND ($2 OR NOT a.archived) ORDER BY a.id LIMIT $3";

    pub const AGENT_EXISTS: &str =
        "SELECT EXISTS (SELECT 1 FROM agents WHERE project = $2 AND id = $1)";

    /// Creates an agent at version 1. `ON CONFLICT DO NOTHING`: an existing
    /// id returns no row (ALREADY_EXISTS).
    pub const CREATE_AGENT: &str = r#"
WITH a AS (
    INSERT INTO agents (project, id) VALUES ($3, $1) ON CONFLICT (project, id) DO NOTHING
    RETURNING project, id
)
INSERT INTO agent_versions (project, agent_id, version, spec, env_sealed, env_kek)
SELECT project, id, 1, $2, $4, $5 FROM a
RETURNING agent_id
"#;

    /// Adds the next version of an agent that is not archived.
    pub const UPDATE_AGENT: &str = r#"
WITH a AS (
    UPDATE agents SET latest_version = latest_version + 1, update_time = now()
    WHERE project = $3 AND id = $1 AND NOT archived
    RETURNING project, id, latest_version
)
INSERT INTO agent_versions (project, agent_id, version, spec, env_sealed, env_kek)
SELECT project, id, latest_version, $2, $4, $5 FROM a
RETURNING version
"#;

    pub const ARCHIVE_AGENT: &str =
        "UPDATE agents SET archived = true, update_time = now() WHERE project = $2 AND id = $1";

    pub const INSERT_FILE: &str = "INSERT INTO files (id, display_name, size_bytes, sha256, create_time, project) \
         VALUES ($1, $2, $3, $4, $5, $6)";

    pub const GET_FILE: &str = "SELECT id, project, display_name, size_bytes, sha256, create_time \
         FROM files WHERE project = $2 AND id = $1";

    pub const DELETE_FILE: &str = "DELETE FROM files WHERE project = $2 AND id = $1";
}

#[derive(sqlx::FromRow)]
struct AgentRow {
    project: String,
    id: String,
    version: i64,
    latest_version: i64,
    spec: Json<AgentSpec>,
    env_sealed: Option<Vec<u8>>,
    archived: bool,
    create_time: DateTime<Utc>,
    version_create_time: DateTime<Utc>,
}

#[derive(sqlx::FromRow)]
struct FileRow {
    id: Uuid,
    project: String,
    display_name: String,
    size_bytes: i64,
    sha256: String,
    create_time: DateTime<Utc>,
}

impl From<FileRow> for FileInfo {
    fn from(r: FileRow) -> Self {
        Self {
            id: r.id,
            project: r.project,
            display_name: r.display_name,
            size_bytes: r.size_bytes,
            sha256: r.sha256,
            create_time: r.create_time,
        }
    }
}

impl Store {
    /// A row as an agent, its env values opened.
    fn agent(&self, r: AgentRow) -> Result<Agent> {
        let mut spec = r.spec.0;
        let env = self.open_env(&r.project, r.env_sealed.as_deref())?;
        if !env.is_empty() {
            spec.env = env;
        }
        Ok(Agent {
            project: r.project,
            id: r.id,
            version: r.version,
            latest_version: r.latest_version,
            spec,
            archived: r.archived,
            create_time: r.create_time,
            version_create_time: r.version_create_time,
        })
    }

    /// `spec` as stored (env values blanked) and its sealed env.
    fn stored_spec(&self, project: &str, spec: &AgentSpec) -> (AgentSpec, Option<Vec<u8>>) {
        let mut spec = spec.clone();
        let (blank, sealed) = self.seal_env(project, &spec.env);
        spec.env = blank;
        (spec, sealed)
    }

    /// Creates `id` at version 1 in `project`.
    pub(crate) async fn create_agent(
        &self,
        project: &str,
        id: &str,
        spec: &AgentSpec,
    ) -> Result<Agent> {
        let (spec, sealed) = self.stored_spec(project, spec);
        let created: Option<String> = sqlx::query_scalar(sql::CREATE_AGENT)
            .bind(id)
            .bind(Json(&spec))
            .bind(project)
            .bind(&sealed)
            .bind(sealed.as_ref().map(|_| self.sealer().primary()))
            .fetch_optional(&self.pool)
            .await?;
        if created.is_none() {
            return Err(Error::AlreadyExists(format!("agent `{id}` already exists")));
        }
        self.get_agent(project, id, None).await
    }

    /// The agent at `version`, or at its latest.
    pub(crate) async fn get_agent(
        &self,
        project: &str,
        id: &str,
        version: Option<i64>,
    ) -> Result<Agent> {
        let row: Option<AgentRow> = sqlx::query_as(sql::GET_AGENT)
            .bind(id)
            .bind(version)
            .bind(project)
            .fetch_optional(&self.pool)
            .await?;
        if let Some(r) = row {
            return self.agent(r);
        }
        let exists: bool = sqlx::query_scalar(sql::AGENT_EXISTS)
            .bind(id)
            .bind(project)
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
        project: &str,
        after: &str,
        show_archived: bool,
        limit: i64,
    ) -> Result<Vec<Agent>> {
        let rows: Vec<AgentRow> = sqlx::query_as(sql::LIST_AGENTS)
            .bind(after)
            .bind(show_archived)
            .bind(limit)
            .bind(project)
            .fetch_all(&self.pool)
            .await?;
        rows.into_iter().map(|r| self.agent(r)).collect()
    }

    /// Adds a version; refused for an archived agent.
    pub(crate) async fn update_agent(
        &self,
        project: &str,
        id: &str,
        spec: &AgentSpec,
    ) -> Result<Agent> {
        let (spec, sealed) = self.stored_spec(project, spec);
        let version: Option<i64> = sqlx::query_scalar(sql::UPDATE_AGENT)
            .bind(id)
            .bind(Json(&spec))
            .bind(project)
            .bind(&sealed)
            .bind(sealed.as_ref().map(|_| self.sealer().primary()))
            .fetch_optional(&self.pool)
            .await?;
        match version {
            Some(v) => self.get_agent(project, id, Some(v)).await,
            None => {
                let a = self.get_agent(project, id, None).await?;
                Err(Error::Precondition(format!(
                    "agent `{}` is archived; it takes no new versions",
                    a.id
                )))
            }
        }
    }

    pub(crate) async fn archive_agent(&self, project: &str, id: &str) -> Result<Agent> {
        sqlx::query(sql::ARCHIVE_AGENT)
            .bind(id)
            .bind(project)
            .execute(&self.pool)
            .await?;
        self.get_agent(project, id, None).await
    }

    pub(crate) async fn insert_file(&self, f: &FileInfo) -> Result<()> {
        sqlx::query(sql::INSERT_FILE)
            .bind(f.id)
            .bind(&f.display_name)
            .bind(f.size_bytes)
            .bind(&f.sha256)
            .bind(f.create_time)
            .bind(&f.project)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub(crate) async fn get_file(&self, project: &str, id: Uuid) -> Result<FileInfo> {
        let row: FileRow = sqlx::query_as(sql::GET_FILE)
            .bind(id)
            .bind(project)
            .fetch_optional(&self.pool)
            .await?
            .ok_or_else(|| Error::NotFound(format!("file files/{id} not found")))?;
        Ok(row.into())
    }

    pub(crate) async fn delete_file(&self, project: &str, id: Uuid) -> Result<bool> {
        let r = sqlx::query(sql::DELETE_FILE)
            .bind(id)
            .bind(project)
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected() > 0)
    }
}
