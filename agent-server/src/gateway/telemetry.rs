//! The agent's own OpenTelemetry (Claude Code's metrics, events and
//! traces). The agent posts OTLP/HTTP protobuf to
//! `/berth/otlp/v1/{metrics,logs,traces}` on its gateway; each export is
//! decoded, every resource in it is given the session's attributes
//! (`berth.session_id`, `berth.project`, `berth.agent`: any `berth.*` the
//! agent sent is replaced, so a sandbox cannot pass as another session),
//! and sent on over OTLP/gRPC to the operator's collector. The sandbox never
//! reaches the collector itself.

use std::collections::BTreeMap;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
use opentelemetry_proto::tonic::collector::logs::v1::logs_service_client::LogsServiceClient;
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_client::MetricsServiceClient;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::resource::v1::Resource;
use prost::Message;

use super::{Body, SessionGate, text};

/// Where the agent's exporter posts (its `OTEL_EXPORTER_OTLP_ENDPOINT`).
pub const PREFIX: &str = "/berth/otlp/";

/// The largest export the gateway takes from an agent.
const MAX_EXPORT_BYTES: usize = 4 << 20;

/// The operator's collector, as the gateway reaches it.
#[derive(Clone, Debug)]
pub struct Collector {
    channel: tonic::transport::Channel,
    endpoint: String,
}

impl Collector {
    /// `endpoint`: an OTLP/gRPC URL (`http://collector:4317`, or https with
    /// the system's roots). Connected on first use.
    pub fn new(endpoint: &str) -> anyhow::Result<Self> {
        let mut ep = tonic::transport::Endpoint::from_shared(endpoint.to_string())
            .map_err(|e| anyhow::anyhow!("--agent-telemetry-endpoint `{endpoint}`: {e}"))?
            .timeout(std::time::Duration::from_secs(10));
        if endpoint.starts_with("https://") {
            ep = ep
                .tls_config(tonic::transport::ClientTlsConfig::new().with_native_roots())
                .map_err(|e| anyhow::anyhow!("--agent-telemetry-endpoint `{endpoint}`: {e}"))?;
        } else {
            anyhow::ensure!(
                endpoint.starts_with("http://"),
                "--agent-telemetry-endpoint `{endpoint}` must be an http(s) URL"
            );
        }
        Ok(Self {
            channel: ep.connect_lazy(),
            endpoint: endpoint.to_string(),
        })
    }

    /// Takes one export of `gate`'s agent, tags it and sends it on.
    pub(super) async fn take(&self, gate: &SessionGate, req: Request<Incoming>) -> Response<Body> {
        let Some(resource) = &gate.telemetry else {
            return text(
                StatusCode::NOT_FOUND,
                "berth gateway: this session does not export telemetry (its agent's `telemetry` is off)\n",
            );
        };
        let signal = req.uri().path().strip_prefix(PREFIX).unwrap_or_default();
        let signal = match signal {
            "v1/metrics" => Signal::Metrics,
            "v1/logs" => Signal::Logs,
            "v1/traces" => Signal::Traces,
            other => {
                return text(
                    StatusCode::NOT_FOUND,
                    format!(
                        "berth gateway: no OTLP signal `{other}` (v1/metrics, v1/logs, v1/traces)\n"
                    ),
                );
            }
        };
        let protobuf = req
            .headers()
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/x-protobuf"));
        if !protobuf {
            count(signal, "refused");
            return text(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "berth gateway: OTLP exports must be protobuf (OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf)\n",
            );
        }
        let body = match Limited::new(req.into_body(), MAX_EXPORT_BYTES)
            .collect()
            .await
        {
            Ok(b) => b.to_bytes(),
            Err(e) => {
                count(signal, "refused");
                return text(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!(
                        "berth gateway: the export could not be read (at most {MAX_EXPORT_BYTES} bytes): {e}\n"
                    ),
                );
            }
        };
        match self.forward(signal, &body, resource).await {
            Ok(answer) => {
                count(signal, "forwarded");
                let mut r =
                    Response::new(Full::new(answer).map_err(|never| match never {}).boxed());
                r.headers_mut().insert(
                    http::header::CONTENT_TYPE,
                    http::HeaderValue::from_static("application/x-protobuf"),
                );
                r
            }
            Err((status, why)) => {
                count(
                    signal,
                    if status == StatusCode::BAD_REQUEST {
                        "refused"
                    } else {
                        "failed"
                    },
                );
                tracing::warn!(session_id = %gate.session_id, signal = signal.name(), collector = %self.endpoint, %why, "agent telemetry not forwarded");
                text(status, format!("berth gateway: {why}\n"))
            }
        }
    }

