//! Live latency: a simulated node emits events at a steady rate, each
//! stamped as its line leaves the node; the reader times each on the same
//! clock when it arrives. Through berth, the event is persisted and relayed
//! by the dispatcher; the baseline reads the same node directly.

use std::time::Duration;

use berth_proto::node::v1 as node;
use berth_proto::v1 as pb;
use futures::StreamExt;
use tokio::time::Instant;

use super::super::{create_and_wait_first, session};
use crate::cluster::Cluster;
use crate::report::Hist;
use crate::simnode::clock_us;

/// The message that makes a simulated agent emit `n` paced events.
fn paced(n: u64, rate: f64, size: u64) -> String {
    format!("paced {n} {rate} {size}")
}

/// Node line → client latency of one event, from its `sent_us` stamp.
fn latency(payload_json: &str) -> Option<Duration> {
    let v: serde_json::Value = serde_json::from_str(payload_json).ok()?;
    let sent = v.get("sent_us")?.as_u64()?;
    Some(Duration::from_micros(clock_us().saturating_sub(sent)))
}

/// `n` events at `rate`/s through berth (dispatcher, Postgres, relay).
pub(super) async fn through_berth(
    cluster: &Cluster,
    n: u64,
    rate: f64,
    size: u64,
) -> anyhow::Result<Hist> {
    let mut c = cluster.conns.get();
    let s = create_and_wait_first(
        &mut c,
        session("sim:latest", "echo ready"),
        Instant::now(),
        Duration::from_secs(60),
    )
    .await?;
    let mut stream = c
        .stream_events(pb::StreamEventsRequest {
            // From the start: the events before the paced ones carry no stamp.
            name: s.name.clone(),
            after_seq: 0,
        })
        .await?
        .into_inner();
    c.send_message(pb::SendMessageRequest {
        name: s.name.clone(),
        text: paced(n, rate, size),
        ..Default::default()
    })
    .await?;
    let mut hist = Hist::new();
    let deadline = Instant::now() + Duration::from_secs_f64(n as f64 / rate + 60.0);
    while let Some(e) = tokio::time::timeout_at(deadline, stream.next()).await? {
        let e = e?;
        if e.r#type == "agent.message"
            && let Some(d) = latency(&e.payload_json)
        {
            hist.record(d);
            if hist.len() == n {
                break;
            }
        }
    }
    let _ = c
        .stop_session(pb::StopSessionRequest { name: s.name })
        .await;
    anyhow::ensure!(
        hist.len() == n,
        "berth relayed {} of {n} paced events",
        hist.len()
    );
    Ok(hist)
}

/// The same paced events read straight from the simulated node.
pub(super) async fn direct(
    client: &mut node::agent_server_client::AgentServerClient<tonic::transport::Channel>,
    n: u64,
    rate: f64,
    size: u64,
) -> anyhow::Result<Hist> {
    let (tx, mut frames) = crate::simnode::open_direct(client).await?;
    tx.send(crate::simnode::direct_message(paced(n, rate, size)))
        .await?;
    let mut hist = Hist::new();
    while let Some(f) = frames.next().await {
        if let Some(node::node_frame::Kind::Line(l)) = f?.kind {
            for e in l.events.iter().filter(|e| e.r#type == "agent.message") {
                if let Some(d) = latency(&e.payload_json) {
                    hist.record(d);
                }
            }
            if hist.len() == n {
                break;
            }
        }
    }
    let _ = tx.send(crate::simnode::direct_stop()).await;
    anyhow::ensure!(
        hist.len() == n,
        "the direct stream carried {} of {n} paced events",
        hist.len()
    );
    Ok(hist)
}
