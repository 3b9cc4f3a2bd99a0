//! Session rows: create (idempotent), read, list, and status changes by
//! compare-and-set, each logged as an event in the same statement.

use std::collections::BTreeMap;
use std::sync::LazyLock;

use berth_common::events as ev;
use berth_common::events::payload::{self, StatusChange};
use berth_common::usage::ModelFigures;
use chrono::{DateTime, Utc};
use sqlx::AssertSqlSafe;
use sqlx::types::Json;
use uuid::Uuid;

use super::claimed::{Claimed, FirstInput};
use super::{Store, from_millis, to_millis};
use crate::error::{Error, Result};
use crate::session::usage::RunningTotals;
use crate::session::{
    AgentSpec, NewEvent, NewSession, Resource, Session, SessionStatus, Snapshot, Usage,
};

pub(super) use sql::SESSION_COLUMNS;

mod sql {
    /// `SELECT` of a session with its usage per model (largest cost first),
    /// then the rest of the statement.
    macro_rules! with_models {
        ($rest:literal) => {
            concat!("SELECT ", session_columns!(), " FROM sessions s ", $rest)
        };
    }

    /// A session row `s` with its usage per model and its open tool
    /// requests: what [`super::SessionRow`] reads.
    macro_rules! session_columns {
        () => {
            "s.*, (SELECT coalesce(jsonb_agg(to_jsonb(m) - 'session_id' \
               ORDER BY m.cost_usd DESC, m.model), '[]') \
             FROM session_models m WHERE m.session_id = s.id) AS models, \
             (SELECT count(*) FROM tool_requests t \
              WHERE t.session_id = s.id AND t.decision IS NULL) AS pending_tools"
        };
    }

    /// The columns of [`super::SessionRow`] for a session row `s` (the
    /// claim selects them from the rows it moved).
    pub const SESSION_COLUMNS: &str = session_columns!();

    /// Creates a session with its first events and its audit record (one
    /// commit), and wakes the queue. Returns the new row (no usage, no tool
    /// requests yet): no read-back.
    ///
    /// With `$26` (a dispatcher with room to start it), the new session is
    /// claimed for that dispatcher in the same statement, `{starting}` at
    /// epoch 1 with its claim event (`$27`, `$28`), unless a claimable
    /// session is already waiting: the queue's order holds, and a start
    /// saves the claim's own commit.
    ///
    /// `ON CONFLICT (project, request_id) DO NOTHING`: a retried create inserts nothing
    /// and the caller reads the existing row instead.
    pub const CREATE_SESSION: &str = r#"
WITH direct AS (
    SELECT $26::text AS owner
    WHERE $26::text IS NOT NULL AND NOT EXISTS (
        SELECT 1 FROM sessions
        WHERE status IN ({claimable}) AND (claim_after IS NULL OR claim_after <= now())
    )
), created AS (
    INSERT INTO sessions (id, request_id, display_name, status, spec, labels, timeout_ms, last_seq,
                          agent_id, agent_version, resources, inactivity_timeout_ms, budget_usd,
                          queue_timeout_ms, queue_deadline, project, env_sealed, env_kek, request_sha256,
                          traceparent, owner, epoch)
    SELECT $1, $2, $3, CASE WHEN d.owner IS NULL THEN '{pending}' ELSE '{starting}' END, $4, $5, $6,
           cardinality($7::bigint[]) + CASE WHEN d.owner IS NULL THEN 0 ELSE 1 END,
           $11, $12, $13, $14, $15, $16, now() + $16 * interval '1 millisecond', $17, $18, $19, $20,
           $21, coalesce(d.owner, ''), CASE WHEN d.owner IS NULL THEN 0 ELSE 1 END
    FROM (SELECT 1) AS one LEFT JOIN direct d ON true
    ON CONFLICT (project, request_id) DO NOTHING
    RETURNING *
), logged AS (
    INSERT INTO events (session_id, seq, id, type, payload, traceparent)
    SELECT c.id, e.seq, e.id, e.type, e.payload, $21
    FROM created c, unnest($7::bigint[], $8::uuid[], $9::text[], $10::text[]) AS e(seq, id, type, payload)
), claimed AS (
    INSERT INTO events (session_id, seq, id, type, payload, traceparent)
    SELECT c.id, c.last_seq, $27, 'session.status_{starting}', $28, $21
    FROM created c WHERE c.owner <> ''
), audited AS (
    INSERT INTO audit_events (project, identity, action, resource, detail)
    SELECT c.project, $22, $23, $24, $25 FROM created c
)
SELECT c.*, '[]'::jsonb AS models, 0::bigint AS pending_tools FROM created c
"#;

