//! `berth nodes`: list the dispatcher's nodes, or drain one.

use berth_cli::auth::Api;
use berth_proto::v1::{self as pb, nodes_client::NodesClient};
use clap::{Args, Subcommand};

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
    json: bool,
    cmd: Option<NodesCmd>,
) -> Result<(), CliError> {
    match cmd.unwrap_or(NodesCmd::List) {
        NodesCmd::List => {
            let resp = client
                .list_nodes(pb::ListNodesRequest {})
                .await
                .map_err(|s| explain(d, None, s))?
                .into_inner();
            if json {
                for n in &resp.nodes {
                    println!("{}", render::node_json(n));
                }
            } else {
                print!("{}", render::node_table(&resp.nodes));
            }
            Ok(())
        }
        NodesCmd::Drain { node } => {
            let r = client
                .drain_node(pb::DrainNodeRequest { node: node.clone() })
                .await
                .map_err(|s| explain(d, None, s))?
                .into_inner();
            if json {
                println!(
                    "{}",
                    serde_json::json!({"node": node, "running": r.running})
                );
            } else {
                println!(
                    "{node} is draining; {} session(s) still running there",
                    r.running
                );
            }
            Ok(())
        }
        NodesCmd::Undrain { node } => {
            client
                .undrain_node(pb::UndrainNodeRequest { node: node.clone() })
                .await
                .map_err(|s| explain(d, None, s))?;
            if json {
                println!("{}", serde_json::json!({"node": node, "draining": false}));
            } else {
                println!("{node} takes sessions again");
            }
            Ok(())
        }
    }
}
