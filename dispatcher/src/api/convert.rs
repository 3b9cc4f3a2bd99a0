//! Wire ↔ domain conversion, in one place. A failed conversion is
//! `InvalidArgument` naming the field.

use std::collections::BTreeMap;

use berth_common::names;
use berth_common::time::{from_duration, to_timestamp};
use berth_proto::v1 as pb;
use uuid::Uuid;

use crate::error::{Error, Result};
use crate::session::{Event, NewSession, Runtime, Session, SessionSpec, SessionStatus, limits};

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
    if s.env.len() > limits::ENV_VARS {
        return Err(Error::invalid(
            "spec.env",
            format!("at most {} variables", limits::ENV_VARS),
        ));
    }
    let mut env_bytes = 0;
    for (k, v) in &s.env {
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
    Ok(SessionSpec {
        image: s.image,
        runtime,
        runtime_args: s.runtime_args,
        model: s.model,
        system_prompt: s.system_prompt,
        env: s.env.into_iter().collect(),
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
        let timeout = match &r.timeout {
            None => None,
            Some(d) => Some(
                from_duration(d)
                    .filter(|d| !d.is_zero())
                    .ok_or_else(|| Error::invalid("timeout", "must be positive"))?,
            ),
        };
        Ok(NewSession {
            request_id: Some(r.request_id).filter(|s| !s.is_empty()),
            display_name: r.display_name,
            spec: spec(r.spec)?,
            labels: labels(r.labels)?,
            initial_message,
            timeout,
        })
    }
}

impl From<Session> for pb::Session {
    fn from(s: Session) -> Self {
        let runtime = match s.spec.runtime {
            Runtime::ClaudeCode => pb::Runtime::ClaudeCode,
            Runtime::Jsonl => pb::Runtime::Jsonl,
        };
        Self {
            name: names::session_name(s.id),
            id: s.id.to_string(),
            display_name: s.display_name,
            status: status_to_pb(s.status) as i32,
            status_reason: s.status_reason,
            env_keys: s.spec.env.keys().cloned().collect(),
            spec: Some(pb::SessionSpec {
                image: s.spec.image,
                runtime: runtime as i32,
                runtime_args: s.spec.runtime_args,
                model: s.spec.model,
                system_prompt: s.spec.system_prompt,
                env: Default::default(),
            }),
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
