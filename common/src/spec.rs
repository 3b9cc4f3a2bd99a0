//! What an agent runs (image, runtime, prompt, env, limits, skills), and the
//! one validator for it. The dispatcher applies it to every create and agent
//! version; the node applies it again to every `Start`, so a node never
//! trusts a spec only because a dispatcher sent it.

use std::collections::{BTreeMap, HashMap};

use berth_proto::{node::v1 as node_pb, v1 as pb};
use serde::{Deserialize, Serialize};

use crate::names;

/// Limits on what a client may send. Documented in the README.
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
}

/// Where a session may connect beyond the model API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum EgressMode {
    /// The model API only.
    #[default]
    None,
    /// The model API and the hosts in `allow`.
    Allowlist,
    /// Any public host.
    Open,
}

/// A session's egress policy, enforced by the node's gateway.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Egress {
    #[serde(default)]
    pub mode: EgressMode,
    /// `host`, `host:port` or `*.domain[:port]`; no port means 443.
    #[serde(default)]
    pub allow: Vec<String>,
}

impl Egress {
    fn validate(&self) -> Result<(), FieldError> {
        if self.allow.len() > limits::EGRESS_HOSTS {
            return Err(FieldError::new(
                "spec.egress.allow",
                format!("at most {} entries", limits::EGRESS_HOSTS),
            ));
        }
        match self.mode {
            EgressMode::Allowlist if self.allow.is_empty() => {
                return Err(FieldError::new(
                    "spec.egress.allow",
                    "EGRESS_MODE_ALLOWLIST needs at least one host",
                ));
            }
            EgressMode::None | EgressMode::Open if !self.allow.is_empty() => {
                return Err(FieldError::new(
                    "spec.egress.allow",
                    "hosts are only for EGRESS_MODE_ALLOWLIST",
                ));
            }
            _ => {}
        }
        for a in &self.allow {
            let (host, port) = split_host_port(a);
            let name = host.strip_prefix("*.").unwrap_or(host);
            let ok_name = !name.is_empty()
                && name.len() <= 253
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.');
            if !ok_name || port.is_none() {
                return Err(FieldError::new(
                    "spec.egress.allow",
                    format!("`{a}`: expected `host`, `host:port` or `*.domain[:port]`"),
                ));
            }
        }
        Ok(())
    }

    /// Whether the policy lets the session reach `host:port`. (Internal
    /// addresses are refused by the gateway whatever this says.)
    pub fn allows(&self, host: &str, port: u16) -> bool {
        match self.mode {
            EgressMode::None => false,
            EgressMode::Open => true,
            EgressMode::Allowlist => self.allow.iter().any(|a| {
                let (pattern, p) = split_host_port(a);
                if p != Some(port) {
                    return false;
                }
                let host = host.to_ascii_lowercase();
                let pattern = pattern.to_ascii_lowercase();
                match pattern.strip_prefix("*.") {
                    Some(domain) => host.ends_with(&format!(".{domain}")),
                    None => host == pattern,
                }
            }),
        }
    }
}

