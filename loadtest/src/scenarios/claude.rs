//! Scenario 7: the real Claude Code CLI's start. CreateSession → the CLI's
//! first event at the client, from a cold start (no pool), a warm container
//! (the CLI starts at claim) and a pre-started CLI process (an agent pool),
//! beside `docker run` of the same image to the CLI's first stdout line;
//! then a burst of twice the agent pool against as many parallel
//! `docker run`s, the memory of an idle pre-started CLI, and the floor (the
//! same CLI pre-started and initialized on the host: [`super::claude_floor`]).
//! The CLI (from the pinned claude-agent-sdk wheel) talks to the Messages
//! stand-in on its container's own loopback; containers have no other
//! network.

use std::sync::Mutex;
use std::time::Duration;

use berth_proto::v1 as pb;
use serde::Serialize;
use tokio::time::Instant;

use super::{
    agent_processes_ready, create_and_wait_first, stop, wait_agent_pool_full, wait_all_closed,
    wait_pool_full,
};
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
    /// Warm containers, or pre-started CLI processes, kept on the node for
    /// the warm runs; the burst is twice this.
    #[arg(long, default_value_t = 2)]
    pub pool: u32,
    /// The real-CLI image (deploy/test-image/build-claude.sh).
    #[arg(long, default_value = "berth-test-claude:latest")]
    pub claude_image: String,
    /// Steady arrivals on a node with the production agent-pool defaults:
    /// this many sessions (the first teaches the node the agent; the hit
    /// ratio counts the rest). 0 skips them.
    #[arg(long, default_value_t = 41)]
    pub steady: usize,
    /// Seconds between two steady arrivals.
    #[arg(long, default_value_t = 4.0)]
    pub steady_every: f64,
}

/// The session each start makes. A pre-started process takes no env (env
/// may hold secrets): the CLI gets the stand-in's key from an
/// `apiKeyHelper` in its arguments instead, which the other runs use too,
/// so every run starts the same CLI the same way.
fn request(image: &str) -> pb::CreateSessionRequest {
    pb::CreateSessionRequest {
        spec: Some(pb::AgentSpec {
            image: image.into(),
            runtime: pb::Runtime::ClaudeCode as i32,
            model: MODEL.into(),
            // The stand-in takes any key; it is not a credential.
            runtime_args: vec![
                "--settings".into(),
                r#"{"apiKeyHelper":"echo stand-in"}"#.into(),
            ],
            ..Default::default()
        }),
        initial_message: PROMPT.into(),
        ..Default::default()
    }
}

/// What the node keeps ready between the starts.
#[derive(Clone, Copy, PartialEq)]
enum Ready {
    Nothing,
    Containers(u32),
    Processes(u32),
}

/// Waits for what `ready` says the node keeps.
async fn fill(cluster: &Cluster, image: &str, ready: Ready) -> anyhow::Result<()> {
    let mut nc = cluster.conns.nodes();
    let wait = Duration::from_secs(120);
    match ready {
        Ready::Nothing => Ok(()),
        Ready::Containers(n) => wait_pool_full(&mut nc, image, i32::try_from(n)?, wait).await,
        Ready::Processes(n) => wait_agent_pool_full(&mut nc, image, i32::try_from(n)?, wait).await,
    }
}

/// Starts `n` sessions one after another (each stopped before the next;
/// with a pool, the pool refilled first) and returns their latencies and
/// their start paths.
async fn starts(cluster: &Cluster, image: &str, n: usize, ready: Ready) -> anyhow::Result<Starts> {
    let mut c = cluster.conns.get();
    let mut hist = Hist::new();
    let mut paths = Vec::new();
    let errors = Mutex::new(Errors::default());
    let mut untimed = Vec::new();
    // One untimed start warms the connections and the node's code paths
    // (and shows an agent pool its agent).
    for i in 0..=n {
        if i > 0 || !matches!(ready, Ready::Processes(_)) {
            fill(cluster, image, ready).await?;
        }
        if i == 1 {
            untimed = cluster.stage_means(super::start::STAGES).await;
        }
        let s = create_and_wait_first(&mut c, request(image), Instant::now(), FIRST_EVENT_TIMEOUT)
            .await
            .map_err(|st| anyhow::anyhow!("a start failed: {st}"))?;
        stop(&mut c, &s.name, &errors).await;
        wait_all_closed(&mut c, std::slice::from_ref(&s.name)).await;
        if i > 0 {
            hist.record(s.first_event);
            paths.push(s.start.clone());
        }
        eprintln!("claude: {} start {i}/{n}: {:?}", s.start, s.first_event);
    }
    let errors = errors.lock().map(|e| e.clone()).unwrap_or_default();
    Ok(Starts {
        hist,
        paths,
        errors,
        untimed,
    })
}

