//! Durable sessions: snapshots across nodes, memory stores, resources,
//! timeouts and budget, delete, export. Real Docker, Postgres and an S3
//! server (s3s-fs) on loopback.

use std::time::Duration;

use berth_proto::v1::{self as pb, agents_client::AgentsClient, files_client::FilesClient};
use berth_tests::{
    TEST_IMAGE, TestCluster, containers_of, events_of, fake_session, get, no_containers_left,
    payload, reply_after, stop_and_wait, turn, wait_for_status,
};
use sqlx::Row;

fn agents(cluster: &TestCluster) -> anyhow::Result<AgentsClient<berth_tests::Api>> {
    Ok(AgentsClient::new(cluster.api()))
}

fn files(cluster: &TestCluster) -> anyhow::Result<FilesClient<berth_tests::Api>> {
    Ok(FilesClient::new(cluster.api()))
}

fn test_agent_spec() -> pb::AgentSpec {
    pb::AgentSpec {
        image: TEST_IMAGE.into(),
        ..Default::default()
    }
}

/// Files under `prefix` in the S3 server's bucket directory.
fn stored_objects(cluster: &TestCluster, prefix: &str) -> Vec<String> {
    let root = cluster.s3.root.join(berth_tests::s3::BUCKET);
    let mut out = Vec::new();
    let mut dirs = vec![root.join(prefix)];
    while let Some(d) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            if e.path().is_dir() {
                dirs.push(e.path());
            } else {
                out.push(e.path().display().to_string());
            }
        }
    }
    out
}

