//! What an agent runs (image, runtime, prompt, env, limits, skills), and the
//! one validator for it. The dispatcher applies it to every create and agent
//! version; the node applies it again to every `Start`, so a node never
//! trusts a spec only because a dispatcher sent it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::names;

mod egress;
mod fields;
pub mod mcp;
mod sources;
mod wire;

pub use egress::{Egress, EgressMode, check_host_pattern, host_matches};
pub use fields::{check_len, validate_env, validate_git, validate_path};
pub use mcp::{McpServer, McpTransport};
pub use sources::{GitHost, check_git_source, is_internal_host, is_internal_ip, target_of};
pub use wire::from_node_pb;

/// Limits on what a client may send. Documented in docs/limits.md.
pub mod limits {
    /// Largest user message, in bytes.
    pub const MESSAGE_BYTES: usize = 1024 * 1024;
    pub const REQUEST_ID_CHARS: usize = 128;
    pub const DISPLAY_NAME_CHARS: usize = 256;
    pub const LABELS: usize = 64;
    pub const LABEL_KEY_CHARS: usize = 63;
    pub const LABEL_VALUE_CHARS: usize = 256;
    pub const ENV_VARS: usize = 128;
    pub const ENV_BYTES: usize = 64 * 1024;
    pub const RUNTIME_ARGS: usize = 64;
    pub const IMAGE_CHARS: usize = 512;
    /// Resources attached to one session.
    pub const RESOURCES: usize = 32;
    pub const SKILLS: usize = 32;
    pub const SKILL_BYTES: usize = 256 * 1024;
    /// Largest uploaded file.
    pub const FILE_BYTES: usize = 32 * 1024 * 1024;
    pub const SYSTEM_PROMPT_BYTES: usize = 256 * 1024;
    pub const PATH_CHARS: usize = 1024;
    pub const GIT_URL_CHARS: usize = 2048;
    /// Smallest memory limit a session may ask for.
    pub const MIN_MEMORY_BYTES: i64 = 64 * 1024 * 1024;
    /// Largest memory limit any spec may ask for (a node checks its own).
    pub const MAX_MEMORY_BYTES: i64 = 4 * 1024 * 1024 * 1024 * 1024;
    /// Most CPUs any spec may ask for (a node checks its own).
    pub const MAX_CPUS: f64 = 1024.0;
    /// Most processes any spec may ask for.
    pub const MAX_PIDS: i64 = 4_194_304;
    /// Secrets one session may use.
    pub const VAULT_IDS: usize = 16;
    /// Hosts in one egress allowlist.
    pub const EGRESS_HOSTS: usize = 64;
}

pub use crate::field::FieldError;

/// Which runtime adapter drives the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Runtime {
    #[default]
    ClaudeCode,
    Jsonl,
}

/// What runs in a session's container. Stored as JSON (sessions and agent
/// versions); field names are part of that format.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct AgentSpec {
    pub image: String,
    pub runtime: Runtime,
    #[serde(default)]
    pub runtime_args: Vec<String>,
    #[serde(default)]
    pub model: String,
    #[serde(default)]
    pub system_prompt: String,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub skills: Vec<Skill>,
    /// Secrets (by id) the node's gateway attaches to the session's traffic.
    #[serde(default)]
    pub vault_ids: Vec<String>,
    #[serde(default)]
    pub egress: Egress,
    /// Tool approvals; `None`: the defaults.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_policy: Option<crate::tools::ToolPolicy>,
    /// MCP servers (claude-code).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mcp_servers: Vec<McpServer>,
    /// The agent exports its own OpenTelemetry metrics and events through
    /// the node's gateway (claude-code).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub telemetry: bool,
}

/// Container limits; zero means the node's default.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
pub struct Limits {
    #[serde(default)]
    pub cpus: f64,
    #[serde(default)]
    pub memory_bytes: i64,
    #[serde(default)]
    pub pids: i64,
}

impl Limits {
    /// Whether every limit is the node's default.
    pub fn is_default(&self) -> bool {
        *self == Self::default()
    }

