//! Schedules: cron-driven sessions of an agent. The operations behind
//! `berth.v1.Schedules`, the pure planning of a due fire, and the
//! [`Scheduler`] loop every dispatcher runs.
//!
//! Exactly once with any number of dispatchers: a fire is claimed by one
//! statement that moves `next_fire_time` on only if it still holds the value
//! read (compare-and-set) and inserts the fire's row; its session is created
//! with a request id derived from (schedule, fire time), so a dispatcher that
//! dies between the claim and the creation leaves a fire another completes
//! with the same session.
//!
//! Catch-up: cron times missed while no dispatcher ran (or while the
//! database was away) are not all run. The latest of them fires, marked
//! `catch_up` with the older ones counted in `skipped`, if it is within the
//! catch-up window (`--schedule-catch-up-window`) of now; otherwise it is
//! recorded as `missed` with no session. Then the schedule goes on from the
//! next cron time after now.

use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::error::{Error, Result};
use crate::ops::audit::{Action, Detail};
use crate::ops::sessions::Sessions;
pub(crate) use crate::records::{Fire, FireKind, NewSchedule, Plan, Schedule};
use crate::session::{NewSession, limits};
use crate::store::Store;

/// The label every session a schedule creates carries, with its id.
pub(crate) const SCHEDULE_LABEL: &str = "berth.schedule";

/// Most cron times counted when working out what was missed.
const MAX_COUNTED: i32 = 100_000;

/// A cron expression read in its time zone.
#[derive(Debug, Clone)]
pub(crate) struct CronSpec {
    cron: croner::Cron,
    tz: chrono_tz::Tz,
}

impl CronSpec {
    /// Parses `cron` (five fields, or six with seconds) in `timezone` (IANA;
    /// empty = UTC). Errors name the field.
    pub fn parse(cron: &str, timezone: &str) -> Result<Self> {
        let tz = if timezone.is_empty() {
            chrono_tz::UTC
        } else {
            chrono_tz::Tz::from_str(timezone).map_err(|_| {
                Error::invalid(
                    "schedule.timezone",
                    format!("`{timezone}` is not an IANA time zone (e.g. UTC, Europe/Paris)"),
                )
            })?
        };
        if cron.trim().is_empty() {
            return Err(Error::invalid(
                "schedule.cron",
                "required, e.g. `0 9 * * MON-FRI`",
            ));
        }
        let cron = croner::parser::CronParser::new()
            .parse(cron)
            .map_err(|e| Error::invalid("schedule.cron", format!("`{cron}`: {e}")))?;
        Ok(Self { cron, tz })
    }

    /// The first cron time strictly after `t`.
    pub fn next_after(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.cron
            .find_next_occurrence(&t.with_timezone(&self.tz), false)
            .ok()
            .map(|n| n.with_timezone(&Utc))
    }

    /// The shortest gap between consecutive cron times over the next
    /// `samples` of them after `from` (`None`: it never fires).
    pub fn shortest_gap(&self, from: DateTime<Utc>, samples: usize) -> Option<Duration> {
        let mut prev = self.next_after(from)?;
        let mut shortest: Option<Duration> = None;
        for _ in 0..samples {
            let Some(next) = self.next_after(prev) else {
                break;
            };
            let gap = (next - prev).to_std().unwrap_or_default();
            shortest = Some(shortest.map_or(gap, |s| s.min(gap)));
            prev = next;
        }
        Some(shortest.unwrap_or(Duration::MAX))
    }
}

/// Plans a schedule whose `next_fire_time` (`due`) is not after `now`: the
/// latest cron time up to now fires (see the module's catch-up policy).
pub(crate) fn plan(
    spec: &CronSpec,
    due: DateTime<Utc>,
    now: DateTime<Utc>,
    window: Duration,
) -> Plan {
    let mut latest = due;
    let mut count = 1;
    while count < MAX_COUNTED {
        match spec.next_after(latest) {
            Some(t) if t <= now => {
                latest = t;
                count += 1;
            }
            _ => break,
        }
    }
    let late = (now - latest).to_std().unwrap_or_default();
    let kind = if late > window {
        FireKind::Missed
    } else if count > 1 {
        FireKind::CatchUp
    } else {
        FireKind::Cron
    };
    Plan {
        fire_time: latest,
        kind,
        skipped: count - 1,
        next: spec.next_after(now.max(latest)),
    }
}

/// The schedule operations clients call.
#[derive(Clone)]
pub(crate) struct Schedules {
    pub store: Store,
    pub audit: crate::ops::audit::Audit,
    pub sessions: Sessions,
    /// Cron times closer together than this are refused.
    pub min_interval: Duration,
    /// This dispatcher's id, recorded on the fires it makes.
    pub owner: String,
}

