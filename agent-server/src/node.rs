//! The node: its session slots, the registry of running sessions, and its load.
//!
//! Invariant: a session id occupies at most one slot. A start for a session
//! the node already runs under an older epoch fences the old run: its
//! container is killed before the new one takes the slot.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use berth_common::sync::lock;

use crate::config::{Config, WorkspaceConfig};
use crate::container::ContainerRuntime;
use crate::lease::RunLease;
use crate::load::Load;
use crate::pool::Pools;

/// Slots the configured capacity allows, bounded by what the machine's memory
/// holds at the per-container limit.
fn capacity_for_memory(cfg: &Config) -> u32 {
    let mut sys = match sysinfo::System::new() {
        Ok(sys) => sys,
        Err(_) => return cfg.capacity,
    };
    sys.refresh_memory();
    let per = u64::try_from(cfg.memory_mib).unwrap_or(1).max(1) * 1024 * 1024;
    let fits = u32::try_from(sys.total_memory() / per)
        .unwrap_or(u32::MAX)
        .max(1);
    if fits < cfg.capacity {
        tracing::warn!(
            configured = cfg.capacity,
            fits,
            memory_mib = cfg.memory_mib,
            "capacity bounded by memory: --capacity sessions at --memory-mib each do not fit"
        );
    }
    cfg.capacity.min(fits)
}

/// A session the node is running.
#[derive(Debug, Clone)]
pub struct RunningSession {
    pub session_id: String,
    /// The epoch the run is at now (a re-attach moves it on).
    pub epoch: i64,
    pub container_id: String,
    cancel: CancellationToken,
    /// The run's lease on the gateway (see [`crate::lease`]); also what
    /// tells this run's slot from a newer one of the same session.
    lease: Arc<RunLease>,
}

/// How long a run's lease lasts before the first reconcile pass says
/// otherwise (a dispatcher's own value replaces it with its first pass).
/// Short: never longer than a dispatcher would give, or a run started
/// before the first pass would outlive its node's loss unfrozen.
const DEFAULT_LEASE: Duration = Duration::from_secs(1);

impl RunningSession {
    /// The run's lease.
    pub fn lease(&self) -> &RunLease {
        &self.lease
    }
}

/// Why a start was refused (late binding: the dispatcher places it elsewhere).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("node is at capacity ({0} sessions)")]
    AtCapacity(u32),
    #[error("node is draining")]
    Draining,
    #[error("node already runs this session at epoch {0}, newer than the start's")]
    StaleEpoch(i64),
}

impl Refusal {
    /// The metrics label of this refusal.
    pub fn label(&self) -> &'static str {
        match self {
            Self::AtCapacity(_) => "at_capacity",
            Self::Draining => "draining",
            Self::StaleEpoch(_) => "stale_epoch",
        }
    }
}

/// Shared node state.
pub struct Node {
    pub cfg: Config,
    pub runtime: ContainerRuntime,
    /// Snapshots, memory stores and files.
    pub objects: berth_common::objects::ObjectStore,
    /// How workspaces move in and out of containers.
    pub workspace: WorkspaceConfig,
    sessions: Mutex<HashMap<String, RunningSession>>,
    draining: AtomicBool,
    /// Set by a drain for shutdown, which no undrain ends.
    shutting_down: AtomicBool,
    load: Arc<watch::Sender<Load>>,
    pub pools: Arc<Pools>,
    /// Pre-started agent processes, per agent key.
    pub processes: Arc<crate::pool::ProcessPools>,
    /// The sandboxes' egress gateway; `None` with `--gateway-dir off`.
    pub gateway: Option<Arc<crate::gateway::Gateway>>,
    /// Session slots: the configured capacity, bounded by memory.
    pub capacity: u32,
    generation: AtomicU64,
    /// Cancelled when the node shuts down; every session's token is a child.
    pub shutdown: CancellationToken,
    /// Cancelled when a drain's deadline passes; every slot's `evict` is a child.
    evict: CancellationToken,
    /// The origin of the node's own clock in `listed_at_ms`.
    clock: tokio::time::Instant,
    /// Every run's session task and its streams' command pumps: shutdown
    /// awaits them.
    pub tasks: tokio_util::task::TaskTracker,
    /// How long a confirmation lasts, as the last reconcile pass said (ms).
    lease_ms: AtomicU64,
}

/// A held session slot. Dropping it frees the slot.
pub struct Slot {
    node: Arc<Node>,
    session_id: String,
    epoch: i64,
    pub cancel: CancellationToken,
    /// Cancelled when a drain's deadline passes: the run ends with a snapshot.
    pub evict: CancellationToken,
    /// The run's lease on the gateway; fenced when the session moved on.
    pub lease: Arc<RunLease>,
    /// The trace its work is in now (the current turn's): the gateway's
    /// spans join it.
    pub trace: berth_common::traces::TraceCell,
}

