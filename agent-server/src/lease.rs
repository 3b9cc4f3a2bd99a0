//! A run's lease on the outside world.
//!
//! **Invariant (one live agent per session):** a run reaches the outside
//! (the model API, egress, any gateway route) only while a dispatcher has
//! confirmed, recently, that it is its session's current run. Confirmations
//! come with the start, with every re-attach, and from the dispatchers'
//! reconcile pass (`ReconcileSessions`, about every fifth of their node
//! lease). Each is valid for a while counted from when the node *listed*
//! the run, not from when the confirmation arrived: a node that was stalled
//! or cut off past the time a dispatcher would call it lost finds its
//! confirmations expired, and holds its runs' traffic until a dispatcher
//! confirms them again or fences them. A fenced run's traffic is refused
//! for good, and its gateway connections close before its agent is killed.
//!
//! A run whose lease lapsed is also *frozen* (its container paused, see
//! `freezer.rs`) until it is confirmed again: its agent does nothing at all,
//! not only nothing outside. So a run whose session moved to a newer epoch
//! on another node is neither live nor sends a model request after the
//! move: the move needs the node to be lost for a whole node lease, and a
//! lease outlives no confirmation. When the node hears from a dispatcher
//! again, the run is thawed (confirmed) or killed (fenced).

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

/// Longest a run's gateway request waits for its lease to be confirmed
/// again before it is refused (a database or dispatcher outage holds
/// confirmations back; the agent's request waits rather than fail).
pub const LEASE_WAIT: Duration = Duration::from_secs(120);

/// Where a run's lease stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Confirmed until then.
    Until(Instant),
    /// Superseded: never again.
    Fenced,
    /// Ending on the node's own account (no dispatcher re-attached): no
    /// outside traffic, but the agent runs on to be stopped and snapshot.
    Ending,
}

/// Why a run may not use the gateway now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Unusable {
    #[error(
        "this run was superseded: its session runs elsewhere now, and this agent is being stopped"
    )]
    Fenced,
    #[error(
        "no dispatcher has confirmed this run for {0:?} (its node is cut off from the dispatchers, or they from Postgres); the request was held, and is refused now"
    )]
    Unconfirmed(Duration),
    #[error("this run is ending: no dispatcher re-attached to it, so it is stopped and saved")]
    Ending,
}

/// One run's lease; shared by its session and its gateway.
#[derive(Debug)]
pub struct RunLease {
    state: watch::Sender<State>,
    /// The freezer paused the run's container (and has not thawed it).
    frozen: AtomicBool,
    /// The agent has started: the freezer may pause the run only then (a
    /// container being prepared is left to finish its start or fail it).
    armed: AtomicBool,
}

impl RunLease {
    /// A lease confirmed until `until`.
    pub fn new(until: Instant) -> Self {
        Self {
            state: watch::channel(State::Until(until)).0,
            frozen: AtomicBool::new(false),
            armed: AtomicBool::new(false),
        }
    }

    /// Extends the lease to `until` (never shortens it; a fenced lease
    /// stays fenced).
    pub fn confirm(&self, until: Instant) {
        self.state.send_if_modified(|s| match s {
            State::Until(t) if *t < until => {
                *t = until;
                true
            }
            _ => false,
        });
    }

    /// Fences the run: every use is refused from now on.
    pub fn fence(&self) {
        self.state.send_replace(State::Fenced);
    }

    pub fn is_fenced(&self) -> bool {
        *self.state.borrow() == State::Fenced
    }

    /// The node ends the run itself: it reaches nothing more, and is
    /// never frozen (its stop and snapshot need it running).
    pub fn end(&self) {
        self.state.send_if_modified(|s| match s {
            State::Until(_) => {
                *s = State::Ending;
                true
            }
            _ => false,
        });
    }

    /// Records whether the run's container is paused now.
    pub fn set_frozen(&self, frozen: bool) {
        self.frozen.store(frozen, Ordering::SeqCst);
    }

    /// The agent has started: from now on a lapse freezes the run.
    pub fn arm(&self) {
        self.armed.store(true, Ordering::SeqCst);
    }

    /// Whether the run's container is paused.
    pub fn is_frozen(&self) -> bool {
        self.frozen.load(Ordering::SeqCst)
    }

    /// Whether the run should be frozen at `now`: its confirmation lapsed,
    /// and it is neither fenced (it is being killed) nor ending.
    pub fn lapsed(&self, now: Instant) -> bool {
        self.armed.load(Ordering::SeqCst)
            && matches!(*self.state.borrow(), State::Until(t) if t <= now)
    }

