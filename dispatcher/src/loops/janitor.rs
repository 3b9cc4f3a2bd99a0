//! The janitor: this dispatcher's liveness heartbeat, and the sweeps any
//! dispatcher may run for the fleet: re-queue the sessions of dispatchers
//! that stopped heartbeating, fail sessions past their queue deadline, and
//! delete archived sessions' events past retention.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use berth_common::events::payload::StatusDetail;
use berth_common::sync::lock;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::error::Error;
use crate::log::EventLog;
use crate::session::StatusEvent;
use crate::store::{Abandoned, ORPHAN_PAGE, Orphan, Store};

/// Most pages of orphans one tick re-queues (the next tick goes on).
const MAX_ORPHAN_PAGES: usize = 50;

/// How often a dispatcher looks for dead dispatchers' sessions (at most).
const ORPHAN_SWEEP: Duration = Duration::from_secs(1);

/// How often a dispatcher deletes events past retention.
const RETENTION_INTERVAL: Duration = Duration::from_secs(600);

/// What the janitor works with.
pub(crate) struct Janitor {
    pub store: Store,
    pub log: Arc<EventLog>,
    /// This dispatcher's id, as its heartbeat row and sessions name it.
    pub owner: String,
    /// A dispatcher silent this long is gone.
    pub lease: Duration,
    /// Days archived sessions keep their events.
    pub retention_days: u32,
    /// Whether the last heartbeat reached Postgres (readiness).
    pub db_ok: Arc<AtomicBool>,
    pub shutdown: CancellationToken,
}

impl Janitor {
    /// Heartbeats every third of the lease, and sweeps on timers of their
    /// own: a long sweep (a dead dispatcher's thousands of sessions) never
    /// delays this dispatcher's heartbeat, or the others would take it for
    /// dead too.
    ///
    /// Other dispatchers are judged only by a dispatcher that has itself
    /// reached Postgres without a break for a whole lease: after an outage
    /// of the database (or of this dispatcher's link to it) every heartbeat
    /// in it is stale, and the others need a lease of their own to renew
    /// theirs before anyone may call them gone.
    pub(crate) async fn run(self) {
        let healthy_since = Mutex::new(None);
        tokio::join!(
            self.heartbeats(&healthy_since),
            self.orphan_sweeps(&healthy_since),
            self.sweeps(),
        );
    }

    /// Records this dispatcher alive every third of the lease; `healthy`
    /// holds since when every heartbeat reached Postgres.
    async fn heartbeats(&self, healthy: &Mutex<Option<Instant>>) {
        let mut tick = tokio::time::interval(self.lease / 3);
        loop {
            tokio::select! {
                () = self.shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            if let Err(e) = self.store.heartbeat(&self.owner).await {
                tracing::warn!(error = %e, "dispatcher heartbeat failed");
                self.db_ok.store(false, Ordering::Relaxed);
                *lock(healthy) = None;
                continue;
            }
            self.db_ok.store(true, Ordering::Relaxed);
            lock(healthy).get_or_insert_with(Instant::now);
        }
    }

    /// Looks for dead dispatchers' sessions every second (a third of the
    /// lease, if shorter) while healthy: the look is an index probe per
    /// silent dispatcher, and a second here is a second more of takeover.
    async fn orphan_sweeps(&self, healthy: &Mutex<Option<Instant>>) {
        let mut tick = tokio::time::interval((self.lease / 3).min(ORPHAN_SWEEP));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = self.shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            if lock(healthy).is_some_and(|since| since.elapsed() >= self.lease) {
                self.requeue_orphans().await;
            }
        }
    }

