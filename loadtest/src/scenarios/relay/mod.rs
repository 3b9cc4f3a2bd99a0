//! Scenario 4: relay throughput. One session's agent emits events as fast as
//! it can; the client reads them through berth. Baselines: the same events
//! over a direct tonic stream with no relay (a simulated node called
//! directly), the same agent's stdout over a bollard attach (no gRPC), and
//! the same stored events written again by a bare INSERT loop (the ceiling
//! of persist-before-relay on this machine, [`postgres`]). Then live latency
//! at a steady rate ([`live`]).

mod live;
mod postgres;

use std::time::Duration;

use berth_proto::node::v1 as node;
use berth_proto::v1 as pb;
use futures::StreamExt;
use serde::Serialize;
use tokio::time::Instant;

use super::{create_and_wait_first, session};
use crate::cluster::{Cluster, ClusterArgs, RealNodes};
use crate::docker;
use crate::report::{Errors, Report, ratio};

/// The dispatcher's histogram of events per committed statement.
const PERSIST_BATCH: &str = "berth_event_persist_batch_size";

#[derive(Debug, Clone, clap::Args, Serialize)]
pub struct RelayArgs {
    /// Events the agent emits per run.
    #[arg(long, default_value_t = 2000)]
    pub events: u64,
    /// Event sizes in bytes, one run each.
    #[arg(long, value_delimiter = ',', default_value = "1024,65536")]
    pub sizes: Vec<u64>,
    /// Skip the runs with a real container (node, Docker): only the relay over
    /// a simulated node and the direct echo.
    #[arg(long)]
    pub no_containers: bool,
    /// Live latency: events per second the simulated agent emits, steadily.
    #[arg(long, default_value_t = 1000.0)]
    pub live_rate: f64,
    /// Live latency: seconds of paced events.
    #[arg(long, default_value_t = 5.0)]
    pub live_seconds: f64,
    /// Live latency: the size of each paced event, in bytes.
    #[arg(long, default_value_t = 1024)]
    pub live_size: u64,
}

/// One run's rate, measured from the first event to the last.
#[derive(Debug, Clone, Copy)]
pub(super) struct Rate {
    events: u64,
    span: Duration,
}

impl Rate {
    fn per_sec(&self) -> f64 {
        self.events as f64 / self.span.as_secs_f64().max(1e-9)
    }
}

pub async fn run(cl: &ClusterArgs, a: &RelayArgs) -> anyhow::Result<Report> {
    anyhow::ensure!(a.events > 1, "--events must be at least 2");
    let mut report = Report::new("relay", a);
    let mut rows = Vec::new();

    if !a.no_containers {
        let cluster = Cluster::real(
            cl,
            &RealNodes {
                nodes: 1,
                capacity: 4,
                pool: 1,
                agents: 0,
            },
        )
        .await?;
        let d = docker::connect().await?;
        for &size in &a.sizes {
            eprintln!("relay: {} × {size} B through berth (container)", a.events);
            let berth = through_berth(&cluster, &cl.image, a.events, size).await?;
            eprintln!("relay: {} × {size} B over a bollard attach", a.events);
            let attach = over_attach(&d, &cl.image, a.events, size).await?;
            rows.push((size, "berth, real node (container)", berth));
            rows.push((size, "baseline: bollard attach, same agent", attach));
            report.ratio(
                format!("{size} B: berth (container) / bollard attach"),
                ratio(berth.per_sec(), attach.per_sec()),
            );
        }
        docker::cleanup(&d).await?;
        cluster.shutdown().await?;
    }

    if a.no_containers {
        cl.in_process_only(
            "relay --no-containers",
            "the direct echo calls the cluster's simulated node",
        )?;
    }
    if cl.target.is_some() {
        report.note("with --target only the container runs were measured: the relay over a simulated node and the direct echo need an in-process cluster");
    } else {
        let cluster = Cluster::simulated(cl, 1, 16, Duration::from_secs(1)).await?;
        simulated(&cluster, a, &mut rows, &mut report).await?;
        cluster.shutdown().await?;
    }
    for (size, what, r) in rows {
        report.value(format!("{size} B: {what}"), r.per_sec(), "events/s");
        report.value(
            format!("{size} B: {what}"),
            r.per_sec() * size as f64 / (1024.0 * 1024.0),
            "MiB/s",
        );
    }
    report.note("rates run from the first event the reader sees to the last; every event berth relays is also persisted to Postgres before the client sees it");
    report.note("bare INSERT: the agent.message rows berth stored in that run, written again into the same events table (same indexes and trigger) by one loop of multi-row INSERTs, one statement per commit, as many rows per statement as berth's writer committed on average in that run; no session row, NOTIFY, node or reader");
    report.note("live latency: the simulated node stamps each event as its line leaves it; the client reads the stamp on the same clock when the event arrives");
    report.note("the payload is pseudo-random letters, so neither Postgres nor the transports can compress it away; the attach baseline runs the same agent command in a new container of the same image");
    Ok(report)
}

