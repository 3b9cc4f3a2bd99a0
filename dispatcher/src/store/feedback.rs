//! Feedback on sessions and their turns, and search over their messages.

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::Store;
use crate::error::Result;

mod sql {
    /// One rating per (session, turn, identity): a second replaces it.
    pub const UPSERT: &str = "INSERT INTO feedback (session_id, turn, identity, rating, comment) \
         VALUES ($1, $2, $3, $4, $5) \
         ON CONFLICT (session_id, turn, identity) DO UPDATE \
         SET rating = excluded.rating, comment = excluded.comment, update_time = now() \
         RETURNING session_id, turn, identity, rating, comment, update_time";
    pub const LIST: &str = "SELECT session_id, turn, identity, rating, comment, update_time \
         FROM feedback WHERE session_id = $1 ORDER BY turn, identity";

    /// The project's sessions with a message matching $2 (in its first 65,536 characters,
    /// as the index holds it), newest first
    /// before the cursor ($3, $4), each with its first match and a snippet.
    pub const SEARCH: &str = r#"
WITH q AS (SELECT websearch_to_tsquery('simple', $2) AS q),
hits AS (
    SELECT e.session_id, min(e.seq) AS seq
    FROM events e JOIN sessions s ON s.id = e.session_id, q
    WHERE s.project = $1
      AND e.type IN ('user.message', 'agent.message')
      AND to_tsvector('simple', berth_message_text(e.payload)) @@ q.q
      AND ($3::timestamptz IS NULL OR (s.create_time, s.id) < ($3, $4))
    GROUP BY e.session_id
)
SELECT h.session_id, h.seq, s.create_time,
       ts_headline('simple', berth_message_text(e.payload), q.q,
                   'StartSel=**, StopSel=**, MaxWords=24, MinWords=8') AS snippet
FROM hits h
JOIN sessions s ON s.id = h.session_id
JOIN events e ON e.session_id = h.session_id AND e.seq = h.seq, q
ORDER BY s.create_time DESC, s.id DESC
LIMIT $5
"#;
}

/// One rating.
#[derive(Debug, Clone, sqlx::FromRow)]
pub(crate) struct FeedbackRow {
    pub session_id: Uuid,
    pub turn: i64,
    pub identity: String,
    pub rating: i32,
    pub comment: String,
    pub update_time: DateTime<Utc>,
}

/// A session whose messages match a search.
#[derive(Debug, Clone, sqlx::FromRow)]
pub(crate) struct SearchHit {
    pub session_id: Uuid,
    pub seq: i64,
    pub create_time: DateTime<Utc>,
    pub snippet: String,
}

impl Store {
    pub(crate) async fn upsert_feedback(
        &self,
        session: Uuid,
        turn: i64,
        identity: &str,
        rating: i32,
        comment: &str,
    ) -> Result<FeedbackRow> {
        Ok(sqlx::query_as(sql::UPSERT)
            .bind(session)
            .bind(turn)
            .bind(identity)
            .bind(rating)
            .bind(comment)
            .fetch_one(&self.pool)
            .await?)
    }

    pub(crate) async fn list_feedback(&self, session: Uuid) -> Result<Vec<FeedbackRow>> {
        Ok(sqlx::query_as(sql::LIST)
            .bind(session)
            .fetch_all(&self.pool)
            .await?)
    }

    pub(crate) async fn search_sessions(
        &self,
        project: &str,
        query: &str,
        before: Option<(DateTime<Utc>, Uuid)>,
        limit: i64,
    ) -> Result<Vec<SearchHit>> {
        let (time, id) = before.unzip();
        Ok(sqlx::query_as(sql::SEARCH)
            .bind(project)
            .bind(query)
            .bind(time)
            .bind(id)
            .bind(limit)
            .fetch_all(&self.pool)
            .await?)
    }
}
