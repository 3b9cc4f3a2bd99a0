//! `Sessions/Connect`: one bidirectional stream per session. The first
//! request opens it (`open`: the session, and where to start its events);
//! then the session's events flow out while commands flow in, each answered
//! by an ack carrying the caller's `ref`. A message that cannot be decoded
//! ends the stream with the caller's error (INVALID_ARGUMENT or
//! RESOURCE_EXHAUSTED), as a unary call's would.

use berth_proto::v1::{self as pb, connect_request::Kind};
use futures::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use uuid::Uuid;

use super::BoxStream;
use super::convert::{self, session_id};
use super::steer::Steer;
use crate::access::auth::{Authenticator, caller};
use crate::access::revocations::{end_when_revoked, key_revoked};
use crate::error::{Error, Result};
use crate::ops::sessions::Sessions;

/// Commands waiting for their acks, per stream.
const ACKS_IN_FLIGHT: usize = 128;

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
    /// Owns the stream's command task.
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
    let gauge = crate::metrics::StreamGauge::open("connect");
    let events = events.map(move |item| {
        let _open = &gauge;
        item.map(|e| pb::ConnectResponse {
            kind: Some(pb::connect_response::Kind::Event(pb::Event::from(&*e))),
        })
        .map_err(|e| Status::from(*e))
    });
    // Commands in, each acknowledged. Acks are boxed: a channel allocates
    // its first block of slots when it is made, and an idle stream's would
    // hold 32 whole responses' worth.
    let (tx, acks) = tokio::sync::mpsc::channel::<
        std::result::Result<Box<pb::ConnectResponse>, Status>,
    >(ACKS_IN_FLIGHT);
    let (sessions, shutdown) = (svc.sessions.clone(), svc.shutdown.clone());
    let revoked = key_revoked(svc.auth.clone(), &who);
    let (project, identity) = (who.project.clone(), who.identity());
    svc.tasks.spawn(async move {
        tokio::pin!(revoked);
        let steer = Steer {
            sessions: &sessions,
            project: &project,
            identity,
        };
        loop {
            let req = tokio::select! {
                m = inbound.message() => match m {
                    Ok(Some(req)) => req,
                    Ok(None) => return,
                    Err(status) => {
                        let _ = tx.send(Err(inbound_error(status))).await;
                        return;
                    }
                },
                () = shutdown.cancelled() => return,
                // The key was revoked: no more commands (the events side
                // ends with UNAUTHENTICATED).
                () = &mut revoked => return,
            };
            // Boxed: the task of an idle stream keeps only what it waits on.
            let ack = Box::pin(ack(&steer, id, req.kind)).await;
            let ack = Box::new(pb::ConnectResponse {
                kind: Some(pb::connect_response::Kind::Ack(ack)),
            });
            if tx.send(Ok(ack)).await.is_err() {
                return;
            }
        }
    });
    let acks = ReceiverStream::new(acks).map(|ack| ack.map(|a| *a));
    let out = futures::stream::select(events, acks);
    let stream = end_when_revoked(svc.auth.clone(), &who, Box::pin(out));
    Ok(Response::new(stream))
}

/// Carries out one command on the stream's session `id`; its ack.
async fn ack(steer: &Steer<'_>, id: Uuid, kind: Option<Kind>) -> pb::ConnectAck {
    let (reference, result) = match kind {
        Some(Kind::Message(m)) => (m.r#ref, steer.send(id, &m.text).await),
        Some(Kind::Interrupt(i)) => (i.r#ref, steer.interrupt(id).await),
        Some(Kind::ToolConfirmation(c)) => {
            let mut confirmation = c.confirmation.unwrap_or_default();
            // The stream's session; a name given must be it.
            if confirmation.name.is_empty() {
                confirmation.name = id.to_string();
            }
            (c.r#ref, confirm(steer, id, confirmation).await)
        }
        Some(Kind::Answer(a)) => {
            let mut answer = a.answer.unwrap_or_default();
            if answer.name.is_empty() {
                answer.name = id.to_string();
            }
            (a.r#ref, answer_question(steer, id, answer).await)
        }
        Some(Kind::Open(_)) => (
            String::new(),
            Err(Error::invalid("open", "the stream is already open")),
        ),
        None => (String::new(), Err(Error::invalid("kind", "required"))),
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
