//! The relay's clocks, as one: every deadline a run keeps (credentials to
//! refresh, tool requests to time out, the session's timeouts, a hand-back
//! at shutdown, a feed to follow again, frames to acknowledge) is waited on
//! by a single timer, set to whichever comes first. A held session's future
//! keeps one timer, not six.

use berth_common::events::payload::StatusDetail;
use tokio::time::Instant;

use super::state::{Flow, Relay};
use crate::driver::deadlines::Expiry;
use crate::error::Result;
use crate::session::StatusEvent;

/// What is due when the relay's timer fires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Due {
    /// A credential needs minting or refreshing.
    Credentials,
    /// A tool request the agent waits on timed out.
    Tool,
    /// The session's hard or inactivity timeout.
    Expiry(Expiry),
    /// The node did not stop the session in time for shutdown.
    HandBack,
    /// Follow the input feed again after it failed.
    Refollow,
    /// Tell the node what is persisted.
    Ack,
}

impl Relay<'_> {
    /// The first deadline, and what it is for.
    pub(super) fn next_due(&self) -> Option<(Instant, Due)> {
        [
            self.credentials.next_due().map(|t| (t, Due::Credentials)),
            self.tools.next_deadline().map(|t| (t, Due::Tool)),
            self.deadlines.next().map(|(t, e)| (t, Due::Expiry(e))),
            self.handing_back.map(|t| (t, Due::HandBack)),
            self.refollow_at.map(|t| (t, Due::Refollow)),
            self.ack_at.map(|t| (t, Due::Ack)),
        ]
        .into_iter()
        .flatten()
        .min_by_key(|(t, _)| *t)
    }

    /// Does what fell due.
    pub(super) async fn on_due(&mut self, due: Due) -> Result<Flow> {
        match due {
            Due::Credentials => {
                self.on_credentials_due().await?;
                Ok(Flow::Continue)
            }
            Due::Tool => self.on_tool_timeout().await,
            Due::Expiry(e) => self.on_expiry(e).await,
            Due::HandBack => {
                tracing::warn!(
                    "the node did not stop the session in time for shutdown; re-queued without a snapshot"
                );
                self.transition(
                    StatusEvent::NodeLost,
                    "dispatcher shut down",
                    StatusDetail::default(),
                )
                .await?;
                Ok(Flow::Done)
            }
            Due::Refollow => Ok(self.follow_again()),
            Due::Ack => Ok(self.ack().await),
        }
    }
}

/// Waits until `next` is due; never, when nothing is.
pub(super) async fn wait(next: Option<(Instant, Due)>) -> Due {
    match next {
        Some((at, due)) => {
            tokio::time::sleep_until(at).await;
            due
        }
        None => std::future::pending().await,
    }
}
