//! OpenTelemetry traces: `berth-dispatcher` (with its in-process node, over
//! mTLS) started as an operator would, with only the standard `OTEL_*`
//! variables pointing it at a loopback OTLP collector. A session created in
//! the client's trace is one trace from the API call to the agent's first
//! line, with the parents a reader expects.

use std::collections::HashMap;
use std::time::Duration;

use berth_proto::v1::{self as pb, sessions_client::SessionsClient};
use berth_tests::otlp::{Collector, Export, Span};
use berth_tests::process_dispatcher::ProcessDispatcher;
use berth_tests::{
    collect_until, create_database, drop_database, fake_session, free_addr, stop_and_wait,
    until_turn_ends,
};

/// The caller's trace: the test plays a client that already traces.
const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN: &str = "00f067aa0ba902b7";
/// Text only the message carries: no span may hold it.
pub(crate) const MARKER: &str = "trace-marker-7f3a";

/// The one span named `name` in the trace.
fn one<'a>(spans: &'a [Span], name: &str) -> anyhow::Result<&'a Span> {
    let found: Vec<&Span> = spans.iter().filter(|s| s.name == name).collect();
    match found.as_slice() {
        [s] => Ok(s),
        _ => anyhow::bail!(
            "expected one `{name}` span, found {}: {:?}",
            found.len(),
            spans.iter().map(|s| &s.name).collect::<Vec<_>>()
        ),
    }
}

/// What a traced session left: its trace's spans, its events, the
/// TRACEPARENT its agent process was started with, and its id.
pub(crate) struct Traced {
    pub(crate) spans: Vec<Span>,
    /// The agent's own telemetry, with `agent_telemetry`.
    pub(crate) exports: Vec<Export>,
    /// Where the agent process exports it (its OTEL_EXPORTER_OTLP_ENDPOINT).
    pub(crate) agent_otlp: String,
    pub(crate) events: Vec<pb::Event>,
    pub(crate) agent_traceparent: String,
    pub(crate) session_id: String,
    pub(crate) log: String,
}

/// How a traced session runs.
#[derive(Default)]
pub(crate) struct Options<'a> {
    /// More variables for `berth-dispatcher`.
    pub(crate) env: &'a [(&'a str, &'a str)],
    /// A model API key to put in the session's vault.
    pub(crate) model_key: Option<&'a str>,
    /// The agent asks to use a tool, and the test allows it.
    pub(crate) approve: bool,
    /// Wait for the agent's own telemetry too: these signals of it.
    pub(crate) agent_signals: &'a [&'a str],
}

/// Runs one session of `request` (its first message holds [`MARKER`]) on a
/// `berth-dispatcher` process exporting to a loopback collector, in the
/// caller's trace, to its first turn's end, then stops it.
pub(crate) async fn traced_session(
    mut request: pb::CreateSessionRequest,
    o: Options<'_>,
) -> anyhow::Result<Traced> {
    let Options {
        env,
        model_key,
        approve,
        agent_signals,
    } = o;
    let collector = Collector::start().await?;
    let tag = uuid::Uuid::new_v4().simple().to_string()[..10].to_string();
    let (database, database_url) = create_database(&tag).await?;
    let listen = free_addr()?;
    let endpoint = collector.endpoint();
    let otel = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        // Export within a fraction of a second (the default waits 5 s).
        ("OTEL_BSP_SCHEDULE_DELAY", "200"),
    ];
    let env: Vec<(&str, &str)> = otel.iter().chain(env).copied().collect();
    let mut dispatcher = ProcessDispatcher::start(&database_url, listen, &env)?;
    let result = async {
        let mut client = dispatcher.client().await?;
        if let Some(key) = model_key {
            // The key goes in the vault: the agent reaches the model API
            // through the gateway only.
            let api = berth_tests::Api::new(
                tonic::transport::Endpoint::from_shared(format!("http://{listen}"))?.connect_lazy(),
                berth_tests::Bearer::default(),
            );
            let secret = crate::access::model_key_secret(api, key).await?;
            if let Some(spec) = request.spec.as_mut() {
                spec.vault_ids.push(secret.name);
            }
        }
        let mut request = tonic::Request::new(request);
        request.metadata_mut().insert(
            "traceparent",
            format!("00-{TRACE_ID}-{CLIENT_SPAN}-01").parse()?,
        );
        let session = client.create_session(request).await?.into_inner();
        if approve {
            allow_the_first_ask(&mut client, &session.name).await?;
        }
        let events = until_turn_ends(&mut client, &session.name, 0).await?;
        // An HTTP call joins the caller's trace too (its `traceparent` header).
        let http = http_get(listen, &format!("/v1/{}", session.name)).await?;
        anyhow::ensure!(http.starts_with("HTTP/1.1 200"), "GET the session: {http}");
        let agent_traceparent = agent_env(&session.id, "TRACEPARENT").await?;
        let agent_otlp = agent_env(&session.id, "OTEL_EXPORTER_OTLP_ENDPOINT").await?;
        // A run's spans end with the run.
        stop_and_wait(&mut client, &session.name).await?;
        let spans = collector
            .wait_for(Duration::from_secs(30), "ended run spans", |spans| {
                ["agent.first_line", "session.run", "node.session"]
                    .iter()
                    .all(|n| spans.iter().any(|s| s.trace_id == TRACE_ID && s.name == *n))
            })
            .await?;
        let exports = agent_exports(&collector, &session.id, agent_signals, &dispatcher).await?;
        anyhow::Ok(Traced {
            exports,
            agent_otlp,
            spans: spans
                .into_iter()
                .filter(|s| s.trace_id == TRACE_ID)
                .collect(),
            events,
            agent_traceparent,
            session_id: session.id,
            log: dispatcher.log(),
        })
    }
    .await;
    // Off the async workers: the collector takes its last spans meanwhile.
    tokio::task::block_in_place(|| dispatcher.stop());
    collector.stop().await;
    drop_database(&database).await?;
    result
}

