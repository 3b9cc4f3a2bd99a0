//! `berth.v1.Sessions`.

use berth_proto::v1::{self as pb, sessions_server::Sessions as SessionsApi};
use futures::StreamExt;
use tonic::{Request, Response, Status, Streaming};

use super::BoxStream;
use super::convert::{self, session_id};
use super::pages::{self, page_size};
use super::steer::Steer;
use crate::access::auth::caller;
use crate::access::revocations::end_when_revoked;
use crate::error::Error;
use crate::ops::sessions::Origin;
use crate::ops::sessions::Sessions;
use crate::session::NewSession;
use crate::store::SessionFilter;

/// Serves `berth.v1.Sessions`.
pub struct SessionsService {
    pub sessions: Sessions,
    /// Ends Connect streams on shutdown (their event side ends by itself).
    pub shutdown: tokio_util::sync::CancellationToken,
    /// Ends a revoked key's streams.
    pub auth: std::sync::Arc<crate::access::auth::Authenticator>,
    /// Connect streams' commands in progress: shutdown awaits them.
    pub tasks: tokio_util::task::TaskTracker,
}

/// What a ListSessions page token is bound to: the project and the filter.
fn sessions_listing(project: &str, r: &pb::ListSessionsRequest) -> String {
    let mut labels: Vec<_> = r.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    labels.sort();
    format!(
        "ListSessions\n{project}\n{}\n{}\n{}",
        r.status,
        r.activity,
        labels.join("\n")
    )
}

impl SessionsService {
    /// `who`'s steering of its project's sessions.
    fn steer<'a>(&'a self, who: &'a crate::access::auth::Caller) -> Steer<'a> {
        Steer {
            sessions: &self.sessions,
            project: &who.project,
            identity: who.identity(),
        }
    }

    /// Fills each waiting session's pending tool permission requests.
    async fn with_pending_tools(&self, sessions: &mut [pb::Session]) -> Result<(), Status> {
        let waiting: Vec<uuid::Uuid> = sessions
            .iter()
            .filter(|s| s.activity == pb::Activity::WaitingInput as i32)
            .filter_map(|s| s.id.parse().ok())
            .collect();
        for p in self.sessions.pending_tools(&waiting).await? {
            let id = p.session_id.to_string();
            if let Some(s) = sessions.iter_mut().find(|s| s.id == id) {
                s.pending_tool_requests.push(convert::pending_to_pb(&p));
            }
        }
        Ok(())
    }
}

#[tonic::async_trait]
impl SessionsApi for SessionsService {
    async fn submit_feedback(
        &self,
        r: Request<pb::SubmitFeedbackRequest>,
    ) -> Result<Response<pb::Feedback>, Status> {
        let who = caller(&r)?;
        let r = r.into_inner();
        let id = session_id(&r.name)?;
        if !(1..=5).contains(&r.rating) {
            return Err(Error::invalid("rating", "required: 1 (poor) to 5 (excellent)").into());
        }
        if r.comment.len() > FEEDBACK_COMMENT_BYTES {
            return Err(Error::invalid(
                "comment",
                format!(
                    "{} bytes; the limit is {FEEDBACK_COMMENT_BYTES}",
                    r.comment.len()
                ),
            )
            .into());
        }
        let f = self
            .sessions
            .submit_feedback(
                &who.project,
                id,
                r.turn,
                &who.identity(),
                r.rating,
                &r.comment,
            )
            .await?;
        Ok(Response::new(feedback_pb(f)))
    }

    async fn list_feedback(
        &self,
        r: Request<pb::ListFeedbackRequest>,
    ) -> Result<Response<pb::ListFeedbackResponse>, Status> {
        let who = caller(&r)?;
        let id = session_id(&r.get_ref().name)?;
        let rows = self.sessions.list_feedback(&who.project, id).await?;
        Ok(Response::new(pb::ListFeedbackResponse {
            feedback: rows.into_iter().map(feedback_pb).collect(),
        }))
    }

