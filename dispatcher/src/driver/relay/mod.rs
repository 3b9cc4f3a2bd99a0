//! The relay: node frames into the log, user input from the log to the node,
//! until the agent exits, the node is lost, a deadline fires, or this
//! dispatcher shuts down (and leaves the run to the next owner, which
//! re-attaches to it).
//!
//! The node keeps every frame until the relay acknowledges that its events
//! are persisted (`Ack`, sent as the writer commits them), so an owner that
//! dies loses nothing: the next one re-attaches and is sent the rest.

use berth_common::events::payload::StatusDetail;
use berth_common::events::{self as ev, payload};
use berth_proto::node::v1 as pb;
use berth_proto::node::v1::{dispatcher_frame, node_frame};
use tracing::Instrument;

mod approvals;
mod credentials;
mod due;
mod exit;
mod state;

pub(super) use state::Relay;
use state::{ACK_INTERVAL, Feed, Flow, REFOLLOW_MAX, REFOLLOW_MIN, StopAsked};

use super::deadlines::Expiry;
use crate::driver::ctx::durably;
use crate::driver::start::start_label;
use crate::error::{Error, Result};
use crate::nodes::wire::node_line;
use crate::session::usage;
use crate::session::{SessionStatus, StatusEvent, snapshot_key};
use crate::store::UsageRecorded;

/// How long a shutting-down dispatcher waits for a node to snapshot a
/// session it hands back.
const HAND_BACK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);

