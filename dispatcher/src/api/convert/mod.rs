//! Wire ↔ domain conversion, in one place. A failed conversion is
//! `InvalidArgument` naming the field.

use std::collections::BTreeMap;

use berth_common::names;
use berth_common::time::to_timestamp;
use berth_proto::v1 as pb;
use uuid::Uuid;

use berth_common::spec::check_len;

use crate::error::{Error, Result};
use crate::session::{Activity, Event, Resource, Session, SessionStatus, limits};

mod create;
mod tools;

pub use create::agent_spec;
pub use tools::{pending_to_pb, question_answers, tool_answer};

/// The session id in `sessions/{id}` or a bare id.
pub fn session_id(name: &str) -> Result<Uuid> {
    if name.is_empty() {
        return Err(Error::invalid(
            "name",
            "required: `sessions/{id}` or the session id",
        ));
    }
    let id = names::session_id(name);
    Uuid::parse_str(id).map_err(|_| Error::SessionNotFound(id.to_string()))
}

pub fn status_to_pb(s: SessionStatus) -> pb::SessionStatus {
    use pb::SessionStatus as P;
    match s {
        SessionStatus::Pending => P::Pending,
        SessionStatus::Starting => P::Starting,
        SessionStatus::Running => P::Running,
        SessionStatus::Idle => P::Idle,
        SessionStatus::Stopping => P::Stopping,
        SessionStatus::Stopped => P::Stopped,
        SessionStatus::Paused => P::Paused,
        SessionStatus::Completed => P::Completed,
        SessionStatus::Failed => P::Failed,
        SessionStatus::Timeout => P::Timeout,
        SessionStatus::Rescheduling => P::Rescheduling,
        SessionStatus::Archived => P::Archived,
    }
}

pub fn status_from_pb(value: i32) -> Result<Option<SessionStatus>> {
    let s = pb::SessionStatus::try_from(value)
        .map_err(|_| Error::invalid("status", format!("unknown status {value}")))?;
    Ok(SessionStatus::ALL
        .into_iter()
        .find(|d| status_to_pb(*d) == s))
}

pub fn activity_to_pb(a: Option<Activity>) -> pb::Activity {
    match a {
        None => pb::Activity::Unspecified,
        Some(Activity::Working) => pb::Activity::Working,
        Some(Activity::Idle) => pb::Activity::Idle,
        Some(Activity::WaitingInput) => pb::Activity::WaitingInput,
    }
}

/// A list filter: `None` for ACTIVITY_UNSPECIFIED (any).
pub fn activity_from_pb(value: i32) -> Result<Option<Activity>> {
    match pb::Activity::try_from(value) {
        Ok(pb::Activity::Unspecified) => Ok(None),
        Ok(pb::Activity::Working) => Ok(Some(Activity::Working)),
        Ok(pb::Activity::Idle) => Ok(Some(Activity::Idle)),
        Ok(pb::Activity::WaitingInput) => Ok(Some(Activity::WaitingInput)),
        Err(_) => Err(Error::invalid(
            "activity",
            format!("unknown activity {value}"),
        )),
    }
}

/// Validates a user message's text.
pub fn message_text(text: &str) -> Result<&str> {
    if text.trim().is_empty() {
        return Err(Error::invalid("text", "must not be empty"));
    }
    if text.len() > limits::MESSAGE_BYTES {
        return Err(Error::invalid(
            "text",
            format!(
                "{} bytes; the limit is {} bytes",
                text.len(),
                limits::MESSAGE_BYTES
            ),
        ));
    }
    Ok(text)
}

pub(crate) fn labels(
    map: std::collections::HashMap<String, String>,
) -> Result<BTreeMap<String, String>> {
    if map.len() > limits::LABELS {
        return Err(Error::invalid(
            "labels",
            format!("at most {} labels", limits::LABELS),
        ));
    }
    for (k, v) in &map {
        let ok = !k.is_empty()
            && k.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c));
        if !ok || k.len() > limits::LABEL_KEY_CHARS {
            return Err(Error::invalid(
                "labels",
                format!(
                    "bad key `{k}`: 1-{} of [A-Za-z0-9-_./]",
                    limits::LABEL_KEY_CHARS
                ),
            ));
        }
        check_len("labels", v, limits::LABEL_VALUE_CHARS)?;
    }
    Ok(map.into_iter().collect())
}

