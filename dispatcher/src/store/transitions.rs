//! Status changes: compare-and-set of a session's status, logged as its
//! event. The status machine ([`SessionStatus::transition`]) decides each
//! change; the statement only applies it, and only to a session nobody moved
//! or re-placed since its position was read. Many changes (any sessions, one
//! each) go in one statement and one commit: at thousands of sessions every
//! turn is two changes (running, idle), and one commit each was the event
//! writer's limit.

use std::collections::HashMap;
use std::sync::LazyLock;

use berth_common::events::payload::{self, StatusChange, StatusDetail};
use chrono::{DateTime, Utc};
use sqlx::AssertSqlSafe;
use uuid::Uuid;

use super::Store;
use crate::error::{Error, Result};
use crate::session::{Event, SessionStatus, StatusEvent};

mod sql {
    /// Positions of several sessions.
    pub const POSITIONS: &str =
        "SELECT id, status, epoch, last_seq FROM sessions WHERE id = ANY($1)";

    /// Compare-and-set of several sessions' statuses (one change each),
    /// logging each change as an event. `status = from AND epoch = epoch`:
    /// a change applies only if nobody moved or re-placed the session since
    /// its position was read; a session with no row back must be re-read.
    /// `{running}` are the statuses that mark a start.
    ///
    /// A change with a `node` also records where its run was placed (a
    /// start): the node, a fresh node cursor unless the run was re-attached,
    /// the input cursor past what the start carried, and no backoff.
    pub const TRANSITION: &str = r#"
WITH input AS (
    SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::boolean[],
                         $6::uuid[], $7::text[], $8::text[], $9::bigint[], $10::text[],
                         $11::text[], $12::boolean[], $13::bigint[])
        AS t(id, from_status, to_status, reason, ends, event_id, kind, payload, epoch, traceparent,
             node, attached, input_seq)
), moved AS (
    UPDATE sessions s
    SET status = i.to_status, status_reason = i.reason, last_seq = s.last_seq + 1,
        update_time = now(),
        start_time = CASE WHEN i.to_status IN ({running}) THEN coalesce(s.start_time, now())
                          ELSE s.start_time END,
        end_time = CASE WHEN i.ends THEN now() WHEN i.to_status = '{pending}' THEN NULL
                        ELSE s.end_time END,
        -- Archiving stamps the time retention counts from.
        archive_time = CASE WHEN i.to_status = '{archived}' THEN now() ELSE s.archive_time END,
        -- Back in the queue (resumed): a fresh queue deadline.
        queue_deadline = CASE WHEN i.to_status = '{pending}'
                              THEN now() + s.queue_timeout_ms * interval '1 millisecond'
                              ELSE s.queue_deadline END,
        node = CASE WHEN i.ends THEN '' ELSE coalesce(i.node, s.node) END,
        owner = CASE WHEN i.ends THEN '' ELSE s.owner END,
        requeues = CASE WHEN i.node IS NULL THEN s.requeues ELSE 0 END,
        claim_after = CASE WHEN i.node IS NULL THEN s.claim_after END,
        node_seq = CASE WHEN i.node IS NULL OR i.attached THEN s.node_seq ELSE 0 END,
        input_seq = CASE WHEN i.node IS NULL THEN s.input_seq
                         ELSE greatest(s.input_seq, i.input_seq) END
    FROM input i
    WHERE s.id = i.id AND s.status = i.from_status AND s.epoch = i.epoch
    RETURNING s.id, s.last_seq
)
INSERT INTO events (session_id, seq, id, type, payload, traceparent)
SELECT m.id, m.last_seq, i.event_id, i.kind, i.payload, i.traceparent
FROM moved m JOIN input i ON i.id = m.id
RETURNING session_id, seq, create_time
"#;
}

/// [`sql::TRANSITION`] with its status names filled in from [`SessionStatus`].
static TRANSITION: LazyLock<String> = LazyLock::new(|| {
    use SessionStatus::*;
    sql::TRANSITION
        .replace("{running}", &super::status_literals([Running, Idle]))
        .replace("{pending}", Pending.as_str())
        .replace("{archived}", Archived.as_str())
});

/// A status change that was persisted.
#[derive(Debug, Clone)]
pub(crate) struct Transitioned {
    pub to: SessionStatus,
    /// The logged status event, or `None` when the status did not change.
    pub event: Option<Event>,
}