    /// Whether the run may use the gateway at `now`.
    fn check(&self, now: Instant) -> Result<(), Unusable> {
        match *self.state.borrow() {
            State::Fenced => Err(Unusable::Fenced),
            State::Ending => Err(Unusable::Ending),
            State::Until(t) if t > now => Ok(()),
            State::Until(t) => Err(Unusable::Unconfirmed(now - t)),
        }
    }

    /// Waits, up to `max_wait`, until the run may use the gateway. A run
    /// whose confirmation lapsed waits for the next one (its node was
    /// stalled, or cut off from the dispatchers) rather than fail at once.
    pub async fn usable(&self, max_wait: Duration) -> Result<(), Unusable> {
        let deadline = Instant::now() + max_wait;
        let mut rx = self.state.subscribe();
        loop {
            let now = Instant::now();
            let why = match self.check(now) {
                Ok(()) => return Ok(()),
                Err(e @ (Unusable::Fenced | Unusable::Ending)) => return Err(e),
                Err(why) if now >= deadline => return Err(why),
                Err(why) => why,
            };
            tokio::select! {
                changed = rx.changed() => if changed.is_err() { return Err(why) },
                () = tokio::time::sleep_until(deadline) => {}
            }
        }
    }

    /// Resolves once the run is fenced.
    pub async fn fenced(&self) {
        let mut rx = self.state.subscribe();
        let _ = rx.wait_for(|s| *s == State::Fenced).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[tokio::test(start_paused = true)]
    async fn a_confirmed_run_may_use_the_gateway_until_its_lease_ends() {
        let lease = RunLease::new(Instant::now() + 3 * S);
        assert_eq!(lease.usable(Duration::ZERO).await, Ok(()));
        tokio::time::advance(3 * S).await;
        assert!(matches!(
            lease.usable(Duration::ZERO).await,
            Err(Unusable::Unconfirmed(_))
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn a_lapsed_run_waits_for_its_next_confirmation() {
        let lease = std::sync::Arc::new(RunLease::new(Instant::now()));
        let waiter = tokio::spawn({
            let lease = lease.clone();
            async move { lease.usable(10 * S).await }
        });
        tokio::time::advance(2 * S).await;
        assert!(!waiter.is_finished());
        lease.confirm(Instant::now() + 3 * S);
        assert_eq!(waiter.await.expect("test"), Ok(()));
    }

    #[tokio::test(start_paused = true)]
    async fn a_lapsed_run_gives_up_after_the_wait() {
        let lease = RunLease::new(Instant::now());
        let started = Instant::now();
        assert!(matches!(
            lease.usable(5 * S).await,
            Err(Unusable::Unconfirmed(_))
        ));
        assert_eq!(started.elapsed(), 5 * S);
    }

    #[tokio::test(start_paused = true)]
    async fn a_fenced_run_is_refused_at_once_and_for_good() {
        let lease = std::sync::Arc::new(RunLease::new(Instant::now()));
        let waiter = tokio::spawn({
            let lease = lease.clone();
            async move { lease.usable(60 * S).await }
        });
        tokio::task::yield_now().await;
        lease.fence();
        assert_eq!(waiter.await.expect("test"), Err(Unusable::Fenced));
        lease.confirm(Instant::now() + 60 * S);
        assert_eq!(lease.usable(Duration::ZERO).await, Err(Unusable::Fenced));
        lease.fenced().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_lapsed_run_is_frozen_unless_fenced_or_ending() {
        let lease = RunLease::new(Instant::now() + S);
        assert!(
            !lease.lapsed(Instant::now() + 2 * S),
            "not before its agent started"
        );
        lease.arm();
        assert!(!lease.lapsed(Instant::now()));
        tokio::time::advance(S).await;
        assert!(lease.lapsed(Instant::now()));
        lease.end();
        assert!(!lease.lapsed(Instant::now()));
        assert_eq!(lease.usable(Duration::ZERO).await, Err(Unusable::Ending));
        let fenced = RunLease::new(Instant::now());
        fenced.arm();
        fenced.fence();
        assert!(!fenced.lapsed(Instant::now() + S));
    }

    #[tokio::test(start_paused = true)]
    async fn a_confirmation_never_shortens_the_lease() {
        let lease = RunLease::new(Instant::now() + 5 * S);
        lease.confirm(Instant::now() + S);
        tokio::time::advance(2 * S).await;
        assert_eq!(lease.usable(Duration::ZERO).await, Ok(()));
    }
}
