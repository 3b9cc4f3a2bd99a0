//! Warm pools: per image, containers started ahead of demand, each with a
//! launcher shell already exec'd into it, so a session starts with one line
//! written to that shell instead of a create, a start and an exec.
//!
//! Invariants:
//! - a claim is a pop from a ready queue: no Docker call on the hot path;
//! - a warm container holds nothing of any session (no env, no labels, no
//!   files): the session's env enters at launch, on the launcher's stdin
//!   (never in the container's or the exec's config), and containers are
//!   single-use;
//! - a container is offered only after its health check passed, and only
//!   until it is `max_idle` old; a background sweep evicts dead ones;
//! - each pool keeps `target` containers ready or starting, with
//!   `min <= target <= max`: a miss raises the target, an idle expiry lowers
//!   it, so the pool follows demand within its bounds.

use std::collections::{HashMap, VecDeque};
use std::str::FromStr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::container::{AgentProcess, ContainerRuntime, Purpose};
use crate::metrics::{
    POOL_EVICTIONS, POOL_HITS, POOL_MISSES, POOL_READY, POOL_REFILL_FAILURES, POOL_REFILLS,
    POOL_TARGET,
};
use crate::node::Load;

/// One pool's configuration: `IMAGE=MIN[:MAX]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolSpec {
    pub image: String,
    pub min: u32,
    pub max: u32,
}

impl FromStr for PoolSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (image, sizes) = s
            .rsplit_once('=')
            .ok_or_else(|| format!("`{s}`: expected IMAGE=MIN[:MAX], e.g. `agent:latest=2:8`"))?;
        let image = image.trim();
        if image.is_empty() {
            return Err(format!("`{s}`: the image is empty"));
        }
        let number = |n: &str| {
            n.trim()
                .parse::<u32>()
                .map_err(|_| format!("`{s}`: `{n}` is not a whole number"))
        };
        let (min, max) = match sizes.split_once(':') {
            Some((min, max)) => (number(min)?, number(max)?),
            None => {
                let min = number(sizes)?;
                (min, min)
            }
        };
        if max < min || max == 0 {
            return Err(format!("`{s}`: MAX must be at least MIN and at least 1"));
        }
        Ok(Self {
            image: image.to_string(),
            min,
            max,
        })
    }
}

struct Warm {
    id: String,
    ready_at: Instant,
    /// The launcher shell, when the image has `sh` (else the agent is exec'd).
    launcher: Option<AgentProcess>,
}

/// A claimed warm container.
pub struct Claimed {
    pub id: String,
    pub launcher: Option<AgentProcess>,
}

/// One image's pool.
pub struct Pool {
    pub spec: PoolSpec,
    ready: Mutex<VecDeque<Warm>>,
    /// Containers to keep ready or starting.
    target: AtomicU32,
    wake: Notify,
}

impl Pool {
    fn ready(&self) -> std::sync::MutexGuard<'_, VecDeque<Warm>> {
        // Every mutation is a single push or pop: a poisoned queue is consistent.
        self.ready.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Containers ready to hand out now.
    pub fn ready_count(&self) -> u32 {
        u32::try_from(self.ready().len()).unwrap_or(u32::MAX)
    }

    /// How many containers the pool is keeping ready.
    pub fn target(&self) -> u32 {
        self.target.load(Ordering::Relaxed)
    }
}

/// Every pool of a node.
pub struct Pools {
    pools: HashMap<String, Arc<Pool>>,
    runtime: ContainerRuntime,
    cfg: Config,
    load: Arc<watch::Sender<Load>>,
    /// Cancelled on drain or shutdown: refills stop, ready containers go.
    stop: CancellationToken,
}

impl Pools {
    pub fn new(
        cfg: &Config,
        runtime: ContainerRuntime,
        load: Arc<watch::Sender<Load>>,
        stop: CancellationToken,
    ) -> Arc<Self> {
        let pools = cfg
            .warm_pools
            .iter()
            .map(|spec| {
                let pool = Pool {
                    spec: spec.clone(),
                    ready: Mutex::new(VecDeque::new()),
                    target: AtomicU32::new(spec.min),
                    wake: Notify::new(),
                };
                (spec.image.clone(), Arc::new(pool))
            })
            .collect();
        let pools = Arc::new(Self {
            pools,
            runtime,
            cfg: cfg.clone(),
            load,
            stop,
        });
        pools.publish();
        pools
    }

    /// Starts each pool's refill loop.
    pub fn spawn(self: &Arc<Self>) -> Vec<tokio::task::JoinHandle<()>> {
        for image in self.pools.keys() {
            crate::metrics::init_pool_series(image);
        }
        self.pools
            .values()
            .map(|pool| tokio::spawn(self.clone().refill_loop(pool.clone())))
            .collect()
    }

    /// A pool by image.
    pub fn get(&self, image: &str) -> Option<&Arc<Pool>> {
        self.pools.get(image)
    }

    /// Every pool.
    pub fn all(&self) -> impl Iterator<Item = &Arc<Pool>> {
        self.pools.values()
    }

