//! OpenTelemetry traces.
//!
//! Off by default. When the standard variables name a collector
//! (`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` or `OTEL_EXPORTER_OTLP_ENDPOINT`),
//! every `tracing` span is exported over OTLP/gRPC, sampled as
//! `OTEL_TRACES_SAMPLER` (and `_ARG`) say, named by `OTEL_SERVICE_NAME` and
//! tagged with `OTEL_RESOURCE_ATTRIBUTES`.
//!
//! Trace context crosses processes as a W3C `traceparent`: in gRPC metadata
//! and HTTP headers, in the node protocol's frames, on stored sessions and
//! events, and in the agent's environment (`TRACEPARENT`). Span fields name
//! sessions, agents, nodes and models; never a message, a tool's input or a
//! secret.

use std::collections::HashMap;
use std::time::SystemTime;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{SpanKind, TraceContextExt, Tracer, TracerProvider};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The standard variables that configure traces (read here and by the
/// OpenTelemetry SDK and its OTLP exporter).
pub const ENV: &[&str] = &[
    "OTEL_SDK_DISABLED",
    "OTEL_TRACES_EXPORTER",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_PROTOCOL",
    "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
    "OTEL_EXPORTER_OTLP_HEADERS",
    "OTEL_EXPORTER_OTLP_TIMEOUT",
    "OTEL_EXPORTER_OTLP_COMPRESSION",
    "OTEL_SERVICE_NAME",
    "OTEL_RESOURCE_ATTRIBUTES",
    "OTEL_TRACES_SAMPLER",
    "OTEL_TRACES_SAMPLER_ARG",
    "OTEL_BSP_SCHEDULE_DELAY",
    "OTEL_BSP_MAX_QUEUE_SIZE",
    "OTEL_BSP_MAX_EXPORT_BATCH_SIZE",
    "OTEL_BSP_EXPORT_TIMEOUT",
];

/// The W3C header (and gRPC metadata key) carrying trace context.
pub const TRACEPARENT: &str = "traceparent";

/// The name berth's tracer reports itself under.
const TRACER: &str = "berth";

/// An exporting tracer provider: flush it before the process ends.
#[derive(Clone, Debug)]
pub struct Exporter {
    provider: SdkTracerProvider,
}

impl Exporter {
    /// A tracer for the `tracing` layer.
    pub(crate) fn tracer(&self) -> opentelemetry_sdk::trace::Tracer {
        self.provider.tracer(TRACER)
    }

    /// A provider that samples every span and exports none (for tests of
    /// what spans carry).
    #[cfg(test)]
    pub(crate) fn unexported() -> Self {
        EXPORTING.store(true, std::sync::atomic::Ordering::Relaxed);
        Self {
            provider: SdkTracerProvider::builder().build(),
        }
    }

    /// Exports what is still buffered, waiting at most a few seconds.
    pub fn shutdown(&self) {
        if let Err(e) = self
            .provider
            .shutdown_with_timeout(std::time::Duration::from_secs(5))
        {
            tracing::warn!(error = %e, "could not flush the last spans to the OTLP collector");
        }
    }
}

/// The exporter the environment asks for, or `None` when traces are off.
/// `service` names the process unless `OTEL_SERVICE_NAME` does. Call
/// inside a Tokio runtime.
pub fn from_env(service: &str) -> anyhow::Result<Option<Exporter>> {
    let var = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
    if var("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true")) {
        return Ok(None);
    }
    match var("OTEL_TRACES_EXPORTER").as_deref() {
        None | Some("otlp") => {}
        Some("none") => return Ok(None),
        Some(other) => anyhow::bail!(
            "OTEL_TRACES_EXPORTER={other:?} is not supported: berth exports traces with \"otlp\" (or \"none\")"
        ),
    }
    if var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        .or_else(|| var("OTEL_EXPORTER_OTLP_ENDPOINT"))
        .is_none()
    {
        return Ok(None);
    }
    for k in [
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
        "OTEL_EXPORTER_OTLP_PROTOCOL",
    ] {
        if let Some(p) = var(k)
            && p != "grpc"
        {
            anyhow::bail!(
                "{k}={p:?} is not supported: berth exports OTLP over gRPC; set it to \"grpc\" (a collector's port 4317)"
            );
        }
    }
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .build()
        .map_err(|e| anyhow::anyhow!("cannot build the OTLP span exporter: {e}"))?;
    let mut resource = opentelemetry_sdk::Resource::builder();
    if var("OTEL_SERVICE_NAME").is_none() {
        resource = resource.with_service_name(service.to_string());
    }
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource.build())
        .build();
    opentelemetry::global::set_tracer_provider(provider.clone());
    EXPORTING.store(true, std::sync::atomic::Ordering::Relaxed);
    Ok(Some(Exporter { provider }))
}

/// `span`'s context as a `traceparent`, when it belongs to a trace (never
/// when traces are off: one atomic load, on every event's hot path).
pub fn traceparent_of(span: &tracing::Span) -> Option<String> {
    if !exporting() {
        return None;
    }
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    // W3C version 00, written directly: every event made in a span asks.
    sc.is_valid().then(|| {
        format!(
            "00-{}-{}-{:02x}",
            sc.trace_id(),
            sc.span_id(),
            sc.trace_flags().to_u8()
        )
    })
}