    pub fn cpus(&self) -> Option<f64> {
        (self.cpus > 0.0).then_some(self.cpus)
    }

    pub fn memory_bytes(&self) -> Option<i64> {
        (self.memory_bytes > 0).then_some(self.memory_bytes)
    }

    pub fn pids(&self) -> Option<i64> {
        (self.pids > 0).then_some(self.pids)
    }
}

/// A Claude Code skill, written to `~/.claude/skills/{name}/SKILL.md`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Skill {
    pub name: String,
    pub content: String,
}

impl AgentSpec {
    /// Checks every field, naming the first that is wrong (`spec.…`).
    pub fn validate(&self) -> Result<(), FieldError> {
        if self.image.trim().is_empty() {
            return Err(FieldError::new("spec.image", "required"));
        }
        check_len("spec.image", &self.image, limits::IMAGE_CHARS)?;
        if self.runtime == Runtime::Jsonl && self.runtime_args.is_empty() {
            return Err(FieldError::new(
                "spec.runtime_args",
                "the jsonl runtime needs the program to run",
            ));
        }
        if self.runtime_args.len() > limits::RUNTIME_ARGS {
            return Err(FieldError::new(
                "spec.runtime_args",
                format!("at most {} arguments", limits::RUNTIME_ARGS),
            ));
        }
        validate_env(&self.env)?;
        if self.vault_ids.len() > limits::VAULT_IDS {
            return Err(FieldError::new(
                "spec.vault_ids",
                format!("at most {} secrets", limits::VAULT_IDS),
            ));
        }
        for id in &self.vault_ids {
            let ok = id.len() == 36
                && id
                    .chars()
                    .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c) || c == '-');
            if !ok {
                return Err(FieldError::new(
                    "spec.vault_ids",
                    format!("`{id}` is not a secret id (`secrets/{{uuid}}` or the uuid)"),
                ));
            }
        }
        self.egress.validate()?;
        mcp::validate(&self.mcp_servers)?;
        if let Some(p) = &self.tool_policy {
            p.validate()?;
        }
        if self.system_prompt.len() > limits::SYSTEM_PROMPT_BYTES {
            return Err(FieldError::new(
                "spec.system_prompt",
                format!("longer than {} bytes", limits::SYSTEM_PROMPT_BYTES),
            ));
        }
        let l = &self.limits;
        if !(l.cpus >= 0.0 && l.cpus <= limits::MAX_CPUS) {
            return Err(FieldError::new(
                "spec.limits.cpus",
                format!(
                    "must be 0 (node default) or positive, at most {}",
                    limits::MAX_CPUS
                ),
            ));
        }
        if l.memory_bytes != 0
            && !(limits::MIN_MEMORY_BYTES..=limits::MAX_MEMORY_BYTES).contains(&l.memory_bytes)
        {
            return Err(FieldError::new(
                "spec.limits.memory_bytes",
                "must be 0 (node default), or from 64 MiB to 4 TiB",
            ));
        }
        if !(0..=limits::MAX_PIDS).contains(&l.pids) {
            return Err(FieldError::new(
                "spec.limits.pids",
                format!(
                    "must be 0 (node default) or positive, at most {}",
                    limits::MAX_PIDS
                ),
            ));
        }
        if self.skills.len() > limits::SKILLS {
            return Err(FieldError::new(
                "spec.skills",
                format!("at most {} skills", limits::SKILLS),
            ));
        }
        for k in &self.skills {
            if !names::is_simple_name(&k.name) {
                return Err(FieldError::new(
                    "spec.skills.name",
                    format!("`{}`: 1-64 of [A-Za-z0-9_-]", k.name),
                ));
            }
            if k.content.len() > limits::SKILL_BYTES {
                return Err(FieldError::new(
                    "spec.skills.content",
                    format!(
                        "skill `{}` is longer than {} bytes",
                        k.name,
                        limits::SKILL_BYTES
                    ),
                ));
            }
        }
        Ok(())
    }

    /// `KEY=value` pairs for Docker's exec API.
    pub fn env_pairs(&self) -> Vec<String> {
        self.env.iter().map(|(k, v)| format!("{k}={v}")).collect()
    }
}

