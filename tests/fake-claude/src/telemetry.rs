//! Claude Code's own OpenTelemetry, as the real CLI exports it when
//! `CLAUDE_CODE_ENABLE_TELEMETRY=1` and `OTEL_METRICS_EXPORTER=otlp` with
//! `OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf`: at exit, one metrics export
//! posted to `$OTEL_EXPORTER_OTLP_ENDPOINT/v1/metrics`, its resource
//! `service.name=claude-code` plus `OTEL_RESOURCE_ATTRIBUTES`, holding
//! `claude_code.session.count`, `claude_code.token.usage` (per model and
//! type) and `claude_code.cost.usage` (per model), each point tagged with
//! `session.id`. (The real CLI also exports every
//! `OTEL_METRIC_EXPORT_INTERVAL`, and its events as logs.)

use std::collections::BTreeMap;
use std::io::{Read, Write};

use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::metrics::v1::{
    AggregationTemporality, Metric, NumberDataPoint, ResourceMetrics, ScopeMetrics, Sum,
    metric::Data, number_data_point::Value,
};
use opentelemetry_proto::tonic::resource::v1::Resource;
use prost::Message;

/// Exports the conversation's totals (model → input and output tokens,
/// cost) when the environment turns telemetry on; a failure is written to
/// stderr, as the real CLI's exporter does.
pub(crate) fn export_at_exit(session_id: &str, totals: &BTreeMap<String, (u64, u64, f64)>) {
    let var = |k: &str| std::env::var(k).unwrap_or_default();
    if var("CLAUDE_CODE_ENABLE_TELEMETRY") != "1"
        || var("OTEL_METRICS_EXPORTER") != "otlp"
        || var("OTEL_EXPORTER_OTLP_PROTOCOL") != "http/protobuf"
    {
        return;
    }
    let endpoint = var("OTEL_EXPORTER_OTLP_ENDPOINT");
    let body = request(session_id, totals).encode_to_vec();
    if let Err(e) = post(&endpoint, &body) {
        eprintln!("OTLP metrics export to {endpoint} failed: {e}");
    }
}

fn string(k: &str, v: &str) -> KeyValue {
    KeyValue {
        key: k.into(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(v.into())),
        }),
        ..Default::default()
    }
}

fn request(
    session_id: &str,
    totals: &BTreeMap<String, (u64, u64, f64)>,
) -> ExportMetricsServiceRequest {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let point = |value: f64, attrs: Vec<KeyValue>| NumberDataPoint {
        attributes: [vec![string("session.id", session_id)], attrs].concat(),
        time_unix_nano: now,
        value: Some(Value::AsDouble(value)),
        ..Default::default()
    };
    let sum = |name: &str, unit: &str, points: Vec<NumberDataPoint>| Metric {
        name: name.into(),
        unit: unit.into(),
        data: Some(Data::Sum(Sum {
            data_points: points,
            aggregation_temporality: AggregationTemporality::Delta as i32,
            is_monotonic: true,
        })),
        ..Default::default()
    };
    let tokens = totals
        .iter()
        .flat_map(|(model, (input, output, _))| {
            [("input", *input), ("output", *output)].map(|(kind, n)| {
                point(n as f64, vec![string("model", model), string("type", kind)])
            })
        })
        .collect();
    let cost = totals
        .iter()
        .map(|(model, (_, _, usd))| point(*usd, vec![string("model", model)]))
        .collect();
    let mut resource = vec![string("service.name", "claude-code")];
    for pair in std::env::var("OTEL_RESOURCE_ATTRIBUTES")
        .unwrap_or_default()
        .split(',')
    {
        if let Some((k, v)) = pair.split_once('=') {
            resource.push(string(k.trim(), v.trim()));
        }
    }
    ExportMetricsServiceRequest {
        resource_metrics: vec![ResourceMetrics {
            resource: Some(Resource {
                attributes: resource,
                ..Default::default()
            }),
            scope_metrics: vec![ScopeMetrics {
                metrics: vec![
                    sum(
                        "claude_code.session.count",
                        "",
                        vec![point(1.0, Vec::new())],
                    ),
                    sum("claude_code.token.usage", "tokens", tokens),
                    sum("claude_code.cost.usage", "USD", cost),
                ],
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
}

/// POSTs `body` to `endpoint` + `/v1/metrics` (plain http).
fn post(endpoint: &str, body: &[u8]) -> Result<(), String> {
    let rest = endpoint
        .strip_prefix("http://")
        .ok_or("only http:// endpoints")?;
    let (addr, base) = rest.split_once('/').unwrap_or((rest, ""));
    let path = format!("/{}/v1/metrics", base.trim_end_matches('/')).replace("//v1", "/v1");
    let io = |e: std::io::Error| e.to_string();
    let mut conn = std::net::TcpStream::connect(addr).map_err(io)?;
    conn.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .map_err(io)?;
    write!(
        conn,
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/x-protobuf\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .and_then(|()| conn.write_all(body))
    .map_err(io)?;
    let mut answer = Vec::new();
    conn.read_to_end(&mut answer).map_err(io)?;
    let text = String::from_utf8_lossy(&answer);
    let status = text.split(' ').nth(1).unwrap_or_default();
    if status.starts_with('2') {
        Ok(())
    } else {
        Err(format!("HTTP {status}"))
    }
}
