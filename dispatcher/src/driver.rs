//! Drives one claimed session: places it on a node, relays its frames into the
//! event log, and forwards user input from the log to the node.
//!
//! User input reaches the node *through the log*: `SendMessage` on any
//! dispatcher persists a `user.message` event; the driver (on the owning
//! dispatcher) follows the log and forwards each user event past the
//! session's `input_seq` cursor. So input is ordered, durable, and survives a
//! re-placement.

use std::sync::Arc;

use berth_common::events as ev;
use berth_proto::node::v1 as pb;
use berth_proto::node::v1::{dispatcher_frame, node_frame};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use uuid::Uuid;

use crate::error::{Error, Result};
use crate::log::EventLog;
use crate::nodes::{Nodes, Placed};
use crate::session::{NewEvent, Runtime, Session, StatusEvent, TurnUsage};

use crate::store::Store;

/// What every driver shares.
pub struct Ctx {
    pub store: Store,
    pub log: Arc<EventLog>,
    pub nodes: Arc<Nodes>,
    /// This dispatcher's id, recorded as the owner of sessions it drives.
    pub owner: String,
    pub shutdown: CancellationToken,
    /// Every running driver, so shutdown waits for each to record where its
    /// session stands (re-queued for another dispatcher).
    pub drivers: tokio_util::task::TaskTracker,
    /// Inactivity timeout for sessions that set none.
    pub inactivity_default: std::time::Duration,
    /// Days archived sessions keep their events.
    pub retention_days: u32,
    /// Whether the last heartbeat reached Postgres (readiness).
    pub db_ok: std::sync::atomic::AtomicBool,
}

/// Runs a session from `starting` until its run ends.
pub async fn drive(ctx: Arc<Ctx>, session: Session) {
    let span = tracing::info_span!("session", session_id = %session.id, epoch = session.epoch);
    async move {
        if let Err(e) = run(&ctx, &session).await {
            if let Error::Superseded { .. } = e {
                // Another placement owns the session now; this run just ends.
                tracing::info!(error = %e, "run superseded");
                return;
            }
            tracing::warn!(error = %e, "session run failed");
            let reason = e.to_string();
            if let Err(e) = ctx
                .log
                .transition_at(
                    session.id,
                    session.epoch,
                    StatusEvent::Failed,
                    &reason,
                    serde_json::json!({}),
                )
                .await
            {
                tracing::debug!(error = %e, "could not mark the session failed");
            }
        }
    }
    .instrument(span)
    .await
}

/// A started run: the node, the frames it sends, the frames we send.
struct Link {
    placed: Placed,
    /// When the session was claimed (start of placement).
    claimed: std::time::Instant,
    /// Whether the node started it in a warm container.
    warm: bool,
    frames: tonic::Streaming<pb::NodeFrame>,
    to_node: mpsc::Sender<pb::DispatcherFrame>,
}

async fn run(ctx: &Ctx, session: &Session) -> Result<()> {
    if session.epoch == 1 {
        let waited = (chrono::Utc::now() - session.create_time)
            .to_std()
            .unwrap_or_default();
        metrics::histogram!(crate::metrics::QUEUE_WAIT).record(waited.as_secs_f64());
    }
    let claimed = std::time::Instant::now();
    let placed = start(ctx, session, claimed).await;
    let result = match &placed {
        Ok(Some(_)) => "placed",
        Ok(None) => "not_placed",
        Err(_) => "error",
    };
    metrics::histogram!(crate::metrics::PLACEMENT, "result" => result)
        .record(claimed.elapsed().as_secs_f64());
    let Some(mut link) = placed? else {
        return Ok(());
    };
    metrics::histogram!(crate::metrics::SESSION_START, "start" => start_label(link.warm))
        .record(claimed.elapsed().as_secs_f64());
    let node = link.placed.link.name();
    ctx.store.set_node(session.id, session.epoch, &node).await?;
    let busy = ctx
        .store
        .has_pending_input(session.id, session.input_seq)
        .await?;
    ctx.log
        .transition_at(
            session.id,
            session.epoch,
            StatusEvent::Started { busy },
            "",
            serde_json::json!({"node": node, "epoch": session.epoch, "warm": link.warm}),
        )
        .await?;
    tracing::info!(%node, warm = link.warm, "session started");
    relay(ctx, session, &mut link).await
}

