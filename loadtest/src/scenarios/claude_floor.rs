//! The floor of a pre-started start: the same Claude Code CLI, started on
//! the host with no berth and no container, sent `initialize` (as berth's
//! pool and the SDK do), left idle a moment, then given the benchmark's
//! first message: the time to its first stdout line. Its Messages stand-in
//! (`fake-anthropic`) runs on the host's loopback.
//!
//! What berth's pre-started path adds is its p50 less this one.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::time::Instant;

use crate::report::Hist;

/// How long each CLI waits, initialized, before its first message (a
/// pre-started process waits in the pool too).
const IDLE: Duration = Duration::from_secs(1);
/// The longest any answer may take.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(60);

/// The CLI binary `deploy/test-image/build-claude.sh` extracted from the
/// pinned wheel: the newest `.berth/cache/claude-*`.
pub fn cached_cli() -> anyhow::Result<PathBuf> {
    let cache = Path::new(".berth/cache");
    let mut found: Vec<PathBuf> = std::fs::read_dir(cache)
        .map_err(|e| anyhow::anyhow!("{}: {e} (run scripts/setup.sh)", cache.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("claude-") && !n.ends_with(".part"))
        })
        .collect();
    found.sort();
    let cli = found
        .pop()
        .ok_or_else(|| anyhow::anyhow!("no CLI in .berth/cache (run scripts/setup.sh)"))?;
    // Absolute: the CLI runs in a directory of its own.
    Ok(cli.canonicalize()?)
}

/// `fake-anthropic`, beside this program or in the debug build.
fn stand_in() -> PathBuf {
    let beside = std::env::current_exe()
        .map(|e| e.with_file_name("fake-anthropic"))
        .unwrap_or_default();
    if beside.is_file() {
        beside
    } else {
        PathBuf::from("target/debug/fake-anthropic")
    }
}

/// `sessions` + 1 starts of the bare CLI (the first is not counted).
pub async fn floor(cli: &Path, model: &str, prompt: &str, sessions: usize) -> anyhow::Result<Hist> {
    let addr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let mut model_api = tokio::process::Command::new(stand_in())
        .args(["--listen", &addr.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| {
            anyhow::anyhow!("{}: {e} (scripts/setup.sh builds it)", stand_in().display())
        })?;
    let home = std::env::temp_dir().join(format!("berth-floor-{}", std::process::id()));
    std::fs::create_dir_all(&home)?;
    let mut hist = Hist::new();
    let result = async {
        for i in 0..=sessions {
            let took = one(cli, &home, addr, model, prompt).await?;
            if i > 0 {
                hist.record(took);
            }
            eprintln!("claude: floor {i}/{sessions}: {took:?}");
        }
        anyhow::Ok(())
    }
    .await;
    let _ = model_api.kill().await;
    let _ = std::fs::remove_dir_all(&home);
    result.map(|()| hist)
}

/// One start: initialized, idle, then the first message to the first line.
async fn one(
    cli: &Path,
    home: &Path,
    api: std::net::SocketAddr,
    model: &str,
    prompt: &str,
) -> anyhow::Result<Duration> {
    let mut child = tokio::process::Command::new(cli)
        .args([
            "-p",
            "--input-format",
            "stream-json",
            "--output-format",
            "stream-json",
        ])
        .args([
            "--verbose",
            "--permission-prompt-tool",
            "stdio",
            "--model",
            model,
        ])
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("HOME", home)
        .env("ANTHROPIC_BASE_URL", format!("http://{api}"))
        .env("ANTHROPIC_API_KEY", "stand-in")
        .env("DISABLE_AUTOUPDATER", "1")
        .env("CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC", "1")
        .current_dir(home)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| anyhow::anyhow!("{}: {e}", cli.display()))?;
    let mut stdin = child.stdin.take().expect("piped");
    let mut lines = BufReader::new(child.stdout.take().expect("piped")).lines();
    let initialize = serde_json::json!({"type": "control_request", "request_id": "floor",
        "request": {"subtype": "initialize", "hooks": null}});
    stdin
        .write_all(format!("{initialize}\n").as_bytes())
        .await?;
    let answered = tokio::time::timeout(ANSWER_TIMEOUT, async {
        while let Some(line) = lines.next_line().await? {
            if line.contains("\"control_response\"") {
                return anyhow::Ok(());
            }
        }
        anyhow::bail!("the CLI exited before it answered initialize")
    });
    answered
        .await
        .map_err(|_| anyhow::anyhow!("no answer to initialize"))??;
    tokio::time::sleep(IDLE).await;
    let message = serde_json::json!({"type": "user", "message": {"role": "user",
        "content": [{"type": "text", "text": prompt}]}});
    let t0 = Instant::now();
    stdin.write_all(format!("{message}\n").as_bytes()).await?;
    let first = tokio::time::timeout(ANSWER_TIMEOUT, lines.next_line())
        .await
        .map_err(|_| anyhow::anyhow!("no first line"))??;
    let took = t0.elapsed();
    anyhow::ensure!(first.is_some(), "the CLI exited before its first line");
    drop(stdin);
    let _ = child.kill().await;
    Ok(took)
}
