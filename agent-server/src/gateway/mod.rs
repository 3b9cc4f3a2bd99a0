//! The sandbox egress gateway. A session's container has no network but its
//! own loopback; `berth-forward` there pipes each connection to this
//! gateway over a Unix socket in the container's gateway directory. Per
//! connection the gateway:
//!
//! - proxies the model API: an origin-form request (`POST /v1/messages`) goes
//!   to `--model-api-url`, with the session's API key (from its vault) put
//!   in `x-api-key`, so the key never enters the container;
//! - sends requests under `/berth/` on the session's declared routes (its
//!   agent's remote MCP servers, its git resources with a credential), with
//!   their credentials attached ([`routes`]);
//! - tunnels `CONNECT host:port` when the session's egress policy allows
//!   it, and never to a loopback, link-local or private address the operator
//!   has not allowlisted (`--egress-allow-internal`);
//! - refuses anything else.
//!
//! Every decision is logged with the session id, host, verdict and bytes,
//! and counted in `berth_egress_*`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use berth_common::spec::Egress;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::lease::RunLease;

mod routes;
mod telemetry;

pub use routes::{CredentialUse, Route, UseLog, UseSink, git_route, routes_of};
pub use telemetry::{Collector as TelemetryCollector, PREFIX as TELEMETRY_PREFIX};

/// The socket's name in a container's gateway directory.
pub const SOCKET: &str = "egress.sock";
/// The forwarder's name there.
pub const FORWARDER: &str = "forward";
/// Where the gateway directory is mounted in the container.
pub const MOUNT: &str = "/run/berth";

type Body = BoxBody<Bytes, hyper::Error>;
type HttpsClient = berth_common::https::Client<Incoming>;

/// What one session may do through the gateway.
#[derive(Clone)]
pub struct SessionGate {
    pub session_id: String,
    /// The trace the run's work is in now: model requests join it.
    pub trace: berth_common::traces::TraceCell,
    pub egress: Egress,
    /// Sent as `x-api-key` on model API requests.
    pub api_key: Option<String>,
    /// The run's lease: every request waits for it to be confirmed, and a
    /// fenced run's connections close (see [`crate::lease`]).
    pub lease: Option<Arc<RunLease>>,
    /// Its declared routes.
    pub routes: Vec<Route>,
    /// The run's credentials (updated as the dispatcher refreshes them).
    pub credentials: crate::spec::CredentialBook,
    /// Where credential uses are reported.
    pub uses: Option<UseLog>,
    /// Set when the agent exports its own telemetry: the resource
    /// attributes the gateway puts on it.
    pub telemetry: Option<std::collections::BTreeMap<String, String>>,
}

impl std::fmt::Debug for SessionGate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionGate")
            .field("session_id", &self.session_id)
            .field("egress", &self.egress)
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .field("routes", &self.routes)
            .finish()
    }
}

/// The node's gateway: configuration and the model API client.
pub struct Gateway {
    model_api: http::Uri,
    allow_internal: Vec<String>,
    client: HttpsClient,
    /// Where agents' own telemetry goes (`--agent-telemetry-endpoint`).
    telemetry: Option<telemetry::Collector>,
    /// Every gate's accept loop, connections and tunnels: each ends when
    /// its gate closes, and shutdown awaits them ([`Gateway::stopped`]).
    tasks: TaskTracker,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("model_api", &self.model_api)
            .field("allow_internal", &self.allow_internal)
            .finish_non_exhaustive()
    }
}

/// Serving one session's socket; dropping it stops and removes the socket.
#[derive(Debug)]
pub struct GateGuard {
    stop: CancellationToken,
    socket: PathBuf,
}

impl Drop for GateGuard {
    fn drop(&mut self) {
        self.stop.cancel();
        let _ = std::fs::remove_file(&self.socket);
    }
}

fn text(status: StatusCode, msg: impl Into<String>) -> Response<Body> {
    let mut r = Response::new(
        Full::new(Bytes::from(msg.into()))
            .map_err(|never| match never {})
            .boxed(),
    );
    *r.status_mut() = status;
    r
}

/// Hop-by-hop headers a proxy must not forward.
const HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

