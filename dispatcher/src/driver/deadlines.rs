//! The relay's two clocks: the hard session timeout and the inactivity
//! timeout. Pure bookkeeping over `tokio::time::Instant`, so it is tested on
//! a paused clock.

/// What the relay must do on its own, with no frame to prompt it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Expiry {
    /// The hard session timeout elapsed: the session ends in `timeout`.
    Hard,
    /// No events and no input for the inactivity timeout: stop (`inactivity`).
    Inactive,
}

/// The relay's two clocks. Pure bookkeeping over `tokio::time::Instant`, so
/// it is tested on a paused clock.
#[derive(Debug)]
pub(crate) struct Deadlines {
    hard: Option<tokio::time::Instant>,
    inactivity: std::time::Duration,
    last_activity: Option<tokio::time::Instant>,
}

impl Deadlines {
    /// `timeout` counts from now (this run's start).
    pub(crate) fn new(
        timeout: Option<std::time::Duration>,
        inactivity: std::time::Duration,
    ) -> Self {
        let now = tokio::time::Instant::now();
        Self {
            hard: timeout.map(|t| now + t),
            inactivity,
            last_activity: Some(now),
        }
    }

    /// Something happened: an event from the agent or input from a user.
    pub(crate) fn touch(&mut self) {
        if self.last_activity.is_some() {
            self.last_activity = Some(tokio::time::Instant::now());
        }
    }

    /// The next expiry, if any clock is running.
    pub(crate) fn next(&self) -> Option<(tokio::time::Instant, Expiry)> {
        let idle = self
            .last_activity
            .map(|t| (t + self.inactivity, Expiry::Inactive));
        let hard = self.hard.map(|t| (t, Expiry::Hard));
        match (hard, idle) {
            (Some(h), Some(i)) => Some(if h.0 <= i.0 { h } else { i }),
            (h, i) => h.or(i),
        }
    }

    /// Stops the clock that fired (each fires once).
    pub(crate) fn fired(&mut self, e: Expiry) {
        match e {
            Expiry::Hard => self.hard = None,
            Expiry::Inactive => self.last_activity = None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn inactivity_counts_from_the_last_activity_and_fires_once() {
        let mut d = Deadlines::new(None, Duration::from_secs(60));
        tokio::time::advance(Duration::from_secs(50)).await;
        d.touch();
        tokio::time::advance(Duration::from_secs(50)).await;
        let (at, e) = d.next().expect("armed");
        assert_eq!(e, Expiry::Inactive);
        assert_eq!(at - tokio::time::Instant::now(), Duration::from_secs(10));
        d.fired(Expiry::Inactive);
        d.touch();
        assert!(d.next().is_none(), "inactivity fires once");
    }

    #[tokio::test(start_paused = true)]
    async fn the_hard_timeout_ignores_activity() {
        let mut d = Deadlines::new(Some(Duration::from_secs(30)), Duration::from_secs(20));
        for _ in 0..3 {
            tokio::time::advance(Duration::from_secs(10)).await;
            d.touch();
        }
        // Busy all along (inactivity would fire at 50 s), yet due at 30 s.
        assert_eq!(d.next(), Some((tokio::time::Instant::now(), Expiry::Hard)));
        d.fired(Expiry::Hard);
        assert_eq!(d.next().map(|n| n.1), Some(Expiry::Inactive));
    }
}
