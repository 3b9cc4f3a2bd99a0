//! Each session's event log: batched appends fenced by epoch (with the
//! usage of the turns they end: see `usage`), pages of history, and
//! retention.

use chrono::{DateTime, Utc};
use uuid::Uuid;

use std::sync::Arc;
use std::sync::atomic::AtomicI64;

use super::Store;
use super::claimed::FirstInput;
use super::usage::{self, TurnToRecord, UsageRecorded};
use crate::error::{Error, Result};
use crate::session::usage::Turn;
use crate::session::{Event, NewEvent};

mod sql {
    /// Appends a batch of events for any number of sessions, numbering each
    /// session's events from its `last_seq` under the row lock (gapless)
    /// (the caller leaves other dispatchers a notice once it commits: see
    /// `store::notices`); a run's events move the
    /// session's `node_seq` (the re-attach cursor). Payloads and lines are
    /// stored as written (text and bytea, never re-encoded).
    /// `lo`/`hi`: the epochs the batch's fenced events carry for a session
    /// (NULL when none is fenced); a session whose epoch differs takes none
    /// of its events, and the caller learns which by the rows missing.
    pub const APPEND_EVENTS: &str = r#"
WITH input AS (
    SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::bigint[],
                         $6::bytea[], $7::integer[], $8::bigint[], $9::text[], $10::text[])
        WITH ORDINALITY
        AS t(session_id, id, type, payload, epoch, raw, line_part, node_seq, traceparent,
             request_id, ord)
), counts AS (
    SELECT session_id, count(*) AS n, min(epoch) AS lo, max(epoch) AS hi, max(node_seq) AS node_seq
    FROM input GROUP BY session_id
), bumped AS (
    UPDATE sessions s
    SET last_seq = s.last_seq + c.n, update_time = now(),
        node_seq = greatest(s.node_seq, coalesce(c.node_seq, s.node_seq))
    FROM counts c
    WHERE s.id = c.session_id AND (c.lo IS NULL OR (c.lo = s.epoch AND c.hi = s.epoch))
    RETURNING s.id, s.last_seq - c.n AS base
)
INSERT INTO events (session_id, seq, id, type, payload, raw, line_part, traceparent, request_id)
SELECT i.session_id, b.base + row_number() OVER (PARTITION BY i.session_id ORDER BY i.ord), i.id,
       i.type, i.payload, i.raw, i.line_part, i.traceparent, i.request_id
FROM input i JOIN bumped b ON b.id = i.session_id
RETURNING session_id, seq, id, create_time
"#;

    /// One page of a session's log after a seq.
    pub const LIST_EVENTS: &str = "SELECT session_id, seq, id, type AS kind, create_time, payload, raw, traceparent, \
         CASE WHEN line_part IS NULL THEN 0 ELSE seq - line_part END AS line_seq \
         FROM events WHERE session_id = $1 AND seq > $2 ORDER BY seq LIMIT $3";

    /// A session's message under a request id (served by the unique
    /// `events_message_request`, migration 0021).
    pub const MESSAGE_BY_REQUEST: &str = "SELECT seq, payload \
         FROM events WHERE session_id = $1 AND request_id = $2";

    /// Whether user input is waiting beyond the forwarded cursor.
    pub const PENDING_INPUT: &str = "SELECT EXISTS (SELECT 1 FROM events \
         WHERE session_id = $1 AND seq > $2 AND type = 'user.message')";

    /// The first user event after the input cursor ($2): its seq, type,
    /// text (a message's) and trace context.
    pub const FIRST_PENDING_INPUT: &str = "SELECT seq, type, coalesce(payload::jsonb ->> 'text', ''), traceparent \
         FROM events WHERE session_id = $1 AND seq > $2 AND type LIKE 'user.%' \
         ORDER BY seq LIMIT 1";

    /// Deletes the events of sessions archived before the cutoff ($1 days ago).
    /// Served by `sessions_archived`.
    pub const PURGE_ARCHIVED_EVENTS: &str = r#"
DELETE FROM events e
USING sessions s
WHERE e.session_id = s.id
  AND s.status = 'archived'
  AND s.archive_time < now() - make_interval(days => $1)
"#;
}

/// One event to append, and the run it comes from.
#[derive(Debug, Clone)]
pub(crate) struct Append {
    pub session: Uuid,
    /// The run's epoch: the append is refused once the session has moved to
    /// another run. `None` for input from clients, which belongs to no run.
    pub epoch: Option<i64>,
    pub event: NewEvent,
    /// The node frame the event came from, for the re-attach cursor.
    pub node_seq: Option<i64>,
    /// Told the node frame once it is persisted (the relay acks it).
    pub persisted: Option<Arc<AtomicI64>>,
}

/// Where an appended event landed in its session's log.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Stored {
    pub seq: i64,
    pub create_time: DateTime<Utc>,
}