/// The `start` label of the latency metrics.
fn start_label(warm: bool) -> &'static str {
    if warm { "warm" } else { "cold" }
}

/// Places the session and sends `start`, trying other nodes when one refuses
/// (late binding). `None` when the start failed and the session was marked so.
async fn start(ctx: &Ctx, session: &Session, claimed: std::time::Instant) -> Result<Option<Link>> {
    let mut refused: Vec<String> = Vec::new();
    let mut reasons: Vec<String> = Vec::new();
    loop {
        let Some(placed) = ctx.nodes.place(&session.spec.image, &refused) else {
            // Every node is full, draining, down or refused: back to the
            // queue (late binding never loses a session). The claim loop
            // takes it again when a node reports free capacity.
            let why = if reasons.is_empty() {
                "no node has free capacity".to_string()
            } else {
                reasons.join("; ")
            };
            tracing::info!(%why, "no node could start the session; re-queued");
            let reason = format!("re-queued: no node could start it ({why})");
            ctx.log
                .transition_at(
                    session.id,
                    session.epoch,
                    StatusEvent::NodeLost,
                    &reason,
                    serde_json::json!({}),
                )
                .await?;
            return Ok(None);
        };
        let url = placed.link.key();
        let (to_node, rx) = mpsc::channel(64);
        let start = pb::DispatcherFrame {
            epoch: session.epoch,
            kind: Some(dispatcher_frame::Kind::Start(pb::Start {
                session_id: session.id.to_string(),
                epoch: session.epoch,
                spec: Some(node_spec(session)),
            })),
        };
        // The channel is fresh: this send cannot fail.
        let _ = to_node.send(start).await;
        let mut frames = match placed
            .link
            .client()
            .run_session(ReceiverStream::new(rx))
            .await
        {
            Ok(r) => r.into_inner(),
            Err(status) => {
                reasons.push(format!("{url}: {}", status.message()));
                refused.push(url);
                continue;
            }
        };
        // A node that goes down before answering counts as a refusal.
        let first = tokio::select! {
            m = frames.message() => m,
            () = placed.link.down() => Err(tonic::Status::unavailable(format!("node down: {}", placed.link.last_error()))),
        };
        match first {
            Ok(Some(pb::NodeFrame {
                kind: Some(node_frame::Kind::Accepted(a)),
                ..
            })) => {
                tracing::debug!(%url, container_id = %a.container_id, warm = a.warm, "node accepted the session");
                return Ok(Some(Link {
                    placed,
                    claimed,
                    warm: a.warm,
                    frames,
                    to_node,
                }));
            }
            Ok(Some(pb::NodeFrame {
                kind: Some(node_frame::Kind::Refused(r)),
                ..
            })) => {
                tracing::info!(%url, reason = %r.reason, "node refused the session; placing it elsewhere");
                reasons.push(format!("{url}: {}", r.reason));
                refused.push(url);
            }
            Ok(Some(pb::NodeFrame {
                kind: Some(node_frame::Kind::Exited(x)),
                ..
            })) => {
                let extra = serde_json::json!({"exit_code": x.exit_code, "stderr_tail": x.stderr_tail, "node": url});
                ctx.log
                    .transition_at(
                        session.id,
                        session.epoch,
                        StatusEvent::Failed,
                        &x.reason,
                        extra,
                    )
                    .await?;
                return Ok(None);
            }
            Ok(_) => {
                return Err(Error::Internal(format!(
                    "node {url} broke the protocol: expected accepted or refused"
                )));
            }
            Err(status) => {
                reasons.push(format!("{url}: {}", status.message()));
                refused.push(url);
            }
        }
    }
}

