//! The node's gRPC API: thin handlers over [`Node`] and [`session::run`].

use std::pin::Pin;
use std::sync::Arc;

use berth_proto::node::v1::{
    self as pb, agent_server_server::AgentServer, dispatcher_frame, node_frame,
};
use futures::Stream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::error::Error;
use crate::load::Load;
use crate::node::Node;
use crate::runs::{FrameTx, JournalConfig, Run, Runs};
use crate::session::{self, Command};
use crate::spec::SessionSpec;

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// Frames buffered toward the dispatcher before the agent is backpressured.
const OUT_BUFFER: usize = 256;

/// Serves `berth.node.v1.AgentServer`.
pub struct NodeApi {
    node: Arc<Node>,
    /// Runs, and the dispatcher streams attached to them.
    runs: Arc<Runs>,
}

impl NodeApi {
    /// Starts a new run of `start`'s session: its session task, and the
    /// run that relays its output on `frame_tx`.
    fn start_run(
        &self,
        start: pb::Start,
        spec: SessionSpec,
        frame_tx: FrameTx,
    ) -> Result<Arc<Run>, Status> {
        let runs = &self.runs;
        let epoch = start.epoch;
        spec.check_paths(&self.node.workspace.layout)?;
        check_limits(&spec, &self.node.watch_load().borrow())?;
        let (cmd_tx, cmd_rx) = mpsc::channel(64);
        let (out_tx, out_rx) = mpsc::channel(OUT_BUFFER);
        let evict_key = spec.evict_snapshot_key.clone();
        let credentials = spec.secrets.credentials.clone();
        self.node.tasks.spawn(session::run(
            self.node.clone(),
            session::RunOf {
                session_id: start.session_id.clone(),
                epoch,
                traceparent: start.traceparent.clone(),
            },
            spec,
            cmd_rx,
            out_tx,
        ));
        // The first message waits in the run's queue: the agent reads
        // it the moment it runs, while the dispatcher records the start.
        let first = start.first_message.filter(|m| !m.text.is_empty());
        if let Some(m) = &first {
            let _ = cmd_tx.try_send(Command::Message {
                text: m.text.clone(),
                traceparent: m.traceparent.clone(),
            });
        }
        let run = runs.start(
            &start.session_id,
            epoch,
            frame_tx.clone(),
            (cmd_tx, out_rx),
            crate::runs::Kept {
                evict_snapshot_key: evict_key,
                credentials,
            },
        );
        if let Some(m) = first {
            run.deliver(m.seq);
        }
        Ok(run)
    }

    pub fn new(node: Arc<Node>) -> Self {
        let runs = Arc::new(Runs::new(
            JournalConfig {
                max_bytes: node.cfg.journal_bytes,
                grace: node.cfg.reattach_grace,
            },
            node.tasks.clone(),
            node.shutdown.clone(),
        ));
        Self { node, runs }
    }
}

fn report(node: &Node, load: &Load) -> pb::LoadReport {
    pb::LoadReport {
        node_id: node.cfg.node_id.clone(),
        capacity: i32::try_from(load.capacity).unwrap_or(i32::MAX),
        running: i32::try_from(load.running).unwrap_or(i32::MAX),
        warm: load
            .warm
            .iter()
            .map(|(image, ready)| pb::WarmPool {
                image: image.clone(),
                ready: i32::try_from(*ready).unwrap_or(i32::MAX),
                agent_key: String::new(),
            })
            .chain(
                load.warm_agents
                    .iter()
                    .map(|(key, image, ready)| pb::WarmPool {
                        image: image.clone(),
                        ready: i32::try_from(*ready).unwrap_or(i32::MAX),
                        agent_key: key.clone(),
                    }),
            )
            .collect(),
        cpu_utilization: load.cpu_utilization,
        memory_used_bytes: load.memory_used_bytes,
        memory_total_bytes: load.memory_total_bytes,
        draining: load.draining,
        generation: node.next_generation(),
        cpus: u32::try_from(machine_cpus()).unwrap_or(u32::MAX),
        volumes: node
            .workspace
            .layout
            .volumes()
            .iter()
            .map(|v| (*v).to_string())
            .collect(),
    }
}

/// CPUs of this machine (what load reports say and starts are held to).
fn machine_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, std::num::NonZero::get)
}

