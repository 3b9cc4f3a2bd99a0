//! The event log: a group-commit writer in front of the store, and a hub that
//! fans persisted events out to live subscribers.
//!
//! Invariants:
//! - every write for a session goes through one ordered queue per dispatcher,
//!   so a session's events, usage rows and status changes are persisted in the
//!   order they were submitted; writes queued while a statement is in flight
//!   are committed together in the next one (no per-event round trip). The
//!   one write beside the queue releases dead dispatchers' sessions, which no
//!   run of this dispatcher writes to (it is fenced by status and epoch like
//!   any status change). The one write the writer takes ahead of the queue
//!   is a re-attached run's start, the first write of its session here;
//! - writes from a run carry its epoch and are refused once the session has
//!   moved to a newer run, so a superseded run can add nothing to the log;
//! - a follower subscribes to the hub *before* reading history and drops
//!   anything at or below the last seq it sent: no gap, no duplicate;
//! - a follower that falls behind the hub's bounded feed, or hears of events
//!   another dispatcher wrote, reads them from the store. It never blocks the
//!   writer and never loses an event.

mod follower;
mod hub;
mod writer;

pub(crate) use follower::Follow;

use std::sync::Arc;

use berth_common::events::payload::StatusDetail;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use crate::error::{Error, Result};
use crate::session::usage::Turn;
use crate::session::{Event, NewEvent, StatusEvent};
use crate::store::{
    Abandoned, Append, Change, Orphan, Placement, Released, Store, ToolEffect, ToolOutcome,
    Transitioned, UsageRecorded,
};

/// What a follower sends: the next event, or the error that ended it.
/// The error is boxed: a channel allocates its first block of slots when
/// it is made, and thousands of held streams each keep one.
pub(crate) type Followed = std::result::Result<Arc<Event>, Box<Error>>;

/// Most writes committed in one statement.
const MAX_BATCH: usize = 1024;

/// A status change to commit, and whom to tell.
struct StatusOp {
    session: Uuid,
    /// Applies only while the session is at this epoch (fencing).
    epoch: Option<i64>,
    event: StatusEvent,
    reason: String,
    detail: StatusDetail,
    /// The trace the change is made in (its event records it).
    traceparent: Option<String>,
    /// A start: where the run was placed. The driver that claimed the
    /// session knows it `starting` at `epoch` (see [`Change::assumed`]).
    placement: Option<Placement>,
    done: oneshot::Sender<Result<Transitioned>>,
}

impl StatusOp {
    /// The change as the store applies it.
    fn change(&self) -> Change<'_> {
        Change {
            id: self.session,
            epoch: self.epoch,
            assumed: self
                .placement
                .as_ref()
                .and(self.epoch)
                .map(|_| crate::session::SessionStatus::Starting),
            placement: self.placement.as_ref(),
            event: self.event,
            reason: &self.reason,
            detail: &self.detail,
            traceparent: self.traceparent.as_deref(),
        }
    }
}

/// A write waiting for the writer.
enum Op {
    Append {
        append: Append,
        done: Option<oneshot::Sender<Result<Event>>>,
        /// When it was queued (persist lag).
        queued: std::time::Instant,
    },
    Transition(StatusOp),
    /// The events of one agent line: committed together, consecutively.
    Line {
        appends: Vec<Append>,
        queued: std::time::Instant,
    },
    /// A line's events (maybe none) and a tool request's change:
    /// committed together.
    Tool {
        appends: Vec<Append>,
        effect: ToolEffect,
        done: oneshot::Sender<Result<ToolOutcome>>,
    },
    /// A line that ends a turn, and the turn: committed together.
    LineTurn {
        appends: Vec<Append>,
        session: Uuid,
        turn: Turn,
        done: oneshot::Sender<Result<UsageRecorded>>,
    },
}

/// The event log of every session this dispatcher touches.
pub struct EventLog {
    store: Store,
    ops: mpsc::Sender<Op>,
    /// Ops the writer takes before the queue's: re-attached runs' starts.
    /// Nothing of such a session is queued here before its start (its
    /// dispatcher just claimed it, and a re-attach writes nothing first),
    /// so no session's order changes, and a takeover does not wait behind
    /// the survivor's backlog of other sessions' events.
    ahead: mpsc::Sender<Op>,
    hub: Arc<hub::Hub>,
    /// Ends every follower with UNAVAILABLE, so clients reconnect elsewhere.
    shutdown: CancellationToken,
    /// The writer, and the followers' store reads (shutdown awaits them).
    tasks: TaskTracker,
}

