//! Drives one claimed session: places it on a node ([`start`]), relays its
//! frames into the event log and user input from the log to the node
//! ([`relay`]), under its timeouts ([`deadlines`]).
//!
//! User input reaches the node *through the log*: `SendMessage` on any
//! dispatcher persists a `user.message` event; the driver (on the owning
//! dispatcher) follows the log and forwards each user event past the
//! session's `input_seq` cursor. So input is ordered, durable, and survives a
//! re-placement.
//!
//! Every write a driver makes carries its run's epoch: once another
//! placement has superseded the run, nothing it writes lands.

mod ctx;
mod deadlines;
mod relay;
mod start;
mod tokens;
mod tools;

pub(crate) use ctx::Ctx;
use ctx::durably;
use start::start_label;

use std::sync::Arc;

use berth_common::events::payload::StatusDetail;
use tracing::Instrument;

use crate::error::{Error, Result};
use crate::session::{Session, StatusEvent};
use crate::store::{Claimed, FirstInput, Placement};

/// Runs a claimed session from `starting` until its run ends.
pub(crate) fn drive(ctx: Arc<Ctx>, claim: Claimed) -> impl Future<Output = ()> + Send {
    drive_held(ctx, claim, ())
}

/// [`drive`], holding `held` (a slot reserved for the session) until the
/// session is placed, or could not be.
///
/// Not an `async fn`: one would keep its arguments for its whole life
/// beside what it moves them into, and a held session would carry its
/// claim (about 1 KB) three times.
pub(crate) fn drive_held(
    ctx: Arc<Ctx>,
    claim: Claimed,
    held: impl Send,
) -> impl Future<Output = ()> + Send {
    let Claimed {
        session,
        first_input,
    } = claim;
    let span = tracing::info_span!(
        "session",
        otel.name = "session.run",
        session_id = %session.id,
        epoch = session.epoch,
        agent = session.agent.as_ref().map_or("", |a| a.0.as_str()),
    );
    // The run joins the trace the session was created in.
    berth_common::traces::adopt(&span, session.traceparent.as_deref());
    async move {
        if let Err(e) = run(&ctx, &session, first_input, held).await {
            if let Error::Superseded { .. } | Error::Transition(_) = e {
                // Another placement owns the session now, or it left this
                // run (re-queued, stopped, timed out elsewhere): this run
                // just ends; failing the session would undo that.
                tracing::info!(error = %e, "the session left this run");
                return;
            }
            tracing::warn!(error = %e, "session run failed");
            let reason = e.to_string();
            let failed = ctx.log.transition_at(
                session.id,
                session.epoch,
                StatusEvent::Failed,
                &reason,
                StatusDetail::default(),
            );
            if let Err(e) = Box::pin(failed).await {
                tracing::debug!(error = %e, "could not mark the session failed");
            }
        }
    }
    .instrument(span)
}

/// Starts the run (placed, or re-attached), then relays it. Each phase is
/// boxed: what a held session keeps for its life is the relay's future,
/// not the largest of every step's before it.
async fn run(
    ctx: &Ctx,
    session: &Session,
    first_input: Option<FirstInput>,
    held: impl Send,
) -> Result<()> {
    let Some(started) = Box::pin(start_run(ctx, session, first_input, held)).await? else {
        return Ok(());
    };
    let Started {
        resumed,
        link,
        in_flight,
    } = started;
    let session = resumed.as_deref().unwrap_or(session);
    Box::pin(relay::Relay::new(ctx, session, link, in_flight).run()).await
}

/// A run that started: the session as it resumed (when a lost turn moved
/// its input cursor back), its link, and whether a re-attached run has a
/// turn in flight.
struct Started {
    /// Boxed: most runs do not resume, and a held session keeps this.
    resumed: Option<Box<Session>>,
    link: start::Link,
    in_flight: bool,
}

