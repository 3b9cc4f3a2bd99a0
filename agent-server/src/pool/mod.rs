//! Warm pools: per image, containers started ahead of demand, each with a
//! launcher shell already exec'd into it, so a session starts with one line
//! written to that shell instead of a create, a start and an exec.
//!
//! [`state`] decides (targets, claims, expiries, the deficit); this module
//! carries the decisions out against Docker.
//!
//! Invariants:
//! - a claim is a pop from a ready queue: no Docker call on the hot path;
//! - a warm container holds nothing of any session (no env, no labels, no
//!   files): the session's env enters at launch, on the launcher's stdin
//!   (never in the container's or the exec's config), and containers are
//!   single-use;
//! - a container is offered only after its health check passed, and only
//!   until it is `max_idle` old; a background sweep evicts dead ones.

mod in_flight;
mod loops;
mod process_state;
pub mod processes;
mod state;
mod warm_up;

pub use in_flight::StartInFlight;
pub use processes::{ProcessPools, Starter, WarmProcess};

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use berth_common::sync::lock;
use tokio::sync::{Notify, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::PoolConfig;
use crate::container::{AgentProcess, ContainerRuntime, Purpose};
use crate::load::Load;
use crate::metrics::{
    POOL_EVICTIONS, POOL_HITS, POOL_MISSES, POOL_READY, POOL_REFILL_FAILURES, POOL_REFILLS,
    POOL_TARGET,
};
use state::PoolState;

/// A ready warm container.
pub struct Claimed {
    pub id: String,
    /// The launcher shell, when the image has `sh` (else the agent is exec'd).
    pub launcher: Option<AgentProcess>,
}

/// One image's pool.
struct Pool {
    image: String,
    state: Mutex<PoolState<Claimed>>,
    wake: Notify,
}

impl Pool {
    fn state(&self) -> std::sync::MutexGuard<'_, PoolState<Claimed>> {
        // Every mutation is one call on the state machine: a poisoned state is whole.
        lock(&self.state)
    }
}

/// Every pool of a node.
pub struct Pools {
    pools: HashMap<String, Arc<Pool>>,
    runtime: ContainerRuntime,
    cfg: PoolConfig,
    load: Arc<watch::Sender<Load>>,
    /// The refill loops: stopped by a drain, restarted by an undrain.
    loops: loops::Loops,
}

impl Pools {
    pub fn new(
        cfg: PoolConfig,
        runtime: ContainerRuntime,
        load: Arc<watch::Sender<Load>>,
        stop: CancellationToken,
    ) -> Arc<Self> {
        let pools = cfg
            .pools
            .iter()
            .map(|spec| {
                let pool = Pool {
                    image: spec.image.clone(),
                    state: Mutex::new(PoolState::new(spec.min, spec.max, cfg.max_idle)),
                    wake: Notify::new(),
                };
                (spec.image.clone(), Arc::new(pool))
            })
            .collect();
        let pools = Arc::new(Self {
            pools,
            runtime,
            cfg,
            load,
            loops: loops::Loops::new(stop),
        });
        pools.publish();
        pools
    }

    /// Starts each pool's refill loop.
    pub fn spawn(self: &Arc<Self>) {
        for image in self.pools.keys() {
            crate::metrics::init_pool_series(image);
        }
        let stop = self.loops.token();
        let handles: Vec<_> = self
            .pools
            .values()
            .map(|pool| tokio::spawn(self.clone().refill_loop(pool.clone(), stop.clone())))
            .collect();
        for h in handles {
            self.loops.track(h);
        }
    }

    /// Waits until every refill loop has ended and removed its spares
    /// (after a shutdown).
    pub async fn stopped(&self) {
        self.loops.join().await;
    }

    /// Refills again after a drain (no-op unless stopped, or shutting down).
    pub fn restart(self: &Arc<Self>) {
        if self.loops.rearm() {
            self.spawn();
        }
    }

    /// Takes a ready container for `image`: a pop, no Docker call. `None` is a
    /// miss (no pool, or none ready); a pool's miss raises its target.
    pub fn claim(&self, image: &str) -> Option<Claimed> {
        let pool = self.pools.get(image)?;
        // Hits and misses are counted where the start's outcome is known
        // (`session`): a claimed container can still turn out dead.
        let claimed = pool.state().claim(Instant::now());
        pool.wake.notify_one();
        self.publish();
        claimed
    }

    /// Records that a claimed container turned out dead at exec.
    pub fn claimed_dead(&self, image: &str) {
        if self.pools.contains_key(image) {
            metrics::counter!(POOL_EVICTIONS, "image" => image.to_string(), "reason" => "dead")
                .increment(1);
        }
    }

