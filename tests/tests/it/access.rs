//! Access control: API keys, projects (tenancy) and secrets, against a
//! real dispatcher, Postgres and Docker.

use berth_proto::v1::{
    self as pb, agents_client::AgentsClient, api_keys_client::ApiKeysClient,
    files_client::FilesClient, nodes_client::NodesClient, secrets_client::SecretsClient,
    sessions_client::SessionsClient,
};
use berth_tests::{Api, TestCluster, containers_of, fake_session, idle_session};
use tonic::Code;

/// A member key of `project`, made by the cluster's fleet admin.
pub(crate) async fn member_of(
    cluster: &TestCluster,
    project: &str,
) -> anyhow::Result<(Api, String)> {
    let r = ApiKeysClient::new(cluster.api())
        .create_api_key(pb::CreateApiKeyRequest {
            project: project.into(),
            role: pb::Role::Member as i32,
            display_name: format!("{project} member"),
        })
        .await?
        .into_inner();
    Ok((cluster.api_as(Some(&r.token))?, r.token))
}

fn code<T: std::fmt::Debug>(r: Result<tonic::Response<T>, tonic::Status>) -> (Code, String) {
    let s = r.expect_err("the call should be refused");
    (s.code(), s.message().to_string())
}

async fn db(cluster: &TestCluster) -> anyhow::Result<sqlx::PgConnection> {
    Ok(<sqlx::PgConnection as sqlx::Connection>::connect(&cluster.database_url).await?)
}