/// Places (or re-attaches) the run and records its start; `None` when it
/// did not start (re-queued, or failed with its reason logged).
async fn start_run(
    ctx: &Ctx,
    session: &Session,
    first_input: Option<FirstInput>,
    held: impl Send,
) -> Result<Option<Started>> {
    if session.epoch == 1 {
        let waited = (chrono::Utc::now() - session.create_time)
            .to_std()
            .unwrap_or_default();
        metrics::histogram!(crate::metrics::QUEUE_WAIT).record(waited.as_secs_f64());
        if let Some(tp) = &session.traceparent {
            berth_common::traces::record_interval(
                "session.queue_wait",
                tp,
                session.create_time.into(),
                std::time::SystemTime::now(),
                &[("session_id", session.id.to_string())],
            );
        }
    }
    let claimed = std::time::Instant::now();
    // A run its lost owner left may still be going on its node: take it
    // over. Else, a turn it had in flight is lost (and said so).
    let mut attached = None;
    let mut resumed = None;
    if !session.node.is_empty() {
        attached = Box::pin(start::attach(ctx, session, claimed)).await?;
        if attached.is_none() {
            resumed = Some(Box::new(Box::pin(lost_turn(ctx, session)).await?));
        }
    }
    let session = resumed.as_deref().unwrap_or(session);
    let placed = match attached {
        Some(link) => Ok(Some(link)),
        None => {
            // The claim read the first input at its cursor; a lost turn
            // moved the cursor back since.
            let first_input = if resumed.is_some() {
                let (id, after) = (session.id, session.input_seq);
                durably(ctx, || ctx.store.first_input(id, after)).await?
            } else {
                first_input
            };
            let place = tracing::info_span!("session.place", session_id = %session.id);
            Box::pin(start::start(ctx, session, claimed, first_input).instrument(place)).await
        }
    };
    // Placed (the placement holds its slot now), or not.
    drop(held);
    let result = match &placed {
        Ok(Some(_)) => "placed",
        Ok(None) => "not_placed",
        Err(_) => "error",
    };
    metrics::histogram!(crate::metrics::PLACEMENT, "result" => result)
        .record(claimed.elapsed().as_secs_f64());
    let Some(link) = placed? else {
        return Ok(None);
    };
    metrics::histogram!(crate::metrics::SESSION_START, "start" => start_label(link.start))
        .record(claimed.elapsed().as_secs_f64());
    let node = link.placed.link.name();
    let first = link.first_message_seq;
    // Busy: the start carried a message, input waits, or (re-attached) a
    // turn is still going.
    let in_flight = link.attached
        && durably(ctx, || {
            ctx.store.turn_in_flight(session.id, session.input_seq)
        })
        .await?
        .is_some();
    let busy = first > 0
        || in_flight
        || durably(ctx, || {
            ctx.store.has_pending_input(session.id, session.input_seq)
        })
        .await?;
    let detail = StatusDetail {
        node: Some(node.clone()),
        epoch: Some(session.epoch),
        warm: Some(link.start != berth_proto::node::v1::StartPath::Cold),
        start: Some(start_label(link.start).into()),
        ..StatusDetail::default()
    };
    // The start and where it runs, in one statement.
    let placement = Placement {
        node: node.clone(),
        attached: link.attached,
        input_seq: first,
    };
    match ctx
        .log
        .started_at(session.id, session.epoch, busy, detail, placement)
        .await
    {
        Ok(_) => {}
        // A stop (or pause) asked while the run was starting: the run is
        // still this one's, and the relay passes the stop on to the node
        // (it follows the log from the claim). Ending here would leave the
        // session `stopping` with its agent orphaned, so its placement is
        // still recorded (a takeover re-attaches to the run).
        Err(Error::Transition(t)) if t.from == crate::session::SessionStatus::Stopping => {
            tracing::info!("stop asked while the session started; passing it on to the node");
            durably(ctx, || {
                ctx.store
                    .set_node(session.id, session.epoch, &node, link.attached, first)
            })
            .await?;
        }
        Err(e) => return Err(e),
    }
    tracing::info!(%node, start = start_label(link.start), attached = link.attached, "session started");
    Ok(Some(Started {
        resumed,
        link,
        in_flight,
    }))
}

/// The run this session's last owner placed is gone with its node. If it
/// had a turn in flight (input forwarded, no result), logs
/// `session.turn_lost` and, unless configured off, moves the input cursor
/// back so the turn's input is delivered again to the next run.
async fn lost_turn(ctx: &Ctx, session: &Session) -> Result<Session> {
    let mut s = session.clone();
    let Some(seq) = durably(ctx, || ctx.store.turn_in_flight(s.id, s.input_seq)).await? else {
        return Ok(s);
    };
    let lost = berth_common::events::payload::TurnLost {
        message_seq: seq,
        node: s.node.clone(),
        reason: "the run was lost with its node before the turn ended".into(),
        redelivered: ctx.redeliver_lost_turns,
    };
    tracing::warn!(message_seq = seq, node = %s.node, redeliver = ctx.redeliver_lost_turns, "a turn was lost with its node");
    metrics::counter!(crate::metrics::TURNS_LOST).increment(1);
    ctx.log
        .append_queued(
            s.id,
            s.epoch,
            crate::session::NewEvent::new(
                berth_common::events::SESSION_TURN_LOST,
                berth_common::events::payload::to_json(&lost),
            ),
        )
        .await?;
    if ctx.redeliver_lost_turns {
        durably(ctx, || ctx.store.rewind_input_seq(s.id, seq - 1, s.epoch)).await?;
        s.input_seq = seq - 1;
    }
    Ok(s)
}