/// Throughput over a simulated node against the direct echo and the bare
/// INSERT loop, then live latency at a steady rate.
async fn simulated(
    cluster: &Cluster,
    a: &RelayArgs,
    rows: &mut Vec<(u64, &'static str, Rate)>,
    report: &mut Report,
) -> anyhow::Result<()> {
    let ca = cluster
        .ca
        .as_ref()
        .ok_or_else(|| anyhow::anyhow!("no CA"))?;
    let url = cluster
        .database_url()
        .ok_or_else(|| anyhow::anyhow!("no database"))?;
    let db = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(url)
        .await?;
    let mut direct = cluster.sims[0].client(ca).await?;
    // Live latency first, on a fresh table: the throughput runs leave
    // Postgres checkpointing the hundreds of MiB they wrote.
    let n = (a.live_rate * a.live_seconds).round().max(1.0) as u64;
    eprintln!(
        "relay: live latency, {n} × {} B at {}/s through berth",
        a.live_size, a.live_rate
    );
    let stages = [
        "berth_event_persist_seconds",
        "berth_event_persist_lag_seconds",
        PERSIST_BATCH,
    ];
    let before = cluster.histogram_totals(&stages).await;
    let through = live::through_berth(cluster, n, a.live_rate, a.live_size).await?;
    let after = cluster.histogram_totals(&stages).await;
    for (series, (sum, count)) in &after {
        let (s0, c0) = before.get(series).copied().unwrap_or_default();
        if count > &c0 {
            report.value(
                format!("live: mean of {series} over the run"),
                (sum - s0) / (count - c0),
                if series.contains("seconds") {
                    "s"
                } else {
                    "events"
                },
            );
        }
    }
    eprintln!("relay: live latency, the same straight from the node");
    let bare = live::direct(&mut direct, n, a.live_rate, a.live_size).await?;
    let label = format!("live {} B at {}/s", a.live_size, a.live_rate);
    report.latency(
        format!("{label}: node line → client, berth"),
        &through,
        &Errors::default(),
    );
    report.latency(
        format!("{label}: node line → client, direct"),
        &bare,
        &Errors::default(),
    );
    report.check_at_most(
        format!("{label}: berth p99 (ms)"),
        through.quantile_us(0.99) as f64 / 1000.0,
        5.0,
    );
    for &size in &a.sizes {
        eprintln!(
            "relay: {} × {size} B through berth (simulated node)",
            a.events
        );
        let before = batch_totals(cluster).await;
        let (berth, name) = through_berth_named(cluster, "sim:latest", a.events, size).await?;
        let after = batch_totals(cluster).await;
        let batch = ((after.0 - before.0) / (after.1 - before.1).max(1.0)).round() as usize;
        eprintln!("relay: {} × {size} B over a direct tonic stream", a.events);
        let echo = direct_echo(&mut direct, a.events, size).await?;
        eprintln!("relay: the same {size} B rows by a bare INSERT loop, {batch} per commit");
        let id = name
            .strip_prefix("sessions/")
            .unwrap_or(&name)
            .parse::<uuid::Uuid>()?;
        let bare = postgres::bare_insert(&db, id, batch).await?;
        rows.push((size, "berth, simulated node (no container)", berth));
        rows.push((size, "baseline: direct tonic stream, no relay", echo));
        rows.push((size, "baseline: bare INSERT loop into events", bare));
        report.value(
            format!("{size} B: berth's mean events per commit"),
            batch as f64,
            "events",
        );
        report.ratio_at_least(
            format!("{size} B: berth / direct tonic echo"),
            ratio(berth.per_sec(), echo.per_sec()),
            0.8,
        );
        report.ratio_at_least(
            format!("{size} B: berth / bare INSERT loop"),
            ratio(berth.per_sec(), bare.per_sec()),
            0.5,
        );
    }
    Ok(())
}

/// Sum and count of the writer's batch sizes so far (process-wide).
async fn batch_totals(cluster: &Cluster) -> (f64, f64) {
    cluster
        .histogram_totals(&[PERSIST_BATCH])
        .await
        .into_values()
        .fold((0.0, 0.0), |acc, (s, n)| (acc.0 + s, acc.1 + n))
}

/// A session whose agent emits `n` events of `size` bytes, read by the client.
async fn through_berth(cluster: &Cluster, image: &str, n: u64, size: u64) -> anyhow::Result<Rate> {
    Ok(through_berth_named(cluster, image, n, size).await?.0)
}

/// [`through_berth`], and the session's name.
async fn through_berth_named(
    cluster: &Cluster,
    image: &str,
    n: u64,
    size: u64,
) -> anyhow::Result<(Rate, String)> {
    let mut c = cluster.conns.get();
    // A first short turn: the session is running and warm before we time.
    let s = create_and_wait_first(
        &mut c,
        session(image, "echo ready"),
        Instant::now(),
        Duration::from_secs(60),
    )
    .await?;
    let sent = c
        .send_message(pb::SendMessageRequest {
            name: s.name.clone(),
            text: format!("events {n} {size}"),
            ..Default::default()
        })
        .await?
        .into_inner();
    let mut stream = c
        .stream_events(pb::StreamEventsRequest {
            name: s.name.clone(),
            after_seq: sent.seq,
        })
        .await?
        .into_inner();
    let mut first = None;
    let mut count = 0u64;
    let deadline = Instant::now() + Duration::from_secs(600);
    while let Some(e) = tokio::time::timeout_at(deadline, stream.next()).await? {
        let e = e?;
        if e.r#type == "agent.message" {
            first.get_or_insert_with(Instant::now);
            count += 1;
            if count == n {
                break;
            }
        }
    }
    let span = first.map(|f| f.elapsed()).unwrap_or_default();
    let _ = c
        .stop_session(pb::StopSessionRequest {
            name: s.name.clone(),
        })
        .await;
    anyhow::ensure!(count == n, "berth relayed {count} of {n} events");
    Ok((
        Rate {
            events: n - 1,
            span,
        },
        s.name,
    ))
}

