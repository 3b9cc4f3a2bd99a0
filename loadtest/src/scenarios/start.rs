//! Scenarios 1 (warm start) and 2 (burst): session start against Docker.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use tokio::time::Instant;

use super::{
    create_and_wait_first, session, stop, wait_agent_pool_full, wait_all_closed, wait_pool_full,
    warm_ready,
};
use crate::cluster::{Cluster, ClusterArgs, RealNodes};
use crate::docker;
use crate::driver::{Arrivals, Progress, open_loop};
use crate::report::{Errors, Hist, Report, ratio};

/// The prompt each measured session starts with.
const PROMPT: &str = "echo ready";
const FIRST_EVENT_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, clap::Args, Serialize)]
pub struct WarmArgs {
    /// Sessions to start (and as many of each baseline).
    #[arg(long, default_value_t = 40)]
    pub sessions: usize,
    /// Arrivals per second (open loop, evenly spaced).
    #[arg(long, default_value_t = 2.0)]
    pub rate: f64,
    /// Warm containers (or pre-started processes) kept on the node.
    #[arg(long, default_value_t = 4)]
    pub pool: u32,
    /// What the pool holds: `process` (containers with the agent process
    /// already started: an agent pool) or `container` (an image pool; the
    /// agent starts at claim).
    #[arg(long, value_enum, default_value_t = StartKind::Process)]
    pub start: StartKind,
}

/// What a warm pool holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StartKind {
    Process,
    Container,
}

impl StartKind {
    /// The `start` a hit reports in `session.running`.
    fn hit_label(self) -> &'static str {
        match self {
            Self::Process => "warm_process",
            Self::Container => "warm_container",
        }
    }
}

/// Scenario 1: CreateSession → first agent event on a warm-pool hit, beside
/// `docker run` (create, attach, start) and `docker start` of a pre-created
/// container, both through bollard on the same image and prompt.
pub async fn warm(cl: &ClusterArgs, a: &WarmArgs) -> anyhow::Result<Report> {
    anyhow::ensure!(
        a.sessions > 0 && a.rate > 0.0,
        "--sessions and --rate must be positive"
    );
    let mut report = Report::new("warm", a);
    let process = a.start == StartKind::Process;
    let nodes = RealNodes {
        nodes: 1,
        capacity: a.pool.max(4) * 2,
        pool: if process { 0 } else { a.pool },
        agents: if process { a.pool } else { 0 },
    };
    let cluster = Cluster::real(cl, &nodes).await?;
    let mut nc = cluster.conns.nodes();
    let pool = i32::try_from(a.pool)?;
    let fill = |nc: &mut berth_proto::v1::nodes_client::NodesClient<berth_tests::Api>| {
        let mut nc = nc.clone();
        let image = cl.image.clone();
        async move {
            if process {
                wait_agent_pool_full(&mut nc, &image, pool, Duration::from_secs(120)).await
            } else {
                wait_pool_full(&mut nc, &image, pool, Duration::from_secs(120)).await
            }
        }
    };
    if !process {
        fill(&mut nc).await?;
    }
    // One untimed session warms the connections and the node's code paths
    // (and, for an agent pool, shows the node the agent: its pool fills).
    let mut c = cluster.conns.get();
    let warmup = create_and_wait_first(
        &mut c,
        session(&cl.image, PROMPT),
        Instant::now(),
        FIRST_EVENT_TIMEOUT,
    )
    .await?;
    let errors = Mutex::new(Errors::default());
    stop(&mut c, &warmup.name, &errors).await;
    wait_all_closed(&mut c, &[warmup.name]).await;
    fill(&mut nc).await?;

    let offsets = Arrivals::Uniform { rate: a.rate }.offsets(a.sessions, &mut fastrand::Rng::new());
    let before = cluster.stage_means(STAGES).await;
    let (all, hits, names, errors) = berth_starts(
        &cluster,
        &cl.image,
        &offsets,
        a.start.hit_label(),
        "warm: berth",
    )
    .await;
    wait_all_closed(&mut c, &names).await;
    profile(&mut report, &before, &cluster.stage_means(STAGES).await);
    report.latency("berth: all starts", &all, &errors);
    report.latency(
        format!("berth: hits ({})", a.start.hit_label()),
        &hits,
        &Errors::default(),
    );
    report.value(
        "warm-pool hit ratio",
        ratio(hits.len() as f64, all.len() as f64),
        "",
    );

    let d = docker::connect().await?;
    let (run, run_err) = docker_runs(&d, &cl.image, &offsets, "warm: docker run").await;
    report.latency("baseline: docker run (create+attach+start)", &run, &run_err);
    let (start, start_err) = docker_starts(&d, &cl.image, &offsets).await?;
    report.latency("baseline: docker start (pre-created)", &start, &start_err);
    docker::cleanup(&d).await?;
    cluster.shutdown().await?;

    let p50 = hits.quantile_us(0.5) as f64;
    // Issue 18's goal for the stand-in is a p50 of 15 ms on a pre-started
    // process; a warm container keeps its earlier 25/60 ms targets.
    let (p50_goal, p99_goal) = if process { (15.0, 60.0) } else { (25.0, 60.0) };
    report.check_at_most("warm p50 (ms)", p50 / 1e3, p50_goal);
    report.check_at_most(
        "warm p99 (ms)",
        hits.quantile_us(0.99) as f64 / 1e3,
        p99_goal,
    );
    report.ratio_at_least(
        "docker run p50 / warm p50",
        ratio(run.quantile_us(0.5) as f64, p50),
        20.0,
    );
    report.ratio(
        "docker start p50 / warm p50",
        ratio(start.quantile_us(0.5) as f64, p50),
    );
    report.note("latency from each session's scheduled arrival to its first agent event at the client; the baselines time the same agent answering the same prompt in the same image, to its first stdout line");
    if hits.len() < all.len() {
        report.note(format!(
            "{} of {} starts missed the pool (the node refills one container at a time); only hits count toward the warm targets",
            all.len() - hits.len(),
            all.len()
        ));
    }
    Ok(report)
}

