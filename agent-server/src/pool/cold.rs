//! Cold starts in flight. A session that found no pre-started process
//! starts its agent at once; while it does, the pre-start refills wait, so
//! the miss does not share the machine's cores with starts that only refill
//! the pool. A miss lasts until its agent's first output line: the
//! CPU-heavy part of a CLI's start comes after its exec.
//!
//! A refill waits at most [`MAX_YIELD`] for the misses, so a stream of
//! misses still lets the pool fill, one start per wait.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::Notify;

/// The longest a refill waits for cold starts to finish.
pub const MAX_YIELD: Duration = Duration::from_secs(10);

/// The count of cold starts in flight.
#[derive(Debug, Default)]
pub struct ColdStarts {
    running: AtomicUsize,
    idle: Notify,
}

/// One cold start; it ends when dropped.
#[derive(Debug)]
pub struct ColdStart(Arc<ColdStarts>);

impl ColdStarts {
    /// Counts a cold start until the guard drops.
    pub fn enter(self: &Arc<Self>) -> ColdStart {
        self.running.fetch_add(1, Ordering::SeqCst);
        ColdStart(self.clone())
    }

    /// Whether a cold start is in flight.
    pub fn busy(&self) -> bool {
        self.running.load(Ordering::SeqCst) > 0
    }

    /// Waits until no cold start is in flight, or [`MAX_YIELD`] has passed.
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

impl Drop for ColdStart {
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
    async fn refills_wait_for_cold_starts_but_not_forever() {
        let cold = Arc::new(ColdStarts::default());
        cold.yielded().await; // none in flight: at once
        let (a, b) = (cold.enter(), cold.enter());
        let waiter = tokio::spawn({
            let cold = cold.clone();
            async move { cold.yielded().await }
        });
        tokio::time::advance(Duration::from_secs(1)).await;
        drop(a);
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "one cold start is still in flight");
        drop(b);
        waiter.await.expect("the last cold start ended");

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
