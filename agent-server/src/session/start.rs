//! A run's start: a pre-started agent process, else a warm container, else
//! a cold one, prepared (limits, resources) and with the agent launched.
//! Whatever is claimed and fails falls through to the next way, and a
//! container that cannot be used is removed, never left half-prepared.

use std::sync::Arc;

use futures::StreamExt;

use crate::container::{AgentProcess, ContainerRuntime, Purpose};
use crate::node::{Node, Slot};
use crate::spec::SessionSpec;

use super::{Exit, StartPath};

/// Removes the container when dropped, even if the run is aborted.
pub(super) struct ContainerGuard {
    runtime: ContainerRuntime,
    id: Option<String>,
}

impl ContainerGuard {
    pub(super) async fn remove(mut self) {
        if let Some(id) = self.id.take() {
            self.runtime.remove(&id).await;
        }
    }
}

impl Drop for ContainerGuard {
    fn drop(&mut self) {
        if let Some(id) = self.id.take() {
            let runtime = self.runtime.clone();
            if let Ok(handle) = tokio::runtime::Handle::try_current() {
                handle.spawn(async move { runtime.remove(&id).await });
            }
        }
    }
}

/// An agent started for a session.
pub(super) struct Started {
    pub container_id: String,
    pub guard: ContainerGuard,
    pub process: AgentProcess,
    pub path: StartPath,
    /// The gateway serves the session while this lives.
    pub _gate: Option<crate::gateway::GateGuard>,
    /// This start, in flight until the agent's first output line: the
    /// pool's refills wait for it.
    pub in_flight: Option<crate::pool::StartInFlight>,
}

/// Starts the session's agent the fastest way there is: `Err` is the
/// session's end when none worked.
pub(super) async fn acquire(
    node: &Arc<Node>,
    slot: &Slot,
    session_id: &str,
    spec: &SessionSpec,
    cmd: &[String],
    out: &tokio::sync::mpsc::Sender<super::Output>,
) -> Result<Started, Exit> {
    let runtime = node.runtime.clone();
    // Counted before the claim, whose refill would otherwise start beside
    // this agent's first turn.
    let in_flight = node.processes.start_in_flight();
    // Fastest first: a pre-started agent process (a pop and one liveness
    // check); then a warm container (a pop, then the launch); then cold. A
    // claimed process or container that died falls through to the next.
    let pre_started = match node.processes.claim(spec).map(still_running) {
        Some(Ok(w)) => Some(w),
        Some(Err(w)) => {
            tracing::warn!(container_id = %w.id, "pre-started agent process is gone; starting another way");
            node.processes.claimed_dead();
            runtime.remove(&w.id).await;
            None
        }
        None => None,
    };
    if let Some(w) = pre_started {
        node.set_container(slot, &w.id);
        let guard = ContainerGuard {
            runtime: runtime.clone(),
            id: Some(w.id.clone()),
        };
        // Its limits and skills went in before it started (they are the
        // agent's); the session's gate opens now.
        return match serve_gate(node, slot, session_id, spec, &w.id, out) {
            Ok(gate) => Ok(Started {
                container_id: w.id,
                guard,
                process: w.process,
                path: StartPath::WarmProcess,
                _gate: gate,
                in_flight: Some(in_flight),
            }),
            Err(e) => {
                guard.remove().await;
                Err(Exit::failed(e))
            }
        };
    }
    // A miss: the pool's refills wait until this agent is up.
    if let Some(warm) = node.pools.claim(&spec.agent.image) {
        match in_container(node, slot, session_id, spec, cmd, Some(warm), out).await {
            Ok(started) => {
                return Ok(Started {
                    in_flight: Some(in_flight),
                    ..started
                });
            }
            Err(Some(exit)) => return Err(exit),
            // It failed at the agent's start: cold, then.
            Err(None) => {}
        }
    }
    in_container(node, slot, session_id, spec, cmd, None, out)
        .await
        .map(|started| Started {
            in_flight: Some(in_flight),
            ..started
        })
        .map_err(|e| e.unwrap_or_else(|| Exit::failed("agent did not start")))
}

