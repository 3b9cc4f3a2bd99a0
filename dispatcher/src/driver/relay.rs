//! The relay: node frames into the log, user input from the log to the node,
//! until the agent exits, the node is lost, a deadline fires, or this
//! dispatcher shuts down (and leaves the run to the next owner, which
//! re-attaches to it).
//!
//! The node keeps every frame until the relay acknowledges that its events
//! are persisted (`Ack`, sent as the writer commits them), so an owner that
//! dies loses nothing: the next one re-attaches and is sent the rest.

use std::sync::Arc;
use std::sync::atomic::AtomicI64;

use berth_common::events::payload::StatusDetail;
use berth_common::events::{self as ev, payload};
use berth_common::sync::sleep_until;
use berth_proto::node::v1 as pb;
use berth_proto::node::v1::{dispatcher_frame, node_frame};
use tokio::sync::mpsc;

use super::deadlines::{Deadlines, Expiry};
use super::start::Link;
use super::tools::{PendingTools, Waiting, timeout_answer};
use super::{Ctx, durably, start_label};
use crate::error::{Error, Result};
use crate::nodes::wire::node_line;
use crate::session::usage::{self, RunningTotals};
use crate::session::{Event, NewEvent, Session, SessionStatus, StatusEvent, snapshot_key};
use crate::store::{NewToolRequest, ToolEffect, UsageRecorded};

/// How long a shutting-down dispatcher waits for a node to snapshot a
/// session it hands back.
const HAND_BACK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);

/// How often the relay tells the node which frames are persisted.
const ACK_INTERVAL: std::time::Duration = std::time::Duration::from_millis(100);

/// Events of the input feed buffered ahead of the relay.
const FEED_BUFFER: usize = 64;

/// A stop the driver asked the node for.
struct StopAsked {
    reason: String,
    pause: bool,
}

/// Whether the relay goes on after a step.
enum Flow {
    Continue,
    /// The run is over; its end is in the log.
    Done,
}

type Feed = mpsc::Receiver<Result<Arc<Event>>>;

/// One run's relay state.
pub(super) struct Relay<'a> {
    ctx: &'a Ctx,
    session: &'a Session,
    link: Link,
    /// Seq of the last user event forwarded to the node.
    input_seq: i64,
    feed: Option<Feed>,
    /// Turns sent to the agent that have not ended yet.
    open_turns: u32,
    runtime_id_seen: bool,
    /// The runtime's running totals after the last turn (usage baseline).
    runtime_totals: RunningTotals,
    deadlines: Deadlines,
    stop_asked: Option<StopAsked>,
    first_event: bool,
    /// Set when this dispatcher shuts down: the node was asked to stop the
    /// agent with a snapshot, and the session is re-queued once it has.
    handing_back: Option<tokio::time::Instant>,
    /// One handle for the run: no registry lookup per event.
    relayed: metrics::Counter,
    /// The last node frame whose events the writer committed, and the last
    /// one acknowledged to the node.
    persisted: Arc<AtomicI64>,
    acked: i64,
    ack_tick: tokio::time::Interval,
    /// Tool permission requests the agent waits on.
    tools: PendingTools,
    /// Seq of the `user.message` that started the turn in flight (0: unknown).
    turn_message_seq: i64,
}

impl<'a> Relay<'a> {
    /// `in_flight`: re-attached to a run whose turn is still going.
    pub(super) fn new(ctx: &'a Ctx, session: &'a Session, link: Link, in_flight: bool) -> Self {
        let cursor = if link.attached { session.node_seq } else { 0 };
        // The start carried the first message: the agent has it, the
        // cursor is past it, and its turn is open.
        let first = link.first_message_seq;
        let input_seq = session.input_seq.max(first);
        let mut ack_tick = tokio::time::interval(ACK_INTERVAL);
        ack_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Self {
            ctx,
            session,
            link,
            input_seq,
            feed: Some(ctx.log.follow(session.id, input_seq, FEED_BUFFER)),
            open_turns: u32::from(in_flight || first > 0),
            runtime_id_seen: !session.runtime_session_id.is_empty(),
            runtime_totals: session.runtime_totals.clone(),
            deadlines: Deadlines::new(
                session.timeout,
                session.inactivity_timeout.unwrap_or(ctx.inactivity_default),
            ),
            stop_asked: None,
            first_event: true,
            handing_back: None,
            relayed: metrics::counter!(crate::metrics::EVENTS_RELAYED),
            persisted: Arc::new(AtomicI64::new(cursor)),
            acked: cursor,
            ack_tick,
            tools: PendingTools::default(),
            turn_message_seq: first,
        }
    }