/// Histograms whose means show where a start spends its time.
pub(super) const STAGES: &[&str] = &[
    "berth_queue_wait_seconds",
    "berth_placement_seconds",
    "berth_container_exec_seconds",
    "berth_session_start_seconds",
    "berth_first_event_seconds",
    "berth_event_persist_seconds",
    "berth_agent_first_line_seconds",
];

/// Adds each stage's mean over the measured run (`after` minus `before`).
pub(super) fn profile(
    report: &mut Report,
    before: &[(String, f64, f64)],
    after: &[(String, f64, f64)],
) {
    for (name, mean, n) in after {
        let (sum0, n0) = before
            .iter()
            .find(|(k, _, _)| k == name)
            .map_or((0.0, 0.0), |(_, m, c)| (m * c, *c));
        let runs = n - n0;
        if runs > 0.0 {
            let m = (mean * n - sum0) / runs;
            report.value(format!("stage mean: {name}"), m * 1e3, "ms");
        }
    }
}

/// Starts a session at each offset and stops it once its first agent event
/// arrived. Returns all latencies, those of hits (a start that reported
/// `hit` as its start path), the sessions and the errors.
async fn berth_starts(
    cluster: &Cluster,
    image: &str,
    offsets: &[Duration],
    hit: &'static str,
    label: &str,
) -> (Hist, Hist, Vec<String>, Errors) {
    let all = Arc::new(Mutex::new(Hist::new()));
    let hits = Arc::new(Mutex::new(Hist::new()));
    let names = Arc::new(Mutex::new(Vec::new()));
    let errors = Arc::new(Mutex::new(Errors::default()));
    let progress = Progress::start(label, offsets.len() as u64);
    open_loop(offsets, &progress, |_, t0| {
        let mut c = cluster.conns.get();
        let req = session(image, PROMPT);
        let (all, hits, names, errors, progress) = (
            all.clone(),
            hits.clone(),
            names.clone(),
            errors.clone(),
            progress.clone(),
        );
        async move {
            match create_and_wait_first(&mut c, req, t0, FIRST_EVENT_TIMEOUT).await {
                Ok(s) => {
                    if let Ok(mut h) = all.lock() {
                        h.record(s.first_event);
                    }
                    if s.start == hit
                        && let Ok(mut h) = hits.lock()
                    {
                        h.record(s.first_event);
                    }
                    stop(&mut c, &s.name, &errors).await;
                    if let Ok(mut n) = names.lock() {
                        n.push(s.name);
                    }
                    progress.done();
                }
                Err(st) => {
                    if let Ok(mut e) = errors.lock() {
                        e.status(&st);
                    }
                    tracing::warn!(error = %st, "a session start failed");
                    progress.error();
                }
            }
        }
    })
    .await;
    progress.finish();
    let take = |m: Arc<Mutex<Hist>>| m.lock().map(|h| h.clone()).unwrap_or_default();
    let names = names.lock().map(|n| n.clone()).unwrap_or_default();
    let errors = errors.lock().map(|e| e.clone()).unwrap_or_default();
    (take(all), take(hits), names, errors)
}

