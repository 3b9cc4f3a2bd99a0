//! The agent's clarifying questions (`AskUserQuestion`): asked by the real
//! Claude Code CLI and by fake-claude (which asks the same way), shown as
//! `agent.question`, answered with `AnswerQuestion` over gRPC and HTTP, and
//! used by the agent.

use std::time::Duration;

use berth_proto::v1::{self as pb, sessions_client::SessionsClient};
use berth_tests::*;

use super::claude::{claude_session, cluster};

/// Waits for the session's `agent.question`: its seq and payload.
async fn question(
    c: &mut SessionsClient<Api>,
    name: &str,
) -> anyhow::Result<(i64, serde_json::Value)> {
    let events = collect_until(c, name, 0, Duration::from_secs(90), |e| {
        e.r#type == "agent.question"
    })
    .await?;
    let e = events.last().expect("the awaited event");
    Ok((e.seq, payload(e)))
}

/// A fake-claude session whose first message asks the two questions.
fn fake_ask() -> pb::CreateSessionRequest {
    pb::CreateSessionRequest {
        spec: Some(pb::AgentSpec {
            image: TEST_IMAGE.into(),
            ..Default::default()
        }),
        initial_message: "ask".into(),
        ..Default::default()
    }
}

fn answer(question: &str, labels: &[&str], text: &str) -> pb::QuestionAnswer {
    pb::QuestionAnswer {
        question: question.into(),
        labels: labels.iter().map(|l| l.to_string()).collect(),
        text: text.into(),
    }
}

/// Asks, refuses bad answers by name, answers, and reads the agent's use
/// of the answers and the export. `expect` is what the agent's reply must
/// carry for the answers given.
async fn ask_and_answer(c: &mut SessionsClient<Api>, s: &pb::Session) -> anyhow::Result<String> {
    let (asked, p) = question(c, &s.name).await?;
    assert_eq!(p["tool_name"], "AskUserQuestion", "{p}");
    let qs = p["input"]["questions"].as_array().expect("questions");
    assert_eq!(qs.len(), 2, "{p}");
    assert_eq!(qs[1]["multiSelect"], true, "{p}");
    let tool_use_id = p["tool_use_id"].as_str().unwrap_or_default().to_string();
    let waiting = wait_for_session(c, &s.name, Duration::from_secs(10), "waiting", |s| {
        s.activity == pb::Activity::WaitingInput as i32
    })
    .await?;
    assert_eq!(
        waiting.pending_tool_requests[0].tool_name,
        "AskUserQuestion"
    );
    let ask = |answers: Vec<pb::QuestionAnswer>| pb::AnswerQuestionRequest {
        name: s.name.clone(),
        tool_use_id: tool_use_id.clone(),
        answers,
    };
    // A label that is not an option, one question left out, two labels
    // for a single-select question: each refused, naming the answer.
    let bad = [
        (
            vec![
                answer("Which color should the button be?", &["Purple"], ""),
                answer("Sizes", &["Small"], ""),
            ],
            "answers[0].labels[0]",
        ),
        (
            vec![answer("Which color should the button be?", &["Red"], "")],
            "has no answer",
        ),
        (
            vec![
                answer("Color", &["Red", "Blue"], ""),
                answer("Sizes", &["Small"], ""),
            ],
            "answers[0].labels",
        ),
    ];
    for (answers, says) in bad {
        let e = c.answer_question(ask(answers)).await.expect_err("refused");
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
        assert!(e.message().contains(says), "{says}: {e:?}");
    }
    let good = vec![
        answer("Color", &["Blue"], ""),
        answer("Which sizes should ship?", &["Small", "Large"], ""),
    ];
    let first = c.answer_question(ask(good.clone())).await?.into_inner();
    assert!(!first.already_answered);
    let again = c.answer_question(ask(good)).await?.into_inner();
    assert!(again.already_answered, "the same answer again is the first");
    assert_eq!(again.seq, first.seq);
    let reply = reply_after(c, &s.name, asked).await?;
    let md = c
        .export_session(pb::ExportSessionRequest {
            name: s.name.clone(),
            format: pb::ExportFormat::Markdown as i32,
        })
        .await?
        .into_inner()
        .content;
    assert!(md.contains("**The agent asks**"), "{md}");
    assert!(
        md.contains("Which sizes should ship? (any of: Small, Medium, Large)"),
        "{md}"
    );
    assert!(
        md.contains("Which color should the button be? → **Blue**"),
        "{md}"
    );
    assert!(
        md.contains("Which sizes should ship? → **Small, Large**"),
        "{md}"
    );
    Ok(reply)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_real_cli_asks_and_uses_the_answers() -> anyhow::Result<()> {
    let cluster = cluster().await?;
    let mut c = cluster.client();
    let mut req = claude_session("ask");
    if let Some(spec) = req.spec.as_mut() {
        spec.runtime_args.clear();
    }
    let s = c.create_session(req).await?.into_inner();
    let reply = ask_and_answer(&mut c, &s).await?;
    eprintln!("the real CLI's tool result: {reply}");
    // fake-anthropic replies `done: ` and the tool result the CLI sent it.
    assert!(reply.starts_with("done: "), "{reply}");
    assert!(
        reply.contains("Blue") && reply.contains("Small, Large"),
        "{reply}"
    );
    stop_and_wait(&mut c, &s.name).await?;
    cluster.shutdown().await
}

/// fake-claude asks as the real CLI does, and words the answers as it does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fake_claude_asks_like_the_real_cli() -> anyhow::Result<()> {
    let cluster = TestCluster::builder().start().await?;
    let mut c = cluster.client();
    let s = c.create_session(fake_ask()).await?.into_inner();
    let reply = ask_and_answer(&mut c, &s).await?;
    assert_eq!(
        reply,
        "done: Your questions have been answered: \"Which color should the button be?\"=\"Blue\", \
         \"Which sizes should ship?\"=\"Small, Large\". You can now continue with these answers in mind."
    );
    stop_and_wait(&mut c, &s.name).await?;
    cluster.shutdown().await
}