impl Gateway {
    pub fn new(
        model_api: &str,
        allow_internal: Vec<String>,
        telemetry: Option<telemetry::Collector>,
    ) -> anyhow::Result<Self> {
        let model_api: http::Uri = model_api
            .parse()
            .map_err(|e| anyhow::anyhow!("--model-api-url `{model_api}`: {e}"))?;
        anyhow::ensure!(
            matches!(model_api.scheme_str(), Some("http" | "https")) && model_api.host().is_some(),
            "--model-api-url must be an http(s) URL"
        );
        Ok(Self {
            model_api,
            allow_internal,
            client: berth_common::https::client()?,
            telemetry,
            tasks: TaskTracker::new(),
        })
    }

    /// Whether agents' own telemetry is forwarded (a collector is set).
    pub fn forwards_telemetry(&self) -> bool {
        self.telemetry.is_some()
    }

    /// Waits until every gate's tasks have ended (once no gate is open:
    /// after the node's runs have ended).
    pub async fn stopped(&self) {
        self.tasks.close();
        self.tasks.wait().await;
    }

    /// Serves `gate` on the socket in `dir` until the guard drops.
    pub fn serve(self: &Arc<Self>, dir: &Path, gate: SessionGate) -> std::io::Result<GateGuard> {
        use std::os::unix::fs::PermissionsExt;
        let socket = dir.join(SOCKET);
        let _ = std::fs::remove_file(&socket);
        let listener = tokio::net::UnixListener::bind(&socket)?;
        // The agent's user (not the node's) connects to it.
        std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666))?;
        let stop = CancellationToken::new();
        let gw = self.clone();
        let gate = Arc::new(gate);
        let token = stop.clone();
        let tasks = self.tasks.clone();
        self.tasks.spawn(async move {
            loop {
                let conn = tokio::select! {
                    () = token.cancelled() => return,
                    c = listener.accept() => c,
                };
                let Ok((stream, _)) = conn else { continue };
                let (gw, gate, token) = (gw.clone(), gate.clone(), token.clone());
                let gate_lease = gate.lease.clone();
                let served = token.clone();
                tasks.spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let (gw, gate, served) = (gw.clone(), gate.clone(), served.clone());
                        async move {
                            Ok::<_, std::convert::Infallible>(gw.handle(&gate, &served, req).await)
                        }
                    });
                    let conn = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .with_upgrades();
                    let fenced = async {
                        match &gate_lease {
                            Some(l) => l.fenced().await,
                            None => std::future::pending().await,
                        }
                    };
                    tokio::select! {
                        _ = conn => {}
                        () = token.cancelled() => {}
                        // A superseded run's open connections (a model
                        // response streaming, a tunnel) end at once.
                        () = fenced => {}
                    }
                });
            }
        });
        Ok(GateGuard { stop, socket })
    }

    /// Answers one request of `gate`'s agent; a tunnel it opens ends when
    /// `closed` is cancelled (the gate closes).
    async fn handle(
        &self,
        gate: &SessionGate,
        closed: &CancellationToken,
        req: Request<Incoming>,
    ) -> Response<Body> {
        if let Some(refused) = hold(gate).await {
            return refused;
        }
        if req.method() == Method::CONNECT {
            return self.connect(gate, closed, req).await;
        }
        if req.uri().authority().is_none() && req.uri().path().starts_with(telemetry::PREFIX) {
            return match &self.telemetry {
                Some(c) => c.take(gate, req).await,
                None => text(
                    StatusCode::NOT_FOUND,
                    "berth gateway: this node forwards no agent telemetry (no --agent-telemetry-endpoint or OTEL_EXPORTER_OTLP_ENDPOINT)\n",
                ),
            };
        }
        if req.uri().authority().is_none() && req.uri().path().starts_with(routes::PREFIX) {
            return self.route(gate, req).await;
        }
        if req.uri().authority().is_some() {
            decision(
                gate,
                req.uri().host().unwrap_or(""),
                80,
                false,
                "plain http",
                0,
                0,
            );
            return text(
                StatusCode::FORBIDDEN,
                "berth gateway: plain-http egress is refused; use https (CONNECT)\n",
            );
        }
        let span = tracing::info_span!(
            "gateway.model_request",
            otel.kind = "client",
            session_id = %gate.session_id,
            http.route = req.uri().path(),
            http.response.status_code = tracing::field::Empty,
        );
        berth_common::traces::adopt(&span, gate.trace.get().as_deref());
        self.model(gate, req).instrument(span).await
    }

    /// A model API request, sent on with the session's key.
    async fn model(&self, gate: &SessionGate, req: Request<Incoming>) -> Response<Body> {
        let Some(key) = &gate.api_key else {
            metrics::counter!(crate::metrics::GATEWAY_MODEL_REQUESTS, "outcome" => "no_key")
                .increment(1);
            return text(
                StatusCode::UNAUTHORIZED,
                r#"{"type":"error","error":{"type":"authentication_error","message":"berth gateway: this session has no model API key (give it a secret with usage SECRET_USAGE_ANTHROPIC_API_KEY)"}}"#,
            );
        };
        let (mut parts, body) = req.into_parts();
        let base = self.model_api.path().trim_end_matches('/');
        let pq = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        let uri = format!(
            "{}://{}{base}{pq}",
            self.model_api.scheme_str().unwrap_or("https"),
            self.model_api.authority().map_or("", |a| a.as_str())
        );
        if !retarget(&mut parts, &uri) {
            return bad_path();
        }
        // Whatever the agent sent is dropped; the vault's key goes on.
        parts.headers.remove("x-api-key");
        match http::HeaderValue::from_str(key) {
            Ok(mut v) => {
                v.set_sensitive(true);
                parts.headers.insert("x-api-key", v);
            }
            Err(_) => {
                return text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "berth gateway: the session's API key cannot be sent as a header\n",
                );
            }
        }
        let path = parts.uri.path().to_string();
        match self.client.request(Request::from_parts(parts, body)).await {
            Ok(resp) => {
                let code = format!("{}xx", resp.status().as_u16() / 100);
                metrics::counter!(crate::metrics::GATEWAY_MODEL_REQUESTS, "outcome" => code)
                    .increment(1);
                tracing::Span::current()
                    .record("http.response.status_code", resp.status().as_u16());
                tracing::debug!(session_id = %gate.session_id, %path, status = %resp.status(), "model API request");
                resp.map(|b| b.boxed())
            }
            Err(e) => {
                metrics::counter!(crate::metrics::GATEWAY_MODEL_REQUESTS, "outcome" => "unreachable")
                    .increment(1);
                tracing::warn!(session_id = %gate.session_id, error = %e, "model API unreachable");
                text(
                    StatusCode::BAD_GATEWAY,
                    format!("berth gateway: the model API is unreachable: {e}\n"),
                )
            }
        }
    }

    /// Whether the operator lets sessions reach `host:port` although it is
    /// internal.
    fn internal_allowed(&self, host: &str, port: u16) -> bool {
        let hp = format!("{host}:{port}");
        self.allow_internal
            .iter()
            .any(|a| a.eq_ignore_ascii_case(&hp) || a.eq_ignore_ascii_case(host))
    }

    async fn connect(
        &self,
        gate: &SessionGate,
        closed: &CancellationToken,
        req: Request<Incoming>,
    ) -> Response<Body> {
        let Some(auth) = req.uri().authority().cloned() else {
            return text(
                StatusCode::BAD_REQUEST,
                "berth gateway: CONNECT needs host:port\n",
            );
        };
        let host = auth
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let port = auth.port_u16().unwrap_or(443);
        if !gate.egress.allows(&host, port) {
            decision(
                gate,
                &host,
                port,
                false,
                "not in the session's egress policy",
                0,
                0,
            );
            return text(
                StatusCode::FORBIDDEN,
                format!("berth gateway: {host}:{port} is not in this session's egress policy\n"),
            );
        }
        let addrs: Vec<std::net::SocketAddr> =
            match tokio::net::lookup_host((host.as_str(), port)).await {
                Ok(a) => a.collect(),
                Err(e) => {
                    decision(gate, &host, port, false, "does not resolve", 0, 0);
                    return text(
                        StatusCode::BAD_GATEWAY,
                        format!("berth gateway: {host}: {e}\n"),
                    );
                }
            };
        let internal = addrs
            .iter()
            .any(|a| berth_common::spec::is_internal_ip(a.ip()));
        if addrs.is_empty() || (internal && !self.internal_allowed(&host, port)) {
            decision(gate, &host, port, false, "internal address", 0, 0);
            return text(
                StatusCode::FORBIDDEN,
                format!("berth gateway: {host} is an internal address\n"),
            );
        }
        let mut upstream = match tokio::net::TcpStream::connect(addrs.as_slice()).await {
            Ok(s) => s,
            Err(e) => {
                decision(gate, &host, port, false, "unreachable", 0, 0);
                return text(
                    StatusCode::BAD_GATEWAY,
                    format!("berth gateway: {host}:{port}: {e}\n"),
                );
            }
        };
        let (gate, closed) = (gate.clone(), closed.clone());
        self.tasks.spawn(async move {
            let tunnel = async {
                match hyper::upgrade::on(req).await {
                    Ok(up) => {
                        let mut up = TokioIo::new(up);
                        let (out, back) = tokio::io::copy_bidirectional(&mut up, &mut upstream)
                            .await
                            .unwrap_or((0, 0));
                        decision(&gate, &host, port, true, "allowed", out, back);
                    }
                    Err(e) => tracing::debug!(error = %e, "CONNECT upgrade failed"),
                }
            };
            tokio::select! {
                () = tunnel => {}
                () = closed.cancelled() => {}
            }
        });
        Response::new(
            Full::new(Bytes::new())
                .map_err(|never| match never {})
                .boxed(),
        )
    }
}