/// Waits for the agent's first permission request, and allows it in the
/// caller's trace.
async fn allow_the_first_ask(
    client: &mut SessionsClient<berth_tests::Api>,
    name: &str,
) -> anyhow::Result<()> {
    let asked = collect_until(client, name, 0, Duration::from_secs(60), |e| {
        e.r#type == "agent.tool_permission"
    })
    .await?;
    let ask: serde_json::Value = asked
        .last()
        .map(|e| serde_json::from_str(&e.payload_json))
        .transpose()?
        .unwrap_or_default();
    let mut answer = tonic::Request::new(pb::ConfirmToolRequest {
        name: name.into(),
        tool_use_id: ask["tool_use_id"].as_str().unwrap_or_default().into(),
        decision: pb::ToolDecision::Allow as i32,
        ..Default::default()
    });
    answer.metadata_mut().insert(
        "traceparent",
        format!("00-{TRACE_ID}-{CLIENT_SPAN}-01").parse()?,
    );
    client.confirm_tool(answer).await?;
    Ok(())
}

/// The agent's own exports for `session_id`, once each of `signals` has
/// arrived (within 30 s); none when no signal is awaited.
async fn agent_exports(
    collector: &Collector,
    session_id: &str,
    signals: &[&str],
    dispatcher: &ProcessDispatcher,
) -> anyhow::Result<Vec<Export>> {
    if signals.is_empty() {
        return Ok(Vec::new());
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let got: Vec<Export> = collector
            .exports()
            .into_iter()
            .filter(|e| e.attribute("berth.session_id") == Some(session_id))
            .collect();
        if signals
            .iter()
            .all(|signal| got.iter().any(|e| e.signal == *signal))
        {
            return Ok(got);
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "not every signal of {signals:?} of the agent reached the collector; exports: {:?}\n{}",
            collector.exports(),
            dispatcher.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// An HTTP/1.1 GET of `path` on the dispatcher's API port, in the caller's
/// trace: the status line and the body.
async fn http_get(addr: std::net::SocketAddr, path: &str) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut conn = tokio::net::TcpStream::connect(addr).await?;
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\ntraceparent: 00-{TRACE_ID}-{CLIENT_SPAN}-01\r\nConnection: close\r\n\r\n"
    );
    conn.write_all(request.as_bytes()).await?;
    let mut answer = String::new();
    conn.read_to_string(&mut answer).await?;
    Ok(answer)
}

/// A variable of the session's agent process, as its container's `/proc`
/// shows it (empty when no process has it).
async fn agent_env(session_id: &str, name: &str) -> anyhow::Result<String> {
    let label = format!("berth.session={session_id}");
    let containers = berth_tests::containers_labelled(&[label]).await?;
    let container = containers
        .first()
        .ok_or_else(|| anyhow::anyhow!("no container for session {session_id}"))?;
    let script = format!(
        "for f in /proc/[0-9]*/environ; do tr '\\0' '\\n' < $f 2>/dev/null; done | sed -n 's/^{name}=//p' | head -1"
    );
    Ok(berth_tests::exec_output(container, &["sh", "-c", &script])
        .await?
        .trim()
        .to_string())
}

/// What every traced session shows, whatever its agent.
fn check_session(t: &Traced) -> anyhow::Result<()> {
    check_trace(&t.spans, &t.session_id)?;
    // Every event names the trace: the message, the statuses, the claim,
    // the agent's events, the usage (written in the turn's span).
    for kind in ["user.message", "agent.message", "session.usage"] {
        anyhow::ensure!(t.events.iter().any(|e| e.r#type == kind), "no {kind} event");
    }
    for e in &t.events {
        assert_eq!(
            e.trace_id, TRACE_ID,
            "{} (seq {}) carries its trace id",
            e.r#type, e.seq
        );
    }
    // The agent was started in the trace: its TRACEPARENT names the
    // agent's start span.
    let start = one(&t.spans, "agent.start")?;
    assert_eq!(
        t.agent_traceparent,
        format!("00-{TRACE_ID}-{}-01", start.span_id),
        "the agent's TRACEPARENT"
    );
    // The JSON log lines about the session carry its trace.
    let traced = t.log.lines().any(|l| {
        serde_json::from_str::<serde_json::Value>(l).is_ok_and(|v| {
            v["trace_id"] == TRACE_ID && v["span"]["session_id"] == t.session_id.as_str()
        })
    });
    assert!(
        traced,
        "no JSON log line carries the trace and the session:\n{}",
        t.log
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_is_one_trace_from_the_api_call_to_the_agent() -> anyhow::Result<()> {
    // The file's text (the tool's input) holds the marker too.
    let request = fake_session(&format!("edit notes.txt {MARKER}"));
    let t = traced_session(
        request,
        Options {
            approve: true,
            ..Options::default()
        },
    )
    .await?;
    check_session(&t)?;
    // The wait for the person's answer is a span of the turn.
    let turn = one(&t.spans, "session.turn")?;
    let wait = one(&t.spans, "tool.approval_wait")?;
    assert_eq!(
        wait.parent_span_id, turn.span_id,
        "the approval wait is the turn's"
    );
    assert_eq!(wait.attribute("tool"), Some("Write"));
    let confirm = one(&t.spans, "/berth.v1.Sessions/ConfirmTool")?;
    assert!(
        wait.end_unix_nano >= confirm.start_unix_nano,
        "the wait lasts until the answer comes"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_cli_session_is_one_trace_from_the_api_call_to_the_agent() -> anyhow::Result<()> {
    // The model API on the host, reached through the node's gateway.
    let key = format!("sk-ant-api03-{}", uuid::Uuid::new_v4().simple());
    let model = crate::access::ModelApi::start(&key)?;
    let model_url = format!("http://{}", model.addr);
    let mut request = crate::claude::claude_session(&format!("Say hello {MARKER}"));
    if let Some(spec) = request.spec.as_mut() {
        // No stand-in key: the gateway's is the only one.
        spec.env.clear();
    }
    let env = [("BERTH_MODEL_API_URL", model_url.as_str())];
    let t = traced_session(
        request,
        Options {
            env: &env,
            model_key: Some(&key),
            ..Options::default()
        },
    )
    .await?;
    check_session(&t)?;
    // Each model request the CLI made through the gateway is a span of
    // the turn's trace (the first message's: the create call).
    let create = one(&t.spans, "/berth.v1.Sessions/CreateSession")?;
    let requests: Vec<&Span> = t
        .spans
        .iter()
        .filter(|s| s.name == "gateway.model_request")
        .collect();
    assert!(!requests.is_empty(), "no gateway.model_request span");
    for r in requests {
        assert_eq!(
            r.parent_span_id, create.span_id,
            "a model request joins its turn"
        );
        assert_eq!(r.attribute("session_id"), Some(t.session_id.as_str()));
        assert_eq!(r.attribute("http.response.status_code"), Some("200"));
        for (k, v) in &r.attributes {
            assert!(!v.contains(&key), "span attribute {k} holds the model key");
        }
    }
    drop(model);
    Ok(())
}

/// The spans form one tree under the client's span, with the expected
/// parents, and none carries the message text.
fn check_trace(trace: &[Span], session_id: &str) -> anyhow::Result<()> {
    let by_id: HashMap<&str, &Span> = trace.iter().map(|s| (s.span_id.as_str(), s)).collect();
    // The one span `name`, whose parent is the span `parent` (an id).
    let child = |name: &str, parent: &str, why: &str| -> anyhow::Result<&Span> {
        let s = one(trace, name)?;
        anyhow::ensure!(
            s.parent_span_id == parent,
            "{name}: {why} (its parent is {}, not {parent})",
            s.parent_span_id
        );
        Ok(s)
    };
    let create = child(
        "/berth.v1.Sessions/CreateSession",
        CLIENT_SPAN,
        "the API call joins the caller's trace",
    )?;
    assert_eq!(create.service, "berth-dispatcher");
    let get = child(
        "HTTP GET",
        CLIENT_SPAN,
        "an HTTP call joins the caller's trace",
    )?;
    assert_eq!(
        get.attribute("url.path"),
        Some(format!("/v1/sessions/{session_id}").as_str())
    );
    let queue = child(
        "session.queue_wait",
        &create.span_id,
        "the wait follows the create",
    )?;
    assert_eq!(queue.attribute("session_id"), Some(session_id));
    let run = child(
        "session.run",
        &create.span_id,
        "the run joins the create call",
    )?;
    assert_eq!(run.attribute("session_id"), Some(session_id));
    let place = child("session.place", &run.span_id, "placement is the run's")?;
    // The node's side: its call span (from gRPC metadata), its session (from
    // the Start frame), the agent's start, and the first line.
    child(
        "/berth.node.v1.AgentServer/RunSession",
        &place.span_id,
        "the node call joins placement",
    )?;
    let node_session = child(
        "node.session",
        &place.span_id,
        "the node's run joins placement",
    )?;
    assert!(
        node_session
            .attribute("node")
            .is_some_and(|n| !n.is_empty())
    );
    let start = child(
        "agent.start",
        &node_session.span_id,
        "the node's run starts the agent",
    )?;
    let first_line = child(
        "agent.first_line",
        &create.span_id,
        "the first message was sent in the create call",
    )?;
    let turn = child(
        "session.turn",
        &create.span_id,
        "the first turn is the create call's",
    )?;
    // The turn's end is committed with its usage, inside the turn.
    assert!(
        trace
            .iter()
            .any(|s| s.name == "events.persist" && s.parent_span_id == turn.span_id),
        "no events.persist span in the turn"
    );
    assert!(
        first_line.start_unix_nano >= start.start_unix_nano,
        "the first line comes after the agent's start"
    );
    // No gap: every span's parent is in the trace, or is the caller's.
    for s in trace {
        assert!(
            s.parent_span_id == CLIENT_SPAN || by_id.contains_key(s.parent_span_id.as_str()),
            "span {} has a parent outside the trace",
            s.name
        );
        for (k, v) in &s.attributes {
            assert!(
                !v.contains(MARKER),
                "span {} attribute {k} holds the message",
                s.name
            );
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sampler_variable_decides_which_traces_are_exported() -> anyhow::Result<()> {
    let collector = Collector::start().await?;
    let tag = uuid::Uuid::new_v4().simple().to_string()[..10].to_string();
    let (database, database_url) = create_database(&tag).await?;
    let endpoint = collector.endpoint();
    let env = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        ("OTEL_BSP_SCHEDULE_DELAY", "200"),
        ("OTEL_TRACES_SAMPLER", "always_off"),
    ];
    let mut dispatcher = ProcessDispatcher::start(&database_url, free_addr()?, &env)?;
    let result = async {
        let mut client = dispatcher.client().await?;
        let mut request = tonic::Request::new(fake_session("hello"));
        request.metadata_mut().insert(
            "traceparent",
            format!("00-{TRACE_ID}-{CLIENT_SPAN}-01").parse()?,
        );
        let session = client.create_session(request).await?.into_inner();
        let events = until_turn_ends(&mut client, &session.name, 0).await?;
        stop_and_wait(&mut client, &session.name).await?;
        // Not sampled, the context still travels: the events name the
        // caller's trace, for a log search.
        assert!(events.iter().all(|e| e.trace_id == TRACE_ID), "{events:?}");
        anyhow::Ok(())
    }
    .await;
    // Stopped: whatever it buffered is flushed before it exits.
    tokio::task::block_in_place(|| dispatcher.stop());
    let spans = collector.spans();
    collector.stop().await;
    drop_database(&database).await?;
    result?;
    assert!(
        spans.is_empty(),
        "always_off exported {} spans",
        spans.len()
    );
    Ok(())
}
