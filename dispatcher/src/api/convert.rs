//! Wire ↔ domain conversion, in one place. A failed conversion is
//! `InvalidArgument` naming the field.

use std::collections::BTreeMap;

use berth_common::names;
use berth_common::time::{from_duration, to_timestamp};
use berth_proto::v1 as pb;
use uuid::Uuid;

use berth_common::spec::{self, check_len, validate_git, validate_path};

use crate::error::{Error, Result};
use crate::session::{
    Activity, Agent, AgentSpec, Event, FileInfo, NewSession, Resource, Session, SessionStatus,
    limits,
};
use crate::sessions::ToolAnswer;
use crate::store::PendingTool;

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

/// A session's spec: required, and valid.
fn session_spec(s: Option<pb::SessionSpec>) -> Result<AgentSpec> {
    let s = s.ok_or_else(|| Error::invalid("spec", "required"))?;
    Ok(AgentSpec::try_from(s)?)
}

/// An agent version's spec, validated like a session's.
pub fn agent_spec(s: Option<pb::AgentSpec>) -> Result<AgentSpec> {
    session_spec(s.map(spec::agent_pb_to_session_pb))
}

/// With `agent` set, the request's spec may carry only env.
fn env_only_spec(s: Option<pb::SessionSpec>) -> Result<AgentSpec> {
    let s = s.unwrap_or_default();
    let set = [
        ("spec.image", !s.image.is_empty()),
        ("spec.runtime", s.runtime != 0),
        ("spec.runtime_args", !s.runtime_args.is_empty()),
        ("spec.model", !s.model.is_empty()),
        ("spec.system_prompt", !s.system_prompt.is_empty()),
        ("spec.limits", s.limits.is_some()),
        ("spec.skills", !s.skills.is_empty()),
        ("spec.egress", s.egress.is_some()),
    ];
    if let Some((field, _)) = set.iter().find(|(_, set)| *set) {
        return Err(Error::invalid(
            field,
            "must be empty when `agent` is set: the agent's version supplies it (only spec.env, spec.vault_ids and spec.tool_policy may be given)",
        ));
    }
    let env = s.env.into_iter().collect();
    spec::validate_env(&env)?;
    // The same checks as a whole spec's, on the fields given.
    let checked = AgentSpec::try_from(pb::SessionSpec {
        image: "-".into(),
        vault_ids: s.vault_ids,
        tool_policy: s.tool_policy,
        ..Default::default()
    })?;
    let (vault_ids, tool_policy) = (checked.vault_ids, checked.tool_policy);
    Ok(AgentSpec {
        tool_policy,
        env,
        vault_ids,
        ..Default::default()
    })
}

fn resources(rs: Vec<pb::Resource>) -> Result<Vec<Resource>> {
    use pb::resource::Kind;
    if rs.len() > limits::RESOURCES {
        return Err(Error::invalid(
            "resources",
            format!("at most {} resources", limits::RESOURCES),
        ));
    }
    let path = |field: &'static str, p: &str| -> Result<String> {
        validate_path(field, p)?;
        Ok(p.to_string())
    };
    rs.into_iter()
        .map(|r| match r.kind {
            Some(Kind::File(f)) => {
                let id = names::file_id(&f.file);
                let file_id = Uuid::parse_str(id).map_err(|_| {
                    Error::invalid(
                        "resources.file.file",
                        format!("`{}` is not `files/{{id}}`", f.file),
                    )
                })?;
                Ok(Resource::File {
                    file_id,
                    path: path("resources.file.path", &f.path)?,
                })
            }
            Some(Kind::Memory(m)) => {
                if !names::is_simple_name(&m.store) {
                    return Err(Error::invalid(
                        "resources.memory.store",
                        format!("`{}`: 1-64 of [A-Za-z0-9_-]", m.store),
                    ));
                }
                let read_write = match pb::MemoryAccess::try_from(m.access) {
                    Ok(pb::MemoryAccess::ReadWrite) => true,
                    Ok(_) => false,
                    Err(_) => {
                        return Err(Error::invalid(
                            "resources.memory.access",
                            format!("unknown access {}", m.access),
                        ));
                    }
                };
                Ok(Resource::Memory {
                    store: m.store,
                    path: path("resources.memory.path", &m.path)?,
                    read_write,
                })
            }
            Some(Kind::Git(g)) => {
                validate_git("resources.git.url", "resources.git.ref", &g.url, &g.r#ref)?;
                let key = g.ssh_key_secret.trim();
                let ssh_key_secret = match key.strip_prefix("secrets/").unwrap_or(key) {
                    "" => None,
                    id => Some(
                        uuid::Uuid::parse_str(id)
                            .map_err(|_| {
                                Error::invalid(
                                    "resources.git.ssh_key_secret",
                                    format!("`{key}` is not a secret id (`secrets/{{uuid}}`)"),
                                )
                            })?
                            .to_string(),
                    ),
                };
                Ok(Resource::Git {
                    url: g.url,
                    git_ref: g.r#ref,
                    path: path("resources.git.path", &g.path)?,
                    ssh_key_secret,
                })
            }
            None => Err(Error::invalid(
                "resources",
                "each resource needs file, memory or git",
            )),
        })
        .collect()
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
        } => Kind::Git(pb::GitResource {
            url,
            r#ref: git_ref,
            path,
            ssh_key_secret: ssh_key_secret
                .map(|id| format!("secrets/{id}"))
                .unwrap_or_default(),
        }),
    };
    pb::Resource { kind: Some(kind) }
}

