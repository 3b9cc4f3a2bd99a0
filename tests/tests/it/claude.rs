//! The real Claude Code CLI (from the pinned claude-agent-sdk wheel) run by
//! berth in a container, against `fake-anthropic` on the container's own
//! loopback (`deploy/test-image/build-claude.sh`). Containers run with
//! `--container-network none`: nothing leaves them.

use std::time::Duration;

use berth_proto::v1::{self as pb, sessions_client::SessionsClient};
use berth_tests::*;
use tonic::transport::Channel;

/// The real-CLI image.
const CLAUDE_IMAGE: &str = "berth-test-claude:latest";
/// A model the CLI knows the price of, so it reports a cost.
const MODEL: &str = "claude-sonnet-4-5";

async fn cluster() -> anyhow::Result<TestCluster> {
    TestCluster::builder()
        .nodes(1)
        .configure_node(|_, cfg, _| {
            // The stand-in is the container's main process.
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
        })
        .start()
        .await
}

fn claude_session(first: &str) -> pb::CreateSessionRequest {
    pb::CreateSessionRequest {
        spec: Some(pb::SessionSpec {
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
    c: &mut SessionsClient<Channel>,
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
