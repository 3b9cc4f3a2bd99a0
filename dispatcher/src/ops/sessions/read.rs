//! Reading a session: its events (paged and live), search, export and
//! feedback.

use uuid::Uuid;

use super::{ExportFormat, SearchPage, Sessions};
use crate::error::{Error, Result};
use crate::session::Event;

impl Sessions {
    /// Records `identity`'s rating of session `id` (turn 0: the whole
    /// session), replacing its earlier one for that turn.
    pub(crate) async fn submit_feedback(
        &self,
        project: &str,
        id: Uuid,
        turn: i64,
        identity: &str,
        rating: i32,
        comment: &str,
    ) -> Result<crate::store::FeedbackRow> {
        let s = self.get(project, id).await?;
        if turn < 0 || turn > s.usage.turns {
            return Err(Error::invalid(
                "turn",
                format!(
                    "0 (the whole session) or a turn it has had (1–{})",
                    s.usage.turns
                ),
            ));
        }
        let f = self
            .store
            .upsert_feedback(id, turn, identity, rating, comment)
            .await?;
        let detail = crate::ops::audit::Detail::Feedback { turn, rating };
        let action = crate::ops::audit::Action::SessionFeedback;
        self.audit(project, identity, action, id, detail).await;
        Ok(f)
    }

    pub(crate) async fn list_feedback(
        &self,
        project: &str,
        id: Uuid,
    ) -> Result<Vec<crate::store::FeedbackRow>> {
        self.get(project, id).await?;
        self.store.list_feedback(id).await
    }

    /// The project's sessions whose messages match `query`, newest first
    /// before `before`, each with its first match, and where the next page
    /// starts (when this one is full). Sessions deleted between the two
    /// reads are left out.
    pub(crate) async fn search(
        &self,
        project: &str,
        query: &str,
        before: Option<(chrono::DateTime<chrono::Utc>, Uuid)>,
        limit: i64,
    ) -> Result<SearchPage> {
        let hits = self
            .store
            .search_sessions(project, query, before, limit)
            .await?;
        let next = hits
            .last()
            .filter(|_| hits.len() as i64 == limit)
            .map(|h| (h.create_time, h.session_id));
        let mut found = Vec::with_capacity(hits.len());
        for hit in hits {
            match self.get(project, hit.session_id).await {
                Ok(s) => found.push((s, hit)),
                Err(Error::SessionNotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok((found, next))
    }

    /// The whole session rendered as `format`.
    pub(crate) async fn export(
        &self,
        project: &str,
        id: Uuid,
        format: ExportFormat,
    ) -> Result<Vec<u8>> {
        let s = self.get(project, id).await?;
        let mut events = Vec::new();
        loop {
            let after = events.last().map_or(0, |e: &Event| e.seq);
            let page = self.store.list_events(id, after, 1000).await?;
            if page.is_empty() {
                break;
            }
            events.extend(page);
        }
        Ok(match format {
            ExportFormat::Markdown => crate::ops::export::markdown(&s, &events).into_bytes(),
            ExportFormat::Json => crate::ops::export::json(&s, &events).into_bytes(),
            ExportFormat::Pdf => crate::ops::export_pdf::pdf(
                &crate::ops::export::markdown(&s, &events),
                &format!("berth - sessions/{}", s.id),
            ),
        })
    }

    pub(crate) async fn list_events(
        &self,
        project: &str,
        id: Uuid,
        after_seq: i64,
        limit: i64,
    ) -> Result<Vec<Event>> {
        // NOT_FOUND for an unknown session, not an empty page.
        self.get(project, id).await?;
        self.store.list_events(id, after_seq, limit).await
    }

    /// Replays after `after_seq`, then tails.
    pub(crate) async fn stream(
        &self,
        project: &str,
        id: Uuid,
        after_seq: i64,
    ) -> Result<crate::log::Follow> {
        if after_seq < 0 {
            return Err(Error::invalid("after_seq", "must not be negative"));
        }
        self.get(project, id).await?;
        Ok(self.log.follow(id, after_seq))
    }
}
