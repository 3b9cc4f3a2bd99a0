//! The session spine, end to end: create → queue → node → container → events.

use std::time::{Duration, Instant};

use berth_proto::v1 as pb;
use berth_tests::*;
use futures::StreamExt;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recorded_transcript_replays_through_the_whole_system() -> anyhow::Result<()> {
    let cluster = TestCluster::builder().start().await?;
    let mut c = cluster.client();
    let started = Instant::now();
    let s = c
        .create_session(fake_session(&format!("replay {FIXTURE_IN_IMAGE}")))
        .await?
        .into_inner();
    let events = until_turn_ends(&mut c, &s.name, 0).await?;
    let first_runtime = events
        .iter()
        .position(|e| e.r#type.starts_with("runtime.") || e.r#type.starts_with("agent."));
    eprintln!(
        "cold start: CreateSession → end of the replayed turn in {:?}",
        started.elapsed()
    );

    // Seqs are gapless from 1.
    for (i, e) in events.iter().enumerate() {
        assert_eq!(e.seq, i as i64 + 1, "seq gap at {e:?}");
    }
    // Every transcript line arrives, in order, verbatim, one event each.
    let raws: Vec<String> = events
        .iter()
        .filter_map(|e| payload(e)["raw"].as_str().map(String::from))
        .collect();
    let transcript = berth_tests::fixture("explore_count_files.jsonl")?;
    let lines: Vec<&str> = transcript
        .lines()
        .filter(|l| !l.trim().is_empty())
        .collect();
    assert_eq!(raws, lines);
    assert!(first_runtime.is_some());
    let kinds: Vec<&str> = events.iter().map(|e| e.r#type.as_str()).collect();
    for k in [
        "runtime.init",
        "agent.thinking",
        "agent.message",
        "agent.tool_use",
        "agent.tool_result",
        "agent.result",
        "session.usage",
    ] {
        assert!(kinds.contains(&k), "no {k} event in {kinds:?}");
    }
    // Usage and cost are what the transcript's result line says: tokens are
    // its `modelUsage` sums (the sonnet main agent and its haiku Explore
    // sub-agent, which `usage` leaves out), cost its `total_cost_usd`.
    let s = c
        .get_session(pb::GetSessionRequest {
            name: s.name.clone(),
        })
        .await?
        .into_inner();
    let u = s.usage.expect("usage");
    assert_eq!(
        (
            u.input_tokens,
            u.output_tokens,
            u.cache_read_input_tokens,
            u.cache_creation_input_tokens
        ),
        (4 + 573, 576 + 134, 40618 + 7699, 7281 + 7824)
    );
    assert!((u.cost_usd - 0.0763163).abs() < 1e-9, "cost {}", u.cost_usd);
    assert_eq!(u.turns, 1);
    assert_eq!(s.runtime_session_id, "4e3453f9-129a-4da9-bc25-a287453d58d9");
    assert_eq!(s.node, cluster.nodes[0].id);
    // The persisted log is what was streamed.
    let listed = c
        .list_events(pb::ListEventsRequest {
            name: s.name.clone(),
            page_size: 1000,
            ..Default::default()
        })
        .await?
        .into_inner();
    // (Payloads compare as JSON: Postgres normalises the text of what it stores.)
    let key = |e: &pb::Event| (e.seq, e.id.clone(), e.r#type.clone(), payload(e));
    let listed: Vec<_> = listed.events[..events.len()].iter().map(key).collect();
    let streamed: Vec<_> = events.iter().map(key).collect();
    assert_eq!(listed, streamed);
    cluster.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conversation_with_tools_then_a_stop_removes_the_container() -> anyhow::Result<()> {
    let cluster = TestCluster::builder().start().await?;
    let mut c = cluster.client();
    let s = c
        .create_session(fake_session("tool ls -la"))
        .await?
        .into_inner();
    let first = until_turn_ends(&mut c, &s.name, 0).await?;
    let tool = first
        .iter()
        .find(|e| e.r#type == "agent.tool_use")
        .expect("tool_use");
    assert_eq!(payload(tool)["input"]["command"], "ls -la");
    let result = first
        .iter()
        .find(|e| e.r#type == "agent.tool_result")
        .expect("tool_result");
    assert_eq!(payload(result)["content"], "ran: ls -la");
    assert!(
        !containers_of(&s.id).await?.is_empty(),
        "a running session has a container"
    );

    // A second turn through SendMessage.
    let last = first.last().map_or(0, |e| e.seq);
    let sent = c
        .send_message(pb::SendMessageRequest {
            name: s.name.clone(),
            text: "echo second turn".into(),
        })
        .await?
        .into_inner();
    assert!(sent.seq > last);
    let second = until_turn_ends(&mut c, &s.name, last).await?;
    let reply = second
        .iter()
        .find(|e| e.r#type == "agent.message")
        .expect("reply");
    assert_eq!(payload(reply)["text"], "second turn");
    let statuses: Vec<&str> = second
        .iter()
        .filter(|e| e.r#type.starts_with("session.status_"))
        .map(|e| e.r#type.as_str())
        .collect();
    assert_eq!(statuses, ["session.status_running", "session.status_idle"]);

    // Stop: reason user, container gone.
    let stopped = c
        .stop_session(pb::StopSessionRequest {
            name: s.name.clone(),
        })
        .await?
        .into_inner();
    assert_eq!(stopped.status, pb::SessionStatus::Stopping as i32);
    let s2 = wait_for_status(
        &mut c,
        &s.name,
        pb::SessionStatus::Stopped,
        Duration::from_secs(20),
    )
    .await?;
    assert_eq!(s2.status_reason, "user");
    assert_eq!(s2.usage.expect("usage").turns, 2);
    assert!(
        containers_of(&s.id).await?.is_empty(),
        "the container outlived its session"
    );
    cluster.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnecting_client_gets_exactly_the_missing_events() -> anyhow::Result<()> {
    let cluster = TestCluster::builder().start().await?;
    let mut c = cluster.client();
    let s = c
        .create_session(fake_session("events 300 128"))
        .await?
        .into_inner();
    // Read ten events, then drop the stream mid-session.
    let mut seen =
        collect_until(&mut c, &s.name, 0, Duration::from_secs(60), |e| e.seq == 10).await?;
    assert_eq!(seen.len(), 10);
    // Reconnect from the last seq seen.
    let rest = until_turn_ends(&mut c, &s.name, 10).await?;
    seen.extend(rest);
    let seqs: Vec<i64> = seen.iter().map(|e| e.seq).collect();
    let expected: Vec<i64> = (1..=seqs.len() as i64).collect();
    assert_eq!(seqs, expected, "duplicates or gaps after reconnecting");
    assert_eq!(
        seen.iter().filter(|e| e.r#type == "agent.message").count(),
        301
    );
    cluster.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_is_idempotent_and_sessions_list_in_pages() -> anyhow::Result<()> {
    let cluster = TestCluster::builder().start().await?;
    let mut c = cluster.client();
    let mut req = fake_session("echo hi");
    req.request_id = "retry-me-1".into();
    req.labels.insert("suite".into(), "idem".into());
    let a = c.create_session(req.clone()).await?.into_inner();
    let b = c.create_session(req).await?.into_inner();
    assert_eq!(a.id, b.id);
    for i in 0..2 {
        let mut r = fake_session(&format!("echo {i}"));
        r.labels.insert("suite".into(), "idem".into());
        c.create_session(r).await?;
    }
    let mut ids = Vec::new();
    let mut token = String::new();
    loop {
        let labels = [("suite".to_string(), "idem".to_string())].into();
        let page = c
            .list_sessions(pb::ListSessionsRequest {
                page_size: 2,
                page_token: token,
                labels,
                ..Default::default()
            })
            .await?
            .into_inner();
        assert!(page.sessions.len() <= 2);
        ids.extend(page.sessions.into_iter().map(|s| s.id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(ids.len(), 3, "three sessions, each once: {ids:?}");
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 3);
    cluster.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_carries_messages_in_and_events_out_on_one_stream() -> anyhow::Result<()> {
    let cluster = TestCluster::builder().start().await?;
    let mut c = cluster.client();
    let s = c
        .create_session(fake_session("echo first"))
        .await?
        .into_inner();
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    tx.send(pb::ConnectRequest {
        kind: Some(pb::connect_request::Kind::Open(pb::ConnectOpen {
            name: s.name.clone(),
            after_seq: 0,
        })),
    })
    .await?;
    let mut inbound = c
        .connect(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    let mut replies = Vec::new();
    let mut acks = Vec::new();
    let mut sent = false;
    let read = async {
        while let Some(msg) = inbound.next().await {
            match msg?.kind {
                Some(pb::connect_response::Kind::Event(e)) => {
                    if e.r#type == "agent.message" {
                        replies.push(payload(&e)["text"].as_str().unwrap_or_default().to_string());
                    }
                    if e.r#type == "session.status_idle" && !sent {
                        sent = true;
                        let m = pb::ConnectMessage {
                            text: "echo over connect".into(),
                            r#ref: "m1".into(),
                        };
                        tx.send(pb::ConnectRequest {
                            kind: Some(pb::connect_request::Kind::Message(m)),
                        })
                        .await?;
                        let bad = pb::ConnectMessage {
                            text: "   ".into(),
                            r#ref: "bad".into(),
                        };
                        tx.send(pb::ConnectRequest {
                            kind: Some(pb::connect_request::Kind::Message(bad)),
                        })
                        .await?;
                    }
                    if replies.len() == 2 && e.r#type == "session.status_idle" {
                        break;
                    }
                }
                Some(pb::connect_response::Kind::Ack(a)) => acks.push(a),
                None => {}
            }
        }
        anyhow::Ok(())
    };
    tokio::time::timeout(Duration::from_secs(60), read).await??;
    assert_eq!(replies, ["first", "over connect"]);
    let ok = acks.iter().find(|a| a.r#ref == "m1").expect("ack m1");
    assert_eq!(ok.code, 0);
    assert!(ok.seq > 0);
    let bad = acks.iter().find(|a| a.r#ref == "bad").expect("ack bad");
    assert_eq!(bad.code, tonic::Code::InvalidArgument as i32);
    assert!(bad.message.contains("text"), "{}", bad.message);
    cluster.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_jsonl_runtime_runs_any_line_program() -> anyhow::Result<()> {
    let cluster = TestCluster::builder().start().await?;
    let mut c = cluster.client();
    let script = r#"while IFS= read -r line; do echo '{"type":"message","text":"got it"}'; echo 'plain text'; echo '{"type":"turn_end","usage":{"input_tokens":5,"output_tokens":7,"cost_usd":0.25,"model":"sh"}}'; done"#;
    let mut req = fake_session("hello");
    if let Some(spec) = req.spec.as_mut() {
        spec.runtime = pb::Runtime::Jsonl as i32;
        spec.runtime_args = vec!["sh".into(), "-c".into(), script.into()];
    }
    let s = c.create_session(req).await?.into_inner();
    let events = until_turn_ends(&mut c, &s.name, 0).await?;
    let kinds: Vec<&str> = events.iter().map(|e| e.r#type.as_str()).collect();
    assert!(
        kinds.contains(&"agent.message")
            && kinds.contains(&"runtime.raw")
            && kinds.contains(&"agent.result"),
        "{kinds:?}"
    );
    let s = c
        .get_session(pb::GetSessionRequest { name: s.name })
        .await?
        .into_inner();
    let u = s.usage.expect("usage");
    assert_eq!((u.input_tokens, u.output_tokens, u.cost_usd), (5, 7, 0.25));
    cluster.shutdown().await
}

/// A burst relayed live arrives whole: every event once, in seq order with
/// no gap, and each identical to what a later page of the log returns.
/// (Its rate is measured by `berth-loadtest relay`, not here.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_events_arrives_whole_and_in_order() -> anyhow::Result<()> {
    let cluster = TestCluster::builder().start().await?;
    let mut c = cluster.client();
    let n = 5000;
    let s = c
        .create_session(fake_session(&format!("events {n} 256")))
        .await?
        .into_inner();
    let live = collect_until(&mut c, &s.name, 0, Duration::from_secs(120), |e| {
        e.r#type == "session.usage"
    })
    .await?;
    let count = live.iter().filter(|e| e.r#type == "agent.message").count();
    assert_eq!(count, n + 1);
    let seqs: Vec<i64> = live.iter().map(|e| e.seq).collect();
    assert_eq!(
        seqs,
        (1..=live.len() as i64).collect::<Vec<_>>(),
        "gapless, in order, once each"
    );
    let mut stored = Vec::new();
    while stored.len() < live.len() {
        let page = c
            .list_events(pb::ListEventsRequest {
                name: s.name.clone(),
                after_seq: stored.last().map_or(0, |e: &pb::Event| e.seq),
                page_size: 1000,
                page_token: String::new(),
            })
            .await?
            .into_inner();
        anyhow::ensure!(
            !page.events.is_empty(),
            "the log ends before the live stream did"
        );
        stored.extend(page.events);
    }
    stored.truncate(live.len());
    for (l, st) in live.iter().zip(&stored) {
        assert_eq!((l.seq, &l.id, &l.r#type), (st.seq, &st.id, &st.r#type));
        let (a, b): (serde_json::Value, serde_json::Value) = (
            serde_json::from_str(&l.payload_json)?,
            serde_json::from_str(&st.payload_json)?,
        );
        assert_eq!(a, b, "seq {} differs live and stored", l.seq);
    }
    cluster.shutdown().await
}
