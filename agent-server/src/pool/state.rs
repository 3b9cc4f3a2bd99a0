//! One warm pool's decisions, with no Docker and no clock of its own: what
//! is ready, what a claim takes, how many containers to keep (the target),
//! what the sweep evicts, and how many to start (the deficit). The Docker
//! side ([`super::Pools`]) carries them out.
//!
//! Invariants: `min <= target <= max`; a miss raises the target by one, an
//! idle expiry lowers it by one, so the pool follows demand within its
//! bounds; nothing older than `max_idle` is ever handed out.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

/// A ready item and when it became ready.
struct Ready<T> {
    item: T,
    since: Instant,
}

/// What a sweep took out of the pool.
#[derive(Debug, PartialEq)]
pub(crate) struct Swept<T> {
    /// Items that died while ready.
    pub dead: Vec<T>,
    /// Items unclaimed for `max_idle`.
    pub expired: Vec<T>,
}

/// One pool's state.
pub(crate) struct PoolState<T> {
    min: u32,
    max: u32,
    max_idle: Duration,
    target: u32,
    ready: VecDeque<Ready<T>>,
    /// Items being started (counted against the target).
    starting: u32,
}

impl<T> PoolState<T> {
    pub(crate) fn new(min: u32, max: u32, max_idle: Duration) -> Self {
        Self {
            min,
            max: max.max(min),
            max_idle,
            target: min,
            ready: VecDeque::new(),
            starting: 0,
        }
    }

    /// Items ready to hand out.
    pub(crate) fn ready(&self) -> u32 {
        u32::try_from(self.ready.len()).unwrap_or(u32::MAX)
    }

    /// How many items the pool keeps ready.
    pub(crate) fn target(&self) -> u32 {
        self.target
    }

    /// How many more to start now (items being started count as started).
    pub(crate) fn deficit(&self) -> u32 {
        self.target
            .saturating_sub(self.ready())
            .saturating_sub(self.starting)
    }

    /// Items being started.
    pub(crate) fn starting(&self) -> u32 {
        self.starting
    }

    /// One more item is being started.
    pub(crate) fn begin_start(&mut self) {
        self.starting += 1;
    }

    /// A start begun with [`Self::begin_start`] failed.
    pub(crate) fn start_failed(&mut self) {
        self.starting = self.starting.saturating_sub(1);
    }

    /// Takes the oldest item still younger than `max_idle` (older ones stay
    /// for the sweep). `None` is a miss, which raises the target.
    pub(crate) fn claim(&mut self, now: Instant) -> Option<T> {
        let fresh = self
            .ready
            .iter()
            .position(|r| now.saturating_duration_since(r.since) < self.max_idle);
        let item = fresh.and_then(|i| self.ready.remove(i)).map(|r| r.item);
        if item.is_none() {
            self.target = (self.target + 1).min(self.max);
        }
        item
    }

    /// A started, healthy item is ready from `now`.
    pub(crate) fn add(&mut self, item: T, now: Instant) {
        self.starting = self.starting.saturating_sub(1);
        self.ready.push_back(Ready { item, since: now });
    }

    /// Takes out items that died (`alive` is false) or aged past `max_idle`;
    /// each expiry lowers the target toward `min`.
    pub(crate) fn sweep(&mut self, now: Instant, alive: impl Fn(&T) -> bool) -> Swept<T> {
        let mut swept = Swept {
            dead: Vec::new(),
            expired: Vec::new(),
        };
        let mut keep = VecDeque::with_capacity(self.ready.len());
        for r in self.ready.drain(..) {
            if !alive(&r.item) {
                swept.dead.push(r.item);
            } else if now.saturating_duration_since(r.since) >= self.max_idle {
                swept.expired.push(r.item);
            } else {
                keep.push_back(r);
            }
        }
        self.ready = keep;
        let expired = u32::try_from(swept.expired.len()).unwrap_or(u32::MAX);
        self.target = self.target.saturating_sub(expired).max(self.min);
        swept
    }

    /// The ready items, oldest first.
    pub(crate) fn items(&self) -> impl Iterator<Item = &T> {
        self.ready.iter().map(|r| &r.item)
    }

    /// Takes every ready item (the pool is stopping).
    pub(crate) fn drain(&mut self) -> Vec<T> {
        self.ready.drain(..).map(|r| r.item).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const IDLE: Duration = Duration::from_secs(60);

    #[test]
    fn a_new_pool_wants_its_minimum() {
        let p = PoolState::<u32>::new(2, 5, IDLE);
        assert_eq!((p.ready(), p.target(), p.deficit()), (0, 2, 2));
    }

    #[test]
    fn claims_take_the_oldest_and_misses_raise_the_target_up_to_max() {
        let t0 = Instant::now();
        let mut p = PoolState::new(1, 3, IDLE);
        p.add("a", t0);
        p.add("b", t0 + Duration::from_secs(1));
        assert_eq!(p.claim(t0 + Duration::from_secs(2)), Some("a"));
        assert_eq!(p.claim(t0 + Duration::from_secs(2)), Some("b"));
        assert_eq!(p.target(), 1, "hits leave the target alone");
        for _ in 0..5 {
            assert_eq!(p.claim(t0), None);
        }
        assert_eq!(p.target(), 3, "misses raise the target, never past max");
        assert_eq!(p.deficit(), 3);
    }

    #[test]
    fn nothing_older_than_max_idle_is_handed_out() {
        let t0 = Instant::now();
        let mut p = PoolState::new(0, 2, IDLE);
        p.add("old", t0);
        assert_eq!(p.claim(t0 + IDLE), None, "aged out: a miss");
        assert_eq!(p.ready(), 1, "left for the sweep to remove");
    }

    #[test]
    fn the_sweep_evicts_dead_and_expired_and_expiry_lowers_the_target_to_min() {
        let t0 = Instant::now();
        let mut p = PoolState::new(1, 4, IDLE);
        for _ in 0..3 {
            p.claim(t0);
        }
        assert_eq!(p.target(), 4);
        p.add("dead", t0);
        p.add("old-1", t0);
        p.add("old-2", t0);
        p.add("fresh", t0 + IDLE);
        let swept = p.sweep(t0 + IDLE + Duration::from_secs(1), |i| *i != "dead");
        assert_eq!(swept.dead, vec!["dead"]);
        assert_eq!(swept.expired, vec!["old-1", "old-2"]);
        assert_eq!(p.ready(), 1);
        assert_eq!(p.target(), 2, "two expiries lower the target by two");
        let again = p.sweep(t0 + 3 * IDLE, |_| true);
        assert_eq!(again.expired, vec!["fresh"]);
        assert_eq!(p.target(), 1, "never below min");
        assert_eq!(p.deficit(), 1);
    }

    #[test]
    fn a_dead_container_does_not_lower_the_target() {
        let t0 = Instant::now();
        let mut p = PoolState::new(2, 4, IDLE);
        p.add(1, t0);
        p.add(2, t0);
        let swept = p.sweep(t0, |_| false);
        assert_eq!(swept.dead.len(), 2);
        assert_eq!((p.target(), p.deficit()), (2, 2));
    }

    #[test]
    fn draining_takes_everything() {
        let t0 = Instant::now();
        let mut p = PoolState::new(0, 2, IDLE);
        p.add(1, t0);
        p.add(2, t0);
        assert_eq!(p.drain(), vec![1, 2]);
        assert_eq!(p.ready(), 0);
    }
}
