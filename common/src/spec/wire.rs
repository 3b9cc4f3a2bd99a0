//! The spec on the wire: the public API's and the node protocol's messages,
//! converted (and checked) both ways.

use std::collections::HashMap;

use berth_proto::{node::v1 as node_pb, v1 as pb};

use super::{
    AgentSpec, Egress, EgressMode, FieldError, Limits, McpServer, McpTransport, Runtime, Skill,
};

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

/// A secret id as given (`secrets/{id}` or the id), as stored.
fn secret_id(v: &str) -> String {
    v.strip_prefix("secrets/").unwrap_or(v).to_ascii_lowercase()
}

fn mcp_from_pb(s: pb::McpServer) -> Result<McpServer, FieldError> {
    let transport = match s.transport {
        Some(pb::mcp_server::Transport::Remote(r)) => McpTransport::Remote {
            url: r.url,
            credential: Some(secret_id(&r.credential)).filter(|c| !c.is_empty()),
        },
        Some(pb::mcp_server::Transport::Stdio(st)) => McpTransport::Stdio {
            command: st.command,
            args: st.args,
        },
        None => {
            return Err(FieldError::new(
                "spec.mcp_servers",
                format!("server `{}`: set `remote` or `stdio`", s.name),
            ));
        }
    };
    Ok(McpServer {
        name: s.name,
        transport,
    })
}

fn mcp_to_pb(s: &McpServer) -> pb::McpServer {
    let transport = match &s.transport {
        McpTransport::Remote { url, credential } => {
            pb::mcp_server::Transport::Remote(pb::McpRemote {
                url: url.clone(),
                credential: credential
                    .as_ref()
                    .map(|c| format!("secrets/{c}"))
                    .unwrap_or_default(),
            })
        }
        McpTransport::Stdio { command, args } => pb::mcp_server::Transport::Stdio(pb::McpStdio {
            command: command.clone(),
            args: args.clone(),
        }),
    };
    pb::McpServer {
        name: s.name.clone(),
        transport: Some(transport),
    }
}

fn mcp_from_node_pb(s: &node_pb::McpServer) -> McpServer {
    let transport = if s.url.is_empty() {
        McpTransport::Stdio {
            command: s.command.clone(),
            args: s.args.clone(),
        }
    } else {
        McpTransport::Remote {
            url: s.url.clone(),
            credential: Some(s.credential_id.clone()).filter(|c| !c.is_empty()),
        }
    };
    McpServer {
        name: s.name.clone(),
        transport,
    }
}

fn mcp_to_node_pb(s: &McpServer) -> node_pb::McpServer {
    match &s.transport {
        McpTransport::Remote { url, credential } => node_pb::McpServer {
            name: s.name.clone(),
            url: url.clone(),
            credential_id: credential.clone().unwrap_or_default(),
            ..Default::default()
        },
        McpTransport::Stdio { command, args } => node_pb::McpServer {
            name: s.name.clone(),
            command: command.clone(),
            args: args.clone(),
            ..Default::default()
        },
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
impl TryFrom<pb::AgentSpec> for AgentSpec {
    type Error = FieldError;

    fn try_from(s: pb::AgentSpec) -> Result<Self, FieldError> {
        let lim = s.limits.unwrap_or_default();
        let mcp_servers = s
            .mcp_servers
            .into_iter()
            .map(mcp_from_pb)
            .collect::<Result<Vec<_>, _>>()?;
        let mut vault_ids: Vec<String> = s.vault_ids.iter().map(|v| secret_id(v)).collect();
        // A server's credential is one of the session's secrets.
        for c in mcp_servers.iter().filter_map(McpServer::credential) {
            if !vault_ids.iter().any(|v| v == c) {
                vault_ids.push(c.to_string());
            }
        }
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
            vault_ids,
            egress: egress_from_pb(s.egress)?,
            tool_policy: s
                .tool_policy
                .map(crate::tools::ToolPolicy::from_pb)
                .transpose()?,
            mcp_servers,
            telemetry: s.telemetry,
        };
        spec.validate()?;
        Ok(spec)
    }
}

/// The spec as clients read it: env values are write-only and left out.
impl From<AgentSpec> for pb::AgentSpec {
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
            mcp_servers: s.mcp_servers.iter().map(mcp_to_pb).collect(),
            telemetry: s.telemetry,
        }
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
        mcp_servers: s.mcp_servers.iter().map(mcp_from_node_pb).collect(),
        telemetry: s.telemetry.is_some(),
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
        out.mcp_servers = self.mcp_servers.iter().map(mcp_to_node_pb).collect();
    }
}