    /// A re-attached run's agent still waits on the requests it asked; a
    /// fresh run's agent never asked the ones an ended run left (closed).
    async fn load_tools(&mut self) -> Result<()> {
        let (ctx, id) = (self.ctx, self.session.id);
        if !self.link.attached {
            // Read with the claim: no round trip on the usual start.
            if self.session.pending_tools == 0 {
                return Ok(());
            }
            let close = ToolEffect::CloseAll {
                session: id,
                epoch: Some(self.session.epoch),
                reason: "the run that asked ended".into(),
            };
            ctx.log.tool(close).await?;
            return Ok(());
        }
        let input_seq = self.input_seq;
        let pending = durably(ctx, || ctx.store.unforwarded_tools(id, input_seq)).await?;
        let now_utc = chrono::Utc::now();
        let now = tokio::time::Instant::now();
        for p in pending {
            let left = (p.deadline - now_utc).to_std().unwrap_or_default();
            self.tools.insert(
                p.tool_use_id,
                Waiting {
                    request_id: p.request_id,
                    deadline: now + left,
                    timed_out: false,
                },
            );
        }
        Ok(())
    }

    /// Relays until the run ends.
    pub(super) async fn run(mut self) -> Result<()> {
        if self.link.first_message_seq > 0 {
            self.deadlines.touch();
            self.turn_status(StatusEvent::TurnStarted).await?;
        }
        self.load_tools().await?;
        loop {
            let flow = tokio::select! {
                () = sleep_until(self.tools.next_deadline()) => self.on_tool_timeout().await?,
                frame = self.link.frames.message() => self.on_frame(frame).await?,
                _ = self.ack_tick.tick() => self.ack().await,
                item = recv(&mut self.feed) => self.on_input(item).await?,
                expiry = self.deadlines.expired() => self.on_expiry(expiry).await?,
                // The node missed its lease: its stream may never end by itself.
                () = self.link.placed.link.down() => self.on_node_down().await?,
                () = self.ctx.shutdown.cancelled(), if self.handing_back.is_none() => self.on_shutdown().await,
                () = sleep_until(self.handing_back) => {
                    tracing::warn!("the node did not stop the session in time for shutdown; re-queued without a snapshot");
                    self.transition(StatusEvent::NodeLost, "dispatcher shut down", StatusDetail::default()).await?;
                    Flow::Done
                }
            };
            if let Flow::Done = flow {
                return Ok(());
            }
        }
    }

    async fn transition(
        &self,
        event: StatusEvent,
        reason: &str,
        detail: StatusDetail,
    ) -> Result<()> {
        self.ctx
            .log
            .transition_at(self.session.id, self.session.epoch, event, reason, detail)
            .await
            .map(|_| ())
    }

    /// Sends a frame; a closed channel means the node stream is ending, and
    /// its frames say how.
    async fn send(&self, kind: dispatcher_frame::Kind) {
        let frame = pb::DispatcherFrame {
            epoch: self.session.epoch,
            kind: Some(kind),
        };
        let _ = self.link.to_node.send(frame).await;
    }

    fn next_snapshot_key(&self) -> String {
        snapshot_key(self.session.id, self.session.snapshots + 1)
    }

