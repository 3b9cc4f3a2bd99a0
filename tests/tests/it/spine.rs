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
    // Every transcript line arrives once, in order, byte for byte.
    let transcript = berth_tests::fixture("explore_count_files.jsonl")?;
    let lines: Vec<&[u8]> = transcript
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::as_bytes)
        .collect();
    assert_eq!(agent_lines(&events), lines);
    assert_lines_well_formed(&events);
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
    // What is stored is what was streamed, byte for byte.
    let key = |e: &pb::Event| {
        (
            e.seq,
            e.id.clone(),
            e.r#type.clone(),
            e.payload_json.clone(),
            e.raw.clone(),
            e.line_seq,
        )
    };
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
            ..Default::default()
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

/// Every public Claude Code capture, replayed by the stand-in agent in one
/// session: each line arrives once, in order, byte for byte (live and from
/// the store), and each content block is an event pointing back to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_public_capture_arrives_line_for_line_and_block_for_block() -> anyhow::Result<()> {
    let mut captures = Vec::new();
    for dir in [shared_fixtures(), shared_fixtures().join("public")] {
        for entry in std::fs::read_dir(&dir)? {
            let path = entry?.path();
            if path.extension().is_some_and(|x| x == "jsonl") {
                let rel = path.strip_prefix(shared_fixtures())?.to_path_buf();
                captures.push((rel, std::fs::read(&path)?));
            }
        }
    }
    captures.sort();
    assert!(captures.len() >= 9, "captures: {captures:?}");
    let cluster = TestCluster::builder().start().await?;
    let mut c = cluster.client();
    let s = c
        .create_session(fake_session("echo ready"))
        .await?
        .into_inner();
    let mut after = until_turn_ends(&mut c, &s.name, 0)
        .await?
        .last()
        .map_or(0, |e| e.seq);
    for (rel, bytes) in &captures {
        let lines: Vec<&[u8]> = bytes
            .split(|b| *b == b'\n')
            .filter(|l| !l.iter().all(u8::is_ascii_whitespace))
            .collect();
        let seq = c
            .send_message(pb::SendMessageRequest {
                name: s.name.clone(),
                text: format!("replay /fixtures/claude-code/{}", rel.display()),
                ..Default::default()
            })
            .await?
            .into_inner()
            .seq;
        let mut seen = 0;
        let events = collect_until(&mut c, &s.name, seq, Duration::from_secs(60), |e| {
            seen += usize::from(e.line_seq == e.seq);
            // All lines, and the events of the last one (every capture ends
            // with a result, which its usage follows).
            seen == lines.len() && e.line_seq == 0
        })
        .await?;
        let what = rel.display();
        assert_eq!(agent_lines(&events), lines, "{what}");
        assert_lines_well_formed(&events);
        for line_event in events.iter().filter(|e| e.line_seq == e.seq) {
            let v: serde_json::Value = serde_json::from_slice(&line_event.raw).unwrap_or_default();
            let blocks: Vec<&pb::Event> = events
                .iter()
                .filter(|e| e.line_seq == line_event.seq)
                .collect();
            let expected = match (&v["type"], &v["message"]["content"]) {
                (t, serde_json::Value::Array(b)) if t == "assistant" || t == "user" => {
                    b.len().max(1)
                }
                _ => 1,
            };
            assert_eq!(blocks.len(), expected, "{what}: {v}");
            // A sub-agent's blocks say whose they are.
            if let Some(parent) = v["parent_tool_use_id"].as_str() {
                for b in &blocks {
                    assert_eq!(payload(b)["parent_tool_use_id"], parent, "{what}");
                }
            }
            // Tool results name the tool their id called, when it was called here.
            for b in blocks.iter().filter(|b| b.r#type == "agent.tool_result") {
                let id = payload(b)["tool_use_id"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string();
                let called = events.iter().find(|e| {
                    e.r#type == "agent.tool_use" && payload(e)["tool_use_id"] == id.as_str()
                });
                if let Some(call) = called {
                    assert_eq!(payload(b)["name"], payload(call)["name"], "{what}: {id}");
                }
            }
        }
        let stored = c
            .list_events(pb::ListEventsRequest {
                name: s.name.clone(),
                after_seq: seq,
                page_size: 1000,
                ..Default::default()
            })
            .await?
            .into_inner()
            .events;
        let line_events: Vec<_> = stored.iter().filter(|e| e.line_seq != 0).cloned().collect();
        let streamed: Vec<_> = events.iter().filter(|e| e.line_seq != 0).cloned().collect();
        assert_eq!(
            line_events, streamed,
            "{what}: the store gives back what was streamed"
        );
        after = after.max(events.last().map_or(0, |e| e.seq));
        // Let the replay's turn settle before the next.
        wait_for_status(
            &mut c,
            &s.name,
            pb::SessionStatus::Idle,
            Duration::from_secs(30),
        )
        .await?;
    }
    assert!(after > 0);
    stop_and_wait(&mut c, &s.name).await?;
    cluster.shutdown().await
}

