//! Schedules and their fires. A fire is claimed by a compare-and-set on the
//! schedule's `next_fire_time` that inserts the fire's row in the same
//! statement: exactly one dispatcher wins each cron time.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::types::Json;
use uuid::Uuid;

use super::Store;
use crate::error::{Error, Result};
use crate::records::{Fire, FireKind, NewSchedule, Plan, Schedule};

mod sql {
    macro_rules! schedules {
        ($filter:literal) => {
            concat!(
                "SELECT id, project, schedule_id, display_name, agent, cron, timezone, input, \
                 labels, suspended, next_fire_time, last_fire_time, creator, create_time \
                 FROM schedules ",
                $filter
            )
        };
    }

    macro_rules! fires {
        ($filter:literal) => {
            concat!(
                "SELECT fire_time, kind, skipped, session_id, error, dispatcher, create_time \
                 FROM schedule_fires ",
                $filter
            )
        };
    }

    pub const GET: &str = schedules!("WHERE project = $1 AND schedule_id = $2");
    pub const BY_ID: &str = schedules!("WHERE id = $1");
    /// Newest first after the keyset cursor ($2, $3).
    pub const LIST: &str = schedules!(
        "WHERE project = $1 AND ($2::timestamptz IS NULL OR (create_time, id) < ($2, $3)) \
         ORDER BY create_time DESC, id DESC LIMIT $4"
    );
    pub const DUE: &str = schedules!(
        "WHERE NOT suspended AND next_fire_time <= now() ORDER BY next_fire_time LIMIT $1"
    );
    pub const GET_FIRE: &str = fires!("WHERE schedule = $1 AND fire_time = $2");
    /// Newest first, before $2.
    pub const LIST_FIRES: &str = fires!(
        "WHERE schedule = $1 AND ($2::timestamptz IS NULL OR fire_time < $2) \
         ORDER BY fire_time DESC LIMIT $3"
    );

    /// `ON CONFLICT DO NOTHING`: an existing id returns no row.
    pub const CREATE: &str = "INSERT INTO schedules (id, project, schedule_id, display_name, agent, cron, \
         timezone, input, labels, suspended, next_fire_time, creator) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) \
         ON CONFLICT (project, schedule_id) DO NOTHING RETURNING id";

    /// `$3` NULL suspends; else resumes with `next_fire_time = $4`.
    pub const SET_SUSPENDED: &str = "UPDATE schedules SET suspended = $3, \
         next_fire_time = CASE WHEN $3 THEN NULL ELSE $4 END, update_time = now() \
         WHERE project = $1 AND schedule_id = $2 RETURNING id";

    pub const DELETE: &str = "DELETE FROM schedules WHERE project = $1 AND schedule_id = $2";

    /// The claim: moves `next_fire_time` on from the value read ($2) and
    /// records the fire, or does nothing when another dispatcher got there
    /// first (or the schedule was suspended, resumed or deleted meanwhile).
    pub const CLAIM: &str = r#"
WITH s AS (
    UPDATE schedules SET next_fire_time = $3, last_fire_time = $4, update_time = now()
    WHERE id = $1 AND next_fire_time = $2 AND NOT suspended
    RETURNING id
)
INSERT INTO schedule_fires (schedule, fire_time, kind, skipped, dispatcher)
SELECT id, $4, $5, $6, $7 FROM s
ON CONFLICT (schedule, fire_time) DO NOTHING
RETURNING schedule
"#;

    /// A manual fire at $2, or the one the same request id made before.
    pub const CLAIM_MANUAL: &str = r#"
WITH f AS (
    INSERT INTO schedule_fires (schedule, fire_time, kind, dispatcher, request_id)
    VALUES ($1, $2, 'manual', $3, $4)
    ON CONFLICT DO NOTHING
    RETURNING fire_time
), s AS (
    UPDATE schedules SET last_fire_time = greatest(last_fire_time, $2), update_time = now()
    WHERE id = $1 AND EXISTS (SELECT 1 FROM f)
)
SELECT fire_time FROM f
UNION ALL
SELECT fire_time FROM schedule_fires WHERE schedule = $1 AND request_id = $4
LIMIT 1
"#;

    pub const RECORD: &str = "UPDATE schedule_fires SET session_id = $3, error = $4 \
         WHERE schedule = $1 AND fire_time = $2 AND session_id IS NULL";

    /// Fires claimed over $1 ms ago that still owe a session.
    pub const OPEN: &str = "SELECT schedule, fire_time FROM schedule_fires \
         WHERE session_id IS NULL AND error = '' AND kind <> 'missed' \
           AND claim_time < now() - make_interval(secs => $1::float8 / 1000) \
         ORDER BY claim_time LIMIT $2";

