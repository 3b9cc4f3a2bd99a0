//! Reliability on a full fleet: a lost dispatcher's sessions are re-attached
//! whatever the nodes' load (kill -9 with another dispatcher alive, kill -9
//! with a same-id restart, SIGTERM), one live agent per session through a
//! node stall, and the dead man's switch of a node killed with SIGKILL.

use std::time::{Duration, Instant};

use berth_proto::v1::{self as pb, sessions_client::SessionsClient};
use berth_tests::*;

/// Sessions on every slot of a 2×2 fleet.
const FULL: usize = 4;

/// Sends each session a turn that outlives the fault to come.
async fn turns(
    c: &mut SessionsClient<Api>,
    sessions: &[pb::Session],
    tag: &str,
) -> anyhow::Result<Vec<i64>> {
    let mut seqs = Vec::new();
    for (i, s) in sessions.iter().enumerate() {
        seqs.push(send(c, &s.name, &format!("delay 1500 {tag}-{i}")).await?);
    }
    for s in sessions {
        wait_for_status(
            c,
            &s.name,
            pb::SessionStatus::Running,
            Duration::from_secs(30),
        )
        .await?;
    }
    Ok(seqs)
}

/// Every turn is answered, every session is idle again at a newer epoch,
/// none was stopped or lost a turn, and a message sent after the fault is
/// answered too.
async fn all_came_through(
    c: &mut SessionsClient<Api>,
    sessions: &[pb::Session],
    seqs: &[i64],
    tag: &str,
) -> anyhow::Result<()> {
    for (i, (s, seq)) in sessions.iter().zip(seqs).enumerate() {
        assert_eq!(reply_after(c, &s.name, *seq).await?, format!("{tag}-{i}"));
    }
    for (i, s) in sessions.iter().enumerate() {
        assert_eq!(
            turn(c, &s.name, &format!("echo after {tag} {i}")).await?,
            format!("after {tag} {i}")
        );
        let events = events_of(c, &s.name).await?;
        for bad in [
            "session.status_stopped",
            "session.turn_lost",
            "session.status_failed",
        ] {
            assert!(
                !events.iter().any(|e| e.r#type == bad),
                "{} has {bad} after {tag}",
                s.name
            );
        }
        assert_eq!(
            events.iter().filter(|e| e.r#type == "runtime.init").count(),
            1,
            "{}: the agent ran on in its container",
            s.name
        );
    }
    Ok(())
}

/// The three ways a dispatcher goes, on a fleet with no free slot: each
/// time every session is re-attached where it runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_fleet_loses_no_session_when_its_dispatcher_goes() -> anyhow::Result<()> {
    let mut cluster = TestCluster::builder().nodes(2).capacity(2).start().await?;
    let mut k = cluster.add_killable_dispatcher("full-fleet").await?;
    cluster.sigterm_dispatcher().await?;
    let mut sessions = Vec::new();
    for i in 0..FULL {
        sessions.push(idle_session(&mut k.client, fake_session(&format!("echo ready {i}"))).await?);
    }
    let mut per_node = std::collections::HashMap::<String, usize>::new();
    for s in &sessions {
        *per_node
            .entry(get(&mut k.client, &s.name).await?.node)
            .or_default() += 1;
    }
    assert_eq!(per_node.len(), 2, "{per_node:?}");
    assert!(
        per_node.values().all(|n| *n == 2),
        "every slot is taken: {per_node:?}"
    );

    // kill -9, and the same id restarts.
    let seqs = turns(&mut k.client, &sessions, "restart").await?;
    k.kill();
    let started = Instant::now();
    let mut k = cluster.add_killable_dispatcher("full-fleet").await?;
    all_came_through(&mut k.client, &sessions, &seqs, "restart").await?;
    eprintln!(
        "same-id restart: all re-attached in {:?}",
        started.elapsed()
    );

    // kill -9 with another dispatcher alive; a message sent while the
    // sessions wait for their new owner is answered too.
    let mut other = cluster.add_dispatcher().await?;
    let seqs = turns(&mut other, &sessions, "kill").await?;
    k.kill();
    all_came_through(&mut other, &sessions, &seqs, "kill").await?;

    // SIGTERM (a rolling update) of the owner now.
    let mut last = cluster.add_dispatcher().await?;
    let seqs = turns(&mut last, &sessions, "sigterm").await?;
    let owner = {
        let mut db =
            <sqlx::PgConnection as sqlx::Connection>::connect(&cluster.database_url).await?;
        sqlx::query_scalar::<_, String>("SELECT owner FROM sessions WHERE id = $1::uuid")
            .bind(&sessions[0].id)
            .fetch_one(&mut db)
            .await?
    };
    cluster.sigterm_dispatcher_id(&owner)?;
    all_came_through(&mut last, &sessions, &seqs, "sigterm").await?;
    for s in &sessions {
        stop_and_wait(&mut last, &s.name).await?;
    }
    cluster.shutdown().await
}

/// A node killed with SIGKILL leaves containers behind (its warm pool
/// here); each stops and is removed by Docker, volumes and all, within the
/// dead man's switch's bound, with no node restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_with_sigkill_leaves_no_container_running() -> anyhow::Result<()> {
    let id = format!(
        "deadman-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let gateway = std::env::temp_dir().join("berth-test-gateway");
    let objects = std::env::temp_dir().join(format!("berth-test-{id}-objects"));
    let mut node = std::process::Command::new(node_binary())
        .args([
            "--listen",
            &free_addr()?.to_string(),
            "--metrics-listen",
            "off",
        ])
        .args(["--node-id", &id, "--insecure-plaintext", "--capacity", "2"])
        .args(["--warm-pool", &format!("{TEST_IMAGE}=2")])
        .args(["--dead-man-timeout", "4"])
        .arg("--gateway-dir")
        .arg(&gateway)
        .arg("--gateway-forwarder")
        .arg(forwarder())
        .arg("--objects-dir")
        .arg(&objects)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let label = [format!("berth.node={id}")];
    let deadline = Instant::now() + Duration::from_secs(60);
    while containers_labelled(&label).await?.len() < 2 {
        if Instant::now() > deadline {
            let _ = node.kill();
            remove_node_containers(&id);
            anyhow::bail!("the node's warm pool never filled");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let volumes = |id: String| async move {
        let filters = std::collections::HashMap::from([(
            "label".to_string(),
            vec![format!("berth.node={id}")],
        )]);
        let opts = bollard::query_parameters::ListVolumesOptions {
            filters: Some(filters),
        };
        anyhow::Ok(
            docker()
                .await?
                .list_volumes(Some(opts))
                .await?
                .volumes
                .unwrap_or_default()
                .len(),
        )
    };
    assert!(
        volumes(id.clone()).await? >= 2,
        "every volume carries the node's label"
    );
    node.kill()?;
    node.wait()?;
    let killed = Instant::now();
    // The switch's own bound: the timeout, the watcher's one-second poll,
    // and the container's exit.
    let stopped_within = Duration::from_secs(4 + 6);
    while !running_labelled(&label).await?.is_empty() {
        if killed.elapsed() > stopped_within {
            remove_node_containers(&id);
            anyhow::bail!("containers of the killed node still running after {stopped_within:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let stopped = killed.elapsed();
    // Docker's auto-remove then takes them and their volumes; on a busy
    // daemon that lags the stop by seconds.
    let removed_within = Duration::from_secs(60);
    while !containers_labelled(&label).await?.is_empty() || volumes(id.clone()).await? > 0 {
        if killed.elapsed() > removed_within {
            remove_node_containers(&id);
            anyhow::bail!(
                "the killed node's stopped containers or their volumes still there after {removed_within:?}"
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!(
        "the killed node's containers stopped {stopped:?} and were removed with their volumes {:?} after the kill",
        killed.elapsed()
    );
    let _ = std::fs::remove_dir_all(&objects);
    Ok(())
}

/// A member key of the cluster's project and the key's id, made by `by`.
async fn member_key(by: Api) -> anyhow::Result<(String, String)> {
    use berth_proto::v1::api_keys_client::ApiKeysClient;
    let r = ApiKeysClient::new(by)
        .create_api_key(pb::CreateApiKeyRequest {
            role: pb::Role::Member as i32,
            display_name: "member".into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    let key = r.key.expect("a key");
    Ok((r.token, key.name))
}

/// A member manages only the keys it made (and itself); fleet-admin keys
/// are the fleet admins' alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_revokes_only_its_own_keys_and_never_an_admins() -> anyhow::Result<()> {
    use berth_proto::v1::api_keys_client::ApiKeysClient;
    let cluster = TestCluster::builder().start().await?;
    let admin_key = ApiKeysClient::new(cluster.api())
        .who_am_i(pb::WhoAmIRequest {})
        .await?
        .into_inner()
        .name;
    let (m1_token, _) = member_key(cluster.api()).await?;
    let (_, m2_name) = member_key(cluster.api()).await?;
    let mut m1 = ApiKeysClient::new(cluster.api_as(Some(&m1_token))?);
    let revoke = |name: &str| pb::RevokeApiKeyRequest { name: name.into() };
    for (name, what) in [
        (&admin_key, "the fleet admin's key"),
        (&m2_name, "another member's key"),
    ] {
        let refused = m1.revoke_api_key(revoke(name)).await.expect_err(what);
        assert_eq!(
            refused.code(),
            tonic::Code::PermissionDenied,
            "{what}: {refused:?}"
        );
        assert!(
            refused.message().contains("cannot revoke"),
            "{}",
            refused.message()
        );
    }
    // The admin key still works; a key m1 made is m1's to revoke.
    ApiKeysClient::new(cluster.api())
        .who_am_i(pb::WhoAmIRequest {})
        .await?;
    let (_, mine) = member_key(cluster.api_as(Some(&m1_token))?).await?;
    let revoked = m1.revoke_api_key(revoke(&mine)).await?.into_inner();
    assert!(revoked.revoke_time.is_some());
    cluster.shutdown().await
}

/// A revoked key's open StreamEvents ends UNAUTHENTICATED within the key
/// cache's lifetime, whichever dispatcher revoked it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_keys_open_stream_ends_unauthenticated() -> anyhow::Result<()> {
    use berth_proto::v1::api_keys_client::ApiKeysClient;
    let mut cluster = TestCluster::builder().start().await?;
    let s = idle_session(&mut cluster.client(), fake_session("echo ready")).await?;
    let (token, name) = member_key(cluster.api()).await?;
    let mut member = SessionsClient::new(cluster.api_as(Some(&token))?);
    let mut stream = member
        .stream_events(pb::StreamEventsRequest {
            name: s.name.clone(),
            after_seq: 0,
        })
        .await?
        .into_inner();
    // Replayed history first; then the stream waits for live events.
    while let Ok(Ok(Some(_))) =
        tokio::time::timeout(Duration::from_millis(500), stream.message()).await
    {}
    // Revoked through another dispatcher: this one learns it from Postgres.
    cluster.add_dispatcher().await?;
    let revoked_at = Instant::now();
    ApiKeysClient::new(cluster.api_on_last_dispatcher()?)
        .revoke_api_key(pb::RevokeApiKeyRequest { name })
        .await?;
    let ended = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match stream.message().await {
                Ok(Some(_)) => continue,
                other => return other,
            }
        }
    })
    .await?;
    let status = ended.expect_err("the stream ends with an error");
    assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
    let took = revoked_at.elapsed();
    eprintln!("the revoked key's stream ended {took:?} after the revoke");
    assert!(took <= berth_dispatcher::auth::CACHE_TTL, "took {took:?}");
    cluster.shutdown().await
}

/// Sends `request` raw on a new connection to `addr`; the response's status
/// line and how long it took, or `None` when the server closed the
/// connection without answering.
async fn raw_http(
    addr: std::net::SocketAddr,
    request: &[u8],
) -> anyhow::Result<(Option<String>, Duration)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut conn = tokio::net::TcpStream::connect(addr).await?;
    let started = Instant::now();
    conn.write_all(request).await?;
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(15), async {
        let mut buf = [0u8; 4096];
        loop {
            match conn.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    answer.extend_from_slice(&buf[..n]);
                    if answer.windows(4).any(|w| w == b"\r\n\r\n") {
                        break;
                    }
                }
            }
        }
    })
    .await;
    anyhow::ensure!(read.is_ok(), "no answer and no close within 15 s");
    let status = String::from_utf8_lossy(&answer)
        .lines()
        .next()
        .filter(|l| !l.is_empty())
        .map(String::from);
    Ok((status, started.elapsed()))
}

/// A webhook sender cannot hold the listener: a huge declared length is
/// refused before the body is read, a body that never comes is answered
/// 408, and headers that never end close the connection, each within the
/// read timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_sender_cannot_hold_the_listener_open() -> anyhow::Result<()> {
    let addr = free_addr()?;
    let cluster = TestCluster::builder()
        .configure_dispatcher(move |cfg| {
            cfg.webhook_listen = berth_common::metrics::Listen(Some(addr));
            cfg.webhook_read_timeout = Duration::from_secs(1);
        })
        .start()
        .await?;
    let head = |length: &str| {
        format!(
            "POST /hooks/00000000-0000-0000-0000-000000000000 HTTP/1.1\r\nHost: x\r\n\
             Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n"
        )
    };
    // 10^12 bytes declared, 3 sent: 413 at once.
    let (status, took) = raw_http(addr, format!("{}abc", head("1000000000000")).as_bytes()).await?;
    assert!(
        status.as_deref().is_some_and(|s| s.contains(" 413 ")),
        "{status:?}"
    );
    assert!(took < Duration::from_millis(900), "took {took:?}");
    // 10 bytes declared, 3 sent, then nothing: 408 after the read timeout.
    let (status, took) = raw_http(addr, format!("{}abc", head("10")).as_bytes()).await?;
    assert!(
        status.as_deref().is_some_and(|s| s.contains(" 408 ")),
        "{status:?}"
    );
    assert!(took < Duration::from_secs(5), "took {took:?}");
    // Headers that never end: the connection is closed.
    let (status, took) = raw_http(addr, b"POST /hooks/x HTTP/1.1\r\nHost: x\r\n").await?;
    assert!(
        status.as_deref().is_none_or(|s| s.contains(" 408 ")),
        "{status:?}"
    );
    assert!(took < Duration::from_secs(5), "took {took:?}");
    cluster.shutdown().await
}

/// Sends raw bytes as a request's message (a client with a broken encoder).
#[derive(Clone, Default)]
struct RawCodec;

struct RawEncoder;
struct AnyDecoder;

impl tonic::codec::Encoder for RawEncoder {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(
        &mut self,
        item: Vec<u8>,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        use bytes::BufMut;
        dst.put_slice(&item);
        Ok(())
    }
}

impl tonic::codec::Decoder for AnyDecoder {
    type Item = ();
    type Error = tonic::Status;
    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<()>, tonic::Status> {
        use bytes::Buf;
        src.advance(src.remaining());
        Ok(Some(()))
    }
}

impl tonic::codec::Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = ();
    type Encoder = RawEncoder;
    type Decoder = AnyDecoder;
    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }
    fn decoder(&mut self) -> AnyDecoder {
        AnyDecoder
    }
}