    async fn search_sessions(
        &self,
        r: Request<pb::SearchSessionsRequest>,
    ) -> Result<Response<pb::SearchSessionsResponse>, Status> {
        let who = caller(&r)?;
        let r = r.into_inner();
        let query = r.query.trim();
        if query.is_empty() || query.chars().count() > 256 {
            return Err(Error::invalid("query", "required: 1–256 characters").into());
        }
        let limit = match r.page_size {
            0 => 20,
            1..=100 => i64::from(r.page_size),
            _ => return Err(Error::invalid("page_size", "must be between 1 and 100").into()),
        };
        let listing = format!("SearchSessions\n{}\n{query}", who.project);
        let before = pages::parse_time_id_cursor(pages::decode(&r.page_token, &listing)?)?;
        let (found, next) = self
            .sessions
            .search(&who.project, query, before, limit)
            .await?;
        let next_page_token = next
            .map(|(time, id)| pages::encode(&listing, &pages::time_id_cursor(time, id)))
            .unwrap_or_default();
        let matches = found
            .into_iter()
            .map(|(s, hit)| pb::SessionMatch {
                session: Some(s.into()),
                snippet: hit.snippet,
                seq: hit.seq,
            })
            .collect();
        Ok(Response::new(pb::SearchSessionsResponse {
            matches,
            next_page_token,
        }))
    }

    async fn confirm_tool(
        &self,
        r: Request<pb::ConfirmToolRequest>,
    ) -> Result<Response<pb::ConfirmToolResponse>, Status> {
        let who = caller(&r)?;
        let (id, answer) = convert::tool_answer(r.into_inner())?;
        let (seq, already_answered) = self.steer(&who).confirm(id, answer).await?;
        Ok(Response::new(pb::ConfirmToolResponse {
            seq,
            already_answered,
        }))
    }

    async fn answer_question(
        &self,
        r: Request<pb::AnswerQuestionRequest>,
    ) -> Result<Response<pb::AnswerQuestionResponse>, Status> {
        let who = caller(&r)?;
        let (id, tool_use_id, answers) = convert::question_answers(r.into_inner())?;
        let (seq, already_answered) = self.steer(&who).answer(id, tool_use_id, &answers).await?;
        Ok(Response::new(pb::AnswerQuestionResponse {
            seq,
            already_answered,
        }))
    }

    async fn create_session(
        &self,
        r: Request<pb::CreateSessionRequest>,
    ) -> Result<Response<pb::Session>, Status> {
        let who = caller(&r)?;
        let new = NewSession::try_from(r.into_inner())?;
        let s = self
            .sessions
            .create(&who.project, new, &who.identity(), Origin::Client)
            .await?;
        Ok(Response::new(s.into()))
    }

    async fn get_session(
        &self,
        r: Request<pb::GetSessionRequest>,
    ) -> Result<Response<pb::Session>, Status> {
        let who = caller(&r)?;
        let id = session_id(&r.into_inner().name)?;
        let mut s = [self.sessions.get(&who.project, id).await?.into()];
        self.with_pending_tools(&mut s).await?;
        let [s] = s;
        Ok(Response::new(s))
    }

    async fn list_sessions(
        &self,
        r: Request<pb::ListSessionsRequest>,
    ) -> Result<Response<pb::ListSessionsResponse>, Status> {
        let who = caller(&r)?;
        let r = r.into_inner();
        let limit = page_size(r.page_size, 50)?;
        let listing = sessions_listing(&who.project, &r);
        let filter = SessionFilter {
            status: convert::status_from_pb(r.status)?,
            before: pages::parse_time_id_cursor(pages::decode(&r.page_token, &listing)?)?,
            labels: r.labels.into_iter().collect(),
            limit,
            activity: convert::activity_from_pb(r.activity)?,
        };
        let sessions = self.sessions.list(&who.project, filter).await?;
        let next_page_token = match sessions.last() {
            Some(last) if sessions.len() as i64 == limit => {
                pages::encode(&listing, &pages::time_id_cursor(last.create_time, last.id))
            }
            _ => String::new(),
        };
        let mut sessions: Vec<pb::Session> = sessions.into_iter().map(Into::into).collect();
        self.with_pending_tools(&mut sessions).await?;
        Ok(Response::new(pb::ListSessionsResponse {
            sessions,
            next_page_token,
        }))
    }

