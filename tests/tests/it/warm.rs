//! Warm agents: a session whose agent could take a pre-started process
//! (no resume, no resources, no env) takes one from its agent's pool. The
//! process holds no secret and nothing of any other session, and a resume
//! takes a warm container with a cold process. On fake-claude and on the
//! real Claude Code CLI.

use std::time::Duration;

use berth_proto::v1::{
    self as pb, nodes_client::NodesClient, secrets_client::SecretsClient,
    sessions_client::SessionsClient,
};
use berth_tests::*;

/// Waits until some node has a pre-started process of `image` ready.
async fn agent_ready(cluster: &TestCluster, image: &str) -> anyhow::Result<()> {
    let mut nodes = NodesClient::new(cluster.api());
    for _ in 0..300 {
        let list = nodes
            .list_nodes(pb::ListNodesRequest {})
            .await?
            .into_inner();
        if list
            .nodes
            .iter()
            .flat_map(|n| n.warm.iter())
            .any(|w| !w.agent_key.is_empty() && w.image == image && w.ready > 0)
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    anyhow::bail!("no pre-started process of {image} became ready within 60 s")
}

/// How each run of the session started: the `start` of each change out of
/// `starting` (to running, or to idle when no input waited).
async fn start_paths(c: &mut SessionsClient<Api>, name: &str) -> anyhow::Result<Vec<String>> {
    Ok(events_of(c, name)
        .await?
        .iter()
        .filter(|e| payload(e)["previous"] == "starting" && payload(e)["start"].is_string())
        .map(|e| payload(e)["start"].as_str().unwrap_or_default().to_string())
        .collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_session_takes_a_pre_started_process_holding_no_secret_nor_the_first_ones_data()
-> anyhow::Result<()> {
    let cluster = TestCluster::builder().start().await?;
    let (alpha, _) = crate::access::member_of(&cluster, "alpha").await?;
    let key = format!("sk-ant-api03-warm-{}", uuid::Uuid::new_v4().simple());
    let secret = SecretsClient::new(alpha.clone())
        .create_secret(pb::CreateSecretRequest {
            display_name: "model key".into(),
            usage: pb::SecretUsage::AnthropicApiKey as i32,
            value: key.clone(),
            ..Default::default()
        })
        .await?
        .into_inner();
    let request = |first: &str| pb::CreateSessionRequest {
        spec: Some(pb::AgentSpec {
            image: TEST_IMAGE.into(),
            runtime: pb::Runtime::ClaudeCode as i32,
            vault_ids: vec![secret.name.clone()],
            ..Default::default()
        }),
        initial_message: first.into(),
        ..Default::default()
    };
    let mut c = SessionsClient::new(alpha.clone());

    // The first session of the agent finds no process: the node starts
    // one for the next.
    let s1 = c
        .create_session(request("write first-session.txt private to the first"))
        .await?
        .into_inner();
    let reply = reply_after(&mut c, &s1.name, 0).await?;
    assert!(reply.contains("wrote"), "{reply}");
    assert_ne!(start_paths(&mut c, &s1.name).await?, vec!["warm_process"]);
    agent_ready(&cluster, TEST_IMAGE).await?;

    // The second takes it, and its first message rides in the start.
    let s2 = c
        .create_session(request("echo hello from a pre-started agent"))
        .await?
        .into_inner();
    let reply = reply_after(&mut c, &s2.name, 0).await?;
    assert!(reply.contains("hello from a pre-started agent"), "{reply}");
    assert_eq!(start_paths(&mut c, &s2.name).await?, vec!["warm_process"]);
    let got = get(&mut c, &s2.name).await?;
    assert_eq!(got.status, pb::SessionStatus::Idle as i32);

    // Its container took the session's name at the claim; it holds neither
    // the key (the gateway attaches it) nor the first session's file.
    let containers = containers_of_started(&s2.id).await?;
    assert_eq!(containers.len(), 1, "{containers:?}");
    let environ = exec_output(&containers[0], &["sh", "-c", "cat /proc/*/environ"]).await?;
    assert!(!environ.contains(&key), "the key is in the process's env");
    assert!(
        !environ.contains(&s1.id) && !environ.contains(&s2.id),
        "session ids in the env"
    );
    let files = exec_output(&containers[0], &["sh", "-c", "ls -a /workspace ~"]).await?;
    assert!(!files.contains("first-session.txt"), "{files}");
    let read = c
        .send_message(pb::SendMessageRequest {
            name: s2.name.clone(),
            text: "read first-session.txt".into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    let reply = reply_after(&mut c, &s2.name, read.seq).await?;
    assert!(reply.contains("missing"), "{reply}");

    // A resume cannot take a pre-started process: a warm container (or a
    // cold one) and a fresh process, and the conversation goes on.
    c.pause_session(pb::PauseSessionRequest {
        name: s2.name.clone(),
    })
    .await?;
    wait_for_status(
        &mut c,
        &s2.name,
        pb::SessionStatus::Paused,
        Duration::from_secs(60),
    )
    .await?;
    c.resume_session(pb::ResumeSessionRequest {
        name: s2.name.clone(),
    })
    .await?;
    wait_for_status(
        &mut c,
        &s2.name,
        pb::SessionStatus::Idle,
        Duration::from_secs(60),
    )
    .await?;
    let paths = start_paths(&mut c, &s2.name).await?;
    assert_eq!(paths.len(), 2, "{paths:?}");
    assert_ne!(paths[1], "warm_process", "{paths:?}");
    let again = c
        .send_message(pb::SendMessageRequest {
            name: s2.name.clone(),
            text: "history".into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    let reply = reply_after(&mut c, &s2.name, again.seq).await?;
    assert!(reply.contains("hello from a pre-started agent"), "{reply}");

    stop_and_wait(&mut c, &s1.name).await?;
    stop_and_wait(&mut c, &s2.name).await?;
    no_containers_left(&s2.id).await?;
    cluster.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_real_cli_pre_started_answers_its_first_message() -> anyhow::Result<()> {
    let cluster = crate::claude::cluster().await?;
    let mut c = cluster.client();
    // No env (a pre-started process takes none): the stand-in's key comes
    // from an apiKeyHelper in the CLI's arguments.
    let request = |first: &str| pb::CreateSessionRequest {
        spec: Some(pb::AgentSpec {
            image: "berth-test-claude:latest".into(),
            runtime: pb::Runtime::ClaudeCode as i32,
            model: "claude-sonnet-4-5".into(),
            runtime_args: vec![
                "--settings".into(),
                r#"{"apiKeyHelper":"echo stand-in"}"#.into(),
            ],
            ..Default::default()
        }),
        initial_message: first.into(),
        ..Default::default()
    };
    let s1 = c
        .create_session(request("say hello first"))
        .await?
        .into_inner();
    let reply = reply_after(&mut c, &s1.name, 0).await?;
    assert!(reply.contains("hello first"), "{reply}");
    stop_and_wait(&mut c, &s1.name).await?;
    agent_ready(&cluster, "berth-test-claude:latest").await?;

    let s2 = c
        .create_session(request("say hello from a pre-started CLI"))
        .await?
        .into_inner();
    let reply = reply_after(&mut c, &s2.name, 0).await?;
    assert!(reply.contains("hello from a pre-started CLI"), "{reply}");
    assert_eq!(start_paths(&mut c, &s2.name).await?, vec!["warm_process"]);
    // The CLI answered berth's `initialize` before it was offered: the
    // answer is not the session's, and its first line is the CLI's init.
    let events = events_of(&mut c, &s2.name).await?;
    let lines = agent_lines(&events);
    assert!(
        lines
            .iter()
            .all(|l| !String::from_utf8_lossy(l).contains("berth-warm-up")),
        "the warm-up's answer reached the session"
    );
    let first: serde_json::Value = serde_json::from_slice(&lines[0])?;
    assert_eq!(
        (first["type"].as_str(), first["subtype"].as_str()),
        (Some("system"), Some("init"))
    );
    // The CLI's own session id is the one berth resumes under.
    let got = get(&mut c, &s2.name).await?;
    assert!(!got.runtime_session_id.is_empty(), "{got:?}");
    let usage = got.usage.expect("usage");
    assert_eq!(usage.turns, 1);
    let next = c
        .send_message(pb::SendMessageRequest {
            name: s2.name.clone(),
            text: "say hello again".into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    let reply = reply_after(&mut c, &s2.name, next.seq).await?;
    assert!(reply.contains("hello again"), "{reply}");
    stop_and_wait(&mut c, &s2.name).await?;
    cluster.shutdown().await
}
