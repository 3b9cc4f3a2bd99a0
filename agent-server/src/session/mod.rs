//! Runs one session: container, agent exec, stdin and stdout, exit.
//!
//! - [`start`]: the agent started the fastest way there is;
//! - the pump here: stdout lines out, commands in, until the agent ends or
//!   is stopped;
//! - [`finish`]: snapshot, write-back, the container removed, the exit.
//!
//! Invariants:
//! - the container is removed however the run ends (exit, crash, stop, a
//!   dropped dispatcher link, a fence, or this task being aborted);
//! - every stdout line becomes exactly one event, in order;
//! - output is never dropped for a slow dispatcher: sending blocks, which
//!   blocks reading stdout, which blocks the agent (backpressure).

mod checkpoints;
mod finish;
mod start;

use std::sync::Arc;

use bollard::container::LogOutput;
use futures::StreamExt;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;
use tracing::Instrument;

use crate::adapter;
use crate::container::ContainerRuntime;
use crate::lines::{Line, LineBuffer};
use crate::node::{Node, Slot};
use crate::spec::SessionSpec;

use checkpoints::Checkpoints;
use finish::Ended;
use start::{Started, start_label};

pub use berth_proto::node::v1::StartPath;

/// What the dispatcher asks of a running session.
#[derive(Debug)]
pub enum Command {
    /// A user message; `traceparent`: the dispatcher's span for its turn
    /// (empty: traces off).
    Message {
        text: String,
        traceparent: String,
    },
    Interrupt,
    /// The answer to the agent's tool permission request.
    ToolDecision(adapter::ToolDecision),
    /// Stop the agent; save a snapshot to `snapshot_key` first, if set.
    Stop {
        reason: String,
        snapshot_key: String,
        /// The node stops it on its own: no dispatcher re-attached in time.
        abandoned: bool,
    },
}

/// What the session reports back.
#[derive(Debug)]
pub enum Output {
    Accepted {
        container_id: String,
        /// How the agent started.
        start: StartPath,
    },
    Refused(String),
    /// One line the agent wrote, and its events.
    Line(AgentLine),
    /// A checkpoint was saved: key and compressed size.
    Checkpoint {
        key: String,
        bytes: u64,
    },
    Exited(Exit),
    /// The gateway attached a credential (reported at most once a minute).
    CredentialUse(crate::gateway::CredentialUse),
}

/// How the agent ended.
#[derive(Debug, Clone)]
pub struct Exit {
    /// The process's exit code; -1 when it had none (never started, killed).
    pub code: i64,
    pub reason: String,
    pub stderr_tail: String,
    /// The exit followed a stop request.
    pub stopped: bool,
    /// The snapshot saved on the way out: key and compressed size.
    pub snapshot: Option<(String, u64)>,
    pub snapshot_error: String,
    pub memory_errors: Vec<String>,
    /// The node ended the run itself, to drain.
    pub evicted: bool,
    /// The node ended the run itself: no dispatcher re-attached in time.
    pub abandoned: bool,
    /// The kernel killed the agent for want of memory.
    pub oom: bool,
}

impl Exit {
    fn failed(reason: impl Into<String>) -> Self {
        Self {
            code: -1,
            reason: reason.into(),
            stderr_tail: String::new(),
            stopped: false,
            snapshot: None,
            snapshot_error: String::new(),
            memory_errors: Vec::new(),
            evicted: false,
            abandoned: false,
            oom: false,
        }
    }
}

/// Bytes of stderr kept for the exit report.
const STDERR_TAIL_BYTES: usize = 4096;

/// Which run of which session, in which trace.
pub struct RunOf {
    pub session_id: String,
    pub epoch: i64,
    /// The dispatcher's placement span (empty: traces off).
    pub traceparent: String,
}

