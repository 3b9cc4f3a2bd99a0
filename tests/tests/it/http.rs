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
    assert!(stderr.contains("Ran 6 tests"), "{stderr}");
    cluster.shutdown().await
}

/// The README's "HTTP and SSE" block: the shell block after its marker.
fn readme_quick_start() -> anyhow::Result<String> {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md"))?;
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
