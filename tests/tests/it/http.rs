//! The HTTP/JSON API against a live dispatcher: every route from Python's
//! standard library (`tests/http/test_http.py`), and the README's curl
//! quick start, run as a reader would paste it.

use std::path::Path;

use berth_tests::*;

fn http_dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("http")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_works_from_the_standard_library() -> anyhow::Result<()> {
    let cluster = TestCluster::builder().capacity(6).start().await?;
    let out = tokio::process::Command::new("python3")
        .args(["-m", "unittest", "-v", "test_http"])
        .current_dir(http_dir())
        .env("BERTH_URL", &cluster.dispatcher_url)
        .env("BERTH_TOKEN", &cluster.token)
        .env("BERTH_TEST_IMAGE", TEST_IMAGE)
        .output()
        .await?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "python tests failed:\n{stderr}");
    assert!(stderr.contains("Ran 7 tests"), "{stderr}");
    cluster.shutdown().await
}

/// The README's "HTTP and SSE" block: the shell block after its marker.
fn readme_quick_start() -> anyhow::Result<String> {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md"))?;
    let start = "<!-- http-quick-start -->";
    let (_, rest) = readme
        .split_once(start)
        .ok_or_else(|| anyhow::anyhow!("README.md lacks {start}"))?;
    let block = rest
        .split_once("```sh\n")
        .and_then(|(_, b)| b.split_once("```"))
        .map(|(b, _)| b)
        .ok_or_else(|| anyhow::anyhow!("no ```sh block after {start}"))?;
    Ok(block.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_curl_quick_start_runs() -> anyhow::Result<()> {
    let cluster = TestCluster::builder().start().await?;
    let script = format!("set -euo pipefail\n{}", readme_quick_start()?);
    let out = tokio::process::Command::new("bash")
        .args(["-c", &script])
        .env("BERTH_URL", &cluster.dispatcher_url)
        .env("BERTH_TOKEN", &cluster.token)
        .output()
        .await?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "the quick start failed:\n{stdout}\n{stderr}"
    );
    // The live tail printed the session's events, each with its seq as
    // its id, and ended once the session stopped.
    assert!(stdout.contains("\n\nid: 2\ndata: {"), "{stdout}");
    assert!(stdout.contains("hello over http"), "{stdout}");
    assert!(stdout.contains("event: end\ndata: {}"), "{stdout}");
    cluster.shutdown().await
}

/// Schemathesis (property-based testing from the OpenAPI document) over
/// every route but one: no 5xx, no dropped connection, and every reply
/// (errors included) matches its schema and content type. The cluster's
/// one node is unreachable, so nothing it creates ever runs (no container,
/// no git clone);
/// `CreateSubscription` is left out because a subscription would deliver to
/// whatever host the generator made up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_no_server_error_and_no_schema_mismatch() -> anyhow::Result<()> {
    let st = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.berth/venv/bin/schemathesis");
    anyhow::ensure!(
        st.exists(),
        "{}: scripts/setup.sh installs it",
        st.display()
    );
    // One node that never answers (nothing listens on loopback's port 9):
    // what the generator creates stays queued.
    let cluster = TestCluster::builder()
        .nodes(0)
        .configure_dispatcher(|cfg| cfg.agent_servers = vec!["https://127.0.0.1:9".into()])
        .start()
        .await?;
    let reports = std::env::temp_dir().join(format!("berth-schemathesis-{}", std::process::id()));
    let out = tokio::process::Command::new(&st)
        .arg("run")
        .arg(format!("{}/openapi.json", cluster.dispatcher_url))
        .args(["-H", &format!("Authorization: Bearer {}", cluster.token)])
        .args([
            "--checks",
            "not_a_server_error,response_schema_conformance,content_type_conformance,status_code_conformance",
        ])
        .args(["--exclude-operation-id", "Webhooks_CreateSubscription"])
        .args(["--max-examples", "25", "--seed", "20261206", "--workers", "2"])
        .args(["--request-timeout", "20", "--no-color"])
        .arg("--report-dir")
        .arg(&reports)
        .env("SCHEMATHESIS_HOOKS", "")
        .output()
        .await?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "schemathesis found failures:\n{stdout}\n{stderr}"
    );
    // `N generated, N passed`: every case ran and passed.
    let counts = stdout
        .lines()
        .find(|l| l.contains(" generated, "))
        .ok_or_else(|| anyhow::anyhow!("no test case count:\n{stdout}"))?;
    let numbers: Vec<u64> = counts
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|n| n.parse().ok())
        .collect();
    assert!(
        counts.trim_end().ends_with("passed") && numbers.len() == 2 && numbers[0] == numbers[1],
        "{counts}"
    );
    assert!(numbers[0] > 1000, "too few cases ran: {counts}");
    let _ = std::fs::remove_dir_all(&reports);
    cluster.shutdown().await
}

/// Every route of `/openapi.json`, called with curl as a shell user would
/// (a made-up id in the path, `{}` as a body): each answers JSON, a reply
/// or an error body, and none a 5xx.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_answers_curl_with_json() -> anyhow::Result<()> {
    let cluster = TestCluster::builder().start().await?;
    let doc = std::process::Command::new("curl")
        .args(["-sf", &format!("{}/openapi.json", cluster.dispatcher_url)])
        .output()?;
    let doc: serde_json::Value = serde_json::from_slice(&doc.stdout)?;
    let paths = doc["paths"].as_object().expect("paths");
    let mut called = 0;
    for (path, ops) in paths {
        for method in ops.as_object().expect("operations").keys() {
            let concrete = path
                .split('/')
                .map(|seg| match seg.find('{') {
                    Some(i) => format!(
                        "{}curl-missing{}",
                        &seg[..i],
                        &seg[seg.find('}').map_or(seg.len(), |j| j + 1)..]
                    ),
                    None => seg.to_string(),
                })
                .collect::<Vec<_>>()
                .join("/");
            let mut cmd = std::process::Command::new("curl");
            cmd.args([
                "-s",
                "--max-time",
                "20",
                "-w",
                "\n%{http_code}",
                "-X",
                &method.to_uppercase(),
            ])
            .args(["-H", &format!("Authorization: Bearer {}", cluster.token)]);
            if method != "get" && method != "delete" {
                cmd.args(["-H", "Content-Type: application/json", "-d", "{}"]);
            }
            let out = cmd
                .arg(format!("{}{concrete}", cluster.dispatcher_url))
                .output()?;
            let text = String::from_utf8_lossy(&out.stdout);
            let (body, code) = text.rsplit_once('\n').unwrap_or_default();
            let code: u16 = code.trim().parse().unwrap_or(0);
            assert!(
                (200..500).contains(&code),
                "{method} {concrete}: {code} {body}"
            );
            let json: serde_json::Value = serde_json::from_str(body)
                .map_err(|e| anyhow::anyhow!("{method} {concrete}: not JSON ({e}): {body}"))?;
            if code >= 400 {
                assert!(
                    json["error"]["message"].is_string(),
                    "{method} {concrete}: {body}"
                );
            }
            called += 1;
        }
    }
    assert!(called >= 50, "{called} routes called");
    cluster.shutdown().await
}
