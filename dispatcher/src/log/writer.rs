//! The writer: takes everything queued, commits consecutive appends in one
//! statement (with the usage of the turns their lines end, in one
//! transaction), and runs transitions in order between them.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use uuid::Uuid;

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::hub::Hub;
use super::{MAX_BATCH, Op, StatusOp};
use crate::error::{Error, Result};
use crate::metrics as m;
use crate::session::Event;
use crate::session::usage::Turn;
use crate::store::{
    Append, Change, Store, ToolEffect, ToolOutcome, Transitioned, TurnEnd, UsageRecorded,
};

/// Whom to tell an append's result, if anyone waits for it.
type Done = Option<oneshot::Sender<Result<Event>>>;

/// Appends waiting for the next statement, with whom to tell (same order),
/// the turns that end lines among them, and when the oldest was queued.
#[derive(Default)]
struct Batch {
    appends: Vec<Append>,
    done: Vec<Done>,
    turns: Vec<PendingTurn>,
    /// The sessions of `turns`: a later op of one commits them first, so
    /// a turn's usage stays right after its line.
    turn_sessions: HashSet<Uuid>,
    oldest: Option<std::time::Instant>,
}

/// A line that ends a turn, waiting with the batch: its events are
/// `appends[line]`, committed with the turn's usage in one transaction.
struct PendingTurn {
    session: Uuid,
    turn: Turn,
    line: std::ops::Range<usize>,
    done: oneshot::Sender<Result<UsageRecorded>>,
}

impl Batch {
    /// Whether the next op of `session` must wait for what is pending.
    fn holds_turn(&self, session: Uuid) -> bool {
        self.turn_sessions.contains(&session)
    }

    /// Queues a line that ends a turn, and the turn.
    fn push_turn(
        &mut self,
        appends: Vec<Append>,
        session: Uuid,
        turn: Turn,
        done: oneshot::Sender<Result<UsageRecorded>>,
    ) {
        let start = self.appends.len();
        self.done
            .extend(std::iter::repeat_with(|| None).take(appends.len()));
        self.appends.extend(appends);
        self.turn_sessions.insert(session);
        self.turns.push(PendingTurn {
            session,
            turn,
            line: start..self.appends.len(),
            done,
        });
    }
}

/// The writer's queue, and the ops it takes before the queue's (see
/// `EventLog::ahead`).
pub(super) struct Queues {
    pub ops: mpsc::Receiver<Op>,
    pub ahead: mpsc::Receiver<Op>,
}

pub(super) async fn run(store: Store, hub: Arc<Hub>, queues: Queues, shutdown: CancellationToken) {
    let Queues {
        ops: mut rx,
        mut ahead,
    } = queues;
    let mut ahead_open = true;
    let mut ops = Vec::with_capacity(MAX_BATCH);
    let mut first = Vec::new();
    let mut changes = Changes::default();
    let w = Writer {
        store,
        hub,
        shutdown,
    };
    loop {
        metrics::gauge!(m::WRITER_QUEUE).set(rx.len() as f64);
        // Both close together, when the log is dropped; `biased` drains
        // the ops ahead before the queue ends the writer.
        let received = tokio::select! {
            biased;
            n = ahead.recv_many(&mut first, MAX_BATCH), if ahead_open => {
                ahead_open = n > 0;
                ops.append(&mut first);
                n
            }
            n = rx.recv_many(&mut ops, MAX_BATCH) => {
                if n == 0 {
                    return;
                }
                n
            }
        };
        if received == 0 {
            continue;
        }
        metrics::gauge!(m::WRITER_QUEUE).set((rx.len() + ops.len()) as f64);
        let mut batch = Batch::default();
        // Ops of different sessions commute; each session's stay in order:
        // a change waits in `changes` behind the appends in `batch`, and an
        // op of a session with a change pending commits both first.
        for op in ops.drain(..) {
            match op {
                Op::Append {
                    append,
                    done,
                    queued,
                } => {
                    // After a change or a turn of its session that is
                    // still pending.
                    if changes.has(append.session) || batch.holds_turn(append.session) {
                        w.commit(&mut batch, &mut changes).await;
                    }
                    batch.oldest.get_or_insert(queued);
                    batch.appends.push(append);
                    batch.done.push(done);
                }
                Op::Transition(change) => {
                    // One change per session per statement: a second one
                    // depends on the first's outcome.
                    if changes.has(change.session) {
                        w.commit(&mut batch, &mut changes).await;
                    }
                    changes.push(change);
                }
                Op::Line { appends, queued } => {
                    if appends
                        .iter()
                        .any(|a| changes.has(a.session) || batch.holds_turn(a.session))
                    {
                        w.commit(&mut batch, &mut changes).await;
                    }
                    batch.oldest.get_or_insert(queued);
                    for a in appends {
                        batch.appends.push(a);
                        batch.done.push(None);
                    }
                }
                Op::Tool {
                    appends,
                    effect,
                    done,
                } => {
                    w.commit(&mut batch, &mut changes).await;
                    let _ = done.send(w.tool(appends, &effect).await);
                }
                Op::LineTurn {
                    appends,
                    session,
                    turn,
                    done,
                } => {
                    if changes.has(session) || batch.holds_turn(session) {
                        w.commit(&mut batch, &mut changes).await;
                    }
                    batch.push_turn(appends, session, turn, done);
                }
            }
        }
        w.commit(&mut batch, &mut changes).await;
    }
}

