//! Bad input and faults: precise errors, nothing lost, nothing leaked.

use std::time::Duration;

use berth_proto::v1 as pb;
use berth_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_precise_codes() -> anyhow::Result<()> {
    let cluster = TestCluster::builder().start().await?;
    let mut c = cluster.client();
    let unknown = "sessions/01a1f000-0000-7000-8000-000000000000";
    let e = c
        .get_session(pb::GetSessionRequest {
            name: unknown.into(),
        })
        .await
        .expect_err("unknown");
    assert_eq!(e.code(), tonic::Code::NotFound);
    let e = c
        .send_message(pb::SendMessageRequest {
            name: unknown.into(),
            text: "hi".into(),
            ..Default::default()
        })
        .await
        .expect_err("unknown");
    assert_eq!(e.code(), tonic::Code::NotFound);
    let e = c
        .stream_events(pb::StreamEventsRequest {
            name: "not-a-uuid".into(),
            after_seq: 0,
        })
        .await
        .expect_err("unknown");
    assert_eq!(e.code(), tonic::Code::NotFound);

    let mut no_image = fake_session("hi");
    no_image.spec = Some(pb::AgentSpec::default());
    let e = c.create_session(no_image).await.expect_err("no image");
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("spec.image"), "{}", e.message());

    // Limits no node could give, and paths outside the container's writable
    // volumes, are refused at the API, naming the field.
    let mut greedy = fake_session("hi");
    if let Some(spec) = greedy.spec.as_mut() {
        spec.limits = Some(pb::Limits {
            memory_bytes: 1 << 62,
            ..Default::default()
        });
    }
    let e = c.create_session(greedy).await.expect_err("2^62 bytes");
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(
        e.message().contains("spec.limits.memory_bytes"),
        "{}",
        e.message()
    );
    let mut outside = fake_session("hi");
    outside.resources = vec![pb::Resource {
        kind: Some(pb::resource::Kind::Git(pb::GitResource {
            url: "/nonexistent/repo".into(),
            r#ref: String::new(),
            path: "/etc/passwd".into(),
            ssh_key_secret: String::new(),
            ..Default::default()
        })),
    }];
    let e = c.create_session(outside).await.expect_err("/etc/passwd");
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(
        e.message().contains("resources.git.path"),
        "{}",
        e.message()
    );

    let s = c
        .create_session(fake_session("echo hi"))
        .await?
        .into_inner();
    for (text, why) in [("", "empty"), ("  \n", "blank")] {
        let e = c
            .send_message(pb::SendMessageRequest {
                name: s.name.clone(),
                text: text.into(),
                ..Default::default()
            })
            .await
            .expect_err(why);
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{why}");
        assert!(e.message().contains("text"), "{}", e.message());
    }
    let huge = "x".repeat(1024 * 1024 + 1);
    let e = c
        .send_message(pb::SendMessageRequest {
            name: s.name.clone(),
            text: huge,
            ..Default::default()
        })
        .await
        .expect_err("huge");
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("limit"), "{}", e.message());

    until_turn_ends(&mut c, &s.name, 0).await?;
    stop_and_wait(&mut c, &s.name).await?;
    let e = c
        .send_message(pb::SendMessageRequest {
            name: s.name.clone(),
            text: "too late".into(),
            ..Default::default()
        })
        .await
        .expect_err("finished");
    assert_eq!(e.code(), tonic::Code::FailedPrecondition);
    assert!(e.message().contains("stopped"), "{}", e.message());
    cluster.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_crash_fails_the_session_with_its_exit_code_and_leaves_no_container()