/// A session's limits must fit this machine: a limit above it would give a
/// container no effective limit at all.
fn check_limits(spec: &SessionSpec, load: &Load) -> Result<(), Status> {
    let l = &spec.agent.limits;
    let memory = u64::try_from(l.memory_bytes).unwrap_or(0);
    if load.memory_total_bytes > 0 && memory > load.memory_total_bytes {
        return Err(Error::invalid(
            "spec.limits.memory_bytes",
            format!(
                "{memory} bytes is more than this node has ({} bytes)",
                load.memory_total_bytes
            ),
        )
        .into());
    }
    let cpus = machine_cpus();
    if l.cpus > cpus as f64 {
        return Err(Error::invalid(
            "spec.limits.cpus",
            format!("{} is more than this node has ({cpus})", l.cpus),
        )
        .into());
    }
    Ok(())
}

#[tonic::async_trait]
impl AgentServer for NodeApi {
    type WatchLoadStream = BoxStream<pb::LoadReport>;

    async fn watch_load(
        &self,
        _: Request<pb::WatchLoadRequest>,
    ) -> Result<Response<Self::WatchLoadStream>, Status> {
        let node = self.node.clone();
        let mut rx = node.watch_load();
        let (tx, out) = mpsc::channel(4);
        self.node.tasks.spawn(async move {
            let mut heartbeat = tokio::time::interval(node.cfg.load_heartbeat);
            loop {
                let load = rx.borrow_and_update().clone();
                if tx.send(Ok(report(&node, &load))).await.is_err() {
                    return;
                }
                tokio::select! {
                    _ = tx.closed() => return,
                    _ = node.shutdown.cancelled() => return,
                    changed = rx.changed() => if changed.is_err() { return },
                    _ = heartbeat.tick() => {}
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(out))))
    }

    type RunSessionStream = BoxStream<pb::NodeFrame>;

    async fn run_session(
        &self,
        request: Request<Streaming<pb::DispatcherFrame>>,
    ) -> Result<Response<Self::RunSessionStream>, Status> {
        let mut inbound = request.into_inner();
        let first = inbound.message().await?.ok_or_else(|| {
            Status::invalid_argument("RunSession: the stream ended before its `start` frame")
        })?;
        let Some(dispatcher_frame::Kind::Start(start)) = first.kind else {
            return Err(Status::invalid_argument(
                "RunSession: the first frame must be `start`",
            ));
        };
        let start = *start;
        if start.session_id.is_empty() {
            return Err(Error::invalid("start.session_id", "must not be empty").into());
        }
        let spec = SessionSpec::try_from(start.spec.clone().unwrap_or_default())?;
        let epoch = start.epoch;
        let (frame_tx, frames) = mpsc::channel(OUT_BUFFER);
        let runs = self.runs.clone();
        let (run, generation) = if start.attach {
            // The session's new owner takes over the run its lost owner left.
            match runs
                .attach(
                    &start.session_id,
                    epoch,
                    start.after_node_seq,
                    frame_tx.clone(),
                )
                .await
            {
                Ok(attached) => {
                    self.node.reattached(&start.session_id, epoch);
                    attached
                }
                Err(reason) => {
                    let refused = pb::NodeFrame {
                        node_seq: 0,
                        kind: Some(node_frame::Kind::Refused(pb::Refused { reason })),
                    };
                    let _ = frame_tx.send(Ok(refused)).await;
                    return Ok(Response::new(Box::pin(ReceiverStream::new(frames))));
                }
            }
        } else {
            (self.start_run(start, spec, frame_tx.clone())?, 0)
        };
        // Inbound frames become commands (see `commands_from`); the stream
        // ends when the run stops sending, not when this does.
        self.node.tasks.spawn(commands_from(
            inbound,
            run,
            runs,
            generation,
            frame_tx.downgrade(),
        ));
        Ok(Response::new(Box::pin(ReceiverStream::new(frames))))
    }

    type AttachSessionStream = BoxStream<pb::NodeFrame>;

    async fn attach_session(
        &self,
        _: Request<pb::AttachSessionRequest>,
    ) -> Result<Response<Self::AttachSessionStream>, Status> {
        Err(Status::unimplemented(
            "AttachSession is not implemented: a run outlives its dispatcher's stream for --reattach-grace; re-attach with RunSession and a `start` frame with `attach` and `after_node_seq`",
        ))
    }

    async fn drain(
        &self,
        _: Request<pb::DrainRequest>,
    ) -> Result<Response<pb::DrainResponse>, Status> {
        let running = self.node.drain();
        Ok(Response::new(pb::DrainResponse {
            running: i32::try_from(running).unwrap_or(i32::MAX),
        }))
    }

    async fn undrain(
        &self,
        _: Request<pb::UndrainRequest>,
    ) -> Result<Response<pb::UndrainResponse>, Status> {
        self.node.undrain().map_err(Status::failed_precondition)?;
        Ok(Response::new(pb::UndrainResponse {}))
    }

    async fn list_sessions(
        &self,
        _: Request<pb::ListNodeSessionsRequest>,
    ) -> Result<Response<pb::ListNodeSessionsResponse>, Status> {
        let sessions = self
            .node
            .running()
            .into_iter()
            .map(|s| pb::NodeSession {
                session_id: s.session_id,
                epoch: s.epoch,
                container_id: s.container_id,
            })
            .collect();
        let listed_at_ms = self.node.clock_ms();
        Ok(Response::new(pb::ListNodeSessionsResponse {
            sessions,
            listed_at_ms,
        }))
    }

    async fn reconcile_sessions(
        &self,
        request: Request<pb::ReconcileSessionsRequest>,
    ) -> Result<Response<pb::ReconcileSessionsResponse>, Status> {
        let r = request.into_inner();
        if r.listed_at_ms > self.node.clock_ms() {
            return Err(Error::invalid(
                "listed_at_ms",
                "is later than this node's clock: it names no list this node made",
            )
            .into());
        }
        if r.valid_for_ms == 0 {
            return Err(Error::invalid("valid_for_ms", "must be positive").into());
        }
        let refs = |v: Vec<pb::RunRef>| -> Vec<(String, i64)> {
            v.into_iter().map(|r| (r.session_id, r.epoch)).collect()
        };
        let fenced = self.node.reconcile(
            r.listed_at_ms,
            std::time::Duration::from_millis(u64::from(r.valid_for_ms)),
            &refs(r.confirm),
            &refs(r.fence),
        );
        Ok(Response::new(pb::ReconcileSessionsResponse { fenced }))
    }
}

/// Turns a dispatcher's inbound frames into the run's commands until the
/// stream ends (the run then waits for a re-attach). Epoch fencing: a frame
/// from an older epoch is a dispatcher that lost the session to another;
/// its stream ends with FAILED_PRECONDITION, and the run goes on for the
/// new owner.
async fn commands_from(
    mut inbound: Streaming<pb::DispatcherFrame>,
    run: Arc<Run>,
    runs: Arc<Runs>,
    generation: u64,
    frame_tx: mpsc::WeakSender<Result<pb::NodeFrame, Status>>,
) {
    loop {
        let cmd = match inbound.message().await {
            Ok(Some(f)) if f.epoch != run.epoch() => {
                let msg = format!(
                    "frame carries epoch {}, this run is at epoch {}",
                    f.epoch,
                    run.epoch()
                );
                if let Some(tx) = frame_tx.upgrade() {
                    let _ = tx.send(Err(Status::failed_precondition(msg))).await;
                }
                return;
            }
            Ok(Some(pb::DispatcherFrame {
                kind: Some(kind), ..
            })) => match kind {
                dispatcher_frame::Kind::Message(m) if run.deliver(m.seq) => Command::Message {
                    text: m.text,
                    traceparent: m.traceparent,
                },
                // Delivered before, by the owner this one replaced.
                dispatcher_frame::Kind::Message(_) => continue,
                dispatcher_frame::Kind::Interrupt(_) => Command::Interrupt,
                dispatcher_frame::Kind::ToolDecision(d) => Command::ToolDecision(d),
                dispatcher_frame::Kind::Stop(s) => Command::Stop {
                    reason: s.reason,
                    snapshot_key: s.snapshot_key,
                    abandoned: false,
                },
                dispatcher_frame::Kind::Ack(a) => {
                    run.ack(&runs, a.node_seq);
                    continue;
                }
                dispatcher_frame::Kind::Start(_) => continue,
                dispatcher_frame::Kind::Credential(u) => {
                    if !run.credentials.update(&u.id, u.value, u.error) {
                        tracing::warn!(credential_id = %u.id, "a dispatcher updated a credential this run does not refresh; ignored");
                    }
                    continue;
                }
            },
            Ok(Some(_)) => continue,
            // The dispatcher is gone: the run waits for a re-attach.
            Ok(None) | Err(_) => {
                run.detach(&runs, generation);
                return;
            }
        };
        if run.commands.send(cmd).await.is_err() {
            return;
        }
    }
}
