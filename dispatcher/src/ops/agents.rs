//! Agents and files: the operations behind `berth.v1.Agents` and
//! `berth.v1.Files`, with no wire types.

use bytes::Bytes;
use chrono::Utc;
use uuid::Uuid;

use berth_common::objects::ObjectStore;

use crate::error::{Error, Result};
use crate::ops::audit::{Action, Audit, Detail};
use crate::session::{Agent, AgentSpec, FileInfo, file_key};
use crate::store::Store;

/// Agent and file operations.
#[derive(Clone)]
pub(crate) struct Agents {
    pub store: Store,
    pub objects: ObjectStore,
    /// Where each change to an agent is recorded, with who made it.
    pub audit: Audit,
}

impl Agents {
    /// Records that `by` did `action` to agent `a` (at its version).
    async fn audit(&self, project: &str, by: &str, action: Action, a: &Agent) {
        let detail = Detail::AgentVersion { version: a.version };
        let resource = format!("agents/{}", a.id);
        self.audit
            .record(project, by, action, &resource, detail)
            .await;
    }

    pub(crate) async fn create(
        &self,
        project: &str,
        id: &str,
        spec: &AgentSpec,
        by: &str,
    ) -> Result<Agent> {
        let a = self.store.create_agent(project, id, spec).await?;
        tracing::info!(project, agent = %id, "agent created");
        self.audit(project, by, Action::AgentCreate, &a).await;
        Ok(a)
    }

    pub(crate) async fn get(&self, project: &str, id: &str, version: Option<i64>) -> Result<Agent> {
        self.store.get_agent(project, id, version).await
    }

    pub(crate) async fn list(
        &self,
        project: &str,
        after: &str,
        show_archived: bool,
        limit: i64,
    ) -> Result<Vec<Agent>> {
        self.store
            .list_agents(project, after, show_archived, limit)
            .await
    }

    pub(crate) async fn update(
        &self,
        project: &str,
        id: &str,
        spec: &AgentSpec,
        by: &str,
    ) -> Result<Agent> {
        let a = self.store.update_agent(project, id, spec).await?;
        tracing::info!(project, agent = %id, version = a.version, "agent updated");
        self.audit(project, by, Action::AgentUpdate, &a).await;
        Ok(a)
    }

    pub(crate) async fn archive(&self, project: &str, id: &str, by: &str) -> Result<Agent> {
        let a = self.store.archive_agent(project, id).await?;
        self.audit(project, by, Action::AgentArchive, &a).await;
        Ok(a)
    }

    /// Stores the object first, then the row: a row always has its object.
    pub(crate) async fn upload_file(
        &self,
        project: &str,
        display_name: String,
        content: Bytes,
    ) -> Result<FileInfo> {
        let digest = ring::digest::digest(&ring::digest::SHA256, &content);
        let sha256 = digest
            .as_ref()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>();
        let info = FileInfo {
            id: Uuid::now_v7(),
            project: project.to_string(),
            display_name,
            size_bytes: content.len() as i64,
            sha256,
            create_time: Utc::now(),
        };
        self.objects.put(&file_key(info.id), content).await?;
        self.store.insert_file(&info).await?;
        tracing::info!(file_id = %info.id, bytes = info.size_bytes, "file uploaded");
        Ok(info)
    }

    pub(crate) async fn get_file(&self, project: &str, id: Uuid) -> Result<FileInfo> {
        self.store.get_file(project, id).await
    }

    pub(crate) async fn delete_file(&self, project: &str, id: Uuid) -> Result<()> {
        if !self.store.delete_file(project, id).await? {
            return Err(Error::NotFound(format!("file files/{id} not found")));
        }
        self.objects.delete(&file_key(id)).await?;
        Ok(())
    }
}