/// Where a started run was placed, recorded with its start.
#[derive(Debug, Clone)]
pub(crate) struct Placement {
    pub node: String,
    /// The run was already going (a re-attach): its node cursor stays.
    pub attached: bool,
    /// The input the start carried (0: none): the input cursor moves past it.
    pub input_seq: i64,
}

/// One status change to make.
#[derive(Clone, Copy)]
pub(crate) struct Change<'a> {
    pub id: Uuid,
    /// Applies only while the session is at this epoch.
    pub epoch: Option<i64>,
    /// The status the caller knows the session has at `epoch` (a driver
    /// that claimed it): planned from that, without reading the position
    /// first. If it moved since, the compare-and-set misses and the change
    /// is re-read and retried like any lost race.
    pub assumed: Option<SessionStatus>,
    /// The run's placement, recorded in the same statement.
    pub placement: Option<&'a Placement>,
    pub event: StatusEvent,
    pub reason: &'a str,
    pub detail: &'a StatusDetail,
    /// The trace the change is made in (W3C `traceparent`).
    pub traceparent: Option<&'a str>,
}

/// A change the status machine allowed, as the statement applies it.
pub(super) struct Planned {
    index: usize,
    id: Uuid,
    from: SessionStatus,
    to: SessionStatus,
    reason: String,
    event_id: Uuid,
    kind: String,
    payload: String,
    epoch: i64,
    traceparent: Option<String>,
    placement: Option<Placement>,
}

impl Store {
    /// Applies `change` to the session's current status with compare-and-set,
    /// logging it. Re-reads and retries when another writer won. With an
    /// epoch, applies only while the session is at that epoch.
    pub(crate) async fn transition(&self, change: &Change<'_>) -> Result<Transitioned> {
        // Read the position: an assumed one is what just lost.
        let change = Change {
            assumed: None,
            ..*change
        };
        for _ in 0..8 {
            if let Some(done) = self
                .transitions(std::slice::from_ref(&change))
                .await?
                .pop()
                .flatten()
            {
                return done;
            }
        }
        Err(Error::Conflict)
    }

