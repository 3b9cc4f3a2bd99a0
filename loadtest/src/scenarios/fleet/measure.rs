//! What the fleet scenario reads besides its clients: the shared database
//! (claim latency, starts, owners, connections), the dispatchers' `/metrics`
//! (event append time), and Postgres's CPU from /proc.

use std::net::SocketAddr;
use std::time::Duration;

use sqlx::PgPool;

/// Insert → claim of every session, from the log: the session's
/// `create_time` to its first `session.status_starting` event. p50, p99
/// and max, in seconds.
pub(super) async fn claim_latency(db: &PgPool) -> anyhow::Result<(f64, f64, f64)> {
    let row: (Option<f64>, Option<f64>, Option<f64>) = sqlx::query_as(
        r#"
WITH waits AS (
    SELECT extract(epoch FROM e.create_time - s.create_time)::float8 AS wait
    FROM sessions s
    JOIN LATERAL (
        SELECT create_time FROM events
        WHERE session_id = s.id AND type = 'session.status_starting'
        ORDER BY seq LIMIT 1
    ) e ON true
)
SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY wait),
       percentile_cont(0.99) WITHIN GROUP (ORDER BY wait),
       max(wait)
FROM waits
"#,
    )
    .fetch_one(db)
    .await?;
    Ok((
        row.0.unwrap_or(0.0),
        row.1.unwrap_or(0.0),
        row.2.unwrap_or(0.0),
    ))
}

/// Sessions that started (reached `running`, or `idle` when they had no
/// first message), and the seconds from the first session's insert to the
/// last one's start.
pub(super) async fn starts(db: &PgPool) -> anyhow::Result<(i64, f64)> {
    let row: (i64, Option<f64>) = sqlx::query_as(
        r#"
WITH started AS (
    SELECT s.create_time AS created, e.create_time AS running
    FROM sessions s
    JOIN LATERAL (
        SELECT create_time FROM events
        WHERE session_id = s.id
          AND type IN ('session.status_running', 'session.status_idle')
        ORDER BY seq LIMIT 1
    ) e ON true
)
SELECT count(*), extract(epoch FROM max(running) - min(created))::float8 FROM started
"#,
    )
    .fetch_one(db)
    .await?;
    Ok((row.0, row.1.unwrap_or(0.0)))
}

/// Live sessions owned by dispatcher `owner`.
pub(super) async fn owned_by(db: &PgPool, owner: &str) -> anyhow::Result<Vec<uuid::Uuid>> {
    Ok(sqlx::query_scalar(
        "SELECT id FROM sessions WHERE owner = $1 AND status IN ('starting', 'running', 'idle')",
    )
    .bind(owner)
    .fetch_all(db)
    .await?)
}

/// How many of `ids` have left dispatcher `gone` (released to the queue,
/// or claimed since), and how many another dispatcher drives again
/// (running or idle under a new owner).
pub(super) async fn taken_over(
    db: &PgPool,
    ids: &[uuid::Uuid],
    gone: &str,
) -> anyhow::Result<(i64, i64)> {
    Ok(sqlx::query_as(
        "SELECT count(*) FILTER (WHERE owner <> $2), \
         count(*) FILTER (WHERE owner <> $2 AND owner <> '' AND status IN ('running', 'idle')) \
         FROM sessions WHERE id = ANY($1)",
    )
    .bind(ids)
    .bind(gone)
    .fetch_one(db)
    .await?)
}

/// A takeover as it went: from the kill, when every session had left the
/// dead owner, and when each fraction of them ran again.
#[derive(Debug, Default, Clone)]
pub(super) struct Takeover {
    pub owned: usize,
    pub released: Option<Duration>,
    /// (fraction, when), for 0.5, 0.9, 0.99 and 1.0.
    pub taken: Vec<(f64, Option<Duration>)>,
}

impl Takeover {
    pub const FRACTIONS: [f64; 4] = [0.5, 0.9, 0.99, 1.0];

    /// The whole takeover (every session running again), if it ended.
    pub fn all(&self) -> Option<Duration> {
        self.taken.last().and_then(|(_, t)| *t)
    }
}

