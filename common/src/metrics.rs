//! Prometheus metrics: the exporter, the HTTP endpoint both services serve
//! (`/metrics`, `/healthz`, `/readyz`) on their own port, and a tower layer
//! that counts gRPC requests by method and code.
//!
//! Each crate lists its metrics once, as [`Def`]s with a description and,
//! for histograms, explicit buckets; [`install`] registers them. Names are
//! `berth_`-prefixed, in base units, counters end in `_total`, and labels
//! never carry session or container ids.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Instant;

pub use metrics_exporter_prometheus::PrometheusHandle;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
use tokio_util::sync::CancellationToken;

/// What kind of metric a [`Def`] is.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Kind {
    Counter,
    Gauge,
    /// With the buckets every sample falls into (upper bounds).
    Histogram(&'static [f64]),
}

/// One metric: its name, kind, unit and help text.
#[derive(Debug, Clone, Copy)]
pub struct Def {
    pub name: &'static str,
    pub kind: Kind,
    pub help: &'static str,
    /// Label names the metric carries (documentation; checked in tests).
    pub labels: &'static [&'static str],
}

/// Latency buckets, in seconds, from 1 ms to 60 s.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];
/// Buckets for counts of things in one batch.
pub const SIZE_BUCKETS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0,
];
/// Buckets for byte sizes, from 1 KiB to 1 GiB.
pub const BYTE_BUCKETS: &[f64] = &[
    1024.0,
    16384.0,
    262_144.0,
    1_048_576.0,
    16_777_216.0,
    268_435_456.0,
    1_073_741_824.0,
];

/// gRPC requests finished, by service, method and status code.
pub const GRPC_REQUESTS: &str = "berth_grpc_server_requests_total";
/// Time until a handler returned its response (for a stream: until it
/// started streaming), by service and method.
pub const GRPC_HANDLING: &str = "berth_grpc_server_handling_seconds";
/// Always 1, labelled with the service and version.
pub const BUILD_INFO: &str = "berth_build_info";
/// The async runtime's worker threads, live tasks and global queue.
pub const RUNTIME_WORKERS: &str = "berth_runtime_workers";
pub const RUNTIME_ALIVE_TASKS: &str = "berth_runtime_alive_tasks";
pub const RUNTIME_GLOBAL_QUEUE: &str = "berth_runtime_global_queue_depth";

/// The metrics every berth service exports through this module.
pub const COMMON: &[Def] = &[
    Def {
        name: GRPC_REQUESTS,
        kind: Kind::Counter,
        help: "gRPC requests finished, by service, method and status code (streams count when they end).",
        labels: &["service", "method", "code"],
    },
    Def {
        name: GRPC_HANDLING,
        kind: Kind::Histogram(LATENCY_BUCKETS),
        help: "Seconds until a gRPC handler returned its response; for a streaming call, until the stream began.",
        labels: &["service", "method"],
    },
    Def {
        name: BUILD_INFO,
        kind: Kind::Gauge,
        help: "Always 1: which berth service and version this process runs.",
        labels: &["service", "version"],
    },
    Def {
        name: RUNTIME_WORKERS,
        kind: Kind::Gauge,
        help: "Worker threads of the process's async runtime (sampled at each scrape).",
        labels: &[],
    },
    Def {
        name: RUNTIME_ALIVE_TASKS,
        kind: Kind::Gauge,
        help: "Tasks alive in the async runtime (sampled at each scrape): a count that only grows is a leak.",
        labels: &[],
    },
    Def {
        name: RUNTIME_GLOBAL_QUEUE,
        kind: Kind::Gauge,
        help: "Tasks waiting in the runtime's global queue (sampled at each scrape): a runtime that cannot keep up.",
        labels: &[],
    },
];

/// Samples what is read at scrape time: the process (`process_*`: CPU,
/// resident memory, open and maximum file descriptors, threads, start time)
/// and the async runtime.
fn sample(process: &metrics_process::Collector) {
    process.collect();
    if let Ok(rt) = tokio::runtime::Handle::try_current() {
        let m = rt.metrics();
        metrics::gauge!(RUNTIME_WORKERS).set(m.num_workers() as f64);
        metrics::gauge!(RUNTIME_ALIVE_TASKS).set(m.num_alive_tasks() as f64);
        metrics::gauge!(RUNTIME_GLOBAL_QUEUE).set(m.global_queue_depth() as f64);
    }
}

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Buckets by unit suffix: a histogram's buckets follow from its name, so
/// they are right whichever crate installs the recorder (a dispatcher with
/// an in-process node, or a test process running both).
const BUCKETS_BY_SUFFIX: &[(&str, &[f64])] = &[
    ("_seconds", LATENCY_BUCKETS),
    ("_size", SIZE_BUCKETS),
    ("_bytes", BYTE_BUCKETS),
];