    /// The fleet's other sweeps, every third of the lease.
    async fn sweeps(&self) {
        let mut tick = tokio::time::interval(self.lease / 3);
        let mut last_retention: Option<Instant> = None;
        loop {
            tokio::select! {
                () = self.shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            self.expire_queued().await;
            if last_retention.is_none_or(|t| t.elapsed() >= RETENTION_INTERVAL) {
                last_retention = Some(Instant::now());
                self.purge().await;
            }
        }
    }

    /// Re-queues the live sessions of dispatchers that stopped heartbeating
    /// (crashed without handing back): a page of them at a time, until a
    /// page is not full, so a dead dispatcher's thousands of sessions wait
    /// for no further tick.
    async fn requeue_orphans(&self) {
        let why = released_because("stopped heartbeating");
        for _ in 0..MAX_ORPHAN_PAGES {
            let released = match self
                .log
                .release_orphans(Abandoned::Lapsed(self.lease), &why)
                .await
            {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(error = %e, "re-queuing orphaned sessions failed");
                    return;
                }
            };
            let mut by_owner = std::collections::BTreeMap::<&str, usize>::new();
            for (o, t) in &released.moved {
                tracing::info!(session_id = %o.id, owner = %o.owner, to = %t.to, "released a session its dispatcher abandoned");
                *by_owner.entry(o.owner.as_str()).or_default() += 1;
            }
            for (owner, sessions) in by_owner {
                tracing::warn!(
                    owner,
                    sessions,
                    "re-queued the sessions of a dispatcher that stopped heartbeating"
                );
            }
            if released.found < ORPHAN_PAGE {
                return;
            }
        }
    }

    /// Fails pending sessions still unplaced at their queue deadline.
    async fn expire_queued(&self) {
        let expired = match self.store.expired_pending().await {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(error = %e, "looking for expired queued sessions failed");
                return;
            }
        };
        for (id, epoch) in expired {
            let reason = "queue deadline passed: no node took the session in time";
            match self
                .log
                .transition_at(
                    id,
                    epoch,
                    StatusEvent::Failed,
                    reason,
                    StatusDetail::default(),
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

    /// Deletes archived sessions' events past retention.
    async fn purge(&self) {
        match self.store.purge_archived_events(self.retention_days).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(
                events = n,
                days = self.retention_days,
                "deleted events of archived sessions past retention"
            ),
            Err(e) => tracing::warn!(error = %e, "retention sweep failed"),
        }
    }
}

/// Why a session its dispatcher left changes status: a stop under way
/// ends it `stopped` (a user's stop never becomes a restart), anything else
/// goes back to the queue.
fn orphan_reason(o: &Orphan, what: &str) -> String {
    if o.status == crate::session::SessionStatus::Stopping.as_str() {
        format!(
            "dispatcher {} {what} while the session was stopping; stopped",
            o.owner
        )
    } else {
        format!("dispatcher {} {what}; re-queued", o.owner)
    }
}

/// The reason and detail of each change that releases an orphan whose
/// dispatcher `what` (stopped heartbeating, restarted): it names the owner.
fn released_because(what: &'static str) -> impl Fn(&Orphan) -> (String, StatusDetail) + Sync {
    move |o| {
        let detail = StatusDetail {
            owner: Some(o.owner.clone()),
            ..StatusDetail::default()
        };
        (orphan_reason(o, what), detail)
    }
}

/// Records this dispatcher alive, then releases the sessions a previous
/// process under `owner` (a restarted dispatcher keeps its id) left claimed:
/// each is re-queued at once, or ends `stopped` if a stop was under way.
/// Runs before this process claims anything. Retries while Postgres is
/// unreachable, until it succeeds or shutdown.
pub(crate) async fn release_previous(
    store: &Store,
    log: &EventLog,
    owner: &str,
    shutdown: &CancellationToken,
) {
    let mut backoff =
        berth_common::retry::Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
    let why = released_because("restarted");
    loop {
        let page = async {
            store.heartbeat(owner).await?;
            log.release_orphans(Abandoned::Owner(owner), &why).await
        };
        match page.await {
            Ok(released) => {
                for (o, t) in &released.moved {
                    tracing::warn!(session_id = %o.id, to = %t.to, "released a session a previous process under this id left");
                }
                if released.found < ORPHAN_PAGE {
                    return;
                }
                backoff.reset();
            }
            Err(e) => {
                let delay = backoff.next_delay();
                tracing::warn!(error = %e, retry_in = ?delay, "cannot release the sessions a previous process left; retrying");
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn orphan(status: &str) -> crate::store::Orphan {
        crate::store::Orphan {
            id: uuid::Uuid::nil(),
            epoch: 1,
            owner: "d1".into(),
            status: status.into(),
        }
    }

    #[test]
    fn a_stop_under_way_is_never_called_a_requeue() {
        assert_eq!(
            orphan_reason(&orphan("stopping"), "restarted"),
            "dispatcher d1 restarted while the session was stopping; stopped"
        );
        assert_eq!(
            orphan_reason(&orphan("running"), "stopped heartbeating"),
            "dispatcher d1 stopped heartbeating; re-queued"
        );
    }
}
