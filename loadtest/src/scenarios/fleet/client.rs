//! One session's client in the fleet: it creates the session on one
//! dispatcher, holds `StreamEvents` open, checks every seq it sees (no gap,
//! no duplicate), sends a turn every few seconds once turns are on, and
//! times each turn's echo. When its dispatcher goes away it reconnects to
//! another live one with `after_seq`, as a client behind a load balancer
//! would.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use berth_proto::v1 as pb;
use futures::StreamExt;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::super::session;
use crate::driver::Conns;
use crate::report::{Errors, Hist};

/// The fleet's dispatchers as clients see them, with which are in the
/// load balancer.
pub(super) struct Dispatchers {
    pub conns: Vec<Conns>,
    pub alive: Vec<AtomicBool>,
}

impl Dispatchers {
    /// The first live dispatcher at or after `from` (round-robin).
    fn pick(&self, from: usize) -> usize {
        let n = self.conns.len();
        (0..n)
            .map(|k| (from + k) % n)
            .find(|&i| self.alive[i].load(Ordering::Relaxed))
            .unwrap_or(from % n)
    }
}

/// When turns run: from `start` until `end`, each session one turn every
/// `every`, at a phase of its own.
#[derive(Clone, Copy)]
pub(super) struct Turns {
    pub start: Instant,
    pub every: Duration,
    pub end: Instant,
}

/// What every client saw.
#[derive(Default)]
pub(super) struct Tally {
    /// CreateSession → the first `session.status_running` or
    /// `session.status_idle` seen on the stream (the session started).
    pub start: Mutex<Hist>,
    /// A turn's due time → its echo (`agent.message`) on the stream.
    pub live: Mutex<Hist>,
    /// A stream's end → the stream open again on a live dispatcher.
    pub resumed: Mutex<Hist>,
    pub errors: Mutex<Errors>,
    pub created: AtomicU64,
    pub running: AtomicU64,
    /// Seqs skipped on a stream (events lost to the client).
    pub gaps: AtomicU64,
    /// Seqs seen twice (events duplicated).
    pub dups: AtomicU64,
    /// Turns the dispatcher accepted (SendMessage answered).
    pub turns_sent: AtomicU64,
    /// Turns whose echo came back.
    pub turns_echoed: AtomicU64,
    /// Echoes seen twice, of turns sent once.
    pub echo_dups: AtomicU64,
    /// Echoes seen twice, of turns sent again after a call that failed
    /// with no answer (the first may have landed; the request id makes
    /// the second the same message).
    pub echo_dups_resent: AtomicU64,
    /// Turns sent again after such a call.
    pub resent: AtomicU64,
}

impl Tally {
    fn record(h: &Mutex<Hist>, d: Duration) {
        if let Ok(mut h) = h.lock() {
            h.record(d);
        }
    }

    pub(super) fn error(&self, what: impl Into<String>) {
        if let Ok(mut e) = self.errors.lock() {
            e.add(what);
        }
    }
}

/// Everything a client task shares with the others.
pub(super) struct Shared {
    pub dispatchers: Dispatchers,
    pub tally: Tally,
    pub turns: watch::Receiver<Option<Turns>>,
    pub stop: CancellationToken,
}