/// The same agent command in a new container, read over a bollard attach.
async fn over_attach(d: &bollard::Docker, image: &str, n: u64, size: u64) -> anyhow::Result<Rate> {
    let id = docker::create(d, image, docker::agent_cmd(&format!("events {n} {size}"))).await?;
    let opts = bollard::query_parameters::AttachContainerOptionsBuilder::new()
        .stdout(true)
        .stream(true)
        .build();
    let mut att = d.attach_container(&id, Some(opts)).await?;
    d.start_container(&id, None).await?;
    let mut first = None;
    let mut lines = 0u64;
    let mut buf = Vec::new();
    while let Some(chunk) = att.output.next().await {
        let bytes = chunk?.into_bytes();
        buf.extend_from_slice(&bytes);
        // Count whole lines that carry an assistant text event.
        while let Some(nl) = buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=nl).collect();
            if line.windows(11).any(|w| w == b"\"assistant\"") {
                first.get_or_insert_with(Instant::now);
                lines += 1;
            }
        }
        if lines >= n {
            break;
        }
    }
    let span = first.map(|f| f.elapsed()).unwrap_or_default();
    docker::remove(d, &id).await;
    anyhow::ensure!(lines >= n, "the attach read {lines} of {n} events");
    Ok(Rate {
        events: n - 1,
        span,
    })
}

/// The same events from a simulated node over a direct `RunSession` stream.
async fn direct_echo(
    client: &mut node::agent_server_client::AgentServerClient<tonic::transport::Channel>,
    n: u64,
    size: u64,
) -> anyhow::Result<Rate> {
    let (tx, mut frames) = crate::simnode::open_direct(client).await?;
    tx.send(crate::simnode::direct_message(format!("events {n} {size}")))
        .await?;
    let mut first = None;
    let mut count = 0u64;
    while let Some(f) = frames.next().await {
        if let Some(node::node_frame::Kind::Line(l)) = f?.kind
            && l.events.iter().any(|e| e.r#type == "agent.message")
        {
            first.get_or_insert_with(Instant::now);
            count += 1;
            if count == n {
                break;
            }
        }
    }
    let span = first.map(|f| f.elapsed()).unwrap_or_default();
    let _ = tx.send(crate::simnode::direct_stop()).await;
    anyhow::ensure!(
        count == n,
        "the direct stream carried {count} of {n} events"
    );
    Ok(Rate {
        events: n - 1,
        span,
    })
}
