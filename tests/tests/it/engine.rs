//! A node whose container engine is not the host's, as the chart's
//! `nodes.engine=dind` gives a node on a managed cluster with no Docker
//! socket: its own `dockerd` (see [`berth_tests::engine`]), reached only
//! through the socket the node is given, which mounts the shared gateway
//! directory at another path than the node's.

use std::time::Duration;

use berth_proto::v1 as pb;
use berth_tests::engine::Engine;
use berth_tests::*;

use crate::access::{ModelApi, count_tokens_script, model_key_secret};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_runs_sessions_on_an_engine_that_is_not_the_hosts() -> anyhow::Result<()> {
    let engine = Engine::start().await?;
    engine.load(TEST_IMAGE)?;
    let key = format!("sk-ant-api03-{}", uuid::Uuid::new_v4().simple());
    let model = ModelApi::start(&key)?;
    let model_url = format!("http://{}", model.addr);
    let mut cluster = TestCluster::builder().nodes(1).start().await?;
    let pool = format!("{TEST_IMAGE}=1");
    let node = ProcessNode::start_on(
        &cluster,
        &[
            "--capacity",
            "2",
            "--warm-pool",
            &pool,
            "--model-api-url",
            &model_url,
        ],
        &engine,
    )
    .await?;
    // Only a dispatcher of this node places sessions.
    let mut c = cluster.add_dispatcher_for(&[&node]).await?;
    cluster.sigterm_dispatcher().await?;

    // The warm pool fills on the engine.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while engine
        .containers(&format!("berth.pool={TEST_IMAGE}"))?
        .is_empty()
    {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "no warm container on the engine within 60 s: {}",
            node.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let secret = model_key_secret(cluster.api_on_last_dispatcher()?, &key).await?;
    let mut req = fake_session("echo hi");
    req.spec.as_mut().expect("spec").vault_ids = vec![secret.secret_id];
    let s = idle_session(&mut c, req).await?;
    assert_eq!(
        turn(&mut c, &s.name, "echo on the engine").await?,
        "on the engine"
    );

    // Its container is the engine's: the host's Docker has none.
    let inner = engine.containers_of(&s.id)?;
    assert_eq!(inner.len(), 1, "one container on the engine: {inner:?}");
    assert!(
        containers_of(&s.id).await?.is_empty(),
        "the host's docker lists a session container"
    );
    let container = &inner[0];

    // The gateway works through the mapped directory: whatever key the
    // agent sends, the model API gets the vault's (the stand-in accepts no
    // other), and the key is nowhere in the sandbox.
    let port = berth_agent_server::Config::defaults().gateway_port;
    let answer = engine.sh(container, &count_tokens_script(port))?;
    assert!(
        answer.contains("200 OK") && answer.contains("input_tokens"),
        "{answer:?}"
    );
    let inside = engine.sh(
        container,
        "cat /proc/*/environ; grep -rl sk-ant- /workspace /home /tmp /run/berth 2>/dev/null; true",
    )?;
    assert!(!inside.contains(&key), "the key is in the sandbox");

    // Pause to object storage and resume: the workspace comes back, in a
    // new container on the same engine.
    engine.sh(container, "echo kept > /workspace/note")?;
    pause_and_wait(&mut c, &s.name, Duration::from_secs(120)).await?;
    wait_until_gone(&engine, &s.id).await?;
    c.resume_session(pb::ResumeSessionRequest {
        name: s.name.clone(),
    })
    .await?;
    assert_eq!(turn(&mut c, &s.name, "echo back").await?, "back");
    // A warm container takes the session's name off the first event's
    // path: on a slow engine, after the turn may have ended.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let resumed = loop {
        let found = engine.containers_of(&s.id)?;
        if found.len() == 1 || std::time::Instant::now() > deadline {
            break found;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(resumed.len(), 1, "{resumed:?}");
    assert_ne!(&resumed[0], container, "a new container");
    assert_eq!(engine.sh(&resumed[0], "cat /workspace/note")?, "kept");

    stop_and_wait(&mut c, &s.name).await?;
    wait_until_gone(&engine, &s.id).await?;
    assert!(containers_of(&s.id).await?.is_empty());
    drop(node);
    cluster.shutdown().await
}

/// Waits until the engine has no container of the session left.
async fn wait_until_gone(engine: &Engine, session_id: &str) -> anyhow::Result<()> {
    for _ in 0..100 {
        if engine.containers_of(session_id)?.is_empty() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    anyhow::bail!("the session's container is still on the engine")
}
