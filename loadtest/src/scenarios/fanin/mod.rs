//! Scenario 5: fan-in of many concurrent low-rate sessions.
//!
//! The dispatcher runs as its own process (the real `berth-dispatcher`
//! binary), so its memory can be read from /proc; its nodes are simulated
//! (no container per stream: 10 000 containers do not fit on this machine).
//! Each session holds one `Connect` stream from the driver. Then messages
//! arrive at a low overall Poisson rate, each on a random stream; the time
//! from a message's scheduled send to its echo at the client is compared
//! with the same exchange over direct `RunSession` streams to the same
//! simulated nodes (no dispatcher). The dispatcher is one relay hop each way.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use berth_common::tls::DevCa;
use berth_proto::node::v1 as node;
use berth_proto::v1 as pb;
use futures::StreamExt;
use serde::Serialize;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::session;
use crate::cluster::ClusterArgs;
use crate::driver::{Arrivals, Conns, Progress, open_loop};
use crate::report::{Errors, Hist, Report, ratio};
use crate::simnode::SimNode;

use crate::dispatcher::{rss, spawn_dispatcher};

#[derive(Debug, Clone, clap::Args, Serialize)]
pub struct FaninArgs {
    /// Concurrent sessions (streams) to hold, one run each.
    #[arg(long, value_delimiter = ',', default_value = "100,1000,10000")]
    pub streams: Vec<usize>,
    /// Simulated nodes.
    #[arg(long, default_value_t = 4)]
    pub nodes: usize,
    /// Sessions created per second while filling up.
    #[arg(long, default_value_t = 400.0)]
    pub create_rate: f64,
    /// Messages per second over all streams (Poisson), once all are held.
    #[arg(long, default_value_t = 100.0)]
    pub message_rate: f64,
    /// Seconds of messages per run.
    #[arg(long, default_value_t = 10.0)]
    pub seconds: f64,
    /// The dispatcher binary (default: `berth-dispatcher` next to this one).
    #[arg(long)]
    #[serde(skip)]
    pub dispatcher_bin: Option<PathBuf>,
}

pub async fn run(cl: &ClusterArgs, a: &FaninArgs) -> anyhow::Result<Report> {
    cl.in_process_only(
        "fanin",
        "it reads the dispatcher process's memory and runs on simulated nodes",
    )?;
    anyhow::ensure!(
        a.nodes > 0 && a.message_rate > 0.0 && a.seconds > 0.0,
        "--nodes, --message-rate and --seconds must be positive"
    );
    let bin = crate::dispatcher::binary(a.dispatcher_bin.as_ref())?;
    let mut report = Report::new("fanin", a);
    for &n in &a.streams {
        one(cl, a, &bin, n, &mut report).await?;
    }
    report.note("nodes are simulated (they speak the node protocol over mTLS but run no container): 10 000 containers do not fit on this machine; the dispatcher is the real binary in its own process");
    report.note("added latency per hop = (berth p50 - direct p50) / 2: a message crosses the dispatcher once on its way in and its echo once on its way out; berth also persists both events in Postgres before relaying them");
    report.note("the dispatcher runs with no per-caller rate limit (BERTH_API_RATE_LIMIT=0) and room for 65 536 calls opening at once (BERTH_API_MAX_IN_FLIGHT): the driver is one caller opening every stream at once");
    report.note("memory per idle stream = growth of the dispatcher's RSS from before the sessions were created to when all were held and idle, over their number; each holds a client Connect stream and a node RunSession stream");
    Ok(report)
}

/// A message to send on one stream: when it was due, and its text.
type Send = (Instant, String);

/// Latencies recorded by every stream of one side.
#[derive(Default)]
struct Shared {
    hist: Mutex<Hist>,
    errors: Mutex<Errors>,
}

impl Shared {
    fn record(&self, d: Duration) {
        if let Ok(mut h) = self.hist.lock() {
            h.record(d);
        }
    }
    fn error(&self, what: &str) {
        if let Ok(mut e) = self.errors.lock() {
            e.add(what);
        }
    }
}