/// Baseline: `docker run` at each offset (create, attach, start, first output).
async fn docker_runs(
    d: &bollard::Docker,
    image: &str,
    offsets: &[Duration],
    label: &str,
) -> (Hist, Errors) {
    let hist = Arc::new(Mutex::new(Hist::new()));
    let errors = Arc::new(Mutex::new(Errors::default()));
    let progress = Progress::start(label, offsets.len() as u64);
    open_loop(offsets, &progress, |_, t0| {
        let (d, hist, errors, progress) =
            (d.clone(), hist.clone(), errors.clone(), progress.clone());
        let image = image.to_string();
        async move {
            let run = async {
                let id = docker::create(&d, &image, docker::agent_cmd(PROMPT)).await?;
                let r = docker::start_and_read(&d, &id, t0, None).await;
                docker::remove(&d, &id).await;
                r
            };
            match run.await {
                Ok((first, _, _)) => {
                    if let Ok(mut h) = hist.lock() {
                        h.record(first);
                    }
                    progress.done();
                }
                Err(e) => {
                    tracing::warn!(error = %e, "docker run failed");
                    if let Ok(mut x) = errors.lock() {
                        x.add("docker");
                    }
                    progress.error();
                }
            }
        }
    })
    .await;
    progress.finish();
    let h = hist.lock().map(|h| h.clone()).unwrap_or_default();
    let e = errors.lock().map(|e| e.clone()).unwrap_or_default();
    (h, e)
}

/// Baseline: `docker start` of containers created beforehand (untimed), at
/// each offset: attach, start, first output.
async fn docker_starts(
    d: &bollard::Docker,
    image: &str,
    offsets: &[Duration],
) -> anyhow::Result<(Hist, Errors)> {
    let mut ids = Vec::with_capacity(offsets.len());
    for _ in offsets {
        ids.push(docker::create(d, image, docker::agent_cmd(PROMPT)).await?);
    }
    let ids = Arc::new(ids);
    let hist = Arc::new(Mutex::new(Hist::new()));
    let errors = Arc::new(Mutex::new(Errors::default()));
    let progress = Progress::start("warm: docker start", offsets.len() as u64);
    open_loop(offsets, &progress, |i, t0| {
        let (d, ids, hist, errors, progress) = (
            d.clone(),
            ids.clone(),
            hist.clone(),
            errors.clone(),
            progress.clone(),
        );
        async move {
            let r = docker::start_and_read(&d, &ids[i], t0, None).await;
            docker::remove(&d, &ids[i]).await;
            match r {
                Ok((first, _, _)) => {
                    if let Ok(mut h) = hist.lock() {
                        h.record(first);
                    }
                    progress.done();
                }
                Err(e) => {
                    tracing::warn!(error = %e, "docker start failed");
                    if let Ok(mut x) = errors.lock() {
                        x.add("docker");
                    }
                    progress.error();
                }
            }
        }
    })
    .await;
    progress.finish();
    let h = hist.lock().map(|h| h.clone()).unwrap_or_default();
    let e = errors.lock().map(|e| e.clone()).unwrap_or_default();
    Ok((h, e))
}

