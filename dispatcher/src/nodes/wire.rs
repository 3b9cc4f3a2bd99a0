//! The node wire ↔ the dispatcher's domain, in one place: the spec a `Start`
//! carries, and the events a node sends.

use berth_common::events::{self as ev, payload};
use berth_proto::node::v1 as pb;

use crate::session::{NewEvent, Resource, Runtime, Session, file_key, memory_key};

/// What the node needs to run `session`'s next run.
/// What the node runs for `session`; `secrets` are the values of its
/// vault ids, for the node's gateway only.
pub(crate) fn node_spec(session: &Session, secrets: &OpenedSecrets) -> pb::SessionSpec {
    let mut files = Vec::new();
    let mut memory = Vec::new();
    let mut git = Vec::new();
    for r in &session.resources {
        match r {
            Resource::File { file_id, path } => files.push(pb::FileCopy {
                key: file_key(*file_id),
                path: path.clone(),
            }),
            Resource::Memory {
                store,
                path,
                read_write,
            } => {
                // Creation refuses memory stores without an agent.
                let Some((agent, _)) = &session.agent else {
                    continue;
                };
                memory.push(pb::MemoryCopy {
                    key: memory_key(&session.project, agent, store),
                    path: path.clone(),
                    write_back: *read_write,
                });
            }
            Resource::Git {
                url,
                git_ref,
                path,
                ssh_key_secret,
                credential,
            } => git.push(pb::GitClone {
                url: url.clone(),
                r#ref: git_ref.clone(),
                path: path.clone(),
                ssh_key: ssh_key_secret
                    .as_ref()
                    .and_then(|id| secrets.by_id.get(id))
                    .map(|s| s.value.clone())
                    .unwrap_or_default(),
                credential_id: credential.clone().unwrap_or_default(),
            }),
        }
    }
    // With a snapshot, the runtime resumes its own conversation, under the
    // first id it ever reported (only Claude Code resumes by id).
    let (restore_snapshot_key, resume_id) = match &session.snapshot {
        Some(snap) if session.spec.runtime == Runtime::ClaudeCode => {
            (snap.key.clone(), session.runtime_session_id.clone())
        }
        Some(snap) => (snap.key.clone(), String::new()),
        None => (String::new(), String::new()),
    };
    let mut spec = pb::SessionSpec {
        resume_id,
        restore_snapshot_key,
        // Per run: a run nobody re-attached to may save it long after a
        // newer run saved its own snapshot under the next number.
        evict_snapshot_key: format!(
            "sessions/{}/snapshots/{}-run{}.tar.zst",
            session.id,
            session.snapshots + 1,
            session.epoch
        ),
        checkpoint_key_prefix: format!("sessions/{}/checkpoints/", session.id),
        files,
        memory,
        git,
        secrets: secrets.gateway(&session.spec.vault_ids, &session.resources),
        ..pb::SessionSpec::default()
    };
    session.spec.fill_node_pb(&mut spec);
    spec.env = secrets.env.clone().into_iter().collect();
    if session.spec.telemetry {
        spec.telemetry = Some(pb::AgentTelemetry {
            resource: telemetry_resource(session),
        });
    }
    spec
}

/// The resource attributes the gateway puts on the agent's own telemetry.
fn telemetry_resource(session: &Session) -> std::collections::HashMap<String, String> {
    let mut r = std::collections::HashMap::from([
        ("berth.session_id".to_string(), session.id.to_string()),
        ("berth.project".to_string(), session.project.clone()),
    ]);
    if let Some((agent, version)) = &session.agent {
        r.insert("berth.agent".into(), agent.clone());
        r.insert("berth.agent_version".into(), version.to_string());
    }
    r
}

/// What a session's run needs opened, once per start: its env values, and
/// its secrets by id.
#[derive(Default)]
pub(crate) struct OpenedSecrets {
    pub env: std::collections::BTreeMap<String, String>,
    pub by_id: std::collections::HashMap<String, OpenedSecret>,
    /// The OAuth credentials' access tokens as the run starts with them,
    /// or why one has none (the relay keeps them fresh).
    pub oauth: Vec<(uuid::Uuid, Result<crate::records::Access, String>)>,
}

/// One secret, opened for a run.
pub(crate) struct OpenedSecret {
    pub usage: String,
    /// The value; an OAuth credential's current access token (empty with
    /// `error`).
    pub value: String,
    /// An OAuth credential that could not be refreshed: why.
    pub error: Option<String>,
    /// Credentials: where they go, and how.
    pub hosts: Vec<String>,
    pub header_name: String,
    pub header_prefix: String,
}