/// The timed starts of one kind.
struct Starts {
    hist: Hist,
    /// Each start's path (`warm_process`, …).
    paths: Vec<String>,
    errors: Errors,
    /// The stage histograms before the first timed start.
    untimed: Vec<(String, f64, f64)>,
}

/// `n` sessions created at once: the time until every one has its first
/// event, and how many took a pre-started process.
async fn burst(cluster: &Cluster, image: &str, n: usize) -> anyhow::Result<(Duration, usize)> {
    let t0 = Instant::now();
    let runs = (0..n).map(|_| {
        let mut c = cluster.conns.get();
        async move {
            let r = create_and_wait_first(&mut c, request(image), t0, FIRST_EVENT_TIMEOUT).await;
            if let Ok(s) = &r {
                let _ = c
                    .stop_session(pb::StopSessionRequest {
                        name: s.name.clone(),
                    })
                    .await;
            }
            r
        }
    });
    let done = futures::future::join_all(runs).await;
    let all = t0.elapsed();
    let mut hits = 0;
    let mut names = Vec::new();
    for r in done {
        let s = r.map_err(|st| anyhow::anyhow!("a burst start failed: {st}"))?;
        hits += usize::from(s.start == "warm_process");
        names.push(s.name);
    }
    wait_all_closed(&mut cluster.conns.get(), &names).await;
    Ok((all, hits))
}

/// The floor (the same CLI pre-started and initialized on the host, no
/// berth, no container) and the pre-started path's goals against it and
/// against `docker run`.
async fn against_floor(
    report: &mut Report,
    sessions: usize,
    process: &Hist,
    run: &Hist,
) -> anyhow::Result<()> {
    let p50 = |h: &Hist| h.quantile_us(0.5) as f64;
    let cli = super::claude_floor::cached_cli()?;
    let floor = super::claude_floor::floor(&cli, MODEL, PROMPT, sessions).await?;
    report.latency(
        "floor: the CLI pre-started and initialized on the host, no berth",
        &floor,
        &Errors::default(),
    );
    report.check_at_most(
        "pre-started p50 - floor p50 (ms)",
        (p50(process) - p50(&floor)) / 1e3,
        10.0,
    );
    report.check_at_most(
        "pre-started p99 - floor p99 (ms)",
        (process.quantile_us(0.99) as f64 - floor.quantile_us(0.99) as f64) / 1e3,
        30.0,
    );
    report.check_at_most("pre-started process p50 (ms)", p50(process) / 1e3, 60.0);
    report.check_at_most(
        "pre-started process p99 (ms)",
        process.quantile_us(0.99) as f64 / 1e3,
        150.0,
    );
    report.ratio_at_least(
        "docker run p50 / pre-started process p50",
        ratio(p50(run), p50(process)),
        10.0,
    );
    Ok(())
}

