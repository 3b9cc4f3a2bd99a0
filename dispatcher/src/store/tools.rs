//! Tool permission requests (`tool_requests`): asked with the agent's line,
//! answered or closed with their event, each in one transaction, so a
//! request and its log never disagree whoever dies in between.

use berth_common::events::{self as ev, payload};
use chrono::{DateTime, Utc};
use sqlx::types::Json;
use uuid::Uuid;

use super::Store;
use super::events::{Append, Stored, append_rows, placed};
use crate::error::{Error, Result};
use crate::session::tool_requests::{self, RequestState, Verdict};
use crate::session::{Event, NewEvent};

mod sql {
    /// Records a request; a line sent again (re-attach) records nothing new.
    pub const ASK: &str = r#"
INSERT INTO tool_requests (session_id, tool_use_id, request_id, tool_name, input, reason,
                           suggestions, epoch, ask_seq, message_seq, deadline, timeout_decision)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, now() + $11 * interval '1 millisecond', $12)
ON CONFLICT (session_id, tool_use_id) DO NOTHING
"#;

    /// The request, locked for its answer.
    pub const LOCK: &str = "SELECT request_id, tool_name, suggestions, ask_time, decision, \
         answer, answer_seq FROM tool_requests WHERE session_id = $1 AND tool_use_id = $2 FOR UPDATE";

    /// Records the answer (or closing) of a pending request.
    pub const ANSWER: &str = "UPDATE tool_requests SET decision = $3, answer = $4, answer_seq = $5, \
         answer_time = now() WHERE session_id = $1 AND tool_use_id = $2";

    /// Closes what the agent withdrew.
    pub const WITHDRAW: &str = "UPDATE tool_requests SET decision = 'cancelled', answer_time = now() \
         WHERE session_id = $1 AND request_id = $2 AND decision IS NULL";

    /// Every pending request of a session, locked, oldest first.
    pub const PENDING_LOCKED: &str = "SELECT tool_use_id, request_id, message_seq FROM tool_requests \
         WHERE session_id = $1 AND decision IS NULL ORDER BY ask_time FOR UPDATE";

    /// Pending requests of these sessions, oldest first. Served by
    /// `tool_requests_pending`.
    pub const PENDING: &str = "SELECT session_id, tool_use_id, request_id, tool_name, input, reason, \
         suggestions, ask_seq, ask_time, deadline FROM tool_requests \
         WHERE session_id = ANY($1) AND decision IS NULL ORDER BY ask_time";

    /// The requests a re-attached run's agent still waits on: pending, or
    /// answered after the input cursor $2 (the answer is not forwarded yet).
    pub const UNFORWARDED: &str = "SELECT session_id, tool_use_id, request_id, tool_name, input, \
         reason, suggestions, ask_seq, ask_time, deadline FROM tool_requests \
         WHERE session_id = $1 AND (decision IS NULL \
           OR (decision IN ('allow', 'deny') AND answer_seq > $2)) ORDER BY ask_time";

    /// How many requests wait, fleet-wide, and the oldest's age in seconds.
    pub const PENDING_SUMMARY: &str = "SELECT count(*), \
         coalesce(extract(epoch FROM now() - min(ask_time))::float8, 0) \
         FROM tool_requests WHERE decision IS NULL";
}

/// A request an agent asked, recorded with its line.
#[derive(Debug, Clone)]
pub(crate) struct NewToolRequest {
    pub session: Uuid,
    pub ask: payload::ToolPermission,
    pub epoch: i64,
    pub message_seq: i64,
    pub timeout: std::time::Duration,
    pub timeout_decision: berth_common::tools::Decision,
}

/// What a tool write does besides appending its line's events.
#[derive(Debug, Clone)]
pub(crate) enum ToolEffect {
    /// The line (its one `agent.tool_permission`) asks: record the request.
    Ask(NewToolRequest),
    /// The line withdraws the request `request_id`.
    Withdraw { session: Uuid, request_id: String },
    /// Answers a pending request (a person, or the timeout), logging
    /// `user.tool_confirmation`. The store fills `request_id`, `tool_name`,
    /// `updated_permissions` (with `always`) and `waited_s`.
    Answer {
        session: Uuid,
        answer: payload::ToolConfirmation,
        /// The trace the answer was given in (its event records it).
        traceparent: Option<String>,
    },
    /// Closes every pending request of a session whose run ended, each
    /// with a `session.tool_permission_cancelled` event.
    CloseAll {
        session: Uuid,
        epoch: Option<i64>,
        reason: String,
    },
}