    async fn send_message(
        &self,
        r: Request<pb::SendMessageRequest>,
    ) -> Result<Response<pb::SendMessageResponse>, Status> {
        let who = caller(&r)?;
        let r = r.into_inner();
        let id = session_id(&r.name)?;
        berth_common::spec::check_len(
            "request_id",
            &r.request_id,
            crate::session::limits::REQUEST_ID_CHARS,
        )
        .map_err(Error::from)?;
        if r.request_id.contains('\0') {
            return Err(Error::invalid("request_id", "holds a NUL character (U+0000)").into());
        }
        let request_id = Some(r.request_id.as_str()).filter(|s| !s.is_empty());
        let seq = self.steer(&who).send(id, &r.text, request_id).await?;
        Ok(Response::new(pb::SendMessageResponse { seq }))
    }

    async fn interrupt(
        &self,
        r: Request<pb::InterruptRequest>,
    ) -> Result<Response<pb::InterruptResponse>, Status> {
        let who = caller(&r)?;
        let id = session_id(&r.into_inner().name)?;
        let seq = self.steer(&who).interrupt(id).await?;
        Ok(Response::new(pb::InterruptResponse { seq }))
    }

    async fn stop_session(
        &self,
        r: Request<pb::StopSessionRequest>,
    ) -> Result<Response<pb::Session>, Status> {
        let who = caller(&r)?;
        let id = session_id(&r.into_inner().name)?;
        let s = self
            .sessions
            .stop(&who.project, id, &who.identity())
            .await?;
        Ok(Response::new(s.into()))
    }

    async fn pause_session(
        &self,
        r: Request<pb::PauseSessionRequest>,
    ) -> Result<Response<pb::Session>, Status> {
        let who = caller(&r)?;
        let id = session_id(&r.into_inner().name)?;
        let s = self
            .sessions
            .pause(&who.project, id, &who.identity())
            .await?;
        Ok(Response::new(s.into()))
    }

    async fn resume_session(
        &self,
        r: Request<pb::ResumeSessionRequest>,
    ) -> Result<Response<pb::Session>, Status> {
        let who = caller(&r)?;
        let id = session_id(&r.into_inner().name)?;
        let s = self
            .sessions
            .resume(&who.project, id, &who.identity())
            .await?;
        Ok(Response::new(s.into()))
    }

    async fn archive_session(
        &self,
        r: Request<pb::ArchiveSessionRequest>,
    ) -> Result<Response<pb::Session>, Status> {
        let who = caller(&r)?;
        let id = session_id(&r.into_inner().name)?;
        let s = self
            .sessions
            .archive(&who.project, id, &who.identity())
            .await?;
        Ok(Response::new(s.into()))
    }

    async fn delete_session(
        &self,
        r: Request<pb::DeleteSessionRequest>,
    ) -> Result<Response<pb::DeleteSessionResponse>, Status> {
        let who = caller(&r)?;
        let id = session_id(&r.into_inner().name)?;
        let objects_deleted = self
            .sessions
            .delete(&who.project, id, &who.identity())
            .await? as i64;
        Ok(Response::new(pb::DeleteSessionResponse { objects_deleted }))
    }

    async fn clone_session(
        &self,
        r: Request<pb::CloneSessionRequest>,
    ) -> Result<Response<pb::Session>, Status> {
        let who = caller(&r)?;
        let r = r.into_inner();
        let id = session_id(&r.name)?;
        if r.request_id.chars().count() > crate::session::limits::REQUEST_ID_CHARS {
            return Err(Error::invalid("request_id", "longer than 128 characters").into());
        }
        let request_id = Some(r.request_id).filter(|s| !s.is_empty());
        let s = self
            .sessions
            .clone_session(&who.project, id, request_id, &who.identity())
            .await?;
        Ok(Response::new(s.into()))
    }

