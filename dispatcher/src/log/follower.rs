//! A follower streams one session's log to one subscriber: history first,
//! then live events, with no gap and no duplicate.
//!
//! Invariant: the follower subscribed to the hub before it reads history,
//! and drops anything at or below `last`, the seq it sent last. An event it
//! missed live (it lagged, or another dispatcher wrote it) is read from
//! history before anything newer is sent.

use std::sync::Arc;

use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use super::Followed;
use super::hub::Signal;
use crate::error::{Error, Result};
use crate::metrics as m;
use crate::session::Event;
use crate::store::Store;

/// Page size when a follower reads history.
const HISTORY_PAGE: i64 = 500;

/// Where a follower reads what it missed: the store, or a test's memory.
pub(crate) trait History: Clone + Send + Sync + 'static {
    /// Up to `limit` events after `after`, in seq order.
    fn events_after(
        &self,
        session: Uuid,
        after: i64,
        limit: i64,
    ) -> impl Future<Output = Result<Vec<Event>>> + Send;

    /// Whether the session may still add events (it is live), and its last seq.
    fn position(&self, session: Uuid) -> impl Future<Output = Result<(bool, i64)>> + Send;
}

impl History for Store {
    async fn events_after(&self, session: Uuid, after: i64, limit: i64) -> Result<Vec<Event>> {
        self.list_events(session, after, limit).await
    }

    async fn position(&self, session: Uuid) -> Result<(bool, i64)> {
        let p = Store::position(self, session).await?;
        Ok((p.status.is_live(), p.last_seq))
    }
}

/// Starts a follower of `session` after `after_seq` on `feed` (already
/// subscribed), sending into a channel of `buffer` events.
pub(super) fn spawn<H: History>(
    history: H,
    session: Uuid,
    after_seq: i64,
    buffer: usize,
    feed: broadcast::Receiver<Signal>,
    shutdown: CancellationToken,
    tasks: &TaskTracker,
) -> mpsc::Receiver<Followed> {
    let (tx, rx) = mpsc::channel(buffer);
    let follower = Follower {
        history,
        session,
        last: after_seq,
        tx,
        shutdown,
    };
    tasks.spawn(follower.run(feed));
    rx
}

struct Follower<H> {
    history: H,
    session: Uuid,
    last: i64,
    tx: mpsc::Sender<Followed>,
    shutdown: CancellationToken,
}

/// The follower has stopped sending: the run ended, the subscriber left, or
/// an error was sent.
struct Done;