/// Starts the agent in `warm` (a claimed warm container), else in a new
/// container. `Err(None)`: the warm container failed at the agent's start,
/// and is removed (start cold instead).
async fn in_container(
    node: &Arc<Node>,
    slot: &Slot,
    session_id: &str,
    spec: &SessionSpec,
    cmd: &[String],
    warm_container: Option<crate::pool::Claimed>,
    out: &tokio::sync::mpsc::Sender<super::Output>,
) -> Result<Started, Option<Exit>> {
    let runtime = node.runtime.clone();
    let warm = warm_container.is_some();
    let mut launcher = None;
    let id = match warm_container {
        Some(c) => {
            launcher = c.launcher;
            c.id
        }
        None => match runtime
            .start_container(&spec.agent.image, Purpose::Session(session_id))
            .await
        {
            Ok(id) => id,
            Err(e) => return Err(Some(Exit::failed(format!("container did not start: {e}")))),
        },
    };
    node.set_container(slot, &id);
    let guard = ContainerGuard {
        runtime: runtime.clone(),
        id: Some(id.clone()),
    };
    // The session's own limits, then its resources: all before the agent
    // runs, and a failure removes the container (never half-prepared).
    let prepared = async {
        if !spec.agent.limits.is_default() {
            runtime
                .update_limits(&id, &spec.agent.limits)
                .await
                .map_err(|e| e.to_string())?;
        }
        crate::workspace::prepare(&runtime, &node.objects, &node.workspace, &id, spec).await
    };
    let prepared =
        crate::metrics::timed(metrics::histogram!(crate::metrics::PREPARE), prepared).await;
    if let Err(reason) = prepared {
        guard.remove().await;
        tracing::info!(%reason, "session preparation failed");
        return Err(Some(Exit::failed(format!(
            "preparing the session failed: {reason}"
        ))));
    }
    let gate = match serve_gate(node, slot, session_id, spec, &id, out) {
        Ok(g) => g,
        Err(e) => {
            guard.remove().await;
            return Err(Some(Exit::failed(e)));
        }
    };
    let mut env = crate::env::agent_env(
        spec,
        &node.cfg.home,
        gate.is_some().then_some(node.cfg.gateway_port),
        node.gateway
            .as_ref()
            .is_some_and(|g| g.forwards_telemetry()),
    );
    // The CLI's own telemetry joins the session's trace, where it can.
    if let Some(tp) = berth_common::traces::current()
        && !spec.agent.env.contains_key("TRACEPARENT")
    {
        env.push(format!("TRACEPARENT={tp}"));
    }
    // A warm container's launcher starts the agent with one write; else
    // (none, gone, or a command it cannot carry) a Docker exec.
    let launched = match launcher {
        Some(l) => runtime
            .launch(l, cmd, &env)
            .await
            .inspect_err(|e| tracing::debug!(error = %e, "launcher unusable; exec instead"))
            .ok(),
        None => None,
    };
    let started = match launched {
        Some(p) => Ok(p),
        None => runtime.exec_agent(&id, cmd.to_vec(), env).await,
    };
    match started {
        Ok(p) => {
            let path = if warm {
                StartPath::WarmContainer
            } else {
                StartPath::Cold
            };
            Ok(Started {
                container_id: id,
                guard,
                process: p,
                path,
                _gate: gate,
                in_flight: None,
            })
        }
        Err(e) if warm => {
            tracing::warn!(container_id = %id, error = %e, "warm container failed at exec; starting cold");
            node.pools.claimed_dead(&spec.agent.image);
            guard.remove().await;
            Err(None)
        }
        Err(e) => {
            guard.remove().await;
            Err(Some(Exit::failed(format!("agent did not start: {e}"))))
        }
    }
}

/// Whether a pre-started process still runs, without a Docker call: its
/// output stream has ended when it exited (the sweep finds the rest). Output
/// it wrote while waiting stays first in the stream.
fn still_running(
    mut w: crate::pool::WarmProcess,
) -> Result<crate::pool::WarmProcess, crate::pool::WarmProcess> {
    use futures::FutureExt;
    match w.process.output.next().now_or_never() {
        None => Ok(w),
        Some(None | Some(Err(_))) => Err(w),
        Some(Some(Ok(chunk))) => {
            let rest = std::mem::replace(&mut w.process.output, Box::pin(futures::stream::empty()));
            w.process.output =
                Box::pin(futures::stream::once(async move { Ok(chunk) }).chain(rest));
            Ok(w)
        }
    }
}

/// The `start` label of `path`.
pub(super) fn start_label(path: StartPath) -> &'static str {
    match path {
        StartPath::WarmProcess => "warm_process",
        StartPath::WarmContainer => "warm_container",
        StartPath::Cold | StartPath::Unspecified => "cold",
    }
}

/// The gateway serves this session on the container's socket for as long
/// as the run lasts (the guard), with its policy and its key.
fn serve_gate(
    node: &Node,
    slot: &Slot,
    session_id: &str,
    spec: &SessionSpec,
    container_id: &str,
    out: &tokio::sync::mpsc::Sender<super::Output>,
) -> Result<Option<crate::gateway::GateGuard>, String> {
    let (Some(gw), Some(dir)) = (&node.gateway, node.runtime.gateway_dir(container_id)) else {
        return Ok(None);
    };
    let gate = crate::gateway::SessionGate {
        session_id: session_id.to_string(),
        trace: slot.trace.clone(),
        telemetry: spec.telemetry.clone(),
        egress: spec.agent.egress.clone(),
        api_key: spec.secrets.anthropic_api_key.clone(),
        lease: Some(slot.lease.clone()),
        routes: crate::gateway::routes_of(spec),
        credentials: spec.secrets.credentials.clone(),
        uses: Some({
            let out = out.clone();
            crate::gateway::UseLog::new(std::sync::Arc::new(move |u| {
                // A full channel drops a report: the next one counts it.
                let _ = out.try_send(super::Output::CredentialUse(u));
            }))
        }),
    };
    gw.serve(&dir, gate)
        .map(Some)
        .map_err(|e| format!("the egress gateway could not serve the session: {e}"))
}
