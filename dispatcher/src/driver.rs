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
    /// Whether the node started it in a warm container.
    warm: bool,
    frames: tonic::Streaming<pb::NodeFrame>,
    to_node: mpsc::Sender<pb::DispatcherFrame>,
}

async fn run(ctx: &Ctx, session: &Session) -> Result<()> {
    let Some(mut link) = start(ctx, session).await? else {
        return Ok(());
    };
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

/// Places the session and sends `start`, trying other nodes when one refuses
/// (late binding). `None` when the start failed and the session was marked so.
async fn start(ctx: &Ctx, session: &Session) -> Result<Option<Link>> {
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
    let s = &session.spec;
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
        resume_id: String::new(),
    }
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
    loop {
        tokio::select! {
            frame = link.frames.message() => match frame {
                Ok(Some(pb::NodeFrame { kind: Some(kind), .. })) => match kind {
                    node_frame::Kind::Event(e) => {
                        if !runtime_id_seen && !e.runtime_session_id.is_empty() {
                            runtime_id_seen = true;
                            ctx.store.set_runtime_session_id(id, &e.runtime_session_id).await?;
                        }
                        let turn_end = e.turn_end.clone();
                        ctx.log.append_queued(id, node_event(e)).await?;
                        if let Some(u) = turn_end {
                            ctx.log.record_usage(id, turn_usage(u)).await?;
                            open_turns = open_turns.saturating_sub(1);
                            if open_turns == 0 {
                                ctx.log.transition_at(id, epoch, StatusEvent::TurnEnded, "", serde_json::json!({})).await?;
                            }
                        }
                    }
                    node_frame::Kind::Exited(x) => {
                        let success = x.exit_code == 0;
                        let reason = if x.stopped { "user".to_string() } else { x.reason.clone() };
                        let extra = serde_json::json!({"exit_code": x.exit_code, "stderr_tail": x.stderr_tail, "detail": x.reason});
                        match ctx.log.transition_at(id, epoch, StatusEvent::Exited { success, stopped: x.stopped }, &reason, extra).await {
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
                        k if k == crate::session::SessionStatus::Stopping.event_type() => {
                            Some(dispatcher_frame::Kind::Stop(pb::Stop { reason: "user".into() }))
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
                    let _ = link.to_node.send(pb::DispatcherFrame { epoch, kind: Some(dispatcher_frame::Kind::Stop(pb::Stop { reason: "session ended".into() })) }).await;
                }
            },
            // The node missed its lease: its stream may never end by itself.
            () = link.placed.link.down() => {
                let node = link.placed.link.name();
                let why = link.placed.link.last_error();
                tracing::warn!(%node, %why, "node down; rescheduling this session");
                let reason = format!("node {node} down: {why}");
                ctx.log.transition_at(id, epoch, StatusEvent::NodeLost, &reason, serde_json::json!({"node": node})).await?;
                return Ok(());
            }
            () = ctx.shutdown.cancelled() => {
                ctx.log.transition_at(id, epoch, StatusEvent::NodeLost, "dispatcher shut down", serde_json::json!({})).await?;
                return Ok(());
            }
        }
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

/// Claims queued sessions while nodes have room, and drives each one.
pub async fn claim_loop(ctx: Arc<Ctx>, wake: Arc<tokio::sync::Notify>, poll: std::time::Duration) {
    loop {
        // One claim per free slot; the driver takes the slot when it places.
        let mut free = ctx.nodes.free_slots();
        while free > 0 && !ctx.shutdown.is_cancelled() {
            match ctx.store.claim(&ctx.owner).await {
                Ok(Some(session)) => {
                    free -= 1;
                    tracing::info!(session_id = %session.id, "claimed session");
                    ctx.drivers.spawn(drive(ctx.clone(), session));
                }
                Ok(None) => break,
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

/// Keeps this dispatcher's liveness row fresh and re-queues the sessions of
/// dispatchers that stopped heartbeating (crashed without handing back).
pub async fn liveness_loop(ctx: Arc<Ctx>, lease: std::time::Duration) {
    let mut tick = tokio::time::interval(lease / 3);
    loop {
        tokio::select! {
            () = ctx.shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        if let Err(e) = ctx.store.heartbeat(&ctx.owner).await {
            tracing::warn!(error = %e, "dispatcher heartbeat failed");
            continue;
        }
        let orphans = match ctx.store.orphaned(lease).await {
            Ok(o) => o,
            Err(e) => {
                tracing::warn!(error = %e, "looking for orphaned sessions failed");
                continue;
            }
        };
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
