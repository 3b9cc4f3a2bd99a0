//! The `Store` seam: every SQL statement the dispatcher runs lives behind it.
//! Postgres through sqlx; migrations are embedded.

mod agents;
mod sql;

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::postgres::{PgPool, PgPoolOptions, PgRow};
use sqlx::{AssertSqlSafe, Row};
use uuid::Uuid;

use crate::error::{Error, Result};
use crate::session::{
    Event, NewEvent, NewSession, Session, SessionStatus, StatusEvent, TurnUsage, Usage,
};

/// Channel a new pending session is announced on.
pub const QUEUE_CHANNEL: &str = "berth_queue";
/// Channel announcing `{session_id}:{last_seq}` after events are persisted.
pub const EVENTS_CHANNEL: &str = "berth_events";

/// A filter and page for `list_sessions`.
#[derive(Debug, Clone, Default)]
pub struct SessionFilter {
    pub status: Option<SessionStatus>,
    pub labels: BTreeMap<String, String>,
    /// Keyset cursor: sessions strictly older than this (time, id).
    pub before: Option<(DateTime<Utc>, Uuid)>,
    pub limit: i64,
}

/// A status change that was persisted.
#[derive(Debug, Clone)]
pub struct Transitioned {
    pub from: SessionStatus,
    pub to: SessionStatus,
    /// The logged status event, or `None` when the status did not change.
    pub event: Option<Event>,
}

/// Sessions not yet ended, by status.
#[derive(Debug, Default)]
pub struct OpenCounts {
    pub by_status: std::collections::HashMap<SessionStatus, i64>,
    /// How long the oldest pending or rescheduling session has waited.
    pub oldest_queued_age: std::time::Duration,
}

/// Postgres-backed storage for sessions and their event logs.
#[derive(Clone)]
pub struct Store {
    pool: PgPool,
}

impl Store {
    /// Connects and applies the embedded migrations.
    pub async fn connect(url: &str, max_connections: u32) -> Result<Self> {
        let pool = PgPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(Duration::from_secs(10))
            .connect(url)
            .await
            .map_err(|e| {
                Error::Unavailable(format!(
                    "cannot connect to Postgres at {}: {e}",
                    redact(url)
                ))
            })?;
        sqlx::migrate!("./migrations")
            .run(&pool)
            .await
            .map_err(|e| Error::Internal(format!("database migration failed: {e}")))?;
        Ok(Self { pool })
    }

    /// The pool, for LISTEN connections.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Creates a session, or returns the one an earlier call with the same
    /// `request_id` created. The second value is true when this call created it.
    pub async fn create_session(&self, new: &NewSession) -> Result<(Session, bool)> {
        let id = Uuid::now_v7();
        let mut events = vec![NewEvent::new(
            SessionStatus::Pending.event_type(),
            serde_json::json!({"status": "pending", "reason": ""}).to_string(),
        )];
        if let Some(text) = &new.initial_message {
            events.push(NewEvent::new(
                berth_common::events::USER_MESSAGE,
                user_message_payload(text),
            ));
        }
        let seqs: Vec<i64> = (1..=events.len() as i64).collect();
        let spec = serde_json::to_value(&new.spec).map_err(|e| Error::Internal(e.to_string()))?;
        let labels =
            serde_json::to_value(&new.labels).map_err(|e| Error::Internal(e.to_string()))?;
        let resources =
            serde_json::to_value(&new.resources).map_err(|e| Error::Internal(e.to_string()))?;
        let created: Option<Uuid> = sqlx::query_scalar(sql::CREATE_SESSION)
            .bind(id)
            .bind(&new.request_id)
            .bind(&new.display_name)
            .bind(spec)
            .bind(labels)
            .bind(new.timeout.map(|t| t.as_millis() as i64))
            .bind(&seqs)
            .bind(events.iter().map(|e| e.id).collect::<Vec<_>>())
            .bind(events.iter().map(|e| e.kind.clone()).collect::<Vec<_>>())
            .bind(events.iter().map(|e| e.payload.clone()).collect::<Vec<_>>())
            .bind(new.pinned.as_ref().map(|p| p.0.clone()))
            .bind(new.pinned.as_ref().map(|p| p.1))
            .bind(resources)
            .bind(new.inactivity_timeout.map(|t| t.as_millis() as i64))
            .bind(new.budget_usd)
            .bind(new.queue_timeout.map(|t| t.as_millis() as i64))
            .fetch_optional(&self.pool)
            .await?;
        match (created, &new.request_id) {
            (Some(id), _) => Ok((self.get_session(id).await?, true)),
            (None, Some(request_id)) => {
                let row = sqlx::query(AssertSqlSafe(format!(
                    "SELECT {} FROM sessions WHERE request_id = $1",
                    sql::SESSION_COLUMNS
                )))
                .bind(request_id)
                .fetch_one(&self.pool)
                .await?;
                Ok((session_from_row(&row)?, false))
            }
            (None, None) => Err(Error::Internal("session insert returned nothing".into())),
        }
    }