async fn one(
    cl: &ClusterArgs,
    a: &FaninArgs,
    bin: &PathBuf,
    n: usize,
    report: &mut Report,
) -> anyhow::Result<()> {
    let ca = DevCa::generate("berth loadtest CA")?;
    let stop = CancellationToken::new();
    let _stop = stop.clone().drop_guard();
    let mut sims = Vec::new();
    let per_node = u32::try_from(n / a.nodes + 16)?;
    for i in 0..a.nodes {
        sims.push(SimNode::start(i, per_node, Duration::from_secs(1), &ca, stop.clone()).await?);
    }
    let mut child = spawn_dispatcher(bin, &ca, &sims).await?;
    let conns_n = cl.connections.max(n.div_ceil(100));
    let conns = child.connect(conns_n).await?;
    // Let its node links come up and its first allocations settle.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss0 = rss(child.pid)?;

    // Fill up: N sessions, each with one Connect stream.
    let berth = Arc::new(Shared::default());
    let senders: Arc<Mutex<Vec<mpsc::Sender<Send>>>> = Arc::new(Mutex::new(Vec::with_capacity(n)));
    let offsets = Arrivals::Uniform {
        rate: a.create_rate,
    }
    .offsets(n, &mut fastrand::Rng::new());
    let progress = Progress::start(format!("fanin {n}: open"), n as u64);
    open_loop(&offsets, &progress, |_, _| {
        let (conns, berth, senders, progress) = (
            conns.clone(),
            berth.clone(),
            senders.clone(),
            progress.clone(),
        );
        async move {
            match open_stream(&conns, berth).await {
                Ok(tx) => {
                    if let Ok(mut s) = senders.lock() {
                        s.push(tx);
                    }
                    progress.done();
                }
                Err(s) => {
                    tracing::warn!(error = %s, "opening a stream failed");
                    progress.error();
                }
            }
        }
    })
    .await;
    progress.finish();
    let held = senders.lock().map(|s| s.len()).unwrap_or(0);
    // Every session is placed once the nodes run them all.
    let deadline = Instant::now() + Duration::from_secs(300);
    while sims.iter().map(|s| s.running() as usize).sum::<usize>() < held
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let running: usize = sims.iter().map(|s| s.running() as usize).sum();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rss1 = rss(child.pid)?;
    let per_stream = (rss1.saturating_sub(rss0)) as f64 / held.max(1) as f64;

    // Messages at a low overall rate, each on a random stream.
    let msgs = ((a.message_rate * a.seconds).round() as usize).max(1);
    let senders: Vec<mpsc::Sender<Send>> = senders.lock().map(|s| s.clone()).unwrap_or_default();
    anyhow::ensure!(!senders.is_empty(), "no stream could be opened");
    messages(&senders, a.message_rate, msgs, &format!("fanin {n}: berth")).await;
    let berth_hist = wait_recorded(&berth, msgs).await;
    drop(senders);

    // Baseline: the same exchange on direct streams to the same nodes.
    let (direct_hist, derr) = direct_baseline(&sims, &ca, n, a.message_rate, msgs).await?;

    let errors = berth.errors.lock().map(|e| e.clone()).unwrap_or_default();
    Figures {
        n,
        running,
        berth: (berth_hist, errors),
        direct: (direct_hist, derr),
        rss: (rss0, rss1),
        per_stream,
    }
    .report(report);

    let _ = child.proc.kill().await;
    stop.cancel();
    for s in &sims {
        s.stopped().await;
    }
    berth_tests::drop_database(&child.database).await?;
    Ok(())
}

/// What one fan-in run measured.
struct Figures {
    n: usize,
    running: usize,
    berth: (Hist, Errors),
    direct: (Hist, Errors),
    /// The dispatcher's RSS before the streams, and while it held them.
    rss: (u64, u64),
    per_stream: f64,
}

