//! The web console in a real browser (Debian's Chromium, driven by
//! Playwright for Python: `tests/console/test_console.py`), on fake-claude
//! and on the real Claude Code CLI. Screenshots of each step go to
//! `target/test-output/console/`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use berth_proto::v1 as pb;
use berth_tests::*;

fn screenshots() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/test-output/console")
}

/// Runs the browser tests whose names hold one of `patterns` against
/// `cluster`.
async fn browser(
    cluster: &TestCluster,
    patterns: &[&str],
    env: &[(&str, &str)],
) -> anyhow::Result<String> {
    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.berth/venv/bin/python");
    anyhow::ensure!(
        python.exists(),
        "{}: scripts/setup.sh installs Playwright into it",
        python.display()
    );
    let mut cmd = tokio::process::Command::new(&python);
    cmd.args(["-m", "unittest", "-v"]);
    for p in patterns {
        cmd.args(["-k", p]);
    }
    cmd.arg("test_console")
        .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("console"))
        .env("BERTH_URL", &cluster.dispatcher_url)
        .env("BERTH_TOKEN", &cluster.token)
        .env("BERTH_TEST_IMAGE", TEST_IMAGE)
        .env("BERTH_SCREENSHOTS", screenshots());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().await?;
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "browser tests failed:\n{stderr}");
    Ok(stderr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_drives_a_session_in_a_real_browser() -> anyhow::Result<()> {
    let cluster = TestCluster::builder().capacity(4).start().await?;
    let stderr = browser(&cluster, &["test_a_session", "test_the_sessions_list"], &[]).await?;
    assert!(stderr.contains("Ran 2 tests"), "{stderr}");
    for step in [
        "tool-call-expanded",
        "approval-card",
        "questions",
        "markup-as-text",
        "phone",
    ] {
        let found = std::fs::read_dir(screenshots())?
            .filter_map(Result::ok)
            .any(|f| f.file_name().to_string_lossy().contains(step));
        assert!(found, "a screenshot of {step}");
    }
    cluster.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_answers_the_real_clis_questions() -> anyhow::Result<()> {
    let cluster = super::claude::cluster().await?;
    let mut c = cluster.client();
    let mut req = super::claude::claude_session("ask");
    if let Some(spec) = req.spec.as_mut() {
        spec.runtime_args.clear();
    }
    let s = c.create_session(req).await?.into_inner();
    collect_until(&mut c, &s.name, 0, Duration::from_secs(90), |e| {
        e.r#type == "agent.question"
    })
    .await?;
    let stderr = browser(
        &cluster,
        &["test_the_real_cli"],
        &[("BERTH_CLAUDE_SESSION", &s.name)],
    )
    .await?;
    assert!(
        stderr.contains("Ran 1 test") && !stderr.contains("skipped"),
        "{stderr}"
    );
    let after = c
        .get_session(pb::GetSessionRequest {
            name: s.name.clone(),
        })
        .await?
        .into_inner();
    assert!(after.pending_tool_requests.is_empty(), "answered");
    stop_and_wait(&mut c, &s.name).await?;
    cluster.shutdown().await
}