    pub async fn get_session(&self, id: Uuid) -> Result<Session> {
        let row = sqlx::query(AssertSqlSafe(format!(
            "SELECT {} FROM sessions WHERE id = $1",
            sql::SESSION_COLUMNS
        )))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?
        .ok_or_else(|| Error::SessionNotFound(id.to_string()))?;
        session_from_row(&row)
    }

    /// Sessions newest first, filtered, one page.
    pub async fn list_sessions(&self, f: &SessionFilter) -> Result<Vec<Session>> {
        // $1 status filter (NULL = any); $2 labels the session must all carry;
        // $3/$4 keyset cursor (NULL = first page).
        let q = format!(
            "SELECT {} FROM sessions \
             WHERE ($1::text IS NULL OR status = $1) AND labels @> $2 \
               AND ($3::timestamptz IS NULL OR (create_time, id) < ($3, $4)) \
             ORDER BY create_time DESC, id DESC LIMIT $5",
            sql::SESSION_COLUMNS
        );
        let labels = serde_json::to_value(&f.labels).map_err(|e| Error::Internal(e.to_string()))?;
        let rows = sqlx::query(AssertSqlSafe(q))
            .bind(f.status.map(SessionStatus::as_str))
            .bind(labels)
            .bind(f.before.map(|b| b.0))
            .bind(f.before.map(|b| b.1))
            .bind(f.limit)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(session_from_row).collect()
    }

    /// Claims up to `limit` of the oldest queued sessions for `owner`, moving
    /// each to `starting`; oldest first. Two round trips for the batch.
    pub async fn claim(&self, owner: &str, limit: usize) -> Result<Vec<Session>> {
        let event_ids: Vec<Uuid> = (0..limit).map(|_| Uuid::now_v7()).collect();
        let ids: Vec<Uuid> = sqlx::query_scalar(sql::CLAIM_SESSIONS)
            .bind(owner)
            .bind(&event_ids)
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .fetch_all(&self.pool)
            .await?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let query = format!(
            "SELECT {} FROM sessions WHERE id = ANY($1) ORDER BY create_time",
            sql::SESSION_COLUMNS
        );
        let rows = sqlx::query(AssertSqlSafe(query))
            .bind(&ids)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(session_from_row).collect()
    }