/// Status changes waiting for the next statement, at most one per session.
#[derive(Default)]
struct Changes {
    pending: Vec<StatusOp>,
    sessions: HashSet<Uuid>,
}

impl Changes {
    fn has(&self, session: Uuid) -> bool {
        self.sessions.contains(&session)
    }

    fn push(&mut self, c: StatusOp) {
        self.sessions.insert(c.session);
        self.pending.push(c);
    }
}

struct Writer {
    store: Store,
    hub: Arc<Hub>,
    shutdown: CancellationToken,
}

impl Writer {
    /// Commits the batch: its appends, with the turns that end lines of it.
    async fn flush(&self, batch: &mut Batch) {
        if batch.turns.is_empty() {
            self.flush_appends(batch).await;
        } else {
            self.flush_turns(batch).await;
        }
    }

    /// Commits the batch's appends and its turns in one transaction. When
    /// any append is refused, or the transaction fails for good, the
    /// appends go on their own and then each turn alone, so one session's
    /// failure fails no other's (a session's appends in the batch all came
    /// before its turn).
    async fn flush_turns(&self, batch: &mut Batch) {
        let turns = std::mem::take(&mut batch.turns);
        batch.turn_sessions.clear();
        let ends: Vec<TurnEnd<'_>> = turns
            .iter()
            .map(|t| TurnEnd {
                session: t.session,
                turn: &t.turn,
                line: t.line.clone(),
            })
            .collect();
        let started = std::time::Instant::now();
        let result = self
            .retry(|| self.store.append_with_turns(&batch.appends, &ends))
            .await;
        drop(ends);
        let Ok(Some((stored, usages))) = result else {
            if let Err(e) = &result
                && !matches!(e, Error::AlreadyExists(_))
            {
                tracing::warn!(error = %e, turns = turns.len(), "a batch of turn ends failed; committing each on its own");
            }
            // Back to front, so the earlier lines' ranges still hold.
            let mut lines: Vec<Vec<Append>> = turns
                .iter()
                .rev()
                .map(|t| {
                    batch.done.drain(t.line.clone());
                    batch.appends.drain(t.line.clone()).collect()
                })
                .collect();
            lines.reverse();
            self.flush_appends(batch).await;
            for (t, appends) in turns.into_iter().zip(lines) {
                let _ = t
                    .done
                    .send(self.line_turn(appends, t.session, &t.turn).await);
            }
            return;
        };
        record_commit(started, batch);
        let appends = batch.appends.drain(..).zip(batch.done.drain(..));
        self.persisted(into_persisted(appends, stored));
        metrics::counter!(m::EVENTS_PERSISTED).increment(usages.len() as u64);
        let arcs: Vec<Arc<Event>> = usages.iter().map(|u| Arc::new(u.event.clone())).collect();
        self.hub.publish(&arcs);
        for (t, usage) in turns.into_iter().zip(usages) {
            let _ = t.done.send(Ok(usage));
        }
    }

