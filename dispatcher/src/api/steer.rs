//! Steering a session: a message, an interrupt, an answer to a tool
//! permission request, as the unary calls and a Connect stream's commands
//! both carry them out (the operations record their audit events).

use uuid::Uuid;

use crate::error::Result;
use crate::ops::sessions::{Sessions, ToolAnswer};
use crate::session::questions;

use super::convert;

/// One caller's steering of its project's sessions.
pub(super) struct Steer<'a> {
    pub sessions: &'a Sessions,
    pub project: &'a str,
    pub identity: String,
}

impl Steer<'_> {
    /// Queues `text` for the session's agent, once per `request_id`; its
    /// seq.
    pub async fn send(&self, id: Uuid, text: &str, request_id: Option<&str>) -> Result<i64> {
        let text = convert::message_text(text)?;
        self.sessions
            .send_message(self.project, id, text, request_id, &self.identity)
            .await
    }

    /// Interrupts the agent's turn; the seq of the interrupt.
    pub async fn interrupt(&self, id: Uuid) -> Result<i64> {
        self.sessions
            .interrupt(self.project, id, &self.identity)
            .await
    }

    /// Answers the agent's questions: the seq of the answer, and whether
    /// the questions had been answered before.
    pub async fn answer(
        &self,
        id: Uuid,
        tool_use_id: String,
        answers: &[questions::Answer],
    ) -> Result<(i64, bool)> {
        self.sessions
            .answer_question(
                self.project,
                id,
                self.identity.clone(),
                tool_use_id,
                answers,
            )
            .await
    }

    /// Answers a pending tool permission request: its seq, and whether the
    /// same answer was given before (then nothing new is logged).
    pub async fn confirm(&self, id: Uuid, answer: ToolAnswer) -> Result<(i64, bool)> {
        self.sessions
            .confirm_tool(self.project, id, self.identity.clone(), answer)
            .await
    }
}
