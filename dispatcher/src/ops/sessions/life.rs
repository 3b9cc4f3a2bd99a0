//! A session's life: stop, pause, resume, archive, delete.

use berth_common::events::payload::StatusDetail;
use uuid::Uuid;

use super::Sessions;
use crate::error::{Error, Result};
use crate::ops::audit::{Action, Detail};
use crate::session::{Session, StatusEvent, session_prefix};

impl Sessions {
    /// The session after `by`'s `action` changed its status, recorded with
    /// the status it left it in.
    async fn changed(&self, project: &str, by: &str, action: Action, id: Uuid) -> Result<Session> {
        let s = self.store.get_session(id).await?;
        let detail = Detail::Status {
            status: s.status.to_string(),
        };
        self.audit(project, by, action, id, detail).await;
        Ok(s)
    }

    /// Stops the session with reason `user` (a snapshot is kept, so it can be
    /// resumed). Stopping twice is not an error.
    pub(crate) async fn stop(&self, project: &str, id: Uuid, by: &str) -> Result<Session> {
        self.get(project, id).await?;
        match self
            .log
            .transition(
                id,
                StatusEvent::StopRequested,
                "user",
                StatusDetail::default(),
            )
            .await
        {
            Ok(_) => {}
            Err(Error::Transition(t)) => {
                return Err(Error::WrongStatus {
                    id,
                    status: t.from,
                    what: "only a live session can be stopped",
                });
            }
            Err(e) => return Err(e),
        }
        self.changed(project, by, Action::SessionStop, id).await
    }

    /// Asks the driver to snapshot the session and free its container. The
    /// status machine decides which sessions may pause (running or idle).
    pub(crate) async fn pause(&self, project: &str, id: Uuid, by: &str) -> Result<Session> {
        self.get(project, id).await?;
        self.log
            .transition(
                id,
                StatusEvent::PauseRequested,
                "pausing",
                StatusDetail::default(),
            )
            .await
            .map_err(|e| wrong_status(id, e, "only a running or idle session can be paused"))?;
        self.changed(project, by, Action::SessionPause, id).await
    }

    /// Queues a paused or stopped session again; it restores its snapshot.
    pub(crate) async fn resume(&self, project: &str, id: Uuid, by: &str) -> Result<Session> {
        self.get(project, id).await?;
        self.log
            .transition(id, StatusEvent::Resumed, "resumed", StatusDetail::default())
            .await
            .map_err(|e| wrong_status(id, e, "only a paused or stopped session can be resumed"))?;
        self.store.notify_queue().await?;
        self.changed(project, by, Action::SessionResume, id).await
    }

    pub(crate) async fn archive(&self, project: &str, id: Uuid, by: &str) -> Result<Session> {
        self.get(project, id).await?;
        self.log
            .transition(id, StatusEvent::Archived, "user", StatusDetail::default())
            .await
            .map_err(|e| {
                wrong_status(
                    id,
                    e,
                    "only a stopped, paused, completed, failed or timed-out session can be archived",
                )
            })?;
        self.changed(project, by, Action::SessionArchive, id).await
    }

    /// Deletes a session that is not live: its objects, then its rows.
    /// Returns how many objects went.
    pub(crate) async fn delete(&self, project: &str, id: Uuid, by: &str) -> Result<u64> {
        const WHAT: &str = "a live session cannot be deleted; stop it first";
        let s = self.get(project, id).await?;
        if s.status.is_live() {
            return Err(Error::WrongStatus {
                id,
                status: s.status,
                what: WHAT,
            });
        }
        let objects = self.objects.delete_prefix(&session_prefix(id)).await?;
        if !self.store.delete_session(id).await? {
            let s = self.store.get_session(id).await?;
            return Err(Error::WrongStatus {
                id,
                status: s.status,
                what: WHAT,
            });
        }
        tracing::info!(session_id = %id, objects, "session deleted");
        let detail = Detail::Deleted {
            objects_deleted: objects,
        };
        self.audit(project, by, Action::SessionDelete, id, detail)
            .await;
        Ok(objects)
    }
}

/// A refused transition as the client should see it.
fn wrong_status(id: Uuid, e: Error, what: &'static str) -> Error {
    match e {
        Error::Transition(t) => Error::WrongStatus {
            id,
            status: t.from,
            what,
        },
        e => e,
    }
}