    /// Decodes, tags and sends one export; the collector's answer, encoded.
    async fn forward(
        &self,
        signal: Signal,
        body: &[u8],
        resource: &BTreeMap<String, String>,
    ) -> Result<Bytes, (StatusCode, String)> {
        let sent = |e: tonic::Status| {
            // The agent's exporter retries a 503.
            (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("the collector refused or is unreachable: {}", e.message()),
            )
        };
        let ch = self.channel.clone();
        let answer = match signal {
            Signal::Metrics => MetricsServiceClient::new(ch)
                .export(tagged::<ExportMetricsServiceRequest>(
                    signal, body, resource,
                )?)
                .await
                .map_err(sent)?
                .into_inner()
                .encode_to_vec(),
            Signal::Logs => LogsServiceClient::new(ch)
                .export(tagged::<ExportLogsServiceRequest>(signal, body, resource)?)
                .await
                .map_err(sent)?
                .into_inner()
                .encode_to_vec(),
            Signal::Traces => TraceServiceClient::new(ch)
                .export(tagged::<ExportTraceServiceRequest>(signal, body, resource)?)
                .await
                .map_err(sent)?
                .into_inner()
                .encode_to_vec(),
        };
        Ok(Bytes::from(answer))
    }
}

/// An OTLP export request: each of its resources.
trait Export: Message + Default {
    fn resources(&mut self) -> impl Iterator<Item = &mut Option<Resource>>;
}

impl Export for ExportMetricsServiceRequest {
    fn resources(&mut self) -> impl Iterator<Item = &mut Option<Resource>> {
        self.resource_metrics.iter_mut().map(|r| &mut r.resource)
    }
}

impl Export for ExportLogsServiceRequest {
    fn resources(&mut self) -> impl Iterator<Item = &mut Option<Resource>> {
        self.resource_logs.iter_mut().map(|r| &mut r.resource)
    }
}

impl Export for ExportTraceServiceRequest {
    fn resources(&mut self) -> impl Iterator<Item = &mut Option<Resource>> {
        self.resource_spans.iter_mut().map(|r| &mut r.resource)
    }
}

/// `body` decoded as an export of `signal`, every resource tagged.
fn tagged<R: Export>(
    signal: Signal,
    body: &[u8],
    ours: &BTreeMap<String, String>,
) -> Result<R, (StatusCode, String)> {
    let mut req = R::decode(body).map_err(|e| {
        (
            StatusCode::BAD_REQUEST,
            format!("the {} export is not OTLP protobuf: {e}", signal.name()),
        )
    })?;
    for r in req.resources() {
        tag(r.get_or_insert_with(Resource::default), ours);
    }
    Ok(req)
}

#[derive(Clone, Copy, Debug)]
enum Signal {
    Metrics,
    Logs,
    Traces,
}

impl Signal {
    fn name(self) -> &'static str {
        match self {
            Self::Metrics => "metrics",
            Self::Logs => "logs",
            Self::Traces => "traces",
        }
    }
}

fn count(signal: Signal, outcome: &'static str) {
    metrics::counter!(crate::metrics::GATEWAY_TELEMETRY_EXPORTS, "signal" => signal.name(), "outcome" => outcome)
        .increment(1);
}

/// Puts the session's attributes on a resource, in place of any `berth.*`
/// the agent set.
fn tag(r: &mut Resource, ours: &BTreeMap<String, String>) {
    r.attributes.retain(|kv| !kv.key.starts_with("berth."));
    r.attributes.extend(ours.iter().map(|(k, v)| KeyValue {
        key: k.clone(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(v.clone())),
        }),
        ..Default::default()
    }));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_resource_gets_the_sessions_attributes_in_place_of_any_it_forged() {
        let string = |k: &str, v: &str| KeyValue {
            key: k.into(),
            value: Some(AnyValue {
                value: Some(any_value::Value::StringValue(v.into())),
            }),
            ..Default::default()
        };
        let mut r = Resource {
            attributes: vec![
                string("service.name", "claude-code"),
                string("berth.session_id", "someone-else"),
            ],
            ..Default::default()
        };
        let ours = BTreeMap::from([("berth.session_id".to_string(), "s-1".to_string())]);
        tag(&mut r, &ours);
        let got: Vec<(&str, String)> = r
            .attributes
            .iter()
            .map(|kv| {
                let v = match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                    Some(any_value::Value::StringValue(s)) => s.clone(),
                    _ => String::new(),
                };
                (kv.key.as_str(), v)
            })
            .collect();
        assert_eq!(
            got,
            vec![
                ("service.name", "claude-code".to_string()),
                ("berth.session_id", "s-1".to_string())
            ]
        );
    }
}
