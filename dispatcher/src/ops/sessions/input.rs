//! What reaches a running session's agent: messages, interrupts and
//! answers to its tool permission requests, through the log.

use berth_common::events::payload::{self};
use uuid::Uuid;

use super::{Sessions, ToolAnswer};
use crate::error::{Error, Result};
use crate::ops::audit::{Action, Detail};
use crate::session::{NewEvent, questions};
use crate::store::ToolEffect;

impl Sessions {
    /// Persists a user message; the driver forwards it. Returns its seq.
    /// Under a `request_id` the session has logged already, the message is
    /// not sent again: its first seq is returned (AIP-155), even once the
    /// session no longer takes input.
    pub(crate) async fn send_message(
        &self,
        project: &str,
        id: Uuid,
        text: &str,
        request_id: Option<&str>,
        by: &str,
    ) -> Result<i64> {
        let sent = async {
            self.require_input(
                project,
                id,
                "messages can only be sent to pending, starting, running or idle sessions",
            )
            .await?;
            self.log
                .append(id, NewEvent::user_message(text, request_id))
                .await
        };
        // A first call costs what a call without a key does; only a failed
        // one looks for the key. A retry meets the key's unique index, or
        // finds the session no longer taking input. Not for a session the
        // caller cannot see: that error stands.
        let e = match (sent.await, request_id) {
            (Ok(e), _) => e,
            (Err(err @ (Error::WrongStatus { .. } | Error::AlreadyExists(_))), Some(rid)) => {
                match self.sent_before(id, rid, text).await? {
                    Some(seq) => return Ok(seq),
                    None => return Err(err),
                }
            }
            (Err(err), _) => return Err(err),
        };
        let detail = Detail::Seq { seq: e.seq };
        self.audit(project, by, Action::SessionSend, id, detail)
            .await;
        Ok(e.seq)
    }

    /// Logs the answer to a pending tool permission request (the owner's
    /// relay passes it to the agent). Returns its seq, and whether the same
    /// answer was given before (nothing new is logged then).
    pub(crate) async fn confirm_tool(
        &self,
        project: &str,
        id: Uuid,
        identity: String,
        a: ToolAnswer,
    ) -> Result<(i64, bool)> {
        self.get(project, id).await?;
        let decision = a.decision.as_str();
        let (tool_use_id, always) = (a.tool_use_id.clone(), a.always);
        let answer = payload::ToolConfirmation {
            tool_use_id: a.tool_use_id,
            decision: decision.into(),
            updated_input: a.updated_input,
            always: a.always,
            message: a.message,
            interrupt: a.interrupt,
            by: "user".into(),
            identity: identity.clone(),
            ..Default::default()
        };
        let out = self
            .log
            .tool(ToolEffect::Answer {
                session: id,
                answer,
                traceparent: berth_common::traces::current(),
            })
            .await?;
        if let Some(seq) = out.already {
            return Ok((seq, true));
        }
        let e = out
            .events
            .first()
            .ok_or_else(|| Error::Internal("an answer logged no event".into()))?;
        crate::metrics::record_tool_answer(&e.payload);
        tracing::info!(session_id = %id, seq = e.seq, decision, "tool permission answered");
        let allow = decision == "allow";
        let action = if allow {
            Action::SessionApprove
        } else {
            Action::SessionDeny
        };
        let detail = Detail::ToolAnswer {
            tool_use_id,
            decision: if allow { "allow" } else { "deny" },
            always,
            seq: e.seq,
        };
        self.audit(project, &identity, action, id, detail).await;
        Ok((e.seq, false))
    }

    /// Answers the agent's clarifying questions: checks `answers` against
    /// the pending request's questions, then allows the call with them
    /// (logged, idempotent and audited as [`Sessions::confirm_tool`]).
    pub(crate) async fn answer_question(
        &self,
        project: &str,
        id: Uuid,
        identity: String,
        tool_use_id: String,
        answers: &[questions::Answer],
    ) -> Result<(i64, bool)> {
        self.get(project, id).await?;
        let pending = self.store.pending_tools(&[id]).await?;
        let updated_input = match pending.into_iter().find(|p| p.tool_use_id == tool_use_id) {
            Some(p) if p.tool_name != berth_common::events::ASK_USER_QUESTION => {
                return Err(Error::Precondition(format!(
                    "{tool_use_id} asks to run {}, not questions: answer it with ConfirmTool",
                    p.tool_name
                )));
            }
            Some(p) => Some(
                questions::answered_input(&p.input.0, answers)
                    .map_err(|e| Error::invalid("answers", e))?,
            ),
            // Answered already (then the first answer stands), or never
            // asked: the log says which.
            None => None,
        };
        let answer = ToolAnswer {
            tool_use_id,
            decision: berth_common::tools::Decision::Allow,
            updated_input,
            always: false,
            message: String::new(),
            interrupt: false,
        };
        self.confirm_tool(project, id, identity, answer).await
    }

    /// Pending tool permission requests of these sessions, oldest first.
    pub(crate) async fn pending_tools(
        &self,
        ids: &[Uuid],
    ) -> Result<Vec<crate::store::PendingTool>> {
        self.store.pending_tools(ids).await
    }

    pub(crate) async fn interrupt(&self, project: &str, id: Uuid, by: &str) -> Result<i64> {
        self.require_input(project, id, "only a live session can be interrupted")
            .await?;
        let e = self.log.append(id, NewEvent::user_interrupt()).await?;
        let detail = Detail::Seq { seq: e.seq };
        self.audit(project, by, Action::SessionInterrupt, id, detail)
            .await;
        Ok(e.seq)
    }

    /// The seq of the message the session logged under `request_id`, if
    /// any. A request id names one message: another text under it is the
    /// caller's error.
    async fn sent_before(&self, id: Uuid, request_id: &str, text: &str) -> Result<Option<i64>> {
        let Some((seq, first)) = self.store.message_by_request(id, request_id).await? else {
            return Ok(None);
        };
        if first != text {
            return Err(Error::invalid(
                "request_id",
                format!(
                    "was used by another message of this session (seq {seq}); give each message its own request_id"
                ),
            ));
        }
        Ok(Some(seq))
    }

    async fn require_input(&self, project: &str, id: Uuid, what: &'static str) -> Result<()> {
        let s = self.get(project, id).await?;
        if !s.status.accepts_input() {
            return Err(Error::WrongStatus {
                id,
                status: s.status,
                what,
            });
        }
        Ok(())
    }
}