    /// One session by id.
    pub const GET_SESSION: &str = with_models!("WHERE id = $1");

    /// Where a session stands, and nothing else: what a follower needs,
    /// read on every stream and run end (no spec, no models).
    pub const POSITION: &str = "SELECT status, last_seq FROM sessions WHERE id = $1";

    /// The session an earlier create with this request id made.
    pub const SESSION_BY_REQUEST_ID: &str = with_models!("WHERE project = $2 AND request_id = $1");

    /// What the create request behind `request_id` $1 asked.
    pub const REQUEST_SHA256: &str =
        "SELECT request_sha256 FROM sessions WHERE project = $2 AND request_id = $1";

    /// Sessions newest first, filtered, one page. $1 status filter (NULL =
    /// any); $2 labels the session must all carry; $3/$4 keyset cursor (NULL =
    /// first page); $6 the project; $7 activity filter (NULL = any; see
    /// `Session::activity`). Served by `sessions_project_list`.
    pub const LIST_SESSIONS: &str = with_models!(
        "WHERE project = $6 AND ($1::text IS NULL OR status = $1) AND labels @> $2 \
           AND ($3::timestamptz IS NULL OR (create_time, id) < ($3, $4)) \
           AND ($7::text IS NULL OR CASE \
             WHEN status NOT IN ('starting', 'running', 'idle') THEN false \
             WHEN EXISTS (SELECT 1 FROM tool_requests t \
                          WHERE t.session_id = s.id AND t.decision IS NULL) \
               THEN $7 = 'waiting_input' \
             WHEN status = 'idle' THEN $7 = 'idle' \
             ELSE $7 = 'working' END) \
         ORDER BY create_time DESC, id DESC LIMIT $5"
    );

    /// Deletes a session that is not live; events and turns go with it
    /// (cascade). `status <> ALL($2)`: a live session is never deleted.
    pub const DELETE_SESSION: &str =
        "DELETE FROM sessions WHERE id = $1 AND status <> ALL($2) RETURNING id";
}

/// [`sql::CREATE_SESSION`] with its status names filled in from
/// [`SessionStatus`].
static CREATE_SESSION: LazyLock<String> = LazyLock::new(|| {
    sql::CREATE_SESSION
        .replace(
            "{claimable}",
            &super::status_literals(SessionStatus::CLAIMABLE),
        )
        .replace("{pending}", SessionStatus::Pending.as_str())
        .replace("{starting}", SessionStatus::Starting.as_str())
});

/// What a create made (or found: an earlier create with the same request id).
pub(crate) struct Created {
    pub session: Session,
    /// This call created it.
    pub created: bool,
    /// What the call that created it asked (its fingerprint).
    pub asked: Option<Vec<u8>>,
    /// Claimed for this dispatcher as it was created: to be driven here.
    pub claimed: Option<Claimed>,
}

/// Where a session stands ([`Store::position`]).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Position {
    pub status: SessionStatus,
    pub last_seq: i64,
}

/// A filter and page for `list_sessions`.
#[derive(Debug, Clone, Default)]
pub(crate) struct SessionFilter {
    pub status: Option<SessionStatus>,
    pub labels: BTreeMap<String, String>,
    /// Keyset cursor: sessions strictly older than this (time, id).
    pub before: Option<(DateTime<Utc>, Uuid)>,
    pub limit: i64,
    pub activity: Option<crate::session::Activity>,
}

/// A `sessions` row as stored.
#[derive(sqlx::FromRow)]
pub(super) struct SessionRow {
    id: Uuid,
    project: String,
    request_id: Option<String>,
    display_name: String,
    status: String,
    status_reason: String,
    spec: Json<AgentSpec>,
    labels: Json<BTreeMap<String, String>>,
    node: String,
    node_seq: i64,
    owner: String,
    epoch: i64,
    last_seq: i64,
    input_seq: i64,
    runtime_session_id: String,
    input_tokens: i64,
    output_tokens: i64,
    cache_read_input_tokens: i64,
    cache_creation_input_tokens: i64,
    cost_usd: f64,
    turns: i64,
    timeout_ms: Option<i64>,
    create_time: DateTime<Utc>,
    update_time: DateTime<Utc>,
    start_time: Option<DateTime<Utc>>,
    end_time: Option<DateTime<Utc>>,
    agent_id: Option<String>,
    agent_version: Option<i64>,
    resources: Json<Vec<Resource>>,
    inactivity_timeout_ms: Option<i64>,
    budget_usd: Option<f64>,
    queue_timeout_ms: Option<i64>,
    queue_deadline: Option<DateTime<Utc>>,
    snapshot_key: String,
    snapshot_bytes: i64,
    snapshot_time: Option<DateTime<Utc>>,
    snapshots: i64,
    archive_time: Option<DateTime<Utc>>,
    runtime_totals: Json<RunningTotals>,
    env_sealed: Option<Vec<u8>>,
    #[sqlx(default)]
    traceparent: Option<String>,
    /// Read only where the statement selects it (see `with_models!`).
    #[sqlx(default)]
    models: Option<Json<Vec<ModelFigures>>>,
    #[sqlx(default)]
    pending_tools: Option<i64>,
}

