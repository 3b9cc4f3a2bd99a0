//! The run's OAuth credentials, kept fresh on its node: each access token
//! is refreshed when it grows stale (or a host refused it: a gateway's
//! 401) and the new one is sent to the node. A refresh that fails is a
//! `session.credential_failed` event naming the credential, and the node's
//! gateway refuses its requests with the reason until a retry works.

use berth_proto::node::v1::{self as pb, dispatcher_frame};
use chrono::Utc;
use uuid::Uuid;

use super::state::Relay;
use crate::driver::tokens::RETRY;
use crate::error::Result;
use crate::session::NewEvent;

impl Relay<'_> {
    /// Starts the run's credentials: a failure at the start is told now; a
    /// re-attached node is sent the current values.
    pub(super) async fn start_credentials(&mut self) -> Result<()> {
        let failed: Vec<(Uuid, String)> = self
            .credentials
            .kept
            .iter()
            .filter_map(|k| Some((k.id, k.failed.clone()?)))
            .collect();
        for (id, why) in failed {
            self.tell_failed(id, &why).await?;
        }
        if !self.credentials.current {
            self.credentials.current = true;
            // What the lost owner sent is unknown: send the current one.
            for k in &mut self.credentials.kept {
                k.due = Utc::now();
                k.sent = None;
            }
        }
        Ok(())
    }

    /// Refreshes what is due.
    pub(super) async fn on_credentials_due(&mut self) -> Result<()> {
        if !self.credentials.current {
            return self.start_credentials().await;
        }
        let now = Utc::now();
        let due: Vec<usize> = (0..self.credentials.kept.len())
            .filter(|i| self.credentials.kept[*i].due <= now)
            .collect();
        for i in due {
            self.renew(i, false).await?;
        }
        Ok(())
    }

    /// A host refused credential `id` (a 401 the node's gateway saw).
    pub(super) async fn on_credential_rejected(&mut self, id: &str) -> Result<()> {
        let Some(i) = self
            .credentials
            .kept
            .iter()
            .position(|k| k.id.to_string() == id)
        else {
            return Ok(());
        };
        tracing::info!(credential_id = %id, "a host refused the access token; refreshing it");
        self.renew(i, true).await
    }

    /// Gets a fresh token for credential `i` and sends it (or the failure).
    async fn renew(&mut self, i: usize, refused: bool) -> Result<()> {
        let (id, sent) = {
            let k = &self.credentials.kept[i];
            (k.id, k.sent.clone())
        };
        let refused = if refused { sent.as_deref() } else { None };
        match self.ctx.oauth.access(id, refused).await {
            Ok(a) => {
                let changed = sent.as_deref() != Some(a.value.as_str());
                let k = &mut self.credentials.kept[i];
                k.due = a.refresh_at.max(Utc::now() + chrono::TimeDelta::seconds(1));
                k.failed = None;
                if changed {
                    k.sent = Some(a.value.clone());
                    self.send_credential(id, a.value, String::new()).await;
                }
            }
            Err(why) => {
                let told = {
                    let k = &mut self.credentials.kept[i];
                    k.due = Utc::now() + RETRY;
                    k.sent = None;
                    k.failed.replace(why.clone()).is_some()
                };
                self.send_credential(id, String::new(), why.clone()).await;
                if !told {
                    self.tell_failed(id, &why).await?;
                }
            }
        }
        Ok(())
    }

    async fn send_credential(&self, id: Uuid, value: String, error: String) {
        self.send(dispatcher_frame::Kind::Credential(pb::CredentialUpdate {
            id: id.to_string(),
            value,
            error,
        }))
        .await;
    }

    async fn tell_failed(&self, id: Uuid, why: &str) -> Result<()> {
        tracing::warn!(credential_id = %id, error = %why, "the session's credential could not be refreshed");
        self.ctx
            .log
            .append(self.session.id, NewEvent::credential_failed(id, why))
            .await
            .map(|_| ())
    }
}