    /// Applies each change (at most one per session) against the sessions'
    /// current positions, in one statement: each change's outcome, or `None`
    /// where another writer moved the session first (re-read and retry it).
    pub(crate) async fn transitions(
        &self,
        changes: &[Change<'_>],
    ) -> Result<Vec<Option<Result<Transitioned>>>> {
        let mut positions = assumed_positions(changes);
        let ids: Vec<Uuid> = changes
            .iter()
            .map(|c| c.id)
            .filter(|id| !positions.contains_key(id))
            .collect();
        if !ids.is_empty() {
            let rows: Vec<(Uuid, String, i64, i64)> = sqlx::query_as(sql::POSITIONS)
                .bind(&ids)
                .fetch_all(&self.pool)
                .await?;
            for (id, status, epoch, _) in rows {
                let status = status
                    .parse()
                    .map_err(|e| Error::Internal(format!("session {id}: {e}")))?;
                positions.insert(id, (status, epoch));
            }
        }
        let (mut out, planned) = plan_all(changes, &positions);
        if planned.is_empty() {
            return Ok(out);
        }
        let rows = apply(&self.pool, &planned).await?;
        self.notices
            .events(rows.iter().map(|(id, seq, _)| (*id, *seq)));
        landed(&mut out, planned, rows);
        Ok(out)
    }
}

/// The positions the changes assume (status and epoch), where they do.
pub(super) fn assumed_positions(changes: &[Change<'_>]) -> HashMap<Uuid, (SessionStatus, i64)> {
    changes
        .iter()
        .filter_map(|c| Some((c.id, (c.assumed?, c.epoch?))))
        .collect()
}

/// Plans each change at its session's position: the outcome of each that
/// needs no statement, and the changes to apply, sorted by session id (one
/// lock order for every writer).
pub(super) fn plan_all(
    changes: &[Change<'_>],
    positions: &HashMap<Uuid, (SessionStatus, i64)>,
) -> (Vec<Option<Result<Transitioned>>>, Vec<Planned>) {
    let mut out: Vec<Option<Result<Transitioned>>> = Vec::with_capacity(changes.len());
    let mut planned = Vec::new();
    for (index, c) in changes.iter().enumerate() {
        match plan(c, positions.get(&c.id)) {
            Ok(Plan::Change(p)) => {
                out.push(None);
                planned.push(Planned { index, ..*p });
            }
            Ok(Plan::Stays(to)) => out.push(Some(Ok(Transitioned { to, event: None }))),
            Err(e) => out.push(Some(Err(e))),
        }
    }
    planned.sort_by_key(|p| p.id);
    (out, planned)
}

/// Runs [`sql::TRANSITION`] for `planned` on `db` (the pool, or a
/// transaction that holds the rows): the session, seq and time of each
/// change that applied.
pub(super) async fn apply<'c>(
    db: impl sqlx::PgExecutor<'c>,
    planned: &[Planned],
) -> Result<Vec<(Uuid, i64, DateTime<Utc>)>> {
    let col = |f: fn(&Planned) -> &str| planned.iter().map(f).collect::<Vec<_>>();
    Ok(sqlx::query_as(AssertSqlSafe(TRANSITION.as_str()))
        .bind(planned.iter().map(|p| p.id).collect::<Vec<_>>())
        .bind(col(|p| p.from.as_str()))
        .bind(col(|p| p.to.as_str()))
        .bind(col(|p| p.reason.as_str()))
        .bind(planned.iter().map(|p| !p.to.is_live()).collect::<Vec<_>>())
        .bind(planned.iter().map(|p| p.event_id).collect::<Vec<_>>())
        .bind(col(|p| p.kind.as_str()))
        .bind(col(|p| p.payload.as_str()))
        .bind(planned.iter().map(|p| p.epoch).collect::<Vec<_>>())
        .bind(
            planned
                .iter()
                .map(|p| p.traceparent.as_deref())
                .collect::<Vec<_>>(),
        )
        .bind(
            planned
                .iter()
                .map(|p| p.placement.as_ref().map(|n| n.node.as_str()))
                .collect::<Vec<_>>(),
        )
        .bind(
            planned
                .iter()
                .map(|p| p.placement.as_ref().is_some_and(|n| n.attached))
                .collect::<Vec<_>>(),
        )
        .bind(
            planned
                .iter()
                .map(|p| p.placement.as_ref().map_or(0, |n| n.input_seq))
                .collect::<Vec<_>>(),
        )
        .fetch_all(db)
        .await?)
}

/// Fills in the outcome of each planned change that `rows` say applied;
/// the others stay `None` (another writer moved the session first).
pub(super) fn landed(
    out: &mut [Option<Result<Transitioned>>],
    planned: Vec<Planned>,
    rows: Vec<(Uuid, i64, DateTime<Utc>)>,
) {
    let landed: HashMap<Uuid, (i64, DateTime<Utc>)> = rows
        .into_iter()
        .map(|(id, seq, at)| (id, (seq, at)))
        .collect();
    for p in planned {
        let Some(&(seq, create_time)) = landed.get(&p.id) else {
            continue;
        };
        out[p.index] = Some(Ok(Transitioned {
            to: p.to,
            event: Some(Event {
                session_id: p.id,
                seq,
                id: p.event_id,
                kind: p.kind,
                create_time,
                payload: p.payload,
                raw: None,
                line_seq: 0,
                traceparent: p.traceparent,
            }),
        }));
    }
}

/// What the status machine makes of a change.
enum Plan {
    /// The status stays as it is: nothing to log.
    Stays(SessionStatus),
    Change(Box<Planned>),
}

/// What the status machine makes of `c` at the session's position
/// (`status`, `epoch`), or why it is refused.
fn plan(c: &Change<'_>, position: Option<&(SessionStatus, i64)>) -> Result<Plan> {
    let Some(&(current, ref epoch)) = position else {
        return Err(Error::SessionNotFound(c.id.to_string()));
    };
    if let Some(want) = c.epoch.filter(|e| e != epoch) {
        return Err(Error::Superseded {
            id: c.id,
            epoch: want,
            current: *epoch,
        });
    }
    let to = current.transition(c.event)?;
    if to == current {
        return Ok(Plan::Stays(to));
    }
    let payload = payload::to_json(&StatusChange {
        status: to.as_str().into(),
        previous: current.as_str().into(),
        reason: c.reason.into(),
        pause: c.event == StatusEvent::PauseRequested,
        detail: c.detail.clone(),
    });
    Ok(Plan::Change(Box::new(Planned {
        index: 0,
        id: c.id,
        from: current,
        to,
        reason: c.reason.to_string(),
        event_id: Uuid::now_v7(),
        kind: to.event_type(),
        payload,
        epoch: *epoch,
        traceparent: c.traceparent.map(str::to_string),
        placement: c.placement.cloned(),
    })))
}