    /// Applies `event` to the session's current status with compare-and-set,
    /// logging the change. Re-reads and retries when another writer won.
    pub async fn transition(
        &self,
        id: Uuid,
        epoch: Option<i64>,
        event: StatusEvent,
        reason: &str,
        extra: serde_json::Value,
    ) -> Result<Transitioned> {
        for _ in 0..8 {
            let current = self.get_session(id).await?;
            if let Some(epoch) = epoch.filter(|e| *e != current.epoch) {
                return Err(Error::Superseded {
                    id,
                    epoch,
                    current: current.epoch,
                });
            }
            let to = current.status.transition(event)?;
            if to == current.status {
                return Ok(Transitioned {
                    from: current.status,
                    to,
                    event: None,
                });
            }
            let mut payload = serde_json::json!({"status": to.as_str(), "previous": current.status.as_str(), "reason": reason});
            if let (Some(p), serde_json::Value::Object(extra)) =
                (payload.as_object_mut(), extra.clone())
            {
                p.extend(extra);
            }
            let payload = payload.to_string();
            let event_id = Uuid::now_v7();
            let kind = to.event_type();
            let row = sqlx::query(sql::TRANSITION)
                .bind(id)
                .bind(current.status.as_str())
                .bind(to.as_str())
                .bind(reason)
                .bind(!to.is_live())
                .bind(event_id)
                .bind(&kind)
                .bind(&payload)
                .bind(current.epoch)
                .fetch_optional(&self.pool)
                .await?;
            if let Some(row) = row {
                let event = Event {
                    session_id: id,
                    seq: row.try_get("seq")?,
                    id: event_id,
                    kind,
                    create_time: row.try_get("create_time")?,
                    payload,
                };
                return Ok(Transitioned {
                    from: current.status,
                    to,
                    event: Some(event),
                });
            }
        }
        Err(Error::Conflict)
    }

    /// Appends events (any sessions) in one statement; returns them with their seqs.
    pub async fn append(&self, batch: &[(Uuid, NewEvent)]) -> Result<Vec<Event>> {
        let rows = sqlx::query(sql::APPEND_EVENTS)
            .bind(batch.iter().map(|(s, _)| *s).collect::<Vec<_>>())
            .bind(batch.iter().map(|(_, e)| e.id).collect::<Vec<_>>())
            .bind(
                batch
                    .iter()
                    .map(|(_, e)| e.kind.as_str())
                    .collect::<Vec<_>>(),
            )
            .bind(
                batch
                    .iter()
                    .map(|(_, e)| e.payload.as_str())
                    .collect::<Vec<_>>(),
            )
            .fetch_all(&self.pool)
            .await?;
        let mut by_id = std::collections::HashMap::with_capacity(rows.len());
        for row in &rows {
            let id: Uuid = row.try_get("id")?;
            by_id.insert(
                id,
                (
                    row.try_get::<i64, _>("seq")?,
                    row.try_get::<DateTime<Utc>, _>("create_time")?,
                ),
            );
        }
        let mut out = Vec::with_capacity(batch.len());
        for (session_id, e) in batch {
            // A missing row means the session no longer exists.
            let Some((seq, create_time)) = by_id.get(&e.id).copied() else {
                return Err(Error::SessionNotFound(session_id.to_string()));
            };
            out.push(Event {
                session_id: *session_id,
                seq,
                id: e.id,
                kind: e.kind.clone(),
                create_time,
                payload: e.payload.clone(),
            });
        }
        out.sort_by_key(|e| (e.session_id, e.seq));
        Ok(out)
    }

    /// Records a turn's usage and logs `session.usage`.
    pub async fn record_usage(&self, id: Uuid, u: &TurnUsage) -> Result<Event> {
        let event_id = Uuid::now_v7();
        let row = sqlx::query(sql::RECORD_USAGE)
            .bind(id)
            .bind(u.input_tokens)
            .bind(u.output_tokens)
            .bind(u.cache_read_input_tokens)
            .bind(u.cache_creation_input_tokens)
            .bind(u.cost_usd)
            .bind(&u.model)
            .bind(event_id)
            .fetch_optional(&self.pool)
            .await?
            .ok_or_else(|| Error::SessionNotFound(id.to_string()))?;
        Ok(Event {
            session_id: id,
            seq: row.try_get("seq")?,
            id: event_id,
            kind: berth_common::events::SESSION_USAGE.into(),
            create_time: row.try_get("create_time")?,
            payload: row.try_get("payload")?,
        })
    }

