//! The tool permission requests of one run: which wait, for how long, and
//! what their timeout decides. The relay keeps this map; the rows in
//! `tool_requests` are the durable truth it is loaded from on re-attach.

use std::collections::HashMap;
use std::time::Duration;

use berth_common::events::payload;
use berth_common::tools::Decision;
use tokio::time::Instant;

/// One waiting request.
#[derive(Debug, Clone)]
pub(super) struct Waiting {
    pub request_id: String,
    pub deadline: Instant,
    /// The timeout's answer was logged; it reaches the agent through the feed.
    pub timed_out: bool,
    /// `tool.approval_wait`: open until the request is answered or withdrawn.
    pub _span: tracing::Span,
}

/// The span of one wait for an approval, in the current (turn's) trace.
pub(super) fn approval_span(tool: &str, tool_use_id: &str) -> tracing::Span {
    tracing::info_span!("tool.approval_wait", tool, tool_use_id)
}

/// Requests of this run waiting for an answer, by tool_use id.
#[derive(Debug, Default)]
pub(super) struct PendingTools {
    waiting: HashMap<String, Waiting>,
}

impl PendingTools {
    pub fn insert(&mut self, tool_use_id: String, w: Waiting) {
        self.waiting.insert(tool_use_id, w);
    }

    pub fn len(&self) -> usize {
        self.waiting.len()
    }

    pub fn is_empty(&self) -> bool {
        self.waiting.is_empty()
    }

    /// The request an answer is for, taken out; `None` when this run's
    /// agent does not wait on it (an earlier run's, or withdrawn).
    pub fn answer(&mut self, tool_use_id: &str) -> Option<Waiting> {
        self.waiting.remove(tool_use_id)
    }

    /// The request the agent withdrew, taken out.
    pub fn withdraw(&mut self, request_id: &str) -> bool {
        let before = self.waiting.len();
        self.waiting.retain(|_, w| w.request_id != request_id);
        self.waiting.len() != before
    }

    pub fn clear(&mut self) {
        self.waiting.clear();
    }

    /// When the next timeout falls, if any is still to fire.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.waiting
            .values()
            .filter(|w| !w.timed_out)
            .map(|w| w.deadline)
            .min()
    }

    /// Requests whose timeout has come, marked so they fire once.
    pub fn expired(&mut self, now: Instant) -> Vec<String> {
        self.waiting
            .iter_mut()
            .filter(|(_, w)| !w.timed_out && w.deadline <= now)
            .map(|(id, w)| {
                w.timed_out = true;
                id.clone()
            })
            .collect()
    }
}

/// The answer a timed-out request gets.
pub(super) fn timeout_answer(
    tool_use_id: String,
    decision: Decision,
    after: Duration,
) -> payload::ToolConfirmation {
    let message = match decision {
        Decision::Deny => format!(
            "No one answered within {}s; the session's tool policy denies the call.",
            after.as_secs()
        ),
        Decision::Allow => String::new(),
    };
    payload::ToolConfirmation {
        tool_use_id,
        decision: decision.as_str().into(),
        message,
        by: "timeout".into(),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn waiting(request_id: &str, deadline: Instant) -> Waiting {
        Waiting {
            request_id: request_id.into(),
            deadline,
            timed_out: false,
            _span: tracing::Span::none(),
        }
    }

    #[test]
    fn timeouts_fire_once_in_deadline_order_and_answers_take_requests_out() {
        let t0 = Instant::now();
        let mut p = PendingTools::default();
        p.insert("a".into(), waiting("ra", t0 + Duration::from_secs(5)));
        p.insert("b".into(), waiting("rb", t0 + Duration::from_secs(1)));
        assert_eq!(p.next_deadline(), Some(t0 + Duration::from_secs(1)));
        assert!(p.expired(t0).is_empty());
        let fired = p.expired(t0 + Duration::from_secs(2));
        assert_eq!(fired, vec!["b".to_string()]);
        assert!(
            p.expired(t0 + Duration::from_secs(2)).is_empty(),
            "fires once"
        );
        // Still waiting for its answer to reach the agent.
        assert_eq!(p.len(), 2);
        assert_eq!(p.next_deadline(), Some(t0 + Duration::from_secs(5)));
        assert!(p.answer("b").is_some());
        assert!(p.answer("b").is_none(), "answered once");
        assert!(p.withdraw("ra"));
        assert!(p.is_empty());
        assert_eq!(p.next_deadline(), None);
    }
}
