//! One retry schedule for every loop that retries (a database call, a node
//! link, a LISTEN connection, a warm-pool refill, the CLI's follower):
//! exponential from `min` to `max`, with jitter, so that many waiting on
//! the same outage do not all come back at the same instant. Forever:
//! callers stop on their own shutdown.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};

/// The waits of one retry loop.
#[derive(Debug)]
pub struct Backoff {
    builder: ExponentialBuilder,
    waits: ExponentialBackoff,
    max: Duration,
}

impl Backoff {
    /// Waits doubling from `min` up to `max`, each with up to as much
    /// again of random jitter.
    pub fn new(min: Duration, max: Duration) -> Self {
        let builder = ExponentialBuilder::default()
            .with_min_delay(min)
            .with_max_delay(max)
            .with_factor(2.0)
            .with_jitter()
            .without_max_times();
        Self {
            waits: builder.build(),
            builder,
            max,
        }
    }

    /// How long to wait before the next try.
    pub fn next_delay(&mut self) -> Duration {
        self.waits.next().unwrap_or(self.max)
    }

    /// A try succeeded: the next failure waits from `min` again.
    pub fn reset(&mut self) {
        self.waits = self.builder.build();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_grow_to_the_cap_with_jitter_and_start_over_on_success() {
        let (min, max) = (Duration::from_millis(100), Duration::from_secs(2));
        let mut b = Backoff::new(min, max);
        let waits: Vec<Duration> = (0..10).map(|_| b.next_delay()).collect();
        assert!(waits[0] >= min && waits[0] < min * 2, "{waits:?}");
        assert!(waits[3] >= min * 8, "{waits:?}");
        assert!(waits.iter().all(|w| *w <= max * 2), "{waits:?}");
        assert!(waits[9] >= max, "capped at the max: {waits:?}");
        b.reset();
        assert!(b.next_delay() < min * 2);
    }
}
