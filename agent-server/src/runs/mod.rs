//! Runs and the dispatcher streams attached to them.
//!
//! A run outlives its dispatcher's stream. Every frame it produces is kept
//! in a journal until the dispatcher acknowledges that it has persisted it
//! (`Ack`). The journal is bounded (`--journal-bytes`): when it is full the
//! run stops reading the agent's output (backpressure) rather than drop
//! anything. When the stream drops, the agent goes on for
//! `--reattach-grace`: the session's next owner re-attaches at a newer
//! epoch (`Start { attach }`), is sent again every frame after the one it
//! last persisted, and the run goes on. With no re-attach in time, the run
//! is stopped with a snapshot, like an evicted one.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use berth_common::sync::lock;
use berth_proto::node::v1 as pb;
use prost::Message;
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::Status;

use crate::session::{Command, Output};

/// Longest a frame waits for room in a dispatcher stream before the stream
/// counts as lost.
const SEND_TIMEOUT: Duration = Duration::from_secs(30);

/// Frames toward one dispatcher stream.
pub type FrameTx = mpsc::Sender<Result<pb::NodeFrame, Status>>;

/// The runs of this node, by session id.
pub struct Runs {
    map: Mutex<HashMap<String, Arc<Run>>>,
    cfg: JournalConfig,
    /// The runs' pumps, replays and grace timers (the node awaits them at
    /// shutdown).
    tasks: TaskTracker,
    /// Cancelled when the node stops: a grace timer ends at once.
    stop: CancellationToken,
}

/// How a run keeps its frames while no dispatcher listens.
#[derive(Debug, Clone, Copy)]
pub struct JournalConfig {
    /// Most bytes of unacknowledged frames kept before the agent's output
    /// is no longer read.
    pub max_bytes: usize,
    /// How long the agent goes on with no dispatcher attached.
    pub grace: Duration,
}

/// One run of a session on this node.
pub struct Run {
    pub session_id: String,
    /// Into the run: messages, interrupts, stop.
    pub commands: mpsc::Sender<Command>,
    state: Mutex<State>,
    /// The attached stream; held while sending, so a re-attach's replay and
    /// new frames never interleave out of order.
    link: Arc<tokio::sync::Mutex<Option<(u64, FrameTx)>>>,
    /// Wakes the pump when an ack makes room.
    room: Notify,
    cfg: JournalConfig,
    /// Where the run saves its snapshot when no dispatcher re-attaches.
    evict_snapshot_key: String,
    /// Its credentials, which the dispatcher refreshes.
    pub credentials: crate::spec::CredentialBook,
}

struct State {
    epoch: i64,
    /// Frames not yet acknowledged, in node_seq order, with their size.
    journal: VecDeque<(u64, pb::NodeFrame, usize)>,
    bytes: usize,
    /// Bumped by every attach; a detach names the stream it is about.
    generation: u64,
    attached: bool,
    /// Highest user-message seq handed to the agent: a re-attached owner
    /// may send again a message the lost one already delivered.
    input_seq: i64,
    /// The agent has exited (the journal ends with its exit).
    finished: bool,
    /// The answer to a re-attach: the run's container.
    container_id: String,
    /// How its agent started (`pb::StartPath`).
    start: i32,
}

impl Runs {
    /// Runs whose tasks go on `tasks`; a grace timer ends when `stop` is
    /// cancelled.
    pub fn new(cfg: JournalConfig, tasks: TaskTracker, stop: CancellationToken) -> Self {
        Self {
            map: Mutex::default(),
            cfg,
            tasks,
            stop,
        }
    }

    fn get(&self, session_id: &str) -> Option<Arc<Run>> {
        lock(&self.map).get(session_id).cloned()
    }

    /// A new run attached to `link`: starts its pump over `outputs`. It is
    /// listed (replacing an older run of the session) once accepted.
    pub fn start(
        self: &Arc<Self>,
        session_id: &str,
        epoch: i64,
        link: FrameTx,
        (commands, outputs): (mpsc::Sender<Command>, mpsc::Receiver<Output>),
        kept: Kept,
    ) -> Arc<Run> {
        let Kept {
            evict_snapshot_key,
            credentials,
        } = kept;
        let run = Arc::new(Run {
            session_id: session_id.to_string(),
            commands,
            state: Mutex::new(State {
                epoch,
                journal: VecDeque::new(),
                bytes: 0,
                generation: 0,
                attached: true,
                input_seq: 0,
                finished: false,
                container_id: String::new(),
                start: 0,
            }),
            link: Arc::new(tokio::sync::Mutex::new(Some((0, link)))),
            room: Notify::new(),
            credentials,
            cfg: self.cfg,
            evict_snapshot_key,
        });
        // Listed once the node accepts it (a refused start never runs).
        self.tasks.spawn(pump(self.clone(), run.clone(), outputs));
        run
    }