impl Store {
    /// A row as a session. Its env values stay sealed (the spec holds the
    /// names only) until a run needs them: [`Store::session_env`].
    pub(super) fn session(&self, r: SessionRow) -> Result<Session> {
        Ok(Session {
            env_sealed: r.env_sealed,
            traceparent: r.traceparent,
            id: r.id,
            project: r.project,
            request_id: r.request_id,
            display_name: r.display_name,
            status: r.status.parse().map_err(Error::Internal)?,
            status_reason: r.status_reason,
            spec: r.spec.0,
            labels: r.labels.0,
            node: r.node,
            node_seq: r.node_seq,
            owner: r.owner,
            epoch: r.epoch,
            last_seq: r.last_seq,
            input_seq: r.input_seq,
            runtime_session_id: r.runtime_session_id,
            usage: Usage {
                input_tokens: r.input_tokens,
                output_tokens: r.output_tokens,
                cache_read_input_tokens: r.cache_read_input_tokens,
                cache_creation_input_tokens: r.cache_creation_input_tokens,
                cost_usd: r.cost_usd,
                turns: r.turns,
                models: r.models.map(|m| m.0).unwrap_or_default(),
            },
            runtime_totals: r.runtime_totals.0,
            timeout: from_millis(r.timeout_ms),
            agent: r.agent_id.zip(r.agent_version),
            resources: r.resources.0,
            inactivity_timeout: from_millis(r.inactivity_timeout_ms),
            budget_usd: r.budget_usd,
            queue_timeout: from_millis(r.queue_timeout_ms),
            queue_deadline: r.queue_deadline,
            snapshot: r.snapshot_time.map(|create_time| Snapshot {
                key: r.snapshot_key,
                size_bytes: r.snapshot_bytes,
                create_time,
            }),
            snapshots: r.snapshots,
            archive_time: r.archive_time,
            create_time: r.create_time,
            update_time: r.update_time,
            start_time: r.start_time,
            end_time: r.end_time,
            pending_tools: r.pending_tools.unwrap_or(0),
        })
    }
}

impl Store {
    /// The session's env, names and values.
    pub(crate) fn session_env(&self, s: &Session) -> Result<BTreeMap<String, String>> {
        self.open_env(&s.project, s.env_sealed.as_deref())
    }

