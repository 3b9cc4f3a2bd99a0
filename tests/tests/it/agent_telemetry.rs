//! The agent's own telemetry: Claude Code's OpenTelemetry metrics and
//! events, exported to its node's gateway and forwarded to the operator's
//! collector tagged with the session (see `traces.rs` for the process and
//! the collector these tests run).

use berth_tests::fake_session;

use crate::traces::{MARKER, Options, traced_session};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_real_clis_own_telemetry_reaches_the_collector_through_the_gateway_tagged_with_the_session()
-> anyhow::Result<()> {
    let mut request = crate::claude::claude_session(&format!("Say hello {MARKER}"));
    if let Some(spec) = request.spec.as_mut() {
        spec.telemetry = true;
        // The CLI exports every second (and at exit) instead of every minute.
        spec.env
            .insert("OTEL_METRIC_EXPORT_INTERVAL".into(), "1000".into());
    }
    let env = [(
        "BERTH_KEEPALIVE_CMD",
        "fake-anthropic --listen 127.0.0.1:8787 --log /tmp/anthropic-requests.jsonl",
    )];
    let t = traced_session(
        request,
        Options {
            env: &env,
            agent_signals: &["metrics", "logs"],
            ..Options::default()
        },
    )
    .await?;
    // The CLI exports to its gateway, never to the collector (which its
    // container, with no network, could not reach anyway).
    assert_eq!(t.agent_otlp, "http://127.0.0.1:18080/berth/otlp");
    let metrics: Vec<&str> = t
        .exports
        .iter()
        .filter(|e| e.signal == "metrics")
        .flat_map(|e| e.names.iter().map(String::as_str))
        .collect();
    for name in ["claude_code.token.usage", "claude_code.cost.usage"] {
        assert!(metrics.contains(&name), "no {name} in {metrics:?}");
    }
    // Its events (as OTLP logs): the prompt, the API request and the reply.
    let events: Vec<&str> = t
        .exports
        .iter()
        .filter(|e| e.signal == "logs")
        .flat_map(|e| e.names.iter().map(String::as_str))
        .collect();
    for name in ["claude_code.user_prompt", "claude_code.api_request"] {
        assert!(events.contains(&name), "no {name} in {events:?}");
    }
    for e in &t.exports {
        assert_eq!(e.attribute("service.name"), Some("claude-code"));
        assert_eq!(e.attribute("berth.project"), Some("default"));
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fake_claudes_own_telemetry_reaches_the_collector_through_the_gateway() -> anyhow::Result<()>
{
    let mut request = fake_session(&format!("hello {MARKER}"));
    if let Some(spec) = request.spec.as_mut() {
        spec.telemetry = true;
    }
    let t = traced_session(
        request,
        Options {
            agent_signals: &["metrics"],
            ..Options::default()
        },
    )
    .await?;
    assert_eq!(t.agent_otlp, "http://127.0.0.1:18080/berth/otlp");
    let e = t
        .exports
        .iter()
        .find(|e| e.signal == "metrics")
        .ok_or_else(|| anyhow::anyhow!("no metrics export"))?;
    assert!(
        e.names.iter().any(|n| n == "claude_code.token.usage"),
        "{e:?}"
    );
    assert_eq!(e.attribute("service.name"), Some("claude-code"));
    Ok(())
}