    async fn export_session(
        &self,
        r: Request<pb::ExportSessionRequest>,
    ) -> Result<Response<pb::ExportSessionResponse>, Status> {
        let who = caller(&r)?;
        use crate::ops::sessions::ExportFormat;
        let r = r.into_inner();
        let id = session_id(&r.name)?;
        let format = match pb::ExportFormat::try_from(r.format) {
            Ok(pb::ExportFormat::Unspecified | pb::ExportFormat::Markdown) => {
                ExportFormat::Markdown
            }
            Ok(pb::ExportFormat::Json) => ExportFormat::Json,
            Ok(pb::ExportFormat::Pdf) => ExportFormat::Pdf,
            Err(_) => {
                return Err(
                    Error::invalid("format", format!("unknown format {}", r.format)).into(),
                );
            }
        };
        let bytes = self.sessions.export(&who.project, id, format).await?;
        let (content_type, content, data) = match format {
            ExportFormat::Markdown => ("text/markdown", String::from_utf8(bytes), Vec::new()),
            ExportFormat::Json => ("application/json", String::from_utf8(bytes), Vec::new()),
            ExportFormat::Pdf => ("application/pdf", Ok(String::new()), bytes),
        };
        let content =
            content.map_err(|_| Error::Internal("an export is not valid UTF-8".into()))?;
        Ok(Response::new(pb::ExportSessionResponse {
            content_type: content_type.into(),
            content,
            data,
        }))
    }

    async fn list_events(
        &self,
        r: Request<pb::ListEventsRequest>,
    ) -> Result<Response<pb::ListEventsResponse>, Status> {
        let who = caller(&r)?;
        let r = r.into_inner();
        let id = session_id(&r.name)?;
        let limit = page_size(r.page_size, 100)?;
        let listing = format!("ListEvents\n{}\n{id}", who.project);
        let after = match pages::decode(&r.page_token, &listing)? {
            None => r.after_seq,
            Some(cursor) => cursor.parse().map_err(|_| {
                Error::invalid(
                    "page_token",
                    "not a token from a previous ListEvents response",
                )
            })?,
        };
        if after < 0 {
            return Err(Error::invalid("after_seq", "must not be negative").into());
        }
        let events = self
            .sessions
            .list_events(&who.project, id, after, limit)
            .await?;
        let next_page_token = match events.last() {
            Some(last) if events.len() as i64 == limit => {
                pages::encode(&listing, &last.seq.to_string())
            }
            _ => String::new(),
        };
        Ok(Response::new(pb::ListEventsResponse {
            events: events.iter().map(Into::into).collect(),
            next_page_token,
        }))
    }

    type StreamEventsStream = BoxStream<pb::Event>;

    async fn stream_events(
        &self,
        r: Request<pb::StreamEventsRequest>,
    ) -> Result<Response<Self::StreamEventsStream>, Status> {
        let who = caller(&r)?;
        let r = r.into_inner();
        let id = session_id(&r.name)?;
        let rx = self.sessions.stream(&who.project, id, r.after_seq).await?;
        // Counted while the client holds the stream open.
        let open = crate::metrics::StreamGauge::open("events");
        let stream = rx.map(move |item| {
            let _open = &open;
            item.map(|e| pb::Event::from(&*e))
                .map_err(|e| Status::from(*e))
        });
        let stream = end_when_revoked(self.auth.clone(), &who, Box::pin(stream));
        Ok(Response::new(stream))
    }

    type ConnectStream = BoxStream<pb::ConnectResponse>;

    async fn connect(
        &self,
        r: Request<Streaming<pb::ConnectRequest>>,
    ) -> Result<Response<Self::ConnectStream>, Status> {
        let svc = super::connect::Connect {
            sessions: &self.sessions,
            shutdown: &self.shutdown,
            auth: &self.auth,
            tasks: &self.tasks,
        };
        super::connect::connect(svc, r).await
    }
}

fn session_name(id: uuid::Uuid) -> String {
    berth_common::names::session_name(id)
}

/// Longest feedback comment.
const FEEDBACK_COMMENT_BYTES: usize = 4096;

fn feedback_pb(f: crate::store::FeedbackRow) -> pb::Feedback {
    pb::Feedback {
        session: session_name(f.session_id),
        turn: f.turn,
        rating: f.rating,
        comment: f.comment,
        identity: f.identity,
        update_time: Some(berth_common::time::to_timestamp(f.update_time)),
    }
}