impl OpenedSecrets {
    /// What the node's gateway gets: the model API key and the credentials
    /// among the vault's secrets, and the git resources' credentials.
    fn gateway(&self, vault_ids: &[String], resources: &[Resource]) -> Vec<pb::GatewaySecret> {
        let git = resources.iter().filter_map(|r| match r {
            Resource::Git {
                credential: Some(id),
                ..
            } => Some(id),
            _ => None,
        });
        let mut ids: Vec<&String> = vault_ids.iter().chain(git).collect();
        ids.sort();
        ids.dedup();
        ids.into_iter()
            .filter_map(|id| Some((id, self.by_id.get(id)?)))
            .filter_map(|(id, s)| match s.usage.as_str() {
                crate::store::USAGE_ANTHROPIC_API_KEY => Some(pb::GatewaySecret {
                    usage: pb::SecretUsage::AnthropicApiKey as i32,
                    value: s.value.clone(),
                    ..Default::default()
                }),
                usage @ (crate::store::USAGE_HTTP_HEADER | crate::store::USAGE_OAUTH2_REFRESH) => {
                    Some(pb::GatewaySecret {
                        usage: pb::SecretUsage::HttpHeader as i32,
                        value: s.value.clone(),
                        id: id.clone(),
                        hosts: s.hosts.clone(),
                        header_name: s.header_name.clone(),
                        header_prefix: s.header_prefix.clone(),
                        refreshed: usage == crate::store::USAGE_OAUTH2_REFRESH,
                        error: s.error.clone().unwrap_or_default(),
                    })
                }
                _ => None,
            })
            .collect()
    }
}

/// Longest event type name a node may send.
const MAX_TYPE_LEN: usize = 64;

/// A node's line as log events: one per event it made from the line, the
/// first carrying the line byte for byte. A node is trusted to run
/// sessions, not to produce valid events: a bad one is kept, wrapped as
/// `runtime.raw` with the reason, never dropped; a line with no events
/// still gets one, to carry it.
pub(crate) fn node_line(line: pb::RuntimeLine) -> Vec<NewEvent> {
    let mut events: Vec<NewEvent> = line.events.into_iter().map(node_event).collect();
    if events.is_empty() {
        let wrapped = payload::InvalidNodeEvent {
            payload: String::new(),
            node_type: String::new(),
            invalid: true,
            reason: "the node sent a line with no events".into(),
        };
        events.push(NewEvent::new(ev::RUNTIME_RAW, payload::to_json(&wrapped)));
    }
    for (i, e) in events.iter_mut().enumerate() {
        e.line_part = Some(i32::try_from(i).unwrap_or(i32::MAX));
    }
    events[0].raw = Some(line.raw);
    events
}

/// One event a node made, checked: a type name of printable ASCII, and a
/// payload that is a JSON object (kept as sent, byte for byte).
fn node_event(e: pb::RuntimeEvent) -> NewEvent {
    let valid_type = !e.r#type.is_empty()
        && e.r#type.len() <= MAX_TYPE_LEN
        && e.r#type.bytes().all(|b| b.is_ascii_graphic());
    let is_object = e.payload_json.starts_with('{')
        && serde_json::from_str::<serde::de::IgnoredAny>(&e.payload_json).is_ok();
    if valid_type && is_object {
        return NewEvent::new(e.r#type, e.payload_json);
    }
    let reason = if valid_type {
        "payload_json is not a JSON object".to_string()
    } else {
        format!("type must be 1 to {MAX_TYPE_LEN} printable ASCII characters")
    };
    let wrapped = payload::InvalidNodeEvent {
        payload: e.payload_json,
        node_type: e.r#type,
        invalid: true,
        reason,
    };
    NewEvent::new(ev::RUNTIME_RAW, payload::to_json(&wrapped))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(raw: &[u8], events: &[(&str, &str)]) -> pb::RuntimeLine {
        pb::RuntimeLine {
            raw: raw.to_vec(),
            events: events
                .iter()
                .map(|(t, p)| pb::RuntimeEvent {
                    r#type: (*t).into(),
                    payload_json: (*p).into(),
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn a_line_is_stored_once_with_its_first_event_and_kept_verbatim() {
        // \u0000 and odd spacing survive: nothing is re-encoded.
        let raw = br#"{"type":"assistant","message":{"content":[{"type":"text","text":"a\u0000b"},  {"type":"text","text":"c"}]}}"#;
        let text = r#"{"text":"a\u0000b",  "block_index":0}"#;
        let out = node_line(line(
            raw,
            &[
                ("agent.message", text),
                ("agent.message", r#"{"text":"c"}"#),
            ],
        ));
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].raw.as_deref(), Some(&raw[..]));
        assert_eq!(out[0].payload, text);
        assert_eq!(out[1].raw, None, "the line is stored once");
        assert_eq!((out[0].line_part, out[1].line_part), (Some(0), Some(1)));
    }

    #[test]
    fn bad_node_events_are_kept_wrapped_never_dropped() {
        for (kind, p, why) in [
            ("agent.message", "not json", "payload_json"),
            ("bad type\n", "{}", "type"),
            ("x", "[1]", "payload_json"),
        ] {
            let out = node_line(line(b"\xffline", &[(kind, p)]));
            assert_eq!(out.len(), 1);
            assert_eq!(out[0].kind, ev::RUNTIME_RAW);
            assert_eq!(out[0].raw.as_deref(), Some(&b"\xffline"[..]));
            let w: payload::InvalidNodeEvent = payload::parse(&out[0].payload).expect("wrapped");
            assert_eq!(
                (w.payload.as_str(), w.node_type.as_str(), w.invalid),
                (p, kind, true)
            );
            assert!(w.reason.starts_with(why), "{}", w.reason);
        }
        let out = node_line(line(b"lonely", &[]));
        assert_eq!((out.len(), out[0].kind.as_str()), (1, ev::RUNTIME_RAW));
        assert_eq!(out[0].raw.as_deref(), Some(&b"lonely"[..]));
    }
}
