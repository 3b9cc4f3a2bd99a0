//! Human in the loop: tool permission requests of the real Claude Code CLI
//! (and of fake-claude, which asks the same way) answered by a person, by a
//! second dispatcher, by the policy's timeout, and across a pause.

use std::time::Duration;

use berth_proto::v1::{self as pb, sessions_client::SessionsClient};
use berth_tests::*;

use super::claude::{claude_session, cluster};

/// A real-CLI session under a tool policy (no `--permission-mode` in its
/// runtime args: the policy's mode is the one in force).
fn asking(first: &str, policy: pb::ToolPolicy) -> pb::CreateSessionRequest {
    let mut req = claude_session(first);
    if let Some(spec) = req.spec.as_mut() {
        spec.runtime_args.clear();
        spec.tool_policy = Some(policy);
    }
    req
}

fn policy(timeout_s: i64, on_timeout: pb::ToolDecision) -> pb::ToolPolicy {
    pb::ToolPolicy {
        confirmation_timeout: Some(prost_types::Duration {
            seconds: timeout_s,
            nanos: 0,
        }),
        timeout_decision: on_timeout as i32,
        ..Default::default()
    }
}

/// Waits for the next `agent.tool_permission` after `after`; its payload.
async fn permission_after(
    c: &mut SessionsClient<Api>,
    name: &str,
    after: i64,
) -> anyhow::Result<(i64, serde_json::Value)> {
    let events = collect_until(c, name, after, Duration::from_secs(60), |e| {
        e.r#type == "agent.tool_permission"
    })
    .await?;
    let e = events.last().expect("the awaited event");
    Ok((e.seq, payload(e)))
}

async fn confirm(
    c: &mut SessionsClient<Api>,
    name: &str,
    tool_use_id: &str,
    decision: pb::ToolDecision,
    message: &str,
) -> Result<pb::ConfirmToolResponse, tonic::Status> {
    c.confirm_tool(pb::ConfirmToolRequest {
        name: name.into(),
        tool_use_id: tool_use_id.into(),
        decision: decision as i32,
        message: message.into(),
        ..Default::default()
    })
    .await
    .map(tonic::Response::into_inner)
}

