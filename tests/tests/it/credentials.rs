//! Credentials the node's gateway attaches (SECRET_USAGE_HTTP_HEADER): an
//! MCP server's bearer token, used by the real Claude Code CLI, and a git
//! host's token for a clone. Neither is ever in the sandbox, an event, a
//! row or a log.

use std::path::PathBuf;

use berth_proto::v1::{self as pb, secrets_client::SecretsClient, sessions_client::SessionsClient};
use berth_tests::*;

use crate::{access, claude};

/// fake-anthropic on host loopback as an MCP server (`POST /mcp`) that
/// serves only `Bearer {token}` and logs every request; killed on drop.
pub(crate) struct McpHost {
    pub(crate) addr: std::net::SocketAddr,
    log: PathBuf,
    child: std::process::Child,
}

impl McpHost {
    fn start(token: &str) -> anyhow::Result<Self> {
        Self::with(&["--mcp-token", token])
    }

    /// With fake-anthropic's own arguments (how it checks tokens).
    pub(crate) fn with(check: &[&str]) -> anyhow::Result<Self> {
        let addr = free_addr()?;
        let log = std::env::temp_dir().join(format!("berth-mcp-{}.jsonl", uuid::Uuid::new_v4()));
        let bin = forwarder().with_file_name("fake-anthropic");
        let child = std::process::Command::new(&bin)
            .args(["--listen", &addr.to_string()])
            .args(check)
            .arg("--log")
            .arg(&log)
            .spawn()
            .map_err(|e| anyhow::anyhow!("{}: {e} (scripts/setup.sh builds it)", bin.display()))?;
        for _ in 0..100 {
            if std::net::TcpStream::connect(addr).is_ok() {
                return Ok(Self { addr, log, child });
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        anyhow::bail!("fake-anthropic did not listen on {addr}")
    }

    /// `(method, authorization)` of every MCP request it got.
    pub(crate) fn requests(&self) -> Vec<(String, String)> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v.get("mcp").is_some())
            .map(|v| {
                (
                    v["mcp"].as_str().unwrap_or_default().to_string(),
                    v["authorization"].as_str().unwrap_or_default().to_string(),
                )
            })
            .collect()
    }
}

impl Drop for McpHost {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
    }
}

/// Stores `token` as a bearer credential for `hosts`.
pub(crate) async fn bearer_credential(
    api: Api,
    token: &str,
    hosts: &[String],
) -> anyhow::Result<pb::Secret> {
    Ok(SecretsClient::new(api)
        .create_secret(pb::CreateSecretRequest {
            display_name: "a token".into(),
            usage: pb::SecretUsage::HttpHeader as i32,
            value: token.to_string(),
            hosts: hosts.to_vec(),
            header: None,
            oauth: None,
        })
        .await?
        .into_inner())
}

/// What a user could find of `token` in the session's sandbox, its events,
/// Postgres and the logs: the places where a finding is named.
pub(crate) async fn where_found(
    cluster: &TestCluster,
    c: &mut SessionsClient<Api>,
    s: &pb::Session,
    token: &str,
) -> anyhow::Result<Vec<&'static str>> {
    let mut found = Vec::new();
    let container = containers_of(&s.id).await?.pop().expect("a container");
    let inspect = tokio::process::Command::new("docker")
        .args(["inspect", &container])
        .output()
        .await?;
    if String::from_utf8_lossy(&inspect.stdout).contains(token) {
        found.push("docker inspect");
    }
    // The token goes in halves, so this command's own line never holds it.
    let (a, b) = token.split_at(token.len() / 2);
    let script = format!(
        "t='{a}''{b}'; cat /proc/*/environ /proc/*/cmdline 2>/dev/null; grep -rl -- \"$t\" /workspace /home /tmp /run/berth /etc 2>/dev/null"
    );
    let inside = exec_output(&container, &["sh", "-c", &script]).await?;
    if inside.contains(token) {
        found.push("the container's processes or files");
    }
    if format!("{:?}", events_of(c, &s.name).await?).contains(token) {
        found.push("the events");
    }
    if access::all_rows(cluster).await?.contains(token) {
        found.push("Postgres");
    }
    if captured_logs().contains(token) {
        found.push("the logs");
    }
    Ok(found)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_real_cli_calls_mcp_servers_through_the_gateway_and_never_holds_their_token()
