//! Session starts in flight, until their agent's first output line: a
//! miss starting its agent cold, and a hit whose pre-started process is
//! working on its first message. Meanwhile the pre-start refills (and a warm
//! container's rename) wait, so the start does not share the machine's
//! cores with work that only refills the pool: a CLI's start is CPU-heavy
//! after its exec, and so is its first turn.
//!
//! A refill waits at most [`MAX_YIELD`] for the starts, so a stream of them
//! still lets the pool fill, one start per wait.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::Notify;

/// The longest a refill waits for the starts in flight.
pub const MAX_YIELD: Duration = Duration::from_secs(10);

/// The count of session starts in flight.
#[derive(Debug, Default)]
pub struct StartsInFlight {
    running: AtomicUsize,
    idle: Notify,
}

/// One session start; it ends when dropped.
#[derive(Debug)]
pub struct StartInFlight(Arc<StartsInFlight>);

impl StartsInFlight {
    /// Counts a start until the guard drops.
    pub fn enter(self: &Arc<Self>) -> StartInFlight {
        self.running.fetch_add(1, Ordering::SeqCst);
        StartInFlight(self.clone())
    }

    /// Whether a start is in flight.
    pub fn busy(&self) -> bool {
        self.running.load(Ordering::SeqCst) > 0
    }

    /// Waits until no start is in flight, or [`MAX_YIELD`] has passed.
    pub async fn yielded(&self) {
        let wait = async {
            loop {
                let notified = self.idle.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                if !self.busy() {
                    return;
                }
                notified.await;
            }
        };
        let _ = tokio::time::timeout(MAX_YIELD, wait).await;
    }
}

impl Drop for StartInFlight {
    fn drop(&mut self) {
        if self.0.running.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn refills_wait_for_starts_in_flight_but_not_forever() {
        let cold = Arc::new(StartsInFlight::default());
        cold.yielded().await; // none in flight: at once
        let (a, b) = (cold.enter(), cold.enter());
        let waiter = tokio::spawn({
            let cold = cold.clone();
            async move { cold.yielded().await }
        });
        tokio::time::advance(Duration::from_secs(1)).await;
        drop(a);
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "one start is still in flight");
        drop(b);
        waiter.await.expect("the last start ended");

        let _stuck = cold.enter();
        let started = tokio::time::Instant::now();
        cold.yielded().await;
        assert_eq!(
            started.elapsed(),
            MAX_YIELD,
            "a refill waits at most MAX_YIELD"
        );
    }
}