/// The stand-in's multi-block lines and sub-agent turn: one event per
/// block, and usage per model equal to its running totals.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocks_and_models_of_the_stand_in_agent() -> anyhow::Result<()> {
    let cluster = TestCluster::builder().start().await?;
    let mut c = cluster.client();
    let s = c.create_session(fake_session("multi")).await?.into_inner();
    let events = until_turn_ends(&mut c, &s.name, 0).await?;
    assert_lines_well_formed(&events);
    let four = events
        .iter()
        .find(|e| e.r#type == "agent.thinking")
        .expect("thinking");
    let blocks: Vec<&str> = events
        .iter()
        .filter(|e| e.line_seq == four.seq)
        .map(|e| e.r#type.as_str())
        .collect();
    assert_eq!(
        blocks,
        [
            "agent.thinking",
            "agent.message",
            "agent.tool_use",
            "agent.tool_use"
        ]
    );
    let results: Vec<(String, bool)> = events
        .iter()
        .filter(|e| e.r#type == "agent.tool_result")
        .map(|e| {
            (
                payload(e)["name"].as_str().unwrap_or_default().to_string(),
                payload(e)["is_error"] == true,
            )
        })
        .collect();
    assert_eq!(
        results,
        [("Bash".to_string(), false), ("Read".to_string(), true)]
    );

    let last = events.last().map_or(0, |e| e.seq);
    let reply = turn(&mut c, &s.name, "subagent from below").await?;
    assert!(reply.contains("The sub-agent said: from below"), "{reply}");
    let events = events_of(&mut c, &s.name).await?;
    let sub: Vec<&pb::Event> = events
        .iter()
        .filter(|e| e.seq > last && payload(e)["parent_tool_use_id"].is_string())
        .collect();
    assert!(
        sub.iter()
            .any(|e| e.r#type == "agent.message" && payload(e)["text"] == "from below")
    );
    // The session's usage per model is the last result's modelUsage.
    let result = events
        .iter()
        .rev()
        .find(|e| e.r#type == "agent.result")
        .expect("result");
    let line = line_json(&events, result);
    let session = get(&mut c, &s.name).await?;
    let usage = session.usage.expect("usage");
    assert_eq!(usage.models.len(), 2, "{:?}", usage.models);
    for m in &usage.models {
        let reported = &line["modelUsage"][&m.model];
        assert_eq!(
            Some(m.input_tokens),
            reported["inputTokens"].as_i64(),
            "{}",
            m.model
        );
        assert_eq!(
            Some(m.output_tokens),
            reported["outputTokens"].as_i64(),
            "{}",
            m.model
        );
        let cost = reported["costUSD"].as_f64().unwrap_or(-1.0);
        assert!(
            (m.cost_usd - cost).abs() < 1e-12,
            "{}: {} vs {cost}",
            m.model,
            m.cost_usd
        );
    }
    let total = line["total_cost_usd"].as_f64().unwrap_or(-1.0);
    assert!((usage.cost_usd - total).abs() < 1e-12);
    // The sub-agent's turn lists both models; the first turn only the main one.
    let turns: Vec<serde_json::Value> = events
        .iter()
        .filter(|e| e.r#type == "session.usage")
        .map(|e| payload(e)["turn"].clone())
        .collect();
    assert_eq!(turns[0]["models"].as_array().map(Vec::len), Some(1));
    assert_eq!(turns[1]["models"].as_array().map(Vec::len), Some(2));
    let haiku = turns[1]["models"]
        .as_array()
        .and_then(|m| m.iter().find(|m| m["model"] == "claude-haiku-4-5"))
        .expect("the sub-agent's model");
    assert_eq!(haiku["output_tokens"], "from below".len());
    // The export carries the same: per-model usage, and every line once.
    let json = c
        .export_session(pb::ExportSessionRequest {
            name: s.name.clone(),
            format: pb::ExportFormat::Json as i32,
        })
        .await?
        .into_inner();
    let doc: serde_json::Value = serde_json::from_str(&json.content)?;
    assert_eq!(
        doc["session"]["usage"]["models"].as_array().map(Vec::len),
        Some(2)
    );
    let exported: Vec<Vec<u8>> = doc["events"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|e| e["raw"].as_str().map(|r| r.as_bytes().to_vec()))
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(exported, agent_lines(&events));
    let md = c
        .export_session(pb::ExportSessionRequest {
            name: s.name.clone(),
            format: pb::ExportFormat::Markdown as i32,
        })
        .await?
        .into_inner();
    assert!(md.content.contains("`claude-haiku-4-5`"), "{}", md.content);
    stop_and_wait(&mut c, &s.name).await?;
    cluster.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_asked_while_the_session_starts_stops_it_and_its_container() -> anyhow::Result<()> {
    let cluster = TestCluster::builder().start().await?;
    let mut c = cluster.client();
    // Several, so that some stops land while the node is still starting.
    let mut names = Vec::new();
    for _ in 0..4 {
        let s = c
            .create_session(fake_session("echo hi"))
            .await?
            .into_inner();
        c.stop_session(pb::StopSessionRequest {
            name: s.name.clone(),
        })
        .await?;
        names.push(s);
    }
    for s in &names {
        wait_for_status(
            &mut c,
            &s.name,
            pb::SessionStatus::Stopped,
            Duration::from_secs(30),
        )
        .await?;
        no_containers_left(&s.id).await?;
    }
    cluster.shutdown().await
}
