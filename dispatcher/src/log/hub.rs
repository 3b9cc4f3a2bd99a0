//! Fans persisted events out to this dispatcher's subscribers, one bounded
//! broadcast feed per followed session.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use berth_common::sync::lock;
use tokio::sync::broadcast;
use uuid::Uuid;

use crate::session::Event;

/// Commits a live subscriber may fall behind before it reads from the
/// store. A slot holds a whole commit's events of its session, so a batch
/// of hundreds costs one slot; and every followed session holds a feed, so
/// slots are memory (about 48 bytes each) per open stream.
const FEED_CAPACITY: usize = 32;

/// What a hub feed carries.
#[derive(Debug, Clone)]
pub(super) enum Signal {
    /// Events this dispatcher persisted in one commit, in seq order.
    Events(Arc<[Arc<Event>]>),
    /// Another dispatcher persisted events up to this seq.
    Upto(i64),
}

struct Feed {
    tx: broadcast::Sender<Signal>,
    /// Highest seq published here; older remote notices are ignored.
    published: i64,
}

#[derive(Default)]
pub(super) struct Hub {
    feeds: Mutex<HashMap<Uuid, Feed>>,
}

impl Hub {
    pub(super) fn subscribe(&self, id: Uuid) -> broadcast::Receiver<Signal> {
        let mut feeds = lock(&self.feeds);
        match feeds.get(&id) {
            Some(f) => f.tx.subscribe(),
            None => {
                let (tx, rx) = broadcast::channel(FEED_CAPACITY);
                feeds.insert(id, Feed { tx, published: 0 });
                rx
            }
        }
    }

    /// Sends persisted events to their sessions' subscribers, one signal
    /// per session for the whole commit; sharing the `Arc`s costs no copy
    /// of a payload.
    pub(super) fn publish(&self, events: &[Arc<Event>]) {
        let mut by_session: HashMap<Uuid, Vec<Arc<Event>>> = HashMap::new();
        let mut feeds = lock(&self.feeds);
        for e in events {
            if feeds.contains_key(&e.session_id) {
                by_session.entry(e.session_id).or_default().push(e.clone());
            }
        }
        for (id, events) in by_session {
            let Some(feed) = feeds.get_mut(&id) else {
                continue;
            };
            if feed.tx.receiver_count() == 0 {
                feeds.remove(&id);
                continue;
            }
            let last = events.iter().map(|e| e.seq).max().unwrap_or(0);
            feed.published = feed.published.max(last);
            let _ = feed.tx.send(Signal::Events(events.into()));
        }
    }

    pub(super) fn remote(&self, id: Uuid, seq: i64) {
        let mut feeds = lock(&self.feeds);
        if let Some(feed) = feeds.get_mut(&id) {
            if feed.tx.receiver_count() == 0 {
                feeds.remove(&id);
            } else if seq > feed.published {
                let _ = feed.tx.send(Signal::Upto(seq));
            }
        }
    }
}