    /// Takes over an open fire (compare-and-set on its claim's age).
    pub const TAKE_OVER: &str = "UPDATE schedule_fires SET dispatcher = $3, claim_time = now() \
         WHERE schedule = $1 AND fire_time = $2 AND session_id IS NULL AND error = '' \
           AND claim_time < now() - make_interval(secs => $4::float8 / 1000) \
         RETURNING schedule";
}

#[derive(sqlx::FromRow)]
struct ScheduleRow {
    id: Uuid,
    project: String,
    schedule_id: String,
    display_name: String,
    agent: String,
    cron: String,
    timezone: String,
    input: String,
    labels: Json<BTreeMap<String, String>>,
    suspended: bool,
    next_fire_time: Option<DateTime<Utc>>,
    last_fire_time: Option<DateTime<Utc>>,
    creator: String,
    create_time: DateTime<Utc>,
}

impl From<ScheduleRow> for Schedule {
    fn from(r: ScheduleRow) -> Self {
        Self {
            id: r.id,
            project: r.project,
            schedule_id: r.schedule_id,
            display_name: r.display_name,
            agent: r.agent,
            cron: r.cron,
            timezone: r.timezone,
            input: r.input,
            labels: r.labels.0,
            suspended: r.suspended,
            next_fire_time: r.next_fire_time,
            last_fire_time: r.last_fire_time,
            creator: r.creator,
            create_time: r.create_time,
        }
    }
}

#[derive(sqlx::FromRow)]
struct FireRow {
    fire_time: DateTime<Utc>,
    kind: String,
    skipped: i32,
    session_id: Option<Uuid>,
    error: String,
    dispatcher: String,
    create_time: DateTime<Utc>,
}

impl FireRow {
    fn fire(self, schedule_id: &str) -> Fire {
        Fire {
            schedule_id: schedule_id.to_string(),
            fire_time: self.fire_time,
            kind: FireKind::parse(&self.kind),
            skipped: self.skipped,
            session_id: self.session_id,
            error: self.error,
            dispatcher: self.dispatcher,
            create_time: self.create_time,
        }
    }
}

fn not_found(schedule_id: &str) -> Error {
    Error::NotFound(format!(
        "schedule schedules/{schedule_id} not found; ListSchedules shows the schedules there are"
    ))
}

impl Store {
    pub(crate) async fn create_schedule(
        &self,
        project: &str,
        creator: &str,
        new: &NewSchedule,
        timezone: &str,
        next: Option<DateTime<Utc>>,
    ) -> Result<Schedule> {
        let created: Option<Uuid> = sqlx::query_scalar(sql::CREATE)
            .bind(Uuid::now_v7())
            .bind(project)
            .bind(&new.schedule_id)
            .bind(&new.display_name)
            .bind(&new.agent)
            .bind(&new.cron)
            .bind(timezone)
            .bind(&new.input)
            .bind(Json(&new.labels))
            .bind(new.suspended)
            .bind(next)
            .bind(creator)
            .fetch_optional(&self.pool)
            .await?;
        if created.is_none() {
            return Err(Error::AlreadyExists(format!(
                "schedule `{}` already exists",
                new.schedule_id
            )));
        }
        self.get_schedule(project, &new.schedule_id).await
    }

    pub(crate) async fn get_schedule(&self, project: &str, schedule_id: &str) -> Result<Schedule> {
        let row: Option<ScheduleRow> = sqlx::query_as(sql::GET)
            .bind(project)
            .bind(schedule_id)
            .fetch_optional(&self.pool)
            .await?;
        row.map(Into::into).ok_or_else(|| not_found(schedule_id))
    }

