//! Scenario 8: failover. N live sessions, each mid-turn, while the
//! dispatchers are restarted one after the other: one stops for a rolling
//! update (SIGTERM) and its replacement comes up, then another is killed
//! (as `kill -9`). Every session is followed by a client that reconnects
//! to any live dispatcher with `after_seq`, as the CLI does. Reports turns
//! lost, events lost or duplicated, the time until every stream resumed,
//! and until every turn ended. Goal: 0 lost, and every stream resumed
//! within 2× the dispatcher lease.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use berth_proto::v1::{self as pb, sessions_client::SessionsClient};
use berth_tests::TestCluster;
use futures::StreamExt;
use serde::Serialize;
use tokio::time::Instant;

use crate::cluster::ClusterArgs;
use crate::report::{Errors, Hist, Report};

/// The dispatcher lease of the in-process cluster.
const LEASE: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, clap::Args, Serialize)]
pub struct FailoverArgs {
    /// Live sessions, each mid-turn during the restarts.
    #[arg(long, default_value_t = 20)]
    pub sessions: usize,
    /// How long each turn runs (the agent waits this long, then replies).
    #[arg(long, default_value_t = 4000)]
    pub turn_ms: u64,
}

/// What one follower saw.
#[derive(Default)]
struct Seen {
    events: Vec<pb::Event>,
    /// Time from each interruption to the stream opening again.
    resumed: Vec<Duration>,
    /// When the turn's reply arrived, since the first restart.
    ended: Option<Duration>,
}

/// Live dispatchers' clients; a follower tries them in turn.
type Clients = Arc<Mutex<Vec<SessionsClient<berth_tests::Api>>>>;

