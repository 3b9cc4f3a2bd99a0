//! What a create carries: the session's spec, resources, run parameters
//! and timeouts, checked; and agents and files as clients read them.

use berth_common::names;
use berth_common::time::{from_duration, to_timestamp};
use berth_proto::v1 as pb;
use uuid::Uuid;

use berth_common::spec::{self, check_len, validate_git, validate_path};

use super::{labels, message_text};
use crate::error::{Error, Result};
use crate::session::{Agent, AgentSpec, FileInfo, NewSession, Resource, limits};

/// A session's spec: required, and valid.
fn session_spec(s: Option<pb::AgentSpec>) -> Result<AgentSpec> {
    let s = s.ok_or_else(|| Error::invalid("spec", "required"))?;
    Ok(AgentSpec::try_from(s)?)
}

/// An agent version's spec, validated like a session's.
pub fn agent_spec(s: Option<pb::AgentSpec>) -> Result<AgentSpec> {
    session_spec(s)
}

/// With `agent` set, the request's spec may carry only env.
fn env_only_spec(s: Option<pb::AgentSpec>) -> Result<AgentSpec> {
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
        ("spec.mcp_servers", !s.mcp_servers.is_empty()),
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
    let checked = AgentSpec::try_from(pb::AgentSpec {
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
                let ssh_key_secret = secret_ref("resources.git.ssh_key_secret", &g.ssh_key_secret)?;
                let credential = secret_ref("resources.git.credential", &g.credential)?;
                if credential.is_some() && ssh_key_secret.is_some() {
                    return Err(Error::invalid(
                        "resources.git.credential",
                        "a repository is cloned with an ssh key or a credential, not both",
                    ));
                }
                let http = g.url.to_ascii_lowercase().starts_with("http");
                if credential.is_some() && !http {
                    return Err(Error::invalid(
                        "resources.git.credential",
                        "a credential is for https:// repositories (or http:// to a host the operator allowlists)",
                    ));
                }
                Ok(Resource::Git {
                    url: g.url,
                    git_ref: g.r#ref,
                    path: path("resources.git.path", &g.path)?,
                    ssh_key_secret,
                    credential,
                })
            }
            None => Err(Error::invalid(
                "resources",
                "each resource needs file, memory or git",
            )),
        })
        .collect()
}

/// An optional secret reference (`secrets/{uuid}` or the uuid), as stored.
fn secret_ref(field: &'static str, given: &str) -> Result<Option<String>> {
    let key = given.trim();
    match key.strip_prefix("secrets/").unwrap_or(key) {
        "" => Ok(None),
        id => uuid::Uuid::parse_str(id)
            .map(|u| Some(u.to_string()))
            .map_err(|_| {
                Error::invalid(
                    field,
                    format!("`{key}` is not a secret id (`secrets/{{uuid}}`)"),
                )
            }),
    }
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

impl From<Agent> for pb::Agent {
    fn from(a: Agent) -> Self {
        let env_keys = a.spec.env.keys().cloned().collect();
        Self {
            name: format!("{}{}", names::AGENTS, a.id),
            agent_id: a.id,
            version: a.version,
            latest_version: a.latest_version,
            spec: Some(a.spec.into()),
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
