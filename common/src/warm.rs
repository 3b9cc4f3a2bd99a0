//! Which sessions can take a pre-started agent process, and the key of the
//! agent pool that holds such processes.
//!
//! A pre-started process was started before its session existed, so it can
//! only stand for sessions whose process would have been started the same
//! way: the same image, runtime, arguments, model, system prompt, skills,
//! limits, egress policy and tool policy, and nothing of the session's own
//! that enters the process at its start. The key is a digest of exactly
//! those fields; the dispatcher (to place on a node with a ready process)
//! and the node (to claim one) compute it from the same wire spec.
//!
//! Not eligible (a warm container and a cold process instead):
//! - a resume (`resume_id`): the runtime takes the id on its command line;
//! - a restored snapshot, files, memory stores or git clones: the agent
//!   would start before they are in place;
//! - any env value: env may hold secrets, and a warm process holds none;
//! - a remote MCP server: the agent connects to it as it starts, through
//!   the gateway route of a session that does not exist yet.
//!
//! The model API key is not part of the process: the node's egress gateway
//! attaches it at egress. Only *whether* the session has one is in the key
//! (it decides where the process sends model API calls).

use berth_proto::node::v1 as node_pb;
use prost::Message;
use sha2::{Digest, Sha256};

/// The agent pool key for `spec`, or `None` when a pre-started process
/// cannot serve it (see the module docs).
pub fn agent_key(spec: &node_pb::SessionSpec) -> Option<String> {
    template(spec).map(|t| key_of(&t))
}

/// What a pre-started process for `spec` is started from: the spec less
/// this run's fields and every secret value. `None` when none can serve it.
pub fn template(spec: &node_pb::SessionSpec) -> Option<node_pb::SessionSpec> {
    let eligible = spec.runtime != node_pb::Runtime::Unspecified as i32
        && !spec.image.is_empty()
        && spec.resume_id.is_empty()
        && spec.restore_snapshot_key.is_empty()
        && spec.files.is_empty()
        && spec.memory.is_empty()
        && spec.git.is_empty()
        && spec.env.is_empty()
        // The CLI connects to remote MCP servers as it starts, before a
        // session (and its gateway route) exists.
        && spec.mcp_servers.iter().all(|m| m.url.is_empty())
        // Its exporter's settings are the session's (its resource).
        && spec.telemetry.is_none();
    if !eligible {
        return None;
    }
    let mut shape = spec.clone();
    // This run's, not the process's.
    shape.evict_snapshot_key.clear();
    shape.checkpoint_key_prefix.clear();
    // Which secrets the gateway attaches shapes the process's env (where it
    // sends model calls); their values never reach it.
    for s in &mut shape.secrets {
        s.value.clear();
    }
    shape.secrets.sort_by_key(|s| s.usage);
    shape.secrets.dedup_by_key(|s| s.usage);
    Some(shape)
}

/// The key of a [`template`].
pub fn key_of(template: &node_pb::SessionSpec) -> String {
    let digest = Sha256::digest(template.encode_to_vec());
    let hex: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    format!("agent-{hex}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> node_pb::SessionSpec {
        node_pb::SessionSpec {
            image: "img:1".into(),
            runtime: node_pb::Runtime::ClaudeCode as i32,
            model: "claude-sonnet-4-5".into(),
            system_prompt: "be brief".into(),
            ..Default::default()
        }
    }

    #[test]
    fn the_key_follows_the_agent_and_not_the_run() {
        let a = agent_key(&spec()).expect("eligible");
        assert!(a.starts_with("agent-") && a.len() == 22, "{a}");
        let mut run = spec();
        run.evict_snapshot_key = "snapshots/x".into();
        run.checkpoint_key_prefix = "checkpoints/x/".into();
        assert_eq!(agent_key(&run).as_deref(), Some(a.as_str()));
        let mut other = spec();
        other.system_prompt = "be verbose".into();
        assert_ne!(agent_key(&other).as_deref(), Some(a.as_str()));
        let mut skill = spec();
        skill.skills.push(node_pb::Skill {
            name: "s".into(),
            content: "c".into(),
        });
        assert_ne!(agent_key(&skill).as_deref(), Some(a.as_str()));
    }

    #[test]
    fn a_key_value_never_shapes_the_key_but_having_one_does() {
        let key = |v: &str| {
            let mut s = spec();
            s.secrets.push(node_pb::GatewaySecret {
                usage: node_pb::SecretUsage::AnthropicApiKey as i32,
                value: v.into(),
                ..Default::default()
            });
            agent_key(&s)
        };
        assert_eq!(key("sk-one"), key("sk-two"));
        let mut s = spec();
        s.secrets.push(node_pb::GatewaySecret {
            usage: node_pb::SecretUsage::AnthropicApiKey as i32,
            value: "sk-one".into(),
            ..Default::default()
        });
        let t = template(&s).expect("eligible");
        assert!(
            !format!("{t:?}").contains("sk-one"),
            "no secret in a template"
        );
        assert_ne!(key("sk-one"), agent_key(&spec()));
    }

    #[test]
    fn resumes_resources_and_env_take_no_pre_started_process() {
        let cases: Vec<fn(&mut node_pb::SessionSpec)> = vec![
            |s| s.resume_id = "abc".into(),
            |s| s.restore_snapshot_key = "snap".into(),
            |s| s.files.push(Default::default()),
            |s| s.memory.push(Default::default()),
            |s| s.git.push(Default::default()),
            |s| {
                s.env.insert("TOKEN".into(), "x".into());
            },
            |s| s.runtime = 0,
        ];
        for (i, change) in cases.into_iter().enumerate() {
            let mut s = spec();
            change(&mut s);
            assert_eq!(agent_key(&s), None, "case {i}");
        }
    }
}