fn node_spec(session: &Session) -> pb::SessionSpec {
    use crate::session::{Resource, file_key, memory_key};
    let s = &session.spec;
    let mut files = Vec::new();
    let mut memory = Vec::new();
    let mut git = Vec::new();
    for r in &session.resources {
        match r {
            Resource::File { file_id, path } => files.push(pb::FileCopy {
                key: file_key(*file_id),
                path: path.clone(),
            }),
            Resource::Memory {
                store,
                path,
                read_write,
            } => {
                // Creation refuses memory stores without an agent.
                let Some((agent, _)) = &session.agent else {
                    continue;
                };
                memory.push(pb::MemoryCopy {
                    key: memory_key(agent, store),
                    path: path.clone(),
                    write_back: *read_write,
                });
            }
            Resource::Git { url, git_ref, path } => git.push(pb::GitClone {
                url: url.clone(),
                r#ref: git_ref.clone(),
                path: path.clone(),
            }),
        }
    }
    // With a snapshot, the runtime resumes its own conversation, under the
    // first id it ever reported.
    let (restore_snapshot_key, resume_id) = match &session.snapshot {
        Some(snap) => (snap.key.clone(), session.runtime_session_id.clone()),
        None => (String::new(), String::new()),
    };
    let resume_id = if s.runtime == Runtime::ClaudeCode {
        resume_id
    } else {
        String::new()
    };
    pb::SessionSpec {
        image: s.image.clone(),
        runtime: match s.runtime {
            Runtime::ClaudeCode => pb::Runtime::ClaudeCode as i32,
            Runtime::Jsonl => pb::Runtime::Jsonl as i32,
        },
        runtime_args: s.runtime_args.clone(),
        model: s.model.clone(),
        system_prompt: s.system_prompt.clone(),
        env: s.env.clone().into_iter().collect(),
        resume_id,
        limits: Some(pb::Limits {
            cpus: s.limits.cpus,
            memory_bytes: s.limits.memory_bytes,
            pids: s.limits.pids,
        }),
        skills: s
            .skills
            .iter()
            .map(|k| pb::Skill {
                name: k.name.clone(),
                content: k.content.clone(),
            })
            .collect(),
        restore_snapshot_key,
        evict_snapshot_key: crate::session::snapshot_key(session.id, session.snapshots + 1),
        files,
        memory,
        git,
    }
}

/// What the relay must do on its own, with no frame to prompt it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expiry {
    /// The hard session timeout elapsed: the session ends in `timeout`.
    Hard,
    /// No events and no input for the inactivity timeout: stop (`inactivity`).
    Inactive,
}

/// The relay's two clocks. Pure bookkeeping over `tokio::time::Instant`, so
/// it is tested on a paused clock.
#[derive(Debug)]
pub struct Deadlines {
    hard: Option<tokio::time::Instant>,
    inactivity: std::time::Duration,
    last_activity: Option<tokio::time::Instant>,
}

impl Deadlines {
    /// `timeout` counts from now (this run's start).
    pub fn new(timeout: Option<std::time::Duration>, inactivity: std::time::Duration) -> Self {
        let now = tokio::time::Instant::now();
        Self {
            hard: timeout.map(|t| now + t),
            inactivity,
            last_activity: Some(now),
        }
    }

    /// Something happened: an event from the agent or input from a user.
    pub fn touch(&mut self) {
        if self.last_activity.is_some() {
            self.last_activity = Some(tokio::time::Instant::now());
        }
    }

    /// The next expiry, if any clock is running.
    pub fn next(&self) -> Option<(tokio::time::Instant, Expiry)> {
        let idle = self
            .last_activity
            .map(|t| (t + self.inactivity, Expiry::Inactive));
        let hard = self.hard.map(|t| (t, Expiry::Hard));
        match (hard, idle) {
            (Some(h), Some(i)) => Some(if h.0 <= i.0 { h } else { i }),
            (h, i) => h.or(i),
        }
    }

    /// Stops the clock that fired (each fires once).
    pub fn fired(&mut self, e: Expiry) {
        match e {
            Expiry::Hard => self.hard = None,
            Expiry::Inactive => self.last_activity = None,
        }
    }

    /// Resolves when the next clock expires.
    async fn expired(&self) -> Expiry {
        match self.next() {
            Some((at, e)) => {
                tokio::time::sleep_until(at).await;
                e
            }
            None => std::future::pending().await,
        }
    }
}

/// A stop the driver asked the node for.
struct StopAsked {
    reason: String,
    pause: bool,
}