impl Figures {
    fn report(self, report: &mut Report) {
        let Figures {
            n,
            running,
            berth: (berth_hist, errors),
            direct: (direct_hist, derr),
            rss: (rss0, rss1),
            per_stream,
        } = self;
        report.value(
            format!("{n} streams: held (placed on nodes)"),
            running as f64,
            "sessions",
        );
        if running < n {
            report.note(format!(
                "{n} streams: only {running} sessions were held; the figures for {n} are not what they claim (see the errors above)"
            ));
        }
        report.latency(
            format!("{n} streams: berth message → echo"),
            &berth_hist,
            &errors,
        );
        report.latency(
            format!("{n} streams: direct tonic echo"),
            &direct_hist,
            &derr,
        );
        let added =
            (berth_hist.quantile_us(0.5) as f64 - direct_hist.quantile_us(0.5) as f64) / 2.0;
        report.check_at_most(
            format!("{n} streams: added p50 per relay hop (µs)"),
            added,
            50.0,
        );
        report.ratio(
            format!("{n} streams: berth p50 / direct p50"),
            ratio(
                berth_hist.quantile_us(0.5) as f64,
                direct_hist.quantile_us(0.5) as f64,
            ),
        );
        report.value(
            format!("{n} streams: dispatcher RSS before"),
            rss0 as f64 / 1048576.0,
            "MiB",
        );
        report.value(
            format!("{n} streams: dispatcher RSS held"),
            rss1 as f64 / 1048576.0,
            "MiB",
        );
        report.check_at_most(
            format!("{n} streams: dispatcher memory per idle stream (KiB)"),
            per_stream / 1024.0,
            20.0,
        );
    }
}

/// The baseline: the same exchange on `n` streams opened directly to the
/// nodes (no dispatcher), `msgs` messages at `rate`: its latencies and
/// errors.
async fn direct_baseline(
    sims: &[SimNode],
    ca: &DevCa,
    n: usize,
    rate: f64,
    msgs: usize,
) -> anyhow::Result<(Hist, Errors)> {
    let direct = Arc::new(Shared::default());
    let mut clients = Vec::new();
    for s in sims {
        clients.push(s.client(ca).await?);
    }
    let mut dsenders = Vec::with_capacity(n);
    let progress = Progress::start(format!("fanin {n}: direct open"), n as u64);
    for i in 0..n {
        progress.sent();
        let k = i % clients.len();
        match open_direct(&mut clients[k], direct.clone()).await {
            Ok(tx) => {
                dsenders.push(tx);
                progress.done();
            }
            Err(e) => {
                tracing::warn!(error = %e, "opening a direct stream failed");
                progress.error();
            }
        }
    }
    progress.finish();
    messages(&dsenders, rate, msgs, &format!("fanin {n}: direct")).await;
    let direct_hist = wait_recorded(&direct, msgs).await;
    drop(dsenders);
    let errors = direct.errors.lock().map(|e| e.clone()).unwrap_or_default();
    Ok((direct_hist, errors))
}

/// Sends `count` messages at a Poisson `rate`, each on a random stream.
async fn messages(senders: &[mpsc::Sender<Send>], rate: f64, count: usize, label: &str) {
    let offsets = Arrivals::Poisson { rate }.offsets(count, &mut fastrand::Rng::new());
    let progress = Progress::start(label, count as u64);
    let mut rng = fastrand::Rng::new();
    let picks: Vec<usize> = (0..count).map(|_| rng.usize(..senders.len())).collect();
    open_loop(&offsets, &progress, |i, t0| {
        let tx = senders[picks[i]].clone();
        let progress = progress.clone();
        async move {
            if tx
                .send((t0, format!("m{i}-{}", fastrand::u64(..))))
                .await
                .is_ok()
            {
                progress.done();
            } else {
                progress.error();
            }
        }
    })
    .await;
    progress.finish();
}