/// Every row of the tables that hold user data, as text.
pub(crate) async fn all_rows(cluster: &TestCluster) -> anyhow::Result<String> {
    let mut conn = db(cluster).await?;
    let mut out = String::new();
    for table in [
        "sessions",
        "events",
        "agents",
        "agent_versions",
        "files",
        "secrets",
        "api_keys",
        "session_turns",
    ] {
        let rows: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT t::text FROM {table} t"
        )))
        .fetch_all(&mut conn)
        .await?;
        // bytea columns print as hex: search them decoded too.
        for r in rows {
            out.push_str(&r);
            out.push('\n');
        }
    }
    let raw: Vec<Vec<u8>> = sqlx::query_scalar("SELECT raw FROM events WHERE raw IS NOT NULL")
        .fetch_all(&mut conn)
        .await?;
    for r in raw {
        out.push_str(&String::from_utf8_lossy(&r));
    }
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_call_needs_a_valid_unrevoked_key_and_admin_rights_stay_with_admins()
-> anyhow::Result<()> {
    let cluster = TestCluster::builder().start().await?;
    let list = |api: Api| async move {
        SessionsClient::new(api)
            .list_sessions(pb::ListSessionsRequest::default())
            .await
    };

    // No key, a made-up key, a tampered key, a non-bearer header.
    let (c, m) = code(list(cluster.api_as(None)?).await);
    assert_eq!(c, Code::Unauthenticated);
    assert!(m.contains("authorization"), "{m}");
    let fake = format!("berth_0123456789abcdef_{}", "A".repeat(43));
    assert_eq!(
        code(list(cluster.api_as(Some(&fake))?).await).0,
        Code::Unauthenticated
    );
    let mut tampered = cluster.token.clone();
    let last = tampered.pop().expect("a token");
    tampered.push(if last == 'A' { 'B' } else { 'A' });
    let (c, m) = code(list(cluster.api_as(Some(&tampered))?).await);
    assert_eq!(c, Code::Unauthenticated);
    assert!(!m.contains(&tampered), "the error echoes the token: {m}");
    assert_eq!(
        code(list(cluster.api_as(Some("nope"))?).await).0,
        Code::Unauthenticated
    );
    // Health checks need no key (load balancers' probes).
    let health = tonic_health::pb::health_client::HealthClient::new(cluster.api_as(None)?)
        .check(tonic_health::pb::HealthCheckRequest {
            service: "berth.v1.Sessions".into(),
        })
        .await?
        .into_inner();
    assert_eq!(
        health.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );

    // A member key works for its project, and is nothing more.
    let (member, member_token) = member_of(&cluster, "alpha").await?;
    list(member.clone()).await?;
    let me = ApiKeysClient::new(member.clone())
        .who_am_i(pb::WhoAmIRequest {})
        .await?
        .into_inner();
    assert_eq!(
        (me.project.as_str(), me.role),
        ("alpha", pb::Role::Member as i32)
    );
    let mut keys = ApiKeysClient::new(member.clone());
    let (c, _) = code(
        keys.create_api_key(pb::CreateApiKeyRequest {
            role: pb::Role::FleetAdmin as i32,
            ..Default::default()
        })
        .await,
    );
    assert_eq!(c, Code::PermissionDenied);
    let (c, _) = code(
        keys.create_api_key(pb::CreateApiKeyRequest {
            project: "beta".into(),
            ..Default::default()
        })
        .await,
    );
    assert_eq!(c, Code::PermissionDenied);
    let mut nodes = NodesClient::new(member.clone());
    let node = cluster.nodes[0].id.clone();
    let (c, m) = code(
        nodes
            .drain_node(pb::DrainNodeRequest { node: node.clone() })
            .await,
    );
    assert_eq!(c, Code::PermissionDenied, "{m}");
    assert!(m.contains("fleet-admin"), "{m}");
    assert_eq!(
        code(
            nodes
                .undrain_node(pb::UndrainNodeRequest { node: node.clone() })
                .await
        )
        .0,
        Code::PermissionDenied
    );
    assert_eq!(
        code(nodes.list_nodes(pb::ListNodesRequest {}).await).0,
        Code::PermissionDenied
    );
    // The admin's key does manage nodes.
    NodesClient::new(cluster.api())
        .list_nodes(pb::ListNodesRequest {})
        .await?;

    // A member sees its project's keys only, and cannot revoke the admin's.
    let listed = keys
        .list_api_keys(pb::ListApiKeysRequest::default())
        .await?
        .into_inner()
        .keys;
    assert!(listed.iter().all(|k| k.project == "alpha"), "{listed:?}");
    assert_eq!(
        code(
            keys.list_api_keys(pb::ListApiKeysRequest {
                project: "*".into(),
                ..Default::default()
            })
            .await
        )
        .0,
        Code::PermissionDenied
    );
    let admin_id = ApiKeysClient::new(cluster.api())
        .who_am_i(pb::WhoAmIRequest {})
        .await?
        .into_inner()
        .key_id;
    assert_eq!(
        code(
            keys.revoke_api_key(pb::RevokeApiKeyRequest { name: admin_id })
                .await
        )
        .0,
        Code::NotFound
    );

    // Tokens are stored only as hashes.
    let rows = all_rows(&cluster).await?;
    assert!(!rows.contains(&member_token) && !rows.contains(&cluster.token));
    // `berth_` + 16 hex digits + `_`, then the secret (which may hold `_`).
    let secret_half = &member_token["berth_".len() + 17..];
    assert_eq!(secret_half.len(), 43);
    assert!(!rows.contains(secret_half));

    // Revoked: refused at once on this dispatcher.
    ApiKeysClient::new(cluster.api())
        .revoke_api_key(pb::RevokeApiKeyRequest {
            name: format!("apiKeys/{}", me.key_id),
        })
        .await?;
    let (c, m) = code(list(member).await);
    assert_eq!(c, Code::Unauthenticated);
    assert!(m.contains("revoked"), "{m}");
    cluster.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn another_projects_ids_are_not_found_on_every_rpc() -> anyhow::Result<()> {
    let cluster = TestCluster::builder().start().await?;
    let (alpha, _) = member_of(&cluster, "alpha").await?;
    let (beta, _) = member_of(&cluster, "beta").await?;

    // Alpha's session, agent, file and secret.
    let mut a = SessionsClient::new(alpha.clone());
    let mut req = fake_session("echo alpha's private words");
    req.request_id = "shared-request-id".into();
    req.display_name = "alpha-private-name".into();
    let name = idle_session(&mut a, req.clone()).await?.name;
    let id = name.trim_start_matches("sessions/").to_string();
    AgentsClient::new(alpha.clone())
        .create_agent(pb::CreateAgentRequest {
            agent_id: "coder".into(),
            spec: Some(pb::AgentSpec {
                image: berth_tests::TEST_IMAGE.into(),
                ..Default::default()
            }),
        })
        .await?;
    let file = FilesClient::new(alpha.clone())
        .upload_file(pb::UploadFileRequest {
            display_name: "alpha.txt".into(),
            content: b"alpha data".to_vec(),
        })
        .await?
        .into_inner()
        .name;
    let secret = SecretsClient::new(alpha.clone())
        .create_secret(pb::CreateSecretRequest {
            display_name: "alpha key".into(),
            usage: pb::SecretUsage::AnthropicApiKey as i32,
            value: "sk-ant-alpha".into(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .name;

    // Beta, on each RPC that takes one of them: NOT_FOUND, and no byte of
    // alpha's data in the answer.
    let mut b = SessionsClient::new(beta.clone());
    let mut refusals: Vec<(&str, (Code, String))> = vec![
        (
            "GetSession",
            code(
                b.get_session(pb::GetSessionRequest { name: name.clone() })
                    .await,
            ),
        ),
        (
            "SendMessage",
            code(
                b.send_message(pb::SendMessageRequest {
                    name: name.clone(),
                    text: "hi".into(),
                    ..Default::default()
                })
                .await,
            ),
        ),
        (
            "Interrupt",
            code(
                b.interrupt(pb::InterruptRequest { name: name.clone() })
                    .await,
            ),
        ),
        (
            "StopSession",
            code(
                b.stop_session(pb::StopSessionRequest { name: name.clone() })
                    .await,
            ),
        ),
        (
            "PauseSession",
            code(
                b.pause_session(pb::PauseSessionRequest { name: name.clone() })
                    .await,
            ),
        ),
        (
            "ResumeSession",
            code(
                b.resume_session(pb::ResumeSessionRequest { name: name.clone() })
                    .await,
            ),
        ),
        (
            "ArchiveSession",
            code(
                b.archive_session(pb::ArchiveSessionRequest { name: name.clone() })
                    .await,
            ),
        ),
        (
            "DeleteSession",
            code(
                b.delete_session(pb::DeleteSessionRequest { name: name.clone() })
                    .await,
            ),
        ),
        (
            "CloneSession",
            code(
                b.clone_session(pb::CloneSessionRequest {
                    name: id.clone(),
                    ..Default::default()
                })
                .await,
            ),
        ),
        (
            "ExportSession",
            code(
                b.export_session(pb::ExportSessionRequest {
                    name: name.clone(),
                    ..Default::default()
                })
                .await,
            ),
        ),
        (
            "ListEvents",
            code(
                b.list_events(pb::ListEventsRequest {
                    name: name.clone(),
                    ..Default::default()
                })
                .await,
            ),
        ),
        (
            "StreamEvents",
            code(
                b.stream_events(pb::StreamEventsRequest {
                    name: name.clone(),
                    after_seq: 0,
                })
                .await,
            ),
        ),
    ];
    let mut agents = AgentsClient::new(beta.clone());
    refusals.push((
        "GetAgent",
        code(
            agents
                .get_agent(pb::GetAgentRequest {
                    name: "agents/coder".into(),
                    version: 0,
                })
                .await,
        ),
    ));
    refusals.push((
        "ArchiveAgent",
        code(
            agents
                .archive_agent(pb::ArchiveAgentRequest {
                    name: "coder".into(),
                })
                .await,
        ),
    ));
    refusals.push((
        "UpdateAgent",
        code(
            agents
                .update_agent(pb::UpdateAgentRequest {
                    name: "coder".into(),
                    spec: Some(pb::AgentSpec {
                        image: berth_tests::TEST_IMAGE.into(),
                        ..Default::default()
                    }),
                })
                .await,
        ),
    ));
    let mut files = FilesClient::new(beta.clone());
    refusals.push((
        "GetFile",
        code(
            files
                .get_file(pb::GetFileRequest { name: file.clone() })
                .await,
        ),
    ));
    refusals.push((
        "DeleteFile",
        code(
            files
                .delete_file(pb::DeleteFileRequest { name: file.clone() })
                .await,
        ),
    ));
    let mut secrets = SecretsClient::new(beta.clone());
    refusals.push((
        "GetSecret",
        code(
            secrets
                .get_secret(pb::GetSecretRequest {
                    name: secret.clone(),
                })
                .await,
        ),
    ));
    refusals.push((
        "DeleteSecret",
        code(
            secrets
                .delete_secret(pb::DeleteSecretRequest {
                    name: secret.clone(),
                })
                .await,
        ),
    ));
    let mut with_secret = fake_session("echo hi");
    with_secret.spec.as_mut().expect("spec").vault_ids = vec![secret.clone()];
    refusals.push((
        "CreateSession with alpha's secret",
        code(b.create_session(with_secret).await),
    ));
    for (rpc, (c, m)) in &refusals {
        assert_eq!(*c, Code::NotFound, "{rpc}: {c:?} {m}");
        assert!(
            !m.contains("alpha-private-name")
                && !m.contains("private words")
                && !m.contains("sk-ant"),
            "{rpc} leaks: {m}"
        );
    }
    // A file of alpha's in a session of beta's: refused as unknown.
    let mut with_file = fake_session("echo hi");
    with_file.resources = vec![pb::Resource {
        kind: Some(pb::resource::Kind::File(pb::FileResource {
            file: file.clone(),
            path: "/workspace/x".into(),
        })),
    }];
    let (c, m) = code(b.create_session(with_file).await);
    assert!(
        matches!(c, Code::InvalidArgument | Code::NotFound),
        "{c:?} {m}"
    );
    // Connect: the stream ends with NOT_FOUND.
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(pb::ConnectRequest {
        kind: Some(pb::connect_request::Kind::Open(pb::ConnectOpen {
            name: name.clone(),
            after_seq: 0,
        })),
    })
    .await?;
    match b
        .connect(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
    {
        Err(s) => assert_eq!(s.code(), Code::NotFound),
        Ok(r) => {
            let mut s = r.into_inner();
            let first = s.message().await;
            assert_eq!(first.expect_err("no event for beta").code(), Code::NotFound);
        }
    }
    // Lists hold only one's own; ids and request ids are per project.
    let listed = b
        .list_sessions(pb::ListSessionsRequest::default())
        .await?
        .into_inner()
        .sessions;
    assert!(listed.is_empty(), "{listed:?}");
    let beta_session = b.create_session(req).await?.into_inner();
    assert_ne!(
        beta_session.name, name,
        "a request id from another project returned its session"
    );
    assert_eq!(beta_session.project, "beta");
    agents
        .create_agent(pb::CreateAgentRequest {
            agent_id: "coder".into(),
            spec: Some(pb::AgentSpec {
                image: berth_tests::TEST_IMAGE.into(),
                ..Default::default()
            }),
        })
        .await?;
    assert!(
        secrets
            .list_secrets(pb::ListSecretsRequest {})
            .await?
            .into_inner()
            .secrets
            .is_empty()
    );
    // Alpha's things are untouched.
    let s = a
        .get_session(pb::GetSessionRequest { name: name.clone() })
        .await?
        .into_inner();
    assert_eq!(s.status, pb::SessionStatus::Idle as i32);
    assert_eq!(s.project, "alpha");
    FilesClient::new(alpha.clone())
        .get_file(pb::GetFileRequest { name: file })
        .await?;
    berth_tests::stop_and_wait(&mut a, &name).await?;
    berth_tests::stop_and_wait(&mut b, &beta_session.name).await?;
    cluster.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn secrets_and_env_values_never_reach_postgres_events_exports_or_the_container()
-> anyhow::Result<()> {
    let cluster = TestCluster::builder().start().await?;
    let (alpha, _) = member_of(&cluster, "alpha").await?;
    let mut secrets = SecretsClient::new(alpha.clone());
    let value = format!("sk-ant-api03-{}", uuid::Uuid::new_v4().simple());
    // Bad input names its field and never echoes the value.
    let (c, m) = code(
        secrets
            .create_secret(pb::CreateSecretRequest {
                value: value.clone(),
                ..Default::default()
            })
            .await,
    );
    assert_eq!(c, Code::InvalidArgument);
    assert!(m.contains("usage") && !m.contains(&value), "{m}");
    let (c, m) = code(
        secrets
            .create_secret(pb::CreateSecretRequest {
                usage: pb::SecretUsage::AnthropicApiKey as i32,
                ..Default::default()
            })
            .await,
    );
    assert_eq!(c, Code::InvalidArgument);
    assert!(m.contains("value"), "{m}");
    let secret = secrets
        .create_secret(pb::CreateSecretRequest {
            display_name: "model key".into(),
            usage: pb::SecretUsage::AnthropicApiKey as i32,
            value: value.clone(),
            ..Default::default()
        })
        .await?
        .into_inner();
    let env_value = format!("env-{}", uuid::Uuid::new_v4().simple());

    let mut a = SessionsClient::new(alpha.clone());
    let mut req = fake_session("echo hello");
    let spec = req.spec.as_mut().expect("spec");
    spec.vault_ids = vec![secret.name.clone()];
    spec.env.insert("PLAIN_SETTING".into(), env_value.clone());
    let s = idle_session(&mut a, req).await?;
    assert_eq!(s.env_keys, vec!["PLAIN_SETTING".to_string()]);
    assert_eq!(
        s.spec.as_ref().expect("spec").vault_ids,
        vec![secret.secret_id.clone()]
    );
    assert!(s.spec.as_ref().expect("spec").env.is_empty());

    // The container: neither its config nor any process's environment.
    let docker = berth_tests::docker().await?;
    let containers = containers_of(&s.id).await?;
    assert_eq!(containers.len(), 1, "{containers:?}");
    let inspect = docker
        .inspect_container(
            &containers[0],
            None::<bollard::query_parameters::InspectContainerOptions>,
        )
        .await?;
    let inspect = serde_json::to_string(&inspect)?;
    assert!(!inspect.contains(&value), "the secret is in docker inspect");
    let environ =
        berth_tests::exec_output(&containers[0], &["sh", "-c", "cat /proc/*/environ"]).await?;
    assert!(!environ.is_empty(), "read no environment at all");
    assert!(
        !environ.contains(&value),
        "the secret is in a process's environment"
    );
    let ps = berth_tests::exec_output(&containers[0], &["ps", "-ef"]).await?;
    assert!(
        environ.contains(&env_value),
        "plain env reaches the agent: {ps}\n{environ:?}"
    );

    // Events and exports.
    let events = berth_tests::events_of(&mut a, &s.name).await?;
    let all = format!("{events:?}");
    assert!(!all.contains(&value));
    for format in [pb::ExportFormat::Json, pb::ExportFormat::Markdown] {
        let e = a
            .export_session(pb::ExportSessionRequest {
                name: s.name.clone(),
                format: format as i32,
            })
            .await?
            .into_inner();
        assert!(
            !e.content.contains(&value),
            "{format:?} export has the secret"
        );
        assert!(
            !e.content.contains(&env_value),
            "{format:?} export has an env value"
        );
    }
    // Logs: everything berth logged in this process, at debug level.
    let logs = berth_tests::captured_logs();
    assert!(
        logs.contains(&s.id),
        "the capture holds this session's lines"
    );
    assert!(!logs.contains(&value), "the secret is in a log");
    // Postgres: neither the secret nor the env value, in any row.
    let rows = all_rows(&cluster).await?;
    assert!(rows.contains(&s.id), "the dump read the sessions table");
    assert!(!rows.contains(&value), "the secret is in Postgres in clear");
    assert!(
        !rows.contains(&env_value),
        "an env value is in Postgres in clear"
    );
    // No read returns it.
    let got = format!(
        "{:?}{:?}",
        secrets
            .get_secret(pb::GetSecretRequest {
                name: secret.name.clone()
            })
            .await?,
        secrets.list_secrets(pb::ListSecretsRequest {}).await?
    );
    assert!(got.contains(&secret.secret_id) && !got.contains(&value));

    // Resumed on a fresh run, the env value is still there: sealed, not lost.
    a.pause_session(pb::PauseSessionRequest {
        name: s.name.clone(),
    })
    .await?;
    berth_tests::wait_for_status(
        &mut a,
        &s.name,
        pb::SessionStatus::Paused,
        std::time::Duration::from_secs(60),
    )
    .await?;
    a.resume_session(pb::ResumeSessionRequest {
        name: s.name.clone(),
    })
    .await?;
    berth_tests::wait_for_status(
        &mut a,
        &s.name,
        pb::SessionStatus::Idle,
        std::time::Duration::from_secs(60),
    )
    .await?;
    let containers = containers_of(&s.id).await?;
    let environ =
        berth_tests::exec_output(&containers[0], &["sh", "-c", "cat /proc/*/environ"]).await?;
    assert!(environ.contains(&env_value) && !environ.contains(&value));
    berth_tests::stop_and_wait(&mut a, &s.name).await?;
    cluster.shutdown().await
}

/// A host-side stand-in for the model API (`fake-anthropic` on loopback)
/// that accepts only `key`; killed on drop.
pub(crate) struct ModelApi {
    pub(crate) addr: std::net::SocketAddr,
    child: std::process::Child,
}

impl ModelApi {
    pub(crate) fn start(key: &str) -> anyhow::Result<Self> {
        let addr = berth_tests::free_addr()?;
        let bin = berth_tests::forwarder().with_file_name("fake-anthropic");
        let child = std::process::Command::new(&bin)
            .args(["--listen", &addr.to_string(), "--require-key", key])
            .spawn()
            .map_err(|e| anyhow::anyhow!("{}: {e} (scripts/setup.sh builds it)", bin.display()))?;
        for _ in 0..100 {
            if std::net::TcpStream::connect(addr).is_ok() {
                return Ok(Self { addr, child });
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        anyhow::bail!("fake-anthropic did not listen on {addr}")
    }
}

impl Drop for ModelApi {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A TCP server on host loopback that answers `pong` to anything, counting
/// connections.
async fn pong_server() -> anyhow::Result<(
    std::net::SocketAddr,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    let hits = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let h = hits.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            h.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = [0u8; 64];
                if s.read(&mut buf).await.unwrap_or(0) > 0 {
                    let _ = s.write_all(b"pong").await;
                }
            });
        }
    });
    Ok((addr, hits))
}

/// A `count_tokens` call to the model API through the container's
/// forwarder on `port`, with a key that is not the vault's.
pub(crate) fn count_tokens_script(port: u16) -> String {
    let body = r#"{"messages":[]}"#;
    format!(
        "(printf 'POST /v1/messages/count_tokens HTTP/1.1\\r\\nHost: x\\r\\nx-api-key: a-guess\\r\\ncontent-type: application/json\\r\\ncontent-length: {}\\r\\nConnection: close\\r\\n\\r\\n{body}'; sleep 2) | timeout 5 nc 127.0.0.1 {port}",
        body.len()
    )
}

/// Stores `key` as a model-API key secret through `api`.
pub(crate) async fn model_key_secret(api: Api, key: &str) -> anyhow::Result<pb::Secret> {
    Ok(SecretsClient::new(api)
        .create_secret(pb::CreateSecretRequest {
            display_name: "model key".into(),
            usage: pb::SecretUsage::AnthropicApiKey as i32,
            value: key.to_string(),
            ..Default::default()
        })
        .await?
        .into_inner())
}

/// `CONNECT target` through the container's forwarder, then `ping`.
fn connect_script(port: u16, target: &str) -> String {
    format!(
        "(printf 'CONNECT {target} HTTP/1.1\\r\\nHost: {target}\\r\\n\\r\\n'; sleep 1; printf ping; sleep 1) | timeout 5 nc 127.0.0.1 {port}"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_sandbox_gets_out_only_through_the_gateway_and_its_key_stays_outside()
-> anyhow::Result<()> {
    let key = format!("sk-ant-api03-{}", uuid::Uuid::new_v4().simple());
    let model = ModelApi::start(&key)?;
    let (allowed, allowed_hits) = pong_server().await?;
    let (forbidden, forbidden_hits) = pong_server().await?;
    let (internal, internal_hits) = pong_server().await?;
    let model_url = format!("http://{}", model.addr);
    // The operator lets sessions reach the first two loopback servers; the
    // third is internal and not allowlisted by the operator.
    let operator_allows = vec![allowed.to_string(), forbidden.to_string()];
    let cluster = TestCluster::builder()
        .metrics()
        .configure_node(move |_, cfg, _| {
            cfg.model_api_url = model_url.clone();
            cfg.egress_allow_internal = operator_allows.clone();
        })
        .start()
        .await?;
    let port = berth_agent_server::Config::defaults().gateway_port;
    let (alpha, _) = member_of(&cluster, "alpha").await?;
    let secret = model_key_secret(alpha.clone(), &key).await?;
    let mut a = SessionsClient::new(alpha.clone());
    let mut req = fake_session("echo hi");
    let spec = req.spec.as_mut().expect("spec");
    spec.vault_ids = vec![secret.secret_id.clone()];
    // The session asks for the first and the third; the second is the
    // operator's to allow but not this session's.
    spec.egress = Some(pb::Egress {
        mode: pb::EgressMode::Allowlist as i32,
        allow: vec![allowed.to_string(), internal.to_string()],
    });
    let s = idle_session(&mut a, req).await?;
    let container = containers_of(&s.id).await?.pop().expect("a container");
    let sh = |script: String| {
        let container = container.clone();
        async move { berth_tests::exec_output(&container, &["sh", "-c", &script]).await }
    };

    // Only a loopback interface; the host's addresses fail locally.
    let ifaces = sh("tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' '".into()).await?;
    assert_eq!(
        ifaces.split_whitespace().collect::<Vec<_>>(),
        vec!["lo"],
        "{ifaces}"
    );
    let direct = sh(format!(
        "echo ping | timeout 3 nc 127.0.0.1 {} ; echo rc=$?",
        allowed.port()
    ))
    .await?;
    assert!(
        !direct.contains("pong"),
        "reached the host directly: {direct}"
    );

    // Allowed: through the gateway.
    let out = sh(connect_script(port, &allowed.to_string())).await?;
    assert!(out.contains("200") && out.ends_with("pong"), "{out:?}");
    assert_eq!(allowed_hits.load(std::sync::atomic::Ordering::SeqCst), 1);
    // Not in the session's policy: refused, never connected.
    let out = sh(connect_script(port, &forbidden.to_string())).await?;
    assert!(
        out.contains("403") && out.contains("egress policy"),
        "{out:?}"
    );
    assert_eq!(forbidden_hits.load(std::sync::atomic::Ordering::SeqCst), 0);
    // In the policy but internal, and the operator did not allow it.
    let out = sh(connect_script(port, &internal.to_string())).await?;
    assert!(out.contains("403") && out.contains("internal"), "{out:?}");
    assert_eq!(internal_hits.load(std::sync::atomic::Ordering::SeqCst), 0);
    // Plain http is refused.
    let out = sh(format!(
        "(printf 'GET http://{allowed}/ HTTP/1.1\\r\\nHost: x\\r\\nConnection: close\\r\\n\\r\\n'; sleep 2) | timeout 5 nc 127.0.0.1 {port}"
    ))
    .await?;
    assert!(out.contains("403"), "{out:?}");

    // The model API: whatever key the agent sends, the gateway sends the
    // vault's; the stand-in accepts only that one.
    let out = sh(count_tokens_script(port)).await?;
    assert!(
        out.contains("200 OK") && out.contains("input_tokens"),
        "{out:?}"
    );
    // Nor in any log line (debug level) of the dispatcher, node or gateway.
    assert!(
        !berth_tests::captured_logs().contains(&key),
        "the key is in a log"
    );
    // The key is nowhere in the container: not its env, not its files.
    let environ = sh(
        "cat /proc/*/environ; grep -rl sk-ant- /workspace /home /tmp /run/berth 2>/dev/null".into(),
    )
    .await?;
    assert!(!environ.contains(&key), "the key is in the container");

    // Each decision is counted.
    let addr = cluster.nodes[0].metrics.expect("node metrics");
    let (_, metrics) = berth_tests::http_get(addr, "/metrics").await?;
    let count = |decision: &str| -> f64 {
        metrics
            .lines()
            .find(|l| {
                l.starts_with(&format!(
                    "berth_egress_connections_total{{decision=\"{decision}\"}}"
                ))
            })
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or(-1.0)
    };
    assert!(
        count("allowed") >= 1.0 && count("denied") >= 3.0,
        "{metrics}"
    );
    berth_tests::stop_and_wait(&mut a, &s.name).await?;

    // A session without a key gets a clear 401 from the gateway itself.
    let s = idle_session(&mut a, fake_session("echo no key")).await?;
    let container = containers_of(&s.id).await?.pop().expect("a container");
    let out = berth_tests::exec_output(
        &container,
        &[
            "sh",
            "-c",
            &format!("(printf 'GET /v1/models HTTP/1.1\\r\\nHost: x\\r\\nConnection: close\\r\\n\\r\\n'; sleep 2) | timeout 5 nc 127.0.0.1 {port}"),
        ],
    )
    .await?;
    assert!(
        out.contains("401") && out.contains("no model API key"),
        "{out:?}"
    );
    berth_tests::stop_and_wait(&mut a, &s.name).await?;
    cluster.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_real_cli_reaches_the_model_api_only_through_the_gateway_with_the_vault_key()
-> anyhow::Result<()> {
    let key = format!("sk-ant-api03-{}", uuid::Uuid::new_v4().simple());
    let model = ModelApi::start(&key)?;
    let model_url = format!("http://{}", model.addr);
    // No stand-in inside the container this time: the only model API the
    // CLI can reach is the host's, through the gateway, which takes only
    // the vault's key.
    let cluster = TestCluster::builder()
        .configure_node(move |_, cfg, _| {
            cfg.model_api_url = model_url.clone();
        })
        .start()
        .await?;
    let (alpha, _) = member_of(&cluster, "alpha").await?;
    let secret = SecretsClient::new(alpha.clone())
        .create_secret(pb::CreateSecretRequest {
            display_name: "model key".into(),
            usage: pb::SecretUsage::AnthropicApiKey as i32,
            value: key.clone(),
            ..Default::default()
        })
        .await?
        .into_inner();
    let mut c = SessionsClient::new(alpha.clone());
    let s = c
        .create_session(pb::CreateSessionRequest {
            spec: Some(pb::AgentSpec {
                image: "berth-test-claude:latest".into(),
                runtime: pb::Runtime::ClaudeCode as i32,
                model: "claude-sonnet-4-5".into(),
                vault_ids: vec![secret.name.clone()],
                ..Default::default()
            }),
            initial_message: "say hello through the gateway".into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    let reply = berth_tests::reply_after(&mut c, &s.name, 0).await?;
    assert!(reply.contains("hello through the gateway"), "{reply}");
    let container = containers_of(&s.id).await?.pop().expect("a container");
    let environ =
        berth_tests::exec_output(&container, &["sh", "-c", "cat /proc/*/environ"]).await?;
    assert!(
        !environ.contains(&key),
        "the key is in the CLI's environment"
    );
    assert!(
        environ.contains("ANTHROPIC_BASE_URL=http://127.0.0.1:"),
        "{environ:?}"
    );
    let usage = berth_tests::get(&mut c, &s.name)
        .await?
        .usage
        .expect("usage");
    assert_eq!(usage.turns, 1);
    berth_tests::stop_and_wait(&mut c, &s.name).await?;
    drop(model);
    cluster.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mapped_client_certificate_stands_for_its_project_without_a_key() -> anyhow::Result<()> {
    use berth_common::tls::{CertKind, DISPATCHER_NAME, DevCa};
    let ca = DevCa::generate("access test CA")?;
    let cluster = TestCluster::builder()
        .ca(&ca)
        .api_tls()
        .configure_dispatcher(|cfg| {
            cfg.client_identities = vec![(
                "ops-alpha".into(),
                ("alpha".into(), berth_dispatcher::auth::Role::Member),
            )];
        })
        .start()
        .await?;
    let mapped = ca.material(&ca.issue(CertKind::Client, &["ops-alpha".to_string()])?);
    let channel = tonic::transport::Endpoint::from_shared(cluster.dispatcher_url.clone())?
        .tls_config(mapped.client(DISPATCHER_NAME))?
        .connect_lazy();
    let api = Api::new(channel, berth_tests::Bearer::default());
    let me = ApiKeysClient::new(api.clone())
        .who_am_i(pb::WhoAmIRequest {})
        .await?
        .into_inner();
    assert_eq!(
        (me.project.as_str(), me.role),
        ("alpha", pb::Role::Member as i32)
    );
    assert!(me.display_name.contains("ops-alpha"), "{me:?}");
    // It works as alpha: its sessions are alpha's.
    let s = SessionsClient::new(api.clone())
        .create_session(fake_session("echo via certificate"))
        .await?
        .into_inner();
    assert_eq!(s.project, "alpha");
    // And nothing more.
    assert_eq!(
        code(
            NodesClient::new(api)
                .list_nodes(pb::ListNodesRequest {})
                .await
        )
        .0,
        Code::PermissionDenied
    );
    // A certificate from the same CA that no identity names still needs a key.
    let (c, _) = code(
        SessionsClient::new(cluster.api_as(None)?)
            .list_sessions(pb::ListSessionsRequest::default())
            .await,
    );
    assert_eq!(c, Code::Unauthenticated);
    let mut admin = SessionsClient::new(cluster.api_as(Some(&cluster.token))?);
    assert!(
        admin
            .list_sessions(pb::ListSessionsRequest::default())
            .await?
            .into_inner()
            .sessions
            .is_empty(),
        "the admin (project default) sees alpha's session"
    );
    let mut alpha = SessionsClient::new(Api::new(
        tonic::transport::Endpoint::from_shared(cluster.dispatcher_url.clone())?
            .tls_config(mapped.client(DISPATCHER_NAME))?
            .connect_lazy(),
        berth_tests::Bearer::default(),
    ));
    berth_tests::stop_and_wait(&mut alpha, &s.name).await?;
    cluster.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ssh_git_resource_clones_with_a_vault_key_that_never_enters_the_container()
-> anyhow::Result<()> {
    let server = berth_tests::git_ssh::SshGitServer::start()?;
    // A repository on the ssh server.
    let work = server.root().join("work");
    std::fs::create_dir_all(&work)?;
    let git = berth_tests::git_http::git;
    git(&work, &["init", "-q"])?;
    std::fs::write(work.join("README.md"), "cloned over ssh")?;
    git(&work, &["add", "."])?;
    git(&work, &["commit", "-qm", "first"])?;
    let bare = server.root().join("repo.git");
    git(
        &work,
        &["clone", "-q", "--bare", ".", &bare.to_string_lossy()],
    )?;

    let allow = vec![server.host()];
    let node_allow = allow.clone();
    let cluster = TestCluster::builder()
        .configure_dispatcher(move |cfg| cfg.git_allow_hosts = allow.clone())
        .configure_node(move |_, cfg, _| cfg.git_allow_hosts = node_allow.clone())
        .start()
        .await?;
    let (alpha, _) = member_of(&cluster, "alpha").await?;
    let (beta, _) = member_of(&cluster, "beta").await?;
    let mut secrets = SecretsClient::new(alpha.clone());
    let key = secrets
        .create_secret(pb::CreateSecretRequest {
            display_name: "deploy key".into(),
            usage: pb::SecretUsage::GitSshKey as i32,
            value: server.user_key.clone(),
            ..Default::default()
        })
        .await?
        .into_inner();
    let model_key = secrets
        .create_secret(pb::CreateSecretRequest {
            display_name: "not an ssh key".into(),
            usage: pb::SecretUsage::AnthropicApiKey as i32,
            value: "sk-ant-x".into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    let with_git = |secret: &str| {
        let mut req = fake_session("echo cloned");
        req.resources = vec![pb::Resource {
            kind: Some(pb::resource::Kind::Git(pb::GitResource {
                url: server.url("repo.git"),
                r#ref: String::new(),
                path: "/workspace/repo".into(),
                ssh_key_secret: secret.to_string(),
                ..Default::default()
            })),
        }];
        req
    };
    let mut a = SessionsClient::new(alpha.clone());
    // ssh:// to a host the operator did not allowlist needs a key (refused
    // at the API: nothing is dialled); a key of the wrong usage or of
    // another project is refused too.
    let mut public = with_git("");
    if let Some(pb::resource::Kind::Git(g)) = &mut public.resources[0].kind {
        g.url = "ssh://git@example.com/owner/repo.git".into();
    }
    let (c, m) = code(a.create_session(public).await);
    assert_eq!(c, Code::InvalidArgument, "{m}");
    assert!(m.contains("ssh"), "{m}");
    let (c, m) = code(a.create_session(with_git(&model_key.name)).await);
    assert_eq!(c, Code::InvalidArgument, "{m}");
    assert!(m.contains("ssh_key_secret"), "{m}");
    let (c, _) = code(
        SessionsClient::new(beta)
            .create_session(with_git(&key.name))
            .await,
    );
    assert_eq!(c, Code::NotFound);

    let s = idle_session(&mut a, with_git(&key.name)).await?;
    assert_eq!(
        berth_tests::turn(&mut a, &s.name, "read repo/README.md").await?,
        "cloned over ssh"
    );
    let container = containers_of(&s.id).await?.pop().expect("a container");
    let environ =
        berth_tests::exec_output(&container, &["sh", "-c", "cat /proc/*/environ"]).await?;
    assert!(!environ.contains("OPENSSH PRIVATE KEY"), "{environ}");
    let files = berth_tests::exec_output(
        &container,
        &[
            "sh",
            "-c",
            "grep -rl 'OPENSSH PRIVATE KEY' /workspace /home /tmp 2>/dev/null; true",
        ],
    )
    .await?;
    assert!(
        files.trim().is_empty(),
        "the key is in the container: {files}"
    );
    // And the node kept no copy of it.
    let leftovers: Vec<_> = std::fs::read_dir(std::env::temp_dir())?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".key"))
        .filter(|e| e.file_name().to_string_lossy().starts_with("berth-git-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    berth_tests::stop_and_wait(&mut a, &s.name).await?;
    cluster.shutdown().await
}