/// Off a terminal: `berth sessions get` shows the questions and how to
/// answer them, and `berth sessions answer` answers by header and label.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_answers_by_header_and_label() -> anyhow::Result<()> {
    let cluster = TestCluster::builder().start().await?;
    let mut c = cluster.client();
    let s = c.create_session(fake_ask()).await?.into_inner();
    let (asked, _) = question(&mut c, &s.name).await?;
    let run = |args: &[&str]| -> anyhow::Result<(bool, String, String)> {
        let out = berth_command(&cluster).args(args).output()?;
        Ok((
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    };
    let (ok, shown, _) = run(&["sessions", "get", &s.id])?;
    assert!(ok);
    assert!(
        shown.contains("Color: Which color should the button be? [Red/Blue]"),
        "{shown}"
    );
    assert!(shown.contains("berth sessions answer"), "{shown}");
    let (ok, _, err) = run(&["sessions", "answer", &s.id, "--answer", "Shape=round"])?;
    assert!(!ok);
    assert!(err.contains("no such question"), "{err}");
    let (ok, out, err) = run(&[
        "sessions",
        "answer",
        &s.id,
        "--answer",
        "color=red",
        "--answer",
        "Sizes=Medium",
        "--answer",
        "Sizes=XXL",
    ])?;
    assert!(ok, "{out}{err}");
    let reply = reply_after(&mut c, &s.name, asked).await?;
    assert!(
        reply.contains("\"Which color should the button be?\"=\"Red\"")
            && reply.contains("\"Which sizes should ship?\"=\"Medium, XXL\""),
        "{reply}"
    );
    stop_and_wait(&mut c, &s.name).await?;
    cluster.shutdown().await
}

/// A `Connect` stream answers questions too: a bad label is acked with
/// INVALID_ARGUMENT, a good answer with its seq.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_stream_answers_questions() -> anyhow::Result<()> {
    let cluster = TestCluster::builder().start().await?;
    let mut c = cluster.client();
    let s = c.create_session(fake_ask()).await?.into_inner();
    let (asked, p) = question(&mut c, &s.name).await?;
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
    let tool_use_id = p["tool_use_id"].as_str().unwrap_or_default().to_string();
    let mut acks = Vec::new();
    for (reference, color) in [("bad", "Purple"), ("good", "Blue")] {
        tx.send(pb::ConnectRequest {
            kind: Some(pb::connect_request::Kind::Answer(pb::ConnectAnswer {
                answer: Some(pb::AnswerQuestionRequest {
                    tool_use_id: tool_use_id.clone(),
                    answers: vec![
                        answer("Color", &[color], ""),
                        answer("Sizes", &["Medium"], ""),
                    ],
                    ..Default::default()
                }),
                r#ref: reference.into(),
            })),
        })
        .await?;
        let ack = next_ack(&mut stream).await?;
        acks.push(ack);
    }
    assert_eq!(
        (acks[0].r#ref.as_str(), acks[0].code),
        ("bad", 3),
        "{acks:?}"
    );
    assert!(acks[0].message.contains("Purple"), "{acks:?}");
    assert_eq!(
        (acks[1].r#ref.as_str(), acks[1].code),
        ("good", 0),
        "{acks:?}"
    );
    let reply = reply_after(&mut c, &s.name, asked).await?;
    assert!(
        reply.contains("\"Which color should the button be?\"=\"Blue\""),
        "{reply}"
    );
    drop(tx);
    stop_and_wait(&mut c, &s.name).await?;
    cluster.shutdown().await
}

/// `berth attach` asks each question in turn: a line of numbers picks
/// options (several for a multi-select question).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attach_answers_questions_a_line_each() -> anyhow::Result<()> {
    use std::io::Write;
    let cluster = TestCluster::builder().start().await?;
    let mut c = cluster.client();
    let s = c.create_session(fake_ask()).await?.into_inner();
    let (asked, _) = question(&mut c, &s.name).await?;
    let mut attach = berth_command(&cluster)
        .args(["attach", &s.id])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    // A number out of range is asked again; then Blue; then Small and Large.
    attach
        .stdin
        .take()
        .expect("stdin")
        .write_all(b"7\n2\n1 3\n")?;
    let out = tokio::task::spawn_blocking(move || attach.wait_with_output()).await??;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("[1/2] Color: Which color should the button be?"),
        "{stderr}"
    );
    assert!(stderr.contains("7 is not one of 1–2"), "{stderr}");
    let reply = reply_after(&mut c, &s.name, asked).await?;
    assert!(
        reply.contains("\"Which color should the button be?\"=\"Blue\"")
            && reply.contains("\"Which sizes should ship?\"=\"Small, Large\""),
        "{reply}"
    );
    stop_and_wait(&mut c, &s.name).await?;
    cluster.shutdown().await
}

