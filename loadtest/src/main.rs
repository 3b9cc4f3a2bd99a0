//! `berth-loadtest`: drives a berth cluster and measures it against the
//! baselines a user would otherwise reach for, each in the same run.
//!
//! ```text
//! berth-loadtest warm --sessions 40 --rate 2
//! berth-loadtest dispatch --rates 10,100,500 --json dispatch.json
//! ```
//!
//! See BENCHMARKS.md for every scenario, what it measures and the results.

mod cluster;
mod dispatcher;
mod docker;
mod driver;
mod prometheus;
mod report;
mod scenarios;
mod simnode;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use cluster::ClusterArgs;
use scenarios::{balance, claude, dispatch, failover, fanin, fleet, relay, start};

#[derive(Debug, Parser)]
#[command(
    name = "berth-loadtest",
    version,
    about = "Benchmarks berth against same-run baselines: warm start, burst, dispatch latency, relay throughput, fan-in, balance",
    long_about = "Benchmarks berth against same-run baselines.\n\n\
        By default each scenario starts its own cluster in this process: a dispatcher on a fresh \
        Postgres database (BERTH_TEST_DATABASE_URL, default postgres://berth:berth@127.0.0.1:5432/postgres), \
        real agent-server nodes on the local Docker daemon with the fake agent image \
        (deploy/test-image/build.sh), or simulated nodes where the scenario says so. \
        Run `scripts/setup.sh` first. Build with --release: debug builds measure the compiler, not berth."
)]
struct Cli {
    #[command(flatten)]
    cluster: ClusterArgs,
    /// Also write the results as JSON to this file.
    #[arg(long, global = true)]
    json: Option<PathBuf>,
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Debug, Subcommand)]
enum Scenario {
    /// 1. CreateSession → first agent event on a warm-pool hit, vs `docker run` and `docker start`.
    Warm(start::WarmArgs),
    /// 2. A burst of twice the pool: all first events, hit ratio, refill rate, vs parallel cold starts.
    Burst(start::BurstArgs),
    /// 3. Insert → claim at several rates, vs a bare SKIP LOCKED loop on the same database.
    Dispatch(dispatch::DispatchArgs),
    /// 4. Events/s through the relay, vs a direct tonic stream and a bollard attach.
    Relay(relay::RelayArgs),
    /// 5. Many concurrent low-rate streams: added latency per hop, dispatcher memory per stream.
    Fanin(fanin::FaninArgs),
    /// 6. max/mean active sessions per node under Poisson load and a burst, vs random and round-robin.
    Balance(balance::BalanceArgs),
    /// 7. The real Claude Code CLI: CreateSession → its first event, cold and warm, vs `docker run`.
    Claude(claude::ClaudeArgs),
    /// 8. Sessions mid-turn while dispatchers are restarted and killed: turns and events lost, time to resume.
    Failover(failover::FailoverArgs),
    /// 9. A fleet on one Postgres: thousands of streamed sessions over several dispatchers, one killed mid-turns.
    Fleet(fleet::FleetArgs),
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .try_init();
    if cfg!(debug_assertions) {
        eprintln!(
            "berth-loadtest: this is a debug build; numbers from it are not benchmarks (use --release)"
        );
    }
    match run(&cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("berth-loadtest: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: &Cli) -> anyhow::Result<()> {
    let c = &cli.cluster;
    let report = match &cli.scenario {
        Scenario::Warm(a) => start::warm(c, a).await?,
        Scenario::Burst(a) => start::burst(c, a).await?,
        Scenario::Dispatch(a) => dispatch::run(c, a).await?,
        Scenario::Relay(a) => relay::run(c, a).await?,
        Scenario::Fanin(a) => fanin::run(c, a).await?,
        Scenario::Balance(a) => balance::run(c, a).await?,
        Scenario::Claude(a) => claude::run(c, a).await?,
        Scenario::Failover(a) => failover::run(c, a).await?,
        Scenario::Fleet(a) => fleet::run(c, a).await?,
    };
    print!("{}", report.table());
    if let Some(path) = &cli.json {
        let mut json = serde_json::to_value(&report)?;
        json["machine"] = machine();
        std::fs::write(path, serde_json::to_string_pretty(&json)?)
            .map_err(|e| anyhow::anyhow!("--json: cannot write {}: {e}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

/// What the numbers came from.
fn machine() -> serde_json::Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("model name")
                    .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
            })
        })
        .unwrap_or_default();
    serde_json::json!({
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "cpu_model": cpu,
        "release_build": !cfg!(debug_assertions),
    })
}