/// Runs session `i`'s client from its scheduled creation `t0` until `stop`.
/// Returns the session's id when it was created.
pub(super) async fn run(shared: Arc<Shared>, i: usize, t0: Instant) -> Option<String> {
    let tally = &shared.tally;
    let mut d = shared.dispatchers.pick(i);
    let created = shared.dispatchers.conns[d]
        .get()
        .create_session(session("sim:latest", ""))
        .await;
    let s = match created {
        Ok(s) => s.into_inner(),
        Err(e) => {
            tally.error(format!("create: {:?}", e.code()));
            return None;
        }
    };
    tally.created.fetch_add(1, Ordering::Relaxed);
    let mut c = Client {
        name: s.name,
        i,
        last: 0,
        running: false,
        pending: HashMap::new(),
        resent: HashSet::new(),
        t0,
    };
    let mut turns = shared.turns.clone();
    let mut plan: Option<Turns> = *turns.borrow_and_update();
    let mut next_turn: Option<(Instant, u64)> = None;
    // The plan's first turn was scheduled (the last one leaves `next_turn` empty).
    let mut scheduled = false;
    let mut interrupted: Option<Instant> = None;
    let phase = fastrand::f64();
    'outer: loop {
        if shared.stop.is_cancelled() {
            break;
        }
        let req = pb::StreamEventsRequest {
            name: c.name.clone(),
            after_seq: c.last,
        };
        let mut stream = match shared.dispatchers.conns[d].get().stream_events(req).await {
            Ok(s) => s.into_inner(),
            Err(_) => {
                interrupted.get_or_insert_with(Instant::now);
                d = shared.dispatchers.pick(d + 1);
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if let Some(t) = interrupted.take() {
            Tally::record(&tally.resumed, t.elapsed());
        }
        loop {
            if !scheduled && let Some(p) = plan {
                scheduled = true;
                let first = p.start + p.every.mul_f64(phase);
                next_turn = (first < p.end).then_some((first, 0));
            }
            let due = next_turn.map(|(t, _)| t);
            tokio::select! {
                () = shared.stop.cancelled() => break 'outer,
                r = turns.changed(), if plan.is_none() => {
                    if r.is_err() { break 'outer }
                    plan = *turns.borrow_and_update();
                }
                () = sleep_until_some(due) => {
                    let Some((at, k)) = next_turn else { continue };
                    c.turn(&shared, &mut d, at, k).await;
                    next_turn = plan.and_then(|p| {
                        let next = at + p.every;
                        (next < p.end).then_some((next, k + 1))
                    });
                }
                e = stream.next() => match e {
                    Some(Ok(e)) => c.seen(tally, &e),
                    Some(Err(_)) | None => {
                        interrupted = Some(Instant::now());
                        d = shared.dispatchers.pick(d + 1);
                        continue 'outer;
                    }
                },
            }
        }
    }
    Some(c.name)
}

async fn sleep_until_some(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

/// One session as its client knows it.
struct Client {
    name: String,
    i: usize,
    /// The last seq seen.
    last: i64,
    running: bool,
    /// Turns awaiting their echo, by text.
    pending: HashMap<String, Instant>,
    /// Turns sent again after a call that failed with no answer.
    resent: HashSet<String>,
    t0: Instant,
}

impl Client {
    /// Sends turn `k`, due at `at`, on a live dispatcher (the next one when
    /// a dispatcher refuses it: it may just have gone).
    async fn turn(&mut self, shared: &Shared, d: &mut usize, at: Instant, k: u64) {
        let text = format!("t{}-{k}", self.i);
        self.pending.insert(text.clone(), at);
        for _ in 0..shared.dispatchers.conns.len() * 3 {
            // Sent again under the same request id, it is sent once.
            let req = pb::SendMessageRequest {
                name: self.name.clone(),
                text: text.clone(),
                request_id: text.clone(),
            };
            match shared.dispatchers.conns[*d].get().send_message(req).await {
                Ok(_) => {
                    shared.tally.turns_sent.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                Err(e)
                    if e.code() == tonic::Code::Unavailable || e.code() == tonic::Code::Unknown =>
                {
                    // A dispatcher that sheds load answers before it
                    // appends; one that died mid-call may have appended.
                    if !e.message().contains("calls in progress")
                        && self.resent.insert(text.clone())
                    {
                        shared.tally.resent.fetch_add(1, Ordering::Relaxed);
                    }
                    *d = shared.dispatchers.pick(*d + 1);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => {
                    shared.tally.error(format!("send: {:?}", e.code()));
                    self.pending.remove(&text);
                    return;
                }
            }
        }
        shared.tally.error("send: no dispatcher took it");
        self.pending.remove(&text);
    }

    /// Checks one event's seq and times what it answers.
    fn seen(&mut self, tally: &Tally, e: &pb::Event) {
        if e.seq <= self.last {
            tally.dups.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if e.seq != self.last + 1 {
            let missed = u64::try_from(e.seq - self.last - 1).unwrap_or(0);
            tally.gaps.fetch_add(missed, Ordering::Relaxed);
        }
        self.last = e.seq;
        match e.r#type.as_str() {
            // Started: a session with no first message goes idle, one
            // with a message runs.
            "session.status_running" | "session.status_idle" if !self.running => {
                self.running = true;
                Tally::record(&tally.start, self.t0.elapsed());
                tally.running.fetch_add(1, Ordering::Relaxed);
            }
            "agent.message" => {
                let text = serde_json::from_str::<serde_json::Value>(&e.payload_json)
                    .ok()
                    .and_then(|p| p["text"].as_str().map(String::from))
                    .unwrap_or_default();
                match self.pending.remove(&text) {
                    Some(due) => {
                        Tally::record(&tally.live, due.elapsed());
                        tally.turns_echoed.fetch_add(1, Ordering::Relaxed);
                    }
                    None if self.resent.contains(&text) => {
                        tally.echo_dups_resent.fetch_add(1, Ordering::Relaxed);
                    }
                    None if text.starts_with('t') => {
                        tally.echo_dups.fetch_add(1, Ordering::Relaxed);
                    }
                    None => {}
                }
            }
            _ => {}
        }
    }
}