fn resource_to_pb(r: Resource) -> pb::Resource {
    use pb::resource::Kind;
    let kind = match r {
        Resource::File { file_id, path } => Kind::File(pb::FileResource {
            file: format!("{}{file_id}", names::FILES),
            path,
        }),
        Resource::Memory {
            store,
            path,
            read_write,
        } => Kind::Memory(pb::MemoryResource {
            store,
            path,
            access: if read_write {
                pb::MemoryAccess::ReadWrite
            } else {
                pb::MemoryAccess::ReadOnly
            } as i32,
        }),
        Resource::Git {
            url,
            git_ref,
            path,
            ssh_key_secret,
            credential,
        } => Kind::Git(pb::GitResource {
            url,
            r#ref: git_ref,
            path,
            ssh_key_secret: ssh_key_secret
                .map(|id| format!("secrets/{id}"))
                .unwrap_or_default(),
            credential: credential
                .map(|id| format!("secrets/{id}"))
                .unwrap_or_default(),
        }),
    };
    pb::Resource { kind: Some(kind) }
}

impl From<Session> for pb::Session {
    fn from(s: Session) -> Self {
        let activity = activity_to_pb(s.activity()) as i32;
        Self {
            name: names::session_name(s.id),
            id: s.id.to_string(),
            project: s.project.clone(),
            display_name: s.display_name,
            status: status_to_pb(s.status) as i32,
            status_reason: s.status_reason,
            env_keys: s.spec.env.keys().cloned().collect(),
            spec: Some(s.spec.into()),
            labels: s.labels.into_iter().collect(),
            node: s.node,
            epoch: s.epoch,
            last_seq: s.last_seq,
            runtime_session_id: s.runtime_session_id,
            usage: Some(pb::Usage {
                input_tokens: s.usage.input_tokens,
                output_tokens: s.usage.output_tokens,
                cache_read_input_tokens: s.usage.cache_read_input_tokens,
                cache_creation_input_tokens: s.usage.cache_creation_input_tokens,
                cost_usd: s.usage.cost_usd,
                turns: s.usage.turns,
                models: s.usage.models.into_iter().map(model_usage).collect(),
            }),
            request_id: s.request_id.unwrap_or_default(),
            create_time: Some(to_timestamp(s.create_time)),
            update_time: Some(to_timestamp(s.update_time)),
            start_time: s.start_time.map(to_timestamp),
            end_time: s.end_time.map(to_timestamp),
            agent: s
                .agent
                .as_ref()
                .map(|(a, _)| format!("{}{a}", names::AGENTS))
                .unwrap_or_default(),
            agent_version: s.agent.as_ref().map_or(0, |(_, v)| *v),
            resources: s.resources.into_iter().map(resource_to_pb).collect(),
            timeout: s.timeout.map(berth_common::time::to_duration),
            inactivity_timeout: s.inactivity_timeout.map(berth_common::time::to_duration),
            budget_usd: s.budget_usd.unwrap_or(0.0),
            queue_deadline: s.queue_deadline.map(to_timestamp),
            snapshot: s.snapshot.map(|snap| pb::Snapshot {
                key: snap.key,
                size_bytes: snap.size_bytes,
                create_time: Some(to_timestamp(snap.create_time)),
            }),
            archive_time: s.archive_time.map(to_timestamp),
            activity,
            // Filled by the calls that show them (GetSession, ListSessions).
            pending_tool_requests: Vec::new(),
        }
    }
}

impl From<&Event> for pb::Event {
    fn from(e: &Event) -> Self {
        Self {
            session_id: e.session_id.to_string(),
            seq: e.seq,
            id: e.id.to_string(),
            r#type: e.kind.clone(),
            create_time: Some(to_timestamp(e.create_time)),
            payload_json: e.payload.clone(),
            raw: e.raw.clone().unwrap_or_default(),
            line_seq: e.line_seq,
            trace_id: e
                .traceparent
                .as_deref()
                .and_then(berth_common::traces::trace_id)
                .unwrap_or_default()
                .to_string(),
        }
    }
}