    async fn on_frame(
        &mut self,
        frame: Result<Option<pb::NodeFrame>, tonic::Status>,
    ) -> Result<Flow> {
        match frame {
            Ok(Some(pb::NodeFrame {
                kind: Some(kind),
                node_seq,
            })) => match kind {
                node_frame::Kind::Line(l) => self.on_line(l, node_seq).await,
                node_frame::Kind::Checkpoint(c) => {
                    // The session resumes from it if this run is lost.
                    let (ctx, id) = (self.ctx, self.session.id);
                    durably(ctx, || {
                        ctx.store
                            .record_checkpoint(id, &c.snapshot_key, c.snapshot_bytes)
                    })
                    .await?;
                    tracing::debug!(key = %c.snapshot_key, bytes = c.snapshot_bytes, "checkpoint recorded");
                    Ok(Flow::Continue)
                }
                node_frame::Kind::Exited(x) => {
                    let flow = self.on_exit(x).await;
                    // Recorded (or refused for good): the node may forget the run.
                    self.send(dispatcher_frame::Kind::Ack(pb::Ack { node_seq }))
                        .await;
                    flow
                }
                node_frame::Kind::Accepted(_) | node_frame::Kind::Refused(_) => {
                    tracing::warn!("node sent a second accepted/refused frame; ignored");
                    Ok(Flow::Continue)
                }
            },
            Ok(Some(_)) => {
                tracing::warn!("node sent an empty frame; ignored");
                Ok(Flow::Continue)
            }
            Ok(None) | Err(_) => {
                let why = match frame {
                    Err(s) => s.message().to_string(),
                    _ => "stream closed".into(),
                };
                tracing::warn!(node = %self.link.placed.link.key(), %why, "lost the node running this session; rescheduling");
                let reason = format!("node link lost: {why}");
                self.transition(StatusEvent::NodeLost, &reason, StatusDetail::default())
                    .await?;
                Ok(Flow::Done)
            }
        }
    }

    /// Tells the node which frames are persisted, when that moved.
    async fn ack(&mut self) -> Flow {
        let persisted = self.persisted.load(std::sync::atomic::Ordering::Acquire);
        if persisted > self.acked {
            self.acked = persisted;
            let node_seq = u64::try_from(persisted).unwrap_or(0);
            self.send(dispatcher_frame::Kind::Ack(pb::Ack { node_seq }))
                .await;
        }
        Flow::Continue
    }

    async fn on_line(&mut self, mut line: pb::RuntimeLine, node_seq: u64) -> Result<Flow> {
        let (id, epoch) = (self.session.id, self.session.epoch);
        self.deadlines.touch();
        if std::mem::take(&mut self.first_event) {
            metrics::histogram!(crate::metrics::FIRST_EVENT, "start" => start_label(self.link.start))
                .record(self.link.claimed.elapsed().as_secs_f64());
        }
        if !self.runtime_id_seen && !line.runtime_session_id.is_empty() {
            self.runtime_id_seen = true;
            let ctx = self.ctx;
            durably(ctx, || {
                ctx.store
                    .set_runtime_session_id(id, &line.runtime_session_id)
            })
            .await?;
        }
        let turn_end = line.turn_end.take();
        let events = node_line(line);
        self.relayed.increment(events.len() as u64);
        let node_seq = i64::try_from(node_seq).unwrap_or(i64::MAX);
        if turn_end.is_none()
            && let Some(effect) = self.tool_effect(&events)
        {
            return self.on_tool_line(events, node_seq, effect).await;
        }
        let Some(u) = turn_end else {
            self.ctx
                .log
                .append_line_queued(id, epoch, events, node_seq, &self.persisted)
                .await?;
            return Ok(Flow::Continue);
        };
        let turn = usage::account(&self.runtime_totals, &u.into());
        if turn.restarted {
            tracing::warn!(before = ?self.runtime_totals, after = ?turn.totals,
                "the runtime's running totals went down: its conversation restarted; this turn counts from zero");
        }
        self.runtime_totals = turn.totals.clone();
        crate::metrics::record_usage(&turn);
        // The line and its turn commit together: a dispatcher that dies
        // in between leaves neither, and the next owner is sent the line
        // again when it re-attaches.
        let usage = self
            .ctx
            .log
            .append_line_with_usage(id, epoch, events, node_seq, &self.persisted, turn)
            .await?;
        self.check_budget(&usage).await?;
        self.open_turns = self.open_turns.saturating_sub(1);
        if self.open_turns == 0 {
            self.turn_status(StatusEvent::TurnEnded).await?;
        }
        Ok(Flow::Continue)
    }

