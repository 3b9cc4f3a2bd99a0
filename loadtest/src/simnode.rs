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
    /// Sessions running, by id: their epoch, and what ends the run when a
    /// dispatcher fences it.
    sessions: Mutex<HashMap<String, (i64, CancellationToken)>>,
    /// Bumped on every change of `sessions`, waking load streams.
    changed: watch::Sender<u64>,
    generation: AtomicU64,
    /// Sessions ever accepted.
    accepted: AtomicU64,
}

impl State {
    fn running(&self) -> u32 {
        u32::try_from(self.sessions.lock().map(|s| s.len()).unwrap_or(0)).unwrap_or(u32::MAX)
    }

    fn set(&self, id: &str, epoch: i64, fenced: CancellationToken) {
        if let Ok(mut s) = self.sessions.lock() {
            s.insert(id.to_string(), (epoch, fenced));
        }
        self.changed.send_modify(|v| *v += 1);
    }

    /// The run of `id` at `epoch` ended (a newer run of it may be here).
    fn unset(&self, id: &str, epoch: i64) {
        if let Ok(mut s) = self.sessions.lock()
            && s.get(id).is_some_and(|(e, _)| *e == epoch)
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
                .filter(|(e, _)| *e == epoch)
                .map(|(_, t)| t.clone())
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
        tokio::spawn(async move {
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
                image: "sim:latest".into(),
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

/// One agent line as a real node sends it: the line itself, and the event
/// made from it.
fn event(seq: &mut u64, kind: &str, payload: serde_json::Value, end: bool) -> pb::NodeFrame {
    *seq += 1;
    let raw = serde_json::json!({"type": "sim", "event": kind, "payload": &payload}).to_string();
    pb::NodeFrame {
        node_seq: *seq,
        kind: Some(node_frame::Kind::Line(pb::RuntimeLine {
            raw: raw.into_bytes(),
            events: vec![pb::RuntimeEvent {
                r#type: kind.into(),
                payload_json: payload.to_string(),
            }],
            turn_end: end.then(|| pb::TurnUsage {
                total: Some(pb::ModelUsage {
                    model: "sim".into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        })),
    }
}

fn exited(seq: u64, stopped: bool, reason: &str) -> pb::NodeFrame {
    pb::NodeFrame {
        node_seq: seq + 1,
        kind: Some(node_frame::Kind::Exited(pb::Exited {
            exit_code: 0,
            reason: reason.into(),
            stopped,
            ..Default::default()
        })),
    }
}

/// Runs one simulated session until it stops, ends by itself, or its
/// dispatcher goes away.
async fn run(
    state: Arc<State>,
    id: String,
    mut inbound: Streaming<pb::DispatcherFrame>,
    tx: mpsc::Sender<Result<pb::NodeFrame, Status>>,
    first_message: Option<pb::UserMessage>,
    (epoch, fenced): (i64, CancellationToken),
) {
    // Frame 1 was `accepted`.
    let mut seq = 1u64;
    let mut hold: Option<tokio::time::Instant> = None;
    // The start's message is answered first, as a node's agent would.
    let mut first = first_message.map(|m| pb::DispatcherFrame {
        epoch: 0,
        kind: Some(dispatcher_frame::Kind::Message(m)),
    });
    loop {
        if let Some(f) = first.take() {
            if !answer(f, &mut seq, &tx, &mut hold).await {
                break;
            }
            continue;
        }
        let frame = tokio::select! {
            f = inbound.message() => f,
            () = fenced.cancelled() => {
                let _ = tx.send(Ok(exited(seq, true, "fenced"))).await;
                break;
            }
            () = async {
                match hold {
                    Some(t) => tokio::time::sleep_until(t).await,
                    None => std::future::pending().await,
                }
            } => {
                let _ = tx.send(Ok(exited(seq, false, "finished"))).await;
                break;
            }
        };
        let Ok(Some(frame)) = frame else { break };
        if !answer(frame, &mut seq, &tx, &mut hold).await {
            break;
        }
    }
    state.unset(&id, epoch);
}

/// Answers one frame; false when the session ends.
async fn answer(
    frame: pb::DispatcherFrame,
    seq: &mut u64,
    tx: &mpsc::Sender<Result<pb::NodeFrame, Status>>,
    hold: &mut Option<tokio::time::Instant>,
) -> bool {
    match frame.kind {
        Some(dispatcher_frame::Kind::Message(m)) => {
            let words: Vec<&str> = m.text.split_whitespace().collect();
            match (words.first().copied(), words.get(1), words.get(2)) {
                (Some("paced"), Some(n), Some(rate)) => {
                    let n: u64 = n.parse().unwrap_or(1);
                    let rate: f64 = rate.parse().unwrap_or(1000.0);
                    let bytes = words.get(3).and_then(|b| b.parse().ok()).unwrap_or(64);
                    if !paced(seq, tx, n, rate, bytes).await {
                        return false;
                    }
                }
                (Some("hold"), Some(ms), _) => {
                    let ms = ms.parse().unwrap_or(0);
                    *hold = Some(tokio::time::Instant::now() + Duration::from_millis(ms));
                }
                (Some("events"), Some(n), bytes) => {
                    let n: u64 = n.parse().unwrap_or(1);
                    let bytes: usize = bytes.and_then(|b| b.parse().ok()).unwrap_or(64);
                    let text = filler(bytes);
                    for _ in 0..n {
                        let e = event(
                            seq,
                            "agent.message",
                            serde_json::json!({ "text": text }),
                            false,
                        );
                        if tx.send(Ok(e)).await.is_err() {
                            return false;
                        }
                    }
                    let e = event(seq, "agent.result", serde_json::json!({}), true);
                    let _ = tx.send(Ok(e)).await;
                }
                _ => {
                    let reply = event(
                        seq,
                        "agent.message",
                        serde_json::json!({ "text": m.text }),
                        false,
                    );
                    let end = event(seq, "agent.result", serde_json::json!({}), true);
                    if tx.send(Ok(reply)).await.is_err() || tx.send(Ok(end)).await.is_err() {
                        return false;
                    }
                }
            }
        }
        Some(dispatcher_frame::Kind::Stop(_)) => {
            let _ = tx.send(Ok(exited(*seq, true, "stopped"))).await;
            return false;
        }
        _ => {}
    }
    true
}

/// Microseconds since this process first asked: the clock a paced event's
/// `sent_us` is read on, so a reader in the same process can time it.
pub fn clock_us() -> u64 {
    static EPOCH: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    u64::try_from(
        EPOCH
            .get_or_init(std::time::Instant::now)
            .elapsed()
            .as_micros(),
    )
    .unwrap_or(u64::MAX)
}

/// `n` events of `bytes` bytes at `rate` per second, each stamped when it
/// is handed to the stream, then the turn's end; false when the stream is gone.
async fn paced(
    seq: &mut u64,
    tx: &mpsc::Sender<Result<pb::NodeFrame, Status>>,
    n: u64,
    rate: f64,
    bytes: usize,
) -> bool {
    let text = filler(bytes);
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate.max(0.001)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    for _ in 0..n {
        tick.tick().await;
        let payload = serde_json::json!({ "text": text, "sent_us": clock_us() });
        if tx
            .send(Ok(event(seq, "agent.message", payload, false)))
            .await
            .is_err()
        {
            return false;
        }
    }
    let e = event(seq, "agent.result", serde_json::json!({}), true);
    tx.send(Ok(e)).await.is_ok()
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
        tokio::spawn(async move {
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
            // A simulated node keeps no run past its stream.
            let refused = pb::NodeFrame {
                node_seq: 0,
                kind: Some(node_frame::Kind::Refused(pb::Refused {
                    reason: "a simulated node keeps no runs to re-attach to".into(),
                })),
            };
            let _ = tx.send(Ok(refused)).await;
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
        self.0.set(&start.session_id, start.epoch, fenced.clone());
        tokio::spawn(run(
            self.0.clone(),
            start.session_id,
            inbound,
            tx,
            start.first_message,
            (start.epoch, fenced),
        ));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    type AttachSessionStream = BoxStream<pb::NodeFrame>;

    async fn attach_session(
        &self,
        _: Request<pb::AttachSessionRequest>,
    ) -> Result<Response<Self::AttachSessionStream>, Status> {
        Err(Status::unimplemented("simulated nodes do not re-attach"))
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
                    .map(|(id, (epoch, _))| pb::NodeSession {
                        session_id: id.clone(),
                        epoch: *epoch,
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

/// `len` pseudo-random letters, so nothing on the path compresses them away.
fn filler(len: usize) -> String {
    let mut rng = fastrand::Rng::new();
    (0..len).map(|_| rng.lowercase()).collect()
}
