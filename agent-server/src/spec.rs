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
    pub limits: Limits,
    /// (name, SKILL.md content).
    pub skills: Vec<(String, String)>,
    pub restore_snapshot_key: String,
    /// Where to save a snapshot if a drain evicts the run.
    pub evict_snapshot_key: String,
    pub files: Vec<FileCopy>,
    pub memory: Vec<MemoryCopy>,
    pub git: Vec<GitClone>,
}

/// Per-session container limits; `None` = the node's default.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Limits {
    pub cpus: Option<f64>,
    pub memory_bytes: Option<i64>,
    pub pids: Option<i64>,
}

impl Limits {
    pub fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

#[derive(Debug, Clone)]
pub struct FileCopy {
    pub key: String,
    pub path: String,
}

#[derive(Debug, Clone)]
pub struct MemoryCopy {
    pub key: String,
    pub path: String,
    pub write_back: bool,
}

#[derive(Debug, Clone)]
pub struct GitClone {
    pub url: String,
    pub git_ref: String,
    pub path: String,
}

/// Smallest memory limit a session may ask for.
const MIN_MEMORY_BYTES: i64 = 64 * 1024 * 1024;

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
        let limits = match s.limits {
            None => Limits::default(),
            Some(l) => {
                if !(l.cpus >= 0.0 && l.cpus.is_finite()) {
                    return Err(Error::invalid("spec.limits.cpus", "must be 0 or positive"));
                }
                if l.memory_bytes != 0 && l.memory_bytes < MIN_MEMORY_BYTES {
                    return Err(Error::invalid(
                        "spec.limits.memory_bytes",
                        "must be 0 or at least 64 MiB",
                    ));
                }
                if l.pids < 0 {
                    return Err(Error::invalid("spec.limits.pids", "must be 0 or positive"));
                }
                Limits {
                    cpus: (l.cpus > 0.0).then_some(l.cpus),
                    memory_bytes: (l.memory_bytes > 0).then_some(l.memory_bytes),
                    pids: (l.pids > 0).then_some(l.pids),
                }
            }
        };
        for sk in &s.skills {
            if !berth_common::names::is_simple_name(&sk.name) {
                return Err(Error::invalid(
                    "spec.skills.name",
                    format!("`{}`: letters, digits, `-` and `_` only, up to 64", sk.name),
                ));
            }
        }
        if s.git
            .iter()
            .any(|g| g.url.is_empty() || g.url.starts_with('-'))
        {
            return Err(Error::invalid(
                "spec.git.url",
                "must be a repository URL or path",
            ));
        }
        if s.git.iter().any(|g| g.r#ref.starts_with('-')) {
            return Err(Error::invalid("spec.git.ref", "must not start with `-`"));
        }
        Ok(Self {
            image: s.image,
            runtime,
            runtime_args: s.runtime_args,
            model: s.model,
            system_prompt: s.system_prompt,
            env: s.env.into_iter().collect(),
            resume_id: s.resume_id,
            limits,
            skills: s.skills.into_iter().map(|k| (k.name, k.content)).collect(),
            restore_snapshot_key: s.restore_snapshot_key,
            evict_snapshot_key: s.evict_snapshot_key,
            files: s
                .files
                .into_iter()
                .map(|f| FileCopy {
                    key: f.key,
                    path: f.path,
                })
                .collect(),
            memory: s
                .memory
                .into_iter()
                .map(|m| MemoryCopy {
                    key: m.key,
                    path: m.path,
                    write_back: m.write_back,
                })
                .collect(),
            git: s
                .git
                .into_iter()
                .map(|g| GitClone {
                    url: g.url,
                    git_ref: g.r#ref,
                    path: g.path,
                })
                .collect(),
        })
    }
}

impl SessionSpec {
    /// Every path the spec names lies in a writable volume of the container.
    pub fn check_paths(&self, layout: &crate::workspace::Layout) -> Result<(), Error> {
        let paths = self
            .files
            .iter()
            .map(|f| ("spec.files.path", &f.path))
            .chain(self.memory.iter().map(|m| ("spec.memory.path", &m.path)))
            .chain(self.git.iter().map(|g| ("spec.git.path", &g.path)));
        for (field, path) in paths {
            layout.check(path).map_err(|e| Error::invalid(field, e))?;
        }
        Ok(())
    }

    /// `KEY=value` pairs for Docker's exec API.
    pub fn env_pairs(&self) -> Vec<String> {
        self.env.iter().map(|(k, v)| format!("{k}={v}")).collect()
    }
}