/// Points a request the agent made at `target`, for sending on: without
/// hop-by-hop headers, its `Host` (the client sets the target's) and any
/// `Authorization` the agent sent (the gateway adds the real one, if any).
/// `false` when `target` is no URI (a bad path from the agent).
fn retarget(parts: &mut http::request::Parts, target: &str) -> bool {
    let Ok(uri) = target.parse() else {
        return false;
    };
    parts.uri = uri;
    for h in HOP {
        parts.headers.remove(h);
    }
    parts.headers.remove(http::header::HOST);
    parts.headers.remove(http::header::AUTHORIZATION);
    true
}

fn bad_path() -> Response<Body> {
    text(StatusCode::BAD_REQUEST, "berth gateway: bad request path\n")
}

/// Holds a request until the run's lease is confirmed; `Some` answer when
/// it may not go out at all (the run was fenced, or no dispatcher confirmed
/// it within [`crate::lease::LEASE_WAIT`]).
async fn hold(gate: &SessionGate) -> Option<Response<Body>> {
    let lease = gate.lease.as_ref()?;
    if lease.usable(std::time::Duration::ZERO).await.is_ok() {
        return None;
    }
    tracing::info!(session_id = %gate.session_id, "run lease lapsed: holding the request until a dispatcher confirms the run");
    match lease.usable(crate::lease::LEASE_WAIT).await {
        Ok(()) => {
            metrics::counter!(crate::metrics::GATEWAY_HELD, "outcome" => "released").increment(1);
            None
        }
        Err(why) => {
            metrics::counter!(crate::metrics::GATEWAY_HELD, "outcome" => "refused").increment(1);
            tracing::warn!(session_id = %gate.session_id, %why, "gateway request refused");
            Some(text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("berth gateway: {why}\n"),
            ))
        }
    }
}

