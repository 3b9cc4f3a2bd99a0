//! Fans persisted events out to this dispatcher's subscribers, one bounded
//! broadcast feed per followed session.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use berth_common::sync::lock;
use tokio::sync::broadcast;
use uuid::Uuid;

use crate::session::Event;

/// Events a live subscriber may fall behind before it reads from the store.
const FEED_CAPACITY: usize = 256;

/// What a hub feed carries.
#[derive(Debug, Clone)]
pub(super) enum Signal {
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

    /// Sends persisted events to their sessions' subscribers; sharing the
    /// `Arc` costs no copy of the payload.
    pub(super) fn publish(&self, events: &[Arc<Event>]) {
        let mut feeds = lock(&self.feeds);
        for e in events {
            let Some(feed) = feeds.get_mut(&e.session_id) else {
                continue;
            };
            if feed.tx.receiver_count() == 0 {
                feeds.remove(&e.session_id);
                continue;
            }
            feed.published = feed.published.max(e.seq);
            let _ = feed.tx.send(Signal::Event(e.clone()));
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
