//! What subscribers (outbound webhooks) see of a session's events: the
//! event types a subscription may ask for, and which events make them.
//!
//! The rule runs inside the database too: the trigger of migration 0013
//! enqueues deliveries in the transaction that persists the event (an
//! outbox). A test (`the_outbound_trigger_agrees_with_the_domain`) inserts
//! every event type the domain writes and checks the trigger made exactly
//! what [`subscriber_kinds`] says, so a renamed event or status cannot
//! silently stop webhooks.

use berth_common::events::{self as ev, payload};

use super::SessionStatus;

/// The reason a session stopped because its cost reached its budget.
pub const BUDGET_REASON: &str = "budget";

/// The event types a subscription may ask for.
pub const SUBSCRIBER_EVENT_TYPES: &[&str] = &[
    "session.idle",
    "session.failed",
    "session.terminated",
    "session.budget_reached",
    "session.requires_action",
];

/// The subscriber event types an event of `event_type` with `payload` (its
/// JSON) makes: none for most.
pub fn subscriber_kinds(event_type: &str, payload: &str) -> Vec<&'static str> {
    let is = |status: SessionStatus| event_type == status.event_type();
    if is(SessionStatus::Idle) {
        vec!["session.idle"]
    } else if is(SessionStatus::Failed) {
        vec!["session.failed"]
    } else if is(SessionStatus::Stopped) {
        let budget = serde_json::from_str::<payload::StatusChange>(payload)
            .is_ok_and(|c| c.reason == BUDGET_REASON);
        if budget {
            vec!["session.terminated", "session.budget_reached"]
        } else {
            vec!["session.terminated"]
        }
    } else if ev::asks(event_type) {
        vec!["session.requires_action"]
    } else {
        Vec::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stopped(reason: &str) -> String {
        payload::to_json(&payload::StatusChange {
            status: "stopped".into(),
            reason: reason.into(),
            ..Default::default()
        })
    }

    #[test]
    fn status_changes_and_permission_requests_are_what_subscribers_see() {
        assert_eq!(
            subscriber_kinds("session.status_idle", "{}"),
            ["session.idle"]
        );
        assert_eq!(
            subscriber_kinds("session.status_stopped", &stopped("budget")),
            ["session.terminated", "session.budget_reached"]
        );
        assert_eq!(
            subscriber_kinds("session.status_stopped", &stopped("user")),
            ["session.terminated"]
        );
        assert_eq!(
            subscriber_kinds(ev::AGENT_TOOL_PERMISSION, "{}"),
            ["session.requires_action"]
        );
        assert_eq!(
            subscriber_kinds(ev::AGENT_QUESTION, "{}"),
            ["session.requires_action"],
            "questions wait on a person too"
        );
        assert!(subscriber_kinds("agent.message", "{}").is_empty());
        assert!(subscriber_kinds("session.status_running", "{}").is_empty());
        for kinds in [
            subscriber_kinds("session.status_failed", "{}"),
            subscriber_kinds("session.status_stopped", &stopped("budget")),
        ] {
            assert!(kinds.iter().all(|k| SUBSCRIBER_EVENT_TYPES.contains(k)));
        }
    }
}
