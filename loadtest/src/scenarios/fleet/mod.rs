//! Scenario 9: a fleet on one Postgres. Several dispatchers (the real
//! binary, each its own process) share one database and simulated nodes.
//! Sessions ramp up to thousands, spread over the dispatchers; each has a
//! client holding `StreamEvents` open and sending a turn every few seconds.
//! Then one dispatcher is killed (as `kill -9`) in the middle of the turns:
//! its sessions must be taken over within 2× the lease, with no turn or
//! event lost. Measures starts/s, insert → claim, event append time, live
//! latency, memory per stream, and Postgres's connections and CPU.

mod client;
mod measure;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use berth_common::tls::DevCa;
use serde::Serialize;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::cluster::ClusterArgs;
use crate::dispatcher::{Child, Launch, TempDir, launch, rss};
use crate::driver::Progress;
use crate::report::{Errors, Report};
use crate::simnode::SimNode;
use client::{Dispatchers, Shared, Tally, Turns};

/// The dispatcher's histogram of one append statement's time.
const PERSIST_SECONDS: &str = "berth_event_persist_seconds";

#[derive(Debug, Clone, clap::Args, Serialize)]
pub struct FleetArgs {
    /// Dispatchers sharing the database.
    #[arg(long, default_value_t = 3)]
    pub dispatchers: usize,
    /// Concurrent sessions to ramp up to, each with a client stream.
    #[arg(long, default_value_t = 10_000)]
    pub sessions: usize,
    /// Simulated nodes.
    #[arg(long, default_value_t = 4)]
    pub nodes: usize,
    /// Sessions created per second during the ramp, over all dispatchers.
    #[arg(long, default_value_t = 400.0)]
    pub create_rate: f64,
    /// Seconds between two turns of one session.
    #[arg(long, default_value_t = 20.0)]
    pub turn_every: f64,
    /// Seconds of turns; the kill comes halfway.
    #[arg(long, default_value_t = 40.0)]
    pub seconds: f64,
    /// The dispatchers' lease (`BERTH_DISPATCHER_LEASE`), in seconds.
    #[arg(long, default_value_t = 15.0)]
    pub lease: f64,
    /// Each dispatcher's Postgres connections (`BERTH_DB_MAX_CONNECTIONS`).
    #[arg(long, default_value_t = 16)]
    pub db_connections: u32,
    /// Do not kill a dispatcher.
    #[arg(long)]
    pub no_kill: bool,
    /// The dispatcher binary (default: `berth-dispatcher` next to this one).
    #[arg(long)]
    #[serde(skip)]
    pub dispatcher_bin: Option<PathBuf>,
}

pub async fn run(cl: &ClusterArgs, a: &FleetArgs) -> anyhow::Result<Report> {
    cl.in_process_only(
        "fleet",
        "it starts, measures and kills its own dispatcher processes",
    )?;
    anyhow::ensure!(
        a.dispatchers >= 2 && a.sessions > 0 && a.nodes > 0,
        "--dispatchers must be at least 2, --sessions and --nodes positive"
    );
    anyhow::ensure!(
        a.create_rate > 0.0 && a.turn_every > 0.0 && a.seconds > 0.0 && a.lease > 0.0,
        "--create-rate, --turn-every, --seconds and --lease must be positive"
    );
    let bin = crate::dispatcher::binary(a.dispatcher_bin.as_ref())?;
    let ca = DevCa::generate("berth loadtest CA")?;
    let stop = CancellationToken::new();
    let _stop = stop.clone().drop_guard();
    let per_node = u32::try_from(a.sessions / a.nodes + 64)?;
    let mut sims = Vec::new();
    for i in 0..a.nodes {
        sims.push(SimNode::start(i, per_node, Duration::from_secs(1), &ca, stop.clone()).await?);
    }
    let tag = uuid::Uuid::new_v4().simple().to_string()[..10].to_string();
    let (database, database_url) = berth_tests::create_database(&tag).await?;
    let dir = TempDir::fleet(&ca, &tag)?;
    let result = fleet(cl, a, &bin, &sims, &database_url, &dir, stop.clone()).await;
    stop.cancel();
    for s in &sims {
        s.stopped().await;
    }
    berth_tests::drop_database(&database).await?;
    result
}

