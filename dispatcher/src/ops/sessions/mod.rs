//! Session operations behind the public API, with no wire types: creating
//! ([`create`]), steering ([`input`]), a session's life ([`life`]) and
//! reading it ([`read`]).

mod create;
mod input;
mod life;
mod read;
mod secrets;

pub(crate) use create::Origin;

use std::sync::Arc;

use berth_common::names::session_name;
use uuid::Uuid;

use crate::error::{Error, Result};
use crate::log::EventLog;
use crate::session::Session;
use crate::store::{SessionFilter, Store};

/// The session operations clients call.
#[derive(Clone)]
pub(crate) struct Sessions {
    pub store: Store,
    pub log: Arc<EventLog>,
    pub objects: berth_common::objects::ObjectStore,
    /// The fleet, for what its nodes can give a session.
    pub nodes: Arc<crate::nodes::Nodes>,
    /// Hosts git resources may come from beyond public https.
    pub git_allow: Vec<String>,
    /// The deployment's queue timeout, for sessions that set none.
    pub queue_timeout: Option<std::time::Duration>,
    /// Where each operation records what it did, and who did it.
    pub audit: crate::ops::audit::Audit,
    /// Where a session claimed as it is created goes to be driven.
    pub handoff: crate::handoff::Handoff,
}

/// A page of search results, and the (time, id) the next one starts before.
pub(crate) type SearchPage = (
    Vec<(Session, crate::store::SearchHit)>,
    Option<(chrono::DateTime<chrono::Utc>, Uuid)>,
);

/// A person's answer to a tool permission request, checked.
#[derive(Debug, Clone)]
pub(crate) struct ToolAnswer {
    pub tool_use_id: String,
    pub decision: berth_common::tools::Decision,
    pub updated_input: Option<serde_json::Value>,
    pub always: bool,
    pub message: String,
    pub interrupt: bool,
}

/// How `ExportSession` renders.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ExportFormat {
    Markdown,
    Json,
    Pdf,
}
impl Sessions {
    /// Records that `by` did `action` to session `id`.
    async fn audit(
        &self,
        project: &str,
        by: &str,
        action: crate::ops::audit::Action,
        id: Uuid,
        detail: crate::ops::audit::Detail,
    ) {
        self.audit
            .record(project, by, action, &session_name(id), detail)
            .await;
    }

    /// The session, if it is in `project`: another project's is NOT_FOUND,
    /// exactly as a session that does not exist.
    pub(crate) async fn get(&self, project: &str, id: Uuid) -> Result<Session> {
        let s = self.store.get_session(id).await?;
        if s.project != project {
            return Err(Error::SessionNotFound(id.to_string()));
        }
        Ok(s)
    }

    pub(crate) async fn list(&self, project: &str, filter: SessionFilter) -> Result<Vec<Session>> {
        self.store.list_sessions(project, &filter).await
    }
}
