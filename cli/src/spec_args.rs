//! The options that describe what a session or an agent version runs
//! (`SpecArgs`), and what a new session brings (`SessionOpts`: agent
//! version, resources, limits of time and money).

use std::time::Duration;

use berth_cli::auth::Api;
use berth_proto::v1::{self as pb, files_client::FilesClient};
use clap::Args;

use crate::{CliError, RuntimeArg, explain, key_value};

/// What an agent version (or an inline session) runs.
#[derive(Args, Default)]
pub struct SpecArgs {
    /// Container image on the nodes (e.g. berth-test-agent:latest).
    #[arg(long)]
    pub image: Option<String>,
    /// Runtime adapter.
    #[arg(long, value_enum)]
    pub runtime: Option<RuntimeArg>,
    /// Model passed to the runtime.
    #[arg(long, default_value = "")]
    pub model: String,
    /// System prompt appended by the runtime.
    #[arg(long, default_value = "")]
    pub system_prompt: String,
    /// Extra runtime argument (repeatable). For jsonl: the program and its arguments.
    #[arg(long = "arg")]
    pub args: Vec<String>,
    /// Environment variable for the agent, KEY=VALUE (repeatable).
    #[arg(long = "env", value_parser = key_value)]
    pub env: Vec<(String, String)>,
    /// CPU limit for the container (e.g. 1.5). Default: the node's.
    #[arg(long)]
    pub cpus: Option<f64>,
    /// Memory limit for the container in MiB (at least 64). Default: the node's.
    #[arg(long)]
    pub memory_mib: Option<i64>,
    /// Process limit for the container. Default: the node's.
    #[arg(long)]
    pub pids: Option<i64>,
    /// Claude Code skill, NAME=FILE with the SKILL.md text (repeatable).
    #[arg(long = "skill", value_parser = key_value)]
    pub skills: Vec<(String, String)>,
    /// Secret (id from `berth secrets create`) the node's gateway attaches
    /// to the session's traffic (repeatable). The agent never sees it.
    #[arg(long = "secret")]
    pub secrets: Vec<String>,
    /// Where the agent may connect beyond the model API: none, allowlist or open.
    #[arg(long, value_enum)]
    pub egress: Option<EgressArg>,
    /// A host the allowlist lets through (`host`, `host:port`, `*.domain`; repeatable).
    #[arg(long = "allow-host")]
    pub allow_hosts: Vec<String>,
    /// Claude Code's permission mode: default (asks before edits and
    /// commands that change things), accept-edits, plan or bypass.
    #[arg(long, value_enum)]
    pub permission_mode: Option<PermissionModeArg>,
    /// A tool rule that runs without asking, in Claude Code's syntax
    /// (`Bash(git *)`, `Edit`; repeatable).
    #[arg(long = "allow-tool")]
    pub allow_tools: Vec<String>,
    /// A tool rule that is refused without asking (repeatable).
    #[arg(long = "deny-tool")]
    pub deny_tools: Vec<String>,
    /// How long a tool permission request waits for an answer (default 10m).
    #[arg(long, value_parser = berth_common::time::parse_duration)]
    pub confirm_timeout: Option<Duration>,
    /// What a request nobody answers in time gets (default deny).
    #[arg(long, value_enum)]
    pub timeout_decision: Option<DecisionArg>,
    /// A remote MCP server (streamable HTTP), NAME=URL, or
    /// NAME=URL@secrets/ID with a credential the gateway adds (repeatable).
    /// The agent reaches it only through the node's gateway.
    #[arg(long = "mcp", value_parser = key_value)]
    pub mcp: Vec<(String, String)>,
    /// An MCP server the agent starts in its container on stdio,
    /// NAME=COMMAND [ARGS...] (split like a shell; repeatable).
    #[arg(long = "mcp-stdio", value_parser = key_value)]
    pub mcp_stdio: Vec<(String, String)>,
    /// The agent exports its own OpenTelemetry metrics and events (Claude
    /// Code's tokens, cost, API requests) through the node's gateway to the
    /// operator's collector, tagged with the session.
    #[arg(long)]
    pub telemetry: bool,
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum PermissionModeArg {
    Default,
    AcceptEdits,
    Plan,
    Bypass,
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum DecisionArg {
    Allow,
    Deny,
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum EgressArg {
    None,
    Allowlist,
    Open,
}

impl SpecArgs {
    fn limits(&self) -> Option<pb::Limits> {
        if self.cpus.is_none() && self.memory_mib.is_none() && self.pids.is_none() {
            return None;
        }
        Some(pb::Limits {
            cpus: self.cpus.unwrap_or(0.0),
            memory_bytes: self.memory_mib.unwrap_or(0) * 1024 * 1024,
            pids: self.pids.unwrap_or(0),
        })
    }

    fn skills(&self) -> Result<Vec<pb::Skill>, CliError> {
        self.skills
            .iter()
            .map(|(name, file)| {
                let content = std::fs::read_to_string(file)
                    .map_err(|e| CliError::new(format!("--skill {name}={file}: {e}")))?;
                Ok(pb::Skill {
                    name: name.clone(),
                    content,
                })
            })
            .collect()
    }

    /// The session spec these flags describe (`--image` required).
    pub fn session_spec(&self) -> Result<pb::AgentSpec, CliError> {
        let image = self
            .image
            .clone()
            .ok_or_else(|| CliError::new("--image is required unless --agent is given"))?;
        Ok(pb::AgentSpec {
            image,
            runtime: runtime(self.runtime),
            runtime_args: self.args.clone(),
            model: self.model.clone(),
            system_prompt: self.system_prompt.clone(),
            env: self.env.iter().cloned().collect(),
            limits: self.limits(),
            skills: self.skills()?,
            vault_ids: self.secrets.clone(),
            egress: self.egress(),
            tool_policy: self.tool_policy()?,
            mcp_servers: self.mcp_servers()?,
            telemetry: self.telemetry,
        })
    }

    /// The MCP servers `--mcp` and `--mcp-stdio` declare.
    fn mcp_servers(&self) -> Result<Vec<pb::McpServer>, CliError> {
        use pb::mcp_server::Transport;
        let mut out = Vec::new();
        for (name, target) in &self.mcp {
            let (url, credential) = match target.rsplit_once("@secrets/") {
                Some((url, id)) => (url, format!("secrets/{id}")),
                None => (target.as_str(), String::new()),
            };
            out.push(pb::McpServer {
                name: name.clone(),
                transport: Some(Transport::Remote(pb::McpRemote {
                    url: url.to_string(),
                    credential,
                })),
            });
        }
        for (name, line) in &self.mcp_stdio {
            let mut words = shlex::split(line)
                .filter(|w| !w.is_empty())
                .ok_or_else(|| CliError::new(format!("--mcp-stdio {name}=…: unbalanced quotes")))?
                .into_iter();
            let command = words.next().ok_or_else(|| {
                CliError::new(format!("--mcp-stdio {name}=: a command is required"))
            })?;
            out.push(pb::McpServer {
                name: name.clone(),
                transport: Some(Transport::Stdio(pb::McpStdio {
                    command,
                    args: words.collect(),
                })),
            });
        }
        Ok(out)
    }

    /// The tool policy these flags describe; `None` when none is given.
    fn tool_policy(&self) -> Result<Option<pb::ToolPolicy>, CliError> {
        if self.permission_mode.is_none()
            && self.allow_tools.is_empty()
            && self.deny_tools.is_empty()
            && self.confirm_timeout.is_none()
            && self.timeout_decision.is_none()
        {
            return Ok(None);
        }
        let mode = match self.permission_mode {
            None | Some(PermissionModeArg::Default) => pb::PermissionMode::Default,
            Some(PermissionModeArg::AcceptEdits) => pb::PermissionMode::AcceptEdits,
            Some(PermissionModeArg::Plan) => pb::PermissionMode::Plan,
            Some(PermissionModeArg::Bypass) => pb::PermissionMode::BypassPermissions,
        };
        let decision = match self.timeout_decision {
            Some(DecisionArg::Allow) => pb::ToolDecision::Allow,
            None | Some(DecisionArg::Deny) => pb::ToolDecision::Deny,
        };
        Ok(Some(pb::ToolPolicy {
            permission_mode: mode as i32,
            allowed_tools: self.allow_tools.clone(),
            disallowed_tools: self.deny_tools.clone(),
            confirmation_timeout: self.confirm_timeout.map(berth_common::time::to_duration),
            timeout_decision: decision as i32,
        }))
    }

    fn egress(&self) -> Option<pb::Egress> {
        let mode = match self.egress {
            None if self.allow_hosts.is_empty() => return None,
            None | Some(EgressArg::Allowlist) => pb::EgressMode::Allowlist,
            Some(EgressArg::None) => pb::EgressMode::None,
            Some(EgressArg::Open) => pb::EgressMode::Open,
        };
        Some(pb::Egress {
            mode: mode as i32,
            allow: self.allow_hosts.clone(),
        })
    }

    /// With `--agent`, only `--env` may be given: the agent supplies the rest.
    pub fn env_only(&self) -> Result<pb::AgentSpec, CliError> {
        let other = self.image.is_some()
            || self.runtime.is_some()
            || !self.model.is_empty()
            || !self.system_prompt.is_empty()
            || !self.args.is_empty()
            || self.limits().is_some()
            || !self.skills.is_empty()
            || self.egress().is_some();
        if other {
            return Err(CliError::new(
                "with --agent only --env, --secret and the tool policy flags may be given: the agent's version supplies image, runtime, model, prompt, limits, skills and egress",
            ));
        }
        Ok(pb::AgentSpec {
            env: self.env.iter().cloned().collect(),
            vault_ids: self.secrets.clone(),
            // A session may replace its agent's tool policy.
            tool_policy: self.tool_policy()?,
            ..Default::default()
        })
    }

    pub(crate) fn agent_spec(&self) -> Result<pb::AgentSpec, CliError> {
        self.session_spec()
    }
}

fn runtime(r: Option<RuntimeArg>) -> i32 {
    match r.unwrap_or(RuntimeArg::ClaudeCode) {
        RuntimeArg::ClaudeCode => pb::Runtime::ClaudeCode as i32,
        RuntimeArg::Jsonl => pb::Runtime::Jsonl as i32,
    }
}

/// Resources, limits of time and money for a new session.
#[derive(Args, Default)]
pub struct SessionOpts {
    /// Upload a local file and place it in the container: PATH=LOCAL_FILE
    /// (PATH absolute, under /workspace or the agent's home). Repeatable.
    #[arg(long = "file", value_parser = key_value)]
    pub files: Vec<(String, String)>,
    /// Attach an agent's memory store: PATH=STORE, or PATH=STORE:rw to have
    /// changes copied back when the session stops, pauses or ends. Repeatable.
    #[arg(long = "memory", value_parser = key_value)]
    pub memory: Vec<(String, String)>,
    /// Clone a git repository into the container: PATH=URL, or PATH=URL#REF
    /// (an https:// URL, an ssh:// one with --git-ssh-key, or a host the
    /// deployment allowlists) for a branch, tag or commit. Repeatable.
    #[arg(long = "git", value_parser = key_value)]
    pub git: Vec<(String, String)>,
    /// Secret (`berth secrets create --usage git-ssh-key`) the node clones
    /// the --git repositories with, over ssh.
    #[arg(long)]
    pub git_ssh_key: Option<String>,
    /// Credential (`berth secrets create --usage http-header --host HOST`)
    /// the --git repositories are cloned and fetched with over https; the
    /// checkout's origin goes through the node's gateway, which adds it.
    #[arg(long, conflicts_with = "git_ssh_key")]
    pub git_credential: Option<String>,
    /// Hard limit on the session's run time, e.g. 30m (ends in `timeout`).
    #[arg(long, value_parser = berth_common::time::parse_duration)]
    pub timeout: Option<Duration>,
    /// Stop after this long with no events and no input, e.g. 2h (reason `inactivity`).
    #[arg(long, value_parser = berth_common::time::parse_duration)]
    pub inactivity_timeout: Option<Duration>,
    /// Fail if not placed within this long, e.g. 5m.
    #[arg(long, value_parser = berth_common::time::parse_duration)]
    pub queue_timeout: Option<Duration>,
    /// Cap on each model response's output tokens (claude-code and jsonl).
    #[arg(long)]
    pub max_output_tokens: Option<i32>,
    /// Sampling temperature, 0–1 (jsonl only: Claude Code takes none).
    #[arg(long)]
    pub temperature: Option<f64>,
    /// Stop once the session's cost reaches this, in USD (reason `budget`).
    #[arg(long)]
    pub budget: Option<f64>,
}

impl SessionOpts {
    /// Fills the request's resources and limits, uploading `--file`s first.
    pub async fn apply(
        &self,
        channel: &Api,
        d: &str,
        req: &mut pb::CreateSessionRequest,
    ) -> Result<(), CliError> {
        use pb::resource::Kind;
        for (path, local) in &self.files {
            let f = upload(channel, d, local, None).await?;
            req.resources.push(pb::Resource {
                kind: Some(Kind::File(pb::FileResource {
                    file: f.name,
                    path: path.clone(),
                })),
            });
        }
        for (path, store) in &self.memory {
            let (store, access) = match store.strip_suffix(":rw") {
                Some(s) => (s, pb::MemoryAccess::ReadWrite),
                None => (
                    store.strip_suffix(":ro").unwrap_or(store),
                    pb::MemoryAccess::ReadOnly,
                ),
            };
            req.resources.push(pb::Resource {
                kind: Some(Kind::Memory(pb::MemoryResource {
                    store: store.to_string(),
                    path: path.clone(),
                    access: access as i32,
                })),
            });
        }
        for (path, url) in &self.git {
            let (url, git_ref) = url.rsplit_once('#').unwrap_or((url, ""));
            req.resources.push(pb::Resource {
                kind: Some(Kind::Git(pb::GitResource {
                    url: url.to_string(),
                    r#ref: git_ref.to_string(),
                    path: path.clone(),
                    ssh_key_secret: self.git_ssh_key.clone().unwrap_or_default(),
                    credential: self.git_credential.clone().unwrap_or_default(),
                })),
            });
        }
        req.timeout = self.timeout.map(berth_common::time::to_duration);
        if self.max_output_tokens.is_some() || self.temperature.is_some() {
            req.run_params = Some(pb::RunParams {
                max_output_tokens: self.max_output_tokens,
                temperature: self.temperature,
            });
        }
        req.inactivity_timeout = self.inactivity_timeout.map(berth_common::time::to_duration);
        req.queue_timeout = self.queue_timeout.map(berth_common::time::to_duration);
        req.budget_usd = self.budget.unwrap_or(0.0);
        Ok(())
    }
}

pub(crate) async fn upload(
    channel: &Api,
    d: &str,
    local: &str,
    name: Option<String>,
) -> Result<pb::File, CliError> {
    let content =
        std::fs::read(local).map_err(|e| CliError::new(format!("cannot read {local}: {e}")))?;
    let display_name = name.unwrap_or_else(|| {
        std::path::Path::new(local)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    });
    let f = FilesClient::new(channel.clone())
        .max_encoding_message_size(64 * 1024 * 1024)
        .upload_file(pb::UploadFileRequest {
            display_name,
            content,
        })
        .await
        .map_err(|s| explain(d, None, s))?
        .into_inner();
    eprintln!("uploaded {local} as {} ({} bytes)", f.name, f.size_bytes);
    Ok(f)
}
