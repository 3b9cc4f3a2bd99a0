//! Each session's event log: batched appends fenced by epoch, pages of
//! history, turn usage, and retention.

use berth_common::TurnUsage;
use berth_common::events::{self as ev, payload};
use chrono::{DateTime, Utc};
use sqlx::types::Json;
use uuid::Uuid;

use super::Store;
use crate::error::{Error, Result};
use crate::session::usage::RunningTotals;
use crate::session::{Event, NewEvent};

mod sql {
    /// Appends a batch of events for any number of sessions, numbering each
    /// session's events from its `last_seq` under the row lock (gapless), and
    /// notifies other dispatchers once per session.
    /// `lo`/`hi`: the epochs the batch's fenced events carry for a session
    /// (NULL when none is fenced); a session whose epoch differs takes none
    /// of its events, and the caller learns which by the rows missing.
    pub const APPEND_EVENTS: &str = r#"
WITH input AS (
    SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::bigint[]) WITH ORDINALITY
        AS t(session_id, id, type, payload, epoch, ord)
), counts AS (
    SELECT session_id, count(*) AS n, min(epoch) AS lo, max(epoch) AS hi
    FROM input GROUP BY session_id
), bumped AS (
    UPDATE sessions s
    SET last_seq = s.last_seq + c.n, update_time = now()
    FROM counts c
    WHERE s.id = c.session_id AND (c.lo IS NULL OR (c.lo = s.epoch AND c.hi = s.epoch))
    RETURNING s.id, s.last_seq - c.n AS base,
              pg_notify('berth_events', s.id::text || ':' || s.last_seq) IS NULL AS notified
)
INSERT INTO events (session_id, seq, id, type, payload)
SELECT i.session_id, b.base + row_number() OVER (PARTITION BY i.session_id ORDER BY i.ord), i.id, i.type, i.payload::jsonb
FROM input i JOIN bumped b ON b.id = i.session_id
RETURNING session_id, seq, id, create_time
"#;

    /// Adds a turn's usage to the session's totals, records the turn, and
    /// logs a `session.usage` event carrying both; returns the event's place
    /// and the new totals.
    pub const RECORD_USAGE: &str = r#"
WITH totals AS (
    UPDATE sessions
    SET input_tokens = input_tokens + $2, output_tokens = output_tokens + $3,
        cache_read_input_tokens = cache_read_input_tokens + $4,
        cache_creation_input_tokens = cache_creation_input_tokens + $5,
        cost_usd = cost_usd + $6, turns = turns + 1, last_seq = last_seq + 1, update_time = now(),
        runtime_totals = $9
    WHERE id = $1
    RETURNING id, turns, last_seq, input_tokens, output_tokens, cache_read_input_tokens,
              cache_creation_input_tokens, cost_usd,
              pg_notify('berth_events', id::text || ':' || last_seq) IS NULL AS notified
), turn AS (
    INSERT INTO session_turns (session_id, turn, model, input_tokens, output_tokens,
                               cache_read_input_tokens, cache_creation_input_tokens, cost_usd)
    SELECT id, turns, $7, $2, $3, $4, $5, $6 FROM totals
), logged AS (
    INSERT INTO events (session_id, seq, id, type, payload)
    SELECT id, last_seq, $8, 'session.usage', jsonb_build_object(
        'turn', jsonb_build_object('number', turns, 'model', $7::text, 'input_tokens', $2::bigint,
            'output_tokens', $3::bigint, 'cache_read_input_tokens', $4::bigint,
            'cache_creation_input_tokens', $5::bigint, 'cost_usd', $6::float8),
        'total', jsonb_build_object('turns', turns, 'input_tokens', input_tokens, 'output_tokens', output_tokens,
            'cache_read_input_tokens', cache_read_input_tokens,
            'cache_creation_input_tokens', cache_creation_input_tokens, 'cost_usd', cost_usd))
    FROM totals
    RETURNING seq, create_time, payload::text AS payload
)
SELECT l.seq, l.create_time, l.payload, t.turns, t.input_tokens, t.output_tokens,
       t.cache_read_input_tokens, t.cache_creation_input_tokens, t.cost_usd
