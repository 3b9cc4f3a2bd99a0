//! The decisions of a node's agent pools, with no Docker and no clock of
//! its own: one [`PoolState`] per agent key, created by demand (a session
//! that could take a pre-started process asks for one), sized between the
//! per-key bounds, capped node-wide, and retired when its agent is no
//! longer asked for. [`super::processes::ProcessPools`] carries them out.
//!
//! Invariants:
//! - ready and starting processes, over all keys, never exceed `total`;
//! - at most `max_keys` keys are known; a new key displaces the least
//!   recently asked key that holds nothing;
//! - a key unasked for `max_idle`, with nothing ready or starting, is
//!   forgotten (its agent version was retired or is no longer used): its
//!   pool has drained, since idle expiry already took its target to `min`
//!   and its processes out;
//! - the next start goes to the key with the largest deficit (ties: the
//!   most recently asked), so one busy agent cannot starve the others.

use std::collections::HashMap;
use std::time::Duration;

use tokio::time::Instant;

use super::state::{PoolState, Swept};

/// The agent pools' bounds.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ProcessLimits {
    /// Processes kept ready per key at the least.
    pub min: u32,
    /// Processes kept ready per key at the most.
    pub max: u32,
    /// Processes ready or starting over every key (0: no agent pools).
    pub total: u32,
    /// Keys remembered at once.
    pub max_keys: usize,
    /// A ready process unclaimed this long is replaced, lowering its
    /// key's target; a key unasked this long is forgotten.
    pub max_idle: Duration,
}

struct Entry<T, S> {
    template: S,
    image: String,
    state: PoolState<T>,
    last_demand: Instant,
}

/// Every agent pool of a node.
pub(crate) struct ProcessPoolsState<T, S> {
    limits: ProcessLimits,
    pools: HashMap<String, Entry<T, S>>,
}

/// What a claim did.
pub(crate) struct Claim<T> {
    /// The ready process, or `None` (a miss).
    pub item: Option<T>,
    /// The key was new and pools are off or every slot for keys is taken
    /// by keys that hold processes: it is not pooled.
    pub unpooled: bool,
}

/// A start to carry out: the key and what to start.
pub(crate) struct Start<S> {
    pub key: String,
    pub template: S,
}

impl<T, S: Clone> ProcessPoolsState<T, S> {
    pub(crate) fn new(limits: ProcessLimits) -> Self {
        Self {
            limits,
            pools: HashMap::new(),
        }
    }

    /// Whether any key may be pooled.
    pub(crate) fn enabled(&self) -> bool {
        self.limits.total > 0 && self.limits.max > 0 && self.limits.max_keys > 0
    }

    /// Takes a ready process for `key`, recording the demand. A new key
    /// gets a pool (its template is what later starts run); a miss raises
    /// the key's target.
    pub(crate) fn claim(
        &mut self,
        key: &str,
        image: &str,
        template: impl FnOnce() -> S,
        now: Instant,
    ) -> Claim<T> {
        if !self.enabled() {
            return Claim {
                item: None,
                unpooled: true,
            };
        }
        if !self.pools.contains_key(key) {
            if self.pools.len() >= self.limits.max_keys && !self.forget_one_empty() {
                return Claim {
                    item: None,
                    unpooled: true,
                };
            }
            self.pools.insert(
                key.to_string(),
                Entry {
                    template: template(),
                    image: image.to_string(),
                    state: PoolState::new(self.limits.min, self.limits.max, self.limits.max_idle),
                    last_demand: now,
                },
            );
        }
        let entry = self.pools.get_mut(key).expect("inserted above");
        entry.last_demand = now;
        Claim {
            item: entry.state.claim(now),
            unpooled: false,
        }
    }

    /// Forgets the least recently asked key that holds nothing.
    fn forget_one_empty(&mut self) -> bool {
        let oldest = self
            .pools
            .iter()
            .filter(|(_, e)| e.state.ready() == 0 && e.state.starting() == 0)
            .min_by_key(|(_, e)| e.last_demand)
            .map(|(k, _)| k.clone());
        oldest.is_some_and(|k| self.pools.remove(&k).is_some())
    }

