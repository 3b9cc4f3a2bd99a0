//! The rules of answering a tool permission request: a pure judgement of an
//! answer against the request as it stands, which the store then carries
//! out in the answer's transaction.

use berth_common::events::payload::ToolConfirmation;
use chrono::{DateTime, Utc};

/// A tool permission request as it stands when an answer comes.
#[derive(Debug, Clone)]
pub(crate) struct RequestState {
    pub request_id: String,
    pub tool_name: String,
    /// The permission updates the agent suggested (applied by `always`).
    pub suggestions: serde_json::Value,
    pub ask_time: DateTime<Utc>,
    /// `allow`, `deny` or `cancelled`; `None` while it waits.
    pub decision: Option<String>,
    /// Who closed it: `user`, `timeout`, `run_end`…
    pub answered_by: Option<String>,
    /// The seq of the event that answered it.
    pub answer_seq: Option<i64>,
}

/// What an answer does to a request.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Verdict {
    /// Log this confirmation (the answer, completed from the request).
    Record(Box<ToolConfirmation>),
    /// The same answer was given before (at this seq): nothing new.
    Already(Option<i64>),
    /// The request was closed otherwise: why, for the caller.
    Refused(String),
}

/// Judges `answer` against `request` at `now`.
pub(crate) fn judge(
    request: &RequestState,
    answer: &ToolConfirmation,
    now: DateTime<Utc>,
) -> Verdict {
    match request.decision.as_deref() {
        None => {}
        Some(d) if d == answer.decision => return Verdict::Already(request.answer_seq),
        Some(d) => {
            let what = match (d, request.answered_by.as_deref()) {
                ("cancelled", _) => "was withdrawn (the agent no longer waits)".to_string(),
                (_, Some("timeout")) => format!("was already answered `{d}` when it timed out"),
                _ => format!("was already answered `{d}`"),
            };
            return Verdict::Refused(format!(
                "tool_use_id: the request `{}` {what}",
                answer.tool_use_id
            ));
        }
    }
    let mut p = answer.clone();
    p.request_id = request.request_id.clone();
    p.tool_name = request.tool_name.clone();
    if p.always && p.decision == "allow" {
        p.updated_permissions = Some(request.suggestions.clone());
    }
    p.waited_s = (now - request.ask_time)
        .to_std()
        .unwrap_or_default()
        .as_secs_f64();
    Verdict::Record(Box::new(p))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn waiting() -> RequestState {
        RequestState {
            request_id: "req-1".into(),
            tool_name: "Bash".into(),
            suggestions: serde_json::json!([{"type": "addRules"}]),
            ask_time: Utc::now() - chrono::Duration::seconds(3),
            decision: None,
            answered_by: None,
            answer_seq: None,
        }
    }

    fn answer(decision: &str, always: bool) -> ToolConfirmation {
        ToolConfirmation {
            tool_use_id: "toolu_1".into(),
            decision: decision.into(),
            always,
            by: "user".into(),
            ..Default::default()
        }
    }

    #[test]
    fn a_waiting_request_records_the_answer_completed_from_the_request() {
        let Verdict::Record(p) = judge(&waiting(), &answer("allow", true), Utc::now()) else {
            panic!("recorded");
        };
        assert_eq!(
            (p.request_id.as_str(), p.tool_name.as_str()),
            ("req-1", "Bash")
        );
        assert_eq!(
            p.updated_permissions,
            Some(serde_json::json!([{"type": "addRules"}]))
        );
        assert!(p.waited_s >= 3.0, "{}", p.waited_s);
        let Verdict::Record(p) = judge(&waiting(), &answer("deny", true), Utc::now()) else {
            panic!("recorded");
        };
        assert_eq!(
            p.updated_permissions, None,
            "a denial applies no permission"
        );
    }

    #[test]
    fn the_same_answer_again_is_idempotent_and_another_is_refused() {
        let mut answered = waiting();
        answered.decision = Some("allow".into());
        answered.answered_by = Some("user".into());
        answered.answer_seq = Some(12);
        assert_eq!(
            judge(&answered, &answer("allow", false), Utc::now()),
            Verdict::Already(Some(12))
        );
        assert_eq!(
            judge(&answered, &answer("deny", false), Utc::now()),
            Verdict::Refused(
                "tool_use_id: the request `toolu_1` was already answered `allow`".into()
            )
        );
        answered.answered_by = Some("timeout".into());
        let Verdict::Refused(why) = judge(&answered, &answer("deny", false), Utc::now()) else {
            panic!("refused");
        };
        assert!(why.ends_with("when it timed out"), "{why}");
        answered.decision = Some("cancelled".into());
        let Verdict::Refused(why) = judge(&answered, &answer("allow", false), Utc::now()) else {
            panic!("refused");
        };
        assert!(why.contains("withdrawn"), "{why}");
    }
}