impl Node {
    pub fn new(
        cfg: Config,
        runtime: ContainerRuntime,
        objects: berth_common::objects::ObjectStore,
        gateway: Option<Arc<crate::gateway::Gateway>>,
        shutdown: CancellationToken,
    ) -> Arc<Self> {
        let capacity = capacity_for_memory(&cfg);
        let load = Arc::new(
            watch::channel(Load {
                capacity,
                ..Load::default()
            })
            .0,
        );
        let pools = Pools::new(
            cfg.pools(),
            runtime.clone(),
            load.clone(),
            shutdown.child_token(),
        );
        let starter = crate::pool::Starter {
            runtime: runtime.clone(),
            objects: objects.clone(),
            workspace: cfg.workspace(),
            home: cfg.home.clone(),
            gateway_port: gateway.as_ref().map(|_| cfg.gateway_port),
            health_cmd: cfg.warm_health_cmd.clone(),
        };
        let processes = crate::pool::ProcessPools::new(
            cfg.agent_pools(),
            starter,
            load.clone(),
            shutdown.child_token(),
        );
        Arc::new(Self {
            workspace: cfg.workspace(),
            processes,
            cfg,
            runtime,
            objects,
            sessions: Mutex::new(HashMap::new()),
            draining: AtomicBool::new(false),
            shutting_down: AtomicBool::new(false),
            load,
            pools,
            gateway,
            capacity,
            generation: AtomicU64::new(0),
            shutdown,
            evict: CancellationToken::new(),
            clock: tokio::time::Instant::now(),
            tasks: tokio_util::task::TaskTracker::new(),
            lease_ms: AtomicU64::new(DEFAULT_LEASE.as_millis() as u64),
        })
    }

    /// Now, in milliseconds of the node's own clock (`listed_at_ms`).
    pub fn clock_ms(&self) -> u64 {
        u64::try_from(self.clock.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// A fresh lease for a run started or re-attached now.
    fn lease_from_now(&self) -> tokio::time::Instant {
        tokio::time::Instant::now() + Duration::from_millis(self.lease_ms.load(Ordering::Relaxed))
    }

    /// A dispatcher re-attached to the run of `session_id` at `epoch`: the
    /// run is at that epoch now, and confirmed.
    pub fn reattached(&self, session_id: &str, epoch: i64) {
        if let Some(s) = self.sessions().get_mut(session_id) {
            s.epoch = s.epoch.max(epoch);
            s.lease.confirm(self.lease_from_now());
        }
    }

    /// Applies a dispatcher's verdict on the runs it was listed at
    /// `listed_at_ms`: confirms the current ones until `valid_for` past
    /// that moment, and fences the superseded ones (gateway first, then
    /// the agent). A verdict about an epoch the run has left is ignored.
    /// Returns how many runs were fenced.
    pub fn reconcile(
        &self,
        listed_at_ms: u64,
        valid_for: Duration,
        confirm: &[(String, i64)],
        fence: &[(String, i64)],
    ) -> u32 {
        self.lease_ms
            .store(valid_for.as_millis() as u64, Ordering::Relaxed);
        let until = self.clock + Duration::from_millis(listed_at_ms) + valid_for;
        let sessions = self.sessions();
        for (id, epoch) in confirm {
            if let Some(s) = sessions.get(id).filter(|s| s.epoch == *epoch) {
                s.lease.confirm(until);
            }
        }
        let mut fenced = 0;
        for (id, epoch) in fence {
            if let Some(s) = sessions.get(id).filter(|s| s.epoch == *epoch) {
                tracing::warn!(session_id = %id, epoch, "fencing a superseded run: its session moved on");
                // The gateway refuses and drops its connections first; then
                // the agent is killed.
                s.lease.fence();
                s.cancel.cancel();
                fenced += 1;
            }
        }
        if fenced > 0 {
            metrics::counter!(crate::metrics::RUNS_FENCED).increment(u64::from(fenced));
        }
        fenced
    }

    /// Whether the node is draining.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    fn sessions(&self) -> std::sync::MutexGuard<'_, HashMap<String, RunningSession>> {
        // A poisoned map is still a consistent map: every mutation is one insert or remove.
        lock(&self.sessions)
    }

    /// Takes a slot for `session_id` at `epoch`, or says why not.
    pub fn reserve(self: &Arc<Self>, session_id: &str, epoch: i64) -> Result<Slot, Refusal> {
        if self.draining.load(Ordering::SeqCst) {
            return Err(Refusal::Draining);
        }
        let mut sessions = self.sessions();
        if let Some(old) = sessions.get(session_id) {
            if old.epoch >= epoch {
                return Err(Refusal::StaleEpoch(old.epoch));
            }
            tracing::warn!(
                session_id,
                old_epoch = old.epoch,
                epoch,
                "fencing a superseded run of this session"
            );
            old.lease.fence();
            old.cancel.cancel();
            sessions.remove(session_id);
        }
        let capacity = self.capacity;
        if sessions.len() >= capacity as usize {
            return Err(Refusal::AtCapacity(capacity));
        }
        let cancel = self.shutdown.child_token();
        let evict = self.evict.child_token();
        let lease = Arc::new(RunLease::new(self.lease_from_now()));
        sessions.insert(
            session_id.to_string(),
            RunningSession {
                session_id: session_id.to_string(),
                epoch,
                container_id: String::new(),
                cancel: cancel.clone(),
                lease: lease.clone(),
            },
        );
        let running = sessions.len() as u32;
        drop(sessions);
        self.load.send_modify(|l| l.running = running);
        Ok(Slot {
            node: self.clone(),
            session_id: session_id.to_string(),
            epoch,
            cancel,
            evict,
            lease,
            trace: berth_common::traces::TraceCell::default(),
        })
    }

    /// Records the container a slot's session runs in.
    pub fn set_container(&self, slot: &Slot, container_id: &str) {
        if let Some(s) = self
            .sessions()
            .get_mut(&slot.session_id)
            .filter(|s| Arc::ptr_eq(&s.lease, &slot.lease))
        {
            s.container_id = container_id.to_string();
        }
    }

    /// Sessions running now.
    pub fn running(&self) -> Vec<RunningSession> {
        self.sessions().values().cloned().collect()
    }

    /// Stops new placements and warm-pool refills (the spares are removed).
    /// Running sessions finish.
    pub fn drain(&self) -> u32 {
        if !self.draining.swap(true, Ordering::SeqCst) {
            tracing::info!("draining: no new sessions; removing warm containers");
        }
        self.pools.stop();
        self.processes.stop();
        self.load.send_modify(|l| l.draining = true);
        self.sessions().len() as u32
    }

    /// Ends a drain (`UndrainNode`): sessions are accepted again and the
    /// warm pools refill. Refused while the node is shutting down.
    pub fn undrain(&self) -> Result<(), &'static str> {
        if self.shutting_down.load(Ordering::SeqCst) || self.shutdown.is_cancelled() {
            return Err("the node is shutting down");
        }
        if self.draining.swap(false, Ordering::SeqCst) {
            tracing::info!("undrained: taking sessions and refilling warm pools again");
        }
        self.pools.restart();
        self.processes.restart();
        self.load.send_modify(|l| l.draining = false);
        Ok(())
    }