/// A request that is not the method's message is the caller's error
/// (INVALID_ARGUMENT), and one over the size limit says the limit
/// (RESOURCE_EXHAUSTED); neither is the server's INTERNAL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecodable_and_oversized_requests_are_the_callers_errors() -> anyhow::Result<()> {
    let cluster = TestCluster::builder().start().await?;
    let call = |bytes: Vec<u8>| {
        let mut grpc =
            tonic::client::Grpc::new(cluster.api()).max_encoding_message_size(64 * 1024 * 1024);
        async move {
            grpc.ready()
                .await
                .map_err(|e| tonic::Status::unknown(e.to_string()))?;
            let path = tonic::codegen::http::uri::PathAndQuery::from_static(
                "/berth.v1.Sessions/GetSession",
            );
            grpc.unary(tonic::Request::new(bytes), path, RawCodec).await
        }
    };
    // Field 1 (name), length-delimited, 255 bytes long, and none follow.
    let broken = call(vec![0x0a, 0xff, 0x01]).await.expect_err("refused");
    assert_eq!(broken.code(), tonic::Code::InvalidArgument, "{broken:?}");
    let huge = call(vec![0u8; 17 * 1024 * 1024])
        .await
        .expect_err("refused");
    assert_eq!(huge.code(), tonic::Code::ResourceExhausted, "{huge:?}");
    assert!(huge.message().contains("16 MiB"), "{}", huge.message());
    cluster.shutdown().await
}