#[derive(Debug, Clone, clap::Args, Serialize)]
pub struct BurstArgs {
    /// Warm containers kept on the node.
    #[arg(long, default_value_t = 4)]
    pub pool: u32,
    /// Sessions in the burst (default: twice the pool).
    #[arg(long)]
    pub burst: Option<usize>,
}

/// Scenario 2: a burst of twice the pool at once. Time until every session
/// has its first event, the pool hit ratio and the refill rate, beside as
/// many parallel cold starts (`docker run`) at once.
pub async fn burst(cl: &ClusterArgs, a: &BurstArgs) -> anyhow::Result<Report> {
    let n = a.burst.unwrap_or(a.pool as usize * 2);
    anyhow::ensure!(n > 0, "--burst must be positive");
    let mut report = Report::new("burst", serde_json::json!({"pool": a.pool, "burst": n}));
    let nodes = RealNodes {
        nodes: 1,
        capacity: u32::try_from(n)? + a.pool,
        pool: a.pool,
        agents: 0,
    };
    let cluster = Cluster::real(cl, &nodes).await?;
    let mut nc = cluster.conns.nodes();
    let pool = i32::try_from(a.pool)?;
    wait_pool_full(&mut nc, &cl.image, pool, Duration::from_secs(120)).await?;

    // Watch the pool while the burst runs: its low point and when it is full again.
    let watch = {
        let mut nc = nc.clone();
        let image = cl.image.clone();
        tokio::spawn(async move {
            let t0 = Instant::now();
            let mut low = (i32::MAX, Duration::ZERO);
            let mut refilled = None;
            while t0.elapsed() < Duration::from_secs(180) {
                let ready = warm_ready(&mut nc, &image).await.unwrap_or(-1);
                if ready >= 0 && ready < low.0 {
                    low = (ready, t0.elapsed());
                }
                if low.0 < pool && ready >= pool {
                    refilled = Some(t0.elapsed());
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            (low, refilled)
        })
    };
    let offsets = vec![Duration::ZERO; n];
    let t0 = Instant::now();
    let (all, hits, names, errors) = berth_starts(
        &cluster,
        &cl.image,
        &offsets,
        "warm_container",
        "burst: berth",
    )
    .await;
    let all_first = t0.elapsed();
    let mut c = cluster.conns.get();
    wait_all_closed(&mut c, &names).await;
    let ((low, low_at), refilled) = watch.await?;

    report.latency("berth: first event, per session", &all, &errors);
    report.value(
        "berth: until all have their first event",
        all.stats().max_us as f64 / 1e3,
        "ms",
    );
    report.value(
        "berth: wall time of the burst",
        all_first.as_secs_f64() * 1e3,
        "ms",
    );
    report.value(
        "warm-pool hit ratio",
        ratio(hits.len() as f64, n as f64),
        "",
    );
    match refilled {
        Some(full) => {
            let refill = (pool - low.max(0)) as f64 / (full - low_at).as_secs_f64().max(1e-3);
            report.value(
                "pool refill rate (low point to full)",
                refill,
                "containers/s",
            );
            report.value(
                "pool refill time",
                (full - low_at).as_secs_f64() * 1e3,
                "ms",
            );
        }
        None => report.note("the pool did not refill within 180 s"),
    }

    let d = docker::connect().await?;
    let (cold, cold_err) = docker_runs(&d, &cl.image, &offsets, "burst: parallel docker run").await;
    docker::cleanup(&d).await?;
    cluster.shutdown().await?;
    report.latency(
        "baseline: parallel cold starts (docker run)",
        &cold,
        &cold_err,
    );
    let berth_all = all.stats().max_us as f64;
    report.ratio(
        "cold: all first outputs / berth: all first events",
        ratio(cold.stats().max_us as f64, berth_all),
    );
    report.ratio(
        "cold p50 / berth p50",
        ratio(cold.quantile_us(0.5) as f64, all.quantile_us(0.5) as f64),
    );
    report.note("all sessions are created at once; each is stopped after its first event, which frees its slot for the refill");
    Ok(report)
}
