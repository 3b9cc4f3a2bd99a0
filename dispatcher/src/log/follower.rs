//! A follower streams one session's log to one subscriber: history first,
//! then live events, with no gap and no duplicate.
//!
//! Invariant: the follower subscribed to the hub before it reads history,
//! and drops anything at or below `last`, the seq it sent last. An event it
//! missed live (it lagged, or another dispatcher wrote it) is read from
//! history before anything newer is sent.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use tokio_util::task::{AbortOnDropHandle, TaskTracker};
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

/// What [`follow`] returns: the session's events, in order, ending after
/// its run ends (or with the error that stopped it).
pub(crate) type Follow = Pin<Box<dyn Stream<Item = Followed> + Send>>;

/// Follows `session` after `after_seq` on `feed` (already subscribed).
///
/// A stream, not a task: it reads history and the feed as its subscriber
/// polls it, so a held stream costs no task and no channel of its own, and
/// a subscriber that stops polling just lags (and catches up from the
/// store). Its state stays inside it when a poll is dropped, so it can be
/// raced in `select!`.
pub(super) fn follow<H: History>(
    history: H,
    session: Uuid,
    after_seq: i64,
    feed: broadcast::Receiver<Signal>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
) -> Follow {
    let follower = Follower {
        history,
        session,
        last: after_seq,
        feed,
        shutdown,
        tasks,
        phase: Phase::Start,
        pending: VecDeque::new(),
        signal: None,
        catching: None,
        done: false,
    };
    let stream = futures::stream::unfold(follower, |mut f| async move {
        let item = f.next().await?;
        Some((item, f))
    });
    Box::pin(futures::StreamExt::fuse(stream))
}

/// Runs a store read on a task of its own, cancelled if the follower is
/// dropped. A follower is a stream, polled only while its subscriber
/// reads: a read inside it would hold its pool connection for as long as
/// the subscriber does something else (a relay awaiting a commit, a client
/// not reading), and enough such streams starved the pool outright.
/// The task is the log's (shutdown awaits it); dropping the follower
/// aborts it.
async fn detached<T: Send + 'static>(
    tasks: &TaskTracker,
    read: impl Future<Output = Result<T>> + Send + 'static,
) -> Result<T> {
    AbortOnDropHandle::new(tasks.spawn(read))
        .await
        .map_err(|e| Error::Internal(format!("a follower's store read failed: {e}")))?
}

/// Where a follower is between items.
enum Phase {
    /// Nothing read yet.
    Start,
    /// History read: is there more to come?
    Position,
    /// Following the feed.
    Live,
}

struct Follower<H> {
    history: H,
    session: Uuid,
    /// The seq it sent last.
    last: i64,
    feed: broadcast::Receiver<Signal>,
    shutdown: CancellationToken,
    /// Runs its store reads.
    tasks: TaskTracker,
    phase: Phase,
    /// Read from history, in order: sent next.
    pending: VecDeque<Arc<Event>>,
    /// The feed's last commit, and how far into it the follower is.
    signal: Option<(Arc<[Arc<Event>]>, usize)>,
    /// Reading history: up to this seq (`Some(None)`: all there is).
    catching: Option<Option<i64>>,
    /// It has sent its last item.
    done: bool,
}

impl<H: History> Follower<H> {
    /// The next item; `None` once the run ended, the feed closed, or an
    /// error was sent.
    async fn next(&mut self) -> Option<Followed> {
        loop {
            if let Some(e) = self.pending.pop_front() {
                if e.seq <= self.last {
                    continue;
                }
                return Some(self.emit(e).await);
            }
            if self.done {
                return None;
            }
            if let Some(upto) = self.catching {
                if let Err(e) = self.read_page(upto).await {
                    self.done = true;
                    return Some(Err(Box::new(e)));
                }
                continue;
            }
            match self.phase {
                Phase::Start => {
                    self.catching = Some(None);
                    self.phase = Phase::Position;
                }
                Phase::Position => match self.position().await {
                    Ok((live, last_seq)) if !live && last_seq <= self.last => return None,
                    Ok(_) => self.phase = Phase::Live,
                    Err(e) => {
                        self.done = true;
                        return Some(Err(Box::new(e)));
                    }
                },
                Phase::Live => {
                    if let Some(e) = self.next_in_signal() {
                        // The next one is sent; a gap (events another
                        // dispatcher wrote) is read from the store first;
                        // what the store already gave is skipped.
                        if e.seq == self.last + 1 {
                            return Some(self.emit(e).await);
                        } else if e.seq > self.last {
                            self.catching = Some(Some(e.seq));
                        }
                        continue;
                    }
                    if let Err(e) = self.listen().await? {
                        self.done = true;
                        return Some(Err(Box::new(e)));
                    }
                }
            }
        }
    }

    /// Sends `e`, the event after `last`; the stream ends after it when it
    /// ends the session's latest run.
    async fn emit(&mut self, e: Arc<Event>) -> Followed {
        self.last = e.seq;
        if e.ends_run() && self.is_last_run_end(e.seq).await {
            self.done = true;
        }
        Ok(e)
    }

    /// The next event of the feed's last commit, if any is left.
    fn next_in_signal(&mut self) -> Option<Arc<Event>> {
        let (events, at) = self.signal.as_mut()?;
        let e = events.get(*at).cloned();
        *at += 1;
        if e.is_none() {
            self.signal = None;
        }
        e
    }