FROM logged l, totals t
"#;

    /// One page of a session's log after a seq.
    pub const LIST_EVENTS: &str = "SELECT session_id, seq, id, type AS kind, create_time, payload::text AS payload \
         FROM events WHERE session_id = $1 AND seq > $2 ORDER BY seq LIMIT $3";

    /// Whether user input is waiting beyond the forwarded cursor.
    pub const PENDING_INPUT: &str = "SELECT EXISTS (SELECT 1 FROM events \
         WHERE session_id = $1 AND seq > $2 AND type = 'user.message')";

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
        Event {
            session_id: self.session,
            seq: at.seq,
            id: self.event.id,
            kind: self.event.kind,
            create_time: at.create_time,
            payload: self.event.payload,
        }
    }
}

/// A recorded turn: its `session.usage` event and the session's totals.
#[derive(Debug, Clone)]
pub(crate) struct UsageRecorded {
    pub event: Event,
    pub totals: payload::UsageTotals,
}

/// What [`sql::RECORD_USAGE`] returns: the event's place and the totals.
#[derive(sqlx::FromRow)]
struct UsageRow {
    seq: i64,
    create_time: DateTime<Utc>,
    payload: String,
    turns: i64,
    input_tokens: i64,
    output_tokens: i64,
    cache_read_input_tokens: i64,
    cache_creation_input_tokens: i64,
    cost_usd: f64,
}

#[derive(sqlx::FromRow)]
struct EventRow {
    session_id: Uuid,
    seq: i64,
    id: Uuid,
    kind: String,
    create_time: DateTime<Utc>,
    payload: String,
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
        }
    }
}

impl Store {
    /// Appends events (any sessions) in one statement; returns where each
    /// landed, in `batch` order. When any event is refused (its session is
    /// gone, or has moved to another epoch) nothing of that session is
    /// stored and the error says why for the first such event.
    pub(crate) async fn append(&self, batch: &[Append]) -> Result<Vec<Stored>> {
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
            .fetch_all(&self.pool)
            .await?;
        let by_id: std::collections::HashMap<Uuid, Stored> = rows
            .into_iter()
            .map(|(_, seq, id, create_time)| (id, Stored { seq, create_time }))
            .collect();
        let out: Option<Vec<Stored>> = batch
            .iter()
            .map(|a| by_id.get(&a.event.id).copied())
            .collect();
        match out {
            Some(out) => Ok(out),
            None => Err(self.refused(batch, &by_id).await),
        }
    }

    /// Why a batch stored nothing of some session. A stale epoch comes
    /// first: its session-mates in the batch were refused with it, and go
    /// through alone when the writer retries them one by one. Neither answer
    /// is transient, so the batch itself is never retried as it was.
    async fn refused(
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

    /// Records a turn's own usage (see [`crate::session::usage`]) with the
    /// runtime's running totals after it, and logs `session.usage`; returns
    /// the event and the session's totals after it.
    pub(crate) async fn record_usage(
        &self,
        id: Uuid,
        u: &TurnUsage,
        runtime_totals: &RunningTotals,
    ) -> Result<UsageRecorded> {
        let event_id = Uuid::now_v7();
        let row: UsageRow = sqlx::query_as(sql::RECORD_USAGE)
            .bind(id)
            .bind(u.input_tokens)
            .bind(u.output_tokens)
            .bind(u.cache_read_input_tokens)
            .bind(u.cache_creation_input_tokens)
            .bind(u.cost_usd)
            .bind(&u.model)
            .bind(event_id)
            .bind(Json(runtime_totals))
            .fetch_optional(&self.pool)
            .await?
            .ok_or_else(|| Error::SessionNotFound(id.to_string()))?;
        Ok(UsageRecorded {
            event: Event {
                session_id: id,
                seq: row.seq,
                id: event_id,
                kind: ev::SESSION_USAGE.into(),
                create_time: row.create_time,
                payload: row.payload,
            },
            totals: payload::UsageTotals {
                turns: row.turns,
                input_tokens: row.input_tokens,
                output_tokens: row.output_tokens,
                cache_read_input_tokens: row.cache_read_input_tokens,
                cache_creation_input_tokens: row.cache_creation_input_tokens,
                cost_usd: row.cost_usd,
            },
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
