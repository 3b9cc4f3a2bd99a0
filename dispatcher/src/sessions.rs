//! Session operations behind the public API, with no wire types.

use std::sync::Arc;

use berth_common::events as ev;
use tokio::sync::mpsc;
use uuid::Uuid;

use crate::error::{Error, Result};
use crate::log::EventLog;
use crate::session::{Event, NewEvent, NewSession, Session, StatusEvent};
use crate::store::{SessionFilter, Store, user_message_payload};

/// The session operations clients call.
#[derive(Clone)]
pub struct Sessions {
    pub store: Store,
    pub log: Arc<EventLog>,
}

impl Sessions {
    pub async fn create(&self, new: NewSession) -> Result<Session> {
        let (session, created) = self.store.create_session(&new).await?;
        if created {
            tracing::info!(session_id = %session.id, image = %session.spec.image, "session created");
        }
        Ok(session)
    }

    pub async fn get(&self, id: Uuid) -> Result<Session> {
        self.store.get_session(id).await
    }

    pub async fn list(&self, filter: SessionFilter) -> Result<Vec<Session>> {
        self.store.list_sessions(&filter).await
    }

    /// Persists a user message; the driver forwards it. Returns its seq.
    pub async fn send_message(&self, id: Uuid, text: &str) -> Result<i64> {
        self.require_input(
            id,
            "messages can only be sent to pending, starting, running or idle sessions",
        )
        .await?;
        let e = self
            .log
            .append(
                id,
                NewEvent::new(ev::USER_MESSAGE, user_message_payload(text)),
            )
            .await?;
        Ok(e.seq)
    }

    pub async fn interrupt(&self, id: Uuid) -> Result<i64> {
        self.require_input(id, "only a live session can be interrupted")
            .await?;
        let e = self
            .log
            .append(id, NewEvent::new(ev::USER_INTERRUPT, "{}"))
            .await?;
        Ok(e.seq)
    }

    async fn require_input(&self, id: Uuid, what: &'static str) -> Result<()> {
        let s = self.store.get_session(id).await?;
        if !s.status.accepts_input() {
            return Err(Error::WrongStatus {
                id,
                status: s.status,
                what,
            });
        }
        Ok(())
    }

    /// Stops the session with reason `user`. Stopping twice is not an error.
    pub async fn stop(&self, id: Uuid) -> Result<Session> {
        match self
            .log
            .transition(
                id,
                StatusEvent::StopRequested,
                "user",
                serde_json::json!({}),
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
        self.store.get_session(id).await
    }

    pub async fn list_events(&self, id: Uuid, after_seq: i64, limit: i64) -> Result<Vec<Event>> {
        // NOT_FOUND for an unknown session, not an empty page.
        self.store.get_session(id).await?;
        self.store.list_events(id, after_seq, limit).await
    }

    /// Replays after `after_seq`, then tails.
    pub async fn stream(
        &self,
        id: Uuid,
        after_seq: i64,
    ) -> Result<mpsc::Receiver<Result<Arc<Event>>>> {
        if after_seq < 0 {
            return Err(Error::invalid("after_seq", "must not be negative"));
        }
        self.store.get_session(id).await?;
        Ok(self.log.follow(id, after_seq, 128))
    }
}
