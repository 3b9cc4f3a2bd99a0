//! Runs one session: container, agent exec, stdin and stdout, exit.
//!
//! Invariants:
//! - the container is removed however the run ends (exit, crash, stop, a
//!   dropped dispatcher link, a fence, or this task being aborted);
//! - every stdout line becomes exactly one event, in order;
//! - output is never dropped for a slow dispatcher: sending blocks, which
//!   blocks reading stdout, which blocks the agent (backpressure).

use std::sync::Arc;

use bollard::container::LogOutput;
use futures::StreamExt;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;
use tracing::Instrument;

use crate::adapter;
use crate::container::{ContainerRuntime, Purpose};
use crate::lines::{Line, LineBuffer};
use crate::node::{Node, Slot};
use crate::spec::SessionSpec;

pub use berth_proto::node::v1::StartPath;

/// What the dispatcher asks of a running session.
#[derive(Debug)]
pub enum Command {
    Message(String),
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

/// Removes the container when dropped, even if the run is aborted.
struct ContainerGuard {
    runtime: ContainerRuntime,
    id: Option<String>,
}

impl ContainerGuard {
    async fn remove(mut self) {
        if let Some(id) = self.id.take() {
            self.runtime.remove(&id).await;
        }
    }
}

impl Drop for ContainerGuard {
    fn drop(&mut self) {
        if let Some(id) = self.id.take() {
            let runtime = self.runtime.clone();
            if let Ok(handle) = tokio::runtime::Handle::try_current() {
                handle.spawn(async move { runtime.remove(&id).await });
            }
        }
    }
}

/// Runs a session to its end. `commands` closing means the dispatcher went away.
pub async fn run(
    node: Arc<Node>,
    session_id: String,
    epoch: i64,
    spec: SessionSpec,
    commands: mpsc::Receiver<Command>,
    out: mpsc::Sender<Output>,
) {
    let span = tracing::info_span!("session", session_id = %session_id, epoch);
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
    mut commands: mpsc::Receiver<Command>,
    out: &mpsc::Sender<Output>,
) -> Exit {
    let runtime = node.runtime.clone();
    let mut adapter = adapter::for_runtime(spec.agent.runtime);
    let cmd = adapter.command(&spec);
    // Fastest first: a pre-started agent process (a pop and one liveness
    // check); then a warm container (a pop, then the launch); then cold. A
    // claimed process or container that died falls through to the next.
    let mut pre_started = match node.agents.claim(&spec).map(still_running) {
        Some(Ok(w)) => Some(w),
        Some(Err(w)) => {
            tracing::warn!(container_id = %w.id, "pre-started agent process is gone; starting another way");
            node.agents.claimed_dead();
            runtime.remove(&w.id).await;
            None
        }
        None => None,
    };
    let mut claimed = if pre_started.is_some() {
        None
    } else {
        node.pools.claim(&spec.agent.image)
    };
    let (container_id, guard, process, path, _gate) = loop {
        if let Some(w) = pre_started.take() {
            node.set_container(slot, &w.id);
            let guard = ContainerGuard {
                runtime: runtime.clone(),
                id: Some(w.id.clone()),
            };
            // Its limits and skills went in before it started (they are
            // the agent's); the session's gate opens now.
            match serve_gate(node, slot, session_id, &spec, &w.id) {
                Ok(gate) => break (w.id, guard, w.process, StartPath::WarmProcess, gate),
                Err(e) => {
                    guard.remove().await;
                    return Exit::failed(e);
                }
            }
        }
        let warm = claimed.is_some();
        let mut launcher = None;
        let id = match claimed.take() {
            Some(c) => {
                launcher = c.launcher;
                c.id
            }
            None => match runtime
                .start_container(&spec.agent.image, Purpose::Session(session_id))
                .await
            {
                Ok(id) => id,
                Err(e) => return Exit::failed(format!("container did not start: {e}")),
            },
        };
        node.set_container(slot, &id);
        let guard = ContainerGuard {
            runtime: runtime.clone(),
            id: Some(id.clone()),
        };
        // The session's own limits, then its resources: all before the agent
        // runs, and a failure removes the container (never half-prepared).
        let prepared = async {
            if !spec.agent.limits.is_default() {
                runtime
                    .update_limits(&id, &spec.agent.limits)
                    .await
                    .map_err(|e| e.to_string())?;
            }
            crate::workspace::prepare(&runtime, &node.objects, &node.workspace, &id, &spec).await
        };
        let prepared =
            crate::metrics::timed(metrics::histogram!(crate::metrics::PREPARE), prepared).await;
        if let Err(reason) = prepared {
            guard.remove().await;
            tracing::info!(%reason, "session preparation failed");
            return Exit::failed(format!("preparing the session failed: {reason}"));
        }
        let gate = match serve_gate(node, slot, session_id, &spec, &id) {
            Ok(g) => g,
            Err(e) => {
                guard.remove().await;
                return Exit::failed(e);
            }
        };
        let env = crate::env::agent_env(
            &spec,
            &node.cfg.home,
            gate.is_some().then_some(node.cfg.gateway_port),
        );
        // A warm container's launcher starts the agent with one write; else
        // (none, gone, or a command it cannot carry) a Docker exec.
        let launched = match launcher {
            Some(l) => runtime
                .launch(l, &cmd, &env)
                .await
                .inspect_err(|e| tracing::debug!(error = %e, "launcher unusable; exec instead"))
                .ok(),
            None => None,
        };
        let started = match launched {
            Some(p) => Ok(p),
            None => runtime.exec_agent(&id, cmd.clone(), env).await,
        };
        match started {
            Ok(p) => {
                let path = if warm {
                    StartPath::WarmContainer
                } else {
                    StartPath::Cold
                };
                break (id, guard, p, path, gate);
            }
            Err(e) if warm => {
                tracing::warn!(container_id = %id, error = %e, "warm container failed at exec; starting cold");
                node.pools.claimed_dead(&spec.agent.image);
                guard.remove().await;
            }
            Err(e) => {
                guard.remove().await;
                return Exit::failed(format!("agent did not start: {e}"));
            }
        }
    };
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
        guard.remove().await;
        return Exit::failed("dispatcher went away before the session was accepted");
    }