/// A message that cannot be decoded in the middle of a Connect stream ends
/// it with INVALID_ARGUMENT, as a unary call's would; what came before it
/// was carried out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_message_mid_connect_is_the_callers_error() -> anyhow::Result<()> {
    use pb::connect_request::Kind;
    use prost::Message;
    let cluster = TestCluster::builder().start().await?;
    let mut c = cluster.client();
    let s = c
        .create_session(fake_session("echo hi"))
        .await?
        .into_inner();
    reply_after(&mut c, &s.name, 0).await?;
    let request = |kind| pb::ConnectRequest { kind: Some(kind) }.encode_to_vec();
    let inbound = futures::stream::iter([
        request(Kind::Open(pb::ConnectOpen {
            name: s.name.clone(),
            after_seq: 0,
        })),
        request(Kind::Message(pb::ConnectMessage {
            text: "echo before the garbage".into(),
            r#ref: "a".into(),
        })),
        // Field 2 (message), length-delimited, 255 bytes long, none follow.
        vec![0x12, 0xff, 0x01],
    ]);
    let mut grpc = tonic::client::Grpc::new(cluster.api());
    grpc.ready().await?;
    let path = tonic::codegen::http::uri::PathAndQuery::from_static("/berth.v1.Sessions/Connect");
    let mut responses = grpc
        .streaming(tonic::Request::new(inbound), path, RawCodec)
        .await?
        .into_inner();
    let ended = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match responses.message().await {
                Ok(Some(())) => continue,
                Ok(None) => return None,
                Err(status) => return Some(status),
            }
        }
    })
    .await?
    .expect("the stream ends with an error");
    assert_eq!(ended.code(), tonic::Code::InvalidArgument, "{ended:?}");
    assert!(
        ended.message().contains("not a valid protobuf message"),
        "{}",
        ended.message()
    );
    let events = events_of(&mut c, &s.name).await?;
    assert!(
        events
            .iter()
            .any(|e| e.r#type == "user.message" && e.payload_json.contains("before the garbage")),
        "the message before the malformed one was carried out"
    );
    stop_and_wait(&mut c, &s.name).await?;
    cluster.shutdown().await
}