/// `host[:port]`, the port 443 when absent; `None` for a bad port.
fn split_host_port(s: &str) -> (&str, Option<u16>) {
    match s.rsplit_once(':') {
        Some((h, p)) => (h, p.parse().ok().filter(|p| *p > 0)),
        None => (s, Some(443)),
    }
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

/// Fails when `value` has more than `max` characters.
pub fn check_len(field: &'static str, value: &str, max: usize) -> Result<(), FieldError> {
    if value.chars().count() > max {
        return Err(FieldError::new(
            field,
            format!("longer than {max} characters"),
        ));
    }
    Ok(())
}

/// Env names are shell identifiers (`[A-Za-z_][A-Za-z0-9_]*`), values hold
/// no NUL, and the whole fits the count and size limits.
pub fn validate_env(env: &BTreeMap<String, String>) -> Result<(), FieldError> {
    if env.len() > limits::ENV_VARS {
        return Err(FieldError::new(
            "spec.env",
            format!("at most {} variables", limits::ENV_VARS),
        ));
    }
    let mut bytes = 0;
    for (k, v) in env {
        let ok = !k.is_empty()
            && !k.starts_with(|c: char| c.is_ascii_digit())
            && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !ok {
            return Err(FieldError::new(
                "spec.env",
                format!("bad variable name `{k}`: use [A-Za-z_][A-Za-z0-9_]*"),
            ));
        }
        if v.contains('\0') {
            return Err(FieldError::new(
                "spec.env",
                format!("`{k}` contains a NUL byte"),
            ));
        }
        bytes += k.len() + v.len();
    }
    if bytes > limits::ENV_BYTES {
        return Err(FieldError::new(
            "spec.env",
            format!("{bytes} bytes; the limit is {}", limits::ENV_BYTES),
        ));
    }
    Ok(())
}

/// A path inside the container: absolute, without `..` or NUL, not too long.
pub fn validate_path(field: &'static str, p: &str) -> Result<(), FieldError> {
    if !p.starts_with('/') || p.split('/').any(|seg| seg == "..") || p.contains('\0') {
        return Err(FieldError::new(
            field,
            format!("`{p}` must be an absolute path without `..`"),
        ));
    }
    check_len(field, p, limits::PATH_CHARS)
}

/// A git resource's URL and ref: neither may pass for a git option.
pub fn validate_git(
    url_field: &'static str,
    ref_field: &'static str,
    url: &str,
    git_ref: &str,
) -> Result<(), FieldError> {
    if url.is_empty() || url.starts_with('-') {
        return Err(FieldError::new(
            url_field,
            "must be a repository URL or path",
        ));
    }
    check_len(url_field, url, limits::GIT_URL_CHARS)?;
    if git_ref.starts_with('-') {
        return Err(FieldError::new(ref_field, "must not start with `-`"));
    }
    Ok(())
}

/// Where git resources may come from. By default only `https://` to a
/// host that is not loopback, link-local, private or otherwise internal;
/// never a host path or `file://`. Hosts the operator allowlists
/// (`HOST` or `HOST:PORT`) may also be reached over `http://`, `git://` or
/// `ssh://`, whatever their address. `ssh://` to a public host needs a key
/// (`with_ssh_key`): a secret of the session's.
pub fn check_git_source(
    field: &'static str,
    url: &str,
    allow: &[String],
    with_ssh_key: bool,
) -> Result<(), FieldError> {
    let Some(target) = GitHost::of(url) else {
        return Err(FieldError::new(
            field,
            format!(
                "`{url}` is not a URL: git resources come from https:// (host paths are never cloned)"
            ),
        ));
    };
    let (scheme, host) = (target.scheme, target.host);
    if host.is_empty() {
        return Err(FieldError::new(field, format!("`{url}` names no host")));
    }
    let allowed = target.allowed_by(allow);
    match scheme.to_ascii_lowercase().as_str() {
        "https" => {}
        "ssh" if with_ssh_key => {}
        "http" | "git" | "ssh" if allowed => {}
        other => {
            return Err(FieldError::new(
                field,
                format!(
                    "`{other}://` is not allowed: git resources come from https://, ssh:// with a key (ssh_key_secret), or a host the operator allowlists"
                ),
            ));
        }
    }
    if !allowed && is_internal_host(host) {
        return Err(FieldError::new(
            field,
            format!(
                "`{host}` is an internal address: git resources come from public hosts (or a host the operator allowlists)"
            ),
        ));
    }
    Ok(())
}

/// Where a git URL points: its scheme, its host as written (`HOST` or
/// `HOST:PORT`), and the bare host (no port, no IPv6 brackets).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GitHost<'a> {
    pub scheme: &'a str,
    pub hostport: &'a str,
    pub host: &'a str,
}