/// Relays until the agent exits or the link is lost.
async fn relay(ctx: &Ctx, session: &Session, link: &mut Link) -> Result<()> {
    let id = session.id;
    let epoch = session.epoch;
    let mut input_seq = session.input_seq;
    let mut feed = Some(ctx.log.follow(id, input_seq, 64));
    // Turns sent to the agent that have not ended yet.
    let mut open_turns: u32 = 0;
    let mut runtime_id_seen = !session.runtime_session_id.is_empty();
    let mut deadlines = Deadlines::new(
        session.timeout,
        session.inactivity_timeout.unwrap_or(ctx.inactivity_default),
    );
    let mut stop_asked: Option<StopAsked> = None;
    let mut first_event = true;
    // One handle for the run: no registry lookup per event.
    let relayed = metrics::counter!(crate::metrics::EVENTS_RELAYED);
    // Set when this dispatcher shuts down: the node was asked to stop the
    // agent with a snapshot, and the session is re-queued once it has.
    let mut handing_back: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            frame = link.frames.message() => match frame {
                Ok(Some(pb::NodeFrame { kind: Some(kind), .. })) => match kind {
                    node_frame::Kind::Event(e) => {
                        deadlines.touch();
                        relayed.increment(1);
                        if std::mem::take(&mut first_event) {
                            metrics::histogram!(crate::metrics::FIRST_EVENT, "start" => start_label(link.warm))
                                .record(link.claimed.elapsed().as_secs_f64());
                        }
                        if !runtime_id_seen && !e.runtime_session_id.is_empty() {
                            runtime_id_seen = true;
                            ctx.store.set_runtime_session_id(id, &e.runtime_session_id).await?;
                        }
                        let turn_end = e.turn_end.clone();
                        ctx.log.append_queued(id, node_event(e)).await?;
                        if let Some(u) = turn_end {
                            let u = turn_usage(u);
                            crate::metrics::record_usage(&u);
                            let usage = ctx.log.record_usage(id, u).await?;
                            check_budget(ctx, session, &usage).await?;
                            open_turns = open_turns.saturating_sub(1);
                            if open_turns == 0 {
                                ctx.log.transition_at(id, epoch, StatusEvent::TurnEnded, "", serde_json::json!({})).await?;
                            }
                        }
                    }
                    node_frame::Kind::Exited(x) => {
                        let success = x.exit_code == 0;
                        for e in x.memory_errors.iter().chain(Some(&x.snapshot_error).filter(|e| !e.is_empty())) {
                            ctx.log.append_queued(id, NewEvent::new(ev::SESSION_ERROR, serde_json::json!({"message": e}).to_string())).await?;
                        }
                        if !x.snapshot_key.is_empty() {
                            ctx.store.record_snapshot(id, &x.snapshot_key, x.snapshot_bytes).await?;
                        }
                        // The run moves, with its snapshot: another node (a
                        // drain) or another dispatcher (our shutdown) resumes it.
                        let moved = if x.evicted {
                            Some(format!("node {} drained; re-queued", link.placed.link.name()))
                        } else if handing_back.is_some() && stop_asked.is_none() {
                            Some("dispatcher shut down; re-queued".to_string())
                        } else {
                            None
                        };
                        if let Some(why) = moved {
                            let from = if x.snapshot_key.is_empty() { "restarts without a snapshot" } else { "resumes from its snapshot" };
                            tracing::info!(snapshot = %x.snapshot_key, "{why}: the session {from}");
                            let extra = serde_json::json!({"snapshot": x.snapshot_key, "snapshot_error": x.snapshot_error});
                            ctx.log.transition_at(id, epoch, StatusEvent::NodeLost, &why, extra).await?;
                            return Ok(());
                        }
                        let (event, reason) = match (&stop_asked, x.stopped) {
                            (Some(StopAsked { pause: true, .. }), true) if !x.snapshot_key.is_empty() => {
                                (StatusEvent::Paused, "user".to_string())
                            }
                            (Some(StopAsked { pause: true, .. }), true) => (
                                StatusEvent::Exited { success, stopped: true },
                                format!("pause failed, stopped instead: snapshot: {}", x.snapshot_error),
                            ),
                            (Some(asked), true) => (StatusEvent::Exited { success, stopped: true }, asked.reason.clone()),
                            (_, stopped) => (
                                StatusEvent::Exited { success, stopped },
                                if stopped { "user".to_string() } else { x.reason.clone() },
                            ),
                        };
                        let extra = serde_json::json!({"exit_code": x.exit_code, "stderr_tail": x.stderr_tail, "detail": x.reason, "snapshot": x.snapshot_key});
                        match ctx.log.transition_at(id, epoch, event, &reason, extra).await {
                            Ok(_) | Err(Error::Transition(_) | Error::Superseded { .. }) => {}
                            Err(e) => return Err(e),
                        }
                        return Ok(());
                    }
                    node_frame::Kind::Accepted(_) | node_frame::Kind::Refused(_) => {
                        tracing::warn!("node sent a second accepted/refused frame; ignored");
                    }
                },
                Ok(Some(_)) => tracing::warn!("node sent an empty frame; ignored"),
                Ok(None) | Err(_) => {
                    let why = match frame { Err(s) => s.message().to_string(), _ => "stream closed".into() };
                    tracing::warn!(node = %link.placed.link.key(), %why, "lost the node running this session; rescheduling");
                    let reason = format!("node link lost: {why}");
                    ctx.log.transition_at(id, epoch, StatusEvent::NodeLost, &reason, serde_json::json!({})).await?;
                    return Ok(());
                }
            },
            item = recv(&mut feed) => match item {
                Some(Ok(e)) => {
                    if e.kind.starts_with("user.") {
                        deadlines.touch();
                    }
                    let frame = match e.kind.as_str() {
                        ev::USER_MESSAGE if e.seq > input_seq => {
                            let text = serde_json::from_str::<serde_json::Value>(&e.payload)
                                .ok()
                                .and_then(|p| p["text"].as_str().map(String::from))
                                .unwrap_or_default();
                            open_turns += 1;
                            Some(dispatcher_frame::Kind::Message(pb::UserMessage { text, seq: e.seq }))
                        }
                        ev::USER_INTERRUPT if e.seq > input_seq => Some(dispatcher_frame::Kind::Interrupt(pb::Interrupt {})),
                        // A stop logged before this run was claimed belongs to an earlier run.
                        k if k == crate::session::SessionStatus::Stopping.event_type() && e.seq > session.last_seq => {
                            // Every stop and pause keeps a snapshot, so the session can resume.
                            let p: serde_json::Value = serde_json::from_str(&e.payload).unwrap_or_default();
                            let asked = StopAsked {
                                reason: p["reason"].as_str().filter(|r| !r.is_empty()).unwrap_or("user").to_string(),
                                pause: p[crate::sessions::PAUSE_KEY].as_bool() == Some(true),
                            };
                            let stop = pb::Stop {
                                reason: asked.reason.clone(),
                                snapshot_key: crate::session::snapshot_key(id, session.snapshots + 1),
                            };
                            stop_asked = Some(asked);
                            Some(dispatcher_frame::Kind::Stop(stop))
                        }
                        _ => None,
                    };
                    if let Some(kind) = frame {
                        let user_event = e.kind.starts_with("user.");
                        // A closed channel means the node stream is ending; its frames say how.
                        let _ = link.to_node.send(pb::DispatcherFrame { epoch, kind: Some(kind) }).await;
                        if user_event {
                            input_seq = e.seq;
                            ctx.store.set_input_seq(id, e.seq).await?;
                            if e.kind == ev::USER_MESSAGE && open_turns == 1 {
                                ctx.log.transition_at(id, epoch, StatusEvent::TurnStarted, "", serde_json::json!({})).await?;
                            }
                        }
                    }
                }
                // Shutting down: the shutdown branch ends the relay.
                Some(Err(_)) if ctx.shutdown.is_cancelled() => feed = None,
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "input feed failed; re-following");
                    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                    feed = Some(ctx.log.follow(id, input_seq, 64));
                }
                // The session left its run (failed or timed out elsewhere): stop the agent.
                None => {
                    feed = None;
                    let stop = pb::Stop { reason: "session ended".into(), snapshot_key: String::new() };
                    let _ = link.to_node.send(pb::DispatcherFrame { epoch, kind: Some(dispatcher_frame::Kind::Stop(stop)) }).await;
                }
            },
            expiry = deadlines.expired() => {
                deadlines.fired(expiry);
                let result = match expiry {
                    Expiry::Hard => {
                        let t = session.timeout.unwrap_or_default();
                        tracing::info!(timeout = ?t, "hard session timeout elapsed");
                        let reason = format!("session timeout of {}s elapsed", t.as_secs_f64());
                        ctx.log.transition_at(id, epoch, StatusEvent::TimedOut, &reason, serde_json::json!({})).await
                    }
                    Expiry::Inactive => {
                        tracing::info!("inactivity timeout elapsed; stopping");
                        let idle = session.inactivity_timeout.unwrap_or(ctx.inactivity_default);
                        let extra = serde_json::json!({"inactivity_timeout_s": idle.as_secs_f64()});
                        ctx.log.transition_at(id, epoch, StatusEvent::StopRequested, "inactivity", extra).await
                    }
                };
                match result {
                    // Already stopping or ended: the frames say how it ends.
                    Ok(_) | Err(Error::Transition(_)) => {}
                    Err(e) => return Err(e),
                }
            }
            // The node missed its lease: its stream may never end by itself.
            () = link.placed.link.down() => {
                let node = link.placed.link.name();
                let why = link.placed.link.last_error();
                tracing::warn!(%node, %why, "node down; rescheduling this session");
                let reason = format!("node {node} down: {why}");
                ctx.log.transition_at(id, epoch, StatusEvent::NodeLost, &reason, serde_json::json!({"node": node})).await?;
                return Ok(());
            }
            // Shutting down: ask the node to stop the agent with a snapshot,
            // so whichever dispatcher claims the session next resumes it.
            () = ctx.shutdown.cancelled(), if handing_back.is_none() => {
                handing_back = Some(tokio::time::Instant::now() + HAND_BACK_TIMEOUT);
                if stop_asked.is_none() {
                    let stop = pb::Stop {
                        reason: "dispatcher shutting down".into(),
                        snapshot_key: crate::session::snapshot_key(id, session.snapshots + 1),
                    };
                    let _ = link.to_node.send(pb::DispatcherFrame { epoch, kind: Some(dispatcher_frame::Kind::Stop(stop)) }).await;
                }
            }
            () = sleep_until(handing_back) => {
                tracing::warn!("the node did not stop the session in time for shutdown; re-queued without a snapshot");
                ctx.log.transition_at(id, epoch, StatusEvent::NodeLost, "dispatcher shut down", serde_json::json!({})).await?;
                return Ok(());
            }
        }
    }
}