/// The real CLI's questions reach a webhook subscriber as
/// `session.requires_action`, and `berth sessions answer` answers them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_real_clis_questions_reach_a_subscriber_and_the_cli_answers_them() -> anyhow::Result<()>
{
    let got = std::sync::Arc::new(std::sync::Mutex::new(Vec::<serde_json::Value>::new()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let app = {
        let got = got.clone();
        axum::Router::new().route(
            "/hook",
            axum::routing::post(move |body: String| {
                let got = got.clone();
                async move {
                    got.lock()
                        .expect("lock")
                        .push(serde_json::from_str(&body).unwrap_or_default());
                    axum::http::StatusCode::NO_CONTENT
                }
            }),
        )
    };
    let receiver = tokio::spawn(async move { axum::serve(listener, app).await });
    let cluster = super::claude::builder(1)
        .configure_dispatcher(|cfg| cfg.subscription_allow_http_hosts = vec!["127.0.0.1".into()])
        .start()
        .await?;
    pb::webhooks_client::WebhooksClient::new(cluster.api())
        .create_subscription(pb::CreateSubscriptionRequest {
            subscription_id: "questions".into(),
            subscription: Some(pb::Subscription {
                url: format!("http://{addr}/hook"),
                event_types: vec!["session.requires_action".into()],
                ..Default::default()
            }),
        })
        .await?;
    let mut c = cluster.client();
    let mut req = claude_session("ask");
    if let Some(spec) = req.spec.as_mut() {
        spec.runtime_args.clear();
    }
    let s = c.create_session(req).await?.into_inner();
    let (asked, _) = question(&mut c, &s.name).await?;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let delivery = loop {
        let found = got
            .lock()
            .expect("lock")
            .iter()
            .find(|b| b["type"] == "session.requires_action")
            .cloned();
        if let Some(d) = found {
            break d;
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "no requires_action delivery"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(delivery["seq"], asked, "{delivery}");
    assert!(
        delivery.to_string().contains("AskUserQuestion"),
        "{delivery}"
    );
    let out = berth_command(&cluster)
        .args(["sessions", "answer", &s.id, "--answer", "Color=Red"])
        .args(["--answer", "Sizes=Medium", "--answer", "Sizes=Large"])
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let reply = reply_after(&mut c, &s.name, asked).await?;
    assert!(
        reply.contains("\"Which color should the button be?\"=\"Red\"")
            && reply.contains("\"Which sizes should ship?\"=\"Medium, Large\""),
        "{reply}"
    );
    stop_and_wait(&mut c, &s.name).await?;
    cluster.shutdown().await?;
    receiver.abort();
    let _ = receiver.await;
    Ok(())
}
