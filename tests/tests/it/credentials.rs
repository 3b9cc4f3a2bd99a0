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
struct McpHost {
    addr: std::net::SocketAddr,
    log: PathBuf,
    child: std::process::Child,
}

impl McpHost {
    fn start(token: &str) -> anyhow::Result<Self> {
        let addr = free_addr()?;
        let log = std::env::temp_dir().join(format!("berth-mcp-{}.jsonl", uuid::Uuid::new_v4()));
        let bin = forwarder().with_file_name("fake-anthropic");
        let child = std::process::Command::new(&bin)
            .args(["--listen", &addr.to_string(), "--mcp-token", token])
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
    fn requests(&self) -> Vec<(String, String)> {
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
        })
        .await?
        .into_inner())
}

/// What a user could find of `token` in the session's sandbox, its events,
/// Postgres and the logs: the places where a finding is named.
async fn where_found(
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
    let token = format!("mcp-token-{}", uuid::Uuid::new_v4().simple());
    let server = McpHost::start(&token)?;
    let allow = vec![server.addr.to_string()];
    let cluster = TestCluster::builder()
        .configure_node(move |_, cfg, _| {
            claude::claude_node(cfg);
            // The test's server is on loopback: the operator allows it.
            cfg.egress_allow_internal = allow.clone();
        })
        .start()
        .await?;
    let (alpha, _) = access::member_of(&cluster, "alpha").await?;
    let secret = bearer_credential(alpha.clone(), &token, &[server.addr.to_string()]).await?;
    let mut c = SessionsClient::new(alpha.clone());

    let mut req = claude::claude_session(r#"mcp docs lookup {"query":"berth"}"#);
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
    assert!(first.contains("looked up: berth"), "{first}");

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
