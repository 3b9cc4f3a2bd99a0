//! Tool permission requests and their answers on the wire.

use berth_common::time::to_timestamp;
use berth_proto::v1 as pb;
use uuid::Uuid;

use berth_common::spec::check_len;

use super::session_id;
use crate::error::{Error, Result};
use crate::ops::sessions::ToolAnswer;
use crate::store::PendingTool;

/// An `AnswerQuestion` request, checked for shape (the answers are
/// checked against the questions by the operation): the session, the
/// request's tool_use_id and the answers.
pub fn question_answers(
    r: pb::AnswerQuestionRequest,
) -> Result<(Uuid, String, Vec<crate::session::questions::Answer>)> {
    let id = session_id(&r.name)?;
    if r.tool_use_id.is_empty() {
        return Err(Error::invalid(
            "tool_use_id",
            "required: the `tool_use_id` of the `agent.question` event",
        ));
    }
    check_len("tool_use_id", &r.tool_use_id, 256)?;
    if r.answers.is_empty() || r.answers.len() > 64 {
        return Err(Error::invalid(
            "answers",
            "one answer per question (1 to 64)",
        ));
    }
    let answers = r
        .answers
        .into_iter()
        .map(|a| crate::session::questions::Answer {
            question: a.question,
            labels: a.labels,
            text: a.text,
        })
        .collect();
    Ok((id, r.tool_use_id, answers))
}

/// A `ConfirmTool` request, checked: the session and the answer.
pub fn tool_answer(r: pb::ConfirmToolRequest) -> Result<(Uuid, ToolAnswer)> {
    use berth_common::tools::{self, Decision};
    let id = session_id(&r.name)?;
    if r.tool_use_id.is_empty() {
        return Err(Error::invalid(
            "tool_use_id",
            "required: the `tool_use_id` of the `agent.tool_permission` event",
        ));
    }
    check_len("tool_use_id", &r.tool_use_id, 256)?;
    let decision = Decision::from_pb(r.decision, "decision")?;
    let updated_input = if r.updated_input_json.is_empty() {
        None
    } else {
        if decision == Decision::Deny {
            return Err(Error::invalid(
                "updated_input_json",
                "only an allow runs the tool with edited input",
            ));
        }
        if r.updated_input_json.len() > tools::MAX_INPUT_BYTES {
            return Err(Error::invalid(
                "updated_input_json",
                format!("longer than {} bytes", tools::MAX_INPUT_BYTES),
            ));
        }
        match serde_json::from_str::<serde_json::Value>(&r.updated_input_json) {
            Ok(v @ serde_json::Value::Object(_)) => Some(v),
            _ => {
                return Err(Error::invalid(
                    "updated_input_json",
                    "must be a JSON object: the tool's whole input",
                ));
            }
        }
    };
    if r.always && decision == Decision::Deny {
        return Err(Error::invalid(
            "always",
            "only an allow can be made permanent",
        ));
    }
    if r.interrupt && decision == Decision::Allow {
        return Err(Error::invalid(
            "interrupt",
            "only a deny interrupts the turn",
        ));
    }
    if r.message.len() > tools::MAX_MESSAGE_BYTES {
        return Err(Error::invalid(
            "message",
            format!("longer than {} bytes", tools::MAX_MESSAGE_BYTES),
        ));
    }
    Ok((
        id,
        ToolAnswer {
            tool_use_id: r.tool_use_id,
            decision,
            updated_input,
            always: r.always,
            message: r.message,
            interrupt: r.interrupt,
        },
    ))
}

pub fn pending_to_pb(p: &PendingTool) -> pb::ToolRequest {
    pb::ToolRequest {
        tool_use_id: p.tool_use_id.clone(),
        tool_name: p.tool_name.clone(),
        input_json: p.input.0.to_string(),
        reason: p.reason.clone(),
        suggestions_json: p.suggestions.0.to_string(),
        seq: p.ask_seq,
        ask_time: Some(to_timestamp(p.ask_time)),
        deadline: Some(to_timestamp(p.deadline)),
    }
}