/// The appends of one agent line, from node frame `node_seq` of the run at
/// `epoch`.
fn line_appends(
    session: Uuid,
    epoch: i64,
    events: Vec<NewEvent>,
    node_seq: i64,
    persisted: &Arc<std::sync::atomic::AtomicI64>,
) -> Vec<Append> {
    events
        .into_iter()
        .map(|event| Append {
            session,
            epoch: Some(epoch),
            event,
            node_seq: Some(node_seq),
            persisted: Some(persisted.clone()),
        })
        .collect()
}

fn writer_stopped<T>(_: T) -> Error {
    Error::Unavailable("the event writer has stopped".into())
}

impl EventLog {
    /// Starts the writer on `tasks`, where followers read the store too.
    /// The writer drains its queue and stops once the last handle on the
    /// log is dropped; followers end after `shutdown`.
    pub fn start(store: Store, shutdown: CancellationToken, tasks: TaskTracker) -> Arc<Self> {
        let (ops, rx) = mpsc::channel(MAX_BATCH * 4);
        let (ahead, ahead_rx) = mpsc::channel(MAX_BATCH);
        let hub = Arc::new(hub::Hub::default());
        tasks.spawn(writer::run(
            store.clone(),
            hub.clone(),
            writer::Queues {
                ops: rx,
                ahead: ahead_rx,
            },
            shutdown.clone(),
        ));
        Arc::new(Self {
            store,
            ops,
            ahead,
            hub,
            shutdown,
            tasks,
        })
    }

    async fn submit(&self, op: Op) -> Result<()> {
        self.ops.send(op).await.map_err(writer_stopped)
    }

    /// Appends a client's event (no run's epoch) and waits until it is persisted.
    pub(crate) async fn append(&self, session: Uuid, event: NewEvent) -> Result<Event> {
        let (done, rx) = oneshot::channel();
        let append = Append {
            session,
            epoch: None,
            event,
            node_seq: None,
            persisted: None,
        };
        self.submit(Op::Append {
            append,
            done: Some(done),
            queued: std::time::Instant::now(),
        })
        .await?;
        rx.await.map_err(writer_stopped)?
    }

    /// Queues an event of the run at `epoch` behind everything queued before
    /// it, without waiting. Failures (the run was superseded, the session
    /// deleted) are logged by the writer.
    pub(crate) async fn append_queued(
        &self,
        session: Uuid,
        epoch: i64,
        event: NewEvent,
    ) -> Result<()> {
        let append = Append {
            session,
            epoch: Some(epoch),
            event,
            node_seq: None,
            persisted: None,
        };
        self.submit(Op::Append {
            append,
            done: None,
            queued: std::time::Instant::now(),
        })
        .await
    }

    /// Queues the events of one line of the run at `epoch`, like
    /// [`Self::append_queued`]; they land consecutively, the first carrying
    /// the line.
    /// `node_seq` is the node frame of the line: once its events are
    /// persisted it becomes the session's re-attach cursor and is stored
    /// in `persisted` (the relay acknowledges it to the node).
    pub(crate) async fn append_line_queued(
        &self,
        session: Uuid,
        epoch: i64,
        events: Vec<NewEvent>,
        node_seq: i64,
        persisted: &Arc<std::sync::atomic::AtomicI64>,
    ) -> Result<()> {
        let appends = line_appends(session, epoch, events, node_seq, persisted);
        self.submit(Op::Line {
            appends,
            queued: std::time::Instant::now(),
        })
        .await
    }

    /// Appends the events of a line that ends a turn (like
    /// [`Self::append_line_queued`]) together with the turn's usage, in one
    /// transaction, and waits: a line is never persisted without its usage.
    /// Traced as `events.persist` (the turn's commit).
    #[tracing::instrument(name = "events.persist", level = "info", skip_all, fields(events = events.len()))]
    pub(crate) async fn append_line_with_usage(
        &self,
        session: Uuid,
        epoch: i64,
        events: Vec<NewEvent>,
        node_seq: i64,
        persisted: &Arc<std::sync::atomic::AtomicI64>,
        turn: Turn,
    ) -> Result<UsageRecorded> {
        let appends = line_appends(session, epoch, events, node_seq, persisted);
        let (done, rx) = oneshot::channel();
        self.submit(Op::LineTurn {
            appends,
            session,
            turn,
            done,
        })
        .await?;
        rx.await.map_err(writer_stopped)?
    }

    /// Appends the events of a line that asks or withdraws a tool
    /// permission (like [`Self::append_line_queued`]) with the request's
    /// change, in one transaction, and waits. Traced as `events.persist`.
    #[tracing::instrument(name = "events.persist", level = "info", skip_all, fields(events = events.len()))]
    pub(crate) async fn append_line_with_tool(
        &self,
        session: Uuid,
        epoch: i64,
        events: Vec<NewEvent>,
        node_seq: i64,
        persisted: &Arc<std::sync::atomic::AtomicI64>,
        effect: ToolEffect,
    ) -> Result<ToolOutcome> {
        let appends = line_appends(session, epoch, events, node_seq, persisted);
        self.tool_op(appends, effect).await
    }

