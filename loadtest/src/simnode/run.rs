//! One simulated run: its "agent" (scripted by the message text, see the
//! module above), and what a real node does for it when its dispatcher
//! goes: the run goes on for a grace period, keeps every frame its
//! dispatcher has not acknowledged, and a newer epoch that re-attaches gets
//! them again, then the live ones.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use berth_proto::node::v1::{self as pb, dispatcher_frame, node_frame};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::{Status, Streaming};

use super::State;

/// How long a run waits for a re-attach once its dispatcher's stream is
/// gone: a node's default `--reattach-grace`.
const REATTACH_GRACE: Duration = Duration::from_secs(60);

/// Where a run's frames go.
pub(super) type Frames = mpsc::Sender<Result<pb::NodeFrame, Status>>;

/// A dispatcher's stream to a run: its frames in, and where the run's go.
pub(super) struct Link {
    pub inbound: Streaming<pb::DispatcherFrame>,
    pub tx: Frames,
}

/// A re-attach: the newer epoch's stream, and the last frame it has.
pub(super) struct Attach {
    pub link: Link,
    pub epoch: i64,
    pub after_node_seq: u64,
}

/// The run's way out: the live stream (if any) and every frame not yet
/// acknowledged, for a re-attach.
struct Out {
    tx: Option<Frames>,
    journal: VecDeque<pb::NodeFrame>,
    /// A direct run (no dispatcher acknowledges, none re-attaches) keeps
    /// no journal.
    journaled: bool,
}

impl Out {
    /// Journals `frame` and sends it while the stream is there.
    async fn send(&mut self, frame: pb::NodeFrame) {
        if self.journaled {
            self.journal.push_back(frame.clone());
        }
        if let Some(tx) = &self.tx
            && tx.send(Ok(frame)).await.is_err()
        {
            self.tx = None;
        }
    }

    /// The dispatcher persisted every frame up to `node_seq`.
    fn ack(&mut self, node_seq: u64) {
        while self.journal.front().is_some_and(|f| f.node_seq <= node_seq) {
            self.journal.pop_front();
        }
    }

    /// Takes `tx` as the stream, sending it every journaled frame after
    /// `after` first.
    async fn reattach(&mut self, tx: Frames, after: u64) {
        self.ack(after);
        for f in &self.journal {
            if tx.send(Ok(f.clone())).await.is_err() {
                return;
            }
        }
        self.tx = Some(tx);
    }
}

/// What a run starts with.
pub(super) struct Started {
    pub id: String,
    pub epoch: i64,
    pub fenced: CancellationToken,
    pub first_message: Option<pb::UserMessage>,
    pub attach: mpsc::Receiver<Attach>,
    /// Opened directly, not by a dispatcher (see [`super::open_direct`]).
    pub direct: bool,
}

/// Runs one simulated session until it stops, ends by itself, is fenced,
/// or no dispatcher re-attaches within the grace after its stream went.
pub(super) async fn run(state: Arc<State>, link: Link, started: Started) {
    let Started {
        id,
        mut epoch,
        fenced,
        first_message,
        mut attach,
        direct,
    } = started;
    let mut inbound = Some(link.inbound);
    let mut out = Out {
        tx: Some(link.tx),
        journal: VecDeque::new(),
        journaled: !direct,
    };
    // Frame 1 was `accepted`.
    let mut seq = 1u64;
    let mut hold: Option<tokio::time::Instant> = None;
    let mut delivered = Delivered::default();
    // The start's message is answered first, as a node's agent would.
    if let Some(m) = &first_message {
        delivered.deliver(m.seq);
    }
    let mut first = first_message.map(|m| pb::DispatcherFrame {
        epoch: 0,
        kind: Some(dispatcher_frame::Kind::Message(m)),
    });
    let mut orphaned: Option<tokio::time::Instant> = None;
    loop {
        if let Some(f) = first.take() {
            if !answer(f, &mut seq, &mut out, &mut hold).await {
                break;
            }
            continue;
        }
        if out.tx.is_none() || inbound.is_none() {
            if direct {
                break;
            }
            inbound = None;
            out.tx = None;
            orphaned.get_or_insert_with(|| tokio::time::Instant::now() + REATTACH_GRACE);
        }
        let frame = tokio::select! {
            f = async { inbound.as_mut()?.message().await.ok().flatten() }, if inbound.is_some() => f,
            a = attach.recv(), if inbound.is_none() => {
                let Some(a) = a else { break };
                epoch = a.epoch;
                state.reattached(&id, epoch);
                let accepted = pb::NodeFrame {
                    node_seq: 0,
                    kind: Some(node_frame::Kind::Accepted(pb::Accepted {
                        container_id: format!("sim-{id}"),
                        warm: true,
                        attached: true,
                        start: pb::StartPath::WarmProcess as i32,
                    })),
                };
                if a.link.tx.send(Ok(accepted)).await.is_ok() {
                    out.reattach(a.link.tx, a.after_node_seq).await;
                    inbound = Some(a.link.inbound);
                    orphaned = None;
                }
                continue;
            }
            () = async {
                match orphaned {
                    Some(t) => tokio::time::sleep_until(t).await,
                    None => std::future::pending().await,
                }
            } => break,
            // The node stops: its runs go with it.
            () = state.stop.cancelled() => break,
            () = fenced.cancelled() => {
                out.send(exited(seq, true, "fenced")).await;
                break;
            }
            () = async {
                match hold {
                    Some(t) => tokio::time::sleep_until(t).await,
                    None => std::future::pending().await,
                }
            } => {
                out.send(exited(seq, false, "finished")).await;
                break;
            }
        };
        // The stream ended or failed: wait for a re-attach.
        let Some(frame) = frame else {
            inbound = None;
            continue;
        };
        if let Some(dispatcher_frame::Kind::Message(m)) = &frame.kind
            && !delivered.deliver(m.seq)
        {
            continue;
        }
        if !answer(frame, &mut seq, &mut out, &mut hold).await {
            break;
        }
    }
    state.unset(&id, epoch);
}

