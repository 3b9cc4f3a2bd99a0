//! Turn accounting: a turn adds to its session's totals and per-model rows,
//! and logs a `session.usage` event carrying the turn and the new totals.
//! The turns of any number of sessions are recorded in four statements, so
//! the writer's group commit of turn ends costs the same for one or many.

use std::collections::HashMap;

use berth_common::events::{self as ev, payload};
use berth_common::usage::{Figures, ModelFigures};
use chrono::{DateTime, Utc};
use sqlx::types::Json;
use uuid::Uuid;

use crate::error::{Error, Result};
use crate::session::Event;
use crate::session::usage::Turn;

mod sql {
    /// Adds each turn (at most one per session) to its session's totals
    /// and runtime baseline; returns the turn's number, the new totals and
    /// the seq its `session.usage` takes.
    pub const ADD_TURNS: &str = r#"
WITH input AS (
    SELECT * FROM unnest($1::uuid[], $2::bigint[], $3::bigint[], $4::bigint[], $5::bigint[],
                         $6::float8[], $7::jsonb[])
        AS t(id, input_tokens, output_tokens, cache_read_input_tokens,
             cache_creation_input_tokens, cost_usd, runtime_totals)
)
UPDATE sessions s
SET input_tokens = s.input_tokens + i.input_tokens,
    output_tokens = s.output_tokens + i.output_tokens,
    cache_read_input_tokens = s.cache_read_input_tokens + i.cache_read_input_tokens,
    cache_creation_input_tokens = s.cache_creation_input_tokens + i.cache_creation_input_tokens,
    cost_usd = s.cost_usd + i.cost_usd, turns = s.turns + 1, last_seq = s.last_seq + 1,
    update_time = now(), runtime_totals = i.runtime_totals
FROM input i
WHERE s.id = i.id
RETURNING s.id, s.turns, s.last_seq AS seq, s.input_tokens, s.output_tokens,
          s.cache_read_input_tokens, s.cache_creation_input_tokens, s.cost_usd
"#;

    /// The turns' rows per model, and their sessions' totals per model.
    pub const ADD_TURN_MODELS: &str = r#"
WITH input AS (
    SELECT * FROM unnest($1::uuid[], $2::bigint[], $3::text[], $4::bigint[], $5::bigint[],
                         $6::bigint[], $7::bigint[], $8::float8[])
        AS t(session_id, turn, model, input_tokens, output_tokens, cache_read_input_tokens,
             cache_creation_input_tokens, cost_usd)
), turns AS (
    INSERT INTO session_turns (session_id, turn, model, input_tokens, output_tokens,
                               cache_read_input_tokens, cache_creation_input_tokens, cost_usd)
    SELECT * FROM input
)
INSERT INTO session_models AS m (session_id, model, input_tokens, output_tokens,
                                 cache_read_input_tokens, cache_creation_input_tokens, cost_usd)
SELECT session_id, model, input_tokens, output_tokens, cache_read_input_tokens,
       cache_creation_input_tokens, cost_usd
FROM input
ON CONFLICT (session_id, model) DO UPDATE
SET input_tokens = m.input_tokens + excluded.input_tokens,
    output_tokens = m.output_tokens + excluded.output_tokens,
    cache_read_input_tokens = m.cache_read_input_tokens + excluded.cache_read_input_tokens,
    cache_creation_input_tokens = m.cache_creation_input_tokens + excluded.cache_creation_input_tokens,
    cost_usd = m.cost_usd + excluded.cost_usd
"#;

    /// The sessions' totals per model, each session's largest cost first.
    pub const SESSION_MODELS: &str = "SELECT session_id, model, input_tokens, output_tokens, \
         cache_read_input_tokens, cache_creation_input_tokens, cost_usd \
         FROM session_models WHERE session_id = ANY($1) \
         ORDER BY session_id, cost_usd DESC, model";

