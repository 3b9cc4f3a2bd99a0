//! Placement: a pure function from node snapshots to a choice.
//!
//! Least-loaded by each node's used slots — the larger of what it last
//! reported and what this dispatcher has in flight there (always fresh) —
//! with ties broken at random. A node with a pre-started agent process for
//! the session's agent is preferred, then one with a warm container for its
//! image.
//!
//! Why not power-of-two-choices: it bounds the maximum only to O(log log n)
//! above the mean, and the balance benchmark (`berth-loadtest balance`) showed
//! it at max/mean 1.4 in a burst where the least-loaded pick stays near 1.
//! Its benefit, not herding on stale reports, matters little here: nodes
//! report on every change, and each dispatcher's own placements count at once
//! through `inflight`. Random tie-breaking spreads dispatchers that see the
//! same loads.

/// What placement knows of one node.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeSnapshot {
    /// Whether its load stream is live.
    pub up: bool,
    pub draining: bool,
    pub capacity: u32,
    /// Sessions it last reported running.
    pub running: u32,
    /// Sessions this dispatcher has placed there and not seen end.
    pub inflight: u32,
    /// Warm containers ready for the session's image.
    pub warm_ready: u32,
    /// Pre-started agent processes ready for the session's agent key.
    pub warm_process_ready: u32,
}

impl NodeSnapshot {
    /// Slots in use, as best this dispatcher knows.
    pub fn used(&self) -> u32 {
        self.running.max(self.inflight)
    }

    /// Whether a new session may go here.
    pub fn eligible(&self) -> bool {
        self.up && !self.draining && self.used() < self.capacity
    }

    /// Placements of this dispatcher the node's last report does not show
    /// yet (a burst placed since): each may take one of its warm spares.
    fn unreported(&self) -> u32 {
        self.inflight.saturating_sub(self.running)
    }

    /// Pre-started processes left for one more session, as best known.
    fn processes_left(&self) -> u32 {
        self.warm_process_ready.saturating_sub(self.unreported())
    }

    /// Warm containers left for one more session, as best known.
    fn containers_left(&self) -> u32 {
        self.warm_ready.saturating_sub(self.unreported())
    }

    /// Fraction of capacity in use.
    fn load(&self) -> f64 {
        f64::from(self.used()) / f64::from(self.capacity.max(1))
    }
}

/// Picks a node index, or `None` when every node is full, draining or down.
/// `random(n)` returns a uniform index below `n`.
pub fn choose(nodes: &[NodeSnapshot], mut random: impl FnMut(usize) -> usize) -> Option<usize> {
    let eligible: Vec<usize> = (0..nodes.len()).filter(|&i| nodes[i].eligible()).collect();
    let with = |ready: fn(&NodeSnapshot) -> u32| -> Vec<usize> {
        eligible
            .iter()
            .copied()
            .filter(|&i| ready(&nodes[i]) > 0)
            .collect()
    };
    // What the last report offered, less what this dispatcher has placed
    // there since: a burst must not herd onto one node's stale spares.
    let warm_process = with(NodeSnapshot::processes_left);
    let warm = with(NodeSnapshot::containers_left);
    let pool = [warm_process, warm]
        .into_iter()
        .find(|p| !p.is_empty())
        .unwrap_or(eligible);
    let least = pool
        .iter()
        .map(|&i| nodes[i].load())
        .min_by(f64::total_cmp)?;
    let ties: Vec<usize> = pool
        .into_iter()
        .filter(|&i| nodes[i].load() == least)
        .collect();
    match ties.len() {
        0 => None,
        1 => Some(ties[0]),
        n => Some(ties[random(n)]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn node(capacity: u32, running: u32) -> NodeSnapshot {
        NodeSnapshot {
            up: true,
            draining: false,
            capacity,
            running,
            inflight: 0,
            warm_ready: 0,
            warm_process_ready: 0,
        }
    }

    fn snapshot() -> impl Strategy<Value = NodeSnapshot> {
        (
            any::<bool>(),
            any::<bool>(),
            0u32..8,
            0u32..10,
            0u32..10,
            0u32..3,
            0u32..3,
        )
            .prop_map(
                |(up, draining, capacity, running, inflight, warm_ready, warm_process_ready)| {
                    NodeSnapshot {
                        up,
                        draining,
                        capacity,
                        running,
                        inflight,
                        warm_ready,
                        warm_process_ready,
                    }
                },
            )
    }

    proptest! {
        #[test]
        fn never_picks_a_full_draining_or_down_node(nodes in prop::collection::vec(snapshot(), 0..12), seed in any::<u64>()) {
            let mut s = seed;
            let pick = choose(&nodes, |n| { s = s.wrapping_mul(6364136223846793005).wrapping_add(1); (s >> 33) as usize % n });
            match pick {
                Some(i) => prop_assert!(nodes[i].eligible()),
                None => prop_assert!(nodes.iter().all(|n| !n.eligible())),
            }
        }

        #[test]
        fn balance_stays_within_bounds_under_random_arrivals(n in 2usize..10, arrivals in 1usize..200, seed in any::<u64>()) {
            let mut nodes: Vec<_> = (0..n).map(|_| node(1000, 0)).collect();
            let mut s = seed;
            for _ in 0..arrivals {
                let i = choose(&nodes, |k| { s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407); (s >> 33) as usize % k }).expect("room");
                nodes[i].inflight += 1;
            }
            let max = nodes.iter().map(|x| x.inflight).max().unwrap_or(0) as f64;
            let mean = arrivals as f64 / n as f64;
            // Least-loaded keeps every node within one session of the others.
            prop_assert!(max <= mean.ceil(), "max {max} mean {mean}");
        }
    }

    #[test]
    fn ties_are_broken_at_random() {
        let nodes = vec![node(10, 1), node(10, 1), node(10, 2)];
        assert_eq!(choose(&nodes, |_| 0), Some(0));
        assert_eq!(choose(&nodes, |n| n - 1), Some(1));
    }

    #[test]
    fn prefers_a_node_with_a_warm_container() {
        let mut nodes = vec![node(10, 0), node(10, 5)];
        nodes[1].warm_ready = 1;
        assert_eq!(choose(&nodes, |_| 0), Some(1));
    }

    #[test]
    fn prefers_a_pre_started_process_to_a_warm_container() {
        let mut nodes = vec![node(10, 0), node(10, 5), node(10, 2)];
        nodes[0].warm_ready = 1;
        nodes[1].warm_process_ready = 1;
        assert_eq!(choose(&nodes, |_| 0), Some(1));
        // A full node's process does not count.
        nodes[1].running = 10;
        assert_eq!(choose(&nodes, |_| 0), Some(0));
    }

    #[test]
    fn a_burst_does_not_herd_onto_spares_already_taken() {
        let mut nodes = vec![node(10, 0), node(10, 0), node(10, 0)];
        nodes[2].warm_process_ready = 2;
        let mut picks = Vec::new();
        for _ in 0..6 {
            // The reports stay stale (running 0, two ready) through the burst.
            let i = choose(&nodes, |n| n - 1).expect("room");
            nodes[i].inflight += 1;
            picks.push(i);
        }
        assert_eq!(&picks[..2], &[2, 2], "the two spares go first");
        assert_eq!(
            picks.iter().filter(|&&i| i == 2).count(),
            2,
            "then the others: {picks:?}"
        );
    }

    #[test]
    fn the_dispatchers_own_inflight_count_outranks_a_stale_report() {
        let mut nodes = vec![node(4, 0), node(4, 1)];
        nodes[0].inflight = 4;
        assert_eq!(choose(&nodes, |_| 0), Some(1));
    }
}