impl Schedules {
    pub async fn create(&self, project: &str, creator: &str, new: NewSchedule) -> Result<Schedule> {
        let spec = CronSpec::parse(&new.cron, &new.timezone)?;
        let now = Utc::now();
        match spec.shortest_gap(now, 16) {
            None => {
                return Err(Error::invalid(
                    "schedule.cron",
                    format!("`{}` never fires", new.cron),
                ));
            }
            Some(gap) if gap < self.min_interval => {
                return Err(Error::invalid(
                    "schedule.cron",
                    format!(
                        "`{}` fires every {} s; this deployment allows at most one fire per {} s (--schedule-min-interval)",
                        new.cron,
                        gap.as_secs_f64(),
                        self.min_interval.as_secs_f64()
                    ),
                ));
            }
            Some(_) => {}
        }
        self.sessions
            .check_agent(project, &new.agent, "schedule.agent")
            .await?;
        let timezone = if new.timezone.is_empty() {
            "UTC".to_string()
        } else {
            new.timezone.clone()
        };
        let next = (!new.suspended).then(|| spec.next_after(now)).flatten();
        let created = self
            .store
            .create_schedule(project, creator, &new, &timezone, next)
            .await?;
        let detail = Detail::Schedule {
            agent: created.agent.clone(),
            cron: created.cron.clone(),
            timezone: created.timezone.clone(),
        };
        self.record(
            project,
            creator,
            Action::ScheduleCreate,
            &created.schedule_id,
            detail,
        )
        .await;
        Ok(created)
    }

    /// Records that `by` did `action` to schedule `schedule_id`.
    async fn record(
        &self,
        project: &str,
        by: &str,
        action: Action,
        schedule_id: &str,
        detail: Detail,
    ) {
        let resource = format!("schedules/{schedule_id}");
        self.audit
            .record(project, by, action, &resource, detail)
            .await;
    }

    pub async fn get(&self, project: &str, schedule_id: &str) -> Result<Schedule> {
        self.store.get_schedule(project, schedule_id).await
    }

    pub async fn list(
        &self,
        project: &str,
        after: Option<(DateTime<Utc>, Uuid)>,
        limit: i64,
    ) -> Result<Vec<Schedule>> {
        self.store.list_schedules(project, after, limit).await
    }

    pub async fn suspend(&self, project: &str, schedule_id: &str, by: &str) -> Result<Schedule> {
        let s = self
            .store
            .set_schedule_suspended(project, schedule_id, None)
            .await?;
        self.record(
            project,
            by,
            Action::ScheduleSuspend,
            schedule_id,
            Detail::None {},
        )
        .await;
        Ok(s)
    }

    /// Resumes from the next cron time after now: fires due while suspended
    /// are not made up.
    pub async fn resume(&self, project: &str, schedule_id: &str, by: &str) -> Result<Schedule> {
        let s = self.get(project, schedule_id).await?;
        let spec = CronSpec::parse(&s.cron, &s.timezone)?;
        let next = spec.next_after(Utc::now());
        let s = self
            .store
            .set_schedule_suspended(project, schedule_id, Some(next))
            .await?;
        self.record(
            project,
            by,
            Action::ScheduleResume,
            schedule_id,
            Detail::None {},
        )
        .await;
        Ok(s)
    }

    pub async fn delete(&self, project: &str, schedule_id: &str, by: &str) -> Result<()> {
        self.store.delete_schedule(project, schedule_id).await?;
        self.record(
            project,
            by,
            Action::ScheduleDelete,
            schedule_id,
            Detail::None {},
        )
        .await;
        Ok(())
    }

    pub async fn fires(
        &self,
        project: &str,
        schedule_id: &str,
        before: Option<DateTime<Utc>>,
        limit: i64,
    ) -> Result<Vec<Fire>> {
        let s = self.get(project, schedule_id).await?;
        self.store.list_fires(&s, before, limit).await
    }

    /// Fires now, once: a retried trigger with the same `request_id` returns
    /// the same fire.
    pub async fn trigger(
        &self,
        project: &str,
        schedule_id: &str,
        request_id: Option<&str>,
        by: &str,
    ) -> Result<Fire> {
        let s = self.get(project, schedule_id).await?;
        // Microseconds: what Postgres keeps of a time.
        let now =
            DateTime::from_timestamp_micros(Utc::now().timestamp_micros()).unwrap_or_else(Utc::now);
        let fire_time = self
            .store
            .claim_manual_fire(s.id, now, request_id, &self.owner)
            .await?;
        if fire_time == now {
            self.complete(&s, fire_time).await;
        }
        let fire = self.store.get_fire(&s, fire_time).await?;
        let detail = Detail::Triggered {
            session: fire.session_id.map(berth_common::names::session_name),
            request_id: request_id.map(String::from),
        };
        self.record(project, by, Action::ScheduleTrigger, schedule_id, detail)
            .await;
        Ok(fire)
    }