    // A warm container takes the session's name now, off the first
    // event's path (a cold one was created with it).
    if path != StartPath::Cold {
        let (runtime, id, session) = (
            runtime.clone(),
            container_id.clone(),
            session_id.to_string(),
        );
        tokio::spawn(async move { runtime.name_for_session(&id, &session).await });
    }
    // stdin has its own task so a full pipe never stalls reading stdout.
    let (stdin_tx, stdin_rx) = mpsc::channel::<Vec<u8>>(64);
    let stdin_task = tokio::spawn(write_stdin(process.input, stdin_rx));
    let mut stdin_tx = Some(stdin_tx);
    let mut output = process.output;
    let mut lines = LineBuffer::new(node.cfg.max_line_bytes);
    // One handle for the run: no registry lookup per event.
    let events = metrics::counter!(crate::metrics::AGENT_EVENTS);
    let mut stderr_tail: Vec<u8> = Vec::new();
    let mut stop_reason: Option<String> = None;
    let mut snapshot_key = String::new();
    let mut kill_at: Option<tokio::time::Instant> = None;
    let mut killed = false;
    let mut evicted = false;
    let mut abandoned = false;
    let mut checkpoints = Checkpoints::new(node.cfg.checkpoint_interval);
    let epoch = slot.epoch();