/// Logs and counts one egress decision.
fn decision(
    gate: &SessionGate,
    host: &str,
    port: u16,
    allowed: bool,
    why: &str,
    sent: u64,
    received: u64,
) {
    let verdict = if allowed { "allowed" } else { "denied" };
    metrics::counter!(crate::metrics::EGRESS_CONNECTIONS, "decision" => verdict).increment(1);
    if allowed {
        metrics::counter!(crate::metrics::EGRESS_BYTES, "direction" => "sent").increment(sent);
        metrics::counter!(crate::metrics::EGRESS_BYTES, "direction" => "received")
            .increment(received);
    }
    tracing::info!(
        session_id = %gate.session_id,
        host,
        port,
        decision = verdict,
        reason = why,
        bytes_sent = sent,
        bytes_received = received,
        "egress"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_gate_never_shows_its_key() {
        let gate = SessionGate {
            session_id: "s1".into(),
            trace: Default::default(),
            telemetry: None,
            egress: Egress::default(),
            api_key: Some("sk-ant-very-secret".into()),
            lease: None,
            routes: vec![],
            credentials: Default::default(),
            uses: None,
        };
        let shown = format!("{gate:?}");
        assert!(
            shown.contains("s1") && shown.contains("redacted"),
            "{shown}"
        );
        assert!(!shown.contains("sk-ant"), "{shown}");
    }
}