    /// Up to `limit` events after `after_seq`, in seq order.
    pub async fn list_events(&self, id: Uuid, after_seq: i64, limit: i64) -> Result<Vec<Event>> {
        let rows = sqlx::query(sql::LIST_EVENTS)
            .bind(id)
            .bind(after_seq)
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| {
                Ok(Event {
                    session_id: r.try_get("session_id")?,
                    seq: r.try_get("seq")?,
                    id: r.try_get("id")?,
                    kind: r.try_get("type")?,
                    create_time: r.try_get("create_time")?,
                    payload: r.try_get("payload")?,
                })
            })
            .collect()
    }

    /// Whether a user message beyond `after_seq` waits for the runtime.
    pub async fn has_pending_input(&self, id: Uuid, after_seq: i64) -> Result<bool> {
        Ok(sqlx::query_scalar(sql::PENDING_INPUT)
            .bind(id)
            .bind(after_seq)
            .fetch_one(&self.pool)
            .await?)
    }

    /// Moves the forwarded-input cursor forward (never back).
    pub async fn set_input_seq(&self, id: Uuid, seq: i64) -> Result<()> {
        sqlx::query("UPDATE sessions SET input_seq = greatest(input_seq, $2) WHERE id = $1")
            .bind(id)
            .bind(seq)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Records where the session runs.
    pub async fn set_node(&self, id: Uuid, epoch: i64, node: &str) -> Result<()> {
        // epoch = $2: a superseded placement does not overwrite the current one.
        sqlx::query(
            "UPDATE sessions SET node = $3, update_time = now() WHERE id = $1 AND epoch = $2",
        )
        .bind(id)
        .bind(epoch)
        .bind(node)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Records that dispatcher `id` is alive.
    pub async fn heartbeat(&self, id: &str) -> Result<()> {
        sqlx::query(sql::HEARTBEAT)
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Live sessions whose owning dispatcher missed its lease, with that owner.
    pub async fn orphaned(&self, lease: std::time::Duration) -> Result<Vec<(Uuid, i64, String)>> {
        Ok(sqlx::query_as(sql::ORPHANED_SESSIONS)
            .bind(lease.as_secs_f64())
            .fetch_all(&self.pool)
            .await?)
    }

    /// Wakes every dispatcher's claim loop (a session was queued again).
    pub async fn notify_queue(&self) -> Result<()> {
        sqlx::query("SELECT pg_notify($1, '')")
            .bind(QUEUE_CHANNEL)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Never-placed queued sessions past their queue deadline, with their epochs.
    pub async fn expired_pending(&self) -> Result<Vec<(Uuid, i64)>> {
        Ok(sqlx::query_as(sql::EXPIRED_PENDING)
            .fetch_all(&self.pool)
            .await?)
    }

    /// Records a saved snapshot as the session's newest.
    pub async fn record_snapshot(&self, id: Uuid, key: &str, size_bytes: i64) -> Result<()> {
        sqlx::query(sql::RECORD_SNAPSHOT)
            .bind(id)
            .bind(key)
            .bind(size_bytes)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Deletes a session that is not live with its events and usage rows.
    /// `false` when it was live (or appeared live) at the time.
    pub async fn delete_session(&self, id: Uuid) -> Result<bool> {
        let live: Vec<&str> = SessionStatus::ALL
            .into_iter()
            .filter(|s| s.is_live())
            .map(SessionStatus::as_str)
            .collect();
        let deleted: Option<Uuid> = sqlx::query_scalar(sql::DELETE_SESSION)
            .bind(id)
            .bind(&live)
            .fetch_optional(&self.pool)
            .await?;
        Ok(deleted.is_some())
    }

    /// Sessions not yet ended, by status (for the metrics sampler).
    pub async fn open_counts(&self) -> Result<OpenCounts> {
        let rows: Vec<(String, i64, f64)> = sqlx::query_as(sql::OPEN_COUNTS)
            .fetch_all(&self.pool)
            .await?;
        let mut counts = OpenCounts::default();
        for (status, n, oldest_s) in rows {
            let Ok(status) = status.parse::<SessionStatus>() else {
                continue;
            };
            if matches!(status, SessionStatus::Pending | SessionStatus::Rescheduling) {
                counts.oldest_queued_age = counts
                    .oldest_queued_age
                    .max(std::time::Duration::from_secs_f64(oldest_s.max(0.0)));
            }
            counts.by_status.insert(status, n);
        }
        Ok(counts)
    }

    /// Deletes the events of sessions archived more than `days` ago.
    pub async fn purge_archived_events(&self, days: u32) -> Result<u64> {
        let r = sqlx::query(sql::PURGE_ARCHIVED_EVENTS)
            .bind(days as i32)
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected())
    }

    /// Keeps the first runtime session id the runtime reports.
    pub async fn set_runtime_session_id(&self, id: Uuid, runtime_session_id: &str) -> Result<()> {
        // runtime_session_id = '': only the first one sticks; on resume the CLI may report another.
        sqlx::query(
            "UPDATE sessions SET runtime_session_id = $2 WHERE id = $1 AND runtime_session_id = ''",
        )
        .bind(id)
        .bind(runtime_session_id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }
}

/// The payload of a `user.message` event.
pub fn user_message_payload(text: &str) -> String {
    serde_json::json!({ "text": text }).to_string()
}

fn session_from_row(r: &PgRow) -> Result<Session> {
    let status: String = r.try_get("status")?;
    let spec: serde_json::Value = r.try_get("spec")?;
    let labels: serde_json::Value = r.try_get("labels")?;
    Ok(Session {
        id: r.try_get("id")?,
        request_id: r.try_get("request_id")?,
        display_name: r.try_get("display_name")?,
        status: status.parse().map_err(Error::Internal)?,
        status_reason: r.try_get("status_reason")?,
        spec: serde_json::from_value(spec)
            .map_err(|e| Error::Internal(format!("stored spec: {e}")))?,
        labels: serde_json::from_value(labels)
            .map_err(|e| Error::Internal(format!("stored labels: {e}")))?,
        node: r.try_get("node")?,
        owner: r.try_get("owner")?,
        epoch: r.try_get("epoch")?,
        last_seq: r.try_get("last_seq")?,
        input_seq: r.try_get("input_seq")?,
        runtime_session_id: r.try_get("runtime_session_id")?,
        usage: Usage {
            input_tokens: r.try_get("input_tokens")?,
            output_tokens: r.try_get("output_tokens")?,
            cache_read_input_tokens: r.try_get("cache_read_input_tokens")?,
            cache_creation_input_tokens: r.try_get("cache_creation_input_tokens")?,
            cost_usd: r.try_get("cost_usd")?,
            turns: r.try_get("turns")?,
        },
        timeout: millis(r, "timeout_ms")?,
        agent: match (
            r.try_get::<Option<String>, _>("agent_id")?,
            r.try_get::<Option<i64>, _>("agent_version")?,
        ) {
            (Some(id), Some(v)) => Some((id, v)),
            _ => None,
        },
        resources: serde_json::from_value(r.try_get("resources")?)
            .map_err(|e| Error::Internal(format!("stored resources: {e}")))?,
        inactivity_timeout: millis(r, "inactivity_timeout_ms")?,
        budget_usd: r.try_get("budget_usd")?,
        queue_timeout: millis(r, "queue_timeout_ms")?,
        queue_deadline: r.try_get("queue_deadline")?,
        snapshot: match r.try_get::<Option<DateTime<Utc>>, _>("snapshot_time")? {
            Some(create_time) => Some(crate::session::Snapshot {
                key: r.try_get("snapshot_key")?,
                size_bytes: r.try_get("snapshot_bytes")?,
                create_time,
            }),
            None => None,
        },
        snapshots: r.try_get("snapshots")?,
        archive_time: r.try_get("archive_time")?,
        create_time: r.try_get("create_time")?,
        update_time: r.try_get("update_time")?,
        start_time: r.try_get("start_time")?,
        end_time: r.try_get("end_time")?,
    })
}

fn millis(r: &PgRow, col: &str) -> Result<Option<Duration>> {
    Ok(r.try_get::<Option<i64>, _>(col)?
        .map(|ms| Duration::from_millis(ms.max(0) as u64)))
}

/// A database URL without its password, for error messages.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            let user = creds.split(':').next().unwrap_or("");
            format!("{}{}:***{}", &url[..s + 3], user, &url[at..])
        }
        _ => url.to_string(),
    }
}