    /// Processes ready or starting over every key.
    pub(crate) fn held(&self) -> u32 {
        self.pools
            .values()
            .map(|e| e.state.ready() + e.state.starting())
            .sum()
    }

    /// The next process to start, if any key is short and the node-wide
    /// cap allows one more; it counts as starting until [`Self::started`]
    /// or [`Self::start_failed`].
    pub(crate) fn next_start(&mut self) -> Option<Start<S>> {
        if self.held() >= self.limits.total {
            return None;
        }
        let (key, entry) = self
            .pools
            .iter_mut()
            .filter(|(_, e)| e.state.deficit() > 0)
            .max_by_key(|(_, e)| (e.state.deficit(), e.last_demand))?;
        entry.state.begin_start();
        Some(Start {
            key: key.clone(),
            template: entry.template.clone(),
        })
    }

    /// A process for `key` is ready from `now`. Returns it when its key was
    /// forgotten meanwhile (the caller removes it).
    pub(crate) fn started(&mut self, key: &str, item: T, now: Instant) -> Option<T> {
        match self.pools.get_mut(key) {
            Some(e) => {
                e.state.add(item, now);
                None
            }
            None => Some(item),
        }
    }

    /// A start for `key` failed.
    pub(crate) fn start_failed(&mut self, key: &str) {
        if let Some(e) = self.pools.get_mut(key) {
            e.state.start_failed();
        }
    }

    /// Takes out dead and expired processes, then forgets keys unasked for
    /// `max_idle` that hold nothing.
    pub(crate) fn sweep(&mut self, now: Instant, alive: impl Fn(&T) -> bool) -> Swept<T> {
        let mut out = Swept {
            dead: Vec::new(),
            expired: Vec::new(),
        };
        for e in self.pools.values_mut() {
            let s = e.state.sweep(now, &alive);
            out.dead.extend(s.dead);
            out.expired.extend(s.expired);
        }
        let max_idle = self.limits.max_idle;
        self.pools.retain(|_, e| {
            e.state.ready() > 0
                || e.state.starting() > 0
                || now.saturating_duration_since(e.last_demand) < max_idle
        });
        out
    }

    /// Takes every ready process (the node drains or stops).
    pub(crate) fn drain(&mut self) -> Vec<T> {
        self.pools
            .values_mut()
            .flat_map(|e| e.state.drain())
            .collect()
    }

    /// Ready processes per key (key, image, ready), sorted by key.
    pub(crate) fn ready_by_key(&self) -> Vec<(String, String, u32)> {
        let mut out: Vec<(String, String, u32)> = self
            .pools
            .iter()
            .map(|(k, e)| (k.clone(), e.image.clone(), e.state.ready()))
            .collect();
        out.sort();
        out
    }

    /// Every ready process, for a liveness check before [`Self::sweep`].
    pub(crate) fn ready_items(&self) -> Vec<&T> {
        self.pools.values().flat_map(|e| e.state.items()).collect()
    }

    /// Keys known.
    pub(crate) fn keys(&self) -> usize {
        self.pools.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const IDLE: Duration = Duration::from_secs(600);

    fn limits(min: u32, max: u32, total: u32, max_keys: usize) -> ProcessLimits {
        ProcessLimits {
            min,
            max,
            total,
            max_keys,
            max_idle: IDLE,
        }
    }

    fn pools(l: ProcessLimits) -> ProcessPoolsState<u32, &'static str> {
        ProcessPoolsState::new(l)
    }

    #[test]
    fn demand_creates_a_pool_and_a_miss_asks_for_a_start() {
        let t0 = Instant::now();
        let mut p = pools(limits(0, 2, 4, 8));
        assert!(p.next_start().is_none(), "nothing asked yet");
        let c = p.claim("a", "img", || "spec-a", t0);
        assert!(c.item.is_none() && !c.unpooled, "first ask: a miss, pooled");
        let s = p.next_start().expect("the miss raised the target");
        assert_eq!((s.key.as_str(), s.template), ("a", "spec-a"));
        assert!(p.next_start().is_none(), "one is starting: target met");
        assert_eq!(p.started("a", 7, t0), None);
        assert_eq!(p.claim("a", "img", || unreachable!(), t0).item, Some(7));
    }

