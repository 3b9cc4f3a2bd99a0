//! The event log: a group-commit writer in front of the store, and a hub that
//! fans persisted events out to live subscribers.
//!
//! Invariants:
//! - every write for a session goes through one ordered queue per dispatcher,
//!   so a session's events, usage rows and status changes are persisted in the
//!   order they were submitted; writes queued while a statement is in flight
//!   are committed together in the next one (no per-event round trip);
//! - a follower subscribes to the hub *before* reading history and drops
//!   anything at or below the last seq it sent: no gap, no duplicate;
//! - a follower that falls behind its bounded buffer, or hears of events
//!   another dispatcher wrote, reads them from the store. It never blocks the
//!   writer and never loses an event.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{broadcast, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::error::{Error, Result};
use crate::session::{Event, NewEvent, StatusEvent, TurnUsage};
use crate::store::{Store, Transitioned};

/// An append waiting for the next batch, with whom to tell the result.
type PendingAppend = (Uuid, NewEvent, Option<oneshot::Sender<Result<Event>>>);

use crate::metrics as m;

/// Most writes committed in one statement.
const MAX_BATCH: usize = 1024;
/// Events a live subscriber may fall behind before it reads from the store.
const FEED_CAPACITY: usize = 256;
/// Page size when a follower reads history.
const HISTORY_PAGE: i64 = 500;

/// What a hub feed carries.
#[derive(Debug, Clone)]
enum Signal {
    /// An event this dispatcher persisted.
    Event(Arc<Event>),
    /// Another dispatcher persisted events up to this seq.
    Upto(i64),
}

struct Feed {
    tx: broadcast::Sender<Signal>,
    /// Highest seq published here; older remote notices are ignored.
    published: i64,
}

/// Fans persisted events out to this dispatcher's subscribers.
#[derive(Default)]
struct Hub {
    feeds: Mutex<HashMap<Uuid, Feed>>,
}