/// What a tool write did.
#[derive(Debug, Default)]
pub(crate) struct ToolOutcome {
    /// Where the line's events landed, in order.
    pub stored: Vec<Stored>,
    /// Events the store logged itself (a confirmation, cancellations).
    pub events: Vec<Event>,
    /// An answer given before, the same as this one: its seq.
    pub already: Option<i64>,
    /// Requests closed by `CloseAll`: the `user.message` whose turn asked.
    pub closed_message_seqs: Vec<i64>,
}

/// A pending request as the API and the relay see it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub(crate) struct PendingTool {
    pub session_id: Uuid,
    pub tool_use_id: String,
    pub request_id: String,
    pub tool_name: String,
    pub input: Json<serde_json::Value>,
    pub reason: String,
    pub suggestions: Json<serde_json::Value>,
    pub ask_seq: i64,
    pub ask_time: DateTime<Utc>,
    pub deadline: DateTime<Utc>,
}

#[derive(sqlx::FromRow)]
struct Locked {
    request_id: String,
    tool_name: String,
    suggestions: Json<serde_json::Value>,
    ask_time: DateTime<Utc>,
    decision: Option<String>,
    /// A confirmation's payload, or a closing's `{by, reason}`.
    answer: Option<Json<serde_json::Value>>,
    answer_seq: Option<i64>,
}

impl From<Locked> for RequestState {
    fn from(row: Locked) -> Self {
        Self {
            request_id: row.request_id,
            tool_name: row.tool_name,
            suggestions: row.suggestions.0,
            ask_time: row.ask_time,
            answered_by: row
                .answer
                .as_ref()
                .and_then(|a| a.0["by"].as_str().map(String::from)),
            decision: row.decision,
            answer_seq: row.answer_seq,
        }
    }
}

