//! A simulated agent-server: it speaks berth's node protocol (load reports,
//! `RunSession`) over mTLS exactly as a node does, but runs no container. Its
//! "agent" answers each user message from memory, so thousands of sessions
//! fit on one machine. Used where the issue allows it (fan-in, balance,
//! dispatch) and as the "direct echo" baseline: a client can call
//! `RunSession` on it with no dispatcher in between.
//!
//! The agent, scripted by the message text:
//! - `hold MS`: the run ends by itself (exit 0) after MS milliseconds;
//! - `events N BYTES`: N `agent.message` events of BYTES bytes, as fast as the
//!   stream takes them, then an `agent.result` that ends the turn;
//! - `paced N RATE BYTES`: N such events at RATE per second, each stamped
//!   with [`clock_us`] when its line leaves the node (`sent_us`);
//! - anything else: one `agent.message` echoing the text, then `agent.result`.
//!
//! As a node does, a run outlives its dispatcher's stream for a grace
//! period, and a newer epoch re-attaches to it (see [`run`]).

mod run;

pub use run::clock_us;
use run::{Attach, Link, Started};

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use berth_common::tls::{CertKind, DevCa};
use berth_proto::node::v1::{
    self as pb, agent_server_client::AgentServerClient, agent_server_server::AgentServer,
    agent_server_server::AgentServerServer, dispatcher_frame, node_frame,
};
use futures::Stream;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status, Streaming};

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// One simulated node, serving until the token it was started with is cancelled.
pub struct SimNode {
    /// Its TLS name, as the dispatcher dials it.
    pub name: String,
    /// `https://{name}:{port}`.
    pub url: String,
    pub addr: SocketAddr,
    state: Arc<State>,
}

struct State {
    id: String,
    capacity: u32,
    heartbeat: Duration,
    /// Sessions running, by id.
    sessions: Mutex<HashMap<String, Held>>,
    /// Bumped on every change of `sessions`, waking load streams.
    changed: watch::Sender<u64>,
    generation: AtomicU64,
    /// Sessions ever accepted.
    accepted: AtomicU64,
    /// The server, its load streams and its runs: all end at `stop`.
    tasks: TaskTracker,
    stop: CancellationToken,
}

/// A run held here.
struct Held {
    epoch: i64,
    /// Ends the run when a dispatcher fences it.
    fenced: CancellationToken,
    /// Hands the run a re-attaching dispatcher's stream.
    attach: mpsc::Sender<Attach>,
}

impl State {
    fn running(&self) -> u32 {
        u32::try_from(self.sessions.lock().map(|s| s.len()).unwrap_or(0)).unwrap_or(u32::MAX)
    }

    /// Holds the run of `id` at `epoch`.
    fn set(&self, id: &str, epoch: i64, fenced: CancellationToken, attach: mpsc::Sender<Attach>) {
        if let Ok(mut s) = self.sessions.lock() {
            s.insert(
                id.to_string(),
                Held {
                    epoch,
                    fenced,
                    attach,
                },
            );
        }
        self.changed.send_modify(|v| *v += 1);
    }

    /// The run of `id` was re-attached at `epoch`.
    fn reattached(&self, id: &str, epoch: i64) {
        if let Ok(mut s) = self.sessions.lock()
            && let Some(h) = s.get_mut(id)
        {
            h.epoch = epoch;
        }
    }

    /// The run of `id` at `epoch` ended (a newer run of it may be here).
    fn unset(&self, id: &str, epoch: i64) {
        if let Ok(mut s) = self.sessions.lock()
            && s.get(id).is_some_and(|h| h.epoch == epoch)
        {
            s.remove(id);
        }
        self.changed.send_modify(|v| *v += 1);
    }

    /// Ends the run of `id` if it is at `epoch` (its session moved on, as
    /// a dispatcher's reconcile says); whether there was one.
    fn fence(&self, id: &str, epoch: i64) -> bool {
        let run = self.sessions.lock().ok().and_then(|s| {
            s.get(id)
                .filter(|h| h.epoch == epoch)
                .map(|h| h.fenced.clone())
        });
        run.inspect(|t| t.cancel()).is_some()
    }
}

