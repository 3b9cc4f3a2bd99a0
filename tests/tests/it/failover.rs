//! Failover: a dispatcher killed or restarted mid-turn loses no turn and
//! no event (the next owner re-attaches to the run on its node); a node
//! lost mid-turn loses that turn only, says so, and delivers its input
//! again elsewhere.

use std::time::{Duration, Instant};

use berth_proto::v1::{self as pb, sessions_client::SessionsClient};
use berth_tests::*;

/// The owner of a session, from the database.
async fn owner(cluster: &TestCluster, id: &str) -> anyhow::Result<String> {
    let mut db = <sqlx::PgConnection as sqlx::Connection>::connect(&cluster.database_url).await?;
    Ok(
        sqlx::query_scalar("SELECT owner FROM sessions WHERE id = $1::uuid")
            .bind(id)
            .fetch_one(&mut db)
            .await?,
    )
}

/// Sends `text` and waits until the session is running it.
async fn send_and_wait_running(
    c: &mut SessionsClient<berth_tests::Api>,
    name: &str,
    text: &str,
) -> anyhow::Result<i64> {
    let seq = send(c, name, text).await?;
    wait_for_status(c, name, pb::SessionStatus::Running, Duration::from_secs(30)).await?;
    Ok(seq)
}

/// Every agent line arrived once, the log is gapless, and no two owners
/// ever drove the session at once: each placement (a `starting` with its
/// epoch) is at a newer epoch than the last, and every running run's
/// events come after its own placement.
fn assert_no_loss_no_duplicate(events: &[pb::Event]) {
    let mut epoch = 0;
    for e in events
        .iter()
        .filter(|e| e.r#type == "session.status_starting")
    {
        let next = payload(e)["epoch"].as_i64().unwrap_or(0);
        assert!(next > epoch, "placed twice at epoch {next}");
        epoch = next;
    }
    let claims = events
        .iter()
        .filter(|e| e.r#type == "session.status_starting")
        .count();
    let started = events
        .iter()
        .filter(|e| e.r#type == "session.status_running" || e.r#type == "session.status_idle")
        .filter(|e| payload(e)["epoch"].is_i64())
        .count();
    assert!(
        started <= claims,
        "more runs started ({started}) than placements ({claims})"
    );
    for (i, e) in events.iter().enumerate() {
        assert_eq!(e.seq, i as i64 + 1, "seq gap at {}", e.seq);
    }
    assert_lines_well_formed(events);
    let lines = agent_lines(events);
    let mut seen = std::collections::HashSet::new();
    for l in &lines {
        assert!(
            seen.insert(l.clone()),
            "a line arrived twice: {}",
            String::from_utf8_lossy(l)
        );
    }
}

/// A cluster whose only dispatcher can be killed, and a session it owns,
/// idle after a first turn.
async fn owned_by_killable() -> anyhow::Result<(TestCluster, KillableDispatcher, pb::Session)> {
    let mut cluster = TestCluster::builder().nodes(1).start().await?;
    let mut k = cluster
        .add_killable_dispatcher("killable-dispatcher")
        .await?;
    cluster.sigterm_dispatcher().await?;
    let s = idle_session(&mut k.client, fake_session("echo ready")).await?;
    assert_eq!(owner(&cluster, &s.id).await?, "killable-dispatcher");
    Ok((cluster, k, s))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dispatcher_killed_mid_turn_loses_no_turn() -> anyhow::Result<()> {
    let (mut cluster, mut killable, s) = owned_by_killable().await?;
    let mut other = cluster.add_dispatcher().await?;
    let before = get(&mut other, &s.name).await?;
    let seq = send_and_wait_running(&mut other, &s.name, "delay 4000 survived the kill").await?;
    let killed = Instant::now();
    killable.kill();
    // The other dispatcher takes the session over once the killed one's
    // lease runs out, re-attaches to the run, and the turn ends as if
    // nothing happened.
    let reply = reply_after(&mut other, &s.name, seq).await?;
    eprintln!("the turn ended {:?} after the kill", killed.elapsed());
    assert_eq!(reply, "survived the kill");
    let after = get(&mut other, &s.name).await?;
    assert!(after.epoch > before.epoch, "a new owner took over");
    assert_eq!(after.status, pb::SessionStatus::Idle as i32);
    let events = events_of(&mut other, &s.name).await?;
    assert!(
        !events.iter().any(|e| e.r#type == "session.turn_lost"),
        "no turn was lost"
    );
    assert_no_loss_no_duplicate(&events);
    assert_eq!(
        events.iter().filter(|e| e.r#type == "agent.result").count(),
        2
    );
    assert_eq!(after.usage.expect("usage").turns, 2);
    // The same agent went on: it was started once.
    assert_eq!(
        events.iter().filter(|e| e.r#type == "runtime.init").count(),
        1
    );
    // And the session goes on.
    assert_eq!(
        turn(&mut other, &s.name, "echo still here").await?,
        "still here"
    );
    stop_and_wait(&mut other, &s.name).await?;
    cluster.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dispatchers_restarted_one_after_the_other_mid_turn_lose_nothing() -> anyhow::Result<()> {
    let (mut cluster, mut killable, s) = owned_by_killable().await?;
    // Restart 1: the owner is killed mid-turn; a new one comes up.
    let mut c1 = cluster.add_dispatcher().await?;
    let seq = send_and_wait_running(&mut c1, &s.name, "delay 3000 first restart").await?;
    killable.kill();
    assert_eq!(reply_after(&mut c1, &s.name, seq).await?, "first restart");
    // Restart 2: another comes up, and the owner now (the first one added)
    // stops for a rolling update (SIGTERM) mid-turn.
    let mut c2 = cluster.add_dispatcher().await?;
    let seq = send_and_wait_running(&mut c2, &s.name, "delay 3000 second restart").await?;
    let owner_now = owner(&cluster, &s.id).await?;
    cluster.sigterm_dispatcher_id(&owner_now)?;
    assert_eq!(reply_after(&mut c2, &s.name, seq).await?, "second restart");
    let events = events_of(&mut c2, &s.name).await?;
    assert!(!events.iter().any(|e| e.r#type == "session.turn_lost"));
    assert_no_loss_no_duplicate(&events);
    assert_eq!(
        events.iter().filter(|e| e.r#type == "runtime.init").count(),
        1,
        "the agent ran on in its container"
    );
    stop_and_wait(&mut c2, &s.name).await?;
    cluster.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_lost_mid_turn_loses_that_turn_says_so_and_delivers_it_again() -> anyhow::Result<()>
{
    let mut cluster = TestCluster::builder().nodes(2).start().await?;
    let mut c = cluster.client();
    let s = idle_session(&mut c, fake_session("echo ready")).await?;
    let ran_on = get(&mut c, &s.name).await?.node;
    let seq = send_and_wait_running(&mut c, &s.name, "delay 3000 delivered again").await?;
    let i = cluster.node_index(&ran_on)?;
    let lost = Instant::now();
    cluster.kill_node(i);
    // The turn's input reaches the agent again, on the other node.
    let mut replies = Vec::new();
    let events = collect_until(&mut c, &s.name, seq, Duration::from_secs(60), |e| {
        if e.r#type == "agent.message" {
            replies.push(payload(e)["text"].as_str().unwrap_or_default().to_string());
        }
        e.r#type == "session.status_idle" && !replies.is_empty()
    })
    .await?;
    eprintln!(
        "delivered again and answered {:?} after the node was lost",
        lost.elapsed()
    );
    assert_eq!(replies.last().map(String::as_str), Some("delivered again"));
    let turn_lost = events
        .iter()
        .find(|e| e.r#type == "session.turn_lost")
        .expect("the lost turn is an event");
    let p = payload(turn_lost);
    assert_eq!(p["message_seq"], seq);
    assert_eq!(p["node"], ran_on.as_str());
    assert_eq!(p["redelivered"], true);
    let now = get(&mut c, &s.name).await?;
    assert_ne!(now.node, ran_on);
    stop_and_wait(&mut c, &s.name).await?;
    cluster.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_outage_fails_calls_fast_and_reschedules_nothing() -> anyhow::Result<()> {
    let pg = berth_tests::pg::PrivatePostgres::start()?;
    let mut cluster = TestCluster::builder()
        .nodes(1)
        .database(pg.url())
        .start()
        .await?;
    let mut c0 = cluster.client();
    let mut c1 = cluster.add_dispatcher().await?;
    let mut sessions = Vec::new();
    for i in 0..2 {
        let s = c0
            .create_session(fake_session(&format!("echo s{i}")))
            .await?
            .into_inner();
        reply_after(&mut c0, &s.name, 0).await?;
        sessions.push(get(&mut c0, &s.name).await?);
    }
    // Postgres goes away for three dispatcher leases.
    pg.stop()?;
    let down = Instant::now();
    // Calls fail with UNAVAILABLE (retryable) instead of hanging until the
    // client gives up.
    for c in [&mut c0, &mut c1] {
        let mut req = tonic::Request::new(pb::GetSessionRequest {
            name: sessions[0].name.clone(),
        });
        req.set_timeout(Duration::from_secs(30));
        let e = c.get_session(req).await.expect_err("no database");
        assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
    }
    eprintln!(
        "calls failed UNAVAILABLE within {:?} of the outage",
        down.elapsed()
    );
    tokio::time::sleep(Duration::from_secs(6)).await;
    pg.start_again()?;
    let up = Instant::now();
    // Recovery is automatic, and nothing was marked lost for the outage.
    let mut back = None;
    for _ in 0..100 {
        if let Ok(s) = c1
            .get_session(pb::GetSessionRequest {
                name: sessions[0].name.clone(),
            })
            .await
        {
            back = Some(s.into_inner());
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    back.ok_or_else(|| anyhow::anyhow!("the API did not recover within 10 s"))?;
    eprintln!(
        "the API answered {:?} after Postgres came back",
        up.elapsed()
    );
    // Give the janitors a few leases to (wrongly) judge each other.
    tokio::time::sleep(Duration::from_secs(5)).await;
    for before in &sessions {
        let now = get(&mut c1, &before.name).await?;
        if now.status != pb::SessionStatus::Idle as i32 {
            for e in events_of(&mut c1, &now.name).await? {
                eprintln!("{} {} {}", e.seq, e.r#type, e.payload_json);
            }
        }
        assert_eq!(now.epoch, before.epoch, "{} was rescheduled", now.name);
        assert_eq!(now.status, pb::SessionStatus::Idle as i32, "{}", now.name);
        let events = events_of(&mut c1, &now.name).await?;
        assert!(
            !events
                .iter()
                .any(|e| e.r#type == "session.status_rescheduling"),
            "{} was re-queued for the outage",
            now.name
        );
        let reply = turn(&mut c1, &now.name, "echo after the outage").await?;
        assert_eq!(reply, "after the outage");
    }
    cluster.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_after_each_turn_keeps_files_and_conversation_through_a_node_loss()
-> anyhow::Result<()> {
    let mut cluster = TestCluster::builder()
        .nodes(2)
        .configure_node(|_, cfg, _| cfg.checkpoint_interval = Duration::from_millis(1))
        .start()
        .await?;
    let mut c = cluster.client();
    let s = idle_session(&mut c, fake_session("write notes.txt kept by a checkpoint")).await?;
    let checkpointed = wait_for_session(
        &mut c,
        &s.name,
        Duration::from_secs(30),
        "a checkpoint",
        |x| {
            x.snapshot
                .as_ref()
                .is_some_and(|k| k.key.contains("/checkpoints/"))
        },
    )
    .await?;
    let seq = send_and_wait_running(&mut c, &s.name, "delay 3000 after the loss").await?;
    let i = cluster.node_index(&checkpointed.node)?;
    cluster.kill_node(i);
    let mut replied = false;
    collect_until(&mut c, &s.name, seq, Duration::from_secs(60), |e| {
        replied |= e.r#type == "agent.message" && payload(e)["text"] == "after the loss";
        replied && e.r#type == "session.status_idle"
    })
    .await?;
    // Resumed elsewhere from the checkpoint: the file and the conversation
    // before the lost turn are there.
    assert_eq!(
        turn(&mut c, &s.name, "read notes.txt").await?,
        "kept by a checkpoint"
    );
    let history = turn(&mut c, &s.name, "history").await?;
    assert!(
        history.starts_with("write notes.txt kept by a checkpoint"),
        "conversation lost: {history}"
    );
    assert_ne!(get(&mut c, &s.name).await?.node, checkpointed.node);
    stop_and_wait(&mut c, &s.name).await?;
    cluster.shutdown().await
}

/// The CLI's follower (`berth run`, `berth sessions events --follow`)
/// rides through a rolling restart of the dispatcher behind its URL: the
/// stream ends UNAVAILABLE, it reconnects from the last seq, and sees
/// every event once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_follower_reconnects_through_a_restart_behind_its_url() -> anyhow::Result<()> {
    let mut cluster = TestCluster::builder().nodes(1).start().await?;
    let addr: std::net::SocketAddr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        l.local_addr()?
    };
    let mut c = cluster.add_dispatcher_on("behind-the-url-1", addr).await?;
    cluster.sigterm_dispatcher().await?;
    let s = idle_session(&mut c, fake_session("echo ready")).await?;
    let seq = send(&mut c, &s.name, "delay 3000 across the restart").await?;
    // Follow through a client on the URL, as the CLI does.
    let mut follower_client = c.clone();
    let name = s.name.clone();
    let follower = tokio::spawn(async move {
        let mut seen = Vec::new();
        let mut replied = false;
        berth_cli::follow::follow(&mut follower_client, &name, 0, |e| {
            replied |= e.r#type == "agent.message" && payload(e)["text"] == "across the restart";
            seen.push(e.clone());
            !(replied && e.r#type == "session.status_idle")
        })
        .await
        .map(|()| seen)
    });
    wait_for_status(
        &mut c,
        &s.name,
        pb::SessionStatus::Running,
        Duration::from_secs(30),
    )
    .await?;
    // The dispatcher behind the URL is replaced.
    cluster.sigterm_dispatcher_id("behind-the-url-1")?;
    let _replacement = cluster.add_dispatcher_on("behind-the-url-2", addr).await?;
    let seen = tokio::time::timeout(Duration::from_secs(60), follower).await???;
    assert!(
        seen.iter()
            .any(|e| e.seq > seq && e.r#type == "agent.message")
    );
    for (i, e) in seen.iter().enumerate() {
        assert_eq!(
            e.seq,
            i as i64 + 1,
            "the follower missed or repeated an event"
        );
    }
    cluster.shutdown().await
}

/// A node that stalls (as under SIGSTOP: its connections stop answering)
/// mid-turn is judged down after its lease; the turn is lost, said so, and
/// delivered again elsewhere. When the node comes back, its old run is
/// fenced: it adds nothing to the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_node_loses_only_the_turn_in_flight_and_its_return_changes_nothing()
-> anyhow::Result<()> {
    let cluster = TestCluster::builder().nodes(2).start().await?;
    let mut c = cluster.client();
    let s = idle_session(&mut c, fake_session("echo ready")).await?;
    let ran_on = get(&mut c, &s.name).await?.node;
    let seq = send_and_wait_running(&mut c, &s.name, "delay 3000 after the stall").await?;
    let stalled = &cluster.nodes[cluster.node_index(&ran_on)?];
    stalled.proxy.set_paused(true);
    let mut replied = false;
    let events = collect_until(&mut c, &s.name, seq, Duration::from_secs(60), |e| {
        replied |= e.r#type == "agent.message" && payload(e)["text"] == "after the stall";
        replied && e.r#type == "session.status_idle"
    })
    .await?;
    assert!(events.iter().any(|e| e.r#type == "session.turn_lost"));
    let moved = get(&mut c, &s.name).await?;
    assert_ne!(moved.node, ran_on);
    // The stalled node answers again: nothing of its old run lands.
    stalled.proxy.set_paused(false);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = get(&mut c, &s.name).await?;
    assert_eq!(
        after.last_seq, moved.last_seq,
        "the old run wrote to the log"
    );
    assert_eq!(after.epoch, moved.epoch);
    assert_eq!(
        turn(&mut c, &s.name, "echo still fine").await?,
        "still fine"
    );
    stop_and_wait(&mut c, &s.name).await?;
    cluster.shutdown().await
}

/// A dead dispatcher's thousands of sessions are released in pages, each a
/// transaction of its own beside the event writer: 2 500 sessions it left
/// stopping (more than two pages) all end `stopped` within seconds of its
/// lease running out, each once, each saying whose death stopped it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_a_dead_dispatchers_sessions_are_released_within_seconds() -> anyhow::Result<()>
{
    const LEFT: i64 = 2_500;
    let cluster = TestCluster::builder().nodes(1).start().await?;
    let mut c = cluster.client();
    let model = idle_session(&mut c, fake_session("echo model")).await?;
    stop_and_wait(&mut c, &model.name).await?;
    let mut db = <sqlx::PgConnection as sqlx::Connection>::connect(&cluster.database_url).await?;
    // Copies of a real session's row, left `stopping` by a dispatcher whose
    // last heartbeat was a minute ago.
    sqlx::query(
        "INSERT INTO dispatchers (id, heartbeat_time) VALUES ('dead-dispatcher', now() - interval '1 minute')",
    )
    .execute(&mut db)
    .await?;
    sqlx::query(
        "INSERT INTO sessions
         SELECT (jsonb_populate_record(s, jsonb_build_object(
             'id', gen_random_uuid(), 'request_id', NULL, 'status', 'stopping',
             'owner', 'dead-dispatcher', 'node', '', 'last_seq', 0, 'end_time', NULL))).*
         FROM sessions s, generate_series(1, $2)
         WHERE s.id = $1::uuid",
    )
    .bind(&model.id)
    .bind(LEFT)
    .execute(&mut db)
    .await?;
    let left = std::time::Instant::now();
    let mut open = LEFT;
    while open > 0 {
        anyhow::ensure!(
            left.elapsed() < Duration::from_secs(30),
            "{open} of {LEFT} sessions still not released after 30 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        open = sqlx::query_scalar(
            "SELECT count(*) FROM sessions WHERE owner = 'dead-dispatcher' AND status <> 'stopped'",
        )
        .fetch_one(&mut db)
        .await?;
    }
    eprintln!("{LEFT} sessions released in {:?}", left.elapsed());
    // Each ended once, as a stop (never a re-queue), naming the dead owner.
    let (ended, sessions): (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(DISTINCT e.session_id) FROM events e
         JOIN sessions s ON s.id = e.session_id
         WHERE s.id <> $1::uuid AND e.type = 'session.status_stopped'
           AND e.payload::jsonb ->> 'reason' = 'dispatcher dead-dispatcher stopped heartbeating while the session was stopping; stopped'
           AND e.payload::jsonb ->> 'owner' = 'dead-dispatcher'",
    )
    .bind(&model.id)
    .fetch_one(&mut db)
    .await?;
    assert_eq!((ended, sessions), (LEFT, LEFT));
    let still_owned: i64 =
        sqlx::query_scalar("SELECT count(*) FROM sessions WHERE owner = 'dead-dispatcher'")
            .fetch_one(&mut db)
            .await?;
    assert_eq!(still_owned, 0, "a stopped session keeps no owner");
    cluster.shutdown().await
}