fn positive(
    field: &'static str,
    d: &Option<prost_types::Duration>,
) -> Result<Option<std::time::Duration>> {
    match d {
        None => Ok(None),
        Some(d) => {
            Ok(Some(from_duration(d).filter(|d| !d.is_zero()).ok_or_else(
                || Error::invalid(field, "must be positive"),
            )?))
        }
    }
}

impl From<Agent> for pb::Agent {
    fn from(a: Agent) -> Self {
        let env_keys = a.spec.env.keys().cloned().collect();
        Self {
            name: format!("{}{}", names::AGENTS, a.id),
            agent_id: a.id,
            version: a.version,
            latest_version: a.latest_version,
            spec: Some(spec::session_pb_to_agent_pb(a.spec.into())),
            env_keys,
            archived: a.archived,
            create_time: Some(to_timestamp(a.create_time)),
            version_create_time: Some(to_timestamp(a.version_create_time)),
            project: a.project,
        }
    }
}

impl From<FileInfo> for pb::File {
    fn from(f: FileInfo) -> Self {
        Self {
            name: format!("{}{}", names::FILES, f.id),
            display_name: f.display_name,
            size_bytes: f.size_bytes,
            sha256: f.sha256,
            create_time: Some(to_timestamp(f.create_time)),
        }
    }
}

/// Checks the sampling parameters' ranges (which runtime takes which is
/// checked once the runtime is known).
fn run_params(p: Option<pb::RunParams>) -> Result<crate::session::RunParams> {
    let p = p.unwrap_or_default();
    if let Some(n) = p.max_output_tokens
        && !(1..=128_000).contains(&n)
    {
        return Err(Error::invalid(
            "run_params.max_output_tokens",
            "must be between 1 and 128000",
        ));
    }
    if let Some(t) = p.temperature
        && !(0.0..=1.0).contains(&t)
    {
        return Err(Error::invalid(
            "run_params.temperature",
            "must be between 0 and 1",
        ));
    }
    Ok(crate::session::RunParams {
        max_output_tokens: p.max_output_tokens,
        temperature: p.temperature,
    })
}

impl TryFrom<pb::CreateSessionRequest> for NewSession {
    type Error = Error;

    fn try_from(r: pb::CreateSessionRequest) -> Result<Self> {
        check_len("request_id", &r.request_id, limits::REQUEST_ID_CHARS)?;
        check_len("display_name", &r.display_name, limits::DISPLAY_NAME_CHARS)?;
        let initial_message = if r.initial_message.is_empty() {
            None
        } else {
            Some(String::from(message_text(&r.initial_message).map_err(
                |_| {
                    Error::invalid(
                        "initial_message",
                        format!(
                            "must be non-blank and at most {} bytes",
                            limits::MESSAGE_BYTES
                        ),
                    )
                },
            )?))
        };
        let timeout = positive("timeout", &r.timeout)?;
        if !(r.budget_usd >= 0.0 && r.budget_usd.is_finite()) {
            return Err(Error::invalid(
                "budget_usd",
                "must be 0 (no budget) or positive",
            ));
        }
        let agent = Some(r.agent).filter(|a| !a.is_empty());
        let spec = match &agent {
            Some(a) => {
                names::agent_ref(a).map_err(|e| Error::invalid("agent", e))?;
                env_only_spec(r.spec)?
            }
            None => session_spec(r.spec)?,
        };
        Ok(NewSession {
            request_id: Some(r.request_id).filter(|s| !s.is_empty()),
            display_name: r.display_name,
            spec,
            labels: labels(r.labels)?,
            initial_message,
            timeout,
            agent,
            resources: resources(r.resources)?,
            inactivity_timeout: positive("inactivity_timeout", &r.inactivity_timeout)?,
            budget_usd: Some(r.budget_usd).filter(|b| *b > 0.0),
            queue_timeout: positive("queue_timeout", &r.queue_timeout)?,
            pinned: None,
            run_params: run_params(r.run_params)?,
        })
    }
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

    fn create() -> pb::CreateSessionRequest {
        pb::CreateSessionRequest {
            spec: Some(pb::SessionSpec {
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
                Box::new(|r| r.spec = Some(pb::SessionSpec::default())),
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
        r.spec = Some(pb::SessionSpec {
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