    /// Re-attaches `link` to the run of `session_id` at `epoch`: answers
    /// `Accepted { attached }` and sends every journaled frame after
    /// `after_node_seq`. Returns the run and the stream's generation, or
    /// why not.
    pub async fn attach(
        self: &Arc<Self>,
        session_id: &str,
        epoch: i64,
        after_node_seq: u64,
        link: FrameTx,
    ) -> Result<(Arc<Run>, u64), String> {
        let run = self
            .get(session_id)
            .ok_or_else(|| "this node has no run of the session to attach to".to_string())?;
        // Hold the link while taking over, so no new frame slips between
        // the replay and the frames after it.
        let current = run.link.clone().lock_owned().await;
        let (generation, replay, accepted) = {
            let mut st = lock(&run.state);
            if epoch <= st.epoch {
                return Err(format!(
                    "the run here is at epoch {}, not older than {epoch}",
                    st.epoch
                ));
            }
            st.epoch = epoch;
            st.generation += 1;
            st.attached = true;
            // What the new owner has persisted is acknowledged.
            ack_locked(&mut st, after_node_seq);
            // (The run's own `Accepted` is answered by the one below.)
            let replay: Vec<pb::NodeFrame> = st
                .journal
                .iter()
                .filter(|(_, f, _)| !matches!(f.kind, Some(pb::node_frame::Kind::Accepted(_))))
                .map(|(_, f, _)| f.clone())
                .collect();
            let accepted = pb::Accepted {
                container_id: st.container_id.clone(),
                warm: st.start != pb::StartPath::Cold as i32,
                attached: true,
                start: st.start,
            };
            (st.generation, replay, accepted)
        };
        run.room.notify_one();
        tracing::info!(
            session_id,
            epoch,
            after_node_seq,
            replay = replay.len(),
            "a dispatcher re-attached to the run"
        );
        // The replay may be larger than the stream's buffer, and the stream
        // is read only once this call returns: send it from a task, which
        // holds the link until the replay is out.
        let (task_run, runs) = (run.clone(), self.clone());
        self.tasks.spawn(async move {
            let mut current = current;
            let first = pb::NodeFrame {
                node_seq: 0,
                kind: Some(pb::node_frame::Kind::Accepted(accepted)),
            };
            for f in std::iter::once(first).chain(replay) {
                if link.send(Ok(f)).await.is_err() {
                    *current = None;
                    drop(current);
                    task_run.detach(&runs, generation);
                    return;
                }
            }
            *current = Some((generation, link));
        });
        Ok((run, generation))
    }

    fn remove(&self, run: &Arc<Run>) {
        let mut map = lock(&self.map);
        if map
            .get(&run.session_id)
            .is_some_and(|r| Arc::ptr_eq(r, run))
        {
            map.remove(&run.session_id);
        }
    }
}

impl Run {
    /// The epoch the run is at now (a re-attach moves it forward).
    pub fn epoch(&self) -> i64 {
        lock(&self.state).epoch
    }

    /// Whether a user message with `seq` is new to the agent (and marks it
    /// delivered). Seq 0 (unnumbered) is always new.
    pub fn deliver(&self, seq: i64) -> bool {
        let mut st = lock(&self.state);
        if seq > 0 && seq <= st.input_seq {
            return false;
        }
        st.input_seq = st.input_seq.max(seq);
        true
    }

    /// The dispatcher persisted every frame up to `node_seq`.
    pub fn ack(self: &Arc<Self>, runs: &Arc<Runs>, node_seq: u64) {
        let done = {
            let mut st = lock(&self.state);
            ack_locked(&mut st, node_seq);
            st.finished && st.journal.is_empty()
        };
        self.room.notify_one();
        if done {
            runs.remove(self);
        }
    }

    /// The stream of `generation` ended. Unless another has attached
    /// since, the run waits `grace` for one, then stops with a snapshot
    /// (or, already finished, is forgotten).
    pub fn detach(self: &Arc<Self>, runs: &Arc<Runs>, generation: u64) {
        {
            let mut st = lock(&self.state);
            if st.generation != generation || !st.attached {
                return;
            }
            st.attached = false;
        }
        tracing::warn!(session_id = %self.session_id, grace = ?self.cfg.grace, "dispatcher stream lost; the agent goes on until one re-attaches");
        let (run, runs) = (self.clone(), runs.clone());
        runs.clone().tasks.spawn(async move {
            tokio::select! {
                () = tokio::time::sleep(run.cfg.grace) => {}
                // The node is stopping: it stops its sessions itself.
                () = runs.stop.cancelled() => return,
            }
            let (still, finished) = {
                let st = lock(&run.state);
                (st.generation == generation && !st.attached, st.finished)
            };
            if !still {
                return;
            }
            if finished {
                runs.remove(&run);
                return;
            }
            tracing::warn!(session_id = %run.session_id, "no dispatcher re-attached in time; stopping the agent with a snapshot");
            let _ = run
                .commands
                .send(Command::Stop {
                    reason: "no dispatcher re-attached within the grace period".into(),
                    snapshot_key: run.evict_snapshot_key.clone(),
                    abandoned: true,
                })
                .await;
        });
    }
}