    /// Commits the batch's appends in one statement; when any is refused,
    /// one by one, so one session's failure fails no other's. Each event is
    /// moved into the log, not copied: this runs for every agent event.
    async fn flush_appends(&self, batch: &mut Batch) {
        if batch.appends.is_empty() {
            return;
        }
        let started = std::time::Instant::now();
        let result = self.retry(|| self.store.append(&batch.appends)).await;
        record_commit(started, batch);
        let appends = batch.appends.drain(..).zip(batch.done.drain(..));
        match result {
            Ok(stored) => self.persisted(into_persisted(appends, stored)),
            Err(e) => {
                let appends: Vec<(Append, Done)> = appends.collect();
                if appends.len() == 1 {
                    if let Some((a, done)) = appends.into_iter().next() {
                        report(&a, e, done);
                    }
                    return;
                }
                // One group at a time: an event alone, or all the events
                // of one line (they stay consecutive).
                let mut groups: Vec<Vec<(Append, Done)>> = Vec::new();
                for item in appends {
                    match groups.last_mut() {
                        Some(g) if item.0.event.line_part.is_some_and(|p| p > 0) => g.push(item),
                        _ => groups.push(vec![item]),
                    }
                }
                for group in groups {
                    let (group, dones): (Vec<Append>, Vec<Done>) = group.into_iter().unzip();
                    match self.retry(|| self.store.append(&group)).await {
                        Ok(at) if at.len() == group.len() => {
                            self.persisted(into_persisted(group.into_iter().zip(dones), at));
                        }
                        Ok(_) => {
                            for (a, done) in group.iter().zip(dones) {
                                report(a, Error::Internal("no row for an append".into()), done);
                            }
                        }
                        Err(e) => {
                            let mut dones = dones.into_iter();
                            for a in &group {
                                report(a, same(&e), dones.next().flatten());
                            }
                        }
                    }
                }
            }
        }
    }

    /// A line's events and a tool request's change, in one transaction.
    async fn tool(&self, appends: Vec<Append>, effect: &ToolEffect) -> Result<ToolOutcome> {
        let r = self.retry(|| self.store.apply_tool(&appends, effect)).await;
        match r {
            Ok(mut out) => {
                let stored = std::mem::take(&mut out.stored);
                let mut events = stored_events(appends, stored);
                events.extend(out.events.iter().map(|e| (Arc::new(e.clone()), None)));
                self.persisted(events);
                Ok(out)
            }
            Err(e) => {
                if let Some(a) = appends.first() {
                    report(a, same(&e), None);
                }
                Err(e)
            }
        }
    }

    /// The events of a line that ends a turn, with the turn's usage.
    async fn line_turn(
        &self,
        appends: Vec<Append>,
        session: Uuid,
        turn: &Turn,
    ) -> Result<UsageRecorded> {
        let r = self
            .retry(|| self.store.append_with_usage(&appends, session, turn))
            .await;
        match r {
            Ok((stored, usage)) => {
                self.persisted(stored_events(appends, stored));
                metrics::counter!(m::EVENTS_PERSISTED).increment(1);
                self.hub.publish(&[Arc::new(usage.event.clone())]);
                Ok(usage)
            }
            Err(e) => {
                if let Some(a) = appends.first() {
                    report(a, same(&e), None);
                }
                Err(e)
            }
        }
    }

    /// Commits what is pending: the appends, then the status changes (every
    /// change pending arrived after any append of its session in the batch).
    async fn commit(&self, batch: &mut Batch, changes: &mut Changes) {
        self.flush(batch).await;
        self.changes(changes).await;
    }

    /// Commits the pending status changes in one statement; one that lost
    /// to another writer is re-read and retried alone.
    async fn changes(&self, changes: &mut Changes) {
        if changes.pending.is_empty() {
            return;
        }
        changes.sessions.clear();
        let pending = std::mem::take(&mut changes.pending);
        let batch: Vec<Change<'_>> = pending.iter().map(StatusOp::change).collect();
        let outcomes = self.retry(|| self.store.transitions(&batch)).await;
        drop(batch);
        let outcomes = match outcomes {
            Ok(o) => o,
            Err(e) => {
                for c in pending {
                    let _ = c.done.send(Err(same(&e)));
                }
                return;
            }
        };
        for (c, outcome) in pending.into_iter().zip(outcomes) {
            let r = match outcome {
                Some(r) => r,
                None => {
                    let change = c.change();
                    self.retry(|| self.store.transition(&change)).await
                }
            };
            if let Ok(t) = &r
                && let Some(e) = &t.event
            {
                count_change(t);
                self.hub.publish(&[Arc::new(e.clone())]);
            }
            let _ = c.done.send(r);
        }
    }

