//! Agent pools: per agent key, containers whose agent process is already
//! started and waiting on stdin for its first message, so a session's start
//! is a pop and a write (the real Claude Code CLI takes ~450 ms to start;
//! a started one answers its first message in ~20 ms).
//!
//! [`super::process_state`] decides (which keys, targets, the node-wide cap,
//! claims, expiry, retirement); this module carries the decisions out.
//!
//! Invariants:
//! - a pre-started process holds nothing of any session and no secret: it
//!   is started from the key's template (the spec less its run fields and
//!   every secret value), so its env is the agent's (which is empty, see
//!   `berth_common::warm`), `HOME`, and the gateway's address. The model
//!   API key is attached at egress by the gateway, which serves the
//!   container's socket only once a session claims it;
//! - the session's identity (its id, its gate, its labels in the journal)
//!   applies at claim; the container carries only the `berth.pool` label;
//! - single-use: a claimed process and its container end with the session;
//! - refills are rate-limited (`refill_per_sec`) and at most
//!   [`STARTS_IN_FLIGHT`] run at once.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use berth_common::sync::lock;
use berth_proto::node::v1 as pb;
use tokio::sync::{Notify, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::process_state::{ProcessLimits, ProcessPoolsState};
use crate::config::AgentPoolConfig;
use crate::container::{AgentProcess, ContainerRuntime, Purpose};
use crate::load::Load;
use crate::metrics::{
    WARM_AGENT_CLAIMS, WARM_AGENT_EVICTIONS, WARM_AGENT_KEYS, WARM_AGENT_READY, WARM_AGENT_REFILLS,
    WARM_AGENT_START,
};
use crate::spec::SessionSpec;

/// Pre-starts run at most this many at once.
const STARTS_IN_FLIGHT: usize = 2;

/// A started process is offered once its runtime's warm-up request is
/// answered (Claude Code's `initialize`: the CLI has started and done its
/// one-time setup; see [`super::warm_up`]), within [`SETTLE_MAX`].
/// A runtime with no warm-up is offered once its container has been quiet
/// (less than [`SETTLE_CPU`] of CPU per [`SETTLE_TICK`]) for
/// [`SETTLE_TICKS`] ticks in a row: the agent has finished starting and
/// waits on stdin (a session handed a process still starting would wait
/// for it). After [`SETTLE_MAX`] it is offered anyway.
const SETTLE_TICK: Duration = Duration::from_millis(100);
const SETTLE_CPU: Duration = Duration::from_millis(3);
const SETTLE_TICKS: u32 = 3;
const SETTLE_MAX: Duration = Duration::from_secs(20);

/// A container with its agent process started, waiting for a session.
pub struct WarmProcess {
    pub id: String,
    pub process: AgentProcess,
}

/// What starting an agent process needs of the node.
#[derive(Clone)]
pub struct Starter {
    pub runtime: ContainerRuntime,
    pub objects: berth_common::objects::ObjectStore,
    pub workspace: crate::config::WorkspaceConfig,
    /// The agent's `HOME`.
    pub home: String,
    /// The gateway's port in the container, when the node runs a gateway.
    pub gateway_port: Option<u16>,
    /// Run in each new container; empty: no check.
    pub health_cmd: Vec<String>,
}

type State = ProcessPoolsState<WarmProcess, pb::SessionSpec>;

/// Every agent pool of a node.
pub struct ProcessPools {
    state: Mutex<State>,
    wake: Notify,
    starter: Starter,
    cfg: AgentPoolConfig,
    load: Arc<watch::Sender<Load>>,
    /// The refill loops: stopped by a drain, restarted by an undrain.
    loops: super::loops::Loops,
    /// Session starts until their agent's first line: refills yield to them.
    starts: Arc<super::in_flight::StartsInFlight>,
}

impl ProcessPools {
    pub fn new(
        cfg: AgentPoolConfig,
        starter: Starter,
        load: Arc<watch::Sender<Load>>,
        stop: CancellationToken,
    ) -> Arc<Self> {
        let limits = ProcessLimits {
            min: cfg.min,
            max: cfg.max,
            total: cfg.total,
            max_keys: cfg.max_keys,
            max_idle: cfg.max_idle,
        };
        Arc::new(Self {
            state: Mutex::new(ProcessPoolsState::new(limits)),
            wake: Notify::new(),
            starter,
            cfg,
            load,
            loops: super::loops::Loops::new(stop),
            starts: Arc::default(),
        })
    }

    /// Counts a session's start (a hit or a miss) until the guard drops:
    /// refills wait meanwhile (see [`super::in_flight`]).
    pub fn start_in_flight(&self) -> super::StartInFlight {
        self.starts.enter()
    }

    /// Waits until no session start is in flight (bounded): what only
    /// tidies up after a start goes after it.
    pub async fn starts_settled(&self) {
        self.starts.yielded().await;
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // Every mutation is one call on the state machine: a poisoned state is whole.
        lock(&self.state)
    }

    /// Starts the refill loop.
    pub fn spawn(self: &Arc<Self>) {
        let stop = self.loops.token();
        let handle = tokio::spawn(self.clone().run(stop));
        self.loops.track(handle);
    }

    /// Waits until every refill loop has ended and removed its processes
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

    /// Stops refilling; the loop removes every ready process.
    pub fn stop(&self) {
        self.loops.stop();
    }

    /// Takes a pre-started process for `spec`, if one is ready: a pop, no
    /// Docker call. Records the demand either way, so a miss makes the
    /// key's pool start one for the next session. `None` for a spec no
    /// process can serve: see `berth_common::warm`, and a session with a
    /// model API key on a node without a gateway (the key would have to
    /// enter the process).
    pub fn claim(&self, spec: &SessionSpec) -> Option<WarmProcess> {
        let (key, template) = spec.warm.as_ref()?;
        if spec.secrets.anthropic_api_key.is_some() && self.starter.gateway_port.is_none() {
            return None;
        }
        if self.loops.stopped_now() {
            return None;
        }
        let claim = self
            .state()
            .claim(key, &spec.agent.image, || template.clone(), Instant::now());
        let result = match (&claim.item, claim.unpooled) {
            (Some(_), _) => "hit",
            (None, true) => "unpooled",
            (None, false) => "miss",
        };
        metrics::counter!(WARM_AGENT_CLAIMS, "result" => result).increment(1);
        self.wake.notify_one();
        self.publish();
        claim.item
    }

    /// Records that a claimed process turned out dead.
    pub fn claimed_dead(&self) {
        metrics::counter!(WARM_AGENT_EVICTIONS, "reason" => "dead").increment(1);
    }

    fn publish(&self) {
        let (ready, keys) = {
            let s = self.state();
            (s.ready_by_key(), s.keys())
        };
        let total: u32 = ready.iter().map(|(_, _, n)| n).sum();
        metrics::gauge!(WARM_AGENT_READY).set(f64::from(total));
        metrics::gauge!(WARM_AGENT_KEYS).set(keys as f64);
        self.load.send_if_modified(|l| {
            let changed = l.warm_agents != ready;
            l.warm_agents = ready;
            changed
        });
    }

    async fn run(self: Arc<Self>, stop: CancellationToken) {
        let interval = Duration::from_secs_f64(1.0 / self.cfg.refill_per_sec.max(0.01));
        let mut next_start = Instant::now();
        let mut backoff =
            berth_common::retry::Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
        let mut sweep = tokio::time::interval(self.cfg.check_interval);
        let mut starts: JoinSet<(String, Result<WarmProcess, String>)> = JoinSet::new();
        loop {
            // Start what the state asks for, within the rate and the
            // in-flight bound.
            let room = starts.len() < STARTS_IN_FLIGHT;
            if room && Instant::now() >= next_start {
                // A session's start goes first, hit or miss.
                if self.starts.busy() {
                    tokio::select! {
                        () = stop.cancelled() => break,
                        () = self.starts.yielded() => {}
                    }
                }
                let next = self.state().next_start();
                if let Some(s) = next {
                    next_start = Instant::now() + interval;
                    let starter = self.starter.clone();
                    starts.spawn(async move {
                        let started = std::time::Instant::now();
                        let r = starter.start(s.template).await;
                        if r.is_ok() {
                            metrics::histogram!(WARM_AGENT_START)
                                .record(started.elapsed().as_secs_f64());
                        }
                        (s.key, r)
                    });
                    continue;
                }
            }
            let wait_rate = room && Instant::now() < next_start;
            tokio::select! {
                () = stop.cancelled() => break,
                () = self.wake.notified() => {}
                () = tokio::time::sleep_until(next_start), if wait_rate => {}
                _ = sweep.tick() => self.sweep().await,
                Some(done) = starts.join_next() => {
                    let Ok((key, result)) = done else { continue };
                    match result {
                        Ok(w) => {
                            metrics::counter!(WARM_AGENT_REFILLS, "result" => "ok").increment(1);
                            backoff.reset();
                            let unwanted = self.state().started(&key, w, Instant::now());
                            if let Some(w) = unwanted {
                                self.starter.runtime.remove(&w.id).await;
                            }
                            self.publish();
                        }
                        Err(e) => {
                            metrics::counter!(WARM_AGENT_REFILLS, "result" => "error").increment(1);
                            let delay = backoff.next_delay();
                            tracing::warn!(agent_key = %key, error = %e, retry_in = ?delay, "pre-starting an agent process failed");
                            self.state().start_failed(&key);
                            next_start = Instant::now() + delay;
                        }
                    }
                }
            }
        }
        // Drain or shutdown: starts in flight finish, then every spare goes.
        while let Some(done) = starts.join_next().await {
            if let Ok((key, Ok(w))) = done {
                self.state().start_failed(&key);
                self.starter.runtime.remove(&w.id).await;
            }
        }
        let drained = self.state().drain();
        for w in drained {
            self.starter.runtime.remove(&w.id).await;
        }
        self.publish();
    }

    /// Evicts ready processes that died or aged past `max_idle`, and
    /// forgets keys no longer asked for.
    async fn sweep(&self) {
        let execs: Vec<(String, String)> = self
            .state()
            .ready_items()
            .into_iter()
            .map(|w| (w.id.clone(), w.process.exec_id.clone()))
            .collect();
        let mut alive = std::collections::HashSet::new();
        for (id, exec) in execs {
            if self.starter.runtime.exec_running(&exec).await {
                alive.insert(id);
            }
        }
        let swept = self
            .state()
            .sweep(Instant::now(), |w| alive.contains(&w.id));
        if !swept.dead.is_empty() || !swept.expired.is_empty() {
            tracing::info!(
                dead = swept.dead.len(),
                expired = swept.expired.len(),
                "evicting pre-started agent processes"
            );
            metrics::counter!(WARM_AGENT_EVICTIONS, "reason" => "dead")
                .increment(swept.dead.len() as u64);
            metrics::counter!(WARM_AGENT_EVICTIONS, "reason" => "expired")
                .increment(swept.expired.len() as u64);
            for w in swept.dead.into_iter().chain(swept.expired) {
                self.starter.runtime.remove(&w.id).await;
            }
        }
        self.publish();
    }
}

impl Starter {
    /// Starts a container for `template` and its agent process: the health
    /// check, the agent's limits and skills, then the process with the
    /// agent's env only. Any failure removes the container.
    async fn start(&self, template: pb::SessionSpec) -> Result<WarmProcess, String> {
        let spec = SessionSpec::try_from(template).map_err(|e| e.to_string())?;
        let id = self
            .runtime
            .start_container(&spec.agent.image, Purpose::Warm)
            .await
            .map_err(|e| e.to_string())?;
        match self.prepare_and_exec(&id, &spec).await {
            Ok(process) => Ok(WarmProcess { id, process }),
            Err(e) => {
                self.runtime.remove(&id).await;
                Err(e)
            }
        }
    }

    /// Readies a started process: its runtime's warm-up answered (then it
    /// waits on stdin, set up), or else its container gone quiet.
    async fn ready(
        &self,
        id: &str,
        spec: &SessionSpec,
        process: &mut AgentProcess,
    ) -> Result<(), String> {
        match crate::adapter::for_runtime(spec.agent.runtime).warm_up() {
            Some(w) => {
                let started = std::time::Instant::now();
                super::warm_up::warm_up(process, w, SETTLE_MAX).await?;
                tracing::debug!(container = %id, took = ?started.elapsed(), "pre-started agent warmed up");
                Ok(())
            }
            None => {
                self.settle(id).await;
                Ok(())
            }
        }
    }

    /// Waits until the container's CPU use goes quiet (see [`SETTLE_TICK`]).
    async fn settle(&self, id: &str) {
        let deadline = Instant::now() + SETTLE_MAX;
        let mut last = self.runtime.cpu_used_ns(id).await;
        let mut quiet = 0;
        while quiet < SETTLE_TICKS && Instant::now() < deadline {
            tokio::time::sleep(SETTLE_TICK).await;
            let now = self.runtime.cpu_used_ns(id).await;
            match (last, now) {
                (Some(a), Some(b)) if b.saturating_sub(a) < SETTLE_CPU.as_nanos() as u64 => {
                    quiet += 1;
                }
                (Some(_), Some(_)) => quiet = 0,
                // No stats (an old daemon, a cgroup it cannot read): offer it.
                _ => return,
            }
            last = now;
        }
    }

    async fn prepare_and_exec(&self, id: &str, spec: &SessionSpec) -> Result<AgentProcess, String> {
        if !self.health_cmd.is_empty() {
            self.runtime
                .check(id, &self.health_cmd)
                .await
                .map_err(|e| format!("health check: {e}"))?;
        }
        if !spec.agent.limits.is_default() {
            self.runtime
                .update_limits(id, &spec.agent.limits)
                .await
                .map_err(|e| e.to_string())?;
        }
        crate::workspace::prepare(&self.runtime, &self.objects, &self.workspace, id, spec).await?;
        let port = self
            .gateway_port
            .filter(|_| self.runtime.gateway_dir(id).is_some());
        let cmd = crate::adapter::for_runtime(spec.agent.runtime).command(spec, port);
        // A pre-started process never exports telemetry (not eligible).
        let env = crate::env::agent_env(spec, &self.home, port, false);
        let mut process = self
            .runtime
            .exec_agent(id, cmd, env)
            .await
            .map_err(|e| format!("agent did not start: {e}"))?;
        self.ready(id, spec, &mut process).await?;
        Ok(process)
    }
}
