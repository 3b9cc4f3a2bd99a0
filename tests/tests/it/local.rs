//! The default deployment: `berth-dispatcher` with no AGENT_SERVERS runs its
//! own node in process. Two of them on one Docker host must not touch each
//! other's containers.

use std::time::Duration;

use berth_proto::v1::{self as pb, sessions_client::SessionsClient};
use berth_tests::{
    answering, collect_until, containers_labelled, create_database, drop_database, fake_session,
    stop_and_wait, wait_for_status,
};
use tokio_util::sync::CancellationToken;

static SEALER: std::sync::LazyLock<std::sync::Arc<berth_dispatcher::seal::Sealer>> =
    std::sync::LazyLock::new(|| std::sync::Arc::new(berth_dispatcher::seal::Sealer::ephemeral()));

/// One default dispatcher (in-process node) on `database_url`, as the binary
/// assembles it: (its client, its shutdown, its task).
async fn default_dispatcher(
    id: &str,
    database_url: &str,
    objects: &std::path::Path,
) -> anyhow::Result<(
    SessionsClient<berth_tests::Api>,
    CancellationToken,
    tokio::task::JoinHandle<anyhow::Result<()>>,
)> {
    let mut cfg = berth_dispatcher::Config::defaults();
    cfg.dispatcher_id = id.into();
    cfg.database_url = database_url.into();
    cfg.metrics_listen = berth_common::metrics::Listen(None);
    cfg.webhook_listen = berth_common::metrics::Listen(None);
    cfg.local_capacity = 4;
    cfg.objects.objects_dir = objects.to_path_buf();
    // The local-development set-up: anonymous calls, one key file shared
    // by both dispatchers (they share the database).
    cfg.allow_anonymous = true;
    cfg.sealer = Some(SEALER.clone());
    let mut node_cfg = berth_agent_server::Config::defaults();
    berth_tests::gateway_for_tests(&mut node_cfg);
    let node = berth_server::local_node_config(&cfg, node_cfg, false);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let shutdown = CancellationToken::new();
    let mut task = tokio::spawn(berth_server::run(cfg, node, listener, shutdown.clone()));
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?.connect_lazy();
    let client = SessionsClient::new(berth_tests::Api::new(
        channel,
        berth_tests::Bearer::default(),
    ));
    answering(client.clone(), std::slice::from_mut(&mut task)).await?;
    Ok((client, shutdown, task))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_default_dispatchers_on_one_docker_host_leave_each_others_sessions_alone()
-> anyhow::Result<()> {
    let tag = format!("local_{}", uuid::Uuid::new_v4().simple());
    let (database, url) = create_database(&tag).await?;
    let objects = std::env::temp_dir().join(&tag);
    let (a_id, b_id) = (format!("{tag}-a"), format!("{tag}-b"));
    // A failing assertion still leaves no containers behind.
    struct Cleanup([String; 2]);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            for node in &self.0 {
                berth_tests::remove_node_containers(node);
            }
        }
    }
    let _cleanup = Cleanup([format!("local-{a_id}"), format!("local-{b_id}")]);

    let (mut a, a_stop, a_task) = default_dispatcher(&a_id, &url, &objects).await?;
    let mut req = fake_session("echo first");
    req.display_name = "on a".into();
    let s = a.create_session(req).await?.into_inner();
    let placed = wait_for_status(
        &mut a,
        &s.name,
        pb::SessionStatus::Idle,
        Duration::from_secs(60),
    )
    .await?;
    let a_node = format!("local-{a_id}");
    // (Its node may also hold a spare: a pre-started agent for the next session.)
    let mine =
        containers_labelled(&[format!("berth.node={a_node}"), "berth.session".into()]).await?;
    assert_eq!(mine.len(), 1, "a's session runs on a's node: {mine:?}");

    // A second default dispatcher starts on the same host (and database):
    // its node reaps only its own leftovers.
    let (mut b, b_stop, b_task) = default_dispatcher(&b_id, &url, &objects).await?;
    let s_b = b
        .create_session(fake_session("echo second"))
        .await?
        .into_inner();
    wait_for_status(
        &mut b,
        &s_b.name,
        pb::SessionStatus::Idle,
        Duration::from_secs(60),
    )
    .await?;
    // (The two share a queue, so b's session may run on either node.)
    let after = containers_labelled(&[format!("berth.node={a_node}")]).await?;
    assert!(
        after.contains(&mine[0]),
        "a's container survived b's start: {after:?}"
    );

    // a's session still answers.
    let sent = a
        .send_message(pb::SendMessageRequest {
            name: s.name.clone(),
            text: "echo still here".into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    let events = collect_until(&mut a, &s.name, sent.seq, Duration::from_secs(30), |e| {
        e.r#type == "agent.message" && e.payload_json.contains("still here")
    })
    .await?;
    assert!(!events.is_empty());
    let s_now = a
        .get_session(pb::GetSessionRequest {
            name: s.name.clone(),
        })
        .await?
        .into_inner();
    assert_eq!(s_now.epoch, placed.epoch, "never re-placed");

    stop_and_wait(&mut a, &s.name).await?;
    stop_and_wait(&mut b, &s_b.name).await?;
    b_stop.cancel();
    b_task.await??;
    a_stop.cancel();
    a_task.await??;
    // Each node removed its containers as it stopped (Docker may take a
    // moment to finish a removal on a busy host).
    for node in [a_node, format!("local-{b_id}")] {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while !containers_labelled(&[format!("berth.node={node}")])
            .await?
            .is_empty()
        {
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "the containers of {node} outlived it"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    drop_database(&database).await?;
    let _ = std::fs::remove_dir_all(&objects);
    Ok(())
}
