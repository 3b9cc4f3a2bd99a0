//! `berth.v1.Schedules`.

use berth_common::time::to_timestamp;
use berth_proto::v1::{self as pb, schedules_server::Schedules as SchedulesApi};
use tonic::{Request, Response, Status};

use super::pages::{self, page_size};
use crate::access::auth::caller;
use crate::error::Error;
use crate::ops::schedules::{self, Fire, FireKind, NewSchedule, Schedule, Schedules};

/// Serves `berth.v1.Schedules`.
#[derive(Clone)]
pub struct SchedulesService {
    pub(crate) schedules: Schedules,
}

const PREFIX: &str = "schedules/";

/// The id in `schedules/{id}` or a bare id.
fn schedule_id(name: &str) -> Result<&str, Error> {
    let id = name.strip_prefix(PREFIX).unwrap_or(name);
    if id.is_empty() {
        return Err(Error::invalid(
            "name",
            "required: `schedules/{id}` or the id",
        ));
    }
    Ok(id)
}

fn fire_kind(k: FireKind) -> pb::ScheduleFireKind {
    match k {
        FireKind::Cron => pb::ScheduleFireKind::Cron,
        FireKind::CatchUp => pb::ScheduleFireKind::CatchUp,
        FireKind::Manual => pb::ScheduleFireKind::Manual,
        FireKind::Missed => pb::ScheduleFireKind::Missed,
    }
}

impl From<Schedule> for pb::Schedule {
    fn from(s: Schedule) -> Self {
        Self {
            name: format!("{PREFIX}{}", s.schedule_id),
            schedule_id: s.schedule_id,
            display_name: s.display_name,
            agent: s.agent,
            cron: s.cron,
            timezone: s.timezone,
            input: s.input,
            labels: s.labels.into_iter().collect(),
            suspended: s.suspended,
            next_fire_time: s.next_fire_time.map(to_timestamp),
            last_fire_time: s.last_fire_time.map(to_timestamp),
            create_time: Some(to_timestamp(s.create_time)),
            creator: s.creator,
        }
    }
}

impl From<Fire> for pb::ScheduleFire {
    fn from(f: Fire) -> Self {
        Self {
            schedule: format!("{PREFIX}{}", f.schedule_id),
            fire_time: Some(to_timestamp(f.fire_time)),
            kind: fire_kind(f.kind) as i32,
            session: f
                .session_id
                .map(berth_common::names::session_name)
                .unwrap_or_default(),
            error: f.error,
            skipped: f.skipped,
            dispatcher: f.dispatcher,
            create_time: Some(to_timestamp(f.create_time)),
        }
    }
}

impl SchedulesService {}

#[tonic::async_trait]
impl SchedulesApi for SchedulesService {
    async fn create_schedule(
        &self,
        r: Request<pb::CreateScheduleRequest>,
    ) -> Result<Response<pb::Schedule>, Status> {
        let who = caller(&r)?;
        let r = r.into_inner();
        let s = r.schedule.unwrap_or_default();
        let new = NewSchedule {
            schedule_id: r.schedule_id,
            display_name: s.display_name,
            agent: s.agent,
            cron: s.cron,
            timezone: s.timezone,
            input: s.input,
            labels: super::convert::labels(s.labels)?,
            suspended: s.suspended,
        };
        schedules::check(&new)?;
        let created = self
            .schedules
            .create(&who.project, &who.identity(), new)
            .await?;
        Ok(Response::new(created.into()))
    }

    async fn get_schedule(
        &self,
        r: Request<pb::GetScheduleRequest>,
    ) -> Result<Response<pb::Schedule>, Status> {
        let who = caller(&r)?;
        let id = schedule_id(&r.get_ref().name)?;
        Ok(Response::new(
            self.schedules.get(&who.project, id).await?.into(),
        ))
    }

    async fn list_schedules(
        &self,
        r: Request<pb::ListSchedulesRequest>,
    ) -> Result<Response<pb::ListSchedulesResponse>, Status> {
        let who = caller(&r)?;
        let r = r.into_inner();
        let limit = page_size(r.page_size, 100)?;
        let listing = format!("ListSchedules\n{}", who.project);
        let after = pages::parse_time_id_cursor(pages::decode(&r.page_token, &listing)?)?;
        let found = self.schedules.list(&who.project, after, limit).await?;
        let next_page_token = match found.last() {
            Some(last) if found.len() as i64 == limit => {
                pages::encode(&listing, &pages::time_id_cursor(last.create_time, last.id))
            }
            _ => String::new(),
        };
        Ok(Response::new(pb::ListSchedulesResponse {
            schedules: found.into_iter().map(Into::into).collect(),
            next_page_token,
        }))
    }

    async fn suspend_schedule(
        &self,
        r: Request<pb::SuspendScheduleRequest>,
    ) -> Result<Response<pb::Schedule>, Status> {
        let who = caller(&r)?;
        let id = schedule_id(&r.get_ref().name)?;
        let s = self
            .schedules
            .suspend(&who.project, id, &who.identity())
            .await?;
        Ok(Response::new(s.into()))
    }

    async fn resume_schedule(
        &self,
        r: Request<pb::ResumeScheduleRequest>,
    ) -> Result<Response<pb::Schedule>, Status> {
        let who = caller(&r)?;
        let id = schedule_id(&r.get_ref().name)?;
        let s = self
            .schedules
            .resume(&who.project, id, &who.identity())
            .await?;
        Ok(Response::new(s.into()))
    }

    async fn trigger_schedule(
        &self,
        r: Request<pb::TriggerScheduleRequest>,
    ) -> Result<Response<pb::ScheduleFire>, Status> {
        let who = caller(&r)?;
        let r = r.into_inner();
        let id = schedule_id(&r.name)?;
        berth_common::spec::check_len(
            "request_id",
            &r.request_id,
            crate::session::limits::REQUEST_ID_CHARS,
        )
        .map_err(Error::from)?;
        let request_id = Some(r.request_id.as_str()).filter(|s| !s.is_empty());
        let fire = self
            .schedules
            .trigger(&who.project, id, request_id, &who.identity())
            .await?;
        Ok(Response::new(fire.into()))
    }

    async fn delete_schedule(
        &self,
        r: Request<pb::DeleteScheduleRequest>,
    ) -> Result<Response<pb::DeleteScheduleResponse>, Status> {
        let who = caller(&r)?;
        let id = schedule_id(&r.get_ref().name)?;
        self.schedules
            .delete(&who.project, id, &who.identity())
            .await?;
        Ok(Response::new(pb::DeleteScheduleResponse {}))
    }

    async fn list_schedule_fires(
        &self,
        r: Request<pb::ListScheduleFiresRequest>,
    ) -> Result<Response<pb::ListScheduleFiresResponse>, Status> {
        let who = caller(&r)?;
        let r = r.into_inner();
        let id = schedule_id(&r.name)?;
        let limit = page_size(r.page_size, 100)?;
        let listing = format!("ListScheduleFires\n{}\n{id}", who.project);
        let before = pages::parse_time_cursor(pages::decode(&r.page_token, &listing)?)?;
        let fires = self
            .schedules
            .fires(&who.project, id, before, limit)
            .await?;
        let next_page_token = match fires.last() {
            Some(last) if fires.len() as i64 == limit => {
                pages::encode(&listing, &last.fire_time.timestamp_micros().to_string())
            }
            _ => String::new(),
        };
        Ok(Response::new(pb::ListScheduleFiresResponse {
            fires: fires.into_iter().map(Into::into).collect(),
            next_page_token,
        }))
    }
}