/// The buckets a histogram named `name` gets.
pub fn buckets_for(name: &str) -> Option<&'static [f64]> {
    BUCKETS_BY_SUFFIX
        .iter()
        .find(|(suffix, _)| name.ends_with(suffix))
        .map(|(_, b)| *b)
}

/// Installs the process-wide recorder (first call wins; later calls only
/// add descriptions) and returns the handle that renders it. Histogram
/// buckets come from the unit suffix ([`buckets_for`]); a [`Def`] whose
/// buckets disagree is refused.
pub fn install(service: &'static str, defs: &[&[Def]]) -> anyhow::Result<PrometheusHandle> {
    let handle = match HANDLE.get() {
        Some(h) => h.clone(),
        None => {
            let mut builder = PrometheusBuilder::new().set_buckets(LATENCY_BUCKETS)?;
            for (suffix, buckets) in BUCKETS_BY_SUFFIX {
                builder = builder
                    .set_buckets_for_metric(Matcher::Suffix((*suffix).to_string()), buckets)?;
            }
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            // A recorder installed earlier by someone else (a test harness)
            // leaves ours unused; say so rather than fail.
            match metrics::set_global_recorder(recorder) {
                Ok(()) => {
                    let _ = HANDLE.set(handle.clone());
                }
                Err(_) if HANDLE.get().is_some() => {}
                Err(_) => tracing::warn!(
                    "a metrics recorder was already installed; /metrics may be empty"
                ),
            }
            HANDLE.get().cloned().unwrap_or(handle)
        }
    };
    for def in defs.iter().copied().flatten().chain(COMMON) {
        if let Kind::Histogram(buckets) = def.kind {
            anyhow::ensure!(
                buckets_for(def.name) == Some(buckets),
                "histogram {} must end in a unit suffix whose buckets it uses",
                def.name
            );
        }
        describe(def);
    }
    metrics::gauge!(BUILD_INFO, "service" => service, "version" => env!("CARGO_PKG_VERSION"))
        .set(1.0);
    Ok(handle)
}

fn describe(def: &Def) {
    let help = def.help;
    match def.kind {
        Kind::Counter => metrics::describe_counter!(def.name, help),
        Kind::Gauge => metrics::describe_gauge!(def.name, help),
        Kind::Histogram(_) => metrics::describe_histogram!(def.name, help),
    }
}

/// Whether a service is ready for traffic, asked on every `/readyz`.
pub type Readiness = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

/// Serves `/metrics` (Prometheus text), `/healthz` (the process is up) and
/// `/readyz` (200 when `ready` says so, 503 with the reason otherwise) on
/// `listener` until `shutdown`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    handle: PrometheusHandle,
    ready: Readiness,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    use axum::http::StatusCode;
    use axum::routing::get;
    let process = Arc::new(metrics_process::Collector::default());
    process.describe();
    let app = axum::Router::new()
        .route(
            "/metrics",
            get(move || {
                let (handle, process) = (handle.clone(), process.clone());
                async move {
                    sample(&process);
                    handle.run_upkeep();
                    (
                        [("content-type", "text/plain; version=0.0.4; charset=utf-8")],
                        handle.render(),
                    )
                }
            }),
        )
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(move || {
                let ready = ready.clone();
                async move {
                    match ready() {
                        Ok(()) => (StatusCode::OK, "ready\n".to_string()),
                        Err(why) => (
                            StatusCode::SERVICE_UNAVAILABLE,
                            format!("not ready: {why}\n"),
                        ),
                    }
                }
            }),
        );
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await?;
    Ok(())
}

/// Where `/metrics` listens: an address, or `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Listen(pub Option<SocketAddr>);

impl std::str::FromStr for Listen {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s.eq_ignore_ascii_case("off") {
            return Ok(Self(None));
        }
        s.parse()
            .map(|a| Self(Some(a)))
            .map_err(|_| format!("`{s}`: expected IP:PORT, or `off`"))
    }
}

/// Binds `addr` (errors name `--metrics-listen`) and runs [`serve`] in the
/// background on `tasks` until `stop`. Returns the bound address.
pub async fn spawn_endpoint(
    addr: SocketAddr,
    handle: PrometheusHandle,
    ready: Readiness,
    stop: CancellationToken,
    tasks: &tokio_util::task::TaskTracker,
) -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {addr} (--metrics-listen): {e}"))?;
    let bound = listener.local_addr()?;
    tracing::info!(addr = %bound, "metrics (/metrics), health (/healthz) and readiness (/readyz) on HTTP");
    tasks.spawn(async move {
        if let Err(e) = serve(listener, handle, ready, stop).await {
            tracing::warn!(error = %e, "the metrics endpoint stopped");
        }
    });
    Ok(bound)
}

