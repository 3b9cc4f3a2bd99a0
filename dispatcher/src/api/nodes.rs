//! `berth.v1.Nodes`: the fleet as this dispatcher sees it.

use std::sync::Arc;
use std::time::Duration;

use berth_proto::node::v1 as node_pb;
use berth_proto::v1::{self as pb, nodes_server::Nodes as NodesApi};
use tonic::{Request, Response, Status};

use crate::error::Error;
use crate::nodes::{NodeLink, NodeState, Nodes};

/// How long ListNodes waits for each node's own session list: a node that
/// is silent but still within its lease must not stall the listing.
const LIST_TIMEOUT: Duration = Duration::from_millis(500);
/// How long DrainNode waits for the node.
const NODE_CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves `berth.v1.Nodes`.
pub struct NodesService {
    pub nodes: Arc<Nodes>,
}

async fn describe(link: Arc<NodeLink>) -> pb::Node {
    let state = link.state();
    let report = link.report().unwrap_or_default();
    let session_ids = if state == NodeState::Down {
        Vec::new()
    } else {
        let mut client = link.client();
        match tokio::time::timeout(
            LIST_TIMEOUT,
            client.list_sessions(node_pb::ListNodeSessionsRequest {}),
        )
        .await
        {
            Ok(Ok(r)) => r
                .into_inner()
                .sessions
                .into_iter()
                .map(|s| s.session_id)
                .collect(),
            _ => Vec::new(),
        }
    };
    pb::Node {
        name: link.name(),
        url: link.url.url.clone(),
        address: link.addr.to_string(),
        state: match state {
            NodeState::Up => pb::NodeState::Up,
            NodeState::Draining => pb::NodeState::Draining,
            NodeState::Down => pb::NodeState::Down,
        } as i32,
        capacity: report.capacity,
        running: report.running,
        inflight: i32::try_from(link.inflight()).unwrap_or(i32::MAX),
        warm: report
            .warm
            .into_iter()
            .map(|w| pb::WarmPoolStatus {
                image: w.image,
                ready: w.ready,
                agent_key: w.agent_key,
            })
            .collect(),
        cpu_utilization: report.cpu_utilization,
        memory_used_bytes: report.memory_used_bytes,
        memory_total_bytes: report.memory_total_bytes,
        generation: report.generation,
        report_age_ms: link
            .report_age()
            .map_or(-1, |a| i64::try_from(a.as_millis()).unwrap_or(i64::MAX)),
        last_error: link.last_error(),
        session_ids,
    }
}

#[tonic::async_trait]
impl NodesApi for NodesService {
    async fn list_nodes(
        &self,
        r: Request<pb::ListNodesRequest>,
    ) -> Result<Response<pb::ListNodesResponse>, Status> {
        crate::access::auth::caller(&r)?.require_admin("ListNodes")?;
        let mut nodes =
            futures::future::join_all(self.nodes.links().into_iter().map(describe)).await;
        nodes.sort_by(|a, b| a.name.cmp(&b.name).then_with(|| a.address.cmp(&b.address)));
        Ok(Response::new(pb::ListNodesResponse { nodes }))
    }

    async fn drain_node(
        &self,
        r: Request<pb::DrainNodeRequest>,
    ) -> Result<Response<pb::DrainNodeResponse>, Status> {
        crate::access::auth::caller(&r)?.require_admin("DrainNode")?;
        let name = r.into_inner().node;
        let link = self.one_node(&name)?;
        let mut client = link.client();
        let resp = tokio::time::timeout(NODE_CALL_TIMEOUT, client.drain(node_pb::DrainRequest {}))
            .await
            .map_err(|_| {
                Error::NodeUnavailable(format!("node {name} did not answer the drain in time"))
            })?
            .map_err(|s| {
                Error::NodeUnavailable(format!("node {name} refused the drain: {}", s.message()))
            })?;
        // The node said yes; its report says so a moment later. Waiting
        // for it lets the caller read its own write (`ListNodes` shows
        // DRAINING), bounded: the report comes anyway.
        let _ = tokio::time::timeout(NODE_CALL_TIMEOUT, link.reported_draining(true)).await;
        tracing::info!(node = %link.key(), "node draining on request");
        Ok(Response::new(pb::DrainNodeResponse {
            running: resp.into_inner().running,
        }))
    }

    async fn undrain_node(
        &self,
        r: Request<pb::UndrainNodeRequest>,
    ) -> Result<Response<pb::UndrainNodeResponse>, Status> {
        crate::access::auth::caller(&r)?.require_admin("UndrainNode")?;
        let name = r.into_inner().node;
        let link = self.one_node(&name)?;
        let mut client = link.client();
        tokio::time::timeout(
            NODE_CALL_TIMEOUT,
            client.undrain(node_pb::UndrainRequest {}),
        )
        .await
        .map_err(|_| {
            Error::NodeUnavailable(format!("node {name} did not answer the undrain in time"))
        })?
        .map_err(|s| match s.code() {
            tonic::Code::FailedPrecondition => {
                Error::Precondition(format!("node {name} cannot be undrained: {}", s.message()))
            }
            _ => {
                Error::NodeUnavailable(format!("node {name} refused the undrain: {}", s.message()))
            }
        })?;
        // As for a drain: placements here see it taking sessions again.
        let _ = tokio::time::timeout(NODE_CALL_TIMEOUT, link.reported_draining(false)).await;
        tracing::info!(node = %link.key(), "node undrained on request");
        Ok(Response::new(pb::UndrainNodeResponse {}))
    }
}

impl NodesService {
    /// The one node `name` designates (NOT_FOUND, or INVALID_ARGUMENT when
    /// it is empty or ambiguous).
    fn one_node(&self, name: &str) -> Result<std::sync::Arc<crate::nodes::NodeLink>, Status> {
        if name.trim().is_empty() {
            return Err(Error::invalid("node", "must not be empty").into());
        }
        let links = self.nodes.find(name);
        match links.as_slice() {
            [] => Err(Error::NotFound(format!("node {name} not found; see ListNodes")).into()),
            [one] => Ok(one.clone()),
            many => Err(Error::invalid(
                "node",
                format!(
                    "`{name}` matches {} nodes; name one by its address (see `berth nodes`)",
                    many.len()
                ),
            )
            .into()),
        }
    }
}