impl<'a> GitHost<'a> {
    /// `None` for anything without `scheme://` (a path, scp-like syntax).
    pub fn of(url: &'a str) -> Option<Self> {
        let (scheme, rest) = url.split_once("://")?;
        let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
        let hostport = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
        let host = match hostport.strip_prefix('[') {
            Some(v6) => v6.split(']').next().unwrap_or_default(),
            None => hostport.rsplit_once(':').map_or(hostport, |(h, _)| h),
        };
        Some(Self {
            scheme,
            hostport,
            host,
        })
    }

    /// Whether the operator allowlists it (`HOST` or `HOST:PORT`).
    pub fn allowed_by(&self, allow: &[String]) -> bool {
        allow
            .iter()
            .any(|a| a.eq_ignore_ascii_case(self.hostport) || a.eq_ignore_ascii_case(self.host))
    }
}

/// Whether `host` (a name or an address) is loopback, link-local, private,
/// unspecified or otherwise not a public host.
pub fn is_internal_host(host: &str) -> bool {
    let lower = host.to_ascii_lowercase();
    if lower == "localhost" || lower.ends_with(".localhost") || lower.ends_with(".local") {
        return true;
    }
    match host.parse::<std::net::IpAddr>() {
        Ok(ip) => is_internal_ip(ip),
        Err(_) => false,
    }
}

/// Whether an address is not a public one.
pub fn is_internal_ip(ip: std::net::IpAddr) -> bool {
    match ip {
        std::net::IpAddr::V4(v4) => {
            v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || v4.is_documentation()
                // 100.64.0.0/10, shared address space.
                || (v4.octets()[0] == 100 && (v4.octets()[1] & 0xc0) == 64)
        }
        std::net::IpAddr::V6(v6) => {
            v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                // fc00::/7 unique local, fe80::/10 link-local.
                || (v6.segments()[0] & 0xfe00) == 0xfc00
                || (v6.segments()[0] & 0xffc0) == 0xfe80
                || v6.to_ipv4_mapped().is_some_and(|v4| is_internal_ip(v4.into()))
        }
    }
}

fn runtime_from_pb(value: i32) -> Result<Runtime, FieldError> {
    match pb::Runtime::try_from(value) {
        Ok(pb::Runtime::Unspecified | pb::Runtime::ClaudeCode) => Ok(Runtime::ClaudeCode),
        Ok(pb::Runtime::Jsonl) => Ok(Runtime::Jsonl),
        Err(_) => Err(FieldError::new(
            "spec.runtime",
            format!("unknown runtime {value}"),
        )),
    }
}

fn egress_from_pb(e: Option<pb::Egress>) -> Result<Egress, FieldError> {
    let e = e.unwrap_or_default();
    let mode = match pb::EgressMode::try_from(e.mode) {
        Ok(pb::EgressMode::Unspecified | pb::EgressMode::None) => EgressMode::None,
        Ok(pb::EgressMode::Allowlist) => EgressMode::Allowlist,
        Ok(pb::EgressMode::Open) => EgressMode::Open,
        Err(_) => {
            return Err(FieldError::new(
                "spec.egress.mode",
                format!("unknown mode {}", e.mode),
            ));
        }
    };
    Ok(Egress {
        mode,
        allow: e.allow,
    })
}

fn egress_to_pb(e: &Egress) -> pb::Egress {
    pb::Egress {
        mode: match e.mode {
            EgressMode::None => pb::EgressMode::None,
            EgressMode::Allowlist => pb::EgressMode::Allowlist,
            EgressMode::Open => pb::EgressMode::Open,
        } as i32,
        allow: e.allow.clone(),
    }
}

impl Egress {
    /// The node wire's form.
    pub fn to_node_pb(&self) -> node_pb::Egress {
        let e = egress_to_pb(self);
        node_pb::Egress {
            mode: e.mode,
            allow: e.allow,
        }
    }

