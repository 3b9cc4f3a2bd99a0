//! `berth agents …`: agent templates and their versions.

use berth_cli::auth::Api;
use berth_proto::v1::{self as pb, agents_client::AgentsClient};
use clap::Subcommand;
use comfy_table::Cell;

use crate::output::{Out, age};
use crate::render::dash;
use crate::spec_args::SpecArgs;
use crate::{CliError, explain};

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
