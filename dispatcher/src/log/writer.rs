//! The writer: takes everything queued, commits consecutive appends in one
//! statement, and runs transitions and usage in order between them.

use std::collections::HashMap;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::hub::Hub;
use super::{MAX_BATCH, Op};
use crate::error::{Error, Result};
use crate::metrics as m;
use crate::session::Event;
use crate::store::{Append, Store};

/// An append waiting for the next batch, with whom to tell the result.
type Pending = (Append, Option<oneshot::Sender<Result<Event>>>);

/// Appends waiting for the next statement, and when the oldest was queued.
#[derive(Default)]
struct Batch {
    appends: Vec<Pending>,
    oldest: Option<std::time::Instant>,
}

pub(super) async fn run(
    store: Store,
    hub: std::sync::Arc<Hub>,
    mut rx: mpsc::Receiver<Op>,
    shutdown: CancellationToken,
) {
    let mut ops = Vec::with_capacity(MAX_BATCH);
    let w = Writer {
        store,
        hub,
        shutdown,
    };
    loop {
        metrics::gauge!(m::WRITER_QUEUE).set(rx.len() as f64);
        if rx.recv_many(&mut ops, MAX_BATCH).await == 0 {
            return;
        }
        metrics::gauge!(m::WRITER_QUEUE).set((rx.len() + ops.len()) as f64);
        let mut batch = Batch::default();
        for op in ops.drain(..) {
            match op {
                Op::Append {
                    append,
                    done,
                    queued,
                } => {
                    batch.oldest.get_or_insert(queued);
                    batch.appends.push((append, done));
                }
                Op::Transition {
                    session,
                    epoch,
                    event,
                    reason,
                    detail,
                    done,
                } => {
                    w.flush(&mut batch).await;
                    let r = w
                        .retry(|| w.store.transition(session, epoch, event, &reason, &detail))
                        .await;
                    if let Ok(t) = &r
                        && let Some(e) = &t.event
                    {
                        metrics::counter!(m::EVENTS_PERSISTED).increment(1);
                        if t.to.ends_run() {
                            metrics::counter!(m::SESSIONS_ENDED, "status" => t.to.as_str())
                                .increment(1);
                        }
                        w.hub.publish(std::slice::from_ref(e));
                    }
                    let _ = done.send(r);
                }
                Op::Usage {
                    session,
                    usage,
                    done,
                } => {
                    w.flush(&mut batch).await;
                    let r = w.retry(|| w.store.record_usage(session, &usage)).await;
                    if let Ok(u) = &r {
                        metrics::counter!(m::EVENTS_PERSISTED).increment(1);
                        w.hub.publish(std::slice::from_ref(&u.event));
                    }
                    let _ = done.send(r);
                }
            }
        }
        w.flush(&mut batch).await;
    }
}

struct Writer {
    store: Store,
    hub: std::sync::Arc<Hub>,
    shutdown: CancellationToken,
}

impl Writer {
    /// Commits the batch's appends in one statement; when any is refused,
    /// one by one, so one session's failure fails no other's.
    async fn flush(&self, batch: &mut Batch) {
        if batch.appends.is_empty() {
            return;
        }
        let appends: Vec<Append> = batch.appends.iter().map(|(a, _)| a.clone()).collect();
        let started = std::time::Instant::now();
        let result = self.retry(|| self.store.append(&appends)).await;
        metrics::histogram!(m::PERSIST_DURATION).record(started.elapsed().as_secs_f64());
        metrics::histogram!(m::PERSIST_BATCH).record(appends.len() as f64);
        if let Some(oldest) = batch.oldest.take() {
            metrics::histogram!(m::PERSIST_LAG).record(oldest.elapsed().as_secs_f64());
        }
        match result {
            Ok(events) => {
                metrics::counter!(m::EVENTS_PERSISTED).increment(events.len() as u64);
                self.hub.publish(&events);
                let mut by_id: HashMap<Uuid, Event> =
                    events.into_iter().map(|e| (e.id, e)).collect();
                for (a, done) in batch.appends.drain(..) {
                    if let (Some(done), Some(e)) = (done, by_id.remove(&a.event.id)) {
                        let _ = done.send(Ok(e));
                    }
                }
            }
            Err(_) if batch.appends.len() > 1 => {
                for (append, done) in batch.appends.drain(..) {
                    let one = [append];
                    match self.retry(|| self.store.append(&one)).await {
                        Ok(mut evs) => {
                            metrics::counter!(m::EVENTS_PERSISTED).increment(evs.len() as u64);
                            self.hub.publish(&evs);
                            if let (Some(done), Some(e)) = (done, evs.pop()) {
                                let _ = done.send(Ok(e));
                            }
                        }
                        Err(e) => report(&one[0], e, done),
                    }
                }
            }
            Err(e) => {
                if let Some((append, done)) = batch.appends.pop() {
                    report(&append, e, done);
                }
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
        let mut delay = Duration::from_millis(20);
        loop {
            match f().await {
                Err(e) if e.is_transient() && !self.shutdown.is_cancelled() => {
                    tracing::warn!(error = %e, retry_in = ?delay, "event log write failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(2));
                }
                r => return r,
            }
        }
    }
}

/// Tells the submitter, or logs, an append that was not stored.
fn report(a: &Append, e: Error, done: Option<oneshot::Sender<Result<Event>>>) {
    match (&e, done) {
        // A superseded run's late event: the newer run owns the log now.
        (Error::Superseded { .. }, None) => {
            tracing::info!(session_id = %a.session, error = %e, kind = %a.event.kind, "dropped an event of a superseded run");
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
