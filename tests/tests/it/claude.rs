//! The real Claude Code CLI (from the pinned claude-agent-sdk wheel) run by
//! berth in a container, against `fake-anthropic` on the container's own
//! loopback (`deploy/test-image/build-claude.sh`). Containers run with
//! `--container-network none`: nothing leaves them.

use std::time::Duration;

use berth_proto::v1::{self as pb, sessions_client::SessionsClient};
use berth_tests::*;

/// The real-CLI image.
const CLAUDE_IMAGE: &str = "berth-test-claude:latest";
/// A model the CLI knows the price of, so it reports a cost.
const MODEL: &str = "claude-sonnet-4-5";

pub(crate) async fn cluster() -> anyhow::Result<TestCluster> {
    cluster_of(1).await
}

pub(crate) async fn cluster_of(nodes: usize) -> anyhow::Result<TestCluster> {
    builder(nodes).start().await
}

/// A cluster of `nodes` whose containers serve fake-anthropic, to start.
pub(crate) fn builder(nodes: usize) -> berth_tests::Builder {
    TestCluster::builder()
        .nodes(nodes)
        .configure_node(|_, cfg, _| claude_node(cfg))
}

/// A node whose containers serve fake-anthropic on their own loopback (the
/// container's main process), with no network.
pub(crate) fn claude_node(cfg: &mut berth_agent_server::Config) {
    cfg.keepalive_cmd = [
        "fake-anthropic",
        "--listen",
        "127.0.0.1:8787",
        "--log",
        "/tmp/anthropic-requests.jsonl",
    ]
    .map(String::from)
    .to_vec();
    cfg.container_network = "none".into();
}

pub(crate) fn claude_session(first: &str) -> pb::CreateSessionRequest {
    pb::CreateSessionRequest {
        spec: Some(pb::AgentSpec {
            image: CLAUDE_IMAGE.into(),
            runtime: pb::Runtime::ClaudeCode as i32,
            model: MODEL.into(),
            // Edits without a person to approve them (until tool approvals).
            runtime_args: ["--permission-mode", "acceptEdits"]
                .map(String::from)
                .to_vec(),
            // The stand-in takes any key; it is not a credential.
            env: [("ANTHROPIC_API_KEY".to_string(), "stand-in".to_string())].into(),
            ..Default::default()
        }),
        initial_message: first.into(),
        ..Default::default()
    }
}