#[tokio::test]
async fn pause_and_resume_carry_files_and_conversation_across_nodes() -> anyhow::Result<()> {
    let cluster = TestCluster::builder().nodes(3).capacity(4).start().await?;
    let mut c = cluster.client();
    let mut nodes = cluster.nodes_client();
    let s = c
        .create_session(fake_session("write notes.txt round-1"))
        .await?
        .into_inner();
    let name = s.name.clone();
    reply_after(&mut c, &name, 0).await?;
    let first = get(&mut c, &name).await?;
    let original_id = first.runtime_session_id.clone();
    assert!(original_id.starts_with("fake-"), "{original_id}");
    let mut ran_on = vec![first.node.clone()];

    for round in 2..=4 {
        c.pause_session(pb::PauseSessionRequest { name: name.clone() })
            .await?;
        let paused = wait_for_status(
            &mut c,
            &name,
            pb::SessionStatus::Paused,
            Duration::from_secs(60),
        )
        .await?;
        let snap = paused
            .snapshot
            .clone()
            .expect("a paused session has a snapshot");
        assert!(
            snap.key
                .ends_with(&format!("/snapshots/{}.tar.zst", round - 1)),
            "{}",
            snap.key
        );
        assert!(snap.size_bytes > 0);
        assert!(
            containers_of(&paused.id).await?.is_empty(),
            "pause frees the container"
        );
        // Send it elsewhere: drain where it ran (two of three nodes end drained).
        if round <= 3 {
            let last = ran_on.last().cloned().unwrap_or_default();
            nodes
                .drain_node(pb::DrainNodeRequest { node: last })
                .await?;
        }
        c.resume_session(pb::ResumeSessionRequest { name: name.clone() })
            .await?;
        let read = turn(&mut c, &name, "read notes.txt").await?;
        assert_eq!(
            read,
            format!("round-{}", round - 1),
            "the workspace file survived resume {}",
            round - 1
        );
        let history = turn(&mut c, &name, "history").await?;
        assert!(
            history.starts_with("write notes.txt round-1 | "),
            "the runtime resumed its conversation: {history}"
        );
        turn(&mut c, &name, &format!("write notes.txt round-{round}")).await?;
        let now = get(&mut c, &name).await?;
        assert_eq!(
            now.runtime_session_id, original_id,
            "the original runtime id is kept"
        );
        if round <= 3 {
            assert!(
                !ran_on.contains(&now.node),
                "round {round} ran on {} again",
                now.node
            );
        }
        ran_on.push(now.node.clone());
    }
    // The resumed runtime reported a new id; berth passed the original.
    let events = events_of(&mut c, &name).await?;
    let inits: Vec<String> = events
        .iter()
        .filter(|e| e.r#type == "runtime.init")
        .map(|e| {
            payload(e)["session_id"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        })
        .collect();
    assert_eq!(inits.len(), 4, "{inits:?}");
    assert!(
        inits[1..].iter().all(|i| i.starts_with("resumed-")),
        "{inits:?}"
    );
    // One log across three pauses: seqs 1..n with no gap.
    for (i, e) in events.iter().enumerate() {
        assert_eq!(e.seq, i as i64 + 1, "gap or duplicate at {}", e.r#type);
    }
    assert_eq!(
        events
            .iter()
            .filter(|e| e.r#type == "session.status_paused")
            .count(),
        3
    );
    cluster.shutdown().await
}

#[tokio::test]
async fn a_read_write_memory_store_outlives_its_session() -> anyhow::Result<()> {
    let cluster = TestCluster::builder().nodes(1).capacity(4).start().await?;
    let mut c = cluster.client();
    let mut a = agents(&cluster)?;
    let v1 = a
        .create_agent(pb::CreateAgentRequest {
            agent_id: "keeper".into(),
            spec: Some(test_agent_spec()),
        })
        .await?
        .into_inner();
    assert_eq!((v1.version, v1.latest_version), (1, 1));
    let memory = |access: pb::MemoryAccess| pb::Resource {
        kind: Some(pb::resource::Kind::Memory(pb::MemoryResource {
            store: "notes".into(),
            path: "/workspace/memory".into(),
            access: access as i32,
        })),
    };
    let session = |access, prompt: &str| pb::CreateSessionRequest {
        agent: "keeper".into(),
        initial_message: prompt.into(),
        resources: vec![memory(access)],
        ..Default::default()
    };
    let run = |req: pb::CreateSessionRequest| {
        let mut c = c.clone();
        async move {
            let s = c.create_session(req).await?.into_inner();
            let reply = reply_after(&mut c, &s.name, 0).await?;
            stop_and_wait(&mut c, &s.name).await?;
            anyhow::Ok((s, reply))
        }
    };
    let (s1, _) = run(session(
        pb::MemoryAccess::ReadWrite,
        "write memory/fact.txt sky-is-blue",
    ))
    .await?;
    assert_eq!((s1.agent.as_str(), s1.agent_version), ("agents/keeper", 1));
    // The next session of the agent sees it; a read-only one cannot change it.
    let (_, seen) = run(session(pb::MemoryAccess::ReadOnly, "read memory/fact.txt")).await?;
    assert_eq!(seen, "sky-is-blue");
    run(session(
        pb::MemoryAccess::ReadOnly,
        "write memory/fact.txt grass-is-red",
    ))
    .await?;
    // A new agent version: sessions take the latest unless pinned.
    a.update_agent(pb::UpdateAgentRequest {
        name: "agents/keeper".into(),
        spec: Some(pb::AgentSpec {
            model: "claude-opus-4-1".into(),
            ..test_agent_spec()
        }),
    })
    .await?;
    let (s4, seen) = run(session(pb::MemoryAccess::ReadWrite, "read memory/fact.txt")).await?;
    assert_eq!(seen, "sky-is-blue", "read-only changes are discarded");
    assert_eq!(s4.agent_version, 2);
    assert_eq!(s4.spec.unwrap_or_default().model, "claude-opus-4-1");
    let pinned = c
        .create_session(pb::CreateSessionRequest {
            agent: "keeper@1".into(),
            initial_message: "echo pinned".into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_eq!(pinned.agent_version, 1);
    assert_eq!(pinned.spec.unwrap_or_default().model, "");
    // Memory stores belong to agents: refused without one, naming the field.
    let err = c
        .create_session(pb::CreateSessionRequest {
            resources: vec![memory(pb::MemoryAccess::ReadOnly)],
            ..fake_session("echo x")
        })
        .await
        .expect_err("memory without an agent");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message().contains("resources.memory"),
        "{}",
        err.message()
    );
    cluster.shutdown().await
}

#[tokio::test]
async fn files_and_git_repositories_are_placed_before_the_agent_starts() -> anyhow::Result<()> {
    // Repositories come from a git server on loopback, which the dispatcher
    // and the node allowlist explicitly (internal hosts are refused else).
    let served = std::env::temp_dir().join(format!("berth-git-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&served)?;
    let server = berth_tests::git_http::GitServer::start(served.clone()).await?;
    let (allow_d, allow_n) = (server.host(), server.host());
    let cluster = TestCluster::builder()
        .nodes(1)
        .capacity(4)
        .configure_dispatcher(move |cfg| cfg.git_allow_hosts = vec![allow_d.clone()])
        .configure_node(move |_, cfg, _| cfg.git_allow_hosts = vec![allow_n.clone()])
        .start()
        .await?;
    let mut c = cluster.client();
    let f = files(&cluster)?
        .upload_file(pb::UploadFileRequest {
            display_name: "input.txt".into(),
            content: b"forty-two".to_vec(),
        })
        .await?
        .into_inner();
    assert_eq!(f.size_bytes, 9);
    // A local repository with the wanted content on a branch only.
    let repo = std::env::temp_dir().join(format!("berth-repo-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&repo)?;
    let git = |args: &[&str]| berth_tests::git_http::git(&repo, args);
    git(&["init", "-q"])?;
    std::fs::write(repo.join("README.md"), "main branch")?;
    git(&["add", "."])?;
    git(&["commit", "-qm", "main"])?;
    git(&["checkout", "-qb", "feature"])?;
    std::fs::write(repo.join("README.md"), "feature branch")?;
    git(&["commit", "-qam", "feature"])?;
    git(&["checkout", "-q", "main"])?;
    // Published as a bare repository over git's dumb HTTP.
    let bare = served.join("repo.git");
    git(&["clone", "-q", "--bare", ".", &bare.to_string_lossy()])?;
    let out = std::process::Command::new("git")
        .args(["update-server-info"])
        .current_dir(&bare)
        .output()?;
    anyhow::ensure!(out.status.success(), "update-server-info failed");
    let repo_url = server.url("repo.git");
    let resources = vec![
        pb::Resource {
            kind: Some(pb::resource::Kind::File(pb::FileResource {
                file: f.name.clone(),
                path: "/workspace/data/input.txt".into(),
            })),
        },
        pb::Resource {
            kind: Some(pb::resource::Kind::Git(pb::GitResource {
                url: repo_url.clone(),
                r#ref: "feature".into(),
                path: "/workspace/repo".into(),
                ssh_key_secret: String::new(),
                ..Default::default()
            })),
        },
    ];
    let s = c
        .create_session(pb::CreateSessionRequest {
            resources: resources.clone(),
            ..fake_session("read data/input.txt")
        })
        .await?
        .into_inner();
    assert_eq!(reply_after(&mut c, &s.name, 0).await?, "forty-two");
    assert_eq!(
        turn(&mut c, &s.name, "read repo/README.md").await?,
        "feature branch"
    );
    c.stop_session(pb::StopSessionRequest {
        name: s.name.clone(),
    })
    .await?;

    // A file that does not exist is refused at creation, naming the field.
    let err = c
        .create_session(pb::CreateSessionRequest {
            resources: vec![pb::Resource {
                kind: Some(pb::resource::Kind::File(pb::FileResource {
                    file: format!("files/{}", uuid::Uuid::now_v7()),
                    path: "/workspace/x".into(),
                })),
            }],
            ..fake_session("echo x")
        })
        .await
        .expect_err("missing file");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message().contains("resources.file"),
        "{}",
        err.message()
    );
    // A path outside the writable volumes is refused before any container.
    let outside = c
        .create_session(pb::CreateSessionRequest {
            resources: vec![pb::Resource {
                kind: Some(pb::resource::Kind::Git(pb::GitResource {
                    url: repo_url.clone(),
                    r#ref: String::new(),
                    path: "/workspace/../etc".into(),
                    ssh_key_secret: String::new(),
                    ..Default::default()
                })),
            }],
            ..fake_session("echo x")
        })
        .await
        .expect_err("path with ..");
    assert!(
        outside.message().contains("resources.git.path"),
        "{}",
        outside.message()
    );
    // Host paths, file:// and internal hosts not allowlisted are refused
    // at creation, naming the field.
    for url in [
        repo.display().to_string(),
        format!("file://{}", bare.display()),
        "http://127.0.0.1:1/repo.git".to_string(),
        "https://10.0.0.1/repo.git".to_string(),
    ] {
        let e = c
            .create_session(pb::CreateSessionRequest {
                resources: vec![pb::Resource {
                    kind: Some(pb::resource::Kind::Git(pb::GitResource {
                        url: url.clone(),
                        r#ref: String::new(),
                        path: "/workspace/repo".into(),
                        ssh_key_secret: String::new(),
                        ..Default::default()
                    })),
                }],
                ..fake_session("echo x")
            })
            .await
            .expect_err("a git source that is not allowed");
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{url}");
        assert!(
            e.message().contains("resources.git.url"),
            "{url}: {}",
            e.message()
        );
    }
    // An unreadable repository fails the start with the reason; nothing leaks.
    let missing = server.url("nonexistent.git");
    let bad = c
        .create_session(pb::CreateSessionRequest {
            resources: vec![pb::Resource {
                kind: Some(pb::resource::Kind::Git(pb::GitResource {
                    url: missing.clone(),
                    r#ref: String::new(),
                    path: "/workspace/repo".into(),
                    ssh_key_secret: String::new(),
                    ..Default::default()
                })),
            }],
            ..fake_session("echo x")
        })
        .await?
        .into_inner();
    let failed = wait_for_status(
        &mut c,
        &bad.name,
        pb::SessionStatus::Failed,
        Duration::from_secs(60),
    )
    .await?;
    assert!(
        failed
            .status_reason
            .contains(&format!("git repository {missing}")),
        "{}",
        failed.status_reason
    );
    no_containers_left(&bad.id).await?;
    let _ = std::fs::remove_dir_all(&repo);
    let _ = std::fs::remove_dir_all(&served);
    cluster.shutdown().await?;
    server.stop().await;
    Ok(())
}

#[tokio::test]
async fn timeouts_budget_and_queue_deadline_end_sessions_with_their_reason() -> anyhow::Result<()> {
    let cluster = TestCluster::builder().nodes(1).capacity(4).start().await?;
    let mut c = cluster.client();
    let secs = |s: i64| {
        Some(prost_types::Duration {
            seconds: s,
            nanos: 0,
        })
    };

    let idle = c
        .create_session(pb::CreateSessionRequest {
            inactivity_timeout: secs(1),
            ..fake_session("echo hi")
        })
        .await?
        .into_inner();
    let hard = c
        .create_session(pb::CreateSessionRequest {
            timeout: secs(2),
            ..fake_session("hang")
        })
        .await?
        .into_inner();
    // The fake agent charges (3·in + 15·out)/1e6 USD: "echo hello" costs 0.000105.
    let budget = c
        .create_session(pb::CreateSessionRequest {
            budget_usd: 0.0001,
            ..fake_session("echo hello")
        })
        .await?
        .into_inner();

    let s = wait_for_status(
        &mut c,
        &idle.name,
        pb::SessionStatus::Stopped,
        Duration::from_secs(30),
    )
    .await?;
    assert_eq!(s.status_reason, "inactivity");
    assert!(s.snapshot.is_some(), "an inactivity stop keeps a snapshot");
    let s = wait_for_status(
        &mut c,
        &hard.name,
        pb::SessionStatus::Timeout,
        Duration::from_secs(30),
    )
    .await?;
    assert!(
        s.status_reason.contains("session timeout of 2s"),
        "{}",
        s.status_reason
    );
    let s = wait_for_status(
        &mut c,
        &budget.name,
        pb::SessionStatus::Stopped,
        Duration::from_secs(30),
    )
    .await?;
    assert_eq!(s.status_reason, "budget");
    assert!(s.usage.unwrap_or_default().cost_usd >= 0.0001);
    for s in [&idle, &hard, &budget] {
        no_containers_left(&s.id).await?;
    }

    // With the only node draining, nothing is placed: the deadline fails it.
    cluster
        .nodes_client()
        .drain_node(pb::DrainNodeRequest {
            node: cluster.nodes[0].id.clone(),
        })
        .await?;
    let queued = c
        .create_session(pb::CreateSessionRequest {
            queue_timeout: secs(1),
            ..fake_session("echo never")
        })
        .await?
        .into_inner();
    assert!(queued.queue_deadline.is_some());
    let s = wait_for_status(
        &mut c,
        &queued.name,
        pb::SessionStatus::Failed,
        Duration::from_secs(30),
    )
    .await?;
    assert!(
        s.status_reason.contains("queue deadline"),
        "{}",
        s.status_reason
    );
    cluster.shutdown().await
}

#[tokio::test]
async fn delete_is_refused_while_live_and_then_leaves_nothing_behind() -> anyhow::Result<()> {
    let cluster = TestCluster::builder().nodes(1).capacity(4).start().await?;
    let mut c = cluster.client();
    let s = c
        .create_session(fake_session("write a.txt keep"))
        .await?
        .into_inner();
    reply_after(&mut c, &s.name, 0).await?;
    let err = c
        .delete_session(pb::DeleteSessionRequest {
            name: s.name.clone(),
        })
        .await
        .expect_err("deleting a live session");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    let stopped = stop_and_wait(&mut c, &s.name).await?;
    assert!(stopped.snapshot.is_some());
    let prefix = format!("sessions/{}", s.id);
    assert!(
        !stored_objects(&cluster, &prefix).is_empty(),
        "the stop left a snapshot"
    );

    // A clone has the configuration and none of the history.
    let clone = c
        .clone_session(pb::CloneSessionRequest {
            name: s.name.clone(),
            request_id: String::new(),
        })
        .await?
        .into_inner();
    assert_ne!(clone.id, s.id);
    assert_eq!(clone.spec, stopped.spec);
    assert!(clone.snapshot.is_none());
    // Its log has none of the original's conversation (it may already be
    // claimed and starting, so its own status events may be there).
    let history: Vec<String> = events_of(&mut c, &clone.name)
        .await?
        .into_iter()
        .map(|e| e.r#type)
        .filter(|t| t == "user.message" || t == "agent.message")
        .collect();
    assert!(history.is_empty(), "no history: {history:?}");
    // The clone's audit record names what it was cloned from.
    let trail = pb::audit_client::AuditClient::new(cluster.api())
        .list_audit_events(pb::ListAuditEventsRequest {
            resource: clone.name.clone(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .events;
    assert_eq!(trail.len(), 1, "{trail:?}");
    assert_eq!(trail[0].action, "session.clone");
    let detail: serde_json::Value = serde_json::from_str(&trail[0].detail_json)?;
    assert_eq!(detail["from"], s.name.as_str(), "{detail}");

    let r = c
        .delete_session(pb::DeleteSessionRequest {
            name: s.name.clone(),
        })
        .await?
        .into_inner();
    assert!(r.objects_deleted >= 1);
    let gone = c
        .get_session(pb::GetSessionRequest {
            name: s.name.clone(),
        })
        .await
        .expect_err("deleted");
    assert_eq!(gone.code(), tonic::Code::NotFound);
    let mut db = <sqlx::PgConnection as sqlx::Connection>::connect(&cluster.database_url).await?;
    let id = uuid::Uuid::parse_str(&s.id)?;
    for table in ["sessions", "events", "session_turns"] {
        let col = if table == "sessions" {
            "id"
        } else {
            "session_id"
        };
        let n: i64 = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT count(*) FROM {table} WHERE {col} = $1"
        )))
        .bind(id)
        .fetch_one(&mut db)
        .await?
        .try_get(0)?;
        assert_eq!(n, 0, "{table} still has rows of the deleted session");
    }
    assert!(
        stored_objects(&cluster, &prefix).is_empty(),
        "snapshots remain"
    );
    c.stop_session(pb::StopSessionRequest {
        name: clone.name.clone(),
    })
    .await?;
    cluster.shutdown().await
}

#[tokio::test]
async fn export_reads_as_the_recorded_conversation() -> anyhow::Result<()> {
    let transcript = berth_tests::fixture("explore_count_files.jsonl")?;
    let cluster = TestCluster::builder().nodes(1).capacity(2).start().await?;
    let mut c = cluster.client();
    let prompt = "replay /fixtures/claude-code/explore_count_files.jsonl";
    let s = c.create_session(fake_session(prompt)).await?.into_inner();
    reply_after(&mut c, &s.name, 0).await?;
    stop_and_wait(&mut c, &s.name).await?;
    c.archive_session(pb::ArchiveSessionRequest {
        name: s.name.clone(),
    })
    .await?;
    let send = c
        .send_message(pb::SendMessageRequest {
            name: s.name.clone(),
            text: "echo late".into(),
            ..Default::default()
        })
        .await
        .expect_err("an archived session is read-only");
    assert_eq!(send.code(), tonic::Code::FailedPrecondition);

    let md = c
        .export_session(pb::ExportSessionRequest {
            name: s.name.clone(),
            format: pb::ExportFormat::Markdown as i32,
        })
        .await?
        .into_inner();
    assert_eq!(md.content_type, "text/markdown");
    let md = md.content;
    // What the transcript says, in its order: the prompt, every assistant
    // text, every tool call (name and command) and tool result.
    let mut expected = vec![format!("## User\n\n{prompt}")];
    for line in transcript.lines() {
        let v: serde_json::Value = serde_json::from_str(line)?;
        let blocks = v["message"]["content"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        for b in blocks {
            match (v["type"].as_str(), b["type"].as_str()) {
                (Some("assistant"), Some("text")) => {
                    expected.push(format!(
                        "## Assistant\n\n{}",
                        b["text"].as_str().unwrap_or_default()
                    ));
                }
                (Some("assistant"), Some("tool_use")) => {
                    expected.push(format!(
                        "**Tool call** `{}`",
                        b["name"].as_str().unwrap_or_default()
                    ));
                    if let Some(cmd) = b["input"]["command"].as_str() {
                        expected.push(serde_json::to_string(cmd)?);
                    }
                }
                (Some("user"), Some("tool_result")) => {
                    expected.push(format!(
                        "**Tool result**{}",
                        if b["is_error"] == true {
                            " (error)"
                        } else {
                            ""
                        }
                    ));
                    let text = match &b["content"] {
                        serde_json::Value::String(s) => s.clone(),
                        other => other[0]["text"].as_str().unwrap_or_default().to_string(),
                    };
                    if let Some(first) = text.lines().find(|l| !l.trim().is_empty()) {
                        expected.push(first.to_string());
                    }
                }
                _ => {}
            }
        }
    }
    assert!(
        expected.len() >= 6,
        "the fixture has a conversation: {expected:?}"
    );
    let mut at = 0;
    for want in &expected {
        match md[at..].find(want.as_str()) {
            Some(i) => at += i + want.len(),
            None => panic!("export lacks (or misorders) {want:?}\n---\n{md}"),
        }
    }
    assert!(md.contains("_Turn 1 usage:"), "{md}");

    let json = c
        .export_session(pb::ExportSessionRequest {
            name: s.name.clone(),
            format: pb::ExportFormat::Json as i32,
        })
        .await?
        .into_inner();
    let doc: serde_json::Value = serde_json::from_str(&json.content)?;
    let last = get(&mut c, &s.name).await?.last_seq;
    assert_eq!(doc["events"].as_array().map(Vec::len), Some(last as usize));
    assert_eq!(doc["session"]["status"], "archived");
    cluster.shutdown().await
}
