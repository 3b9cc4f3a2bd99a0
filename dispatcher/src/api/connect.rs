//! `Sessions/Connect`: one bidirectional stream per session. The first
//! request opens it (`open`: the session, and where to start its events);
//! then the session's events flow out while commands flow in, each answered
//! by an ack carrying the caller's `ref`. A message that cannot be decoded
//! ends the stream with the caller's error (INVALID_ARGUMENT or
//! RESOURCE_EXHAUSTED), as a unary call's would.

use berth_proto::v1::{self as pb, connect_request::Kind};
use futures::StreamExt;
use tonic::{Request, Response, Status, Streaming};
use uuid::Uuid;

use super::BoxStream;
use super::convert::{self, session_id};
use super::steer::Steer;
use crate::access::auth::{Authenticator, caller};
use crate::access::revocations::{end_when_revoked, key_revoked};
use crate::error::{Error, Result};
use crate::ops::sessions::Sessions;

/// The status an inbound stream's error ends the call with.
fn inbound_error(status: Status) -> Status {
    berth_common::grpc::callers_decode_error(&status).unwrap_or(status)
}

/// What a Connect stream works with.
pub(super) struct Connect<'a> {
    pub sessions: &'a Sessions,
    /// Ends the stream's command side on shutdown (its event side ends by
    /// itself).
    pub shutdown: &'a tokio_util::sync::CancellationToken,
    /// Ends a revoked key's stream.
    pub auth: &'a std::sync::Arc<Authenticator>,
    /// Owns the commands in progress.
    pub tasks: &'a tokio_util::task::TaskTracker,
}

pub(super) async fn connect(
    svc: Connect<'_>,
    r: Request<Streaming<pb::ConnectRequest>>,
) -> std::result::Result<Response<BoxStream<pb::ConnectResponse>>, Status> {
    let who = caller(&r)?;
    let mut inbound = r.into_inner();
    let open = match inbound.message().await.map_err(inbound_error)? {
        Some(pb::ConnectRequest {
            kind: Some(Kind::Open(open)),
        }) => open,
        _ => {
            return Err(Error::invalid("open", "Connect: the first request must be `open`").into());
        }
    };
    let id = session_id(&open.name)?;
    let events = svc
        .sessions
        .stream(&who.project, id, open.after_seq)
        .await?;
    let duplex = Duplex {
        id,
        events: Some(events),
        inbound: Some(inbound),
        sessions: svc.sessions.clone(),
        project: who.project.clone(),
        identity: who.identity(),
        shutdown: svc.shutdown.clone(),
        tasks: svc.tasks.clone(),
        revoked: Box::pin(key_revoked(svc.auth.clone(), &who)),
        _open: crate::metrics::StreamGauge::open("connect"),
    };
    let out = futures::stream::unfold(duplex, |mut d| async move {
        let item = d.next().await?;
        Some((item, d))
    });
    let stream = end_when_revoked(svc.auth.clone(), &who, Box::pin(out));
    Ok(Response::new(stream))
}

/// One Connect stream: the session's events out, commands in, each
/// answered by an ack on the way out.
///
/// Commands are read as the response is polled: a held stream costs no
/// task and no channel of its own. Each command runs on a task while it
/// is carried out.
struct Duplex {
    id: Uuid,
    /// `None` once the session's events ended (its run ended).
    events: Option<crate::log::Follow>,
    /// `None` once no more commands come: the client closed its side, sent
    /// what could not be decoded, its key was revoked, or this dispatcher
    /// is shutting down.
    inbound: Option<Streaming<pb::ConnectRequest>>,
    sessions: Sessions,
    project: String,
    identity: String,
    shutdown: tokio_util::sync::CancellationToken,
    tasks: tokio_util::task::TaskTracker,
    revoked: std::pin::Pin<Box<dyn Future<Output = ()> + Send>>,
    /// Counted while the client holds the stream open.
    _open: crate::metrics::StreamGauge,
}

impl Duplex {
    /// The next response: an event, or a command's ack. `None` once both
    /// sides are done.
    async fn next(&mut self) -> Option<std::result::Result<pb::ConnectResponse, Status>> {
        loop {
            let commands = self.inbound.is_some();
            if self.events.is_none() && !commands {
                return None;
            }
            tokio::select! {
                item = next_event(&mut self.events) => match item {
                    Some(item) => return Some(
                        item.map(|e| pb::ConnectResponse {
                            kind: Some(pb::connect_response::Kind::Event(pb::Event::from(&*e))),
                        })
                        .map_err(|e| Status::from(*e)),
                    ),
                    None => self.events = None,
                },
                m = next_command(&mut self.inbound) => match m {
                    Ok(Some(req)) => return Some(Ok(self.command(req.kind).await)),
                    Ok(None) => self.inbound = None,
                    Err(status) => {
                        self.inbound = None;
                        return Some(Err(inbound_error(status)));
                    }
                },
                () = self.shutdown.cancelled(), if commands => self.inbound = None,
                // The key was revoked: no more commands (the events side
                // ends with UNAUTHENTICATED).
                () = &mut self.revoked, if commands => self.inbound = None,
            }
        }
    }

