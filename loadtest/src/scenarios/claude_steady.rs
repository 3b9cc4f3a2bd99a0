//! Steady arrivals of one agent on a node whose agent pool runs at its
//! production defaults (`--warm-agents 4`, min 0, max 2, 2 refills/s): the
//! pool learns the agent from its first session and must refill between
//! arrivals. One session every `every`, open loop, each stopped about a
//! second after its first event (its turn is over by then), as a service
//! calling the API would. Reports the share that took a pre-started process.

use std::time::Duration;

use berth_proto::v1 as pb;
use tokio::time::Instant;

use super::create_and_wait_first;
use crate::cluster::Cluster;
use crate::report::Hist;

/// How long each session lives after its first event.
const RUN: Duration = Duration::from_secs(1);

/// What the steady arrivals saw: each one's start path, in arrival order,
/// and the latencies of those that started.
pub struct Steady {
    pub paths: Vec<String>,
    pub hist: Hist,
}

impl Steady {
    /// Hits among the arrivals after the first `skip`.
    pub fn hits_after(&self, skip: usize) -> (usize, usize) {
        let rest = self.paths.iter().skip(skip);
        let n = rest.clone().count();
        (rest.filter(|p| *p == "warm_process").count(), n)
    }
}

/// `n` arrivals of `request`, one every `every`.
pub async fn arrivals(
    cluster: &Cluster,
    request: impl Fn() -> pb::CreateSessionRequest,
    n: usize,
    every: Duration,
    timeout: Duration,
) -> anyhow::Result<Steady> {
    let t0 = Instant::now();
    let mut runs = tokio::task::JoinSet::new();
    for i in 0..n {
        let due = t0 + every.mul_f64(i as f64);
        tokio::time::sleep_until(due).await;
        let mut c = cluster.conns.get();
        let req = request();
        runs.spawn(async move {
            let s = create_and_wait_first(&mut c, req, due, timeout).await;
            if let Ok(s) = &s {
                tokio::time::sleep(RUN).await;
                let _ = c
                    .stop_session(pb::StopSessionRequest {
                        name: s.name.clone(),
                    })
                    .await;
            }
            (i, s)
        });
    }
    let mut out: Vec<Option<(String, Duration)>> = vec![None; n];
    while let Some(r) = runs.join_next().await {
        let (i, s) = r?;
        let s = s.map_err(|st| anyhow::anyhow!("steady arrival {i} failed: {st}"))?;
        eprintln!(
            "claude: steady arrival {i}/{n}: {} {:?}",
            s.start, s.first_event
        );
        out[i] = Some((s.start, s.first_event));
    }
    let mut hist = Hist::new();
    let mut paths = Vec::with_capacity(n);
    for (path, first) in out.into_iter().flatten() {
        hist.record(first);
        paths.push(path);
    }
    Ok(Steady { paths, hist })
}