    /// Logs each turn's `session.usage` at the seq the turn took.
    pub const LOG_USAGE: &str = r#"
INSERT INTO events (session_id, seq, id, type, payload, traceparent)
SELECT session_id, seq, id, 'session.usage', payload, traceparent
FROM unnest($1::uuid[], $2::bigint[], $3::uuid[], $4::text[], $5::text[])
    AS t(session_id, seq, id, payload, traceparent)
RETURNING id, create_time
"#;
}

/// A turn to record: its session's, in the trace of the line that ended it.
pub(crate) struct TurnToRecord<'a> {
    pub session: Uuid,
    pub turn: &'a Turn,
    pub traceparent: Option<String>,
}

/// A recorded turn: its `session.usage` event and the session's totals.
#[derive(Debug, Clone)]
pub(crate) struct UsageRecorded {
    pub event: Event,
    pub totals: payload::UsageTotals,
}

/// What [`sql::ADD_TURNS`] returns for a session: the turn's number and
/// seq, and the totals.
#[derive(sqlx::FromRow)]
struct TurnRow {
    id: Uuid,
    turns: i64,
    seq: i64,
    input_tokens: i64,
    output_tokens: i64,
    cache_read_input_tokens: i64,
    cache_creation_input_tokens: i64,
    cost_usd: f64,
}

#[derive(sqlx::FromRow)]
struct ModelRow {
    session_id: Uuid,
    model: String,
    input_tokens: i64,
    output_tokens: i64,
    cache_read_input_tokens: i64,
    cache_creation_input_tokens: i64,
    cost_usd: f64,
}

impl From<ModelRow> for ModelFigures {
    fn from(r: ModelRow) -> Self {
        Self {
            model: r.model,
            figures: Figures {
                input_tokens: r.input_tokens,
                output_tokens: r.output_tokens,
                cache_read_input_tokens: r.cache_read_input_tokens,
                cache_creation_input_tokens: r.cache_creation_input_tokens,
                cost_usd: r.cost_usd,
            },
        }
    }
}