async fn follow(
    clients: Clients,
    name: String,
    mut after: i64,
    reply: String,
    restarted: Arc<Mutex<Option<Instant>>>,
) -> Seen {
    let mut seen = Seen::default();
    let mut next = 0usize;
    let mut interrupted: Option<Instant> = None;
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut replied = false;
    while Instant::now() < deadline {
        let mut client = {
            let all = clients.lock().map(|c| c.clone()).unwrap_or_default();
            if all.is_empty() {
                return seen;
            }
            all[next % all.len()].clone()
        };
        next += 1;
        let req = pb::StreamEventsRequest {
            name: name.clone(),
            after_seq: after,
        };
        let Ok(stream) = client.stream_events(req).await else {
            interrupted.get_or_insert_with(Instant::now);
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        if let Some(t) = interrupted.take() {
            seen.resumed.push(t.elapsed());
        }
        let mut stream = stream.into_inner();
        while let Some(item) = stream.next().await {
            let Ok(e) = item else {
                interrupted = Some(Instant::now());
                break;
            };
            after = after.max(e.seq);
            replied |= e.r#type == "agent.message"
                && serde_json::from_str::<serde_json::Value>(&e.payload_json)
                    .is_ok_and(|p| p["text"] == reply.as_str());
            let done = replied && e.r#type == "session.status_idle";
            seen.events.push(e);
            if done {
                let since = restarted.lock().ok().and_then(|r| *r);
                seen.ended = since.map(|t| t.elapsed());
                return seen;
            }
        }
    }
    seen
}

/// What the followers saw against what was stored.
struct Tally {
    resumed: Hist,
    ended: Hist,
    turns_lost: u32,
    events_lost: u32,
    duplicates: u32,
    worst_resume: Duration,
}

/// Tallies each session's follower (`seen`) against its stored events
/// after `afters`: resumes, turn ends, losses and duplicates.
async fn tally(
    c: &mut SessionsClient<berth_tests::Api>,
    names: &[String],
    afters: &[i64],
    seen: &[Seen],
) -> anyhow::Result<Tally> {
    let mut resumed = Hist::new();
    let mut ended = Hist::new();
    let (mut turns_lost, mut events_lost, mut duplicates, mut unresolved) =
        (0u32, 0u32, 0u32, 0u32);
    let mut worst_resume = Duration::ZERO;
    for ((name, after), s) in names.iter().zip(afters).zip(seen) {
        for r in &s.resumed {
            resumed.record(*r);
            worst_resume = worst_resume.max(*r);
        }
        match s.ended {
            Some(t) => ended.record(t),
            None => unresolved += 1,
        }
        if s.events.iter().any(|e| e.r#type == "session.turn_lost") {
            turns_lost += 1;
        }
        // Everything stored after the turn's start, against what the
        // follower saw: gapless, each line once.
        let stored = c
            .list_events(pb::ListEventsRequest {
                name: name.clone(),
                after_seq: *after,
                page_size: 1000,
                ..Default::default()
            })
            .await?
            .into_inner()
            .events;
        let seqs: Vec<i64> = s.events.iter().map(|e| e.seq).collect();
        let want: Vec<i64> = stored.iter().map(|e| e.seq).take(seqs.len()).collect();
        if seqs != want {
            events_lost += 1;
        }
        let mut lines = HashSet::new();
        for e in stored
            .iter()
            .filter(|e| e.line_seq == e.seq && e.line_seq != 0)
        {
            if !lines.insert(e.raw.clone()) {
                duplicates += 1;
            }
        }
    }
    if unresolved > 0 {
        turns_lost += unresolved;
    }
    Ok(Tally {
        resumed,
        ended,
        turns_lost,
        events_lost,
        duplicates,
        worst_resume,
    })
}

/// `n` sessions, each idle after a first turn: their names, and the seq
/// each turn ended at.
async fn idle_sessions(
    c: &mut SessionsClient<berth_tests::Api>,
    image: &str,
    n: usize,
) -> anyhow::Result<(Vec<String>, Vec<i64>)> {
    let mut names = Vec::new();
    for i in 0..n {
        let s = c
            .create_session(super::session(image, &format!("echo ready {i}")))
            .await?
            .into_inner();
        names.push(s.name);
    }
    let mut afters = Vec::new();
    for name in &names {
        let seq = loop {
            let s = c
                .get_session(pb::GetSessionRequest { name: name.clone() })
                .await?
                .into_inner();
            if s.status == pb::SessionStatus::Idle as i32 && s.usage.is_some_and(|u| u.turns == 1) {
                break s.last_seq;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        afters.push(seq);
    }
    Ok((names, afters))
}

pub async fn run(cl: &ClusterArgs, a: &FailoverArgs) -> anyhow::Result<Report> {
    cl.in_process_only(
        "failover",
        "it restarts and kills the cluster's dispatchers",
    )?;
    anyhow::ensure!(a.sessions > 0, "--sessions must be positive");
    let mut report = Report::new("failover", a);
    let mut cluster = TestCluster::builder()
        .nodes(2)
        .capacity(u32::try_from(a.sessions)?.div_ceil(2) + 2)
        .lease(Duration::from_secs(5))
        .start()
        .await?;
    let c0 = cluster.client();
    let mut killable = cluster.add_killable_dispatcher("failover-killable").await?;
    let c2 = cluster.add_dispatcher().await?;
    let clients: Clients = Arc::new(Mutex::new(vec![
        c0.clone(),
        killable.client.clone(),
        c2.clone(),
    ]));

    // N sessions, idle after a first turn, owned by whichever dispatcher
    // claimed each.
    eprintln!("failover: starting {} sessions", a.sessions);
    let mut c = c2.clone();
    let (names, afters) = idle_sessions(&mut c, &cl.image, a.sessions).await?;

    // Every session mid-turn, each followed by a reconnecting client.
    let restarted = Arc::new(Mutex::new(None));
    let mut followers = Vec::new();
    for (i, (name, after)) in names.iter().zip(&afters).enumerate() {
        let reply = format!("reply {i}");
        followers.push(tokio::spawn(follow(
            clients.clone(),
            name.clone(),
            *after,
            reply.clone(),
            restarted.clone(),
        )));
        c.send_message(pb::SendMessageRequest {
            name: name.clone(),
            text: format!("delay {} {reply}", a.turn_ms),
            ..Default::default()
        })
        .await?;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Restart 1: a rolling update stops the first dispatcher (SIGTERM) and
    // brings up its replacement. Restart 2: another is killed.
    eprintln!("failover: SIGTERM to one dispatcher, a replacement up, then kill -9 of another");
    if let Ok(mut r) = restarted.lock() {
        *r = Some(Instant::now());
    }
    let t0 = Instant::now();
    if let Ok(mut all) = clients.lock() {
        all.remove(0);
    }
    cluster.sigterm_dispatcher().await?;
    let c3 = cluster.add_dispatcher().await?;
    if let Ok(mut all) = clients.lock() {
        all.push(c3);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    if let Ok(mut all) = clients.lock() {
        // The killable one, next to go.
        all.remove(0);
    }
    killable.kill();
    eprintln!("failover: restarts done {:?} after the first", t0.elapsed());

    let mut seen = Vec::new();
    for f in followers {
        seen.push(f.await?);
    }
    let Tally {
        resumed,
        ended,
        turns_lost,
        events_lost,
        duplicates,
        worst_resume,
    } = tally(&mut c, &names, &afters, &seen).await?;
    report.latency(
        "stream resumed after an interruption",
        &resumed,
        &Errors::default(),
    );
    report.latency(
        "turn ended, since the first restart",
        &ended,
        &Errors::default(),
    );
    report.value("sessions", a.sessions as f64, "");
    report.check_at_most(
        "turns lost (turn_lost events or no reply)",
        f64::from(turns_lost),
        0.0,
    );
    report.check_at_most(
        "sessions whose stream missed or reordered events",
        f64::from(events_lost),
        0.0,
    );
    report.check_at_most("agent lines stored twice", f64::from(duplicates), 0.0);
    report.check_at_most(
        "slowest stream resume (s)",
        worst_resume.as_secs_f64(),
        2.0 * LEASE.as_secs_f64(),
    );
    report.note(format!(
        "dispatcher lease {}s; each turn runs {} ms; one dispatcher stops with SIGTERM and a replacement comes up, then another is killed (its runtime dropped: no hand-back)",
        LEASE.as_secs(),
        a.turn_ms
    ));
    drop(killable);
    cluster.shutdown().await?;
    Ok(report)
}