    /// From the node wire, checked.
    pub fn from_node_pb(e: Option<&node_pb::Egress>) -> Result<Self, FieldError> {
        let e = e.cloned().unwrap_or_default();
        let egress = egress_from_pb(Some(pb::Egress {
            mode: e.mode,
            allow: e.allow,
        }))?;
        egress.validate()?;
        Ok(egress)
    }
}

fn runtime_to_pb(r: Runtime) -> i32 {
    match r {
        Runtime::ClaudeCode => pb::Runtime::ClaudeCode as i32,
        Runtime::Jsonl => pb::Runtime::Jsonl as i32,
    }
}

/// The public API's spec, checked. Env is converted, not echoed back: it is
/// write-only on the wire.
impl TryFrom<pb::SessionSpec> for AgentSpec {
    type Error = FieldError;

    fn try_from(s: pb::SessionSpec) -> Result<Self, FieldError> {
        let lim = s.limits.unwrap_or_default();
        let spec = Self {
            runtime: runtime_from_pb(s.runtime)?,
            image: s.image,
            runtime_args: s.runtime_args,
            model: s.model,
            system_prompt: s.system_prompt,
            env: s.env.into_iter().collect(),
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
            vault_ids: s
                .vault_ids
                .into_iter()
                .map(|v| {
                    v.strip_prefix("secrets/")
                        .unwrap_or(&v)
                        .to_ascii_lowercase()
                })
                .collect(),
            egress: egress_from_pb(s.egress)?,
            tool_policy: s
                .tool_policy
                .map(crate::tools::ToolPolicy::from_pb)
                .transpose()?,
        };
        spec.validate()?;
        Ok(spec)
    }
}

/// The spec as clients read it: env values are write-only and left out.
impl From<AgentSpec> for pb::SessionSpec {
    fn from(s: AgentSpec) -> Self {
        Self {
            image: s.image,
            runtime: runtime_to_pb(s.runtime),
            runtime_args: s.runtime_args,
            model: s.model,
            system_prompt: s.system_prompt,
            env: HashMap::new(),
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
            egress: Some(egress_to_pb(&s.egress)),
            vault_ids: s.vault_ids,
            tool_policy: s.tool_policy.as_ref().map(crate::tools::ToolPolicy::to_pb),
        }
    }
}

/// `AgentSpec` and `SessionSpec` carry the same fields on the wire; this is
/// the one place that says so.
pub fn agent_pb_to_session_pb(s: pb::AgentSpec) -> pb::SessionSpec {
    pb::SessionSpec {
        image: s.image,
        runtime: s.runtime,
        runtime_args: s.runtime_args,
        model: s.model,
        system_prompt: s.system_prompt,
        env: s.env,
        limits: s.limits,
        skills: s.skills,
        vault_ids: s.vault_ids,
        egress: s.egress,
        tool_policy: s.tool_policy,
    }
}

/// The other direction of [`agent_pb_to_session_pb`].
pub fn session_pb_to_agent_pb(s: pb::SessionSpec) -> pb::AgentSpec {
    pb::AgentSpec {
        image: s.image,
        runtime: s.runtime,
        runtime_args: s.runtime_args,
        model: s.model,
        system_prompt: s.system_prompt,
        env: s.env,
        limits: s.limits,
        skills: s.skills,
        vault_ids: s.vault_ids,
        egress: s.egress,
        tool_policy: s.tool_policy,
    }
}

