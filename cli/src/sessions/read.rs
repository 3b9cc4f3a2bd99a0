//! Reading sessions: `list`, `search`, `get`.

use std::collections::HashMap;

use berth_proto::v1 as pb;

use super::Ctx;
use crate::output::line;
use crate::{CliError, render};

pub(super) async fn list(
    c: &mut Ctx<'_>,
    status: Option<String>,
    page_size: i32,
    page_token: String,
    waiting: bool,
) -> Result<(), CliError> {
    let status = match status {
        None => 0,
        Some(s) => render::parse_status(&s)
            .ok_or_else(|| CliError::new(format!("unknown status `{s}`")))?
            as i32,
    };
    let resp = c
        .client
        .list_sessions(pb::ListSessionsRequest {
            page_size,
            page_token,
            status,
            labels: HashMap::new(),
            activity: if waiting {
                pb::Activity::WaitingInput as i32
            } else {
                0
            },
        })
        .await
        .map_err(|s| c.explain(None, s))?
        .into_inner();
    c.out.list(
        &resp.sessions,
        |s| s.name.clone(),
        |o| render::session_table(o, &resp.sessions),
    )?;
    if c.out.machine() {
        return Ok(());
    }
    for s in &resp.sessions {
        for r in &s.pending_tool_requests {
            line(format!(
                "waiting: {} {} {} ({}): berth sessions approve|deny {} {}",
                s.id,
                r.tool_name,
                render::clip(&r.input_json, 80),
                r.reason,
                s.id,
                r.tool_use_id
            ))?;
        }
    }
    if !resp.next_page_token.is_empty() {
        eprintln!("(more: --page-token {})", resp.next_page_token);
    }
    Ok(())
}

pub(super) async fn search(c: &mut Ctx<'_>, query: String, limit: i32) -> Result<(), CliError> {
    let r = c
        .client
        .search_sessions(pb::SearchSessionsRequest {
            query,
            page_size: limit,
            page_token: String::new(),
        })
        .await
        .map_err(|e| c.explain(None, e))?
        .into_inner();
    c.out.list(
        &r.matches,
        |m| {
            m.session
                .as_ref()
                .map(|s| s.name.clone())
                .unwrap_or_default()
        },
        |o| {
            let mut t = o.table(&["ID", "NAME", "STATUS", "AGE", "MATCH"]);
            for m in &r.matches {
                let s = m.session.clone().unwrap_or_default();
                t.add_row(vec![
                    comfy_table::Cell::new(&s.id),
                    comfy_table::Cell::new(render::clip(&s.display_name, 40)),
                    o.status(&render::status_name(s.status)),
                    comfy_table::Cell::new(crate::output::age(&s.create_time)),
                    comfy_table::Cell::new(render::clip(&m.snippet, 80)),
                ]);
            }
            t
        },
    )
}

pub(super) async fn get(c: &mut Ctx<'_>, session: &str) -> Result<(), CliError> {
    let s = c
        .client
        .get_session(pb::GetSessionRequest {
            name: session.to_string(),
        })
        .await
        .map_err(|e| c.explain(Some(session), e))?
        .into_inner();
    c.out.object(&s, &s.name, || render::session_details(&s))
}