impl Append {
    /// The persisted event, once the store has placed it at `at`.
    pub(crate) fn into_event(self, at: Stored) -> Event {
        let line_seq = self
            .event
            .line_part
            .map_or(0, |part| at.seq - i64::from(part));
        Event {
            session_id: self.session,
            seq: at.seq,
            id: self.event.id,
            kind: self.event.kind,
            create_time: at.create_time,
            payload: self.event.payload,
            raw: self.event.raw,
            line_seq,
            traceparent: self.event.traceparent,
        }
    }
}

/// A turn that ends a line of a batch (see [`Store::append_with_turns`]).
pub(crate) struct TurnEnd<'a> {
    pub session: Uuid,
    pub turn: &'a Turn,
    /// The line's events: their range in the batch.
    pub line: std::ops::Range<usize>,
}

#[derive(sqlx::FromRow)]
struct EventRow {
    session_id: Uuid,
    seq: i64,
    id: Uuid,
    kind: String,
    create_time: DateTime<Utc>,
    payload: String,
    raw: Option<Vec<u8>>,
    line_seq: i64,
    #[sqlx(default)]
    traceparent: Option<String>,
}

impl From<EventRow> for Event {
    fn from(r: EventRow) -> Self {
        Self {
            session_id: r.session_id,
            seq: r.seq,
            id: r.id,
            kind: r.kind,
            create_time: r.create_time,
            payload: r.payload,
            raw: r.raw,
            line_seq: r.line_seq,
            traceparent: r.traceparent,
        }
    }
}

impl Store {
    /// Appends events (any sessions) in one statement; returns where each
    /// landed, in `batch` order. When any event is refused (its session is
    /// gone, or has moved to another epoch) nothing of that session is
    /// stored and the error says why for the first such event.
    pub(crate) async fn append(&self, batch: &[Append]) -> Result<Vec<Stored>> {
        let by_id = append_rows(&self.pool, batch).await?;
        self.announce(batch, &by_id);
        match placed(batch, &by_id) {
            Some(out) => Ok(out),
            None => Err(self.refused(batch, &by_id).await),
        }
    }

    /// Leaves a notice of each session's last stored event of `batch`
    /// (committed) for other dispatchers.
    fn announce(&self, batch: &[Append], by_id: &std::collections::HashMap<Uuid, Stored>) {
        self.notices.events(
            batch
                .iter()
                .filter_map(|a| by_id.get(&a.event.id).map(|at| (a.session, at.seq))),
        );
    }

    /// Appends the events of one line that ends a turn and records the
    /// turn, in one transaction: the line never lands without its usage
    /// (the re-attach cursor moves with both, or neither).
    pub(crate) async fn append_with_usage(
        &self,
        batch: &[Append],
        id: Uuid,
        turn: &Turn,
    ) -> Result<(Vec<Stored>, UsageRecorded)> {
        let mut tx = self.pool.begin().await?;
        let by_id = append_rows(&mut *tx, batch).await?;
        let Some(stored) = placed(batch, &by_id) else {
            tx.rollback().await?;
            return Err(self.refused(batch, &by_id).await);
        };
        let ends = [TurnEnd {
            session: id,
            turn,
            line: 0..batch.len(),
        }];
        let mut usages = usage::record_turns(&mut tx, &to_record(batch, &ends)).await?;
        tx.commit().await?;
        self.announce(batch, &by_id);
        let usage = usages
            .pop()
            .ok_or_else(|| Error::Internal("no usage for a turn".into()))?;
        self.notices.event(id, usage.event.seq);
        Ok((stored, usage))
    }

    /// Appends a batch of events (any sessions) and records turns that end
    /// lines of it, all in one transaction: the writer's group commit of
    /// turn ends. Each turn's line is `batch[turn.line]`. `None` (nothing
    /// stored) when any event is refused: the caller then writes the batch
    /// and each turn on its own, to learn whose.
    pub(crate) async fn append_with_turns(
        &self,
        batch: &[Append],
        turns: &[TurnEnd<'_>],
    ) -> Result<Option<(Vec<Stored>, Vec<UsageRecorded>)>> {
        let mut tx = self.pool.begin().await?;
        let by_id = append_rows(&mut *tx, batch).await?;
        let Some(stored) = placed(batch, &by_id) else {
            tx.rollback().await?;
            return Ok(None);
        };
        let usages = usage::record_turns(&mut tx, &to_record(batch, turns)).await?;
        tx.commit().await?;
        self.announce(batch, &by_id);
        for u in &usages {
            self.notices.event(u.event.session_id, u.event.seq);
        }
        Ok(Some((stored, usages)))
    }

    /// Why a batch stored nothing of some session. A stale epoch comes
    /// first: its session-mates in the batch were refused with it, and go
    /// through alone when the writer retries them one by one. Neither answer
    /// is transient, so the batch itself is never retried as it was.
    pub(super) async fn refused(
        &self,
        batch: &[Append],
        stored: &std::collections::HashMap<Uuid, Stored>,
    ) -> Error {
        let mut first = None;
        for a in batch.iter().filter(|a| !stored.contains_key(&a.event.id)) {
            match self.get_session(a.session).await {
                Ok(s) => {
                    if let Some(epoch) = a.epoch.filter(|e| *e != s.epoch) {
                        return Error::Superseded {
                            id: a.session,
                            epoch,
                            current: s.epoch,
                        };
                    }
                }
                Err(e) => {
                    first.get_or_insert(e);
                }
            }
        }
        first.unwrap_or_else(|| {
            Error::Internal("an append was refused though its session is at its epoch".into())
        })
    }

    /// Up to `limit` events after `after_seq`, in seq order.
    pub(crate) async fn list_events(
        &self,
        id: Uuid,
        after_seq: i64,
        limit: i64,
    ) -> Result<Vec<Event>> {
        let rows: Vec<EventRow> = sqlx::query_as(sql::LIST_EVENTS)
            .bind(id)
            .bind(after_seq)
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.into_iter().map(Event::from).collect())
    }