impl SimNode {
    /// Starts node `index` on loopback with a certificate from `ca`. It reports
    /// its load at once, on every change and every `heartbeat`.
    pub async fn start(
        index: usize,
        capacity: u32,
        heartbeat: Duration,
        ca: &DevCa,
        stop: CancellationToken,
    ) -> anyhow::Result<Self> {
        let name = format!("sim-{index}");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(State {
            id: name.clone(),
            capacity,
            heartbeat,
            sessions: Mutex::new(HashMap::new()),
            changed: watch::channel(0).0,
            generation: AtomicU64::new(0),
            accepted: AtomicU64::new(0),
            tasks: TaskTracker::new(),
            stop: stop.clone(),
        });
        let tls = ca.material(&ca.issue(CertKind::Node, std::slice::from_ref(&name))?);
        let svc = AgentServerServer::new(Api(state.clone()))
            .max_decoding_message_size(berth_common::grpc::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(berth_common::grpc::MAX_MESSAGE_BYTES);
        let server = tonic::transport::Server::builder()
            .tls_config(tls.server())?
            .max_concurrent_streams(Some(1_000_000))
            .tcp_nodelay(true)
            .add_service(svc);
        state.tasks.spawn(async move {
            // No Nagle, as on a real node.
            let incoming =
                tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
            if let Err(e) = server
                .serve_with_incoming_shutdown(incoming, stop.cancelled_owned())
                .await
            {
                tracing::warn!(error = %e, "simulated node stopped");
            }
        });
        Ok(Self {
            url: format!("https://{name}:{}", addr.port()),
            name,
            addr,
            state,
        })
    }

    /// Waits until the server, its load streams and its runs have ended,
    /// once the token it was started with is cancelled.
    pub async fn stopped(&self) {
        self.state.tasks.close();
        self.state.tasks.wait().await;
    }

    /// Sessions running here now.
    pub fn running(&self) -> u32 {
        self.state.running()
    }

    /// A reader of [`SimNode::running`] to move into a task.
    pub fn counter(&self) -> impl Fn() -> u32 + Send + Sync + 'static {
        let state = self.state.clone();
        move || state.running()
    }