#[allow(clippy::too_many_arguments)]
async fn fleet(
    cl: &ClusterArgs,
    a: &FleetArgs,
    bin: &std::path::Path,
    sims: &[SimNode],
    database_url: &str,
    dir: &TempDir,
    stop: CancellationToken,
) -> anyhow::Result<Report> {
    let mut children: Vec<Child> = Vec::new();
    for i in 0..a.dispatchers {
        children.push(launch(&Launch {
            bin,
            sims,
            database_url,
            dir,
            id: format!("fleet-{i}"),
            metrics: true,
            env: vec![
                ("BERTH_DISPATCHER_LEASE", a.lease.to_string()),
                ("BERTH_DB_MAX_CONNECTIONS", a.db_connections.to_string()),
                // The driver is one caller standing in for thousands: the
                // per-caller rate limit would shed it, not measure berth.
                ("BERTH_API_RATE_LIMIT", "0".to_string()),
            ],
        })?);
    }
    let per_dispatcher = cl.connections.max(a.sessions.div_ceil(100 * a.dispatchers));
    let mut conns = Vec::new();
    for c in &mut children {
        conns.push(c.connect(per_dispatcher).await?);
    }
    let db = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(database_url)
        .await?;
    // Let the node links come up and the first allocations settle.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rss0: Vec<u64> = children.iter().map(|c| rss(c.pid).unwrap_or(0)).collect();

    let (turns_tx, turns_rx) = watch::channel(None);
    let shared = Arc::new(Shared {
        dispatchers: Dispatchers {
            alive: conns.iter().map(|_| AtomicBool::new(true)).collect(),
            conns,
        },
        tally: Tally::default(),
        turns: turns_rx,
        stop: stop.clone(),
    });
    let mut f = Figures::default();
    let mut tasks = tokio::task::JoinSet::new();
    ramp(a, &shared, &mut tasks).await;
    f.rss_held = children
        .iter()
        .zip(&rss0)
        .map(|(c, r0)| rss(c.pid).unwrap_or(0).saturating_sub(*r0))
        .sum();
    f.claim = measure::claim_latency(&db).await?;
    f.starts = measure::starts(&db).await?;
    f.owners = measure::owners(&db).await?;
    f.connections = measure::connections(&db).await?;

    // Turns: every session, one every --turn-every seconds.
    let start = Instant::now() + Duration::from_secs(1);
    let end = start + Duration::from_secs_f64(a.seconds);
    let _ = turns_tx.send(Some(Turns {
        start,
        every: Duration::from_secs_f64(a.turn_every),
        end,
    }));
    let half = start + Duration::from_secs_f64(a.seconds / 2.0);
    eprintln!(
        "fleet: turns for {} s, one per session every {} s",
        a.seconds, a.turn_every
    );
    tokio::time::sleep_until(start).await;
    let cpu0 = measure::postgres_cpu_seconds();
    tokio::time::sleep_until(half).await;
    f.postgres_cores = (measure::postgres_cpu_seconds() - cpu0) / (a.seconds / 2.0);
    f.connections = f.connections.max(measure::connections(&db).await?);
    let addrs: Vec<_> = children.iter().filter_map(|c| c.metrics).collect();
    f.append = measure::buckets(&addrs, PERSIST_SECONDS).await;
    f.live_steady = take(&shared.tally.live);
    if !a.no_kill {
        f.takeover = Some(kill(&mut children[0], &shared, &db, a.lease).await?);
        f.connections = f.connections.max(measure::connections(&db).await?);
    }
    tokio::time::sleep_until(end).await;
    // Every accepted turn's echo, however late (the killed dispatcher's
    // sessions answer once taken over).
    let t = &shared.tally;
    let _ = measure::time_until(Duration::from_secs_f64(2.0 * a.lease + 30.0), || async {
        t.turns_echoed.load(Ordering::Relaxed) >= t.turns_sent.load(Ordering::Relaxed)
    })
    .await;
    f.owners_after = measure::owners(&db).await?;
    f.duplicate_runs = duplicate_runs(sims);
    stop.cancel();
    while tasks.join_next().await.is_some() {}
    for c in &mut children {
        let _ = c.proc.kill().await;
    }
    let mut report = Report::new("fleet", a);
    f.report(a, &shared.tally, &mut report);
    Ok(report)
}

