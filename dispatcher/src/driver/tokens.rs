//! A run's OAuth credentials as its node has them: what was sent, when
//! each is due for a refresh, and the failure the session was told of.
//! The relay keeps them fresh (`relay::credentials`).

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::records::Access;

/// How soon a failed refresh is tried again.
pub(super) const RETRY: chrono::TimeDelta = chrono::TimeDelta::seconds(30);

/// One credential as the node has it.
pub(super) struct Kept {
    pub id: Uuid,
    /// The access token sent (none while failed).
    pub sent: Option<String>,
    /// When to refresh (or retry).
    pub due: DateTime<Utc>,
    /// The failure the session was told of, until a refresh works.
    pub failed: Option<String>,
}

/// The run's refreshed credentials.
pub(crate) struct Credentials {
    pub kept: Vec<Kept>,
    /// The node already has the start's values (else: a re-attach, whose
    /// node has whatever the lost owner last sent).
    pub current: bool,
}

impl Credentials {
    pub(crate) fn new(
        started: Vec<(Uuid, std::result::Result<Access, String>)>,
        attached: bool,
    ) -> Self {
        let now = Utc::now();
        let kept = started
            .into_iter()
            .map(|(id, r)| match r {
                Ok(a) => Kept {
                    id,
                    sent: Some(a.value),
                    due: a.refresh_at,
                    failed: None,
                },
                Err(why) => Kept {
                    id,
                    sent: None,
                    due: now + RETRY,
                    failed: Some(why),
                },
            })
            .collect();
        Self {
            kept,
            current: !attached,
        }
    }

    /// When the next one is due; `None`: never (no credentials).
    pub(crate) fn next_due(&self) -> Option<tokio::time::Instant> {
        if !self.current {
            return Some(tokio::time::Instant::now());
        }
        let due = self.kept.iter().map(|k| k.due).min()?;
        let wait = (due - Utc::now()).to_std().unwrap_or_default();
        Some(tokio::time::Instant::now() + wait)
    }
}
