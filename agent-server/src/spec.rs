//! The node's view of what a session runs, converted from the wire once.

use std::collections::BTreeMap;

use berth_proto::node::v1 as pb;

use crate::error::Error;

/// Which adapter drives the agent process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RuntimeKind {
    ClaudeCode,
    Jsonl,
}

/// A validated session spec.
#[derive(Debug, Clone)]
pub struct SessionSpec {
    pub image: String,
    pub runtime: RuntimeKind,
    pub runtime_args: Vec<String>,
    pub model: String,
    pub system_prompt: String,
    pub env: BTreeMap<String, String>,
    pub resume_id: String,
}

impl TryFrom<pb::SessionSpec> for SessionSpec {
    type Error = Error;

    fn try_from(s: pb::SessionSpec) -> Result<Self, Error> {
        if s.image.trim().is_empty() {
            return Err(Error::invalid("spec.image", "must not be empty"));
        }
        let runtime = match pb::Runtime::try_from(s.runtime) {
            Ok(pb::Runtime::ClaudeCode | pb::Runtime::Unspecified) => RuntimeKind::ClaudeCode,
            Ok(pb::Runtime::Jsonl) => RuntimeKind::Jsonl,
            Err(_) => {
                return Err(Error::invalid(
                    "spec.runtime",
                    format!("unknown runtime {}", s.runtime),
                ));
            }
        };
        if runtime == RuntimeKind::Jsonl && s.runtime_args.is_empty() {
            return Err(Error::invalid(
                "spec.runtime_args",
                "the jsonl runtime needs the program to run",
            ));
        }
        for key in s.env.keys() {
            if key.is_empty() || key.contains('=') || key.contains('\0') {
                return Err(Error::invalid(
                    "spec.env",
                    format!("bad variable name `{key}`"),
                ));
            }
        }
        Ok(Self {
            image: s.image,
            runtime,
            runtime_args: s.runtime_args,
            model: s.model,
            system_prompt: s.system_prompt,
            env: s.env.into_iter().collect(),
            resume_id: s.resume_id,
        })
    }
}

impl SessionSpec {
    /// `KEY=value` pairs for Docker's exec API.
    pub fn env_pairs(&self) -> Vec<String> {
        self.env.iter().map(|(k, v)| format!("{k}={v}")).collect()
    }
}
