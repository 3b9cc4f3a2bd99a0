//! The node wire ↔ the dispatcher's domain, in one place: the spec a `Start`
//! carries, and the events a node sends.

use berth_common::events::{self as ev, payload};
use berth_proto::node::v1 as pb;

use crate::session::{NewEvent, Resource, Runtime, Session, file_key, memory_key, snapshot_key};

/// What the node needs to run `session`'s next run.
pub(crate) fn node_spec(session: &Session) -> pb::SessionSpec {
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
                    key: memory_key(agent, store),
                    path: path.clone(),
                    write_back: *read_write,
                });
            }
            Resource::Git { url, git_ref, path } => git.push(pb::GitClone {
                url: url.clone(),
                r#ref: git_ref.clone(),
                path: path.clone(),
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
        evict_snapshot_key: snapshot_key(session.id, session.snapshots + 1),
        files,
        memory,
        git,
        ..pb::SessionSpec::default()
    };
    session.spec.fill_node_pb(&mut spec);
    spec
}

/// A node's runtime event as a log event. A node is trusted to run sessions,
/// not to produce valid JSON: a bad payload is kept, wrapped, never dropped.
pub(crate) fn node_event(e: pb::RuntimeEvent) -> NewEvent {
    let valid_type = !e.r#type.is_empty()
        && e.r#type.len() <= 64
        && e.r#type.bytes().all(|b| b.is_ascii_graphic());
    let is_object = e.payload_json.starts_with('{')
        && serde_json::from_str::<serde::de::IgnoredAny>(&e.payload_json).is_ok();
    // Postgres jsonb cannot hold U+0000.
    let payload = if e.payload_json.contains("\\u0000") {
        e.payload_json.replace("\\u0000", "\\ufffd")
    } else {
        e.payload_json
    };
    if valid_type && is_object {
        NewEvent::new(e.r#type, payload)
    } else {
        let wrapped = payload::InvalidNodeEvent {
            raw: payload,
            node_type: e.r#type,
            invalid: true,
        };
        NewEvent::new(ev::RUNTIME_RAW, payload::to_json(&wrapped))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(kind: &str, payload: &str) -> pb::RuntimeEvent {
        pb::RuntimeEvent {
            r#type: kind.into(),
            payload_json: payload.into(),
            ..Default::default()
        }
    }

    #[test]
    fn bad_node_events_are_kept_wrapped_never_dropped() {
        let ok = node_event(event("agent.message", r#"{"text":"hi"}"#));
        assert_eq!(
            (ok.kind.as_str(), ok.payload.as_str()),
            ("agent.message", r#"{"text":"hi"}"#)
        );
        for (kind, p) in [
            ("agent.message", "not json"),
            ("bad type\n", "{}"),
            ("x", "[1]"),
        ] {
            let e = node_event(event(kind, p));
            assert_eq!(e.kind, ev::RUNTIME_RAW);
            let w: payload::InvalidNodeEvent = payload::parse(&e.payload).expect("wrapped");
            assert_eq!(
                (w.raw.as_str(), w.node_type.as_str(), w.invalid),
                (p, kind, true)
            );
        }
    }
}
