//! The agent process's env: the spec's own, `HOME`, and what points it at
//! the egress gateway. Never a secret: the gateway attaches the model API
//! key at egress.

use crate::spec::SessionSpec;

/// The env an agent process starts with; `gateway_port` when the node's
/// gateway serves the container; `telemetry`: the gateway forwards the
/// agent's own telemetry (the node has a collector).
pub fn agent_env(
    spec: &SessionSpec,
    home: &str,
    gateway_port: Option<u16>,
    telemetry: bool,
) -> Vec<String> {
    let mut env = env_with_home(spec, home);
    if let Some(port) = gateway_port {
        env.extend(gateway_env(spec, port));
        if telemetry && spec.telemetry.is_some() {
            env.extend(telemetry_env(spec, port));
        }
    }
    env
}

/// Claude Code's own OpenTelemetry, exported to the gateway (OTLP/HTTP
/// protobuf), for what the session does not set itself (an export
/// interval, say). Prompts stay redacted: `OTEL_LOG_USER_PROMPTS` is never
/// set here.
fn telemetry_env(spec: &SessionSpec, port: u16) -> Vec<String> {
    let endpoint = format!(
        "http://127.0.0.1:{port}{}",
        crate::gateway::TELEMETRY_PREFIX.trim_end_matches('/')
    );
    [
        ("CLAUDE_CODE_ENABLE_TELEMETRY", "1".to_string()),
        ("OTEL_METRICS_EXPORTER", "otlp".into()),
        ("OTEL_LOGS_EXPORTER", "otlp".into()),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf".into()),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint),
    ]
    .into_iter()
    .filter(|(k, _)| !spec.agent.env.contains_key(*k))
    .map(|(k, v)| format!("{k}={v}"))
    .collect()
}

/// The agent's env, with `HOME` at the node's home volume unless the session
/// sets its own.
fn env_with_home(spec: &SessionSpec, home: &str) -> Vec<String> {
    let mut env = spec.agent.env_pairs();
    if !spec.agent.env.contains_key("HOME") {
        env.push(format!("HOME={home}"));
    }
    env
}

/// What points the agent at the gateway, for what the session does not set
/// itself: the model API (only with a key in its vault, so a session
/// without one keeps its image's own setting) and, when its egress policy
/// lets anything out, the proxy.
fn gateway_env(spec: &SessionSpec, port: u16) -> Vec<String> {
    let url = format!("http://127.0.0.1:{port}");
    let mut vars: Vec<(&str, String)> = Vec::new();
    if spec.secrets.anthropic_api_key.is_some() {
        vars.push(("ANTHROPIC_BASE_URL", url.clone()));
        // The CLI wants a key to send; the gateway replaces it with the real one.
        vars.push(("ANTHROPIC_API_KEY", "berth-gateway-injects-the-key".into()));
    }
    if spec.agent.egress.mode != berth_common::spec::EgressMode::None {
        for k in ["HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"] {
            vars.push((k, url.clone()));
        }
        vars.push(("NO_PROXY", "127.0.0.1,localhost".into()));
        vars.push(("no_proxy", "127.0.0.1,localhost".into()));
    }
    vars.into_iter()
        .filter(|(k, _)| !spec.agent.env.contains_key(*k))
        .map(|(k, v)| format!("{k}={v}"))
        .collect()
}