/// Runs a session to its end. `commands` closing means the dispatcher went away.
pub async fn run(
    node: Arc<Node>,
    of: RunOf,
    spec: SessionSpec,
    commands: mpsc::Receiver<Command>,
    out: mpsc::Sender<Output>,
) {
    let RunOf {
        session_id,
        epoch,
        traceparent,
    } = of;
    let span = tracing::info_span!(
        "session",
        otel.name = "node.session",
        session_id = %session_id,
        epoch,
        node = %node.cfg.node_id,
    );
    berth_common::traces::adopt(&span, Some(&traceparent));
    async move {
        let slot = match node.reserve(&session_id, epoch) {
            Ok(slot) => slot,
            Err(refusal) => {
                tracing::info!(%refusal, "refused start");
                metrics::counter!(crate::metrics::NODE_REFUSALS, "reason" => refusal.label())
                    .increment(1);
                let _ = out.send(Output::Refused(refusal.to_string())).await;
                return;
            }
        };
        let exit = run_in_slot(&node, &slot, &session_id, spec, commands, &out).await;
        tracing::info!(code = exit.code, reason = %exit.reason, "session ended");
        let _ = out.send(Output::Exited(exit)).await;
        drop(slot);
    }
    .instrument(span)
    .await
}

async fn run_in_slot(
    node: &Arc<Node>,
    slot: &Slot,
    session_id: &str,
    spec: SessionSpec,
    commands: mpsc::Receiver<Command>,
    out: &mpsc::Sender<Output>,
) -> Exit {
    let mut adapter = adapter::for_runtime(spec.agent.runtime);
    let gateway_port = node.gateway.is_some().then_some(node.cfg.gateway_port);
    let cmd = adapter.command(&spec, gateway_port);
    // Until a message comes, the gateway's spans join the run's.
    slot.trace
        .set(&berth_common::traces::current().unwrap_or_default());
    let starting = tracing::info_span!("agent.start", session_id = %session_id);
    let acquired = start::acquire(node, slot, session_id, &spec, &cmd, out)
        .instrument(starting)
        .await;
    let mut started = match acquired {
        Ok(s) => s,
        Err(exit) => return exit,
    };
    let (container_id, path) = (started.container_id.clone(), started.path);
    slot.lease.arm();
    tracing::debug!(%container_id, start = path.as_str_name(), "agent started");
    if path != StartPath::WarmProcess {
        node.pools
            .count_start(&spec.agent.image, path == StartPath::WarmContainer);
    }
    metrics::counter!(crate::metrics::NODE_STARTS, "start" => start_label(path)).increment(1);
    if out
        .send(Output::Accepted {
            container_id: container_id.clone(),
            start: path,
        })
        .await
        .is_err()
    {
        started.guard.remove().await;
        return Exit::failed("dispatcher went away before the session was accepted");
    }
    // A warm container takes the session's name once the starts in flight
    // have their first lines (a cold one was created with it): Docker's work
    // stays off the agent's first turn.
    // A run that ends first skips it.
    let rename = (path != StartPath::Cold).then(|| {
        let (node, id, session) = (node.clone(), container_id.clone(), session_id.to_string());
        let (ending, ended) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            tokio::select! {
                () = node.processes.starts_settled() => node.runtime.name_for_session(&id, &session).await,
                _ = ended => {}
            }
        });
        (task, ending)
    });
    let pump = Pump {
        node,
        slot,
        spec: &spec,
        out,
        container_id: &container_id,
    };
    let ended = pump.run(&mut *adapter, &mut started, commands).await;
    // Renamed (or given up) before the container goes.
    if let Some((rename, ending)) = rename {
        drop(ending);
        let _ = rename.await;
    }
    // A run frozen for want of confirmation is thawed to be stopped,
    // saved and removed.
    if !slot.lease.is_fenced() {
        thaw_to_end(&node.runtime, slot, &container_id).await;
    }
    finish::finish(node, slot, &spec, started, ended).await
}

/// A message goes to the agent in the trace it was sent in: the gateway's
/// spans join it from now on, and the span returned lasts until the
/// agent's next line (`agent.first_line`).
fn delivered(slot: &Slot, traceparent: &str) -> tracing::Span {
    slot.trace.set(traceparent);
    let span = tracing::info_span!("agent.first_line");
    berth_common::traces::adopt(&span, Some(traceparent));
    span
}

/// The running agent: its lines out, the dispatcher's commands in.
struct Pump<'a> {
    node: &'a Arc<Node>,
    slot: &'a Slot,
    spec: &'a SessionSpec,
    out: &'a mpsc::Sender<Output>,
    container_id: &'a str,
}

