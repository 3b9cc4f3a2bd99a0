//! Steering a session: a message, an interrupt, an answer to a tool
//! permission request, each with its audit record. The unary calls and a
//! Connect stream's commands go through the same steps.

use uuid::Uuid;

use crate::audit::Audit;
use crate::error::Result;
use crate::sessions::{Sessions, ToolAnswer};

use super::convert;

/// One caller's steering of its project's sessions.
pub(super) struct Steer<'a> {
    pub sessions: &'a Sessions,
    pub audit: &'a Audit,
    pub project: &'a str,
    pub identity: String,
}

impl Steer<'_> {
    /// Queues `text` for the session's agent; its seq.
    pub async fn send(&self, id: Uuid, text: &str) -> Result<i64> {
        let text = convert::message_text(text)?;
        let seq = self.sessions.send_message(self.project, id, text).await?;
        self.record(id, "session.send", serde_json::json!({ "seq": seq }))
            .await;
        Ok(seq)
    }

    /// Interrupts the agent's turn; the seq of the interrupt.
    pub async fn interrupt(&self, id: Uuid) -> Result<i64> {
        let seq = self.sessions.interrupt(self.project, id).await?;
        self.record(id, "session.interrupt", serde_json::json!({ "seq": seq }))
            .await;
        Ok(seq)
    }

    /// Answers a pending tool permission request: its seq, and whether the
    /// same answer was given before (then nothing new is logged or audited).
    pub async fn confirm(&self, id: Uuid, answer: ToolAnswer) -> Result<(i64, bool)> {
        let allow = answer.decision == berth_common::tools::Decision::Allow;
        let mut detail = serde_json::json!({
            "tool_use_id": answer.tool_use_id,
            "decision": if allow { "allow" } else { "deny" },
            "always": answer.always,
        });
        let (seq, already_answered) = self
            .sessions
            .confirm_tool(self.project, id, self.identity.clone(), answer)
            .await?;
        if !already_answered {
            detail["seq"] = seq.into();
            let action = if allow {
                "session.approve"
            } else {
                "session.deny"
            };
            self.record(id, action, detail).await;
        }
        Ok((seq, already_answered))
    }

    async fn record(&self, id: Uuid, action: &str, detail: serde_json::Value) {
        self.audit
            .record(
                self.project,
                &self.identity,
                action,
                &berth_common::names::session_name(id),
                detail,
            )
            .await;
    }
}