-> anyhow::Result<()> {
    mcp_servers_through_the_gateway(Agent::RealCli).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fake_claude_calls_mcp_servers_as_the_real_cli_does() -> anyhow::Result<()> {
    mcp_servers_through_the_gateway(Agent::Fake).await
}

#[derive(Clone, Copy, PartialEq)]
enum Agent {
    RealCli,
    Fake,
}

async fn mcp_servers_through_the_gateway(agent: Agent) -> anyhow::Result<()> {
    let token = format!("mcp-token-{}", uuid::Uuid::new_v4().simple());
    let server = McpHost::start(&token)?;
    let allow = vec![server.addr.to_string()];
    let cluster = TestCluster::builder()
        .configure_node(move |_, cfg, _| {
            if agent == Agent::RealCli {
                claude::claude_node(cfg);
            }
            // The test's server is on loopback: the operator allows it.
            cfg.egress_allow_internal = allow.clone();
        })
        .start()
        .await?;
    let (alpha, _) = access::member_of(&cluster, "alpha").await?;
    let secret = bearer_credential(alpha.clone(), &token, &[server.addr.to_string()]).await?;
    let mut c = SessionsClient::new(alpha.clone());

    let first = r#"mcp docs lookup {"query":"berth"}"#;
    let mut req = match agent {
        Agent::RealCli => claude::claude_session(first),
        Agent::Fake => fake_session(first),
    };
    let spec = req.spec.as_mut().expect("spec");
    spec.runtime_args.clear();
    use pb::mcp_server::Transport;
    spec.mcp_servers = vec![
        pb::McpServer {
            name: "docs".into(),
            transport: Some(Transport::Remote(pb::McpRemote {
                url: format!("http://{}/mcp", server.addr),
                credential: secret.name.clone(),
            })),
        },
        pb::McpServer {
            name: "local".into(),
            transport: Some(Transport::Stdio(pb::McpStdio {
                command: "fake-anthropic".into(),
                args: vec!["mcp-stdio".into()],
            })),
        },
    ];
    // The tool policy names MCP tools like any other.
    spec.tool_policy = Some(pb::ToolPolicy {
        permission_mode: pb::PermissionMode::Default as i32,
        allowed_tools: vec!["mcp__docs__lookup".into(), "mcp__local__whoami".into()],
        disallowed_tools: vec!["mcp__docs__whoami".into()],
        ..Default::default()
    });
    let s = c.create_session(req).await?.into_inner();
    let first = reply_after(&mut c, &s.name, 0).await?;
    if !first.contains("looked up: berth") {
        let lines: Vec<String> = events_of(&mut c, &s.name)
            .await?
            .iter()
            .map(|e| format!("{} {}", e.r#type, String::from_utf8_lossy(&e.raw)))
            .collect();
        let logs = captured_logs();
        let gateway: Vec<&str> = logs
            .lines()
            .filter(|l| l.contains("route") || l.contains("egress"))
            .collect();
        panic!(
            "{first}\nevents:\n{}\ngateway:\n{}",
            lines.join("\n"),
            gateway.join("\n")
        );
    }

    // The CLI's init lists both servers' tools.
    let events = events_of(&mut c, &s.name).await?;
    let init = events
        .iter()
        .filter(|e| !e.raw.is_empty())
        .filter_map(|e| serde_json::from_slice::<serde_json::Value>(&e.raw).ok())
        .find(|l| l["type"] == "system" && l["subtype"] == "init")
        .expect("a system/init line");
    let tools: Vec<&str> = init["tools"]
        .as_array()
        .expect("tools")
        .iter()
        .filter_map(|t| t.as_str())
        .collect();
    for t in [
        "mcp__docs__lookup",
        "mcp__local__lookup",
        "mcp__local__whoami",
    ] {
        assert!(tools.contains(&t), "{t} missing from {tools:?}");
    }
    // A tool the policy denies is not even offered to the model.
    assert!(!tools.contains(&"mcp__docs__whoami"), "{tools:?}");
    let servers = &init["mcp_servers"];
    for name in ["docs", "local"] {
        let status = servers
            .as_array()
            .and_then(|a| a.iter().find(|s| s["name"] == name))
            .map(|s| s["status"].clone());
        assert_eq!(
            status,
            Some(serde_json::json!("connected")),
            "{name}: {servers}"
        );
    }

    // The stdio server runs in the container.
    let second = turn(&mut c, &s.name, "mcp local whoami {}").await?;
    assert!(second.contains("stdio server in the container"), "{second}");
    // A denied MCP tool is refused, never called.
    let third = turn(&mut c, &s.name, "mcp docs whoami {}").await?;
    assert!(!third.contains("http server"), "{third}");

    // The server saw the token on every request, from the gateway.
    let requests = server.requests();
    let methods: Vec<&str> = requests.iter().map(|(m, _)| m.as_str()).collect();
    for m in ["initialize", "tools/list", "tools/call"] {
        assert!(methods.contains(&m), "{m} not in {methods:?}");
    }
    let calls = methods.iter().filter(|m| **m == "tools/call").count();
    assert_eq!(
        calls, 1,
        "only the allowed call reached the server: {methods:?}"
    );
    assert!(
        requests
            .iter()
            .all(|(_, a)| *a == format!("Bearer {token}")),
        "a request without the token: {requests:?}"
    );

    // The token is nowhere the session or its user can see.
    let found = where_found(&cluster, &mut c, &s, &token).await?;
    assert!(found.is_empty(), "the token is in {found:?}");

    // The credential's last use is recorded, and its value never shown.
    let got = SecretsClient::new(alpha.clone())
        .get_secret(pb::GetSecretRequest {
            name: secret.name.clone(),
        })
        .await?
        .into_inner();
    assert!(got.last_use_time.is_some(), "{got:?}");
    assert_eq!(got.hosts, vec![server.addr.to_string()]);
    assert_eq!(
        got.header
            .as_ref()
            .map(|h| (h.name.as_str(), h.prefix.as_str())),
        Some(("Authorization", "Bearer "))
    );
    assert!(!format!("{got:?}").contains(&token));
    stop_and_wait(&mut c, &s.name).await?;
    cluster.shutdown().await
}

/// `METHOD path` through the container's forwarder; what came back.
async fn through_gateway(container: &str, method: &str, path: &str) -> anyhow::Result<String> {
    let port = berth_agent_server::Config::defaults().gateway_port;
    exec_output(
        container,
        &[
            "sh",
            "-c",
            &format!(
                "(printf '{method} {path} HTTP/1.1\\r\\nHost: x\\r\\nAuthorization: Bearer a-guess\\r\\nConnection: close\\r\\n\\r\\n'; sleep 2) | timeout 5 nc 127.0.0.1 {port}"
            ),
        ],
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_private_repository_is_cloned_and_fetched_with_a_token_the_sandbox_never_sees()
-> anyhow::Result<()> {
    let token = format!("ghp_{}", uuid::Uuid::new_v4().simple());
    let root = std::env::temp_dir().join(format!("berth-git-{}", uuid::Uuid::new_v4().simple()));
    let work = root.join("work");
    std::fs::create_dir_all(&work)?;
    let git = |args: &[&str]| berth_tests::git_http::git(&work, args);
    git(&["init", "-q"])?;
    std::fs::write(work.join("README.md"), "from a private repository")?;
    git(&["add", "."])?;
    git(&["commit", "-qm", "first"])?;
    git(&[
        "clone",
        "-q",
        "--bare",
        ".",
        &root.join("repo.git").to_string_lossy(),
    ])?;
    let server =
        berth_tests::git_smart::SmartGitServer::start(root.clone(), &format!("Bearer {token}"))
            .await?;
    let host = server.addr.to_string();
    let (dispatcher_allows, node_allows) = (host.clone(), host.clone());
    let cluster = TestCluster::builder()
        .configure_dispatcher(move |cfg| cfg.git_allow_hosts = vec![dispatcher_allows.clone()])
        .configure_node(move |_, cfg, _| {
            cfg.git_allow_hosts = vec![node_allows.clone()];
            cfg.egress_allow_internal = vec![node_allows.clone()];
        })
        .start()
        .await?;
    let (alpha, _) = access::member_of(&cluster, "alpha").await?;
    let mut secrets = SecretsClient::new(alpha.clone());
    // A credential names where it may go.
    let err = secrets
        .create_secret(pb::CreateSecretRequest {
            usage: pb::SecretUsage::HttpHeader as i32,
            value: token.clone(),
            ..Default::default()
        })
        .await
        .expect_err("no hosts");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("hosts"), "{}", err.message());
    assert!(!err.message().contains(&token));
    let secret = bearer_credential(alpha.clone(), &token, std::slice::from_ref(&host)).await?;
    let elsewhere = bearer_credential(alpha.clone(), &token, &["github.com".into()]).await?;
    let mut c = SessionsClient::new(alpha.clone());
    let repo = |credential: &pb::Secret| pb::Resource {
        kind: Some(pb::resource::Kind::Git(pb::GitResource {
            url: server.url("repo.git"),
            path: "/workspace/repo".into(),
            credential: credential.name.clone(),
            ..Default::default()
        })),
    };

    // A credential for other hosts is refused before anything runs.
    let err = c
        .create_session(pb::CreateSessionRequest {
            resources: vec![repo(&elsewhere)],
            ..fake_session("read repo/README.md")
        })
        .await
        .expect_err("wrong hosts");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message().contains("resources.git.credential") && err.message().contains(&host),
        "{}",
        err.message()
    );
    assert!(server.requests().is_empty(), "nothing was cloned");

    let s = c
        .create_session(pb::CreateSessionRequest {
            resources: vec![repo(&secret)],
            ..fake_session("read repo/README.md")
        })
        .await?
        .into_inner();
    assert_eq!(
        reply_after(&mut c, &s.name, 0).await?,
        "from a private repository"
    );
    let container = containers_of(&s.id).await?.pop().expect("a container");
    // The checkout's origin is the gateway's route, with no token in it.
    let config = exec_output(&container, &["cat", "/workspace/repo/.git/config"]).await?;
    let port = berth_agent_server::Config::defaults().gateway_port;
    assert!(
        config.contains(&format!("url = http://127.0.0.1:{port}/berth/git/0")),
        "{config}"
    );
    // A fetch from inside goes out with the token (the agent's own
    // Authorization is dropped).
    let before = server.requests().len();
    let out = through_gateway(
        &container,
        "GET",
        "/berth/git/0/info/refs?service=git-upload-pack",
    )
    .await?;
    assert!(
        out.contains("200 OK") && out.contains("# service=git-upload-pack"),
        "{out}"
    );
    // A push is not in this session's egress policy (none).
    let out = through_gateway(
        &container,
        "GET",
        "/berth/git/0/info/refs?service=git-receive-pack",
    )
    .await?;
    assert!(
        out.contains("403") && out.contains("egress policy"),
        "{out}"
    );
    // Undeclared routes do not exist.
    for path in ["/berth/git/1/info/refs", "/berth/mcp/docs"] {
        let out = through_gateway(&container, "GET", path).await?;
        assert!(out.contains("404"), "{path}: {out}");
    }
    let requests = server.requests();
    assert_eq!(requests.len(), before + 1, "{requests:?}");
    assert!(
        requests.iter().all(|r| r.authorized),
        "a request without the token: {requests:?}"
    );
    assert!(
        !requests.iter().any(|r| r.query.contains("receive-pack")),
        "{requests:?}"
    );
    let found = where_found(&cluster, &mut c, &s, &token).await?;
    assert!(found.is_empty(), "the token is in {found:?}");
    stop_and_wait(&mut c, &s.name).await?;

    // With the host in its egress policy, a session may push.
    let mut req = pb::CreateSessionRequest {
        resources: vec![repo(&secret)],
        ..fake_session("read repo/README.md")
    };
    req.spec.as_mut().expect("spec").egress = Some(pb::Egress {
        mode: pb::EgressMode::Allowlist as i32,
        allow: vec![host.clone()],
    });
    let s = idle_session(&mut c, req).await?;
    let container = containers_of(&s.id).await?.pop().expect("a container");
    let out = through_gateway(
        &container,
        "GET",
        "/berth/git/0/info/refs?service=git-receive-pack",
    )
    .await?;
    assert!(
        out.contains("200 OK") && out.contains("# service=git-receive-pack"),
        "{out}"
    );
    stop_and_wait(&mut c, &s.name).await?;
    let _ = std::fs::remove_dir_all(&root);
    cluster.shutdown().await?;
    server.stop().await;
    Ok(())
}