    /// Publishes persisted events and answers whoever waits for them.
    fn persisted(&self, events: Vec<(Arc<Event>, Done)>) {
        metrics::counter!(m::EVENTS_PERSISTED).increment(events.len() as u64);
        let arcs: Vec<Arc<Event>> = events.iter().map(|(e, _)| e.clone()).collect();
        self.hub.publish(&arcs);
        for (e, done) in events {
            if let Some(done) = done {
                let _ = done.send(Ok(Event::clone(&e)));
            }
        }
    }

    /// Retries transient failures (database down, serialization conflicts)
    /// with backoff until they succeed or the dispatcher shuts down.
    async fn retry<T, F, Fut>(&self, mut f: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        let mut backoff =
            berth_common::retry::Backoff::new(Duration::from_millis(20), Duration::from_secs(2));
        loop {
            match f().await {
                Err(e) if e.is_transient() && !self.shutdown.is_cancelled() => {
                    let delay = backoff.next_delay();
                    tracing::warn!(error = %e, retry_in = ?delay, "event log write failed; retrying");
                    tokio::time::sleep(delay).await;
                }
                r => return r,
            }
        }
    }
}

/// Records a commit of `batch`'s appends that began at `started`.
fn record_commit(started: std::time::Instant, batch: &mut Batch) {
    metrics::histogram!(m::PERSIST_DURATION).record(started.elapsed().as_secs_f64());
    metrics::histogram!(m::PERSIST_BATCH).record(batch.appends.len() as f64);
    if let Some(oldest) = batch.oldest.take() {
        metrics::histogram!(m::PERSIST_LAG).record(oldest.elapsed().as_secs_f64());
    }
}

/// Counts a persisted status change: its event, and the run it ended.
pub(super) fn count_change(t: &Transitioned) {
    if t.event.is_none() {
        return;
    }
    metrics::counter!(m::EVENTS_PERSISTED).increment(1);
    if t.to.ends_run() {
        metrics::counter!(m::SESSIONS_ENDED, "status" => t.to.as_str()).increment(1);
    }
}

/// Appends as the events the store placed at `stored` (same order), each
/// marked persisted for the relay, with whom to tell. Moved, not copied:
/// this runs for every agent event.
fn into_persisted(
    appends: impl IntoIterator<Item = (Append, Done)>,
    stored: Vec<crate::store::Stored>,
) -> Vec<(Arc<Event>, Done)> {
    appends
        .into_iter()
        .zip(stored)
        .map(|((a, done), at)| {
            mark_persisted(&a);
            (Arc::new(a.into_event(at)), done)
        })
        .collect()
}

/// A line's appends as the events the store placed at `stored`; nobody
/// waits on them one by one.
fn stored_events(
    appends: Vec<Append>,
    stored: Vec<crate::store::Stored>,
) -> Vec<(Arc<Event>, Done)> {
    into_persisted(appends.into_iter().map(|a| (a, None)), stored)
}

/// Tells the relay that the node frame of `a` is persisted.
fn mark_persisted(a: &Append) {
    if let (Some(seq), Some(p)) = (a.node_seq, &a.persisted) {
        p.fetch_max(seq, std::sync::atomic::Ordering::Release);
    }
}

/// The same failure again, for each event of a group that failed together.
fn same(e: &Error) -> Error {
    match e {
        Error::Superseded { id, epoch, current } => Error::Superseded {
            id: *id,
            epoch: *epoch,
            current: *current,
        },
        Error::AlreadyExists(m) => Error::AlreadyExists(m.clone()),
        other => Error::Internal(other.to_string()),
    }
}

/// Tells the submitter, or logs, an append that was not stored.
fn report(a: &Append, e: Error, done: Option<oneshot::Sender<Result<Event>>>) {
    match (&e, done) {
        // A superseded run's late event: the newer run owns the log now.
        (Error::Superseded { .. }, None) => {
            tracing::info!(session_id = %a.session, error = %e, kind = %a.event.kind, "dropped an event of a superseded run");
        }
        // A client's retry under a request id: not a failure to persist.
        (Error::AlreadyExists(_), Some(done)) => {
            let _ = done.send(Err(e));
        }
        (_, Some(done)) => {
            metrics::counter!(m::PERSIST_FAILURES).increment(1);
            let _ = done.send(Err(e));
        }
        (_, None) => {
            metrics::counter!(m::PERSIST_FAILURES).increment(1);
            tracing::error!(session_id = %a.session, error = %e, "event could not be persisted");
        }
    }
}