-> anyhow::Result<()> {
    let cluster = TestCluster::builder().start().await?;
    let mut c = cluster.client();
    let s = c
        .create_session(fake_session("crash 7"))
        .await?
        .into_inner();
    // Up to the status that ends the run, whichever it is.
    let ends = ["failed", "completed", "stopped", "timeout"].map(|s| format!("session.status_{s}"));
    let events = collect_until(&mut c, &s.name, 0, Duration::from_secs(60), |e| {
        ends.contains(&e.r#type)
    })
    .await?;
    let last = events.last().expect("events");
    assert_eq!(last.r#type, "session.status_failed");
    let p = payload(last);
    assert_eq!(p["exit_code"], 7);
    assert!(
        p["reason"].as_str().unwrap_or_default().contains("code 7"),
        "{p}"
    );
    assert!(
        p["stderr_tail"]
            .as_str()
            .unwrap_or_default()
            .contains("crashing on request"),
        "{p}"
    );
    // The event the agent wrote before crashing was kept.
    assert!(
        events
            .iter()
            .any(|e| e.r#type == "agent.message" && payload(e)["text"] == "crashing now")
    );
    let got = c
        .get_session(pb::GetSessionRequest {
            name: s.name.clone(),
        })
        .await?
        .into_inner();
    assert_eq!(got.status, pb::SessionStatus::Failed as i32);
    assert!(
        containers_of(&s.id).await?.is_empty(),
        "the crashed session's container was left behind"
    );
    cluster.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_json_and_huge_lines_are_kept_and_the_stream_goes_on() -> anyhow::Result<()> {
    let cluster = TestCluster::builder().start().await?;
    let mut c = cluster.client();
    let s = c
        .create_session(fake_session("garbage"))
        .await?
        .into_inner();
    let events = until_turn_ends(&mut c, &s.name, 0).await?;
    let raw = events
        .iter()
        .find(|e| e.r#type == "runtime.raw")
        .expect("runtime.raw");
    assert_eq!(raw.raw, b"this line is not JSON {{{");
    assert_eq!(raw.line_seq, raw.seq);
    assert!(
        events
            .iter()
            .any(|e| e.r#type == "agent.message" && payload(e)["text"] == "after garbage")
    );

    // A NUL escape survives, live and stored (jsonb could not hold it).
    let last = events.last().map_or(0, |e| e.seq);
    let reply = turn(&mut c, &s.name, "echo nul:\u{0}:end").await?;
    assert_eq!(reply, "nul:\u{0}:end");
    let stored = events_of(&mut c, &s.name).await?;
    let line = stored
        .iter()
        .find(|e| e.seq > last && e.r#type == "agent.message")
        .expect("the echo");
    assert!(
        line.raw.windows(6).any(|w| w == b"\\u0000"),
        "{}",
        String::from_utf8_lossy(&line.raw)
    );
    assert!(
        line.payload_json.contains("nul:\\u0000:end"),
        "{}",
        line.payload_json
    );

    let last = stored.last().map_or(0, |e| e.seq);
    c.send_message(pb::SendMessageRequest {
        name: s.name.clone(),
        text: "longline 2000000".into(),
        ..Default::default()
    })
    .await?;
    let events = until_turn_ends(&mut c, &s.name, last).await?;
    let long = events
        .iter()
        .find(|e| e.r#type == "agent.message")
        .expect("long message");
    assert_eq!(
        payload(long)["text"].as_str().map(str::len),
        Some(2_000_000)
    );
    cluster.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupt_ends_a_hanging_turn() -> anyhow::Result<()> {
    let cluster = TestCluster::builder().start().await?;
    let mut c = cluster.client();
    let s = c.create_session(fake_session("hang")).await?.into_inner();
    wait_for_status(
        &mut c,
        &s.name,
        pb::SessionStatus::Running,
        Duration::from_secs(30),
    )
    .await?;
    c.interrupt(pb::InterruptRequest {
        name: s.name.clone(),
    })
    .await?;
    let events = until_turn_ends(&mut c, &s.name, 0).await?;
    assert!(events.iter().any(|e| e.r#type == "user.interrupt"));
    let result = events
        .iter()
        .find(|e| e.r#type == "agent.result")
        .expect("result");
    assert_eq!(payload(result)["subtype"], "error_during_execution");
    cluster.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_out_of_memory_fails_with_reason_oom() -> anyhow::Result<()> {
    let cluster = TestCluster::builder().start().await?;
    let mut c = cluster.client();
    let mut req = fake_session("oom");
    if let Some(spec) = req.spec.as_mut() {
        spec.limits = Some(pb::Limits {
            memory_bytes: 64 << 20,
            ..Default::default()
        });
    }
    let s = c.create_session(req).await?.into_inner();
    let failed = wait_for_status(
        &mut c,
        &s.name,
        pb::SessionStatus::Failed,
        Duration::from_secs(60),
    )
    .await?;
    assert_eq!(failed.status_reason, "oom");
    let events = events_of(&mut c, &s.name).await?;
    let end = events
        .iter()
        .find(|e| e.r#type == "session.status_failed")
        .expect("the failure");
    assert_eq!(payload(end)["exit_code"], 137);
    no_containers_left(&s.id).await?;
    cluster.shutdown().await
}