    /// Counts a start of `image` as a pool hit or miss (pooled images only).
    pub fn count_start(&self, image: &str, warm: bool) {
        if self.pools.contains_key(image) {
            let name = if warm { POOL_HITS } else { POOL_MISSES };
            metrics::counter!(name, "image" => image.to_string()).increment(1);
        }
    }

    /// Sends the ready counts into the node's load.
    fn publish(&self) {
        let mut warm: Vec<(String, u32)> = Vec::with_capacity(self.pools.len());
        for p in self.pools.values() {
            let (ready, target) = {
                let s = p.state();
                (s.ready(), s.target())
            };
            let image = p.image.clone();
            metrics::gauge!(POOL_READY, "image" => image.clone()).set(f64::from(ready));
            metrics::gauge!(POOL_TARGET, "image" => image.clone()).set(f64::from(target));
            warm.push((image, ready));
        }
        warm.sort();
        self.load.send_if_modified(|l| {
            let changed = l.warm != warm;
            l.warm = warm;
            changed
        });
    }

    /// Stops refilling; each pool's loop removes its ready containers.
    pub fn stop(&self) {
        self.loops.stop();
    }

    async fn refill_loop(self: Arc<Self>, pool: Arc<Pool>, stop: CancellationToken) {
        let image = pool.image.clone();
        let interval = Duration::from_secs_f64(1.0 / self.cfg.refill_per_sec);
        let mut next_start = Instant::now();
        let mut backoff =
            berth_common::retry::Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
        let mut sweep = tokio::time::interval(self.cfg.check_interval);
        loop {
            // One start at a time per pool, so the deficit is all there is to count.
            if pool.state().deficit() > 0 {
                tokio::select! {
                    () = stop.cancelled() => break,
                    () = tokio::time::sleep_until(next_start) => {}
                }
                next_start = Instant::now() + interval;
                match self.start_one(&image).await {
                    Ok(warm) if !stop.is_cancelled() => {
                        pool.state().add(warm, Instant::now());
                        metrics::counter!(POOL_REFILLS, "image" => image.clone()).increment(1);
                        backoff.reset();
                        self.publish();
                    }
                    Ok(warm) => {
                        self.runtime.remove(&warm.id).await;
                        break;
                    }
                    Err(e) => {
                        metrics::counter!(POOL_REFILL_FAILURES, "image" => image.clone())
                            .increment(1);
                        let delay = backoff.next_delay();
                        tracing::warn!(%image, error = %e, retry_in = ?delay, "warm container failed to start");
                        next_start = Instant::now() + delay;
                    }
                }
                continue;
            }
            tokio::select! {
                () = stop.cancelled() => break,
                () = pool.wake.notified() => {}
                _ = sweep.tick() => self.sweep(&pool).await,
            }
        }
        // Drain or shutdown: this pool's spares go.
        let drained = pool.state().drain();
        for w in drained {
            self.runtime.remove(&w.id).await;
        }
        self.publish();
    }

    /// Creates, starts and health-checks one warm container, and starts its
    /// launcher (a container whose image has no `sh` goes without one).
    async fn start_one(&self, image: &str) -> Result<Claimed, crate::error::Error> {
        let id = self.runtime.start_container(image, Purpose::Warm).await?;
        let check = &self.cfg.health_cmd;
        if !check.is_empty()
            && let Err(e) = self.runtime.check(&id, check).await
        {
            self.runtime.remove(&id).await;
            return Err(e);
        }
        let launcher = match self.runtime.start_launcher(&id).await {
            Ok(l) => Some(l),
            Err(e) => {
                tracing::debug!(%image, error = %e, "no launcher in the warm container; sessions will exec");
                None
            }
        };
        Ok(Claimed { id, launcher })
    }

    /// Evicts ready containers that died or aged past `max_idle`.
    async fn sweep(&self, pool: &Pool) {
        let running = match self.runtime.running_warm().await {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(error = %e, "warm pool sweep could not list containers");
                return;
            }
        };
        let swept = pool
            .state()
            .sweep(Instant::now(), |w| running.contains(&w.id));
        if swept.dead.is_empty() && swept.expired.is_empty() {
            return;
        }
        let image = pool.image.clone();
        tracing::info!(%image, dead = swept.dead.len(), expired = swept.expired.len(), "evicting warm containers");
        metrics::counter!(POOL_EVICTIONS, "image" => image.clone(), "reason" => "dead")
            .increment(swept.dead.len() as u64);
        metrics::counter!(POOL_EVICTIONS, "image" => image, "reason" => "expired")
            .increment(swept.expired.len() as u64);
        for w in swept.dead.into_iter().chain(swept.expired) {
            self.runtime.remove(&w.id).await;
        }
        self.publish();
    }
}