impl Pump<'_> {
    /// Runs until the agent ends, is stopped or killed, or the dispatcher's
    /// side is gone; says how.
    async fn run(
        &self,
        adapter: &mut dyn adapter::Adapter,
        started: &mut Started,
        mut commands: mpsc::Receiver<Command>,
    ) -> Ended {
        let (node, slot, spec, out) = (self.node, self.slot, self.spec, self.out);
        let container_id = self.container_id;
        let process = &mut started.process;
        // stdin has its own task so a full pipe never stalls reading stdout.
        let (stdin_tx, stdin_rx) = mpsc::channel::<Vec<u8>>(64);
        let input = std::mem::replace(&mut process.input, Box::pin(tokio::io::sink()));
        let stdin_task = tokio::spawn(write_stdin(input, stdin_rx));
        let mut stdin_tx = Some(stdin_tx);
        let output = &mut process.output;
        let mut lines = LineBuffer::new(node.cfg.max_line_bytes);
        // One handle for the run: no registry lookup per event.
        let events = metrics::counter!(crate::metrics::AGENT_EVENTS);
        let mut ended = Ended::default();
        let mut kill_at: Option<tokio::time::Instant> = None;
        let mut checkpoints = Checkpoints::new(node.cfg.checkpoint_interval);
        let epoch = slot.epoch();
        // Open from a message's delivery until the agent writes a line.
        let mut first_line: Option<(tracing::Span, std::time::Instant)> = None;
        let answer_time = metrics::histogram!(crate::metrics::AGENT_FIRST_LINE);
        loop {
            tokio::select! {
                chunk = output.next() => match chunk {
                    Some(Ok(LogOutput::StdOut { message } | LogOutput::Console { message })) => {
                        // The agent is up: the pool's refills go on.
                        started.in_flight = None;
                        if let Some((_, delivered)) = first_line.take() {
                            answer_time.record(delivered.elapsed().as_secs_f64());
                        }
                        for line in lines.push(&message) {
                            match emit(out, adapter, &events, line).await {
                                Some(true) => checkpoints.turn_ended(node, spec, epoch, container_id, out),
                                Some(false) => {}
                                None => {
                                    ended.stop_reason.get_or_insert_with(|| "dispatcher link lost".into());
                                    ended.killed = true;
                                }
                            }
                        }
                        if ended.killed { break; }
                    }
                    Some(Ok(LogOutput::StdErr { message })) => {
                        ended.stderr_tail.extend_from_slice(&message);
                        if ended.stderr_tail.len() > STDERR_TAIL_BYTES {
                            ended.stderr_tail.drain(..ended.stderr_tail.len() - STDERR_TAIL_BYTES);
                        }
                    }
                    Some(Ok(LogOutput::StdIn { .. })) => {}
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "agent output stream failed");
                        break;
                    }
                    None => break,
                },
                cmd = commands.recv(), if ended.stop_reason.is_none() => {
                    let bytes = match cmd {
                        Some(Command::Message { text, traceparent }) => {
                            first_line.get_or_insert_with(|| {
                                (delivered(slot, &traceparent), std::time::Instant::now())
                            });
                            Some(adapter.encode_message(&text))
                        }
                        Some(Command::Interrupt) => Some(adapter.encode_interrupt()),
                        Some(Command::ToolDecision(d)) => match adapter.encode_tool_decision(&d) {
                            Some(b) => Some(b),
                            None => {
                                // Answered before (a re-attach sends it again) or withdrawn.
                                tracing::debug!(request_id = %d.request_id, "no such pending permission request; answer dropped");
                                continue;
                            }
                        },
                        Some(Command::Stop { reason, snapshot_key: key, abandoned: a }) => {
                            ended.stop_reason = Some(reason);
                            ended.snapshot_key = key;
                            ended.abandoned = a;
                            if a {
                                // No dispatcher: thawed, so it can stop and be saved.
                                thaw_to_end(&node.runtime, slot, container_id).await;
                            }
                            None
                        }
                        None => { ended.stop_reason = Some("dispatcher link lost".into()); None }
                    };
                    match (bytes, &stdin_tx) {
                        (Some(b), Some(tx)) => { let _ = tx.send(b).await; }
                        _ => {
                            // Closing stdin asks the agent to finish; the grace period bounds it.
                            stdin_tx = None;
                            kill_at = Some(tokio::time::Instant::now() + node.cfg.stop_grace);
                        }
                    }
                },
                // The node is draining and its deadline passed: end the run
                // with a snapshot, so the session resumes on another node.
                () = slot.evict.cancelled(), if ended.stop_reason.is_none() => {
                    tracing::info!(key = %spec.evict_snapshot_key, "drain deadline passed; stopping the agent to move the session");
                    ended.stop_reason = Some("node draining: session moved to another node".into());
                    ended.snapshot_key = spec.evict_snapshot_key.clone();
                    ended.evicted = true;
                    stdin_tx = None;
                    kill_at = Some(tokio::time::Instant::now() + node.cfg.stop_grace);
                }
                _ = sleep_until(kill_at) => {
                    tracing::info!("agent did not exit within the stop grace period; killing its container");
                    ended.killed = true;
                    break;
                }
                _ = slot.cancel.cancelled() => {
                    ended.stop_reason.get_or_insert_with(|| "node shutting down or session fenced".into());
                    ended.killed = true;
                    break;
                }
            }
        }
        if !ended.killed
            && let Some(line) = lines.finish()
        {
            emit(out, adapter, &events, line).await;
        }
        checkpoints.finish().await;
        drop(stdin_tx);
        stdin_task.abort();
        let _ = stdin_task.await;
        ended
    }
}

