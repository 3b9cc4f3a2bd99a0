//! Scenario 7: the real Claude Code CLI's start. CreateSession → the CLI's
//! first event at the client, from a cold start (no pool) and from the warm
//! pool, beside `docker run` of the same image to the CLI's first stdout
//! line. The CLI (from the pinned claude-agent-sdk wheel) talks to the
//! Messages stand-in on its container's own loopback; containers have no
//! other network.

use std::sync::Mutex;
use std::time::Duration;

use berth_proto::v1 as pb;
use serde::Serialize;
use tokio::time::Instant;

use super::{create_and_wait_first, stop, wait_all_closed, wait_pool_full};
use crate::cluster::{Cluster, ClusterArgs};
use crate::docker;
use crate::report::{Errors, Hist, Report, ratio};

const PROMPT: &str = "say ready";
const MODEL: &str = "claude-sonnet-4-5";
const FIRST_EVENT_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, clap::Args, Serialize)]
pub struct ClaudeArgs {
    /// Starts of each kind (cold, warm, docker run), one at a time.
    #[arg(long, default_value_t = 10)]
    pub sessions: usize,
    /// Warm containers kept on the node for the warm runs.
    #[arg(long, default_value_t = 2)]
    pub pool: u32,
    /// The real-CLI image (deploy/test-image/build-claude.sh).
    #[arg(long, default_value = "berth-test-claude:latest")]
    pub claude_image: String,
}

fn request(image: &str) -> pb::CreateSessionRequest {
    pb::CreateSessionRequest {
        spec: Some(pb::SessionSpec {
            image: image.into(),
            runtime: pb::Runtime::ClaudeCode as i32,
            model: MODEL.into(),
            // The stand-in takes any key; it is not a credential.
            env: [("ANTHROPIC_API_KEY".to_string(), "stand-in".to_string())].into(),
            ..Default::default()
        }),
        initial_message: PROMPT.into(),
        ..Default::default()
    }
}

/// Starts `n` sessions one after another (each stopped before the next;
/// with a pool, the pool refilled first) and returns their latencies, and
/// how many claimed a warm container.
async fn starts(
    cluster: &Cluster,
    image: &str,
    n: usize,
    pool: u32,
) -> anyhow::Result<(Hist, usize, Errors)> {
    let mut c = cluster.conns.get();
    let mut nc = cluster.conns.nodes();
    let mut hist = Hist::new();
    let mut warm = 0;
    let errors = Mutex::new(Errors::default());
    // One untimed start warms the connections and the node's code paths.
    for i in 0..=n {
        if pool > 0 {
            wait_pool_full(
                &mut nc,
                image,
                i32::try_from(pool)?,
                Duration::from_secs(120),
            )
            .await?;
        }
        let s = create_and_wait_first(&mut c, request(image), Instant::now(), FIRST_EVENT_TIMEOUT)
            .await
            .map_err(|st| anyhow::anyhow!("a start failed: {st}"))?;
        stop(&mut c, &s.name, &errors).await;
        wait_all_closed(&mut c, std::slice::from_ref(&s.name)).await;
        if i > 0 {
            hist.record(s.first_event);
            warm += usize::from(s.warm);
        }
        eprintln!(
            "claude: {} start {i}/{n}: {:?}",
            if s.warm { "warm" } else { "cold" },
            s.first_event
        );
    }
    let errors = errors.lock().map(|e| e.clone()).unwrap_or_default();
    Ok((hist, warm, errors))
}

pub async fn run(cl: &ClusterArgs, a: &ClaudeArgs) -> anyhow::Result<Report> {
    anyhow::ensure!(a.sessions > 0, "--sessions must be positive");
    anyhow::ensure!(a.pool > 0, "--pool must be positive");
    let mut report = Report::new("claude", a);

    let cluster = Cluster::real_claude(cl, &a.claude_image, 0).await?;
    let (cold, _, cold_err) = starts(&cluster, &a.claude_image, a.sessions, 0).await?;
    cluster.shutdown().await?;
    report.latency("berth: cold start (no pool)", &cold, &cold_err);

    let cluster = Cluster::real_claude(cl, &a.claude_image, a.pool).await?;
    let (warm, hits, warm_err) = starts(&cluster, &a.claude_image, a.sessions, a.pool).await?;
    cluster.shutdown().await?;
    report.latency("berth: warm pool", &warm, &warm_err);
    report.value("warm-pool hits", hits as f64, "starts");

    // The same image, the same CLI and prompt, with no berth: create,
    // attach and start, to the CLI's first stdout line.
    let d = docker::connect().await?;
    let mut run = Hist::new();
    let msg = serde_json::json!({"type": "user", "message": {"role": "user",
        "content": [{"type": "text", "text": PROMPT}]}});
    let script = format!(
        "fake-anthropic --listen 127.0.0.1:8787 2>/dev/null & printf '%s\\n' '{}' | ANTHROPIC_API_KEY=stand-in claude -p --input-format stream-json --output-format stream-json --verbose --model {MODEL}",
        msg.to_string().replace('\'', "'\\''")
    );
    for i in 0..=a.sessions {
        let t0 = Instant::now();
        let id = docker::create_in(
            &d,
            &a.claude_image,
            vec!["sh".into(), "-c".into(), script.clone()],
            Some("none"),
        )
        .await?;
        let r = docker::start_and_read(&d, &id, t0, None).await;
        docker::remove(&d, &id).await;
        let (first, _, _) = r?;
        if i > 0 {
            run.record(first);
        }
        eprintln!("claude: docker run {i}/{}: {first:?}", a.sessions);
    }
    docker::cleanup(&d).await?;
    report.latency(
        "baseline: docker run (create+attach+start)",
        &run,
        &Errors::default(),
    );

    let p50 = |h: &Hist| h.quantile_us(0.5) as f64;
    report.ratio("docker run p50 / cold p50", ratio(p50(&run), p50(&cold)));
    report.ratio("docker run p50 / warm p50", ratio(p50(&run), p50(&warm)));
    report.note("each start is alone (one at a time) and measured from CreateSession to the CLI's first event at the client (its system/init line); docker run is timed from container create to the CLI's first stdout line");
    Ok(report)
}