    /// The ids of the sessions running here now.
    pub fn session_ids(&self) -> Vec<String> {
        self.state
            .sessions
            .lock()
            .map(|s| s.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// Sessions ever accepted here.
    pub fn accepted(&self) -> u64 {
        self.state.accepted.load(Ordering::Relaxed)
    }

    /// A direct client (no dispatcher), presenting a dispatcher certificate from `ca`.
    pub async fn client(&self, ca: &DevCa) -> anyhow::Result<AgentServerClient<Channel>> {
        let tls = ca.material(&ca.issue(
            CertKind::Dispatcher,
            &[berth_common::tls::DISPATCHER_NAME.to_string()],
        )?);
        let channel = Endpoint::from_shared(format!("https://{}", self.addr))?
            .tls_config(tls.client(&self.name))?
            .tcp_nodelay(true)
            .connect()
            .await?;
        Ok(AgentServerClient::new(channel)
            .max_decoding_message_size(berth_common::grpc::MAX_MESSAGE_BYTES))
    }
}

/// The image a direct session names: its run keeps no journal for a
/// re-attach, and ends with its stream.
const DIRECT_IMAGE: &str = "sim:direct";

/// Opens a session directly on a simulated node (no dispatcher in between):
/// where to send its frames, and its frames back. Epoch 1; the `accepted`
/// frame comes first.
pub async fn open_direct(
    client: &mut AgentServerClient<Channel>,
) -> anyhow::Result<(mpsc::Sender<pb::DispatcherFrame>, Streaming<pb::NodeFrame>)> {
    let (tx, rx) = mpsc::channel(8);
    tx.send(pb::DispatcherFrame {
        epoch: 1,
        kind: Some(dispatcher_frame::Kind::Start(Box::new(pb::Start {
            session_id: uuid::Uuid::new_v4().to_string(),
            epoch: 1,
            spec: Some(pb::SessionSpec {
                image: DIRECT_IMAGE.into(),
                ..Default::default()
            }),
            ..Default::default()
        }))),
    })
    .await?;
    let frames = client
        .run_session(ReceiverStream::new(rx))
        .await?
        .into_inner();
    Ok((tx, frames))
}

/// The stop of a session opened with [`open_direct`].
pub fn direct_stop() -> pb::DispatcherFrame {
    pb::DispatcherFrame {
        epoch: 1,
        kind: Some(dispatcher_frame::Kind::Stop(pb::Stop::default())),
    }
}

/// A user message for a session opened with [`open_direct`].
pub fn direct_message(text: String) -> pb::DispatcherFrame {
    pb::DispatcherFrame {
        epoch: 1,
        kind: Some(dispatcher_frame::Kind::Message(pb::UserMessage {
            text,
            seq: 0,
            traceparent: String::new(),
        })),
    }
}

struct Api(Arc<State>);

impl Api {
    /// Hands a re-attaching dispatcher's stream to the session's run, or
    /// refuses when there is none (it ended, or it was never here).
    async fn attach(
        &self,
        start: pb::Start,
        inbound: Streaming<pb::DispatcherFrame>,
        tx: run::Frames,
    ) {
        let held = self
            .0
            .sessions
            .lock()
            .ok()
            .and_then(|s| s.get(&start.session_id).map(|h| h.attach.clone()));
        let a = Attach {
            link: Link { inbound, tx },
            epoch: start.epoch,
            after_node_seq: start.after_node_seq,
        };
        let refused = match held {
            Some(run) => match run.send(a).await {
                Ok(()) => return,
                Err(e) => e.0.link.tx,
            },
            None => a.link.tx,
        };
        let _ = refused
            .send(Ok(pb::NodeFrame {
                node_seq: 0,
                kind: Some(node_frame::Kind::Refused(pb::Refused {
                    reason: "no run of this session to re-attach to".into(),
                })),
            }))
            .await;
    }
}

#[tonic::async_trait]
impl AgentServer for Api {
    type WatchLoadStream = BoxStream<pb::LoadReport>;

    async fn watch_load(
        &self,
        _: Request<pb::WatchLoadRequest>,
    ) -> Result<Response<Self::WatchLoadStream>, Status> {
        let state = self.0.clone();
        let mut changed = state.changed.subscribe();
        let (tx, rx) = mpsc::channel(4);
        self.0.tasks.spawn(async move {
            let mut heartbeat = tokio::time::interval(state.heartbeat);
            loop {
                changed.borrow_and_update();
                let report = pb::LoadReport {
                    node_id: state.id.clone(),
                    capacity: i32::try_from(state.capacity).unwrap_or(i32::MAX),
                    running: i32::try_from(state.running()).unwrap_or(i32::MAX),
                    generation: state.generation.fetch_add(1, Ordering::Relaxed) + 1,
                    ..Default::default()
                };
                if tx.send(Ok(report)).await.is_err() {
                    return;
                }
                tokio::select! {
                    () = state.stop.cancelled() => return,
                    () = tx.closed() => return,
                    c = changed.changed() => if c.is_err() { return },
                    _ = heartbeat.tick() => {}
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    type RunSessionStream = BoxStream<pb::NodeFrame>;

    async fn run_session(
        &self,
        request: Request<Streaming<pb::DispatcherFrame>>,
    ) -> Result<Response<Self::RunSessionStream>, Status> {
        let mut inbound = request.into_inner();
        let first = inbound
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("RunSession: no `start` frame"))?;
        let Some(dispatcher_frame::Kind::Start(start)) = first.kind else {
            return Err(Status::invalid_argument(
                "RunSession: the first frame must be `start`",
            ));
        };
        let (tx, rx) = mpsc::channel(256);
        if start.attach {
            self.attach(*start, inbound, tx).await;
            return Ok(Response::new(Box::pin(ReceiverStream::new(rx))));
        }
        let accepted = pb::NodeFrame {
            node_seq: 1,
            kind: Some(node_frame::Kind::Accepted(pb::Accepted {
                container_id: format!("sim-{}", start.session_id),
                warm: true,
                attached: false,
                start: pb::StartPath::WarmProcess as i32,
            })),
        };
        let _ = tx.send(Ok(accepted)).await;
        self.0.accepted.fetch_add(1, Ordering::Relaxed);
        let fenced = CancellationToken::new();
        let (attach_tx, attach) = mpsc::channel(1);
        self.0
            .set(&start.session_id, start.epoch, fenced.clone(), attach_tx);
        let direct = start.spec.as_ref().is_some_and(|s| s.image == DIRECT_IMAGE);
        self.0.tasks.spawn(run::run(
            self.0.clone(),
            Link { inbound, tx },
            Started {
                id: start.session_id,
                epoch: start.epoch,
                fenced,
                first_message: start.first_message,
                attach,
                direct,
            },
        ));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    type AttachSessionStream = BoxStream<pb::NodeFrame>;

    async fn attach_session(
        &self,
        _: Request<pb::AttachSessionRequest>,
    ) -> Result<Response<Self::AttachSessionStream>, Status> {
        Err(Status::unimplemented(
            "simulated nodes re-attach through RunSession (`start.attach`), as the dispatcher does",
        ))
    }

    async fn drain(
        &self,
        _: Request<pb::DrainRequest>,
    ) -> Result<Response<pb::DrainResponse>, Status> {
        Ok(Response::new(pb::DrainResponse {
            running: i32::try_from(self.0.running()).unwrap_or(i32::MAX),
        }))
    }

    async fn undrain(
        &self,
        _: Request<pb::UndrainRequest>,
    ) -> Result<Response<pb::UndrainResponse>, Status> {
        Ok(Response::new(pb::UndrainResponse {}))
    }

    async fn list_sessions(
        &self,
        _: Request<pb::ListNodeSessionsRequest>,
    ) -> Result<Response<pb::ListNodeSessionsResponse>, Status> {
        let sessions = self
            .0
            .sessions
            .lock()
            .map(|s| {
                s.iter()
                    .map(|(id, h)| pb::NodeSession {
                        session_id: id.clone(),
                        epoch: h.epoch,
                        container_id: format!("sim-{id}"),
                    })
                    .collect()
            })
            .unwrap_or_default();
        Ok(Response::new(pb::ListNodeSessionsResponse {
            sessions,
            listed_at_ms: 0,
        }))
    }

    /// Ends the runs the verdict fences, as a node does (the simulated runs
    /// reach nothing outside, so a confirmation changes nothing).
    async fn reconcile_sessions(
        &self,
        request: Request<pb::ReconcileSessionsRequest>,
    ) -> Result<Response<pb::ReconcileSessionsResponse>, Status> {
        let fenced = request
            .into_inner()
            .fence
            .iter()
            .filter(|r| self.0.fence(&r.session_id, r.epoch))
            .count();
        Ok(Response::new(pb::ReconcileSessionsResponse {
            fenced: u32::try_from(fenced).unwrap_or(u32::MAX),
        }))
    }
}