/// Polls [`taken_over`] every 200 ms for up to `limit`, timing each step.
pub(super) async fn takeover(
    db: &PgPool,
    ids: &[uuid::Uuid],
    gone: &str,
    limit: Duration,
) -> Takeover {
    let n = ids.len() as f64;
    let mut t = Takeover {
        owned: ids.len(),
        released: None,
        taken: Takeover::FRACTIONS.iter().map(|f| (*f, None)).collect(),
    };
    let start = tokio::time::Instant::now();
    while start.elapsed() < limit && t.all().is_none() {
        if let Ok((left, taken)) = taken_over(db, ids, gone).await {
            let now = start.elapsed();
            if t.released.is_none() && left as f64 >= n {
                t.released = Some(now);
            }
            for (f, at) in &mut t.taken {
                if at.is_none() && taken as f64 >= (*f * n).ceil() {
                    *at = Some(now);
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    t
}

/// Live sessions by owner, for the report's spread across dispatchers.
pub(super) async fn owners(db: &PgPool) -> anyhow::Result<Vec<(String, i64)>> {
    Ok(sqlx::query_as(
        "SELECT owner, count(*) FROM sessions \
         WHERE status IN ('starting', 'running', 'idle') GROUP BY owner ORDER BY owner",
    )
    .fetch_all(db)
    .await?)
}

/// Connections to this database now (every dispatcher's pool and LISTEN).
pub(super) async fn connections(db: &PgPool) -> anyhow::Result<i64> {
    Ok(sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()",
    )
    .fetch_one(db)
    .await?)
}

/// CPU seconds every `postgres` process has used so far (user + system).
/// Processes that ended since the last read are not counted, so read it
/// across a phase in which backends live throughout.
pub(super) fn postgres_cpu_seconds() -> f64 {
    let Ok(mut sys) = sysinfo::System::new() else {
        return 0.0;
    };
    sys.refresh_processes_specifics(
        sysinfo::ProcessesToUpdate::All,
        true,
        sysinfo::ProcessRefreshKind::nothing().with_cpu(),
    );
    let ms: u64 = sys
        .processes()
        .values()
        .filter(|p| p.name() == "postgres")
        .map(|p| p.accumulated_cpu_time())
        .sum();
    ms as f64 / 1000.0
}

/// Cumulative bucket counts of histogram `family` over every dispatcher's
/// `/metrics` at `addrs`, by upper bound.
pub(super) async fn buckets(addrs: &[SocketAddr], family: &str) -> Vec<(f64, f64)> {
    let mut by_le = std::collections::BTreeMap::<u64, (f64, f64)>::new();
    let bucket = format!("{family}_bucket");
    for addr in addrs {
        let Ok((200, text)) = berth_tests::http_get(*addr, "/metrics").await else {
            continue;
        };
        for (_, labels, v) in crate::prometheus::samples(&text).filter(|s| s.0 == bucket) {
            let le = match crate::prometheus::label(labels, "le") {
                Some("+Inf") | None => f64::INFINITY,
                Some(le) => le.parse().unwrap_or(f64::INFINITY),
            };
            by_le.entry(le.to_bits()).or_insert((le, 0.0)).1 += v;
        }
    }
    let mut out: Vec<(f64, f64)> = by_le.into_values().collect();
    out.sort_by(|a, b| a.0.total_cmp(&b.0));
    out
}

/// The upper bound of the bucket holding quantile `q` of cumulative
/// `buckets` (a bound, not an estimate inside the bucket).
pub(super) fn bucket_quantile(buckets: &[(f64, f64)], q: f64) -> Option<f64> {
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    buckets
        .iter()
        .find(|(_, c)| *c >= q * total)
        .map(|(le, _)| *le)
}

/// Polls `f` every 200 ms until it is true or `limit` passes; how long it took.
pub(super) async fn time_until<F, Fut>(limit: Duration, mut f: F) -> Option<Duration>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = tokio::time::Instant::now();
    while start.elapsed() < limit {
        if f().await {
            return Some(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_quantile_is_the_bound_of_the_bucket_that_holds_it() {
        let b = [
            (0.001, 50.0),
            (0.005, 98.0),
            (0.01, 100.0),
            (f64::INFINITY, 100.0),
        ];
        assert_eq!(bucket_quantile(&b, 0.5), Some(0.001));
        assert_eq!(bucket_quantile(&b, 0.99), Some(0.01));
        assert_eq!(bucket_quantile(&[], 0.99), None);
    }
}