fn ack_locked(st: &mut State, node_seq: u64) {
    while st
        .journal
        .front()
        .is_some_and(|(seq, _, _)| *seq <= node_seq)
    {
        if let Some((_, _, size)) = st.journal.pop_front() {
            st.bytes -= size;
        }
    }
}

/// Numbers the run's outputs, journals them, and sends them to whichever
/// stream is attached.
async fn pump(runs: Arc<Runs>, run: Arc<Run>, mut outputs: mpsc::Receiver<Output>) {
    let mut node_seq = 0;
    while let Some(output) = outputs.recv().await {
        node_seq += 1;
        let frame = frame(node_seq, output);
        let size = frame.encoded_len();
        // Room in the journal, or wait for an ack (backpressure).
        loop {
            let room = run.room.notified();
            {
                let st = lock(&run.state);
                if st.journal.is_empty() || st.bytes + size <= run.cfg.max_bytes {
                    break;
                }
            }
            room.await;
        }
        // A refused start never ran: nothing to re-attach to.
        let refused = matches!(frame.kind, Some(pb::node_frame::Kind::Refused(_)));
        {
            let mut st = lock(&run.state);
            match &frame.kind {
                Some(pb::node_frame::Kind::Exited(_)) => st.finished = true,
                Some(pb::node_frame::Kind::Accepted(a)) => {
                    st.container_id = a.container_id.clone();
                    st.start = a.start;
                    lock(&runs.map).insert(run.session_id.clone(), run.clone());
                }
                _ => {}
            }
            if !refused {
                st.journal.push_back((node_seq, frame.clone(), size));
                st.bytes += size;
            }
        }
        if refused {
            runs.remove(&run);
        }
        let mut link = run.link.lock().await;
        // A stream nobody reads for this long is as good as gone (the frame
        // stays journaled for whoever re-attaches).
        if let Some((generation, tx)) = link.as_ref()
            && !matches!(
                tokio::time::timeout(SEND_TIMEOUT, tx.send(Ok(frame))).await,
                Ok(Ok(()))
            )
        {
            let generation = *generation;
            *link = None;
            drop(link);
            run.detach(&runs, generation);
        }
    }
    // The agent is done and its exit sent (or journaled): nothing more
    // goes out, so the stream ends. The run stays until its exit is
    // acknowledged, or the grace after its stream dropped passes.
    *run.link.lock().await = None;
    let acked = {
        let mut st = lock(&run.state);
        st.finished = true;
        st.journal.is_empty()
    };
    if acked {
        runs.remove(&run);
    }
}

/// What a run keeps of its spec.
#[derive(Debug, Default)]
pub struct Kept {
    /// Where it saves its snapshot when no dispatcher re-attaches.
    pub evict_snapshot_key: String,
    /// Its credentials, which the dispatcher refreshes.
    pub credentials: crate::spec::CredentialBook,
}

/// One output of a run as the frame numbered `node_seq`.
fn frame(node_seq: u64, output: Output) -> pb::NodeFrame {
    let kind = match output {
        Output::Accepted {
            container_id,
            start,
        } => pb::node_frame::Kind::Accepted(pb::Accepted {
            container_id,
            warm: start != pb::StartPath::Cold,
            attached: false,
            start: start as i32,
        }),
        Output::Refused(reason) => pb::node_frame::Kind::Refused(pb::Refused { reason }),
        Output::Line(l) => pb::node_frame::Kind::Line(pb::RuntimeLine {
            raw: l.raw,
            events: l
                .decoded
                .events
                .into_iter()
                .map(|b| pb::RuntimeEvent {
                    r#type: b.kind.to_string(),
                    payload_json: b.payload,
                })
                .collect(),
            turn_end: l.decoded.turn_end.map(pb::TurnUsage::from),
            runtime_session_id: l.decoded.runtime_session_id.unwrap_or_default(),
            truncated: l.total_bytes.is_some(),
            total_bytes: l.total_bytes.unwrap_or(0),
        }),
        Output::Checkpoint { key, bytes } => pb::node_frame::Kind::Checkpoint(pb::Checkpoint {
            snapshot_key: key,
            snapshot_bytes: i64::try_from(bytes).unwrap_or(i64::MAX),
        }),
        Output::CredentialUse(u) => pb::node_frame::Kind::CredentialUse(pb::CredentialUse {
            credential_id: u.credential_id,
            host: u.host,
            requests: u.requests,
            rejected: u.rejected,
        }),
        Output::Exited(x) => pb::node_frame::Kind::Exited(pb::Exited {
            exit_code: x.code,
            reason: x.reason,
            stderr_tail: x.stderr_tail,
            stopped: x.stopped,
            snapshot_key: x.snapshot.as_ref().map(|s| s.0.clone()).unwrap_or_default(),
            snapshot_bytes: x.snapshot.as_ref().map_or(0, |s| s.1 as i64),
            snapshot_error: x.snapshot_error,
            memory_errors: x.memory_errors,
            evicted: x.evicted,
            abandoned: x.abandoned,
            oom: x.oom,
        }),
    };
    pb::NodeFrame {
        node_seq,
        kind: Some(kind),
    }
}

#[cfg(test)]
mod tests;
