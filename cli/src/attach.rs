//! `berth attach`: follow a session and talk to it, like a chat. Each line
//! read is a user message; `y`/`n`/`a` answers a waiting tool request, and
//! the agent's questions are answered a line each (numbers or words).
//! Ctrl-C detaches; at the end of input, attach waits for the turn it
//! started, then detaches. The session keeps running either way.

use berth_cli::auth::Api;
use berth_cli::questions::Asking;
use berth_cli::tools::{self, Answer};
use berth_common::events as ev;
use berth_proto::v1::{self as pb, sessions_client::SessionsClient};
use clap::Args;
use tokio::io::AsyncBufReadExt;

use crate::output::Out;
use crate::sessions::print_event;
use crate::{CliError, explain, render};

#[derive(Args)]
pub(crate) struct AttachArgs {
    /// The session (ID or `sessions/ID`).
    session: String,
    /// Earlier events to show first.
    #[arg(long, default_value_t = 20)]
    tail: i64,
}

/// A tool request waiting for an answer.
struct Waiting {
    tool_use_id: String,
    tool_name: String,
    /// Set for the agent's questions: answered a line per question.
    question: Option<Asking>,
}

pub(crate) async fn run(
    client: &mut SessionsClient<Api>,
    d: &str,
    out: Out,
    a: AttachArgs,
) -> Result<(), CliError> {
    let s = client
        .get_session(pb::GetSessionRequest {
            name: a.session.clone(),
        })
        .await
        .map_err(|e| explain(d, Some(&a.session), e))?
        .into_inner();
    let id = s.id.clone();
    let detach_hint = format!(
        "detached; session {id} keeps running: `berth attach {id}` to come back, `berth sessions stop {id}` to end it"
    );
    if !out.machine() {
        eprintln!(
            "attached to session {id} ({}): type a message and press Enter; y/n/a answers a tool request; Ctrl-C detaches",
            render::status_name(s.status)
        );
    }
    let mut waiting: Option<Waiting> = s.pending_tool_requests.first().map(|r| Waiting {
        tool_use_id: r.tool_use_id.clone(),
        tool_name: r.tool_name.clone(),
        question: (r.tool_name == ev::ASK_USER_QUESTION)
            .then(|| serde_json::from_str(&r.input_json).ok())
            .flatten()
            .and_then(|input| Asking::new(r.tool_use_id.clone(), &input)),
    });
    if let Some(q) = waiting.as_ref().and_then(|w| w.question.as_ref()) {
        eprint!("{}", q.prompt());
    }

    // The event stream, from a task of its own (it reconnects through
    // dispatcher restarts).
    let (events_tx, mut events) = tokio::sync::mpsc::unbounded_channel();
    let mut follower = {
        let mut c = client.clone();
        let name = s.name.clone();
        let after = (s.last_seq - a.tail.max(0)).max(0);
        tokio::spawn(async move {
            berth_cli::follow::follow(&mut c, &name, after, |e| events_tx.send(e.clone()).is_ok())
                .await
        })
    };
    // Lines typed, from a task of its own (a read of stdin blocks).
    let (lines_tx, mut lines) = tokio::sync::mpsc::channel::<String>(16);
    tokio::spawn(async move {
        let mut stdin = tokio::io::BufReader::new(tokio::io::stdin()).lines();
        while let Ok(Some(line)) = stdin.next_line().await {
            if lines_tx.send(line).await.is_err() {
                break;
            }
        }
    });

    let mut input_open = true;
    // The seq of the last message sent whose turn has not ended yet.
    let mut turn_of: Option<i64> = None;
    loop {
        tokio::select! {
            e = events.recv() => {
                let Some(e) = e else {
                    // The stream ended: the session left its run.
                    let r = (&mut follower).await.map_err(|e| CliError::new(e.to_string()))?;
                    r.map_err(|e| explain(d, Some(&id), e))?;
                    if !out.machine() {
                        eprintln!("session {id} is no longer running; detached");
                    }
                    return Ok(());
                };
                print_event(out, &e)?;
                if track(&mut waiting, &mut turn_of, out, &e) && !input_open {
                    eprintln!("{detach_hint}");
                    return Ok(());
                }
            }
            line = lines.recv(), if input_open => {
                let Some(line) = line else {
                    input_open = false;
                    if turn_of.is_none() {
                        eprintln!("{detach_hint}");
                        return Ok(());
                    }
                    continue;
                };
                let text = line.trim();
                if text.is_empty() {
                    continue;
                }
                if let Some(q) = waiting.as_mut().and_then(|w| w.question.as_mut()) {
                    match q.take(text) {
                        Err(why) => eprint!("{why}\n{}", q.prompt()),
                        Ok(false) => eprint!("{}", q.prompt()),
                        Ok(true) => {
                            match client.answer_question(q.request(&s.name)).await {
                                Ok(_) => {}
                                Err(st) if matches!(st.code(), tonic::Code::FailedPrecondition | tonic::Code::InvalidArgument) => {
                                    eprintln!("{}: {}", q.tool_use_id, st.message());
                                }
                                Err(st) => return Err(explain(d, Some(&id), st)),
                            }
                            waiting = None;
                        }
                    }
                    continue;
                }
                if let (Some(w), Some(answer)) = (&waiting, tools::parse_answer(text)) {
                    let message = if answer == Answer::Deny { "Denied by the user." } else { "" };
                    match tools::confirm(client, &id, &w.tool_use_id, answer, message).await {
                        Ok(_) => {}
                        Err(st) if st.code() == tonic::Code::FailedPrecondition => {
                            eprintln!("{} ({}): {}", w.tool_name, w.tool_use_id, st.message());
                        }
                        Err(st) => return Err(explain(d, Some(&id), st)),
                    }
                    waiting = None;
                    continue;
                }
                let r = client
                    .send_message(pb::SendMessageRequest { name: s.name.clone(), text: text.to_string(), ..Default::default() })
                    .await
                    .map_err(|e| explain(d, Some(&id), e))?
                    .into_inner();
                turn_of = Some(r.seq);
            }
            _ = tokio::signal::ctrl_c() => {
                eprintln!("\n{detach_hint}");
                return Ok(());
            }
        }
    }
}