/// Creates `--sessions` sessions at `--create-rate`, each with its client
/// task in `tasks`, then waits (up to 5 minutes) until every created one
/// runs.
async fn ramp(
    a: &FleetArgs,
    shared: &Arc<Shared>,
    tasks: &mut tokio::task::JoinSet<Option<String>>,
) {
    let progress = Progress::start("fleet: ramp", a.sessions as u64);
    let t = Instant::now();
    for i in 0..a.sessions {
        let due = t + Duration::from_secs_f64(i as f64 / a.create_rate);
        tokio::time::sleep_until(due).await;
        progress.sent();
        tasks.spawn(client::run(shared.clone(), i, due));
    }
    let tally = &shared.tally;
    let mut done = 0;
    let deadline = Instant::now() + Duration::from_secs(300);
    while Instant::now() < deadline {
        let running = tally.running.load(Ordering::Relaxed);
        for _ in done..running {
            progress.done();
        }
        done = done.max(running);
        let errors = tally.errors.lock().map(|e| e.total()).unwrap_or(0);
        if running + errors >= a.sessions as u64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    progress.finish();
}

/// Kills dispatcher `victim` (SIGKILL), takes it out of the clients' load
/// balancer, and times until another dispatcher drives each of the
/// sessions it owned.
async fn kill(
    victim: &mut Child,
    shared: &Shared,
    db: &sqlx::PgPool,
    lease: f64,
) -> anyhow::Result<measure::Takeover> {
    let owned = measure::owned_by(db, &victim.id).await?;
    eprintln!("fleet: killing {} ({} sessions)", victim.id, owned.len());
    victim.proc.start_kill()?;
    shared.dispatchers.alive[0].store(false, Ordering::Relaxed);
    // Measured up to 8 × the lease, so a miss still has a number.
    let limit = Duration::from_secs_f64(8.0 * lease);
    let took = measure::takeover(db, &owned, &victim.id, limit).await;
    eprintln!("fleet: takeover {took:?}");
    Ok(took)
}

/// Sessions running on more than one simulated node at once.
fn duplicate_runs(sims: &[SimNode]) -> usize {
    let mut seen = std::collections::HashMap::<String, usize>::new();
    for s in sims {
        for id in s.session_ids() {
            *seen.entry(id).or_default() += 1;
        }
    }
    seen.values().filter(|&&n| n > 1).count()
}

fn take(h: &std::sync::Mutex<crate::report::Hist>) -> crate::report::Hist {
    h.lock()
        .map(|mut h| std::mem::take(&mut *h))
        .unwrap_or_default()
}

/// What the fleet run measured beside its clients' tally.
#[derive(Default)]
struct Figures {
    /// Growth of all dispatchers' RSS while the streams are held.
    rss_held: u64,
    claim: (f64, f64, f64),
    starts: (i64, f64),
    owners: Vec<(String, i64)>,
    owners_after: Vec<(String, i64)>,
    connections: i64,
    postgres_cores: f64,
    append: Vec<(f64, f64)>,
    live_steady: crate::report::Hist,
    takeover: Option<measure::Takeover>,
    duplicate_runs: usize,
}

impl Figures {
    fn report(self, a: &FleetArgs, t: &Tally, r: &mut Report) {
        let load = |v: &std::sync::atomic::AtomicU64| v.load(Ordering::Relaxed) as f64;
        let errors = t.errors.lock().map(|e| e.clone()).unwrap_or_default();
        let hist = |h: &std::sync::Mutex<crate::report::Hist>| {
            h.lock().map(|h| h.clone()).unwrap_or_default()
        };
        r.value("sessions created", load(&t.created), "sessions");
        r.value(
            "sessions running (seen by their client)",
            load(&t.running),
            "sessions",
        );
        r.latency(
            "CreateSession → running, at the client",
            &hist(&t.start),
            &errors,
        );
        let (started, span) = self.starts;
        let rate = started as f64 / span.max(1e-9);
        r.ratio_at_least("session starts/s sustained (insert → started)", rate, 300.0);
        r.value("insert → claim p50", self.claim.0 * 1e3, "ms");
        r.value("insert → claim max", self.claim.2 * 1e3, "ms");
        r.check_at_most("insert → claim p99 (ms)", self.claim.1 * 1e3, 100.0);
        for (owner, n) in &self.owners {
            r.value(
                format!("live sessions owned by {owner}"),
                *n as f64,
                "sessions",
            );
        }
        r.latency(
            "turn → echo at the client, before the kill",
            &self.live_steady,
            &Errors::default(),
        );
        r.latency(
            "turn → echo at the client, after the kill",
            &hist(&t.live),
            &Errors::default(),
        );
        if let Some(p99) = measure::bucket_quantile(&self.append, 0.99) {
            r.value("event append statement p99 (bucket bound)", p99 * 1e3, "ms");
        }
        let per_stream = self.rss_held as f64 / load(&t.running).max(1.0) / 1024.0;
        r.value(
            "dispatchers' RSS growth, all streams held",
            self.rss_held as f64 / 1048576.0,
            "MiB",
        );
        r.check_at_most("dispatcher memory per open stream (KiB)", per_stream, 20.0);
        let bound = a.dispatchers as f64 * f64::from(a.db_connections) + 2.0;
        r.check_at_most(
            format!(
                "Postgres connections, peak (bound: {} × {} + 2 of the driver)",
                a.dispatchers, a.db_connections
            ),
            self.connections as f64,
            bound,
        );
        r.value("Postgres CPU during turns", self.postgres_cores, "cores");
        if let Some(took) = &self.takeover {
            let secs = |d: Option<Duration>| d.map_or(f64::INFINITY, |d| d.as_secs_f64());
            r.value(
                "sessions owned by the killed dispatcher",
                took.owned as f64,
                "sessions",
            );
            r.value(
                "takeover: every one of them released by the dead owner",
                secs(took.released),
                "s",
            );
            for (f, at) in &took.taken {
                if *f < 1.0 {
                    r.value(
                        format!("takeover: {}% of them running again", f * 100.0),
                        secs(*at),
                        "s",
                    );
                }
            }
            // Nothing owned, nothing measured: not a takeover met.
            let all = if took.owned == 0 {
                r.note("the killed dispatcher owned no live session when it was killed: the takeover was not measured (see the errors above)");
                None
            } else {
                took.all()
            };
            r.check_at_most(
                format!("takeover of all of them (s; 2 × lease = {})", 2.0 * a.lease),
                secs(all),
                2.0 * a.lease,
            );
            for (owner, n) in &self.owners_after {
                r.value(
                    format!("after the kill: live sessions owned by {owner}"),
                    *n as f64,
                    "sessions",
                );
            }
            r.latency(
                "a stream's end → open again on a live dispatcher",
                &hist(&t.resumed),
                &Errors::default(),
            );
        }
        r.value("turns accepted", load(&t.turns_sent), "turns");
        r.check_at_most(
            "turns lost (accepted, never echoed)",
            (load(&t.turns_sent) - load(&t.turns_echoed)).max(0.0),
            0.0,
        );
        r.check_at_most("turns echoed twice (sent once)", load(&t.echo_dups), 0.0);
        r.value(
            "turns sent again after a call that failed unanswered",
            load(&t.resent),
            "turns",
        );
        r.value("of those, echoed twice", load(&t.echo_dups_resent), "turns");
        r.check_at_most("events lost (seq gaps on streams)", load(&t.gaps), 0.0);
        r.check_at_most("events duplicated on streams", load(&t.dups), 0.0);
        r.check_at_most(
            "sessions running on two nodes at once",
            self.duplicate_runs as f64,
            0.0,
        );
        r.note("dispatchers are the real berth-dispatcher binary, one process each, on one Postgres database; nodes are simulated (the node protocol over mTLS, no container) in the driver's process, as are the clients: everything shares this machine's cores");
        r.note("starts/s: sessions that reached running over the time from the first insert to the last session's first `session.status_running` or `session.status_idle` (a session with no first message goes idle when its run is up), read from the event log; insert → claim: each session's create_time to its first `session.status_starting` event");
        r.note("memory per open stream: growth of the dispatchers' summed RSS from before the ramp to all sessions running, over the sessions; each session holds one client StreamEvents stream (on its creating dispatcher) and one node RunSession stream (on its owner)");
        r.note("the dispatchers run with no per-caller rate limit (BERTH_API_RATE_LIMIT=0): the driver is one anonymous caller standing in for every session's client");
        r.note("takeover: from the SIGKILL until every session the killed dispatcher owned is running or idle under another owner (polled every 200 ms)");
        r.note("simulated nodes keep a run 60 s past its dispatcher's stream, with every frame not yet acknowledged, and hand it to the epoch that re-attaches, as nodes do (`--reattach-grace`)");
    }
}