    /// Drains the node for a shutdown (SIGTERM): no new sessions; running
    /// ones get `deadline` to finish, then are stopped with a snapshot (the
    /// dispatcher places them again). Returns once no session holds a slot,
    /// or `deadline` plus `grace` have passed.
    pub async fn drain_for_shutdown(
        &self,
        deadline: std::time::Duration,
        grace: std::time::Duration,
    ) {
        self.shutting_down.store(true, Ordering::SeqCst);
        let running = self.drain();
        tracing::info!(running, deadline = ?deadline, "draining for shutdown: waiting for running sessions to finish");
        if tokio::time::timeout(deadline, self.wait_idle())
            .await
            .is_ok()
        {
            tracing::info!("drained: every session finished");
            return;
        }
        let left = self.sessions().len();
        tracing::info!(
            sessions = left,
            "drain deadline passed: snapshotting the remaining sessions so they resume elsewhere"
        );
        self.evict.cancel();
        if tokio::time::timeout(grace, self.wait_idle()).await.is_err() {
            tracing::warn!(
                sessions = self.sessions().len(),
                "sessions still running after the drain grace period; stopping them without a snapshot"
            );
        }
    }

    /// Subscribes to load changes.
    pub fn watch_load(&self) -> watch::Receiver<Load> {
        self.load.subscribe()
    }

    /// The next report generation: increases with every report sent.
    pub fn next_generation(&self) -> u64 {
        self.generation.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// Samples CPU and memory (sysinfo) into the load, every heartbeat,
    /// until the node shuts down.
    pub async fn sample(self: Arc<Self>) {
        let node = self;
        let mut sys = match sysinfo::System::new() {
            Ok(sys) => sys,
            Err(e) => {
                tracing::warn!(error = %e, "cannot sample CPU and memory; load reports will carry zeros");
                return;
            }
        };
        let mut tick = tokio::time::interval(node.cfg.load_heartbeat);
        loop {
            tokio::select! {
                _ = node.shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            sys.refresh_cpu_usage();
            sys.refresh_memory();
            let cpu = f64::from(sys.global_cpu_usage()) / 100.0;
            let (used, total) = (sys.used_memory(), sys.total_memory());
            node.load.send_if_modified(|l| {
                let changed =
                    (l.cpu_utilization - cpu).abs() > 0.05 || l.memory_total_bytes != total;
                l.cpu_utilization = cpu;
                l.memory_used_bytes = used;
                l.memory_total_bytes = total;
                changed
            });
        }
    }

    /// Waits until every session has released its slot.
    pub async fn wait_idle(&self) {
        let mut rx = self.load.subscribe();
        let _ = rx.wait_for(|l| l.running == 0).await;
    }
}

impl Slot {
    /// The epoch the run was started at.
    pub fn epoch(&self) -> i64 {
        self.epoch
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut sessions = self.node.sessions();
        if sessions
            .get(&self.session_id)
            .is_some_and(|s| Arc::ptr_eq(&s.lease, &self.lease))
        {
            sessions.remove(&self.session_id);
        }
        let running = sessions.len() as u32;
        drop(sessions);
        self.node.load.send_modify(|l| l.running = running);
    }
}