    #[test]
    fn the_node_wide_cap_bounds_ready_and_starting_together() {
        let t0 = Instant::now();
        let mut p = pools(limits(2, 4, 3, 8));
        p.claim("a", "img", || "a", t0);
        p.claim("b", "img", || "b", t0);
        let mut started = Vec::new();
        while let Some(s) = p.next_start() {
            started.push(s.key);
        }
        assert_eq!(started.len(), 3, "{started:?}");
        assert_eq!(p.held(), 3);
        // Both keys got some: the largest deficit goes first.
        assert!(started.contains(&"a".to_string()) && started.contains(&"b".to_string()));
        p.start_failed(&started[0]);
        assert_eq!(p.held(), 2);
        assert!(p.next_start().is_some(), "a failed start frees its place");
    }

    #[test]
    fn a_zero_total_turns_agent_pools_off() {
        let mut p = pools(limits(0, 2, 0, 8));
        let c = p.claim("a", "img", || "a", Instant::now());
        assert!(c.unpooled && c.item.is_none());
        assert_eq!(p.keys(), 0);
    }

    #[test]
    fn a_new_key_displaces_the_least_recently_asked_empty_key() {
        let t0 = Instant::now();
        let mut p = pools(limits(0, 2, 4, 2));
        p.claim("old", "img", || "old", t0);
        p.claim("busy", "img", || "busy", t0 + Duration::from_secs(1));
        // "busy" holds a ready process; "old" holds nothing (its start failed).
        for _ in 0..2 {
            let s = p.next_start().expect("both are short");
            if s.key == "busy" {
                p.started("busy", 1, t0);
            } else {
                p.start_failed(&s.key);
            }
        }
        assert!(
            !p.claim("new", "img", || "new", t0 + Duration::from_secs(2))
                .unpooled
        );
        assert_eq!(p.keys(), 2);
        let keys: Vec<String> = p.ready_by_key().into_iter().map(|(k, _, _)| k).collect();
        assert_eq!(keys, vec!["busy".to_string(), "new".to_string()]);
        // Now both hold something or are recent; a third key with no room
        // is not pooled rather than evicting a ready process.
        p.next_start().map(|s| p.started(&s.key, 2, t0));
        assert!(p.claim("third", "img", || "third", t0).unpooled);
    }

    #[test]
    fn a_retired_agent_drains_then_is_forgotten() {
        let t0 = Instant::now();
        let mut p = pools(limits(0, 2, 4, 8));
        p.claim("v1", "img", || "v1", t0);
        let s = p.next_start().expect("a start");
        p.started(&s.key, 1, t0);
        // Nobody asks for v1 again: its process expires, its target falls
        // to min (0), and the key is forgotten.
        let swept = p.sweep(t0 + IDLE, |_| true);
        assert_eq!(swept.expired, vec![1]);
        assert_eq!(p.keys(), 0);
        assert!(p.next_start().is_none(), "nothing restarts for v1");
    }

    #[test]
    fn a_process_finished_after_its_key_was_forgotten_is_handed_back() {
        let t0 = Instant::now();
        let mut p = pools(limits(0, 2, 4, 8));
        p.claim("a", "img", || "a", t0);
        let s = p.next_start().expect("a start");
        assert_eq!(s.key, "a");
        // The key stays while its start is in flight.
        p.sweep(t0 + IDLE * 2, |_| true);
        assert_eq!(p.keys(), 1);
        p.drain();
        assert_eq!(p.started("gone", 9, t0), Some(9));
    }

    #[test]
    fn dead_processes_are_swept_and_replaced() {
        let t0 = Instant::now();
        let mut p = pools(limits(1, 2, 4, 8));
        p.claim("a", "img", || "a", t0);
        while let Some(s) = p.next_start() {
            p.started(&s.key, 5, t0);
        }
        let before = p.held();
        let swept = p.sweep(t0, |_| false);
        assert_eq!(swept.dead.len() as u32, before);
        assert!(p.next_start().is_some(), "dead ones are started again");
    }
}
