//! `berth schedules …`: cron-driven sessions of an agent.

use berth_cli::auth::Api;
use berth_proto::v1::{self as pb, schedules_client::SchedulesClient};
use clap::Subcommand;
use comfy_table::Cell;

use crate::output::{Out, age, line};
use crate::render::dash;
use crate::{CliError, explain, key_value};

#[derive(Subcommand)]
pub(crate) enum SchedulesCmd {
    /// Create a schedule: each fire runs a fresh session of AGENT with INPUT
    /// as its first message.
    Create {
        /// 1-63 lowercase letters, digits and `-`.
        id: String,
        /// The agent: NAME (its latest version at each fire) or NAME@VERSION.
        #[arg(long)]
        agent: String,
        /// Cron: five fields (`0 9 * * MON-FRI`) or six with seconds first.
        #[arg(long)]
        cron: String,
        /// IANA time zone the cron is read in (e.g. Europe/Paris).
        #[arg(long, default_value = "UTC")]
        timezone: String,
        /// Each fire's first message.
        #[arg(long)]
        input: String,
        #[arg(long, default_value = "")]
        display_name: String,
        /// Label of each session, KEY=VALUE (repeatable).
        #[arg(long = "label", value_parser = key_value)]
        labels: Vec<(String, String)>,
        /// Create it suspended.
        #[arg(long)]
        suspended: bool,
    },
    /// List schedules.
    List,
    /// Show one schedule.
    Get { schedule: String },
    /// Stop firing until resumed (fires due meanwhile are not made up).
    Suspend { schedule: String },
    /// Fire again from the next cron time.
    Resume { schedule: String },
    /// Fire now, once.
    Trigger { schedule: String },
    /// Delete a schedule and its history (its sessions stay).
    Delete { schedule: String },
    /// A schedule's fires, newest first.
    Fires {
        schedule: String,
        #[arg(long, default_value_t = 50)]
        limit: i32,
    },
}

fn schedule_table(out: &Out, schedules: &[pb::Schedule]) -> comfy_table::Table {
    let mut header = vec![
        "ID",
        "AGENT",
        "CRON",
        "TIMEZONE",
        "STATE",
        "NEXT FIRE",
        "AGE",
    ];
    if out.wide() {
        header.extend(["LAST FIRE", "CREATOR", "INPUT"]);
    }
    let mut t = out.table(&header);
    for s in schedules {
        let mut row = vec![
            Cell::new(&s.schedule_id),
            Cell::new(&s.agent),
            Cell::new(&s.cron),
            Cell::new(&s.timezone),
            out.status(if s.suspended { "paused" } else { "active" }),
            Cell::new(dash(&crate::render::time(&s.next_fire_time))),
            Cell::new(age(&s.create_time)),
        ];
        if out.wide() {
            row.extend([
                Cell::new(dash(&crate::render::time(&s.last_fire_time))),
                Cell::new(&s.creator),
                Cell::new(crate::render::clip(&s.input, 60)),
            ]);
        }
        t.add_row(row);
    }
    t
}

fn fire_table(out: &Out, fires: &[pb::ScheduleFire]) -> comfy_table::Table {
    let mut t = out.table(&[
        "FIRE TIME",
        "KIND",
        "SESSION",
        "SKIPPED",
        "DISPATCHER",
        "ERROR",
    ]);
    for f in fires {
        let kind = pb::ScheduleFireKind::try_from(f.kind)
            .map(|k| {
                k.as_str_name()
                    .trim_start_matches("SCHEDULE_FIRE_KIND_")
                    .to_lowercase()
            })
            .unwrap_or_default();
        t.add_row(vec![
            Cell::new(crate::render::time(&f.fire_time)),
            Cell::new(kind),
            Cell::new(dash(f.session.trim_start_matches("sessions/"))),
            Cell::new(f.skipped),
            Cell::new(&f.dispatcher),
            Cell::new(dash(&f.error)),
        ]);
    }
    t
}

pub(crate) async fn run(api: Api, d: &str, out: Out, cmd: SchedulesCmd) -> Result<(), CliError> {
    let mut c = SchedulesClient::new(api);
    let e = |s| explain(d, None, s);
    let one = |s: pb::Schedule| -> Result<(), CliError> {
        let list = [s];
        out.list(&list, |s| s.name.clone(), |o| schedule_table(o, &list))
    };
    match cmd {
        SchedulesCmd::Create {
            id,
            agent,
            cron,
            timezone,
            input,
            display_name,
            labels,
            suspended,
        } => {
            let s = c
                .create_schedule(pb::CreateScheduleRequest {
                    schedule_id: id,
                    schedule: Some(pb::Schedule {
                        agent,
                        cron,
                        timezone,
                        input,
                        display_name,
                        labels: labels.into_iter().collect(),
                        suspended,
                        ..Default::default()
                    }),
                })
                .await
                .map_err(e)?
                .into_inner();
            one(s)
        }
        SchedulesCmd::List => {
            let mut token = String::new();
            let mut all = Vec::new();
            loop {
                let r = c
                    .list_schedules(pb::ListSchedulesRequest {
                        page_size: 500,
                        page_token: token,
                    })
                    .await
                    .map_err(e)?
                    .into_inner();
                all.extend(r.schedules);
                if r.next_page_token.is_empty() {
                    break;
                }
                token = r.next_page_token;
            }
            out.list(&all, |s| s.name.clone(), |o| schedule_table(o, &all))
        }
        SchedulesCmd::Get { schedule } => one(c
            .get_schedule(pb::GetScheduleRequest { name: schedule })
            .await
            .map_err(e)?
            .into_inner()),
        SchedulesCmd::Suspend { schedule } => one(c
            .suspend_schedule(pb::SuspendScheduleRequest { name: schedule })
            .await
            .map_err(e)?
            .into_inner()),
        SchedulesCmd::Resume { schedule } => one(c
            .resume_schedule(pb::ResumeScheduleRequest { name: schedule })
            .await
            .map_err(e)?
            .into_inner()),
        SchedulesCmd::Trigger { schedule } => {
            let f = c
                .trigger_schedule(pb::TriggerScheduleRequest {
                    name: schedule,
                    request_id: uuid::Uuid::new_v4().to_string(),
                })
                .await
                .map_err(e)?
                .into_inner();
            let list = [f];
            out.list(&list, |f| f.session.clone(), |o| fire_table(o, &list))
        }
        SchedulesCmd::Delete { schedule } => {
            c.delete_schedule(pb::DeleteScheduleRequest {
                name: schedule.clone(),
            })
            .await
            .map_err(e)?;
            line(format!("deleted {schedule}"))
        }
        SchedulesCmd::Fires { schedule, limit } => {
            let r = c
                .list_schedule_fires(pb::ListScheduleFiresRequest {
                    name: schedule,
                    page_size: limit,
                    page_token: String::new(),
                })
                .await
                .map_err(e)?
                .into_inner();
            out.list(&r.fires, |f| f.session.clone(), |o| fire_table(o, &r.fires))
        }
    }
}