    loop {
        tokio::select! {
            chunk = output.next() => match chunk {
                Some(Ok(LogOutput::StdOut { message } | LogOutput::Console { message })) => {
                    for line in lines.push(&message) {
                        match emit(out, &mut *adapter, &events, line).await {
                            Some(true) => checkpoints.turn_ended(node, &spec, epoch, &container_id, out),
                            Some(false) => {}
                            None => {
                                stop_reason.get_or_insert_with(|| "dispatcher link lost".into());
                                killed = true;
                            }
                        }
                    }
                    if killed { break; }
                }
                Some(Ok(LogOutput::StdErr { message })) => {
                    stderr_tail.extend_from_slice(&message);
                    if stderr_tail.len() > STDERR_TAIL_BYTES {
                        stderr_tail.drain(..stderr_tail.len() - STDERR_TAIL_BYTES);
                    }
                }
                Some(Ok(LogOutput::StdIn { .. })) => {}
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "agent output stream failed");
                    break;
                }
                None => break,
            },
            cmd = commands.recv(), if stop_reason.is_none() => {
                let bytes = match cmd {
                    Some(Command::Message(text)) => Some(adapter.encode_message(&text)),
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
                        stop_reason = Some(reason);
                        snapshot_key = key;
                        abandoned = a;
                        if a {
                            // No dispatcher: thawed, so it can stop and be saved.
                            thaw_to_end(&runtime, slot, &container_id).await;
                        }
                        None
                    }
                    None => { stop_reason = Some("dispatcher link lost".into()); None }
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
            () = slot.evict.cancelled(), if stop_reason.is_none() => {
                tracing::info!(key = %spec.evict_snapshot_key, "drain deadline passed; stopping the agent to move the session");
                stop_reason = Some("node draining: session moved to another node".into());
                snapshot_key = spec.evict_snapshot_key.clone();
                evicted = true;
                stdin_tx = None;
                kill_at = Some(tokio::time::Instant::now() + node.cfg.stop_grace);
            }
            _ = sleep_until(kill_at) => {
                tracing::info!("agent did not exit within the stop grace period; killing its container");
                killed = true;
                break;
            }
            _ = slot.cancel.cancelled() => {
                stop_reason.get_or_insert_with(|| "node shutting down or session fenced".into());
                killed = true;
                break;
            }
        }
    }
    // A run frozen for want of confirmation is thawed to be stopped,
    // saved and removed.
    if !slot.lease.is_fenced() {
        thaw_to_end(&runtime, slot, &container_id).await;
    }
    if !killed && let Some(line) = lines.finish() {
        emit(out, &mut *adapter, &events, line).await;
    }
    checkpoints.finish().await;
    drop(stdin_tx);
    stdin_task.abort();
    let code = if killed {
        None
    } else {
        runtime.exit_code(&process.exec_id).await
    };
    // Killed by SIGKILL with no stop asked: the kernel's OOM killer, if the
    // container's memory cgroup counted a kill.
    let oom = code == Some(137)
        && stop_reason.is_none()
        && runtime
            .oom_kills(&container_id)
            .await
            .is_some_and(|n| n > 0);
    // A fenced run's session lives on elsewhere: nothing of this run is
    // saved over what the newer one keeps.
    let fenced = slot.lease.is_fenced();
    if fenced {
        tracing::warn!("run fenced: removing its container without a snapshot or write-back");
        guard.remove().await;
        return Exit {
            code: code.unwrap_or(-1),
            reason: "stopped: superseded by a newer run of the session".into(),
            stderr_tail: String::from_utf8_lossy(&stderr_tail).into_owned(),
            stopped: true,
            ..Exit::failed("")
        };
    }
    // Save what the run asked to keep while the container still exists.
    let mut snapshot = None;
    let mut snapshot_error = String::new();
    if !snapshot_key.is_empty() {
        let started = std::time::Instant::now();
        let saved = crate::workspace::snapshot(
            &runtime,
            &node.objects,
            &node.workspace,
            &container_id,
            &snapshot_key,
        )
        .await;
        let result = if saved.is_ok() { "ok" } else { "error" };
        metrics::histogram!(crate::metrics::SNAPSHOT, "result" => result)
            .record(started.elapsed().as_secs_f64());
        match saved {
            Ok(bytes) => {
                tracing::info!(key = %snapshot_key, bytes, "snapshot saved");
                metrics::histogram!(crate::metrics::SNAPSHOT_BYTES).record(bytes as f64);
                snapshot = Some((snapshot_key.clone(), bytes));
            }
            Err(e) => {
                tracing::warn!(key = %snapshot_key, error = %e, "snapshot failed");
                snapshot_error = e;
            }
        }
    }
    let memory_errors = crate::workspace::write_back_memory(
        &runtime,
        &node.objects,
        &node.workspace,
        &container_id,
        &spec,
    )
    .await;
    for e in &memory_errors {
        tracing::warn!(error = %e, "memory store write-back failed");
    }
    guard.remove().await;

    let stopped = stop_reason.is_some();
    let reason = match (&stop_reason, code) {
        _ if oom => "oom: the agent ran out of memory (the container's memory limit)".to_string(),
        (Some(r), _) => format!("stopped: {r}"),
        (None, Some(0)) => "agent exited".to_string(),
        (None, Some(c)) => format!("agent exited with code {c}"),
        (None, None) => "agent ended without an exit code".to_string(),
    };
    Exit {
        code: code.unwrap_or(-1),
        reason,
        stderr_tail: String::from_utf8_lossy(&stderr_tail).into_owned(),
        stopped,
        snapshot,
        snapshot_error,
        memory_errors,
        evicted,
        abandoned,
        oom,
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

/// Whether a pre-started process still runs, without a Docker call: its
/// output stream has ended when it exited (the sweep finds the rest). Output
/// it wrote while waiting stays first in the stream.
fn still_running(
    mut w: crate::pool::WarmProcess,
) -> Result<crate::pool::WarmProcess, crate::pool::WarmProcess> {
    use futures::FutureExt;
    match w.process.output.next().now_or_never() {
        None => Ok(w),
        Some(None | Some(Err(_))) => Err(w),
        Some(Some(Ok(chunk))) => {
            let rest = std::mem::replace(&mut w.process.output, Box::pin(futures::stream::empty()));
            w.process.output =
                Box::pin(futures::stream::once(async move { Ok(chunk) }).chain(rest));
            Ok(w)
        }
    }
}

/// The `start` label of `path`.
fn start_label(path: StartPath) -> &'static str {
    match path {
        StartPath::WarmProcess => "warm_process",
        StartPath::WarmContainer => "warm_container",
        StartPath::Cold | StartPath::Unspecified => "cold",
    }
}