impl Hub {
    fn feeds(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, Feed>> {
        self.feeds.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn subscribe(&self, id: Uuid) -> broadcast::Receiver<Signal> {
        let mut feeds = self.feeds();
        match feeds.get(&id) {
            Some(f) => f.tx.subscribe(),
            None => {
                let (tx, rx) = broadcast::channel(FEED_CAPACITY);
                feeds.insert(id, Feed { tx, published: 0 });
                rx
            }
        }
    }

    fn publish(&self, events: &[Event]) {
        let mut feeds = self.feeds();
        for e in events {
            let Some(feed) = feeds.get_mut(&e.session_id) else {
                continue;
            };
            if feed.tx.receiver_count() == 0 {
                feeds.remove(&e.session_id);
                continue;
            }
            feed.published = feed.published.max(e.seq);
            let _ = feed.tx.send(Signal::Event(Arc::new(e.clone())));
        }
    }

    fn remote(&self, id: Uuid, seq: i64) {
        let mut feeds = self.feeds();
        if let Some(feed) = feeds.get_mut(&id) {
            if feed.tx.receiver_count() == 0 {
                feeds.remove(&id);
            } else if seq > feed.published {
                let _ = feed.tx.send(Signal::Upto(seq));
            }
        }
    }
}

enum Op {
    Append {
        session: Uuid,
        event: NewEvent,
        done: Option<oneshot::Sender<Result<Event>>>,
        /// When it was queued (persist lag).
        queued: std::time::Instant,
    },
    Transition {
        session: Uuid,
        /// Applies only while the session is at this epoch (fencing).
        epoch: Option<i64>,
        event: StatusEvent,
        reason: String,
        extra: serde_json::Value,
        done: oneshot::Sender<Result<Transitioned>>,
    },
    Usage {
        session: Uuid,
        usage: TurnUsage,
        done: oneshot::Sender<Result<Event>>,
    },
}

/// The event log of every session this dispatcher touches.
pub struct EventLog {
    store: Store,
    ops: mpsc::Sender<Op>,
    hub: Arc<Hub>,
    /// Ends every follower with UNAVAILABLE, so clients reconnect elsewhere.
    shutdown: CancellationToken,
}

impl EventLog {
    /// Starts the writer; it drains its queue and stops after `shutdown`.
    pub fn start(store: Store, shutdown: CancellationToken) -> Arc<Self> {
        let (ops, rx) = mpsc::channel(MAX_BATCH * 4);
        let hub = Arc::new(Hub::default());
        tokio::spawn(writer(store.clone(), hub.clone(), rx, shutdown.clone()));
        Arc::new(Self {
            store,
            ops,
            hub,
            shutdown,
        })
    }

    async fn submit(&self, op: Op) -> Result<()> {
        self.ops
            .send(op)
            .await
            .map_err(|_| Error::Unavailable("the event writer has stopped".into()))
    }

    /// Appends one event and waits until it is persisted.
    pub async fn append(&self, session: Uuid, event: NewEvent) -> Result<Event> {
        let (done, rx) = oneshot::channel();
        self.submit(Op::Append {
            session,
            event,
            done: Some(done),
            queued: std::time::Instant::now(),
        })
        .await?;
        rx.await
            .map_err(|_| Error::Unavailable("the event writer has stopped".into()))?
    }

    /// Queues an event behind everything queued before it, without waiting.
    /// Failures are logged by the writer.
    pub async fn append_queued(&self, session: Uuid, event: NewEvent) -> Result<()> {
        self.submit(Op::Append {
            session,
            event,
            done: None,
            queued: std::time::Instant::now(),
        })
        .await
    }

    /// Applies a status change, ordered after everything queued before it.
    pub async fn transition(
        &self,
        session: Uuid,
        event: StatusEvent,
        reason: &str,
        extra: serde_json::Value,
    ) -> Result<Transitioned> {
        self.transition_op(session, None, event, reason, extra)
            .await
    }

    /// A transition fenced by epoch: it applies only while the session is
    /// still at `epoch`, so a superseded run cannot move the session of the
    /// run that replaced it ([`Error::Superseded`] otherwise).
    pub async fn transition_at(
        &self,
        session: Uuid,
        epoch: i64,
        event: StatusEvent,
        reason: &str,
        extra: serde_json::Value,
    ) -> Result<Transitioned> {
        self.transition_op(session, Some(epoch), event, reason, extra)
            .await
    }

    async fn transition_op(
        &self,
        session: Uuid,
        epoch: Option<i64>,
        event: StatusEvent,
        reason: &str,
        extra: serde_json::Value,
    ) -> Result<Transitioned> {
        let (done, rx) = oneshot::channel();
        self.submit(Op::Transition {
            session,
            epoch,
            event,
            reason: reason.to_string(),
            extra,
            done,
        })
        .await?;
        rx.await
            .map_err(|_| Error::Unavailable("the event writer has stopped".into()))?
    }

    /// Records a turn's usage, ordered after everything queued before it.
    pub async fn record_usage(&self, session: Uuid, usage: TurnUsage) -> Result<Event> {
        let (done, rx) = oneshot::channel();
        self.submit(Op::Usage {
            session,
            usage,
            done,
        })
        .await?;
        rx.await
            .map_err(|_| Error::Unavailable("the event writer has stopped".into()))?
    }

    /// Another dispatcher persisted `session`'s events up to `seq`.
    pub fn remote_append(&self, session: Uuid, seq: i64) {
        self.hub.remote(session, seq);
    }

    /// Streams the session's events after `after_seq`, then live ones, ending
    /// after the event that stops the session's latest run (earlier runs'
    /// ends, before a resume, pass through). An error ends the stream.
    pub fn follow(
        &self,
        session: Uuid,
        after_seq: i64,
        buffer: usize,
    ) -> mpsc::Receiver<Result<Arc<Event>>> {
        let (tx, rx) = mpsc::channel(buffer);
        let follower = Follower {
            store: self.store.clone(),
            session,
            last: after_seq,
            tx,
            shutdown: self.shutdown.clone(),
        };
        let feed = self.hub.subscribe(session);
        tokio::spawn(follower.run(feed));
        rx
    }
}

struct Follower {
    store: Store,
    session: Uuid,
    last: i64,
    tx: mpsc::Sender<Result<Arc<Event>>>,
    shutdown: CancellationToken,
}

/// Why a follower stops sending.
enum Stop {
    /// The run ended, the subscriber left, or an error was sent.
    Done,
}

impl Follower {
    async fn run(mut self, mut feed: broadcast::Receiver<Signal>) {
        if self.catch_up(None).await.is_err() {
            return;
        }
        match self.store.get_session(self.session).await {
            Ok(s) if !s.status.is_live() && s.last_seq <= self.last => return,
            Ok(_) => {}
            Err(e) => {
                let _ = self.tx.send(Err(e)).await;
                return;
            }
        }
        loop {
            let signal = tokio::select! {
                s = feed.recv() => s,
                () = self.tx.closed() => return,
                () = self.shutdown.cancelled() => {
                    let e = Error::Unavailable(format!("dispatcher shutting down; reconnect with after_seq={}", self.last));
                    let _ = self.tx.send(Err(e)).await;
                    return;
                }
            };
            let step = match signal {
                Ok(Signal::Event(e)) if e.seq <= self.last => Ok(()),
                Ok(Signal::Event(e)) if e.seq == self.last + 1 => self.send(e).await,
                // A gap: events another dispatcher wrote come first.
                Ok(Signal::Event(e)) => self.catch_up(Some(e.seq)).await,
                Ok(Signal::Upto(seq)) if seq > self.last => self.catch_up(Some(seq)).await,
                Ok(Signal::Upto(_)) => Ok(()),
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    metrics::counter!(m::STREAM_CATCHUPS).increment(1);
                    tracing::debug!(session_id = %self.session, missed, "slow subscriber catching up from the store");
                    self.catch_up(None).await
                }
                Err(broadcast::error::RecvError::Closed) => return,
            };
            if step.is_err() {
                return;
            }
        }
    }

    async fn send(&mut self, e: Arc<Event>) -> Result<(), Stop> {
        self.last = e.seq;
        let ends = e.ends_run() && self.is_last_run_end(e.seq).await;
        if self.tx.send(Ok(e)).await.is_err() || ends {
            return Err(Stop::Done);
        }
        Ok(())
    }

    /// Whether a run-ending event at `seq` is where the log ends for now: a
    /// paused or stopped session that was resumed since has more to come.
    async fn is_last_run_end(&self, seq: i64) -> bool {
        match self.store.get_session(self.session).await {
            Ok(s) => !(s.status.is_live() || s.last_seq > seq),
            Err(_) => true,
        }
    }

    /// Reads from the store past `last`, up to `upto` (or everything there is).
    async fn catch_up(&mut self, upto: Option<i64>) -> Result<(), Stop> {
        loop {
            let page = match self
                .store
                .list_events(self.session, self.last, HISTORY_PAGE)
                .await
            {
                Ok(p) => p,
                Err(e) => {
                    let _ = self.tx.send(Err(e)).await;
                    return Err(Stop::Done);
                }
            };
            let full = page.len() as i64 == HISTORY_PAGE;
            for e in page {
                self.send(Arc::new(e)).await?;
            }
            if !full || upto.is_some_and(|u| self.last >= u) {
                return Ok(());
            }
        }
    }
}

/// The writer: takes everything queued, commits consecutive appends in one
/// statement, and runs transitions and usage in order between them.
async fn writer(
    store: Store,
    hub: Arc<Hub>,
    mut rx: mpsc::Receiver<Op>,
    shutdown: CancellationToken,
) {
    let mut ops = Vec::with_capacity(MAX_BATCH);
    loop {
        metrics::gauge!(m::WRITER_QUEUE).set(rx.len() as f64);
        if rx.recv_many(&mut ops, MAX_BATCH).await == 0 {
            return;
        }
        metrics::gauge!(m::WRITER_QUEUE).set((rx.len() + ops.len()) as f64);
        let mut appends: Vec<PendingAppend> = Vec::new();
        let mut oldest: Option<std::time::Instant> = None;
        for op in ops.drain(..) {
            match op {
                Op::Append {
                    session,
                    event,
                    done,
                    queued,
                } => {
                    oldest.get_or_insert(queued);
                    appends.push((session, event, done));
                }
                Op::Transition {
                    session,
                    epoch,
                    event,
                    reason,
                    extra,
                    done,
                } => {
                    flush(&store, &hub, &mut appends, &shutdown, oldest.take()).await;
                    let r = retry(&shutdown, || {
                        store.transition(session, epoch, event, &reason, extra.clone())
                    })
                    .await;
                    if let Ok(Transitioned {
                        event: Some(e), to, ..
                    }) = &r
                    {
                        metrics::counter!(m::EVENTS_PERSISTED).increment(1);
                        if to.ends_run() {
                            metrics::counter!(m::SESSIONS_ENDED, "status" => to.as_str())
                                .increment(1);
                        }
                        hub.publish(std::slice::from_ref(e));
                    }
                    let _ = done.send(r);
                }
                Op::Usage {
                    session,
                    usage,
                    done,
                } => {
                    flush(&store, &hub, &mut appends, &shutdown, oldest.take()).await;
                    let r = retry(&shutdown, || store.record_usage(session, &usage)).await;
                    if let Ok(e) = &r {
                        metrics::counter!(m::EVENTS_PERSISTED).increment(1);
                        hub.publish(std::slice::from_ref(e));
                    }
                    let _ = done.send(r);
                }
            }
        }
        flush(&store, &hub, &mut appends, &shutdown, oldest.take()).await;
    }
}

async fn flush(
    store: &Store,
    hub: &Hub,
    appends: &mut Vec<PendingAppend>,
    shutdown: &CancellationToken,
    oldest: Option<std::time::Instant>,
) {
    if appends.is_empty() {
        return;
    }
    let batch: Vec<(Uuid, NewEvent)> = appends.iter().map(|(s, e, _)| (*s, e.clone())).collect();
    let started = std::time::Instant::now();
    let result = retry(shutdown, || store.append(&batch)).await;
    metrics::histogram!(m::PERSIST_DURATION).record(started.elapsed().as_secs_f64());
    metrics::histogram!(m::PERSIST_BATCH).record(batch.len() as f64);
    if let Some(oldest) = oldest {
        metrics::histogram!(m::PERSIST_LAG).record(oldest.elapsed().as_secs_f64());
    }
    match result {
        Ok(events) => {
            metrics::counter!(m::EVENTS_PERSISTED).increment(events.len() as u64);
            hub.publish(&events);
            let mut by_id: HashMap<Uuid, Event> = events.into_iter().map(|e| (e.id, e)).collect();
            for (_, e, done) in appends.drain(..) {
                if let (Some(done), Some(ev)) = (done, by_id.remove(&e.id)) {
                    let _ = done.send(Ok(ev));
                }
            }
        }
        // One session failing (deleted) must not fail the others: go one by one.
        Err(_) if appends.len() > 1 => {
            for (session, event, done) in appends.drain(..) {
                let one = [(session, event)];
                let r = retry(shutdown, || store.append(&one)).await;
                match r {
                    Ok(mut evs) => {
                        metrics::counter!(m::EVENTS_PERSISTED).increment(evs.len() as u64);
                        hub.publish(&evs);
                        if let (Some(done), Some(e)) = (done, evs.pop()) {
                            let _ = done.send(Ok(e));
                        }
                    }
                    Err(e) => report(session, e, done),
                }
            }
        }
        Err(e) => {
            if let Some((session, _, done)) = appends.pop() {
                report(session, e, done);
            }
        }
    }
}

fn report(session: Uuid, e: Error, done: Option<oneshot::Sender<Result<Event>>>) {
    metrics::counter!(m::PERSIST_FAILURES).increment(1);
    match done {
        Some(done) => {
            let _ = done.send(Err(e));
        }
        None => tracing::error!(session_id = %session, error = %e, "event could not be persisted"),
    }
}

/// Retries transient failures (database down, serialization conflicts) with
/// backoff until they succeed or the dispatcher shuts down.
async fn retry<T, F, Fut>(shutdown: &CancellationToken, mut f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    let mut delay = Duration::from_millis(20);
    loop {
        match f().await {
            Err(e) if e.is_transient() && !shutdown.is_cancelled() => {
                tracing::warn!(error = %e, retry_in = ?delay, "event log write failed; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
            r => return r,
        }
    }
}
