//! Tool approvals from a client: which request an answer is for, and how a
//! person's typed answer reads.

use berth_proto::v1::{self as pb, sessions_client::SessionsClient};
use tonic::Status;

use crate::auth::Api;

/// A person's answer at the prompt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    Allow,
    /// Allow, and calls like it for the rest of the session.
    Always,
    Deny,
}

/// `y`/`yes`, `n`/`no`, `a`/`always` (any case); `None` for anything else.
pub fn parse_answer(s: &str) -> Option<Answer> {
    match s.trim().to_ascii_lowercase().as_str() {
        "y" | "yes" => Some(Answer::Allow),
        "a" | "always" => Some(Answer::Always),
        "n" | "no" => Some(Answer::Deny),
        _ => None,
    }
}

/// The request an answer is for: `tool_use_id` when given, else the
/// session's only pending one. FAILED_PRECONDITION when none waits, or
/// several do and none was named.
pub async fn pending_request(
    client: &mut SessionsClient<Api>,
    session: &str,
    tool_use_id: Option<&str>,
) -> Result<String, Status> {
    if let Some(id) = tool_use_id {
        return Ok(id.to_string());
    }
    let s = client
        .get_session(pb::GetSessionRequest {
            name: session.into(),
        })
        .await?
        .into_inner();
    match s.pending_tool_requests.as_slice() {
        [] => Err(Status::failed_precondition(format!(
            "session {} has no tool permission request waiting",
            s.id
        ))),
        [one] => Ok(one.tool_use_id.clone()),
        many => Err(Status::failed_precondition(format!(
            "session {} has {} requests waiting; name one: {}",
            s.id,
            many.len(),
            many.iter()
                .map(|r| format!("{} ({})", r.tool_use_id, r.tool_name))
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

/// Answers a request; `message` is told to the agent on a deny.
pub async fn confirm(
    client: &mut SessionsClient<Api>,
    session: &str,
    tool_use_id: &str,
    answer: Answer,
    message: &str,
) -> Result<pb::ConfirmToolResponse, Status> {
    let decision = match answer {
        Answer::Allow | Answer::Always => pb::ToolDecision::Allow,
        Answer::Deny => pb::ToolDecision::Deny,
    };
    Ok(client
        .confirm_tool(pb::ConfirmToolRequest {
            name: session.into(),
            tool_use_id: tool_use_id.into(),
            decision: decision as i32,
            always: answer == Answer::Always,
            message: message.into(),
            ..Default::default()
        })
        .await?
        .into_inner())
}

/// An `agent.tool_permission` event for a person: the tool, its input and
/// why the agent asks.
pub fn describe(e: &pb::Event) -> String {
    use berth_common::events::payload;
    let p: payload::ToolPermission = payload::parse(&e.payload_json).unwrap_or_default();
    let input = serde_json::to_string_pretty(&p.input).unwrap_or_default();
    let reason = if p.reason.is_empty() {
        String::new()
    } else {
        format!(" ({})", p.reason)
    };
    format!("the agent asks to run {}{reason}:\n{input}", p.tool_name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typed_answers_read_as_people_type_them() {
        assert_eq!(parse_answer("y"), Some(Answer::Allow));
        assert_eq!(parse_answer(" YES\n"), Some(Answer::Allow));
        assert_eq!(parse_answer("a"), Some(Answer::Always));
        assert_eq!(parse_answer("no"), Some(Answer::Deny));
        assert_eq!(parse_answer(""), None);
        assert_eq!(parse_answer("maybe"), None);
    }
}
