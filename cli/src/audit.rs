//! `berth audit`: who did what, oldest first.

use berth_cli::auth::Api;
use berth_proto::v1::{self as pb, audit_client::AuditClient};
use clap::Args;
use comfy_table::Cell;

use crate::output::Out;
use crate::{CliError, explain};

#[derive(Args)]
pub(crate) struct AuditArgs {
    /// Only events about this resource: a session id, `sessions/ID`,
    /// `schedules/ID`, `webhooks/ID`, `agents/ID`, `keys/ID`…
    resource: Option<String>,
    /// At most this many events.
    #[arg(long, default_value_t = 1000)]
    limit: usize,
}

pub(crate) async fn run(api: Api, d: &str, out: Out, a: AuditArgs) -> Result<(), CliError> {
    let mut c = AuditClient::new(api);
    let mut events = Vec::new();
    let mut token = String::new();
    loop {
        let r = c
            .list_audit_events(pb::ListAuditEventsRequest {
                resource: a.resource.clone().unwrap_or_default(),
                page_size: 1000,
                page_token: token,
            })
            .await
            .map_err(|s| explain(d, None, s))?
            .into_inner();
        events.extend(r.events);
        if r.next_page_token.is_empty() || events.len() >= a.limit {
            break;
        }
        token = r.next_page_token;
    }
    events.truncate(a.limit);
    out.list(
        &events,
        |e| format!("audit/{}", e.id),
        |o| {
            let mut t = o.table(&["TIME", "IDENTITY", "ACTION", "RESOURCE", "DETAIL"]);
            for e in &events {
                t.add_row(vec![
                    Cell::new(crate::render::time(&e.time)),
                    Cell::new(&e.identity),
                    Cell::new(&e.action),
                    Cell::new(&e.resource),
                    Cell::new(crate::render::clip(&e.detail_json, 80)),
                ]);
            }
            t
        },
    )
}