fn model_usage(m: berth_common::usage::ModelFigures) -> pb::ModelUsage {
    let f = m.figures;
    pb::ModelUsage {
        model: m.model,
        input_tokens: f.input_tokens,
        output_tokens: f.output_tokens,
        cache_read_input_tokens: f.cache_read_input_tokens,
        cache_creation_input_tokens: f.cache_creation_input_tokens,
        cost_usd: f.cost_usd,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::NewSession;

    fn create() -> pb::CreateSessionRequest {
        pb::CreateSessionRequest {
            spec: Some(pb::AgentSpec {
                image: "agent:latest".into(),
                ..Default::default()
            }),
            initial_message: "hello".into(),
            ..Default::default()
        }
    }

    /// The field an invalid create names, or `None` when it is accepted.
    fn field(r: pb::CreateSessionRequest) -> Option<&'static str> {
        match NewSession::try_from(r) {
            Ok(_) => None,
            Err(Error::InvalidArgument { field, .. }) => Some(field),
            Err(e) => panic!("not INVALID_ARGUMENT: {e}"),
        }
    }

    #[test]
    fn a_valid_create_converts() {
        let n = NewSession::try_from(create()).expect("valid");
        assert_eq!(n.initial_message.as_deref(), Some("hello"));
        assert_eq!(n.spec.image, "agent:latest");
    }

    #[test]
    fn each_bad_create_names_its_field() {
        type Mutate = Box<dyn Fn(&mut pb::CreateSessionRequest)>;
        let cases: Vec<(&str, Mutate)> = vec![
            ("spec", Box::new(|r| r.spec = None)),
            (
                "spec.image",
                Box::new(|r| r.spec = Some(pb::AgentSpec::default())),
            ),
            (
                "initial_message",
                Box::new(|r| r.initial_message = "  ".into()),
            ),
            ("budget_usd", Box::new(|r| r.budget_usd = -1.0)),
            ("budget_usd", Box::new(|r| r.budget_usd = f64::INFINITY)),
            (
                "timeout",
                Box::new(|r| {
                    r.timeout = Some(prost_types::Duration {
                        seconds: 0,
                        nanos: 0,
                    })
                }),
            ),
            ("request_id", Box::new(|r| r.request_id = "x".repeat(200))),
            (
                "labels",
                Box::new(|r| {
                    r.labels.insert("bad key".into(), "v".into());
                }),
            ),
            (
                "spec.env",
                Box::new(|r| {
                    if let Some(s) = r.spec.as_mut() {
                        s.env.insert("A-B".into(), "v".into());
                    }
                }),
            ),
            ("agent", Box::new(|r| r.agent = "Not An Id".into())),
            (
                "resources.file.path",
                Box::new(|r| {
                    r.resources.push(pb::Resource {
                        kind: Some(pb::resource::Kind::File(pb::FileResource {
                            file: format!("files/{}", Uuid::now_v7()),
                            path: "/workspace/../etc/passwd".into(),
                        })),
                    })
                }),
            ),
            (
                "resources.git.url",
                Box::new(|r| {
                    r.resources.push(pb::Resource {
                        kind: Some(pb::resource::Kind::Git(pb::GitResource {
                            url: "--upload-pack=x".into(),
                            r#ref: String::new(),
                            path: "/workspace/repo".into(),
                            ssh_key_secret: String::new(),
                            credential: String::new(),
                        })),
                    })
                }),
            ),
            (
                "resources.git.ssh_key_secret",
                Box::new(|r| {
                    r.resources.push(pb::Resource {
                        kind: Some(pb::resource::Kind::Git(pb::GitResource {
                            url: "ssh://git@example.com/r.git".into(),
                            r#ref: String::new(),
                            path: "/workspace/repo".into(),
                            ssh_key_secret: "not-a-secret-id".into(),
                            credential: String::new(),
                        })),
                    })
                }),
            ),
        ];
        for (want, mutate) in cases {
            let mut r = create();
            mutate(&mut r);
            assert_eq!(field(r), Some(want));
        }
    }

    #[test]
    fn with_an_agent_the_spec_may_carry_only_env() {
        let mut r = create();
        r.agent = "coder".into();
        assert_eq!(field(r.clone()), Some("spec.image"));
        r.spec = Some(pb::AgentSpec {
            env: [("K".to_string(), "v".to_string())].into(),
            ..Default::default()
        });
        assert_eq!(field(r), None);
    }

    #[test]
    fn session_names_and_messages_are_checked() {
        assert!(matches!(
            session_id(""),
            Err(Error::InvalidArgument { field: "name", .. })
        ));
        assert!(matches!(
            session_id("sessions/nope"),
            Err(Error::SessionNotFound(_))
        ));
        let id = Uuid::now_v7();
        assert_eq!(session_id(&format!("sessions/{id}")).ok(), Some(id));
        assert!(message_text("").is_err());
        assert!(message_text(&"x".repeat(limits::MESSAGE_BYTES + 1)).is_err());
    }
}