    /// Answers or closes tool permission requests (see [`ToolEffect`]),
    /// ordered after everything queued before it.
    pub(crate) async fn tool(&self, effect: ToolEffect) -> Result<ToolOutcome> {
        self.tool_op(Vec::new(), effect).await
    }

    async fn tool_op(&self, appends: Vec<Append>, effect: ToolEffect) -> Result<ToolOutcome> {
        let (done, rx) = oneshot::channel();
        self.submit(Op::Tool {
            appends,
            effect,
            done,
        })
        .await?;
        rx.await.map_err(writer_stopped)?
    }

    /// Applies a status change, ordered after everything queued before it.
    pub(crate) async fn transition(
        &self,
        session: Uuid,
        event: StatusEvent,
        reason: &str,
        detail: StatusDetail,
    ) -> Result<Transitioned> {
        self.transition_op(session, None, event, reason, detail, None)
            .await
    }

    /// A transition fenced by epoch: it applies only while the session is
    /// still at `epoch`, so a superseded run cannot move the session of the
    /// run that replaced it ([`Error::Superseded`] otherwise).
    pub(crate) async fn transition_at(
        &self,
        session: Uuid,
        epoch: i64,
        event: StatusEvent,
        reason: &str,
        detail: StatusDetail,
    ) -> Result<Transitioned> {
        self.transition_op(session, Some(epoch), event, reason, detail, None)
            .await
    }

    /// Records the start of the run at `epoch` (the driver's claim) and
    /// where it was placed, in one statement: see [`StatusOp::placement`].
    /// A re-attached run's start goes ahead of the queue (see
    /// [`EventLog::ahead`]).
    pub(crate) async fn started_at(
        &self,
        session: Uuid,
        epoch: i64,
        busy: bool,
        detail: StatusDetail,
        placement: Placement,
    ) -> Result<Transitioned> {
        let event = StatusEvent::Started { busy };
        self.transition_op(session, Some(epoch), event, "", detail, Some(placement))
            .await
    }

    async fn transition_op(
        &self,
        session: Uuid,
        epoch: Option<i64>,
        event: StatusEvent,
        reason: &str,
        detail: StatusDetail,
        placement: Option<Placement>,
    ) -> Result<Transitioned> {
        let (done, rx) = oneshot::channel();
        // A re-attached run's start goes ahead of the queue (see `ahead`).
        let queue = match &placement {
            Some(p) if p.attached => &self.ahead,
            _ => &self.ops,
        };
        let op = Op::Transition(StatusOp {
            session,
            epoch,
            event,
            reason: reason.to_string(),
            detail,
            traceparent: berth_common::traces::current(),
            placement,
            done,
        });
        queue.send(op).await.map_err(writer_stopped)?;
        rx.await.map_err(writer_stopped)?
    }

    /// Releases a page of the sessions `whose` dispatcher left (see
    /// [`Store::release_orphans`]) beside the writer's queue, publishes their
    /// status changes, and wakes the claim loops for the re-queued ones.
    pub(crate) async fn release_orphans(
        &self,
        whose: Abandoned<'_>,
        why: &(dyn Fn(&Orphan) -> (String, StatusDetail) + Sync),
    ) -> Result<Released> {
        let released = self.store.release_orphans(whose, why).await?;
        let mut events = Vec::with_capacity(released.moved.len());
        for (_, t) in &released.moved {
            writer::count_change(t);
            events.extend(t.event.clone().map(Arc::new));
        }
        self.hub.publish(&events);
        if released
            .moved
            .iter()
            .any(|(_, t)| crate::session::SessionStatus::CLAIMABLE.contains(&t.to))
        {
            self.store.notify_queue().await?;
        }
        Ok(released)
    }

    /// Another dispatcher persisted `session`'s events up to `seq`.
    pub(crate) fn remote_append(&self, session: Uuid, seq: i64) {
        self.hub.remote(session, seq);
    }

    /// Streams the session's events after `after_seq`, then live ones, ending
    /// after the event that stops the session's latest run (earlier runs'
    /// ends, before a resume, pass through). An error ends the stream.
    pub(crate) fn follow(&self, session: Uuid, after_seq: i64) -> Follow {
        let feed = self.hub.subscribe(session);
        follower::follow(
            self.store.clone(),
            session,
            after_seq,
            feed,
            self.shutdown.clone(),
            self.tasks.clone(),
        )
    }
}