    /// Creates the session of a claimed fire and records it. A transient
    /// failure leaves the fire open for the takeover sweep; any other is
    /// recorded as the fire's error.
    pub async fn complete(&self, s: &Schedule, fire_time: DateTime<Utc>) {
        let mut labels = s.labels.clone();
        labels.insert(SCHEDULE_LABEL.into(), s.schedule_id.clone());
        let tz = chrono_tz::Tz::from_str(&s.timezone).unwrap_or(chrono_tz::UTC);
        let new = NewSession::of_agent(
            &s.agent,
            s.input.clone(),
            labels,
            format!(
                "{} {}",
                s.schedule_id,
                fire_time.with_timezone(&tz).format("%Y-%m-%d %H:%M:%S %Z")
            ),
            format!("schedule/{}/{}", s.id, fire_time.timestamp_micros()),
        );
        let by = format!("schedules/{}", s.schedule_id);
        let origin = crate::ops::sessions::Origin::Schedule {
            fire_time: fire_time.to_rfc3339(),
            agent: s.agent.clone(),
        };
        let outcome = match self.sessions.create(&s.project, new, &by, origin).await {
            Ok(session) => {
                tracing::info!(schedule = %s.schedule_id, session_id = %session.id, %fire_time, "schedule fired");
                (Some(session.id), String::new())
            }
            Err(e) if e.is_transient() => {
                tracing::warn!(schedule = %s.schedule_id, error = %e, "schedule fire left for a retry");
                return;
            }
            Err(e) => {
                tracing::warn!(schedule = %s.schedule_id, error = %e, "schedule fire failed");
                (None, e.to_string())
            }
        };
        metrics::counter!(
            crate::metrics::SCHEDULE_FIRES,
            "outcome" => if outcome.0.is_some() { "session" } else { "error" }
        )
        .increment(1);
        if let Err(e) = self
            .store
            .record_fire(s.id, fire_time, outcome.0, &outcome.1)
            .await
        {
            tracing::warn!(schedule = %s.schedule_id, error = %e, "recording a fire failed; the takeover sweep completes it");
        }
    }
}

/// Fires due schedules: every dispatcher runs one.
pub(crate) struct Scheduler {
    pub schedules: Schedules,
    pub poll: Duration,
    pub window: Duration,
    /// A fire claimed this long ago and still without its session is taken
    /// over (its dispatcher is gone).
    pub takeover: Duration,
    pub shutdown: CancellationToken,
}

impl Scheduler {
    pub(crate) async fn run(self) {
        let mut tick = tokio::time::interval(self.poll);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = self.shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            if let Err(e) = self.fire_due().await {
                tracing::warn!(error = %e, "firing due schedules failed");
            }
            if let Err(e) = self.take_over().await {
                tracing::warn!(error = %e, "taking over open schedule fires failed");
            }
        }
    }

    async fn fire_due(&self) -> Result<()> {
        let store = &self.schedules.store;
        for s in store.due_schedules(32).await? {
            let Some(due) = s.next_fire_time else {
                continue;
            };
            let spec = match CronSpec::parse(&s.cron, &s.timezone) {
                Ok(spec) => spec,
                Err(e) => {
                    tracing::error!(schedule = %s.schedule_id, error = %e, "stored schedule no longer parses; suspending it");
                    store
                        .set_schedule_suspended(&s.project, &s.schedule_id, None)
                        .await?;
                    continue;
                }
            };
            let p = plan(&spec, due, Utc::now(), self.window);
            if !store.claim_fire(&s, due, &p, &self.schedules.owner).await? {
                continue; // another dispatcher fired it
            }
            if p.kind == FireKind::Missed {
                metrics::counter!(crate::metrics::SCHEDULE_FIRES, "outcome" => "missed")
                    .increment(1);
                tracing::warn!(schedule = %s.schedule_id, fire_time = %p.fire_time, skipped = p.skipped, "schedule fire missed beyond the catch-up window");
                continue;
            }
            self.schedules.complete(&s, p.fire_time).await;
        }
        Ok(())
    }

    async fn take_over(&self) -> Result<()> {
        let store = &self.schedules.store;
        for (s, fire_time) in store.open_fires(self.takeover, 16).await? {
            if store
                .take_over_fire(s.id, fire_time, self.takeover, &self.schedules.owner)
                .await?
            {
                tracing::info!(schedule = %s.schedule_id, %fire_time, "completing a fire another dispatcher left open");
                self.schedules.complete(&s, fire_time).await;
            }
        }
        Ok(())
    }
}