/// The last user message a run's agent has had. A dispatcher that dies
/// after sending a message, before it records the send, leaves its
/// successor to send it again; a node gives it to the agent once.
#[derive(Default)]
struct Delivered(i64);

impl Delivered {
    /// Whether the message at `seq` is new to the agent (and marks it
    /// delivered). Seq 0 (unnumbered) is always new.
    fn deliver(&mut self, seq: i64) -> bool {
        if seq > 0 && seq <= self.0 {
            return false;
        }
        self.0 = self.0.max(seq);
        true
    }
}

/// Answers one frame; false when the session ends.
async fn answer(
    frame: pb::DispatcherFrame,
    seq: &mut u64,
    out: &mut Out,
    hold: &mut Option<tokio::time::Instant>,
) -> bool {
    match frame.kind {
        Some(dispatcher_frame::Kind::Message(m)) => {
            let words: Vec<&str> = m.text.split_whitespace().collect();
            match (words.first().copied(), words.get(1), words.get(2)) {
                (Some("paced"), Some(n), Some(rate)) => {
                    let n: u64 = n.parse().unwrap_or(1);
                    let rate: f64 = rate.parse().unwrap_or(1000.0);
                    let bytes = words.get(3).and_then(|b| b.parse().ok()).unwrap_or(64);
                    paced(seq, out, n, rate, bytes).await;
                }
                (Some("hold"), Some(ms), _) => {
                    let ms = ms.parse().unwrap_or(0);
                    *hold = Some(tokio::time::Instant::now() + Duration::from_millis(ms));
                }
                (Some("events"), Some(n), bytes) => {
                    let n: u64 = n.parse().unwrap_or(1);
                    let bytes: usize = bytes.and_then(|b| b.parse().ok()).unwrap_or(64);
                    let text = filler(bytes);
                    for _ in 0..n {
                        let payload = serde_json::json!({ "text": text });
                        out.send(event(seq, "agent.message", payload, false)).await;
                        if out.tx.is_none() {
                            break;
                        }
                    }
                    out.send(event(seq, "agent.result", serde_json::json!({}), true))
                        .await;
                }
                _ => {
                    let payload = serde_json::json!({ "text": m.text });
                    out.send(event(seq, "agent.message", payload, false)).await;
                    out.send(event(seq, "agent.result", serde_json::json!({}), true))
                        .await;
                }
            }
        }
        Some(dispatcher_frame::Kind::Ack(a)) => out.ack(a.node_seq),
        Some(dispatcher_frame::Kind::Stop(_)) => {
            out.send(exited(*seq, true, "stopped")).await;
            return false;
        }
        _ => {}
    }
    true
}

/// Microseconds since this process first asked: the clock a paced event's
/// `sent_us` is read on, so a reader in the same process can time it.
pub fn clock_us() -> u64 {
    static EPOCH: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    u64::try_from(
        EPOCH
            .get_or_init(std::time::Instant::now)
            .elapsed()
            .as_micros(),
    )
    .unwrap_or(u64::MAX)
}

/// `n` events of `bytes` bytes at `rate` per second, each stamped when it
/// is handed to the stream, then the turn's end.
async fn paced(seq: &mut u64, out: &mut Out, n: u64, rate: f64, bytes: usize) {
    let text = filler(bytes);
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate.max(0.001)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    for _ in 0..n {
        tick.tick().await;
        let payload = serde_json::json!({ "text": text, "sent_us": clock_us() });
        out.send(event(seq, "agent.message", payload, false)).await;
        if out.tx.is_none() {
            break;
        }
    }
    out.send(event(seq, "agent.result", serde_json::json!({}), true))
        .await;
}

/// One agent line as a real node sends it: the line itself, and the event
/// made from it.
fn event(seq: &mut u64, kind: &str, payload: serde_json::Value, end: bool) -> pb::NodeFrame {
    *seq += 1;
    let raw = serde_json::json!({"type": "sim", "event": kind, "payload": &payload}).to_string();
    pb::NodeFrame {
        node_seq: *seq,
        kind: Some(node_frame::Kind::Line(pb::RuntimeLine {
            raw: raw.into_bytes(),
            events: vec![pb::RuntimeEvent {
                r#type: kind.into(),
                payload_json: payload.to_string(),
            }],
            turn_end: end.then(|| pb::TurnUsage {
                total: Some(pb::ModelUsage {
                    model: "sim".into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        })),
    }
}

fn exited(seq: u64, stopped: bool, reason: &str) -> pb::NodeFrame {
    pb::NodeFrame {
        node_seq: seq + 1,
        kind: Some(node_frame::Kind::Exited(pb::Exited {
            exit_code: 0,
            reason: reason.into(),
            stopped,
            ..Default::default()
        })),
    }
}

/// `len` pseudo-random letters, so nothing on the path compresses them away.
fn filler(len: usize) -> String {
    let mut rng = fastrand::Rng::new();
    (0..len).map(|_| rng.lowercase()).collect()
}