/// Records `turns` (at most one per session) inside `tx`, in their order:
/// each session's totals, a row per model for the turn, the session's
/// per-model totals, and a `session.usage` event with the turn and the
/// totals. A session that is gone fails the whole call (the caller's
/// transaction stores none of it).
pub(super) async fn record_turns(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    turns: &[TurnToRecord<'_>],
) -> Result<Vec<UsageRecorded>> {
    if turns.is_empty() {
        return Ok(Vec::new());
    }
    let ids: Vec<Uuid> = turns.iter().map(|t| t.session).collect();
    let col = |f: fn(&Figures) -> i64| turns.iter().map(|t| f(&t.turn.usage)).collect::<Vec<_>>();
    let rows: Vec<TurnRow> = sqlx::query_as(sql::ADD_TURNS)
        .bind(&ids)
        .bind(col(|f| f.input_tokens))
        .bind(col(|f| f.output_tokens))
        .bind(col(|f| f.cache_read_input_tokens))
        .bind(col(|f| f.cache_creation_input_tokens))
        .bind(
            turns
                .iter()
                .map(|t| t.turn.usage.cost_usd)
                .collect::<Vec<_>>(),
        )
        .bind(
            turns
                .iter()
                .map(|t| Json(&t.turn.totals))
                .collect::<Vec<_>>(),
        )
        .fetch_all(&mut **tx)
        .await?;
    let mut added: HashMap<Uuid, TurnRow> = rows.into_iter().map(|r| (r.id, r)).collect();
    let added: Vec<TurnRow> = turns
        .iter()
        .map(|t| {
            added
                .remove(&t.session)
                .ok_or_else(|| Error::SessionNotFound(t.session.to_string()))
        })
        .collect::<Result<_>>()?;
    add_models(tx, turns, &added).await?;
    let mut by_model = session_models(tx, &ids).await?;
    let mut recorded: Vec<UsageRecorded> = turns
        .iter()
        .zip(&added)
        .map(|(t, row)| usage_event(t, row, by_model.remove(&t.session).unwrap_or_default()))
        .collect();
    log_usage(tx, &mut recorded).await?;
    Ok(recorded)
}

/// Adds the turns' rows per model and their sessions' totals per model.
async fn add_models(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    turns: &[TurnToRecord<'_>],
    added: &[TurnRow],
) -> Result<()> {
    let rows: Vec<(Uuid, i64, &ModelFigures)> = turns
        .iter()
        .zip(added)
        .flat_map(|(t, row)| t.turn.models.iter().map(|m| (t.session, row.turns, m)))
        .collect();
    let col = |f: fn(&Figures) -> i64| rows.iter().map(|r| f(&r.2.figures)).collect::<Vec<_>>();
    sqlx::query(sql::ADD_TURN_MODELS)
        .bind(rows.iter().map(|r| r.0).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.1).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.2.model.as_str()).collect::<Vec<_>>())
        .bind(col(|f| f.input_tokens))
        .bind(col(|f| f.output_tokens))
        .bind(col(|f| f.cache_read_input_tokens))
        .bind(col(|f| f.cache_creation_input_tokens))
        .bind(
            rows.iter()
                .map(|r| r.2.figures.cost_usd)
                .collect::<Vec<_>>(),
        )
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// Each session's totals per model, largest cost first.
async fn session_models(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    ids: &[Uuid],
) -> Result<HashMap<Uuid, Vec<ModelFigures>>> {
    let rows: Vec<ModelRow> = sqlx::query_as(sql::SESSION_MODELS)
        .bind(ids)
        .fetch_all(&mut **tx)
        .await?;
    let mut by_session: HashMap<Uuid, Vec<ModelFigures>> = HashMap::new();
    for r in rows {
        by_session.entry(r.session_id).or_default().push(r.into());
    }
    Ok(by_session)
}

/// The `session.usage` event of a turn, before it is stored (its
/// `create_time` is the store's).
fn usage_event(t: &TurnToRecord<'_>, row: &TurnRow, models: Vec<ModelFigures>) -> UsageRecorded {
    let totals = payload::UsageTotals {
        turns: row.turns,
        figures: Figures {
            input_tokens: row.input_tokens,
            output_tokens: row.output_tokens,
            cache_read_input_tokens: row.cache_read_input_tokens,
            cache_creation_input_tokens: row.cache_creation_input_tokens,
            cost_usd: row.cost_usd,
        },
        models,
    };
    let body = payload::to_json(&payload::Usage {
        turn: payload::TurnFigures {
            number: row.turns,
            model: t.turn.model.clone(),
            figures: t.turn.usage.clone(),
            models: t.turn.models.clone(),
        },
        total: totals.clone(),
    });
    UsageRecorded {
        event: Event {
            session_id: t.session,
            seq: row.seq,
            id: Uuid::now_v7(),
            kind: ev::SESSION_USAGE.into(),
            create_time: DateTime::<Utc>::MIN_UTC,
            payload: body,
            raw: None,
            line_seq: 0,
            traceparent: t.traceparent.clone(),
        },
        totals,
    }
}

/// Logs the turns' `session.usage` events, and sets when each was stored.
async fn log_usage(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    recorded: &mut [UsageRecorded],
) -> Result<()> {
    let events = || recorded.iter().map(|u| &u.event);
    let stored: Vec<(Uuid, DateTime<Utc>)> = sqlx::query_as(sql::LOG_USAGE)
        .bind(events().map(|e| e.session_id).collect::<Vec<_>>())
        .bind(events().map(|e| e.seq).collect::<Vec<_>>())
        .bind(events().map(|e| e.id).collect::<Vec<_>>())
        .bind(events().map(|e| e.payload.as_str()).collect::<Vec<_>>())
        .bind(
            events()
                .map(|e| e.traceparent.as_deref())
                .collect::<Vec<_>>(),
        )
        .fetch_all(&mut **tx)
        .await?;
    let at: HashMap<Uuid, DateTime<Utc>> = stored.into_iter().collect();
    for u in recorded {
        u.event.create_time = *at
            .get(&u.event.id)
            .ok_or_else(|| Error::Internal("no row for a session.usage event".into()))?;
    }
    Ok(())
}
