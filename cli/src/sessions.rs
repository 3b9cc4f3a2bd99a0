//! `berth sessions …`: inspect and control sessions.

use std::collections::HashMap;

use berth_cli::auth::Api;
use berth_proto::v1::{self as pb, sessions_client::SessionsClient};
use clap::Subcommand;

use crate::output::{Format, Out, line};
use crate::{CliError, durable, explain, render};

#[derive(Subcommand)]
pub(crate) enum SessionsCmd {
    /// List sessions, newest first.
    List {
        /// Only sessions in this status (pending, running, idle, stopped, failed…).
        #[arg(long)]
        status: Option<String>,
        /// Sessions per page.
        #[arg(long, default_value_t = 50)]
        page_size: i32,
        /// Page token from a previous listing.
        #[arg(long, default_value = "")]
        page_token: String,
        /// Only sessions whose agent waits for a tool approval.
        #[arg(long)]
        waiting: bool,
    },
    /// Allow a tool call the agent asked permission for.
    Approve {
        session: String,
        /// The request's tool_use_id; may be left out when only one waits.
        tool_use_id: Option<String>,
        /// Also allow calls like it for the rest of the session.
        #[arg(long)]
        always: bool,
    },
    /// Refuse a tool call the agent asked permission for.
    Deny {
        session: String,
        /// The request's tool_use_id; may be left out when only one waits.
        tool_use_id: Option<String>,
        /// Told to the agent as the reason.
        #[arg(long, default_value = "Denied by the user.")]
        message: String,
    },
    /// Show one session.
    Get { session: String },
    /// Find sessions by the text of their messages (`"phrase"`, `or`, `-word`).
    Search {
        query: String,
        #[arg(long, default_value_t = 20)]
        limit: i32,
    },
    /// Rate a session (or one of its turns) 1-5, with a comment.
    Feedback {
        session: String,
        #[arg(long)]
        rating: i32,
        /// The turn rated; 0 (the default) rates the whole session.
        #[arg(long, default_value_t = 0)]
        turn: i64,
        #[arg(long, default_value = "")]
        comment: String,
    },
    /// Print a session's events.
    Events {
        session: String,
        /// Start after this seq.
        #[arg(long, default_value_t = 0)]
        after: i64,
        /// Keep following live events until the session stops running.
        #[arg(long, short)]
        follow: bool,
    },
    /// Send a user message.
    Send { session: String, text: String },
    /// Interrupt the current turn.
    Interrupt { session: String },
    /// Stop a session (its workspace is snapshotted; it stays resumable).
    /// Waits until it has stopped, unless --no-wait.
    Stop {
        session: String,
        #[command(flatten)]
        wait: Settle,
    },
    /// Snapshot a running or idle session and free its container. Waits
    /// until it is paused, unless --no-wait.
    Pause {
        session: String,
        #[command(flatten)]
        wait: Settle,
    },
    /// Run a paused or stopped session again, from its snapshot, on any node.
    Resume { session: String },
    /// Make a finished session read-only (events kept for the retention period).
    Archive { session: String },
    /// Delete a session that is not live, with its events, usage and snapshots.
    Delete { session: String },
    /// Create a new session with the same configuration and no history.
    Clone { session: String },
    /// Print the session as a Markdown transcript or as JSON.
    Export {
        session: String,
        #[arg(long, value_enum, default_value = "markdown")]
        format: durable::ExportFormatArg,
        /// Write to this file instead of stdout (`-o` is the output format).
        #[arg(long)]
        output_file: Option<String>,
    },
}

/// How long `stop` and `pause` wait for the session to get there.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct Settle {
    /// Return as soon as the request is taken, without waiting for the
    /// snapshot and the container's removal.
    #[arg(long)]
    no_wait: bool,
    /// Longest wait for the session to stop or pause (`30s`, `5m`).
    #[arg(long, value_parser = berth_common::time::parse_duration, default_value = "5m")]
    wait_timeout: std::time::Duration,
}