/// Waits (up to 30 s) until `count` latencies or errors are in, then returns them.
async fn wait_recorded(s: &Shared, count: usize) -> Hist {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let have = s.hist.lock().map(|h| h.len() as usize).unwrap_or(0)
            + s.errors.lock().map(|e| e.total() as usize).unwrap_or(0);
        if have >= count || Instant::now() >= deadline {
            return s.hist.lock().map(|h| h.clone()).unwrap_or_default();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Messages of one stream awaiting their echo, by text.
#[derive(Default)]
struct Pending(HashMap<String, Instant>);

impl Pending {
    fn sent(&mut self, text: &str, due: Instant) {
        self.0.insert(text.to_string(), due);
    }

    /// Records the latency of the message whose text `payload` carries.
    fn echoed(&mut self, payload: &str, shared: &Shared) {
        let hit = self
            .0
            .keys()
            .find(|k| payload.contains(k.as_str()))
            .cloned();
        if let Some(due) = hit.and_then(|k| self.0.remove(&k)) {
            shared.record(due.elapsed());
        }
    }
}

/// Creates a session and holds a `Connect` stream on it; returns where to
/// send its messages. The stream's task records each echo's latency.
async fn open_stream(
    conns: &Conns,
    shared: Arc<Shared>,
) -> Result<mpsc::Sender<Send>, tonic::Status> {
    let mut c = conns.get();
    let s = c
        .create_session(session("sim:latest", ""))
        .await?
        .into_inner();
    let (req_tx, req_rx) = mpsc::channel(8);
    let _ = req_tx
        .send(pb::ConnectRequest {
            kind: Some(pb::connect_request::Kind::Open(pb::ConnectOpen {
                name: s.name,
                after_seq: 0,
            })),
        })
        .await;
    let responses = c
        .connect(tokio_stream::wrappers::ReceiverStream::new(req_rx))
        .await?
        .into_inner();
    Ok(echo_loop(
        req_tx,
        responses,
        |text| pb::ConnectRequest {
            kind: Some(pb::connect_request::Kind::Message(pb::ConnectMessage {
                text,
                r#ref: String::new(),
            })),
        },
        |r| match r.kind {
            Some(pb::connect_response::Kind::Event(e)) if e.r#type == "agent.message" => {
                Seen::Echo(e.payload_json)
            }
            Some(pb::connect_response::Kind::Ack(a)) if a.code != 0 => {
                Seen::Failed(format!("ack code {}", a.code))
            }
            _ => Seen::Other,
        },
        shared,
    ))
}

/// A direct `RunSession` stream to a simulated node, used like [`open_stream`].
async fn open_direct(
    client: &mut node::agent_server_client::AgentServerClient<tonic::transport::Channel>,
    shared: Arc<Shared>,
) -> anyhow::Result<mpsc::Sender<Send>> {
    let (req_tx, frames) = crate::simnode::open_direct(client).await?;
    Ok(echo_loop(
        req_tx,
        frames,
        crate::simnode::direct_message,
        |f| match f.kind {
            Some(node::node_frame::Kind::Line(l))
                if l.events
                    .first()
                    .is_some_and(|e| e.r#type == "agent.message") =>
            {
                Seen::Echo(
                    l.events
                        .into_iter()
                        .next()
                        .map(|e| e.payload_json)
                        .unwrap_or_default(),
                )
            }
            _ => Seen::Other,
        },
        shared,
    ))
}

/// What a frame from the far side means to an [`echo_loop`].
enum Seen {
    /// An echo, carrying the message's text in its payload.
    Echo(String),
    Failed(String),
    Other,
}

/// Sends each message handed to the returned sender on `requests` (made by
/// `message`), and records its latency when its echo comes back on
/// `responses` (read by `seen`). Ends when either side closes.
fn echo_loop<Req, Resp>(
    requests: mpsc::Sender<Req>,
    mut responses: impl futures::Stream<Item = Result<Resp, tonic::Status>>
    + Unpin
    + std::marker::Send
    + 'static,
    message: fn(String) -> Req,
    seen: fn(Resp) -> Seen,
    shared: Arc<Shared>,
) -> mpsc::Sender<Send>
where
    Req: std::marker::Send + 'static,
    Resp: std::marker::Send + 'static,
{
    let (tx, mut rx) = mpsc::channel::<Send>(16);
    tokio::spawn(async move {
        let mut pending = Pending::default();
        loop {
            tokio::select! {
                m = rx.recv() => {
                    let Some((due, text)) = m else { return };
                    pending.sent(&text, due);
                    if requests.send(message(text)).await.is_err() {
                        shared.error("stream closed");
                    }
                }
                r = responses.next() => match r {
                    Some(Ok(r)) => match seen(r) {
                        Seen::Echo(payload) => pending.echoed(&payload, &shared),
                        Seen::Failed(why) => shared.error(&why),
                        Seen::Other => {}
                    },
                    Some(Err(s)) => {
                        shared.error(&format!("{:?}", s.code()));
                        return;
                    }
                    None => return,
                },
            }
        }
    });
    tx
}