    /// What a line that asks or withdraws a tool permission changes (such
    /// a line is one event; others are passed over at once).
    fn tool_effect(&self, events: &[NewEvent]) -> Option<ToolEffect> {
        let [e] = events else { return None };
        let session = self.session.id;
        match e.kind.as_str() {
            ev::AGENT_TOOL_PERMISSION_CANCELLED => {
                let c: payload::ToolPermissionCancelled = payload::parse(&e.payload)?;
                Some(ToolEffect::Withdraw {
                    session,
                    request_id: c.request_id,
                })
            }
            ev::AGENT_TOOL_PERMISSION => {
                let ask: payload::ToolPermission = payload::parse(&e.payload)?;
                if ask.request_id.is_empty() || ask.tool_use_id.is_empty() {
                    return None;
                }
                let policy = self.session.spec.tool_policy.clone().unwrap_or_default();
                Some(ToolEffect::Ask(NewToolRequest {
                    session,
                    ask,
                    epoch: self.session.epoch,
                    message_seq: self.turn_message_seq,
                    timeout: policy.confirmation_timeout(),
                    timeout_decision: policy.timeout_decision,
                }))
            }
            _ => None,
        }
    }

    /// Persists a line that asks or withdraws a tool permission together
    /// with the request's row, then says how the agent's activity changed.
    async fn on_tool_line(
        &mut self,
        events: Vec<NewEvent>,
        node_seq: i64,
        effect: ToolEffect,
    ) -> Result<Flow> {
        let (id, epoch) = (self.session.id, self.session.epoch);
        self.ctx
            .log
            .append_line_with_tool(id, epoch, events, node_seq, &self.persisted, effect.clone())
            .await?;
        let changed = match effect {
            ToolEffect::Ask(request) => {
                let tool = berth_common::metrics::label_value(&request.ask.tool_name);
                metrics::counter!(crate::metrics::TOOL_REQUESTS, "tool" => tool).increment(1);
                tracing::info!(tool_use_id = %request.ask.tool_use_id, tool = %request.ask.tool_name,
                    "the agent asks to use a tool; waiting for an answer");
                let was_empty = self.tools.is_empty();
                self.tools.insert(
                    request.ask.tool_use_id,
                    Waiting {
                        request_id: request.ask.request_id,
                        deadline: tokio::time::Instant::now() + request.timeout,
                        timed_out: false,
                    },
                );
                was_empty
            }
            ToolEffect::Withdraw { request_id, .. } => {
                self.tools.withdraw(&request_id) && self.tools.is_empty()
            }
            _ => false,
        };
        if changed {
            self.activity().await?;
        }
        Ok(Flow::Continue)
    }

    /// The frame passing a logged answer to the agent; `None` when this
    /// run's agent does not wait on that request.
    async fn tool_decision(&mut self, answer: &str) -> Result<Option<dispatcher_frame::Kind>> {
        let a: payload::ToolConfirmation = payload::parse(answer).unwrap_or_default();
        let Some(w) = self.tools.answer(&a.tool_use_id) else {
            return Ok(None);
        };
        if self.tools.is_empty() {
            self.activity().await?;
        }
        let json =
            |v: &Option<serde_json::Value>| v.as_ref().map(ToString::to_string).unwrap_or_default();
        Ok(Some(dispatcher_frame::Kind::ToolDecision(
            pb::ToolDecision {
                request_id: w.request_id,
                allow: a.decision == "allow",
                updated_input_json: json(&a.updated_input),
                updated_permissions_json: json(&a.updated_permissions),
                message: a.message,
                interrupt: a.interrupt,
                tool_use_id: a.tool_use_id,
            },
        )))
    }

    /// Logs `session.activity`: waiting for a person while any request
    /// waits, else working (a turn is in flight).
    async fn activity(&self) -> Result<()> {
        let a = payload::Activity {
            activity: if self.tools.is_empty() {
                "working"
            } else {
                "waiting_input"
            }
            .into(),
            pending: self.tools.len() as i64,
        };
        self.ctx
            .log
            .append_queued(
                self.session.id,
                self.session.epoch,
                NewEvent::new(ev::SESSION_ACTIVITY, payload::to_json(&a)),
            )
            .await
    }

