//! Wire ↔ domain conversion, in one place. A failed conversion is
//! `InvalidArgument` naming the field.

use std::collections::BTreeMap;

use berth_common::names;
use berth_common::time::{from_duration, to_timestamp};
use berth_proto::v1 as pb;
use uuid::Uuid;

use crate::agents::{Agent, FileInfo};
use crate::error::{Error, Result};
use crate::session::{
    Event, Limits, NewSession, Resource, Runtime, Session, SessionSpec, SessionStatus, Skill,
    limits,
};

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

fn check_len(field: &'static str, value: &str, max: usize) -> Result<()> {
    if value.chars().count() > max {
        return Err(Error::invalid(
            field,
            format!("longer than {max} characters"),
        ));
    }
    Ok(())
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

fn labels(map: std::collections::HashMap<String, String>) -> Result<BTreeMap<String, String>> {
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

/// Validates a spec's env: names, NUL bytes, count and total size.
fn env(env: std::collections::HashMap<String, String>) -> Result<BTreeMap<String, String>> {
    if env.len() > limits::ENV_VARS {
        return Err(Error::invalid(
            "spec.env",
            format!("at most {} variables", limits::ENV_VARS),
        ));
    }
    let mut env_bytes = 0;
    for (k, v) in &env {
        let ok = !k.is_empty()
            && !k.starts_with(|c: char| c.is_ascii_digit())
            && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !ok {
            return Err(Error::invalid(
                "spec.env",
                format!("bad variable name `{k}`: use [A-Za-z_][A-Za-z0-9_]*"),
            ));
        }
        if v.contains('\0') {
            return Err(Error::invalid(
                "spec.env",
                format!("`{k}` contains a NUL byte"),
            ));
        }
        env_bytes += k.len() + v.len();
    }
    if env_bytes > limits::ENV_BYTES {
        return Err(Error::invalid(
            "spec.env",
            format!("{env_bytes} bytes; the limit is {}", limits::ENV_BYTES),
        ));
    }
    Ok(env.into_iter().collect())
}

fn spec(s: Option<pb::SessionSpec>) -> Result<SessionSpec> {
    let s = s.ok_or_else(|| Error::invalid("spec", "required"))?;
    if s.image.trim().is_empty() {
        return Err(Error::invalid("spec.image", "required"));
    }
    check_len("spec.image", &s.image, limits::IMAGE_CHARS)?;
    let runtime = match pb::Runtime::try_from(s.runtime) {
        Ok(pb::Runtime::Unspecified | pb::Runtime::ClaudeCode) => Runtime::ClaudeCode,
        Ok(pb::Runtime::Jsonl) => Runtime::Jsonl,
        Err(_) => {
            return Err(Error::invalid(
                "spec.runtime",
                format!("unknown runtime {}", s.runtime),
            ));
        }
    };
    if runtime == Runtime::Jsonl && s.runtime_args.is_empty() {
        return Err(Error::invalid(
            "spec.runtime_args",
            "the jsonl runtime needs the program to run",
        ));
    }
    if s.runtime_args.len() > limits::RUNTIME_ARGS {
        return Err(Error::invalid(
            "spec.runtime_args",
            format!("at most {} arguments", limits::RUNTIME_ARGS),
        ));
    }
    let env = env(s.env)?;
    if s.system_prompt.len() > limits::SYSTEM_PROMPT_BYTES {
        return Err(Error::invalid(
            "spec.system_prompt",
            format!("longer than {} bytes", limits::SYSTEM_PROMPT_BYTES),
        ));
    }
    let lim = s.limits.unwrap_or_default();
    if !(lim.cpus >= 0.0 && lim.cpus.is_finite()) {
        return Err(Error::invalid(
            "spec.limits.cpus",
            "must be 0 (node default) or positive",
        ));
    }
    if lim.memory_bytes != 0 && lim.memory_bytes < 64 * 1024 * 1024 {
        return Err(Error::invalid(
            "spec.limits.memory_bytes",
            "must be 0 (node default) or at least 64 MiB",
        ));
    }
    if lim.pids < 0 {
        return Err(Error::invalid(
            "spec.limits.pids",
            "must be 0 (node default) or positive",
        ));
    }
    if s.skills.len() > limits::SKILLS {
        return Err(Error::invalid(
            "spec.skills",
            format!("at most {} skills", limits::SKILLS),
        ));
    }
    for k in &s.skills {
        if !names::is_simple_name(&k.name) {
            return Err(Error::invalid(
                "spec.skills.name",
                format!("`{}`: 1-64 of [A-Za-z0-9_-]", k.name),
            ));
        }
        if k.content.len() > limits::SKILL_BYTES {
            return Err(Error::invalid(
                "spec.skills.content",
                format!(
                    "skill `{}` is longer than {} bytes",
                    k.name,
                    limits::SKILL_BYTES
                ),
            ));
        }
    }
    Ok(SessionSpec {
        image: s.image,
        runtime,
        runtime_args: s.runtime_args,
        model: s.model,
        system_prompt: s.system_prompt,
        env,
        limits: Limits {
            cpus: lim.cpus,
            memory_bytes: lim.memory_bytes,
            pids: lim.pids,
        },
        skills: s
            .skills
            .into_iter()
            .map(|k| Skill {
                name: k.name,
                content: k.content,
            })
            .collect(),
    })
}

/// An agent version's spec, validated like a session's.
pub fn agent_spec(s: Option<pb::AgentSpec>) -> Result<SessionSpec> {
    let s = s.ok_or_else(|| Error::invalid("spec", "required"))?;
    spec(Some(pb::SessionSpec {
        image: s.image,
        runtime: s.runtime,
        runtime_args: s.runtime_args,
        model: s.model,
        system_prompt: s.system_prompt,
        env: s.env,
        limits: s.limits,
        skills: s.skills,
    }))
}

/// With `agent` set, the request's spec may carry only env.
fn env_only_spec(s: Option<pb::SessionSpec>) -> Result<SessionSpec> {
    let s = s.unwrap_or_default();
    let set = [
        ("spec.image", !s.image.is_empty()),
        ("spec.runtime", s.runtime != 0),
        ("spec.runtime_args", !s.runtime_args.is_empty()),
        ("spec.model", !s.model.is_empty()),
        ("spec.system_prompt", !s.system_prompt.is_empty()),
        ("spec.limits", s.limits.is_some()),
        ("spec.skills", !s.skills.is_empty()),
    ];
    if let Some((field, _)) = set.iter().find(|(_, set)| *set) {
        return Err(Error::invalid(
            field,
            "must be empty when `agent` is set: the agent's version supplies it (only spec.env may be given)",
        ));
    }
    Ok(SessionSpec {
        env: env(s.env)?,
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
        if !p.starts_with('/') || p.split('/').any(|seg| seg == "..") || p.contains('\0') {
            return Err(Error::invalid(
                field,
                format!("`{p}` must be an absolute path without `..`"),
            ));
        }
        check_len(field, p, limits::PATH_CHARS)?;
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
                if g.url.is_empty() || g.url.starts_with('-') {
                    return Err(Error::invalid(
                        "resources.git.url",
                        "must be a repository URL or path",
                    ));
                }
                check_len("resources.git.url", &g.url, limits::GIT_URL_CHARS)?;
                if g.r#ref.starts_with('-') {
                    return Err(Error::invalid(
                        "resources.git.ref",
                        "must not start with `-`",
                    ));
                }
                Ok(Resource::Git {
                    url: g.url,
                    git_ref: g.r#ref,
                    path: path("resources.git.path", &g.path)?,
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
        Resource::Git { url, git_ref, path } => Kind::Git(pb::GitResource {
            url,
            r#ref: git_ref,
            path,
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

fn spec_to_pb(s: SessionSpec) -> pb::SessionSpec {
    let runtime = match s.runtime {
        Runtime::ClaudeCode => pb::Runtime::ClaudeCode,
        Runtime::Jsonl => pb::Runtime::Jsonl,
    };
    pb::SessionSpec {
        image: s.image,
        runtime: runtime as i32,
        runtime_args: s.runtime_args,
        model: s.model,
        system_prompt: s.system_prompt,
        // Write-only.
        env: Default::default(),
        limits: Some(pb::Limits {
            cpus: s.limits.cpus,
            memory_bytes: s.limits.memory_bytes,
            pids: s.limits.pids,
        }),
        skills: s
            .skills
            .into_iter()
            .map(|k| pb::Skill {
                name: k.name,
                content: k.content,
            })
            .collect(),
    }
}

impl From<Agent> for pb::Agent {
    fn from(a: Agent) -> Self {
        let env_keys = a.spec.env.keys().cloned().collect();
        let s = spec_to_pb(a.spec);
        Self {
            name: format!("{}{}", names::AGENTS, a.id),
            agent_id: a.id,
            version: a.version,
            latest_version: a.latest_version,
            spec: Some(pb::AgentSpec {
                image: s.image,
                runtime: s.runtime,
                runtime_args: s.runtime_args,
                model: s.model,
                system_prompt: s.system_prompt,
                env: Default::default(),
                limits: s.limits,
                skills: s.skills,
            }),
            env_keys,
            archived: a.archived,
            create_time: Some(to_timestamp(a.create_time)),
            version_create_time: Some(to_timestamp(a.version_create_time)),
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
            None => spec(r.spec)?,
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
        })
    }
}

impl From<Session> for pb::Session {
    fn from(s: Session) -> Self {
        Self {
            name: names::session_name(s.id),
            id: s.id.to_string(),
            display_name: s.display_name,
            status: status_to_pb(s.status) as i32,
            status_reason: s.status_reason,
            env_keys: s.spec.env.keys().cloned().collect(),
            spec: Some(spec_to_pb(s.spec)),
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
        }
    }
}