/// Records a request the agent asked (its line's event is at `ask_seq`).
async fn ask(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    request: &NewToolRequest,
    ask_seq: i64,
) -> Result<()> {
    let a = &request.ask;
    sqlx::query(sql::ASK)
        .bind(request.session)
        .bind(&a.tool_use_id)
        .bind(&a.request_id)
        .bind(&a.tool_name)
        .bind(Json(&a.input))
        .bind(&a.reason)
        .bind(Json(&a.suggestions))
        .bind(request.epoch)
        .bind(ask_seq)
        .bind(request.message_seq)
        .bind(i64::try_from(request.timeout.as_millis()).unwrap_or(i64::MAX))
        .bind(request.timeout_decision.as_str())
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// A client event appended inside a tool transaction.
fn client_append(session: Uuid, event: NewEvent, epoch: Option<i64>) -> Append {
    Append {
        session,
        epoch,
        event,
        node_seq: None,
        persisted: None,
    }
}

impl Store {
    /// Appends a line's events (may be none) and applies `effect`, in one
    /// transaction.
    pub(crate) async fn apply_tool(
        &self,
        appends: &[Append],
        effect: &ToolEffect,
    ) -> Result<ToolOutcome> {
        let mut tx = self.pool.begin().await?;
        let mut out = ToolOutcome::default();
        if !appends.is_empty() {
            let by_id = append_rows(&mut *tx, appends).await?;
            let Some(stored) = placed(appends, &by_id) else {
                tx.rollback().await?;
                return Err(self.refused(appends, &by_id).await);
            };
            out.stored = stored;
        }
        match effect {
            ToolEffect::Ask(request) => {
                let ask_seq = out.stored.first().map_or(0, |s| s.seq);
                ask(&mut tx, request, ask_seq).await?;
            }
            ToolEffect::Withdraw {
                session,
                request_id,
            } => {
                sqlx::query(sql::WITHDRAW)
                    .bind(session)
                    .bind(request_id)
                    .execute(&mut *tx)
                    .await?;
            }
            ToolEffect::Answer {
                session,
                answer,
                traceparent,
            } => {
                match self
                    .answer(&mut tx, *session, answer, traceparent.clone())
                    .await?
                {
                    Ok(event) => out.events.push(event),
                    Err(already) => {
                        out.already = already;
                        tx.rollback().await?;
                        return Ok(out);
                    }
                }
            }
            ToolEffect::CloseAll {
                session,
                epoch,
                reason,
            } => {
                let (events, seqs) = self.close_all(&mut tx, *session, *epoch, reason).await?;
                out.events = events;
                out.closed_message_seqs = seqs;
            }
        }
        tx.commit().await?;
        let stored = appends
            .iter()
            .zip(&out.stored)
            .map(|(a, at)| (a.session, at.seq));
        let logged = out.events.iter().map(|e| (e.session_id, e.seq));
        self.notices.events(stored.chain(logged));
        Ok(out)
    }

    /// Answers a pending request as [`tool_requests::judge`] says: its
    /// logged confirmation, or `Err(seq)` when the same answer was given
    /// before (at `seq`).
    async fn answer(
        &self,
        tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
        session: Uuid,
        answer: &payload::ToolConfirmation,
        traceparent: Option<String>,
    ) -> Result<std::result::Result<Event, Option<i64>>> {
        let locked: Option<Locked> = sqlx::query_as(sql::LOCK)
            .bind(session)
            .bind(&answer.tool_use_id)
            .fetch_optional(&mut **tx)
            .await?;
        let Some(row) = locked else {
            return Err(Error::Precondition(format!(
                "tool_use_id: no permission request `{}` in this session; GetSession lists the waiting ones in `pending_tool_requests`",
                answer.tool_use_id
            )));
        };
        let p = match tool_requests::judge(&row.into(), answer, Utc::now()) {
            Verdict::Record(p) => *p,
            Verdict::Already(seq) => return Ok(Err(seq)),
            Verdict::Refused(why) => return Err(Error::Precondition(why)),
        };
        let mut event = NewEvent::new(ev::USER_TOOL_CONFIRMATION, payload::to_json(&p));
        event.traceparent = traceparent;
        let append = client_append(session, event, None);
        let event = self.append_one(tx, append).await?;
        sqlx::query(sql::ANSWER)
            .bind(session)
            .bind(&p.tool_use_id)
            .bind(&p.decision)
            .bind(Json(&p))
            .bind(event.seq)
            .execute(&mut **tx)
            .await?;
        Ok(Ok(event))
    }

    /// Closes every pending request of `session`, each with its
    /// cancellation event: the events, and the `user.message` seqs whose
    /// turns asked them.
    async fn close_all(
        &self,
        tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
        session: Uuid,
        epoch: Option<i64>,
        reason: &str,
    ) -> Result<(Vec<Event>, Vec<i64>)> {
        let rows: Vec<(String, String, i64)> = sqlx::query_as(sql::PENDING_LOCKED)
            .bind(session)
            .fetch_all(&mut **tx)
            .await?;
        let (mut events, mut seqs) = (Vec::new(), Vec::new());
        for (tool_use_id, request_id, message_seq) in rows {
            let p = payload::ToolPermissionCancelled {
                request_id,
                tool_use_id,
                reason: reason.to_string(),
            };
            let append = client_append(
                session,
                NewEvent::new(ev::SESSION_TOOL_PERMISSION_CANCELLED, payload::to_json(&p)),
                epoch,
            );
            let event = self.append_one(tx, append).await?;
            sqlx::query(sql::ANSWER)
                .bind(session)
                .bind(&p.tool_use_id)
                .bind("cancelled")
                .bind(Json(serde_json::json!({"by": "run_end", "reason": reason})))
                .bind(event.seq)
                .execute(&mut **tx)
                .await?;
            events.push(event);
            seqs.push(message_seq);
        }
        Ok((events, seqs))
    }

    async fn append_one(
        &self,
        tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
        append: Append,
    ) -> Result<Event> {
        let batch = [append];
        let by_id = append_rows(&mut **tx, &batch).await?;
        let Some(at) = placed(&batch, &by_id).and_then(|s| s.first().copied()) else {
            return Err(self.refused(&batch, &by_id).await);
        };
        let [append] = batch;
        Ok(append.into_event(at))
    }

    /// Pending requests of these sessions, oldest first.
    pub(crate) async fn pending_tools(&self, sessions: &[Uuid]) -> Result<Vec<PendingTool>> {
        if sessions.is_empty() {
            return Ok(Vec::new());
        }
        Ok(sqlx::query_as(sql::PENDING)
            .bind(sessions)
            .fetch_all(&self.pool)
            .await?)
    }

    /// The requests a re-attached run's agent still waits on (see
    /// [`sql::UNFORWARDED`]).
    pub(crate) async fn unforwarded_tools(
        &self,
        session: Uuid,
        input_seq: i64,
    ) -> Result<Vec<PendingTool>> {
        Ok(sqlx::query_as(sql::UNFORWARDED)
            .bind(session)
            .bind(input_seq)
            .fetch_all(&self.pool)
            .await?)
    }

    /// Requests waiting fleet-wide, and the oldest's age.
    pub(crate) async fn pending_tool_summary(&self) -> Result<(i64, f64)> {
        Ok(sqlx::query_as(sql::PENDING_SUMMARY)
            .fetch_one(&self.pool)
            .await?)
    }
}