/// Runs one `berth sessions` command against dispatcher `d`.
pub(crate) async fn run(
    client: &mut SessionsClient<Api>,
    d: &str,
    out: Out,
    cmd: SessionsCmd,
) -> Result<(), CliError> {
    match cmd {
        SessionsCmd::Approve {
            session,
            tool_use_id,
            always,
        } => {
            let answer = if always {
                berth_cli::tools::Answer::Always
            } else {
                berth_cli::tools::Answer::Allow
            };
            answer_tool(client, d, out, &session, tool_use_id.as_deref(), answer, "").await
        }
        SessionsCmd::Deny {
            session,
            tool_use_id,
            message,
        } => {
            let answer = berth_cli::tools::Answer::Deny;
            answer_tool(
                client,
                d,
                out,
                &session,
                tool_use_id.as_deref(),
                answer,
                &message,
            )
            .await
        }
        SessionsCmd::List {
            status,
            page_size,
            page_token,
            waiting,
        } => {
            let status = match status {
                None => 0,
                Some(s) => render::parse_status(&s)
                    .ok_or_else(|| CliError::new(format!("unknown status `{s}`")))?
                    as i32,
            };
            let resp = client
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
                .map_err(|s| explain(d, None, s))?
                .into_inner();
            out.list(
                &resp.sessions,
                |s| s.name.clone(),
                |o| render::session_table(o, &resp.sessions),
            )?;
            if !out.machine() {
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
            }
            Ok(())
        }
        SessionsCmd::Search { query, limit } => {
            let r = client
                .search_sessions(pb::SearchSessionsRequest {
                    query,
                    page_size: limit,
                    page_token: String::new(),
                })
                .await
                .map_err(|e| explain(d, None, e))?
                .into_inner();
            out.list(
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
        SessionsCmd::Feedback {
            session,
            rating,
            turn,
            comment,
        } => {
            let f = client
                .submit_feedback(pb::SubmitFeedbackRequest {
                    name: session.clone(),
                    turn,
                    rating,
                    comment,
                })
                .await
                .map_err(|e| explain(d, Some(&session), e))?
                .into_inner();
            out.object(&f, &f.session, || {
                format!("rated {} turn {}: {}/5", f.session, f.turn, f.rating)
            })
        }
        SessionsCmd::Get { session } => {
            let s = client
                .get_session(pb::GetSessionRequest {
                    name: session.clone(),
                })
                .await
                .map_err(|e| explain(d, Some(&session), e))?
                .into_inner();
            out.object(&s, &s.name, || render::session_details(&s))
        }
        SessionsCmd::Events {
            session,
            after,
            follow,
        } => {
            if follow {
                let mut closed = None;
                berth_cli::follow::follow(client, &session, after, |e| match print_event(out, e) {
                    Ok(()) => true,
                    Err(e) => {
                        closed = Some(e);
                        false
                    }
                })
                .await
                .map_err(|e| explain(d, Some(&session), e))?;
                return closed.map_or(Ok(()), Err);
            }
            let mut token = String::new();
            loop {
                let resp = client
                    .list_events(pb::ListEventsRequest {
                        name: session.clone(),
                        after_seq: after,
                        page_size: 500,
                        page_token: token,
                    })
                    .await
                    .map_err(|e| explain(d, Some(&session), e))?
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
        SessionsCmd::Send { session, text } => {
            let r = client
                .send_message(pb::SendMessageRequest {
                    name: session.clone(),
                    text,
                })
                .await
                .map_err(|e| explain(d, Some(&session), e))?
                .into_inner();
            print_seq(out, "sent", r.seq)
        }
        SessionsCmd::Interrupt { session } => {
            let r = client
                .interrupt(pb::InterruptRequest {
                    name: session.clone(),
                })
                .await
                .map_err(|e| explain(d, Some(&session), e))?
                .into_inner();
            print_seq(out, "interrupted", r.seq)
        }
        SessionsCmd::Stop { session, wait } => {
            let r = client
                .stop_session(pb::StopSessionRequest {
                    name: session.clone(),
                })
                .await;
            let r = settle(client, &session, r, &wait).await;
            show_session(d, &session, out, r)
        }
        SessionsCmd::Pause { session, wait } => {
            let r = client
                .pause_session(pb::PauseSessionRequest {
                    name: session.clone(),
                })
                .await;
            let r = settle(client, &session, r, &wait).await;
            show_session(d, &session, out, r)
        }
        SessionsCmd::Resume { session } => {
            let r = client
                .resume_session(pb::ResumeSessionRequest {
                    name: session.clone(),
                })
                .await;
            show_session(d, &session, out, r)
        }
        SessionsCmd::Archive { session } => {
            let r = client
                .archive_session(pb::ArchiveSessionRequest {
                    name: session.clone(),
                })
                .await;
            show_session(d, &session, out, r)
        }
        SessionsCmd::Clone { session } => {
            let req = pb::CloneSessionRequest {
                name: session.clone(),
                request_id: uuid::Uuid::new_v4().to_string(),
            };
            let r = client.clone_session(req).await;
            show_session(d, &session, out, r)
        }
        SessionsCmd::Delete { session } => {
            let r = client
                .delete_session(pb::DeleteSessionRequest {
                    name: session.clone(),
                })
                .await
                .map_err(|e| explain(d, Some(&session), e))?
                .into_inner();
            out.object(&r, &session, || {
                format!(
                    "deleted {session} ({} stored objects removed)",
                    r.objects_deleted
                )
            })
        }
        SessionsCmd::Export {
            session,
            format,
            output_file,
        } => {
            let format = match format {
                durable::ExportFormatArg::Markdown => pb::ExportFormat::Markdown,
                durable::ExportFormatArg::Json => pb::ExportFormat::Json,
                durable::ExportFormatArg::Pdf => pb::ExportFormat::Pdf,
            };
            let r = client
                .export_session(pb::ExportSessionRequest {
                    name: session.clone(),
                    format: format as i32,
                })
                .await
                .map_err(|e| explain(d, Some(&session), e))?
                .into_inner();
            let bytes = if r.data.is_empty() {
                r.content.as_bytes()
            } else {
                r.data.as_slice()
            };
            match output_file {
                Some(path) => {
                    std::fs::write(&path, bytes)
                        .map_err(|e| CliError::new(format!("cannot write {path}: {e}")))?;
                    eprintln!("wrote {} bytes ({}) to {path}", bytes.len(), r.content_type);
                }
                None if !r.data.is_empty() => {
                    use std::io::Write;
                    if std::io::IsTerminal::is_terminal(&std::io::stdout()) {
                        return Err(CliError::new(
                            "a PDF is binary: write it with --output-file FILE, or redirect stdout",
                        ));
                    }
                    let mut out = std::io::stdout().lock();
                    out.write_all(bytes)
                        .and_then(|()| out.flush())
                        .map_err(|_| CliError::closed())?;
                }
                None => line(r.content.trim_end_matches('\n'))?,
            }
            Ok(())
        }
    }
}

/// Answers a session's tool permission request.
async fn answer_tool(
    client: &mut SessionsClient<Api>,
    d: &str,
    out: Out,
    session: &str,
    tool_use_id: Option<&str>,
    answer: berth_cli::tools::Answer,
    message: &str,
) -> Result<(), CliError> {
    let explain_ = |e| explain(d, Some(session), e);
    let id = berth_cli::tools::pending_request(client, session, tool_use_id)
        .await
        .map_err(explain_)?;
    let r = berth_cli::tools::confirm(client, session, &id, answer, message)
        .await
        .map_err(|e| explain(d, Some(session), e))?;
    out.object(&r, &id, || {
        if r.already_answered {
            format!("{id}: already answered the same way (seq {})", r.seq)
        } else {
            format!("{id}: answered (seq {})", r.seq)
        }
    })
}

/// Prints the session a control call returned, or explains its error.
/// Waits, after a stop or pause was taken, until the session is no longer
/// `stopping` (it has stopped or paused, or ended otherwise); polls, since
/// the change comes once the node has saved the snapshot.
async fn settle(
    client: &mut SessionsClient<Api>,
    session: &str,
    taken: Result<tonic::Response<pb::Session>, tonic::Status>,
    wait: &Settle,
) -> Result<tonic::Response<pb::Session>, tonic::Status> {
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
        s = client
            .get_session(pb::GetSessionRequest {
                name: session.to_string(),
            })
            .await?
            .into_inner();
    }
    Ok(tonic::Response::new(s))
}

fn show_session(
    d: &str,
    session: &str,
    out: Out,
    r: Result<tonic::Response<pb::Session>, tonic::Status>,
) -> Result<(), CliError> {
    let s = r.map_err(|e| explain(d, Some(session), e))?.into_inner();
    out.list(
        std::slice::from_ref(&s),
        |s| s.name.clone(),
        |o| render::session_table(o, std::slice::from_ref(&s)),
    )
}

/// Prints the seq a request was logged at.
fn print_seq(out: Out, verb: &str, seq: i64) -> Result<(), CliError> {
    let r = pb::SendMessageResponse { seq };
    out.object(&r, &seq.to_string(), || format!("{verb} (seq {seq})"))
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
