//! `berth nodes`: list the dispatcher's nodes, or drain one.

use berth_cli::auth::Api;
use berth_proto::v1::{self as pb, nodes_client::NodesClient};
use clap::{Args, Subcommand};

use crate::output::{Format, Out};
use crate::{CliError, explain, render};

#[derive(Args)]
pub(crate) struct NodesArgs {
    #[command(subcommand)]
    pub command: Option<NodesCmd>,
}

#[derive(Subcommand)]
pub(crate) enum NodesCmd {
    /// List nodes (the default).
    List,
    /// Stop new placements on a node; its running sessions finish.
    Drain {
        /// The node's name, URL, host or address, as `berth nodes` shows them.
        node: String,
    },
    /// Take a drained node back: it accepts sessions and refills its pools.
    Undrain {
        /// The node's name, URL, host or address, as `berth nodes` shows them.
        node: String,
    },
}

/// Runs `berth nodes [list|drain NODE|undrain NODE]` against dispatcher `d`.
pub(crate) async fn run(
    mut client: NodesClient<Api>,
    d: &str,
    out: Out,
    cmd: Option<NodesCmd>,
) -> Result<(), CliError> {
    match cmd.unwrap_or(NodesCmd::List) {
        NodesCmd::List => {
            let resp = client
                .list_nodes(pb::ListNodesRequest {})
                .await
                .map_err(|s| explain(d, None, s))?
                .into_inner();
            out.list(
                &resp.nodes,
                |n| n.name.clone(),
                |o| render::node_table(o, &resp.nodes),
            )?;
            if out.format == Format::Table {
                for n in resp.nodes.iter().filter(|n| !n.last_error.is_empty()) {
                    eprintln!("{}: {}", n.name, n.last_error);
                }
            }
            Ok(())
        }
        NodesCmd::Drain { node } => {
            let r = client
                .drain_node(pb::DrainNodeRequest { node: node.clone() })
                .await
                .map_err(|s| explain(d, None, s))?
                .into_inner();
            out.object(&r, &node, || {
                format!(
                    "{node} is draining; {} session(s) still running there",
                    r.running
                )
            })
        }
        NodesCmd::Undrain { node } => {
            let r = client
                .undrain_node(pb::UndrainNodeRequest { node: node.clone() })
                .await
                .map_err(|s| explain(d, None, s))?
                .into_inner();
            out.object(&r, &node, || format!("{node} takes sessions again"))
        }
    }
}
