//! Scenario 3: dispatch latency, from the insert of a pending session to its
//! claim, beside a bare `FOR UPDATE SKIP LOCKED` claim loop on the same
//! database. Both are timed by Postgres's own clock (`now()` of the insert
//! and of the claim), so client and network time are excluded on both sides.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use sqlx::{PgPool, Row};
use tokio::time::Instant;

use super::session;
use crate::cluster::{Cluster, ClusterArgs};
use crate::driver::{Arrivals, Progress, open_loop};
use crate::report::{Errors, Hist, Report, ratio};

#[derive(Debug, Clone, clap::Args, Serialize)]
pub struct DispatchArgs {
    /// Arrival rates to run, sessions per second.
    #[arg(long, value_delimiter = ',', default_value = "10,100,500")]
    pub rates: Vec<f64>,
    /// Seconds at each rate.
    #[arg(long, default_value_t = 5.0)]
    pub seconds: f64,
    /// Simulated nodes taking the sessions (capacity is never the limit).
    #[arg(long, default_value_t = 4)]
    pub nodes: usize,
    /// How long each session runs on its node, in milliseconds.
    #[arg(long, default_value_t = 200)]
    pub hold_ms: u64,
}

const BARE_SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS loadtest_queue (
    id          bigserial PRIMARY KEY,
    status      text NOT NULL DEFAULT 'pending',
    create_time timestamptz NOT NULL DEFAULT now(),
    claim_time  timestamptz
);
CREATE INDEX IF NOT EXISTS loadtest_queue_pending ON loadtest_queue (create_time) WHERE status = 'pending';
"#;

/// Insert and wake, in one statement (as berth's create does).
const BARE_INSERT: &str =
    "INSERT INTO loadtest_queue DEFAULT VALUES RETURNING pg_notify('loadtest_queue', '') IS NULL";

/// The bare claim: the oldest pending row, skipping rows other claimers hold.
const BARE_CLAIM: &str = r#"
WITH next AS (
    SELECT id FROM loadtest_queue WHERE status = 'pending'
    ORDER BY create_time LIMIT 1 FOR UPDATE SKIP LOCKED
)
UPDATE loadtest_queue q SET status = 'claimed', claim_time = now()
FROM next WHERE q.id = next.id RETURNING q.id
"#;

pub async fn run(cl: &ClusterArgs, a: &DispatchArgs) -> anyhow::Result<Report> {
    cl.in_process_only(
        "dispatch",
        "it reads claim times from the cluster's database and runs on simulated nodes",
    )?;
    anyhow::ensure!(
        a.seconds > 0.0 && a.rates.iter().all(|r| *r > 0.0),
        "--rates and --seconds must be positive"
    );
    let mut report = Report::new("dispatch", a);
    let cluster = Cluster::simulated(cl, a.nodes, 1_000_000, Duration::from_secs(1)).await?;
    let url = cluster
        .database_url()
        .ok_or_else(|| anyhow::anyhow!("no database"))?
        .to_string();
    let db = sqlx::postgres::PgPoolOptions::new()
        .max_connections(8)
        .connect(&url)
        .await?;
    sqlx::raw_sql(BARE_SCHEMA).execute(&db).await?;

    for &rate in &a.rates {
        let n = ((rate * a.seconds).round() as usize).max(1);
        let offsets = Arrivals::Uniform { rate }.offsets(n, &mut fastrand::Rng::new());
        let label = format!("rate-{rate}");

        // berth: CreateSession through the API; the dispatcher claims it.
        let errors = Arc::new(Mutex::new(Errors::default()));
        let progress = Progress::start(format!("dispatch {rate}/s: berth"), n as u64);
        let prompt = format!("hold {}", a.hold_ms);
        open_loop(&offsets, &progress, |_, _| {
            let mut c = cluster.conns.get();
            let mut req = session("sim:latest", &prompt);
            req.labels.insert("loadtest".into(), label.clone());
            let (errors, progress) = (errors.clone(), progress.clone());
            async move {
                match c.create_session(req).await {
                    Ok(_) => progress.done(),
                    Err(s) => {
                        if let Ok(mut e) = errors.lock() {
                            e.status(&s);
                        }
                        progress.error();
                    }
                }
            }
        })
        .await;
        progress.finish();
        let (berth, at_create) = berth_claims(&db, &label, n, Duration::from_secs(60)).await?;
        let errors = errors.lock().map(|e| e.clone()).unwrap_or_default();
        report.value(
            format!("berth @ {rate}/s: claimed in the creating statement (no queue)"),
            at_create as f64,
            "sessions",
        );
        report.latency(
            format!("berth @ {rate}/s: insert → claim, through the queue"),
            &berth,
            &errors,
        );

        // Bare loop: one claimer woken by LISTEN, a poll as a fallback.
        let bare = bare_loop(&db, &url, &offsets, rate).await?;
        report.latency(
            format!("bare SKIP LOCKED @ {rate}/s: insert → claim"),
            &bare,
            &Errors::default(),
        );
        if berth.len() > 0 {
            report.ratio_at_most(
                format!("berth p50 / bare p50 @ {rate}/s (through the queue)"),
                ratio(berth.quantile_us(0.5) as f64, bare.quantile_us(0.5) as f64),
                1.3,
            );
        } else {
            report.note(format!(
                "@ {rate}/s every session was claimed as it was created: the queue path was not exercised, so it is not compared"
            ));
        }
        // Let the held sessions end before the next rate.
        tokio::time::sleep(Duration::from_millis(a.hold_ms + 500)).await;
    }
    report.note("both sides are timed by Postgres: now() of the inserting statement to now() of the claiming one; berth's claim also moves the session to `starting` and logs that event, the bare claim only updates the row");
    report.note(format!(
        "sessions run on {} simulated nodes (no containers) for {} ms each",
        a.nodes, a.hold_ms
    ));
    cluster.shutdown().await?;
    Ok(report)
}

