//! The fleet: placement across nodes, drain, warm pools, node loss, epochs
//! and mTLS. Real Docker, real Postgres, real TLS.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use berth_common::tls::{CertKind, DISPATCHER_NAME, DevCa};
use berth_proto::node::v1 as node_pb;
use berth_proto::node::v1::agent_server_client::AgentServerClient;
use berth_proto::v1 as pb;
use berth_tests::{
    TEST_IMAGE, TestCluster, collect_until, containers_labelled, docker, events_of, fake_session,
    get, no_containers_left, payload, wait_for_session, wait_for_status,
};
use futures::StreamExt;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

/// Creates a session and waits until it is idle after its first turn.
async fn started_session(
    client: &mut berth_proto::v1::sessions_client::SessionsClient<berth_tests::Api>,
    req: pb::CreateSessionRequest,
) -> anyhow::Result<pb::Session> {
    let s = client.create_session(req).await?.into_inner();
    wait_for_status(
        client,
        &s.name,
        pb::SessionStatus::Idle,
        Duration::from_secs(60),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bursts_spread_evenly_across_three_nodes_and_a_drained_node_gets_none() -> anyhow::Result<()>
{
    let cluster = TestCluster::builder().nodes(3).capacity(30).start().await?;
    let mut client = cluster.client();
    for i in 0..3 {
        cluster
            .wait_node(i, Duration::from_secs(10), |n| {
                n.state == pb::NodeState::Up as i32
            })
            .await?;
    }

    // 30 sessions in three bursts of ten, all alive at the end.
    let mut names = Vec::new();
    for _burst in 0..3 {
        let creates = (0..10).map(|_| {
            let mut c = client.clone();
            async move { c.create_session(fake_session("echo hi")).await }
        });
        for s in futures::future::join_all(creates).await {
            names.push(s?.into_inner().name);
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let mut per_node: HashMap<String, usize> = HashMap::new();
    for name in &names {
        let s = wait_for_status(
            &mut client,
            name,
            pb::SessionStatus::Idle,
            Duration::from_secs(120),
        )
        .await?;
        *per_node.entry(s.node).or_default() += 1;
    }
    let mean = names.len() as f64 / 3.0;
    let max = per_node.values().copied().max().unwrap_or(0) as f64;
    println!(
        "spread of 30 sessions over 3 nodes: {per_node:?} (max/mean {:.2})",
        max / mean
    );
    assert_eq!(per_node.len(), 3, "every node got sessions: {per_node:?}");
    assert!(
        max <= 1.5 * mean,
        "max {max} > 1.5 x mean {mean}: {per_node:?}"
    );

    // Drain node 2: the next sessions all go elsewhere.
    let drained = cluster.nodes[2].id.clone();
    cluster
        .nodes_client()
        .drain_node(pb::DrainNodeRequest {
            node: drained.clone(),
        })
        .await?;
    cluster
        .wait_node(2, Duration::from_secs(5), |n| {
            n.state == pb::NodeState::Draining as i32
        })
        .await?;
    for _ in 0..6 {
        let s = started_session(&mut client, fake_session("echo after drain")).await?;
        assert_ne!(
            s.node, drained,
            "a draining node received session {}",
            s.name
        );
    }
    // Its running sessions were left alone: each is still idle there, and
    // the node's own count (its next load report) agrees.
    let mut still_there = 0;
    for name in &names {
        let s = client
            .get_session(pb::GetSessionRequest { name: name.clone() })
            .await?
            .into_inner();
        if s.node == drained {
            assert_eq!(s.status, pb::SessionStatus::Idle as i32, "{name}: {s:?}");
            still_there += 1;
        }
    }
    assert_eq!(
        still_there, per_node[&drained],
        "sessions left the drained node"
    );
    let settled = cluster
        .wait_node(2, Duration::from_secs(10), |n| {
            n.running as usize == still_there
        })
        .await;
    if settled.is_err() {
        let status = cluster.node_status(2).await?;
        panic!(
            "the drained node runs {} sessions ({:?}); the store puts {still_there} there",
            status.running, status.session_ids
        );
    }
    // And grpc.health.v1 on the node says NOT_SERVING for the node API.
    let dispatcher = cluster
        .ca
        .issue(CertKind::Dispatcher, &[DISPATCHER_NAME.into()])?;
    let channel = Endpoint::from_shared(format!("https://{}", cluster.nodes[2].addr))?
        .tls_config(
            ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(&cluster.ca.cert_pem))
                .identity(Identity::from_pem(dispatcher.cert_pem, dispatcher.key_pem))
                .domain_name("node-2"),
        )?
        .connect_lazy();
    let health = tonic_health::pb::health_client::HealthClient::new(channel)
        .check(tonic_health::pb::HealthCheckRequest {
            service: "berth.node.v1.AgentServer".into(),
        })
        .await?
        .into_inner();
    assert_eq!(
        health.status,
        tonic_health::pb::health_check_response::ServingStatus::NotServing as i32
    );

    // Undrained, it takes sessions again.
    cluster
        .nodes_client()
        .undrain_node(pb::UndrainNodeRequest {
            node: drained.clone(),
        })
        .await?;
    cluster
        .wait_node(2, Duration::from_secs(5), |n| {
            n.state == pb::NodeState::Up as i32
        })
        .await?;
    let mut back = false;
    for _ in 0..12 {
        let s = started_session(&mut client, fake_session("echo after undrain")).await?;
        back |= s.node == drained;
    }
    assert!(back, "no session landed on the undrained node");
    let err = cluster
        .nodes_client()
        .undrain_node(pb::UndrainNodeRequest {
            node: "no-such-node".into(),
        })
        .await
        .expect_err("unknown node");
    assert_eq!(err.code(), tonic::Code::NotFound);

    // Unknown and ambiguous drains are precise errors.
    let err = cluster
        .nodes_client()
        .drain_node(pb::DrainNodeRequest {
            node: "no-such-node".into(),
        })
        .await
        .expect_err("unknown node");
    assert_eq!(err.code(), tonic::Code::NotFound);
    let err = cluster
        .nodes_client()
        .drain_node(pb::DrainNodeRequest { node: " ".into() })
        .await
        .expect_err("empty node");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("node"), "{}", err.message());
    cluster.shutdown().await
}

/// Docker's view of a container: its env and labels.
async fn inspect(id: &str) -> anyhow::Result<(Vec<String>, HashMap<String, String>)> {
    let docker = docker().await?;
    let info = docker
        .inspect_container(
            id,
            None::<bollard::query_parameters::InspectContainerOptions>,
        )
        .await?;
    let config = info.config.unwrap_or_default();
    Ok((
        config.env.unwrap_or_default(),
        config.labels.unwrap_or_default(),
    ))
}

/// Containers of a node with a label (key or key=value).
async fn containers_with(node_id: &str, label: &str) -> anyhow::Result<Vec<String>> {
    containers_labelled(&[format!("berth.node={node_id}"), label.to_string()]).await
}

/// Time from CreateSession to the first agent (runtime) event at the client,
/// and whether the run started warm.
async fn time_to_first_event(
    client: &mut berth_proto::v1::sessions_client::SessionsClient<berth_tests::Api>,
    req: pb::CreateSessionRequest,
) -> anyhow::Result<(Duration, bool, pb::Session)> {
    let t0 = Instant::now();
    let s = client.create_session(req).await?.into_inner();
    let mut warm = None;
    let mut first = None;
    collect_until(client, &s.name, 0, Duration::from_secs(60), |e| {
        if e.r#type == "session.status_running" || e.r#type == "session.status_idle" {
            warm = warm.or(payload(e)["warm"].as_bool());
        }
        if !e.r#type.starts_with("session.") && !e.r#type.starts_with("user.") {
            first.get_or_insert_with(|| t0.elapsed());
        }
        first.is_some() && warm.is_some()
    })
    .await?;
    let elapsed = first.ok_or_else(|| anyhow::anyhow!("no agent event"))?;
    Ok((elapsed, warm.unwrap_or(false), s))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
/// Warm and cold starts both work, neither carries session env, and the pool
/// refills. (Which is faster is measured by `berth-loadtest warm`.)
async fn warm_and_cold_starts_carry_no_session_env_and_the_pool_refills() -> anyhow::Result<()> {
    // The same image under a second name has no pool: it starts cold.
    let docker = docker().await?;
    let cold_image = "berth-test-agent:cold";
    let (repo, tag) = cold_image.split_once(':').unwrap_or((cold_image, "latest"));
    docker
        .tag_image(
            TEST_IMAGE,
            Some(
                bollard::query_parameters::TagImageOptionsBuilder::new()
                    .repo(repo)
                    .tag(tag)
                    .build(),
            ),
        )
        .await?;

    let cluster = TestCluster::builder()
        .nodes(1)
        .capacity(10)
        .warm_pool(&format!("{TEST_IMAGE}=3"))
        .start()
        .await?;
    let node = cluster.nodes[0].id.clone();
    let mut client = cluster.client();
    let full = |n: &pb::Node| n.warm.iter().any(|w| w.image == TEST_IMAGE && w.ready == 3);
    cluster.wait_node(0, Duration::from_secs(30), full).await?;

    // Warm containers: no session label, no session env, as Docker sees them.
    let spares = containers_with(&node, "berth.pool").await?;
    assert_eq!(spares.len(), 3, "{spares:?}");

    let mut secret = fake_session("echo hi");
    if let Some(spec) = secret.spec.as_mut() {
        spec.env.insert("BERTH_TEST_SECRET".into(), "s3cr3t".into());
    }
    for round in 0..3 {
        let mut req = secret.clone();
        req.initial_message = format!("echo warm {round}");
        let (_, warm, s) = time_to_first_event(&mut client, req).await?;
        assert!(
            warm,
            "session {} should have claimed a warm container",
            s.name
        );

        let mut req = secret.clone();
        req.initial_message = format!("echo cold {round}");
        if let Some(spec) = req.spec.as_mut() {
            spec.image = cold_image.into();
        }
        let (_, warm, s) = time_to_first_event(&mut client, req).await?;
        assert!(!warm, "session {} has no pool and must start cold", s.name);
    }

    // Every container, spare or claimed, holds no session env (it enters
    // at exec) and, by default, no network but its own loopback.
    for id in containers_with(&node, "berth.managed=true").await? {
        let (env, _) = inspect(&id).await?;
        let network = docker
            .inspect_container(
                &id,
                None::<bollard::query_parameters::InspectContainerOptions>,
            )
            .await?
            .host_config
            .and_then(|h| h.network_mode)
            .unwrap_or_default();
        assert_eq!(network, "none", "container {id} has a network");
        assert!(
            !env.iter()
                .any(|e| e.contains("BERTH_TEST_SECRET") || e.contains("s3cr3t")),
            "container {id} carries session env: {env:?}"
        );
    }
    // Spares carry no session label; cold starts do.
    for id in containers_with(&node, "berth.pool").await? {
        let (_, labels) = inspect(&id).await?;
        assert!(
            !labels.contains_key("berth.session"),
            "spare {id} is labelled {labels:?}"
        );
    }

    // The pool refills to its minimum after three claims.
    cluster.wait_node(0, Duration::from_secs(30), full).await?;
    cluster.shutdown().await?;
    // Shutdown removes the spares too.
    assert!(
        containers_with(&node, "berth.managed=true")
            .await?
            .is_empty()
    );
    docker
        .remove_image(
            cold_image,
            None::<bollard::query_parameters::RemoveImageOptions>,
            None,
        )
        .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_silent_node_is_marked_down_within_its_lease_and_its_sessions_run_elsewhere()
-> anyhow::Result<()> {
    let lease = Duration::from_secs(1);
    let cluster = TestCluster::builder()
        .nodes(2)
        .capacity(4)
        .lease(lease)
        .start()
        .await?;
    let mut client = cluster.client();
    for i in 0..2 {
        cluster
            .wait_node(i, Duration::from_secs(10), |n| {
                n.state == pb::NodeState::Up as i32
            })
            .await?;
    }
    let s = started_session(&mut client, fake_session("echo before the loss")).await?;
    let lost = cluster
        .nodes
        .iter()
        .position(|n| n.id == s.node)
        .ok_or_else(|| anyhow::anyhow!("session on an unknown node {}", s.node))?;
    let before = events_of(&mut client, &s.name).await?;

    // The node goes silent: connections stay open, nothing flows.
    let t0 = Instant::now();
    cluster.nodes[lost].proxy.set_paused(true);
    let down = cluster
        .wait_node(lost, lease * 4, |n| n.state == pb::NodeState::Down as i32)
        .await?;
    let noticed = t0.elapsed();
    println!(
        "silent node marked down after {noticed:?} (lease {lease:?}): {}",
        down.last_error
    );
    assert!(noticed < lease + Duration::from_secs(1), "took {noticed:?}");
    assert!(down.last_error.contains("lease"), "{}", down.last_error);

    // Its session is rescheduled and runs on the other node.
    let other = &cluster.nodes[1 - lost].id;
    let moved = wait_for_session(
        &mut client,
        &s.name,
        Duration::from_secs(30),
        "idle on the other node",
        |now| &now.node == other && now.status == pb::SessionStatus::Idle as i32,
    )
    .await?;
    assert!(moved.epoch > s.epoch, "a new placement has a new epoch");
    let after = events_of(&mut client, &s.name).await?;
    assert!(
        after
            .iter()
            .any(|e| e.r#type == "session.status_rescheduling")
    );
    // Everything persisted before the loss is there exactly once, unchanged.
    assert_eq!(&after[..before.len()], &before[..]);
    let seqs: Vec<i64> = after.iter().map(|e| e.seq).collect();
    assert_eq!(
        seqs,
        (1..=after.len() as i64).collect::<Vec<_>>(),
        "gapless, no duplicates"
    );
    let mut ids: Vec<&str> = after.iter().map(|e| e.id.as_str()).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), after.len(), "no event appears twice");

    // The node comes back and is used again.
    cluster.nodes[lost].proxy.set_paused(false);
    cluster
        .wait_node(lost, Duration::from_secs(15), |n| {
            n.state == pb::NodeState::Up as i32
        })
        .await?;
    cluster.shutdown().await
}

/// A client of node `name` with a dispatcher's certificate from the
/// cluster's CA (what a dispatcher dials with).
async fn as_dispatcher(
    cluster: &TestCluster,
    name: &str,
) -> anyhow::Result<AgentServerClient<tonic::transport::Channel>> {
    let dispatcher = cluster
        .ca
        .issue(CertKind::Dispatcher, &[DISPATCHER_NAME.into()])?;
    let ca = cluster.ca.cert_pem.clone();
    node_client(
        cluster,
        &ca,
        Some((dispatcher.cert_pem, dispatcher.key_pem)),
        name,
    )
    .await
}

/// A `Start` of a jsonl agent running `sh -c SCRIPT`; with `attach`, a
/// re-attach to the run after that node_seq.
fn jsonl_start(
    session_id: &str,
    epoch: i64,
    script: &str,
    attach: Option<u64>,
) -> node_pb::DispatcherFrame {
    node_pb::DispatcherFrame {
        epoch,
        kind: Some(node_pb::dispatcher_frame::Kind::Start(Box::new(
            node_pb::Start {
                session_id: session_id.to_string(),
                epoch,
                spec: Some(node_pb::SessionSpec {
                    image: TEST_IMAGE.into(),
                    runtime: node_pb::Runtime::Jsonl as i32,
                    runtime_args: vec!["sh".into(), "-c".into(), script.into()],
                    ..Default::default()
                }),
                attach: attach.is_some(),
                after_node_seq: attach.unwrap_or(0),
                traceparent: String::new(),
                first_message: None,
            },
        ))),
    }
}

/// Opens `RunSession` on a node with `start` as its first frame: the
/// sender for the frames after it, and the node's frames.
async fn open_run(
    node: &mut AgentServerClient<tonic::transport::Channel>,
    start: node_pb::DispatcherFrame,
) -> anyhow::Result<(
    tokio::sync::mpsc::Sender<node_pb::DispatcherFrame>,
    tonic::Streaming<node_pb::NodeFrame>,
)> {
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    tx.send(start).await?;
    let frames = node
        .run_session(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    Ok((tx, frames))
}

/// A client of node 0 with `identity`, trusting `ca`, dialling it as `node-0`.
async fn node_client(
    cluster: &TestCluster,
    ca: &str,
    identity: Option<(String, String)>,
    name: &str,
) -> anyhow::Result<AgentServerClient<tonic::transport::Channel>> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .domain_name(name);
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    let channel = Endpoint::from_shared(format!("https://{}", cluster.nodes[0].addr))?
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(5))
        .connect_lazy();
    Ok(AgentServerClient::new(channel))
}