    /// Carries out a command on a task of its own, and answers with its
    /// ack. A command holds database connections while it runs: it must
    /// not wait for this stream to be polled again (a client that stops
    /// reading would keep them), nor be lost when the client leaves.
    fn command(&self, kind: Option<Kind>) -> impl Future<Output = pb::ConnectResponse> + use<> {
        let (sessions, project) = (self.sessions.clone(), self.project.clone());
        let (identity, id) = (self.identity.clone(), self.id);
        let reference = reference(&kind);
        let task = self.tasks.spawn(async move {
            let steer = Steer {
                sessions: &sessions,
                project: &project,
                identity,
            };
            ack(&steer, id, kind).await
        });
        async move {
            let ack = task.await.unwrap_or_else(|e| pb::ConnectAck {
                r#ref: reference,
                code: tonic::Code::Internal as i32,
                message: format!(
                    "the dispatcher failed while carrying out this command ({e}); it may or may not \
                     have been applied: read the session's events before sending it again"
                ),
                seq: 0,
            });
            pb::ConnectResponse {
                kind: Some(pb::connect_response::Kind::Ack(ack)),
            }
        }
    }
}

/// The next event, or never once the events ended.
async fn next_event(events: &mut Option<crate::log::Follow>) -> Option<crate::log::Followed> {
    match events {
        Some(e) => e.next().await,
        None => std::future::pending().await,
    }
}

/// The next command, or never once the commands ended.
async fn next_command(
    inbound: &mut Option<Streaming<pb::ConnectRequest>>,
) -> std::result::Result<Option<pb::ConnectRequest>, Status> {
    match inbound {
        Some(i) => i.message().await,
        None => std::future::pending().await,
    }
}

/// The caller's `ref` of a command, which its ack carries back.
fn reference(kind: &Option<Kind>) -> String {
    match kind {
        Some(Kind::Message(m)) => m.r#ref.clone(),
        Some(Kind::Interrupt(i)) => i.r#ref.clone(),
        Some(Kind::ToolConfirmation(c)) => c.r#ref.clone(),
        Some(Kind::Answer(a)) => a.r#ref.clone(),
        Some(Kind::Open(_)) | None => String::new(),
    }
}

/// Carries out one command on the stream's session `id`; its ack.
async fn ack(steer: &Steer<'_>, id: Uuid, kind: Option<Kind>) -> pb::ConnectAck {
    let reference = reference(&kind);
    let result = match kind {
        Some(Kind::Message(m)) => steer.send(id, &m.text, None).await,
        Some(Kind::Interrupt(_)) => steer.interrupt(id).await,
        Some(Kind::ToolConfirmation(c)) => {
            let mut confirmation = c.confirmation.unwrap_or_default();
            // The stream's session; a name given must be it.
            if confirmation.name.is_empty() {
                confirmation.name = id.to_string();
            }
            confirm(steer, id, confirmation).await
        }
        Some(Kind::Answer(a)) => {
            let mut answer = a.answer.unwrap_or_default();
            if answer.name.is_empty() {
                answer.name = id.to_string();
            }
            answer_question(steer, id, answer).await
        }
        Some(Kind::Open(_)) => Err(Error::invalid("open", "the stream is already open")),
        None => Err(Error::invalid("kind", "required")),
    };
    match result {
        Ok(seq) => pb::ConnectAck {
            r#ref: reference,
            code: 0,
            message: String::new(),
            seq,
        },
        Err(e) => {
            let status = Status::from(e);
            pb::ConnectAck {
                r#ref: reference,
                code: status.code() as i32,
                message: status.message().to_string(),
                seq: 0,
            }
        }
    }
}

async fn confirm(steer: &Steer<'_>, id: Uuid, c: pb::ConfirmToolRequest) -> Result<i64> {
    let (named, answer) = convert::tool_answer(c)?;
    if named != id {
        return Err(Error::invalid(
            "confirmation.name",
            "names another session than the stream's; leave it empty (the stream's session is meant)",
        ));
    }
    steer.confirm(id, answer).await.map(|(seq, _)| seq)
}

async fn answer_question(steer: &Steer<'_>, id: Uuid, a: pb::AnswerQuestionRequest) -> Result<i64> {
    let (named, tool_use_id, answers) = convert::question_answers(a)?;
    if named != id {
        return Err(Error::invalid(
            "answer.name",
            "names another session than the stream's; leave it empty (the stream's session is meant)",
        ));
    }
    steer
        .answer(id, tool_use_id, &answers)
        .await
        .map(|(seq, _)| seq)
}
