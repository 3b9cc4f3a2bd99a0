//! The queue: claims sessions while nodes have room and starts a driver for
//! each; LISTEN/NOTIFY is the wake-up hint, the poll timer the guarantee.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use crate::driver::{self, Ctx};
use crate::handoff::HandedOff;
use crate::store::{EVENTS_CHANNEL, QUEUE_CHANNEL};

/// Most sessions claimed in one statement.
const CLAIM_BATCH: u32 = 64;

/// What wakes the claim loop besides its own dispatcher queueing a session
/// and its nodes' changes.
pub(crate) struct Wakes {
    /// Another dispatcher queued a session (its `NOTIFY`).
    pub wake: Arc<Notify>,
    /// Sessions this dispatcher claimed as it created them.
    pub handed_off: HandedOff,
    /// The poll: the guarantee behind the hints.
    pub poll: Duration,
}

/// Claims queued sessions while nodes have room, and drives each one on
/// `drivers` (shutdown waits for them to hand their sessions back), with
/// those the API claimed as it created them.
pub(crate) async fn claim_loop(ctx: Arc<Ctx>, owner: String, drivers: TaskTracker, wakes: Wakes) {
    let Wakes {
        wake,
        mut handed_off,
        poll,
    } = wakes;
    let notices = ctx.store.notices();
    loop {
        // Re-attaches whatever the load (a run still going on an up node
        // needs no slot, and a full fleet is when a lost dispatcher's
        // sessions most need taking over), beside the claims of new
        // sessions: two statements at once, not one after the other.
        tokio::join!(
            claim_reattaches(&ctx, &owner, &drivers),
            claim_queued(&ctx, &owner, &drivers)
        );
        loop {
            tokio::select! {
                // Claimed as it was created: driven at once, and no claim
                // statement follows.
                Some((claim, reservation)) = handed_off.recv() => {
                    tracing::info!(session_id = %claim.session.id, "claimed session at its creation");
                    drivers.spawn(driver::drive_held(ctx.clone(), claim, reservation));
                    continue;
                }
                () = wake.notified() => {}
                // Queued here: no round trip through Postgres's NOTIFY.
                () = notices.queued() => {}
                () = ctx.nodes.changed.notified() => {}
                () = tokio::time::sleep(poll) => {}
                () = ctx.shutdown.cancelled() => {
                    requeue_handed_off(&ctx, handed_off).await;
                    return;
                }
            }
            break;
        }
    }
}

/// At shutdown: what the API claimed at creation and no driver took yet
/// goes back to the queue.
async fn requeue_handed_off(ctx: &Ctx, handed_off: HandedOff) {
    for claim in handed_off.close() {
        crate::handoff::give_back(&ctx.log, &claim).await;
    }
}

/// One claim per free slot; the driver takes the slot when it places.
async fn claim_queued(ctx: &Arc<Ctx>, owner: &str, drivers: &TaskTracker) {
    let mut free = ctx.nodes.free_slots();
    while free > 0 && !ctx.shutdown.is_cancelled() {
        let batch = free.min(CLAIM_BATCH);
        match ctx.store.claim(owner, batch as usize).await {
            Ok(sessions) => {
                let claimed = u32::try_from(sessions.len()).unwrap_or(batch);
                free = free.saturating_sub(claimed);
                for claim in sessions {
                    tracing::info!(session_id = %claim.session.id, "claimed session");
                    drivers.spawn(driver::drive(ctx.clone(), claim));
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
}

/// Claims the rescheduling sessions whose last run was on a node this
/// dispatcher sees up, and drives each (it re-attaches, or places anew
/// when the run is gone).
async fn claim_reattaches(ctx: &Arc<Ctx>, owner: &str, drivers: &TaskTracker) {
    let nodes = ctx.nodes.up_names();
    while !ctx.shutdown.is_cancelled() {
        match ctx
            .store
            .claim_reattach(owner, CLAIM_BATCH as usize, &nodes)
            .await
        {
            Ok(sessions) => {
                let full = sessions.len() == CLAIM_BATCH as usize;
                for claim in sessions {
                    tracing::info!(session_id = %claim.session.id, node = %claim.session.node, "claimed a session to re-attach");
                    drivers.spawn(driver::drive(ctx.clone(), claim));
                }
                if !full {
                    return;
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "claiming sessions to re-attach failed");
                return;
            }
        }
    }
}

/// Listens for queue wake-ups and other dispatchers' event notices, and
/// reconnects with backoff when the connection drops.
pub(crate) async fn listen(ctx: Arc<Ctx>, wake: Arc<Notify>) {
    let mut backoff =
        berth_common::retry::Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    loop {
        let listener = async {
            let mut l = sqlx::postgres::PgListener::connect_with(ctx.store.pool()).await?;
            l.listen_all([QUEUE_CHANNEL, EVENTS_CHANNEL]).await?;
            Ok::<_, sqlx::Error>(l)
        };
        let mut listener = tokio::select! {
            () = ctx.shutdown.cancelled() => return,
            l = listener => match l {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(error = %e, "LISTEN failed; the queue falls back to polling");
                    tokio::time::sleep(backoff.next_delay()).await;
                    continue;
                }
            }
        };
        backoff.reset();
        loop {
            let n = tokio::select! {
                () = ctx.shutdown.cancelled() => return,
                n = listener.recv() => n,
            };
            match n {
                Ok(n) if n.channel() == QUEUE_CHANNEL => wake.notify_one(),
                Ok(n) => {
                    if let Some((id, seq)) = parse_event_notice(n.payload()) {
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

/// `{session_id}:{last_seq}`, as the store's statements notify it.
fn parse_event_notice(payload: &str) -> Option<(Uuid, i64)> {
    let (id, seq) = payload.split_once(':')?;
    Some((id.parse().ok()?, seq.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_notices_parse_and_junk_is_ignored() {
        let id = Uuid::now_v7();
        assert_eq!(parse_event_notice(&format!("{id}:42")), Some((id, 42)));
        for junk in ["", "x:1", &format!("{id}"), &format!("{id}:x")] {
            assert_eq!(parse_event_notice(junk), None, "{junk}");
        }
    }
}
