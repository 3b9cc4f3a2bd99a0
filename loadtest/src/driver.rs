//! The load driver: an open-loop arrival schedule, a set of client
//! connections, and a progress line.
//!
//! Open loop: operation `i` is due at `start + offset(i)` whatever happened to
//! the ones before it, and its latency is measured from that scheduled time.
//! A system that stalls therefore shows its stall in every operation that was
//! due meanwhile, instead of slowing the driver down (coordinated omission).

use std::future::Future;
use std::io::{IsTerminal, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use berth_common::tls::{DISPATCHER_NAME, TlsMaterial};
use berth_proto::v1::nodes_client::NodesClient;
use berth_proto::v1::sessions_client::SessionsClient;
use tokio::time::Instant;
use tonic::transport::Endpoint;

/// Arrival offsets from the start of a run.
#[derive(Debug, Clone, Copy)]
pub enum Arrivals {
    /// Evenly spaced at `rate` per second.
    Uniform { rate: f64 },
    /// A Poisson process of `rate` per second (exponential gaps).
    Poisson { rate: f64 },
}

impl Arrivals {
    /// The first `n` offsets.
    pub fn offsets(self, n: usize, rng: &mut fastrand::Rng) -> Vec<Duration> {
        let mut t = 0.0f64;
        (0..n)
            .map(|i| match self {
                Arrivals::Uniform { rate } => Duration::from_secs_f64(i as f64 / rate),
                Arrivals::Poisson { rate } => {
                    let at = Duration::from_secs_f64(t);
                    t += exponential(rng, rate);
                    at
                }
            })
            .collect()
    }
}

/// An exponential variate of rate `rate`.
pub fn exponential(rng: &mut fastrand::Rng, rate: f64) -> f64 {
    // 1 - U is in (0, 1]: ln never sees 0.
    -(1.0 - rng.f64()).ln() / rate
}

/// Runs `op(i, scheduled)` for each offset, each in its own task, started at
/// its scheduled time; waits for all of them. `op` measures from `scheduled`.
pub async fn open_loop<F, Fut>(offsets: &[Duration], progress: &Progress, op: F)
where
    F: Fn(usize, Instant) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for (i, off) in offsets.iter().enumerate() {
        let due = start + *off;
        tokio::time::sleep_until(due).await;
        progress.sent();
        tasks.spawn(op(i, due));
        // Reap finished tasks as we go so the set stays small.
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
}

/// Counters behind the progress line, printed to stderr while a phase runs.
#[derive(Clone)]
pub struct Progress(Arc<ProgressInner>);

struct ProgressInner {
    label: String,
    total: u64,
    sent: AtomicU64,
    done: AtomicU64,
    errors: AtomicU64,
    started: Instant,
    stop: tokio_util::sync::CancellationToken,
}

impl Progress {
    /// Starts printing `label: sent/total, done, errors, elapsed` every 250 ms
    /// on a terminal (every 5 s as separate lines otherwise).
    pub fn start(label: impl Into<String>, total: u64) -> Self {
        let p = Progress(Arc::new(ProgressInner {
            label: label.into(),
            total,
            sent: AtomicU64::new(0),
            done: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            started: Instant::now(),
            stop: tokio_util::sync::CancellationToken::new(),
        }));
        let tty = std::io::stderr().is_terminal();
        let every = if tty {
            Duration::from_millis(250)
        } else {
            Duration::from_secs(5)
        };
        let q = p.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = q.0.stop.cancelled() => break,
                    () = tokio::time::sleep(every) => q.print(tty, false),
                }
            }
        });
        p
    }

    fn print(&self, tty: bool, last: bool) {
        let p = &self.0;
        let line = format!(
            "{}: sent {}/{}, done {}, errors {}, {:.1}s",
            p.label,
            p.sent.load(Ordering::Relaxed),
            p.total,
            p.done.load(Ordering::Relaxed),
            p.errors.load(Ordering::Relaxed),
            p.started.elapsed().as_secs_f64()
        );
        let mut err = std::io::stderr().lock();
        let _ = if tty {
            write!(err, "\r\x1b[2K{line}{}", if last { "\n" } else { "" })
        } else {
            writeln!(err, "{line}")
        };
        let _ = err.flush();
    }

    pub fn sent(&self) {
        self.0.sent.fetch_add(1, Ordering::Relaxed);
    }

    pub fn done(&self) {
        self.0.done.fetch_add(1, Ordering::Relaxed);
    }

    pub fn error(&self) {
        self.0.errors.fetch_add(1, Ordering::Relaxed);
    }

    /// Stops the line and prints its final state.
    pub fn finish(&self) {
        self.0.stop.cancel();
        self.print(std::io::stderr().is_terminal(), true);
    }
}

/// Several HTTP/2 connections to one dispatcher, handed out round-robin.
#[derive(Clone)]
pub struct Conns {
    channels: Arc<Vec<berth_tests::Api>>,
    next: Arc<AtomicUsize>,
}

impl Conns {
    /// Opens `n` connections to `url`, over mTLS when `tls` is given (the
    /// server is verified as `berth-dispatcher`).
    /// Each call carries `token` (none: anonymous, for `--allow-anonymous`).
    pub async fn open(
        url: &str,
        tls: Option<&TlsMaterial>,
        token: Option<&str>,
        n: usize,
    ) -> anyhow::Result<Self> {
        let bearer = berth_tests::Bearer::new(token).map_err(anyhow::Error::msg)?;
        let mut channels = Vec::with_capacity(n);
        for _ in 0..n.max(1) {
            let mut e = Endpoint::from_shared(url.to_string())?
                .tcp_nodelay(true)
                .connect_timeout(Duration::from_secs(10));
            if let Some(tls) = tls {
                e = e.tls_config(tls.client(DISPATCHER_NAME))?;
            }
            let channel = e
                .connect()
                .await
                .map_err(|err| anyhow::anyhow!("cannot connect to {url}: {err}"))?;
            channels.push(berth_tests::Api::new(channel, bearer.clone()));
        }
        Ok(Self {
            channels: Arc::new(channels),
            next: Arc::new(AtomicUsize::new(0)),
        })
    }

    /// The next connection's client.
    pub fn get(&self) -> SessionsClient<berth_tests::Api> {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.channels.len();
        SessionsClient::new(self.channels[i].clone())
            .max_decoding_message_size(berth_common::grpc::MAX_MESSAGE_BYTES)
    }

    /// A client of the fleet API (`berth.v1.Nodes`) on the first connection.
    pub fn nodes(&self) -> NodesClient<berth_tests::Api> {
        NodesClient::new(self.channels[0].clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn poisson_arrivals_average_their_rate() {
        let mut rng = fastrand::Rng::with_seed(7);
        let offs = Arrivals::Poisson { rate: 100.0 }.offsets(20_000, &mut rng);
        let span = offs.last().copied().unwrap_or_default().as_secs_f64();
        let rate = offs.len() as f64 / span;
        assert!((95.0..105.0).contains(&rate), "rate {rate}");
        assert!(offs.windows(2).all(|w| w[0] <= w[1]));
    }

    #[test]
    fn uniform_arrivals_are_evenly_spaced() {
        let mut rng = fastrand::Rng::with_seed(7);
        let offs = Arrivals::Uniform { rate: 4.0 }.offsets(3, &mut rng);
        assert_eq!(offs, [0, 250, 500].map(Duration::from_millis).to_vec());
    }
}