/// Steady arrivals on a node with the production agent-pool defaults.
async fn steady(cl: &ClusterArgs, a: &ClaudeArgs, report: &mut Report) -> anyhow::Result<()> {
    let image = &a.claude_image;
    let cluster = Cluster::real_claude(cl, image, 0, None).await?;
    let every = Duration::from_secs_f64(a.steady_every);
    let s = super::claude_steady::arrivals(
        &cluster,
        || request(image),
        a.steady,
        every,
        FIRST_EVENT_TIMEOUT,
    )
    .await;
    cluster.shutdown().await?;
    let s = s?;
    let (hits, n) = s.hits_after(1);
    report.latency(
        format!(
            "steady: one session every {}s, production pool defaults",
            a.steady_every
        ),
        &s.hist,
        &Errors::default(),
    );
    report.value(
        format!("steady: pre-started hits after the first arrival (of {n})"),
        hits as f64,
        "starts",
    );
    report.ratio_at_least(
        format!("steady: hit ratio over {n} arrivals after the first"),
        ratio(hits as f64, n as f64),
        0.95,
    );
    let misses: Vec<String> = s
        .paths
        .iter()
        .enumerate()
        .filter(|(_, p)| *p != "warm_process")
        .map(|(i, p)| format!("{i}:{p}"))
        .collect();
    report.note(format!(
        "steady arrivals that missed (index:start path): {}",
        misses.join(", ")
    ));
    Ok(())
}

/// The shell line that runs the bare CLI against the stand-in model API,
/// with the benchmark's prompt on stdin.
fn bare_cli_script() -> String {
    let msg = serde_json::json!({"type": "user", "message": {"role": "user",
        "content": [{"type": "text", "text": PROMPT}]}});
    format!(
        "fake-anthropic --listen 127.0.0.1:8787 2>/dev/null & printf '%s\\n' '{}' | ANTHROPIC_API_KEY=stand-in claude -p --input-format stream-json --output-format stream-json --verbose --model {MODEL}",
        msg.to_string().replace('\'', "'\\''")
    )
}

/// `sessions` + 1 `docker run`s of the bare CLI, one at a time (the first
/// warms up and is not counted): each to its first stdout line.
async fn docker_runs(
    d: &bollard::Docker,
    image: &str,
    script: &str,
    sessions: usize,
) -> anyhow::Result<Hist> {
    let mut run = Hist::new();
    for i in 0..=sessions {
        let t0 = Instant::now();
        let id = docker::create_in(
            d,
            image,
            vec!["sh".into(), "-c".into(), script.to_string()],
            Some("none"),
        )
        .await?;
        let r = docker::start_and_read(d, &id, t0, None).await;
        docker::remove(d, &id).await;
        let (first, _, _) = r?;
        if i > 0 {
            run.record(first);
        }
        eprintln!("claude: docker run {i}/{}: {first:?}", sessions);
    }
    Ok(run)
}

/// `n` `docker run`s of the bare CLI at once: until all have a first line.
async fn parallel_docker_runs(
    d: &bollard::Docker,
    image: &str,
    script: &str,
    n: usize,
) -> anyhow::Result<Duration> {
    let t0 = Instant::now();
    let parallel = (0..n).map(|_| {
        let (d, image, script) = (d.clone(), image.to_string(), script.to_string());
        async move {
            let id = docker::create_in(
                &d,
                &image,
                vec!["sh".into(), "-c".into(), script],
                Some("none"),
            )
            .await?;
            let r = docker::start_and_read(&d, &id, t0, None).await;
            docker::remove(&d, &id).await;
            r
        }
    });
    for r in futures::future::join_all(parallel).await {
        r?;
    }
    Ok(t0.elapsed())
}

