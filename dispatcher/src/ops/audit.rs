//! The audit trail: who did what to which resource. The operations record
//! an action once it has succeeded, as a typed [`Action`] with typed
//! [`Detail`]; a failure to record is logged and counted
//! (`berth_audit_failures_total`), and never undoes the action. A
//! session's creation (or clone) is the exception: its record is written in
//! the creating statement ([`entry`]), so the two commit together.

use serde::Serialize;

pub(crate) use crate::records::AuditEvent;
use crate::store::{AuditEntry, Store};

/// What was done. Its name (`session.create`…) is what the trail shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Action {
    SessionCreate,
    SessionSend,
    SessionInterrupt,
    SessionApprove,
    SessionDeny,
    SessionFeedback,
    SessionStop,
    SessionPause,
    SessionResume,
    SessionArchive,
    SessionDelete,
    SessionClone,
    AgentCreate,
    AgentUpdate,
    AgentArchive,
    KeyCreate,
    KeyRevoke,
    SecretCreate,
    SecretDelete,
    ScheduleCreate,
    ScheduleSuspend,
    ScheduleResume,
    ScheduleTrigger,
    ScheduleDelete,
    WebhookCreate,
    WebhookDelete,
    SubscriptionCreate,
    SubscriptionDelete,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        use Action::*;
        match self {
            SessionCreate => "session.create",
            SessionSend => "session.send",
            SessionInterrupt => "session.interrupt",
            SessionApprove => "session.approve",
            SessionDeny => "session.deny",
            SessionFeedback => "session.feedback",
            SessionStop => "session.stop",
            SessionPause => "session.pause",
            SessionResume => "session.resume",
            SessionArchive => "session.archive",
            SessionDelete => "session.delete",
            SessionClone => "session.clone",
            AgentCreate => "agent.create",
            AgentUpdate => "agent.update",
            AgentArchive => "agent.archive",
            KeyCreate => "key.create",
            KeyRevoke => "key.revoke",
            SecretCreate => "secret.create",
            SecretDelete => "secret.delete",
            ScheduleCreate => "schedule.create",
            ScheduleSuspend => "schedule.suspend",
            ScheduleResume => "schedule.resume",
            ScheduleTrigger => "schedule.trigger",
            ScheduleDelete => "schedule.delete",
            WebhookCreate => "webhook.create",
            WebhookDelete => "webhook.delete",
            SubscriptionCreate => "subscription.create",
            SubscriptionDelete => "subscription.delete",
        }
    }
}

/// What an audit event says beyond its action and resource: one shape per
/// kind of action, stored as its JSON object.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub(crate) enum Detail {
    /// Nothing more (`{}`).
    None {},
    /// The event the action logged.
    Seq {
        seq: i64,
    },
    /// The status the action left the session in.
    Status {
        status: String,
    },
    /// A session made by a client.
    Created {
        request_id: Option<String>,
        agent: Option<String>,
        image: String,
    },
    /// A session made by an inbound webhook delivery.
    Delivered {
        delivery: String,
        agent: String,
    },
    /// A session made by a schedule's fire.
    Fired {
        fire_time: String,
        agent: String,
    },
    Feedback {
        turn: i64,
        rating: i32,
    },
    Deleted {
        objects_deleted: u64,
    },
    ClonedFrom {
        from: String,
    },
    /// An answer to a tool permission request.
    ToolAnswer {
        tool_use_id: String,
        decision: &'static str,
        always: bool,
        seq: i64,
    },
    AgentVersion {
        version: i64,
    },
    KeyRole {
        role: &'static str,
    },
    SecretUsage {
        usage: String,
    },
    WebhookAgent {
        agent: String,
    },
    Subscription {
        url: String,
        event_types: Vec<String>,
    },
    Schedule {
        agent: String,
        cron: String,
        timezone: String,
    },
    Triggered {
        session: Option<String>,
        request_id: Option<String>,
    },
}

/// Records actions.
#[derive(Clone)]
pub(crate) struct Audit {
    pub store: Store,
}

/// The audit record of `identity` doing `action`, for a statement that
/// writes it with the change ([`AuditEntry`]).
pub(crate) fn entry(identity: &str, action: Action, detail: Detail) -> AuditEntry {
    AuditEntry {
        identity: identity.to_string(),
        action: action.as_str(),
        detail: serde_json::to_value(&detail).unwrap_or_default(),
    }
}

impl Audit {
    /// Records that `identity` did `action` to `resource` in `project`.
    pub async fn record(
        &self,
        project: &str,
        identity: &str,
        action: Action,
        resource: &str,
        detail: Detail,
    ) {
        let action = action.as_str();
        let detail = serde_json::to_value(&detail).unwrap_or_default();
        if let Err(e) = self
            .store
            .insert_audit(project, identity, action, resource, &detail)
            .await
        {
            metrics::counter!(crate::metrics::AUDIT_FAILURES).increment(1);
            tracing::error!(error = %e, project, identity, action, resource, "recording an audit event failed");
        }
    }

    pub async fn list(
        &self,
        project: &str,
        resource: &str,
        after: i64,
        limit: i64,
    ) -> crate::error::Result<Vec<AuditEvent>> {
        self.store.list_audit(project, resource, after, limit).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn details_are_the_json_objects_the_trail_has_always_shown() {
        let json = |d: Detail| serde_json::to_value(d).expect("json");
        assert_eq!(json(Detail::None {}), serde_json::json!({}));
        assert_eq!(json(Detail::Seq { seq: 4 }), serde_json::json!({"seq": 4}));
        assert_eq!(
            json(Detail::Created {
                request_id: None,
                agent: Some("coder".into()),
                image: String::new(),
            }),
            serde_json::json!({"request_id": null, "agent": "coder", "image": ""})
        );
        assert_eq!(Action::SessionCreate.as_str(), "session.create");
        assert_eq!(Action::SubscriptionDelete.as_str(), "subscription.delete");
    }
}