/// Ends the run's lease (it reaches nothing more, and is never frozen
/// again) and thaws its container if the freezer had paused it.
async fn thaw_to_end(runtime: &ContainerRuntime, slot: &Slot, container_id: &str) {
    slot.lease.end();
    if slot.lease.is_frozen() {
        runtime.unpause(container_id).await;
        slot.lease.set_frozen(false);
    }
}

/// Bytes a line and its events may take in one frame: the gRPC limit,
/// less room for the frame's other fields.
const FRAME_BUDGET: usize = berth_common::grpc::MAX_MESSAGE_BYTES - 256 * 1024;

/// A line the agent wrote, verbatim, with what it decoded to.
#[derive(Debug)]
pub struct AgentLine {
    pub raw: Vec<u8>,
    pub decoded: adapter::Decoded,
    /// The line was cut short: `raw` is its prefix, this its length.
    pub total_bytes: Option<u64>,
}

/// Decodes and sends one line: `Some(whether it ended a turn)`, `None`
/// when the run's output is gone.
async fn emit(
    out: &mpsc::Sender<Output>,
    adapter: &mut dyn adapter::Adapter,
    events: &metrics::Counter,
    line: Line,
) -> Option<bool> {
    let line = match line {
        Line::Whole(raw) => {
            let mut decoded = adapter.decode(&raw);
            decoded.fit(raw.len(), FRAME_BUDGET);
            AgentLine {
                decoded,
                raw,
                total_bytes: None,
            }
        }
        // Too long to decode: kept as far as it goes, with its length.
        Line::Truncated {
            prefix,
            total_bytes,
        } => AgentLine {
            raw: prefix,
            decoded: adapter::Decoded::truncated(total_bytes as u64),
            total_bytes: Some(total_bytes as u64),
        },
    };
    events.increment(line.decoded.events.len() as u64);
    let turn_end = line.decoded.turn_end.is_some();
    out.send(Output::Line(line)).await.ok().map(|()| turn_end)
}

async fn write_stdin(
    mut input: std::pin::Pin<Box<dyn tokio::io::AsyncWrite + Send>>,
    mut rx: mpsc::Receiver<Vec<u8>>,
) {
    while let Some(bytes) = rx.recv().await {
        if let Err(e) = async {
            input.write_all(&bytes).await?;
            input.flush().await
        }
        .await
        {
            tracing::debug!(error = %e, "agent stdin closed");
            return;
        }
    }
    let _ = input.shutdown().await;
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending::<()>().await,
    }
}