/// The gateway serves this session on the container's socket for as long
/// as the run lasts (the guard), with its policy and its key.
fn serve_gate(
    node: &Node,
    slot: &Slot,
    session_id: &str,
    spec: &SessionSpec,
    container_id: &str,
) -> Result<Option<crate::gateway::GateGuard>, String> {
    let (Some(gw), Some(dir)) = (&node.gateway, node.runtime.gateway_dir(container_id)) else {
        return Ok(None);
    };
    let gate = crate::gateway::SessionGate {
        session_id: session_id.to_string(),
        egress: spec.agent.egress.clone(),
        api_key: spec.secrets.anthropic_api_key.clone(),
        lease: Some(slot.lease.clone()),
    };
    gw.serve(&dir, gate)
        .map(Some)
        .map_err(|e| format!("the egress gateway could not serve the session: {e}"))
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

/// Checkpoints of one run: after a turn ends, at most one per interval,
/// one at a time, in the background.
struct Checkpoints {
    interval: std::time::Duration,
    last: Option<tokio::time::Instant>,
    running: Option<tokio::task::JoinHandle<()>>,
    taken: u64,
}

impl Checkpoints {
    fn new(interval: std::time::Duration) -> Self {
        Self {
            interval,
            last: None,
            running: None,
            taken: 0,
        }
    }

    /// A turn ended: starts a checkpoint if one is due.
    fn turn_ended(
        &mut self,
        node: &Arc<Node>,
        spec: &SessionSpec,
        epoch: i64,
        container_id: &str,
        out: &mpsc::Sender<Output>,
    ) {
        if self.interval.is_zero() || spec.checkpoint_key_prefix.is_empty() {
            return;
        }
        if self.running.as_ref().is_some_and(|h| !h.is_finished())
            || self.last.is_some_and(|t| t.elapsed() < self.interval)
        {
            return;
        }
        self.last = Some(tokio::time::Instant::now());
        let key = format!(
            "{}{epoch}-{}.tar.zst",
            spec.checkpoint_key_prefix,
            self.taken % 2
        );
        self.taken += 1;
        let (node, container_id, out) = (node.clone(), container_id.to_string(), out.clone());
        self.running = Some(tokio::spawn(async move {
            let mut ws = node.workspace.clone();
            ws.snapshot_max_bytes = ws.snapshot_max_bytes.min(node.cfg.checkpoint_max_bytes);
            let started = std::time::Instant::now();
            match crate::workspace::snapshot(&node.runtime, &node.objects, &ws, &container_id, &key)
                .await
            {
                Ok(bytes) => {
                    tracing::debug!(%key, bytes, took = ?started.elapsed(), "checkpoint saved");
                    let _ = out.send(Output::Checkpoint { key, bytes }).await;
                }
                Err(e) => {
                    tracing::warn!(%key, error = %e, "checkpoint failed; the last one stands")
                }
            }
        }));
    }

    /// Waits for a checkpoint under way (before the container goes).
    async fn finish(&mut self) {
        if let Some(h) = self.running.take() {
            let _ = h.await;
        }
    }
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