/// Insert → claim of `n` sessions labelled `label`, once all are claimed:
/// those claimed through the queue, and how many were claimed by the
/// statement that created them (their claim has the insert's own time).
async fn berth_claims(
    db: &PgPool,
    label: &str,
    n: usize,
    timeout: Duration,
) -> anyhow::Result<(Hist, usize)> {
    let deadline = Instant::now() + timeout;
    loop {
        let rows = sqlx::query(
            "SELECT EXTRACT(EPOCH FROM (e.create_time - s.create_time))::float8 * 1e6 AS us
             FROM sessions s JOIN events e ON e.session_id = s.id AND e.type = 'session.status_starting'
             WHERE s.labels ->> 'loadtest' = $1
               AND e.seq = (SELECT min(seq) FROM events x WHERE x.session_id = s.id AND x.type = 'session.status_starting')",
        )
        .bind(label)
        .fetch_all(db)
        .await?;
        if rows.len() >= n || Instant::now() >= deadline {
            let mut h = Hist::new();
            let mut at_create = 0;
            for r in &rows {
                let us: f64 = r.try_get("us")?;
                if us <= 0.0 {
                    at_create += 1;
                } else {
                    h.record(Duration::from_secs_f64(us / 1e6));
                }
            }
            if rows.len() < n {
                tracing::warn!(
                    claimed = rows.len(),
                    n,
                    "not every session was claimed in time"
                );
            }
            return Ok((h, at_create));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The baseline: insert at the same schedule, claim with a bare loop.
async fn bare_loop(
    db: &PgPool,
    url: &str,
    offsets: &[Duration],
    rate: f64,
) -> anyhow::Result<Hist> {
    sqlx::query("TRUNCATE loadtest_queue").execute(db).await?;
    let stop = tokio_util::sync::CancellationToken::new();
    let claimer = {
        let (db, stop) = (db.clone(), stop.clone());
        let mut listener = sqlx::postgres::PgListener::connect(url).await?;
        listener.listen("loadtest_queue").await?;
        tokio::spawn(async move {
            loop {
                while let Ok(Some(_)) = sqlx::query(BARE_CLAIM).fetch_optional(&db).await {}
                tokio::select! {
                    () = stop.cancelled() => return,
                    _ = listener.recv() => {}
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        })
    };
    let progress = Progress::start(
        format!("dispatch {rate}/s: bare loop"),
        offsets.len() as u64,
    );
    open_loop(offsets, &progress, |_, _| {
        let (db, progress) = (db.clone(), progress.clone());
        async move {
            match sqlx::query(BARE_INSERT).execute(&db).await {
                Ok(_) => progress.done(),
                Err(_) => progress.error(),
            }
        }
    })
    .await;
    progress.finish();
    let deadline = Instant::now() + Duration::from_secs(30);
    let rows = loop {
        let rows = sqlx::query(
            "SELECT EXTRACT(EPOCH FROM (claim_time - create_time))::float8 * 1e6 AS us FROM loadtest_queue WHERE claim_time IS NOT NULL",
        )
        .fetch_all(db)
        .await?;
        if rows.len() >= offsets.len() || Instant::now() >= deadline {
            break rows;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    stop.cancel();
    let _ = claimer.await;
    let mut h = Hist::new();
    for r in rows {
        let us: f64 = r.try_get("us")?;
        h.record(Duration::from_secs_f64(us.max(0.0) / 1e6));
    }
    Ok(h)
}