impl<H: History> Follower<H> {
    async fn run(mut self, mut feed: broadcast::Receiver<Signal>) {
        if self.catch_up(None).await.is_err() {
            return;
        }
        match self.history.position(self.session).await {
            Ok((live, last_seq)) if !live && last_seq <= self.last => return,
            Ok(_) => {}
            Err(e) => {
                let _ = self.tx.send(Err(Box::new(e))).await;
                return;
            }
        }
        loop {
            let signal = tokio::select! {
                s = feed.recv() => s,
                () = self.tx.closed() => return,
                () = self.shutdown.cancelled() => {
                    let e = Error::ShuttingDown(format!("dispatcher shutting down; reconnect with after_seq={}", self.last));
                    let _ = self.tx.send(Err(Box::new(e))).await;
                    return;
                }
            };
            let step = match signal {
                Ok(Signal::Events(events)) => self.step(&events).await,
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

    /// One commit's events: each next one is sent; a gap (events another
    /// dispatcher wrote) is read from the store first; what the store
    /// already gave is skipped.
    async fn step(&mut self, events: &[Arc<Event>]) -> Result<(), Done> {
        for e in events {
            if e.seq == self.last + 1 {
                self.send(e.clone()).await?;
            } else if e.seq > self.last {
                self.catch_up(Some(e.seq)).await?;
            }
        }
        Ok(())
    }

    async fn send(&mut self, e: Arc<Event>) -> Result<(), Done> {
        self.last = e.seq;
        let ends = e.ends_run() && self.is_last_run_end(e.seq).await;
        if self.tx.send(Ok(e)).await.is_err() || ends {
            return Err(Done);
        }
        Ok(())
    }

    /// Whether a run-ending event at `seq` is where the log ends for now: a
    /// paused or stopped session that was resumed since has more to come.
    async fn is_last_run_end(&self, seq: i64) -> bool {
        match self.history.position(self.session).await {
            Ok((live, last_seq)) => !(live || last_seq > seq),
            Err(_) => true,
        }
    }

    /// Reads history past `last`, up to `upto` (or everything there is).
    async fn catch_up(&mut self, upto: Option<i64>) -> Result<(), Done> {
        loop {
            let page = match self
                .history
                .events_after(self.session, self.last, HISTORY_PAGE)
                .await
            {
                Ok(p) => p,
                Err(e) => {
                    let _ = self.tx.send(Err(Box::new(e))).await;
                    return Err(Done);
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

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::time::Duration;

    use berth_common::sync::lock;

    use super::*;
    use crate::log::hub::Hub;
    use crate::session::SessionStatus;

    /// A session's log in memory: what the store would hold.
    #[derive(Clone, Default)]
    struct Memory {
        events: Arc<Mutex<Vec<Event>>>,
        live: Arc<Mutex<bool>>,
        /// Reads of history past the first (the catch-up at subscribe).
        reads: Arc<std::sync::atomic::AtomicUsize>,
    }

    impl Memory {
        fn live() -> Self {
            let m = Self::default();
            *lock(&m.live) = true;
            m
        }

        /// Stores an event of `kind` as the next seq and returns it.
        fn write(&self, session: Uuid, kind: &str) -> Arc<Event> {
            let mut events = lock(&self.events);
            let e = Event {
                session_id: session,
                seq: events.len() as i64 + 1,
                id: Uuid::now_v7(),
                kind: kind.to_string(),
                create_time: chrono::Utc::now(),
                payload: "{}".into(),
                raw: None,
                line_seq: 0,
                traceparent: None,
            };
            events.push(e.clone());
            Arc::new(e)
        }
    }

    impl History for Memory {
        async fn events_after(&self, _: Uuid, after: i64, limit: i64) -> Result<Vec<Event>> {
            self.reads.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let events = lock(&self.events);
            Ok(events
                .iter()
                .filter(|e| e.seq > after)
                .take(usize::try_from(limit).unwrap_or(0))
                .cloned()
                .collect())
        }

        async fn position(&self, _: Uuid) -> Result<(bool, i64)> {
            Ok((*lock(&self.live), lock(&self.events).len() as i64))
        }
    }

    async fn seqs(rx: &mut mpsc::Receiver<Followed>, n: usize) -> Vec<i64> {
        let mut out = Vec::new();
        while out.len() < n {
            let e = tokio::time::timeout(Duration::from_secs(5), rx.recv())
                .await
                .expect("the follower stalled")
                .expect("the follower ended early")
                .expect("the follower sent an error");
            out.push(e.seq);
        }
        out
    }

    #[tokio::test]
    async fn history_then_live_with_no_gap_and_no_duplicate() {
        let (id, mem, hub) = (Uuid::now_v7(), Memory::live(), Hub::default());
        for _ in 0..3 {
            mem.write(id, "agent.message");
        }
        let feed = hub.subscribe(id);
        let mut rx = spawn(
            mem.clone(),
            id,
            1,
            16,
            feed,
            CancellationToken::new(),
            &TaskTracker::new(),
        );
        assert_eq!(seqs(&mut rx, 2).await, vec![2, 3]);
        // Published live, and also already in history: sent once.
        let e4 = mem.write(id, "agent.message");
        hub.publish(&[e4.clone(), e4]);
        let e5 = mem.write(id, "agent.message");
        hub.publish(&[e5]);
        assert_eq!(seqs(&mut rx, 2).await, vec![4, 5]);
    }

    #[tokio::test]
    async fn events_written_elsewhere_are_read_before_newer_live_ones() {
        let (id, mem, hub) = (Uuid::now_v7(), Memory::live(), Hub::default());
        let feed = hub.subscribe(id);
        let mut rx = spawn(
            mem.clone(),
            id,
            0,
            16,
            feed,
            CancellationToken::new(),
            &TaskTracker::new(),
        );
        // Another dispatcher wrote 1 and 2; this one publishes 3.
        mem.write(id, "user.message");
        mem.write(id, "user.message");
        let e3 = mem.write(id, "agent.message");
        hub.publish(&[e3]);
        assert_eq!(seqs(&mut rx, 3).await, vec![1, 2, 3]);
        mem.write(id, "agent.message");
        hub.remote(id, 4);
        assert_eq!(seqs(&mut rx, 1).await, vec![4]);
    }

    #[tokio::test]
    async fn a_lagging_subscriber_catches_up_from_history() {
        // A buffer of 1: the follower blocks while the feed overflows.
        let (id, mem, hub, mut rx) = slow_subscriber();
        let n = 600;
        for _ in 0..n {
            let e = mem.write(id, "agent.message");
            hub.publish(&[e]);
        }
        let got = seqs(&mut rx, n).await;
        assert_eq!(got, (1..=n as i64).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn a_large_commit_reaches_a_slow_subscriber_without_a_store_read() {
        let (id, mem, hub, mut rx) = slow_subscriber();
        // The catch-up at subscribe has read the (empty) history.
        assert!(
            seqs_within(&mut rx, Duration::from_millis(100))
                .await
                .is_empty()
        );
        let before = mem.reads.load(std::sync::atomic::Ordering::SeqCst);
        // Commits far larger than the feed, each one signal.
        let n = 1000;
        for _ in 0..4 {
            let batch: Vec<Arc<Event>> =
                (0..n / 4).map(|_| mem.write(id, "agent.message")).collect();
            hub.publish(&batch);
        }
        let got = seqs(&mut rx, n).await;
        assert_eq!(got, (1..=n as i64).collect::<Vec<_>>());
        assert_eq!(
            mem.reads.load(std::sync::atomic::Ordering::SeqCst),
            before,
            "no store read: the feed held the commits"
        );
    }

    /// A follower of a live session in memory that takes one event at a
    /// time (a buffer of 1), from the start of its log.
    fn slow_subscriber() -> (Uuid, Memory, Hub, mpsc::Receiver<Followed>) {
        let (id, mem, hub) = (Uuid::now_v7(), Memory::live(), Hub::default());
        let feed = hub.subscribe(id);
        let rx = spawn(
            mem.clone(),
            id,
            0,
            1,
            feed,
            CancellationToken::new(),
            &TaskTracker::new(),
        );
        (id, mem, hub, rx)
    }

    /// Whatever arrives within `wait`.
    async fn seqs_within(rx: &mut mpsc::Receiver<Followed>, wait: Duration) -> Vec<i64> {
        let mut out = Vec::new();
        while let Ok(Some(Ok(e))) = tokio::time::timeout(wait, rx.recv()).await {
            out.push(e.seq);
        }
        out
    }

    #[tokio::test]
    async fn the_stream_ends_after_the_run_ends() {
        let (id, mem, hub) = (Uuid::now_v7(), Memory::live(), Hub::default());
        let feed = hub.subscribe(id);
        let mut rx = spawn(
            mem.clone(),
            id,
            0,
            16,
            feed,
            CancellationToken::new(),
            &TaskTracker::new(),
        );
        let e1 = mem.write(id, "agent.message");
        *lock(&mem.live) = false;
        let e2 = mem.write(id, &SessionStatus::Completed.event_type());
        hub.publish(&[e1, e2]);
        assert_eq!(seqs(&mut rx, 2).await, vec![1, 2]);
        let end = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await;
        assert!(matches!(end, Ok(None)), "the stream should end");
    }

    #[tokio::test]
    async fn shutdown_ends_the_stream_with_where_to_resume() {
        let (id, mem, hub) = (Uuid::now_v7(), Memory::live(), Hub::default());
        mem.write(id, "agent.message");
        let stop = CancellationToken::new();
        let mut rx = spawn(
            mem.clone(),
            id,
            0,
            16,
            hub.subscribe(id),
            stop.clone(),
            &TaskTracker::new(),
        );
        assert_eq!(seqs(&mut rx, 1).await, vec![1]);
        stop.cancel();
        let e = rx.recv().await.expect("an error").expect_err("an error");
        assert!(e.to_string().contains("after_seq=1"), "{e}");
    }
}
