//! The scenarios, each measured beside its baseline in the same run.

pub mod balance;
pub mod claude;
mod claude_floor;
mod claude_steady;
pub mod dispatch;
pub mod failover;
pub mod fanin;
pub mod fleet;
pub mod relay;
pub mod start;

use std::time::Duration;

use berth_proto::v1 as pb;
use berth_proto::v1::sessions_client::SessionsClient;
use futures::StreamExt;
use tokio::time::Instant;

use crate::report::Errors;

/// Whether an event came from the agent (not berth's own status or the user's input).
pub fn is_agent(e: &pb::Event) -> bool {
    !e.r#type.starts_with("session.") && !e.r#type.starts_with("user.")
}

/// A session on `image` whose agent gets `prompt` first (none when empty).
pub fn session(image: &str, prompt: &str) -> pb::CreateSessionRequest {
    pb::CreateSessionRequest {
        spec: Some(pb::AgentSpec {
            image: image.into(),
            ..Default::default()
        }),
        initial_message: prompt.into(),
        ..Default::default()
    }
}

/// What the start of one session looked like at the client.
#[derive(Debug)]
pub struct Started {
    pub name: String,
    /// From `t0` to the first agent event.
    pub first_event: Duration,
    /// How the agent started: warm_process, warm_container or cold.
    pub start: String,
}

/// Creates a session and follows its events until the first agent event.
/// Latency is measured from `t0` (the scheduled time in an open loop).
pub async fn create_and_wait_first(
    client: &mut SessionsClient<berth_tests::Api>,
    req: pb::CreateSessionRequest,
    t0: Instant,
    timeout: Duration,
) -> Result<Started, tonic::Status> {
    let s = client.create_session(req).await?.into_inner();
    let mut stream = client
        .stream_events(pb::StreamEventsRequest {
            name: s.name.clone(),
            after_seq: 0,
        })
        .await?
        .into_inner();
    let mut start = None;
    let deadline = tokio::time::sleep(timeout);
    tokio::pin!(deadline);
    loop {
        let e = tokio::select! {
            e = stream.next() => e,
            () = &mut deadline => {
                return Err(tonic::Status::deadline_exceeded(format!("{}: no agent event within {timeout:?}", s.name)));
            }
        };
        let Some(e) = e else {
            return Err(tonic::Status::aborted(format!(
                "{}: stream ended before an agent event",
                s.name
            )));
        };
        let e = e?;
        if e.r#type == "session.status_running" {
            let p: serde_json::Value = serde_json::from_str(&e.payload_json).unwrap_or_default();
            start = start.or(p["start"].as_str().map(String::from));
        }
        if e.r#type == "session.status_failed" || e.r#type == "session.status_stopped" {
            return Err(tonic::Status::aborted(format!(
                "{}: {} before an agent event: {}",
                s.name, e.r#type, e.payload_json
            )));
        }
        if is_agent(&e) {
            return Ok(Started {
                name: s.name,
                first_event: t0.elapsed(),
                start: start.unwrap_or_default(),
            });
        }
    }
}

/// Stops a session (best effort: errors are counted, not fatal).
pub async fn stop(
    client: &mut SessionsClient<berth_tests::Api>,
    name: &str,
    errors: &std::sync::Mutex<Errors>,
) {
    if let Err(s) = client
        .stop_session(pb::StopSessionRequest { name: name.into() })
        .await
        && let Ok(mut e) = errors.lock()
    {
        e.add(format!("stop:{:?}", s.code()));
    }
}

/// Waits until no session of the cluster is open (all stopped, failed or
/// ended), so the next phase starts from an idle fleet.
pub async fn wait_all_closed(client: &mut SessionsClient<berth_tests::Api>, names: &[String]) {
    let deadline = Instant::now() + Duration::from_secs(120);
    for name in names {
        while Instant::now() < deadline {
            match client
                .get_session(pb::GetSessionRequest { name: name.clone() })
                .await
            {
                Ok(s) => {
                    let st = s.into_inner().status;
                    let open = [
                        pb::SessionStatus::Pending,
                        pb::SessionStatus::Starting,
                        pb::SessionStatus::Running,
                        pb::SessionStatus::Idle,
                        pb::SessionStatus::Rescheduling,
                    ]
                    .iter()
                    .any(|x| *x as i32 == st);
                    if !open {
                        break;
                    }
                }
                Err(_) => break,
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Waits until some node reports `n` pre-started agent processes of `image`
/// ready (an agent pool, which its first session created).
pub async fn wait_agent_pool_full(
    nodes: &mut berth_proto::v1::nodes_client::NodesClient<berth_tests::Api>,
    image: &str,
    n: i32,
    timeout: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let ready = agent_processes_ready(nodes, image).await?;
        if ready >= n {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the agent pool of {image} did not fill ({ready} of {n} ready) within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Pre-started agent processes of `image` ready over the fleet.
pub async fn agent_processes_ready(
    nodes: &mut berth_proto::v1::nodes_client::NodesClient<berth_tests::Api>,
    image: &str,
) -> anyhow::Result<i32> {
    ready_over_fleet(nodes, image, true).await
}

/// Ready spares of `image` over the fleet: agent pools' processes
/// (`agents`) or image pools' containers.
async fn ready_over_fleet(
    nodes: &mut berth_proto::v1::nodes_client::NodesClient<berth_tests::Api>,
    image: &str,
    agents: bool,
) -> anyhow::Result<i32> {
    let list = nodes
        .list_nodes(pb::ListNodesRequest {})
        .await?
        .into_inner();
    Ok(list
        .nodes
        .iter()
        .flat_map(|n| n.warm.iter())
        .filter(|w| w.agent_key.is_empty() != agents && w.image == image)
        .map(|w| w.ready)
        .sum())
}

/// Waits until every node reports `pool` warm containers of `image` ready.
pub async fn wait_pool_full(
    nodes: &mut berth_proto::v1::nodes_client::NodesClient<berth_tests::Api>,
    image: &str,
    pool: i32,
    timeout: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let list = nodes
            .list_nodes(pb::ListNodesRequest {})
            .await?
            .into_inner();
        let full = !list.nodes.is_empty()
            && list.nodes.iter().all(|n| {
                n.warm
                    .iter()
                    .any(|w| w.agent_key.is_empty() && w.image == image && w.ready >= pool)
            });
        if full {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the warm pools did not fill ({pool} of {image} per node) within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Warm containers of `image` ready across the fleet.
pub async fn warm_ready(
    nodes: &mut berth_proto::v1::nodes_client::NodesClient<berth_tests::Api>,
    image: &str,
) -> anyhow::Result<i32> {
    ready_over_fleet(nodes, image, false).await
}