    /// Waits for the feed's next signal and takes it in. `None`: the feed
    /// closed; an error: this dispatcher is shutting down.
    async fn listen(&mut self) -> Option<Result<()>> {
        let signal = tokio::select! {
            s = self.feed.recv() => s,
            () = self.shutdown.cancelled() => {
                return Some(Err(Error::ShuttingDown(format!(
                    "dispatcher shutting down; reconnect with after_seq={}",
                    self.last
                ))));
            }
        };
        match signal {
            Ok(Signal::Events(events)) => self.signal = Some((events, 0)),
            Ok(Signal::Upto(seq)) if seq > self.last => self.catching = Some(Some(seq)),
            Ok(Signal::Upto(_)) => {}
            Err(broadcast::error::RecvError::Lagged(missed)) => {
                metrics::counter!(m::STREAM_CATCHUPS).increment(1);
                tracing::debug!(session_id = %self.session, missed, "slow subscriber catching up from the store");
                // What is left of the last commit is in the store too.
                self.signal = None;
                self.catching = Some(None);
            }
            Err(broadcast::error::RecvError::Closed) => return None,
        }
        Some(Ok(()))
    }

    /// Reads one page of history past `last` into `pending`; the catch-up
    /// ends with a short page, or once it reaches `upto`.
    async fn read_page(&mut self, upto: Option<i64>) -> Result<()> {
        let (history, session, after) = (self.history.clone(), self.session, self.last);
        let page = detached(&self.tasks, async move {
            history.events_after(session, after, HISTORY_PAGE).await
        })
        .await?;
        let full = page.len() as i64 == HISTORY_PAGE;
        let reached = page.last().map_or(self.last, |e| e.seq);
        self.pending.extend(page.into_iter().map(Arc::new));
        if !full || upto.is_some_and(|u| reached >= u) {
            self.catching = None;
        }
        Ok(())
    }

    /// Whether the session is live, and its last seq.
    async fn position(&self) -> Result<(bool, i64)> {
        let (history, session) = (self.history.clone(), self.session);
        detached(&self.tasks, async move { history.position(session).await }).await
    }

    /// Whether a run-ending event at `seq` is where the log ends for now: a
    /// paused or stopped session that was resumed since has more to come.
    async fn is_last_run_end(&self, seq: i64) -> bool {
        match self.position().await {
            Ok((live, last_seq)) => !(live || last_seq > seq),
            Err(_) => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::time::Duration;

    use berth_common::sync::lock;

    use futures::StreamExt;

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

    async fn seqs(rx: &mut Follow, n: usize) -> Vec<i64> {
        let mut out = Vec::new();
        while out.len() < n {
            let e = tokio::time::timeout(Duration::from_secs(5), rx.next())
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
        let mut rx = follow_memory(&mem, &hub, id, 1, CancellationToken::new());
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
        let mut rx = follow_memory(&mem, &hub, id, 0, CancellationToken::new());
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
        let (id, mem, hub, mut rx) = slow_subscriber();
        // Following live (the history at subscribe was empty).
        assert!(
            seqs_within(&mut rx, Duration::from_millis(100))
                .await
                .is_empty()
        );
        let before = mem.reads.load(std::sync::atomic::Ordering::SeqCst);
        // Far more commits than the feed holds, while nobody polls.
        let n = 600;
        for _ in 0..n {
            let e = mem.write(id, "agent.message");
            hub.publish(&[e]);
        }
        let got = seqs(&mut rx, n).await;
        assert_eq!(got, (1..=n as i64).collect::<Vec<_>>());
        assert!(
            mem.reads.load(std::sync::atomic::Ordering::SeqCst) > before,
            "what the feed dropped was read from the store"
        );
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

    /// A follower of a live session in memory, from the start of its log,
    /// that reads only when the test polls it.
    fn slow_subscriber() -> (Uuid, Memory, Hub, Follow) {
        let (id, mem, hub) = (Uuid::now_v7(), Memory::live(), Hub::default());
        let rx = follow_memory(&mem, &hub, id, 0, CancellationToken::new());
        (id, mem, hub, rx)
    }

    /// A follower of `mem`'s session `id` after `after`, subscribed to `hub`
    /// before it reads.
    fn follow_memory(
        mem: &Memory,
        hub: &Hub,
        id: Uuid,
        after: i64,
        stop: CancellationToken,
    ) -> Follow {
        follow(
            mem.clone(),
            id,
            after,
            hub.subscribe(id),
            stop,
            TaskTracker::new(),
        )
    }

    /// Whatever arrives within `wait`.
    async fn seqs_within(rx: &mut Follow, wait: Duration) -> Vec<i64> {
        let mut out = Vec::new();
        while let Ok(Some(Ok(e))) = tokio::time::timeout(wait, rx.next()).await {
            out.push(e.seq);
        }
        out
    }

    #[tokio::test]
    async fn the_stream_ends_after_the_run_ends() {
        let (id, mem, hub) = (Uuid::now_v7(), Memory::live(), Hub::default());
        let mut rx = follow_memory(&mem, &hub, id, 0, CancellationToken::new());
        let e1 = mem.write(id, "agent.message");
        *lock(&mem.live) = false;
        let e2 = mem.write(id, &SessionStatus::Completed.event_type());
        hub.publish(&[e1, e2]);
        assert_eq!(seqs(&mut rx, 2).await, vec![1, 2]);
        let end = tokio::time::timeout(Duration::from_secs(5), rx.next()).await;
        assert!(matches!(end, Ok(None)), "the stream should end");
    }

    #[tokio::test]
    async fn shutdown_ends_the_stream_with_where_to_resume() {
        let (id, mem, hub) = (Uuid::now_v7(), Memory::live(), Hub::default());
        mem.write(id, "agent.message");
        let stop = CancellationToken::new();
        let mut rx = follow_memory(&mem, &hub, id, 0, stop.clone());
        assert_eq!(seqs(&mut rx, 1).await, vec![1]);
        stop.cancel();
        let e = rx.next().await.expect("an error").expect_err("an error");
        assert!(e.to_string().contains("after_seq=1"), "{e}");
    }
}
