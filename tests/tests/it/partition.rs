//! A node cut off past its lease mid-turn, as under SIGSTOP or a network
//! partition: its run is frozen before the session moves, so a watcher
//! sampling both nodes never sees two live agents for one session; when the
//! node is reachable again its superseded run is fenced and removed within
//! seconds. Cut off two ways: a proxy that goes silent, and a kernel
//! partition of a network namespace.

use std::time::{Duration, Instant};

use berth_proto::v1::{self as pb, sessions_client::SessionsClient};
use berth_tests::netns::NetNs;
use berth_tests::*;

/// Sends a turn to `name` (idle, on `ran_on`), cuts its node off with
/// `cut`, and checks the session moves, answers the turn elsewhere, and
/// never has two live agents; then reconnects the node with `heal` and
/// checks its superseded run goes.
async fn cut_off_mid_turn(
    c: &mut SessionsClient<Api>,
    s: &pb::Session,
    ran_on: &str,
    cut: impl FnOnce() -> anyhow::Result<()>,
    heal: impl FnOnce() -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let seq = send(c, &s.name, "delay 4000 after the cut").await?;
    wait_for_status(
        c,
        &s.name,
        pb::SessionStatus::Running,
        Duration::from_secs(30),
    )
    .await?;
    let watch = AgentWatch::start(&s.id);
    cut()?;
    eprintln!("cut off");
    let reply = reply_after(c, &s.name, seq).await?;
    assert_eq!(reply, "after the cut");
    assert_ne!(get(c, &s.name).await?.node, ran_on, "the session moved");
    let healed = Instant::now();
    heal()?;
    // The old run is fenced and its container removed.
    let deadline = Instant::now() + Duration::from_secs(15);
    while containers_of(&s.id).await?.len() > 1 {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the superseded run's container is still there"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "superseded run removed {:?} after the node came back",
        healed.elapsed()
    );
    assert_eq!(
        watch.most().await?,
        1,
        "two live agents for one session at once"
    );
    assert_eq!(turn(c, &s.name, "echo still fine").await?, "still fine");
    stop_and_wait(c, &s.name).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_node_never_leaves_two_live_agents_for_one_session() -> anyhow::Result<()> {
    let cluster = TestCluster::builder().nodes(2).start().await?;
    let mut c = cluster.client();
    let s = idle_session(&mut c, fake_session("echo ready")).await?;
    let ran_on = get(&mut c, &s.name).await?.node;
    let stalled = &cluster.nodes[cluster.node_index(&ran_on)?];
    cut_off_mid_turn(
        &mut c,
        &s,
        &ran_on,
        || {
            stalled.proxy.set_paused(true);
            Ok(())
        },
        || {
            stalled.proxy.set_paused(false);
            Ok(())
        },
    )
    .await?;
    cluster.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_node_never_leaves_two_live_agents_for_one_session() -> anyhow::Result<()> {
    // No checkpoints: the namespaced node cannot reach the S3 server.
    let mut cluster = TestCluster::builder()
        .nodes(1)
        .configure_node(|_, cfg, _| cfg.checkpoint_interval = Duration::ZERO)
        .start()
        .await?;
    let ns = NetNs::create()?;
    let node = ProcessNode::start_in(
        &cluster,
        &["--capacity", "2", "--checkpoint-interval", "0"],
        Some(&ns),
    )
    .await?;
    // A dispatcher of both nodes takes over from the cluster's own.
    let (url, resolve) = (node.url.clone(), node.resolve.clone());
    let id = format!("partition-{}", &node.id);
    let mut c = cluster
        .add_dispatcher_configured(&id, "127.0.0.1:0".parse()?, move |cfg| {
            cfg.agent_servers.push(url);
            cfg.node_resolve.push(resolve);
        })
        .await?;
    cluster.sigterm_dispatcher().await?;
    // The session starts on the namespaced node: the other is drained
    // meanwhile.
    let mut nodes = pb::nodes_client::NodesClient::new(cluster.api_on_last_dispatcher()?);
    let other = cluster.nodes[0].id.clone();
    nodes
        .drain_node(pb::DrainNodeRequest {
            node: other.clone(),
        })
        .await?;
    let s = idle_session(&mut c, fake_session("echo ready")).await?;
    nodes
        .undrain_node(pb::UndrainNodeRequest { node: other })
        .await?;
    let ran_on = get(&mut c, &s.name).await?.node;
    assert_eq!(ran_on, node.id, "the session runs in the namespace");
    cut_off_mid_turn(
        &mut c,
        &s,
        &ran_on,
        || ns.set_connected(false),
        || ns.set_connected(true),
    )
    .await?;
    drop(node);
    cluster.shutdown().await?;
    ns.close().await;
    Ok(())
}