/// Follows what an event changes: the request that waits for an answer,
/// and the turn in flight. True when that turn has just ended.
fn track(
    waiting: &mut Option<Waiting>,
    turn_of: &mut Option<i64>,
    out: Out,
    e: &pb::Event,
) -> bool {
    match e.r#type.as_str() {
        ev::AGENT_TOOL_PERMISSION => {
            let p: ev::payload::ToolPermission =
                ev::payload::parse(&e.payload_json).unwrap_or_default();
            if !out.machine() {
                eprintln!("  answer: y (allow) / n (deny) / a (always allow)");
            }
            *waiting = Some(Waiting {
                tool_use_id: p.tool_use_id,
                tool_name: p.tool_name,
                question: None,
            });
            false
        }
        ev::AGENT_QUESTION => {
            let question = Asking::from_event(e);
            if let Some(q) = &question {
                eprint!("{}", q.prompt());
            }
            *waiting = question.map(|q| Waiting {
                tool_use_id: q.tool_use_id.clone(),
                tool_name: ev::ASK_USER_QUESTION.into(),
                question: Some(q),
            });
            false
        }
        ev::USER_TOOL_CONFIRMATION | ev::AGENT_TOOL_PERMISSION_CANCELLED => {
            let p: ev::payload::ToolPermission =
                ev::payload::parse(&e.payload_json).unwrap_or_default();
            if waiting
                .as_ref()
                .is_some_and(|w| w.tool_use_id == p.tool_use_id)
            {
                *waiting = None;
            }
            false
        }
        ev::SESSION_USAGE if turn_of.is_some_and(|seq| e.seq > seq) => {
            *turn_of = None;
            true
        }
        _ => false,
    }
}
