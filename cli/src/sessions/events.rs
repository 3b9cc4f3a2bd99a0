//! `berth sessions events`: a session's events, paged or followed live.

use berth_proto::v1 as pb;

use super::Ctx;
use crate::output::{Format, Out, line};
use crate::{CliError, render};

pub(super) async fn print(
    c: &mut Ctx<'_>,
    session: &str,
    after: i64,
    follow: bool,
) -> Result<(), CliError> {
    let out = c.out;
    if follow {
        let mut closed = None;
        berth_cli::follow::follow(c.client, session, after, |e| match print_event(out, e) {
            Ok(()) => true,
            Err(e) => {
                closed = Some(e);
                false
            }
        })
        .await
        .map_err(|e| c.explain(Some(session), e))?;
        return closed.map_or(Ok(()), Err);
    }
    let mut token = String::new();
    loop {
        let resp = c
            .client
            .list_events(pb::ListEventsRequest {
                name: session.to_string(),
                after_seq: after,
                page_size: 500,
                page_token: token,
            })
            .await
            .map_err(|e| c.explain(Some(session), e))?
            .into_inner();
        for e in &resp.events {
            print_event(out, e)?;
        }
        if resp.next_page_token.is_empty() {
            return Ok(());
        }
        token = resp.next_page_token;
    }
}

/// Prints one event: its readable line (bookkeeping events print nothing),
/// proto3 JSON or YAML, or its `sessions/{id}/events/{seq}` name.
pub(crate) fn print_event(out: Out, e: &pb::Event) -> Result<(), CliError> {
    match out.format {
        Format::Table | Format::Wide => match render::event_text(e) {
            Some(text) => line(text),
            None => Ok(()),
        },
        _ => out.object(
            e,
            &format!("sessions/{}/events/{}", e.session_id, e.seq),
            String::new,
        ),
    }
}