    /// The first user input past `after_seq`: what a fresh run starts
    /// with, when it is a message (the claim reads the same with the
    /// session; this is for a run whose input cursor moved since).
    pub(crate) async fn first_input(&self, id: Uuid, after_seq: i64) -> Result<Option<FirstInput>> {
        let row: Option<(i64, String, String, Option<String>)> =
            sqlx::query_as(sql::FIRST_PENDING_INPUT)
                .bind(id)
                .bind(after_seq)
                .fetch_optional(&self.pool)
                .await?;
        Ok(
            row.map(|(seq, kind, text, traceparent)| {
                FirstInput::new(seq, &kind, text, traceparent)
            }),
        )
    }

    /// The seq and text of the session's message sent under `request_id`.
    pub(crate) async fn message_by_request(
        &self,
        id: Uuid,
        request_id: &str,
    ) -> Result<Option<(i64, String)>> {
        let row: Option<(i64, String)> = sqlx::query_as(sql::MESSAGE_BY_REQUEST)
            .bind(id)
            .bind(request_id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|(seq, payload)| {
            let text = berth_common::events::payload::parse::<
                berth_common::events::payload::UserMessage,
            >(&payload)
            .map(|m| m.text)
            .unwrap_or_default();
            (seq, text)
        }))
    }

    /// Whether a user message beyond `after_seq` waits for the runtime.
    pub(crate) async fn has_pending_input(&self, id: Uuid, after_seq: i64) -> Result<bool> {
        Ok(sqlx::query_scalar(sql::PENDING_INPUT)
            .bind(id)
            .bind(after_seq)
            .fetch_one(&self.pool)
            .await?)
    }

    /// Deletes the events of sessions archived more than `days` ago.
    pub(crate) async fn purge_archived_events(&self, days: u32) -> Result<u64> {
        let r = sqlx::query(sql::PURGE_ARCHIVED_EVENTS)
            .bind(i32::try_from(days).unwrap_or(i32::MAX))
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected())
    }
}

/// Runs [`sql::APPEND_EVENTS`]; returns where each stored event landed, by id.
pub(super) async fn append_rows<'e, E: sqlx::PgExecutor<'e>>(
    ex: E,
    batch: &[Append],
) -> Result<std::collections::HashMap<Uuid, Stored>> {
    let rows: Vec<(Uuid, i64, Uuid, DateTime<Utc>)> = sqlx::query_as(sql::APPEND_EVENTS)
        .bind(batch.iter().map(|a| a.session).collect::<Vec<_>>())
        .bind(batch.iter().map(|a| a.event.id).collect::<Vec<_>>())
        .bind(
            batch
                .iter()
                .map(|a| a.event.kind.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(
            batch
                .iter()
                .map(|a| a.event.payload.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(batch.iter().map(|a| a.epoch).collect::<Vec<_>>())
        .bind(
            batch
                .iter()
                .map(|a| a.event.raw.as_deref())
                .collect::<Vec<_>>(),
        )
        .bind(batch.iter().map(|a| a.event.line_part).collect::<Vec<_>>())
        .bind(batch.iter().map(|a| a.node_seq).collect::<Vec<_>>())
        .bind(
            batch
                .iter()
                .map(|a| a.event.traceparent.as_deref())
                .collect::<Vec<_>>(),
        )
        .bind(
            batch
                .iter()
                .map(|a| a.event.request_id.as_deref())
                .collect::<Vec<_>>(),
        )
        .fetch_all(ex)
        .await?;
    Ok(rows
        .into_iter()
        .map(|(_, seq, id, create_time)| (id, Stored { seq, create_time }))
        .collect())
}

/// Where each event of `batch` landed, in batch order; `None` when any was
/// refused.
pub(super) fn placed(
    batch: &[Append],
    by_id: &std::collections::HashMap<Uuid, Stored>,
) -> Option<Vec<Stored>> {
    batch
        .iter()
        .map(|a| by_id.get(&a.event.id).copied())
        .collect()
}

/// The turns to record, each in the trace of the line that ended it.
fn to_record<'a>(batch: &[Append], turns: &[TurnEnd<'a>]) -> Vec<TurnToRecord<'a>> {
    turns
        .iter()
        .map(|t| TurnToRecord {
            session: t.session,
            turn: t.turn,
            traceparent: batch
                .get(t.line.clone())
                .and_then(|line| line.iter().find_map(|a| a.event.traceparent.clone())),
        })
        .collect()
}