/// What the node reads from a `Start`: the agent's part of the node spec.
pub fn from_node_pb(s: &node_pb::SessionSpec) -> Result<AgentSpec, FieldError> {
    let lim = s.limits.unwrap_or_default();
    let spec = AgentSpec {
        image: s.image.clone(),
        runtime: runtime_from_pb(s.runtime)?,
        runtime_args: s.runtime_args.clone(),
        model: s.model.clone(),
        system_prompt: s.system_prompt.clone(),
        env: s.env.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        limits: Limits {
            cpus: lim.cpus,
            memory_bytes: lim.memory_bytes,
            pids: lim.pids,
        },
        skills: s
            .skills
            .iter()
            .map(|k| Skill {
                name: k.name.clone(),
                content: k.content.clone(),
            })
            .collect(),
        // Secrets reach the node as values (`secrets`), never as ids.
        vault_ids: Vec::new(),
        egress: Egress::from_node_pb(s.egress.as_ref())?,
        tool_policy: s
            .tool_policy
            .as_ref()
            .map(crate::tools::ToolPolicy::from_node_pb)
            .transpose()?,
    };
    spec.validate()?;
    Ok(spec)
}

impl AgentSpec {
    /// Fills the agent's part of a node spec (the rest is the session's).
    pub fn fill_node_pb(&self, out: &mut node_pb::SessionSpec) {
        out.image = self.image.clone();
        out.runtime = match self.runtime {
            Runtime::ClaudeCode => node_pb::Runtime::ClaudeCode as i32,
            Runtime::Jsonl => node_pb::Runtime::Jsonl as i32,
        };
        out.runtime_args = self.runtime_args.clone();
        out.model = self.model.clone();
        out.system_prompt = self.system_prompt.clone();
        out.env = self.env.clone().into_iter().collect();
        out.limits = Some(node_pb::Limits {
            cpus: self.limits.cpus,
            memory_bytes: self.limits.memory_bytes,
            pids: self.limits.pids,
        });
        out.skills = self
            .skills
            .iter()
            .map(|k| node_pb::Skill {
                name: k.name.clone(),
                content: k.content.clone(),
            })
            .collect();
        out.egress = Some(self.egress.to_node_pb());
        out.tool_policy = self
            .tool_policy
            .as_ref()
            .map(crate::tools::ToolPolicy::to_node_pb);
    }
}

#[cfg(test)]
mod tests {
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
        let mut api = pb::SessionSpec::from(s.clone());
        assert!(api.env.is_empty(), "env is write-only");
        api.env.insert("K".into(), "v".into());
        assert_eq!(AgentSpec::try_from(api), Ok(s));
    }
}

#[cfg(test)]
mod git_sources {
    use super::check_git_source;

    #[test]
    fn only_public_https_unless_allowlisted() {
        let none: Vec<String> = Vec::new();
        for ok in [
            "https://github.com/a/b.git",
            "https://user@example.com:8443/x",
        ] {
            assert!(check_git_source("f", ok, &none, false).is_ok(), "{ok}");
        }
        for bad in [
            "/etc",
            "./repo",
            "file:///etc",
            "http://example.com/x",
            "git://example.com/x",
            "ssh://git@example.com/x",
            "https://127.0.0.1/x",
            "https://localhost/x",
            "https://10.1.2.3/x",
            "https://192.168.0.1/x",
            "https://169.254.169.254/latest",
            "https://[::1]/x",
            "https://[fd00::1]/x",
            "https:///x",
        ] {
            let e = check_git_source("resources.git.url", bad, &none, false).expect_err(bad);
            assert_eq!(e.field, "resources.git.url");
        }
        let allow = vec!["127.0.0.1:9418".to_string()];
        assert!(check_git_source("f", "http://127.0.0.1:9418/r.git", &allow, false).is_ok());
        assert!(check_git_source("f", "http://127.0.0.1:9419/r.git", &allow, false).is_err());
        assert!(check_git_source("f", "file:///etc", &allow, false).is_err());
        // ssh: a key opens public hosts, never internal ones by itself.
        assert!(check_git_source("f", "ssh://git@github.com/o/r.git", &none, false).is_err());
        assert!(check_git_source("f", "ssh://git@github.com/o/r.git", &none, true).is_ok());
        assert!(check_git_source("f", "ssh://git@127.0.0.1:22/r.git", &none, true).is_err());
    }
}
