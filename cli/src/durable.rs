//! `berth agents …`, `berth files …`, and the session options that build on
//! them (agent versions, resources, timeouts, budget).

use std::time::Duration;

use berth_cli::auth::Api;
use berth_proto::v1::{self as pb, agents_client::AgentsClient, files_client::FilesClient};
use clap::{Args, Subcommand, ValueEnum};
use comfy_table::Cell;

use crate::output::{Out, age, line};
use crate::render::dash;
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
    pub fn session_spec(&self) -> Result<pb::SessionSpec, CliError> {
        let image = self
            .image
            .clone()
            .ok_or_else(|| CliError::new("--image is required unless --agent is given"))?;
        Ok(pb::SessionSpec {
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
        })
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
    pub fn env_only(&self) -> Result<pb::SessionSpec, CliError> {
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
        Ok(pb::SessionSpec {
            env: self.env.iter().cloned().collect(),
            vault_ids: self.secrets.clone(),
            // A session may replace its agent's tool policy.
            tool_policy: self.tool_policy()?,
            ..Default::default()
        })
    }

    fn agent_spec(&self) -> Result<pb::AgentSpec, CliError> {
        Ok(berth_common::spec::session_pb_to_agent_pb(
            self.session_spec()?,
        ))
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

async fn upload(
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

#[derive(Subcommand)]
pub enum AgentsCmd {
    /// Create an agent (version 1).
    Create {
        /// 1-63 lowercase letters, digits and `-`, starting with a letter.
        id: String,
        #[command(flatten)]
        spec: SpecArgs,
    },
    /// Show an agent: the latest version, or NAME@VERSION.
    Get { agent: String },
    /// List agents.
    List {
        /// Include archived agents.
        #[arg(long)]
        all: bool,
    },
    /// Make a new version from a whole new spec. Running sessions keep theirs.
    Update {
        agent: String,
        #[command(flatten)]
        spec: SpecArgs,
    },
    /// Archive an agent: no new sessions may use it.
    Archive { agent: String },
}

#[derive(Subcommand)]
pub enum FilesCmd {
    /// Upload a file (up to 32 MiB); attach it with `berth run --file PATH=…`
    /// or a FileResource naming `files/{id}`.
    Upload {
        path: String,
        /// Name to record (default: the file's name).
        #[arg(long)]
        name: Option<String>,
    },
    /// Show a file's metadata.
    Get { file: String },
    /// Delete a file.
    Delete { file: String },
}

#[derive(Clone, Copy, ValueEnum)]
pub enum ExportFormatArg {
    Markdown,
    Json,
    /// A PDF of the Markdown transcript (needs --output, or a stdout that is not a terminal).
    Pdf,
}

/// Agents as a table; wide adds the agent id, model and skills.
fn agent_table(out: &Out, agents: &[pb::Agent]) -> comfy_table::Table {
    let mut header = vec!["NAME", "VERSION", "LATEST", "IMAGE", "STATE", "AGE"];
    if out.wide() {
        header.extend(["ID", "MODEL", "SKILLS", "ENV"]);
    }
    let mut t = out.table(&header);
    for a in agents {
        let spec = a.spec.clone().unwrap_or_default();
        let mut row = vec![
            Cell::new(&a.name),
            Cell::new(a.version),
            Cell::new(a.latest_version),
            Cell::new(&spec.image),
            out.status(if a.archived { "archived" } else { "active" }),
            Cell::new(age(&a.create_time)),
        ];
        if out.wide() {
            let skills: Vec<_> = spec.skills.iter().map(|s| s.name.clone()).collect();
            row.extend([
                Cell::new(&a.agent_id),
                Cell::new(dash(&spec.model)),
                Cell::new(dash(&skills.join(","))),
                Cell::new(dash(&a.env_keys.join(","))),
            ]);
        }
        t.add_row(row);
    }
    t
}

pub(crate) async fn agents(
    channel: Api,
    d: &str,
    out: Out,
    cmd: AgentsCmd,
) -> Result<(), CliError> {
    let mut client = AgentsClient::new(channel);
    let err = |s| explain(d, None, s);
    let agent = match cmd {
        AgentsCmd::Create { id, spec } => client
            .create_agent(pb::CreateAgentRequest {
                agent_id: id,
                spec: Some(spec.agent_spec()?),
            })
            .await
            .map_err(err)?
            .into_inner(),
        AgentsCmd::Get { agent } => client
            .get_agent(pb::GetAgentRequest {
                name: agent,
                version: 0,
            })
            .await
            .map_err(err)?
            .into_inner(),
        AgentsCmd::Update { agent, spec } => client
            .update_agent(pb::UpdateAgentRequest {
                name: agent,
                spec: Some(spec.agent_spec()?),
            })
            .await
            .map_err(err)?
            .into_inner(),
        AgentsCmd::Archive { agent } => client
            .archive_agent(pb::ArchiveAgentRequest { name: agent })
            .await
            .map_err(err)?
            .into_inner(),
        AgentsCmd::List { all } => {
            let mut token = String::new();
            loop {
                let r = client
                    .list_agents(pb::ListAgentsRequest {
                        page_size: 200,
                        page_token: token,
                        show_archived: all,
                    })
                    .await
                    .map_err(err)?
                    .into_inner();
                out.list(&r.agents, |a| a.name.clone(), |o| agent_table(o, &r.agents))?;
                if r.next_page_token.is_empty() {
                    return Ok(());
                }
                token = r.next_page_token;
            }
        }
    };
    let one = std::slice::from_ref(&agent);
    out.list(one, |a| a.name.clone(), |o| agent_table(o, one))
}

pub(crate) async fn files(channel: Api, d: &str, out: Out, cmd: FilesCmd) -> Result<(), CliError> {
    let mut client = FilesClient::new(channel.clone());
    let f = match cmd {
        FilesCmd::Upload { path, name } => upload(&channel, d, &path, name).await?,
        FilesCmd::Get { file } => client
            .get_file(pb::GetFileRequest { name: file })
            .await
            .map_err(|s| explain(d, None, s))?
            .into_inner(),
        FilesCmd::Delete { file } => {
            client
                .delete_file(pb::DeleteFileRequest { name: file.clone() })
                .await
                .map_err(|s| explain(d, None, s))?;
            return line(format!("deleted {file}"));
        }
    };
    out.object(&f, &f.name, || {
        format!(
            "{}  {}  {} bytes  sha256 {}",
            f.name, f.display_name, f.size_bytes, f.sha256
        )
    })
}