/// Checks a schedule's text fields.
pub(crate) fn check(new: &NewSchedule) -> Result<()> {
    use berth_common::spec::check_len;
    if !berth_common::names::is_agent_id(&new.schedule_id) {
        return Err(Error::invalid(
            "schedule_id",
            "1-63 lowercase letters, digits and `-`, starting with a letter",
        ));
    }
    check_len(
        "schedule.display_name",
        &new.display_name,
        limits::DISPLAY_NAME_CHARS,
    )?;
    if new.agent.is_empty() {
        return Err(Error::invalid(
            "schedule.agent",
            "required: `NAME` or `NAME@VERSION`",
        ));
    }
    if new.input.trim().is_empty() || new.input.len() > limits::MESSAGE_BYTES {
        return Err(Error::invalid(
            "schedule.input",
            format!(
                "must be non-blank and at most {} bytes",
                limits::MESSAGE_BYTES
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s)
            .expect("time")
            .with_timezone(&Utc)
    }

    #[test]
    fn cron_times_are_read_in_the_schedules_time_zone() {
        let spec = CronSpec::parse("0 9 * * *", "Asia/Tokyo").expect("valid");
        // 09:00 in Tokyo is 00:00 UTC.
        assert_eq!(
            spec.next_after(at("2026-11-26T12:00:00Z")),
            Some(at("2026-11-27T00:00:00Z"))
        );
        let paris = CronSpec::parse("0 9 * * MON-FRI", "Europe/Paris").expect("valid");
        // Friday 27 Nov 2026 09:00 CET = 08:00 UTC; then Monday 30 Nov.
        assert_eq!(
            paris.next_after(at("2026-11-26T09:00:00Z")),
            Some(at("2026-11-27T08:00:00Z"))
        );
        assert_eq!(
            paris.next_after(at("2026-11-27T08:00:00Z")),
            Some(at("2026-11-30T08:00:00Z"))
        );
    }

    #[test]
    fn bad_cron_and_time_zones_name_their_field() {
        for (cron, tz, field) in [
            ("61 * * * *", "UTC", "schedule.cron"),
            ("not cron", "UTC", "schedule.cron"),
            ("", "UTC", "schedule.cron"),
            ("0 9 * * *", "Mars/Olympus", "schedule.timezone"),
        ] {
            let e = CronSpec::parse(cron, tz).expect_err(cron);
            assert!(
                matches!(&e, Error::InvalidArgument { field: f, .. } if *f == field),
                "{cron} {tz}: {e}"
            );
        }
    }

    #[test]
    fn an_on_time_fire_is_cron_and_missed_ones_collapse_into_one_catch_up() {
        let spec = CronSpec::parse("0 * * * *", "UTC").expect("valid");
        let window = Duration::from_secs(3600);
        let p = plan(
            &spec,
            at("2026-11-26T10:00:00Z"),
            at("2026-11-26T10:00:01Z"),
            window,
        );
        assert_eq!(p.kind, FireKind::Cron);
        assert_eq!(p.fire_time, at("2026-11-26T10:00:00Z"));
        assert_eq!((p.skipped, p.next), (0, Some(at("2026-11-26T11:00:00Z"))));
        // Down from 10:00 to 13:30: 10, 11, 12 and 13 o'clock were missed;
        // 13:00 fires, three are skipped, and 14:00 is next.
        let p = plan(
            &spec,
            at("2026-11-26T10:00:00Z"),
            at("2026-11-26T13:30:00Z"),
            window,
        );
        assert_eq!(p.kind, FireKind::CatchUp);
        assert_eq!(p.fire_time, at("2026-11-26T13:00:00Z"));
        assert_eq!((p.skipped, p.next), (3, Some(at("2026-11-26T14:00:00Z"))));
        // Beyond the window: recorded as missed, no session.
        let p = plan(
            &spec,
            at("2026-11-26T10:00:00Z"),
            at("2026-11-26T13:30:00Z"),
            Duration::from_secs(600),
        );
        assert_eq!(p.kind, FireKind::Missed);
    }

    #[test]
    fn the_shortest_gap_spots_frequent_crons() {
        let now = at("2026-11-26T10:00:00Z");
        let every_second = CronSpec::parse("* * * * * *", "UTC").expect("valid");
        assert_eq!(
            every_second.shortest_gap(now, 4),
            Some(Duration::from_secs(1))
        );
        let twice_an_hour = CronSpec::parse("0,5 * * * *", "UTC").expect("valid");
        assert_eq!(
            twice_an_hour.shortest_gap(now, 4),
            Some(Duration::from_secs(300))
        );
    }
}