#[cfg(test)]
mod tests {
    use berth_proto::{node::v1 as node_pb, v1 as pb};

    use super::*;

    fn spec() -> AgentSpec {
        AgentSpec {
            image: "agent:latest".into(),
            ..AgentSpec::default()
        }
    }

    #[test]
    fn egress_allowlists_match_host_and_port_exactly() {
        let e = Egress {
            mode: EgressMode::Allowlist,
            allow: vec![
                "pypi.org".into(),
                "*.github.com".into(),
                "git.local:8443".into(),
            ],
        };
        e.validate().expect("should succeed");
        assert!(e.allows("pypi.org", 443));
        assert!(e.allows("PyPI.org", 443));
        assert!(!e.allows("pypi.org", 80));
        assert!(!e.allows("evil-pypi.org", 443));
        assert!(e.allows("api.github.com", 443));
        assert!(!e.allows("github.com", 443));
        assert!(!e.allows("github.com.evil.net", 443));
        assert!(e.allows("git.local", 8443));
        assert!(!Egress::default().allows("pypi.org", 443));
        let open = Egress {
            mode: EgressMode::Open,
            allow: vec![],
        };
        assert!(open.allows("anything.example", 1234));
        for bad in ["", "a b", "host:0", "host:x", "*.:1"] {
            let e = Egress {
                mode: EgressMode::Allowlist,
                allow: vec![bad.into()],
            };
            assert_eq!(
                e.validate().expect_err("should fail").field,
                "spec.egress.allow",
                "{bad}"
            );
        }
    }

    #[test]
    fn each_bad_field_is_named() {
        type Mutate = Box<dyn Fn(&mut AgentSpec)>;
        let cases: Vec<(&str, Mutate)> = vec![
            ("spec.image", Box::new(|s| s.image = " ".into())),
            (
                "spec.runtime_args",
                Box::new(|s| s.runtime = Runtime::Jsonl),
            ),
            (
                "spec.env",
                Box::new(|s| {
                    s.env.insert("1X".into(), "v".into());
                }),
            ),
            (
                "spec.env",
                Box::new(|s| {
                    s.env.insert("X".into(), "a\0b".into());
                }),
            ),
            ("spec.limits.cpus", Box::new(|s| s.limits.cpus = f64::NAN)),
            (
                "spec.limits.memory_bytes",
                Box::new(|s| s.limits.memory_bytes = 1024),
            ),
            ("spec.limits.pids", Box::new(|s| s.limits.pids = -1)),
            (
                "spec.skills.name",
                Box::new(|s| {
                    s.skills.push(Skill {
                        name: "../x".into(),
                        content: String::new(),
                    })
                }),
            ),
        ];
        for (field, mutate) in cases {
            let mut s = spec();
            mutate(&mut s);
            assert_eq!(s.validate().map_err(|e| e.field), Err(field));
        }
        assert_eq!(spec().validate(), Ok(()));
    }

    #[test]
    fn paths_and_git_refs_cannot_escape_or_pass_as_options() {
        assert!(validate_path("p", "/workspace/a").is_ok());
        for bad in ["workspace", "/workspace/../etc", "/a\0b"] {
            assert!(validate_path("p", bad).is_err(), "{bad}");
        }
        assert!(validate_git("u", "r", "--upload-pack=x", "").is_err());
        assert!(validate_git("u", "r", "https://h/r.git", "-x").is_err());
        assert!(validate_git("u", "r", "https://h/r.git", "main").is_ok());
    }

    #[test]
    fn the_api_and_node_forms_carry_the_same_spec() {
        let mut s = spec();
        s.env.insert("K".into(), "v".into());
        s.limits.pids = 7;
        let mut node = node_pb::SessionSpec::default();
        s.fill_node_pb(&mut node);
        assert_eq!(from_node_pb(&node), Ok(s.clone()));
        let mut api = pb::AgentSpec::from(s.clone());
        assert!(api.env.is_empty(), "env is write-only");
        api.env.insert("K".into(), "v".into());
        assert_eq!(AgentSpec::try_from(api), Ok(s));
    }
}