    /// Takes a ready container for `image`: a pop, no Docker call. `None` is a
    /// miss (no pool, or none ready); a pool's miss raises its target.
    pub fn claim(&self, image: &str) -> Option<Claimed> {
        let pool = self.pools.get(image)?;
        let max_idle = self.cfg.warm_max_idle;
        let claimed = {
            let mut ready = pool.ready();
            // Oldest first, skipping any that aged out since the last sweep
            // (the sweep removes those).
            let i = ready.iter().position(|w| w.ready_at.elapsed() < max_idle);
            i.and_then(|i| ready.remove(i))
        };
        // Hits and misses are counted where the start's outcome is known
        // (`session`): a claimed container can still turn out dead.
        if claimed.is_none() {
            let _ = pool
                .target
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |t| {
                    (t < pool.spec.max).then_some(t + 1)
                });
        }
        pool.wake.notify_one();
        self.publish();
        claimed.map(|w| Claimed {
            id: w.id,
            launcher: w.launcher,
        })
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
        let mut warm: Vec<(String, u32)> = self
            .pools
            .values()
            .map(|p| (p.spec.image.clone(), p.ready_count()))
            .collect();
        for p in self.pools.values() {
            let image = p.spec.image.clone();
            metrics::gauge!(POOL_READY, "image" => image.clone()).set(f64::from(p.ready_count()));
            metrics::gauge!(POOL_TARGET, "image" => image).set(f64::from(p.target()));
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
        self.stop.cancel();
    }

    async fn refill_loop(self: Arc<Self>, pool: Arc<Pool>) {
        let image = pool.spec.image.clone();
        let interval = Duration::from_secs_f64(1.0 / self.cfg.warm_refill_per_sec);
        let mut next_start = Instant::now();
        let mut backoff = Duration::from_millis(500);
        let mut sweep = tokio::time::interval(self.cfg.warm_check_interval);
        loop {
            // One start at a time per pool, so ready is all there is to count.
            if pool.ready_count() < pool.target() {
                tokio::select! {
                    () = self.stop.cancelled() => break,
                    () = tokio::time::sleep_until(next_start) => {}
                }
                next_start = Instant::now() + interval;
                match self.start_one(&image).await {
                    Ok((id, launcher)) if !self.stop.is_cancelled() => {
                        pool.ready().push_back(Warm {
                            id,
                            ready_at: Instant::now(),
                            launcher,
                        });
                        metrics::counter!(POOL_REFILLS, "image" => image.clone()).increment(1);
                        backoff = Duration::from_millis(500);
                        self.publish();
                    }
                    Ok((id, _)) => {
                        self.runtime.remove(&id).await;
                        break;
                    }
                    Err(e) => {
                        metrics::counter!(POOL_REFILL_FAILURES, "image" => image.clone())
                            .increment(1);
                        tracing::warn!(%image, error = %e, retry_in = ?backoff, "warm container failed to start");
                        next_start = Instant::now() + backoff;
                        backoff = (backoff * 2).min(Duration::from_secs(30));
                    }
                }
                continue;
            }
            tokio::select! {
                () = self.stop.cancelled() => break,
                () = pool.wake.notified() => {}
                _ = sweep.tick() => self.sweep(&pool).await,
            }
        }
        // Drain or shutdown: this pool's spares go.
        let drained: Vec<Warm> = pool.ready().drain(..).collect();
        for w in drained {
            self.runtime.remove(&w.id).await;
        }
        self.publish();
    }

    /// Creates, starts and health-checks one warm container, and starts its
    /// launcher (a container whose image has no `sh` goes without one).
    async fn start_one(
        &self,
        image: &str,
    ) -> Result<(String, Option<AgentProcess>), crate::error::Error> {
        let id = self.runtime.start_container(image, Purpose::Warm).await?;
        let check = &self.cfg.warm_health_cmd;
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
        Ok((id, launcher))
    }

    /// Evicts ready containers that died or aged past `max_idle`; an idle
    /// expiry lowers the target toward `min`.
    async fn sweep(&self, pool: &Pool) {
        let running = match self.runtime.running_warm().await {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(error = %e, "warm pool sweep could not list containers");
                return;
            }
        };
        let max_idle = self.cfg.warm_max_idle;
        let (evicted, expired) = {
            let mut ready = pool.ready();
            let mut evicted = Vec::new();
            let mut expired = 0u32;
            ready.retain(|w| {
                let dead = !running.contains(&w.id);
                let old = w.ready_at.elapsed() >= max_idle;
                if dead || old {
                    evicted.push(w.id.clone());
                    expired += u32::from(old && !dead);
                }
                !(dead || old)
            });
            (evicted, expired)
        };
        if evicted.is_empty() {
            return;
        }
        tracing::info!(image = %pool.spec.image, evicted = evicted.len(), expired, "evicting warm containers");
        let image = pool.spec.image.clone();
        let dead = evicted.len() as u64 - u64::from(expired);
        metrics::counter!(POOL_EVICTIONS, "image" => image.clone(), "reason" => "dead")
            .increment(dead);
        metrics::counter!(POOL_EVICTIONS, "image" => image, "reason" => "expired")
            .increment(u64::from(expired));
        let min = pool.spec.min;
        let _ = pool
            .target
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |t| {
                Some(t.saturating_sub(expired).max(min))
            });
        for id in evicted {
            self.runtime.remove(&id).await;
        }
        self.publish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_specs_parse_with_and_without_a_max() {
        assert_eq!(
            "berth-test-agent:latest=2:8".parse::<PoolSpec>(),
            Ok(PoolSpec {
                image: "berth-test-agent:latest".into(),
                min: 2,
                max: 8
            })
        );
        assert_eq!(
            "registry:5000/agent=3"
                .parse::<PoolSpec>()
                .map(|p| (p.min, p.max)),
            Ok((3, 3))
        );
        for bad in [
            "agent",
            "=2",
            "agent=x",
            "agent=4:2",
            "agent=0",
            "agent=1:y",
        ] {
            assert!(bad.parse::<PoolSpec>().is_err(), "{bad} should not parse");
        }
        assert_eq!("agent=0:4".parse::<PoolSpec>().map(|p| p.min), Ok(0));
    }
}