impl Relay<'_> {
    /// Relays until the run ends.
    pub(super) async fn run(mut self) -> Result<()> {
        // A start that carried a message is a turn under way: the start
        // already made the session `running` (no second change to log).
        if self.link.first_message_seq > 0 {
            self.deadlines.touch();
        }
        Box::pin(self.load_tools()).await?;
        Box::pin(self.start_credentials()).await?;
        loop {
            // Every handler runs boxed, so a held session's future is only
            // what it waits on: inline, thousands of idle sessions each kept
            // the largest handler's state (a frame's was over 2 KB). A
            // frame's box is one allocation per frame, against the commit
            // its events wait for.
            let flow = tokio::select! {
                // Every clock at once: one timer, set to the first deadline.
                due = due::wait(self.next_due()) => Box::pin(self.on_due(due)).await?,
                frame = self.link.frames.message() => Box::pin(self.on_frame(frame)).await?,
                item = recv(&mut self.feed) => Box::pin(self.on_input(item)).await?,
                // The node missed its lease: its stream may never end by itself.
                () = self.link.placed.link.down() => Box::pin(self.on_node_down()).await?,
                () = self.ctx.shutdown.cancelled(), if self.handing_back.is_none() => Box::pin(self.on_shutdown()).await,
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
        let frame = Box::new(pb::DispatcherFrame {
            epoch: self.session.epoch,
            kind: Some(kind),
        });
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
                node_frame::Kind::Line(l) => {
                    self.line_relayed(node_seq);
                    match self.turns.front().cloned() {
                        // The agent's events go out in their turn's trace.
                        Some(turn) => self.on_line(l, node_seq).instrument(turn).await,
                        None => self.on_line(l, node_seq).await,
                    }
                }
                node_frame::Kind::Checkpoint(c) => {
                    // The session resumes from it if this run is lost.
                    let (ctx, id) = (self.ctx, self.session.id);
                    Box::pin(durably(ctx, || {
                        ctx.store
                            .record_checkpoint(id, &c.snapshot_key, c.snapshot_bytes)
                    }))
                    .await?;
                    tracing::debug!(key = %c.snapshot_key, bytes = c.snapshot_bytes, "checkpoint recorded");
                    Ok(Flow::Continue)
                }
                node_frame::Kind::CredentialUse(u) => {
                    if u.rejected {
                        Box::pin(self.on_credential_rejected(&u.credential_id)).await?;
                    } else {
                        Box::pin(self.ctx.credential_used(&u)).await;
                    }
                    Ok(Flow::Continue)
                }
                node_frame::Kind::Exited(x) => {
                    let flow = Box::pin(self.on_exit(x)).await;
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
                Box::pin(self.transition(StatusEvent::NodeLost, &reason, StatusDetail::default()))
                    .await?;
                Ok(Flow::Done)
            }
        }
    }

    /// Tells the node which frames are persisted, when that moved, and
    /// looks again later while some are not.
    async fn ack(&mut self) -> Flow {
        let persisted = self.persisted.load(std::sync::atomic::Ordering::Acquire);
        if persisted > self.acked {
            self.acked = persisted;
            let node_seq = u64::try_from(persisted).unwrap_or(0);
            self.send(dispatcher_frame::Kind::Ack(pb::Ack { node_seq }))
                .await;
        }
        self.ack_at =
            (self.acked < self.received).then(|| tokio::time::Instant::now() + ACK_INTERVAL);
        Flow::Continue
    }

    /// A line frame went to the writer: it is acknowledged once persisted.
    fn line_relayed(&mut self, node_seq: u64) {
        self.received = self
            .received
            .max(i64::try_from(node_seq).unwrap_or(i64::MAX));
        if self.ack_at.is_none() {
            self.ack_at = Some(tokio::time::Instant::now() + ACK_INTERVAL);
        }
    }

    async fn on_line(&mut self, line: pb::RuntimeLine, node_seq: u64) -> Result<Flow> {
        let id = self.session.id;
        self.deadlines.touch();
        if std::mem::take(&mut self.first_event) {
            metrics::histogram!(crate::metrics::FIRST_EVENT, "start" => start_label(self.link.start))
                .record(self.link.claimed.elapsed().as_secs_f64());
        }
        // The runtime's own session id (for `--resume` after a lost run) is
        // recorded once, after the line that carries it is queued: the line
        // commits (and reaches clients) meanwhile, and both are done before
        // this relay acknowledges anything to the node.
        let runtime_id = (!self.runtime_id_seen && !line.runtime_session_id.is_empty())
            .then(|| line.runtime_session_id.clone());
        let flow = self.relay_line(line, node_seq).await?;
        if let Some(runtime_id) = runtime_id {
            self.runtime_id_seen = true;
            let ctx = self.ctx;
            Box::pin(durably(ctx, || {
                ctx.store.set_runtime_session_id(id, &runtime_id)
            }))
            .await?;
        }
        Ok(flow)
    }

    /// Persists (and relays) one line of the agent's, with its turn's
    /// usage when it ends a turn.
    async fn relay_line(&mut self, mut line: pb::RuntimeLine, node_seq: u64) -> Result<Flow> {
        let (id, epoch) = (self.session.id, self.session.epoch);
        let turn_end = line.turn_end.take();
        let events = node_line(line);
        self.relayed.increment(events.len() as u64);
        let node_seq = i64::try_from(node_seq).unwrap_or(i64::MAX);
        if turn_end.is_none()
            && let Some(effect) = self.tool_effect(&events)
        {
            return Box::pin(self.on_tool_line(events, node_seq, effect)).await;
        }
        let Some(u) = turn_end else {
            self.ctx
                .log
                .append_line_queued(id, epoch, events, node_seq, &self.persisted)
                .await?;
            return Ok(Flow::Continue);
        };
        Box::pin(self.on_turn_end(events, node_seq, u)).await
    }

    /// A line that ends a turn: it commits with the turn's usage, and the
    /// session goes idle when no other turn is open.
    async fn on_turn_end(
        &mut self,
        events: Vec<crate::session::NewEvent>,
        node_seq: i64,
        u: pb::TurnUsage,
    ) -> Result<Flow> {
        let (id, epoch) = (self.session.id, self.session.epoch);
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
        // The turn ends: its span closes.
        self.turns.pop_front();
        if self.turns.is_empty() {
            self.turn_status(StatusEvent::TurnEnded).await?;
        }
        Ok(Flow::Continue)
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
            .transition(
                StatusEvent::StopRequested,
                crate::session::notify::BUDGET_REASON,
                detail,
            )
            .await
        {
            Ok(()) | Err(Error::Transition(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn on_input(&mut self, item: Option<crate::log::Followed>) -> Result<Flow> {
        let e = match item {
            Some(Ok(e)) => {
                self.refollow = None;
                e
            }
            // Shutting down: the shutdown branch ends the relay.
            Some(Err(_)) if self.ctx.shutdown.is_cancelled() => {
                self.feed = None;
                return Ok(Flow::Continue);
            }
            Some(Err(e)) => {
                let wait = self
                    .refollow
                    .get_or_insert_with(|| {
                        Box::new(berth_common::retry::Backoff::new(
                            REFOLLOW_MIN,
                            REFOLLOW_MAX,
                        ))
                    })
                    .next_delay();
                tracing::warn!(error = %e, ?wait, "input feed failed; following it again after a wait");
                self.feed = None;
                self.refollow_at = Some(tokio::time::Instant::now() + wait);
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
                let turn = state::turn_span(self.session, e.seq, e.traceparent.as_deref());
                let traceparent = berth_common::traces::traceparent_of(&turn).unwrap_or_default();
                self.turns.push_back(turn);
                Some(dispatcher_frame::Kind::Message(pb::UserMessage {
                    text,
                    seq: e.seq,
                    traceparent,
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
            if e.kind == ev::USER_MESSAGE && self.turns.len() == 1 {
                self.turn_message_seq = e.seq;
                self.turn_status(StatusEvent::TurnStarted).await?;
            }
        }
        Ok(Flow::Continue)
    }

    /// Follows the input again after the feed failed, from the last user
    /// event forwarded.
    fn follow_again(&mut self) -> Flow {
        self.refollow_at = None;
        let feed = Feed::new(self.ctx.log.follow(self.session.id, self.input_seq));
        self.feed = Some(feed);
        Flow::Continue
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

async fn recv(feed: &mut Option<Feed>) -> Option<crate::log::Followed> {
    match feed {
        Some(rx) => futures::StreamExt::next(rx.get_mut()).await,
        None => std::future::pending().await,
    }
}