    /// Answers each request whose confirmation timeout passed with the
    /// policy's decision. A person's answer logged meanwhile wins; either
    /// way the answer reaches the agent through the feed.
    async fn on_tool_timeout(&mut self) -> Result<Flow> {
        let policy = self.session.spec.tool_policy.clone().unwrap_or_default();
        let decision = policy.timeout_decision;
        for tool_use_id in self.tools.expired(tokio::time::Instant::now()) {
            tracing::info!(%tool_use_id, decision = decision.as_str(), "tool permission request timed out");
            let answer = timeout_answer(tool_use_id, decision, policy.confirmation_timeout());
            let effect = ToolEffect::Answer {
                session: self.session.id,
                answer,
            };
            match self.ctx.log.tool(effect).await {
                Ok(out) => {
                    for e in &out.events {
                        crate::metrics::record_tool_answer(&e.payload);
                    }
                }
                Err(Error::Precondition(why)) => {
                    tracing::debug!(%why, "answered before its timeout");
                }
                Err(e) => return Err(e),
            }
        }
        Ok(Flow::Continue)
    }

    /// Closes the requests the agent waited on when its run ended. After a
    /// pause, the turn that asked is delivered again on resume, so the
    /// agent asks again (README, "Tool approvals").
    async fn close_tools(&mut self, reason: &str, pause: bool) -> Result<()> {
        if self.tools.is_empty() {
            return Ok(());
        }
        self.tools.clear();
        let (id, epoch) = (self.session.id, self.session.epoch);
        let out = self
            .ctx
            .log
            .tool(ToolEffect::CloseAll {
                session: id,
                epoch: Some(epoch),
                reason: reason.into(),
            })
            .await?;
        let first = out
            .closed_message_seqs
            .iter()
            .copied()
            .filter(|s| *s > 0)
            .min();
        if let (true, Some(seq)) = (pause, first) {
            tracing::info!(
                message_seq = seq,
                "paused while the agent waited for a tool answer: the turn is delivered again on resume"
            );
            let ctx = self.ctx;
            durably(ctx, || ctx.store.rewind_input_seq(id, seq - 1, epoch)).await?;
        }
        Ok(())
    }