/// The `result` lines of a session, as the CLI wrote them.
async fn results(
    c: &mut SessionsClient<berth_tests::Api>,
    name: &str,
) -> anyhow::Result<Vec<serde_json::Value>> {
    let events = events_of(c, name).await?;
    events
        .iter()
        .filter(|e| e.r#type == "agent.result")
        .map(|e| Ok(serde_json::from_slice(&e.raw)?))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_real_cli_runs_turns_and_tools_and_berth_bills_its_own_totals() -> anyhow::Result<()> {
    let cluster = cluster().await?;
    let mut c = cluster.client();
    let s = c
        .create_session(claude_session("say hello from the real CLI"))
        .await?
        .into_inner();
    let first = reply_after(&mut c, &s.name, 0).await?;
    assert!(first.contains("hello from the real CLI"), "{first}");

    // A tool call the CLI really executes in the container, then reads back.
    turn(
        &mut c,
        &s.name,
        "write /workspace/note.txt written by claude",
    )
    .await?;
    let read = turn(&mut c, &s.name, "read /workspace/note.txt").await?;
    assert!(read.contains("written by claude"), "{read}");

    // Cost and tokens: the session's are the CLI's own running totals after
    // its last turn (sub-agents included), never the sum of running totals.
    let results = results(&mut c, &s.name).await?;
    assert_eq!(results.len(), 3, "one result per turn");
    let last = results.last().expect("a result");
    let total_cost = last["total_cost_usd"].as_f64().expect("total_cost_usd");
    let total_in: i64 = last["modelUsage"]
        .as_object()
        .expect("modelUsage")
        .values()
        .map(|m| m["inputTokens"].as_i64().unwrap_or(0))
        .sum();
    let session = get(&mut c, &s.name).await?;
    let usage = session.usage.expect("usage");
    assert_eq!(usage.turns, 3);
    assert!(
        (usage.cost_usd - total_cost).abs() < 1e-9,
        "berth bills {} for a conversation the CLI says cost {total_cost}",
        usage.cost_usd
    );
    assert_eq!(usage.input_tokens, total_in);
    // Each turn is the rise of the running total.
    let turns: Vec<f64> = events_of(&mut c, &s.name)
        .await?
        .iter()
        .filter(|e| e.r#type == "session.usage")
        .map(|e| payload(e)["turn"]["cost_usd"].as_f64().unwrap_or(-1.0))
        .collect();
    let mut before = 0.0;
    for (turn, result) in turns.iter().zip(&results) {
        let now = result["total_cost_usd"].as_f64().unwrap_or(0.0);
        assert!(
            (turn - (now - before)).abs() < 1e-9,
            "turn {turn} vs rise {}",
            now - before
        );
        before = now;
    }
    stop_and_wait(&mut c, &s.name).await?;
    cluster.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_budget_stops_the_real_cli_at_the_turn_that_reaches_it() -> anyhow::Result<()> {
    let cluster = cluster().await?;
    let mut c = cluster.client();
    // Each turn here costs about $0.00016; the running total passes $0.0004
    // at the third turn. Summing running totals would stop at the second.
    let mut req = claude_session("say one");
    req.budget_usd = 0.0004;
    let s = c.create_session(req).await?.into_inner();
    reply_after(&mut c, &s.name, 0).await?;
    turn(&mut c, &s.name, "say two").await?;
    let after_two = get(&mut c, &s.name).await?;
    assert_eq!(
        after_two.status,
        pb::SessionStatus::Idle as i32,
        "stopped early: {after_two:?}"
    );
    c.send_message(pb::SendMessageRequest {
        name: s.name.clone(),
        text: "say three".into(),
        ..Default::default()
    })
    .await?;
    let stopped = wait_for_status(
        &mut c,
        &s.name,
        pb::SessionStatus::Stopped,
        Duration::from_secs(60),
    )
    .await?;
    assert_eq!(stopped.status_reason, "budget");
    assert_eq!(stopped.usage.expect("usage").turns, 3);
    cluster.shutdown().await
}

/// The last `result` line's own figures: `total_cost_usd`, and per model
/// (input tokens, output tokens, cost) from `modelUsage`.
fn cli_totals(result: &serde_json::Value) -> (f64, Vec<(String, i64, i64, f64)>) {
    let mut models: Vec<(String, i64, i64, f64)> = result["modelUsage"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| {
                    (
                        k.clone(),
                        v["inputTokens"].as_i64().unwrap_or(-1),
                        v["outputTokens"].as_i64().unwrap_or(-1),
                        v["costUSD"].as_f64().unwrap_or(-1.0),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    models.sort_by(|a, b| a.0.cmp(&b.0));
    (result["total_cost_usd"].as_f64().unwrap_or(-1.0), models)
}

/// berth's usage for a session equals the CLI's own running totals after
/// its last result: in all and per model. (The CLI may add a result of its
/// own at any time, e.g. when a background sub-agent ends: the session, its
/// events and the CLI's lines are compared once they agree on the count.)
async fn assert_billed_as_the_cli_says(
    c: &mut SessionsClient<berth_tests::Api>,
    name: &str,
) -> anyhow::Result<pb::Usage> {
    let mut attempts = 0;
    let (results, usage) = loop {
        let results = results(c, name).await?;
        let usage = get(c, name).await?.usage.unwrap_or_default();
        if usage.turns as usize == results.len() || attempts == 50 {
            break (results, usage);
        }
        attempts += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(
        usage.turns as usize,
        results.len(),
        "one turn per result line"
    );
    let last = results.last().expect("a result");
    let (total, by_model) = cli_totals(last);
    assert!(
        (usage.cost_usd - total).abs() < 1e-9,
        "berth bills {}, the CLI says {total}",
        usage.cost_usd
    );
    let mut ours: Vec<(String, i64, i64, f64)> = usage
        .models
        .iter()
        .map(|m| (m.model.clone(), m.input_tokens, m.output_tokens, m.cost_usd))
        .collect();
    ours.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(ours.len(), by_model.len(), "{ours:?} vs {by_model:?}");
    for (a, b) in ours.iter().zip(&by_model) {
        assert_eq!((&a.0, a.1, a.2), (&b.0, b.1, b.2));
        assert!((a.3 - b.3).abs() < 1e-9, "{}: {} vs {}", a.0, a.3, b.3);
    }
    Ok(usage)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_real_cli_is_interrupted_mid_stream_and_goes_on() -> anyhow::Result<()> {
    let cluster = cluster().await?;
    let mut c = cluster.client();
    let s = idle_session(&mut c, claude_session("say ready")).await?;
    // 40 deltas 200 ms apart: eight seconds of streaming, cut short.
    let seq = send(&mut c, &s.name, "slow 40").await?;
    wait_for_status(
        &mut c,
        &s.name,
        pb::SessionStatus::Running,
        Duration::from_secs(30),
    )
    .await?;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    c.interrupt(pb::InterruptRequest {
        name: s.name.clone(),
    })
    .await?;
    let reply = reply_after(&mut c, &s.name, seq).await?;
    let slows = reply.matches("slow").count();
    assert!(slows < 40, "the stream was not cut: {slows} deltas");
    let events = events_of(&mut c, &s.name).await?;
    assert!(events.iter().any(|e| e.r#type == "user.interrupt"));
    assert!(
        events.iter().any(|e| e.r#type == "runtime.system"
            && payload(e)["text"]
                .as_str()
                .is_some_and(|t| t.contains("interrupted"))),
        "the CLI's interruption notice is an event"
    );
    // The conversation goes on, and is billed as the CLI says.
    assert_eq!(turn(&mut c, &s.name, "say after").await?, "after");
    assert_billed_as_the_cli_says(&mut c, &s.name).await?;
    stop_and_wait(&mut c, &s.name).await?;
    cluster.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_real_cli_resumes_on_another_node_with_files_and_conversation()
-> anyhow::Result<()> {
    let cluster = cluster_of(2).await?;
    let mut c = cluster.client();
    let mut nodes = cluster.nodes_client();
    let s = idle_session(
        &mut c,
        claude_session("write /workspace/kept.txt before the pause"),
    )
    .await?;
    turn(&mut c, &s.name, "say second turn").await?;
    let first = get(&mut c, &s.name).await?;
    c.pause_session(pb::PauseSessionRequest {
        name: s.name.clone(),
    })
    .await?;
    wait_for_status(
        &mut c,
        &s.name,
        pb::SessionStatus::Paused,
        Duration::from_secs(60),
    )
    .await?;
    nodes
        .drain_node(pb::DrainNodeRequest {
            node: first.node.clone(),
        })
        .await?;
    c.resume_session(pb::ResumeSessionRequest {
        name: s.name.clone(),
    })
    .await?;
    let read = turn(&mut c, &s.name, "read /workspace/kept.txt").await?;
    if !read.contains("before the pause") {
        for l in agent_lines(&events_of(&mut c, &s.name).await?) {
            eprintln!(
                "{}",
                String::from_utf8_lossy(&l)
                    .chars()
                    .take(400)
                    .collect::<String>()
            );
        }
    }
    assert!(
        read.contains("before the pause"),
        "the file was kept: {read}"
    );
    let resumed = get(&mut c, &s.name).await?;
    assert_ne!(resumed.node, first.node, "resumed on the other node");
    // After --resume the Messages stand-in is sent the earlier turns.
    let recall = turn(&mut c, &s.name, "recall").await?;
    for earlier in [
        "write /workspace/kept.txt before the pause",
        "say second turn",
    ] {
        assert!(
            recall.contains(earlier),
            "the CLI lost `{earlier}`: {recall}"
        );
    }
    // The running totals continue across --resume: no turn is billed twice.
    assert_billed_as_the_cli_says(&mut c, &s.name).await?;
    stop_and_wait(&mut c, &s.name).await?;
    cluster.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sub_agent_on_a_second_model_is_billed_per_model() -> anyhow::Result<()> {
    let cluster = cluster().await?;
    let mut c = cluster.client();
    let s = c
        .create_session(claude_session("task from the sub-agent"))
        .await?
        .into_inner();
    // The CLI runs the sub-agent in the background and reports on it in a
    // turn of its own: wait until both models are billed.
    let mut usage = pb::Usage::default();
    for _ in 0..150 {
        usage = get(&mut c, &s.name).await?.usage.unwrap_or_default();
        if usage.models.len() >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(usage.models.len(), 2, "{usage:?}");
    wait_for_status(
        &mut c,
        &s.name,
        pb::SessionStatus::Idle,
        Duration::from_secs(30),
    )
    .await?;
    let events = events_of(&mut c, &s.name).await?;
    assert_lines_well_formed(&events);
    // The sub-agent's own blocks carry the Task call they belong to.
    let task = events
        .iter()
        .find(|e| e.r#type == "agent.tool_use" && payload(e)["name"] == "Task")
        .expect("the Task call");
    let task_id = payload(task)["tool_use_id"].clone();
    assert!(
        events.iter().any(|e| e.r#type == "agent.message"
            && payload(e)["parent_tool_use_id"] == task_id
            && payload(e)["text"]
                .as_str()
                .is_some_and(|t| t.contains("sub from the sub-agent"))),
        "no sub-agent message"
    );
    let usage = assert_billed_as_the_cli_says(&mut c, &s.name).await?;
    assert!(
        usage.models.iter().any(|m| m.model.contains("haiku")),
        "{usage:?}"
    );
    // The turn that ran the sub-agent lists both models.
    assert!(events.iter().any(|e| {
        e.r#type == "session.usage"
            && payload(e)["turn"]["models"]
                .as_array()
                .is_some_and(|m| m.len() == 2)
    }));
    stop_and_wait(&mut c, &s.name).await?;
    cluster.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_errors_surface_as_events_and_cost_nothing_extra() -> anyhow::Result<()> {
    let cluster = cluster().await?;
    let mut c = cluster.client();
    let mut req = claude_session("say before");
    // One retry, so the error surfaces in a second rather than minutes.
    if let Some(spec) = req.spec.as_mut() {
        spec.env
            .insert("CLAUDE_CODE_MAX_RETRIES".into(), "1".into());
    }
    let s = c.create_session(req).await?.into_inner();
    reply_after(&mut c, &s.name, 0).await?;
    for code in ["429", "500", "529"] {
        let seq = send(&mut c, &s.name, &format!("fail {code}")).await?;
        let reply = reply_after(&mut c, &s.name, seq).await?;
        assert!(
            reply.contains(code),
            "the CLI's error names {code}: {reply}"
        );
        let events = events_of(&mut c, &s.name).await?;
        let turn: Vec<&pb::Event> = events.iter().filter(|e| e.seq > seq).collect();
        assert!(
            turn.iter()
                .any(|e| e.r#type == "runtime.system" && payload(e)["subtype"] == "api_retry"),
            "{code}: the retry is an event"
        );
        let result = turn
            .iter()
            .find(|e| e.r#type == "agent.result")
            .expect("a result");
        assert_eq!(payload(result)["is_error"], true, "{code}");
    }
    assert_eq!(turn(&mut c, &s.name, "say after").await?, "after");
    // A failed turn restates the running totals: it adds nothing.
    assert_billed_as_the_cli_says(&mut c, &s.name).await?;
    stop_and_wait(&mut c, &s.name).await?;
    cluster.shutdown().await
}

/// The real CLI rides through the loss of its dispatcher: killed mid-turn
/// (as `kill -9`), the next owner re-attaches to the same CLI process and
/// the turn ends with its reply, billed once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_real_cli_keeps_its_turn_when_its_dispatcher_is_killed() -> anyhow::Result<()> {
    let mut cluster = cluster().await?;
    let mut killable = cluster.add_killable_dispatcher("claude-killable").await?;
    cluster.sigterm_dispatcher().await?;
    let s = idle_session(&mut killable.client, claude_session("say ready")).await?;
    let mut other = cluster.add_dispatcher().await?;
    // 20 deltas 200 ms apart: four seconds of streaming.
    let seq = send(&mut other, &s.name, "slow 20").await?;
    wait_for_status(
        &mut other,
        &s.name,
        pb::SessionStatus::Running,
        Duration::from_secs(30),
    )
    .await?;
    let before = containers_of(&s.id).await?;
    assert_eq!(before.len(), 1);
    killable.kill();
    let reply = reply_after(&mut other, &s.name, seq).await?;
    assert_eq!(
        reply.matches("slow").count(),
        20,
        "the turn was cut: {reply}"
    );
    let events = events_of(&mut other, &s.name).await?;
    assert!(!events.iter().any(|e| e.r#type == "session.turn_lost"));
    assert_eq!(
        containers_of(&s.id).await?,
        before,
        "the CLI went on in the same container"
    );
    let results: Vec<&pb::Event> = events
        .iter()
        .filter(|e| e.r#type == "agent.result")
        .collect();
    assert_eq!(results.len(), 2);
    assert_billed_as_the_cli_says(&mut other, &s.name).await?;
    stop_and_wait(&mut other, &s.name).await?;
    drop(killable);
    cluster.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_real_cli_caps_its_output_tokens_as_the_run_parameters_say() -> anyhow::Result<()> {
    let cluster = cluster().await?;
    let mut c = cluster.client();
    let mut req = claude_session("say capped");
    req.run_params = Some(pb::RunParams {
        max_output_tokens: Some(2048),
        ..Default::default()
    });
    let s = c.create_session(req).await?.into_inner();
    let reply = reply_after(&mut c, &s.name, 0).await?;
    assert!(reply.contains("capped"), "{reply}");
    // What the CLI sent the model API: the cap, on every request.
    let containers = containers_of(&s.id).await?;
    let sent = exec_output(&containers[0], &["cat", "/tmp/anthropic-requests.jsonl"]).await?;
    let caps: Vec<i64> = sent
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|r| {
            let body = r.get("body").cloned().unwrap_or(r);
            body["max_tokens"].as_i64()
        })
        .collect();
    assert!(
        !caps.is_empty() && caps.iter().all(|&n| n == 2048),
        "{caps:?}"
    );
    // The CLI takes no temperature: refused, naming the field.
    let mut req = claude_session("say warm");
    req.run_params = Some(pb::RunParams {
        temperature: Some(0.5),
        ..Default::default()
    });
    let err = c.create_session(req).await.expect_err("no temperature");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("run_params.temperature"), "{err:?}");
    stop_and_wait(&mut c, &s.name).await?;
    cluster.shutdown().await
}