/// A tower layer over a tonic server that counts requests by method and
/// final status code ([`GRPC_REQUESTS`]) and times handlers ([`GRPC_HANDLING`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct GrpcMetricsLayer;

impl<S> tower::Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetrics<S>;
    fn layer(&self, inner: S) -> Self::Service {
        GrpcMetrics { inner }
    }
}

/// The service [`GrpcMetricsLayer`] makes.
#[derive(Debug, Clone)]
pub struct GrpcMetrics<S> {
    inner: S,
}

/// `/pkg.Service/Method` as low-cardinality labels: anything that is not a
/// berth or grpc service is `other`.
fn method_labels(path: &str) -> (String, String) {
    let mut parts = path.trim_start_matches('/').splitn(2, '/');
    let service = parts.next().unwrap_or_default();
    let method = parts.next().unwrap_or_default();
    let known = (service.starts_with("berth.") || service.starts_with("grpc."))
        && service.len() <= 64
        && method.len() <= 64
        && !method.contains('/');
    if known {
        (service.to_string(), method.to_string())
    } else {
        ("other".into(), "other".into())
    }
}

/// The gRPC status in a header map (`grpc-status`), as its name.
fn code_in(headers: &http::HeaderMap) -> Option<&'static str> {
    let v = headers
        .get("grpc-status")?
        .to_str()
        .ok()?
        .parse::<i32>()
        .ok()?;
    Some(code_name(tonic::Code::from_i32(v)))
}

/// Prometheus-style code names (`OK`, `UNAVAILABLE`, …).
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

/// Counts a call once, with the code it ended with.
struct Call {
    service: String,
    method: String,
}

impl Call {
    fn finish(self, code: &'static str) {
        // An unknown method is one label, not one per name a client tries.
        let method = if code == "UNIMPLEMENTED" {
            "unknown".to_string()
        } else {
            self.method
        };
        metrics::counter!(GRPC_REQUESTS, "service" => self.service, "method" => method, "code" => code)
            .increment(1);
    }
}

impl<S, B, R> tower::Service<http::Request<B>> for GrpcMetrics<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<CountedBody<R>>;
    type Error = S::Error;
    type Future =
        Pin<Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let (service, method) = method_labels(req.uri().path());
        let started = Instant::now();
        let fut = self.inner.call(req);
        Box::pin(async move {
            let res = fut.await?;
            metrics::histogram!(GRPC_HANDLING, "service" => service.clone(), "method" => method.clone())
                .record(started.elapsed().as_secs_f64());
            let call = Call { service, method };
            // Trailers-only responses (most errors) carry the code in headers.
            let call = match code_in(res.headers()) {
                Some(code) => {
                    call.finish(code);
                    None
                }
                None => Some(call),
            };
            Ok(res.map(|body| CountedBody { inner: body, call }))
        })
    }
}

pin_project_lite::pin_project! {
    /// A response body that counts its call when the trailers pass (or, if
    /// the client goes away first, as CANCELLED).
    pub struct CountedBody<B> {
        #[pin]
        inner: B,
        call: Option<Call>,
    }

    impl<B> PinnedDrop for CountedBody<B> {
        fn drop(this: Pin<&mut Self>) {
            if let Some(call) = this.project().call.take() {
                call.finish("CANCELLED");
            }
        }
    }
}

impl<B: http_body::Body> http_body::Body for CountedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(code) = frame.trailers_ref().and_then(code_in)
                    && let Some(call) = this.call.take()
                {
                    call.finish(code);
                }
            }
            Poll::Ready(Some(Err(_))) => {
                if let Some(call) = this.call.take() {
                    call.finish("INTERNAL");
                }
            }
            Poll::Ready(None) => {
                if let Some(call) = this.call.take() {
                    call.finish("OK");
                }
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// A label value from untrusted text (a model name an agent reported):
/// at most 64 printable ASCII characters, `unknown` when empty.
pub fn label_value(s: &str) -> String {
    let v: String = s
        .chars()
        .filter(|c| c.is_ascii_graphic())
        .take(64)
        .collect();
    if v.is_empty() { "unknown".into() } else { v }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn methods_become_bounded_labels() {
        assert_eq!(
            method_labels("/berth.v1.Sessions/CreateSession"),
            ("berth.v1.Sessions".into(), "CreateSession".into())
        );
        assert_eq!(method_labels("/evil/x"), ("other".into(), "other".into()));
        assert_eq!(
            method_labels("/berth.v1.Sessions/a/b"),
            ("other".into(), "other".into())
        );
    }

    #[test]
    fn label_values_are_bounded() {
        assert_eq!(label_value(""), "unknown");
        assert_eq!(label_value("claude sonnet\n"), "claudesonnet");
        assert_eq!(label_value(&"x".repeat(500)).len(), 64);
    }
}