/// The agent's reply once the turn that started before `after` ends.
async fn reply_to_turn(
    c: &mut SessionsClient<Api>,
    name: &str,
    after: i64,
) -> anyhow::Result<String> {
    reply_after(c, name, after).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_person_approves_one_edit_of_the_real_cli_and_denies_another() -> anyhow::Result<()> {
    let cluster = cluster().await?;
    let mut c = cluster.client();
    let s = c
        .create_session(asking(
            "write /workspace/approved.txt approved content",
            policy(120, pb::ToolDecision::Deny),
        ))
        .await?
        .into_inner();
    let (asked, p) = permission_after(&mut c, &s.name, 0).await?;
    assert_eq!(p["tool_name"], "Write", "{p}");
    assert_eq!(p["input"]["content"], "approved content", "{p}");
    let tool_use_id = p["tool_use_id"].as_str().unwrap_or_default().to_string();

    // The session waits for a person, and says for what.
    let waiting = wait_for_session(&mut c, &s.name, Duration::from_secs(10), "waiting", |s| {
        s.activity == pb::Activity::WaitingInput as i32
    })
    .await?;
    assert_eq!(waiting.pending_tool_requests.len(), 1);
    assert_eq!(waiting.pending_tool_requests[0].tool_use_id, tool_use_id);
    assert_eq!(waiting.pending_tool_requests[0].seq, asked);
    let listed = c
        .list_sessions(pb::ListSessionsRequest {
            activity: pb::Activity::WaitingInput as i32,
            ..Default::default()
        })
        .await?
        .into_inner()
        .sessions;
    assert!(listed.iter().any(|l| l.id == s.id), "listed as waiting");

    // Bad answers: precise errors, nothing logged.
    let unknown = confirm(&mut c, &s.name, "toolu_nope", pb::ToolDecision::Allow, "")
        .await
        .expect_err("no such request");
    assert_eq!(unknown.code(), tonic::Code::FailedPrecondition);
    assert!(unknown.message().contains("tool_use_id"), "{unknown:?}");
    let no_decision = confirm(
        &mut c,
        &s.name,
        &tool_use_id,
        pb::ToolDecision::Unspecified,
        "",
    )
    .await
    .expect_err("a decision is required");
    assert_eq!(no_decision.code(), tonic::Code::InvalidArgument);
    assert!(
        no_decision.message().contains("decision"),
        "{no_decision:?}"
    );

    // Allowed: the CLI writes the file.
    let first = confirm(&mut c, &s.name, &tool_use_id, pb::ToolDecision::Allow, "").await?;
    assert!(!first.already_answered);
    let reply = reply_to_turn(&mut c, &s.name, asked).await?;
    assert!(reply.contains("File created successfully"), "{reply}");
    let read = turn(&mut c, &s.name, "read /workspace/approved.txt").await?;
    assert!(
        read.contains("approved content"),
        "the file changed: {read}"
    );
    // The same answer again is the first one; another is refused.
    let again = confirm(&mut c, &s.name, &tool_use_id, pb::ToolDecision::Allow, "").await?;
    assert!(again.already_answered);
    assert_eq!(again.seq, first.seq);
    let changed = confirm(&mut c, &s.name, &tool_use_id, pb::ToolDecision::Deny, "")
        .await
        .expect_err("another decision");
    assert_eq!(changed.code(), tonic::Code::FailedPrecondition);

    // Denied, with a reason the agent is told; the file is never written.
    let seq = send(
        &mut c,
        &s.name,
        "write /workspace/denied.txt must not exist",
    )
    .await?;
    let (_, p) = permission_after(&mut c, &s.name, seq).await?;
    let denied_id = p["tool_use_id"].as_str().unwrap_or_default().to_string();
    confirm(
        &mut c,
        &s.name,
        &denied_id,
        pb::ToolDecision::Deny,
        "not in this repository",
    )
    .await?;
    let reply = reply_to_turn(&mut c, &s.name, seq).await?;
    assert!(
        reply.contains("not in this repository"),
        "the agent was told: {reply}"
    );
    let events = events_of(&mut c, &s.name).await?;
    let result = events
        .iter()
        .find(|e| {
            e.r#type == "agent.tool_result" && payload(e)["tool_use_id"] == denied_id.as_str()
        })
        .expect("the denied call's result");
    assert_eq!(payload(result)["is_error"], true);
    let read = turn(&mut c, &s.name, "read /workspace/denied.txt").await?;
    assert!(
        !read.contains("must not exist"),
        "the file was not written: {read}"
    );

    // Every request and answer is in the log and the export, with who answered.
    let answers: Vec<serde_json::Value> = events
        .iter()
        .filter(|e| e.r#type == "user.tool_confirmation")
        .map(payload)
        .collect();
    assert_eq!(
        answers.len(),
        2,
        "one answer each, the repeat logged nothing"
    );
    assert!(
        answers.iter().all(|a| a["by"] == "user"
            && a["identity"]
                .as_str()
                .is_some_and(|i| i.starts_with("keys/"))),
        "{answers:?}"
    );
    assert!(
        events
            .iter()
            .any(|e| e.r#type == "session.activity" && payload(e)["activity"] == "waiting_input")
    );
    let md = c
        .export_session(pb::ExportSessionRequest {
            name: s.name.clone(),
            format: pb::ExportFormat::Markdown as i32,
        })
        .await?
        .into_inner()
        .content;
    assert_eq!(md.matches("**Permission asked**").count(), 2, "{md}");
    assert!(
        md.contains("**Allowed**") && md.contains("**Denied**"),
        "{md}"
    );
    assert!(md.contains("not in this repository"), "{md}");
    let idle = get(&mut c, &s.name).await?;
    assert_eq!(idle.activity, pb::Activity::Idle as i32);
    assert!(idle.pending_tool_requests.is_empty());
    stop_and_wait(&mut c, &s.name).await?;
    cluster.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unanswered_requests_of_the_real_cli_get_the_policys_decision() -> anyhow::Result<()> {
    let cluster = cluster().await?;
    let mut c = cluster.client();
    for (on_timeout, file) in [
        (pb::ToolDecision::Deny, "timeout-denied.txt"),
        (pb::ToolDecision::Allow, "timeout-allowed.txt"),
    ] {
        let s = c
            .create_session(asking(
                &format!("write /workspace/{file} left alone"),
                policy(2, on_timeout),
            ))
            .await?
            .into_inner();
        let (asked, _) = permission_after(&mut c, &s.name, 0).await?;
        // Nobody answers: the turn still ends.
        reply_to_turn(&mut c, &s.name, asked).await?;
        let events = events_of(&mut c, &s.name).await?;
        let answer = events
            .iter()
            .find(|e| e.r#type == "user.tool_confirmation")
            .map(payload)
            .expect("the timeout's answer is logged");
        assert_eq!(answer["by"], "timeout");
        let want = if on_timeout == pb::ToolDecision::Allow {
            "allow"
        } else {
            "deny"
        };
        assert_eq!(answer["decision"], want);
        assert!(
            answer["waited_s"].as_f64().unwrap_or(0.0) >= 1.9,
            "{answer}"
        );
        let read = turn(&mut c, &s.name, &format!("read /workspace/{file}")).await?;
        assert_eq!(
            read.contains("left alone"),
            on_timeout == pb::ToolDecision::Allow,
            "{file}: {read}"
        );
        stop_and_wait(&mut c, &s.name).await?;
    }
    cluster.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_dispatcher_takes_the_answer_to_the_real_clis_request() -> anyhow::Result<()> {
    let mut cluster = cluster().await?;
    let mut c = cluster.client();
    let mut other = cluster.add_dispatcher().await?;
    let s = c
        .create_session(asking(
            "write /workspace/second.txt via the other dispatcher",
            policy(120, pb::ToolDecision::Deny),
        ))
        .await?
        .into_inner();
    let (asked, p) = permission_after(&mut c, &s.name, 0).await?;
    let id = p["tool_use_id"].as_str().unwrap_or_default();
    // The other dispatcher does not own the run: the log carries the answer.
    let waiting = get(&mut other, &s.name).await?;
    assert_eq!(waiting.activity, pb::Activity::WaitingInput as i32);
    confirm(&mut other, &s.name, id, pb::ToolDecision::Allow, "").await?;
    reply_to_turn(&mut c, &s.name, asked).await?;
    let read = turn(&mut c, &s.name, "read /workspace/second.txt").await?;
    assert!(read.contains("via the other dispatcher"), "{read}");
    stop_and_wait(&mut c, &s.name).await?;
    cluster.shutdown().await
}

/// A pause closes the request (its agent process ends); on resume the turn
/// is delivered again and the agent asks again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_cli_paused_while_waiting_asks_again_after_the_resume() -> anyhow::Result<()> {
    let cluster = cluster().await?;
    let mut c = cluster.client();
    let s = c
        .create_session(asking(
            "write /workspace/after-pause.txt asked twice",
            policy(300, pb::ToolDecision::Deny),
        ))
        .await?
        .into_inner();
    let (_, p) = permission_after(&mut c, &s.name, 0).await?;
    let first_id = p["tool_use_id"].as_str().unwrap_or_default().to_string();
    c.pause_session(pb::PauseSessionRequest {
        name: s.name.clone(),
    })
    .await?;
    let paused = wait_for_status(
        &mut c,
        &s.name,
        pb::SessionStatus::Paused,
        Duration::from_secs(60),
    )
    .await?;
    assert!(paused.pending_tool_requests.is_empty());
    let events = events_of(&mut c, &s.name).await?;
    assert!(
        events
            .iter()
            .any(|e| e.r#type == "session.tool_permission_cancelled"
                && payload(e)["tool_use_id"] == first_id.as_str()),
        "the pause closed the request"
    );
    let late = confirm(&mut c, &s.name, &first_id, pb::ToolDecision::Allow, "")
        .await
        .expect_err("the request was closed");
    assert_eq!(late.code(), tonic::Code::FailedPrecondition);

    c.resume_session(pb::ResumeSessionRequest {
        name: s.name.clone(),
    })
    .await?;
    let (asked, p) = permission_after(&mut c, &s.name, paused.last_seq).await?;
    let second_id = p["tool_use_id"].as_str().unwrap_or_default();
    assert_ne!(second_id, first_id, "asked again, as a new request");
    confirm(&mut c, &s.name, second_id, pb::ToolDecision::Allow, "").await?;
    reply_to_turn(&mut c, &s.name, asked).await?;
    let read = turn(&mut c, &s.name, "read /workspace/after-pause.txt").await?;
    assert!(read.contains("asked twice"), "{read}");
    stop_and_wait(&mut c, &s.name).await?;
    cluster.shutdown().await
}

/// fake-claude asks like the real CLI: answered over Connect, "always"
/// stops the next edit asking, and an interrupt withdraws a request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fake_claude_asks_like_the_real_cli_and_connect_answers() -> anyhow::Result<()> {
    let cluster = TestCluster::builder().start().await?;
    let mut c = cluster.client();
    let s = c
        .create_session(fake_session("edit first.txt one"))
        .await?
        .into_inner();
    let (asked, p) = permission_after(&mut c, &s.name, 0).await?;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(pb::ConnectRequest {
        kind: Some(pb::connect_request::Kind::Open(pb::ConnectOpen {
            name: s.name.clone(),
            after_seq: asked,
        })),
    })
    .await?;
    let mut stream = c
        .connect(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    tx.send(pb::ConnectRequest {
        kind: Some(pb::connect_request::Kind::ToolConfirmation(
            pb::ConnectToolConfirmation {
                confirmation: Some(pb::ConfirmToolRequest {
                    tool_use_id: p["tool_use_id"].as_str().unwrap_or_default().into(),
                    decision: pb::ToolDecision::Allow as i32,
                    always: true,
                    ..Default::default()
                }),
                r#ref: "c1".into(),
            },
        )),
    })
    .await?;
    let ack = next_ack(&mut stream).await?;
    assert_eq!((ack.r#ref.as_str(), ack.code), ("c1", 0), "{ack:?}");
    let reply = reply_to_turn(&mut c, &s.name, asked).await?;
    assert!(reply.contains("File created successfully"), "{reply}");
    // "Always" applied the CLI's suggestion (accept edits): no second ask.
    let reply = turn(&mut c, &s.name, "edit second.txt two").await?;
    assert!(reply.contains("File created successfully"), "{reply}");
    let asks = events_of(&mut c, &s.name)
        .await?
        .iter()
        .filter(|e| e.r#type == "agent.tool_permission")
        .count();
    assert_eq!(asks, 1);
    // A command that writes asks; an interrupt withdraws the request.
    let seq = send(&mut c, &s.name, "tool echo hi > third.txt").await?;
    let (_, p) = permission_after(&mut c, &s.name, seq).await?;
    c.interrupt(pb::InterruptRequest {
        name: s.name.clone(),
    })
    .await?;
    collect_until(&mut c, &s.name, seq, Duration::from_secs(30), |e| {
        e.r#type == "agent.tool_permission_cancelled"
    })
    .await?;
    wait_for_session(&mut c, &s.name, Duration::from_secs(20), "idle", |s| {
        s.activity == pb::Activity::Idle as i32 && s.pending_tool_requests.is_empty()
    })
    .await?;
    let late = confirm(
        &mut c,
        &s.name,
        p["tool_use_id"].as_str().unwrap_or_default(),
        pb::ToolDecision::Allow,
        "",
    )
    .await
    .expect_err("withdrawn");
    assert!(late.message().contains("withdrawn"), "{late:?}");
    drop(tx);
    stop_and_wait(&mut c, &s.name).await?;
    cluster.shutdown().await
}