pub async fn run(cl: &ClusterArgs, a: &ClaudeArgs) -> anyhow::Result<Report> {
    anyhow::ensure!(a.sessions > 0, "--sessions must be positive");
    anyhow::ensure!(a.pool > 0, "--pool must be positive");
    let mut report = Report::new("claude", a);

    let image = &a.claude_image;
    let cluster = Cluster::real_claude(cl, image, 0, Some(0)).await?;
    let Starts {
        hist: cold,
        errors: cold_err,
        ..
    } = starts(&cluster, image, a.sessions, Ready::Nothing).await?;
    cluster.shutdown().await?;
    report.latency("berth: cold start (no pool)", &cold, &cold_err);

    let cluster = Cluster::real_claude(cl, image, a.pool, Some(0)).await?;
    let Starts {
        hist: warm,
        paths,
        errors: warm_err,
        ..
    } = starts(&cluster, image, a.sessions, Ready::Containers(a.pool)).await?;
    cluster.shutdown().await?;
    report.latency(
        "berth: warm container (CLI starts at claim)",
        &warm,
        &warm_err,
    );
    let count = |paths: &[String], p: &str| paths.iter().filter(|x| *x == p).count() as f64;
    report.value(
        "warm-container hits",
        count(&paths, "warm_container"),
        "starts",
    );

    let cluster = Cluster::real_claude(cl, image, 0, Some(a.pool)).await?;
    let Starts {
        hist: process,
        paths,
        errors: process_err,
        untimed,
    } = starts(&cluster, image, a.sessions, Ready::Processes(a.pool)).await?;
    report.latency("berth: pre-started CLI process", &process, &process_err);
    // Where the timed pre-started starts spent their time; the agent's own
    // share is `berth_agent_first_line_seconds` (its stdin to its first line).
    let after = cluster.stage_means(super::start::STAGES).await;
    super::start::profile(&mut report, &untimed, &after);
    report.value(
        "pre-started process hits",
        count(&paths, "warm_process"),
        "starts",
    );
    fill(&cluster, image, Ready::Processes(a.pool)).await?;
    let d = docker::connect().await?;
    let rss = match docker::rss_of(&d, "berth.pool", "claude -p").await {
        Ok(r) => r,
        Err(e) => {
            report.note(format!("the idle CLI's memory could not be read: {e:#}"));
            Vec::new()
        }
    };
    if let Some(max) = rss.iter().max() {
        let mean = rss.iter().sum::<u64>() as f64 / rss.len() as f64;
        report.value("idle pre-started CLI RSS (mean)", mean / 1048576.0, "MiB");
        report.value(
            "idle pre-started CLI RSS (max)",
            *max as f64 / 1048576.0,
            "MiB",
        );
    }
    let n = a.pool as usize * 2;
    let (burst_all, burst_hits) = burst(&cluster, image, n).await?;
    let mut nc = cluster.conns.nodes();
    let left = agent_processes_ready(&mut nc, image).await?;
    cluster.shutdown().await?;
    report.value(
        format!("burst of {n}: until all have a first event"),
        burst_all.as_secs_f64() * 1e3,
        "ms",
    );
    report.value(
        format!("burst of {n}: pre-started process hit ratio"),
        ratio(burst_hits as f64, n as f64),
        "",
    );
    report.note(format!(
        "after the burst the node had {left} pre-started process(es) ready again"
    ));

    // The same image, the same CLI and prompt, with no berth: create,
    // attach and start, to the CLI's first stdout line; one at a time, then
    // n at once.
    let script = bare_cli_script();
    let run = docker_runs(&d, image, &script, a.sessions).await?;
    report.latency(
        "baseline: docker run (create+attach+start)",
        &run,
        &Errors::default(),
    );
    let p50 = |h: &Hist| h.quantile_us(0.5) as f64;
    let parallel_all = parallel_docker_runs(&d, image, &script, n).await?;
    docker::cleanup(&d).await?;
    report.value(
        format!("baseline: {n} parallel docker runs, until all have a first line"),
        parallel_all.as_secs_f64() * 1e3,
        "ms",
    );
    report.ratio(
        format!("{n} parallel docker runs / berth burst of {n}"),
        ratio(parallel_all.as_secs_f64(), burst_all.as_secs_f64()),
    );
    report.ratio("docker run p50 / cold p50", ratio(p50(&run), p50(&cold)));
    report.ratio(
        "docker run p50 / warm container p50",
        ratio(p50(&run), p50(&warm)),
    );
    against_floor(&mut report, a.sessions, &process, &run).await?;
    if a.steady > 1 {
        steady(cl, a, &mut report).await?;
    }
    report.note("each start is alone (one at a time) and measured from CreateSession to the CLI's first event at the client (its system/init line); docker run is timed from container create to the CLI's first stdout line");
    Ok(report)
}
