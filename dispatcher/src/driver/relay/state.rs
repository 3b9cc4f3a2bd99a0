//! The relay's state: what one run's relay knows between steps.

use std::sync::Arc;
use std::sync::atomic::AtomicI64;

use crate::driver::ctx::Ctx;
use crate::driver::deadlines::Deadlines;
use crate::driver::start::Link;
use crate::driver::tools::PendingTools;
use crate::session::Session;
use crate::session::usage::RunningTotals;

/// How often the relay tells the node which frames are persisted.
pub(super) const ACK_INTERVAL: std::time::Duration = std::time::Duration::from_millis(100);

/// The first and longest waits before following the input again after
/// the feed failed.
pub(super) const REFOLLOW_MIN: std::time::Duration = std::time::Duration::from_millis(200);
pub(super) const REFOLLOW_MAX: std::time::Duration = std::time::Duration::from_secs(10);

/// Whether the relay goes on after a step.
pub(super) enum Flow {
    Continue,
    /// The run is over; its end is in the log.
    Done,
}

/// The input feed. Wrapped: the relay is shared (`&self`) across its
/// awaits, so it must be `Sync`, and a follower's stream is not; the
/// wrapper allows only `&mut` access, which is `Sync` for anything `Send`.
pub(super) type Feed = sync_wrapper::SyncWrapper<crate::log::Follow>;

/// One run's relay state.
pub(crate) struct Relay<'a> {
    pub(super) ctx: &'a Ctx,
    pub(super) session: &'a Session,
    pub(super) link: Link,
    /// Seq of the last user event forwarded to the node.
    pub(super) input_seq: i64,
    pub(super) feed: Option<Feed>,
    /// Waits between re-follows while the input feed keeps failing (the
    /// database is down or overloaded): set on the first failure, cleared
    /// by the next event. Thousands of relays re-following at a fixed
    /// interval would come back all at once.
    pub(super) refollow: Option<Box<berth_common::retry::Backoff>>,
    /// When the failed input feed is followed again (the relay goes on
    /// relaying the node's frames meanwhile).
    pub(super) refollow_at: Option<tokio::time::Instant>,
    pub(super) runtime_id_seen: bool,
    /// The runtime's running totals after the last turn (usage baseline).
    pub(super) runtime_totals: RunningTotals,
    pub(super) deadlines: Deadlines,
    pub(super) stop_asked: Option<StopAsked>,
    pub(super) first_event: bool,
    /// Set when this dispatcher shuts down: the node was asked to stop the
    /// agent with a snapshot, and the session is re-queued once it has.
    pub(super) handing_back: Option<tokio::time::Instant>,
    /// One handle for the run: no registry lookup per event.
    pub(super) relayed: metrics::Counter,
    /// The last node frame whose events the writer committed, and the last
    /// one acknowledged to the node.
    pub(super) persisted: Arc<AtomicI64>,
    pub(super) acked: i64,
    /// The last node frame relayed to the writer.
    pub(super) received: i64,
    /// When to tell the node what is persisted: set while frames are
    /// relayed and not acknowledged (an idle session never wakes for it).
    pub(super) ack_at: Option<tokio::time::Instant>,
    /// Tool permission requests the agent waits on.
    pub(super) tools: PendingTools,
    /// Seq of the `user.message` that started the turn in flight (0: unknown).
    pub(super) turn_message_seq: i64,
    /// The run's OAuth credentials, kept fresh on the node.
    pub(super) credentials: crate::driver::tokens::Credentials,
    /// The turns sent to the agent that have not ended yet, oldest first,
    /// each as its span: the agent's events are written in the oldest
    /// one's trace.
    pub(super) turns: std::collections::VecDeque<tracing::Span>,
}

impl<'a> Relay<'a> {
    /// `in_flight`: re-attached to a run whose turn is still going.
    pub(crate) fn new(ctx: &'a Ctx, session: &'a Session, mut link: Link, in_flight: bool) -> Self {
        let cursor = if link.attached { session.node_seq } else { 0 };
        // The start carried the first message: the agent has it, the
        // cursor is past it, and its turn is open.
        let first = link.first_message_seq;
        let input_seq = session.input_seq.max(first);
        let credentials = crate::driver::tokens::Credentials::new(
            std::mem::take(&mut link.credentials),
            link.attached,
        );
        // The turn the start carried, or the one a re-attached run has in
        // flight (in the run's trace): one span per open turn.
        let first_turn = (first > 0 || in_flight)
            .then(|| turn_span(session, first, link.first_traceparent.as_deref()));
        Self {
            ctx,
            session,
            link,
            input_seq,
            feed: Some(Feed::new(ctx.log.follow(session.id, input_seq))),
            refollow: None,
            refollow_at: None,
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
            received: cursor,
            ack_at: None,
            tools: PendingTools::default(),
            turn_message_seq: first,
            credentials,
            turns: first_turn.into_iter().collect(),
        }
    }
}

/// The span of the turn `message_seq` starts, in the trace the message
/// was sent in (else the run's).
pub(super) fn turn_span(
    session: &Session,
    message_seq: i64,
    traceparent: Option<&str>,
) -> tracing::Span {
    let span = tracing::info_span!(
        "session.turn",
        session_id = %session.id,
        message_seq,
        agent = session.agent.as_ref().map_or("", |a| a.0.as_str()),
    );
    berth_common::traces::adopt(&span, traceparent);
    span
}

/// A stop the driver asked the node for.
#[derive(Debug, Clone)]
pub(super) struct StopAsked {
    pub reason: String,
    pub pause: bool,
}