/// The current span's `traceparent`, when traces are on.
pub fn current() -> Option<String> {
    traceparent_of(&tracing::Span::current())
}

/// The context a `traceparent` names; `None` when it is not a valid one.
pub fn context_of(traceparent: &str) -> Option<opentelemetry::Context> {
    let carrier = HashMap::from([(TRACEPARENT.to_string(), traceparent.trim().to_string())]);
    let cx = TraceContextPropagator::new().extract(&carrier);
    cx.span().span_context().is_valid().then_some(cx)
}

/// Makes `span` a child of `traceparent` (a caller's, a stored session's):
/// ignored when it is empty or malformed, so a bad header starts a new
/// trace instead of failing the call.
pub fn adopt(span: &tracing::Span, traceparent: Option<&str>) {
    if let Some(cx) = traceparent.and_then(context_of) {
        let _ = span.set_parent(cx);
    }
}

/// The trace id (32 hex digits) of a `traceparent` (`00-TRACE-SPAN-FLAGS`):
/// read in place, as every event sent to a client is.
pub fn trace_id(traceparent: &str) -> Option<&str> {
    let id = traceparent.split('-').nth(1)?;
    (id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()) && id.bytes().any(|b| b != b'0'))
        .then_some(id)
}

/// The `traceparent` in HTTP headers or gRPC metadata (as headers).
pub fn from_headers(headers: &http::HeaderMap) -> Option<&str> {
    headers.get(TRACEPARENT).and_then(|v| v.to_str().ok())
}

/// Puts the current span's `traceparent` in a gRPC request's metadata.
pub fn inject_metadata(metadata: &mut tonic::metadata::MetadataMap) {
    if let Some(tp) = current()
        && let Ok(v) = tp.parse()
    {
        metadata.insert(TRACEPARENT, v);
    }
}

/// The span of one gRPC or HTTP call a server takes, in the caller's trace
/// when its `traceparent` names one. Disabled (no cost) when traces are
/// off.
pub fn server_span(req: &http::Request<()>) -> tracing::Span {
    if !exporting() {
        return tracing::Span::none();
    }
    let path = req.uri().path();
    let grpc = req
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"));
    // A gRPC method names its span (`/berth.v1.Sessions/CreateSession`);
    // an HTTP call's path holds ids, so its span is named by its method.
    let span = if grpc {
        tracing::info_span!(
            "rpc",
            otel.name = path,
            otel.kind = "server",
            rpc.method = path
        )
    } else {
        let name = format!("HTTP {}", req.method());
        tracing::info_span!(
            "http",
            otel.name = name,
            otel.kind = "server",
            url.path = path
        )
    };
    adopt(&span, from_headers(req.headers()));
    span
}

/// Whether this process exports traces ([`from_env`] found a collector).
pub fn exporting() -> bool {
    EXPORTING.load(std::sync::atomic::Ordering::Relaxed)
}

static EXPORTING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// The trace a run's work is in now (its current turn's, else the run's),
/// shared between the run and what serves it (the egress gateway).
#[derive(Clone, Debug, Default)]
pub struct TraceCell(std::sync::Arc<std::sync::Mutex<Option<String>>>);

impl TraceCell {
    /// From now on, work joins `traceparent` (ignored when empty).
    pub fn set(&self, traceparent: &str) {
        if traceparent.is_empty() {
            return;
        }
        if let Ok(mut t) = self.0.lock() {
            *t = Some(traceparent.to_string());
        }
    }

    /// The trace to join, if any.
    pub fn get(&self) -> Option<String> {
        self.0.lock().ok().and_then(|t| t.clone())
    }
}

/// Records a span that already ended, from `start` to `end`, under
/// `parent` (a `traceparent`): a wait measured from stored times (a
/// session's time in the queue), which no `tracing` span covered.
pub fn record_interval(
    name: &'static str,
    parent: &str,
    start: SystemTime,
    end: SystemTime,
    attributes: &[(&'static str, String)],
) {
    let attributes: Vec<opentelemetry::KeyValue> = attributes
        .iter()
        .map(|(k, v)| opentelemetry::KeyValue::new(*k, v.clone()))
        .collect();
    let Some(cx) = context_of(parent) else {
        return;
    };
    let tracer = opentelemetry::global::tracer(TRACER);
    let mut span = tracer
        .span_builder(name)
        .with_kind(SpanKind::Internal)
        .with_start_time(start)
        .with_attributes(attributes)
        .start_with_context(&tracer, &cx);
    opentelemetry::trace::Span::end_with_timestamp(&mut span, end);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_traceparent_round_trips_and_a_bad_one_is_ignored() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(trace_id(tp), Some("4bf92f3577b34da6a3ce929d0e0e4736"));
        for bad in [
            "",
            "00-zz-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        ] {
            assert!(context_of(bad).is_none(), "{bad:?}");
            assert_eq!(trace_id(bad), None, "{bad:?}");
        }
        // Without an exporting layer, spans belong to no trace.
        assert_eq!(current(), None);
    }
}