/// How long a shutting-down dispatcher waits for a node to snapshot a
/// session it hands back.
const HAND_BACK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Stops the session (reason `budget`) once its cost reaches its budget.
async fn check_budget(ctx: &Ctx, session: &Session, usage: &crate::session::Event) -> Result<()> {
    let Some(budget) = session.budget_usd.filter(|b| *b > 0.0) else {
        return Ok(());
    };
    let p: serde_json::Value = serde_json::from_str(&usage.payload).unwrap_or_default();
    let cost = p["total"]["cost_usd"].as_f64().unwrap_or(0.0);
    if cost < budget {
        return Ok(());
    }
    tracing::info!(cost, budget, "budget reached; stopping");
    let extra = serde_json::json!({"budget_usd": budget, "cost_usd": cost});
    match ctx
        .log
        .transition_at(
            session.id,
            session.epoch,
            StatusEvent::StopRequested,
            "budget",
            extra,
        )
        .await
    {
        Ok(_) | Err(Error::Transition(_)) => Ok(()),
        Err(e) => Err(e),
    }
}

async fn recv(
    feed: &mut Option<mpsc::Receiver<Result<Arc<crate::session::Event>>>>,
) -> Option<Result<Arc<crate::session::Event>>> {
    match feed {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// A node's runtime event as a log event. A node is trusted to run sessions,
/// not to produce valid JSON: a bad payload is kept, wrapped, never dropped.
fn node_event(e: pb::RuntimeEvent) -> NewEvent {
    let valid_type = !e.r#type.is_empty()
        && e.r#type.len() <= 64
        && e.r#type.bytes().all(|b| b.is_ascii_graphic());
    let is_object = e.payload_json.starts_with('{')
        && serde_json::from_str::<serde::de::IgnoredAny>(&e.payload_json).is_ok();
    // Postgres jsonb cannot hold U+0000.
    let payload = if e.payload_json.contains("\\u0000") {
        e.payload_json.replace("\\u0000", "\\ufffd")
    } else {
        e.payload_json
    };
    if valid_type && is_object {
        NewEvent::new(e.r#type, payload)
    } else {
        let wrapped = serde_json::json!({"raw": payload, "node_type": e.r#type, "invalid": true});
        NewEvent::new(ev::RUNTIME_RAW, wrapped.to_string())
    }
}

fn turn_usage(u: pb::TurnUsage) -> TurnUsage {
    TurnUsage {
        input_tokens: u.input_tokens,
        output_tokens: u.output_tokens,
        cache_read_input_tokens: u.cache_read_input_tokens,
        cache_creation_input_tokens: u.cache_creation_input_tokens,
        cost_usd: u.cost_usd,
        model: u.model,
    }
}

/// Most sessions claimed in one statement.
const CLAIM_BATCH: u32 = 64;

/// Claims queued sessions while nodes have room, and drives each one.
pub async fn claim_loop(ctx: Arc<Ctx>, wake: Arc<tokio::sync::Notify>, poll: std::time::Duration) {
    loop {
        // One claim per free slot; the driver takes the slot when it places.
        let mut free = ctx.nodes.free_slots();
        while free > 0 && !ctx.shutdown.is_cancelled() {
            let batch = free.min(CLAIM_BATCH);
            match ctx.store.claim(&ctx.owner, batch as usize).await {
                Ok(sessions) => {
                    let claimed = u32::try_from(sessions.len()).unwrap_or(batch);
                    free = free.saturating_sub(claimed);
                    for session in sessions {
                        tracing::info!(session_id = %session.id, "claimed session");
                        ctx.drivers.spawn(drive(ctx.clone(), session));
                    }
                    if claimed < batch {
                        break;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "claiming from the queue failed");
                    break;
                }
            }
        }
        tokio::select! {
            () = wake.notified() => {}
            () = ctx.nodes.changed.notified() => {}
            () = tokio::time::sleep(poll) => {}
            () = ctx.shutdown.cancelled() => return,
        }
    }
}

/// Listens for queue wake-ups and other dispatchers' event notices.
pub async fn listen(ctx: Arc<Ctx>, wake: Arc<tokio::sync::Notify>) {
    let mut backoff = std::time::Duration::from_millis(100);
    loop {
        let listener = async {
            let mut l = sqlx::postgres::PgListener::connect_with(ctx.store.pool()).await?;
            l.listen_all([crate::store::QUEUE_CHANNEL, crate::store::EVENTS_CHANNEL])
                .await?;
            Ok::<_, sqlx::Error>(l)
        };
        let mut listener = tokio::select! {
            () = ctx.shutdown.cancelled() => return,
            l = listener => match l {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(error = %e, "LISTEN failed; the queue falls back to polling");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(std::time::Duration::from_secs(5));
                    continue;
                }
            }
        };
        backoff = std::time::Duration::from_millis(100);
        loop {
            let n = tokio::select! {
                () = ctx.shutdown.cancelled() => return,
                n = listener.recv() => n,
            };
            match n {
                Ok(n) if n.channel() == crate::store::QUEUE_CHANNEL => wake.notify_one(),
                Ok(n) => {
                    if let Some((id, seq)) = n.payload().split_once(':')
                        && let (Ok(id), Ok(seq)) = (id.parse::<Uuid>(), seq.parse::<i64>())
                    {
                        ctx.log.remote_append(id, seq);
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "LISTEN connection lost; reconnecting");
                    break;
                }
            }
        }
    }
}

/// How often a dispatcher deletes events past retention.
const RETENTION_INTERVAL: std::time::Duration = std::time::Duration::from_secs(600);

/// Fails pending sessions still unplaced at their queue deadline.
async fn expire_queued(ctx: &Ctx) {
    let expired = match ctx.store.expired_pending().await {
        Ok(e) => e,
        Err(e) => {
            tracing::warn!(error = %e, "looking for expired queued sessions failed");
            return;
        }
    };
    for (id, epoch) in expired {
        let reason = "queue deadline passed: no node took the session in time";
        match ctx
            .log
            .transition_at(
                id,
                epoch,
                StatusEvent::Failed,
                reason,
                serde_json::json!({}),
            )
            .await
        {
            Ok(_) => tracing::warn!(session_id = %id, "session failed at its queue deadline"),
            // Claimed or stopped meanwhile.
            Err(Error::Transition(_) | Error::Conflict | Error::Superseded { .. }) => {}
            Err(e) => {
                tracing::warn!(session_id = %id, error = %e, "could not fail an expired session")
            }
        }
    }
}

/// Keeps this dispatcher's liveness row fresh and re-queues the sessions of
/// dispatchers that stopped heartbeating (crashed without handing back).
pub async fn liveness_loop(ctx: Arc<Ctx>, lease: std::time::Duration) {
    let mut tick = tokio::time::interval(lease / 3);
    let mut last_retention = None;
    loop {
        tokio::select! {
            () = ctx.shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        if let Err(e) = ctx.store.heartbeat(&ctx.owner).await {
            tracing::warn!(error = %e, "dispatcher heartbeat failed");
            ctx.db_ok.store(false, std::sync::atomic::Ordering::Relaxed);
            continue;
        }
        ctx.db_ok.store(true, std::sync::atomic::Ordering::Relaxed);
        let orphans = match ctx.store.orphaned(lease).await {
            Ok(o) => o,
            Err(e) => {
                tracing::warn!(error = %e, "looking for orphaned sessions failed");
                continue;
            }
        };
        expire_queued(&ctx).await;
        if last_retention.is_none_or(|t: tokio::time::Instant| t.elapsed() >= RETENTION_INTERVAL) {
            last_retention = Some(tokio::time::Instant::now());
            match ctx.store.purge_archived_events(ctx.retention_days).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(
                    events = n,
                    days = ctx.retention_days,
                    "deleted events of archived sessions past retention"
                ),
                Err(e) => tracing::warn!(error = %e, "retention sweep failed"),
            }
        }
        for (id, epoch, owner) in orphans {
            let reason = format!("dispatcher {owner} stopped heartbeating; re-queued");
            match ctx
                .log
                .transition_at(
                    id,
                    epoch,
                    StatusEvent::NodeLost,
                    &reason,
                    serde_json::json!({"owner": owner}),
                )
                .await
            {
                Ok(_) => {
                    tracing::warn!(session_id = %id, %owner, "re-queued a session its dispatcher abandoned")
                }
                // Another dispatcher got there first, or it just ended.
                Err(Error::Transition(_) | Error::Conflict | Error::Superseded { .. }) => {}
                Err(e) => {
                    tracing::warn!(session_id = %id, error = %e, "could not re-queue an orphaned session")
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn inactivity_counts_from_the_last_activity_and_fires_once() {
        let mut d = Deadlines::new(None, Duration::from_secs(60));
        tokio::time::advance(Duration::from_secs(50)).await;
        d.touch();
        tokio::time::advance(Duration::from_secs(50)).await;
        let (at, e) = d.next().expect("armed");
        assert_eq!(e, Expiry::Inactive);
        assert_eq!(at - tokio::time::Instant::now(), Duration::from_secs(10));
        assert_eq!(d.expired().await, Expiry::Inactive);
        d.fired(Expiry::Inactive);
        d.touch();
        assert!(d.next().is_none(), "inactivity fires once");
    }

    #[tokio::test(start_paused = true)]
    async fn the_hard_timeout_ignores_activity() {
        let mut d = Deadlines::new(Some(Duration::from_secs(30)), Duration::from_secs(20));
        for _ in 0..3 {
            tokio::time::advance(Duration::from_secs(10)).await;
            d.touch();
        }
        // Busy all along (inactivity would fire at 50 s), yet due at 30 s.
        assert_eq!(d.next(), Some((tokio::time::Instant::now(), Expiry::Hard)));
        assert_eq!(d.expired().await, Expiry::Hard);
        d.fired(Expiry::Hard);
        assert_eq!(d.next().map(|n| n.1), Some(Expiry::Inactive));
    }
}