    /// A turn's start or end as the session's status. A session already
    /// stopping (a stop asked meanwhile) keeps its status: the relay goes on
    /// until the node's exit says how it ended, never leaving it orphaned.
    async fn turn_status(&self, event: StatusEvent) -> Result<()> {
        let activity = match event {
            StatusEvent::TurnEnded => "idle",
            _ => "working",
        };
        let detail = StatusDetail {
            activity: Some(activity.into()),
            ..StatusDetail::default()
        };
        match self.transition(event, "", detail).await {
            Ok(()) | Err(Error::Transition(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Stops the session (reason `budget`) once its cost reaches its budget.
    async fn check_budget(&self, usage: &UsageRecorded) -> Result<()> {
        let Some(budget) = self.session.budget_usd.filter(|b| *b > 0.0) else {
            return Ok(());
        };
        let cost = usage.totals.figures.cost_usd;
        if cost < budget {
            return Ok(());
        }
        tracing::info!(cost, budget, "budget reached; stopping");
        let detail = StatusDetail {
            budget_usd: Some(budget),
            cost_usd: Some(cost),
            ..StatusDetail::default()
        };
        match self
            .transition(StatusEvent::StopRequested, "budget", detail)
            .await
        {
            Ok(()) | Err(Error::Transition(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn on_exit(&mut self, x: pb::Exited) -> Result<Flow> {
        let id = self.session.id;
        let pause = self.stop_asked.as_ref().is_some_and(|s| s.pause);
        let why = if x.stopped {
            self.stop_asked
                .as_ref()
                .map_or_else(|| "stopped".to_string(), |s| s.reason.clone())
        } else {
            x.reason.clone()
        };
        self.close_tools(&format!("the agent's run ended: {why}"), pause)
            .await?;
        let snapshot_error = Some(&x.snapshot_error).filter(|e| !e.is_empty());
        for e in x.memory_errors.iter().chain(snapshot_error) {
            self.ctx
                .log
                .append_queued(id, self.session.epoch, NewEvent::error(e))
                .await?;
        }
        if !x.snapshot_key.is_empty() {
            let ctx = self.ctx;
            durably(ctx, || {
                ctx.store
                    .record_snapshot(id, &x.snapshot_key, x.snapshot_bytes)
            })
            .await?;
        }
        // The run moves, with its snapshot: another node (a drain) or
        // another dispatcher (our shutdown) resumes it.
        let moved = if x.evicted {
            Some(format!(
                "node {} drained; re-queued",
                self.link.placed.link.name()
            ))
        } else if x.abandoned {
            Some(format!(
                "node {} stopped the run: no dispatcher re-attached within its grace period; re-queued",
                self.link.placed.link.name()
            ))
        } else if self.handing_back.is_some() && self.stop_asked.is_none() {
            Some("dispatcher shut down; re-queued".to_string())
        } else {
            None
        };
        if let Some(why) = moved {
            let from = if x.snapshot_key.is_empty() {
                "restarts without a snapshot"
            } else {
                "resumes from its snapshot"
            };
            tracing::info!(snapshot = %x.snapshot_key, "{why}: the session {from}");
            let detail = StatusDetail {
                snapshot: Some(x.snapshot_key),
                snapshot_error: Some(x.snapshot_error),
                ..StatusDetail::default()
            };
            self.transition(StatusEvent::NodeLost, &why, detail).await?;
            return Ok(Flow::Done);
        }
        let success = x.exit_code == 0;
        let stopped = StatusEvent::Exited {
            success,
            stopped: true,
        };
        let (event, reason) = match (&self.stop_asked, x.stopped) {
            (Some(StopAsked { pause: true, .. }), true) if !x.snapshot_key.is_empty() => {
                (StatusEvent::Paused, "user".to_string())
            }
            (Some(StopAsked { pause: true, .. }), true) => (
                stopped,
                format!(
                    "pause failed, stopped instead: snapshot: {}",
                    x.snapshot_error
                ),
            ),
            (Some(asked), true) => (stopped, asked.reason.clone()),
            (_, false) if x.oom => (
                StatusEvent::Exited {
                    success: false,
                    stopped: false,
                },
                "oom".to_string(),
            ),
            (_, stopped) => (
                StatusEvent::Exited { success, stopped },
                if stopped {
                    "user".to_string()
                } else {
                    x.reason.clone()
                },
            ),
        };
        let detail = StatusDetail {
            exit_code: Some(x.exit_code),
            stderr_tail: Some(x.stderr_tail),
            detail: Some(x.reason),
            snapshot: Some(x.snapshot_key),
            ..StatusDetail::default()
        };
        match self.transition(event, &reason, detail).await {
            Ok(()) | Err(Error::Transition(_) | Error::Superseded { .. }) => Ok(Flow::Done),
            Err(e) => Err(e),
        }
    }

    async fn on_input(&mut self, item: Option<Result<Arc<Event>>>) -> Result<Flow> {
        let e = match item {
            Some(Ok(e)) => e,
            // Shutting down: the shutdown branch ends the relay.
            Some(Err(_)) if self.ctx.shutdown.is_cancelled() => {
                self.feed = None;
                return Ok(Flow::Continue);
            }
            Some(Err(e)) => {
                tracing::warn!(error = %e, "input feed failed; re-following");
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                self.feed = Some(
                    self.ctx
                        .log
                        .follow(self.session.id, self.input_seq, FEED_BUFFER),
                );
                return Ok(Flow::Continue);
            }
            // The session left its run (failed or timed out elsewhere): stop the agent.
            None => {
                self.feed = None;
                let stop = pb::Stop {
                    reason: "session ended".into(),
                    snapshot_key: String::new(),
                };
                self.send(dispatcher_frame::Kind::Stop(stop)).await;
                return Ok(Flow::Continue);
            }
        };
        let user_event = e.kind.starts_with("user.");
        if user_event {
            self.deadlines.touch();
        }
        let kind = match e.kind.as_str() {
            ev::USER_MESSAGE if e.seq > self.input_seq => {
                let text = payload::parse::<payload::UserMessage>(&e.payload)
                    .map(|m| m.text)
                    .unwrap_or_default();
                self.open_turns += 1;
                Some(dispatcher_frame::Kind::Message(pb::UserMessage {
                    text,
                    seq: e.seq,
                }))
            }
            ev::USER_INTERRUPT if e.seq > self.input_seq => {
                Some(dispatcher_frame::Kind::Interrupt(pb::Interrupt {}))
            }
            // Not this run's agent's request: nothing to pass on, but the
            // cursor moves past it.
            ev::USER_TOOL_CONFIRMATION if e.seq > self.input_seq => {
                self.tool_decision(&e.payload).await?
            }
            // A stop logged before this run was claimed belongs to an earlier run.
            k if k == SessionStatus::Stopping.event_type() && e.seq > self.session.last_seq => {
                // Every stop and pause keeps a snapshot, so the session can resume.
                let change: payload::StatusChange = payload::parse(&e.payload).unwrap_or_default();
                let asked = StopAsked {
                    reason: Some(change.reason)
                        .filter(|r| !r.is_empty())
                        .unwrap_or_else(|| "user".into()),
                    pause: change.pause,
                };
                let stop = pb::Stop {
                    reason: asked.reason.clone(),
                    snapshot_key: self.next_snapshot_key(),
                };
                self.stop_asked = Some(asked);
                Some(dispatcher_frame::Kind::Stop(stop))
            }
            _ => return Ok(Flow::Continue),
        };
        if let Some(kind) = kind {
            self.send(kind).await;
        }
        if user_event {
            self.input_seq = e.seq;
            let (ctx, id) = (self.ctx, self.session.id);
            durably(ctx, || ctx.store.set_input_seq(id, e.seq)).await?;
            if e.kind == ev::USER_MESSAGE && self.open_turns == 1 {
                self.turn_message_seq = e.seq;
                self.turn_status(StatusEvent::TurnStarted).await?;
            }
        }
        Ok(Flow::Continue)
    }

    async fn on_expiry(&mut self, expiry: Expiry) -> Result<Flow> {
        self.deadlines.fired(expiry);
        let result = match expiry {
            Expiry::Hard => {
                let t = self.session.timeout.unwrap_or_default();
                tracing::info!(timeout = ?t, "hard session timeout elapsed");
                let reason = format!("session timeout of {}s elapsed", t.as_secs_f64());
                self.transition(StatusEvent::TimedOut, &reason, StatusDetail::default())
                    .await
            }
            Expiry::Inactive => {
                tracing::info!("inactivity timeout elapsed; stopping");
                let idle = self
                    .session
                    .inactivity_timeout
                    .unwrap_or(self.ctx.inactivity_default);
                let detail = StatusDetail {
                    inactivity_timeout_s: Some(idle.as_secs_f64()),
                    ..StatusDetail::default()
                };
                self.transition(StatusEvent::StopRequested, "inactivity", detail)
                    .await
            }
        };
        match result {
            // Already stopping or ended: the frames say how it ends.
            Ok(()) | Err(Error::Transition(_)) => Ok(Flow::Continue),
            Err(e) => Err(e),
        }
    }

    async fn on_node_down(&mut self) -> Result<Flow> {
        let node = self.link.placed.link.name();
        let why = self.link.placed.link.last_error();
        tracing::warn!(%node, %why, "node down; rescheduling this session");
        let reason = format!("node {node} down: {why}");
        let detail = StatusDetail {
            node: Some(node),
            ..StatusDetail::default()
        };
        self.transition(StatusEvent::NodeLost, &reason, detail)
            .await?;
        Ok(Flow::Done)
    }

    /// Shutting down: leave the run going on its node and the session to
    /// the next owner, which re-attaches to it (a rolling update loses no
    /// turn). Everything queued for the log is committed before the session
    /// is re-queued (the writer keeps order); a stop under way is left to
    /// finish here first.
    async fn on_shutdown(&mut self) -> Flow {
        if self.stop_asked.is_some() {
            self.handing_back = Some(tokio::time::Instant::now() + HAND_BACK_TIMEOUT);
            return Flow::Continue;
        }
        let reason = format!(
            "dispatcher {} shut down; re-queued for another to re-attach",
            self.ctx.dispatcher_id
        );
        match self
            .transition(StatusEvent::NodeLost, &reason, StatusDetail::default())
            .await
        {
            Ok(()) => tracing::info!("shutting down: the run is left to the next owner"),
            Err(e) => {
                tracing::warn!(error = %e, "shutting down: could not re-queue the session; its lease will")
            }
        }
        Flow::Done
    }
}

async fn recv(feed: &mut Option<Feed>) -> Option<Result<Arc<Event>>> {
    match feed {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}
