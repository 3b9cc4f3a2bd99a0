//! Notices to every dispatcher's LISTEN: "session S has events up to seq N"
//! and "the queue has work", sent in one `NOTIFY` statement per batch after
//! the data they announce has committed, never inside the data's own
//! transaction.
//!
//! Why: Postgres serializes every committing transaction that has issued a
//! `NOTIFY` on one lock held through its WAL flush, across the whole
//! cluster, so a `NOTIFY` inside each append or status change turned every
//! commit of every dispatcher into a queue of one (on this machine 16
//! clients went from 3 300 to 1 500 commits/s). Here the data commits in
//! parallel, and notices pending while one batch is sent go in the next,
//! each session's latest seq only.
//!
//! A notice is a hint: the queue is also polled, and a follower that missed
//! one catches up from the log at the session's next notice. A dispatcher
//! that dies between a commit and its notice delays, and loses nothing.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use berth_common::sync::lock;
use sqlx::PgPool;
use tokio::sync::Notify;
use uuid::Uuid;

use super::{EVENTS_CHANNEL, QUEUE_CHANNEL};

/// Notices waiting for the next batch.
#[derive(Default)]
pub(crate) struct Notices {
    pending: Mutex<Pending>,
    wake: Notify,
    /// This dispatcher's own queue wake-up: a session queued here is
    /// claimed without waiting for the `NOTIFY` to come back through
    /// Postgres (other dispatchers still get it).
    queued: Notify,
    closed: AtomicBool,
}

#[derive(Default)]
struct Pending {
    /// The highest seq committed per session since the last batch.
    events: HashMap<Uuid, i64>,
    queue: bool,
}

impl Notices {
    /// Session `id` has committed events up to `seq`.
    pub(crate) fn event(&self, id: Uuid, seq: i64) {
        self.events([(id, seq)]);
    }

    /// Each session has committed events up to its seq: one lock and one
    /// wake-up for a whole committed batch.
    pub(crate) fn events(&self, committed: impl IntoIterator<Item = (Uuid, i64)>) {
        {
            let mut p = lock(&self.pending);
            for (id, seq) in committed {
                let at = p.events.entry(id).or_insert(seq);
                *at = (*at).max(seq);
            }
        }
        self.wake.notify_one();
    }

    /// A session was queued (or queued again).
    pub(crate) fn queue(&self) {
        lock(&self.pending).queue = true;
        self.wake.notify_one();
        self.queued.notify_one();
    }

    /// Resolves when this dispatcher queues a session (see [`Self::queue`]).
    pub(crate) async fn queued(&self) {
        self.queued.notified().await;
    }

    /// No more notices will come: [`run`] sends what is pending and ends.
    pub(crate) fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.wake.notify_one();
    }

    /// The next batch as (channel, payload) pairs; `None` once closed and
    /// empty.
    async fn next_batch(&self) -> Option<(Vec<&'static str>, Vec<String>)> {
        loop {
            let closed = self.closed.load(Ordering::Acquire);
            let taken = std::mem::take(&mut *lock(&self.pending));
            if !taken.events.is_empty() || taken.queue {
                let mut channels = Vec::with_capacity(taken.events.len() + 1);
                let mut payloads = Vec::with_capacity(taken.events.len() + 1);
                for (id, seq) in taken.events {
                    channels.push(EVENTS_CHANNEL);
                    payloads.push(format!("{id}:{seq}"));
                }
                if taken.queue {
                    channels.push(QUEUE_CHANNEL);
                    payloads.push(String::new());
                }
                return Some((channels, payloads));
            }
            if closed {
                return None;
            }
            self.wake.notified().await;
        }
    }
}

/// Closes the notices when dropped: [`run`] ends however its owner returns.
pub(crate) struct CloseOnDrop(pub std::sync::Arc<Notices>);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        self.0.close();
    }
}

/// Sends the notices in batches until [`Notices::close`]. A batch that
/// cannot be sent (Postgres unreachable) is retried a few times, then
/// dropped with a warning: the queue's poll and the next notices cover it.
pub(crate) async fn run(pool: PgPool, notices: std::sync::Arc<Notices>) {
    while let Some((channels, payloads)) = notices.next_batch().await {
        let mut backoff =
            berth_common::retry::Backoff::new(Duration::from_millis(20), Duration::from_secs(1));
        for attempt in 1.. {
            let sent = sqlx::query(
                "SELECT pg_notify(c, p) FROM unnest($1::text[], $2::text[]) AS t(c, p)",
            )
            .bind(&channels)
            .bind(&payloads)
            .execute(&pool)
            .await;
            match sent {
                Ok(_) => break,
                Err(e) if attempt < 5 => {
                    tracing::debug!(error = %e, attempt, "sending notices failed; retrying");
                    tokio::time::sleep(backoff.next_delay()).await;
                }
                Err(e) => {
                    tracing::warn!(error = %e, notices = channels.len(), "notices to other dispatchers dropped; they catch up at the next ones");
                    break;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_batch_holds_each_sessions_latest_seq_and_one_queue_wake_up() {
        let n = Notices::default();
        let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
        n.event(a, 3);
        n.event(a, 7);
        n.event(a, 5);
        n.event(b, 1);
        n.queue();
        n.queue();
        let (channels, mut payloads) = n.next_batch().await.expect("a batch");
        payloads.sort();
        let mut want = vec![format!("{a}:7"), format!("{b}:1"), String::new()];
        want.sort();
        assert_eq!(payloads, want);
        assert_eq!(channels.iter().filter(|c| **c == QUEUE_CHANNEL).count(), 1);
        n.close();
        assert!(n.next_batch().await.is_none(), "closed and empty: done");
    }

    #[tokio::test]
    async fn closing_sends_what_is_pending_first() {
        let n = Notices::default();
        n.event(Uuid::now_v7(), 1);
        n.close();
        assert!(n.next_batch().await.is_some());
        assert!(n.next_batch().await.is_none());
    }
}