/// A status with every transport cause, where TLS alerts show.
fn error_chain(status: &tonic::Status) -> String {
    use std::error::Error as _;
    let mut out = format!("{status}");
    let mut source = status.source();
    while let Some(s) = source {
        out.push_str(&format!(" <- {s:?}"));
        source = s.source();
    }
    out
}

/// Whether a call failed in the transport (the TLS session was torn down)
/// rather than with an answer from the server. Under TLS 1.3 the client
/// learns of a rejected certificate on its first read: as the server's alert
/// (`CertificateRequired`, `UnknownCA`) or as the connection closing.
fn refused_by_transport(status: &tonic::Status) -> bool {
    use std::error::Error as _;
    status
        .source()
        .is_some_and(|s| s.downcast_ref::<tonic::transport::Error>().is_some())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mtls_refuses_strangers_at_the_handshake() -> anyhow::Result<()> {
    // Node 1 has a certificate from another CA; node 2 presents node 0's name.
    let stranger = DevCa::generate("another CA")?;
    let stranger_cert = stranger.issue(CertKind::Node, &["node-1".into()])?;
    let stranger_material = stranger.material(&stranger_cert);
    let cluster = TestCluster::builder()
        .nodes(3)
        .configure_node(move |i, cfg, ca| match i {
            1 => cfg.tls.material = Some(stranger_material.clone()),
            2 => {
                let wrong = ca.issue(CertKind::Node, &["node-0".into()]).expect("issue");
                cfg.tls.material = Some(ca.material(&wrong));
            }
            _ => {}
        })
        .start()
        .await?;
    cluster
        .wait_node(0, Duration::from_secs(10), |n| {
            n.state == pb::NodeState::Up as i32
        })
        .await?;
    let bad_ca = cluster
        .wait_node(1, Duration::from_secs(10), |n| !n.last_error.is_empty())
        .await?;
    let bad_name = cluster
        .wait_node(2, Duration::from_secs(10), |n| !n.last_error.is_empty())
        .await?;
    println!(
        "node with another CA: {}\nnode with another's name: {}",
        bad_ca.last_error, bad_name.last_error
    );
    assert_eq!(bad_ca.state, pb::NodeState::Down as i32);
    assert!(
        bad_ca.last_error.contains("UnknownIssuer"),
        "{}",
        bad_ca.last_error
    );
    assert!(
        !bad_ca.last_error.contains("not valid for name"),
        "{}",
        bad_ca.last_error
    );
    assert_eq!(bad_name.state, pb::NodeState::Down as i32);
    assert!(
        bad_name
            .last_error
            .contains(r#"not valid for name "node-2""#),
        "{}",
        bad_name.last_error
    );

    // Sessions go only to the node that proved itself.
    let mut client = cluster.client();
    let s = started_session(&mut client, fake_session("echo hi")).await?;
    assert_eq!(s.node, cluster.nodes[0].id);

    let ca = cluster.ca.cert_pem.clone();
    // No client certificate: refused at the handshake.
    let mut anonymous = node_client(&cluster, &ca, None, "node-0").await?;
    let err = anonymous
        .list_sessions(node_pb::ListNodeSessionsRequest {})
        .await
        .expect_err("anonymous");
    assert!(refused_by_transport(&err), "{}", error_chain(&err));
    // A certificate from another CA: refused at the handshake.
    let other_client = stranger.issue(CertKind::Dispatcher, &[DISPATCHER_NAME.into()])?;
    let mut forged = node_client(
        &cluster,
        &ca,
        Some((other_client.cert_pem, other_client.key_pem)),
        "node-0",
    )
    .await?;
    let err = forged
        .list_sessions(node_pb::ListNodeSessionsRequest {})
        .await
        .expect_err("forged");
    assert!(refused_by_transport(&err), "{}", error_chain(&err));
    // The control: the same call with a dispatcher certificate from the CA works.
    let mut trusted = as_dispatcher(&cluster, "node-0").await?;
    let listed = trusted
        .list_sessions(node_pb::ListNodeSessionsRequest {})
        .await?
        .into_inner();
    assert_eq!(listed.sessions.len(), 1);
    // A client certificate from the right CA but not a dispatcher's: denied.
    let user = cluster.ca.issue(CertKind::Client, &["alice".into()])?;
    let mut alice =
        node_client(&cluster, &ca, Some((user.cert_pem, user.key_pem)), "node-0").await?;
    let err = alice
        .list_sessions(node_pb::ListNodeSessionsRequest {})
        .await
        .expect_err("alice");
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");
    assert!(err.message().contains("alice"), "{}", err.message());
    cluster.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stale_epochs_are_fenced_on_the_node() -> anyhow::Result<()> {
    let cluster = TestCluster::builder().nodes(1).start().await?;
    let mut node = as_dispatcher(&cluster, "node-0").await?;
    let session_id = uuid::Uuid::new_v4().to_string();
    let start = |epoch: i64| jsonl_start(&session_id, epoch, "sleep 600", None);
    let first_kind = |f: Option<Result<node_pb::NodeFrame, tonic::Status>>| match f {
        Some(Ok(node_pb::NodeFrame { kind: Some(k), .. })) => Ok(k),
        other => Err(anyhow::anyhow!("unexpected {other:?}")),
    };

    // Epoch 5 runs.
    let (tx5, mut run5) = open_run(&mut node, start(5)).await?;
    let node_pb::node_frame::Kind::Accepted(a5) = first_kind(run5.next().await)? else {
        anyhow::bail!("epoch 5 was not accepted");
    };
    // Epoch 4 is stale: refused, and epoch 5 keeps running.
    let (tx4, mut run4) = open_run(&mut node, start(4)).await?;
    let node_pb::node_frame::Kind::Refused(r) = first_kind(run4.next().await)? else {
        anyhow::bail!("epoch 4 was not refused");
    };
    assert!(r.reason.contains("epoch 5"), "{}", r.reason);
    // Epoch 6 supersedes 5: the old run ends and its container goes.
    let (tx6, mut run6) = open_run(&mut node, start(6)).await?;
    let node_pb::node_frame::Kind::Accepted(a6) = first_kind(run6.next().await)? else {
        anyhow::bail!("epoch 6 was not accepted");
    };
    assert_ne!(a5.container_id, a6.container_id);
    let ended = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(f) = run5.next().await {
            if let Ok(node_pb::NodeFrame {
                kind: Some(node_pb::node_frame::Kind::Exited(x)),
                ..
            }) = f
            {
                return Some(x);
            }
        }
        None
    })
    .await?;
    assert!(
        ended.is_some_and(|x| x.stopped),
        "the superseded run must end stopped"
    );
    let docker = docker().await?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while docker
        .inspect_container(
            &a5.container_id,
            None::<bollard::query_parameters::InspectContainerOptions>,
        )
        .await
        .is_ok()
    {
        anyhow::ensure!(Instant::now() < deadline, "fenced container still exists");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A frame carrying a stale epoch on the live run is rejected: that
    // stream ends (the run goes on for whoever owns epoch 6).
    tx6.send(node_pb::DispatcherFrame {
        epoch: 5,
        kind: Some(node_pb::dispatcher_frame::Kind::Message(
            node_pb::UserMessage {
                text: "hi".into(),
                seq: 1,
                traceparent: String::new(),
            },
        )),
    })
    .await?;
    let mut rejected = false;
    while let Some(f) = tokio::time::timeout(Duration::from_secs(20), run6.next()).await? {
        if let Err(status) = f {
            assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status}");
            assert!(status.message().contains("epoch 5"), "{}", status.message());
            rejected = true;
            break;
        }
    }
    assert!(rejected, "the stale frame was not rejected");
    drop((tx4, tx5, tx6));
    cluster.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sessions_of_a_dispatcher_that_stopped_heartbeating_are_requeued() -> anyhow::Result<()> {
    let cluster = TestCluster::builder().nodes(1).start().await?;
    let mut client = cluster.client();
    let s = started_session(&mut client, fake_session("echo hi")).await?;
    // Hand the session to a dispatcher that never heartbeats, as if its
    // owner had crashed.
    let mut db = <sqlx::PgConnection as sqlx::Connection>::connect(&cluster.database_url).await?;
    sqlx::query("UPDATE sessions SET owner = 'ghost-dispatcher' WHERE id = $1::uuid")
        .bind(&s.id)
        .execute(&mut db)
        .await?;
    // Within the 2 s lease it is re-queued, claimed again and runs at a new epoch.
    wait_for_session(
        &mut client,
        &s.name,
        Duration::from_secs(20),
        "idle at a new epoch",
        |now| now.epoch > s.epoch && now.status == pb::SessionStatus::Idle as i32,
    )
    .await?;
    let events = events_of(&mut client, &s.name).await?;
    let requeued = events
        .iter()
        .find(|e| e.r#type == "session.status_rescheduling")
        .ok_or_else(|| anyhow::anyhow!("no rescheduling event"))?;
    assert!(
        payload(requeued)["reason"]
            .as_str()
            .is_some_and(|r| r.contains("ghost-dispatcher")),
        "{}",
        requeued.payload_json
    );
    cluster.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_dispatcher_releases_its_sessions_at_once_and_a_stop_stays_a_stop()
-> anyhow::Result<()> {
    let mut cluster = TestCluster::builder().nodes(1).start().await?;
    let mut client = cluster.client();
    let kept = started_session(&mut client, fake_session("echo kept")).await?;
    let stopping = started_session(&mut client, fake_session("echo stopping")).await?;
    let mut db = <sqlx::PgConnection as sqlx::Connection>::connect(&cluster.database_url).await?;
    // `kept` belongs to a process under the id `restarted-dispatcher` that
    // crashed; `stopping` to a crashed dispatcher while the user's stop was
    // under way.
    sqlx::query("UPDATE sessions SET owner = 'restarted-dispatcher' WHERE id = $1::uuid")
        .bind(&kept.id)
        .execute(&mut db)
        .await?;
    sqlx::query(
        "UPDATE sessions SET owner = 'ghost-dispatcher', status = 'stopping' WHERE id = $1::uuid",
    )
    .bind(&stopping.id)
    .execute(&mut db)
    .await?;
    // The process comes back under the same id: it releases `kept` as it
    // starts, before any lease could run out.
    let started = std::time::Instant::now();
    let _restarted = cluster.add_dispatcher_as("restarted-dispatcher").await?;
    wait_for_session(
        &mut client,
        &kept.name,
        Duration::from_secs(20),
        "idle at a new epoch",
        |now| now.epoch > kept.epoch && now.status == pb::SessionStatus::Idle as i32,
    )
    .await?;
    eprintln!("released and running again after {:?}", started.elapsed());
    let events = events_of(&mut client, &kept.name).await?;
    let requeued = events
        .iter()
        .find(|e| e.r#type == "session.status_rescheduling")
        .ok_or_else(|| anyhow::anyhow!("no rescheduling event"))?;
    assert!(
        payload(requeued)["reason"]
            .as_str()
            .is_some_and(|r| r.contains("restarted")),
        "{}",
        requeued.payload_json
    );
    // The stop is honoured: the session ends stopped and never runs again.
    let stopped = wait_for_status(
        &mut client,
        &stopping.name,
        pb::SessionStatus::Stopped,
        Duration::from_secs(20),
    )
    .await?;
    assert_eq!(
        stopped.epoch, stopping.epoch,
        "a stop was turned into a restart"
    );
    no_containers_left(&stopping.id).await?;
    // And it says so: a stop, not a re-queue.
    let ended = events_of(&mut client, &stopping.name).await?;
    let last = ended
        .iter()
        .rfind(|e| e.r#type == "session.status_stopped")
        .ok_or_else(|| anyhow::anyhow!("no stopped event"))?;
    let why = payload(last)["reason"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        !why.contains("re-queued") && why.contains("stopped"),
        "{why}"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = get(&mut client, &stopping.name).await?;
    assert_eq!(after.status, pb::SessionStatus::Stopped as i32);
    assert_eq!(after.epoch, stopping.epoch);
    cluster.shutdown().await
}

/// A node keeps a run going when its dispatcher's stream drops, journals
/// what it sends until acknowledged, and hands the run, with everything
/// not acknowledged, to a newer epoch that re-attaches. Input the lost
/// owner already delivered is not delivered twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_keeps_a_run_for_a_reattaching_dispatcher() -> anyhow::Result<()> {
    let cluster = TestCluster::builder().nodes(1).start().await?;
    let mut node = as_dispatcher(&cluster, "node-0").await?;
    // This test is the node's dispatcher: the cluster's own one, which
    // knows no such session and would fence the run, is cut off, and the
    // test confirms its runs as a dispatcher does.
    cluster.nodes[0].proxy.set_paused(true);
    let confirmer = tokio::spawn(confirm_every_run(node.clone()));
    let session_id = uuid::Uuid::new_v4().to_string();
    // An agent that answers every line with a message naming it, and a
    // line with `burst` in it with 400 messages.
    let script = r#"while read l; do case "$l" in
        *burst*) i=0; while [ $i -lt 400 ]; do echo "{\"type\":\"message\",\"text\":\"b$i\"}"; i=$((i+1)); done;;
        *) echo "{\"type\":\"message\",\"text\":\"got $l\"}";;
    esac; done"#;
    let start = |epoch: i64, attach: Option<u64>| jsonl_start(&session_id, epoch, script, attach);
    let message_text = |epoch: i64, seq: i64, text: &str| node_pb::DispatcherFrame {
        epoch,
        kind: Some(node_pb::dispatcher_frame::Kind::Message(
            node_pb::UserMessage {
                text: text.to_string(),
                seq,
                traceparent: String::new(),
            },
        )),
    };
    let message = |epoch: i64, seq: i64| message_text(epoch, seq, &format!("m{seq}"));
    let next = |f: Option<Result<node_pb::NodeFrame, tonic::Status>>| match f {
        Some(Ok(f)) => Ok(f),
        other => Err(anyhow::anyhow!("unexpected {other:?}")),
    };
    let text = |f: &node_pb::NodeFrame| match &f.kind {
        Some(node_pb::node_frame::Kind::Line(l)) => String::from_utf8_lossy(&l.raw).to_string(),
        other => format!("{other:?}"),
    };

    // Epoch 1: two messages, two lines; the dispatcher acknowledges only
    // the first, then its stream drops.
    let (tx1, mut run1) = open_run(&mut node, start(1, None)).await?;
    let node_pb::NodeFrame {
        kind: Some(node_pb::node_frame::Kind::Accepted(a1)),
        ..
    } = next(run1.next().await)?
    else {
        anyhow::bail!("not accepted");
    };
    tx1.send(message(1, 1)).await?;
    let l1 = next(run1.next().await)?;
    assert!(text(&l1).contains("m1"), "{}", text(&l1));
    tx1.send(node_pb::DispatcherFrame {
        epoch: 1,
        kind: Some(node_pb::dispatcher_frame::Kind::Ack(node_pb::Ack {
            node_seq: l1.node_seq,
        })),
    })
    .await?;
    tx1.send(message(1, 2)).await?;
    let l2 = next(run1.next().await)?;
    assert!(text(&l2).contains("m2"), "{}", text(&l2));
    drop(tx1);
    drop(run1);
    tokio::time::sleep(Duration::from_millis(300)).await;

    // An older epoch cannot take it over; epoch 2 can, and is sent what
    // was not acknowledged, in the same container.
    let (tx0, mut stale) = open_run(&mut node, start(1, Some(0))).await?;
    assert!(matches!(
        next(stale.next().await)?.kind,
        Some(node_pb::node_frame::Kind::Refused(_))
    ));
    let (tx2, mut run2) = open_run(&mut node, start(2, Some(l1.node_seq))).await?;
    let node_pb::NodeFrame {
        kind: Some(node_pb::node_frame::Kind::Accepted(a2)),
        ..
    } = next(run2.next().await)?
    else {
        anyhow::bail!("not re-attached");
    };
    assert!(a2.attached);
    assert_eq!(a2.container_id, a1.container_id, "the same run goes on");
    let replayed = next(run2.next().await)?;
    assert_eq!(replayed.node_seq, l2.node_seq);
    assert_eq!(text(&replayed), text(&l2));
    // m2 again (the new owner cannot know it was delivered) is not
    // delivered twice; m3 is.
    tx2.send(message(2, 2)).await?;
    tx2.send(message(2, 3)).await?;
    let l3 = next(run2.next().await)?;
    assert!(text(&l3).contains("m3"), "{}", text(&l3));
    assert_eq!(l3.node_seq, l2.node_seq + 1, "no frame in between");

    // More unacknowledged frames than a stream buffers: a re-attach gets
    // every one, in order.
    tx2.send(message_text(2, 4, "burst")).await?;
    let mut burst = Vec::new();
    for _ in 0..400 {
        burst.push(next(run2.next().await)?);
    }
    drop((tx2, run2));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (tx3, mut run3) = open_run(&mut node, start(3, Some(l3.node_seq))).await?;
    assert!(matches!(
        next(run3.next().await)?.kind,
        Some(node_pb::node_frame::Kind::Accepted(_))
    ));
    for (i, want) in burst.iter().enumerate() {
        let got = next(run3.next().await)?;
        assert_eq!(got.node_seq, want.node_seq, "frame {i}");
        assert_eq!(text(&got), text(want));
    }
    drop((tx0, stale, tx3, run3));
    confirmer.abort();
    let _ = confirmer.await;
    cluster.shutdown().await
}

/// What a dispatcher's reconcile pass does for runs that are current:
/// confirms every run the node lists, every 300 ms.
async fn confirm_every_run(mut node: AgentServerClient<tonic::transport::Channel>) {
    loop {
        if let Ok(listed) = node
            .list_sessions(node_pb::ListNodeSessionsRequest {})
            .await
        {
            let listed = listed.into_inner();
            let confirm = listed
                .sessions
                .into_iter()
                .map(|s| node_pb::RunRef {
                    session_id: s.session_id,
                    epoch: s.epoch,
                })
                .collect();
            let _ = node
                .reconcile_sessions(node_pb::ReconcileSessionsRequest {
                    listed_at_ms: listed.listed_at_ms,
                    valid_for_ms: 3000,
                    confirm,
                    fence: Vec::new(),
                })
                .await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}