    /// Creates a session, or returns the one an earlier call with the same
    /// `request_id` created, with what that call asked (`fingerprint`).
    /// With `start_here` (this dispatcher's id) the session may be claimed
    /// for it in the same statement (see [`sql::CREATE_SESSION`]).
    pub(crate) async fn create_session(
        &self,
        project: &str,
        new: &NewSession,
        fingerprint: &[u8],
        audit: &super::AuditEntry,
        start_here: Option<&str>,
    ) -> Result<Created> {
        let mut spec = new.spec.clone();
        let (blank, env_sealed) = self.seal_env(project, &spec.env);
        spec.env = blank;
        let id = Uuid::now_v7();
        let pending = StatusChange {
            status: SessionStatus::Pending.as_str().into(),
            ..StatusChange::default()
        };
        let mut events = vec![NewEvent::new(
            SessionStatus::Pending.event_type(),
            payload::to_json(&pending),
        )];
        let first_message = new.initial_message.as_ref().map(|text| {
            events.push(NewEvent::user_message(text, None));
            (events.len() as i64, text)
        });
        let seqs: Vec<i64> = (1..=events.len() as i64).collect();
        let traceparent = berth_common::traces::current();
        let claim = StatusChange {
            status: SessionStatus::Starting.as_str().into(),
            previous: SessionStatus::Pending.as_str().into(),
            detail: payload::StatusDetail {
                epoch: Some(1),
                ..Default::default()
            },
            ..StatusChange::default()
        };
        let created: Option<SessionRow> = sqlx::query_as(AssertSqlSafe(CREATE_SESSION.as_str()))
            .bind(id)
            .bind(&new.request_id)
            .bind(&new.display_name)
            .bind(Json(&spec))
            .bind(Json(&new.labels))
            .bind(to_millis(new.timeout))
            .bind(&seqs)
            .bind(events.iter().map(|e| e.id).collect::<Vec<_>>())
            .bind(events.iter().map(|e| e.kind.clone()).collect::<Vec<_>>())
            .bind(events.iter().map(|e| e.payload.clone()).collect::<Vec<_>>())
            .bind(new.pinned.as_ref().map(|p| p.0.clone()))
            .bind(new.pinned.as_ref().map(|p| p.1))
            .bind(Json(&new.resources))
            .bind(to_millis(new.inactivity_timeout))
            .bind(new.budget_usd)
            .bind(to_millis(new.queue_timeout))
            .bind(project)
            .bind(&env_sealed)
            .bind(env_sealed.as_ref().map(|_| self.sealer().primary()))
            .bind(fingerprint)
            .bind(&traceparent)
            .bind(&audit.identity)
            .bind(audit.action)
            .bind(berth_common::names::session_name(id))
            .bind(Json(&audit.detail))
            .bind(start_here)
            .bind(Uuid::now_v7())
            .bind(payload::to_json(&claim))
            .fetch_optional(&self.pool)
            .await?;
        match &created {
            Some(row) if !row.owner.is_empty() => {
                self.notices.event(row.id, row.last_seq);
            }
            Some(_) => self.notices.queue(),
            None => {}
        }
        match (created, &new.request_id) {
            (Some(row), _) => {
                let session = self.session(row)?;
                // Its first input is the message it was created with.
                let claimed = (session.status == SessionStatus::Starting).then(|| Claimed {
                    session: session.clone(),
                    first_input: first_message.map(|(seq, text)| {
                        FirstInput::new(seq, ev::USER_MESSAGE, text.clone(), traceparent.clone())
                    }),
                });
                Ok(Created {
                    session,
                    created: true,
                    asked: Some(fingerprint.to_vec()),
                    claimed,
                })
            }
            (None, Some(request_id)) => {
                let row: SessionRow = sqlx::query_as(sql::SESSION_BY_REQUEST_ID)
                    .bind(request_id)
                    .bind(project)
                    .fetch_one(&self.pool)
                    .await?;
                let asked: Option<Vec<u8>> = sqlx::query_scalar(sql::REQUEST_SHA256)
                    .bind(request_id)
                    .bind(project)
                    .fetch_one(&self.pool)
                    .await?;
                Ok(Created {
                    session: self.session(row)?,
                    created: false,
                    asked,
                    claimed: None,
                })
            }
            (None, None) => Err(Error::Internal("session insert returned nothing".into())),
        }
    }

    /// The session's status and last seq (see [`sql::POSITION`]).
    pub(crate) async fn position(&self, id: Uuid) -> Result<Position> {
        let row: (String, i64) = sqlx::query_as(sql::POSITION)
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .ok_or_else(|| Error::SessionNotFound(id.to_string()))?;
        let status = row
            .0
            .parse::<SessionStatus>()
            .map_err(|e| Error::Internal(format!("session {id}: {e}")))?;
        Ok(Position {
            status,
            last_seq: row.1,
        })
    }

    pub(crate) async fn get_session(&self, id: Uuid) -> Result<Session> {
        let row: SessionRow = sqlx::query_as(sql::GET_SESSION)
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .ok_or_else(|| Error::SessionNotFound(id.to_string()))?;
        self.session(row)
    }

    /// Sessions newest first, filtered, one page.
    pub(crate) async fn list_sessions(
        &self,
        project: &str,
        f: &SessionFilter,
    ) -> Result<Vec<Session>> {
        let rows: Vec<SessionRow> = sqlx::query_as(sql::LIST_SESSIONS)
            .bind(f.status.map(SessionStatus::as_str))
            .bind(Json(&f.labels))
            .bind(f.before.map(|b| b.0))
            .bind(f.before.map(|b| b.1))
            .bind(f.limit)
            .bind(project)
            .bind(f.activity.map(crate::session::Activity::as_str))
            .fetch_all(&self.pool)
            .await?;
        rows.into_iter().map(|r| self.session(r)).collect()
    }

    /// Deletes a session that is not live with its events and usage rows.
    /// `false` when it was live (or appeared live) at the time.
    pub(crate) async fn delete_session(&self, id: Uuid) -> Result<bool> {
        let deleted: Option<Uuid> = sqlx::query_scalar(sql::DELETE_SESSION)
            .bind(id)
            .bind(super::live_statuses())
            .fetch_optional(&self.pool)
            .await?;
        Ok(deleted.is_some())
    }
}
