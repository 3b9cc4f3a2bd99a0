//! An OTLP/gRPC collector on a loopback port: it keeps every span it is
//! sent, and what each metrics and logs export held, for a test to read
//! back. Stopped (and its task awaited) by
//! [`Collector::stop`]; cancelled and aborted if dropped (a [`crate::loopback::Loopback`]).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use opentelemetry_proto::tonic::collector::logs::v1::logs_service_server::{
    LogsService, LogsServiceServer,
};
use opentelemetry_proto::tonic::collector::logs::v1::{
    ExportLogsServiceRequest, ExportLogsServiceResponse,
};
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::resource::v1::Resource;

/// One span as received: its ids in hex, its name, its attributes as
/// text, and the service that sent it.
#[derive(Debug, Clone)]
pub struct Span {
    pub trace_id: String,
    pub span_id: String,
    /// Empty for a root span.
    pub parent_span_id: String,
    pub name: String,
    pub service: String,
    pub attributes: Vec<(String, String)>,
    pub start_unix_nano: u64,
    pub end_unix_nano: u64,
}

impl Span {
    /// An attribute's value, as text.
    pub fn attribute(&self, key: &str) -> Option<&str> {
        self.attributes
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// One resource's part of a metrics or logs export: its attributes, and
/// the metric names (or log event bodies) it held.
#[derive(Debug, Clone)]
pub struct Export {
    /// `metrics` or `logs`.
    pub signal: &'static str,
    pub resource: Vec<(String, String)>,
    pub names: Vec<String>,
}

impl Export {
    /// A resource attribute's value, as text.
    pub fn attribute(&self, key: &str) -> Option<&str> {
        self.resource
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

#[derive(Clone, Default)]
struct Received(Arc<Mutex<Vec<Span>>>);

#[derive(Clone, Default)]
struct Exports(Arc<Mutex<Vec<Export>>>);

impl Exports {
    fn push(&self, e: Export) {
        if let Ok(mut all) = self.0.lock() {
            all.push(e);
        }
    }
}

fn attributes_of(r: Option<&Resource>) -> Vec<(String, String)> {
    r.iter()
        .flat_map(|r| &r.attributes)
        .map(|kv| (kv.key.clone(), text_of(kv)))
        .collect()
}

#[tonic::async_trait]
impl MetricsService for Exports {
    async fn export(
        &self,
        request: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        for rm in request.into_inner().resource_metrics {
            self.push(Export {
                signal: "metrics",
                resource: attributes_of(rm.resource.as_ref()),
                names: rm
                    .scope_metrics
                    .iter()
                    .flat_map(|s| &s.metrics)
                    .map(|m| m.name.clone())
                    .collect(),
            });
        }
        Ok(tonic::Response::new(ExportMetricsServiceResponse::default()))
    }
}

#[tonic::async_trait]
impl LogsService for Exports {
    async fn export(
        &self,
        request: tonic::Request<ExportLogsServiceRequest>,
    ) -> Result<tonic::Response<ExportLogsServiceResponse>, tonic::Status> {
        for rl in request.into_inner().resource_logs {
            self.push(Export {
                signal: "logs",
                resource: attributes_of(rl.resource.as_ref()),
                names: rl
                    .scope_logs
                    .iter()
                    .flat_map(|s| &s.log_records)
                    .map(|r| match r.body.as_ref().and_then(|b| b.value.as_ref()) {
                        Some(any_value::Value::StringValue(s)) => s.clone(),
                        _ => String::new(),
                    })
                    .collect(),
            });
        }
        Ok(tonic::Response::new(ExportLogsServiceResponse::default()))
    }
}

#[tonic::async_trait]
impl TraceService for Received {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut got = Vec::new();
        for rs in request.into_inner().resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.name")
                .map(text_of)
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for s in ss.spans {
                    got.push(Span {
                        trace_id: hex::encode(&s.trace_id),
                        span_id: hex::encode(&s.span_id),
                        parent_span_id: hex::encode(&s.parent_span_id),
                        name: s.name,
                        service: service.clone(),
                        attributes: s
                            .attributes
                            .iter()
                            .map(|kv| (kv.key.clone(), text_of(kv)))
                            .collect(),
                        start_unix_nano: s.start_time_unix_nano,
                        end_unix_nano: s.end_time_unix_nano,
                    });
                }
            }
        }
        if let Ok(mut spans) = self.0.lock() {
            spans.extend(got);
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

fn text_of(kv: &KeyValue) -> String {
    match kv.value.as_ref().and_then(|v: &AnyValue| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        Some(any_value::Value::DoubleValue(d)) => d.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

/// A running collector.
pub struct Collector {
    /// Where it listens (`http://ADDR` is an OTLP endpoint).
    pub addr: SocketAddr,
    received: Received,
    exports: Exports,
    server: crate::loopback::Loopback,
}

impl Collector {
    /// Starts one at a free loopback port.
    pub async fn start() -> anyhow::Result<Self> {
        let received = Received::default();
        let exports = Exports::default();
        let traces = TraceServiceServer::new(received.clone());
        let metrics = MetricsServiceServer::new(exports.clone());
        let logs = LogsServiceServer::new(exports.clone());
        let server = crate::loopback::Loopback::own(|listener, stop| async move {
            let incoming = tonic::transport::server::TcpIncoming::from(listener);
            let _ = tonic::transport::Server::builder()
                .add_service(traces)
                .add_service(metrics)
                .add_service(logs)
                .serve_with_incoming_shutdown(incoming, stop.cancelled_owned())
                .await;
        })
        .await?;
        Ok(Self {
            addr: server.addr,
            received,
            exports,
            server,
        })
    }

    /// The endpoint to give `OTEL_EXPORTER_OTLP_ENDPOINT`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<Span> {
        self.received
            .0
            .lock()
            .map(|s| s.clone())
            .unwrap_or_default()
    }

    /// Every metrics and logs export received so far, a resource each.
    pub fn exports(&self) -> Vec<Export> {
        self.exports.0.lock().map(|e| e.clone()).unwrap_or_default()
    }

    /// Waits until `done` holds for the spans received, up to `within`.
    pub async fn wait_for(
        &self,
        within: std::time::Duration,
        what: &str,
        done: impl Fn(&[Span]) -> bool,
    ) -> anyhow::Result<Vec<Span>> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let spans = self.spans();
            if done(&spans) {
                return Ok(spans);
            }
            if tokio::time::Instant::now() > deadline {
                let names: Vec<String> = spans
                    .iter()
                    .map(|s| format!("{} ({})", s.name, s.service))
                    .collect();
                anyhow::bail!("no {what} within {within:?}; spans received: {names:?}");
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }

    /// Stops serving and waits until its task has ended.
    pub async fn stop(self) {
        self.server.stop().await;
    }
}