/// A file resource must name a file inside a writable volume: the volume
/// itself is refused by the API, naming the field, before any node sees it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_cannot_stand_for_a_whole_volume() -> anyhow::Result<()> {
    use berth_proto::v1::files_client::FilesClient;
    let cluster = TestCluster::builder().start().await?;
    let f = FilesClient::new(cluster.api())
        .upload_file(pb::UploadFileRequest {
            display_name: "in.txt".into(),
            content: b"data".to_vec(),
        })
        .await?
        .into_inner();
    for path in ["/workspace", "/workspace/"] {
        let refused = cluster
            .client()
            .create_session(pb::CreateSessionRequest {
                resources: vec![pb::Resource {
                    kind: Some(pb::resource::Kind::File(pb::FileResource {
                        file: f.name.clone(),
                        path: path.into(),
                    })),
                }],
                ..fake_session("echo hi")
            })
            .await
            .expect_err("refused");
        assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
        assert!(
            refused.message().contains("name a file inside it"),
            "{}",
            refused.message()
        );
        let fields = berth_cli::errors::describe(&refused).join("\n");
        assert!(fields.contains("resources.file.path"), "{fields}");
    }
    cluster.shutdown().await
}

/// A request_id names one request (AIP-155): repeating it returns the
/// same session; reusing it for another request is refused, naming it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_id_reused_for_another_request_is_refused() -> anyhow::Result<()> {
    let cluster = TestCluster::builder().start().await?;
    let mut c = cluster.client();
    let ask = |text: &str| pb::CreateSessionRequest {
        request_id: "create-once".into(),
        ..fake_session(text)
    };
    let first = c.create_session(ask("echo one")).await?.into_inner();
    let again = c.create_session(ask("echo one")).await?.into_inner();
    assert_eq!(again.name, first.name, "a retry gets the same session");
    let other = c
        .create_session(ask("echo two"))
        .await
        .expect_err("another request under the same id");
    assert_eq!(other.code(), tonic::Code::InvalidArgument, "{other:?}");
    let details = berth_cli::errors::describe(&other).join("\n");
    assert!(details.contains("request_id"), "{details}");
    assert!(other.message().contains(&first.name), "{}", other.message());
    stop_and_wait(&mut c, &first.name).await?;
    cluster.shutdown().await
}