    /// Newest first, after the keyset cursor `after`.
    pub(crate) async fn list_schedules(
        &self,
        project: &str,
        after: Option<(DateTime<Utc>, Uuid)>,
        limit: i64,
    ) -> Result<Vec<Schedule>> {
        let (time, id) = after.unzip();
        let rows: Vec<ScheduleRow> = sqlx::query_as(sql::LIST)
            .bind(project)
            .bind(time)
            .bind(id)
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.into_iter().map(Into::into).collect())
    }

    /// `resume_at` `None` suspends; `Some(next)` resumes firing at `next`.
    pub(crate) async fn set_schedule_suspended(
        &self,
        project: &str,
        schedule_id: &str,
        resume_at: Option<Option<DateTime<Utc>>>,
    ) -> Result<Schedule> {
        let done: Option<Uuid> = sqlx::query_scalar(sql::SET_SUSPENDED)
            .bind(project)
            .bind(schedule_id)
            .bind(resume_at.is_none())
            .bind(resume_at.flatten())
            .fetch_optional(&self.pool)
            .await?;
        done.ok_or_else(|| not_found(schedule_id))?;
        self.get_schedule(project, schedule_id).await
    }

    pub(crate) async fn delete_schedule(&self, project: &str, schedule_id: &str) -> Result<()> {
        let done = sqlx::query(sql::DELETE)
            .bind(project)
            .bind(schedule_id)
            .execute(&self.pool)
            .await?;
        if done.rows_affected() == 0 {
            return Err(not_found(schedule_id));
        }
        Ok(())
    }

    /// Schedules whose next fire is due, oldest first.
    pub(crate) async fn due_schedules(&self, limit: i64) -> Result<Vec<Schedule>> {
        let rows: Vec<ScheduleRow> = sqlx::query_as(sql::DUE)
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.into_iter().map(Into::into).collect())
    }

    /// Claims `plan`'s fire of `s`, read as due at `due`: true when this
    /// dispatcher won it.
    pub(crate) async fn claim_fire(
        &self,
        s: &Schedule,
        due: DateTime<Utc>,
        plan: &Plan,
        owner: &str,
    ) -> Result<bool> {
        let won: Option<Uuid> = sqlx::query_scalar(sql::CLAIM)
            .bind(s.id)
            .bind(due)
            .bind(plan.next)
            .bind(plan.fire_time)
            .bind(plan.kind.as_str())
            .bind(plan.skipped)
            .bind(owner)
            .fetch_optional(&self.pool)
            .await?;
        Ok(won.is_some())
    }

    /// Records a manual fire at `now`, or finds the one `request_id` made:
    /// returns its fire time (`now` when this call made it).
    pub(crate) async fn claim_manual_fire(
        &self,
        schedule: Uuid,
        now: DateTime<Utc>,
        request_id: Option<&str>,
        owner: &str,
    ) -> Result<DateTime<Utc>> {
        let t: Option<DateTime<Utc>> = sqlx::query_scalar(sql::CLAIM_MANUAL)
            .bind(schedule)
            .bind(now)
            .bind(owner)
            .bind(request_id)
            .fetch_optional(&self.pool)
            .await?;
        t.ok_or(Error::Conflict)
    }

    pub(crate) async fn record_fire(
        &self,
        schedule: Uuid,
        fire_time: DateTime<Utc>,
        session_id: Option<Uuid>,
        error: &str,
    ) -> Result<()> {
        sqlx::query(sql::RECORD)
            .bind(schedule)
            .bind(fire_time)
            .bind(session_id)
            .bind(error)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub(crate) async fn get_fire(&self, s: &Schedule, fire_time: DateTime<Utc>) -> Result<Fire> {
        let row: Option<FireRow> = sqlx::query_as(sql::GET_FIRE)
            .bind(s.id)
            .bind(fire_time)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| r.fire(&s.schedule_id)).ok_or_else(|| {
            Error::NotFound(format!(
                "fire of {} at {fire_time} not found",
                s.schedule_id
            ))
        })
    }

    /// Newest first, before `before`.
    pub(crate) async fn list_fires(
        &self,
        s: &Schedule,
        before: Option<DateTime<Utc>>,
        limit: i64,
    ) -> Result<Vec<Fire>> {
        let rows: Vec<FireRow> = sqlx::query_as(sql::LIST_FIRES)
            .bind(s.id)
            .bind(before)
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.into_iter().map(|r| r.fire(&s.schedule_id)).collect())
    }

    /// Fires claimed over `older_than` ago that still owe a session, with
    /// their schedules.
    pub(crate) async fn open_fires(
        &self,
        older_than: Duration,
        limit: i64,
    ) -> Result<Vec<(Schedule, DateTime<Utc>)>> {
        let open: Vec<(Uuid, DateTime<Utc>)> = sqlx::query_as(sql::OPEN)
            .bind(older_than.as_millis() as f64)
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
        let mut out = Vec::with_capacity(open.len());
        for (schedule, fire_time) in open {
            let row: Option<ScheduleRow> = sqlx::query_as(sql::BY_ID)
                .bind(schedule)
                .fetch_optional(&self.pool)
                .await?;
            if let Some(r) = row {
                out.push((r.into(), fire_time));
            }
        }
        Ok(out)
    }

    /// Takes over an open fire whose claim is over `older_than` old: true
    /// when this dispatcher now holds it.
    pub(crate) async fn take_over_fire(
        &self,
        schedule: Uuid,
        fire_time: DateTime<Utc>,
        older_than: Duration,
        owner: &str,
    ) -> Result<bool> {
        let won: Option<Uuid> = sqlx::query_scalar(sql::TAKE_OVER)
            .bind(schedule)
            .bind(fire_time)
            .bind(owner)
            .bind(older_than.as_millis() as f64)
            .fetch_optional(&self.pool)
            .await?;
        Ok(won.is_some())
    }
}
