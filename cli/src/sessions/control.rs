//! Steering and controlling a session: messages, interrupts, tool answers,
//! feedback, and its life (stop, pause, resume, archive, clone, delete).

use berth_proto::v1 as pb;

use super::{Ctx, Settle};
use crate::CliError;

type Reply = Result<tonic::Response<pb::Session>, tonic::Status>;

/// Answers a session's tool permission request.
pub(super) async fn answer_tool(
    c: &mut Ctx<'_>,
    session: &str,
    tool_use_id: Option<&str>,
    answer: berth_cli::tools::Answer,
    message: &str,
) -> Result<(), CliError> {
    let id = berth_cli::tools::pending_request(c.client, session, tool_use_id)
        .await
        .map_err(|e| c.explain(Some(session), e))?;
    let r = berth_cli::tools::confirm(c.client, session, &id, answer, message)
        .await
        .map_err(|e| c.explain(Some(session), e))?;
    c.out.object(&r, &id, || {
        if r.already_answered {
            format!("{id}: already answered the same way (seq {})", r.seq)
        } else {
            format!("{id}: answered (seq {})", r.seq)
        }
    })
}

pub(super) async fn feedback(
    c: &mut Ctx<'_>,
    session: &str,
    rating: i32,
    turn: i64,
    comment: String,
) -> Result<(), CliError> {
    let f = c
        .client
        .submit_feedback(pb::SubmitFeedbackRequest {
            name: session.to_string(),
            turn,
            rating,
            comment,
        })
        .await
        .map_err(|e| c.explain(Some(session), e))?
        .into_inner();
    c.out.object(&f, &f.session, || {
        format!("rated {} turn {}: {}/5", f.session, f.turn, f.rating)
    })
}

pub(super) async fn send(c: &mut Ctx<'_>, session: &str, text: String) -> Result<(), CliError> {
    let r = c
        .client
        .send_message(pb::SendMessageRequest {
            name: session.to_string(),
            text,
            ..Default::default()
        })
        .await
        .map_err(|e| c.explain(Some(session), e))?
        .into_inner();
    print_seq(c, "sent", r.seq)
}

pub(super) async fn interrupt(c: &mut Ctx<'_>, session: &str) -> Result<(), CliError> {
    let r = c
        .client
        .interrupt(pb::InterruptRequest {
            name: session.to_string(),
        })
        .await
        .map_err(|e| c.explain(Some(session), e))?
        .into_inner();
    print_seq(c, "interrupted", r.seq)
}

/// Stops (or pauses) the session, and waits as `wait` says.
pub(super) async fn stop(
    c: &mut Ctx<'_>,
    session: &str,
    wait: &Settle,
    pause: bool,
) -> Result<(), CliError> {
    let name = session.to_string();
    let r = if pause {
        c.client
            .pause_session(pb::PauseSessionRequest { name })
            .await
    } else {
        c.client.stop_session(pb::StopSessionRequest { name }).await
    };
    let r = settle(c, session, r, wait).await;
    show_session(c, session, r)
}

pub(super) async fn resume(c: &mut Ctx<'_>, session: &str) -> Result<(), CliError> {
    let name = session.to_string();
    let r = c
        .client
        .resume_session(pb::ResumeSessionRequest { name })
        .await;
    show_session(c, session, r)
}

pub(super) async fn archive(c: &mut Ctx<'_>, session: &str) -> Result<(), CliError> {
    let name = session.to_string();
    let r = c
        .client
        .archive_session(pb::ArchiveSessionRequest { name })
        .await;
    show_session(c, session, r)
}

pub(super) async fn clone(c: &mut Ctx<'_>, session: &str) -> Result<(), CliError> {
    let req = pb::CloneSessionRequest {
        name: session.to_string(),
        request_id: uuid::Uuid::new_v4().to_string(),
    };
    let r = c.client.clone_session(req).await;
    show_session(c, session, r)
}

pub(super) async fn delete(c: &mut Ctx<'_>, session: &str) -> Result<(), CliError> {
    let r = c
        .client
        .delete_session(pb::DeleteSessionRequest {
            name: session.to_string(),
        })
        .await
        .map_err(|e| c.explain(Some(session), e))?
        .into_inner();
    c.out.object(&r, session, || {
        format!(
            "deleted {session} ({} stored objects removed)",
            r.objects_deleted
        )
    })
}

/// Waits, after a stop or pause was taken, until the session is no longer
/// `stopping` (it has stopped or paused, or ended otherwise); polls, since
/// the change comes once the node has saved the snapshot.
async fn settle(c: &mut Ctx<'_>, session: &str, taken: Reply, wait: &Settle) -> Reply {
    let mut s = taken?.into_inner();
    let deadline = tokio::time::Instant::now() + wait.wait_timeout;
    while !wait.no_wait && s.status == pb::SessionStatus::Stopping as i32 {
        if tokio::time::Instant::now() >= deadline {
            eprintln!(
                "{session} is still stopping after {}; `berth sessions get {session}` shows when it ends",
                humantime::format_duration(wait.wait_timeout)
            );
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        s = c
            .client
            .get_session(pb::GetSessionRequest {
                name: session.to_string(),
            })
            .await?
            .into_inner();
    }
    Ok(tonic::Response::new(s))
}

/// Prints the session a control call returned, or explains its error.
fn show_session(c: &Ctx<'_>, session: &str, r: Reply) -> Result<(), CliError> {
    let s = r.map_err(|e| c.explain(Some(session), e))?.into_inner();
    c.out.list(
        std::slice::from_ref(&s),
        |s| s.name.clone(),
        |o| crate::render::session_table(o, std::slice::from_ref(&s)),
    )
}

/// Prints the seq a request was logged at.
fn print_seq(c: &Ctx<'_>, verb: &str, seq: i64) -> Result<(), CliError> {
    let r = pb::SendMessageResponse { seq };
    c.out
        .object(&r, &seq.to_string(), || format!("{verb} (seq {seq})"))
}
